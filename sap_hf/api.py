"""The one-call entry points: `sap_project` (fixed alpha) and `sap_correct` (select, collect, search).

Both validate everything they can (config, alpha, targets, data) before the first weight is
written, and both are made of the importable pieces: `select_trusted`, `collect_statistics`,
`search_alpha`, and the pure math of `projection`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from torch import nn
from transformers.utils import logging

from .runtime.batching import Collator, subset
from .core.adapters import merge_for_correction
from .core.config import SAPConfig, validate_alpha
from .core.evaluation import accuracy_evaluator
from .core.projection import current_weights, plan_projection, write_weights
from .core.search import AlphaSearchResult, eigenbases, search_alpha
from .core.stats import STATS_FORMAT, ActivationStats, collect_statistics, raise_on_any_process, unwrap
from .core.targets import check_layer_kinds, classifier_names, find_target_modules, group_alphas, group_kinds, layer_kind
from .core.selection import select_trusted

logger = logging.get_logger(__name__)


@dataclass
class SAPResult:
    """What a correction measured: the alpha of each round, every alpha's eval metrics, the targets.

    `trusted_indices` (positions in the selection data, or the `key`s of a keyed stream) make the run reproducible and let the same
    trusted samples be reused, e.g. to fine-tune on them after SAP.

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
    alpha: Optional[Union[float, Mapping[str, Optional[float]]]] = None,
    config: Optional[SAPConfig] = None,
    accelerator: Any = None,
    *,
    collate_fn: Optional[Collator] = None,
    stats: Optional[ActivationStats] = None,
) -> nn.Module:
    """Correct `model` in place with SAP at a fixed `alpha` and return it.

    `trusted` is a dataset or an iterable of examples/batches with `pixel_values` (the trusted
    samples). `alpha` defaults to the single value of `config.alphas`; a mapping layer kind ->
    alpha (`{"attention": 100, "mlp": None, "classifier": 1000}`, None or absent = unchanged) gives
    each kind its own, e.g. the `kind_alphas` a `sap_correct(alpha_scope="per_kind")` chose. With
    `config.num_rounds > 1`, statistics are re-collected on the projected model and alpha is
    multiplied by `config.alpha_growth` each round. `stats` skips the first data pass.
    A PEFT (LoRA) model is merged first (SAP corrects W + s·B·A) and the merged plain model is
    returned: use and save that one, the PEFT wrapper would save only adapters.
    """
    config = config or SAPConfig()
    if alpha is None:
        if len(config.alphas) != 1:
            raise ValueError(
                f"alpha=None needs a single value in config.alphas, got {config.alphas}; pass alpha= or use "
                "sap_correct() to search the grid on an eval set."
            )
        alpha = config.alphas[0]
    if isinstance(alpha, Mapping):
        check_layer_kinds(alpha)
        alpha = {kind: None if a is None else validate_alpha(a, f"alpha[{kind!r}]") for kind, a in alpha.items()}
    else:
        alpha = validate_alpha(alpha)
    base = unwrap(model, accelerator)
    model, base = merge_for_correction(model, base)  # PEFT: correct the merged W + s·B·A (core/adapters.py)
    if stats is not None:
        stats.check_model(base, "The given stats")
    targets = stats.target_modules if stats is not None else _resolve_targets(base, config)
    if isinstance(alpha, Mapping):  # before any data pass: a mapping that projects nothing is a mistake
        heads = classifier_names(base)
        present = {layer_kind(name, heads) for name in targets}
        projected = {kind for kind, a in alpha.items() if a is not None}
        if projected - present:
            raise ValueError(
                f"alpha={alpha!r} names layer kind(s) {sorted(projected - present)} that no target has "
                "(is project_classifier=False, or do target_modules exclude them?); drop those keys."
            )
        if not projected & present:
            raise ValueError(
                f"alpha={alpha!r} projects no targeted layer: give an alpha to at least one of the kinds present "
                f"{sorted(present)} (with alpha_scope='shared', pass a number instead of result.kind_alphas)."
            )
    with restored_on_failure(base, targets):
        for round_index in range(config.num_rounds):
            if stats is None or round_index > 0:
                stats = _collect(base, trusted, targets, config, accelerator=accelerator, collate_fn=collate_fn)
            growth = config.alpha_growth**round_index
            if isinstance(alpha, Mapping):
                shown: Any = {k: None if a is None else a * growth for k, a in alpha.items()}
                round_alpha: Any = group_alphas(stats.groups, group_kinds(stats.groups, classifier_names(base)), shown)
            else:
                shown = round_alpha = alpha * growth
            plan = plan_projection(current_weights(base, stats.target_modules), stats.groups, eigenbases(stats), round_alpha)
            write_weights(base, plan)
            logger.info("SAP round %d: projected %d layers with alpha=%s.", round_index + 1, len(plan), shown)
    return model


@contextlib.contextmanager
def restored_on_failure(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Several rounds write several times: any failure restores the weights from before the first."""
    originals = current_weights(model, names)
    try:
        yield
    except BaseException:
        write_weights(model, originals)
        raise


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
    greater_is_better: bool = True,
    selection_model: Optional[nn.Module] = None,
    trusted_indices: Optional[Sequence[Union[int, str]]] = None,
    stats_path: Optional[Union[str, Path]] = None,
    on_evaluate: Optional[Callable[[Optional[float], Mapping[str, float]], None]] = None,
    show_progress: bool = True,
) -> SAPResult:
    """The whole correction: trusted selection -> statistics -> alpha search -> write.

    `train_data` is the (noisy) labelled data to pick trusted samples from; `eval_data` a clean
    labelled set to pick alpha on (or give `evaluate_fn(model) -> metrics`). `trusted_indices`
    skips selection. `greater_is_better` says which way `metric` improves. `stats_path`: statistics are loaded from it when the file exists
    (re-tune alpha without a data pass, or resume an interrupted run) and saved to it otherwise; it is
    checked (`check_stats_path`) before any data is read.
    The model is left at the best alpha, or unchanged when no alpha beats it on the eval set.
    A PEFT (LoRA) model is merged first: `result.model` is the corrected plain model to save.
    """
    config = config or SAPConfig()
    if evaluate_fn is None:
        if eval_data is None:
            raise ValueError("sap_correct needs eval_data= (a clean labelled set) or evaluate_fn= to choose alpha.")
        evaluate_fn = accuracy_evaluator(
            eval_data, batch_size=config.batch_size, accelerator=accelerator, collate_fn=collate_fn
        )
    base = unwrap(model, accelerator)
    model, base = merge_for_correction(model, base)  # PEFT: correct the merged W + s·B·A (core/adapters.py)
    targets = _resolve_targets(base, config)
    stats, selection = None, None
    if stats_path is not None:  # before any data is read: a wrong path must not cost a data pass
        check_stats_path(stats_path, writable=_is_main(accelerator))
    if stats_path is not None and _cached_on_main(stats_path, accelerator):
        stats = _load_stats(stats_path)
        stats.check_model(base, f"The statistics in stats_path={str(stats_path)!r}")
        trusted_indices = stats.meta.get("trusted_indices", trusted_indices)
        logger.info("Loaded SAP statistics from %s: no data pass needed.", stats_path)
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
    if selection is not None and selection.examples is not None:
        trusted: Any = selection.examples  # a stream's trusted examples, kept by the selection pass: no second read
    else:
        trusted = subset(train_data, trusted_indices) if trusted_indices is not None and train_data is not None else None
    if trusted is None and config.num_rounds > 1:
        raise ValueError(
            f"config.num_rounds={config.num_rounds} re-collects statistics each round, which needs the trusted "
            "data: pass train_data= (and trusted_indices= or a stats_path saved by sap_correct), or use num_rounds=1."
        )
    per_class = dict(selection.per_class) if selection is not None else stats.meta.get("trusted_per_class", {}) if stats else {}

    rounds: list[AlphaSearchResult] = []
    with restored_on_failure(base, targets):
        for round_index in range(config.num_rounds):
            if stats is None or round_index > 0:
                stats = _collect(
                    base, trusted, targets, config, accelerator=accelerator, collate_fn=collate_fn, show_progress=show_progress
                )
                if round_index == 0 and stats_path is not None:
                    stats.meta.update(trusted_indices=list(trusted_indices), trusted_per_class=per_class)
                    _save_on_main(stats, stats_path, accelerator)
            grid = [a * config.alpha_growth**round_index for a in config.alphas]
            kinds = group_kinds(stats.groups, classifier_names(base)) if config.alpha_scope == "per_kind" else None
            search = search_alpha(
                base, stats, grid, evaluate_fn, metric=metric, greater_is_better=greater_is_better,
                on_evaluate=on_evaluate, kinds=kinds, method=config.alpha_search,
                tolerance=config.alpha_search_tolerance,
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
        num_trusted=len(trusted_indices) if trusted_indices is not None else 0,
        trusted_per_class={int(k): v for k, v in per_class.items()},
        config=config.to_dict(),
        trusted_indices=[_identity(i) for i in trusted_indices] if trusted_indices is not None else [],
    )
    result.model = model  # the corrected model (for PEFT: the merged one, not the consumed wrapper)
    return result


def _identity(value: Any) -> Union[int, str]:
    """A trusted sample's identity as JSON keeps it: a position (int) or a stream's key (str)."""
    return value if isinstance(value, str) else int(value)


def _cached_on_main(path: Union[str, Path], accelerator: Any) -> bool:
    """Whether the statistics cache exists, as the main process sees it (all processes agree)."""
    exists = Path(path).is_file()
    if accelerator is None or accelerator.num_processes == 1:
        return exists
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([exists], from_process=0)[0])


def _save_on_main(stats: ActivationStats, path: Union[str, Path], accelerator: Any) -> None:
    error = None
    if _is_main(accelerator):
        try:
            stats.save(path)
        except Exception as err:
            error = err
    raise_on_any_process(error, accelerator)


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def check_stats_path(stats_path: Union[str, Path], writable: bool = True) -> bool:
    """Check a statistics cache path before any data is read; True when it holds statistics to load.

    Raises a ValueError naming `stats_path` and the fix when the path is a directory, when an
    existing file is not a readable SAP statistics file (only its header is read here), or (with
    `writable`) when the statistics could not be saved there after the data pass.
    """
    path = Path(stats_path)
    if path.is_dir():
        raise ValueError(
            f"stats_path={str(stats_path)!r} is a directory; the SAP statistics are one file: pass a file path "
            f"such as {str(path / 'sap_stats.safetensors')!r}."
        )
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as err:  # SafetensorError, OSError, ...: the file is not what stats_path promises
            raise _unreadable_stats(stats_path, err) from err
        if header.get("format") != STATS_FORMAT:
            raise _unreadable_stats(stats_path, f"format={header.get('format')!r}, expected {STATS_FORMAT!r}")
        return True
    if writable:
        folder = next(parent for parent in path.absolute().parents if parent.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(
                f"stats_path={str(stats_path)!r} cannot be written: {str(folder)!r} is not a writable folder. Pass a "
                "stats_path in a folder you can write to (the statistics are saved there after the data pass)."
            )
    return False


def _load_stats(stats_path: Union[str, Path]) -> ActivationStats:
    try:
        return ActivationStats.load(stats_path)
    except Exception as err:
        raise _unreadable_stats(stats_path, err) from err


def _unreadable_stats(stats_path: Union[str, Path], reason: Any) -> ValueError:
    detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
    return ValueError(
        f"stats_path={str(stats_path)!r} is not a readable SAP statistics file ({detail}). Delete it to collect the "
        "statistics anew, or pass another stats_path."
    )
