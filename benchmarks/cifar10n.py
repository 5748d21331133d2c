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
    oracle            the same training on the clean labels, val-best epoch: the ceiling
    sap               sap_correct(SAPConfig()) of the last model
    sap+<mode>        sap's model, its label audit (views="shift"), refine(mode) for each --modes
                      (remove | relabel | soft | pseudo), lr in {lr, 2 lr}, cosine, val after --refine_epochs
    best+sap+<mode>   the same pipeline started from the val-best epoch instead of the last one

Each row: test/val accuracy, `noisy_fit` (share of the wrong training labels the model predicts), and for the
SAP rows the trusted samples' purity and the audit's average precision against the true errors; the clean-up's
`cost_epochs` (forward + backward passes, in epochs of the training set) beside the training's epochs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TensorExamples,
    accuracy,
    environment,
    fit_diagnostics,
    image_tensors,
    mean_std,
    pyplot,
    run_tasks,
    save_figure,
    train_from_scratch,
    write_json,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10n"
RESULTS = Path(__file__).resolve().parent / "results"
LABEL_SETS = ("worse", "random1", "aggre")
MODES = ("remove", "soft", "pseudo")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED / "cifar10"), help="CIFAR-10 images (a folder of parquet, a Hub id)")
    parser.add_argument("--labels", default=str(SHARED / "CIFAR-10_human.pt"), help="CIFAR-10N's CIFAR-10_human.pt")
    parser.add_argument("--label_sets", nargs="+", default=list(LABEL_SETS), choices=LABEL_SETS)
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
    parser.add_argument("--best_modes", nargs="*", default=["remove", "pseudo"], help="modes of the best+sap+<mode> rows")
    parser.add_argument("--refine_epochs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--refine_batch_size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "cifar10n.json"))
    parser.add_argument("--cache_dir", default=None, help="keep the trained models here (keyed by their settings)")
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

    splits = load_cifar10n(args.images, args.labels, label_set=label_set, train_size=args.train_size,
                           val_size=args.val_size, test_size=args.test_size, seed=seed)
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
    config = tiny_vit_config(image_size=32, patch_size=8, num_channels=3, num_labels=10, hidden_size=args.hidden,
                             num_hidden_layers=args.layers, id2label=dict(enumerate(CIFAR10_CLASSES)))
    return ViTForImageClassification(config)


def refine_arguments(args: argparse.Namespace, seed: int, output_dir: str) -> Any:
    """The `TrainingArguments` of every clean-up run: batch 64, AdamW, cosine, no warm-up or weight decay."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, per_device_train_batch_size=args.refine_batch_size,
                             lr_scheduler_type="cosine", weight_decay=0.0, seed=seed, report_to=[], disable_tqdm=True,
                             use_cpu=True, dataloader_num_workers=0)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def _val(data: dict[str, Any]) -> Any:
    return lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])}


def audit_ap(audit: Any, data: dict[str, Any]) -> float:
    """Average precision of the audit's ranking (most suspicious first) against the true label errors."""
    from sklearn.metrics import average_precision_score

    truth = data["is_noisy"][audit.indices].numpy()
    return float(average_precision_score(truth, -audit.scores.double().numpy())) if truth.any() else float("nan")


def sap_and_cleanups(model: Any, state: dict, data: dict[str, Any], args: argparse.Namespace, seed: int,
                     prefix: str, modes: list[str], scratch: str) -> list[dict[str, Any]]:
    """`<prefix>sap` from `state`, then `<prefix>sap+<mode>` for each mode: rows; the model is left at `state`."""
    import torch

    from sap_hf import RefineConfig, SAPConfig, audit_labels, refine, sap_correct
    from sap_hf.runtime.passes import Runtime

    train_set = TensorExamples(data["train_x"], data["train_y"])
    model.load_state_dict(state)
    clock = time.perf_counter()
    result = sap_correct(model, train_set, config=SAPConfig(batch_size=500), evaluate_fn=_val(data), show_progress=False)
    index = torch.as_tensor(result.trusted_indices, dtype=torch.long)
    sap_state = copy.deepcopy(model.state_dict())
    audit = audit_labels(model, train_set, views="shift", runtime=Runtime(batch_size=1000, show_progress=False))
    rows = [dict(method=f"{prefix}sap", test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
                 val_accuracy=result.final_metrics["accuracy"], kind_alphas=result.kind_alphas,
                 purity=float((data["train_y"][index] == data["clean_y"][index]).float().mean()),
                 audit_ap=audit_ap(audit, data), audit_suspected=audit.num_suspected,
                 seconds=time.perf_counter() - clock, **fit_diagnostics(model, data))]
    for mode in modes:
        model.load_state_dict(sap_state)
        clock = time.perf_counter()
        config = RefineConfig(mode=mode, learning_rates=[args.lr, 2 * args.lr], epochs=args.refine_epochs)
        refined = refine(model, train_set, audit, _val(data), config, args=refine_arguments(args, seed, scratch),
                         runtime=Runtime(show_progress=False))
        after = audit_labels(model, train_set, views="shift", runtime=Runtime(batch_size=1000, show_progress=False))
        rows.append(dict(method=f"{prefix}sap+{mode}", test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
                         val_accuracy=refined.final_metrics["accuracy"], refine_mode=refined.mode, lr=refined.learning_rate,
                         refine_epochs=refined.epochs, cost_epochs=refined.cost_epochs, examples=refined.examples.get(mode),
                         audit_ap_after=audit_ap(after, data), seconds=time.perf_counter() - clock,
                         trials=[{"lr": t["learning_rate"], "epochs": t["epochs"], "val": round(t["metrics"]["accuracy"], 4)}
                                 for t in refined.trials], **fit_diagnostics(model, data)))
    model.load_state_dict(state)
    return rows


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
    base = {"label_set": label_set, "seed": seed, "noise_rate": float(data["is_noisy"].float().mean()),
            "train_epochs": args.epochs, "train_seconds": trained["seconds"]}
    last = copy.deepcopy(model.state_dict())
    rows = []
    model.load_state_dict(trained["best"]["state"])
    best = dict(base, method="best_epoch" if label_set != "oracle" else "oracle", best_epoch=trained["best"]["epoch"],
                test_accuracy=accuracy(model, data["test_x"], data["test_y"]), val_accuracy=trained["best"]["val_accuracy"],
                **fit_diagnostics(model, data))
    if label_set == "oracle":
        return {"rows": [best], "history": trained["history"], "seconds": time.perf_counter() - started, **task_key(task)}
    model.load_state_dict(last)
    rows.append(dict(base, method="none", test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
                     val_accuracy=trained["history"][-1], **fit_diagnostics(model, data)))
    rows.append(best)
    with tempfile.TemporaryDirectory() as scratch:
        rows += [dict(base, **r) for r in sap_and_cleanups(model, last, data, args, seed, "", args.modes, scratch)]
        if args.best_modes:
            rows += [dict(base, **r) for r in sap_and_cleanups(model, trained["best"]["state"], data, args, seed, "best+",
                                                               args.best_modes, scratch)]
    rows += default_cleanup_rows(rows)
    return {"rows": rows, "history": trained["history"], "seconds": time.perf_counter() - started, **task_key(task)}


def default_cleanup_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`sap+refine` / `best+sap+refine`: what `RefineConfig()` (mode="best") gives, the val-best of its modes' rows.

    `refine` tries the modes from the same start with the same seeds and keeps the first best on val, so this
    pick equals a `mode="best"` run; its cost is the sum of the modes' costs.
    """
    from sap_hf.audit.cleanup import BEST_MODES

    picked = []
    for prefix in ("", "best+"):
        tried = [r for mode in BEST_MODES for r in rows if r["method"] == f"{prefix}sap+{mode}"]
        if len(tried) == len(BEST_MODES):
            chosen = max(tried, key=lambda r: r["val_accuracy"])  # max keeps the first of equals, as refine does
            picked.append(dict(chosen, method=f"{prefix}sap+refine", chosen_mode=chosen["method"].rsplit("+", 1)[1],
                               cost_epochs=sum(r["cost_epochs"] for r in tried)))
    return picked


def trained_model(model: Any, data: dict[str, Any], label_set: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """`train_from_scratch` on the noisy (oracle: clean) labels, or its result from `--cache_dir`; model at its last epoch."""
    import torch

    keys = ("train_size", "val_size", "test_size", "hidden", "layers", "epochs", "lr", "warmup_epochs", "batch_size",
            "weight_decay")
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


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label set and method: test accuracy mean/std over seeds (oracle rows shared by every label set)."""
    summary: dict[str, Any] = {}
    oracle = [r["test_accuracy"] * 100 for r in rows if r["method"] == "oracle"]
    for label_set in dict.fromkeys(r["label_set"] for r in rows if r["label_set"] != "oracle"):
        methods: dict[str, Any] = {}
        for row in (r for r in rows if r["label_set"] == label_set):
            methods.setdefault(row["method"], []).append(row)
        cell = {m: {**mean_std(r["test_accuracy"] * 100 for r in rs),
                    **({"cost_epochs": mean_std(r["cost_epochs"] for r in rs)["mean"]} if "cost_epochs" in rs[0] else {}),
                    "noisy_fit": mean_std(r["noisy_fit"] for r in rs)["mean"]} for m, rs in methods.items()}
        if oracle:
            cell["oracle"] = mean_std(oracle)
        summary[label_set] = cell
    return summary


def targets(summary: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    """The issues' targets per label set: sap >= none - 0.5; the best clean-up >= best_epoch + 2 and >= 50% of the gap."""
    verdicts = {}
    for label_set, cell in summary.items():
        none, best = cell["none"]["mean"], cell["best_epoch"]["mean"]
        pipelines = {m: cell[m]["mean"] for m in cell if m.startswith(("sap+", "best+sap+"))}
        top = max(pipelines, key=pipelines.get) if pipelines else None
        gap = cell["oracle"]["mean"] - none if "oracle" in cell else None
        verdicts[label_set] = {
            "sap_minus_none": cell["sap"]["mean"] - none,
            "best_pipeline": top,
            "best_pipeline_minus_best_epoch": pipelines[top] - best if top else None,
            "gap_closed": (pipelines[top] - none) / gap if top and gap and gap > 0.5 else None,
        }
    return verdicts


def plot(summary: dict[str, Any], path: Path) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.2), squeeze=False)
    for axis, (label_set, cell) in zip(axes[0], summary.items()):
        names = [m for m in ("none", "best_epoch", "sap", *[k for k in cell if "+" in k], "oracle") if m in cell]
        means = [cell[m]["mean"] for m in names]
        axis.bar(range(len(names)), means, yerr=[cell[m]["std"] for m in names], capsize=3,
                 color=["grey", "tab:blue", "orange", *["tab:red"] * (len(names) - 4), "black"][: len(names)])
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_ylim(min(means) - 5, max(means) + 3)
        axis.set_title(f"CIFAR-10N {label_set}")
        axis.set_ylabel("clean test accuracy %")
    return save_figure(figure, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    tasks = [(s, seed, args) for seed in args.seeds for s in ("oracle", *args.label_sets)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(results: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for result in results for row in result["rows"]]
        summary = summarise(rows)
        config = {k: v for k, v in vars(args).items() if k not in ("jobs", "threads", "out")}
        return {"config": config, "environment": environment(), "rows": rows, "summary": summary,
                "targets": targets(summary, args.modes) if all("none" in c for c in summary.values()) else {},
                "cells": [{k: r[k] for k in ("label_set", "seed", "seconds", "history")} for r in results]}

    results = run_tasks(run_cell, tasks, args.jobs, on_result=lambda done: write_json(out, record(done)))
    final = record(results)
    write_json(out, final)
    figure = plot(final["summary"], out.with_suffix(".png")) if final["summary"] else None
    for label_set, cell in final["summary"].items():
        print(f"\nCIFAR-10N {label_set} (clean test %, {cell['none']['n']} seed(s))")
        for method, stats in cell.items():
            cost = f"  cost {stats['cost_epochs']:.1f} ep" if "cost_epochs" in stats else ""
            fit = f"  fit {stats['noisy_fit']:.2f}" if "noisy_fit" in stats else ""
            print(f"  {method:22s} {stats['mean']:5.1f} ± {stats['std']:.1f}{fit}{cost}")
    print(final["targets"], figure)
    return final


if __name__ == "__main__":
    main()
