"""Trusted-sample selection: the k lowest-loss samples of each class, in one streaming pass.

A trained model fits correctly-labelled samples better than mislabelled ones, so the samples
with the smallest cross-entropy against their (noisy) label are very likely clean. Memory is
bounded by `num_classes * k` candidates (one max-heap per class); with several processes each
scores its own shard, candidates are gathered once, and every process keeps the same merge.
Ties are broken by sample identity (position, or the `key` of a keyed stream), so the result does
not depend on the number of processes. For a stream, the candidates' examples are kept with them
(a few hundred raw rows per class), so the statistics pass reads them instead of the stream again.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..runtime.batching import Collator, batch_labels, gather_shards, is_map_style, iter_shard_batches, num_examples
from .config import SELECTION_RULES
from .stats import forward_pixels, inference_mode, model_device

logger = logging.get_logger(__name__)


@dataclass
class TrustedSelection:
    """Identities of the trusted samples (sorted) and what each class contributed.

    `indices` are positions in the selection data, or the examples' `key` for a keyed stream.
    `examples` (streams only) are the trusted examples themselves, as the stream gave them (before
    `collate_fn`), so their statistics need no second read of the stream; None for map-style data.
    """

    indices: list[Any]
    labels: list[int]
    losses: list[float]
    per_class: dict[int, int] = field(default_factory=dict)
    examples: Optional[list[Any]] = None

    def __len__(self) -> int:
        return len(self.indices)


SHIFT_FRACTION = 1 / 28
"""'shift_loss' shifts by `max(1, round(SHIFT_FRACTION * side))` pixels: 1 pixel at 28x28, 8 at 224x224."""


def shifted_views(pixels: torch.Tensor) -> list[torch.Tensor]:
    """The batch moved by a few pixels right, left, down and up (edges replicated, size unchanged).

    A network that memorised a mislabelled image fits its exact pixels: moved by a pixel or two,
    the image is usually predicted as its true class again, whereas a correctly labelled image keeps
    its label. So the loss averaged over these views separates clean from memorised samples far
    better than the plain loss of a model that fits every training label.
    """
    height, width = pixels.shape[-2:]
    step = max(1, round(SHIFT_FRACTION * min(height, width)))
    if step >= min(height, width):
        return []
    x = pixels if pixels.is_floating_point() else pixels.float()

    def pad(left: int, right: int, top: int, bottom: int) -> torch.Tensor:
        return F.pad(x, (left, right, top, bottom), mode="replicate")

    return [
        pad(step, 0, 0, 0)[..., :, :width],  # right
        pad(0, step, 0, 0)[..., :, step:],  # left
        pad(0, 0, step, 0)[..., :height, :],  # down
        pad(0, 0, 0, step)[..., step:, :],  # up
    ]


def _flipped_view(pixels: torch.Tensor) -> list[torch.Tensor]:
    return [pixels.flip(-1)]


EXTRA_VIEWS = {"shift_loss": shifted_views, "agreement": _flipped_view}
"""Rules that average the loss over the image and extra views of it."""


def sample_scores(model: nn.Module, batch: dict[str, Any], labels: torch.Tensor, device: torch.device, rule: str) -> torch.Tensor:
    """Per-sample score (lower = more trustworthy). `inf` marks a sample the rule rejects.

    'shift_loss' and 'agreement' average the loss over the image and its `EXTRA_VIEWS`;
    'agreement' also rejects a sample unless every view predicts its label.
    """
    logits = _logits(forward_pixels(model, batch, device))
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    if rule not in EXTRA_VIEWS:
        return loss
    views = EXTRA_VIEWS[rule](batch["pixel_values"])
    agree = logits.argmax(-1) == labels
    for view in views:
        view_logits = _logits(forward_pixels(model, dict(batch, pixel_values=view), device))
        loss = loss + F.cross_entropy(view_logits.float(), labels, reduction="none")
        agree &= view_logits.argmax(-1) == labels
    loss = loss / (1 + len(views))
    return torch.where(agree, loss, torch.full_like(loss, math.inf)) if rule == "agreement" else loss


def select_trusted(
    model: nn.Module,
    data: Any,
    per_class: int,
    *,
    num_labels: Optional[int] = None,
    rule: str = "loss",
    selection_model: Optional[nn.Module] = None,
    batch_size: int = 32,
    accelerator: Any = None,
    collate_fn: Optional[Collator] = None,
    show_progress: bool = True,
) -> TrustedSelection:
    """Keep the `per_class` lowest-score samples of each class of a labelled dataset.

    `rule` is 'loss' (the paper), 'early_loss' (score with `selection_model`, e.g. an earlier
    checkpoint that has not memorised the noise), 'shift_loss' (mean loss over the image and four
    copies shifted by ~1/28 of its side, see `shifted_views`: needs no checkpoint, and on a
    memorised model it is far purer than 'loss') or 'agreement' (mean loss over the image and its
    horizontal flip; samples whose views do not both predict the label are dropped).
    Warns when a class has fewer than `per_class` samples; raises when a class has none, or when
    a label lies outside `[0, num_labels)`.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class={per_class!r} is invalid: keep at least 1 trusted sample per class.")
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule={rule!r} is invalid: choose one of {list(SELECTION_RULES)}.")
    if rule == "early_loss" and selection_model is None:
        raise ValueError("rule='early_loss' needs selection_model= (an earlier checkpoint of the model).")
    scorer = selection_model if rule == "early_loss" else model
    if accelerator is not None:
        scorer = accelerator.unwrap_model(scorer)
    num_labels = num_labels or getattr(getattr(scorer, "config", None), "num_labels", None)
    if num_labels is None:
        raise ValueError("num_labels is unknown: pass num_labels= or use a model whose config has num_labels.")
    device = model_device(scorer, accelerator)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)

    heaps: dict[int, list[tuple[float, _Descending]]] = {}
    kept: dict[Any, Any] = {}  # identity -> example, for the candidates of a stream
    seen: set = set()  # identities read from a stream, to refuse a key seen twice
    map_style = is_map_style(data)
    problem: Optional[str] = None
    total = num_examples(data)
    progress = tqdm(
        total=math.ceil(total / world) if total else None,
        desc="SAP trusted selection",
        unit="sample",
        disable=not (show_progress and rank == 0),
    )
    with inference_mode(scorer), progress:
        for ids, batch, examples in iter_shard_batches(
            data, batch_size=batch_size, process_index=rank, num_processes=world, collate_fn=collate_fn,
            with_examples=True,
        ):
            labels = batch_labels(batch)
            if labels is None:
                problem = f"the batches have no 'labels'/'label' (keys: {sorted(batch)}); selection needs labels."
                break
            bad = (labels < 0) | (labels >= num_labels)
            if bad.any():
                position = int(bad.nonzero()[0, 0])
                problem = (
                    f"sample {ids[position]!r} has label {int(labels[position])}, outside the model's "
                    f"{num_labels} classes [0, {num_labels}); fix the labels or the model's num_labels."
                )
                break
            duplicate = None if map_style else _first_duplicate(ids, seen)
            if duplicate is not None:
                problem = _duplicate_message(duplicate)
                break
            scores = sample_scores(scorer, batch, labels, device, rule).cpu().tolist()
            for position, (score, label, identity) in enumerate(zip(scores, labels.tolist(), ids)):
                heap = heaps.setdefault(label, [])
                item = (-score, _Descending(identity))  # max-heap on (score, identity)
                if len(heap) < per_class:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    kept.pop(heapq.heapreplace(heap, item)[1].value, None)
                else:
                    continue
                if examples is not None and not map_style:  # map-style data is re-read by index instead
                    kept[identity] = examples[position]
            progress.update(len(ids))

    local = {
        "problem": problem,
        "candidates": [(-s, i.value, label, kept.get(i.value)) for label, heap in heaps.items() for s, i in heap],
    }
    shards = gather_shards(local, accelerator)
    problems = [shard["problem"] for shard in shards if shard["problem"]]
    if problems:
        raise ValueError(f"Trusted selection failed: {problems[0]}")
    by_class: dict[int, list[tuple[float, Any]]] = {}
    example_of: dict[Any, Any] = {}
    for shard in shards:
        for score, identity, label, example in shard["candidates"]:
            if identity in example_of:  # a key on two processes (within one process it is caught while reading)
                raise ValueError(f"Trusted selection failed: {_duplicate_message(identity)}")
            example_of[identity] = example
            if math.isfinite(score):
                by_class.setdefault(label, []).append((score, identity))
    empty = [c for c in range(num_labels) if not by_class.get(c)]
    if empty:
        raise ValueError(
            f"Classes {empty} have no usable sample in the selection data (rule={rule!r}); SAP needs trusted "
            "samples of every class. Use data that covers every class, or another selection_rule."
        )
    chosen: list[tuple[Any, int, float]] = []
    per_class_counts: dict[int, int] = {}
    for label in range(num_labels):
        best = sorted(by_class[label])[:per_class]
        per_class_counts[label] = len(best)
        chosen.extend((identity, label, score) for score, identity in best)
    short = {c: n for c, n in per_class_counts.items() if n < per_class}
    if short:
        logger.warning("Classes with fewer than %d trusted samples (class: count): %s", per_class, short)
    chosen.sort(key=lambda item: item[0])
    keep_examples = not map_style and all(example_of[i] is not None for i, _, _ in chosen)
    return TrustedSelection(
        indices=[i for i, _, _ in chosen],
        labels=[label for _, label, _ in chosen],
        losses=[s for _, _, s in chosen],
        per_class=per_class_counts,
        examples=[example_of[i] for i, _, _ in chosen] if keep_examples else None,
    )


class _Descending:
    """Reverses the order of an identity (int position or str key) inside a heap item."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __lt__(self, other: "_Descending") -> bool:
        return other.value < self.value

    def __gt__(self, other: "_Descending") -> bool:
        return other.value > self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and other.value == self.value


def _first_duplicate(ids: list[Any], seen: set) -> Any:
    """The first identity of `ids` already in `seen` (None if none); adds the others to `seen`."""
    for identity in ids:
        if identity in seen:
            return identity
        seen.add(identity)
    return None


def _duplicate_message(identity: Any) -> str:
    return (
        f"the key {identity!r} identifies two examples of the stream; sample identities must be unique (Clothing1M: "
        "the image path). Remove the duplicate row or give it another 'key'."
    )


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output
