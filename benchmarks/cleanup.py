"""The clean-up after SAP on Fashion-MNIST (sym40, asym40), from scratch: which `refine` mode, from which model.

    python benchmarks/cleanup.py --cache_dir /work/cache/accuracy     # the accuracy benchmark's models
    python benchmarks/cleanup.py --quick                               # smoke test

The (archived) accuracy study's protocol (`common.prepare_run`: the recipe's tiny ViT trained from scratch on 4,000
images with 40% noise for 100 epochs, until it memorises), its models when `--cache_dir` holds them; on each, the
methods `--methods` names (registered in `methods.py`; by default none, best_epoch and cleanups, whose rows are
sap+<mode> ... below); and once per seed the oracle:

    oracle            the same training on the clean labels, val-best epoch (the ceiling)
    sap+<mode>        sap's model, its audit, `refine(mode)` for each --modes (augmented views; lr, 2 lr; val picks)
    sap+refine        RefineConfig()'s choice: the val-best of its modes (remove, pseudo)
    ...-noaug         the same clean-up without augmentation (RefineConfig(augment=False); --augment 1 0)
    best+sap(+...)    the same pipeline from the val-best epoch instead of the last one

`benchmarks/cifar10n.py` runs the same methods on real human noise. Summary, targets, tables and figure: `report.py`.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from common import (  # noqa: E402
    add_cleanup_arguments,
    environment,
    finish_args,
    prepare_run,
    run_parser,
    run_tasks,
    train_from_scratch,
    write_json,
)
from methods import Cell, noisy_label_methods, run_methods  # noqa: E402


def summarised(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its summary per setting (the oracle rows in every setting) and targets, from its rows."""
    summary = report.summarise(record["rows"], ("setting",), shared="oracle")
    return dict(record, summary=summary, targets=report.gap_targets(summary, 1))


def finish(out: Path, record: dict[str, Any], name: str, plot: bool = True) -> dict[str, Any]:
    """Write the summarised record, print the README tables of `results/<name>.json`, draw its figure."""
    record = summarised(record)
    write_json(out, record)
    report.print_tables(out, f"{name}.json")
    print(json.dumps(record["targets"], indent=1))
    if plot:
        report.bars(record["summary"], out.with_suffix(".png"), "Fashion-MNIST")
    return record


def parse_args(argv: Optional[list[str]] = None) -> Any:
    parser = run_parser(__doc__.splitlines()[0])
    add_cleanup_arguments(parser)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["none", "best_epoch", "cleanups"],
        choices=noisy_label_methods(),
        help="the methods registered in methods.py to run on each model (the oracle, trained on the clean labels,"
        " is trained apart in the first setting)",
    )
    parser.add_argument("--out_name", default="cleanup", help="<out_dir>/<out_name>.json / .png (--quick: *_quick)")
    parser.add_argument("--replot", action="store_true", help="table and figure from the recorded JSON, no runs")
    args = finish_args(parser.parse_args(argv), argv)
    if args.quick:
        args.refine_epochs = [1]
    return args


def run_cell(task: tuple[str, int, Any]) -> dict[str, Any]:
    """Every row of one (setting, seed): none, best_epoch, oracle, sap, the clean-ups from the last and best models."""
    import torch

    setting, seed, args = task
    run = prepare_run(setting, seed, args)
    model, data, trained = run["model"], run["data"], run["trained"]
    base = {"setting": setting, "seed": seed, "train_epochs": args.epochs}
    cell = Cell(model, copy.deepcopy(model.state_dict()), trained, data, args, seed)
    rows = [dict(base, **row) for row in run_methods(cell, args.methods)]
    if setting == args.settings[0]:  # the oracle: the same images with their clean labels, trained once per seed
        torch.manual_seed(seed)
        oracle_model = type(model)(run["config"])
        clean = train_from_scratch(oracle_model, dict(data, train_y=data["clean_y"]), args, seed)
        last = copy.deepcopy(oracle_model.state_dict())
        oracle = Cell(oracle_model, last, clean, data, args, seed, clean_labels=True)
        rows += [dict(base, **row, setting="oracle") for row in run_methods(oracle, ["oracle"])]
    return {"setting": setting, "seed": seed, "rows": rows, "seconds": time.perf_counter() - run["started"]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out_dir) / f"{args.out_name}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.replot:
        return finish(out, json.loads(out.read_text()), args.out_name)
    tasks = [(setting, seed, args) for seed in args.seeds for setting in args.settings]

    def record(results: list[dict[str, Any]]) -> dict[str, Any]:
        config = {k: v for k, v in vars(args).items() if k not in ("jobs", "threads", "out_dir", "cache_dir")}
        return {
            "config": config,
            "environment": environment(),
            "rows": [row for result in results for row in result["rows"]],
            "cells": [{k: r[k] for k in ("setting", "seed", "seconds")} for r in results],
        }

    results = run_tasks(run_cell, tasks, args.jobs, on_result=lambda done: write_json(out, summarised(record(done))))
    return finish(out, record(results), args.out_name, plot=not args.no_plot)


if __name__ == "__main__":
    main()
