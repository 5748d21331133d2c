"""Smoke test of benchmarks/correction_cost.py --quick: 1 and 2 processes, decode counts (no assertion on timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_hf.data import DEBIAN_FASHION_MNIST_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "correction_cost.py"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_correction_cost_quick(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--out_dir", str(tmp_path), "--corpus_dir", str(tmp_path / "corpus"), "--no_plot"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "correction_cost_quick.json").read_text())
    assert [r["processes"] for r in result["runs"]] == [1, 2]
    for run_record in result["runs"]:
        phases = {r["phase"] for r in run_record["rows"]}
        assert phases == {"selection", "statistics", "eigh", "alpha_search", "write", "total"}
        searches = {r.get("search") for r in run_record["rows"] if r["phase"] == "alpha_search"}
        assert searches == {"bracket", "grid"}
    # every image decoded once per pass whatever the number of processes
    assert result["targets"]["decodes_1p"]["decodes"] == result["targets"]["decodes_2p"]["decodes"]
    assert result["targets"]["decodes_1p"]["met_le_1.1"]
