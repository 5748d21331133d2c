"""Run one experiment file: the commands that produced (or reproduce) one results/<name>.json.

    python benchmarks/run.py benchmarks/experiments/pretrained/audit_bound.yaml --cache_dir /work/cache/pretrained
    python benchmarks/run.py benchmarks/experiments/cleanup/fashion_scratch.yaml --quick   # to results/quick/
    python benchmarks/run.py --list                     # every experiment, its result and what it measures
    python benchmarks/run.py --methods                  # the methods registered in methods.py (--methods NAME ...)

An experiment file (`benchmarks/experiments/<study>/<name>.yaml`) holds:

    about:   what it measures (one line; benchmarks/README.md has the protocol and the tables)
    script:  the study's script under benchmarks/
    result:  the JSON it writes under benchmarks/ (e.g. results/pretrained_audit_bound.json)
    runs:    one mapping of the script's arguments per command, run in order (a later run merges its rows
             into the JSON: `merge: true` for the scripts with --merge, or a --methods group for the archived accuracy.py)
    archived: (a settled study only) the last commit that holds its script: the script is gone from this
             checkout, its result, figure and page stay, and the runner runs it from a git worktree of that
             commit (its own sap_hf and support modules, so the rows are the ones it wrote), then copies the
             files the runs wrote under the worktree's benchmarks/results/ into this checkout's (the
             study's page says which; `--list` marks these)

A run's mapping becomes the command line: `key: value` -> `--key value`, a list -> `--key v1 v2`, `true` -> `--key`,
`false`/null -> nothing; an empty list -> a bare `--key` (only for an option with `nargs="*"`). What depends on
the machine (a cache folder, workers, threads, an output folder) or on the purpose (--quick, --seeds) is not in
the file: give it after the file's path, in the script's own spelling (its `--help`: e.g. `cifar10n.py` takes
--out, `defaults.py` --scratch_cache/--pretrained_cache), and every run gets it; `--dry_run` prints the commands.
Each run starts in the checkout's root (for an archived study, the worktree's, removed afterwards: give paths
after the file as absolute paths). A `--quick` run writes under benchmarks/results/quick/ (git-ignored;
`common.RESULTS_DIR`), never over a committed result.
`tests/test_benchmark_experiments.py` checks that every result JSON has one experiment and that each run parses
with its script and agrees with the arguments the JSON recorded, so a command cannot drift from its numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE / "experiments"
KEYS = ("about", "script", "result", "runs")


def load(path: Path) -> dict[str, Any]:
    """The experiment file as a mapping, its keys checked (errors name the file and the key)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an experiment file is a mapping (about, script, result, runs).")
    missing = [key for key in KEYS if key not in spec]
    unknown = sorted(set(spec) - {*KEYS, "archived"})
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown} (about, script, result, runs).")
    archived = spec.get("archived")
    if archived is not None and not (isinstance(archived, str) and len(archived) == 40):
        raise ValueError(f"{path}: archived={archived!r} is not a full commit hash (git rev-parse <commit>).")
    if archived is None and not (HERE / spec["script"]).is_file():
        raise ValueError(f"{path}: script={spec['script']!r} is not a file under benchmarks/.")
    if not isinstance(spec["runs"], list) or not spec["runs"] or not all(isinstance(r, dict) for r in spec["runs"]):
        raise ValueError(f"{path}: runs must be a non-empty list of argument mappings.")
    return spec


def command_line(arguments: dict[str, Any]) -> list[str]:
    """A run's mapping as the script's arguments: lists as several values, true as a flag, false/null left out."""
    argv: list[str] = []
    for key, value in arguments.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is True:
            continue
        argv += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
    return argv


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def experiment_files() -> list[Path]:
    return sorted(EXPERIMENTS.rglob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", type=Path, help="an experiment file (benchmarks/experiments/...)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--methods", action="store_true", help="list the registered methods and exit")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args, extra = parser.parse_known_args(argv)
    if args.list:
        for path in experiment_files():
            spec = load(path)
            archived = f"  (archived: {spec['script']} at {spec['archived'][:8]})" if "archived" in spec else ""
            print(f"{path.relative_to(HERE.parent)}  ->  benchmarks/{spec['result']}{archived}\n    {spec['about']}")
        return 0
    if args.methods:
        sys.path.insert(0, str(HERE))
        from methods import CLEAN_LABEL_METHODS, METHODS

        for name, method in METHODS.items():
            first = ((method.__doc__ or "").strip().splitlines() or [""])[0]
            where = "  (the clean-label cell a study trains itself; not a --methods choice)"
            print(f"{name:18}{first}{where if name in CLEAN_LABEL_METHODS else ''}")
        return 0
    if args.experiment is None:
        parser.error("give an experiment file, --list or --methods")
    spec = load(args.experiment)
    with _benchmarks_of(spec.get("archived"), dry_run=args.dry_run) as benchmarks:
        for i, run in enumerate(spec["runs"], 1):
            command = [sys.executable, str(benchmarks / spec["script"]), *command_line(run), *extra]
            print(f"[run {i}/{len(spec['runs'])}] python {' '.join(command[1:])}", flush=True)
            if not args.dry_run:  # from the checkout's root (the worktree's): its relative default paths stay in it
                done = subprocess.run(command, check=False, cwd=benchmarks.parent)
                if done.returncode:
                    return done.returncode
    return 0


@contextlib.contextmanager
def _benchmarks_of(commit: str | None, dry_run: bool = False) -> Iterator[Path]:
    """The benchmarks/ folder to run from: this one, or an archived study's in a git worktree of its commit,
    whose new results are copied here when the runs end (and the worktree removed)."""
    if commit is None:
        yield HERE
        return
    if dry_run:  # nothing made: the folder a run would make
        folder = Path(tempfile.gettempdir()) / f"sap_hf_{commit[:8]}_XXXX" / "checkout"
        print(f"[archived] git worktree add --detach {folder} {commit}", flush=True)
        yield folder / "benchmarks"
        return
    folder = Path(tempfile.mkdtemp(prefix=f"sap_hf_{commit[:8]}_")) / "checkout"
    git = ["git", "-C", str(HERE.parent)]
    print(f"[archived] git worktree add --detach {folder} {commit}", flush=True)
    subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(folder), commit], check=True)
    started = time.time()
    try:
        yield folder / "benchmarks"
    finally:
        for path in copy_new_results(folder / "benchmarks" / "results", HERE / "results", since=started):
            print(f"[archived] wrote {path}", flush=True)
        subprocess.run([*git, "worktree", "remove", "--force", str(folder)], check=False)
        shutil.rmtree(folder.parent, ignore_errors=True)


def copy_new_results(source: Path, target: Path, since: float) -> list[Path]:
    """Copy the files under `source` modified at or after `since` to the same place under `target`."""
    copied = []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.stat().st_mtime >= since):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy2(path, destination)))
    return copied


if __name__ == "__main__":
    sys.exit(main())
