"""Smoke tests of the studies under benchmarks/: each study's experiment files (benchmarks/experiments/), their
runs as `run.py --quick` would run them, in order in a fresh folder, then what their JSON, figures and output must
show. A new experiment file of a script already here needs no new code to be smoked: name it in a `Study`.

Checks the plumbing, not accuracy values (a few epochs on a few hundred images mean nothing) nor timings
(machines differ); one thread, so a busy machine's oversubscribed OpenMP threads cannot stretch a run. A
`Study` names its experiment files and what its runs add (`{tmp}` is the test's folder, `{images}`/`{labels}` a tiny CIFAR-10N copy
built there) and a check that sees, after every command, its output and the files then present (`Step`).

Each command runs in this process (`_run_script`: the script's `main(argv)`, with `sys.argv` as the command line
would set it), not in a new interpreter: importing torch, transformers (whose `Trainer` imports PEFT) and sap_hf
costs about 7 s a process here, which ~20 commands paid again. What a script changes in the process (argv,
sys.path, torch's threads, the libraries' log levels and progress bars, the working folder) is put back after it;
a command gets `Study.timeout` seconds. The studies' `--quick` runs one worker (`--jobs 1`): the scripts are not
importable by name from a spawned worker here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


class Step:
    """One command's run: its output, the files under the test's folder after it (their mtimes) and the JSON
    `outputs` among them as they were then (`json(name)`)."""

    def __init__(self, stdout: str, tmp: Path, outputs: tuple[str, ...]) -> None:
        self.stdout = stdout
        paths = [p for p in tmp.rglob("*") if p.is_file()]
        self.files = {p.relative_to(tmp).as_posix(): p.stat().st_mtime_ns for p in paths}
        self._json = {name: json.loads((tmp / name).read_text()) for name in outputs if name in self.files}

    def json(self, name: str) -> dict:
        return self._json[name]


@dataclass
class Study:
    """The smoke run of a study: its experiment files' runs, each as `run.py` would run it with `--quick` and then
    `where` (the test's folders and data, one thread, and at most fewer settings, label sets or noises than the
    file names), then each of `then` appended to the first run (e.g. `--replot`)."""

    experiments: tuple[str, ...]  # under benchmarks/experiments/, run in order in one folder
    check: Callable[[Path, list[Step]], None]
    where: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # JSON files read after every step (when present)
    then: tuple[tuple[str, ...], ...] = ()
    fashion_mnist: bool = True
    cifar10n: bool = False
    timeout: int = 900  # seconds each command may take (a hung command fails its test, not the session)

    def commands(self) -> list[list[str]]:
        """Each command: benchmarks/<script>.py and its arguments (`{tmp}`, `{images}`, `{labels}` still to fill)."""
        import run  # benchmarks/run.py: an experiment's runs as command lines

        commands = []
        for name in self.experiments:
            spec = run.load(BENCHMARKS / "experiments" / name)
            commands += [[spec["script"], *run.command_line(r), "--quick", *self.where] for r in spec["runs"]]
        return commands + [[*commands[0], *extra] for extra in self.then]


@contextlib.contextmanager
def _as_a_fresh_process(argv: list[str], timeout: int):
    """`sys.argv` as `python <argv>` sets it (and `common.RESULTS_DIR` as it follows from it), one thread for torch
    and for numpy's and scikit-learn's BLAS, the working folder at the checkout, a `TimeoutError` after `timeout`
    seconds; afterwards the process as it was (threads, argv, sys.path, folder, the log levels and progress bar
    `common.quiet_libraries` and `pretrained_regime` change)."""
    import common
    import torch
    from threadpoolctl import threadpool_limits
    from transformers.utils import logging as hf_logging

    saved = (list(sys.argv), list(sys.path), os.getcwd(), torch.get_num_threads(), common.RESULTS_DIR)
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    sap_level = logging.getLogger("sap_hf").level

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"{' '.join(argv)} ran longer than {timeout} s")

    sys.argv[:] = argv
    common.RESULTS_DIR = common.results_dir(argv[1:])
    os.chdir(ROOT)
    torch.set_num_threads(1)
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(timeout)
    try:
        with threadpool_limits(1):
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv[:], sys.path[:], cwd, threads, common.RESULTS_DIR = saved
        os.chdir(cwd)
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
        logging.getLogger("sap_hf").setLevel(sap_level)


def _run_script(script: str, argv: list[str], timeout: int) -> str:
    """`python benchmarks/<script> <argv>`'s standard output, run as `main(argv)` in this process."""
    path = BENCHMARKS / script
    spec = importlib.util.spec_from_file_location(f"_smoke_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()
    with _as_a_fresh_process([str(path), *argv], timeout), contextlib.redirect_stdout(out):
        spec.loader.exec_module(module)
        try:
            module.main(argv)
        except SystemExit as exit:  # argparse's errors, a script's own exit
            assert not exit.code, f"{script} {' '.join(argv)} exited {exit.code}:\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def _run_study(study: Study, tmp: Path) -> list[Step]:
    values = {"tmp": str(tmp)}
    if study.cifar10n:
        from sap_hf.data.cifar10n import write_tiny_cifar10n

        images, labels = write_tiny_cifar10n(tmp / "data", n_train=200, n_test=200)
        values.update(images=str(images), labels=str(labels))
    steps = []
    for command in study.commands():
        script, *argv = (part.format(**values) for part in command)
        steps.append(Step(_run_script(script, argv, study.timeout), tmp, study.outputs))
    return steps


# --------------------------------------------------------------------------------------------
# The studies
# --------------------------------------------------------------------------------------------

CIFAR10N = ("--images", "{images}", "--labels", "{labels}", "--threads", "1", "--label_sets", "worse")
#: The methods of cifar10n.py's default groups (core, extra, cleanlab) with the default modes, on one label set.
CIFAR10N_METHODS = {
    "none",
    "best_epoch",
    "oracle",
    "oracle+refine",
    "sap",
    "sap+remove",
    "sap+soft",
    "sap+pseudo",
    "sap+refine",
    "best+sap",
    "best+sap+remove",
    "best+sap+pseudo",
    "best+sap+refine",
    "refine",
    "finetune_trusted",
    "scrub",
}
#: cifar10n.py --methods defaults: methods.SAP_VARIANTS, registered by name.
SAP_VARIANT_METHODS = {"sap_paper", "sap_loss", "sap_30"}


def check_cifar10n(tmp: Path, steps: list[Step]) -> None:
    """Every method's row for a label set, the oracle, the summary, the targets, the figure; each `--merge` run
    adds its rows (the clean-ups without augmentation, then the SAP variants) and keeps the others."""
    first, noaug, variants = (step.json("cifar10n.json") for step in steps)
    methods = {row["method"] for row in first["rows"]}
    assert methods == CIFAR10N_METHODS, sorted(methods ^ CIFAR10N_METHODS)
    for row in first["rows"]:
        assert 0 <= row["test_accuracy"] <= 1
        if "+" in row["method"] and row["method"] != "best+sap":  # the clean-up: its cost and "no change" a candidate
            assert row["cost_epochs"] >= 0 and row["refine_epochs"] in (0, 1)
    worse = [row for row in first["rows"] if row["method"] == "none"][0]
    tuned = [row for row in first["rows"] if row["method"] == "finetune_trusted"][0]
    # "no change" is the last model, whatever ran before it: its val is `none`'s, and a fine-tune must beat it
    unchanged = abs(tuned["val_accuracy"] - worse["val_accuracy"]) < 1e-4  # `none`'s val is rounded
    assert tuned["val_accuracy"] > worse["val_accuracy"] or unchanged
    assert unchanged == (tuned["ft_epochs"] == 0)
    assert 0.25 <= worse["noise_rate"] <= 0.55  # the tiny copy's worse labels flip ~40%
    summary = first["summary"]["worse"]
    assert {"oracle", "sap", "sap+pseudo"} <= set(summary) and "sap_minus_none" in first["targets"]["worse"]
    assert "cifar10n.png" in steps[0].files
    # --merge: each run's rows join those of the other runs (a row of the same label set, seed and method replaced)
    added = {row["method"] for row in noaug["rows"]} - methods
    assert added == {"sap+remove-noaug", "sap+pseudo-noaug", "sap+refine-noaug"} and noaug["merged"]
    assert len(noaug["rows"]) == len(first["rows"]) + 3
    ids = [{(row["label_set"], row["seed"], row["method"]) for row in step["rows"]} for step in (first, noaug)]
    assert ids[0] <= ids[1] and len(ids[1]) == len(noaug["rows"])  # rerun rows replaced, not repeated
    named = {row["method"]: row for row in variants["rows"] if row["method"] in SAP_VARIANT_METHODS}
    assert set(named) == SAP_VARIANT_METHODS and len(variants["rows"]) == len(noaug["rows"]) + 3
    assert named["sap_loss"]["rule"] == "loss"


def check_cifar10n_mae(tmp: Path, steps: list[Step]) -> None:
    """The MAE regime: an encoder pretrained without labels (cached once), then the same methods from it."""
    record = steps[-1].json("mae.json")
    assert record["config"]["regime"] == "mae" and Path(record["config"]["backbone"]).is_file()
    methods = {row["method"] for row in record["rows"]}
    assert CIFAR10N_METHODS - {"sap+soft"} | SAP_VARIANT_METHODS == methods, sorted(methods)
    assert all(row["regime"] == "mae" for row in record["rows"])
    backbone = json.loads(Path(record["config"]["backbone"]).with_suffix(".json").read_text())
    assert len(backbone["loss"]) == record["config"]["pretrain_epochs"] and backbone["images"] > 0
    assert "MAE epoch" in steps[0].stdout and "MAE epoch" not in steps[1].stdout  # the second run read the cache


def check_cleanup(tmp: Path, steps: list[Step]) -> None:
    """Every row of one setting (with and without augmentation), the oracle, the summary, the targets, the figure
    and --replot."""
    record = steps[0].json("cleanup_quick.json")
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
        "sap+remove-noaug",
        "sap+refine-noaug",
    } <= methods
    assert {row["setting"] for row in record["rows"]} == {"sym40", "oracle"}  # the oracle: trained once, clean
    chosen = [row for row in record["rows"] if row["method"] == "sap+refine"][0]
    tried = [row for row in record["rows"] if row["method"] in ("sap+remove", "sap+pseudo")]
    assert chosen["val_accuracy"] == max(row["val_accuracy"] for row in tried)  # RefineConfig()'s pick, on val
    assert chosen["cost_epochs"] == sum(row["cost_epochs"] for row in tried)
    assert "oracle" in record["summary"]["sym40"] and "sap_minus_none" in record["targets"]["sym40"]
    assert "cleanup_quick.png" in steps[0].files
    assert "| sap+refine |" in steps[1].stdout
    assert steps[1].json("cleanup_quick.json")["rows"] == record["rows"]  # --replot: the rows read, none rerun


CORRECTION_ROWS = {"selection", "statistics", "eigh", "alpha_search", "write", "total"}
#: row phase -> the library's phase (SAPResult.timings key) it reports
FROM_HOOK = {
    "selection": "selection",
    "statistics": "statistics",
    "eigh": "eigh",
    "alpha_search": "evaluation",
    "write": "write",
}


def check_correction_cost(tmp: Path, steps: list[Step]) -> None:
    """1 and 2 processes, decode counts; the phases come from the library's hook (`Runtime(on_phase=...)`,
    `SAPResult.timings`), never from wrappers around library names: the worker records that none was rebound."""
    result = steps[0].json("correction_cost_quick.json")
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
            assert set(rows) == CORRECTION_ROWS
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
    # the table of corrections: one row per run and source, its numbers those of the phase rows
    table = {(r["model"], r["processes"], r["via"], r["source"].split()[0]): r for r in result["corrections"]}
    sources = [(run, source) for run in result["runs"] for source in {r["source"] for r in run["rows"]}]
    assert len(table) == len(result["corrections"]) == len(sources)
    for run_record, source in sources:
        row = table[run_record["model"], run_record["processes"], run_record["via"], source]
        total = next(r for r in run_record["rows"] if r["source"] == source and r["phase"] == "total")
        assert (row["total_seconds"], row["total_decodes"]) == (total["seconds"], total["decodes"])
        assert (row["grid_evaluations"] is None) == (source != "pass")
    assert steps[1].json("correction_cost_quick.json") == result  # --replot: computed again, the same
    targets = result["targets"]
    # every image decoded once per pass whatever the number of processes; the 2-process search shares its decodes
    assert targets["trained_1p_pass"]["decodes"] == targets["trained_2p_pass"]["decodes"]
    assert targets["trained_1p_pass"]["met_decodes_le_1.1"]
    assert targets["memorised_2p_training"]["alpha_search_max_process_share"] <= 0.6
    assert "memorised_model" in result and "noisy_fit" in result["memorised_model"]


def check_defaults(tmp: Path, steps: list[Step]) -> None:
    """SAPConfig(), the recipe's and the paper's SAP on both regimes' models."""
    result = steps[0].json("defaults_quick.json")
    assert set(result["summary"]) == {
        "scratch sym40 3",
        "scratch asym40 3",
        "pretrained sym40 2",
        "pretrained asym40 2",
        "pretrained inst40 2",
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
        assert set(entry) == {"none", "paper", "defaults", "recipe"} and entry["defaults"]["seconds"]["mean"] > 0
    assert "defaults_quick.png" in steps[0].files and "SAPConfig() chose what the recipe chose" in steps[0].stdout


#: The methods of every pretrained.py run, then those of --audits aum and of --methods audit_bound.
PRETRAINED_METHODS = {
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
#: --audits aum: the suspects from the fine-tuning's margins (audits.dynamics_audit_of)
AUM_METHODS = {"refine@aum", "sap+refine@aum", "best+sap+refine@aum"}
AUDIT_BOUND_METHODS = {"sap+refine x2", "sap+refine (true audit)"}
#: One of the three noises, the instance-dependent one (defaults.py's smoke test fine-tunes on all three).
NOISES = {"inst40"}


def check_pretrained(tmp: Path, steps: list[Step]) -> None:
    """Pretraining, save_pretrained / from_pretrained with a new head, fine-tuning on each noise, every method's row,
    the targets and the figure; the second experiment reuses the first's fine-tunings."""
    for name, extra in (("pretrained_aum", AUM_METHODS), ("pretrained_audit_bound", AUDIT_BOUND_METHODS)):
        result = steps[-1].json(f"{name}.json")
        rows = result["rows"]
        assert {row["noise"] for row in rows} == NOISES
        lengths = {row["epochs"] for row in rows}
        assert lengths == set(result["config"]["lengths"])
        for noise in NOISES:
            for epochs in lengths:
                mine = [row for row in rows if (row["noise"], row["epochs"]) == (noise, epochs)]
                assert {row["method"] for row in mine} == PRETRAINED_METHODS | extra
                for row in mine:
                    assert {"noise", "seed", "epochs", "method", "test_accuracy", "val_accuracy", "noisy_fit"} <= set(
                        row
                    )
                    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["noisy_fit"] <= 1.0
                sap = next(row for row in mine if row["method"] == "sap")
                assert sap["rule"] == result["recipe_sap_config"]["selection_rule"] and 0.0 <= sap["purity"] <= 1.0
                # A val-chosen correction is never worse than the model it started from, on val.
                none = next(row for row in mine if row["method"] == "none")
                assert sap["val_accuracy"] >= none["val_accuracy"]
                if extra is AUDIT_BOUND_METHODS:  # the second round starts from the first: never worse on val
                    once, twice = (next(r for r in mine if r["method"] == m) for m in ("sap+refine", "sap+refine x2"))
                    assert twice["val_accuracy"] >= once["val_accuracy"]
                    assert twice["cost_epochs"] >= once["cost_epochs"]
        # The noise is exactly 40% in every cell; the backbone was saved with save_pretrained (a headless ViTModel).
        assert all(abs(run["actual_noise_rate"] - 0.4) < 1e-6 for run in result["runs"])
        backbone = Path(result["pretraining"]["path"])
        assert json.loads((backbone / "config.json").read_text())["architectures"] == ["ViTModel"]
        assert {cell.split()[0] for cell in result["targets"]} == NOISES  # "sym40 2": noise and length
        assert all("sap+refine_minus_best_epoch" in verdict for verdict in result["targets"].values())
        assert {"loss", "shift_loss", "curvature"} <= set(result["selection_cost"])
        assert f"{name}.png" in steps[-1].files
    cached = {name: mtime for name, mtime in steps[0].files.items() if name.startswith("cache/")}
    assert cached and all(steps[1].files[name] == mtime for name, mtime in cached.items())  # nothing trained again


STUDIES = {
    "cifar10n": Study(
        ("cifar10n/scratch.yaml",),
        check_cifar10n,
        (*CIFAR10N, "--out", "{tmp}/cifar10n.json"),
        ("cifar10n.json",),
        fashion_mnist=False,
        cifar10n=True,
    ),
    "cifar10n_mae": Study(
        ("cifar10n/mae.yaml",),
        check_cifar10n_mae,
        (*CIFAR10N, "--out", "{tmp}/mae.json", "--cache_dir", "{tmp}/cache"),
        ("mae.json",),
        fashion_mnist=False,
        cifar10n=True,
    ),
    "cleanup": Study(
        ("cleanup/fashion_scratch.yaml",),
        check_cleanup,
        ("--settings", "sym40", "--out_dir", "{tmp}"),
        ("cleanup_quick.json",),
        then=(("--replot",),),
    ),
    "correction_cost": Study(
        ("correction_cost/clothing1m_like.yaml",),
        check_correction_cost,
        ("--out_dir", "{tmp}", "--corpus_dir", "{tmp}/corpus", "--no_plot"),
        ("correction_cost_quick.json",),
        then=(("--replot",),),
    ),
    "defaults": Study(("defaults/defaults.yaml",), check_defaults, ("--out_dir", "{tmp}"), ("defaults_quick.json",)),
    "pretrained": Study(
        ("pretrained/aum.yaml", "pretrained/audit_bound.yaml"),
        check_pretrained,
        ("--noises", *sorted(NOISES), "--threads", "1", "--out_dir", "{tmp}", "--cache_dir", "{tmp}/cache"),
        ("pretrained_aum.json", "pretrained_audit_bound.json"),
    ),
}


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = STUDIES[name]
    import datasets
    import huggingface_hub

    # offline, as the libraries read it at import (already done here): the constants, not only the environment
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # datasets' names for it, where its version has them
        monkeypatch.setattr(datasets.config, flag, True, raising=False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")  # and for the processes a study starts (correction_cost.py's launches)
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts' `import common` as `python benchmarks/x.py` finds it
    if study.fashion_mnist and not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST idx files are not installed")
    steps = _run_study(study, tmp_path)
    study.check(tmp_path, steps)
