"""The one-call entry points: `sap_project` (fixed alpha) and `sap_correct` (select, collect, search).

Both validate everything they can (config, alpha, model, data, targets) before the first weight
is written, and both are made of the importable pieces: `select_trusted`, `collect_statistics`,
`search_alpha`, and the pure math of `core.projection`. Every data pass runs on one `Runtime`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn
from transformers.utils import logging

from .core.adapters import merge_for_correction
from .core.cache import (
    GIVEN_KEY,
    OPTIONS_KEY,
    cached_statistics,
    check_statistics_options,
    check_stats_path,
    save_statistics,
    statistics_options,
)
from .core.config import SAPConfig, validate_alpha
from .core.projection import current_weights, plan_projection, write_weights
from .core.search import AlphaSearchResult, eigenbases, search_alpha
from .core.selection import check_selection_model, select_trusted
from .core.stats import ActivationStats, collect_statistics
from .core.targets import (
    check_classifier,
    check_layer_kinds,
    classifier_names,
    find_target_modules,
    group_alphas,
    group_kinds,
    layer_kind,
)
from .evaluation import accuracy_evaluator
from .runtime.batching import subset
from .runtime.contract import as_pass_data
from .runtime.passes import Runtime


logger = logging.get_logger(__name__)

EvaluateFn = Callable[[nn.Module], Mapping[str, float]]


@dataclass
class SAPResult:
    """What a correction measured: the alpha of each round, every alpha's eval metrics, the targets.

    `trusted_indices` (positions in the selection data, or the `key`s of a keyed stream) make the run
    reproducible and let the same trusted samples be reused, e.g. to fine-tune on them after SAP.
    `timings` are the wall seconds of each phase: "selection", "statistics", "evaluation" (every
    evaluation of the alpha search), "eigh" (eigendecompositions and `W U`), "write" (the final
    weights) and "search" (the whole alpha search, its evaluations, eigh and write included).

    `model` (set by `sap_correct`, not a field: `asdict`/`to_dict` must not copy it) is the corrected
    model: the one given, or for a PEFT model the merged plain model (save that one whole).
    """

    alphas: list[Optional[float]]
    rounds: list[AlphaSearchResult]
    baseline_metrics: dict[str, float]
    final_metrics: dict[str, float]
    target_modules: list[str]
    num_trusted: int
    trusted_per_class: dict[int, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    trusted_indices: list[Union[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    model = None  # Optional[nn.Module], not annotated so that it is no dataclass field

    @property
    def alpha(self) -> Optional[float]:
        """The first round's best shared alpha (None: no shared alpha beat the unchanged model).

        With `alpha_scope="shared"` this is what was written. With "per_kind" it is where the
        per-kind pass started; what was written is `kind_alphas`.
        """
        return self.alphas[0] if self.alphas else None

    @property
    def kind_alphas(self) -> dict[str, Optional[float]]:
        """With `alpha_scope="per_kind"`: the first round's written alpha per layer kind (None: that kind
        unchanged), which `sap_project(alpha=...)` reproduces; {} with "shared". Later rounds: `rounds[i].kind_alphas`."""
        return dict(self.rounds[0].kind_alphas) if self.rounds else {}

    @property
    def changed(self) -> bool:
        return any(r.improved for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["alpha"] = self.alpha
        record["kind_alphas"] = self.kind_alphas
        record["changed"] = self.changed
        return record


def _resolve_targets(model: nn.Module, config: SAPConfig) -> list[str]:
    return find_target_modules(model, config.target_modules, config.exclude_modules, config.project_classifier)


def _collect(
    model: nn.Module, data: Any, targets: Sequence[str], config: SAPConfig, runtime: Runtime
) -> ActivationStats:
    return collect_statistics(
        model,
        data,
        targets,
        runtime=runtime,
        max_tokens_per_sample=config.max_tokens_per_sample,
        accumulation_dtype=config.accumulation_dtype,
        seed=config.sampling_seed,
    )


def sap_project(
    model: nn.Module,
    trusted: Any,
    alpha: Optional[Union[float, Mapping[str, Optional[float]]]] = None,
    config: Optional[SAPConfig] = None,
    runtime: Optional[Runtime] = None,
    *,
    stats: Optional[ActivationStats] = None,
    **run_options: Any,
) -> nn.Module:
    """Correct `model` in place with SAP at a fixed `alpha` and return it.

    `trusted` is a dataset or an iterable of examples/batches with `pixel_values` (the trusted
    samples). `alpha` defaults to the single value of `config.alphas`; a mapping layer kind ->
    alpha (`{"attention": 100, "mlp": None, "classifier": 1000}`, None or absent = unchanged) gives
    each kind its own, e.g. the `kind_alphas` a `sap_correct(alpha_scope="per_kind")` chose. With
    `config.num_rounds > 1`, statistics are re-collected on the projected model and alpha is
    multiplied by `config.alpha_growth` each round. `stats` skips the first data pass.
    A PEFT (LoRA) model is merged first and the merged plain model is returned: save that one.
    `runtime` is the run, as in `sap_correct` (its accelerator, collate_fn and progress; the batch size is
    `config.batch_size`); the former `accelerator=` (or an accelerator in fifth place) and `collate_fn=` still
    make it, with a deprecation warning.
    """
    config = config or SAPConfig()
    alpha = _fixed_alpha(alpha, config)
    runtime = _correction_runtime(config, runtime, run_options, "sap_project")
    base = runtime.unwrap(model)
    model, base = merge_for_correction(model, base)  # PEFT: correct the merged W + s·B·A (core/adapters.py)
    check_classifier(base)
    if stats is not None:
        stats.check_model(base, "The given stats")
    trusted = as_pass_data(trusted, "trusted") if stats is None or config.num_rounds > 1 else trusted
    targets = stats.target_modules if stats is not None else _resolve_targets(base, config)
    if isinstance(alpha, Mapping):
        _check_kinds_present(alpha, targets, classifier_names(base))
    with restored_on_failure(base, targets):
        for round_index in range(config.num_rounds):
            if stats is None or round_index > 0:
                stats = _collect(base, trusted, targets, config, runtime)
            growth = config.alpha_growth**round_index
            if isinstance(alpha, Mapping):
                shown: Any = {k: None if a is None else a * growth for k, a in alpha.items()}
                round_alpha: Any = group_alphas(stats.groups, group_kinds(stats.groups, classifier_names(base)), shown)
            else:
                shown = round_alpha = alpha * growth
            plan = plan_projection(
                current_weights(base, stats.target_modules), stats.groups, eigenbases(stats), round_alpha
            )
            write_weights(base, plan)
            logger.info("SAP round %d: projected %d layers with alpha=%s.", round_index + 1, len(plan), shown)
    return model


def _fixed_alpha(alpha: Any, config: SAPConfig) -> Union[float, dict[str, Optional[float]]]:
    """`alpha` validated: one number, or a mapping layer kind -> alpha (None = unchanged)."""
    if alpha is None:
        if len(config.alphas) != 1:
            raise ValueError(
                f"alpha=None needs a single value in config.alphas, got {config.alphas}; pass alpha= or use "
                "sap_correct() to search the grid on an eval set."
            )
        alpha = config.alphas[0]
    if isinstance(alpha, Mapping):
        check_layer_kinds(alpha)
        return {kind: None if a is None else validate_alpha(a, f"alpha[{kind!r}]") for kind, a in alpha.items()}
    return validate_alpha(alpha)


def _check_kinds_present(alpha: Mapping[str, Optional[float]], targets: Sequence[str], heads: Sequence[str]) -> None:
    """Before any data pass: a mapping that projects nothing, or names absent kinds, is a mistake."""
    present = {layer_kind(name, heads) for name in targets}
    projected = {kind for kind, a in alpha.items() if a is not None}
    if projected - present:
        raise ValueError(
            f"alpha={dict(alpha)!r} names layer kind(s) {sorted(projected - present)} that no target has "
            "(is project_classifier=False, or do target_modules exclude them?); drop those keys."
        )
    if not projected & present:
        raise ValueError(
            f"alpha={dict(alpha)!r} projects no targeted layer: give an alpha to at least one of the kinds present "
            f"{sorted(present)} (with alpha_scope='shared', pass a number instead of result.kind_alphas)."
        )


@contextlib.contextmanager
def restored_on_failure(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Several rounds write several times: any failure restores the weights from before the first."""
    originals = current_weights(model, names)
    try:
        yield
    except BaseException:
        write_weights(model, originals)
        raise


def _search_round(
    base: nn.Module,
    stats: ActivationStats,
    round_index: int,
    config: SAPConfig,
    runtime: Runtime,
    evaluate_fn: EvaluateFn,
    metric: str,
    greater_is_better: Optional[bool],
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]],
) -> AlphaSearchResult:
    """One round's alpha search on `stats`: the grid grown by `alpha_growth` per round, one alpha per layer kind
    when `alpha_scope="per_kind"`; timed as "search" (its evaluations included)."""
    grid = [a * config.alpha_growth**round_index for a in config.alphas]
    kinds = group_kinds(stats.groups, classifier_names(base)) if config.alpha_scope == "per_kind" else None
    with runtime.timed("search"):
        return search_alpha(
            base,
            stats,
            grid,
            evaluate_fn,
            metric=metric,
            greater_is_better=greater_is_better,
            on_evaluate=on_evaluate,
            kinds=kinds,
            method=config.alpha_search,
            tolerance=config.alpha_search_tolerance,
            on_phase=runtime.record,
        )


def sap_correct(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: Optional[SAPConfig] = None,
    runtime: Optional[Runtime] = None,
    *,
    evaluate_fn: Optional[EvaluateFn] = None,
    metric: str = "accuracy",
    greater_is_better: Optional[bool] = None,
    selection_model: Optional[nn.Module] = None,
    trusted_indices: Optional[Sequence[Union[int, str]]] = None,
    stats_path: Optional[Union[str, Path]] = None,
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]] = None,
    **run_options: Any,
) -> SAPResult:
    """The whole correction: trusted selection -> statistics -> alpha search -> write.

    `train_data` is the (noisy) labelled data to pick trusted samples from; `eval_data` a clean
    labelled set to pick alpha on (or give `evaluate_fn(model) -> metrics`). `config` says what SAP
    does, `runtime` how the data passes run (`Runtime(accelerator=, collate_fn=, show_progress=,
    on_phase=)`; default: this process alone, `default_data_collator`, a progress bar): its batch size
    is `config.batch_size`, and `on_phase(phase, seconds)` is called after each phase
    (`SAPResult.timings` sums this call's). `trusted_indices` skips selection. `greater_is_better`
    says which way `metric` improves (default: as `TrainingArguments` says, a "loss" is minimised).
    `stats_path`: statistics are loaded from it when the file exists (re-tune alpha without a data
    pass, or resume an interrupted run) and saved to it otherwise; it is checked before any data is
    read. `on_evaluate(alpha, metrics)` follows each shared-alpha evaluation of the search (not the
    per-kind trials, which `SAPResult.rounds[...].kind_trials` holds).
    The model is left at the best alpha, or unchanged when no alpha beats it on the eval set.
    A PEFT (LoRA) model is merged first: `result.model` is the corrected plain model to save.

    Older calls still work: `accelerator=`, `collate_fn=`, `show_progress=` and `on_phase=` (or an
    accelerator in `runtime`'s place) make the `Runtime`, with a deprecation warning.
    """
    config = config or SAPConfig()
    trusted_indices = _given_indices(trusted_indices)
    runtime = _correction_runtime(config, runtime, run_options, "sap_correct")
    # What the caller gave is checked before the PEFT merge, which changes the caller's model.
    evaluate_fn = _evaluator(evaluate_fn, eval_data, runtime)
    _check_selection_inputs(config, runtime, selection_model, trusted_indices, stats_path)
    train_data = None if train_data is None else as_pass_data(train_data, "train_data")
    base = runtime.unwrap(model)
    model, base = merge_for_correction(model, base)  # PEFT: correct the merged W + s·B·A (core/adapters.py)
    check_classifier(base)
    targets = _resolve_targets(base, config)
    cached = _TrustedStatistics.load_cache(base, config, runtime, stats_path, trusted_indices)
    trusted = _TrustedSamples.make(base, train_data, config, runtime, selection_model, trusted_indices, cached)
    statistics = _TrustedStatistics(trusted, config, runtime, cached, stats_path)
    rounds: list[AlphaSearchResult] = []
    with restored_on_failure(base, targets):
        for round_index in range(config.num_rounds):
            stats = statistics.of_round(base, targets, round_index)
            search = _search_round(
                base, stats, round_index, config, runtime, evaluate_fn, metric, greater_is_better, on_evaluate
            )
            rounds.append(search)
            if not search.improved:
                break
    result = SAPResult(
        alphas=[r.best_alpha for r in rounds],
        rounds=rounds,
        baseline_metrics=rounds[0].baseline,
        final_metrics=rounds[-1].best_metrics,
        target_modules=list(stats.target_modules),
        num_trusted=trusted.num_trusted,
        trusted_per_class={int(k): v for k, v in trusted.per_class.items()},
        config=config.to_dict(),
        trusted_indices=trusted.identities(),
        timings=dict(runtime.timings),
    )
    result.model = model  # the corrected model (for PEFT: the merged one, not the consumed wrapper)
    return result


def _given_indices(trusted_indices: Any) -> Optional[list[Any]]:
    """`trusted_indices` as Python ints (positions) or strs (keys). A tensor's elements are 0-d tensors, which hash by
    identity and print as 'tensor(2)': a stream matched none of them ("The trusted data is empty") and a stats_path
    cache of the very same samples was refused as "other" samples."""
    if trusted_indices is None:
        return None
    values = trusted_indices.tolist() if hasattr(trusted_indices, "tolist") else list(trusted_indices)
    return [value.item() if hasattr(value, "item") else value for value in values]


def _check_selection_inputs(
    config: SAPConfig,
    runtime: Runtime,
    selection_model: Optional[nn.Module],
    trusted_indices: Optional[list[Any]],
    stats_path: Optional[Union[str, Path]],
) -> None:
    """`stats_path` (before any data is read: a wrong path must not cost a data pass) and, when a selection will run
    (no trusted samples given, no cache file), whether it can: no recorded losses here, a rule that reads
    `selection_model` exactly when one is given."""
    if stats_path is not None:
        check_stats_path(stats_path, writable=runtime.is_main)
    if trusted_indices is not None or (stats_path is not None and Path(stats_path).is_file()):
        return
    if config.trusted_source == "training":
        raise ValueError(
            "config.trusted_source='training' selects from the losses SAPTrainer.train() records, which "
            "sap_correct does not have: use SAPTrainer.correct(), pass trusted_indices=, or use trusted_source='pass'."
        )
    check_selection_model(config.selection_rule, selection_model)


_RUN_OPTIONS = ("accelerator", "collate_fn", "show_progress", "on_phase")
"""`sap_correct`'s former keywords for what is now its `Runtime`."""


def _correction_runtime(config: SAPConfig, runtime: Any, options: dict[str, Any], function: str) -> Runtime:
    """The run of one correction: `runtime` (or one made of the former keywords) at `config.batch_size`, timed anew.

    `function` names the caller (`sap_correct`, `sap_project`) in the errors and the deprecation warning.
    """
    unknown = sorted(set(options) - set(_RUN_OPTIONS))
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if runtime is not None and not isinstance(runtime, Runtime):  # an accelerator, where the fifth argument was one
        if "accelerator" in options:
            raise TypeError(f"{function}() got multiple values for argument 'accelerator'")
        options, runtime = {"accelerator": runtime, **options}, None
    if options:
        if runtime is not None:
            raise TypeError(
                f"{function}() got runtime= and {', '.join(f'{k}=' for k in options)}: set those in the Runtime."
            )
        logger.warning_once(
            f"{function}(accelerator=, collate_fn=, show_progress=, on_phase=) is deprecated: pass "
            "runtime=sap_hf.Runtime(accelerator=..., collate_fn=..., show_progress=..., on_phase=...) instead."
        )
        runtime = Runtime(**options)
    runtime = runtime if runtime is not None else Runtime()
    return replace(runtime, batch_size=config.batch_size, timings={})


def _evaluator(evaluate_fn: Optional[EvaluateFn], eval_data: Any, runtime: Runtime) -> EvaluateFn:
    """The alpha search's evaluation: `evaluate_fn` (timed as "evaluation"), or accuracy on `eval_data`."""
    if evaluate_fn is not None:

        def timed(model: nn.Module) -> Mapping[str, float]:
            with runtime.timed("evaluation"):
                return evaluate_fn(model)

        return timed
    if eval_data is None:
        raise ValueError("sap_correct needs eval_data= (a clean labelled set) or evaluate_fn= to choose alpha.")
    return accuracy_evaluator(as_pass_data(eval_data, "eval_data"), runtime.replace(show_progress=False))


@dataclass
class _TrustedSamples:
    """Which samples are trusted: selected, given as `trusted_indices`, or those a statistics cache was made on.

    `indices` are their identities (positions, or a stream's keys), `examples` the samples themselves
    (None when only the cache holds them), `given` whether the caller named them (no selection).
    """

    indices: Optional[list[Any]] = None
    per_class: dict[int, int] = field(default_factory=dict)
    examples: Any = None
    given: bool = False

    @classmethod
    def make(
        cls,
        base: nn.Module,
        train_data: Any,
        config: SAPConfig,
        runtime: Runtime,
        selection_model: Optional[nn.Module],
        trusted_indices: Optional[Sequence[Any]],
        cached: Optional[ActivationStats],
    ) -> _TrustedSamples:
        trusted = cls(given=trusted_indices is not None)
        if cached is not None:
            trusted_indices = cached.meta.get("trusted_indices", trusted_indices)
            trusted.per_class = cached.meta.get("trusted_per_class", {})
        elif trusted_indices is None:  # no cache file: sap_correct refused trusted_source='training' before
            selection = select_trusted(
                base,
                train_data,
                config.trusted_per_class,
                rule=config.selection_rule,
                selection_model=selection_model,
                runtime=runtime,
                seed=config.sampling_seed,
                subset=config.selection_subset,
            )
            trusted_indices, trusted.per_class = selection.indices, dict(selection.per_class)
            trusted.examples = (
                selection.examples
            )  # a stream's trusted examples, kept by the selection pass: no second read
        trusted.indices = list(trusted_indices) if trusted_indices is not None else None
        if trusted.examples is None and trusted.indices is not None and train_data is not None:
            trusted.examples = subset(train_data, trusted.indices)
        if trusted.examples is None and (cached is None or config.num_rounds > 1):
            raise ValueError(
                f"config.num_rounds={config.num_rounds} re-collects statistics each round, which needs the trusted "
                "data: pass train_data= (and trusted_indices= or a stats_path saved by sap_correct), or use num_rounds=1."
                if cached is not None
                else "sap_correct needs train_data= to select the trusted samples from."
            )
        return trusted

    def check_count(self, stats: ActivationStats) -> None:
        """Given trusted_indices must all exist: a stream's missing keys/positions would otherwise be dropped silently."""
        seen, asked = stats.meta.get("samples"), len(set(self.indices)) if self.indices is not None else None
        if asked is not None and seen is not None and seen < asked:
            raise ValueError(
                f"trusted_indices name {asked} samples but the data holds only {seen} of them: pass positions (or keys) "
                "of this data, e.g. result.trusted_indices of a run on the same data. No weight was changed."
            )

    @property
    def num_trusted(self) -> int:
        return len(self.indices) if self.indices is not None else 0

    def identities(self) -> list[Union[int, str]]:
        """The trusted samples' identities as JSON keeps them: positions (int) or a stream's keys (str)."""
        return [i if isinstance(i, str) else int(i) for i in self.indices] if self.indices is not None else []


@dataclass
class _TrustedStatistics:
    """The trusted samples' statistics: round 0 from the cache (`stats_path`) or a pass saved to it, later rounds
    a pass on the projected model."""

    trusted: _TrustedSamples
    config: SAPConfig
    runtime: Runtime
    cached: Optional[ActivationStats] = None
    stats_path: Optional[Union[str, Path]] = None

    @staticmethod
    def load_cache(
        base: nn.Module,
        config: SAPConfig,
        runtime: Runtime,
        stats_path: Optional[Union[str, Path]],
        trusted_indices: Optional[Sequence[Any]],
    ) -> Optional[ActivationStats]:
        """The statistics in `stats_path` (checked by `check_stats_path` already), checked against the model and this
        run's options; None: no file yet."""
        cached = cached_statistics(stats_path, runtime)
        if cached is not None:
            cached.check_model(base, f"The statistics in stats_path={str(stats_path)!r}")
            check_statistics_options(cached, config, stats_path, trusted_indices)
            logger.info("Loaded SAP statistics from %s: no data pass needed.", stats_path)
        return cached

    def of_round(self, base: nn.Module, targets: Sequence[str], round_index: int) -> ActivationStats:
        """Round 0: the cache or a new pass (saved to the cache); later rounds: a pass on the projected model."""
        if round_index == 0 and self.cached is not None:
            return self.cached
        stats = _collect(base, self.trusted.examples, targets, self.config, self.runtime)
        if round_index == 0:
            self.trusted.check_count(stats)
            if self.stats_path is not None:
                given = self.trusted.given
                stats.meta.update(trusted_indices=self.trusted.identities(), trusted_per_class=self.trusted.per_class)
                stats.meta.update({OPTIONS_KEY: statistics_options(self.config, given), GIVEN_KEY: given})
                save_statistics(stats, self.stats_path, self.runtime)
        return stats
