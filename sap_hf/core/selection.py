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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..runtime.batching import check_pixel_values, is_map_style, num_examples
from ..runtime.contract import LoaderData, class_labels
from ..runtime.passes import DataPass, PassBatch, Runtime, finite_samples, resolve_runtime
from ..utils.checks import check_choice, integer, positive_int
from ..utils.identity import HashSample, Identity, identity_digest
from .targets import check_classifier


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


CURVATURE_DRAWS = 10
"""Random directions per sample of the 'curvature' rule (the reference's number)."""
CURVATURE_STEP = 1e-3
"""Length of each input coordinate's step along a direction (the reference's `h`)."""


def curvature_seed(seed: int, identity: Identity) -> int:
    """The seed of one sample's random directions: from its identity, so that the draws do not depend
    on which process reads it, nor on the batch it lands in (Python's `hash` of a str differs per process)."""
    return identity_digest(seed, identity) >> 1  # 63 bits: any torch.Generator takes it


def input_gradient(walk: DataPass, batch: PassBatch, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient of its own cross-entropy with respect to its input pixels.

    The summed loss keeps the samples apart (the gradient of a mean would shrink with the batch
    size); the gradient is taken with respect to the input alone, so no parameter gets a `.grad`
    and the backward does no work for the weights.
    """
    leaf = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(walk.logits(batch, leaf), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, leaf)
    return gradient.detach()


def curvature_scores(
    walk: DataPass,
    batch: PassBatch,
    labels: torch.Tensor,
    seed: int = 0,
    draws: int = CURVATURE_DRAWS,
    step: float = CURVATURE_STEP,
) -> torch.Tensor:
    """The 'curvature' rule: mean over `draws` of `||grad L(x + step * v) - grad L(x)||`, v Rademacher.

    A mislabelled sample that the model memorised sits in a sharp, narrow minimum of its own loss
    around its input: the input gradient changes fast when the image moves a little. A correctly
    labelled one lies in a flat region shared with its class. This is the reference's "regularised"
    curvature estimate (the norm of the gradient difference, per direction); lower is more
    trustworthy. `grad L(x)` is the same for every direction, so it is computed once per batch:
    the same number as the gradient of the two losses' difference, for one forward and backward
    less per direction. Each sample's directions come from a generator seeded by `curvature_seed`.
    The score is a difference of two close gradients, so it carries the rounding of the model's
    dtype magnified by `1 / step`: other batchings (another batch size, more processes) agree on it
    to fewer digits than on a loss, and a bfloat16 model is too coarse for a `step` this small.
    Runs in eval mode under the pass's `no_grad`: grad is enabled for the input only.
    """
    check_pixel_values(batch.batch)
    pixels = batch.pixel_values.to(walk.device)
    pixels = pixels if pixels.is_floating_point() else pixels.float()
    finite = finite_samples(pixels).reshape(-1, *([1] * (pixels.dim() - 1)))
    pixels = torch.where(finite, pixels, torch.zeros_like(pixels))  # a NaN image scores NaN via the caller, alone
    labels = labels.to(walk.device).clamp_min(0)
    generators = [torch.Generator().manual_seed(curvature_seed(seed, identity)) for identity in batch.ids]
    clean = input_gradient(walk, batch, pixels, labels)
    total = torch.zeros(len(batch), dtype=torch.float64)
    for _ in range(draws):
        signs = torch.stack([torch.randint(0, 2, pixels.shape[1:], generator=g, dtype=torch.int8) for g in generators])
        direction = (signs * 2 - 1).to(device=pixels.device, dtype=pixels.dtype) * step
        moved = input_gradient(walk, batch, pixels + direction, labels)
        total += (moved - clean).flatten(1).float().norm(dim=1).cpu().double()
    score = (total / draws).float()
    return torch.where(torch.isfinite(score), score, torch.full_like(score, math.nan))


Scorer = Callable[[DataPass, PassBatch, torch.Tensor, int], torch.Tensor]
"""A selection rule: `(walk, batch, labels, seed) -> scores`, one per sample, on the CPU, lower = more trustworthy.

`labels` are the batch's checked labels (-100 where ignored: score those as anything, they are dropped);
`seed` seeds any randomness (per sample identity, so the scores do not depend on batching or processes).
`+inf` rejects a sample (the rule's own choice, not reported); NaN excludes it (counted in a warning).
"""


def loss_scores(walk: DataPass, batch: PassBatch, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """'loss' (the paper) and 'early_loss' (the same, under `selection_model`): the cross-entropy."""
    logits = walk.logits(batch)
    return F.cross_entropy(logits, labels.to(logits.device).clamp_min(0), reduction="none").cpu()


def _view_loss(walk: DataPass, batch: PassBatch, labels: torch.Tensor, views: list[torch.Tensor]):
    """(mean cross-entropy over the image and `views` of it, whether every one predicts the label)."""
    logits = walk.logits(batch)
    labels = labels.to(logits.device).clamp_min(0)  # -100 (ignored) scores as class 0; the caller drops it
    loss = F.cross_entropy(logits, labels, reduction="none")
    agree = logits.argmax(-1) == labels
    for view in views:
        view_logits = walk.logits(batch, view)
        loss = loss + F.cross_entropy(view_logits, labels, reduction="none")
        agree &= view_logits.argmax(-1) == labels
    return loss / (1 + len(views)), agree


def shift_loss_scores(walk: DataPass, batch: PassBatch, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """'shift_loss' (the default): the loss averaged over the image and its four `shifted_views`."""
    return _view_loss(walk, batch, labels, shifted_views(batch.pixel_values))[0].cpu()


def agreement_scores(walk: DataPass, batch: PassBatch, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """'agreement' (experimental): the loss averaged over the image and its flip; rejected unless both predict
    the label. Never better than 'shift_loss' in the benchmarks."""
    loss, agree = _view_loss(walk, batch, labels, _flipped_view(batch.pixel_values))
    return torch.where(agree, loss, torch.full_like(loss, math.inf)).cpu()


SCORERS: dict[str, Scorer] = {
    "loss": loss_scores,
    "early_loss": loss_scores,
    "agreement": agreement_scores,
    "shift_loss": shift_loss_scores,
    "curvature": curvature_scores,
}
"""The selection rules by name (`SAPConfig.selection_rule`): a new rule is one `Scorer` added here."""

EXPERIMENTAL_RULES: tuple[str, ...] = ("agreement", "curvature")
"""Rules the benchmarks show no gain for (benchmarks/studies/accuracy.md, ablation;
benchmarks/studies/pretrained.md, curvature rule): kept, not recommended."""


def sample_scores(walk: DataPass, batch: PassBatch, labels: torch.Tensor, rule: str, seed: int = 0) -> torch.Tensor:
    """Per-sample score of `rule` (lower = more trustworthy), on the CPU: `SCORERS[rule]`."""
    return SCORERS[rule](walk, batch, labels, seed)


def select_trusted(
    model: nn.Module,
    data: Any,
    per_class: int,
    *,
    num_labels: Optional[int] = None,
    rule: str = "shift_loss",
    selection_model: Optional[nn.Module] = None,
    runtime: Optional[Runtime] = None,
    seed: int = 0,
    subset: Optional[float] = None,
) -> TrustedSelection:
    """Keep the `per_class` lowest-score samples of each class of a labelled dataset.

    `rule` is 'shift_loss' (the default, as `SAPConfig`'s: mean loss over the image and four copies
    shifted by a 1/28 of its side, see `shifted_views`: needs no checkpoint, and on a memorised model
    it is far purer than 'loss'), 'loss' (the paper), 'early_loss' (score with `selection_model`,
    e.g. an earlier checkpoint that has not memorised the noise), or one of the `EXPERIMENTAL_RULES` (never
    better in the benchmarks): 'agreement' (mean loss over the image and its horizontal flip; samples whose
    views do not both predict the label are dropped) or 'curvature' (the reference's choice for real noise:
    how fast the input gradient of the loss changes along random directions, see `curvature_scores`; `seed`
    seeds those directions, per sample, so any number of processes selects the same samples. It costs about
    `CURVATURE_DRAWS` forward and backward passes per sample, 5-6x 'shift_loss', and a training step's
    activation memory per batch). Each rule is a `Scorer` in `SCORERS`.
    `subset` scores only a random part of the data (`SAPConfig.selection_subset`: a share in (0, 1] or a
    count > 1; `subset_keep` draws it with `seed`); the trusted identities still refer to the whole data.
    Samples labelled -100 are skipped; samples with non-finite pixels or scores are excluded (a
    warning gives their count). Warns when a class has fewer than `per_class` samples; raises when
    a class has none, or when a label lies outside `[0, num_labels)`.
    """
    _check_selection(per_class, rule, selection_model)
    seed = integer("seed", seed, hint="It seeds the random directions of rule='curvature'.")
    runtime = resolve_runtime(runtime)
    scorer = selection_model if rule == "early_loss" else model
    scorer_name = "selection_model" if rule == "early_loss" else "model"
    num_labels = check_classifier(runtime.unwrap(scorer), num_labels, scorer_name, takes_num_labels=True)
    if rule == "curvature":
        _warn_if_too_coarse(runtime.unwrap(scorer), runtime.is_main)
    with runtime.run(scorer, data, "selection", argument="train_data", description="SAP trusted selection") as walk:
        candidates = _Candidates(per_class, keep_examples=not _indexed(walk.data))
        for batch in walk.batches(with_examples=True, keep=subset_keep(walk.data, subset, seed)):
            labels, valid = walk.require_labels(batch, num_labels, "trusted selection")
            candidates.check_unique(batch.ids)
            scores = sample_scores(walk, batch, labels, rule, seed)
            scores[~finite_samples(batch.pixel_values).cpu()] = math.nan
            candidates.offer(batch, scores, labels, valid)
    return _merge(runtime.gather(candidates.summary()), num_labels, per_class, rule, runtime.is_main, subset)


def subset_keep(data: Any, subset: Optional[float], seed: int) -> Any:
    """The identities a selection with `subset` scores, as `iter_shard_batches(keep=...)` takes them (None: all).

    Indexed data (a dataset, a list of examples, a DataLoader's dataset) gets exactly the asked number of positions,
    drawn by a `torch.randperm` seeded with `seed`: the same on every process, each of which then reads
    only its own share of them. A stream cannot be indexed, so each of its examples is kept when the
    `HashSample` draw of its identity (key or position) falls below the share: the expected share,
    the same on every process, decided before the example is collated (so a skipped image is never
    decoded). A count needs the stream's length to become a share.
    """
    if subset is None:
        return None
    if isinstance(data, LoaderData):
        pool: Optional[list] = list(data.indices) if data.indices is not None else list(range(len(data.dataset)))
    elif is_map_style(data):
        pool = list(range(len(data)))
    else:
        pool = None
    if pool is None:
        size = num_examples(data)
        if subset > 1 and size is None:
            raise ValueError(
                f"selection_subset={subset:g} is a count, and this stream has no len() to turn it into a share: give "
                "a share in (0, 1] instead (e.g. selection_subset=0.1 scores about a tenth of the stream)."
            )
        return HashSample(subset if subset <= 1 else min(1.0, subset / max(size, 1)), seed)
    count = max(1, round(subset * len(pool))) if subset <= 1 else int(subset)
    if count >= len(pool):
        return None
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed)))[:count]
    return {pool[i] for i in order.tolist()}


def select_from_scores(
    ids: list[Identity],
    scores: torch.Tensor,
    labels: torch.Tensor,
    per_class: int,
    num_labels: int,
    *,
    source: str = "scores",
    is_main: bool = True,
) -> TrustedSelection:
    """The `per_class` lowest of `scores` in each class, from scores computed elsewhere (no data pass).

    `ids`, `scores` and `labels` are one entry per sample (e.g. the training losses `SAPTrainer` recorded).
    The same candidates, merge, tie-breaking and checks as `select_trusted`: labels -100 are skipped,
    non-finite scores excluded, labels outside `[0, num_labels)` and classes without a sample raise,
    classes with fewer than `per_class` warn. `source` names the scores in those messages.
    """
    positive_int("per_class", per_class, "keep at least 1 trusted sample per class.")
    if len(ids) == 0:
        raise ValueError(
            f"Trusted selection from {source}: there are no scores; SAP needs trusted samples of every class."
        )
    checked = class_labels({"labels": labels}, ids, num_labels, source)
    candidates = _Candidates(per_class, keep_examples=False)
    candidates.offer(
        PassBatch(list(ids), {}, None), scores.detach().double().cpu(), checked[0], checked[1], rejects_with_inf=False
    )
    return _merge([candidates.summary()], num_labels, per_class, source, is_main)


def _check_selection(per_class: Any, rule: str, selection_model: Optional[nn.Module]) -> None:
    positive_int("per_class", per_class, "keep at least 1 trusted sample per class.")
    check_choice("rule", rule, tuple(SCORERS))
    check_selection_model(rule, selection_model)


def check_selection_model(rule: str, selection_model: Optional[nn.Module]) -> None:
    """`selection_model` is given exactly when `rule` is 'early_loss' (any other rule would ignore it)."""
    if rule == "early_loss" and selection_model is None:
        raise ValueError("rule='early_loss' needs selection_model= (an earlier checkpoint of the model).")
    if rule != "early_loss" and selection_model is not None:
        raise ValueError(
            f"selection_model= is read by rule='early_loss' only; rule={rule!r} scores with the model itself. Use "
            "rule='early_loss' (SAPConfig(selection_rule='early_loss')) to score with selection_model, or leave it out."
        )


def _warn_if_too_coarse(model: nn.Module, is_main: bool) -> None:
    """A half-precision model rounds away most of the 'curvature' rule's small input steps."""
    parameter = next(model.parameters(), None)
    if is_main and parameter is not None and parameter.dtype in (torch.float16, torch.bfloat16):
        logger.warning(
            "selection_rule='curvature' with a %s model: its input steps of %g are below that precision, so the "
            "scores are mostly rounding. Select with a float32 copy of the model (model.float()), or use "
            "another selection_rule.",
            parameter.dtype,
            CURVATURE_STEP,
        )


def _indexed(data: Any) -> bool:
    """Data re-read by index for the statistics (so its examples need not be kept)."""
    return is_map_style(data) or isinstance(data, LoaderData)


class _Candidates:
    """This process's bounded candidates: one max-heap of `per_class` (score, identity) per class.

    A stream's candidates keep their raw examples (a few hundred rows per class), so the
    statistics pass reads them instead of the stream again.
    """

    def __init__(self, per_class: int, keep_examples: bool):
        self.per_class, self.keep_examples = per_class, keep_examples
        self.heaps: dict[int, list[tuple[float, _Descending]]] = {}
        self.kept: dict[Any, Any] = {}  # identity -> example, for the candidates of a stream
        self.seen: set = set()  # identities read from a stream, to refuse a key seen twice
        self.ignored = 0
        self.nonfinite = 0

    def check_unique(self, ids: list[Any]) -> None:
        if not self.keep_examples:
            return
        for identity in ids:
            if identity in self.seen:
                raise ValueError(_duplicate_message(identity))
            self.seen.add(identity)

    def offer(
        self,
        batch: PassBatch,
        scores: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        rejects_with_inf: bool = True,
    ) -> None:
        """Push each usable sample; -100 labels are ignored, non-finite scores excluded and counted (+inf from a
        rule that `rejects_with_inf` is its rejection: dropped, not counted)."""
        rejected = torch.isposinf(scores) if rejects_with_inf else torch.zeros_like(valid)
        usable = valid & torch.isfinite(scores)
        self.ignored += int((~valid).sum())
        self.nonfinite += int((valid & ~usable & ~rejected).sum())
        for position in usable.nonzero().flatten().tolist():
            identity, label = batch.ids[position], int(labels[position])
            heap = self.heaps.setdefault(label, [])
            item = (-float(scores[position]), _Descending(identity))  # max-heap on (score, identity)
            if len(heap) < self.per_class:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                self.kept.pop(heapq.heapreplace(heap, item)[1].value, None)
            else:
                continue
            if self.keep_examples and batch.examples is not None:
                self.kept[identity] = batch.examples[position]

    def summary(self) -> dict[str, Any]:
        """What this process hands to the merge: candidates (score, identity, label, example) and counts."""
        candidates = [
            (-s, i.value, label, self.kept.get(i.value)) for label, heap in self.heaps.items() for s, i in heap
        ]
        return {
            "candidates": candidates,
            "ignored": self.ignored,
            "nonfinite": self.nonfinite,
            "keep_examples": self.keep_examples,
        }


def _merge(
    shards: list[dict[str, Any]],
    num_labels: int,
    per_class: int,
    rule: str,
    is_main: bool,
    subset: Optional[float] = None,
) -> TrustedSelection:
    """Every process's candidates -> the `per_class` best of each class (the same on every process).

    `subset` (`selection_subset`) is named in the errors: a small share or count can miss a class."""
    by_class: dict[int, list[tuple[float, Any]]] = {}
    example_of: dict[Any, Any] = {}
    for shard in shards:
        for score, identity, label, example in shard["candidates"]:
            if identity in example_of:  # a key on two processes (within one process it is caught while reading)
                raise ValueError(f"Trusted selection failed: {_duplicate_message(identity)}")
            example_of[identity] = example
            by_class.setdefault(label, []).append((score, identity))
    _report_excluded(sum(s["ignored"] for s in shards), sum(s["nonfinite"] for s in shards), is_main)
    empty = [c for c in range(num_labels) if not by_class.get(c)]
    if empty and subset is not None:
        scored = sum(len(samples) for samples in by_class.values())
        raise ValueError(
            f"Classes {empty} have no usable sample among the {scored} scored with selection_subset={subset:g} "
            f"({'a share of the data' if subset <= 1 else 'a count of examples'}); SAP needs trusted samples of every "
            "class. Give a larger selection_subset (a share in (0, 1], e.g. 0.1, or a count > 1 holding many times "
            "trusted_per_class samples of every class), or None to score every example."
        )
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
    if short and is_main:
        logger.warning("Classes with fewer than %d trusted samples (class: count): %s", per_class, short)
    chosen.sort(key=lambda item: item[0])
    keep_examples = shards[0]["keep_examples"] and all(example_of[i] is not None for i, _, _ in chosen)
    return TrustedSelection(
        indices=[i for i, _, _ in chosen],
        labels=[label for _, label, _ in chosen],
        losses=[s for _, _, s in chosen],
        per_class=per_class_counts,
        examples=[example_of[i] for i, _, _ in chosen] if keep_examples else None,
    )


def _report_excluded(ignored: int, nonfinite: int, is_main: bool) -> None:
    if not is_main:
        return
    if nonfinite:
        logger.warning(
            "SAP trusted selection excluded %d sample(s) with non-finite pixel values or loss (NaN/Inf images?); "
            "they can never be trusted. Check the data for corrupt images.",
            nonfinite,
        )
    if ignored:
        logger.info("SAP trusted selection skipped %d sample(s) labelled -100 (the ignore index).", ignored)


class _Descending:
    """Reverses the order of an identity (int position or str key) inside a heap item."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return other.value < self.value

    def __gt__(self, other: _Descending) -> bool:
        return other.value > self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and other.value == self.value


def _duplicate_message(identity: Any) -> str:
    return (
        f"the key {identity!r} identifies two examples of the stream; sample identities must be unique (Clothing1M: "
        "the image path). Remove the duplicate row or give it another 'key'."
    )
