"""Smoke test of benchmarks/correction_cost.py --quick: 1 and 2 processes, decode counts (no assertion on timings).

The phases come from the library's hook (`Runtime(on_phase=...)`, `SAPResult.timings`), never from
wrappers around library names: the worker records that no library name was rebound.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sap_hf.data import DEBIAN_FASHION_MNIST_DIR


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "correction_cost.py"
ROWS = {"selection", "statistics", "eigh", "alpha_search", "write", "total"}
#: row phase -> the library's phase (SAPResult.timings key) it reports
FROM_HOOK = {
    "selection": "selection",
    "statistics": "statistics",
    "eigh": "eigh",
    "alpha_search": "evaluation",
    "write": "write",
}


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_correction_cost_quick(tmp_path):
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--out_dir",
        str(tmp_path),
        "--corpus_dir",
        str(tmp_path / "corpus"),
        "--no_plot",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "correction_cost_quick.json").read_text())
    assert [(r["model"], r["via"], r["processes"]) for r in result["runs"]] == [
        ("trained", "sap_correct", 1),
        ("trained", "sap_correct", 2),
        ("memorised", "sap_correct", 2),
        ("memorised", "SAPTrainer.correct", 2),
    ]
    for run_record in result["runs"]:
        sources = {r["source"] for r in run_record["rows"]}
        assert sources == ({"training"} if run_record["via"] == "SAPTrainer.correct" else {"pass", "subset"})
        for source in sources:
            rows = {r["phase"]: r for r in run_record["rows"] if r["source"] == source and r.get("search") != "grid"}
            assert set(rows) == ROWS
            assert 0 <= rows["selection"]["purity"] <= 1
            # decodes per process add up to the total, every phase
            assert all(
                sum(r["decodes_per_process"]) == r["decodes"]
                and len(r["decodes_per_process"]) == run_record["processes"]
                for r in rows.values()
            )
            # every decode of the correction is in the phase rows (innermost phase)
            assert sum(rows[name]["decodes"] for name in FROM_HOOK) == rows["total"]["decodes"]
        if run_record["via"] == "SAPTrainer.correct":  # selection from the recorded losses: no training image read
            selection = next(r for r in run_record["rows"] if r["phase"] == "selection")
            assert (
                selection["decodes"] <= run_record["processes"]
            )  # the eval label check: one validation image per process
            assert set(run_record["timings"]) >= {"selection", "statistics", "evaluation", "search"}
            continue
        searches = {
            r.get("search") for r in run_record["rows"] if r["phase"] == "alpha_search" and r["source"] == "pass"
        }
        assert searches == {"bracket", "grid"}
        # the rows are the hook's phases: SAPResult.timings of the correction, summed as the rows say
        timings = run_record["timings"]
        assert set(timings) == {"selection", "statistics", "evaluation", "eigh", "write", "search"}
        assert set(run_record["grid_timings"]) == {
            "evaluation",
            "eigh",
            "write",
            "search",
        }  # statistics from stats_path
        rows = {r["phase"]: r for r in run_record["rows"] if r["source"] == "pass" and r.get("search") != "grid"}
        for row, phase in FROM_HOOK.items():
            assert rows[row]["seconds"] == pytest.approx(timings[phase], abs=2e-3), (row, phase)
        grid = next(r for r in run_record["rows"] if r.get("search") == "grid")
        assert grid["seconds"] == pytest.approx(run_record["grid_timings"]["evaluation"], abs=2e-3)
        assert timings["search"] >= timings["eigh"] + timings["evaluation"] + timings["write"] - 3e-3
        logged = [entry["phase"] for entry in run_record["phase_log"]]
        assert logged[:2] == ["selection", "statistics"] and logged[-2:] == ["write", "search"]
        assert all(
            entry["decodes"] == 0 for entry in run_record["phase_log"] if entry["phase"] in ("search", "eigh", "write")
        )
        # the subset correction decodes fewer training images than the full pass
        subset = {r["phase"]: r for r in run_record["rows"] if r["source"] == "subset"}
        assert subset["selection"]["decodes"] < rows["selection"]["decodes"]
        # no library name rebound: the same objects everywhere, nothing bound to benchmark code
        intact = run_record["library_intact"]
        assert all(intact["same_objects"].values()), intact
        assert intact["rebound"] == []
    targets = result["targets"]
    # every image decoded once per pass whatever the number of processes; the 2-process search shares its decodes
    assert targets["trained_1p_pass"]["decodes"] == targets["trained_2p_pass"]["decodes"]
    assert targets["trained_1p_pass"]["met_decodes_le_1.1"]
    assert targets["memorised_2p_training"]["alpha_search_max_process_share"] <= 0.6
    assert "memorised_model" in result and "noisy_fit" in result["memorised_model"]


def test_recipe_settings_come_from_the_yaml(tmp_path):
    """The benchmarks' recipe settings are read from recipes/configs/default.yaml, not copied."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import common
    finally:
        sys.path.remove(str(SCRIPT.parent))
    settings = common.recipe_settings()
    config = common.recipe_sap_config()
    assert (config.accumulation_dtype, config.batch_size) == (settings["accumulation_dtype"], settings["batch_size"])
    # The YAML leaves the rest of the SAP settings at SAPConfig's defaults (it does not copy them).
    from sap_hf import SAPConfig

    assert {k: v for k, v in config.to_dict().items() if k not in settings} == {
        k: v for k, v in SAPConfig().to_dict().items() if k not in settings
    }
    changed = tmp_path / "recipe.yaml"
    changed.write_text(common.RECIPE_CONFIG.read_text() + "\ntrusted_per_class: 7\nalpha_scope: shared\n")
    assert (common.recipe_sap_config(changed).trusted_per_class, common.recipe_sap_config(changed).alpha_scope) == (
        7,
        "shared",
    )
    assert common.recipe_sap_config(changed, batch_size=500).batch_size == 500
    training = common.recipe_training()
    parser_defaults = common.run_parser("").parse_args([])
    assert (parser_defaults.epochs, parser_defaults.lr, parser_defaults.batch_size) == (
        settings["num_train_epochs"],
        settings["learning_rate"],
        settings["per_device_train_batch_size"],
    )
    assert (
        parser_defaults.warmup_epochs
        == training["warmup_epochs"]
        == pytest.approx(settings["warmup_steps"] * settings["num_train_epochs"])
    )
