"""refine: cleaned labels, never worse on val than the start, errors, restore on failure; SAPTrainer audit + refine."""

import csv
import json
from unittest import mock

import pytest
import torch
from transformers import TrainingArguments

from sap_hf import SAPConfig, audit_labels
from sap_hf.audit import cleanup as refine_module
from sap_hf.audit.labels import LabelAudit
from sap_hf.core.evaluation import accuracy_evaluator
from sap_hf.hub import load_sap_record
from sap_hf.models import tiny_model
from sap_hf.audit.cleanup import RefineConfig, cleaned_labels, refine
from sap_hf.trainer import SAPTrainer

from helpers import random_examples, snapshot, assert_identical
from sap_hf.runtime.passes import Runtime


def _audit():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.4, 0.6]], dtype=torch.float64)
    given = torch.tensor([0, 0, 1, 1])
    return LabelAudit(indices=torch.tensor([3, 5, 7, 9]), given=given, probs=probs, scores=probs[torch.arange(4), given],
                      suspected=torch.tensor([False, True, True, False]))


def test_cleaned_labels_remove_and_relabel():
    audit = _audit()
    assert cleaned_labels(audit, "remove") == {3: 0, 9: 1}
    # Suspected 5 (p=0.8 < 0.9) is removed; suspected 7 (p=0.95) is relabelled to its prediction, 0.
    assert cleaned_labels(audit, "relabel", 0.9) == {3: 0, 7: 0, 9: 1}
    assert cleaned_labels(audit, "relabel", 0.5) == {3: 0, 5: 1, 7: 0, 9: 1}


def test_refine_config_validates():
    for bad, match in (({"mode": "drop"}, "mode"), ({"learning_rates": [0.0]}, "learning_rates"), ({"epochs": [0]}, "epochs"),
                       ({"relabel_threshold": 1.5}, "relabel_threshold"), ({"relabel_threshold": "high"}, "relabel_threshold"),
                       ({"batch_size": 0}, "batch_size"), ({"weight_decay": float("nan")}, "weight_decay")):
        with pytest.raises(ValueError, match=match):
            RefineConfig(**bad)
    assert RefineConfig(epochs=[4, 1, 4]).epochs == [1, 4]


def test_refine_picks_on_val_and_is_never_worse():
    model = tiny_model("vit", num_labels=3, seed=0)
    train, val = random_examples(24, seed=1), random_examples(12, seed=2)
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    evaluate = accuracy_evaluator(val, runtime=Runtime(batch_size=12))
    before = evaluate(model)["accuracy"]
    config = RefineConfig(mode="best", learning_rates=[1e-3, 1e-2], epochs=[1, 2], relabel_threshold=0.3, batch_size=8)
    result = refine(model, train, audit, evaluate, config, runtime=Runtime(show_progress=False))
    assert len(result.trials) == 2 * 2 * 2  # modes x lrs x checkpoints
    assert result.final_metrics["accuracy"] >= before == result.baseline_metrics["accuracy"]
    assert evaluate(model)["accuracy"] == pytest.approx(result.final_metrics["accuracy"])
    assert result.examples["remove"]["kept"] == int((~audit.suspected).sum())
    assert result.examples["relabel"]["relabelled"] > 0
    assert result.to_dict()["changed"] == result.changed


def test_refine_trains_only_on_kept_examples():
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    seen = []
    original = refine_module._with_label

    def spy(example, label):
        seen.append(label)
        return original(example, label)

    with mock.patch.object(refine_module, "_with_label", spy):
        refine(model, train, audit, lambda m: {'accuracy': 0.0}, RefineConfig(mode='remove', epochs=[1], learning_rates=[0.001]), runtime=Runtime(show_progress=False))
    assert len(seen) == int((~audit.suspected).sum())


def test_refine_restores_the_model_on_failure_and_rejects_an_empty_plan():
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    before = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 2:  # the first checkpoint, after one epoch of training
            raise KeyboardInterrupt
        return {"accuracy": 0.5}

    with pytest.raises(KeyboardInterrupt):
        refine(model, train, audit, evaluate, RefineConfig(epochs=[1, 2], learning_rates=[0.01]), runtime=Runtime(show_progress=False))
    assert_identical(model, before)
    everything = LabelAudit(indices=audit.indices, given=audit.given, probs=audit.probs, scores=audit.scores,
                            suspected=torch.ones_like(audit.suspected))
    with pytest.raises(ValueError, match="learning_rates=None"):
        refine(model, train, audit, evaluate, RefineConfig(), runtime=Runtime(show_progress=False))
    with pytest.raises(ValueError, match="leaves no training example"):
        refine(model, train, everything, evaluate, RefineConfig(learning_rates=[0.001]), runtime=Runtime(show_progress=False))
    assert_identical(model, before)


def test_refine_shuffles_a_list_of_examples_each_epoch():
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(12, seed=1)
    for position, example in enumerate(train):
        example["position"] = position
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    seen = []
    original = refine_module._with_label

    def spy(example, label):
        seen.append(example.get("position"))
        return original({k: v for k, v in example.items() if k != "position"}, label)

    kept = int((~audit.suspected).sum())
    assert kept >= 3
    with mock.patch.object(refine_module, "_with_label", spy):
        refine(model, train, audit, lambda m: {'accuracy': 0.0}, RefineConfig(mode='remove', epochs=[2], learning_rates=[0.001], batch_size=4), runtime=Runtime(show_progress=False))
    first, second = seen[:kept], seen[kept:]
    assert sorted(first) == sorted(second) and (first != sorted(first) or second != sorted(second) or first != second)


def test_refine_best_skips_relabel_when_it_equals_remove():
    model = tiny_model("vit", num_labels=3, seed=0)
    train, val = random_examples(12, seed=1), random_examples(6, seed=2)
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    assert audit.num_suspected > 0
    config = RefineConfig(mode="best", learning_rates=[1e-3], epochs=[1], relabel_threshold=1.0, batch_size=4)
    result = refine(model, train, audit, accuracy_evaluator(val, runtime=Runtime(batch_size=6)), config, runtime=Runtime(show_progress=False))
    assert [t["mode"] for t in result.trials] == ["remove"]
    assert result.examples["relabel"]["relabelled"] == 0


def test_refine_rejects_a_missing_metric_and_a_foreign_audit_before_training():
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by='predicted_neq_given', runtime=Runtime(show_progress=False))
    before = snapshot(model)
    config = RefineConfig(mode="remove", epochs=[1], learning_rates=[1e-2])
    with mock.patch.object(refine_module, "train_epochs", side_effect=AssertionError("trained")):
        with pytest.raises(ValueError, match="metric='f1' is not among the eval metrics"):
            refine(model, train, audit, lambda m: {'accuracy': 0.5}, config, metric='f1', runtime=Runtime(show_progress=False))
        with pytest.raises(ValueError, match="train_data has 6 examples"):
            refine(model, train[:6], audit, lambda m: {'accuracy': 0.5}, config, runtime=Runtime(show_progress=False))
    assert_identical(model, before)


def test_trainer_audit_refine_record_and_card(tmp_path):
    model = tiny_model("vit", num_labels=3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             num_train_epochs=1, report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True)
    trainer = SAPTrainer(model=model, args=args, train_dataset=random_examples(24, seed=1), eval_dataset=random_examples(12, seed=2),
                         sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8))
    trainer.correct()
    audit = trainer.audit_labels(filter_by="predicted_neq_given", top_k=4)
    folder = tmp_path / "out" / "_label_audit"
    with open(folder / "label_audit.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 24
    assert json.loads((folder / "label_audit_summary.json").read_text())["suspected"] == audit.num_suspected
    result = trainer.refine(refine_config=RefineConfig(epochs=[1], batch_size=8))  # lrs: args.learning_rate x 1, x 2
    assert result.final_metrics["accuracy"] >= result.baseline_metrics["accuracy"]
    assert any("sap/refine_lr" in entry for entry in trainer.state.log_history)
    trainer.save_model()
    record = load_sap_record(tmp_path / "out")
    assert record["refine"]["config"]["learning_rates"] == [5e-5, 1e-4] and record["label_audit"]["examples"] == 24
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Label audit" in card and "## Clean-up after SAP (refine)" in card
