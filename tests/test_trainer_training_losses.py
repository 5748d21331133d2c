"""SAPTrainer with trusted_source='training': losses recorded by position during train(), selection with no pass."""

from unittest import mock

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MapStyle, random_examples
from PIL import Image
from transformers import TrainingArguments

from sap_hf import SAPConfig, sap_correct
from sap_hf.core.selection import select_from_scores
from sap_hf.data import ImageTransform
from sap_hf.models import tiny_model
from sap_hf.trainer import SAPTrainer
from sap_hf.trainer.recorded import merge_losses


def _image_split(n: int, seed: int) -> datasets.Dataset:
    """A `datasets` split of random 16x16 RGB images with a ClassLabel, decoded by the recipe's transform."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    split = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
    return split.with_transform(ImageTransform(image_size=16, num_channels=3, mean=[0.5] * 3, std=[0.5] * 3))


def _trainer(tmp_path, train, config=None, epochs=2, lr=5e-3, **args):
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=lr,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        **{"save_strategy": "no", **args},
    )
    config = config or SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8, trusted_source="training")
    return SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=training_args,
        train_dataset=train,
        eval_dataset=random_examples(12, seed=2),
        sap_config=config,
    )


def _losses(model, train):
    """Each example's cross-entropy under `model`, in eval mode, by position."""
    model.eval()
    with torch.no_grad():
        batch = [train[i] for i in range(len(train))]
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]) for e in batch])
        labels = torch.tensor([int(e.get("labels", e.get("label"))) for e in batch])
        return F.cross_entropy(model(pixel_values=pixels).logits, labels, reduction="none").double()


def _margins(model, train):
    """Each example's label margin (p(given) - max other p) under `model`, by position, computed here by hand."""
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([torch.as_tensor(train[i]["pixel_values"]) for i in range(len(train))])
        probs = model(pixel_values=pixels).logits.double().softmax(-1)
    out = []
    for i in range(len(train)):
        given = int(train[i].get("labels", train[i].get("label")))
        out.append(probs[i, given] - max(p for c, p in enumerate(probs[i].tolist()) if c != given))
    return torch.tensor(out, dtype=torch.float64)


def test_recorded_losses_are_each_examples_own_loss(tmp_path):
    """With lr 0 the model never changes: the loss recorded under position i must be example i's loss, every epoch."""
    train = _image_split(30, seed=1)
    trainer = _trainer(tmp_path, train, epochs=2, lr=0.0, remove_unused_columns=False)
    trainer.train()
    record = trainer.training_losses.summary()
    assert record["positions"].tolist() == list(range(30))
    assert record["count"].tolist() == [2] * 30  # every example once per epoch, despite the shuffle
    assert record["labels"].tolist() == [i % 3 for i in range(30)]
    positions, mean, _ = merge_losses([record])
    expected = _losses(trainer.model, train)
    assert torch.allclose(mean, expected, atol=1e-5), (mean[:5], expected[:5])
    positions, margins, _ = merge_losses([record], "margin")
    assert torch.allclose(margins, _margins(trainer.model, train), atol=1e-5)


def test_correct_selects_from_recorded_losses_without_a_pass(tmp_path):
    train = _image_split(30, seed=1)
    trainer = _trainer(tmp_path, train, remove_unused_columns=False)
    trainer.train()
    positions, mean, labels = merge_losses([trainer.training_losses.summary()])
    expected = select_from_scores(positions, mean, labels, 2, 3)
    with mock.patch("sap_hf.api.select_trusted", side_effect=AssertionError("a selection pass ran")):
        result = trainer.correct()
    assert result.trusted_indices == expected.indices and len(expected.indices) == 6
    for label in range(3):  # the two lowest mean losses of each class
        members = [p for p in positions if p % 3 == label]
        lowest = sorted(members, key=lambda p: (float(mean[p]), p))[:2]
        assert sorted(lowest) == sorted(i for i in result.trusted_indices if i % 3 == label)
    assert result.trusted_per_class == {0: 2, 1: 2, 2: 2}
    assert "selection" in result.timings and result.config["trusted_source"] == "training"


def test_index_survives_the_trainers_column_removal(tmp_path):
    """remove_unused_columns=True drops columns the model does not take; the position column must stay."""
    examples = [dict(e, note="x") for e in random_examples(24, seed=1)]
    trainer = _trainer(tmp_path, MapStyle(examples), epochs=1, lr=0.0)
    trainer.train()
    record = trainer.training_losses.summary()
    assert record["count"].tolist() == [1] * 24
    _, mean, _ = merge_losses([record])
    assert torch.allclose(mean, _losses(trainer.model, MapStyle(examples)), atol=1e-5)


def test_last_epochs_window(tmp_path):
    config = SAPConfig(trusted_per_class=2, batch_size=8, trusted_source="training", training_loss_epochs=1)
    trainer = _trainer(tmp_path, _image_split(24, seed=3), config=config, epochs=3, remove_unused_columns=False)
    trainer.train()
    record = trainer.training_losses.summary()
    assert record["count"].tolist() == [1] * 24  # the last epoch alone
    _, mean, _ = merge_losses([record])
    # Recorded during the last epoch's steps (the model moves within it), so close to, not equal to, the final losses.
    assert torch.corrcoef(torch.stack([mean, _losses(trainer.model, _image_split(24, seed=3))]))[0, 1] > 0.9


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="selection_rule='shift_loss'.*trusted_source='pass'"):
        SAPConfig(trusted_source="training", selection_rule="shift_loss")
    with pytest.raises(ValueError, match="SAPTrainer.correct\\(\\), pass trusted_indices="):
        sap_correct(
            tiny_model("vit", num_labels=3),
            random_examples(12),
            random_examples(6),
            SAPConfig(trusted_source="training"),
        )
    with pytest.raises(ValueError, match="call trainer.train\\(\\) first"):
        _trainer(tmp_path, MapStyle(random_examples(24, seed=1))).correct()
    stream = datasets.Dataset.from_list(
        [{"pixel_values": e["pixel_values"].tolist(), "labels": e["labels"]} for e in random_examples(12)]
    ).to_iterable_dataset()
    trainer = _trainer(tmp_path, stream, max_steps=2)
    with pytest.raises(ValueError, match="SAPConfig.trusted_source='training' needs a map-style train_dataset"):
        trainer.train()
    trainer = _trainer(tmp_path, stream, config=SAPConfig(audit_source="training"), max_steps=2)
    with pytest.raises(
        ValueError, match="SAPConfig.audit_source='training' needs a map-style.*Use audit_source='model'"
    ):
        trainer.train()
    trainer = _trainer(tmp_path, MapStyle(random_examples(24, seed=1)), epochs=1)
    trainer.train()
    with pytest.raises(ValueError, match="selection_dataset has 12 examples"):
        trainer.correct(selection_dataset=random_examples(12))


def test_merge_averages_a_position_two_processes_saw():
    first = {
        "positions": np.array([0, 1]),
        "total": np.array([2.0, 4.0]),
        "count": np.array([1, 2]),
        "labels": np.array([0, 1]),
    }
    second = {
        "positions": np.array([1, 2]),
        "total": np.array([6.0, 1.0]),
        "count": np.array([2, 1]),
        "labels": np.array([1, 0]),
    }
    positions, mean, labels = merge_losses([first, second])
    assert positions == [0, 1, 2] and mean.tolist() == [2.0, 2.5, 1.0] and labels.tolist() == [0, 1, 0]


def test_select_from_scores_checks_labels_like_the_pass():
    ids = [0, 1, 2, 3]
    with pytest.raises(ValueError, match="outside|class"):
        select_from_scores(ids, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 5, 1]), 1, 2)
    with pytest.raises(ValueError, match="Classes \\[1\\] have no usable sample"):
        select_from_scores(ids, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, -100, 0, -100]), 1, 2)
    chosen = select_from_scores(ids, torch.tensor([0.5, float("nan"), 0.3, 0.1]), torch.tensor([0, 1, 0, 1]), 1, 2)
    assert chosen.indices == [2, 3] and chosen.per_class == {0: 1, 1: 1}


def test_checkpoints_hold_the_record_and_a_resumed_run_averages_every_epoch(tmp_path):
    """Each checkpoint gets every process's record (the `on_save` callback); resuming restores it."""
    train = MapStyle(random_examples(24, seed=1))
    full = _trainer(tmp_path / "full", train, epochs=2, save_strategy="epoch")
    full.train()
    first = tmp_path / "full" / "out" / "checkpoint-3"
    assert (first / "sap_training_losses-0.npz").is_file()
    assert (tmp_path / "full" / "out" / "checkpoint-6" / "sap_training_losses-0.npz").is_file()
    resumed = _trainer(tmp_path / "resumed", train, epochs=2)
    resumed.train(resume_from_checkpoint=str(first))
    record, expected = resumed.training_losses.summary(), full.training_losses.summary()
    assert record["count"].tolist() == [2] * 24  # the epoch before the checkpoint and the one after
    assert np.allclose(record["total"], expected["total"], atol=1e-5)
    assert np.allclose(record["margin"], expected["margin"], atol=1e-5)


def test_a_checkpoint_saved_without_margins_is_not_restored_saying_why(tmp_path):
    """A record written before the margins were recorded cannot be resumed: its margins would read as zeros."""
    from sap_hf.trainer.recorded import TrainingLosses

    record = TrainingLosses(4)
    record.add(1, torch.arange(4), torch.ones(4), torch.zeros(4, dtype=torch.long), torch.full((4,), 0.5))
    path = record.save(tmp_path, 0)
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files if not k.startswith("margin_")}
    np.savez(path, **arrays)
    assert "recorded no label margins" in TrainingLosses(4).restore(tmp_path)


def test_what_the_recording_loader_cannot_build_is_refused_naming_the_fix(tmp_path):
    train = MapStyle(random_examples(24, seed=1))
    with pytest.raises(ValueError, match="auto_find_batch_size=True changes it inside Trainer"):
        _trainer(tmp_path, train, auto_find_batch_size=True).train()
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length'.*use 'random'"):
        _trainer(tmp_path, train, train_sampling_strategy="group_by_length").train()
    sequential = _trainer(tmp_path, train, epochs=1, lr=0.0, train_sampling_strategy="sequential")
    sequential.train()
    assert sequential.training_losses.summary()["count"].tolist() == [1] * 24


def test_audit_from_the_training_margins_ranks_by_them_and_keeps_the_models_probabilities(tmp_path):
    """audit_source='training': the audit's scores are (mean recorded margin + 1) / 2 of each position, its suspects
    the mixture's low group, its probabilities the model's; refine() takes that audit; 'model' is the old audit."""
    from sap_hf.audit import RefineConfig, audit_labels

    train = _image_split(30, seed=1)
    config = SAPConfig(alphas=[1.0], trusted_per_class=2, batch_size=8, audit_source="training")
    trainer = _trainer(tmp_path, train, config=config, epochs=2, lr=0.0, remove_unused_columns=False)
    trainer.train()
    audit = trainer.audit_labels()
    margins = _margins(trainer.model, train)
    assert audit.method == "training_margin" and audit.indices.tolist() == list(range(30))
    assert torch.allclose(audit.scores, (margins + 1) / 2, atol=1e-5)
    from sap_hf.audit.scores import clean_probability

    assert torch.equal(audit.suspected, clean_probability(audit.scores * 2 - 1) < 0.5)
    by_model = audit_labels(trainer.model, train, views="shift")
    assert torch.allclose(audit.probs, by_model.probs) and not torch.equal(audit.scores, by_model.scores)
    assert trainer.audit_labels(source="model").method == "self_confidence"
    trainer.audit_labels()  # the trainer's current audit again: refine uses it as it is
    with mock.patch("sap_hf.trainer.trainer.refine", side_effect=RuntimeError("stop")) as refine:
        with pytest.raises(RuntimeError, match="stop"):
            trainer.refine(refine_config=RefineConfig(mode="remove", epochs=[1], learning_rates=[1e-3]))
    assert refine.call_args.args[2].method == "training_margin"


def test_audit_source_training_alone_leaves_the_trusted_selection_to_the_pass(tmp_path):
    """audit_source='training' records the margins, but the trusted samples still come from the pass with the
    configured rule (it once switched them to the recorded losses, while the record and card said shift_loss)."""
    train = _image_split(30, seed=1)
    config = SAPConfig(alphas=[1.0], trusted_per_class=2, batch_size=8, audit_source="training")
    trainer = _trainer(tmp_path, train, config=config, epochs=1, remove_unused_columns=False)
    trainer.train()
    from sap_hf.core.selection import select_trusted

    expected = select_trusted(trainer.model, train, 2, rule="shift_loss")
    with mock.patch.object(SAPTrainer, "_recorded_selection", side_effect=AssertionError("selected from the record")):
        result = trainer.correct()
    assert result.trusted_indices == expected.indices and result.config["selection_rule"] == "shift_loss"


def test_audit_from_the_training_margins_needs_a_recording_naming_the_fix(tmp_path):
    train = _image_split(12, seed=1)
    config = SAPConfig(alphas=[1.0], audit_source="training")
    trainer = _trainer(tmp_path, train, config=config, epochs=1, remove_unused_columns=False)
    with pytest.raises(
        ValueError, match=r"audit_source='training' audits the labels with the losses.*train\(\) first"
    ):
        trainer.audit_labels()
    trainer.train()
    with pytest.raises(ValueError, match="dataset has 5 examples.*recorded 12.*audit_source='model'"):
        trainer.audit_labels(_image_split(5, seed=2))
    with pytest.raises(ValueError, match=r"audit_labels\(source=...\)"):
        trainer.audit_labels(source="cleanlab")


def test_a_resume_from_a_record_it_cannot_read_warns_why_then_what_it_does(tmp_path, caplog):
    import logging
    import re

    from sap_hf.trainer.recorded import TrainingLosses

    TrainingLosses(30).save(tmp_path / "checkpoint-3", rank=0)  # recorded for another training set
    trainer = _trainer(tmp_path, _image_split(24, seed=1), config=SAPConfig(alphas=[1.0], audit_source="training"))
    trainer.training_losses = TrainingLosses(24)
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        trainer._restore_losses(str(tmp_path / "checkpoint-3"))
    assert re.search(
        r"checkpoint-3'\): its losses were recorded for 30 examples .* this run has 24 and None, so "
        r"SAPConfig.audit_source='training' reads the epochs trained from now on only",
        caplog.text,
    ), caplog.text
