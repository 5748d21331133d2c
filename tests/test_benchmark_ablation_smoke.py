"""Smoke test of benchmarks/sap_ablation.py --quick, sharing accuracy.py's trained models via --cache_dir.

Checks the plumbing, not accuracy values: every variant is reported, and the ablation studies the
very model accuracy.py trained (same `none` accuracies, read from the cache instead of retraining).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmark_accuracy_smoke import _fashion_mnist_available


ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "benchmarks" / "accuracy.py"
ABLATION = ROOT / "benchmarks" / "sap_ablation.py"
VARIANTS = {
    "none",
    "all",
    "no_head",
    "attention",
    "mlp",
    "no_fc2",
    "kind_alpha",
    "trusted=random",
    "trusted=clean",
    "trusted=mislabelled",
    "finetune_trusted",
    "sap+finetune",
}


def _run(script: Path, out: Path, cache: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(script),
        "--quick",
        "--threads",
        "1",
        "--out_dir",
        str(out),
        "--cache_dir",
        str(cache),
        "--settings",
        "sym40",
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not ABLATION.is_file(), reason="benchmarks/sap_ablation.py is not present")
@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_ablation_quick_reports_every_variant_on_the_cached_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(ACCURACY, tmp_path / "accuracy", cache)
    cached = sorted(cache.glob("sym40_seed0_*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    _run(ABLATION, tmp_path / "ablation", cache)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not retrained

    rows = json.loads((tmp_path / "ablation" / "sap_ablation.json").read_text())["rows"]
    assert {row["variant"] for row in rows} == VARIANTS
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["trusted=clean"]["purity"] == 1.0 and by_variant["trusted=mislabelled"]["purity"] == 0.0
    # No variant may be worse on val than the unchanged model: "unchanged" is always a candidate.
    assert all(row["val_accuracy"] >= by_variant["none"]["val_accuracy"] for row in rows)
    accuracy_rows = json.loads((tmp_path / "accuracy" / "accuracy.json").read_text())["rows"]
    none = next(row for row in accuracy_rows if row["method"] == "none")
    assert none["test_accuracy"] == by_variant["none"]["test_accuracy"]
    assert (tmp_path / "ablation" / "sap_ablation.png").is_file()
