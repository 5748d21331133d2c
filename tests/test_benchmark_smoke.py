"""Smoke tests of the studies under benchmarks/: each study's `--quick` command lines, run in order in a fresh
folder, then what their JSON, figures and output must show.

Checks the plumbing, not accuracy values (a few epochs on a few hundred images mean nothing) nor timings
(machines differ); one thread, so a busy machine's oversubscribed OpenMP threads cannot stretch a run. A
`Study` names its command lines (`{tmp}` is the test's folder, `{images}`/`{labels}` a tiny CIFAR-10N copy
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
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
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
    commands: list[list[str]]  # each: benchmarks/<script>.py and its arguments
    check: Callable[[Path, list[Step]], None]
    outputs: tuple[str, ...] = ()  # JSON files read after every step (when present)
    fashion_mnist: bool = True
    cifar10n: bool = False
    needs: tuple[str, ...] = ()  # modules to import, else skip
    before: dict[str, dict] = field(default_factory=dict)  # JSON files written before the first command
    timeout: int = 900  # seconds each command may take (a hung command fails its test, not the session)


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
    for name, content in study.before.items():
        (tmp / name).write_text(json.dumps(content))
    steps = []
    for command in study.commands:
        script, *argv = (part.format(**values) for part in command)
        steps.append(Step(_run_script(script, argv, study.timeout), tmp, study.outputs))
    return steps


# --------------------------------------------------------------------------------------------
# accuracy.py and the studies on its models (--methods peers, sap_ablation.py, --methods robust_*)
# --------------------------------------------------------------------------------------------

ACCURACY = ["accuracy.py", "--quick", "--threads", "1", "--out_dir", "{tmp}"]
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


def check_accuracy(tmp: Path, steps: list[Step]) -> None:
    """Rows for every setting and method; `--methods sap+refine` recomputes that group and merges it."""
    result = steps[0].json("accuracy.json")
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
    assert {"accuracy_alpha.png", "accuracy_methods.png"} <= set(steps[0].files)
    refine = next(row for row in rows if row["setting"] == "sym40" and row["method"] == "sap+refine")
    assert refine["val_accuracy"] >= refine["sap_val_accuracy"]  # "no change" is a candidate
    assert {"refine_mode", "lr", "refine_epochs", "audit_precision", "audit_recall", "trials", "examples"} <= set(
        refine
    )

    # --methods sap+refine: recompute that row group for one setting and merge it into the same accuracy.json.
    merged = steps[1].json("accuracy.json")
    assert len(merged["rows"]) == len(rows) and merged["config_refine"]["methods"] == ["sap+refine"]
    again = next(row for row in merged["rows"] if row["setting"] == "sym40" and row["method"] == "sap+refine")
    assert again["test_accuracy"] == refine["test_accuracy"]  # the rebuilt sap model and the same refine: same row


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


def check_ablation(tmp: Path, steps: list[Step]) -> None:
    """Every variant is reported, on the very model accuracy.py trained (read from the cache, not retrained)."""
    cached = [name for name in steps[0].files if re.fullmatch(r"cache/sym40_seed0_[^/]*\.pt", name)]
    assert len(cached) == 1
    assert steps[1].files[cached[0]] == steps[0].files[cached[0]]  # reused, not retrained

    rows = steps[1].json("ablation/sap_ablation.json")["rows"]
    assert {row["variant"] for row in rows} == VARIANTS
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["trusted=clean"]["purity"] == 1.0 and by_variant["trusted=mislabelled"]["purity"] == 0.0
    # No variant may be worse on val than the unchanged model: "unchanged" is always a candidate.
    assert all(row["val_accuracy"] >= by_variant["none"]["val_accuracy"] for row in rows)
    accuracy_rows = steps[1].json("accuracy/accuracy.json")["rows"]
    none = next(row for row in accuracy_rows if row["method"] == "none")
    assert none["test_accuracy"] == by_variant["none"]["test_accuracy"]
    assert "ablation/sap_ablation.png" in steps[1].files


def check_peers(tmp: Path, steps: list[Step]) -> None:
    """`--methods peers` merges SSD's and SCRUB's rows (realistic and oracle forget sets) into accuracy.json."""
    before = steps[0].json("accuracy.json")["rows"]
    record = steps[1].json("accuracy.json")
    rows = record["rows"]
    peer = [r for r in rows if r["method"] in ("ssd", "scrub")]
    assert len(rows) == len(before) + 4  # the other groups' rows are kept
    assert {(r["method"], r["forget_set"], r["oracle"]) for r in peer} == {
        ("ssd", "realistic", False),
        ("ssd", "oracle", True),
        ("scrub", "realistic", False),
        ("scrub", "oracle", True),
    }
    for r in peer:
        assert {
            "setting",
            "seed",
            "test_accuracy",
            "val_accuracy",
            "cost_epochs",
            "cost_epochs_final",
            "forget_size",
            "retain_size",
            "trials",
            "gain_vs_none",
        } <= set(r)
        assert (
            0.0 <= r["test_accuracy"] <= 1.0 and r["val_accuracy"] >= r["val_unchanged"]
        )  # "no change" is a candidate
        assert r["cost_epochs"] >= r["cost_epochs_final"] >= 0.0
        if r["oracle"]:  # 400 training images: SSD 40 retain / 8 forget, SCRUB 8 / 2 (when chosen)
            assert r["forget_size"] in ((0, 8) if r["method"] == "ssd" else (0, 2))
            assert r["forget_size"] == 0 or r["forget_noisy_fraction"] == 1.0
        else:
            assert r["forget_size"] <= r["forget_available"] == r["audit_suspected"]
    assert {"lam", "alpha"} <= set(next(r for r in peer if r["method"] == "ssd"))
    # SCRUB's length is `scrub_epochs`: a caller's own `epochs` (pretrained.py's fine-tuning length) is not overwritten
    assert {"lr", "max_epochs", "scrub_epochs"} <= set(next(r for r in peer if r["method"] == "scrub"))
    assert not any("epochs" in r for r in peer)
    table = record["peers"]["sym40"]
    assert [t["theirs"] for t in table["targets"]] == [
        "ssd (realistic)",
        "scrub (realistic)",
        "ssd (oracle)",
        "scrub (oracle)",
    ]
    assert record["config_peers"]["oracle_sizes"] == {"ssd": [40, 8], "scrub": [8, 2]}


def check_accuracy_and_peers(tmp: Path, steps: list[Step]) -> None:
    check_accuracy(tmp, steps[:2])
    check_peers(tmp, steps[1:])


#: An existing accuracy.json: its rows of other groups / seeds must survive the robust rows' merge.
ROBUST_KEPT = [
    {"setting": "sym40", "seed": 0, "method": "none", "test_accuracy": 0.5, "val_accuracy": 0.5, "gain_vs_none": 0.0},
    {
        "setting": "sym40",
        "seed": 7,
        "method": "robust_gce",
        "loss": "gce",
        "test_accuracy": 0.6,
        "val_accuracy": 0.6,
        "gain_vs_none": 0.1,
        "gain_vs_base": 0.0,
    },
]
ROBUST_EXISTING = {
    "rows": ROBUST_KEPT,
    "runs": [],
    "robust_runs": [{"setting": "sym40", "seed": 7, "loss": "gce"}],
    "config": {"alphas": [1.0], "plot_seed": 0},
}


def check_robust(tmp: Path, steps: list[Step]) -> None:
    """`--methods robust_<loss>`: robust-loss rows, SAP on them, merged into the existing accuracy.json."""
    assert "| robust_gce+sap |" in steps[0].stdout  # the README's robust-loss table, from this run's rows
    result = steps[0].json("accuracy.json")
    rows = result["rows"]
    assert all(row in rows for row in ROBUST_KEPT)  # other (setting, seed, group) rows are kept untouched
    for loss in ("gce", "sce"):
        mine = {row["method"]: row for row in rows if row.get("loss") == loss and row["seed"] == 0}
        name = f"robust_{loss}"
        assert {
            name,
            f"{name}_best_epoch",
            f"{name}+sap",
            f"{name}+sap[loss/3]",
            f"{name}+sap_per_kind[shift_loss/3]",
        } <= set(mine)
        model, sap = mine[name], mine[f"{name}+sap"]
        assert model["gain_vs_base"] == 0.0 and 0.0 <= model["train_noisy_accuracy"] <= 1.0
        assert sap["gain_vs_base"] == pytest.approx(sap["test_accuracy"] - model["test_accuracy"])
        assert sap["gain_vs_none"] - sap["gain_vs_base"] == pytest.approx(model["gain_vs_none"])  # vs the CE model
        assert sap["val_accuracy"] >= model["val_accuracy"]  # "no change" is a candidate, chosen on val
        candidates = [row for m, row in mine.items() if m.startswith((f"{name}+sap[", f"{name}+sap_per_kind["))]
        assert sap["val_accuracy"] == max(row["val_accuracy"] for row in candidates)
        assert mine[f"{name}_best_epoch"]["epoch"] >= 1
        assert model["loss_params"]["loss"] == loss
        entry = result["robust"]["sym40"][loss]
        assert entry["seeds"] == [0] and entry["sap_gain_per_seed"] == [pytest.approx(sap["gain_vs_base"])]
    assert mine["robust_sce"]["loss_params"] == {
        "loss": "sce",
        "sce_alpha": 0.1,
        "sce_beta": 1.0,
        "sce_log_zero": -4.0,
    }
    assert sorted((run["seed"], run["loss"]) for run in result["robust_runs"]) == [(0, "gce"), (0, "sce"), (7, "gce")]
    assert "sym40" in result["summary"] and "robust_gce+sap" in result["summary"]["sym40"]
    assert "accuracy_robust.png" in steps[0].files


# --------------------------------------------------------------------------------------------
# The other studies
# --------------------------------------------------------------------------------------------

CIFAR10N = ["cifar10n.py", "--quick", "--images", "{images}", "--labels", "{labels}", "--threads", "1"]


def check_cifar10n(tmp: Path, steps: list[Step]) -> None:
    """Every method's row for a label set, the oracle, the summary, the targets, the figure; `--merge` keeps rows."""
    record = steps[0].json("cifar10n.json")
    methods = {row["method"] for row in record["rows"]}
    assert {
        "none",
        "best_epoch",
        "oracle",
        "oracle+refine",
        "sap",
        "sap+remove",
        "sap+soft",
        "sap+pseudo",
        "best+sap",
        "best+sap+pseudo",
        "sap+refine",
        "best+sap+refine",
        "sap+remove-noaug",
        "sap+refine-noaug",
    } <= methods
    for row in record["rows"]:
        assert 0 <= row["test_accuracy"] <= 1
        if "+" in row["method"] and row["method"] != "best+sap":  # the clean-up: its cost and "no change" a candidate
            assert row["cost_epochs"] >= 0 and row["refine_epochs"] in (0, 1)
    worse = [row for row in record["rows"] if row["method"] == "none"][0]
    tuned = [row for row in record["rows"] if row["method"] == "finetune_trusted"][0]
    # "no change" is the last model, whatever ran before it: its val is `none`'s, and a fine-tune must beat it
    unchanged = abs(tuned["val_accuracy"] - worse["val_accuracy"]) < 1e-4  # `none`'s val is rounded
    assert tuned["val_accuracy"] > worse["val_accuracy"] or unchanged
    assert unchanged == (tuned["ft_epochs"] == 0)
    assert 0.25 <= worse["noise_rate"] <= 0.55  # the tiny copy's worse labels flip ~40%
    summary = record["summary"]["worse"]
    assert {"oracle", "sap", "sap+pseudo"} <= set(summary) and "sap_minus_none" in record["targets"]["worse"]
    assert "cifar10n.png" in steps[0].files
    # --merge: new rows replace those of the same label set, seed and method; the others stay
    merged = steps[1].json("cifar10n.json")
    assert len(merged["rows"]) == len(record["rows"]) and merged["merged"]
    assert {r["method"] for r in merged["rows"]} == methods


def check_cifar10n_mae(tmp: Path, steps: list[Step]) -> None:
    """The MAE regime: an encoder pretrained without labels (cached once), then the same methods from it."""
    record = steps[0].json("mae.json")
    assert record["config"]["regime"] == "mae" and Path(record["config"]["backbone"]).is_file()
    assert {"none", "best_epoch", "oracle", "sap", "sap+remove"} <= {row["method"] for row in record["rows"]}
    assert all(row["regime"] == "mae" for row in record["rows"])
    backbone = json.loads(Path(record["config"]["backbone"]).with_suffix(".json").read_text())
    assert len(backbone["loss"]) == record["config"]["pretrain_epochs"] and backbone["images"] > 0


def check_cleanup(tmp: Path, steps: list[Step]) -> None:
    """Every row of one setting, a method named on the command line, the oracle, the summary, the targets, the
    figure and --replot."""
    record = steps[0].json("cleanup_quick.json")
    methods = {row["method"] for row in record["rows"]}
    named = [row for row in record["rows"] if row["method"] == "sap_loss"]  # methods.SAP_VARIANTS, by --methods
    assert len(named) == 1 and named[0]["rule"] == "loss" and named[0]["setting"] == "sym40"
    assert {
        "none",
        "best_epoch",
        "oracle",
        "sap",
        "sap+remove",
        "sap+pseudo",
        "sap+refine",
        "best+sap+refine",
    } <= methods
    chosen = [row for row in record["rows"] if row["method"] == "sap+refine"][0]
    tried = [row for row in record["rows"] if row["method"] in ("sap+remove", "sap+pseudo")]
    assert chosen["val_accuracy"] == max(row["val_accuracy"] for row in tried)  # RefineConfig()'s pick, on val
    assert chosen["cost_epochs"] == sum(row["cost_epochs"] for row in tried)
    assert "oracle" in record["summary"]["sym40"] and "sap_minus_none" in record["targets"]["sym40"]
    assert "cleanup_quick.png" in steps[0].files
    assert "| sap+refine |" in steps[1].stdout


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


def check_label_audit(tmp: Path, steps: list[Step]) -> None:
    """Every detector gets a row with the metrics and a cost."""
    result = steps[0].json("label_audit.json")
    detectors = {row["detector"] for row in result["rows"]}
    assert {
        "cleanlab_in_sample",
        "cleanlab_cv5",
        "cleanlab_sap",
        "sap_audit",
        "sap_loss",
        "sap_shift_loss",
        "sap_curvature",
        "sap_refine_audit",
        "refine_audit",
    } <= detectors
    refined = next(row for row in result["rows"] if row["detector"] == "sap_refine_audit")
    assert refined["refine_epochs"] in (0, result["config"]["refine_epochs"]) and refined["first_suspected"] > 0
    for row in result["rows"]:
        assert {
            "setting",
            "seed",
            "detector",
            "average_precision",
            "precision",
            "recall",
            "auroc",
            "cost_epochs",
        } <= set(row)
        assert 0 <= row["average_precision"] <= 1 and 0 <= row["auroc"] <= 1 and row["cost_epochs"] > 0
    cv = next(row for row in result["rows"] if row["detector"] == "cleanlab_cv5")
    assert cv["epochs_trained"] == 5 * result["config"]["cv_epochs"]
    assert set(result["targets"]["sym40"]) >= {"best_sap_detector", "ap_met", "cost_met", "cost_ratio"}
    assert (tmp / "label_audit_pr.png").stat().st_size > 0


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
    "sap+refine x2",
    "sap+refine (true audit)",
    "refine@aum",  # --audits aum: the suspects from the fine-tuning's margins (audits.dynamics_audit_of)
    "sap+refine@aum",
    "best+sap+refine@aum",
}
#: Two of the three noises (defaults.py's smoke test fine-tunes on asym40 in this regime too): the time goes to --audits.
NOISES = {"sym40", "inst40"}


def check_pretrained(tmp: Path, steps: list[Step]) -> None:
    """Pretraining, save_pretrained / from_pretrained with a new head, fine-tuning on each noise, every method's row,
    the targets and the figure."""
    result = steps[0].json("pretrained.json")
    rows = result["rows"]
    assert {row["noise"] for row in rows} == NOISES
    lengths = {row["epochs"] for row in rows}
    assert lengths == set(result["config"]["lengths"])
    for noise in NOISES:
        for epochs in lengths:
            mine = [row for row in rows if (row["noise"], row["epochs"]) == (noise, epochs)]
            assert {row["method"] for row in mine} == PRETRAINED_METHODS
            for row in mine:
                assert {"noise", "seed", "epochs", "method", "test_accuracy", "val_accuracy", "noisy_fit"} <= set(row)
                assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["noisy_fit"] <= 1.0
            sap = next(row for row in mine if row["method"] == "sap")
            assert sap["rule"] == result["recipe_sap_config"]["selection_rule"] and 0.0 <= sap["purity"] <= 1.0
            # A val-chosen correction is never worse than the model it started from, on val.
            none = next(row for row in mine if row["method"] == "none")
            assert sap["val_accuracy"] >= none["val_accuracy"]
            # --methods audit_bound: the second round starts from the first (never worse on val, both rounds' cost).
            once, twice = (next(r for r in mine if r["method"] == m) for m in ("sap+refine", "sap+refine x2"))
            assert twice["val_accuracy"] >= once["val_accuracy"] and twice["cost_epochs"] >= once["cost_epochs"]
    # The noise is exactly 40% in every cell; the backbone was saved with save_pretrained (a headless ViTModel).
    assert all(abs(run["actual_noise_rate"] - 0.4) < 1e-6 for run in result["runs"])
    backbone = Path(result["pretraining"]["path"])
    assert json.loads((backbone / "config.json").read_text())["architectures"] == ["ViTModel"]
    assert {cell.split()[0] for cell in result["targets"]} == NOISES  # "sym40 2": noise and length
    assert all("sap+refine_minus_best_epoch" in verdict for verdict in result["targets"].values())
    assert {"loss", "shift_loss", "curvature"} <= set(result["selection_cost"])
    assert "pretrained.png" in steps[0].files


def check_selection_speed(tmp: Path, steps: list[Step]) -> None:
    result = steps[0].json("selection_speed_quick.json")
    assert {row["method"] for row in result["rows"]} == {"inference", "selection"}
    assert result["time_ratio"] > 0


def check_selection_sources(tmp: Path, steps: list[Step]) -> None:
    """Tiny data; no assertion on timings or purity levels."""
    result = steps[0].json("selection_sources_quick.json")
    assert set(result["summary"]) == {"pass", "subset_0.5", "training_all", "training_last1"}
    for row in result["rows"]:
        assert 0 <= row["purity"] <= 1 and row["num_trusted"] > 0
        assert "kind_alphas" in row and 0 <= row["test_accuracy"] <= 1
    passes = [r for r in result["rows"] if r["source"] == "pass"]
    assert all(r["same_choice"] and r["purity_gap_points"] == 0 for r in passes)
    assert "selection_sources_quick.png" in steps[0].files
    assert any(re.fullmatch(r"losses/[^/]*_epoch_losses\.pt", name) for name in steps[0].files)  # losses cached


SPEED_METHODS = {"inference", "stats_exact", "stats_subsampled", "eigh_project", "reference_svd"}


def check_speed(tmp: Path, steps: list[Step]) -> None:
    """Every method is reported, and the math matches the reference SVD."""
    result = steps[0].json("speed.json")
    rows = result["rows"]
    models = {row["model"] for row in rows}
    assert models, "no rows"
    for model in models:
        methods = {row["method"] for row in rows if row["model"] == model}
        assert methods == SPEED_METHODS, f"{model}: {sorted(methods)}"
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


SYM40 = ["--settings", "sym40"]
CACHED = ["--quick", "--threads", "1", *SYM40, "--cache_dir", "{tmp}/cache"]  # one model, trained once
CLEANUP = ["cleanup.py", "--quick", *SYM40, "--modes", "remove", "pseudo", "--best_modes", "remove", "pseudo"]
CLEANUP += ["--methods", "none", "best_epoch", "cleanups", "sap_loss", "--out_dir", "{tmp}"]  # sap_loss: by name
STUDIES = {
    "accuracy": Study(  # then the peers on the same models, merged into the same accuracy.json
        [ACCURACY, [*ACCURACY, "--methods", "sap+refine", *SYM40], [*ACCURACY, "--methods", "peers", *SYM40]],
        check_accuracy_and_peers,
        ("accuracy.json",),
    ),
    "ablation": Study(
        [
            ["accuracy.py", *CACHED, "--out_dir", "{tmp}/accuracy"],
            ["sap_ablation.py", *CACHED, "--out_dir", "{tmp}/ablation"],
        ],
        check_ablation,
        ("accuracy/accuracy.json", "ablation/sap_ablation.json"),
    ),
    "robust": Study(
        [[*ACCURACY, *SYM40, "--rules", "loss", "shift_loss", "--methods", "robust_gce", "robust_sce"]],
        check_robust,
        ("accuracy.json",),
        before={"accuracy.json": ROBUST_EXISTING},
    ),
    "cifar10n": Study(
        [
            [*CIFAR10N, "--label_sets", "worse", "--out", "{tmp}/cifar10n.json"]
            + ["--modes", "remove", "soft", "pseudo", "--augment", "1", "0"],
            [*CIFAR10N, "--label_sets", "--out", "{tmp}/cifar10n.json", "--merge"],
        ],
        check_cifar10n,
        ("cifar10n.json",),
        fashion_mnist=False,
        cifar10n=True,
    ),
    "cifar10n_mae": Study(
        [
            [*CIFAR10N, "--regime", "mae", "--label_sets", "worse", "--methods", "core", "--modes", "remove"]
            + ["--out", "{tmp}/mae.json", "--cache_dir", "{tmp}/cache"]
        ],
        check_cifar10n_mae,
        ("mae.json",),
        fashion_mnist=False,
        cifar10n=True,
    ),
    "cleanup": Study([CLEANUP, [*CLEANUP, "--replot"]], check_cleanup, ("cleanup_quick.json",)),
    "correction_cost": Study(
        [["correction_cost.py", "--quick", "--out_dir", "{tmp}", "--corpus_dir", "{tmp}/corpus", "--no_plot"]],
        check_correction_cost,
        ("correction_cost_quick.json",),
    ),
    "defaults": Study([["defaults.py", "--quick", "--out_dir", "{tmp}"]], check_defaults, ("defaults_quick.json",)),
    "label_audit": Study(
        [["label_audit.py", "--quick", "--threads", "1", *SYM40, "--out_dir", "{tmp}"]],
        check_label_audit,
        ("label_audit.json",),
        needs=("cleanlab",),
    ),
    "pretrained": Study(
        [
            [
                "pretrained.py",
                "--quick",
                "--methods",
                "audit_bound",
                "--audits",
                "shift",
                "aum",
                "--noises",
                *sorted(NOISES),
                "--threads",
                "1",
                "--out_dir",
                "{tmp}",
                "--cache_dir",
                "{tmp}/cache",
            ]
        ],
        check_pretrained,
        ("pretrained.json",),
    ),
    "selection_speed": Study(
        [["selection_speed.py", "--quick", "--out", "{tmp}"]], check_selection_speed, ("selection_speed_quick.json",)
    ),
    "selection_sources": Study(
        [["selection_sources.py", "--quick", "--out_dir", "{tmp}", "--loss_cache", "{tmp}/losses"]],
        check_selection_sources,
        ("selection_sources_quick.json",),
    ),
    "speed": Study(
        [["speed.py", "--quick", "--threads", "1", "--no_plot", "--out", "{tmp}"]],
        check_speed,
        ("speed.json",),
        fashion_mnist=False,
    ),
}


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = STUDIES[name]
    import datasets
    import huggingface_hub

    # offline, as the libraries read it at import (already done here): the constants, not only the environment
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # datasets' names for it, where its version has them
        monkeypatch.setattr(datasets.config, name, True, raising=False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")  # and for the processes a study starts (speed.py's children)
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts' `import common` as `python benchmarks/x.py` finds it
    for module in study.needs:
        pytest.importorskip(module)
    if study.fashion_mnist and not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST idx files are not installed")
    steps = _run_study(study, tmp_path)
    study.check(tmp_path, steps)
