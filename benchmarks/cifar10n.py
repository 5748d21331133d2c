"""CIFAR-10N: SAP and the clean-up after it on real human label noise (the benchmark of record).

    python benchmarks/cifar10n.py                       # label sets worse, random1, aggre; seeds 0-2
    python benchmarks/cifar10n.py --quick               # smoke test (a tiny copy, a few epochs)

Data (`sap_hf.data.load_cifar10n`): CIFAR-10 training images with one CIFAR-10N label set (`worse`: 40% wrong,
`random1`: 17%, `aggre`: 9%), a stratified subset of `--train_size`; clean validation and test images carved
from CIFAR-10's test split. The same images for every label set of a seed, so `oracle` (the same training on
the clean labels) is trained once per seed. Model: a tiny ViT (32x32 RGB, 8x8 patches) trained from scratch with
the recipe's optimiser until it memorises the noise; val after every epoch for `best_epoch`.

Methods (every choice on the clean validation split, reported on test):

    none              the last (memorised) model
    best_epoch        its val-best epoch (early stopping)
    oracle            the same training on the clean labels, val-best epoch
    oracle+refine     that model (last epoch) fine-tuned as the clean-up does (augmented, lr and length on val) on
                      the clean labels: the ceiling of `sap+refine`, which adds those augmented epochs
    sap               sap_correct(SAPConfig()) of the last model
    sap+<mode>        sap's model, its label audit (views="shift"), refine(mode) for each --modes
                      (remove | relabel | soft | pseudo), lr in {lr, 2 lr}, cosine, val after --refine_epochs
    best+sap+<mode>   the same pipeline started from the val-best epoch instead of the last one
    ...-noaug         the same clean-up without augmentation (RefineConfig(augment=False); --augment 1 0)

Each row: test/val accuracy, `noisy_fit` (share of the wrong training labels the model predicts), and for the
SAP rows the trusted samples' purity and the audit's average precision against the true errors; the clean-up's
`cost_epochs` (forward + backward passes, in epochs of the training set) beside the training's epochs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    accuracy,
    clean_label_cleanup_row,
    cleanup_study_rows,
    cleanup_table,
    cleanup_targets,
    environment,
    fit_diagnostics,
    image_tensors,
    plot_cleanup,
    run_tasks,
    summarise_cleanup,
    train_from_scratch,
    write_json,
)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10n"
RESULTS = Path(__file__).resolve().parent / "results"
LABEL_SETS = ("worse", "random1", "aggre")
MODES = ("remove", "soft", "pseudo")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", default=str(SHARED / "cifar10"), help="CIFAR-10 images (a folder of parquet, a Hub id)"
    )
    parser.add_argument("--labels", default=str(SHARED / "CIFAR-10_human.pt"), help="CIFAR-10N's CIFAR-10_human.pt")
    parser.add_argument(
        "--label_sets",
        nargs="*",
        default=list(LABEL_SETS),
        choices=LABEL_SETS,
        help="noisy label sets (none: the oracle rows only)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the rows to --out's, replacing those of the same label set, seed and method",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--val_size", type=int, default=1000)
    parser.add_argument("--test_size", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup_epochs", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=["remove", "relabel", "soft", "pseudo"])
    parser.add_argument(
        "--augment",
        nargs="+",
        type=int,
        default=[1],
        choices=[0, 1],
        help="RefineConfig.augment values of the sap+<mode> rows (0: rows named sap+<mode>-noaug)",
    )
    parser.add_argument(
        "--best_modes", nargs="*", default=["remove", "pseudo"], help="modes of the best+sap+<mode> rows"
    )
    parser.add_argument("--refine_epochs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--refine_batch_size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "cifar10n.json"))
    parser.add_argument("--cache_dir", default=None, help="keep the trained models here (keyed by their settings)")
    parser.add_argument("--replot", action="store_true", help="table and figure from the recorded JSON, no runs")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few epochs, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size, args.epochs, args.seeds = 200, 100, 100, 3, args.seeds[:1]
        args.hidden, args.layers, args.refine_epochs, args.warmup_epochs = 32, 2, [1], 0.5
    return args


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


def load_data(label_set: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One label set's splits as tensors: train_x/train_y (noisy)/clean_y/is_noisy, val_x/val_y, test_x/test_y."""
    import torch

    from sap_hf.data import load_cifar10n

    splits = load_cifar10n(
        args.images,
        args.labels,
        label_set=label_set,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        seed=seed,
    )
    data: dict[str, Any] = {}
    data["train_x"], data["train_y"] = image_tensors(splits["train"], image_size=32, num_channels=3)
    data["clean_y"] = torch.tensor(splits["train"]["clean_label"], dtype=torch.long)
    data["is_noisy"] = data["train_y"] != data["clean_y"]
    data["val_x"], data["val_y"] = image_tensors(splits["validation"], image_size=32, num_channels=3)
    data["test_x"], data["test_y"] = image_tensors(splits["test"], image_size=32, num_channels=3)
    return data


def new_model(seed: int, args: argparse.Namespace) -> Any:
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.data.cifar10n import CIFAR10_CLASSES
    from sap_hf.models import tiny_vit_config

    torch.manual_seed(seed)
    config = tiny_vit_config(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=10,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        id2label=dict(enumerate(CIFAR10_CLASSES)),
    )
    return ViTForImageClassification(config)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def run_cell(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    """Every method's rows for one (label set, seed); `oracle` for label set 'clean'."""
    import tempfile

    import torch

    label_set, seed, args = task
    if args.threads:
        torch.set_num_threads(args.threads)
    from common import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    data = load_data("worse" if label_set == "oracle" else label_set, seed, args)  # oracle: trained on clean_y
    model = new_model(seed, args)
    trained = trained_model(model, data, label_set, seed, args)
    base = {
        "label_set": label_set,
        "seed": seed,
        "noise_rate": float(data["is_noisy"].float().mean()),
        "train_epochs": args.epochs,
        "train_seconds": trained["seconds"],
    }
    last = copy.deepcopy(model.state_dict())
    rows = []
    model.load_state_dict(trained["best"]["state"])
    best = dict(
        base,
        method="best_epoch" if label_set != "oracle" else "oracle",
        best_epoch=trained["best"]["epoch"],
        test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
        val_accuracy=trained["best"]["val_accuracy"],
        **fit_diagnostics(model, data),
    )
    settings = dict(lr=args.lr, refine_epochs=args.refine_epochs, refine_batch_size=args.refine_batch_size, seed=seed)
    if label_set == "oracle":
        with tempfile.TemporaryDirectory() as scratch:
            ceiling = clean_label_cleanup_row(model, last, data, scratch=scratch, **settings)
        return {
            "rows": [best, dict(base, **ceiling)],
            "history": trained["history"],
            "seconds": time.perf_counter() - started,
            **task_key(task),
        }
    model.load_state_dict(last)
    rows.append(
        dict(
            base,
            method="none",
            test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
            val_accuracy=trained["history"][-1],
            **fit_diagnostics(model, data),
        )
    )
    rows.append(best)
    rows += [dict(base, **r) for r in cleanup_study_rows(model, last, trained["best"]["state"], data, args, seed)]
    return {"rows": rows, "history": trained["history"], "seconds": time.perf_counter() - started, **task_key(task)}


def trained_model(
    model: Any, data: dict[str, Any], label_set: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """`train_from_scratch` on the noisy (oracle: clean) labels, or its result from `--cache_dir`; model at its last epoch."""
    import torch

    keys = (
        "train_size",
        "val_size",
        "test_size",
        "hidden",
        "layers",
        "epochs",
        "lr",
        "warmup_epochs",
        "batch_size",
        "weight_decay",
    )
    name = "_".join([label_set, str(seed), *(f"{k}={getattr(args, k)}" for k in keys)]) + ".pt"
    path = Path(args.cache_dir) / name if args.cache_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path, weights_only=False)
        model.load_state_dict(cached.pop("last"))
        return cached
    if label_set == "oracle":
        data = dict(data, train_y=data["clean_y"])
    trained = train_from_scratch(model, data, args, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**trained, "last": model.state_dict()}, path)
    return trained


def task_key(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    return {"label_set": task[0], "seed": task[1]}


# --------------------------------------------------------------------------------------------
# Summary, table, figure
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    tasks = [(s, seed, args) for seed in args.seeds for s in ("oracle", *args.label_sets)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(results: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for result in results for row in result["rows"]]
        summary = summarise_cleanup(rows, "label_set")
        config = {k: v for k, v in vars(args).items() if k not in ("jobs", "threads", "out", "cache_dir", "replot")}
        return {
            "config": config,
            "environment": environment(),
            "rows": rows,
            "summary": summary,
            "targets": cleanup_targets(summary),
            "cells": [{k: r[k] for k in ("label_set", "seed", "seconds", "history")} for r in results],
        }

    def merged(new: dict[str, Any], old: Optional[dict[str, Any]]) -> dict[str, Any]:
        if old is None:
            return new
        ids = {(r["label_set"], r["seed"], r["method"]) for r in new["rows"]}
        rows = [r for r in old["rows"] if (r["label_set"], r["seed"], r["method"]) not in ids] + new["rows"]
        summary = summarise_cleanup(rows, "label_set")
        return dict(
            old,
            rows=rows,
            summary=summary,
            targets=cleanup_targets(summary),
            merged=[*old.get("merged", []), new["config"]],
        )

    if args.replot:  # summary, targets, table and figure again from the recorded rows
        recorded = json.loads(out.read_text())
        recorded["summary"] = summarise_cleanup(recorded["rows"], "label_set")
        recorded["targets"] = cleanup_targets(recorded["summary"])
        write_json(out, recorded)
        print(cleanup_table(recorded["summary"]))
        print(
            json.dumps(recorded["targets"], indent=1),
            plot_cleanup(recorded["summary"], out.with_suffix(".png"), "CIFAR-10N"),
        )
        return recorded

    previous = json.loads(out.read_text()) if args.merge and out.is_file() else None
    results = run_tasks(
        run_cell, tasks, args.jobs, on_result=lambda done: write_json(out, merged(record(done), previous))
    )
    final = merged(record(results), previous)
    write_json(out, final)
    figure = plot_cleanup(final["summary"], out.with_suffix(".png"), "CIFAR-10N")
    print(cleanup_table(final["summary"]))
    print(json.dumps(final["targets"], indent=1), figure)
    return final


if __name__ == "__main__":
    main()
