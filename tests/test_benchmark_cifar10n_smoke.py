"""Smoke test of benchmarks/cifar10n.py --quick on a tiny CIFAR-10N copy built here (not the shared data):
every method's row for a label set, the oracle, the summary, the targets and the figure.

No assertion on accuracy values (3 epochs on 200 random images mean nothing); one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sap_hf.data.cifar10n import write_tiny_cifar10n


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10n.py"


def test_cifar10n_benchmark_quick(tmp_path):
    images, labels = write_tiny_cifar10n(tmp_path / "data", n_train=200, n_test=200)
    out = tmp_path / "cifar10n.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--label_sets",
            "worse",
            "--threads",
            "1",
            "--out",
            str(out),
            "--modes",
            "remove",
            "soft",
            "pseudo",
            "--augment",
            "1",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    methods = {row["method"] for row in record["rows"]}
    assert {
        "none",
        "best_epoch",
        "oracle",
        "oracle+refine",
        "sap",
        "sap+remove",
        "sap+soft",
        "sap+pseudo",
        "best+sap",
        "best+sap+pseudo",
        "sap+refine",
        "best+sap+refine",
        "sap+remove-noaug",
        "sap+refine-noaug",
    } <= methods
    for row in record["rows"]:
        assert 0 <= row["test_accuracy"] <= 1
        if "+" in row["method"] and row["method"] != "best+sap":  # the clean-up: its cost and "no change" a candidate
            assert row["cost_epochs"] >= 0 and row["refine_epochs"] in (0, 1)
    worse = [row for row in record["rows"] if row["method"] == "none"][0]
    tuned = [row for row in record["rows"] if row["method"] == "finetune_trusted"][0]
    # "no change" is the last model, whatever ran before it: its val is `none`'s, and a fine-tune must beat it
    unchanged = abs(tuned["val_accuracy"] - worse["val_accuracy"]) < 1e-4  # `none`'s val is rounded
    assert tuned["val_accuracy"] > worse["val_accuracy"] or unchanged
    assert unchanged == (tuned["ft_epochs"] == 0)
    assert 0.25 <= worse["noise_rate"] <= 0.55  # the tiny copy's worse labels flip ~40%
    summary = record["summary"]["worse"]
    assert {"oracle", "sap", "sap+pseudo"} <= set(summary) and "sap_minus_none" in record["targets"]["worse"]
    assert out.with_suffix(".png").is_file()
    # --merge: new rows replace those of the same label set, seed and method; the others stay
    again = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--label_sets",
            "--threads",
            "1",
            "--out",
            str(out),
            "--merge",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert len(merged["rows"]) == len(record["rows"]) and merged["merged"]
    assert {r["method"] for r in merged["rows"]} == methods


def test_cifar10n_benchmark_quick_mae_regime(tmp_path):
    """The MAE regime: an encoder pretrained without labels (cached once), then the same methods from it."""
    images, labels = write_tiny_cifar10n(tmp_path / "data", n_train=200, n_test=200)
    out, cache = tmp_path / "mae.json", tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, str(SCRIPT), "--quick", "--regime", "mae", "--images", str(images), "--labels"]
    command += [str(labels), "--label_sets", "worse", "--methods", "core", "--modes", "remove", "--threads", "1"]
    command += ["--out", str(out), "--cache_dir", str(cache)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["config"]["regime"] == "mae" and Path(record["config"]["backbone"]).is_file()
    assert {"none", "best_epoch", "oracle", "sap", "sap+remove"} <= {row["method"] for row in record["rows"]}
    assert all(row["regime"] == "mae" for row in record["rows"])
    backbone = json.loads(Path(record["config"]["backbone"]).with_suffix(".json").read_text())
    assert len(backbone["loss"]) == record["config"]["pretrain_epochs"] and backbone["images"] > 0
