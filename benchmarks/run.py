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
             into the JSON: `merge: true` for the scripts with --merge, or a --methods group for accuracy.py)

A run's mapping becomes the command line: `key: value` -> `--key value`, a list -> `--key v1 v2`, `true` -> `--key`,
`false`/null -> nothing. What depends on the machine (--cache_dir, --jobs, --threads, --out_dir) or on the
purpose (--quick, --seeds) is not in the file: give it after the file's path and every run gets it. A `--quick`
run writes under benchmarks/results/quick/ (git-ignored; `common.RESULTS_DIR`), never over a committed result.
`tests/test_benchmark_experiments.py` checks that every result JSON has one experiment and that each run parses
with its script and agrees with the arguments the JSON recorded, so a command cannot drift from its numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any


HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE / "experiments"


def load(path: Path) -> dict[str, Any]:
    """The experiment file as a mapping, its keys checked (errors name the file and the key)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an experiment file is a mapping (about, script, result, runs).")
    missing = [key for key in ("about", "script", "result", "runs") if key not in spec]
    unknown = sorted(set(spec) - {"about", "script", "result", "runs"})
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown} (about, script, result, runs).")
    if not (HERE / spec["script"]).is_file():
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
            print(f"{path.relative_to(HERE.parent)}  ->  benchmarks/{spec['result']}\n    {spec['about']}")
        return 0
    if args.methods:
        sys.path.insert(0, str(HERE))
        from methods import METHODS

        for name, method in METHODS.items():
            print(f"{name:18}{(method.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.experiment is None:
        parser.error("give an experiment file, --list or --methods")
    spec = load(args.experiment)
    for i, run in enumerate(spec["runs"], 1):
        command = [sys.executable, str(HERE / spec["script"]), *command_line(run), *extra]
        print(f"[run {i}/{len(spec['runs'])}] {' '.join(command[1:])}", flush=True)
        if not args.dry_run:
            done = subprocess.run(command, check=False)
            if done.returncode:
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
