"""SAPTrainer's evaluation without Trainer.evaluate: the same metrics, -100 ignored, Trainer's metric settings; unkeyed-stream warning."""

import logging

import numpy as np
import pytest
import torch
from helpers import random_examples
from transformers import TrainingArguments
from transformers.utils.logging import warning_once

from sap_hf import SAPConfig
from sap_hf.audit.cleanup import RefineConfig
from sap_hf.evaluation import eval_predictions
from sap_hf.models import tiny_model
from sap_hf.runtime.batching import iter_shard_batches
from sap_hf.runtime.passes import Runtime
from sap_hf.trainer import SAPTrainer


def _trainer(tmp_path, eval_dataset=None, cls=SAPTrainer, compute_metrics=None, **args):
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=5,
        num_train_epochs=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        **args,
    )
    return cls(
        model=tiny_model("vit", num_labels=3),
        args=training_args,
        train_dataset=random_examples(24, seed=1),
        eval_dataset=eval_dataset if eval_dataset is not None else random_examples(13, seed=2),
        compute_metrics=compute_metrics,
        # one shared alpha: one logged evaluation per candidate (the per-kind trials are tested in test_trainer.py)
        sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8, alpha_scope="shared"),
    )


def _no_trainer_evaluate(*args, **kwargs):
    raise AssertionError("Trainer.evaluate was called")


def test_the_shared_evaluation_equals_trainer_evaluate_on_one_process(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()  # a trained model: predictions that are not all one class
    _, _, evaluate_fn = trainer._sap_evaluator(trainer.eval_dataset)
    ours, theirs = evaluate_fn(trainer.model), trainer.evaluate(trainer.eval_dataset)
    assert set(ours) == {"accuracy", "loss"}
    assert ours["accuracy"] == theirs["eval_accuracy"]  # 13 samples, batches of 5: a partial last batch
    assert abs(ours["loss"] - theirs["eval_loss"]) <= 1e-6


def test_correct_and_refine_evaluate_without_trainer_evaluate_and_select_by_loss(tmp_path):
    trainer = _trainer(tmp_path, metric_for_best_model="loss", greater_is_better=False)
    trainer.evaluate = _no_trainer_evaluate
    result = trainer.correct()
    logged = [entry for entry in trainer.state.log_history if "sap/alpha" in entry]
    assert len(logged) == 3 and all({"sap/loss", "sap/accuracy"} <= set(entry) for entry in logged)
    assert not any(key.startswith("sap_eval_") for entry in trainer.state.log_history for key in entry)
    best = min(entry["sap/loss"] for entry in logged)
    assert result.final_metrics["loss"] == best and "sap/loss_after" in trainer.state.log_history[-1]
    refined = trainer.refine(refine_config=RefineConfig(epochs=[1], learning_rates=[1e-3]))
    assert refined.baseline_metrics["loss"] == pytest.approx(best, abs=1e-6)  # the model is at the chosen alpha
    assert all("loss" in trial["metrics"] for trial in refined.trials)


def test_labels_minus_100_are_ignored_by_loss_and_accuracy_but_kept_in_label_ids(tmp_path):
    data = random_examples(10, seed=3)
    for i in (1, 4):
        data[i]["labels"] = -100
    model = tiny_model("vit", num_labels=3)
    output = eval_predictions(model, data, runtime=Runtime(batch_size=3, show_progress=False))
    assert output.label_ids.tolist() == [-100 if i in (1, 4) else i % 3 for i in range(10)]
    assert output.predictions.shape == (10, 3) and output.predictions.dtype == np.float32 and output.samples == 8
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([example["pixel_values"] for example in data])).logits
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(output.label_ids), ignore_index=-100)
    assert abs(output.loss - float(expected)) <= 1e-6
    trainer = _trainer(tmp_path, eval_dataset=data)
    _, _, evaluate_fn = trainer._sap_evaluator(data)
    predicted = logits.argmax(-1).numpy()
    labelled = output.label_ids != -100
    assert evaluate_fn(model)["accuracy"] == float((predicted == output.label_ids)[labelled].mean())


def test_preprocess_logits_and_prediction_loss_only_are_honoured(tmp_path):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions)
        return {"top": float(np.mean(prediction.predictions == prediction.label_ids))}

    trainer = _trainer(tmp_path)
    trainer.compute_metrics = compute_metrics
    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits.argmax(-1)
    trainer.evaluate = _no_trainer_evaluate
    _, _, evaluate_fn = trainer._sap_evaluator(trainer.eval_dataset)
    metrics = evaluate_fn(trainer.model)
    assert set(metrics) == {"top", "loss"} and seen[0].shape == (13,)
    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits[:1]
    with pytest.raises(
        ValueError, match="preprocess_logits_for_metrics returned a tensor of shape \\(1, 3\\) for a batch of 5"
    ):
        evaluate_fn(trainer.model)
    trainer.args.prediction_loss_only = True
    assert set(evaluate_fn(trainer.model)) == {"loss"}


def test_include_for_metrics_batch_eval_metrics_and_unconcatenated_batches_on_the_one_path(tmp_path):
    """What `Trainer.evaluate` hands compute_metrics for these settings, from the shared pass (no Trainer.evaluate)."""
    seen = []

    def compute_metrics(prediction, compute_result=None):
        seen.append((prediction, compute_result))
        predictions, labels = prediction.predictions, prediction.label_ids
        if isinstance(predictions, list):  # eval_do_concat_batches=False
            predictions, labels = np.concatenate(predictions), np.concatenate(labels)
        return {"accuracy": float((np.asarray(predictions).argmax(-1) == np.asarray(labels)).mean())}

    expected = None
    for settings in (
        {},
        {"include_for_metrics": ["inputs", "loss"]},
        {"eval_do_concat_batches": False},
        {"batch_eval_metrics": True},
    ):
        trainer = _trainer(tmp_path, compute_metrics=compute_metrics, **settings)
        trainer.evaluate = _no_trainer_evaluate
        seen.clear()
        metrics = trainer._sap_evaluator(trainer.eval_dataset)[2](trainer.model)
        expected = expected or metrics
        prediction, compute_result = seen[-1]
        if settings.get("include_for_metrics"):
            assert prediction.inputs.shape == (13, 3, 16, 16) and prediction.losses.shape == (13,)
            pixels = torch.stack([example["pixel_values"] for example in trainer.eval_dataset]).numpy()
            assert np.array_equal(prediction.inputs, pixels)  # in the eval set's order
        else:
            assert prediction.inputs is None and prediction.losses is None
        if settings.get("eval_do_concat_batches") is False:
            assert [len(part) for part in prediction.predictions] == [5, 5, 3]
        if settings.get("batch_eval_metrics"):  # per batch of 5, tensors, compute_result on the last only
            assert [entry[1] for entry in seen] == [False, False, True]
            assert isinstance(prediction.predictions, torch.Tensor) and len(prediction.predictions) == 3
            continue  # this compute_metrics does not accumulate: the last batch's accuracy alone
        assert metrics == expected


def _stream(keys: bool, num_shards: int):
    import datasets

    rows = [
        {
            "pixel_values": torch.full((3, 4, 4), float(i)).tolist(),
            "labels": i % 3,
            **({"key": f"k{i}"} if keys else {}),
        }
        for i in range(8)
    ]
    return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=num_shards)


def _read(data, rank: int, world: int = 2) -> list:
    return [
        i for ids, _ in iter_shard_batches(data, batch_size=3, process_index=rank, num_processes=world) for i in ids
    ]


def test_a_stream_read_whole_by_every_process_warns_once_on_the_main_process_naming_the_fix(caplog):
    warning_once.cache_clear()
    unkeyed = _stream(keys=False, num_shards=4)
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        assert _read(unkeyed, rank=1) == [1, 3, 5, 7]  # identities stay the whole stream's positions
        assert not caplog.records  # not on another process
        assert _read(unkeyed, rank=0) == [0, 2, 4, 6] and _read(unkeyed, rank=0) == [0, 2, 4, 6]
    (record,) = caplog.records  # once, not once per pass
    assert "has no 'key' column" in record.getMessage()
    assert "add a unique 'key' column (e.g. the image path), or pass a map-style Dataset" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        keyed = _stream(keys=True, num_shards=4)
        assert len(_read(keyed, rank=0)) == 4 and sorted(_read(keyed, rank=0) + _read(keyed, rank=1)) == sorted(
            f"k{i}" for i in range(8)
        )
        _read(_stream(keys=False, num_shards=4), rank=0, world=1)  # one process: nothing to share
        _read(random_examples(6), rank=0)  # a list is in memory already
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        _read(_stream(keys=True, num_shards=1), rank=0)
    (record,) = caplog.records
    assert "has 1 shard(s) for 2 processes" in record.getMessage() and "at least 2 shards" in record.getMessage()
