"""PEFT LoRA models (the PEFT image-classification guide's setup): SAP corrects the merged W + s·B·A.

LoRA on the attention projections with `modules_to_save=["classifier"]`, trained a few steps by
`transformers.Trainer`: no target may be an adapter matrix, the corrected weights must be
`(W + s·B·A)·P` with P from the Gram of the layers' inputs, and saving must keep the correction.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel, Trainer, TrainingArguments


peft = pytest.importorskip("peft")

from helpers import random_examples  # noqa: E402

from sap_hf import SAPConfig, collect_statistics, sap_correct, sap_project
from sap_hf.core.adapters import (  # noqa: E402
    ADAPTER_SEGMENTS,
    adapter_module_names,
    is_peft_model,
    merge_adapters,
    merge_for_correction,
)
from sap_hf.core.projection import eigendecompose, project_weight, projection_matrix  # noqa: E402
from sap_hf.core.targets import find_target_modules
from sap_hf.models import tiny_model  # noqa: E402
from sap_hf.runtime.passes import Runtime
from sap_hf.trainer import SAPTrainer  # noqa: E402


PIXELS = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _guide_config(model: nn.Module) -> "peft.LoraConfig":
    """The guide's LoraConfig; its ["query", "value"] are named q_proj/v_proj in newer transformers ViTs."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = ["query", "value"] if {"query", "value"} <= names else ["q_proj", "v_proj"]
    return peft.LoraConfig(
        r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.1, bias="none", modules_to_save=["classifier"]
    )


def _args(tmp_path, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        label_names=["labels"],
        **extra,
    )


@pytest.fixture(scope="module")
def trained_peft(tmp_path_factory):
    """A factory of copies of one LoRA-adapted tiny ViT (loaded with from_pretrained), trained 3 steps."""
    folder = tmp_path_factory.mktemp("tiny_vit")
    tiny_model("vit", num_labels=3).save_pretrained(folder)
    model = peft.get_peft_model(AutoModelForImageClassification.from_pretrained(folder), _guide_config(tiny_model()))
    Trainer(model=model, args=_args(folder), train_dataset=random_examples(12, seed=1)).train()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "training should have moved B away from 0"
    return lambda: copy.deepcopy(model)


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=PIXELS).logits


def _adapter_free(names) -> bool:
    return not any(set(ADAPTER_SEGMENTS) & set(name.split(".")) for name in names)


def _effective_weights(model) -> dict[str, torch.Tensor]:
    """W + s·B·A for each LoRA layer, the modules_to_save copy for the head, W elsewhere, by plain-model name."""
    weights = {}
    modules = dict(model.base_model.model.named_modules())
    for name, module in modules.items():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            s = module.scaling["default"]
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            weights[name] = (module.base_layer.weight + s * delta).detach().clone()
        elif name == "classifier":
            weights[name] = module.modules_to_save["default"].weight.detach().clone()
        elif isinstance(module, nn.Linear) and _adapter_free([name]) and name + ".base_layer" not in modules:
            weights[name] = module.weight.detach().clone()
    return weights


def test_targets_are_model_layers_and_the_unmerged_model_is_refused(trained_peft):
    model = trained_peft()
    with pytest.raises(ValueError, match="PEFT model.*merge_and_unload"):
        find_target_modules(model)
    plain_names = find_target_modules(tiny_model("vit", num_labels=3))
    merged = merge_adapters(model)
    targets = find_target_modules(merged)
    assert targets == plain_names and _adapter_free(targets)
    assert not is_peft_model(merged) and adapter_module_names(merged) == []


def test_corrected_weights_are_the_merged_weights_projected(trained_peft):
    model, trusted, alpha = trained_peft(), random_examples(6, seed=3), 4.0
    effective = _effective_weights(model)
    assert {"vit.layers.0.attention.q_proj", "vit.layers.1.attention.v_proj", "classifier"} <= set(effective)
    # Independent reference: peft's own merge of a copy, its inputs' Gram, the pure projection math.
    reference = copy.deepcopy(model).merge_and_unload()
    for name, weight in effective.items():
        torch.testing.assert_close(reference.get_submodule(name).weight, weight)
    stats = collect_statistics(
        reference, trusted, find_target_modules(reference), runtime=Runtime(batch_size=4, show_progress=False)
    )
    # The Gram of q_proj's group is that of the input the LoRA layer's W and A read (hooked on the PEFT model).
    seen = []
    layer = model.base_model.model.vit.layers[0].attention.q_proj
    handle = layer.base_layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for i in range(0, len(trusted), 4):
            model(pixel_values=torch.stack([e["pixel_values"] for e in trusted[i : i + 4]]))
    handle.remove()
    inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    q_group = next(g for g in stats.groups if "vit.layers.0.attention.q_proj" in g.members)
    torch.testing.assert_close(
        stats.grams[q_group.name].double(), inputs.double().T @ inputs.double(), rtol=1e-4, atol=1e-3
    )

    expected = {}
    for group in stats.groups:
        projection = projection_matrix(eigendecompose(stats.grams[group.name]), alpha)
        for name in group.members:
            expected[name] = project_weight(effective[name], projection)
    q = model.base_model.model.vit.layers[0].attention.q_proj  # W·P + s·B·(A·P): the same thing, per LoRA term
    projection_q = projection_matrix(eigendecompose(stats.grams[q_group.name]), alpha).float()
    split = q.base_layer.weight @ projection_q + q.scaling["default"] * q.lora_B["default"].weight @ (
        q.lora_A["default"].weight @ projection_q
    )
    torch.testing.assert_close(split, expected["vit.layers.0.attention.q_proj"], rtol=1e-4, atol=1e-5)

    corrected = sap_project(model, trusted, alpha=alpha, config=SAPConfig(batch_size=4))
    assert isinstance(corrected, PreTrainedModel) and not is_peft_model(corrected)
    assert set(find_target_modules(corrected)) == set(expected)
    for name, weight in expected.items():
        assert not torch.allclose(weight, effective[name]), f"{name} should have been projected"
        torch.testing.assert_close(corrected.get_submodule(name).weight, weight, rtol=1e-5, atol=1e-6)


def _shrinkage(model: nn.Module) -> dict[str, float]:
    """A metric every projection improves (P shrinks weights): forces a written correction in the tests."""
    with torch.no_grad():
        return {"accuracy": -float(sum(m.weight.norm() for m in model.modules() if isinstance(m, nn.Linear)))}


def test_sap_correct_returns_the_merged_corrected_model_and_it_saves_whole(trained_peft, tmp_path):
    model = trained_peft()
    before = _logits(model)
    result = sap_correct(
        model,
        random_examples(12, seed=1),
        config=SAPConfig(alphas=[2.0], trusted_per_class=2, batch_size=4),
        evaluate_fn=_shrinkage,
        runtime=Runtime(show_progress=False),
    )
    assert result.changed and result.alpha == 2.0 and _adapter_free(result.target_modules)
    corrected = result.model
    assert isinstance(corrected, PreTrainedModel) and not is_peft_model(corrected)
    assert not any(type(m).__module__.startswith("peft") for m in corrected.modules())
    record = result.to_dict()
    assert "model" not in record and json.dumps(record)
    logits = _logits(corrected)
    assert not torch.allclose(logits, before)
    corrected.save_pretrained(tmp_path / "corrected")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "corrected")
    assert torch.equal(_logits(reloaded), logits)


def _logit_size(prediction) -> dict[str, float]:
    """Mean |logit|: every projection shrinks the head (P's eigenvalues lie in [0, 1]), so it always falls."""
    return {"logit_size": float(abs(prediction.predictions).mean())}


def test_sap_trainer_correct_then_save_model_writes_the_corrected_model(tmp_path):
    folder = tmp_path / "tiny_vit"
    tiny_model("vit", num_labels=3).save_pretrained(folder)
    model = peft.get_peft_model(AutoModelForImageClassification.from_pretrained(folder), _guide_config(tiny_model()))
    trainer = SAPTrainer(
        model=model,
        args=_args(tmp_path, metric_for_best_model="logit_size", greater_is_better=False),
        train_dataset=random_examples(12, seed=1),
        eval_dataset=random_examples(6, seed=2),
        compute_metrics=_logit_size,
        sap_config=SAPConfig(alphas=[2.0], trusted_per_class=2, batch_size=4),
    )
    trainer.train()
    before = _logits(trainer.model)
    result = trainer.correct()  # alpha chosen by the SAP evaluation, which must run the merged model SAP writes
    assert result.changed and result.model is trainer.model
    assert isinstance(trainer.model, PreTrainedModel) and not is_peft_model(trainer.model)
    assert trainer.model_wrapped is trainer.model
    assert result.final_metrics["logit_size"] < result.baseline_metrics["logit_size"]
    trainer.save_model()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    logits = _logits(reloaded)
    assert torch.equal(logits, _logits(trainer.model)) and not torch.allclose(logits, before)


def test_plain_model_passes_through_unchanged():
    model = tiny_model("vit", num_labels=3)
    assert merge_adapters(model) is model
    result_model, result_base = merge_for_correction(model, model)
    assert result_model is model and result_base is model


def test_adapters_injected_into_a_transformers_model_are_merged_in_place(tmp_path):
    """No PeftModel wrapper (peft.inject_adapter_in_model, what transformers' model.add_adapter does)."""
    model = tiny_model("vit", num_labels=3)
    model = peft.inject_adapter_in_model(_guide_config(model), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    before = _logits(model)
    with pytest.raises(ValueError, match="PEFT model"):
        find_target_modules(model)
    merged = merge_adapters(model)
    assert merged is model and adapter_module_names(model) == []
    torch.testing.assert_close(_logits(model), before)
    model.save_pretrained(tmp_path / "merged")  # whole, not adapters only
    assert torch.equal(_logits(AutoModelForImageClassification.from_pretrained(tmp_path / "merged")), _logits(model))


def test_unmergeable_adapters_are_refused_before_any_change(trained_peft):
    model = trained_peft()
    with model.disable_adapter():
        with pytest.raises(ValueError, match="disabled"):
            merge_adapters(model)
    assert adapter_module_names(model)  # untouched
    from peft.tuners.tuners_utils import BaseTunerLayer

    class NoMergeLayer(nn.Module, BaseTunerLayer):  # a tuner type without merge support
        def __init__(self, base: nn.Module):
            super().__init__()
            self.base_layer = base

        def forward(self, x):
            return self.base_layer(x)

    plain = tiny_model("vit", num_labels=3)
    head = plain.classifier.weight.detach().clone()
    plain.classifier = NoMergeLayer(plain.classifier)
    with pytest.raises(ValueError, match="no merge support"):
        merge_adapters(plain)
    assert isinstance(plain.classifier, NoMergeLayer) and torch.equal(plain.classifier.base_layer.weight, head)


def test_the_merged_model_trains_whole_like_a_plain_model(trained_peft):
    model = trained_peft()
    assert not all(parameter.requires_grad for parameter in model.parameters())  # PEFT froze the base weights
    merged = merge_adapters(model)
    assert all(
        parameter.requires_grad for parameter in merged.parameters()
    )  # refine() after correct() trains every weight


def test_train_after_correct_trains_the_merged_model(tmp_path):
    """train() -> correct() (merges) -> train(): the Trainer kept the first run's optimizer, which held the adapter
    weights the merge removed, so the second run moved only the modules_to_save head; now every weight trains."""
    model = peft.get_peft_model(tiny_model("vit", num_labels=3), _guide_config(tiny_model()))
    trainer = SAPTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=random_examples(12, seed=1),
        eval_dataset=random_examples(6, seed=2),
        sap_config=SAPConfig(alphas=[2.0], trusted_per_class=2, batch_size=4),
    )
    trainer.train()
    trainer.correct()
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[name], after[name]) for name in before if "weight" in name)


def test_bad_inputs_are_refused_before_the_merge_leaving_the_peft_model_whole(trained_peft, tmp_path):
    """The merge changes the caller's model: sap_correct and SAPTrainer.correct check what they were given first
    (a missing eval set, a selection_model the rule would ignore, recorded losses that do not exist yet)."""
    model = trained_peft()
    before = _logits(model)
    calls = [
        (dict(), "needs eval_data="),
        (dict(eval_data=random_examples(6, seed=2), selection_model=tiny_model("vit", num_labels=3)), "early_loss"),
        (dict(eval_data=random_examples(6, seed=2), config=SAPConfig(trusted_source="training")), "SAPTrainer.train"),
    ]
    for kwargs, message in calls:
        with pytest.raises(ValueError, match=message):
            sap_correct(model, random_examples(12, seed=1), **kwargs)
        assert is_peft_model(model) and adapter_module_names(model)
        assert torch.equal(_logits(model), before)
    trainer = SAPTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=random_examples(12, seed=1),
        eval_dataset=random_examples(6, seed=2),
        sap_config=SAPConfig(trusted_source="training", trusted_per_class=2, batch_size=4),
    )
    with pytest.raises(ValueError, match=r"call trainer.train\(\) first"):  # no train(): no recorded losses
        trainer.correct()
    assert trainer.model is model and is_peft_model(model) and torch.equal(_logits(model), before)
