"""Which labels are wrong: a label audit from a (SAP-corrected) model's predicted probabilities.

After SAP, a model that had memorised every noisy label fits few of the mislabelled training
images again while still fitting most correctly labelled ones, so its probabilities say which
labels are wrong without the K extra trainings that out-of-sample probabilities (K-fold
cross-validation, what cleanlab normally asks for) would cost.

Two parts, kept apart:

* the pure scoring (`label_quality_scores`, `flag_label_issues`): probabilities + given labels ->
  one label-quality score per example (lower = more likely wrong) and a `suspected` flag. When
  cleanlab is installed (`pip install "sap_hf[audit]"`) its `cleanlab.rank.get_label_quality_scores`
  and `cleanlab.filter.find_label_issues` (confident learning) are used; without it the same
  scores are computed with torch and an example is suspected when the model predicts another class
  than its label (cleanlab's `filter_by="predicted_neq_given"`).
* the data walk (`audit_labels`): the same data forms as the rest of the library (datasets, streams,
  lists, DataLoaders), sharded across processes without duplicates (`batching.iter_shard_batches`),
  gathered once, so one and several processes give the same ranking.

The CSV / JSON / PNG writers are in `sap_hf.audit.report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import default_data_collator
from transformers.utils import logging

from ..runtime.batching import Collator, batch_labels, gather_shards, iter_shard_batches, process_layout, shard_progress
from ..core.stats import forward_pixels, inference_mode, model_device, raise_on_any_process, unwrap
from ..core.selection import EXTRA_VIEWS

logger = logging.get_logger(__name__)

SCORE_METHODS: tuple[str, ...] = ("self_confidence", "normalized_margin")
"""Label-quality scores: the probability of the given label, or cleanlab's normalized margin
`(p_given - max_{k != given} p_k + 1) / 2`; both lie in [0, 1], lower = more likely mislabelled."""
FILTERS: tuple[str, ...] = ("auto", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
"""How `suspected` is decided. Every value but 'predicted_neq_given' needs cleanlab; 'auto' is
cleanlab's default ('prune_by_noise_rate') when cleanlab is installed, 'predicted_neq_given' otherwise."""
VIEWS: tuple[str, ...] = ("image", "shift")
"""Probabilities of the image alone, or the mean over the image and four one-step shifts
(`trusted.shifted_views`: what a memorised model fits is the exact pixels). 'shift' is the default of
`audit_labels`: on the SAP-corrected models of benchmarks/label_audit.py it ranks the wrong labels
better (average precision 0.850 vs 0.769 on sym40, 0.523 vs 0.491 on asym40) for 5 forward passes."""


def cleanlab_available() -> bool:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        return False
    return True


def _require_cleanlab(what: str, fallback: str) -> None:
    """Raise an ImportError that names the argument and both fixes when cleanlab is missing."""
    if not cleanlab_available():
        raise ImportError(
            f"{what} uses cleanlab, which is not installed: pip install 'sap_hf[audit]', or use {fallback}."
        )


# ----------------------------------------------------------------------------------------------
# Pure scoring
# ----------------------------------------------------------------------------------------------


def _check_scoring_inputs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs must be (N, num_classes) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}."
        )
    if probs.shape[0] == 0:
        raise ValueError("Nothing to audit: probs and labels are empty. Pass at least one labelled example.")
    if probs.shape[1] < 2:
        raise ValueError(f"A label audit needs at least 2 classes, got probs with {probs.shape[1]} column(s).")
    bad = (labels < 0) | (labels >= probs.shape[1])
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}]={int(labels[position])} is outside [0, {probs.shape[1]}); fix the labels or the number "
            "of classes of the probabilities."
        )


def label_quality_scores(
    probs: torch.Tensor, labels: torch.Tensor, method: str = "self_confidence", *, use_cleanlab: Optional[bool] = None
) -> torch.Tensor:
    """One score in [0, 1] per example, lower = the given label is more likely wrong.

    `use_cleanlab=None` uses cleanlab's `get_label_quality_scores` when it is installed and the
    torch formula (the same definition) otherwise; True/False forces one of them.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is invalid: choose one of {list(SCORE_METHODS)}.")
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    _check_scoring_inputs(probs, labels)
    if use_cleanlab is None:
        use_cleanlab = cleanlab_available()
    if use_cleanlab:
        _require_cleanlab("use_cleanlab=True", "use_cleanlab=None (torch fallback)")
        from cleanlab.rank import get_label_quality_scores

        scores = get_label_quality_scores(labels.numpy(), probs.numpy(), method=method)
        return torch.as_tensor(scores, dtype=torch.float64)
    given = probs.gather(1, labels[:, None]).squeeze(1)
    if method == "self_confidence":
        return given
    others = probs.scatter(1, labels[:, None], -math.inf).amax(1)
    return (given - others + 1) / 2


def flag_label_issues(probs: torch.Tensor, labels: torch.Tensor, filter_by: str = "auto") -> torch.Tensor:
    """Boolean mask of the examples whose label is suspected to be wrong.

    With cleanlab: `cleanlab.filter.find_label_issues(labels, probs, filter_by=...)` (confident
    learning: per class pair, about as many issues as the estimated joint of given and true labels
    says there are). Without: `predicted_neq_given`, the model predicts another class than the label.
    """
    if filter_by not in FILTERS:
        raise ValueError(f"filter_by={filter_by!r} is invalid: choose one of {list(FILTERS)}.")
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    _check_scoring_inputs(probs, labels)
    if filter_by == "auto":
        filter_by = "prune_by_noise_rate" if cleanlab_available() else "predicted_neq_given"
    if filter_by == "predicted_neq_given":
        return probs.argmax(1) != labels
    _require_cleanlab(f"filter_by={filter_by!r}", "filter_by='predicted_neq_given' (or 'auto')")
    from cleanlab.filter import find_label_issues

    mask = find_label_issues(labels.numpy(), probs.numpy(), filter_by=filter_by, n_jobs=1)
    return torch.as_tensor(mask, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------


@dataclass
class LabelAudit:
    """Per example (in data order): its index (and key), given label, predicted probabilities, score, flag.

    `ranking` lists positions into these arrays from the most to the least suspicious example
    (lowest score first, ties by index). `rows()` yields the ranked records the CSV holds.
    """

    indices: torch.Tensor
    given: torch.Tensor
    probs: torch.Tensor
    scores: torch.Tensor
    suspected: torch.Tensor
    method: str = "self_confidence"
    filter_by: str = "predicted_neq_given"
    views: str = "image"
    keys: Optional[list[Any]] = None
    class_names: Optional[list[str]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(1)

    @property
    def prob_given(self) -> torch.Tensor:
        return self.probs.gather(1, self.given[:, None]).squeeze(1)

    @property
    def ranking(self) -> torch.Tensor:
        # A stable sort of the index order by score: ties stay in index order.
        return torch.sort(self.scores, stable=True).indices

    @property
    def num_suspected(self) -> int:
        return int(self.suspected.sum())

    def suspected_indices(self) -> list[int]:
        """Global indices of the suspected examples, most suspicious first."""
        order = self.ranking
        return [int(i) for i in self.indices[order][self.suspected[order]]]

    def class_name(self, label: int) -> str:
        return self.class_names[label] if self.class_names and 0 <= label < len(self.class_names) else str(label)

    def rows(self) -> Iterator[dict[str, Any]]:
        predicted, prob_given = self.predicted, self.prob_given
        for rank, position in enumerate(self.ranking.tolist(), start=1):
            given, guess = int(self.given[position]), int(predicted[position])
            row = {"rank": rank, "index": int(self.indices[position])}
            if self.keys is not None:
                row["key"] = self.keys[position]
            row.update(
                given_label=given,
                given_name=self.class_name(given),
                predicted_label=guess,
                predicted_name=self.class_name(guess),
                prob_given=float(prob_given[position]),
                prob_predicted=float(self.probs[position, guess]),
                label_quality=float(self.scores[position]),
                suspected=bool(self.suspected[position]),
            )
            yield row

    def pair_counts(self, only_suspected: bool = True) -> dict[str, int]:
        """`"given -> predicted": count` over the suspected (or all) examples, largest first."""
        mask = self.suspected if only_suspected else torch.ones_like(self.suspected)
        counts: dict[tuple[int, int], int] = {}
        for given, guess in zip(self.given[mask].tolist(), self.predicted[mask].tolist()):
            counts[(given, guess)] = counts.get((given, guess), 0) + 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return {f"{self.class_name(g)} -> {self.class_name(p)}": n for (g, p), n in ranked}

    def summary(self) -> dict[str, Any]:
        """What a person wants first: how many, which class pairs, how the scores were made."""
        num_classes = self.probs.shape[1]
        per_class = {
            self.class_name(c): {
                "examples": int((self.given == c).sum()),
                "suspected": int(((self.given == c) & self.suspected).sum()),
            }
            for c in range(num_classes)
        }
        return {
            "examples": len(self),
            "suspected": self.num_suspected,
            "suspected_fraction": self.num_suspected / max(1, len(self)),
            "method": self.method,
            "filter_by": self.filter_by,
            "views": self.views,
            "scorer": "cleanlab" if self.meta.get("cleanlab") else "torch",
            "per_given_class": per_class,
            "suspected_pairs": self.pair_counts(True),
            "disagreement_pairs": {
                k: v for k, v in self.pair_counts(False).items() if k.split(" -> ")[0] != k.split(" -> ")[1]
            },
            **{k: v for k, v in self.meta.items() if k != "cleanlab"},
        }


KEY_COLUMN = "key"
"""An example's stable name (Clothing1M's image path): carried into the audit when the examples have it."""


def _keeping_keys(collate: Collator) -> Collator:
    """`collate`, plus the examples' `key` strings (collators such as `default_data_collator` drop strings)."""

    def wrapped(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        if examples and isinstance(examples[0], Mapping) and KEY_COLUMN in examples[0] and KEY_COLUMN not in batch:
            batch = dict(batch, **{KEY_COLUMN: [example[KEY_COLUMN] for example in examples]})
        return batch

    return wrapped


def predict_probs(model: nn.Module, batch: dict[str, Any], device: torch.device, views: str = "image") -> torch.Tensor:
    """Softmax probabilities of one batch (float64 on the CPU); 'shift' averages them over the shifted views."""
    output = forward_pixels(model, batch, device)
    logits = output.logits if hasattr(output, "logits") else output
    probs = logits.float().softmax(-1)
    if views == "shift":
        extra = EXTRA_VIEWS["shift_loss"](batch["pixel_values"])
        for view in extra:
            out = forward_pixels(model, dict(batch, pixel_values=view), device)
            probs = probs + (out.logits if hasattr(out, "logits") else out).float().softmax(-1)
        probs = probs / (1 + len(extra))
    return probs.double().cpu()


def audit_labels(
    model: nn.Module,
    data: Any,
    *,
    method: str = "self_confidence",
    filter_by: str = "auto",
    views: str = "shift",
    num_labels: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    accelerator: Any = None,
    collate_fn: Optional[Collator] = None,
    use_cleanlab: Optional[bool] = None,
    show_progress: bool = True,
) -> LabelAudit:
    """Score every labelled example of `data` under `model` and flag the labels that look wrong.

    Run it on the SAP-corrected model: the memorised model fits (almost) every noisy label and
    sees nothing wrong. `method` is the label-quality score (`SCORE_METHODS`), `filter_by` how
    `suspected` is decided (`FILTERS`), `views` whether probabilities are averaged over shifted
    copies of the image (`VIEWS`; default 'shift', 'image' is 5x cheaper). Every process walks its own shard; the probabilities are
    gathered once, so every process returns the same audit, equal to a one-process run.
    `use_cleanlab=None` uses cleanlab when it is installed.

    Raises ValueError (on every process, before any scoring) for data without labels, labels
    outside `[0, num_labels)`, or empty data.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r} is invalid: choose one of {list(SCORE_METHODS)}.")
    if filter_by not in FILTERS:
        raise ValueError(f"filter_by={filter_by!r} is invalid: choose one of {list(FILTERS)}.")
    if views not in VIEWS:
        raise ValueError(f"views={views!r} is invalid: choose one of {list(VIEWS)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: use a positive integer.")
    if use_cleanlab is None:
        use_cleanlab = cleanlab_available()
    if filter_by == "auto":
        filter_by = "prune_by_noise_rate" if use_cleanlab else "predicted_neq_given"
    # Before the data pass: a missing cleanlab must not cost a pass over the data.
    if use_cleanlab:
        _require_cleanlab("use_cleanlab=True", "use_cleanlab=None (torch fallback)")
    if filter_by != "predicted_neq_given":
        _require_cleanlab(f"filter_by={filter_by!r}", "filter_by='predicted_neq_given' (or 'auto')")
    model = unwrap(model, accelerator)
    config = getattr(model, "config", None)
    num_labels = num_labels or getattr(config, "num_labels", None)
    if num_labels is None:
        raise ValueError("num_labels is unknown: pass num_labels= or use a model whose config has num_labels.")
    if class_names is None and getattr(config, "id2label", None):
        id2label = config.id2label
        class_names = [str(id2label.get(c, id2label.get(str(c), c))) for c in range(num_labels)]
    device = model_device(model, accelerator)
    rank, world = process_layout(accelerator)
    collate = _keeping_keys(collate_fn or default_data_collator)

    indices, given, probs, keys = [], [], [], []
    has_keys = True
    error: Optional[BaseException] = None
    progress = shard_progress(data, "SAP label audit", rank=rank, world=world, show=show_progress)
    try:
        with inference_mode(model), progress:
            for batch_indices, batch in iter_shard_batches(
                data, batch_size=batch_size, process_index=rank, num_processes=world, collate_fn=collate, by_key=False
            ):
                labels = batch_labels(batch)
                if labels is None:
                    raise ValueError(
                        f"The data has no 'labels'/'label' (keys: {sorted(batch)}): a label audit checks given labels. "
                        "Audit the labelled training data."
                    )
                labels = labels.long().cpu()
                bad = (labels < 0) | (labels >= num_labels)
                if bad.any():
                    position = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"sample {int(batch_indices[position])} has label {int(labels[position])}, outside the model's "
                        f"{num_labels} classes [0, {num_labels}); fix the labels or the model's num_labels."
                    )
                batch_keys = batch.get(KEY_COLUMN)
                if batch_keys is None:
                    has_keys = False
                elif has_keys:
                    keys.extend(batch_keys.tolist() if isinstance(batch_keys, torch.Tensor) else list(batch_keys))
                probs.append(predict_probs(model, batch, device, views))
                indices.append(torch.as_tensor(batch_indices, dtype=torch.long))
                given.append(labels)
                progress.update(len(batch_indices))
    except Exception as err:  # re-raised below on this process, announced to the others
        error = err
    raise_on_any_process(error, accelerator)

    local = {
        "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "given": torch.cat(given) if given else torch.zeros(0, dtype=torch.long),
        "probs": torch.cat(probs) if probs else torch.zeros(0, num_labels, dtype=torch.float64),
        "keys": keys if has_keys and indices else None,
    }
    shards = gather_shards(local, accelerator)
    all_indices = torch.cat([s["indices"] for s in shards])
    if all_indices.numel() == 0:
        raise ValueError("The data is empty: a label audit needs at least one labelled example.")
    order = torch.argsort(all_indices)
    all_keys = None
    if all(s["keys"] is not None or s["indices"].numel() == 0 for s in shards):
        flat = [k for s in shards for k in (s["keys"] or [])]
        all_keys = [flat[i] for i in order.tolist()] if len(flat) == all_indices.numel() else None
    labels = torch.cat([s["given"] for s in shards])[order]
    all_probs = torch.cat([s["probs"] for s in shards])[order]
    scores = label_quality_scores(all_probs, labels, method, use_cleanlab=use_cleanlab)
    suspected = flag_label_issues(all_probs, labels, filter_by)
    return LabelAudit(
        indices=all_indices[order],
        given=labels,
        probs=all_probs,
        scores=scores,
        suspected=suspected,
        method=method,
        filter_by=filter_by,
        views=views,
        keys=all_keys,
        class_names=list(class_names) if class_names is not None else None,
        meta={"cleanlab": bool(use_cleanlab), "processes": world},
    )
