"""Alpha search: one eigendecomposition, every alpha written from the saved originals.

The uncorrected model is evaluated first and stays a candidate, so the search can never hand
back a model that is worse on the eval set than the one it was given. Whatever happens inside
the loop (an evaluation error, Ctrl-C), the original weights are restored before re-raising.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn
from transformers.utils import logging

from .config import validate_alpha
from .projection import Eigenbasis, current_weights, eigendecompose, plan_projection, write_weights
from .stats import ActivationStats

logger = logging.get_logger(__name__)


@dataclass
class AlphaSearchResult:
    """Every alpha's metrics; `best_alpha` is None when no alpha beat the uncorrected model."""

    metric: str
    baseline: dict[str, float]
    alphas: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    best_alpha: Optional[float] = None
    best_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def improved(self) -> bool:
        return self.best_alpha is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eigenbases(stats: ActivationStats) -> dict[str, Eigenbasis]:
    return {group.name: eigendecompose(stats.grams[group.name]) for group in stats.groups}


def search_alpha(
    model: nn.Module,
    stats: ActivationStats,
    alphas: Sequence[float],
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    *,
    metric: str = "accuracy",
    greater_is_better: bool = True,
    bases: Optional[Mapping[str, Eigenbasis]] = None,
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]] = None,
) -> AlphaSearchResult:
    """Evaluate the model unchanged and projected with each alpha; leave it at the best one.

    `on_evaluate(alpha, metrics)` is called after each evaluation (alpha None = unchanged), e.g.
    to log through a Trainer.
    """
    alphas = [validate_alpha(a, "alphas") for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give at least one alpha >= 1.")
    bases = bases if bases is not None else eigenbases(stats)
    originals = current_weights(model, stats.target_modules)

    def score(metrics: Mapping[str, float]) -> float:
        if metric not in metrics:
            raise ValueError(f"The evaluation returned {sorted(metrics)}, not the metric {metric!r} to select alpha by.")
        value = float(metrics[metric])
        return value if greater_is_better else -value

    result = AlphaSearchResult(metric=metric, baseline={})
    try:
        result.baseline = dict(evaluate_fn(model))
        if on_evaluate:
            on_evaluate(None, result.baseline)
        best_score = score(result.baseline)
        for alpha in alphas:
            write_weights(model, plan_projection(originals, stats.groups, bases, alpha))
            metrics = dict(evaluate_fn(model))
            if on_evaluate:
                on_evaluate(alpha, metrics)
            result.alphas.append(alpha)
            result.metrics.append(metrics)
            logger.info("SAP alpha=%g: %s=%.4f (unchanged: %.4f)", alpha, metric, metrics[metric], result.baseline[metric])
            current = score(metrics)
            if math.isfinite(current) and current > best_score:
                best_score, result.best_alpha, result.best_metrics = current, alpha, metrics
    except BaseException:
        write_weights(model, originals)
        raise
    if result.best_alpha is None:
        write_weights(model, originals)
        result.best_metrics = result.baseline
        logger.warning(
            "No alpha improved %s over the uncorrected model (%.4f); the model is left unchanged.",
            metric,
            result.baseline[metric],
        )
    else:
        write_weights(model, plan_projection(originals, stats.groups, bases, result.best_alpha))
    return result
