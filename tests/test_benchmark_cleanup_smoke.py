"""Smoke test of benchmarks/cleanup.py --quick (the clean-up study on Fashion-MNIST): every row of one setting, the
oracle, the summary, the targets, the figure and --replot. No assertion on accuracy values; one thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cleanup.py"


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not _fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_cleanup_benchmark_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--settings",
        "sym40",
        "--modes",
        "remove",
        "pseudo",
        "--best_modes",
        "remove",
        "pseudo",
        "--out_dir",
        str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "cleanup_quick.json").read_text())
    methods = {row["method"] for row in record["rows"]}
    assert {
        "none",
        "best_epoch",
        "oracle",
        "sap",
        "sap+remove",
        "sap+pseudo",
        "sap+refine",
        "best+sap+refine",
    } <= methods
    chosen = [row for row in record["rows"] if row["method"] == "sap+refine"][0]
    tried = [row for row in record["rows"] if row["method"] in ("sap+remove", "sap+pseudo")]
    assert chosen["val_accuracy"] == max(row["val_accuracy"] for row in tried)  # RefineConfig()'s pick, on val
    assert chosen["cost_epochs"] == sum(row["cost_epochs"] for row in tried)
    assert "oracle" in record["summary"]["sym40"] and "sap_minus_none" in record["targets"]["sym40"]
    assert (tmp_path / "cleanup_quick.png").is_file()
    replot = subprocess.run([*command, "--replot"], capture_output=True, text=True, env=env, timeout=300)
    assert replot.returncode == 0 and "| sap+refine |" in replot.stdout, replot.stderr[-2000:]
