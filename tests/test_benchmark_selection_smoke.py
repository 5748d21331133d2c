"""Smoke test of benchmarks/selection_speed.py (no assertion on timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_hf.data import DEBIAN_FASHION_MNIST_DIR


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_speed.py"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_selection_speed_quick(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "selection_speed_quick.json").read_text())
    assert {row["method"] for row in result["rows"]} == {"inference", "selection"}
    assert result["time_ratio"] > 0
