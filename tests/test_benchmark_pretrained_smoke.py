"""Smoke test of benchmarks/pretrained.py --quick: pretraining, save_pretrained / from_pretrained with a new head,
fine-tuning on each noise, every method's row, the targets and the figure.

No assertion on accuracy values (a 2-epoch fine-tuning on 400 images means nothing); one thread so a
busy machine's oversubscribed OpenMP threads cannot stretch the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pretrained.py"
METHODS = {
    "none",
    "best_epoch",
    "oracle",
    "sap",
    "sap_paper",
    "sap_curvature",
    "refine",
    "sap+refine",
    "best+sap",
    "best+sap+refine",
    "finetune_trusted",
}
NOISES = {"sym40", "asym40", "inst40"}


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/pretrained.py is not present")
@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_pretrained_quick_writes_rows_for_every_noise_and_method(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--threads",
        "1",
        "--out_dir",
        str(tmp_path),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "pretrained.json").read_text())
    rows = result["rows"]
    assert {row["noise"] for row in rows} == NOISES
    lengths = {row["epochs"] for row in rows}
    assert lengths == set(result["config"]["lengths"])
    for noise in NOISES:
        for epochs in lengths:
            mine = [row for row in rows if (row["noise"], row["epochs"]) == (noise, epochs)]
            assert {row["method"] for row in mine} == METHODS
            for row in mine:
                assert {"noise", "seed", "epochs", "method", "test_accuracy", "val_accuracy", "noisy_fit"} <= set(row)
                assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["noisy_fit"] <= 1.0
            sap = next(row for row in mine if row["method"] == "sap")
            assert sap["rule"] == result["recipe_sap_config"]["selection_rule"] and 0.0 <= sap["purity"] <= 1.0
            # A val-chosen correction is never worse than the model it started from, on val.
            none = next(row for row in mine if row["method"] == "none")
            assert sap["val_accuracy"] >= none["val_accuracy"]
    # The noise is exactly 40% in every cell; the backbone was saved with save_pretrained (a headless ViTModel).
    assert all(abs(run["actual_noise_rate"] - 0.4) < 1e-6 for run in result["runs"])
    backbone = Path(result["pretraining"]["path"])
    assert json.loads((backbone / "config.json").read_text())["architectures"] == ["ViTModel"]
    assert {v["noise"] for v in result["targets"]} == NOISES
    assert {"loss", "shift_loss", "curvature"} <= set(result["selection_cost"])
    assert (tmp_path / "pretrained.png").is_file()
