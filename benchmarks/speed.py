#!/usr/bin/env python
"""Speed and memory of SAP's streaming statistics against plain inference and the reference SVD.

Side by side, in ONE process and interleaved (so ratios are fair), for a ViT-Tiny and a ViT-Base
shape (random init, 224x224, patch 16 -> 197 tokens, 10 labels, float32, eval + no_grad; --quick
uses 64x64 images, 17 tokens):

  inference         plain forward over the n samples
  stats_exact       sap_hf.core.stats.collect_statistics, every token (the default); timed as
                    `speed_investigate.instrumented_statistics`, the library's loop with timers on the
                    Gram updates (for the breakdown), checked equal to collect_statistics at warm-up
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
GramAccumulator.update / .result and subsample_tokens), Gram-update micro-benchmarks per block
size, the finalisation cost, the statistics pass with float64 accumulation, and a prototype
GramAccumulator (recursive update + in-place mirror) timed interleaved with the others.

Run: python benchmarks/speed.py            (full run, writes benchmarks/results/speed.{json,png})
     python benchmarks/speed.py --quick    (smoke run: tiny shape, a few samples)

Files: this one runs the benchmark and writes speed.json; `speed_methods.py` holds the shapes, data,
FLOP counts and the compared methods, `speed_memory.py` the memory probes and the fresh-process
child, `speed_investigate.py` the --investigate profiling and prototypes, `speed_report.py` the
table and the figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import common
import torch
from speed_investigate import (
    PROTO_METHODS,
    breakdown,
    instrumented_statistics,
    investigate,
    matches_library,
    prototype_accumulator_class,
)
from speed_memory import measure, run_child
from speed_methods import (
    IMAGE,
    LABELS,
    LAYERS,
    METHODS,
    PATCH,
    SHAPES,
    RandomBatches,
    build_model,
    forward_flops_per_sample,
    gram_flops_per_sample,
    max_relative_difference,
    run_eigh_project,
    run_inference,
    run_reference_svd,
    tokens_per_sample,
    verify,
)
from speed_report import plot, print_table


SLOW_METHODS = {"eigh_project", "reference_svd"}


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


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, plus the run plan derived from it (image size, models, n and batch size per
    model, repeats, methods, whether to investigate) as `args.image`, `args.models_list`, `args.n_per`,
    `args.bs_per`, `args.repeat_count`, `args.method_list`, `args.do_investigate`, `args.all_methods`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default=None, help="samples per model: an int, or 'tiny=256,base=32'")
    parser.add_argument("--batch_size", default=None, help="an int, or 'tiny=32,base=8'")
    parser.add_argument("--models", default=None, help="comma list from: tiny,base")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="subset of methods to run (summary fields that need a missing one are null)",
    )
    parser.add_argument("--cap", type=int, default=16, help="max_tokens_per_sample for stats_subsampled")
    parser.add_argument("--alpha", type=float, default=1e4)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (best of)")
    parser.add_argument(
        "--slow_seconds",
        type=float,
        default=20.0,
        help="eigh_project/reference_svd run once when a run takes longer than this",
    )
    parser.add_argument("--mem_factor", type=int, default=4, help="stats_exact memory at n and mem_factor*n")
    parser.add_argument("--no_mem_children", action="store_true", help="skip the fresh-process n vs 4n memory runs")
    parser.add_argument(
        "--investigate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile the statistics pass (default: on, off with --quick)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--verify_n",
        type=int,
        default=8,
        help="samples for the float64 accuracy check (SVD of stored activations vs Gram path)",
    )
    parser.add_argument(
        "--verify_full",
        default=None,
        help="models whose accuracy check also covers float32 Gram/SVD over an alpha sweep "
        "(default: tiny; none with --quick)",
    )
    parser.add_argument(
        "--wait_quiet",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the 1-min load average to drop below 0.5",
    )
    parser.add_argument("--image_size", type=int, default=None, help="default 224 (64 with --quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny shape, 64x64 images, 4 samples, 1 repeat, no investigation",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)

    args.image = args.image_size or (64 if args.quick else IMAGE)
    if args.image % PATCH:
        raise SystemExit(f"--image_size must be a multiple of the patch size {PATCH}")

    args.models_list = (args.models or ("tiny" if args.quick else "tiny,base")).split(",")
    for m in args.models_list:
        if m not in SHAPES:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(SHAPES)}")
    args.n_per = parse_per_model(args.n or ("4" if args.quick else "tiny=128,base=32"), args.models_list, "n")
    args.bs_per = parse_per_model(
        args.batch_size or ("2" if args.quick else "tiny=32,base=8"), args.models_list, "batch_size"
    )
    args.repeat_count = args.repeats or (1 if args.quick else 3)
    args.method_list = [x for x in args.methods.split(",") if x]
    unknown = [x for x in args.method_list if x not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if "eigh_project" in args.method_list and "stats_exact" not in args.method_list:
        raise SystemExit("eigh_project needs stats_exact")
    args.do_investigate = (not args.quick) if args.investigate is None else args.investigate
    args.all_methods = set(METHODS) <= set(args.method_list)
    if args.do_investigate and not {"inference", "stats_exact", "stats_subsampled"} <= set(args.method_list):
        raise SystemExit("--investigate needs inference, stats_exact and stats_subsampled among --methods")
    return args


def record_environment(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Wait for a quiet machine if asked, then record versions, threads, CPU, load and the matmul rate.

    Returns the record and the start of the wall clock (`env["wall_seconds"]` counts from there)."""
    waited = 0.0
    while args.wait_quiet and waited < args.wait_quiet and (common.loadavg() or [0])[0] >= 0.5:
        time.sleep(10)
        waited += 10
    env = {
        "waited_for_quiet_s": waited,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu": common.cpu_name(),
        "python": platform.python_version(),
        "loadavg_start": common.loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    wall_start = time.perf_counter()
    print(
        f"torch {env['torch']}, threads={env['torch_threads']} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
        f"cpus={env['cpu_count']}, load={env['loadavg_start']}",
        flush=True,
    )
    if (env["loadavg_start"] or [0])[0] > 0.5:
        print(
            "WARNING: the machine is busy; with more runnable threads than cores, torch's OpenMP threads "
            "slow down by several x (see env.loadavg_*).",
            flush=True,
        )
    size = 1024 if args.quick else 2048
    env[f"matmul_{size}_gflops"] = round(common.matmul_gflops(size), 1)
    print(f"{size}^3 float32 matmul: {env[f'matmul_{size}_gflops']} GFLOP/s", flush=True)
    return env, wall_start


def discover_groups(model: torch.nn.Module, names: list[str], pixels: torch.Tensor) -> list[Any]:
    """Which target layers share an input, from one forward of `pixels` (the library learns it from its first batch)."""
    from sap_hf.core.stats import input_hooks
    from sap_hf.core.targets import group_by_identity

    seen: dict[str, torch.Tensor] = {}
    model.eval()
    with input_hooks(model, names, lambda name, tensor: seen.setdefault(name, tensor)):
        model(pixel_values=pixels)
    modules = dict(model.named_modules())
    return group_by_identity(names, [seen[n] for n in names], [modules[n].in_features for n in names])


def build_contexts(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per model: the model, its targets, the materialised batches and groups; every forward path warmed up once."""
    from sap_hf.core.targets import find_target_modules

    ctx: dict[str, dict[str, Any]] = {}
    for m in args.models_list:
        model = build_model(m, image_size=args.image)
        names = find_target_modules(model)
        data = list(RandomBatches(args.n_per[m], args.bs_per[m], seed=1, image_size=args.image))
        with torch.no_grad():
            groups = discover_groups(model, names, data[0]["pixel_values"][:1])
        ctx[m] = {"model": model, "names": names, "data": data, "groups": groups, "runs": {k: [] for k in METHODS}}
        # warm-up: one batch through each forward-based path (lazy init of oneDNN kernels etc.); the timed statistics
        # pass (benchmark-side instrumentation, speed_investigate.py) must return exactly the library's statistics
        run_inference(model, data[:1])
        ctx[m]["instrumented_matches_library"] = all(
            matches_library(model, data[:1], names, args.bs_per[m], cap) for cap in (None, args.cap)
        )
        if not ctx[m]["instrumented_matches_library"]:
            raise RuntimeError(
                f"[{m}] the instrumented statistics pass differs from sap_hf's collect_statistics: "
                "update speed_investigate.instrumented_statistics to the library's loop."
            )
    return ctx


def run_method(args: argparse.Namespace, ctx: dict[str, dict[str, Any]], m: str, method: str) -> None:
    """One timed (and memory-measured) call of `method` on model `m`; the model is left unprojected."""
    from sap_hf.core.projection import write_weights

    c = ctx[m]
    model, data, names, bs = c["model"], c["data"], c["names"], args.bs_per[m]
    timers = None
    if method == "inference":
        seconds, mem, _ = measure(lambda: run_inference(model, data))
    elif method in ("stats_exact", "stats_subsampled", "stats_exact_proto", "stats_subsampled_proto"):
        cap = None if method.startswith("stats_exact") else args.cap
        accumulator = prototype_accumulator_class() if method.endswith("_proto") else None
        seconds, mem, (stats, timers) = measure(
            lambda: instrumented_statistics(model, data, names, bs, cap, accumulator=accumulator)
        )
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


def time_methods(args: argparse.Namespace, ctx: dict[str, dict[str, Any]]) -> None:
    """Every method `args.repeat_count` times, interleaved across models, order rotated each repeat."""
    timed_methods = args.method_list + (PROTO_METHODS if args.do_investigate else [])
    for r in range(args.repeat_count):
        print(f"repeat {r + 1}/{args.repeat_count}", flush=True)
        for m in args.models_list:
            order = timed_methods[r % len(timed_methods) :] + timed_methods[: r % len(timed_methods)]
            # eigh_project needs the Grams of a stats_exact run: keep it after stats_exact
            if "stats" not in ctx[m]:
                order = ["stats_exact"] + [x for x in order if x != "stats_exact"]
            for method in order:
                runs = ctx[m]["runs"].setdefault(method, [])
                if method in SLOW_METHODS and runs and min(x["seconds"] for x in runs) > args.slow_seconds:
                    continue
                run_method(args, ctx, m, method)


def memory_children(args: argparse.Namespace) -> dict[str, Any]:
    """stats_exact at n and mem_factor * n, each in a fresh process (`speed_memory.run_child`)."""
    mem_children: dict[str, Any] = {}
    for m in args.models_list:
        mem_children[m] = {}
        # one fresh process per size; --quick measures both sizes in one process (saves a start-up)
        sizes = (
            [[args.n_per[m], args.n_per[m] * args.mem_factor]]
            if args.quick
            else [[args.n_per[m]], [args.n_per[m] * args.mem_factor]]
        )
        for ns in sizes:
            spec = {
                "model": m,
                "ns": ns,
                "batch_size": args.bs_per[m],
                "threads": torch.get_num_threads(),
                "image_size": args.image,
            }
            print(f"memory child: {m} stats_exact n={ns}", flush=True)
            for res in run_child(spec, timeout=3600):
                key = "1" if res["n"] == args.n_per[m] else str(args.mem_factor)
                mem_children[m][key] = res
                print(
                    f"  -> n={res['n']}: peak growth {res['peak_growth_mb']:.1f} MB ({res['seconds']:.1f} s)",
                    flush=True,
                )
    return mem_children


def verify_models(args: argparse.Namespace, ctx: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Projected weights of the Gram path against the SVD of the stored activations (`speed_methods.verify`)."""
    verification: dict[str, Any] = {}
    verify_full = args.verify_full if args.verify_full is not None else ("" if args.quick else "tiny")
    full_models = set(verify_full.split(",")) if verify_full else set()
    for m in args.models_list if "reference_svd" in args.method_list else []:
        c = ctx[m]
        vn = min(args.verify_n, args.n_per[m]) if args.verify_n else args.n_per[m]
        alphas = sorted({1.0, 1e2, 1e4, 1e6, args.alpha}) if m in full_models else [args.alpha]
        print(f"accuracy check: {m}, n={vn}, alphas={alphas}", flush=True)
        start = time.perf_counter()
        verification[m] = verify(
            c["model"],
            c["names"],
            c["groups"],
            list(RandomBatches(vn, args.bs_per[m], seed=2, image_size=args.image)),
            args.bs_per[m],
            alphas,
            full=m in full_models,
        )
        verification[m]["seconds"] = round(time.perf_counter() - start, 1)
        for row in verification[m]["per_alpha"]:
            print("  " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)
    return verification


def investigate_models(args: argparse.Namespace, ctx: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """--investigate: micro-benchmarks, the float64 pass and the prototype accumulator's runs, per model."""
    investigation: dict[str, Any] = {}
    if args.do_investigate:
        for m in args.models_list:
            c = ctx[m]
            inf = min(x["seconds"] for x in c["runs"]["inference"])
            investigation[m] = {}
            if args.all_methods:  # micro-benchmarks and the float64 pass only in a full run
                print(f"investigating the statistics pass: {m}", flush=True)
                investigation[m] = investigate(m, args.bs_per[m], image_size=args.image)
                # the cost of the accurate alternative: float64 accumulation, same n, one run
                seconds, mem, (_, timers) = measure(
                    lambda: instrumented_statistics(c["model"], c["data"], c["names"], args.bs_per[m], None, "float64")
                )
                investigation[m]["stats_exact_float64_accumulation"] = {
                    "seconds": round(seconds, 3),
                    "ratio_over_inference": round(seconds / inf, 3),
                    "peak_mem_mb": None if mem is None else round(mem, 1),
                    "breakdown_s": breakdown({"seconds": seconds, "timers": dict(timers)}, inf),
                }
                print(
                    f"  stats_exact float64 accumulation: {seconds:.2f} s ({seconds / inf:.2f}x inference)", flush=True
                )
            proto = {}
            for method in PROTO_METHODS:
                runs = c["runs"][method]
                fastest = min(runs, key=lambda x: x["seconds"])
                mems = [x["peak_mem_mb"] for x in runs if x["peak_mem_mb"] is not None]
                proto[method] = {
                    "seconds": round(fastest["seconds"], 3),
                    "all_seconds": [round(x["seconds"], 3) for x in runs],
                    "ratio_over_inference": round(fastest["seconds"] / inf, 3),
                    "peak_mem_mb": round(max(mems), 1) if mems else None,
                    "breakdown_s": breakdown(fastest, inf),
                }
            lib, new = c["stats"], c["proto_stats"]
            proto["gram_max_rel_diff_vs_library"] = max(
                float((new.grams[g].double() - lib.grams[g].double()).abs().max() / lib.grams[g].double().abs().max())
                for g in lib.grams
            )
            proto["exactly_symmetric"] = all(torch.equal(t, t.T) for t in new.grams.values())
            investigation[m]["prototype_accumulator"] = proto
            del c["proto_stats"]
    return investigation


def summarise(
    args: argparse.Namespace,
    ctx: dict[str, dict[str, Any]],
    verification: dict[str, Any],
    mem_children: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (best run per model and method) and the per-model summary with the targets."""
    rows, summary = [], {}
    for m in args.models_list:
        c = ctx[m]
        best = {}
        for method in args.method_list:
            runs = c["runs"][method]
            fastest = min(runs, key=lambda x: x["seconds"])
            mems = [x["peak_mem_mb"] for x in runs if x["peak_mem_mb"] is not None]
            best[method] = fastest
            rows.append(
                {
                    "model": m,
                    "method": method,
                    "n_samples": args.n_per[m],
                    "seconds": round(fastest["seconds"], 4),
                    "peak_mem_mb": round(max(mems), 1) if mems else None,
                    "runs": len(runs),
                    "all_seconds": [round(x["seconds"], 4) for x in runs],
                }
            )
        inf = best["inference"]["seconds"]
        fwd = forward_flops_per_sample(m, args.image) * args.n_per[m]
        gram_exact = gram_flops_per_sample(m, image_size=args.image) * args.n_per[m]
        gram_sub = gram_flops_per_sample(m, args.cap, image_size=args.image) * args.n_per[m]
        full = set(METHODS) <= set(args.method_list)
        if not full:  # a partial run: only the ratios to inference
            summary[m] = {
                "n_samples": args.n_per[m],
                "batch_size": args.bs_per[m],
                "methods": args.method_list,
                "instrumented_pass_matches_library": c["instrumented_matches_library"],
                **{
                    f"ratio_{k}_over_inference": round(best[k]["seconds"] / inf, 3)
                    for k in args.method_list
                    if k in ("stats_exact", "stats_subsampled")
                },
                **{f"{k}_breakdown_s": breakdown(best[k], inf) for k in args.method_list if k.startswith("stats")},
            }
            continue
        timed_diff = max_relative_difference(c["ours"], c["ref"])
        check = next(r for r in verification[m]["per_alpha"] if r["alpha"] == args.alpha)
        ours_total = best["stats_exact"]["seconds"] + best["eigh_project"]["seconds"]
        ref_mem = max(x["peak_mem_mb"] or 0 for x in c["runs"]["reference_svd"])
        our_mem = max(x["peak_mem_mb"] or 0 for x in c["runs"]["stats_exact"])
        s = {
            "n_samples": args.n_per[m],
            "batch_size": args.bs_per[m],
            "tokens_per_sample": tokens_per_sample(args.image),
            "token_cap": args.cap,
            "alpha": args.alpha,
            "groups": len(c["groups"]),
            "target_layers": len(c["names"]),
            "instrumented_pass_matches_library": c["instrumented_matches_library"],
            "ratio_stats_exact_over_inference": round(best["stats_exact"]["seconds"] / inf, 3),
            "ratio_stats_subsampled_over_inference": round(best["stats_subsampled"]["seconds"] / inf, 3),
            "target_stats_exact_le_2": best["stats_exact"]["seconds"] / inf <= 2.0,
            "target_stats_subsampled_le_1_2": best["stats_subsampled"]["seconds"] / inf <= 1.2,
            "ours_stats_plus_eigh_s": round(ours_total, 3),
            "speedup_vs_reference_svd": round(best["reference_svd"]["seconds"] / ours_total, 3),
            "speedup_stats_exact_vs_reference_svd": round(
                best["reference_svd"]["seconds"] / best["stats_exact"]["seconds"], 3
            ),
            "reference_svd_peak_mem_mb": round(ref_mem, 1),
            "stats_exact_peak_mem_mb": round(our_mem, 1),
            "memory_ratio_reference_over_stats_exact": round(ref_mem / our_mem, 2) if our_mem else None,
            "reference_stored_activations_mb": round(
                sum(g.in_features for g in c["groups"][:-1])
                * tokens_per_sample(args.image)
                * args.n_per[m]
                * 4
                / 2**20
                + c["groups"][-1].in_features * args.n_per[m] * 4 / 2**20,
                1,
            ),
            "max_rel_diff": check["gram_float64_vs_svd_float64"],
            "max_rel_diff_check": (
                f"accumulation_dtype=float64 Gram -> eigh vs float64 SVD of the stored activations, "
                f"alpha={args.alpha:g}, n={verification[m]['n_samples']}"
            ),
            "weights_match_1e-5": check["gram_float64_vs_svd_float64"] <= 1e-5,
            "max_rel_diff_default_float32_gram": check.get("gram_float32_vs_svd_float64"),
            "max_rel_diff_timed_runs": timed_diff["max_abs_over_max_abs"],
            "max_rel_diff_timed_runs_note": "library default (float32 Gram) vs reference_svd (float32 SVD), both at n",
            "frobenius_rel_diff_timed_runs": timed_diff["frobenius"],
            "flops": {
                "forward_gflop_per_sample": round(forward_flops_per_sample(m, args.image) / 1e9, 3),
                "gram_exact_gflop_per_sample": round(gram_flops_per_sample(m, image_size=args.image) / 1e9, 3),
                "gram_subsampled_gflop_per_sample": round(
                    gram_flops_per_sample(m, args.cap, image_size=args.image) / 1e9, 3
                ),
                "gram_full_gemm_gflop_per_sample": round(
                    gram_flops_per_sample(m, block=None, image_size=args.image) / 1e9, 3
                ),
                "inference_gflops_per_s": round(fwd / inf / 1e9, 1),
                "stats_exact_gflops_per_s": round((fwd + gram_exact) / best["stats_exact"]["seconds"] / 1e9, 1),
                "stats_subsampled_gflops_per_s": round(
                    (fwd + gram_sub) / best["stats_subsampled"]["seconds"] / 1e9, 1
                ),
                "stats_exact_ideal_ratio_at_inference_rate": round(1 + gram_exact / fwd, 3),
            },
            "stats_exact_breakdown_s": breakdown(best["stats_exact"], inf),
            "stats_subsampled_breakdown_s": breakdown(best["stats_subsampled"], inf),
        }
        if m in mem_children:
            small, large = mem_children[m]["1"], mem_children[m][str(args.mem_factor)]
            s["memory_n_vs_4n"] = {
                "method": (
                    "fresh subprocess per size (--quick: one subprocess, both sizes), lazily generated data, "
                    "VmHWM - VmRSS around collect_statistics, glibc mmap threshold pinned"
                ),
                "n": small["n"],
                "n_peak_growth_mb": round(small["peak_growth_mb"], 1),
                "big_n": large["n"],
                "big_n_peak_growth_mb": round(large["peak_growth_mb"], 1),
                "growth_pct": round(
                    100 * (large["peak_growth_mb"] - small["peak_growth_mb"]) / small["peak_growth_mb"], 2
                ),
                "target_le_5pct": (large["peak_growth_mb"] - small["peak_growth_mb"]) / small["peak_growth_mb"]
                <= 0.05,
                "seconds": [round(small["seconds"], 2), round(large["seconds"], 2)],
            }
        summary[m] = s
    return rows, summary


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env, wall_start = record_environment(args)
    ctx = build_contexts(args)
    time_methods(args, ctx)
    mem_children = {} if args.no_mem_children else memory_children(args)
    verification = verify_models(args, ctx)
    investigation = investigate_models(args, ctx) if args.do_investigate else {}
    rows, summary = summarise(args, ctx, verification, mem_children)
    env["loadavg_end"] = common.loadavg()
    env["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    result = {
        "rows": rows,
        "summary": summary,
        "verification": verification,
        "investigation": investigation,
        "env": env,
        "config": {
            "image_size": args.image,
            "patch_size": PATCH,
            "layers": LAYERS,
            "num_labels": LABELS,
            "dtype": "float32",
            "repeats": args.repeat_count,
            "methods": args.method_list,
            "command": " ".join(sys.argv),
            "slow_seconds": args.slow_seconds,
            "quick": args.quick,
            "timing": "best of `runs` per method (after a one-batch warm-up), args.method_list interleaved, order rotated per repeat",
            "peak_mem_mb": "max over runs of VmHWM - VmRSS(before) around the call, after gc + malloc_trim and a clear_refs HWM reset",
            "flops": "forward: L[2T(4h^2+2hm)+4T^2h] + 2(T-1)3p^2h + 2hC; Gram: per group 2 t sum_blocks (e-s)(d-s), 256-row blocks",
            "max_rel_diff": "max over projected layers of max|W_ours - W_ref| / max|W_ref|",
            "reference_svd": "forward keeping all group inputs (float32), torch.linalg.svd(X^T, full_matrices=False) "
            "in float32 per group, lambda from sigma^2, W @ (U diag(lambda) U^T) in float64, written",
        },
    }
    print_table(rows, summary)
    common.write_json(out_dir / "speed.json", result, indent=2)
    if not args.no_plot and args.all_methods:
        plot(rows, summary, investigation, out_dir / "speed.png", args.image)
    print(f"wrote {out_dir / 'speed.json'} (wall {env['wall_seconds']} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
