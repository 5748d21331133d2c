#!/usr/bin/env python
"""SAP on a *pretrained* ViT fine-tuned on noisy labels: the users' regime, from under-fitting to memorising.

    python benchmarks/pretrained.py --cache_dir /work/cache/pretrained --jobs 2 --threads 1
    python benchmarks/pretrained.py --quick                          # smoke run, tiny data
    python benchmarks/pretrained.py --train_only --cache_dir DIR     # fill the model cache only

The backbone, the task, the noises and the data come from `pretrained_regime.py`; the protocol, the methods
(`METHODS`, the `--methods` groups) and the results: benchmarks/studies/pretrained.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import common
import methods
import report
from audits import detector_metrics, dynamics_audit_of
from common import mean_std
from methods import Cell, add_refine_arguments, run_methods, sap_refine_row
from peers import peer_rows
from pretrained_regime import (
    NOISES,
    PRETRAIN_CLASSES,
    TASK_ASYMMETRIC_MAP,
    TASK_CLASSES,
    add_regime_arguments,
    class_names,
    finetune_path,
    finetuned,
    finish_regime_args,
    pretrain,
    reject_replaced_options,
    train_worker,
)


#: Row methods in table order.
METHODS = (
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
)
METHOD_GROUPS = ("core", "curvature", "peers", "audit_bound")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    add_regime_arguments(parser)
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[],
        choices=[g for g in METHOD_GROUPS if g != "core"],
        help="extra row groups: curvature (sap_curvature), peers (benchmarks/peers.py), audit_bound (a second "
        "audit + clean-up round, and the clean-up given the true mislabelled set); the core rows always run",
    )
    parser.add_argument("--out_name", default="pretrained", help="<out_dir>/<out_name>.json / .png")
    parser.add_argument(
        "--train_only", action="store_true", help="pretrain and fine-tune into --cache_dir, no methods"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only recompute the summary, targets, table and figure from <out_dir>/<out_name>.json's rows",
    )
    add_refine_arguments(parser, epochs=[1, 2, 4])
    common.add_audits_argument(parser)
    reject_replaced_options(parser, argv)
    args = finish_regime_args(common.finish_args(parser.parse_args(argv), argv))
    if args.refine_lrs is None:
        args.refine_lrs = [args.lr, 2 * args.lr]
    if args.quick:
        args.methods = list(dict.fromkeys(["curvature", *args.methods]))
        args.refine_lrs, args.refine_epochs = [args.lr], [1]
    return args


def audit_metrics(audit: Any, data: dict[str, Any]) -> dict[str, float]:
    """The audit's ranking and flags against the hidden truth (`audits.detector_metrics`: AP, AUROC, P, R)."""
    import torch

    n = len(data["train_y"])
    suspicion, flagged = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    suspicion[audit.indices] = -audit.scores.double()
    flagged[audit.indices] = audit.suspected
    return detector_metrics(data["is_noisy"], suspicion, flagged)


def _audit(model: Any, run: dict[str, Any], args: argparse.Namespace) -> Any:
    from sap_hf import audit_labels
    from sap_hf.runtime.passes import Runtime

    return audit_labels(
        model, run["train_set"], views=args.refine_views, runtime=Runtime(batch_size=1000, show_progress=False)
    )


def run_cell(noise: str, seed: int, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every method's row for one (noise, seed, fine-tuning length); `inputs` says what `peer_rows` gets."""
    import torch

    from sap_hf import SAPConfig

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = finetuned(noise, seed, epochs, args)
    data, model, trained = (run[k] for k in ("data", "model", "trained"))
    final_state = copy.deepcopy(model.state_dict())
    base = {"noise": noise, "seed": seed, "epochs": epochs}
    recipe = common.recipe_sap_config(batch_size=500)
    cell = Cell(model, final_state, trained, data, args, seed, sap_config=recipe, sap_audit=False)
    clean = finetuned("clean", seed, epochs, args, data=dict(data, train_y=data["clean_y"]))
    clean_state = copy.deepcopy(clean["model"].state_dict())
    oracle = Cell(clean["model"], clean_state, clean["trained"], data, args, seed, clean_labels=True)
    rows = [dict(base, **row) for row in run_methods(cell, ["none", "best_epoch"]) + run_methods(oracle, ["oracle"])]
    none = next(row for row in rows if row["method"] == "none")
    none["val_accuracy"] = common.accuracy(model, data["val_x"], data["val_y"])  # this study records it unrounded
    timing: dict[str, float] = {}

    def sap_method(state: dict, config: Any, method: str) -> dict[str, Any]:
        out = methods.sap_row(model, state, data, config, method, audit=False)
        return dict(out, row=dict(base, **out["row"]))

    sap = dict(cell.sap, row=dict(base, **cell.sap["row"]))
    paper = sap_method(final_state, SAPConfig(**common.PAPER_SAP, batch_size=500), "sap_paper")
    rows += [sap["row"], paper["row"]]
    if "curvature" in args.methods:
        rows.append(
            sap_method(
                final_state, common.recipe_sap_config(batch_size=500, selection_rule="curvature"), "sap_curvature"
            )["row"]
        )
    rows += [dict(base, **row) for row in run_methods(cell, ["finetune_trusted"])]
    best_sap = sap_method(trained["best"]["state"], recipe, "best+sap")
    rows.append(best_sap["row"])  # the pipeline started from the val-best epoch instead of the last one
    audits = {}
    starts = (
        ("refine", final_state, rows[0]),
        ("sap+refine", sap["state"], sap["row"]),
        ("best+sap+refine", best_sap["state"], best_sap["row"]),
    )
    runs = [
        (name + ("" if kind == "shift" else "@" + kind), kind, state, row)
        for kind in args.audits
        for name, state, row in starts
    ]
    for name, kind, state, row in runs:
        clock = time.perf_counter()
        model.load_state_dict(state)
        audit = _audit(model, run, args)
        if kind in common.DYNAMICS_WINDOWS:  # the training's margins rank and flag instead (audits.dynamics_audit)
            audit = dynamics_audit_of(kind, audit, trained["margins"], trained["best"]["epoch"])
        audits[name] = audit
        refined = sap_refine_row(model, state, row, run, args, method=name, audit=audit)
        after = _audit(model, run, args)  # the audit of the refined model (item: audits against cleanlab)
        refined.update(
            audit_ap_before=audit_metrics(audit, data)["average_precision"],
            audit_after=audit_metrics(after, data),
            seconds=time.perf_counter() - clock,
        )
        rows.append(dict(base, **refined))
        timing[name] = refined["seconds"]
        if name == "sap+refine" and "audit_bound" in args.methods:
            rows += audit_bound_rows(model, run, args, base, sap, refined, audit, after)
    model.load_state_dict(final_state)
    if "peers" in args.methods:
        rows += peer_method_rows(
            model, data, sap["trusted"].tolist(), audits["sap+refine"].suspected_indices(), base, args, seed
        )
    none_test = rows[0]["test_accuracy"]
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
    return {
        "noise": noise,
        "seed": seed,
        "epochs": epochs,
        "rows": rows,
        "run": {
            **base,
            "val_history": trained["history"],
            "best_epoch": trained["best"]["epoch"],
            "train_seconds": trained["seconds"],
            "actual_noise_rate": float(data["is_noisy"].float().mean()),
            "seconds": time.perf_counter() - started,
            "timing": timing,
        },
    }


def audit_bound_rows(
    model: Any,
    run: dict[str, Any],
    args: argparse.Namespace,
    base: dict[str, Any],
    sap: dict[str, Any],
    refined: dict[str, Any],
    audit: Any,
    after: Any,
) -> list[dict[str, Any]]:
    """Is the audit what holds the clean-up back? Two rows beside `sap+refine` (whose model `model` holds now):

    `sap+refine x2`: the refined model's own audit (`after`), then the same clean-up again from the refined model
    (its cost is both rounds'); `sap+refine (true audit)`: the clean-up from `sap`'s model given the truly
    mislabelled examples as the suspects (a perfect audit: the ceiling of a better detector, never a method).
    """
    import dataclasses

    data = run["data"]
    once = copy.deepcopy(model.state_dict())
    twice = sap_refine_row(model, once, dict(sap["row"], val_accuracy=refined["val_accuracy"]), run, args, "x", after)
    twice.update(method="sap+refine x2", cost_epochs=refined["cost_epochs"] + twice["cost_epochs"])
    twice.update(audit_ap_before=audit_metrics(after, data)["average_precision"])
    truth = dataclasses.replace(audit, suspected=data["is_noisy"][audit.indices].clone())
    true_audit = sap_refine_row(model, sap["state"], sap["row"], run, args, "sap+refine (true audit)", truth)
    model.load_state_dict(once)
    return [dict(base, **twice), dict(base, **true_audit)]


def peer_method_rows(
    model: Any,
    data: dict[str, Any],
    trusted: list[int],
    suspects: list[int],
    base: dict[str, Any],
    args: argparse.Namespace,
    seed: int,
) -> list[dict[str, Any]]:
    """`benchmarks/peers.py`'s rows (SSD, SCRUB) on the uncorrected model."""
    rows = peer_rows(copy.deepcopy(model), data, trusted_indices=trusted, suspects=suspects, args=args, seed=seed)
    return [dict(base, **row) for row in rows]


def _cell_worker(task: tuple[str, int, int, argparse.Namespace]) -> dict[str, Any]:
    noise, seed, epochs, args = task
    result = run_cell(noise, seed, epochs, args)
    by = {r["method"]: r["test_accuracy"] for r in result["rows"]}
    print(
        f"[pretrained] {noise} seed {seed} {epochs} ep done in {result['run']['seconds']:.0f}s: "
        + " ".join(f"{m}={100 * by[m]:.1f}" for m in METHODS if m in by),
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------
# Summary, targets, table, figure
# --------------------------------------------------------------------------------------------


def summarised(record: dict[str, Any], args: argparse.Namespace, out_dir: Path, plot: bool) -> dict[str, Any]:
    """`record` with its summary per noise and length, targets and selection cost from its rows (and the figure:
    test accuracy against the fine-tuning's length, a panel per noise)."""
    summary = report.summarise(record["rows"], ("noise", "epochs"))
    record = dict(record, summary=summary, targets=report.gap_targets(summary, 2))
    record["selection_cost"] = selection_cost(record["rows"])
    if plot and record["rows"]:
        figure = report.lines(summary, out_dir / f"{args.out_name}.png", "pretrained tiny ViT, 5 classes,", "epochs")
        record["plots"] = [os.path.relpath(figure, out_dir)] if figure else []
    return record


def selection_cost(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds of trusted selection per rule (the same cells, side by side), and the ratio to 'loss'."""
    by_rule: dict[str, list[float]] = {}
    for row in rows:
        if row.get("selection_seconds") is not None:
            by_rule.setdefault(row["rule"], []).append(row["selection_seconds"])
    means = {rule: statistics.fmean(v) for rule, v in by_rule.items()}
    loss = means.get("loss")
    return {
        rule: {"seconds": mean_std(v), "ratio_to_loss": means[rule] / loss if loss else None}
        for rule, v in by_rule.items()
    }


def _seed_worker(task: tuple[int, int, argparse.Namespace]) -> dict[str, Any]:
    """One (seed, length): its fine-tunings (clean and every noise; cached), then every noise's cell."""
    import torch

    seed, epochs, args = task
    torch.set_num_threads(args.threads)
    for noise in ["clean", *args.noises]:
        if not finetune_path(noise, seed, epochs, args).exists():
            train_worker((noise, seed, epochs, args))
    if args.train_only:
        return {"seed": seed, "epochs": epochs, "cells": []}
    return {
        "seed": seed,
        "epochs": epochs,
        "cells": [_cell_worker((noise, seed, epochs, args)) for noise in args.noises],
    }


def build_record(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    pretraining: dict[str, Any],
    started: float,
    out_dir: Path,
    final: bool,
) -> dict[str, Any]:
    cells = sorted(
        (c for r in results for c in r["cells"]), key=lambda c: (args.noises.index(c["noise"]), c["seed"], c["epochs"])
    )
    rows = sorted(
        (row for c in cells for row in c["rows"]),
        key=lambda r: (args.noises.index(r["noise"]), r["epochs"], r["seed"]),
    )
    record = {
        "rows": rows,
        "runs": [c["run"] for c in cells],
        "pretraining": pretraining,
        "complete": final,
        "task": {
            "classes": class_names(TASK_CLASSES),
            "pretrain_classes": class_names(PRETRAIN_CLASSES),
            "asymmetric_map": {str(k): v for k, v in TASK_ASYMMETRIC_MAP.items()},
            "noises": {k: {"noise_type": t, "noise_rate": r} for k, (t, r) in NOISES.items() if k in args.noises},
        },
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "recipe_sap_config": common.recipe_sap_config(batch_size=500).to_dict(),
        "environment": common.environment(),
        "elapsed_seconds": time.perf_counter() - started,
    }
    return summarised(record, args, out_dir, plot=final and not args.no_plot)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.replot:
        return replot(args, out_dir)
    pretraining = pretrain(args)
    print(
        f"[pretrained] backbone: {pretraining['path']} (accuracy on its own classes "
        f"{pretraining['final_accuracy_on_pretrain_test']:.3f})",
        flush=True,
    )
    # Seed by seed (a run cut short has whole seeds), the longest fine-tuning of a seed first.
    tasks = [(seed, epochs, args) for seed in args.seeds for epochs in sorted(args.lengths, reverse=True)]
    path = out_dir / f"{args.out_name}.json"

    def partial(results: list[dict[str, Any]]) -> None:
        if not args.train_only:
            common.write_json(path, build_record(args, results, pretraining, started, out_dir, final=False))

    results = common.run_tasks(_seed_worker, tasks, args.jobs, on_result=partial)
    if args.train_only:
        return {"pretraining": pretraining}
    record = build_record(args, results, pretraining, started, out_dir, final=True)
    common.write_json(path, record)
    report.print_tables(path, f"{args.out_name}.json")
    print(f"\nwrote {path} in {record['elapsed_seconds']:.0f}s")
    return record


def replot(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Summary, targets, selection cost, figure and table again from the recorded rows (no training)."""
    path = out_dir / f"{args.out_name}.json"
    record = summarised(json.loads(path.read_text()), args, out_dir, plot=not args.no_plot)
    common.write_json(path, record)
    report.print_tables(path, f"{args.out_name}.json")
    return record


if __name__ == "__main__":
    main()
