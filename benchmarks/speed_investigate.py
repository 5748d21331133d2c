"""The `--investigate` part of `speed.py`: where the statistics pass spends its time, and prototypes.

`instrumented_statistics` is the statistics pass with GramAccumulator.update / .result and
subsample_tokens timed: a copy of `collect_statistics`'s loop with a benchmark-side accumulator
subclass, on the library's own walk, hooks, grouping and reduction (no library name is rebound;
`matches_library` checks it returns exactly the library's statistics). `breakdown` turns those timers
into the per-part seconds of the JSON. `investigate` micro-benchmarks one Gram update per block size
(and BLAS ssyrk where scipy is installed), the finalisation of every Gram and their allocation. The
prototype accumulator (recursive update, in-place mirror) is measured here, passed to
`instrumented_statistics(accumulator=...)`, and is NOT used by the library.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Optional

import common
import torch
from speed_memory import release_free_memory
from speed_methods import GRAM_BLOCK, IMAGE, LAYERS, SHAPES, gram_flops_per_token, tokens_per_sample


# The statistics pass with the proposed GramAccumulator (recursive update, in-place result)
PROTO_METHODS = ["stats_exact_proto", "stats_subsampled_proto"]


# --------------------------------------------------------------------------------------------
# Instrumentation of the statistics pass (benchmark-side code: no library name is rebound)
# --------------------------------------------------------------------------------------------


def new_timers() -> dict[str, Any]:
    return {"gram_update_s": 0.0, "gram_result_s": 0.0, "subsample_s": 0.0, "update_calls": 0}


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
    """The library's GroupedGrams with a given accumulator class and a timed subsample_tokens.

    `__call__` is a copy of `sap_hf.core.stats.GroupedGrams.__call__` (the one place that names the
    accumulator class and `subsample_tokens`); grouping and the reduction are the library's own methods.
    """
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

    A copy of `sap_hf.core.stats.collect_statistics`'s loop for one process, on the library's own
    `Runtime.run` walk, hooks, grouping, reduction and ActivationStats; only the accumulator is a
    benchmark-side subclass (`accumulator`: the library's GramAccumulator by default, or the prototype).
    `matches_library` checks that it returns exactly the library's statistics.
    """
    from sap_hf import ActivationStats, Runtime
    from sap_hf.core.stats import GramAccumulator, input_hooks, weights_signature

    timers = new_timers()
    runtime = Runtime(batch_size=batch_size, show_progress=False)
    dtype = getattr(torch, accumulation_dtype)
    with runtime.run(model, data, "statistics", argument="trusted data") as walk:
        generator = torch.Generator().manual_seed(seed + runtime.rank) if cap else None
        grams = instrumented_grams_class()(
            walk.model,
            names,
            dtype,
            walk.device,
            cap,
            generator,
            timers=timers,
            accumulator=accumulator or GramAccumulator,
        )
        with input_hooks(walk.model, grams.names, grams):
            for batch in walk.batches():
                walk.logits(batch)
                grams.fix_groups()
                grams.samples += len(batch)
    if grams.groups is None:
        raise ValueError("instrumented_statistics: the data is empty.")
    gram_of, counts = grams.reduce(grams.groups, runtime)
    stats = ActivationStats(
        groups=grams.groups,
        grams=gram_of,
        counts=counts,
        max_tokens_per_sample=cap,
        meta={
            "weights_signature": weights_signature(walk.model, [n for g in grams.groups for n in g.members]),
            "samples": grams.samples,
        },
    )
    return stats, timers


def matches_library(model, data, names, batch_size: int, cap: Optional[int]) -> bool:
    """The instrumented pass returns exactly what the library's `collect_statistics` returns (same Grams, counts, groups)."""
    from speed_methods import run_stats

    ours, _ = instrumented_statistics(model, data, names, batch_size, cap)
    library = run_stats(model, data, names, batch_size, cap)
    return (
        ours.groups == library.groups
        and ours.counts == library.counts
        and ours.meta == library.meta
        and all(torch.equal(ours.grams[g], library.grams[g]) for g in library.grams)
    )


# --------------------------------------------------------------------------------------------
# Prototypes measured in --investigate (NOT used by the library)
# --------------------------------------------------------------------------------------------


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
    """Prototype: upper triangle of X^T X by recursive halving (cuts aligned to 64 columns).

    Same FLOPs as `leaf`-sized row blocks, but the off-diagonal work is done as a few large,
    square-ish GEMMs instead of many thin row panels."""
    if hi - lo <= leaf:
        gram[lo:hi, lo:hi].addmm_(rows[:, lo:hi].T, rows[:, lo:hi])
        return
    mid = lo + ((hi - lo) // 2 + 63) // 64 * 64
    gram_update_recursive(gram, rows, lo, mid, leaf)
    gram_update_recursive(gram, rows, mid, hi, leaf)
    gram[lo:mid, mid:hi].addmm_(rows[:, lo:mid].T, rows[:, mid:hi])


def mirror_upper_inplace(gram: torch.Tensor, strip: int = GRAM_BLOCK) -> torch.Tensor:
    """Copy the upper triangle onto the lower one in place, one row strip at a time. Valid when
    everything right of each strip's diagonal block is complete and every diagonal block
    [s:s+strip, s:s+strip] is full (strip = the update's block size, or its alignment)."""
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


def investigate(shape: str, batch_size: int, repeats: int = 3, image_size: int = IMAGE) -> dict[str, Any]:
    """Where the statistics pass spends its time beyond the forward, with candidate fixes."""
    from sap_hf.core.stats import GramAccumulator

    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample(image_size)
    rows_per_batch = batch_size * T
    out: dict[str, Any] = {"shape": shape, "rows_per_update": rows_per_batch, "gram_update": [], "finalize": {}}

    def best_of(fn):
        return common.best_of(fn, repeats)

    # 1. One Gram update per width, for several row-block sizes (the library uses 256), and
    #    BLAS ssyrk (symmetric rank-k update, one triangle) through scipy's OpenBLAS if present.
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:  # pragma: no cover
        ssyrk = None
    per_width: dict[int, dict[str, float]] = {}
    for width in sorted({h, m}):
        rows = torch.randn(rows_per_batch, width)
        gram = torch.zeros(width, width)
        per_width[width] = {}
        for block in [64, 128, 256, 512, 1024, None]:
            if block is not None and block >= width:
                continue  # the same full GEMM as block=None
            seconds = best_of(lambda: gram_update_blocked(gram, rows, block))
            flops = rows_per_batch * gram_flops_per_token(width, block)
            key = "full" if block is None else str(block)
            per_width[width][key] = seconds
            out["gram_update"].append(
                {
                    "width": width,
                    "block": key,
                    "addmm_calls": 1 if block is None else math.ceil(width / block),
                    "ms": round(seconds * 1e3, 2),
                    "gflop": round(flops / 1e9, 3),
                    "gflops_per_s": round(flops / seconds / 1e9, 1),
                }
            )
        seconds = best_of(lambda: gram_update_recursive(gram, rows, 0, width, 128))
        flops = rows_per_batch * gram_flops_per_token(width, 128)
        per_width[width]["recursive128"] = seconds
        out["gram_update"].append(
            {
                "width": width,
                "block": "recursive128",
                "addmm_calls": None,
                "ms": round(seconds * 1e3, 2),
                "gflop": round(flops / 1e9, 3),
                "gflops_per_s": round(flops / seconds / 1e9, 1),
            }
        )
        if ssyrk is not None:
            import numpy as np

            a_t = rows.numpy().T  # (width x rows), Fortran-ordered view: C += A A^T, upper triangle
            c = np.zeros((width, width), dtype=np.float32, order="F")
            with _blas_threads(torch.get_num_threads()):
                seconds = best_of(lambda: ssyrk(1.0, a_t, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1))
            flops = rows_per_batch * width * (width + 1)
            per_width[width]["ssyrk"] = seconds
            out["gram_update"].append(
                {
                    "width": width,
                    "block": "scipy_ssyrk",
                    "addmm_calls": 1,
                    "ms": round(seconds * 1e3, 2),
                    "gflop": round(flops / 1e9, 3),
                    "gflops_per_s": round(flops / seconds / 1e9, 1),
                }
            )
    library = {w: per_width[w]["256" if "256" in per_width[w] else "full"] for w in per_width}
    best = {w: min(v for k, v in per_width[w].items() if k not in ("ssyrk", "recursive128")) for w in per_width}
    estimate = {
        "library_block_256": library,
        "best_block": best,
        "recursive128": {w: per_width[w]["recursive128"] for w in per_width},
    }
    if ssyrk is not None:
        estimate["scipy_ssyrk"] = {w: per_width[w]["ssyrk"] for w in per_width}
    counts = {h: 3, m: 1} if h != m else {h: 4}
    out["gram_ms_per_sample"] = {
        name: round(LAYERS * sum(counts[w] * t[w] for w in counts) * 1e3 / batch_size, 2)
        for name, t in estimate.items()
    }
    out["best_block_per_width"] = {
        str(w): min((k for k in per_width[w] if k not in ("ssyrk", "recursive128")), key=lambda k: per_width[w][k])
        for w in per_width
    }

    # 2. Finalisation of all 4*L+1 Grams: the library's result() + isfinite vs prototypes.
    widths = [h] * (3 * LAYERS) + [m] * LAYERS + [h]

    def make_accumulators():
        accs = []
        for width in widths:
            acc = GramAccumulator(width, torch.float32, torch.device("cpu"))
            acc.gram.normal_()
            accs.append(acc)
        return accs

    accs = make_accumulators()
    release_free_memory()
    start = time.perf_counter()
    for acc in accs:
        g = acc.result()
        bool(torch.isfinite(g).all())
    out["finalize"]["library_result_plus_isfinite_s"] = round(time.perf_counter() - start, 3)
    del accs, g
    accs = make_accumulators()
    release_free_memory()
    start = time.perf_counter()
    for acc in accs:
        g = mirror_upper_inplace(acc.gram)
        bool(torch.isfinite(g.sum(dtype=torch.float64)))
    out["finalize"]["prototype_inplace_mirror_plus_sum_check_s"] = round(time.perf_counter() - start, 3)
    # equality of the prototype with the library on one matrix
    acc = GramAccumulator(m, torch.float32, torch.device("cpu"))
    rows = torch.randn(64, m)
    acc.update(rows)
    lib = acc.result()
    proto = mirror_upper_inplace(acc.gram.clone())
    out["finalize"]["prototype_equals_library"] = bool(torch.equal(lib, proto))
    del accs
    # 3. Allocation + first touch of all Grams (torch.zeros then one write), which every call pays.
    release_free_memory()
    start = time.perf_counter()
    fresh = [torch.zeros(w, w) for w in widths]
    for g in fresh:
        g.add_(1.0)
    out["finalize"]["allocate_and_first_touch_all_grams_s"] = round(time.perf_counter() - start, 3)
    out["finalize"]["gram_bytes_total_mb"] = round(sum(w * w * 4 for w in widths) / 2**20, 1)
    del fresh
    return out


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
