"""Alpha search: one eigendecomposition and one `W U` per layer, every alpha written from the saved originals.

Each evaluation is a full pass over the eval set (Clothing1M: 14k images), so the default search
brackets the best alpha on the sorted grid instead of evaluating all of it (`bracket_indices`):
the grid's choice on a unimodal curve with a fraction of the evaluations, since the climb stops a
few points past the best alpha on each side (measurements: benchmarks/studies/cost.md, "Correction
cost"); `method="grid"` evaluates every alpha.

The uncorrected model is evaluated first and stays a candidate, so the search can never hand
back a model that is worse on the eval set than the one it was given. Whatever happens inside
the loop (an evaluation error, Ctrl-C), the original weights are restored before re-raising.

With layer kinds (`alpha_scope="per_kind"`), the shared search is followed by one coordinate
pass: the attention layers, the MLP layers and the classifier in turn try alphas of the grid and
"unchanged" (all of them, or bracketing from their current alpha) while the other kinds keep theirs. Why: on memorised ViTs the
noise is removed by projecting the attention layers, while the MLP layers need a much milder
alpha (benchmarks/studies/accuracy.md, ablation); one shared alpha has to compromise between the two.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torch import nn
from transformers.utils import logging

from ..utils.checks import check_choice
from .config import ALPHA_SEARCHES, validate_alpha
from .projection import Eigenbasis, current_weights, eigendecompose, plan_projection, rotate_weights, write_weights
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


def bracket_indices(
    score_at: Callable[[int], float],
    size: int,
    known: Mapping[int, float],
    preference: Sequence[int],
    start: Optional[int] = None,
    tolerance: float = 0.0,
) -> dict[int, float]:
    """Climb a 1-D grid of `size` points from the best known one until the score has fallen on both sides.

    `known` are points already scored, `start` (if given) is scored first. Then, repeatedly, from the
    best point so far each side is walked over scored points that have not clearly fallen (score
    >= best - `tolerance`); where the walk reaches an unscored point, that point is scored. It stops
    once every side ends at a clearly lower point or at the grid's end. On a unimodal curve this
    returns the grid's maximum (plateaus are walked across, not stopped at) after a few points on
    each side of it instead of every point. Ties go to the point earliest in `preference` (the order
    a full grid search would have met them in). Returns every scored point's score (pure helper).
    """
    scores = dict(known)
    rank = {index: position for position, index in enumerate(preference)}
    if start is not None and start not in scores:
        scores[start] = score_at(start)

    def best() -> int:
        return max(scores, key=lambda i: (scores[i], -rank.get(i, len(rank))))

    while True:
        top = best()
        pending = []
        for side in (1, -1):
            j = top + side
            while 0 <= j < size and j in scores and scores[j] >= scores[top] - tolerance:
                j += side
            if 0 <= j < size and j not in scores:
                pending.append(j)
        if not pending:
            return scores
        for j in pending:
            scores[j] = score_at(j)


def maximises(metric: str, greater_is_better: Optional[bool] = None) -> bool:
    """Whether a larger `metric` is better: `greater_is_better` when given, else `TrainingArguments`' rule for
    `metric_for_best_model` (a name ending in "loss" is minimised), so `metric="loss"` is never maximised."""
    return not metric.endswith("loss") if greater_is_better is None else bool(greater_is_better)


def search_alpha(
    model: nn.Module,
    stats: ActivationStats,
    alphas: Sequence[float],
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    *,
    metric: str = "accuracy",
    greater_is_better: Optional[bool] = None,
    bases: Optional[Mapping[str, Eigenbasis]] = None,
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]] = None,
    kinds: Optional[Mapping[str, str]] = None,
    method: str = "bracket",
    tolerance: float = 0.0025,
    on_phase: Optional[Callable[[str, float], None]] = None,
) -> AlphaSearchResult:
    """Evaluate the model unchanged and projected with alphas of the grid; leave it at the best one.

    `method="grid"` evaluates every alpha (and, with `kinds`, every alpha and "unchanged" for each
    kind). `method="bracket"` (default) sorts the grid, appends "unchanged" as its alpha -> inf
    end, starts at the grid's middle and climbs until the metric has fallen (by more than
    `tolerance`) on both sides of the best alpha; the per-kind pass climbs the same way from each
    kind's current alpha. Both return the same choice on a unimodal metric curve, the bracket with
    a fraction of the evaluations (each a full pass over the eval set). `on_evaluate(alpha, metrics)`
    is called after each evaluation of the shared search (alpha None = unchanged), e.g. to log
    through a Trainer. `kinds` (group name -> layer kind, see `targets.group_kinds`) adds the
    per-kind coordinate pass; its choice is `kind_alphas`, every trial is in `kind_trials`.
    `on_phase(phase, seconds)` hears "eigh" (eigendecompositions and `W U`) and "write" (the final weights).
    """
    check_choice("method", method, ALPHA_SEARCHES)
    greater_is_better = maximises(metric, greater_is_better)
    alphas = [validate_alpha(a, "alphas") for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give at least one alpha >= 1.")
    clock = time.perf_counter()
    search = _Search(
        model,
        stats,
        sorted(set(alphas)) if method == "bracket" else alphas,
        evaluate_fn,
        metric,
        greater_is_better,
        bases,
        on_evaluate,
        method,
        tolerance,
    )
    if on_phase is not None:
        on_phase("eigh", time.perf_counter() - clock)
    try:
        search.shared_pass()
        if kinds is not None:
            search.kind_pass(kinds)
    except BaseException:
        write_weights(model, search.originals)
        raise
    clock = time.perf_counter()
    search.finish()
    if on_phase is not None:
        on_phase("write", time.perf_counter() - clock)
    return search.result


class _Search:
    """The state of one alpha search: originals, `W U` per layer, every score, the best write so far."""

    def __init__(
        self,
        model: nn.Module,
        stats: ActivationStats,
        alphas: list[float],
        evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
        metric: str,
        greater_is_better: bool,
        bases: Optional[Mapping[str, Eigenbasis]],
        on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]],
        method: str,
        tolerance: float,
    ):
        self.model, self.stats, self.alphas, self.evaluate_fn = model, stats, alphas, evaluate_fn
        self.metric, self.greater_is_better, self.on_evaluate = metric, greater_is_better, on_evaluate
        self.method, self.tolerance = method, tolerance
        self.bases = bases if bases is not None else eigenbases(stats)
        self.originals = current_weights(model, stats.target_modules)
        self.rotated = rotate_weights(
            self.originals, stats.groups, self.bases
        )  # W U once; each alpha then costs out x d^2
        self.result = AlphaSearchResult(metric=metric, baseline={})
        self.shared_scores: dict[float, dict[str, float]] = {}
        self.best_score = -math.inf
        self.best_write: Any = None

    def score(self, metrics: Mapping[str, float]) -> float:
        if self.metric not in metrics:
            raise ValueError(
                f"The evaluation returned {sorted(metrics)}, not the metric {self.metric!r} to select alpha by."
            )
        value = float(metrics[self.metric])
        value = value if self.greater_is_better else -value
        return value if math.isfinite(value) else -math.inf

    def write(self, alpha: Any) -> None:
        """Every target from the originals: projected where `alpha` gives a value, original where None."""
        new_weights = dict(self.originals)
        new_weights.update(plan_projection(self.originals, self.stats.groups, self.bases, alpha, self.rotated))
        write_weights(self.model, new_weights)

    def evaluate(self, alpha: Any) -> dict[str, float]:
        self.write(alpha)
        return dict(self.evaluate_fn(self.model))

    def shared(self, alpha: float) -> float:
        metrics = self.evaluate(alpha)
        if self.on_evaluate:
            self.on_evaluate(alpha, metrics)
        self.shared_scores[alpha] = metrics
        logger.info(
            "SAP alpha=%g: %s=%.4f (unchanged: %.4f)",
            alpha,
            self.metric,
            metrics[self.metric],
            self.result.baseline[self.metric],
        )
        return self.score(metrics)

    def shared_pass(self) -> None:
        """The unchanged model, then one alpha for every group: every alpha, or a bracket of the best."""
        result, alphas = self.result, self.alphas
        result.baseline = dict(self.evaluate_fn(self.model))
        if self.on_evaluate:
            self.on_evaluate(None, result.baseline)
        self.best_score = self.score(result.baseline)
        if self.method == "grid":
            for alpha in alphas:
                self.shared(alpha)
        else:  # index len(alphas) is "unchanged", the alpha -> inf end of the grid
            n = len(alphas)
            bracket_indices(
                lambda i: self.shared(alphas[i]),
                n + 1,
                {n: self.best_score},
                [n, *range(n)],
                start=(n - 1) // 2,
                tolerance=self.tolerance,
            )
        result.best_metrics = result.baseline
        for alpha in alphas if self.method == "grid" else sorted(self.shared_scores):  # first strictly better wins
            if alpha in self.shared_scores:
                metrics = self.shared_scores[alpha]
                result.alphas.append(alpha)
                result.metrics.append(metrics)
                if self.score(metrics) > self.best_score:
                    self.best_score, result.best_alpha, result.best_metrics, self.best_write = (
                        self.score(metrics),
                        alpha,
                        metrics,
                        alpha,
                    )

    def kind_pass(self, kinds: Mapping[str, str]) -> None:
        """One coordinate pass: each layer kind in turn tries the grid and "unchanged", the others held."""
        present = [kind for kind in LAYER_KINDS if kind in set(kinds.values())]
        self.chosen: dict[str, Optional[float]] = {kind: self.result.best_alpha for kind in present}
        alphas, n = self.alphas, len(self.alphas)
        for kind in present:
            start = self.chosen[kind]  # this configuration is already scored; so is the current best
            if self.method == "grid":
                for alpha in [None, *alphas]:
                    if alpha != start and alpha != self.chosen[kind]:
                        self.trial(kinds, kind, alpha)
            else:
                at = n if start is None else alphas.index(start)
                bracket_indices(
                    lambda i, kind=kind: self.trial(kinds, kind, None if i == n else alphas[i]),
                    n + 1,
                    {at: self.best_score},
                    [at, n, *range(n)],
                    tolerance=self.tolerance,
                )
        self.result.kind_alphas = self.chosen

    def trial(self, kinds: Mapping[str, str], kind: str, alpha: Optional[float]) -> float:
        trial = dict(self.chosen, **{kind: alpha})
        per_group = group_alphas(self.stats.groups, kinds, trial)
        metrics = self.evaluate(per_group)
        self.result.kind_trials.append({"kind": kind, "alpha": alpha, "alphas": trial, "metrics": metrics})
        logger.info(
            "SAP %s alpha=%s (others %s): %s=%.4f", kind, alpha, self.chosen, self.metric, metrics[self.metric]
        )
        current = self.score(metrics)
        if current > self.best_score:
            self.best_score, self.result.best_metrics = current, metrics
            self.chosen, self.best_write = trial, per_group
        return current

    def finish(self) -> None:
        """Leave the model at the best write, or exactly as it came when nothing beat it."""
        if self.best_write is None:
            write_weights(self.model, self.originals)
            logger.warning(
                "No alpha improved %s over the uncorrected model (%.4f); the model is left unchanged.",
                self.metric,
                self.result.baseline[self.metric],
            )
        else:
            self.write(self.best_write)
