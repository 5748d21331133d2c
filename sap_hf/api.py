"""The one-call entry points: `sap_project` (fixed alpha) and `sap_correct` (select, collect, search).

Both validate everything they can (config, alpha, targets, data) before the first weight is
written, and both are made of the importable pieces: `select_trusted`, `collect_statistics`,
`search_alpha`, and the pure math of `projection`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import nn
from transformers.utils import logging

from .batching import Collator, subset
from .config import SAPConfig, validate_alpha
from .evaluation import accuracy_evaluator
from .projection import current_weights, plan_projection, write_weights
from .search import AlphaSearchResult, eigenbases, search_alpha
from .stats import ActivationStats, collect_statistics
from .targets import find_target_modules
from .trusted import TrustedSelection, select_trusted

logger = logging.get_logger(__name__)


@dataclass
class SAPResult:
    """What a correction measured: the alpha of each round, every alpha's eval metrics, the targets."""

    alphas: list[Optional[float]]
    rounds: list[AlphaSearchResult]
    baseline_metrics: dict[str, float]
    final_metrics: dict[str, float]
    target_modules: list[str]
    num_trusted: int
    trusted_per_class: dict[int, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def alpha(self) -> Optional[float]:
        """The first round's chosen alpha (None: SAP left the model unchanged)."""
        return self.alphas[0] if self.alphas else None

    @property
    def changed(self) -> bool:
        return any(a is not None for a in self.alphas)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["alpha"] = self.alpha
        record["changed"] = self.changed
        return record


def _resolve_targets(model: nn.Module, config: SAPConfig) -> list[str]:
    return find_target_modules(model, config.target_modules, config.exclude_modules, config.project_classifier)


def _collect(model: nn.Module, data: Any, targets: Sequence[str], config: SAPConfig, **kwargs: Any) -> ActivationStats:
    return collect_statistics(
        model,
        data,
        targets,
        batch_size=config.batch_size,
        max_tokens_per_sample=config.max_tokens_per_sample,
        accumulation_dtype=config.accumulation_dtype,
        seed=config.sampling_seed,
        **kwargs,
    )


def sap_project(
    model: nn.Module,
    trusted: Any,
    alpha: Optional[float] = None,
    config: Optional[SAPConfig] = None,
    accelerator: Any = None,
    *,
    collate_fn: Optional[Collator] = None,
    stats: Optional[ActivationStats] = None,
) -> nn.Module:
    """Correct `model` in place with SAP at a fixed `alpha` and return it.

    `trusted` is a dataset or an iterable of examples/batches with `pixel_values` (the trusted
    samples). `alpha` defaults to the single value of `config.alphas`. With
    `config.num_rounds > 1`, statistics are re-collected on the projected model and alpha is
    multiplied by `config.alpha_growth` each round. `stats` skips the first data pass.
    """
    config = config or SAPConfig()
    if alpha is None:
        if len(config.alphas) != 1:
            raise ValueError(
                f"alpha=None needs a single value in config.alphas, got {config.alphas}; pass alpha= or use "
                "sap_correct() to search the grid on an eval set."
            )
        alpha = config.alphas[0]
    alpha = validate_alpha(alpha)
    base = accelerator.unwrap_model(model) if accelerator is not None else model
    targets = stats.target_modules if stats is not None else _resolve_targets(base, config)
    for round_index in range(config.num_rounds):
        if stats is None or round_index > 0:
            stats = _collect(base, trusted, targets, config, accelerator=accelerator, collate_fn=collate_fn)
        round_alpha = alpha * config.alpha_growth**round_index
        plan = plan_projection(current_weights(base, stats.target_modules), stats.groups, eigenbases(stats), round_alpha)
        write_weights(base, plan)
        logger.info("SAP round %d: projected %d layers with alpha=%g.", round_index + 1, len(plan), round_alpha)
    return model


def sap_correct(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: Optional[SAPConfig] = None,
    accelerator: Any = None,
    *,
    collate_fn: Optional[Collator] = None,
    evaluate_fn: Optional[Callable[[nn.Module], Mapping[str, float]]] = None,
    metric: str = "accuracy",
    selection_model: Optional[nn.Module] = None,
    trusted_indices: Optional[Sequence[int]] = None,
    stats_path: Optional[Union[str, Path]] = None,
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]] = None,
    show_progress: bool = True,
) -> SAPResult:
    """The whole correction: trusted selection -> statistics -> alpha search -> write.

    `train_data` is the (noisy) labelled data to pick trusted samples from; `eval_data` a clean
    labelled set to pick alpha on (or give `evaluate_fn(model) -> metrics`). `trusted_indices`
    skips selection. `stats_path`: statistics are loaded from it when the file exists
    (re-tune alpha without a data pass, or resume an interrupted run) and saved to it otherwise.
    The model is left at the best alpha, or unchanged when no alpha beats it on the eval set.
    """
    config = config or SAPConfig()
    if evaluate_fn is None:
        if eval_data is None:
            raise ValueError("sap_correct needs eval_data= (a clean labelled set) or evaluate_fn= to choose alpha.")
        evaluate_fn = accuracy_evaluator(
            eval_data, batch_size=config.batch_size, accelerator=accelerator, collate_fn=collate_fn
        )
    base = accelerator.unwrap_model(model) if accelerator is not None else model
    targets = _resolve_targets(base, config)
    stats = None
    if stats_path is not None and Path(stats_path).is_file():
        stats = ActivationStats.load(stats_path)
        logger.info("Loaded SAP statistics from %s: no data pass needed.", stats_path)
        selection = None
    elif trusted_indices is None:
        selection = select_trusted(
            base,
            train_data,
            config.trusted_per_class,
            rule=config.selection_rule,
            selection_model=selection_model,
            batch_size=config.batch_size,
            accelerator=accelerator,
            collate_fn=collate_fn,
            show_progress=show_progress,
        )
        trusted_indices = selection.indices
    else:
        selection = None
    trusted = subset(train_data, trusted_indices) if trusted_indices is not None else None
    if trusted is None and config.num_rounds > 1:
        raise ValueError(
            f"config.num_rounds={config.num_rounds} re-collects statistics each round, which needs the trusted "
            "data: pass trusted_indices= together with stats_path=, or use num_rounds=1."
        )

    rounds: list[AlphaSearchResult] = []
    for round_index in range(config.num_rounds):
        if stats is None or round_index > 0:
            stats = _collect(
                base, trusted, targets, config, accelerator=accelerator, collate_fn=collate_fn, show_progress=show_progress
            )
            if round_index == 0 and stats_path is not None and _is_main(accelerator):
                stats.save(stats_path)
        grid = [a * config.alpha_growth**round_index for a in config.alphas]
        search = search_alpha(base, stats, grid, evaluate_fn, metric=metric, on_evaluate=on_evaluate)
        rounds.append(search)
        if not search.improved:
            break
    return SAPResult(
        alphas=[r.best_alpha for r in rounds],
        rounds=rounds,
        baseline_metrics=rounds[0].baseline,
        final_metrics=rounds[-1].best_metrics,
        target_modules=list(stats.target_modules),
        num_trusted=len(trusted_indices) if trusted_indices is not None else 0,
        trusted_per_class=dict(selection.per_class) if selection is not None else {},
        config=config.to_dict(),
    )


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process
