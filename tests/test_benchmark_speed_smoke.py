"""Smoke test of benchmarks/speed.py --quick: it runs, reports every method, and the math matches.

No assertion on absolute seconds (machines differ); one thread so that a busy machine's
oversubscribed OpenMP threads cannot stretch the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"
METHODS = {"inference", "stats_exact", "stats_subsampled", "eigh_project", "reference_svd"}


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/speed.py is not present")
def test_speed_quick_reports_every_method_and_matches_reference(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--no_plot", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "speed.json").read_text())
    rows = result["rows"]
    models = {row["model"] for row in rows}
    assert models, "no rows"
    for model in models:
        methods = {row["method"] for row in rows if row["model"] == model}
        assert methods == METHODS, f"{model}: {sorted(methods)}"
        for row in rows:
            assert row["seconds"] > 0 and row["n_samples"] > 0
            assert set(row) >= {"model", "method", "n_samples", "seconds", "peak_mem_mb"}
        summary = result["summary"][model]
        # Gram (float64 accumulation) -> eigh -> P gives the reference SVD's weights.
        assert summary["max_rel_diff"] <= 1e-5, summary
        assert summary["weights_match_1e-5"] is True
        # the library-default (float32 Gram) difference is reported, whatever its size
        assert summary["max_rel_diff_timed_runs"] >= 0.0
        assert summary["ratio_stats_exact_over_inference"] > 0
        memory = summary["memory_n_vs_4n"]
        assert memory["big_n"] == 4 * memory["n"] and memory["n_peak_growth_mb"] > 0
        # the timed statistics pass is benchmark-side instrumentation that returns exactly the library's statistics
        assert summary["instrumented_pass_matches_library"] is True
        breakdown = summary["stats_exact_breakdown_s"]
        assert breakdown["addmm_update_calls"] > 0 and breakdown["gram_update"] >= 0


def test_statistics_instrumentation_rebinds_no_library_name() -> None:
    """speed_investigate times the Gram updates with a benchmark-side subclass and a copy of the loop: the library's
    names stay the library's during and after, and the prototype accumulator gives the library's Grams."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import common
        import speed_investigate
        from speed_methods import RandomBatches, build_model, run_stats
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import sap_hf.core.stats as stats_module
    from sap_hf.core.targets import find_target_modules

    library = (
        stats_module.GramAccumulator,
        stats_module.GramAccumulator.update,
        stats_module.GramAccumulator.result,
        stats_module.subsample_tokens,
        stats_module.collect_statistics,
    )
    torch.manual_seed(0)
    model = build_model("tiny", image_size=32)
    names = find_target_modules(model)
    data = list(RandomBatches(4, 2, seed=1, image_size=32))
    assert speed_investigate.matches_library(model, data, names, 2, None)
    assert speed_investigate.matches_library(model, data, names, 2, 3)
    proto, timers = speed_investigate.instrumented_statistics(
        model, data, names, 2, None, accumulator=speed_investigate.prototype_accumulator_class()
    )
    assert timers["update_calls"] > 0 and timers["gram_update_s"] > 0 and timers["gram_result_s"] > 0
    reference = run_stats(model, data, names, 2, None)
    for group, gram in reference.grams.items():
        assert torch.allclose(proto.grams[group], gram, rtol=1e-5, atol=1e-4)
    assert (
        stats_module.GramAccumulator,
        stats_module.GramAccumulator.update,
        stats_module.GramAccumulator.result,
        stats_module.subsample_tokens,
        stats_module.collect_statistics,
    ) == library
    assert common.rebound_library_names() == []
