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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..runtime.batching import Collator, examples_and_collate, is_map_style
from ..runtime.checks import check_choice, finite_float, invalid, positive_float, positive_int
from ..runtime.contract import LoaderData, as_pass_data
from ..runtime.modeling import predict_logits
from ..runtime.passes import Runtime, resolve_runtime
from .labels import LabelAudit

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
        self.mode = check_choice("RefineConfig.mode", self.mode, REFINE_MODES)
        self.schedule = check_choice("RefineConfig.schedule", self.schedule, SCHEDULES)
        if self.learning_rates is not None:
            rates = [self.learning_rates] if np.ndim(self.learning_rates) == 0 else list(np.asarray(self.learning_rates).tolist())
            if not rates:
                raise invalid("RefineConfig.learning_rates", self.learning_rates, "give positive finite numbers, e.g. [1e-4, 3e-4].")
            self.learning_rates = [positive_float("RefineConfig.learning_rates", lr, "e.g. [1e-4, 3e-4].") for lr in rates]
        epochs = [self.epochs] if np.ndim(self.epochs) == 0 else list(self.epochs)
        if not epochs:
            raise invalid("RefineConfig.epochs", self.epochs, "give positive integers, e.g. [1, 2, 4, 8].")
        self.epochs = sorted({positive_int("RefineConfig.epochs", e, "e.g. [1, 2, 4, 8].") for e in epochs})
        threshold = finite_float("RefineConfig.relabel_threshold", self.relabel_threshold)
        if not 0.0 < threshold <= 1.0:
            raise invalid("RefineConfig.relabel_threshold", self.relabel_threshold, "use a probability in (0, 1].")
        self.relabel_threshold = threshold
        self.batch_size = positive_int("RefineConfig.batch_size", self.batch_size)
        self.weight_decay = finite_float("RefineConfig.weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise invalid("RefineConfig.weight_decay", self.weight_decay, "use a number >= 0.")

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
    check_choice("mode", mode, ("remove", "relabel"))
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
    runtime: Optional[Runtime] = None,
) -> None:
    """AdamW on the examples of `labels` (global index -> label); `on_checkpoint(epoch)` after each epoch in `epochs`.

    Every process walks the same global batches; each computes the summed loss of its share
    (`batch[rank::world]`) divided by the global batch size, and the gradients are all-reduced
    (SUM) once per step, so the update is the one-process update.
    """
    runtime = resolve_runtime(runtime)
    data, collate = examples_and_collate(as_pass_data(data, "train_data"), runtime.collate_fn)
    step = _Stepper(model, runtime, collate, labels, learning_rate, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    kept = sorted(labels)
    steps = max(epochs) * math.ceil(len(kept) / batch_size)
    if schedule == "cosine":
        step.schedule(lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    progress = tqdm(total=steps, desc=f"SAP refine (lr={learning_rate:g})", unit="step",
                    disable=not (runtime.show_progress and runtime.is_main))
    with progress:
        for epoch in range(1, max(epochs) + 1):
            model.train()
            order = [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()] if _indexable(data) else kept
            buffer: list[tuple[int, Any]] = []
            for item in _examples(data, labels, order):
                buffer.append(item)
                if len(buffer) == batch_size:
                    step(buffer)
                    buffer = []
                    progress.update(1)
            if buffer:
                step(buffer)
                progress.update(1)
            if epoch in set(epochs):
                on_checkpoint(epoch)


class _Stepper:
    """One optimiser step on a global batch: this process's share of the loss, gradients summed over processes."""

    def __init__(self, model: nn.Module, runtime: Runtime, collate: Collator, labels: Mapping[int, int],
                 learning_rate: float, weight_decay: float):
        self.model, self.runtime, self.collate, self.labels = model, runtime, collate, labels
        self.device = runtime.device(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.scheduler: Optional[Any] = None

    def schedule(self, factor: Callable[[int], float]) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def __call__(self, buffer: list[tuple[int, Any]]) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        share = buffer[self.runtime.rank :: self.runtime.world]
        if share:
            batch = self.collate([_with_label(example, self.labels[index]) for index, example in share])
            logits = predict_logits(self.model, batch, self.device)
            targets = torch.as_tensor([self.labels[index] for index, _ in share], device=logits.device)
            loss = F.cross_entropy(logits, targets, reduction="sum") / len(buffer)
            loss.backward()
        if self.runtime.world > 1:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = self.runtime.sum(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
                offset += g.numel()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def refine(
    model: nn.Module,
    train_data: Any,
    audit: LabelAudit,
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    config: Optional[RefineConfig] = None,
    *,
    runtime: Optional[Runtime] = None,
    metric: str = "accuracy",
    greater_is_better: bool = True,
) -> RefineResult:
    """Fine-tune `model` (the SAP-corrected one) on `train_data` cleaned by `audit`; lr and length by `evaluate_fn`.

    `audit` must come from `audit_labels(model, train_data)` (the indices are positions in
    `train_data`). `evaluate_fn(model) -> metrics` measures a clean validation split. The model
    is left at the best candidate; unchanged when no fine-tune beats it.
    """
    config = config or RefineConfig()
    runtime = resolve_runtime(runtime)
    base = runtime.unwrap(model)
    train_data = as_pass_data(train_data, "train_data")
    plans, examples = _plans(audit, train_data, config)
    start = copy.deepcopy(base.state_dict())
    baseline = dict(evaluate_fn(base))
    if metric not in baseline:  # before any training: a missing metric would otherwise fail after the first epoch
        raise ValueError(
            f"metric={metric!r} is not among the eval metrics {sorted(baseline)}: pass one of them as metric= "
            "(SAPTrainer: TrainingArguments.metric_for_best_model)."
        )
    best = _Best(baseline, metric, greater_is_better)
    trials: list[dict[str, Any]] = []
    try:
        for mode, lr in [(mode, lr) for mode in plans for lr in config.learning_rates]:
            base.load_state_dict(start)

            def checkpoint(epoch: int, mode: str = mode, lr: float = lr) -> None:
                metrics = dict(evaluate_fn(base))
                trials.append({"mode": mode, "learning_rate": lr, "epochs": epoch, "metrics": metrics})
                logger.info("SAP refine: mode=%s lr=%g epochs=%d -> %s=%.4f", mode, lr, epoch, metric, metrics[metric])
                best.offer(metrics, base, mode=mode, learning_rate=lr, epochs=epoch)

            train_epochs(
                base, train_data, plans[mode], learning_rate=lr, epochs=config.epochs, on_checkpoint=checkpoint,
                batch_size=config.batch_size, weight_decay=config.weight_decay, schedule=config.schedule, seed=config.seed,
                runtime=runtime,
            )
    except BaseException:
        base.load_state_dict(start)
        raise
    base.load_state_dict(best.state if best.state is not None else start)
    base.eval()
    if best.state is None:
        logger.warning("SAP refine: no fine-tune beat the corrected model on the eval set; the model is unchanged.")
    return RefineResult(baseline_metrics=baseline, final_metrics=best.metrics, examples=examples, trials=trials,
                        config=config.to_dict(), **best.choice)


class _Best:
    """The best candidate so far: "no change" (the baseline) until a fine-tune beats it on the eval metric."""

    def __init__(self, baseline: Mapping[str, float], metric: str, greater_is_better: bool):
        self.metric, self.sign = metric, 1.0 if greater_is_better else -1.0
        self.metrics = dict(baseline)
        self.choice: dict[str, Any] = {"mode": None, "learning_rate": None, "epochs": 0}
        self.state: Optional[dict[str, torch.Tensor]] = None

    def offer(self, metrics: Mapping[str, float], model: nn.Module, **choice: Any) -> None:
        if self.sign * float(metrics[self.metric]) > self.sign * float(self.metrics[self.metric]):
            self.metrics, self.choice = dict(metrics), choice
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _plans(audit: LabelAudit, train_data: Any, config: RefineConfig) -> tuple[dict[str, dict[int, int]], dict[str, dict[str, int]]]:
    """Per mode, the labels to train on (index -> label) and what it kept, removed and relabelled; raises on bad input."""
    if config.learning_rates is None:
        raise ValueError(
            "RefineConfig.learning_rates=None: refine() needs the learning rates to try, e.g. the training lr and twice it "
            "(RefineConfig(learning_rates=[2e-5, 4e-5])); SAPTrainer.refine fills them from TrainingArguments.learning_rate."
        )
    if len(audit) == 0:
        raise ValueError("The audit is empty: run audit_labels on the training data first.")
    size = len(train_data.dataset) if isinstance(train_data, LoaderData) else len(train_data) if _indexable(train_data) else None
    if size is not None and int(audit.indices.max()) >= size:
        raise ValueError(
            f"The audit covers example index {int(audit.indices.max())} but train_data has {size} examples: "
            "pass the audit of this train_data (audit_labels(model, train_data))."
        )
    modes = ["remove", "relabel"] if config.mode == "best" else [config.mode]
    plans = {mode: cleaned_labels(audit, mode, config.relabel_threshold) for mode in modes}
    if size is None:
        logger.warning(
            "SAP refine: train_data is a stream, so every epoch sees the kept examples in stream order (no shuffle). "
            "For shuffled epochs pass a map-style dataset (e.g. load it with streaming=False / --streaming false)."
        )
    given = dict(zip(audit.indices.tolist(), audit.given.tolist()))
    examples = {}
    for mode, labels in plans.items():
        if not labels:
            raise ValueError(
                f"mode={mode!r} leaves no training example ({audit.num_suspected} of {len(audit)} suspected); nothing to fine-tune on."
            )
        examples[mode] = {"kept": len(labels), "removed": len(audit) - len(labels),
                          "relabelled": sum(1 for i, y in labels.items() if given[i] != y)}
    if len(modes) == 2 and plans["relabel"] == plans["remove"]:
        # No suspect reaches relabel_threshold: 'relabel' would repeat every 'remove' run exactly.
        logger.info("SAP refine: no suspected label reaches relabel_threshold=%g; 'relabel' equals 'remove', trying it once.",
                    config.relabel_threshold)
        del plans["relabel"]
    return plans, examples
