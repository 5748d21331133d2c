"""Label-quality scores and the "suspected" flag from predicted probabilities: pure functions, no model, no data.

Or from the training dynamics (`label_margins`, `clean_probability`): each example's label margin averaged over
the epochs of training (the area under the margin, AUM: Pleiss et al., NeurIPS 2020), split in two by a
two-component Gaussian mixture (DivideMix's split, Li et al., ICLR 2020). A wrong label is learned late, so its
margin stays low for most of training even once the model has memorised it.

When cleanlab is installed (`pip install "sap_hf[audit]"`) its `cleanlab.rank.get_label_quality_scores`
and `cleanlab.filter.find_label_issues` (confident learning) are used; without it the same scores
are computed with torch and an example is suspected when the model predicts another class than
its label (cleanlab's `filter_by="predicted_neq_given"`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..utils.checks import check_choice


SCORE_METHODS: tuple[str, ...] = ("self_confidence", "normalized_margin")
"""Label-quality scores: the probability of the given label, or cleanlab's normalized margin
`(p_given - max_{k != given} p_k + 1) / 2`; both lie in [0, 1], lower = more likely mislabelled."""
FILTERS: tuple[str, ...] = (
    "auto",
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
)
"""How `suspected` is decided. Every value but 'predicted_neq_given' needs cleanlab; 'auto' is
cleanlab's default ('prune_by_noise_rate') when cleanlab is installed, 'predicted_neq_given' otherwise."""


def cleanlab_available() -> bool:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        return False
    return True


def require_cleanlab(what: str, fallback: str) -> None:
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
    check_choice("method", method, SCORE_METHODS)
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    _check_scoring_inputs(probs, labels)
    if use_cleanlab is None:
        use_cleanlab = cleanlab_available()
    if use_cleanlab:
        require_cleanlab("use_cleanlab=True", "use_cleanlab=None (torch fallback)")
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
    check_choice("filter_by", filter_by, FILTERS)
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    _check_scoring_inputs(probs, labels)
    if filter_by == "auto":
        filter_by = "prune_by_noise_rate" if cleanlab_available() else "predicted_neq_given"
    if filter_by == "predicted_neq_given":
        return probs.argmax(1) != labels
    require_cleanlab(f"filter_by={filter_by!r}", "filter_by='predicted_neq_given' (or 'auto')")
    from cleanlab.filter import find_label_issues

    mask = find_label_issues(labels.numpy(), probs.numpy(), filter_by=filter_by, n_jobs=1)
    return torch.as_tensor(mask, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# From the training dynamics
# ----------------------------------------------------------------------------------------------


def label_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's margin in [-1, 1]: the probability of its given label minus the largest other class's."""
    probs = logits.detach().float().softmax(-1)
    labels = labels.long()[:, None]
    return probs.gather(1, labels).squeeze(1) - probs.scatter(1, labels, -1.0).amax(1)


def clean_probability(values: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Each value's posterior of the higher of two Gaussian components fit to `values` by EM (float64).

    No threshold to tune: the mixture puts the split where the clean and the wrong labels' margin
    distributions cross. Deterministic (initialised at the 10th and 90th percentiles).
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2 or not torch.isfinite(x).all():
        raise ValueError(f"clean_probability needs at least 2 finite values, got {x.numel()} ({x[:5].tolist()} ...).")
    mean = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=torch.float64))
    var = torch.full((2,), float(x.var()) / 4 + 1e-8, dtype=torch.float64)
    weight = torch.full((2,), 0.5, dtype=torch.float64)
    for _ in range(iterations):
        log_density = torch.log(weight) - 0.5 * torch.log(2 * math.pi * var) - (x[:, None] - mean) ** 2 / (2 * var)
        resp = torch.softmax(log_density, dim=1)
        total = resp.sum(0) + 1e-12
        weight, mean = total / x.numel(), (resp * x[:, None]).sum(0) / total
        var = (resp * (x[:, None] - mean) ** 2).sum(0) / total + 1e-8
    return resp[:, int(torch.argmax(mean))]
