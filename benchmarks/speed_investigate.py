"""Where `speed.py`'s statistics pass spends its time (a support module, not a script); the protocol is on
`benchmarks/studies/cost.md#speed-and-memory`.

`instrumented_statistics` is the statistics pass with its Gram updates, finalisation and token subsampling timed: a
copy of `collect_statistics`'s loop with a benchmark-side accumulator subclass, so that no library name is rebound
(`matches_library` checks that it returns exactly the library's statistics). `investigate` (`--investigate`) times one
Gram update per block size, the finalisation and allocation of every Gram, and a prototype accumulator (recursive
update, in-place mirror) that the library does NOT use.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Optional

import common
import torch
from speed_memory import release_free_memory
from speed_methods import GRAM_BLOCK, IMAGE, LAYERS, SHAPES, gram_flops_per_token, run_stats, tokens_per_sample


PROTO_METHODS = ["stats_exact_proto", "stats_subsampled_proto"]  # the statistics pass with the prototype accumulator


def timed_accumulator_class(base: type, timers: dict[str, Any]) -> type:
    """A subclass of the accumulator `base` (the library's GramAccumulator or the prototype) whose update and
    result add their seconds to `timers`. Overhead: one perf_counter pair per call (~250 per batch)."""

    class TimedAccumulator(base):
        def update(self, rows: torch.Tensor) -> None:
            start = time.perf_counter()
            super().update(rows)
            timers["gram_update_s"] += time.perf_counter() - start
            timers["update_calls"] += 1

        def result(self) -> torch.Tensor:
            start = time.perf_counter()
            out = super().result()
            timers["gram_result_s"] += time.perf_counter() - start
            return out

    return TimedAccumulator


def instrumented_grams_class():
    """The library's GroupedGrams with a given accumulator class and a timed subsample_tokens. `__call__` is a copy of
    `sap_hf.core.stats.GroupedGrams.__call__` (the one place that names the accumulator class and `subsample_tokens`);
    grouping and the reduction are the library's own methods."""
    from sap_hf.core.stats import GramAccumulator, GroupedGrams, subsample_tokens

    class InstrumentedGrams(GroupedGrams):
        def __init__(self, *args: Any, timers: dict[str, Any], accumulator: type = GramAccumulator, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.timers, self.accumulator_cls = timers, timed_accumulator_class(accumulator, timers)

        def __call__(self, name: str, tensor: torch.Tensor) -> None:
            if self.groups is None:
                self._first_inputs.setdefault(name, tensor)
                if any(held is tensor for held, _ in self._first):
                    return
                accumulator = self.accumulator_cls(tensor.shape[-1], self.dtype, self.device)
                self._first.append((tensor, accumulator))
            elif name in self.accumulators:
                accumulator = self.accumulators[name]
            else:
                return
            start = time.perf_counter()
            rows = subsample_tokens(tensor, self.max_tokens, self.generator)
            self.timers["subsample_s"] += time.perf_counter() - start
            accumulator.update(rows)

    return InstrumentedGrams


def instrumented_statistics(
    model,
    data,
    names,
    batch_size: int,
    cap: Optional[int],
    accumulation_dtype: str = "float32",
    accumulator: Optional[type] = None,
    seed: int = 0,
):
    """`collect_statistics` with timers on GramAccumulator.update / .result and subsample_tokens: `(stats, timers)`.

    A copy of `sap_hf.core.stats.collect_statistics`'s loop for one process, on the library's own `Runtime.run` walk,
    hooks, grouping, reduction and ActivationStats; only the accumulator is a benchmark-side subclass (`accumulator`:
    the library's GramAccumulator by default, or the prototype)."""
    from sap_hf import ActivationStats, Runtime
    from sap_hf.core.stats import GramAccumulator, input_hooks, weights_signature

    timers = {"gram_update_s": 0.0, "gram_result_s": 0.0, "subsample_s": 0.0, "update_calls": 0}
    runtime = Runtime(batch_size=batch_size, show_progress=False)
    dtype = getattr(torch, accumulation_dtype)
    grams_class, base = instrumented_grams_class(), accumulator or GramAccumulator
    with runtime.run(model, data, "statistics", argument="trusted data") as walk:
        generator = torch.Generator().manual_seed(seed + runtime.rank) if cap else None
        grams = grams_class(walk.model, names, dtype, walk.device, cap, generator, timers=timers, accumulator=base)
        with input_hooks(walk.model, grams.names, grams):
            for batch in walk.batches():
                walk.logits(batch)
                grams.fix_groups()
                grams.samples += len(batch)
    if grams.groups is None:
        raise ValueError("instrumented_statistics: the data is empty.")
    gram_of, counts = grams.reduce(grams.groups, runtime)
    signature = weights_signature(walk.model, [n for g in grams.groups for n in g.members])
    meta = {"weights_signature": signature, "samples": grams.samples}
    stats = ActivationStats(groups=grams.groups, grams=gram_of, counts=counts, max_tokens_per_sample=cap, meta=meta)
    return stats, timers


def matches_library(model, data, names, batch_size: int, cap: Optional[int]) -> bool:
    """The instrumented pass returns exactly what the library's `collect_statistics` returns (same Grams, counts, groups)."""
    ours, _ = instrumented_statistics(model, data, names, batch_size, cap)
    library = run_stats(model, data, names, batch_size, cap)
    return (
        ours.groups == library.groups
        and ours.counts == library.counts
        and ours.meta == library.meta
        and all(torch.equal(ours.grams[g], library.grams[g]) for g in library.grams)
    )


def gram_update_blocked(gram: torch.Tensor, rows: torch.Tensor, block: Optional[int]) -> None:
    width = gram.shape[0]
    if block is None or block >= width:
        gram.addmm_(rows.T, rows)
        return
    for start in range(0, width, block):
        stop = min(start + block, width)
        gram[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])


@contextlib.contextmanager
def _blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def gram_update_recursive(gram: torch.Tensor, rows: torch.Tensor, lo: int, hi: int, leaf: int = 128) -> None:
    """Prototype: upper triangle of X^T X by recursive halving (cuts aligned to 64 columns). Same FLOPs as
    `leaf`-sized row blocks, but the off-diagonal work is a few large, square-ish GEMMs instead of many thin panels."""
    if hi - lo <= leaf:
        gram[lo:hi, lo:hi].addmm_(rows[:, lo:hi].T, rows[:, lo:hi])
        return
    mid = lo + ((hi - lo) // 2 + 63) // 64 * 64
    gram_update_recursive(gram, rows, lo, mid, leaf)
    gram_update_recursive(gram, rows, mid, hi, leaf)
    gram[lo:mid, mid:hi].addmm_(rows[:, lo:mid].T, rows[:, mid:hi])


def mirror_upper_inplace(gram: torch.Tensor, strip: int = GRAM_BLOCK) -> torch.Tensor:
    """Copy the upper triangle onto the lower one in place, one row strip at a time. Valid when everything right of
    each strip's diagonal block is complete and every diagonal block [s:s+strip, s:s+strip] is full (strip = the
    update's block size, or its alignment)."""
    width = gram.shape[0]
    for start in range(0, width, strip):
        stop = min(start + strip, width)
        if stop < width:
            gram[stop:, start:stop].copy_(gram[start:stop, stop:].T)
    return gram


def prototype_accumulator_class():
    """A drop-in GramAccumulator with the two proposed changes: recursive update, in-place result."""
    from sap_hf.core.stats import GramAccumulator

    class PrototypeGramAccumulator(GramAccumulator):
        def update(self, rows: torch.Tensor) -> None:
            rows = rows.reshape(-1, rows.shape[-1]).to(self.gram.dtype)
            self.count += rows.shape[0]
            gram_update_recursive(self.gram, rows, 0, self.gram.shape[0], leaf=128)

        def result(self) -> torch.Tensor:
            return mirror_upper_inplace(self.gram, strip=64)  # recursive cuts are 64-aligned

    return PrototypeGramAccumulator


UPDATE_BLOCKS = [64, 128, 256, 512, 1024, None]  # None: one full GEMM
NOT_A_BLOCK = ("recursive128", "scipy_ssyrk")


def update_row(width: int, block: str, addmm_calls: Optional[int], seconds: float, flops: float) -> dict[str, Any]:
    return {
        "width": width,
        "block": block,
        "addmm_calls": addmm_calls,
        "ms": round(seconds * 1e3, 2),
        "gflop": round(flops / 1e9, 3),
        "gflops_per_s": round(flops / seconds / 1e9, 1),
    }


def time_gram_updates(widths: list[int], rows_per_batch: int, repeats: int) -> tuple[dict, list[dict[str, Any]]]:
    """One Gram update of `rows_per_batch` rows per width: for several row-block sizes (the library uses 256), the
    recursive prototype and BLAS ssyrk (symmetric rank-k update, one triangle) through scipy where installed.
    Returns {width: {way: seconds}} and the JSON rows."""
    try:
        import numpy as np
        from scipy.linalg.blas import ssyrk
    except ImportError:  # pragma: no cover
        ssyrk = None
    seconds_of: dict[int, dict[str, float]] = {}
    json_rows = []
    for width in widths:
        rows, gram = torch.randn(rows_per_batch, width), torch.zeros(width, width)
        timed = seconds_of[width] = {}
        for block in UPDATE_BLOCKS:
            if block is not None and block >= width:
                continue  # the same full GEMM as block=None
            key = "full" if block is None else str(block)
            timed[key] = common.best_of(lambda: gram_update_blocked(gram, rows, block), repeats)
            calls = 1 if block is None else math.ceil(width / block)
            json_rows.append(
                update_row(width, key, calls, timed[key], rows_per_batch * gram_flops_per_token(width, block))
            )
        timed["recursive128"] = common.best_of(lambda: gram_update_recursive(gram, rows, 0, width, 128), repeats)
        flops = rows_per_batch * gram_flops_per_token(width, 128)
        json_rows.append(update_row(width, "recursive128", None, timed["recursive128"], flops))
        if ssyrk is not None:
            a_t = rows.numpy().T  # (width x rows), Fortran-ordered view: C += A A^T, upper triangle
            c = np.zeros((width, width), dtype=np.float32, order="F")
            with _blas_threads(torch.get_num_threads()):
                timed["scipy_ssyrk"] = common.best_of(
                    lambda: ssyrk(1.0, a_t, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1), repeats
                )
            json_rows.append(
                update_row(width, "scipy_ssyrk", 1, timed["scipy_ssyrk"], rows_per_batch * width * (width + 1))
            )
    return seconds_of, json_rows


def seconds_over(items: list, finish: Callable[[Any], Any]) -> float:
    """Seconds of `finish(item)` over all `items`, after handing freed heap memory back."""
    release_free_memory()
    start = time.perf_counter()
    for item in items:
        finish(item)
    return round(time.perf_counter() - start, 3)


def time_finalisation(h: int, m: int) -> dict[str, Any]:
    """Finalising all 4L+1 Grams: the library's result() + isfinite against the in-place mirror + a sum check; and
    allocating + first-touching them all, which every call pays."""
    from sap_hf.core.stats import GramAccumulator

    widths = [h] * (3 * LAYERS) + [m] * LAYERS + [h]

    def random_accumulators() -> list[GramAccumulator]:
        accumulators = [GramAccumulator(width, torch.float32, torch.device("cpu")) for width in widths]
        for accumulator in accumulators:
            accumulator.gram.normal_()
        return accumulators

    def library_result(accumulator: GramAccumulator) -> None:
        bool(torch.isfinite(accumulator.result()).all())

    def prototype_result(accumulator: GramAccumulator) -> None:
        bool(torch.isfinite(mirror_upper_inplace(accumulator.gram).sum(dtype=torch.float64)))

    out = {
        "library_result_plus_isfinite_s": seconds_over(random_accumulators(), library_result),
        "prototype_inplace_mirror_plus_sum_check_s": seconds_over(random_accumulators(), prototype_result),
    }
    accumulator = GramAccumulator(m, torch.float32, torch.device("cpu"))
    accumulator.update(torch.randn(64, m))
    out["prototype_equals_library"] = bool(
        torch.equal(accumulator.result(), mirror_upper_inplace(accumulator.gram.clone()))
    )
    release_free_memory()
    start = time.perf_counter()
    fresh = [torch.zeros(w, w) for w in widths]
    for gram in fresh:
        gram.add_(1.0)
    out["allocate_and_first_touch_all_grams_s"] = round(time.perf_counter() - start, 3)
    out["gram_bytes_total_mb"] = round(sum(w * w * 4 for w in widths) / 2**20, 1)
    return out


def investigate(shape: str, batch_size: int, repeats: int = 3, image_size: int = IMAGE) -> dict[str, Any]:
    """Where the statistics pass spends its time beyond the forward, with candidate fixes."""
    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample(image_size)
    rows_per_batch = batch_size * T
    seconds_of, json_rows = time_gram_updates(sorted({h, m}), rows_per_batch, repeats)
    blocked = {w: {k: v for k, v in ways.items() if k not in NOT_A_BLOCK} for w, ways in seconds_of.items()}
    estimate = {
        "library_block_256": {w: ways["256" if "256" in ways else "full"] for w, ways in seconds_of.items()},
        "best_block": {w: min(ways.values()) for w, ways in blocked.items()},
        **{way: {w: seconds_of[w][way] for w in seconds_of} for way in NOT_A_BLOCK if way in seconds_of[h]},
    }
    layers_per_width = {h: 3, m: 1} if h != m else {h: 4}
    return {
        "shape": shape,
        "rows_per_update": rows_per_batch,
        "gram_update": json_rows,
        "finalize": time_finalisation(h, m),
        "gram_ms_per_sample": {
            name: round(LAYERS * sum(n * t[w] for w, n in layers_per_width.items()) * 1e3 / batch_size, 2)
            for name, t in estimate.items()
        },
        "best_block_per_width": {str(w): min(ways, key=ways.get) for w, ways in blocked.items()},
    }


def breakdown(run: dict[str, Any], inference_s: float) -> Optional[dict[str, float]]:
    """Seconds per part of one timed statistics pass (`run["timers"]` from `instrumented_statistics`), or None untimed."""
    t = run.get("timers")
    if not t:
        return None
    rest = run["seconds"] - t["gram_update_s"] - t["gram_result_s"] - t["subsample_s"]
    return {
        "total": round(run["seconds"], 3),
        "gram_update": round(t["gram_update_s"], 3),
        "gram_result_mirror": round(t["gram_result_s"], 3),
        "subsample": round(t["subsample_s"], 3),
        "forward_and_other": round(rest, 3),
        "other_beyond_best_inference": round(rest - inference_s, 3),
        "addmm_update_calls": t["update_calls"],
    }
