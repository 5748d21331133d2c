"""Evaluation on a clean eval set, exact across processes (no padded duplicates).

Two entry points on the same sharded pass (each process reads, decodes and scores only its shard):

* `evaluate_accuracy`: accuracy, summed over processes; `sap_correct`'s evaluation when no
  `Trainer` is around.
* `eval_predictions`: every sample's predictions and label, gathered once and put back in a
  process-count-independent order, plus the mean cross-entropy; `SAPTrainer` computes its
  `compute_metrics` on them (`sap_hf.trainer.evaluation`), so that a streaming eval set is not read
  whole by the main process for every evaluation (what `Trainer.evaluate` does with a stream) while
  the others wait.

Samples labelled -100 (the transformers ignore index) are not counted; any other label outside
the model's classes is an error, since a label-mapping bug would otherwise read as "SAP does not help".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .core.targets import check_classifier
from .runtime.contract import IGNORE_INDEX
from .runtime.passes import Runtime, resolve_runtime


EvalFn = Callable[[nn.Module], dict[str, float]]
Preprocess = Callable[[torch.Tensor, torch.Tensor], Any]
"""`Trainer.preprocess_logits_for_metrics`: `(logits, labels) -> predictions`, applied per batch before the gather."""

_NO_LABELS = "The eval data has no labelled sample (empty, or every label is -100): pass a clean labelled eval set."


def evaluate_accuracy(model: nn.Module, data: Any, *, runtime: Optional[Runtime] = None) -> dict[str, float]:
    """`{"accuracy": correct / total, "samples": total}` over every labelled example of `data` exactly once."""
    output = eval_predictions(model, data, runtime=resolve_runtime(runtime, batch_size=64, show_progress=False))
    labelled = output.label_ids != IGNORE_INDEX
    correct = (output.predictions.argmax(-1) == output.label_ids)[labelled]
    return {"accuracy": float(correct.sum() / labelled.sum()), "samples": output.samples}


def accuracy_evaluator(data: Any, runtime: Optional[Runtime] = None) -> EvalFn:
    """Bind `evaluate_accuracy` to one eval set: the `evaluate_fn` an alpha search calls."""
    return lambda model: evaluate_accuracy(model, data, runtime=runtime)


@dataclass
class EvalPredictions:
    """What `Trainer.evaluate` would hand `compute_metrics`, and its loss, for the whole eval set.

    `predictions`: float32 logits `(samples, classes)` (or what `preprocess` made of them: an array,
    or a tuple of arrays); `label_ids`: int64, -100 kept where a sample is unlabelled, as Trainer
    gives them. Rows are in the data's order for positions (map-style data, lists, DataLoaders) and
    in sorted-key order for a keyed stream: a stream split by shards cannot tell its rows' original
    interleaving, and sorted keys are the same order for any number of processes.
    `loss`: the mean cross-entropy of the logits over the labelled samples (see `eval_predictions`);
    `losses`: each sample's cross-entropy (0 where unlabelled); `inputs`: each sample's `pixel_values`
    (only with `with_inputs=True`: what `include_for_metrics=["inputs"]` hands `compute_metrics`).
    """

    predictions: Union[np.ndarray, tuple[np.ndarray, ...], None]
    label_ids: np.ndarray
    loss: float
    samples: int
    losses: Optional[np.ndarray] = None
    inputs: Optional[np.ndarray] = None


def eval_predictions(
    model: nn.Module,
    data: Any,
    *,
    runtime: Optional[Runtime] = None,
    preprocess: Optional[Preprocess] = None,
    with_predictions: bool = True,
    with_inputs: bool = False,
) -> EvalPredictions:
    """Every sample's predictions and label, gathered once from all processes; the mean cross-entropy.

    Each process reads and scores only its own shard (one `Runtime.run` pass); one gather then moves
    the predictions (small next to the images), so the result equals a one-process run. The loss is
    plain cross-entropy on the logits whatever loss the model or a `compute_loss_func` would compute,
    averaged over labelled samples (-100 ignored) rather than over batches: with -100 labels in the
    set, `Trainer.evaluate`'s `eval_loss` (a mean of batch means weighted by batch size) differs from it,
    and a batch-weighted mean would also depend on how the set is split across processes.
    `with_predictions=False` gathers only labels and losses (`prediction_loss_only`); `with_inputs=True`
    gathers each sample's `pixel_values` too.
    """
    runtime = resolve_runtime(runtime, batch_size=64, show_progress=False)
    num_labels = check_classifier(runtime.unwrap(model))
    shard = _Shard(preprocess, with_predictions, with_inputs)
    with runtime.run(model, data, "evaluation", argument="eval data", description="SAP eval") as walk:
        for batch in walk.batches():
            labels, _ = walk.require_labels(batch, num_labels, "an evaluation (alpha search, refine)")
            shard.add(batch.ids, walk.logits(batch), labels, batch.pixel_values if with_inputs else None)
    return shard.merge(runtime.gather(shard.arrays()))


class _Shard:
    """One process's share of `eval_predictions`: per-batch parts, concatenated once for the gather."""

    def __init__(self, preprocess: Optional[Preprocess], with_predictions: bool, with_inputs: bool = False):
        self.preprocess, self.with_predictions, self.with_inputs = preprocess, with_predictions, with_inputs
        self.inputs: list[torch.Tensor] = []
        self.ids: list[Any] = []
        self.predictions: list[tuple[torch.Tensor, ...]] = []
        self.labels: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def add(self, ids: list[Any], logits: torch.Tensor, labels: torch.Tensor, inputs: Optional[torch.Tensor]) -> None:
        on_device = labels.to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits.double(), on_device, ignore_index=IGNORE_INDEX, reduction="none"
        )
        self.ids.extend(ids)
        self.labels.append(labels.cpu())
        self.losses.append(losses.cpu())
        if self.with_predictions:
            predictions = logits.float() if self.preprocess is None else self.preprocess(logits, on_device)
            self.predictions.append(_tensors(predictions, len(ids)))
        if inputs is not None:
            self.inputs.append(inputs.detach().cpu())

    def arrays(self) -> tuple[list[Any], Optional[list[torch.Tensor]], torch.Tensor, torch.Tensor, Any]:
        """This shard as one tensor per field (what is gathered; -100 losses are 0; inputs None unless kept)."""
        predictions = [torch.cat(parts) for parts in zip(*self.predictions)] if self.predictions else None
        empty = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        labels = torch.cat(self.labels) if self.labels else empty[0]
        inputs = torch.cat(self.inputs) if self.inputs else None
        return self.ids, predictions, labels, torch.cat(self.losses) if self.losses else empty[1], inputs

    def merge(self, shards: list[tuple]) -> EvalPredictions:
        """Every process's shard (process order) in one identity order: the same for any number of processes."""
        ids = [identity for shard in shards for identity in shard[0]]
        order = torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), dtype=torch.long)
        labels = torch.cat([shard[2] for shard in shards])[order]
        losses = torch.cat([shard[3] for shard in shards])[order]
        labelled = labels != IGNORE_INDEX
        if not labelled.any():
            raise ValueError(_NO_LABELS)
        predictions = None
        parts = [shard[1] for shard in shards if shard[1] is not None]
        if self.with_predictions and parts:
            merged = [torch.cat(field)[order].numpy() for field in zip(*parts)]
            predictions = merged[0] if len(merged) == 1 else tuple(merged)
        inputs = [shard[4] for shard in shards if shard[4] is not None]
        loss = float(losses[labelled].sum() / labelled.sum())
        return EvalPredictions(
            predictions=predictions,
            label_ids=labels.numpy(),
            loss=loss,
            samples=int(labelled.sum()),
            losses=losses.numpy(),
            inputs=torch.cat(inputs)[order].numpy() if self.with_inputs and inputs else None,
        )


def _tensors(predictions: Any, rows: int) -> tuple[torch.Tensor, ...]:
    """`preprocess`'s output as CPU tensors with one row per sample (a tensor, or a tuple/list of them).

    Rows are reordered after the gather, so each part must have exactly one row per sample of the batch.
    """
    parts = tuple(predictions) if isinstance(predictions, (tuple, list)) else (predictions,)
    if not parts or not all(
        isinstance(part, torch.Tensor) and part.dim() > 0 and part.shape[0] == rows for part in parts
    ):
        raise ValueError(
            f"preprocess_logits_for_metrics returned {_describe(predictions)} for a batch of {rows} samples; SAP's shared "
            "evaluation gathers per-sample rows: return a tensor (or a tuple of tensors) with one row per sample."
        )
    return tuple(part.detach().cpu() for part in parts)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(_describe(v) for v in value) or 'nothing'}"
    return f"a {type(value).__name__}"
