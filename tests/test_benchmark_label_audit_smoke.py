"""Smoke test of benchmarks/label_audit.py --quick: every detector gets a row with the metrics and a cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "label_audit.py"


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_label_audit_quick(tmp_path: Path) -> None:
    pytest.importorskip("cleanlab")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--settings", "sym40", "--out_dir", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "label_audit.json").read_text())
    detectors = {row["detector"] for row in result["rows"]}
    assert {
        "cleanlab_in_sample",
        "cleanlab_cv5",
        "cleanlab_sap",
        "sap_audit",
        "sap_loss",
        "sap_shift_loss",
        "sap_curvature",
        "sap_refine_audit",
        "refine_audit",
    } <= detectors
    refined = next(row for row in result["rows"] if row["detector"] == "sap_refine_audit")
    assert refined["refine_epochs"] in (0, result["config"]["refine_epochs"]) and refined["first_suspected"] > 0
    for row in result["rows"]:
        assert {
            "setting",
            "seed",
            "detector",
            "average_precision",
            "precision",
            "recall",
            "auroc",
            "cost_epochs",
        } <= set(row)
        assert 0 <= row["average_precision"] <= 1 and 0 <= row["auroc"] <= 1 and row["cost_epochs"] > 0
    cv = next(row for row in result["rows"] if row["detector"] == "cleanlab_cv5")
    assert cv["epochs_trained"] == 5 * result["config"]["cv_epochs"]
    assert set(result["targets"]["sym40"]) >= {"best_sap_detector", "ap_met", "cost_met", "cost_ratio"}
    assert (tmp_path / "label_audit_pr.png").stat().st_size > 0


def test_merge_keeps_the_other_detectors_rows() -> None:
    """`--detectors X --merge` replaces X's rows of a (setting, seed) and keeps every other detector's row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import label_audit

    def record(detectors, value):
        rows = [{"setting": "sym40", "seed": 0, "detector": d, "average_precision": value} for d in detectors]
        return {
            "rows": rows,
            "runs": [{"setting": "sym40", "seed": 0, "epoch_seconds": value}],
            "curves": {"sym40": {d: {"value": value} for d in detectors}},
        }

    rows, runs, curves = label_audit._merge(
        [record(["cleanlab_cv5", "sap_audit"], 0.5), record(["sap_audit", "refine_audit"], 0.9)]
    )
    assert [(r["detector"], r["average_precision"]) for r in rows] == [
        ("cleanlab_cv5", 0.5),
        ("sap_audit", 0.9),
        ("refine_audit", 0.9),
    ]
    assert [run["detectors"] for run in runs] == [["cleanlab_cv5", "sap_audit"], ["sap_audit", "refine_audit"]]
    assert curves["sym40"]["cleanlab_cv5"] == {"value": 0.5} and curves["sym40"]["sap_audit"] == {"value": 0.9}
