"""Label audit: scores (cleanlab and the torch fallback agree), ranking, data forms, bad input, report files."""

import csv
import dataclasses
import json
import os
import stat
from unittest import mock

import pytest
import torch
from helpers import random_examples

from sap_hf.audit import labels as audit_module
from sap_hf.audit import scores as scores_module
from sap_hf.audit.labels import audit_labels, flag_label_issues, label_quality_scores
from sap_hf.audit.report import (
    CSV_NAME,
    GRID_NAME,
    SUMMARY_NAME,
    plot_suspected_grid,
    write_audit_csv,
    write_audit_report,
)
from sap_hf.models import tiny_model
from sap_hf.runtime.passes import Runtime


cleanlab = pytest.importorskip("cleanlab")


def _probs(n=60, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, classes, generator=generator).mul(2).softmax(-1).double()
    labels = torch.randint(0, classes, (n,), generator=generator)
    return probs, labels


@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin"])
def test_torch_scores_equal_cleanlab(method):
    probs, labels = _probs()
    ours = label_quality_scores(probs, labels, method, use_cleanlab=False)
    theirs = label_quality_scores(probs, labels, method, use_cleanlab=True)
    assert torch.allclose(ours, theirs, atol=1e-12)
    if method == "self_confidence":
        assert torch.equal(ours, probs[torch.arange(len(labels)), labels])


def test_flags_cleanlab_and_fallback():
    probs, labels = _probs(200, 3, seed=1)
    from cleanlab.filter import find_label_issues

    expected = find_label_issues(labels.numpy(), probs.numpy(), filter_by="prune_by_noise_rate")
    assert flag_label_issues(probs, labels, "auto").tolist() == expected.tolist()
    assert torch.equal(flag_label_issues(probs, labels, "predicted_neq_given"), probs.argmax(1) != labels)
    with mock.patch.object(scores_module, "cleanlab_available", return_value=False):
        assert torch.equal(flag_label_issues(probs, labels, "auto"), probs.argmax(1) != labels)
        with pytest.raises(ImportError, match="sap_hf\\[audit\\]"):
            flag_label_issues(probs, labels, "prune_by_class")


def test_scoring_rejects_bad_input():
    probs, labels = _probs(5, 3)
    with pytest.raises(ValueError, match="labels\\[2\\]=7"):
        label_quality_scores(probs, torch.tensor([0, 1, 7, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        label_quality_scores(probs[:0], labels[:0])
    with pytest.raises(ValueError, match="method="):
        label_quality_scores(probs, labels, "entropy")


def test_audit_ranks_and_agrees_across_data_forms():
    model = tiny_model("vit", num_labels=3, seed=0)
    examples = random_examples(22, num_labels=3, seed=3)
    audit = audit_labels(model, examples, runtime=Runtime(batch_size=5, show_progress=False))
    assert len(audit) == 22 and audit.indices.tolist() == list(range(22))
    assert audit.meta["cleanlab"] and audit.filter_by == "prune_by_noise_rate"
    rows = list(audit.rows())
    assert [r["rank"] for r in rows] == list(range(1, 23))
    assert all(a["label_quality"] <= b["label_quality"] for a, b in zip(rows, rows[1:]))
    assert all(abs(r["label_quality"] - r["prob_given"]) < 1e-12 for r in rows)  # self_confidence
    summary = audit.summary()
    assert summary["suspected"] == audit.num_suspected == sum(summary["suspected_pairs"].values())
    assert sum(c["examples"] for c in summary["per_given_class"].values()) == 22

    import datasets

    dataset = datasets.Dataset.from_list(
        [{"pixel_values": e["pixel_values"].tolist(), "labels": e["labels"]} for e in examples]
    )
    loader = torch.utils.data.DataLoader(examples, batch_size=4)
    for other in (dataset.with_format("torch"), dataset.to_iterable_dataset().with_format("torch"), loader):
        again = audit_labels(model, other, runtime=Runtime(batch_size=7, show_progress=False))
        assert again.ranking.tolist() == audit.ranking.tolist()
        assert torch.allclose(again.scores, audit.scores, atol=1e-6)


def test_audit_without_cleanlab_uses_the_torch_fallback():
    model = tiny_model("vit", num_labels=3, seed=1)
    examples = random_examples(15, num_labels=3, seed=4)
    with mock.patch.object(scores_module, "cleanlab_available", return_value=False):
        audit = audit_labels(
            model,
            examples,
            method="normalized_margin",
            views="shift",
            runtime=Runtime(batch_size=4, show_progress=False),
        )
        with pytest.raises(ImportError, match="cleanlab"):
            audit_labels(model, examples, filter_by="both", runtime=Runtime(show_progress=False))
        # Forced cleanlab scores without cleanlab: named, and raised before any forward pass.
        with mock.patch.object(audit_module, "predict_probs", side_effect=AssertionError("data pass")):
            with pytest.raises(ImportError, match="use_cleanlab=True"):
                audit_labels(
                    model,
                    examples,
                    use_cleanlab=True,
                    filter_by="predicted_neq_given",
                    runtime=Runtime(show_progress=False),
                )
        with pytest.raises(ImportError, match="use_cleanlab=True"):
            label_quality_scores(torch.full((2, 2), 0.5), torch.tensor([0, 1]), use_cleanlab=True)
    assert audit.summary()["scorer"] == "torch" and audit.filter_by == "predicted_neq_given"
    assert torch.equal(audit.suspected, audit.predicted != audit.given)
    assert torch.allclose(
        audit.scores, label_quality_scores(audit.probs, audit.given, "normalized_margin", use_cleanlab=True)
    )


def test_audit_rejects_bad_data():
    model = tiny_model("vit", num_labels=3, seed=0)
    unlabelled = [{"pixel_values": e["pixel_values"]} for e in random_examples(4)]
    with pytest.raises(ValueError, match="no 'labels'/'label'"):
        audit_labels(model, unlabelled, runtime=Runtime(show_progress=False))
    wrong = random_examples(6)
    wrong[4]["labels"] = 3
    with pytest.raises(ValueError, match="sample 4 has label 3"):
        audit_labels(model, wrong, runtime=Runtime(batch_size=2, show_progress=False))
    with pytest.raises(ValueError, match="empty"):
        audit_labels(model, [], runtime=Runtime(show_progress=False))
    with pytest.raises(ValueError, match="views="):
        audit_labels(model, wrong, views="flip", runtime=Runtime(show_progress=False))


def test_image_grid_stops_reading_a_stream_after_the_last_image_shown(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    examples = random_examples(30, num_labels=3, seed=3)
    audit = audit_labels(model, examples, filter_by="predicted_neq_given", runtime=Runtime(show_progress=False))
    audit = dataclasses.replace(audit, suspected=torch.isin(audit.indices, torch.tensor([3, 7])))
    chosen = audit.suspected_indices()
    assert sorted(chosen) == [3, 7]
    read = []

    def stream():
        for position, example in enumerate(examples):
            read.append(position)
            yield example

    assert plot_suspected_grid(audit, stream(), tmp_path / "grid.png", top_k=2) is not None
    assert max(chosen) < len(examples) - 1  # else the test cannot tell
    assert read == list(range(max(chosen) + 1))  # read up to the last image shown, not to the stream's end


def test_report_files_and_an_interrupted_csv(tmp_path):
    model = tiny_model("vit", num_labels=3, seed=0)
    examples = random_examples(18, num_labels=3, seed=3)
    audit = audit_labels(
        model,
        examples,
        filter_by="predicted_neq_given",
        class_names=["a", "b", "c"],
        runtime=Runtime(show_progress=False),
    )
    assert audit.num_suspected > 0
    written = write_audit_report(audit, tmp_path, examples, top_k=4, extra={"split": "train"})
    assert set(written) == {"csv", "summary", "grid"} and (tmp_path / GRID_NAME).stat().st_size > 0
    with open(tmp_path / CSV_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 18 and rows[0]["rank"] == "1" and rows[0]["given_name"] in "abc"
    summary = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert summary["split"] == "train" and summary["suspected"] == audit.num_suspected
    assert all(" -> " in pair for pair in summary["suspected_pairs"])
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (CSV_NAME, SUMMARY_NAME, GRID_NAME):  # the umask's permissions, not a temp file's 0600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask

    before = (tmp_path / CSV_NAME).read_bytes()

    first_rows = list(audit.rows())[:3]

    def failing_rows():
        yield from first_rows
        raise KeyboardInterrupt

    with mock.patch.object(type(audit), "rows", lambda self: failing_rows()), pytest.raises(KeyboardInterrupt):
        write_audit_csv(audit, tmp_path / CSV_NAME)
    assert (tmp_path / CSV_NAME).read_bytes() == before  # the previous CSV, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CSV_NAME, SUMMARY_NAME, GRID_NAME]
    )  # no temp file left


def test_margins_and_the_mixture_split_of_the_training_dynamics():
    from sap_hf.audit import LabelAudit, dynamics_audit
    from sap_hf.audit.scores import clean_probability, label_margins

    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    assert torch.allclose(label_margins(logits, torch.tensor([0, 0])), torch.tensor([0.5, -0.5]), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(300, generator=generator, dtype=torch.float64) * 0.1 + 0.6
    wrong = torch.randn(200, generator=generator, dtype=torch.float64) * 0.15 - 0.4
    probability = clean_probability(torch.cat([clean, wrong]))
    assert (probability[:300] > 0.5).double().mean() > 0.98 and (probability[300:] < 0.5).double().mean() > 0.98
    with pytest.raises(ValueError, match="at least 2 finite values"):
        clean_probability(torch.tensor([0.1, float("nan")]))

    audit = LabelAudit(
        indices=torch.tensor([0, 2]),
        given=torch.zeros(2, dtype=torch.long),
        probs=torch.full((2, 2), 0.5, dtype=torch.float64),
        scores=torch.zeros(2, dtype=torch.float64),
        suspected=torch.zeros(2, dtype=torch.bool),
    )
    found = dynamics_audit(audit, [2, 0], torch.tensor([-0.6, 0.8]))  # positions in any order
    assert found.scores.tolist() == pytest.approx([0.9, 0.2]) and found.meta["source"] == "training"
    with pytest.raises(ValueError, match="1 of the 2 audited examples have no recorded training margin.*position 2"):
        dynamics_audit(audit, [0, 1], torch.tensor([0.8, 0.1]))
