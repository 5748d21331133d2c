"""refine: cleaned labels, never worse on val than the start, errors, restore on failure; SAPTrainer audit + refine."""

import csv
import json
from unittest import mock

import pytest
import torch
from helpers import assert_identical, random_examples, snapshot
from transformers import TrainingArguments

from sap_hf import SAPConfig, audit_labels
from sap_hf.audit import cleanup as refine_module
from sap_hf.audit.cleanup import BEST_MODES, RefineConfig, cleaned_labels, cleanup_plan, refine
from sap_hf.audit.labels import LabelAudit
from sap_hf.data import augment
from sap_hf.evaluation import accuracy_evaluator
from sap_hf.hub import load_sap_record
from sap_hf.models import tiny_model
from sap_hf.runtime.passes import Runtime
from sap_hf.trainer import SAPTrainer


def _audit():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.4, 0.6]], dtype=torch.float64)
    given = torch.tensor([0, 0, 1, 1])
    return LabelAudit(
        indices=torch.tensor([3, 5, 7, 9]),
        given=given,
        probs=probs,
        scores=probs[torch.arange(4), given],
        suspected=torch.tensor([False, True, True, False]),
    )


def _args(tmp_path, batch_size=8, **extra):
    return TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=batch_size,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        lr_scheduler_type="cosine",
        seed=0,
        **extra,
    )


def test_cleaned_labels_remove_and_relabel():
    audit = _audit()
    assert cleaned_labels(audit, "remove") == {3: 0, 9: 1}
    # Suspected 5 (p=0.8 < 0.9) is removed; suspected 7 (p=0.95) is relabelled to its prediction, 0.
    assert cleaned_labels(audit, "relabel", 0.9) == {3: 0, 7: 0, 9: 1}
    assert cleaned_labels(audit, "relabel", 0.5) == {3: 0, 5: 1, 7: 0, 9: 1}


def test_plans_of_the_modes_that_keep_every_image():
    audit = _audit()
    soft = cleanup_plan(audit, "soft", RefineConfig(temperature=0.5))
    assert soft.positions == [3, 5, 7, 9] and not soft.unlabelled.any()
    assert torch.allclose(soft.targets.sum(1), torch.ones(4))
    # example 7: given 1 with p=0.05, so its target is mostly the sharpened prediction (class 0)
    sharp0 = 0.95**2 / (0.95**2 + 0.05**2)
    assert soft.targets[2, 0].item() == pytest.approx(0.05 * 0 + 0.95 * sharp0, abs=1e-6)
    # example 3: given 0 with p=0.9: 0.9 x one-hot + 0.1 x sharpened
    assert soft.targets[0, 0].item() == pytest.approx(0.9 + 0.1 * 0.81 / 0.82, abs=1e-6)
    pseudo = cleanup_plan(audit, "pseudo")
    assert pseudo.positions == [3, 5, 7, 9] and pseudo.unlabelled.tolist() == [False, True, True, False]
    assert pseudo.targets[1].sum() == 0 and pseudo.hard_labels() == {3: 0, 9: 1}
    assert pseudo.counts(audit) == {"kept": 2, "removed": 0, "unlabelled": 2, "relabelled": 0}


def test_refine_config_validates():
    for bad, match in (
        ({"mode": "drop"}, "mode"),
        ({"mode": []}, "mode"),
        ({"mode": ["remove", "x"]}, "mode"),
        ({"learning_rates": [0.0]}, "learning_rates"),
        ({"epochs": [0]}, "epochs"),
        ({"relabel_threshold": 1.5}, "relabel_threshold"),
        ({"relabel_threshold": "high"}, "relabel_threshold"),
        ({"pseudo_threshold": 0}, "pseudo_threshold"),
        ({"temperature": 0}, "temperature"),
        ({"unlabelled_weight": -1}, "unlabelled_weight"),
    ):
        with pytest.raises(ValueError, match=match):
            RefineConfig(**bad)
    assert RefineConfig(epochs=[4, 1, 4]).epochs == [1, 4]
    assert RefineConfig().modes == list(BEST_MODES) and RefineConfig(mode=["soft", "soft"]).modes == ["soft"]


def test_augmentations_keep_shape_and_content():
    pixels = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(6)
    draws = augment.hashed_uniform(keys, 5, augment.STRONG_DRAWS)
    assert draws.shape == (6, augment.STRONG_DRAWS) and ((draws >= 0) & (draws < 1)).all()
    # an image's draws depend on its key and the salt only, not on the batch it is in
    assert torch.equal(augment.hashed_uniform(keys[3:], 5, augment.STRONG_DRAWS), draws[3:])
    assert not torch.equal(augment.hashed_uniform(keys, 6, augment.STRONG_DRAWS), draws)
    many = augment.hashed_uniform(torch.arange(4000), 1, 2)
    assert abs(float(many.mean()) - 0.5) < 0.02 and abs(float((many < 0.5).float().mean()) - 0.5) < 0.03
    shifted = augment.random_shift(pixels, 2, draws[:, :2])
    assert shifted.shape == pixels.shape
    # a whole-pixel shift: each image's interior equals the original's, moved by at most 2 pixels
    for image, moved in zip(pixels, shifted):
        assert any(
            torch.equal(moved[:, 2:6, 2:6], image[:, 2 + dy : 6 + dy, 2 + dx : 6 + dx])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
    flipped = augment.random_flip(pixels, draws[:, 2])
    assert all(torch.equal(f, p) or torch.equal(f, p.flip(-1)) for f, p in zip(flipped, pixels))
    holes = augment.cutout(torch.ones(6, 1, 8, 8), draws[:, 3:5], 0.5)
    assert all(0 < int((h == 0).sum()) <= 16 for h in holes)
    strong = augment.strong_view(pixels, draws)
    assert strong.shape == pixels.shape and torch.isfinite(strong).all() and not torch.equal(strong, pixels)


@pytest.mark.parametrize("mode", ["remove", "soft", "pseudo"])
def test_refine_picks_on_val_and_is_never_worse(tmp_path, mode):
    model = tiny_model("vit", num_labels=3, seed=0)
    train, val = random_examples(24, seed=1), random_examples(12, seed=2)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    evaluate = accuracy_evaluator(val, runtime=Runtime(batch_size=12))
    before = evaluate(model)["accuracy"]
    config = RefineConfig(mode=mode, learning_rates=[1e-3, 1e-2], epochs=[1, 2], pseudo_threshold=0.3)
    result = refine(model, train, audit, evaluate, config, args=_args(tmp_path), runtime=Runtime(show_progress=False))
    assert len(result.trials) == 2 * 2  # lrs x checkpoints
    assert result.final_metrics["accuracy"] >= before == result.baseline_metrics["accuracy"]
    assert evaluate(model)["accuracy"] == pytest.approx(result.final_metrics["accuracy"])
    kept = int((~audit.suspected).sum())
    assert result.examples[mode]["kept"] == (24 if mode == "soft" else kept)
    # cost: 2 epochs x 2 lrs of the examples trained (pseudo: a suspect's weak and strong view)
    per_epoch = {"remove": kept, "soft": 24, "pseudo": 24 + audit.num_suspected}[mode]
    assert result.cost_epochs == pytest.approx(2 * 2 * per_epoch / 24)
    assert result.to_dict()["changed"] == result.changed


def test_refine_trains_only_on_kept_examples_with_their_targets(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    seen = []
    original = refine_module.CleanupTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((inputs[refine_module.TARGET_COLUMN].clone(), inputs[refine_module.UNLABELLED_COLUMN].clone()))
        return original(self, model, inputs, *args, **kwargs)

    with mock.patch.object(refine_module.CleanupTrainer, "compute_loss", spy):
        refine(
            model,
            train,
            audit,
            lambda m: {"accuracy": 0.0},
            RefineConfig(mode="remove", epochs=[1], learning_rates=[0.001]),
            args=_args(tmp_path, batch_size=4),
            runtime=Runtime(show_progress=False),
        )
    targets = torch.cat([t for t, _ in seen])
    assert len(targets) == int((~audit.suspected).sum()) and not torch.cat([u for _, u in seen]).any()
    given = audit.given[~audit.suspected]
    assert sorted(targets.argmax(1).tolist()) == sorted(given.tolist()) and torch.equal(
        targets.sum(1), torch.ones(len(targets))
    )


def test_refine_restores_the_model_on_failure_and_rejects_an_empty_plan(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    before = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 2:  # the first checkpoint, after one epoch of training
            raise KeyboardInterrupt
        return {"accuracy": 0.5}

    with pytest.raises(KeyboardInterrupt):
        refine(
            model,
            train,
            audit,
            evaluate,
            RefineConfig(epochs=[1, 2], learning_rates=[0.01]),
            args=_args(tmp_path),
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)
    everything = LabelAudit(
        indices=audit.indices,
        given=audit.given,
        probs=audit.probs,
        scores=audit.scores,
        suspected=torch.ones_like(audit.suspected),
    )
    with pytest.raises(ValueError, match="learning_rates=None"):
        refine(model, train, audit, evaluate, RefineConfig(), runtime=Runtime(show_progress=False))
    for mode in ("remove", "pseudo"):
        with pytest.raises(ValueError, match="leaves no labelled training example"):
            refine(
                model,
                train,
                everything,
                evaluate,
                RefineConfig(mode=mode, learning_rates=[0.001]),
                runtime=Runtime(show_progress=False),
            )
    assert_identical(model, before)


def test_refine_best_skips_relabel_when_it_equals_remove(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train, val = random_examples(12, seed=1), random_examples(6, seed=2)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    assert audit.num_suspected > 0
    config = RefineConfig(mode=["remove", "relabel"], learning_rates=[1e-3], epochs=[1], relabel_threshold=1.0)
    result = refine(
        model,
        train,
        audit,
        accuracy_evaluator(val, runtime=Runtime(batch_size=6)),
        config,
        args=_args(tmp_path, batch_size=4),
        runtime=Runtime(show_progress=False),
    )
    assert [t["mode"] for t in result.trials] == ["remove"]
    assert result.examples["relabel"]["relabelled"] == 0


def test_refine_rejects_a_missing_metric_and_a_foreign_audit_before_training():
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(10, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    before = snapshot(model)
    config = RefineConfig(mode="remove", epochs=[1], learning_rates=[1e-2])
    with mock.patch.object(refine_module.CleanupTrainer, "train", side_effect=AssertionError("trained")):
        with pytest.raises(ValueError, match="metric='f1' is not among the eval metrics"):
            refine(
                model,
                train,
                audit,
                lambda m: {"accuracy": 0.5},
                config,
                metric="f1",
                runtime=Runtime(show_progress=False),
            )
        with pytest.raises(ValueError, match="train_data has 6 examples"):
            refine(model, train[:6], audit, lambda m: {"accuracy": 0.5}, config, runtime=Runtime(show_progress=False))
    assert_identical(model, before)


def test_trainer_audit_refine_record_and_card(tmp_path):
    model = tiny_model("vit", num_labels=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SAPTrainer(
        model=model,
        args=args,
        train_dataset=random_examples(24, seed=1),
        eval_dataset=random_examples(12, seed=2),
        sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8),
    )
    trainer.correct()
    audit = trainer.audit_labels(filter_by="predicted_neq_given", top_k=4)
    folder = tmp_path / "out" / "_label_audit"
    with open(folder / "label_audit.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 24
    assert json.loads((folder / "label_audit_summary.json").read_text())["suspected"] == audit.num_suspected
    result = trainer.refine(refine_config=RefineConfig(epochs=[1]))  # lrs: args.learning_rate x 1, x 2
    assert result.final_metrics["accuracy"] >= result.baseline_metrics["accuracy"]
    assert any("sap/refine_lr" in entry for entry in trainer.state.log_history)
    trainer.save_model()
    record = load_sap_record(tmp_path / "out")
    assert record["refine"]["config"]["learning_rates"] == [5e-5, 1e-4] and record["label_audit"]["examples"] == 24
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Label audit" in card and "## Clean-up after SAP (refine)" in card


def test_refine_keeps_the_label_key_a_collator_reads(tmp_path):
    """transformers' run_image_classification collates `example["label"]`: refine hands it the same key."""
    model = tiny_model("vit", num_labels=3, seed=0)
    train = [{"pixel_values": e["pixel_values"], "label": e["labels"]} for e in random_examples(12, seed=1)]

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    audit = audit_labels(
        model, train, filter_by="predicted_neq_given", runtime=Runtime(collate_fn=collate, show_progress=False)
    )
    result = refine(
        model,
        train,
        audit,
        lambda m: {"accuracy": 0.0},
        RefineConfig(mode="pseudo", epochs=[1], learning_rates=[1e-3]),
        args=_args(tmp_path, batch_size=4),
        runtime=Runtime(collate_fn=collate, show_progress=False),
    )
    assert len(result.trials) == 1


def test_run_arguments_keep_the_user_settings_but_no_evaluation_saving_or_reporting(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "user"),
        per_device_train_batch_size=16,
        weight_decay=0.1,
        eval_strategy="epoch",
        eval_on_start=True,
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        lr_scheduler_type="reduce_lr_on_plateau",
        report_to=[],
        dataloader_num_workers=2,
        use_cpu=True,
    )
    run = refine_module.run_arguments(args, str(tmp_path / "run"), 3e-4, 4, show_progress=False, stream=True)
    assert (run.per_device_train_batch_size, run.weight_decay, run.learning_rate, run.num_train_epochs) == (
        16,
        0.1,
        3e-4,
        4,
    )
    assert str(run.eval_strategy.value) == "no" and not run.eval_on_start and not run.load_best_model_at_end
    assert str(run.save_strategy.value) == "no" and run.report_to == [] and run.output_dir == str(tmp_path / "run")
    assert (
        str(run.lr_scheduler_type.value) == "cosine"
    )  # a plateau scheduler needs an eval metric the runs do not have
    assert run.dataloader_num_workers == 0  # a stream is numbered by position: one reader
    assert refine_module.run_arguments(args, str(tmp_path / "run"), 3e-4, 4, False).dataloader_num_workers == 2


def test_refine_explains_a_loader_over_a_stream(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(8, seed=1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(train)

    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)
    with pytest.raises(ValueError, match="DataLoader over a stream"):
        refine(
            model,
            loader,
            audit,
            lambda m: {"accuracy": 0.0},
            RefineConfig(epochs=[1], learning_rates=[1e-3]),
            runtime=Runtime(show_progress=False),
        )


def test_refine_rejects_data_in_another_order_and_a_bad_evaluate_fn_before_training():
    import random

    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(24, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    shuffled = list(train)
    random.Random(0).shuffle(shuffled)  # the same examples, another order: every target would land on another image
    before = snapshot(model)
    config = RefineConfig(mode="soft", epochs=[1], learning_rates=[1e-2])
    quiet = Runtime(show_progress=False)
    with mock.patch.object(refine_module.CleanupTrainer, "train", side_effect=AssertionError("trained")):
        with pytest.raises(ValueError, match=r"has label \d, but the audit saw label \d there"):
            refine(model, shuffled, audit, lambda m: {"accuracy": 0.5}, config, runtime=quiet)
        with pytest.raises(TypeError, match="evaluate_fn\\(model\\) returned a float: it must return a dict"):
            refine(model, train, audit, lambda m: 0.5, config, runtime=quiet)
        with pytest.raises(ValueError, match="accuracy=nan for the model before any fine-tune"):
            refine(model, train, audit, lambda m: {"accuracy": float("nan")}, config, runtime=quiet)
    assert_identical(model, before)


def test_refine_keeps_the_lowest_loss_when_the_metric_is_a_loss(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(12, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    losses = iter([1.0, 0.8, 0.6, 1.5, 0.9])  # the baseline, then one value per (lr, epoch) checkpoint
    config = RefineConfig(mode="soft", epochs=[1, 2], learning_rates=[1e-3, 1e-2])
    result = refine(
        model,
        train,
        audit,
        lambda m: {"loss": next(losses)},
        config,
        metric="loss",
        args=_args(tmp_path),
        runtime=Runtime(show_progress=False),
    )
    assert result.final_metrics["loss"] == 0.6 and (result.learning_rate, result.epochs) == (1e-3, 2)


def test_trainer_refine_audits_again_after_the_weights_changed(tmp_path):
    args = _args(tmp_path, num_train_epochs=1, save_strategy="no", per_device_eval_batch_size=8)
    train = random_examples(24, seed=1)
    trainer = SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=args,
        train_dataset=train,
        eval_dataset=random_examples(12, seed=2),
        sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8),
    )
    first = trainer.audit_labels(filter_by="predicted_neq_given")
    trainer.train()  # the audit read the weights before this training
    config = RefineConfig(mode="remove", epochs=[1])
    with mock.patch.object(refine_module, "refine", wraps=refine_module.refine) as spy:
        import sap_hf.trainer.trainer as trainer_module

        with mock.patch.object(trainer_module, "refine", spy):
            trainer.refine(refine_config=config)
    used = spy.call_args.args[2]
    assert used is not first and trainer.label_audit is used  # a new audit of the trained model
    latest = trainer.audit_labels()  # of the weights as they are now (refine may have changed them)
    with mock.patch.object(trainer_module, "refine", spy):
        trainer.refine(refine_config=config)  # nothing changed the weights since: that audit is used
    assert spy.call_args.args[2] is latest


def test_audit_explains_tuple_batches_and_classlabel_missing_labels():
    model = tiny_model("vit", num_labels=3, seed=0)
    examples = random_examples(10, seed=1)
    pairs = [(e["pixel_values"], e["labels"]) for e in examples]
    loader = torch.utils.data.DataLoader(pairs, batch_size=5)
    with pytest.raises(ValueError, match="gives batches of type (list|tuple).*needs dict batches"):
        audit_labels(model, loader, runtime=Runtime(show_progress=False))
    missing = [dict(e, labels=-1 if i == 3 else e["labels"]) for i, e in enumerate(examples)]
    with pytest.raises(ValueError, match="-1 is how datasets' ClassLabel marks a missing label: map it to -100"):
        audit_labels(model, missing, runtime=Runtime(show_progress=False))


def _with_image_column(examples):
    """A datasets split as `map` leaves it when the image column is not removed: image (PIL), pixel_values, label."""
    import datasets
    import numpy as np
    from PIL import Image

    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(np.zeros((8 + i % 3, 8, 3), np.uint8)) for i in range(len(examples))],
            "pixel_values": [e["pixel_values"].numpy() for e in examples],
            "label": [e["labels"] for e in examples],
        },
        datasets.Features(
            {
                "image": datasets.Image(),
                "pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                "label": datasets.Value("int64"),
            }
        ),
    )


def test_refine_batches_the_model_inputs_beside_a_leftover_image_column(tmp_path):
    """The default collator batched every column, and a PIL image failed in torch.tensor: the passes now batch what
    the model takes (pixel_values) and the labels, as Trainer drops the columns its model's forward does not take."""
    model = tiny_model("vit", num_labels=3, seed=0)
    train = _with_image_column(random_examples(12, seed=1))
    quiet = Runtime(show_progress=False)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=quiet)
    config = RefineConfig(mode="soft", epochs=[1], learning_rates=[1e-3])
    result = refine(model, train, audit, lambda m: {"accuracy": 0.0}, config, args=_args(tmp_path), runtime=quiet)
    assert len(result.trials) == 1


def test_refine_rejects_drop_last_with_a_mode_smaller_than_a_batch_before_training(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    train = random_examples(24, seed=1)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    kept = int((~audit.suspected).sum())
    assert 0 < kept < 16  # 'remove' keeps less than one batch of 16; 'soft' (first) keeps all 24
    before = snapshot(model)
    config = RefineConfig(mode=["soft", "remove"], epochs=[1], learning_rates=[1e-3])
    with mock.patch.object(refine_module.CleanupTrainer, "train", side_effect=AssertionError("trained")):
        with pytest.raises(
            ValueError, match=rf"dataloader_drop_last=True.*mode='remove'.* trains on {kept} examples.*batch of 16"
        ):
            refine(
                model,
                train,
                audit,
                lambda m: {"accuracy": 0.0},
                config,
                args=_args(tmp_path, batch_size=16, dataloader_drop_last=True),
                runtime=Runtime(show_progress=False),
            )
    assert_identical(model, before)


def _refine_trainer(tmp_path, **extra):
    return SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=_args(tmp_path, per_device_eval_batch_size=8, save_strategy="no", **extra),
        train_dataset=random_examples(24, seed=1),
        eval_dataset=random_examples(12, seed=2),
    )


def test_trainer_refine_checks_the_metric_before_the_audit_pass(tmp_path):
    trainer = _refine_trainer(tmp_path, metric_for_best_model="f1")
    with mock.patch.object(SAPTrainer, "audit_labels", side_effect=AssertionError("audited")):
        with pytest.raises(ValueError, match="metric='f1' is not among the eval metrics"):
            trainer.refine(refine_config=RefineConfig(mode="remove", epochs=[1]))
    import sap_hf.trainer.evaluation as evaluation

    trainer = _refine_trainer(tmp_path)
    with mock.patch.object(evaluation, "trainer_metrics", wraps=evaluation.trainer_metrics) as evaluations:
        trainer.refine(refine_config=RefineConfig(mode="soft", epochs=[1]))
    assert evaluations.call_count == 1 + 2  # the baseline once (before the audit), then each lr's epoch


def test_trainer_refine_logs_the_mode_by_name(tmp_path):
    trainer = _refine_trainer(tmp_path)
    trainer.refine(refine_config=RefineConfig(mode=["remove", "soft"], epochs=[1]))
    modes = [entry["sap/refine_mode"] for entry in trainer.state.log_history if "sap/refine_mode" in entry]
    assert modes == ["remove", "remove", "soft", "soft"]  # (two learning rates each)


def test_trainer_correct_checks_the_metric_before_any_pass_and_evaluates_the_baseline_once(tmp_path):
    import sap_hf.trainer.trainer as trainer_module

    trainer = _refine_trainer(tmp_path, metric_for_best_model="f1")
    with mock.patch.object(trainer_module, "sap_correct", side_effect=AssertionError("a pass ran")):
        with pytest.raises(ValueError, match="metric='f1' is not among the eval metrics"):
            trainer.correct()
    trainer, calls = _refine_trainer(tmp_path), []
    evaluator = trainer._sap_evaluator

    def counted(eval_dataset):
        metric, greater, evaluate_fn = evaluator(eval_dataset)
        return metric, greater, lambda model: calls.append(1) or evaluate_fn(model)

    with mock.patch.object(trainer, "_sap_evaluator", counted):
        result = trainer.correct()
    # the search evaluates the unchanged model, each shared alpha, each per-kind trial: the first measured up front
    searched = sum(1 + len(r.alphas) + len(r.kind_trials) for r in result.rounds)
    assert len(calls) == searched, (len(calls), searched)


@pytest.mark.parametrize("training", [True, False])
def test_refine_gives_the_model_back_in_the_mode_it_came_in(tmp_path, training):
    """Each clean-up run leaves train mode, and refine ended with eval(): a model handed over in train mode came back
    in eval mode (dropout off in the caller's next training loop), unlike after sap_correct or audit_labels."""
    model = tiny_model("vit", num_labels=3, seed=0).train(training)
    train, val = random_examples(24, seed=1), random_examples(12, seed=2)
    audit = audit_labels(model, train, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    assert model.training == training
    config = RefineConfig(mode="remove", learning_rates=[1e-2], epochs=[1])
    evaluate = accuracy_evaluator(val, runtime=Runtime(batch_size=12))
    refine(model, train, audit, evaluate, config, args=_args(tmp_path), runtime=Runtime(show_progress=False))
    assert model.training == training
