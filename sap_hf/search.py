"""Alpha search: one eigendecomposition, every alpha written from the saved originals.

The uncorrected model is evaluated first and stays a candidate, so the search can never hand
back a model that is worse on the eval set than the one it was given. Whatever happens inside
the loop (an evaluation error, Ctrl-C), the original weights are restored before re-raising.

With layer kinds (`alpha_scope="per_kind"`), the shared search is followed by one coordinate
pass: the attention layers, the MLP layers and the classifier in turn try every alpha of the grid
and "unchanged" while the other kinds keep their current alpha. Why: on memorised ViTs the
noise is removed by projecting the attention layers, while the MLP layers need a much milder
alpha (benchmarks/sap_ablation.py); one shared alpha has to compromise between the two.
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
from .targets import LAYER_KINDS, group_alphas

logger = logging.get_logger(__name__)


@dataclass
class AlphaSearchResult:
    """Every alpha's metrics; `best_alpha` is the best shared alpha (None when none beat the uncorrected model).

    With the per-kind pass, `kind_alphas` (kind -> alpha, None = unchanged) is what was written and
    `best_metrics` are its metrics; `best_alpha` stays the shared search's best, where the pass started.
    """

    metric: str
    baseline: dict[str, float]
    alphas: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    best_alpha: Optional[float] = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    kind_alphas: dict[str, Optional[float]] = field(default_factory=dict)  # per_kind: what was written
    kind_trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        """Whether the written weights differ from the model's input (some alpha beat "unchanged")."""
        if self.kind_alphas:
            return any(alpha is not None for alpha in self.kind_alphas.values())
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
    kinds: Optional[Mapping[str, str]] = None,
) -> AlphaSearchResult:
    """Evaluate the model unchanged and projected with each alpha; leave it at the best one.

    `on_evaluate(alpha, metrics)` is called after each evaluation of the shared search (alpha
    None = unchanged), e.g. to log through a Trainer. `kinds` (group name -> layer kind, see
    `targets.group_kinds`) adds the per-kind coordinate pass; its choice is `kind_alphas`, every
    trial is in `kind_trials`.
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

    def write(alpha: Any) -> None:
        """Every target from the originals: projected where `alpha` gives a value, original where None."""
        new_weights = dict(originals)
        new_weights.update(plan_projection(originals, stats.groups, bases, alpha))
        write_weights(model, new_weights)

    def evaluate(alpha: Any) -> dict[str, float]:
        write(alpha)
        return dict(evaluate_fn(model))

    best_write: Any = None
    try:
        result.baseline = dict(evaluate_fn(model))
        if on_evaluate:
            on_evaluate(None, result.baseline)
        best_score = score(result.baseline)
        result.best_metrics = result.baseline
        for alpha in alphas:
            metrics = evaluate(alpha)
            if on_evaluate:
                on_evaluate(alpha, metrics)
            result.alphas.append(alpha)
            result.metrics.append(metrics)
            logger.info("SAP alpha=%g: %s=%.4f (unchanged: %.4f)", alpha, metric, metrics[metric], result.baseline[metric])
            current = score(metrics)
            if math.isfinite(current) and current > best_score:
                best_score, result.best_alpha, result.best_metrics, best_write = current, alpha, metrics, alpha
        if kinds is not None:
            present = [kind for kind in LAYER_KINDS if kind in set(kinds.values())]
            chosen = {kind: result.best_alpha for kind in present}
            for kind in present:
                start = chosen[kind]  # this configuration is already scored; so is the current best
                for alpha in [None, *alphas]:
                    if alpha == start or alpha == chosen[kind]:
                        continue
                    trial = dict(chosen, **{kind: alpha})
                    per_group = group_alphas(stats.groups, kinds, trial)
                    metrics = evaluate(per_group)
                    result.kind_trials.append({"kind": kind, "alpha": alpha, "alphas": trial, "metrics": metrics})
                    logger.info("SAP %s alpha=%s (others %s): %s=%.4f", kind, alpha, chosen, metric, metrics[metric])
                    current = score(metrics)
                    if math.isfinite(current) and current > best_score:
                        best_score, result.best_metrics = current, metrics
                        chosen, best_write = trial, per_group
            result.kind_alphas = chosen
    except BaseException:
        write_weights(model, originals)
        raise
    if best_write is None:
        write_weights(model, originals)
        logger.warning(
            "No alpha improved %s over the uncorrected model (%.4f); the model is left unchanged.",
            metric,
            result.baseline[metric],
        )
    else:
        write(best_write)
    return result
