"""CIFAR-10N: SAP and the clean-up after it on real human label noise (the benchmark of record).

    python benchmarks/cifar10n.py                       # label sets worse, random1, aggre; seeds 0-2
    python benchmarks/cifar10n.py --regime mae          # fine-tuned from a backbone pretrained without labels
    python benchmarks/cifar10n.py --quick               # smoke run: 200 images, 3 epochs, one seed, same data

The data: `--images` (a folder of CIFAR-10 parquet files or a Hub id) and `--labels` (CIFAR-N's CIFAR-10_human.pt),
by default the local copy under shared/data/cifar10n/ beside the checkout; the smoke test writes a tiny copy of
that layout (`sap_hf.data.cifar10n.write_tiny_cifar10n`).

The protocol, the regimes, the methods of each `--methods` group and the results: benchmarks/studies/cifar10n.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402
from audits import cross_validated_probs  # noqa: E402
from common import (  # noqa: E402
    environment,
    image_tensors,
    run_tasks,
    train_epochs,
    train_from_scratch,
    write_json,
)
from methods import SAP_VARIANTS, Cell, noisy_label_methods, run_methods  # noqa: E402
from peers import add_peer_arguments  # noqa: E402


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10n"
LABEL_SETS = ("worse", "random1", "aggre")
METHOD_GROUPS = ("core", "extra", "cleanlab", "defaults")
EXTRA_METHODS = ("refine", "finetune_trusted", "scrub")
#: `--methods core`'s registered methods (`methods.py`; `defaults`: its SAP_VARIANTS, `extra`: --extra_methods).
CORE_METHODS = ("none", "best_epoch", "cleanups")


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
    parser.add_argument("--regime", default="scratch", choices=["scratch", "mae"], help="see the module docstring")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["core", "extra", "cleanlab"],
        choices=(*METHOD_GROUPS, *noisy_label_methods()),
        help="groups, or methods registered in methods.py by name: core: none, best_epoch, oracle, sap and the"
        " clean-ups (the oracle cells, trained on the clean labels, come with core only); extra: refine,"
        " finetune_trusted, scrub; cleanlab: the audits against cleanlab's cross-validation; defaults: SAP_VARIANTS"
        " (not by default)",
    )
    parser.add_argument(
        "--extra_methods",
        nargs="+",
        default=list(EXTRA_METHODS),
        choices=EXTRA_METHODS,
        help="which of --methods extra's rows to run (e.g. one rerun with --merge)",
    )
    parser.add_argument("--cleanlab_sets", nargs="*", default=["worse"], help="label sets of the cleanlab audits")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv_epochs", type=int, default=None, help="each CV model's length (default: --epochs / 2)")
    parser.add_argument("--cv_warmup_epochs", type=float, default=1.0)
    parser.add_argument("--pretrain_epochs", type=int, default=80, help="mae: epochs over the unlabelled images")
    parser.add_argument("--pretrain_lr", type=float, default=1.5e-3)
    parser.add_argument("--pretrain_batch_size", type=int, default=256)
    parser.add_argument("--ft_lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3], help="finetune_trusted")
    parser.add_argument("--ft_epochs", nargs="+", type=int, default=[1, 2, 5, 10, 20, 40])
    parser.add_argument("--ft_batch_size", type=int, default=32)
    add_peer_arguments(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--val_size", type=int, default=1000)
    parser.add_argument("--test_size", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="training length (scratch 60, mae 30)")
    parser.add_argument("--lr", type=float, default=None, help="training lr (scratch 2e-3, mae 1e-3)")
    parser.add_argument("--warmup_epochs", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    common.add_cleanup_arguments(parser)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out",
        default=None,
        help="the result JSON (default cifar10n.json, mae: cifar10n_mae.json); a bare name goes to common.RESULTS_DIR",
    )
    parser.add_argument("--cache_dir", default=None, help="keep the trained models here (keyed by their settings)")
    parser.add_argument("--replot", action="store_true", help="table and figure from the recorded JSON, no runs")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few epochs, one seed")
    args = parser.parse_args(argv)
    scratch = args.regime == "scratch"
    args.epochs = args.epochs or (60 if scratch else 30)
    args.lr = args.lr or (2e-3 if scratch else 1e-3)
    args.out = args.out or ("cifar10n.json" if scratch else "cifar10n_mae.json")
    args.out = str(common.RESULTS_DIR / args.out) if Path(args.out).name == args.out else args.out
    if args.quick:
        args.train_size, args.val_size, args.test_size, args.epochs, args.seeds = 200, 100, 100, 3, args.seeds[:1]
        args.hidden, args.layers, args.refine_epochs, args.warmup_epochs = 32, 2, [1], 0.5
        args.pretrain_epochs, args.pretrain_images, args.folds, args.ft_epochs = 1, None, 2, [1]  # every copy image
    else:
        args.pretrain_images = None  # the whole training split of the copy
    args.cv_epochs = args.cv_epochs or max(1, args.epochs // 2)
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


def vit_config(args: argparse.Namespace) -> Any:
    """The tiny ViT of every cell: 32x32 RGB, 8x8 patches (16 tokens + CLS), `--hidden`, `--layers`."""
    from sap_hf.data.cifar10n import CIFAR10_CLASSES
    from sap_hf.models import tiny_vit_config

    return tiny_vit_config(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=10,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        id2label=dict(enumerate(CIFAR10_CLASSES)),
    )


def build_model(args: argparse.Namespace) -> Any:
    """A classifier from the current torch seed: random (scratch), or the MAE backbone with a new head (mae)."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(vit_config(args))
    if args.regime == "mae":
        import torch

        backbone = torch.load(args.backbone, weights_only=True)
        loaded = model.vit.load_state_dict(backbone, strict=False)
        if loaded.unexpected_keys or loaded.missing_keys:
            raise RuntimeError(f"the MAE encoder does not match the classifier's ViT: {loaded}")
    return model


def new_model(seed: int, args: argparse.Namespace) -> Any:
    import torch

    torch.manual_seed(seed)
    return build_model(args)


def mae_backbone(args: argparse.Namespace) -> Path:
    """The encoder of `ViTMAEForPreTraining` pretrained on the copy's unlabelled training images (cached file).

    Without `--cache_dir` (the smoke test) it is written to a temporary folder of this process."""
    import tempfile

    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from sap_hf.data import load_cifar10n

    keys = ("hidden", "layers", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "pretrain_images")
    name = "mae_" + "_".join(f"{k}={getattr(args, k)}" for k in keys) + ".pt"
    folder = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / f"cifar10n_mae_{os.getpid()}"
    path = folder / name
    if path.is_file():
        return path
    vit = vit_config(args)
    config = ViTMAEConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_hidden_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.intermediate_size,
        decoder_hidden_size=vit.hidden_size,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=vit.num_attention_heads,
        decoder_intermediate_size=2 * vit.hidden_size,
        mask_ratio=0.75,
        norm_pix_loss=True,
    )
    splits = load_cifar10n(
        args.images, args.labels, label_set="clean", train_size=args.pretrain_images, val_size=0, test_size=1, seed=0
    )
    pixels, _ = image_tensors(splits["train"], image_size=32, num_channels=3)  # labels never read
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config)
    history = pretrain_loop(model, pixels, args)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.vit.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    path.with_suffix(".json").write_text(json.dumps({"config": config.to_dict(), "images": len(pixels), **history}))
    return path


def pretrain_loop(model: Any, pixels: Any, args: argparse.Namespace) -> dict[str, Any]:
    """MAE's reconstruction loss, AdamW (weight decay 0.05, betas 0.9/0.95), warm-up then cosine; each batch flipped
    and shifted (`sap_hf.data.augment.weak_view`, seeded per image and epoch). Returns the loss per epoch."""
    import math

    import torch

    from sap_hf.data.augment import WEAK_DRAWS, hashed_uniform, weak_view

    batch, epochs = args.pretrain_batch_size, args.pretrain_epochs
    steps = epochs * math.ceil(len(pixels) / batch)
    warmup = max(1, steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
    )
    losses, totals, started = [], [0.0], time.perf_counter()

    def batch_loss(index: Any, epoch: int) -> Any:
        loss = model(pixel_values=weak_view(pixels[index], hashed_uniform(index, epoch, WEAK_DRAWS))).loss
        totals[-1] += float(loss.detach()) * len(index)
        return loss

    def log_epoch(epoch: int) -> None:
        losses.append(round(totals[-1] / len(pixels), 4))
        totals.append(0.0)
        print(f"[cifar10n] MAE epoch {epoch + 1}/{epochs}: loss {losses[-1]}", flush=True)

    train_epochs(
        model,
        len(pixels),
        batch,
        batch_loss,
        optimizer,
        generator=torch.Generator().manual_seed(0),
        epochs=range(epochs),
        schedule=schedule,
        on_epoch=log_epoch,
    )
    return {"loss": losses, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def method_names(label_set: str, args: argparse.Namespace) -> list[str]:
    """The registered methods (`methods.METHODS`) of one cell: the oracle cell's, or `--methods`' (its groups' in
    `METHOD_GROUPS` order, then the methods it names)."""
    if label_set == "oracle":  # trained on the clean labels: its val-best epoch, and the clean-up's fine-tuning
        return ["oracle", "oracle+refine"]
    extra = [name for name in EXTRA_METHODS if name in args.extra_methods]
    groups = {"core": CORE_METHODS, "extra": extra, "defaults": list(SAP_VARIANTS)}
    named = [name for group in METHOD_GROUPS if group in args.methods for name in groups.get(group, [])]
    return list(dict.fromkeys(named + [name for name in args.methods if name not in METHOD_GROUPS]))


def run_cell(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    """Every method's rows for one (label set, seed); `oracle` for label set 'oracle' (trained on the clean labels)."""
    import torch

    label_set, seed, args = task
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet_libraries()
    started = time.perf_counter()
    data = load_data("worse" if label_set == "oracle" else label_set, seed, args)  # oracle: trained on clean_y
    model = new_model(seed, args)
    trained = trained_model(model, data, label_set, seed, args)
    base = {
        "label_set": label_set,
        "seed": seed,
        "regime": args.regime,
        "noise_rate": float(data["is_noisy"].float().mean()),
        "train_epochs": args.epochs,
        "train_seconds": trained["seconds"],
    }
    cell = Cell(
        model, copy.deepcopy(model.state_dict()), trained, data, args, seed, clean_labels=label_set == "oracle"
    )
    rows = [dict(base, **row) for row in run_methods(cell, method_names(label_set, args))]
    cleanlab = label_set != "oracle" and "cleanlab" in args.methods and label_set in args.cleanlab_sets
    audits = [dict(base, **r) for r in audit_rows(cell.sap, data, args, seed)] if cleanlab else []
    return dict(
        label_set=label_set,
        seed=seed,
        rows=rows,
        audits=audits,
        history=trained["history"],
        seconds=time.perf_counter() - started,
    )


def audit_rows(sap: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, seed: int) -> list[dict]:
    """The SAP audit (`sap_row`) and cleanlab on `args.folds`-fold cross-validated probabilities: AP and seconds."""
    from sklearn.metrics import average_precision_score

    from sap_hf.audit.scores import label_quality_scores

    clock = time.perf_counter()
    cv = cross_validated_probs(data, lambda: build_model(args), args, seed)
    suspicion = -label_quality_scores(cv["probs"], data["train_y"], "self_confidence", use_cleanlab=True)
    cv_seconds = time.perf_counter() - clock
    truth = data["is_noisy"].numpy()
    folds_epochs = cv["samples_trained"] / len(data["train_y"])
    return [
        dict(
            method="sap_audit",
            audit_ap=sap["row"]["audit_ap"],
            seconds=sap["row"]["seconds"],
            base_rate=float(truth.mean()),
        ),
        dict(
            method=f"cleanlab_cv{args.folds}",
            audit_ap=float(average_precision_score(truth, suspicion.double().numpy())),
            seconds=cv_seconds,
            cost_epochs=folds_epochs,
            fold_best_epochs=cv["fold_best_epochs"],
            base_rate=float(truth.mean()),
        ),
    ]


def trained_model(
    model: Any, data: dict[str, Any], label_set: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """`train_from_scratch` on the noisy (oracle: clean) labels, or its result from `--cache_dir`; model at its last
    epoch. The mae regime's names add the backbone's settings."""

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
    regime = [] if args.regime == "scratch" else [Path(args.backbone).stem]
    key = "_".join([*regime, label_set, str(seed), common.cache_key({k: getattr(args, k) for k in keys})])
    if label_set == "oracle":
        data = dict(data, train_y=data["clean_y"])
    path = Path(args.cache_dir) / f"{key}.pt" if args.cache_dir else None
    trained = common.cached_training(path, model, lambda: train_from_scratch(model, data, args, seed))
    trained.pop("cached", None)
    return trained


# --------------------------------------------------------------------------------------------
# Summary, table, figure
# --------------------------------------------------------------------------------------------


def summarised(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its summary, targets and audit summary computed again from its rows."""
    summary = report.summarise(record["rows"], ("label_set",), shared="oracle")
    return dict(
        record,
        summary=summary,
        targets=report.gap_targets(summary, 1),
        audit_summary=audit_summary(record.get("audits", [])),
    )


def audit_summary(audits: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label set: each audit's mean AP and seconds, and the issue's target (the SAP audit's AP >= cleanlab's
    cross-validation's, at <= 1/5 of its seconds)."""
    out: dict[str, Any] = {}
    for label_set in dict.fromkeys(r["label_set"] for r in audits):
        cell: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in audits if r["label_set"] == label_set):
            group = [r for r in audits if r["label_set"] == label_set and r["method"] == method]
            cell[method] = {
                "audit_ap": report.mean_std(r["audit_ap"] for r in group),
                "seconds": report.mean_std(r["seconds"] for r in group)["mean"],
                "base_rate": group[0]["base_rate"],
            }
        cleanlab = next((m for m in cell if m.startswith("cleanlab")), None)
        if cleanlab and "sap_audit" in cell:
            ap_gap = cell["sap_audit"]["audit_ap"]["mean"] - cell[cleanlab]["audit_ap"]["mean"]
            cost = cell["sap_audit"]["seconds"] / cell[cleanlab]["seconds"]
            cell["target"] = {"ap_minus_cleanlab": ap_gap, "cost_ratio": cost, "met": ap_gap >= 0 and cost <= 0.2}
        out[label_set] = cell
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    label_sets = ("oracle", *args.label_sets) if "core" in args.methods else tuple(args.label_sets)
    tasks = [(s, seed, args) for seed in args.seeds for s in label_sets]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "CIFAR-10N" + (" (MAE backbone)" if args.regime == "mae" else "")

    def record(results: list[dict[str, Any]]) -> dict[str, Any]:
        config = {k: v for k, v in vars(args).items() if k not in ("jobs", "threads", "out", "cache_dir", "replot")}
        return {
            "config": config,
            "environment": environment(),
            "rows": [row for result in results for row in result["rows"]],
            "audits": [row for result in results for row in result["audits"]],
            "cells": [{k: r[k] for k in ("label_set", "seed", "seconds", "history")} for r in results],
        }

    def merged(new: dict[str, Any], old: Optional[dict[str, Any]]) -> dict[str, Any]:
        if old is None:
            return summarised(new)
        combined = dict(old, merged=[*old.get("merged", []), new["config"]], cells=old["cells"] + new["cells"])
        for part in ("rows", "audits"):
            ids = {(r["label_set"], r["seed"], r["method"]) for r in new[part]}
            kept = [r for r in old.get(part, []) if (r["label_set"], r["seed"], r["method"]) not in ids]
            combined[part] = kept + new[part]
        return summarised(combined)

    if args.replot:  # summary, targets, table and figure again from the recorded rows
        final = summarised(json.loads(out.read_text()))
        write_json(out, final)
    else:
        if args.regime == "mae":
            args.backbone = str(mae_backbone(args))  # once, before the workers start
        previous = json.loads(out.read_text()) if args.merge and out.is_file() else None
        results = run_tasks(
            run_cell, tasks, args.jobs, on_result=lambda done: write_json(out, merged(record(done), previous))
        )
        final = merged(record(results), previous)
        write_json(out, final)
    report.print_tables(out)
    print(json.dumps({"targets": final["targets"], "audits": final["audit_summary"]}, indent=1))
    report.bars(final["summary"], out.with_suffix(".png"), title)
    return final


if __name__ == "__main__":
    main()
