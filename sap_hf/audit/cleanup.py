"""Clean-up after SAP (`refine`): fine-tune the corrected model on the training data without its wrong labels.

SAP removes memorised noise but uses no labels, so it stops short of a model trained on clean
data. The corrected model's label audit (`sap_hf.audit`) says which training labels are wrong;
`refine` fine-tunes the corrected model on the training data with those examples removed
(`mode="remove"`), or relabelled to the corrected model's prediction where it is confident
and removed otherwise (`mode="relabel"`); `mode="best"` tries both. The learning rate and the
length are chosen on a clean validation split, and "no change" (the SAP model) stays a candidate,
so refine never hands back a model worse on validation than the one it started from.

Training is a plain AdamW loop. With several processes every process takes the same global
batches (same shuffle), computes the loss of its share of each batch, and the gradients are
summed once per step: the update equals a one-process run's, with no padded duplicates.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import default_data_collator
from transformers.utils import logging

from .labels import LabelAudit
from ..runtime.batching import Collator, batch_labels, is_map_style, process_layout
from ..core.stats import forward_pixels, model_device, unwrap

logger = logging.get_logger(__name__)

REFINE_MODES: tuple[str, ...] = ("remove", "relabel", "best")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass
class RefineConfig:
    """Configuration of the clean-up fine-tune after SAP (`refine`)."""

    mode: str = field(
        default="best",
        metadata={
            "help": (
                "'remove': drop the suspected examples. 'relabel': give a suspected example the corrected model's "
                "predicted class when its probability is >= relabel_threshold, drop it otherwise. 'best' (default): "
                "try both and keep the one better on the eval set."
            )
        },
    )
    learning_rates: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": (
                "Learning rates tried (AdamW); the eval set picks one. None: SAPTrainer.refine uses its "
                "TrainingArguments.learning_rate x 1 and x 2 (the benchmark's best: refine at or above the training lr, "
                "cosine); sap_hf.refine() needs them given."
            )
        },
    )
    epochs: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 6, 8],
        metadata={"help": "Epochs after which the eval set is measured; the largest is the run length. Epoch 0 (no change) is a candidate."},
    )
    relabel_threshold: float = field(
        default=0.9,
        metadata={"help": "mode='relabel': relabel a suspected example when the corrected model gives its predicted class at least this probability."},
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule of each run: 'cosine' (decay to 0 over the largest of `epochs`) or 'constant'."},
    )
    batch_size: int = field(default=64, metadata={"help": "Global training batch size (split across processes)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffling."})

    def __post_init__(self) -> None:
        if self.mode not in REFINE_MODES:
            raise ValueError(f"RefineConfig.mode={self.mode!r} is invalid: choose one of {list(REFINE_MODES)}.")
        if isinstance(self.learning_rates, (int, float)):
            self.learning_rates = [self.learning_rates]
        if isinstance(self.epochs, int):
            self.epochs = [self.epochs]
        if self.learning_rates is not None:
            self.learning_rates = [float(lr) for lr in self.learning_rates]
        if self.learning_rates is not None and (not self.learning_rates or any(not math.isfinite(lr) or lr <= 0 for lr in self.learning_rates)):
            raise ValueError(f"RefineConfig.learning_rates={self.learning_rates!r} is invalid: give positive finite numbers, e.g. [1e-4, 3e-4].")
        if not self.epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in self.epochs):
            raise ValueError(f"RefineConfig.epochs={self.epochs!r} is invalid: give positive integers, e.g. [1, 2, 4, 8].")
        self.epochs = sorted(set(self.epochs))
        if isinstance(self.relabel_threshold, bool) or not isinstance(self.relabel_threshold, (int, float)) or not 0.0 < self.relabel_threshold <= 1.0:
            raise ValueError(f"RefineConfig.relabel_threshold={self.relabel_threshold!r} is invalid: use a probability in (0, 1].")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RefineConfig.schedule={self.schedule!r} is invalid: choose one of {list(SCHEDULES)}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"RefineConfig.batch_size={self.batch_size!r} is invalid: use a positive integer.")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"RefineConfig.weight_decay={self.weight_decay!r} is invalid: use a number >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RefineResult:
    """What the clean-up did: the chosen mode, lr and length, how many labels it removed or changed, every trial."""

    mode: Optional[str]
    learning_rate: Optional[float]
    epochs: int
    baseline_metrics: dict[str, float]
    final_metrics: dict[str, float]
    examples: dict[str, dict[str, int]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.epochs > 0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), changed=self.changed)


def cleaned_labels(audit: LabelAudit, mode: str, relabel_threshold: float = 0.9) -> dict[int, int]:
    """Global index -> label to train on; indices absent are dropped.

    'remove' keeps every unsuspected example with its label; 'relabel' also keeps the suspected
    examples the corrected model is confident about (probability of its prediction >= threshold),
    with the predicted label.
    """
    if mode not in ("remove", "relabel"):
        raise ValueError(f"mode={mode!r} is invalid here: choose 'remove' or 'relabel'.")
    keep = ~audit.suspected
    labels = audit.given.clone()
    if mode == "relabel":
        confident = audit.suspected & (audit.probs.max(1).values >= relabel_threshold)
        labels[confident] = audit.predicted[confident]
        keep = keep | confident
    return {int(i): int(y) for i, y, k in zip(audit.indices.tolist(), labels.tolist(), keep.tolist()) if k}


def _indexable(data: Any) -> bool:
    """Examples reachable by position (a map-style dataset, or a list/tuple of examples): shuffled each epoch."""
    return is_map_style(data) or isinstance(data, (list, tuple))


def _examples(data: Any, labels: Mapping[int, int], order: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """(global index, example) for the kept examples, in `order` (indexable data) or stream order."""
    if _indexable(data):
        for index in order:
            yield index, data[index]
        return
    for position, example in enumerate(data):
        if position in labels:
            yield position, example


def _with_label(example: Any, label: int) -> Any:
    example = dict(example)
    example.pop("label", None)
    example["labels"] = label
    return example


def train_epochs(
    model: nn.Module,
    data: Any,
    labels: Mapping[int, int],
    *,
    learning_rate: float,
    epochs: Sequence[int],
    on_checkpoint: Callable[[int], None],
    batch_size: int = 32,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    seed: int = 0,
    accelerator: Any = None,
    collate_fn: Optional[Collator] = None,
    show_progress: bool = True,
) -> None:
    """AdamW on the examples of `labels` (global index -> label); `on_checkpoint(epoch)` after each epoch in `epochs`.

    Every process walks the same global batches; each computes the summed loss of its share
    (`batch[rank::world]`) divided by the global batch size, and the gradients are all-reduced
    (SUM) once per step, so the update is the one-process update.
    """
    collate = collate_fn or default_data_collator
    rank, world = process_layout(accelerator)
    device = model_device(model, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    kept = sorted(labels)
    checkpoints = set(epochs)
    steps = max(epochs) * math.ceil(len(kept) / batch_size)
    scheduler = None
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    progress = tqdm(total=steps, desc=f"SAP refine (lr={learning_rate:g})", unit="step", disable=not (show_progress and rank == 0))
    with progress:
        for epoch in range(1, max(epochs) + 1):
            model.train()
            order = [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()] if _indexable(data) else kept
            buffer: list[tuple[int, Any]] = []
            for item in _examples(data, labels, order):
                buffer.append(item)
                if len(buffer) == batch_size:
                    _step(model, optimizer, buffer, labels, collate, device, rank, world, accelerator)
                    buffer = []
                    _advance(scheduler, progress)
            if buffer:
                _step(model, optimizer, buffer, labels, collate, device, rank, world, accelerator)
                _advance(scheduler, progress)
            if epoch in checkpoints:
                on_checkpoint(epoch)


def _advance(scheduler: Optional[Any], progress: tqdm) -> None:
    if scheduler is not None:
        scheduler.step()
    progress.update(1)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, buffer: list[tuple[int, Any]], labels: Mapping[int, int],
          collate: Collator, device: torch.device, rank: int, world: int, accelerator: Any) -> None:
    optimizer.zero_grad(set_to_none=False)
    share = buffer[rank::world]
    if share:
        batch = collate([_with_label(example, labels[index]) for index, example in share])
        output = forward_pixels(model, batch, device)
        logits = output.logits if hasattr(output, "logits") else output
        loss = F.cross_entropy(logits.float(), batch_labels(batch).to(logits.device), reduction="sum") / len(buffer)
        loss.backward()
    if world > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
    optimizer.step()


def refine(
    model: nn.Module,
    train_data: Any,
    audit: LabelAudit,
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    config: Optional[RefineConfig] = None,
    accelerator: Any = None,
    *,
    metric: str = "accuracy",
    greater_is_better: bool = True,
    collate_fn: Optional[Collator] = None,
    show_progress: bool = True,
) -> RefineResult:
    """Fine-tune `model` (the SAP-corrected one) on `train_data` cleaned by `audit`; lr and length by `evaluate_fn`.

    `audit` must come from `audit_labels(model, train_data)` (the indices are positions in
    `train_data`). `evaluate_fn(model) -> metrics` measures a clean validation split. The model
    is left at the best candidate; unchanged when no fine-tune beats it.
    """
    config = config or RefineConfig()
    if config.learning_rates is None:
        raise ValueError(
            "RefineConfig.learning_rates=None: refine() needs the learning rates to try, e.g. the training lr and twice it "
            "(RefineConfig(learning_rates=[2e-5, 4e-5])); SAPTrainer.refine fills them from TrainingArguments.learning_rate."
        )
    base = unwrap(model, accelerator)
    if len(audit) == 0:
        raise ValueError("The audit is empty: run audit_labels on the training data first.")
    if _indexable(train_data) and int(audit.indices.max()) >= len(train_data):
        raise ValueError(
            f"The audit covers example index {int(audit.indices.max())} but train_data has {len(train_data)} examples: "
            "pass the audit of this train_data (audit_labels(model, train_data))."
        )
    modes = ["remove", "relabel"] if config.mode == "best" else [config.mode]
    plans = {mode: cleaned_labels(audit, mode, config.relabel_threshold) for mode in modes}
    if not _indexable(train_data):
        logger.warning(
            "SAP refine: train_data is a stream, so every epoch sees the kept examples in stream order (no shuffle). "
            "For shuffled epochs pass a map-style dataset (e.g. load it with streaming=False / --streaming false)."
        )
    examples = {}
    given = dict(zip(audit.indices.tolist(), audit.given.tolist()))
    for mode, labels in plans.items():
        if not labels:
            raise ValueError(
                f"mode={mode!r} leaves no training example ({audit.num_suspected} of {len(audit)} suspected); nothing to fine-tune on."
            )
        examples[mode] = {
            "kept": len(labels),
            "removed": len(audit) - len(labels),
            "relabelled": sum(1 for i, y in labels.items() if given[i] != y),
        }

    if len(modes) == 2 and plans["relabel"] == plans["remove"]:
        # No suspect reaches relabel_threshold: 'relabel' would repeat every 'remove' run exactly.
        logger.info("SAP refine: no suspected label reaches relabel_threshold=%g; 'relabel' equals 'remove', trying it once.",
                    config.relabel_threshold)
        modes = ["remove"]

    def score(metrics: Mapping[str, float]) -> float:
        value = float(metrics[metric])
        return value if greater_is_better else -value

    start = copy.deepcopy(base.state_dict())
    baseline = dict(evaluate_fn(base))
    if metric not in baseline:  # before any training: a missing metric would otherwise fail after the first epoch
        raise ValueError(
            f"metric={metric!r} is not among the eval metrics {sorted(baseline)}: pass one of them as metric= "
            "(SAPTrainer: TrainingArguments.metric_for_best_model)."
        )
    best = {"mode": None, "learning_rate": None, "epochs": 0, "metrics": baseline, "state": None}
    trials: list[dict[str, Any]] = []
    try:
        for mode in modes:
            for lr in config.learning_rates:
                base.load_state_dict(start)

                def checkpoint(epoch: int, mode: str = mode, lr: float = lr) -> None:
                    metrics = dict(evaluate_fn(base))
                    trials.append({"mode": mode, "learning_rate": lr, "epochs": epoch, "metrics": metrics})
                    logger.info("SAP refine: mode=%s lr=%g epochs=%d -> %s=%.4f", mode, lr, epoch, metric, metrics[metric])
                    if score(metrics) > score(best["metrics"]):
                        best.update(mode=mode, learning_rate=lr, epochs=epoch, metrics=metrics,
                                    state={k: v.detach().clone() for k, v in base.state_dict().items()})

                train_epochs(
                    base, train_data, plans[mode], learning_rate=lr, epochs=config.epochs, on_checkpoint=checkpoint,
                    batch_size=config.batch_size, weight_decay=config.weight_decay, schedule=config.schedule, seed=config.seed,
                    accelerator=accelerator, collate_fn=collate_fn, show_progress=show_progress,
                )
    except BaseException:
        base.load_state_dict(start)
        raise
    base.load_state_dict(best["state"] if best["state"] is not None else start)
    base.eval()
    if best["state"] is None:
        logger.warning("SAP refine: no fine-tune beat the corrected model on the eval set; the model is unchanged.")
    return RefineResult(
        mode=best["mode"],
        learning_rate=best["learning_rate"],
        epochs=best["epochs"],
        baseline_metrics=baseline,
        final_metrics=best["metrics"],
        examples=examples,
        trials=trials,
        config=config.to_dict(),
    )
