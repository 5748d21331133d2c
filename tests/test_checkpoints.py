"""SAPTrainer ends with exactly the best checkpoint's weights and resumes exactly from a checkpoint.

transformers 5 writes ViT checkpoints with legacy tensor names and `Trainer` reloads them with
`strict=False`: without `sap_hf.trainer.checkpoints` only the embeddings and the head came back.
"""

import pytest
import torch
from helpers import random_examples
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments, ViTForImageClassification

from sap_hf.models import tiny_vit_config
from sap_hf.trainer import SAPTrainer
from sap_hf.trainer.checkpoints import CheckpointWeights, load_checkpoint_weights


def _model(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = tiny_vit_config(
        image_size=8, patch_size=4, num_channels=3, num_labels=3, hidden_size=32, num_hidden_layers=2
    )
    return ViTForImageClassification(config)


def _first_epoch_best():
    """compute_metrics whose first evaluation is the best: the best checkpoint is not the last one."""
    calls = []

    def metrics(prediction):
        calls.append(1)
        return {"accuracy": 1.0 if len(calls) == 1 else 0.0}

    return metrics


def _trainer(tmp_path, model, epochs, learning_rate=1e-2, **args):
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        eval_strategy="epoch",
        save_strategy="epoch",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        **args,
    )
    return SAPTrainer(
        model=model,
        args=training_args,
        train_dataset=random_examples(16, size=8),
        eval_dataset=random_examples(8, size=8, seed=3),
        compute_metrics=_first_epoch_best(),
    )


def _logits(model, pixels):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_load_best_model_at_end_gives_the_best_checkpoints_weights(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, 3, load_best_model_at_end=True, metric_for_best_model="accuracy")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")  # epoch 1 of 3 (2 steps per epoch): not the last epoch
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _logits(ViTForImageClassification.from_pretrained(best), pixels)
    last = _logits(ViTForImageClassification.from_pretrained(tmp_path / "out" / "checkpoint-6"), pixels)
    assert not torch.equal(expected, last)  # the test can tell the best epoch from the last one
    assert torch.equal(_logits(trainer.model, pixels), expected)
    reference = ViTForImageClassification.from_pretrained(best).state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in trainer.model.state_dict().items())


class _WeightsAtTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_resume_from_checkpoint_starts_from_the_checkpoints_weights(tmp_path):
    _trainer(tmp_path, _model(seed=0), 2).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = ViTForImageClassification.from_pretrained(checkpoint).state_dict()

    resumed = _trainer(tmp_path, _model(seed=1), 2)  # other initial weights: each tensor must come from the checkpoint
    seen = _WeightsAtTrainBegin()
    resumed.add_callback(seen)  # after SAPTrainer's own callback, which runs first
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert seen.weights.keys() == saved.keys()
    assert all(torch.equal(seen.weights[name], saved[name]) for name in saved)

    again = _trainer(tmp_path, _model(seed=1), 1)  # resume at the end of epoch 1 of 1: no step left to train
    again.train(resume_from_checkpoint=str(checkpoint))
    pixels = torch.randn(4, 3, 8, 8)
    expected = _logits(ViTForImageClassification.from_pretrained(checkpoint), pixels)
    assert torch.equal(_logits(again.model, pixels), expected)


def test_resume_true_means_the_last_checkpoint(tmp_path):
    callback = CheckpointWeights()
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    callback.arm((), {"resume_from_checkpoint": True}, str(tmp_path))
    assert callback.resume_from_checkpoint.endswith("checkpoint-12")
    callback.arm(("/some/where",), {}, str(tmp_path))
    assert callback.resume_from_checkpoint == "/some/where"
    callback.arm((), {}, str(tmp_path))
    assert callback.resume_from_checkpoint is None


def test_checkpoint_with_the_models_own_names_is_left_to_the_trainer(tmp_path):
    """Once transformers saves (or loads) with the live names, the guard does nothing: the Trainer's load was whole."""
    model = _model()
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    with torch.no_grad():
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert load_checkpoint_weights(model, tmp_path) is False
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert load_checkpoint_weights(model, tmp_path / "no-such-folder") is False


def test_peft_best_model_is_the_best_adapter(tmp_path):
    """PEFT: the Trainer loads the adapter through PEFT (names as the live model's); the guard leaves it alone."""
    peft = pytest.importorskip("peft")
    _model().save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    model = peft.get_peft_model(ViTForImageClassification.from_pretrained(tmp_path / "base"), lora)
    assert load_checkpoint_weights(model, tmp_path / "base") is False
    trainer = _trainer(
        tmp_path, model, 3, load_best_model_at_end=True, metric_for_best_model="accuracy", learning_rate=5e-2
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    reference = peft.PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(tmp_path / "base"), best)
    pixels = torch.randn(4, 3, 8, 8)
    assert torch.equal(_logits(trainer.model, pixels), _logits(reference, pixels))
