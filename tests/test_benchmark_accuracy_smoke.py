"""Smoke test of benchmarks/accuracy.py --quick: it runs end to end and reports every method.

No assertion on accuracy values (a 3-epoch model on 400 images means nothing); one thread so a
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
SCRIPT = ROOT / "benchmarks" / "accuracy.py"
MAIN_METHODS = {
    "none",
    "best_epoch",
    "sap",
    "sap_shared",
    "finetune_trusted",
    "finetune_trusted_best",
    "sap+finetune",
    "sap+refine",
}


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/accuracy.py is not present")
@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_accuracy_quick_writes_rows_for_every_setting_and_method(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out_dir", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "accuracy.json").read_text())
    rows = result["rows"]
    assert {row["setting"] for row in rows} == {"sym40", "asym40"}
    for setting in ("sym40", "asym40"):
        mine = [row for row in rows if row["setting"] == setting]
        assert {row["seed"] for row in mine} == {0}
        methods = {row["method"] for row in mine}
        assert MAIN_METHODS <= methods, sorted(methods)
        # One diagnostic SAP row and one fine-tuning row per usable trusted set (rule/k).
        sap_sets = {m[4:-1] for m in methods if m.startswith("sap[")}
        assert sap_sets and sap_sets == {
            m[len("finetune_trusted[") : -1] for m in methods if m.startswith("finetune_trusted[")
        }
        assert sap_sets == {m[len("sap_per_kind[") : -1] for m in methods if m.startswith("sap_per_kind[")}
        for row in mine:
            assert 0.0 <= row["test_accuracy"] <= 1.0
            assert {"setting", "seed", "method", "test_accuracy", "val_accuracy", "gain_vs_none"} <= set(row)
        sap = next(row for row in mine if row["method"] == "sap")
        assert {"alpha", "alpha_scope", "kind_alphas", "rule", "trusted_per_class", "purity"} <= set(sap)
        # 'sap' is the first val-best candidate over every trusted set and both alpha scopes.
        candidates = [row for row in mine if row["method"].startswith(("sap[", "sap_per_kind["))]
        best = max(candidates, key=lambda row: row["val_accuracy"])
        assert (sap["val_accuracy"], sap["test_accuracy"], sap["rule"]) == (
            best["val_accuracy"],
            best["test_accuracy"],
            best["rule"],
        )
        assert 0.0 <= sap["purity"] <= 1.0
        none = next(row for row in mine if row["method"] == "none")
        assert 0.0 <= none["train_noisy_accuracy"] <= 1.0
    assert set(result["summary"]) == {"sym40", "asym40"}
    assert result["asymmetric_map"]["name"] == "sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP"
    assert (tmp_path / "accuracy_alpha.png").is_file() and (tmp_path / "accuracy_methods.png").is_file()
    refine = next(row for row in rows if row["setting"] == "sym40" and row["method"] == "sap+refine")
    assert refine["val_accuracy"] >= refine["sap_val_accuracy"]  # "no change" is a candidate
    assert {"refine_mode", "lr", "refine_epochs", "audit_precision", "audit_recall", "refine_trials"} <= set(refine)

    # --methods sap+refine: recompute that row group for one setting and merge it into the same accuracy.json.
    cmd += ["--methods", "sap+refine", "--settings", "sym40"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(merged["rows"]) == len(rows) and merged["config_refine"]["methods"] == ["sap+refine"]
    again = next(row for row in merged["rows"] if row["setting"] == "sym40" and row["method"] == "sap+refine")
    assert again["test_accuracy"] == refine["test_accuracy"]  # the rebuilt sap model and the same refine: same row
