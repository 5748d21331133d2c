"""What the benchmark scripts share: data as tensors, training loops, the trained-model cache, reporting.

The scripts under `benchmarks/` import this module as `common` (Python puts a script's own folder
first on `sys.path`, so `python benchmarks/<script>.py` finds it without installing anything).
Everything here is general: a new benchmark should find its data loading, its training loop, its
evaluation and its JSON/PNG/table writing here instead of copying them.

Sections:
  - the recipe     `recipe_settings` (recipes/configs/default.yaml as a mapping) and `recipe_sap_config`
                   (its SAPConfig keys as a `SAPConfig`): the benchmarks' recipe settings come from the
                   YAML, never from copies, so changing the recipe changes the benchmarks
  - command line   `run_parser` (the arguments of every (setting, seed) study) and `finish_args`
  - data           `load_run_data` (noisy Fashion-MNIST as tensors), `image_tensors`, `TensorExamples`
  - models         `predict`, `accuracy`, `fit_diagnostics`, `train_from_scratch`, `finetune_grid`,
                   `prepare_run` (the memorised model of one (setting, seed), cached by its training
                   arguments), `cache_path`
  - running        `run_tasks` (one process per (setting, seed) task)
  - reporting      `pyplot`, `write_json`, `environment`, `loadavg`,
                   `rebound_library_names` (no benchmark monkeypatches the library)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Protocol


ROOT = Path(__file__).resolve().parents[1]
#: The committed results (what the study pages' tables read).
COMMITTED_RESULTS = ROOT / "benchmarks" / "results"


def results_dir(argv: Sequence[str]) -> Path:
    """Where a study run with `argv` writes by default: the committed folder, but a smoke run (`--quick`) writes to
    benchmarks/results/quick/ (git-ignored), so it never replaces a committed result; SAP_BENCHMARKS_OUT names
    another folder for either."""
    quick = "--quick" in argv
    return Path(os.environ.get("SAP_BENCHMARKS_OUT") or (COMMITTED_RESULTS / "quick" if quick else COMMITTED_RESULTS))


#: This process's `results_dir` (its command line).
RESULTS_DIR = results_dir(sys.argv[1:])
#: The embedded recipe (`sap-hf recipe` without --config): the source of every "recipe" setting below.
RECIPE_CONFIG = ROOT / "recipes" / "configs" / "default.yaml"
if str(ROOT) not in sys.path:  # the scripts import sap_hf from this checkout when run from anywhere
    sys.path.insert(1, str(ROOT))
from report import mean_std, pyplot, save_figure  # noqa: E402, F401  (the studies' reporting lives in report.py)


#: Noise settings of the Fashion-MNIST studies: name -> (sap_hf.data.noise noise_type, noise rate).
SETTINGS: dict[str, tuple[str, float]] = {"sym40": ("symmetric", 0.4), "asym40": ("asymmetric", 0.4)}
#: The alpha grid of the studies (`--alphas`).
DEFAULT_ALPHAS: tuple[float, ...] = (1, 3, 10, 20, 30, 50, 100, 200, 300, 500, 1e3, 3e3, 1e4, 1e5)
#: The paper's SAP settings, which were `SAPConfig`'s defaults until the defaults became the recipe's
#: (benchmarks/README.md, "Defaults"): `sap_correct(config=SAPConfig(**PAPER_SAP))` reproduces the rows
#: recorded as `sap_defaults` before then (now `sap_paper`).
PAPER_SAP: dict[str, Any] = dict(
    selection_rule="loss",
    trusted_per_class=100,
    alpha_scope="shared",
    alphas=[1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7],
    accumulation_dtype="float32",
)
#: The arguments that define a trained model: the cache key of `prepare_run` (order and format are
#: part of the cached file names; changing them orphans every cached model).
TRAINING_KEYS: tuple[str, ...] = (
    "train_size",
    "val_size",
    "test_size",
    "epochs",
    "lr",
    "warmup_epochs",
    "batch_size",
    "weight_decay",
    "hidden_size",
    "num_layers",
    "patch_size",
)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def recipe_settings(path: Path = RECIPE_CONFIG) -> dict[str, Any]:
    """The recipe's YAML as a mapping (read on every call: a changed file changes the next benchmark run)."""
    import yaml

    settings = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    return settings


def recipe_sap_config(path: Path = RECIPE_CONFIG, **overrides: Any) -> Any:
    """The recipe's `SAPConfig`: the YAML's keys that are SAPConfig fields (the others keep SAPConfig's defaults),
    then `overrides` (a benchmark's own choices, e.g. a larger batch_size); what `sap-hf recipe` corrects with."""
    import dataclasses

    from sap_hf import SAPConfig

    fields = {f.name for f in dataclasses.fields(SAPConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"recipe_sap_config: {unknown} are no SAPConfig fields.")
    settings = {k: v for k, v in recipe_settings(path).items() if k in fields}
    return SAPConfig(**{**settings, **overrides})


def recipe_training(path: Path = RECIPE_CONFIG) -> dict[str, Any]:
    """The recipe's training settings under `run_parser`'s names (train_size, ..., lr, warmup_epochs, batch_size,
    weight_decay). `warmup_steps` below 1 is a share of the training (transformers' convention): x epochs."""
    settings = recipe_settings(path)
    epochs = settings["num_train_epochs"]
    warmup = settings.get("warmup_steps", 0)
    if warmup >= 1:
        raise ValueError(f"{path}: warmup_steps={warmup} counts optimiser steps; the benchmarks need a share (< 1).")
    return {
        "train_size": settings["train_size"],
        "val_size": settings["val_size"],
        "test_size": settings["test_size"],
        "epochs": epochs,
        "lr": float(settings["learning_rate"]),
        "warmup_epochs": round(warmup * epochs, 6),
        "batch_size": settings["per_device_train_batch_size"],
        "weight_decay": float(settings.get("weight_decay", 0.0)),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def run_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every (setting, seed) study shares: data, training, alphas, fine-tuning, workers.

    The data and training defaults are the recipe's (`recipe_training`); the model (hidden 64, 4 layers,
    patch 7) is `sap_hf.models.tiny_vit_config`'s, which the recipe uses too.

    Add the script's own arguments to it, parse, then call `finish_args` (which applies `--quick`).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", "--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, few epochs, one seed")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    recipe = recipe_training()  # the defaults are the recipe's training (recipes/configs/default.yaml)
    parser.add_argument("--train_size", type=int, default=recipe["train_size"])
    parser.add_argument("--val_size", type=int, default=recipe["val_size"])
    parser.add_argument("--test_size", type=int, default=recipe["test_size"])
    parser.add_argument("--epochs", type=int, default=recipe["epochs"])
    parser.add_argument("--lr", type=float, default=recipe["lr"])
    parser.add_argument("--warmup_epochs", type=float, default=recipe["warmup_epochs"])
    parser.add_argument("--batch_size", type=int, default=recipe["batch_size"])
    parser.add_argument("--weight_decay", type=float, default=recipe["weight_decay"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=7)
    parser.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS))
    parser.add_argument("--ft_lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument(
        "--ft_epochs",
        nargs="+",
        type=int,
        default=[1, 2, 5, 10, 20, 40, 80, 160],
        help="fine-tuning checkpoints evaluated on val (the last one is the run length)",
    )
    parser.add_argument("--ft_batch_size", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one (setting, seed) run each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--cache_dir", default=None, help="save/reuse the trained models here (keyed by the training arguments)"
    )
    parser.add_argument("--no_plot", action="store_true")
    return parser


#: The training-dynamics audits (`--audits`): how many of the first epochs' margins each averages, from the val-best
#: epoch (None: every epoch). Wrong labels are learned late, once the model starts to memorise: past the val-best
#: epoch every margin rises, so the epochs before that rank them better (`dynamics_diagnostics`); but the mixture
#: then flags far more images, and the clean-up is worse (studies/cleanup.md, "Which epochs to average").
DYNAMICS_WINDOWS: dict[str, Callable[[int], Optional[int]]] = {
    "aum": lambda best: None,
    "aum2best": lambda best: 2 * best,
    "aum2best_k": lambda best: 2 * best,
}
#: Audits that rank by their window but flag as many images as the every-epoch mixture does (the early window's
#: ranking with `aum`'s count).
COUNT_FROM_EVERY_EPOCH = ("aum2best_k",)


def add_audits_argument(parser: argparse.ArgumentParser) -> None:
    """`--audits`: which suspects the clean-up studies' clean-ups use (`methods.sap_and_cleanups`, pretrained.py)."""
    parser.add_argument(
        "--audits",
        nargs="+",
        default=["shift"],
        choices=["shift", *DYNAMICS_WINDOWS],
        help="the clean-ups' suspects: the SAP model's audit (shift) and/or the training's margins averaged over "
        "every epoch (aum: rows ...@aum) or up to twice the val-best epoch (aum2best: rows ...@aum2best; aum2best_k: "
        "as many flagged as aum flags)",
    )


def add_cleanup_arguments(parser: argparse.ArgumentParser) -> None:
    """The clean-up studies' arguments (`methods.cleanups` reads them): the modes from the last and the val-best
    model, with and without augmentation, the audits, the length grid and the batch."""
    modes = ["remove", "relabel", "soft", "pseudo"]
    parser.add_argument("--modes", nargs="+", default=["remove", "soft", "pseudo"], choices=modes)
    parser.add_argument(
        "--augment",
        nargs="+",
        type=int,
        default=[1],
        choices=[0, 1],
        help="RefineConfig.augment values of the sap+<mode> rows (0: rows named sap+<mode>-noaug)",
    )
    parser.add_argument(
        "--best_modes", nargs="*", default=["remove", "pseudo"], choices=modes, help="modes of best+sap+<mode>"
    )
    add_audits_argument(parser)
    parser.add_argument("--refine_epochs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--refine_batch_size", type=int, default=64)


def finish_args(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Apply `--quick` to the shared arguments (one seed unless `--seeds` is given, tiny data, short grids)."""
    if args.quick:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.train_size, args.val_size, args.test_size = 400, 200, 300
        args.epochs, args.warmup_epochs = 3, 1
        args.alphas = [1.0, 100.0, 1e4]
        args.ft_lrs, args.ft_epochs = [1e-3], [1, 2]
        args.jobs = 1
    return args


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def image_tensors(split: Any, image_size: int = 28, num_channels: int = 1) -> tuple[Any, Any]:
    """Images -> one normalised (N, C, S, S) float tensor via the recipe's ImageTransform, and the labels.

    Done ONCE per split, so the plain torch loops of the benchmarks never touch PIL again.
    """
    import torch

    from sap_hf.data import ImageTransform

    transform = ImageTransform(image_size=image_size, num_channels=num_channels)
    out = transform({"image": split["image"], "label": split["label"]})
    return torch.stack(out["pixel_values"]), torch.tensor(out["labels"], dtype=torch.long)


class TensorExamples:
    """A map-style dataset of `{"pixel_values", "labels"}` over pre-made tensors (what the SAP API reads)."""

    def __init__(self, pixels: Any, labels: Any):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[index], "labels": int(self.labels[index])}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def select(self, indices: Any) -> TensorExamples:
        import torch

        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorExamples(self.pixels[index], self.labels[index])


def load_run_data(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Noisy Fashion-MNIST of one (setting, seed) as tensors.

    Keys: `train_x`, `train_y` (noisy labels), `clean_y` (hidden clean labels: for reporting only),
    `is_noisy`, `val_x`, `val_y`, `test_x`, `test_y` (clean). Sizes from `args.train_size`,
    `args.val_size`, `args.test_size`; the validation images are carved from the official training
    set, disjoint from train.
    """
    import torch

    from sap_hf.data import noisy_fashion_mnist

    noise_type, rate = SETTINGS[setting]
    splits = noisy_fashion_mnist(
        noise_rate=rate,
        noise_type=noise_type,
        seed=seed,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
    )
    data: dict[str, Any] = {}
    data["train_x"], data["train_y"] = image_tensors(splits["train"])
    data["clean_y"] = torch.tensor(splits["train"]["clean_label"], dtype=torch.long)
    data["is_noisy"] = data["train_y"] != data["clean_y"]
    data["val_x"], data["val_y"] = image_tensors(splits["validation"])
    data["test_x"], data["test_y"] = image_tensors(splits["test"])
    return data


# --------------------------------------------------------------------------------------------
# Models: evaluation, training, fine-tuning, the trained-model cache
# --------------------------------------------------------------------------------------------


class BatchLoss(Protocol):
    """A training loss for `train_from_scratch` / `finetune_grid`.

    Called as `loss_fn(logits, labels, indices=..., epoch=...)`: `indices` are the batch's positions
    in the training tensors (for losses that keep per-sample state), `epoch` counts from 1. Keyword
    arguments on purpose: a plain `F.cross_entropy` passed by mistake fails loudly instead of reading
    the indices as class weights.
    """

    def __call__(self, logits: Any, labels: Any, *, indices: Any, epoch: int) -> Any: ...


def cross_entropy(logits: Any, labels: Any, *, indices: Any = None, epoch: int = 0) -> Any:
    """The default `BatchLoss`: mean cross-entropy on the given labels."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels)


def predict(model: Any, pixels: Any, batch_size: int = 1000) -> Any:
    """Predicted class of every image (eval mode, no grad, batches of `batch_size`)."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model(pixel_values=pixels[i : i + batch_size]).logits.argmax(-1)
                for i in range(0, len(pixels), batch_size)
            ]
        )


def accuracy(model: Any, pixels: Any, labels: Any) -> float:
    return float((predict(model, pixels) == labels).float().mean())


def fit_diagnostics(model: Any, data: dict[str, Any]) -> dict[str, float]:
    """How much of the noise the model still fits (`noisy_fit`), and how much of the clean training labels (`clean_fit`)."""
    pred = predict(model, data["train_x"])
    noisy = data["is_noisy"]
    return {
        "noisy_fit": float((pred[noisy] == data["train_y"][noisy]).float().mean()) if noisy.any() else float("nan"),
        "clean_fit": float((pred[~noisy] == data["train_y"][~noisy]).float().mean()),
    }


def val_metric(data: dict[str, Any]) -> Callable[[Any], dict[str, float]]:
    """The `evaluate_fn` of the studies' SAP and clean-up runs: clean validation accuracy."""
    return lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])}


def train_epochs(
    model: Any,
    size: int,
    batch_size: int,
    batch_loss: Callable[[Any, int], Any],
    optimizer: Any,
    *,
    generator: Any,
    epochs: Iterable[int],
    schedule: Any = None,
    on_epoch: Optional[Callable[[int], None]] = None,
) -> None:
    """The benchmarks' one training loop: for each epoch of `epochs`, train mode, a fresh permutation of the `size`
    examples drawn from `generator` (None: in order, for data the caller has shuffled, such as a stream), batches of
    `batch_size`, `batch_loss(index, epoch)` backpropagated, an optimiser step (and `schedule.step()`) per batch, then
    `on_epoch(epoch)`. What differs between the studies (the loss, the data, the views, the optimiser and schedule,
    what happens after an epoch) is the caller's."""
    import torch

    for epoch in epochs:
        model.train()
        order = torch.arange(size) if generator is None else torch.randperm(size, generator=generator)
        for i in range(0, size, batch_size):
            loss = batch_loss(order[i : i + batch_size], epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        if on_epoch is not None:
            on_epoch(epoch)


def train_from_scratch(
    model: Any, data: dict[str, Any], args: argparse.Namespace, seed: int, loss_fn: Optional[BatchLoss] = None
) -> dict[str, Any]:
    """Plain AdamW loop on pre-made tensors; clean-val accuracy after every epoch, best state kept.

    Linear warm-up over `args.warmup_epochs` then cosine decay to 0 over `args.epochs`; batches of
    `args.batch_size`, `args.lr`, `args.weight_decay`, no augmentation. `loss_fn` (a `BatchLoss`)
    defaults to cross-entropy on the noisy labels. Returns `{"history": val accuracy per epoch,
    "best": {"val_accuracy", "epoch", "state"}, "margins": (epochs, examples) label margins (`label_margins`) of
    every training example in every epoch, from the logits it trained on, "seconds"}`; the model is left at its
    final state.
    """
    import torch

    from sap_hf.audit.scores import label_margins

    loss_fn = loss_fn or cross_entropy
    x, y = data["train_x"], data["train_y"]
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history, best = [], {"val_accuracy": -1.0, "epoch": 0, "state": None}
    margins = torch.zeros(args.epochs, len(x))  # each example's margin in each epoch: the training-dynamics audit

    def batch_loss(index: Any, epoch: int) -> Any:
        logits = model(pixel_values=x[index]).logits
        margins[epoch - 1, index] = label_margins(logits, y[index])
        return loss_fn(logits, y[index], indices=index, epoch=epoch)

    def after_epoch(epoch: int) -> None:
        nonlocal best
        val = accuracy(model, data["val_x"], data["val_y"])
        history.append(round(val, 4))
        if val > best["val_accuracy"]:
            best = {"val_accuracy": val, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}

    start = time.perf_counter()
    train_epochs(
        model,
        len(x),
        args.batch_size,
        batch_loss,
        optimizer,
        generator=torch.Generator().manual_seed(seed),
        epochs=range(1, args.epochs + 1),
        schedule=schedule,
        on_epoch=after_epoch,
    )
    return {"history": history, "best": best, "margins": margins, "seconds": time.perf_counter() - start}


def finetune_grid(
    model: Any,
    state: dict,
    x: Any,
    y: Any,
    data: dict[str, Any],
    args: argparse.Namespace,
    seed: int,
    loss_fn: Optional[BatchLoss] = None,
) -> dict[str, Any]:
    """Fine-tune every parameter on (x, y) for each lr of `args.ft_lrs`; evaluate val at each `args.ft_epochs`.

    AdamW without weight decay, constant lr, batches of `args.ft_batch_size`. "No change" (epoch 0)
    is a candidate. Returns the val-best (lr, epochs) with its test accuracy, and every candidate's
    val accuracy (`grid`), and the chosen model's `fit_diagnostics` when `data` has `is_noisy`. The model is left
    at the original `state`. `loss_fn` as in
    `train_from_scratch` (its `indices` index into x/y).
    """
    import torch

    loss_fn = loss_fn or cross_entropy
    model.load_state_dict(state)  # "no change" is `state`, whatever the model held before the call
    base_val = accuracy(model, data["val_x"], data["val_y"])
    best = {"lr": None, "epochs": 0, "val_accuracy": base_val, "state": None}
    grid = []
    checkpoints = set(args.ft_epochs)
    batch = min(args.ft_batch_size, len(x))
    for lr in args.ft_lrs:
        model.load_state_dict(state)

        def checkpoint(epoch: int, lr: float = lr) -> None:
            nonlocal best
            if epoch in checkpoints:
                val = accuracy(model, data["val_x"], data["val_y"])
                grid.append({"lr": lr, "epochs": epoch, "val_accuracy": round(val, 4)})
                if val > best["val_accuracy"]:
                    best = {"lr": lr, "epochs": epoch, "val_accuracy": val, "state": copy.deepcopy(model.state_dict())}

        train_epochs(
            model,
            len(x),
            batch,
            lambda index, epoch: loss_fn(model(pixel_values=x[index]).logits, y[index], indices=index, epoch=epoch),
            torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0),
            generator=torch.Generator().manual_seed(seed),
            epochs=range(1, max(args.ft_epochs) + 1),
            on_epoch=checkpoint,
        )
    model.load_state_dict(best["state"] if best["state"] is not None else state)
    test = accuracy(model, data["test_x"], data["test_y"])
    fit = fit_diagnostics(model, data) if "is_noisy" in data else {}
    model.load_state_dict(state)
    return {
        "lr": best["lr"],
        "epochs": best["epochs"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": test,
        "grid": grid,
        **fit,
    }


def refine_arguments(output_dir: str, batch_size: int, seed: int, schedule: str = "cosine") -> Any:
    """The `TrainingArguments` of the benchmarks' clean-up runs (`sap_hf.refine`): AdamW without weight decay or
    warm-up, `schedule` over each run, batches of `batch_size`, on the CPU, nothing reported."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type=schedule,
        weight_decay=0.0,
        seed=seed,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )


def cache_key(values: dict[str, Any]) -> str:
    """The part of a cached model's file name that says how it was trained: `k=v` joined by `_` (floats as `:g`)."""
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def cached_training(path: Optional[Path], model: Any, train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`train()`'s record (history, best state, seconds) with `model` at its last state: read from `path` when a run
    with the same key saved it there (`cached`: True), else trained and saved there (through a temporary file, so
    a run cut short never leaves half a model). The one model cache of the benchmarks; `path` None: not cached."""
    import torch

    if path is not None and path.is_file():
        record = torch.load(path, weights_only=False)
        model.load_state_dict(record.pop("final_state"))
        return dict(record, cached=True)
    record = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(record, final_state=model.state_dict()), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return record


def cache_path(setting: str, seed: int, args: argparse.Namespace, tag: Optional[str] = None) -> Optional[Path]:
    """Where `prepare_run` keeps the trained model of (setting, seed), or None without `args.cache_dir`.

    The name holds every training argument (`TRAINING_KEYS`), so a model is reused only by a run that
    would train it identically. `tag` (e.g. a loss name) is appended for models trained differently;
    without it the name is the one every existing cache uses.
    """
    if not getattr(args, "cache_dir", None):
        return None
    suffix = f"_{tag}" if tag else ""
    key = cache_key({k: getattr(args, k) for k in TRAINING_KEYS})
    return Path(args.cache_dir) / f"{setting}_seed{seed}_{key}{suffix}.pt"


def quiet_libraries() -> None:
    """Transformers and sap_hf log errors only ("no alpha improved ..." is expected in the studies, and recorded)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("sap_hf").setLevel(logging.ERROR)


def prepare_run(
    setting: str,
    seed: int,
    args: argparse.Namespace,
    loss_fn: Optional[BatchLoss] = None,
    cache_tag: Optional[str] = None,
) -> dict[str, Any]:
    """Data tensors, the memorised model (final state) and the best-val checkpoint of one (setting, seed).

    The model is a tiny ViT (`sap_hf.models.tiny_vit_config` with `args.hidden_size`,
    `args.num_layers`, `args.patch_size`) trained by `train_from_scratch` from `torch.manual_seed(seed)`.
    With `args.cache_dir` the trained states are saved there (`cache_path`) and reloaded on the next
    call, so several benchmarks study the same models without training them again. A `loss_fn` other
    than cross-entropy needs a `cache_tag` naming it (else the model is not cached).

    Returns `data`, `train_set` (TensorExamples of the noisy training set), `config`, `model`,
    `early_model` (the best-val checkpoint), `trained` (`train_from_scratch`'s record), `timing`,
    `started`, `noise_type`, `noise_rate`.
    """
    import torch

    torch.set_num_threads(args.threads)
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    quiet_libraries()
    started = time.perf_counter()
    noise_type, rate = SETTINGS[setting]
    data = load_run_data(setting, seed, args)
    timing: dict[str, Any] = {"data": time.perf_counter() - started}

    config = tiny_vit_config(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, patch_size=args.patch_size
    )
    cache = cache_path(setting, seed, args, cache_tag) if (loss_fn is None or cache_tag) else None
    model = ViTForImageClassification(config)
    if cache is None or not cache.is_file():  # a model trained here starts from the seed
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    trained = cached_training(cache, model, lambda: train_from_scratch(model, data, args, seed, loss_fn=loss_fn))
    if trained.pop("cached", False):
        timing["train_cached"] = True  # "train" below is then the cached run's training time
    timing["train"] = trained["seconds"]
    early_model = ViTForImageClassification(config)
    early_model.load_state_dict(trained["best"]["state"])
    return {
        "data": data,
        "train_set": TensorExamples(data["train_x"], data["train_y"]),
        "config": config,
        "model": model,
        "early_model": early_model,
        "trained": trained,
        "timing": timing,
        "started": started,
        "noise_type": noise_type,
        "noise_rate": rate,
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_tasks(
    worker: Callable[[Any], Any],
    tasks: Sequence[Any],
    jobs: int,
    on_result: Optional[Callable[[list[Any]], None]] = None,
) -> list[Any]:
    """`[worker(t) for t in tasks]`, in `jobs` fresh ("spawn") processes when jobs > 1 and there is more than one task.

    One task per process (`maxtasksperchild=1`) so no memory or thread state leaks between runs;
    `worker` must be a module-level function (picklable). `on_result(results so far)` is called after each
    task as it finishes (e.g. to write partial results: a long run cut short keeps what it finished).
    """
    results: list[Any] = []
    if jobs > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)), maxtasksperchild=1) as pool:
            for result in pool.imap_unordered(worker, tasks) if on_result else pool.imap(worker, tasks):
                results.append(result)
                if on_result:
                    on_result(list(results))
        return results
    for task in tasks:
        results.append(worker(task))
        if on_result:
            on_result(list(results))
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def write_json(path: Path, record: Any, indent: int = 1) -> Path:
    """Write `record` as JSON through a temporary file (an interrupted run never leaves half a file). A smoke run's
    record (`--quick` on the command line, or `config.quick`) is refused among the committed results."""
    path = Path(path)
    quick = "--quick" in sys.argv[1:] or (isinstance(record, dict) and (record.get("config") or {}).get("quick"))
    committed = path.resolve().parent == COMMITTED_RESULTS.resolve()
    if quick and committed:
        raise ValueError(
            f"a --quick run would write {path} among the committed results: give --out_dir / --out another folder "
            f"(by default a smoke run writes to {COMMITTED_RESULTS / 'quick'})."
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=indent, default=float) + "\n")
    tmp.replace(path)
    return path


def loadavg() -> Optional[list[float]]:
    """The 1/5/15-minute load averages (None where the OS does not give them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Python, machine, CPU count and the torch/transformers versions (what a results file should record)."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def rebound_library_names() -> list[str]:
    """Names of the loaded `sap_hf` modules (and of their classes) bound to code from `benchmarks/`: a monkeypatch.

    The benchmarks time the library through its public hooks (`on_phase`, `SAPResult.timings`) and
    benchmark-side code (subclasses, copies of a loop); they never rebind a library name, so this is []
    after any benchmark run. A function counts as benchmark code when its source file is under benchmarks/.
    """
    import inspect

    bench = os.path.realpath(ROOT / "benchmarks") + os.sep

    def in_benchmarks(filename: Optional[str]) -> bool:  # "<string>" (dataclass-made methods) is no file
        return bool(filename) and not filename.startswith("<") and os.path.realpath(filename).startswith(bench)

    def from_benchmarks(value: Any) -> bool:
        value = getattr(value, "__func__", value)  # staticmethod / classmethod
        code = getattr(value, "__code__", None)
        if code is not None:
            return in_benchmarks(code.co_filename)
        if inspect.isclass(value):
            return in_benchmarks(getattr(sys.modules.get(value.__module__), "__file__", None))
        return False

    found = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] != "sap_hf":
            continue
        for name, value in list(vars(module).items()):
            if from_benchmarks(value):
                found.append(f"{module_name}.{name}")
            elif inspect.isclass(value) and value.__module__.split(".")[0] == "sap_hf":
                found += [
                    f"{module_name}.{name}.{attr}"
                    for attr, member in list(vars(value).items())
                    if from_benchmarks(member)
                ]
    return sorted(set(found))
