"""Smoke test of benchmarks/defaults.py --quick (tiny data; no assertion on accuracy levels or timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_hf.data import DEBIAN_FASHION_MNIST_DIR


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults.py"


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_defaults_quick(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--out_dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "defaults_quick.json").read_text())
    assert set(result["summary"]) == {
        "scratch/sym40/3",
        "scratch/asym40/3",
        "pretrained/sym40/2",
        "pretrained/asym40/2",
        "pretrained/inst40/2",
    }
    configs = result["configs"]
    # SAPConfig() is the recipe's SAP but for the statistics' dtype (and the batch size both set here).
    differing = {k for k in configs["defaults"] if configs["defaults"][k] != configs["recipe"][k]}
    assert differing == {"accumulation_dtype"}, differing
    assert configs["paper"]["selection_rule"] == "loss" and configs["paper"]["alpha_scope"] == "shared"
    for row in result["rows"]:
        assert row["config"] in {"none", "paper", "defaults", "recipe"} and 0 <= row["test_accuracy"] <= 1
        if row["config"] != "none":
            assert row["num_trusted"] > 0 and row["seconds"] > 0
    for entry in result["summary"].values():
        assert 0 <= entry["same_choice"] <= entry["none"]["test_accuracy"]["n"]
    assert (tmp_path / "defaults_quick.png").is_file()
