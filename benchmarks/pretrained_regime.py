"""The pretrained regime's data and models, shared by `pretrained.py` and `defaults.py` (a support module, no main).

A tiny ViT pretrained with clean labels on five Fashion-MNIST classes (`PRETRAIN_CLASSES`), its backbone saved
with `save_pretrained`, then fine-tuned with a new head on the five other classes (`TASK_CLASSES`) with 40%
noisy labels (`NOISES`) for each of `--lengths` epochs; both cached by their arguments. The protocol:
benchmarks/studies/pretrained.md; `methods.sap_row` is one `sap_correct` row on such a model.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import fit_diagnostics, train_from_scratch


#: Fashion-MNIST classes the task uses (labels 0..4 in this order) and the ones pretraining uses.
TASK_CLASSES: tuple[int, ...] = (0, 2, 3, 4, 6)  # T-shirt/top, Pullover, Dress, Coat, Shirt
PRETRAIN_CLASSES: tuple[int, ...] = (1, 5, 7, 8, 9)  # Trouser, Sandal, Sneaker, Bag, Ankle boot
#: Asymmetric noise inside the task (task labels): T-shirt <-> Shirt, Pullover <-> Coat, Dress -> Coat.
TASK_ASYMMETRIC_MAP: dict[int, int] = {0: 4, 4: 0, 1: 3, 3: 1, 2: 3}
NOISES: dict[str, tuple[str, float]] = {
    "sym40": ("symmetric", 0.4),
    "asym40": ("asymmetric", 0.4),
    "inst40": ("instance", 0.4),
}
#: The arguments that define a fine-tuned model (its cache key).
FT_KEYS = ("train_size", "val_size", "lr", "warmup_share", "batch_size", "weight_decay")


def add_regime_arguments(parser: argparse.ArgumentParser) -> None:
    """The regime's data and training arguments (its sizes, noises, lengths, pretraining) on a `common.run_parser`."""
    parser.set_defaults(
        train_size=1000, val_size=1000, test_size=5000, ft_epochs=[1, 2, 5, 10, 20, 40], cache_dir=None
    )
    parser.add_argument("--noises", nargs="+", default=list(NOISES), choices=list(NOISES))
    parser.add_argument(
        "--lengths", nargs="+", type=int, default=[5, 20, 40], help="fine-tuning epochs (one run each)"
    )
    parser.add_argument(
        "--warmup_share",
        type=float,
        default=None,
        help="warm-up as a share of each fine-tuning run (default: the recipe's warmup_steps)",
    )
    parser.add_argument("--pretrain_size", type=int, default=10000)
    parser.add_argument("--pretrain_epochs", type=int, default=20)


#: `common.run_parser`'s options this regime sets from its own (per noise, per fine-tuning length): given, they would
#: be silently overwritten.
REPLACED_OPTIONS = {"--settings": "--noises", "--epochs": "--lengths", "--warmup_epochs": "--warmup_share"}


def reject_replaced_options(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> None:
    """A parser error naming the regime's option for each `REPLACED_OPTIONS` one given (`--settings sym40` would
    otherwise run every noise)."""
    given = sys.argv[1:] if argv is None else argv
    for option, instead in REPLACED_OPTIONS.items():
        if any(token == option or token.startswith(f"{option}=") for token in given):
            parser.error(f"{option} is not read in the pretrained regime: give {instead} instead")


def finish_regime_args(args: argparse.Namespace) -> argparse.Namespace:
    """The regime's defaults that depend on others (the recipe's warm-up) and its `--quick` sizes."""
    if args.warmup_share is None:
        args.warmup_share = float(common.recipe_settings().get("warmup_steps", 0.0))
    if args.quick:
        args.lengths, args.pretrain_size, args.pretrain_epochs = [2], 500, 1
    return args


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _source(split: str) -> Any:
    """One official split's arrays (`.images`, `.labels`), read once per process (no 60k-image Dataset built)."""
    from sap_hf.data import fashion_mnist_arrays

    images, labels = fashion_mnist_arrays(split)
    return argparse.Namespace(images=images, labels=labels)


def _tensors(images: Any, labels: Any) -> tuple[Any, Any]:
    return common.image_tensors({"image": list(images), "label": [int(v) for v in labels]})


def _task_labels(labels: Any, classes: tuple[int, ...]) -> Any:
    import numpy as np

    lookup = np.full(10, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    return lookup[labels]


def split_indices(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train / val positions in the official training set and test positions in the official test set (task
    classes only). Independent of the noise: every noise and the oracle of a seed see the same images."""
    import numpy as np

    from sap_hf.data import stratified_choice

    train_src, test_src = _source("train"), _source("test")
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.isin(train_src.labels, TASK_CLASSES))
    val = stratified_choice(pool, train_src.labels[pool], args.val_size, rng)
    rest = np.setdiff1d(pool, val, assume_unique=True)
    train = stratified_choice(rest, train_src.labels[rest], args.train_size, rng)
    test = np.flatnonzero(np.isin(test_src.labels, TASK_CLASSES))
    if args.test_size < len(test):
        test = np.sort(np.random.default_rng(1000 + seed).choice(test, size=args.test_size, replace=False))
    return {"train": train, "val": val, "test": test}


def load_task_data(noise: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The task's tensors in `common.load_run_data`'s shape (train_x, train_y noisy, clean_y, is_noisy, val_x, val_y,
    test_x, test_y); `noise` is a key of NOISES or 'clean' (the oracle's labels)."""
    import torch

    from sap_hf.data.noise import add_label_noise, cross_fitted_probabilities

    train_src, test_src = _source("train"), _source("test")
    index = split_indices(seed, args)
    clean = _task_labels(train_src.labels[index["train"]], TASK_CLASSES)
    noisy = clean.copy()
    if noise != "clean":
        noise_type, rate = NOISES[noise]
        extra: dict[str, Any] = {}
        if noise_type == "asymmetric":
            extra["asymmetric_map"] = TASK_ASYMMETRIC_MAP
        if noise_type == "instance":
            extra["probabilities"] = cross_fitted_probabilities(
                train_src.images[index["train"]], clean, len(TASK_CLASSES), seed=seed
            )
        noisy, _ = add_label_noise(
            clean, rate, noise_type=noise_type, num_classes=len(TASK_CLASSES), seed=seed, **extra
        )
    data: dict[str, Any] = {}
    data["train_x"], data["train_y"] = _tensors(train_src.images[index["train"]], noisy)
    data["clean_y"] = torch.as_tensor(clean, dtype=torch.long)
    data["is_noisy"] = data["train_y"] != data["clean_y"]
    data["val_x"], data["val_y"] = _tensors(
        train_src.images[index["val"]], _task_labels(train_src.labels[index["val"]], TASK_CLASSES)
    )
    data["test_x"], data["test_y"] = _tensors(
        test_src.images[index["test"]], _task_labels(test_src.labels[index["test"]], TASK_CLASSES)
    )
    return data


def class_names(classes: tuple[int, ...]) -> dict[int, str]:
    from sap_hf.data.fashion_mnist import FASHION_MNIST_CLASSES

    return {i: FASHION_MNIST_CLASSES[c] for i, c in enumerate(classes)}


# --------------------------------------------------------------------------------------------
# Pretraining and fine-tuning (cached)
# --------------------------------------------------------------------------------------------


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    common.quiet_libraries()
    hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar, once per model


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    return Path(args.out_dir) / ".pretrained_cache"  # quick runs: a private folder, never the shared cache


def pretrain_path(args: argparse.Namespace) -> Path:
    key = common.cache_key(
        {
            "size": args.pretrain_size,
            "epochs": args.pretrain_epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "patch_size": args.patch_size,
        }
    )
    return _cache_dir(args) / f"pretrained_{key}"


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """The backbone checkpoint (trained once, then read from the cache): its path and record."""
    import numpy as np
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.data import stratified_choice
    from sap_hf.models import tiny_vit_config

    path = pretrain_path(args)
    record_path = path / "pretraining.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    torch.set_num_threads(args.threads)
    _quiet()
    train_src, test_src = _source("train"), _source("test")
    rng = np.random.default_rng(12345)
    pool = np.flatnonzero(np.isin(train_src.labels, PRETRAIN_CLASSES))
    train = stratified_choice(pool, train_src.labels[pool], args.pretrain_size, rng)
    test = np.flatnonzero(np.isin(test_src.labels, PRETRAIN_CLASSES))[:2000]
    data: dict[str, Any] = {}
    data["train_x"], data["train_y"] = _tensors(
        train_src.images[train], _task_labels(train_src.labels[train], PRETRAIN_CLASSES)
    )
    data["val_x"], data["val_y"] = _tensors(
        test_src.images[test], _task_labels(test_src.labels[test], PRETRAIN_CLASSES)
    )
    pre_args = copy.copy(args)
    pre_args.epochs, pre_args.warmup_epochs = args.pretrain_epochs, args.warmup_share * args.pretrain_epochs
    torch.manual_seed(0)
    config = tiny_vit_config(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        patch_size=args.patch_size,
        num_labels=len(PRETRAIN_CLASSES),
        id2label=class_names(PRETRAIN_CLASSES),
    )
    model = ViTForImageClassification(config)
    trained = train_from_scratch(model, data, pre_args, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    model.vit.save_pretrained(path)  # the backbone only: a headless checkpoint, like ViT-in21k
    record = {
        "path": str(path),
        "classes": list(PRETRAIN_CLASSES),
        "train_images": int(len(train)),
        "epochs": args.pretrain_epochs,
        "final_accuracy_on_pretrain_test": trained["history"][-1],
        "history": trained["history"],
        "seconds": trained["seconds"],
    }
    common.write_json(record_path, record)
    return record


def finetune_path(noise: str, seed: int, epochs: int, args: argparse.Namespace) -> Path:
    key = common.cache_key({k: getattr(args, k) for k in FT_KEYS})
    return _cache_dir(args) / f"finetune_{noise}_seed{seed}_ep{epochs}_{key}_{pretrain_path(args).name}.pt"


def new_model(seed: int, args: argparse.Namespace) -> Any:
    """The pretrained backbone with a new 5-class head (seeded), through `from_pretrained`."""
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification.from_pretrained(
        pretrain_path(args),
        num_labels=len(TASK_CLASSES),
        id2label=class_names(TASK_CLASSES),
        label2id={v: k for k, v in class_names(TASK_CLASSES).items()},
    )


def finetuned(
    noise: str, seed: int, epochs: int, args: argparse.Namespace, data: Optional[dict] = None
) -> dict[str, Any]:
    """The fine-tuned model of (noise or 'clean', seed, epochs): `model` (final state), `trained` (history, best
    epoch and its state, seconds), `data`. Trained and cached on first use."""

    _quiet()
    data = data if data is not None else load_task_data(noise, seed, args)
    model = new_model(seed, args)
    ft_args = copy.copy(args)
    ft_args.epochs, ft_args.warmup_epochs = epochs, args.warmup_share * epochs
    trained = common.cached_training(
        finetune_path(noise, seed, epochs, args), model, lambda: train_from_scratch(model, data, ft_args, seed)
    )
    return {
        "data": data,
        "model": model,
        "trained": trained,
        "config": model.config,
        "train_set": common.TensorExamples(data["train_x"], data["train_y"]),
    }


def train_worker(task: tuple[str, int, int, argparse.Namespace]) -> dict[str, Any]:
    import torch

    noise, seed, epochs, args = task
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run = finetuned(noise, seed, epochs, args)
    fit = fit_diagnostics(run["model"], run["data"]) if noise != "clean" else {}
    print(
        f"[pretrained] fine-tuned {noise} seed {seed} {epochs} ep in {time.perf_counter() - start:.0f}s "
        f"(best epoch {run['trained']['best']['epoch']}, {fit})",
        flush=True,
    )
    return {"noise": noise, "seed": seed, "epochs": epochs, "seconds": run["trained"]["seconds"]}
