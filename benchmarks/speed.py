#!/usr/bin/env python
"""Speed and memory of SAP's streaming statistics against plain inference and the reference SVD.

Side by side, in ONE process and interleaved (so ratios are fair), for a ViT-Tiny and a ViT-Base
shape (random init, 224x224, patch 16 -> 197 tokens, 10 labels, float32, eval + no_grad; --quick
uses 64x64 images, 17 tokens):

  inference         plain forward over the n samples
  stats_exact       sap_hf.stats.collect_statistics, every token (the default)
  stats_subsampled  the same with max_tokens_per_sample=CAP (CLS always kept)
  eigh_project      current_weights + eigenbases (float64 eigh of every group) + plan_projection
                    + write_weights, for one alpha
  reference_svd     the paper's reference approach: keep every target group's input activations
                    (stacked rows) in memory, torch.linalg.svd of each, P = U diag(lambda) U^T,
                    W <- W P. Its weights are compared with ours (max relative difference).

Timing: every method runs `--repeats` times (best of), after a one-batch warm-up of the forward
path; the methods are interleaved (order rotated every repeat) across both models. eigh_project
and reference_svd do not depend on a warm-up and are run only once when one run takes more than
`--slow_seconds`.

Memory ("peak_mem_mb"): growth of the process's resident set during the call, i.e.
VmHWM - VmRSS(before), read from /proc/self/status, with the high-water mark reset just before
the call (`echo 5 > /proc/self/clear_refs`) and freed heap memory handed back first
(gc.collect + malloc_trim(0)), so memory the allocator still holds from an earlier call is
neither counted nor silently reused. Data batches are materialised before the call, so they are
not part of the growth. In this (timing) process glibc keeps its default allocator settings, so
these in-process figures carry some +-10% allocator noise. The n -> 4n comparison of stats_exact
runs each size in a FRESH subprocess whose data is generated lazily batch by batch, with glibc's
mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072: every large tensor is its own mapping,
returned on free, so RSS follows live memory); nothing there grows with n but what the method
itself keeps.

--investigate (on by default, off with --quick) adds: a breakdown of the statistics pass (time in
GramAccumulator.update / .result, monkeypatched timers), Gram-update micro-benchmarks per block
size, the finalisation cost, the statistics pass with float64 accumulation, and a prototype
GramAccumulator (recursive update + in-place mirror) timed interleaved with the others.

Run: python benchmarks/speed.py            (full run, writes benchmarks/results/speed.{json,png})
     python benchmarks/speed.py --quick    (smoke run: tiny shape, a few samples)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

METHODS = ["inference", "stats_exact", "stats_subsampled", "eigh_project", "reference_svd"]
SLOW_METHODS = {"eigh_project", "reference_svd"}
# --investigate: the statistics pass with the proposed GramAccumulator (recursive update, in-place result)
PROTO_METHODS = ["stats_exact_proto", "stats_subsampled_proto"]
SHAPES = {
    "tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
IMAGE, PATCH, LAYERS, LABELS = 224, 16, 12, 10
GRAM_BLOCK = 256  # sap_hf.stats.GramAccumulator's default block


# --------------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# --------------------------------------------------------------------------------------------

def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> Optional[float]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def hwm_mb() -> Optional[float]:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def release_free_memory() -> None:
    """gc, then hand freed heap pages back to the OS so the next RSS growth is honest."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def measure(fn: Callable[[], Any]) -> tuple[float, Optional[float], Any]:
    """(seconds, peak RSS growth in MB or None, result) of one call."""
    release_free_memory()
    before = rss_mb()
    can_reset = reset_hwm()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = hwm_mb()
    growth = (peak - before) if (can_reset and peak is not None and before is not None) else None
    return seconds, growth, out


# --------------------------------------------------------------------------------------------
# Models, data, FLOPs
# --------------------------------------------------------------------------------------------

def build_model(shape: str, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        num_hidden_layers=LAYERS, image_size=IMAGE, patch_size=PATCH, num_labels=LABELS, **SHAPES[shape]
    )
    return ViTForImageClassification(config).eval()


class RandomBatches:
    """Re-iterable, deterministic batches `{"pixel_values": (b, 3, 224, 224)}`, generated lazily."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __len__(self) -> int:  # only used for progress totals (no __getitem__: not map-style)
        return self.n

    def __iter__(self):
        for index, start in enumerate(range(0, self.n, self.batch_size)):
            size = min(self.batch_size, self.n - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            yield {"pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=generator)}


def tokens_per_sample() -> int:
    return (IMAGE // PATCH) ** 2 + 1


def forward_flops_per_sample(shape: str) -> float:
    """2 FLOPs per multiply-add; elementwise ops (LayerNorm, GELU, softmax) are ignored.

    L * [2T(4h^2 + 2hm) + 4T^2 h]  (q,k,v,o + fc1,fc2 + QK^T and AV)
    + 2 (T-1) (3 p^2) h            (patch embedding)   + 2 h C (classifier)
    """
    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample()
    per_layer = 2 * T * (4 * h * h + 2 * h * m) + 4 * T * T * h
    return LAYERS * per_layer + 2 * (T - 1) * 3 * PATCH * PATCH * h + 2 * h * LABELS


def gram_flops_per_token(width: int, block: Optional[int] = GRAM_BLOCK) -> float:
    """2 * sum over row blocks [s, e) of (e - s) * (width - s): the upper block-triangle of X^T X."""
    if block is None or block >= width:
        return 2.0 * width * width
    return 2.0 * sum((min(s + block, width) - s) * (width - s) for s in range(0, width, block))


def gram_flops_per_sample(shape: str, token_cap: Optional[int] = None, block: Optional[int] = GRAM_BLOCK) -> float:
    """Per layer: q/k/v (one group), o, fc1 read h-wide rows, fc2 reads m-wide rows; the classifier
    reads 1 row (CLS) per sample. t = min(cap, T) rows per sample for the encoder groups."""
    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample()
    t = T if token_cap is None else min(token_cap, T)
    per_layer = t * (3 * gram_flops_per_token(h, block) + gram_flops_per_token(m, block))
    return LAYERS * per_layer + gram_flops_per_token(h, block)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------

def run_inference(model, data) -> None:
    with torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"])


def run_stats(model, data, names, batch_size: int, cap: Optional[int], accumulation_dtype: str = "float32"):
    from sap_hf.stats import collect_statistics

    return collect_statistics(
        model, data, names, batch_size=batch_size, max_tokens_per_sample=cap,
        accumulation_dtype=accumulation_dtype, show_progress=False,
    )


def run_eigh_project(model, stats, alpha: float) -> dict[str, torch.Tensor]:
    from sap_hf.projection import current_weights, plan_projection, write_weights
    from sap_hf.search import eigenbases

    originals = current_weights(model, stats.target_modules)
    bases = eigenbases(stats)
    new = plan_projection(originals, stats.groups, bases, alpha)
    write_weights(model, new)
    return new


def store_activations(model, data, groups) -> dict[str, torch.Tensor]:
    """One forward keeping every group's input rows (N x d, as produced: float32), stacked."""
    modules = dict(model.named_modules())
    stored: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    handles = []
    try:
        for group in groups:
            def hook(module, args, _name=group.name):
                x = args[0].detach()
                stored[_name].append(x.reshape(-1, x.shape[-1]).clone())

            handles.append(modules[group.name].register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in data:
                model(pixel_values=batch["pixel_values"])
    finally:
        for handle in handles:
            handle.remove()
    for name in list(stored):  # stack one group at a time: peak = everything + one group
        stored[name] = torch.cat(stored[name]) if len(stored[name]) > 1 else stored[name][0]
    return stored


def svd_basis(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """U (float64) and singular values (float64) of R = X^T (d x N) by torch.linalg.svd in `dtype`."""
    u, s, _ = torch.linalg.svd(rows.T.to(dtype), full_matrices=False)
    return u.double(), s.double()


def svd_projected(weights: dict[str, torch.Tensor], u: torch.Tensor, s: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """lambda from the singular values (the SAP formula), P = U diag(lambda) U^T, W P in float64."""
    energy = s**2
    ratios = energy / energy.sum()
    lam = alpha * ratios / ((alpha - 1.0) * ratios + 1.0)
    projection = (u * lam) @ u.T
    return {name: (w.detach().double() @ projection).to(w.dtype) for name, w in weights.items()}


def run_reference_svd(model, data, groups, alpha: float, svd_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The stored-activations approach: R = X^T (d x N) per distinct input, SVD, P = U diag(lambda) U^T.

    Activations are kept exactly as they come (float32, all of them in memory at once, like the
    reference), the SVD is torch.linalg.svd(R, full_matrices=False) in `svd_dtype` (float32 like
    the reference code; float64 for the accuracy check), then W <- W P and the weights are written.
    """
    modules = dict(model.named_modules())
    stored = store_activations(model, data, groups)
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group in groups:
            u, s = svd_basis(stored.pop(group.name), svd_dtype)
            new.update(svd_projected({name: modules[name].weight for name in group.members}, u, s, alpha))
        for name, value in new.items():
            modules[name].weight.copy_(value)
    return new


def max_relative_difference(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """max over layers of max|W_ours - W_ref| / max|W_ref| (and the Frobenius-norm version)."""
    assert ours.keys() == ref.keys(), "ours and the reference projected different layers"
    worst_max, worst_fro = 0.0, 0.0
    for name in ours:
        a, b = ours[name].double(), ref[name].double()
        worst_max = max(worst_max, float((a - b).abs().max() / b.abs().max()))
        worst_fro = max(worst_fro, float(torch.linalg.norm(a - b) / torch.linalg.norm(b)))
    return {"max_abs_over_max_abs": worst_max, "frobenius": worst_fro}


def verify(model, names, groups, data, batch_size: int, alphas: list[float], full: bool) -> dict[str, Any]:
    """Projected weights of the Gram path vs the SVD of the stored activations, per alpha.

    Truth = float64 SVD of the stored (float32) activations. Always: Gram accumulated in float64.
    With `full`: also the library default (float32 Gram) and a float32 SVD (the reference's dtype),
    which shows where a mismatch comes from.
    """
    from sap_hf.projection import current_weights, plan_projection
    from sap_hf.search import eigenbases

    originals = current_weights(model, names)
    stored = store_activations(model, data, groups)
    svds = {"float64": {}, "float32": {}}
    for group in groups:
        svds["float64"][group.name] = svd_basis(stored[group.name], torch.float64)
        if full:
            svds["float32"][group.name] = svd_basis(stored[group.name], torch.float32)
        del stored[group.name]
    grams = {"float64": eigenbases(run_stats(model, data, names, batch_size, None, "float64"))}
    if full:
        grams["float32"] = eigenbases(run_stats(model, data, names, batch_size, None, "float32"))

    def from_svd(dtype: str, alpha: float) -> dict[str, torch.Tensor]:
        out = {}
        for group in groups:
            u, s = svds[dtype][group.name]
            out.update(svd_projected({n: originals[n] for n in group.members}, u, s, alpha))
        return out

    result: dict[str, Any] = {"n_samples": sum(b["pixel_values"].shape[0] for b in data), "per_alpha": []}
    for alpha in alphas:
        truth = from_svd("float64", alpha)
        row = {"alpha": alpha}
        for dtype, bases in grams.items():
            ours = plan_projection(originals, groups, bases, alpha)
            row[f"gram_{dtype}_vs_svd_float64"] = max_relative_difference(ours, truth)["max_abs_over_max_abs"]
        if full:
            row["svd_float32_vs_svd_float64"] = max_relative_difference(from_svd("float32", alpha), truth)["max_abs_over_max_abs"]
        result["per_alpha"].append(row)
    return result


# --------------------------------------------------------------------------------------------
# Instrumentation of collect_statistics (benchmark-side monkeypatch, always restored)
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stats_timers():
    """Time GramAccumulator.update / .result and subsample_tokens inside collect_statistics.

    Overhead: one perf_counter pair per hook call (~250 per batch), i.e. microseconds per batch.
    """
    import sap_hf.stats as stats_module

    acc_cls = stats_module.GramAccumulator
    timers = {"gram_update_s": 0.0, "gram_result_s": 0.0, "subsample_s": 0.0, "update_calls": 0}
    original_update, original_result, original_subsample = acc_cls.update, acc_cls.result, stats_module.subsample_tokens

    def update(self, rows):
        start = time.perf_counter()
        original_update(self, rows)
        timers["gram_update_s"] += time.perf_counter() - start
        timers["update_calls"] += 1

    def result(self):
        start = time.perf_counter()
        out = original_result(self)
        timers["gram_result_s"] += time.perf_counter() - start
        return out

    def subsample(*args, **kwargs):
        start = time.perf_counter()
        out = original_subsample(*args, **kwargs)
        timers["subsample_s"] += time.perf_counter() - start
        return out

    acc_cls.update, acc_cls.result, stats_module.subsample_tokens = update, result, subsample
    try:
        yield timers
    finally:
        acc_cls.update, acc_cls.result, stats_module.subsample_tokens = original_update, original_result, original_subsample


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
    from sap_hf.stats import GramAccumulator

    class PrototypeGramAccumulator(GramAccumulator):
        def update(self, rows: torch.Tensor) -> None:
            rows = rows.reshape(-1, rows.shape[-1]).to(self.gram.dtype)
            self.count += rows.shape[0]
            gram_update_recursive(self.gram, rows, 0, self.gram.shape[0], leaf=128)

        def result(self) -> torch.Tensor:
            return mirror_upper_inplace(self.gram, strip=64)  # recursive cuts are 64-aligned

    return PrototypeGramAccumulator


@contextlib.contextmanager
def prototype_accumulator():
    """Swap sap_hf.stats.GramAccumulator for the prototype inside collect_statistics (restored)."""
    import sap_hf.stats as stats_module

    original = stats_module.GramAccumulator
    stats_module.GramAccumulator = prototype_accumulator_class()
    try:
        yield
    finally:
        stats_module.GramAccumulator = original


def investigate(shape: str, batch_size: int, repeats: int = 3) -> dict[str, Any]:
    """Where the statistics pass spends its time beyond the forward, with candidate fixes."""
    from sap_hf.stats import GramAccumulator

    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample()
    rows_per_batch = batch_size * T
    out: dict[str, Any] = {"shape": shape, "rows_per_update": rows_per_batch, "gram_update": [], "finalize": {}}

    def best_of(fn, k=repeats):
        fn()
        best = math.inf
        for _ in range(k):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

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
            out["gram_update"].append({
                "width": width, "block": key, "addmm_calls": 1 if block is None else math.ceil(width / block),
                "ms": round(seconds * 1e3, 2), "gflop": round(flops / 1e9, 3),
                "gflops_per_s": round(flops / seconds / 1e9, 1),
            })
        seconds = best_of(lambda: gram_update_recursive(gram, rows, 0, width, 128))
        flops = rows_per_batch * gram_flops_per_token(width, 128)
        per_width[width]["recursive128"] = seconds
        out["gram_update"].append({
            "width": width, "block": "recursive128", "addmm_calls": None, "ms": round(seconds * 1e3, 2),
            "gflop": round(flops / 1e9, 3), "gflops_per_s": round(flops / seconds / 1e9, 1),
        })
        if ssyrk is not None:
            import numpy as np

            a_t = rows.numpy().T  # (width x rows), Fortran-ordered view: C += A A^T, upper triangle
            c = np.zeros((width, width), dtype=np.float32, order="F")
            with _blas_threads(torch.get_num_threads()):
                seconds = best_of(lambda: ssyrk(1.0, a_t, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1))
            flops = rows_per_batch * width * (width + 1)
            per_width[width]["ssyrk"] = seconds
            out["gram_update"].append({
                "width": width, "block": "scipy_ssyrk", "addmm_calls": 1, "ms": round(seconds * 1e3, 2),
                "gflop": round(flops / 1e9, 3), "gflops_per_s": round(flops / seconds / 1e9, 1),
            })
    library = {w: per_width[w]["256" if "256" in per_width[w] else "full"] for w in per_width}
    best = {w: min(v for k, v in per_width[w].items() if k not in ("ssyrk", "recursive128")) for w in per_width}
    estimate = {"library_block_256": library, "best_block": best,
                "recursive128": {w: per_width[w]["recursive128"] for w in per_width}}
    if ssyrk is not None:
        estimate["scipy_ssyrk"] = {w: per_width[w]["ssyrk"] for w in per_width}
    counts = {h: 3, m: 1} if h != m else {h: 4}
    out["gram_ms_per_sample"] = {
        name: round(LAYERS * sum(counts[w] * t[w] for w in counts) * 1e3 / batch_size, 2) for name, t in estimate.items()
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


# --------------------------------------------------------------------------------------------
# Child process: one stats_exact memory measurement in a fresh interpreter
# --------------------------------------------------------------------------------------------

def child_main(spec: dict[str, Any]) -> None:
    from sap_hf.targets import find_target_modules

    global IMAGE
    IMAGE = spec.get("image_size", IMAGE)
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"])
    names = find_target_modules(model)
    run_inference(model, RandomBatches(1, 1, seed=99))  # torch / oneDNN lazy init, not measured
    results = []
    for n in spec["ns"]:
        data = RandomBatches(n, spec["batch_size"], seed=1)
        seconds, growth, stats = measure(lambda: run_stats(model, data, names, spec["batch_size"], spec.get("cap")))
        results.append({"n": n, "seconds": seconds, "peak_growth_mb": growth, "peak_rss_mb": hwm_mb(),
                        "tokens": max(stats.counts.values())})
        del stats
    print("CHILD_RESULT " + json.dumps(results))


def run_child(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Fresh interpreter; glibc's mmap threshold is pinned (no dynamic raise) so that every large
    tensor is its own mapping, returned to the OS when freed: RSS then follows live memory."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------------------------

def parse_per_model(value: str, models: list[str], name: str) -> dict[str, int]:
    """'64' -> same for every model; 'tiny=256,base=64' -> per model."""
    if "=" not in value:
        return {m: int(value) for m in models}
    parsed = dict(item.split("=") for item in value.split(","))
    missing = [m for m in models if m not in parsed]
    if missing:
        raise SystemExit(f"--{name} gives no value for {missing}")
    return {m: int(parsed[m]) for m in models}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default=None, help="samples per model: an int, or 'tiny=256,base=32'")
    parser.add_argument("--batch_size", default=None, help="an int, or 'tiny=32,base=8'")
    parser.add_argument("--models", default=None, help="comma list from: tiny,base")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="subset of methods to run (summary fields that need a missing one are null)")
    parser.add_argument("--cap", type=int, default=16, help="max_tokens_per_sample for stats_subsampled")
    parser.add_argument("--alpha", type=float, default=1e4)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (best of)")
    parser.add_argument("--slow_seconds", type=float, default=20.0,
                        help="eigh_project/reference_svd run once when a run takes longer than this")
    parser.add_argument("--mem_factor", type=int, default=4, help="stats_exact memory at n and mem_factor*n")
    parser.add_argument("--no_mem_children", action="store_true", help="skip the fresh-process n vs 4n memory runs")
    parser.add_argument("--investigate", action=argparse.BooleanOptionalAction, default=None,
                        help="profile the statistics pass (default: on, off with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--verify_n", type=int, default=8,
                        help="samples for the float64 accuracy check (SVD of stored activations vs Gram path)")
    parser.add_argument("--verify_full", default=None,
                        help="models whose accuracy check also covers float32 Gram/SVD over an alpha sweep "
                             "(default: tiny; none with --quick)")
    parser.add_argument("--wait_quiet", type=float, default=0.0,
                        help="wait up to this many seconds for the 1-min load average to drop below 0.5")
    parser.add_argument("--image_size", type=int, default=None, help="default 224 (64 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shape, 64x64 images, 4 samples, 1 repeat, no investigation")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no_plot", action="store_true")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child is not None:
        child_main(json.loads(args._child))
        return {}
    global IMAGE
    IMAGE = args.image_size or (64 if args.quick else 224)
    if IMAGE % PATCH:
        raise SystemExit(f"--image_size must be a multiple of the patch size {PATCH}")

    models = (args.models or ("tiny" if args.quick else "tiny,base")).split(",")
    for m in models:
        if m not in SHAPES:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(SHAPES)}")
    n_per = parse_per_model(args.n or ("4" if args.quick else "tiny=128,base=32"), models, "n")
    bs_per = parse_per_model(args.batch_size or ("2" if args.quick else "tiny=32,base=8"), models, "batch_size")
    repeats = args.repeats or (1 if args.quick else 3)
    methods = [x for x in args.methods.split(",") if x]
    unknown = [x for x in methods if x not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if "eigh_project" in methods and "stats_exact" not in methods:
        raise SystemExit("eigh_project needs stats_exact")
    do_investigate = (not args.quick) if args.investigate is None else args.investigate
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from sap_hf.stats import discover_groups
    from sap_hf.projection import write_weights
    from sap_hf.targets import find_target_modules

    waited = 0.0
    while args.wait_quiet and waited < args.wait_quiet and (_loadavg() or [0])[0] >= 0.5:
        time.sleep(10)
        waited += 10
    env = {
        "waited_for_quiet_s": waited,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    wall_start = time.perf_counter()
    print(f"torch {env['torch']}, threads={env['torch_threads']} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
          f"cpus={env['cpu_count']}, load={env['loadavg_start']}", flush=True)
    if (env["loadavg_start"] or [0])[0] > 0.5:
        print("WARNING: the machine is busy; with more runnable threads than cores, torch's OpenMP threads "
              "slow down by several x (see env.loadavg_*).", flush=True)
    size = 1024 if args.quick else 2048
    env[f"matmul_{size}_gflops"] = round(matmul_gflops(size), 1)
    print(f"{size}^3 float32 matmul: {env[f'matmul_{size}_gflops']} GFLOP/s", flush=True)

    ctx: dict[str, dict[str, Any]] = {}
    for m in models:
        model = build_model(m)
        names = find_target_modules(model)
        data = list(RandomBatches(n_per[m], bs_per[m], seed=1))
        with torch.no_grad():
            groups = discover_groups(model, names, {"pixel_values": data[0]["pixel_values"][:1]}, torch.device("cpu"))
        ctx[m] = {"model": model, "names": names, "data": data, "groups": groups, "runs": {k: [] for k in METHODS}}
        # warm-up: one batch through each forward-based path (lazy init of oneDNN kernels etc.)
        run_inference(model, data[:1])
        run_stats(model, data[:1], names, bs_per[m], None)
        run_stats(model, data[:1], names, bs_per[m], args.cap)

    def run_method(m: str, method: str) -> None:
        c = ctx[m]
        model, data, names, bs = c["model"], c["data"], c["names"], bs_per[m]
        timers = None
        if method == "inference":
            seconds, mem, _ = measure(lambda: run_inference(model, data))
        elif method in ("stats_exact", "stats_subsampled", "stats_exact_proto", "stats_subsampled_proto"):
            cap = None if method.startswith("stats_exact") else args.cap
            swap = prototype_accumulator() if method.endswith("_proto") else contextlib.nullcontext()
            with swap, stats_timers() as timers:
                seconds, mem, stats = measure(lambda: run_stats(model, data, names, bs, cap))
            if method == "stats_exact":
                c["stats"] = stats
            if method == "stats_exact_proto" and "proto_gram_rel_diff" not in c:
                c["proto_stats"] = stats
            timers = dict(timers)
        elif method == "eigh_project":
            originals = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
            seconds, mem, new = measure(lambda: run_eigh_project(model, c["stats"], args.alpha))
            c["ours"] = new
            write_weights(model, originals)  # leave the model unprojected for the next runs
            del originals
        elif method == "reference_svd":
            originals = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
            seconds, mem, new = measure(lambda: run_reference_svd(model, data, c["groups"], args.alpha))
            c["ref"] = new
            write_weights(model, originals)
            del originals
        else:
            raise ValueError(method)
        c["runs"].setdefault(method, []).append({"seconds": seconds, "peak_mem_mb": mem, "timers": timers})
        mem_txt = "n/a" if mem is None else f"{mem:.0f} MB"
        print(f"  [{m}] {method:<17} {seconds:8.2f} s   peak +{mem_txt}", flush=True)

    all_methods = set(METHODS) <= set(methods)
    if do_investigate and not {"inference", "stats_exact", "stats_subsampled"} <= set(methods):
        raise SystemExit("--investigate needs inference, stats_exact and stats_subsampled among --methods")
    timed_methods = methods + (PROTO_METHODS if do_investigate else [])
    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}", flush=True)
        for m in models:
            order = timed_methods[r % len(timed_methods):] + timed_methods[: r % len(timed_methods)]
            # eigh_project needs the Grams of a stats_exact run: keep it after stats_exact
            if "stats" not in ctx[m]:
                order = ["stats_exact"] + [x for x in order if x != "stats_exact"]
            for method in order:
                runs = ctx[m]["runs"].setdefault(method, [])
                if method in SLOW_METHODS and runs and min(x["seconds"] for x in runs) > args.slow_seconds:
                    continue
                run_method(m, method)

    # ---------------- memory: stats_exact at n and mem_factor * n, fresh processes ----------------
    mem_children: dict[str, Any] = {}
    if not args.no_mem_children:
        for m in models:
            mem_children[m] = {}
            # one fresh process per size; --quick measures both sizes in one process (saves a start-up)
            sizes = [[n_per[m], n_per[m] * args.mem_factor]] if args.quick else [[n_per[m]], [n_per[m] * args.mem_factor]]
            for ns in sizes:
                spec = {"model": m, "ns": ns, "batch_size": bs_per[m], "threads": torch.get_num_threads(),
                        "image_size": IMAGE}
                print(f"memory child: {m} stats_exact n={ns}", flush=True)
                for res in run_child(spec, timeout=3600):
                    key = "1" if res["n"] == n_per[m] else str(args.mem_factor)
                    mem_children[m][key] = res
                    print(f"  -> n={res['n']}: peak growth {res['peak_growth_mb']:.1f} MB ({res['seconds']:.1f} s)", flush=True)

    # ---------------- accuracy: Gram path vs SVD of the stored activations ----------------
    verification: dict[str, Any] = {}
    verify_full = args.verify_full if args.verify_full is not None else ("" if args.quick else "tiny")
    full_models = set(verify_full.split(",")) if verify_full else set()
    for m in models if "reference_svd" in methods else []:
        c = ctx[m]
        vn = min(args.verify_n, n_per[m]) if args.verify_n else n_per[m]
        alphas = sorted({1.0, 1e2, 1e4, 1e6, args.alpha}) if m in full_models else [args.alpha]
        print(f"accuracy check: {m}, n={vn}, alphas={alphas}", flush=True)
        start = time.perf_counter()
        verification[m] = verify(c["model"], c["names"], c["groups"], list(RandomBatches(vn, bs_per[m], seed=2)),
                                 bs_per[m], alphas, full=m in full_models)
        verification[m]["seconds"] = round(time.perf_counter() - start, 1)
        for row in verification[m]["per_alpha"]:
            print("  " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)

    investigation: dict[str, Any] = {}
    if do_investigate:
        for m in models:
            c = ctx[m]
            inf = min(x["seconds"] for x in c["runs"]["inference"])
            investigation[m] = {}
            if all_methods:  # micro-benchmarks and the float64 pass only in a full run
                print(f"investigating the statistics pass: {m}", flush=True)
                investigation[m] = investigate(m, bs_per[m])
                # the cost of the accurate alternative: float64 accumulation, same n, one run
                with stats_timers() as timers:
                    seconds, mem, _ = measure(
                        lambda: run_stats(c["model"], c["data"], c["names"], bs_per[m], None, "float64"))
                investigation[m]["stats_exact_float64_accumulation"] = {
                    "seconds": round(seconds, 3), "ratio_over_inference": round(seconds / inf, 3),
                    "peak_mem_mb": None if mem is None else round(mem, 1),
                    "breakdown_s": _breakdown({"seconds": seconds, "timers": dict(timers)}, inf),
                }
                print(f"  stats_exact float64 accumulation: {seconds:.2f} s ({seconds / inf:.2f}x inference)", flush=True)
            proto = {}
            for method in PROTO_METHODS:
                runs = c["runs"][method]
                fastest = min(runs, key=lambda x: x["seconds"])
                mems = [x["peak_mem_mb"] for x in runs if x["peak_mem_mb"] is not None]
                proto[method] = {
                    "seconds": round(fastest["seconds"], 3), "all_seconds": [round(x["seconds"], 3) for x in runs],
                    "ratio_over_inference": round(fastest["seconds"] / inf, 3),
                    "peak_mem_mb": round(max(mems), 1) if mems else None,
                    "breakdown_s": _breakdown(fastest, inf),
                }
            lib, new = c["stats"], c["proto_stats"]
            proto["gram_max_rel_diff_vs_library"] = max(
                float((new.grams[g].double() - lib.grams[g].double()).abs().max() / lib.grams[g].double().abs().max())
                for g in lib.grams
            )
            proto["exactly_symmetric"] = all(torch.equal(t, t.T) for t in new.grams.values())
            investigation[m]["prototype_accumulator"] = proto
            del c["proto_stats"]

    # ---------------- summary ----------------
    rows, summary = [], {}
    for m in models:
        c = ctx[m]
        best = {}
        for method in methods:
            runs = c["runs"][method]
            fastest = min(runs, key=lambda x: x["seconds"])
            mems = [x["peak_mem_mb"] for x in runs if x["peak_mem_mb"] is not None]
            best[method] = fastest
            rows.append({
                "model": m, "method": method, "n_samples": n_per[m], "seconds": round(fastest["seconds"], 4),
                "peak_mem_mb": round(max(mems), 1) if mems else None, "runs": len(runs),
                "all_seconds": [round(x["seconds"], 4) for x in runs],
            })
        inf = best["inference"]["seconds"]
        fwd = forward_flops_per_sample(m) * n_per[m]
        gram_exact = gram_flops_per_sample(m) * n_per[m]
        gram_sub = gram_flops_per_sample(m, args.cap) * n_per[m]
        full = set(METHODS) <= set(methods)
        if not full:  # a partial run: only the ratios to inference
            summary[m] = {
                "n_samples": n_per[m], "batch_size": bs_per[m], "methods": methods,
                **{f"ratio_{k}_over_inference": round(best[k]["seconds"] / inf, 3)
                   for k in methods if k in ("stats_exact", "stats_subsampled")},
                **{f"{k}_breakdown_s": _breakdown(best[k], inf) for k in methods if k.startswith("stats")},
            }
            continue
        timed_diff = max_relative_difference(c["ours"], c["ref"])
        check = next(r for r in verification[m]["per_alpha"] if r["alpha"] == args.alpha)
        ours_total = best["stats_exact"]["seconds"] + best["eigh_project"]["seconds"]
        ref_mem = max(x["peak_mem_mb"] or 0 for x in c["runs"]["reference_svd"])
        our_mem = max(x["peak_mem_mb"] or 0 for x in c["runs"]["stats_exact"])
        s = {
            "n_samples": n_per[m], "batch_size": bs_per[m], "tokens_per_sample": tokens_per_sample(), "token_cap": args.cap,
            "alpha": args.alpha, "groups": len(c["groups"]), "target_layers": len(c["names"]),
            "ratio_stats_exact_over_inference": round(best["stats_exact"]["seconds"] / inf, 3),
            "ratio_stats_subsampled_over_inference": round(best["stats_subsampled"]["seconds"] / inf, 3),
            "target_stats_exact_le_2": best["stats_exact"]["seconds"] / inf <= 2.0,
            "target_stats_subsampled_le_1_2": best["stats_subsampled"]["seconds"] / inf <= 1.2,
            "ours_stats_plus_eigh_s": round(ours_total, 3),
            "speedup_vs_reference_svd": round(best["reference_svd"]["seconds"] / ours_total, 3),
            "speedup_stats_exact_vs_reference_svd": round(best["reference_svd"]["seconds"] / best["stats_exact"]["seconds"], 3),
            "reference_svd_peak_mem_mb": round(ref_mem, 1),
            "stats_exact_peak_mem_mb": round(our_mem, 1),
            "memory_ratio_reference_over_stats_exact": round(ref_mem / our_mem, 2) if our_mem else None,
            "reference_stored_activations_mb": round(
                sum(g.in_features for g in c["groups"][:-1]) * tokens_per_sample() * n_per[m] * 4 / 2**20
                + c["groups"][-1].in_features * n_per[m] * 4 / 2**20, 1),
            "max_rel_diff": check["gram_float64_vs_svd_float64"],
            "max_rel_diff_check": (f"accumulation_dtype=float64 Gram -> eigh vs float64 SVD of the stored activations, "
                                   f"alpha={args.alpha:g}, n={verification[m]['n_samples']}"),
            "weights_match_1e-5": check["gram_float64_vs_svd_float64"] <= 1e-5,
            "max_rel_diff_default_float32_gram": check.get("gram_float32_vs_svd_float64"),
            "max_rel_diff_timed_runs": timed_diff["max_abs_over_max_abs"],
            "max_rel_diff_timed_runs_note": "library default (float32 Gram) vs reference_svd (float32 SVD), both at n",
            "frobenius_rel_diff_timed_runs": timed_diff["frobenius"],
            "flops": {
                "forward_gflop_per_sample": round(forward_flops_per_sample(m) / 1e9, 3),
                "gram_exact_gflop_per_sample": round(gram_flops_per_sample(m) / 1e9, 3),
                "gram_subsampled_gflop_per_sample": round(gram_flops_per_sample(m, args.cap) / 1e9, 3),
                "gram_full_gemm_gflop_per_sample": round(gram_flops_per_sample(m, block=None) / 1e9, 3),
                "inference_gflops_per_s": round(fwd / inf / 1e9, 1),
                "stats_exact_gflops_per_s": round((fwd + gram_exact) / best["stats_exact"]["seconds"] / 1e9, 1),
                "stats_subsampled_gflops_per_s": round((fwd + gram_sub) / best["stats_subsampled"]["seconds"] / 1e9, 1),
                "stats_exact_ideal_ratio_at_inference_rate": round(1 + gram_exact / fwd, 3),
            },
            "stats_exact_breakdown_s": _breakdown(best["stats_exact"], inf),
            "stats_subsampled_breakdown_s": _breakdown(best["stats_subsampled"], inf),
        }
        if m in mem_children:
            small, large = mem_children[m]["1"], mem_children[m][str(args.mem_factor)]
            s["memory_n_vs_4n"] = {
                "method": ("fresh subprocess per size (--quick: one subprocess, both sizes), lazily generated data, "
                           "VmHWM - VmRSS around collect_statistics, glibc mmap threshold pinned"),
                "n": small["n"], "n_peak_growth_mb": round(small["peak_growth_mb"], 1),
                "big_n": large["n"], "big_n_peak_growth_mb": round(large["peak_growth_mb"], 1),
                "growth_pct": round(100 * (large["peak_growth_mb"] - small["peak_growth_mb"]) / small["peak_growth_mb"], 2),
                "target_le_5pct": (large["peak_growth_mb"] - small["peak_growth_mb"]) / small["peak_growth_mb"] <= 0.05,
                "seconds": [round(small["seconds"], 2), round(large["seconds"], 2)],
            }
        summary[m] = s

    env["loadavg_end"] = _loadavg()
    env["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    result = {
        "rows": rows,
        "summary": summary,
        "verification": verification,
        "investigation": investigation,
        "env": env,
        "config": {
            "image_size": IMAGE, "patch_size": PATCH, "layers": LAYERS, "num_labels": LABELS, "dtype": "float32",
            "repeats": repeats, "methods": methods, "command": " ".join(sys.argv), "slow_seconds": args.slow_seconds, "quick": args.quick,
            "timing": "best of `runs` per method (after a one-batch warm-up), methods interleaved, order rotated per repeat",
            "peak_mem_mb": "max over runs of VmHWM - VmRSS(before) around the call, after gc + malloc_trim and a clear_refs HWM reset",
            "flops": "forward: L[2T(4h^2+2hm)+4T^2h] + 2(T-1)3p^2h + 2hC; Gram: per group 2 t sum_blocks (e-s)(d-s), 256-row blocks",
            "max_rel_diff": "max over projected layers of max|W_ours - W_ref| / max|W_ref|",
            "reference_svd": "forward keeping all group inputs (float32), torch.linalg.svd(X^T, full_matrices=False) "
                             "in float32 per group, lambda from sigma^2, W @ (U diag(lambda) U^T) in float64, written",
        },
    }
    _print_table(rows, summary)
    (out_dir / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plot and all_methods:
        _plot(rows, summary, investigation, out_dir / "speed.png")
    print(f"wrote {out_dir / 'speed.json'} (wall {env['wall_seconds']} s)", flush=True)
    return result


def _breakdown(run: dict[str, Any], inference_s: float) -> Optional[dict[str, float]]:
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print()
    print(f"{'model':<6} {'method':<17} {'n':>5} {'seconds':>9} {'x inference':>12} {'peak MB':>9} {'runs':>5}")
    inference = {r["model"]: r["seconds"] for r in rows if r["method"] == "inference"}
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(f"{r['model']:<6} {r['method']:<17} {r['n_samples']:>5} {r['seconds']:>9.2f} "
              f"{r['seconds'] / inference[r['model']]:>12.2f} {mem:>9} {r['runs']:>5}")
    for m, s in summary.items():
        if "methods" in s:  # partial run
            print(f"[{m}] " + ", ".join(f"{k}={v}" for k, v in s.items() if k.startswith("ratio_")))
            continue
        print(f"[{m}] stats_exact/inference={s['ratio_stats_exact_over_inference']} (target <=2.0: "
              f"{s['target_stats_exact_le_2']}), stats_subsampled/inference={s['ratio_stats_subsampled_over_inference']} "
              f"(cap {s['token_cap']}, target <=1.2: {s['target_stats_subsampled_le_1_2']}), "
              f"reference/(stats+eigh)={s['speedup_vs_reference_svd']}x, memory ref/ours="
              f"{s['memory_ratio_reference_over_stats_exact']}x, max_rel_diff={s['max_rel_diff']:.2e} "
              f"(float64 Gram; default float32 Gram vs reference at n: {s['max_rel_diff_timed_runs']:.2e})")
        if "memory_n_vs_4n" in s:
            mm = s["memory_n_vs_4n"]
            print(f"[{m}] stats_exact peak growth n={mm['n']}: {mm['n_peak_growth_mb']} MB, n={mm['big_n']}: "
                  f"{mm['big_n_peak_growth_mb']} MB ({mm['growth_pct']:+.2f}%, target <=5%: {mm['target_le_5pct']})")
        f = s["flops"]
        print(f"[{m}] GFLOP/sample forward={f['forward_gflop_per_sample']} gram={f['gram_exact_gflop_per_sample']}; achieved "
              f"GFLOP/s inference={f['inference_gflops_per_s']} stats_exact={f['stats_exact_gflops_per_s']}")


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any], investigation: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [5, 5, 3]})
    width = 0.8 / len(models)

    def label_bars(ax, bars, values, fmt):
        for bar, value in zip(bars, values):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)

    for i, m in enumerate(models):
        rs = {r["method"]: r for r in rows if r["model"] == m}
        xs = [j + i * width for j in range(len(METHODS))]
        secs = [rs[k]["seconds"] for k in METHODS]
        mems = [rs[k]["peak_mem_mb"] or 0 for k in METHODS]
        label_bars(axes[0], axes[0].bar(xs, secs, width, label=f"ViT-{m} (n={summary[m]['n_samples']})"), secs, "{:.1f}")
        label_bars(axes[1], axes[1].bar(xs, mems, width, label=f"ViT-{m}"), mems, "{:.0f}")
    for ax, title, label in [(axes[0], "time (best of runs)", "seconds (log)"),
                             (axes[1], "peak RSS growth during the call", "MB (log)")]:
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(METHODS))])
        ax.set_xticklabels(METHODS, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=8)

    # ratios to inference, with the targets; the prototype accumulator where it was measured
    kinds = [("stats_exact", "exact"), ("stats_subsampled", "subsampled")]
    ax = axes[2]
    for i, m in enumerate(models):
        values = [summary[m]["ratio_stats_exact_over_inference"], summary[m]["ratio_stats_subsampled_over_inference"]]
        xs = [j + i * width for j in range(2)]
        label_bars(ax, ax.bar(xs, values, width, label=f"ViT-{m}"), values, "{:.2f}")
        proto = investigation.get(m, {}).get("prototype_accumulator")
        if proto:
            pv = [proto["stats_exact_proto"]["ratio_over_inference"], proto["stats_subsampled_proto"]["ratio_over_inference"]]
            ax.scatter(xs, pv, marker="_", s=300, color="black", zorder=3,
                       label="prototype accumulator" if i == 0 else None)
    ax.axhline(2.0, ls="--", lw=1, color="tab:red")
    ax.axhline(1.2, ls=":", lw=1, color="tab:red")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(2)])
    ax.set_xticklabels([k for _, k in kinds])
    ax.set_title("statistics pass / inference (targets 2.0, 1.2)")
    ax.legend(fontsize=8)
    fig.suptitle(f"SAP statistics vs inference vs stored-activation SVD (CPU, float32, {IMAGE}x{IMAGE})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
