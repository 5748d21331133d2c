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
    assert {"cleanlab_in_sample", "cleanlab_cv5", "cleanlab_sap", "sap_audit", "sap_loss", "sap_shift_loss"} <= detectors
    for row in result["rows"]:
        assert {"setting", "seed", "detector", "average_precision", "precision", "recall", "auroc", "cost_epochs"} <= set(row)
        assert 0 <= row["average_precision"] <= 1 and 0 <= row["auroc"] <= 1 and row["cost_epochs"] > 0
    cv = next(row for row in result["rows"] if row["detector"] == "cleanlab_cv5")
    assert cv["epochs_trained"] == 5 * result["config"]["cv_epochs"]
    assert set(result["targets"]["sym40"]) >= {"best_sap_detector", "ap_met", "cost_met", "cost_ratio"}
    assert (tmp_path / "label_audit_pr.png").stat().st_size > 0
