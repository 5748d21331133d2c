"""Smoke test of benchmarks/accuracy.py --methods robust_<loss>: robust-loss rows, SAP on them, merged into accuracy.json.

No assertion on accuracy values (a 3-epoch model on 400 images means nothing); one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_robust_rows_are_computed_and_merged(tmp_path: Path) -> None:
    # An existing accuracy.json: its rows of other groups / seeds must survive the merge.
    kept = [
        {
            "setting": "sym40",
            "seed": 0,
            "method": "none",
            "test_accuracy": 0.5,
            "val_accuracy": 0.5,
            "gain_vs_none": 0.0,
        },
        {
            "setting": "sym40",
            "seed": 7,
            "method": "robust_gce",
            "loss": "gce",
            "test_accuracy": 0.6,
            "val_accuracy": 0.6,
            "gain_vs_none": 0.1,
            "gain_vs_base": 0.0,
        },
    ]
    existing = {
        "rows": kept,
        "runs": [],
        "robust_runs": [{"setting": "sym40", "seed": 7, "loss": "gce"}],
        "config": {"alphas": [1.0], "plot_seed": 0},
    }
    (tmp_path / "accuracy.json").write_text(json.dumps(existing))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--threads",
        "1",
        "--out_dir",
        str(tmp_path),
        "--settings",
        "sym40",
        "--rules",
        "loss",
        "shift_loss",
        "--methods",
        "robust_gce",
        "robust_sce",
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Robust losses" in proc.stdout

    result = json.loads((tmp_path / "accuracy.json").read_text())
    rows = result["rows"]
    assert all(row in rows for row in kept)  # other (setting, seed, group) rows are kept untouched
    for loss in ("gce", "sce"):
        mine = {row["method"]: row for row in rows if row.get("loss") == loss and row["seed"] == 0}
        name = f"robust_{loss}"
        assert {
            name,
            f"{name}_best_epoch",
            f"{name}+sap",
            f"{name}+sap[loss/3]",
            f"{name}+sap_per_kind[shift_loss/3]",
        } <= set(mine)
        model, sap = mine[name], mine[f"{name}+sap"]
        assert model["gain_vs_base"] == 0.0 and 0.0 <= model["train_noisy_accuracy"] <= 1.0
        assert sap["gain_vs_base"] == pytest.approx(sap["test_accuracy"] - model["test_accuracy"])
        assert sap["gain_vs_none"] - sap["gain_vs_base"] == pytest.approx(model["gain_vs_none"])  # vs the CE model
        assert sap["val_accuracy"] >= model["val_accuracy"]  # "no change" is a candidate, chosen on val
        candidates = [row for m, row in mine.items() if m.startswith((f"{name}+sap[", f"{name}+sap_per_kind["))]
        assert sap["val_accuracy"] == max(row["val_accuracy"] for row in candidates)
        assert mine[f"{name}_best_epoch"]["epoch"] >= 1
        assert model["loss_params"]["loss"] == loss
        entry = result["robust"]["sym40"][loss]
        assert entry["seeds"] == [0] and entry["sap_gain_per_seed"] == [pytest.approx(sap["gain_vs_base"])]
    assert mine["robust_sce"]["loss_params"] == {
        "loss": "sce",
        "sce_alpha": 0.1,
        "sce_beta": 1.0,
        "sce_log_zero": -4.0,
    }
    assert sorted((run["seed"], run["loss"]) for run in result["robust_runs"]) == [(0, "gce"), (0, "sce"), (7, "gce")]
    assert "sym40" in result["summary"] and "robust_gce+sap" in result["summary"]["sym40"]
    assert (tmp_path / "accuracy_robust.png").is_file()
