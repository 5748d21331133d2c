"""Which labels are wrong: a label audit from a (SAP-corrected) model's predicted probabilities.

After SAP, a model that had memorised every noisy label fits few of the mislabelled training
images again while still fitting most correctly labelled ones, so its probabilities say which
labels are wrong without the K extra trainings that out-of-sample probabilities (K-fold
cross-validation, what cleanlab normally asks for) would cost.

Two parts, kept apart:

* the pure scoring (`sap_hf.audit.scores`): probabilities + given labels -> one label-quality
  score per example (lower = more likely wrong) and a `suspected` flag, with cleanlab when installed;
* the data walk (`audit_labels`): the same data forms as the rest of the library (datasets, streams,
  lists, DataLoaders), sharded across processes without duplicates (`batching.iter_shard_batches`),
  gathered once, so one and several processes give the same ranking.

The CSV / JSON / PNG writers are in `sap_hf.audit.report`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..core.selection import EXTRA_VIEWS
from ..core.targets import check_classifier
from ..runtime.passes import DataPass, PassBatch, Runtime, resolve_runtime
from ..utils.checks import check_choice
from ..utils.identity import KEY_COLUMN
from . import scores
from .scores import FILTERS, SCORE_METHODS, clean_probability, flag_label_issues, label_quality_scores


logger = logging.get_logger(__name__)

VIEWS: tuple[str, ...] = ("image", "shift")
"""Probabilities of the image alone, or the mean over the image and four one-step shifts
(`sap_hf.core.selection.shifted_views`: what a memorised model fits is the exact pixels). 'shift' is the
default of `audit_labels`: it ranks the wrong labels better, for 5 forward passes instead of one
(benchmarks/studies/label_audit.md)."""


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


def predict_probs(walk: DataPass, batch: PassBatch, views: str = "image") -> torch.Tensor:
    """Softmax probabilities of one batch (float64 on the CPU); 'shift' averages them over the shifted views."""
    probs = walk.logits(batch).softmax(-1)
    if views == "shift":
        extra = EXTRA_VIEWS["shift_loss"](batch.pixel_values)
        for view in extra:
            probs = probs + walk.logits(batch, view).softmax(-1)
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
    runtime: Optional[Runtime] = None,
    use_cleanlab: Optional[bool] = None,
) -> LabelAudit:
    """Score every labelled example of `data` under `model` and flag the labels that look wrong.

    Run it on the SAP-corrected model: the memorised model fits (almost) every noisy label and
    sees nothing wrong. `method` is the label-quality score (`SCORE_METHODS`), `filter_by` how
    `suspected` is decided (`FILTERS`), `views` whether probabilities are averaged over shifted
    copies of the image (`VIEWS`; default 'shift', 'image' is 5x cheaper). Every process walks its
    own shard; the probabilities are gathered once, so every process returns the same audit, equal
    to a one-process run. `use_cleanlab=None` uses cleanlab when it is installed. Examples labelled
    -100 are left out of the audit.

    Raises ValueError (on every process, before any scoring) for data without labels, labels
    outside `[0, num_labels)`, or empty data.
    """
    use_cleanlab, filter_by = _check_audit_options(method, filter_by, views, use_cleanlab)
    runtime = resolve_runtime(runtime, batch_size=64)
    bare = runtime.unwrap(model)
    num_labels = check_classifier(bare, num_labels, takes_num_labels=True)
    class_names = class_names if class_names is not None else _config_class_names(bare, num_labels)
    with runtime.run(model, data, "audit", argument="data", description="SAP label audit") as walk:
        local = _AuditShard(num_labels)
        for batch in walk.batches(with_examples=True, by_key=False):
            labels, valid = walk.require_labels(batch, num_labels, "a label audit (it checks given labels)")
            local.add(batch, labels, valid, predict_probs(walk, batch, views))
    indices, given, probs, keys = _merge_shards(runtime.gather(local.summary()))
    return LabelAudit(
        indices=indices,
        given=given,
        probs=probs,
        scores=label_quality_scores(probs, given, method, use_cleanlab=use_cleanlab),
        suspected=flag_label_issues(probs, given, filter_by),
        method=method,
        filter_by=filter_by,
        views=views,
        keys=keys,
        class_names=list(class_names) if class_names is not None else None,
        meta={"cleanlab": bool(use_cleanlab), "processes": runtime.world},
    )


def dynamics_audit(audit: LabelAudit, positions: Sequence[int], margins: torch.Tensor) -> LabelAudit:
    """`audit` ranked and flagged by the training dynamics instead of its model's probabilities.

    `margins[i]` is the label margin of training example `positions[i]` averaged over the epochs of training
    (`SAPTrainer` records it; `scores.label_margins` per step). Score: `(margin + 1) / 2` in [0, 1], lower = more
    likely wrong; suspected: under 0.5 probability of the clean component of a two-Gaussian mixture
    (`scores.clean_probability`). The probabilities (predicted class, the CSV, `refine`'s teacher) stay the model's.
    Why: a wrong label is learned late, so its margin stays low for most of training; the ranking needs no model
    that has not memorised the noise, which the audit of a memorised or partly corrected model lacks
    (benchmarks/studies/cleanup.md, "The training dynamics as the audit").

    Raises ValueError when an audited example has no recorded margin (another dataset, or not trained on).
    """
    recorded = dict(zip([int(p) for p in positions], torch.as_tensor(margins, dtype=torch.float64).tolist()))
    missing = [int(i) for i in audit.indices.tolist() if int(i) not in recorded]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(audit)} audited examples have no recorded training margin (first: position "
            f"{missing[0]}): the audit's data must be the train_dataset that train() recorded, every example trained "
            "on at least once. Audit that dataset, or use audit_source='model'."
        )
    mean = torch.tensor([recorded[int(i)] for i in audit.indices.tolist()], dtype=torch.float64)
    return replace(
        audit,
        scores=(mean + 1) / 2,
        suspected=clean_probability(mean) < 0.5,
        method="training_margin",
        filter_by="mixture",
        meta={**audit.meta, "source": "training"},
    )


def _check_audit_options(method: str, filter_by: str, views: str, use_cleanlab: Optional[bool]) -> tuple[bool, str]:
    """Validate the options and resolve 'auto' (before the data pass: a missing cleanlab must not cost one)."""
    check_choice("method", method, SCORE_METHODS)
    check_choice("filter_by", filter_by, FILTERS)
    check_choice("views", views, VIEWS)
    if use_cleanlab is None:
        use_cleanlab = scores.cleanlab_available()
    if filter_by == "auto":
        filter_by = "prune_by_noise_rate" if use_cleanlab else "predicted_neq_given"
    if use_cleanlab:
        scores.require_cleanlab("use_cleanlab=True", "use_cleanlab=None (torch fallback)")
    if filter_by != "predicted_neq_given":
        scores.require_cleanlab(f"filter_by={filter_by!r}", "filter_by='predicted_neq_given' (or 'auto')")
    return use_cleanlab, filter_by


def _config_class_names(model: nn.Module, num_labels: int) -> Optional[list[str]]:
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        return None
    return [str(id2label.get(c, id2label.get(str(c), c))) for c in range(num_labels)]


class _AuditShard:
    """This process's share of the audit: positions, given labels, probabilities and keys of its labelled examples."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.indices: list[torch.Tensor] = []
        self.given: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.keys: Optional[list[Any]] = []

    def add(self, batch: PassBatch, labels: torch.Tensor, valid: torch.Tensor, probs: torch.Tensor) -> None:
        self.indices.append(torch.as_tensor(batch.ids, dtype=torch.long)[valid])
        self.given.append(labels[valid])
        self.probs.append(probs[valid])
        keys = _batch_keys(batch)
        if keys is None or self.keys is None:
            self.keys = None
        else:
            self.keys.extend(k for k, keep in zip(keys, valid.tolist()) if keep)

    def summary(self) -> dict[str, Any]:
        empty = not self.indices
        return {
            "indices": torch.zeros(0, dtype=torch.long) if empty else torch.cat(self.indices),
            "given": torch.zeros(0, dtype=torch.long) if empty else torch.cat(self.given),
            "probs": torch.zeros(0, self.num_labels, dtype=torch.float64) if empty else torch.cat(self.probs),
            "keys": None if empty else self.keys,
        }


def _batch_keys(batch: PassBatch) -> Optional[list[Any]]:
    """The examples' `key`s (Clothing1M: the image path), from the raw examples or a ready batch; None without."""
    if batch.examples is not None:
        if all(isinstance(e, Mapping) and KEY_COLUMN in e for e in batch.examples):
            return [e[KEY_COLUMN] for e in batch.examples]
        return None
    keys = batch.batch.get(KEY_COLUMN)
    if keys is None:
        return None
    return keys.tolist() if isinstance(keys, torch.Tensor) else list(keys)


def _merge_shards(
    shards: list[dict[str, Any]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[list[Any]]]:
    """Every process's share, in data order: (indices, given, probs, keys or None)."""
    all_indices = torch.cat([s["indices"] for s in shards])
    if all_indices.numel() == 0:
        raise ValueError("The data has no labelled example (empty, or every label is -100): a label audit needs one.")
    order = torch.argsort(all_indices)
    keys = None
    if all(s["keys"] is not None or s["indices"].numel() == 0 for s in shards):
        flat = [k for s in shards for k in (s["keys"] or [])]
        keys = [flat[i] for i in order.tolist()] if len(flat) == all_indices.numel() else None
    given = torch.cat([s["given"] for s in shards])[order]
    probs = torch.cat([s["probs"] for s in shards])[order]
    return all_indices[order], given, probs, keys
