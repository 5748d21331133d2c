"""Smoke test of benchmarks/selection_sources.py --quick (tiny data; no assertion on timings or purity levels)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_hf.data import DEBIAN_FASHION_MNIST_DIR


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_sources.py"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_selection_sources_quick(tmp_path):
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--out_dir",
        str(tmp_path),
        "--loss_cache",
        str(tmp_path / "losses"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "selection_sources_quick.json").read_text())
    assert set(result["summary"]) == {"pass", "subset_0.5", "training_all", "training_last1"}
    for row in result["rows"]:
        assert 0 <= row["purity"] <= 1 and row["num_trusted"] > 0
        assert "kind_alphas" in row and 0 <= row["test_accuracy"] <= 1
    passes = [r for r in result["rows"] if r["source"] == "pass"]
    assert all(r["same_choice"] and r["purity_gap_points"] == 0 for r in passes)
    assert (tmp_path / "selection_sources_quick.png").is_file()
    assert list((tmp_path / "losses").glob("*_epoch_losses.pt"))  # the per-epoch losses are cached
