"""The experiment files of benchmarks/experiments/: one per result JSON, and each run is the command that JSON records.

A run's arguments are parsed by its script's own `parse_args` (a renamed or removed argument fails here) and
compared with the arguments the JSON recorded (`config`, `config_<part>`, `merged` entries, `earlier_config`):
every run must agree with one recorded configuration, and the JSON's main `config` must be one run's. Machine
and presentation arguments are not compared; a run over more seeds or settings than a recorded one agrees with
it (a study run seed by seed and merged is the same study).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import run  # noqa: E402  (benchmarks/run.py)


#: Where the run happened or how it was shown, not what it measured.
NOT_COMPARED = {
    "out_dir",
    "out",
    "jobs",
    "threads",
    "cache_dir",
    "scratch_cache",
    "pretrained_cache",
    "replot",
    "merge",
    "no_plot",
    "plot_seed",
    "wait_quiet",
}
#: Data locations: the checkout's place differs between machines (/work, /check/work), so only the path's
#: tail below the workspace is compared.
DATA_PATHS = {"images", "labels"}
#: A run over more of these than a recorded configuration agrees with it.
SPLIT = {"seeds", "settings", "label_sets", "lengths"}


def _parser_of(script: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_experiment_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _recorded(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every configuration a result JSON recorded, by where it sits."""
    found = {k: v for k, v in record.items() if k.startswith("config") and isinstance(v, dict)}
    found.update({f"merged[{i}]": m for i, m in enumerate(record.get("merged") or []) if isinstance(m, dict)})
    if isinstance(record.get("config"), dict) and isinstance(record["config"].get("earlier_config"), dict):
        found["earlier_config"] = record["config"]["earlier_config"]
    return found


def _disagreements(parsed: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(parsed) & set(recorded) - NOT_COMPARED):
        got, want = json.loads(json.dumps(parsed[key])), json.loads(json.dumps(recorded[key]))
        if key in DATA_PATHS and isinstance(got, str) and isinstance(want, str):
            got, want = Path(got).parts[-3:], Path(want).parts[-3:]
        if key in SPLIT and isinstance(got, list) and isinstance(want, list):
            if not set(want) <= set(got):
                out.append(f"{key}: run {got} does not cover recorded {want}")
        elif got != want:
            out.append(f"{key}: run {got!r} != recorded {want!r}")
    return out


EXPERIMENTS = run.experiment_files()


def _git_history() -> bool:
    """Whether this checkout has its git history (a shallow or exported copy cannot show an archived commit)."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True)
    return done.returncode == 0 and done.stdout.strip() == b"false"


def test_every_result_has_exactly_one_experiment():
    results = sorted(p.relative_to(BENCHMARKS).as_posix() for p in (BENCHMARKS / "results").glob("*.json"))
    named = [run.load(path)["result"] for path in EXPERIMENTS]
    assert sorted(named) == results, "each benchmarks/results/*.json needs one experiment file naming it"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.relative_to(BENCHMARKS / "experiments").as_posix())
def test_experiment_runs_parse_and_match_what_the_result_recorded(path):
    spec = run.load(path)
    if "archived" in spec:  # its script was checked against its result here while it lived (at that commit)
        assert not (BENCHMARKS / spec["script"]).exists(), f"{path.name}: archived, yet {spec['script']} is here"
        if _git_history():
            show = ["git", "-C", str(ROOT), "cat-file", "-e", f"{spec['archived']}:benchmarks/{spec['script']}"]
            assert subprocess.run(show, capture_output=True).returncode == 0, f"{path.name}: no script at its commit"
        return
    parse_args = _parser_of(spec["script"])
    parsed = [vars(parse_args(run.command_line(arguments))) for arguments in spec["runs"]]
    recorded = _recorded(json.loads((BENCHMARKS / spec["result"]).read_text()))
    if not recorded:  # the study records no arguments (speed and cost studies): parsing is the check
        return
    for i, arguments in enumerate(parsed, 1):
        reasons = {name: _disagreements(arguments, config) for name, config in recorded.items()}
        assert any(not r for r in reasons.values()), (
            f"{path.name} run {i} matches no recorded configuration: {reasons}"
        )
    if "config" in recorded:
        assert any(not _disagreements(arguments, recorded["config"]) for arguments in parsed), (
            f"{path.name}: no run gives the result's main config"
        )


def test_command_line_spells_lists_flags_and_floats():
    argv = run.command_line({"seeds": [0, 1], "merge": True, "no_plot": False, "lr": 1e-4, "extra": None, "n": 3})
    assert argv == ["--seeds", "0", "1", "--merge", "--lr", "0.0001", "--n", "3"]


def test_a_bad_experiment_file_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("about: x\nscript: cleanup.py\nresult: results/accuracy.json\nruns: []\nseeds: [0]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: missing keys \[\], unknown keys \['seeds'\]"):
        run.load(bad)
    bad.write_text("about: x\nscript: nope.py\nresult: results/x.json\nruns: [{}]\n")
    with pytest.raises(ValueError, match=r"script='nope.py' is not a file"):
        run.load(bad)
    bad.write_text("about: x\nscript: cleanup.py\nresult: results/x.json\nruns: []\n")
    with pytest.raises(ValueError, match="runs must be a non-empty list"):
        run.load(bad)


def test_the_runner_runs_each_command_with_the_extra_arguments(capsys):
    path = BENCHMARKS / "experiments" / "cifar10n" / "scratch.yaml"
    assert run.main([str(path), "--dry_run", "--quick", "--seeds", "0"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[run ")]
    assert len(lines) == len(run.load(path)["runs"])
    assert all(line.endswith("--quick --seeds 0") and "cifar10n.py" in line for line in lines)
    assert "--modes remove pseudo --augment 0 --best_modes --merge" in lines[1]


def test_the_runner_lists_every_registered_method_with_its_summary(capsys):
    import methods  # benchmarks/methods.py: the registry

    assert run.main(["--methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(methods.METHODS)
    assert {"none", "best_epoch", "cleanups", "oracle+refine", "sap_paper"} <= set(methods.METHODS)
    assert all(len(line.split()) > 3 for line in lines)  # each with the first line of its docstring


def test_a_smoke_run_writes_beside_the_committed_results_never_over_them(tmp_path: Path) -> None:
    """`--quick` moves the studies' default output folder to results/quick/, and `write_json` refuses a smoke
    run's record among the committed results (an explicit --out_dir benchmarks/results --quick)."""
    import subprocess

    show = "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.RESULTS_DIR)"
    for argv, folder in (([], "results"), (["--quick"], "quick")):
        done = subprocess.run([sys.executable, "-c", show, *argv], cwd=ROOT, capture_output=True, text=True)
        assert Path(done.stdout.strip()).name == folder, done.stderr
    import common

    target = common.COMMITTED_RESULTS / "never_written.json"
    with pytest.raises(ValueError, match="--quick run would write .*never_written.json among the committed results"):
        common.write_json(target, {"config": {"quick": True}, "rows": []})
    assert not target.exists() and not target.with_name(target.name + ".tmp").exists()
    assert common.write_json(tmp_path / "r.json", {"config": {"quick": True}}).is_file()  # elsewhere: written


def test_every_script_an_experiment_runs_has_a_smoke_test() -> None:
    """A study's script that no `--quick` smoke test runs could break unseen until its next full run (an archived
    study's script is not in the checkout: it ran its smoke test at its commit)."""
    spec = importlib.util.spec_from_file_location("_smoke", ROOT / "tests" / "test_benchmark_smoke.py")
    smoke = sys.modules["_smoke"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(smoke)
    smoked = [BENCHMARKS / "experiments" / name for study in smoke.STUDIES.values() for name in study.experiments]
    assert all(path in EXPERIMENTS for path in smoked), sorted(map(str, set(smoked) - set(EXPERIMENTS)))
    assert not [path for path in smoked if "archived" in run.load(path)], "a smoke test runs an archived study"
    scripts = {spec["script"] for spec in map(run.load, EXPERIMENTS) if "archived" not in spec}
    covered = {run.load(path)["script"] for path in smoked}
    assert scripts - covered == set(), f"experiment scripts without a smoke test: {sorted(scripts - covered)}"


def test_each_run_starts_in_the_checkouts_root_and_a_dry_run_makes_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run starts in its checkout's root, so a script's relative default paths (the archived speed.py's
    `--out benchmarks/results`) land in the checkout the script is from, never in the one the user stands in: an
    archived study's worktree, whose results are copied back. A dry run prints the worktree it would make, and
    makes nothing."""
    calls: list[dict[str, Any]] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(dict(kwargs, command=command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    path = BENCHMARKS / "experiments" / "cleanup" / "fashion_scratch.yaml"
    assert run.main([str(path), "--quick", "--out_dir", str(tmp_path)]) == 0
    assert len(calls) == len(run.load(path)["runs"]) and all(call["cwd"] == ROOT for call in calls)
    monkeypatch.setattr(run.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert run.main([str(BENCHMARKS / "experiments" / "speed" / "statistics_pass.yaml"), "--dry_run"]) == 0
    assert len(calls) == len(run.load(path)["runs"]) and list((tmp_path / "tmp").iterdir()) == []


def test_an_archived_study_runs_from_a_worktree_of_its_commit(tmp_path: Path, capsys) -> None:
    """A settled study's script is gone from the checkout: the runner runs it from its commit, then removes the
    worktree (here the cheapest one, selection_speed.py --quick, with its output sent to the test's folder)."""
    path = BENCHMARKS / "experiments" / "selection" / "speed.yaml"
    spec = run.load(path)
    assert run.main([str(path), "--dry_run", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "git worktree add --detach" in printed and spec["archived"] in printed
    assert "/checkout/benchmarks/selection_speed.py --quick" in printed
    if not _git_history():
        pytest.skip("this checkout has no git history to take the archived commit from")
    before = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert run.main([str(path), "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "selection_speed_quick.json").read_text())
    assert {row["method"] for row in record["rows"]} == {"inference", "selection"}
    after = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before  # the worktree is gone


def test_the_files_an_archived_run_wrote_are_copied_back_and_no_others(tmp_path: Path) -> None:
    source, target = tmp_path / "worktree", tmp_path / "checkout"
    (source / "quick").mkdir(parents=True)
    old = source / "old.json"
    old.write_text("{}")
    os.utime(old, (time.time() - 60, time.time() - 60))
    (source / "quick" / "new.json").write_text("{}")
    copied = run.copy_new_results(source, target, since=time.time() - 30)
    assert copied == [target / "quick" / "new.json"] and (target / "quick" / "new.json").is_file()
    assert not (target / "old.json").exists()
