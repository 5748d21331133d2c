#!/usr/bin/env python
"""Speed and memory of SAP's streaming statistics against plain inference and the paper's stored-activation SVD.

On random-init ViT-Tiny and ViT-Base shapes, in one process and interleaved so that the ratios are fair: plain
inference, the statistics pass (every token, and a token cap), eigh + projection, and the reference SVD, whose projected
weights are compared with ours; stats_exact's memory at n and 4n in fresh processes; with --investigate (on by default,
off with --quick) where the statistics pass spends its time. Protocol, method definitions and results:
benchmarks/studies/cost.md, section "Speed and memory".

Run: python benchmarks/speed.py --threads 1   (full run, writes benchmarks/results/speed.{json,png})
     python benchmarks/speed.py --quick       (smoke run: tiny shape, 64x64 images, a few samples)

Files: this one runs the benchmark and writes speed.json; `speed_methods.py` holds the shapes, data, FLOP counts and
the compared methods, `speed_memory.py` the memory probes and the fresh-process child, `speed_investigate.py` the timed
statistics pass and --investigate, `speed_report.py` the table and the figure.
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


SLOW_METHODS = {"eigh_project", "reference_svd"}  # run once when one run takes more than --slow_seconds


def per_model(value: str, models: list[str], name: str) -> dict[str, int]:
    """'64' -> the same for every model; 'tiny=256,base=64' -> per model."""
    if "=" not in value:
        return {m: int(value) for m in models}
    parsed = dict(item.split("=") for item in value.split(","))
    missing = [m for m in models if m not in parsed]
    if missing:
        raise SystemExit(f"--{name} gives no value for {missing}")
    return {m: int(parsed[m]) for m in models}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line with its defaults resolved: `models` and `methods` lists, `n` and `batch_size` {model: int},
    `image_size`, `repeats`, `investigate`, `verify_full` (a set of models) and `all_methods` set."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", help="samples per model: an int, or 'tiny=256,base=32'")
    p.add_argument("--batch_size", help="an int, or 'tiny=32,base=8'")
    p.add_argument("--models", help="comma list from: tiny,base")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list (summary fields needing a missing one: null)"
    )
    p.add_argument("--cap", type=int, default=16, help="max_tokens_per_sample for stats_subsampled")
    p.add_argument("--alpha", type=float, default=1e4)
    p.add_argument("--repeats", type=int, help="timed runs per method (best of)")
    p.add_argument("--slow_seconds", type=float, default=20.0, help="run eigh_project/reference_svd once beyond this")
    p.add_argument("--mem_factor", type=int, default=4, help="stats_exact memory at n and mem_factor*n")
    p.add_argument("--no_mem_children", action="store_true", help="skip the fresh-process n vs 4n memory runs")
    p.add_argument(
        "--investigate",
        action=argparse.BooleanOptionalAction,
        help="profile the statistics pass (default: on, off with --quick)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--verify_n", type=int, default=8, help="samples of the float64 check of the projected weights")
    p.add_argument(
        "--verify_full",
        help="models whose weights check adds float32 and an alpha sweep (default: tiny; none with --quick)",
    )
    p.add_argument("--wait_quiet", type=float, default=0.0, help="wait up to this long for a 1-min load below 0.5")
    p.add_argument("--image_size", type=int, help="default 224 (64 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, 64x64, 4 samples, 1 repeat, no profiling")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no_plot", action="store_true")
    args = p.parse_args(argv)

    args.image_size = args.image_size or (64 if args.quick else IMAGE)
    if args.image_size % PATCH:
        raise SystemExit(f"--image_size must be a multiple of the patch size {PATCH}")
    args.models = (args.models or ("tiny" if args.quick else "tiny,base")).split(",")
    for m in args.models:
        if m not in SHAPES:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(SHAPES)}")
    args.n = per_model(args.n or ("4" if args.quick else "tiny=128,base=32"), args.models, "n")
    args.batch_size = per_model(
        args.batch_size or ("2" if args.quick else "tiny=32,base=8"), args.models, "batch_size"
    )
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.methods = [x for x in args.methods.split(",") if x]
    unknown = [x for x in args.methods if x not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    if "eigh_project" in args.methods and "stats_exact" not in args.methods:
        raise SystemExit("eigh_project needs stats_exact")
    args.investigate = (not args.quick) if args.investigate is None else args.investigate
    if args.investigate and not {"inference", "stats_exact", "stats_subsampled"} <= set(args.methods):
        raise SystemExit("--investigate needs inference, stats_exact and stats_subsampled among --methods")
    verify_full = args.verify_full if args.verify_full is not None else ("" if args.quick else "tiny")
    args.verify_full = set(verify_full.split(",")) if verify_full else set()
    args.all_methods = set(METHODS) <= set(args.methods)
    return args


def record_environment(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Wait for a quiet machine if asked, then record versions, threads, CPU, load and the matmul rate; the record and
    the start of the wall clock."""
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


class Bench:
    """One model under test, its materialised batches, and what its timed runs left."""

    def __init__(
        self, model: torch.nn.Module, names: list[str], data: list[dict], groups: list, matches_library: bool
    ):
        self.model, self.names, self.data, self.groups = model, names, data, groups
        self.matches_library = matches_library  # the timed statistics pass gives exactly collect_statistics's result
        self.runs: dict[str, list[dict[str, Any]]] = {k: [] for k in METHODS}
        self.stats = self.proto_stats = None  # the last stats_exact (eigh_project projects with it) and _proto run's
        self.ours = self.ref = None  # the weights eigh_project and reference_svd computed


def build_benches(args: argparse.Namespace) -> dict[str, Bench]:
    """Per model: the model, its targets, batches and groups, with every forward path warmed up once (lazy init of
    oneDNN kernels etc.) and the timed statistics pass checked against the library's."""
    from sap_hf.core.targets import find_target_modules

    benches = {}
    for m in args.models:
        model = build_model(m, image_size=args.image_size)
        names = find_target_modules(model)
        data = list(RandomBatches(args.n[m], args.batch_size[m], seed=1, image_size=args.image_size))
        with torch.no_grad():
            groups = discover_groups(model, names, data[0]["pixel_values"][:1])
        run_inference(model, data[:1])
        same = all(matches_library(model, data[:1], names, args.batch_size[m], cap) for cap in (None, args.cap))
        if not same:
            raise RuntimeError(
                f"[{m}] the instrumented statistics pass differs from sap_hf's collect_statistics: "
                "update speed_investigate.instrumented_statistics to the library's loop."
            )
        benches[m] = Bench(model, names, data, groups, same)
    return benches


def run_method(args: argparse.Namespace, m: str, bench: Bench, method: str) -> None:
    """One timed (and memory-measured) call of `method` on model `m`; the model is left unprojected."""
    from sap_hf.core.projection import write_weights

    model, data, names = bench.model, bench.data, bench.names
    timers = None
    if method == "inference":
        seconds, mem, _ = measure(lambda: run_inference(model, data))
    elif method.startswith("stats_"):  # stats_exact, stats_subsampled and their _proto variants
        cap = None if method.startswith("stats_exact") else args.cap
        accumulator = prototype_accumulator_class() if method.endswith("_proto") else None
        seconds, mem, (stats, timers) = measure(
            lambda: instrumented_statistics(model, data, names, args.batch_size[m], cap, accumulator=accumulator)
        )
        timers = dict(timers)
        if method == "stats_exact":
            bench.stats = stats
        elif method == "stats_exact_proto":
            bench.proto_stats = stats
    else:  # eigh_project, reference_svd: keep the projected weights, then write the originals back
        originals = {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}
        if method == "eigh_project":
            seconds, mem, bench.ours = measure(lambda: run_eigh_project(model, bench.stats, args.alpha))
        else:
            seconds, mem, bench.ref = measure(lambda: run_reference_svd(model, data, bench.groups, args.alpha))
        write_weights(model, originals)
        del originals
    bench.runs.setdefault(method, []).append({"seconds": seconds, "peak_mem_mb": mem, "timers": timers})
    mem_txt = "n/a" if mem is None else f"{mem:.0f} MB"
    print(f"  [{m}] {method:<17} {seconds:8.2f} s   peak +{mem_txt}", flush=True)


def time_methods(args: argparse.Namespace, benches: dict[str, Bench]) -> None:
    """Every method `args.repeats` times, interleaved across models, the order rotated each repeat."""
    methods = args.methods + (PROTO_METHODS if args.investigate else [])
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        for m, bench in benches.items():
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            if bench.stats is None:  # eigh_project needs the Grams of a stats_exact run: keep it after stats_exact
                order = ["stats_exact"] + [x for x in order if x != "stats_exact"]
            for method in order:
                runs = bench.runs.setdefault(method, [])
                if method in SLOW_METHODS and runs and min(x["seconds"] for x in runs) > args.slow_seconds:
                    continue
                run_method(args, m, bench, method)


def memory_children(args: argparse.Namespace) -> dict[str, Any]:
    """stats_exact at n and mem_factor * n, each in a fresh process (`speed_memory.run_child`); --quick measures both
    sizes in one process (saves a start-up)."""
    children: dict[str, Any] = {}
    threads, image = torch.get_num_threads(), args.image_size
    for m in args.models:
        children[m] = {}
        n, big_n = args.n[m], args.n[m] * args.mem_factor
        for ns in [[n, big_n]] if args.quick else [[n], [big_n]]:
            spec = {"model": m, "ns": ns, "batch_size": args.batch_size[m], "threads": threads, "image_size": image}
            print(f"memory child: {m} stats_exact n={ns}", flush=True)
            for res in run_child(spec, timeout=3600):
                children[m]["1" if res["n"] == n else str(args.mem_factor)] = res
                print(
                    f"  -> n={res['n']}: peak growth {res['peak_growth_mb']:.1f} MB ({res['seconds']:.1f} s)",
                    flush=True,
                )
    return children


def verify_models(args: argparse.Namespace, benches: dict[str, Bench]) -> dict[str, Any]:
    """Projected weights of the Gram path against the SVD of the stored activations (`speed_methods.verify`)."""
    verification: dict[str, Any] = {}
    if "reference_svd" not in args.methods:
        return verification
    for m, bench in benches.items():
        vn = min(args.verify_n, args.n[m]) if args.verify_n else args.n[m]
        full = m in args.verify_full
        alphas = sorted({1.0, 1e2, 1e4, 1e6, args.alpha}) if full else [args.alpha]
        print(f"accuracy check: {m}, n={vn}, alphas={alphas}", flush=True)
        start = time.perf_counter()
        data = list(RandomBatches(vn, args.batch_size[m], seed=2, image_size=args.image_size))
        verification[m] = verify(bench.model, bench.names, bench.groups, data, args.batch_size[m], alphas, full=full)
        verification[m]["seconds"] = round(time.perf_counter() - start, 1)
        for row in verification[m]["per_alpha"]:
            print("  " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)
    return verification


def best_run(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], Optional[float]]:
    """The fastest of a method's runs, and the largest peak memory growth over them (MB; None where unmeasured)."""
    mems = [x["peak_mem_mb"] for x in runs if x["peak_mem_mb"] is not None]
    return min(runs, key=lambda x: x["seconds"]), (round(max(mems), 1) if mems else None)


def investigate_models(args: argparse.Namespace, benches: dict[str, Bench]) -> dict[str, Any]:
    """--investigate: micro-benchmarks, the float64 pass and the prototype accumulator's runs, per model."""
    investigation: dict[str, Any] = {}
    for m, bench in benches.items():
        inf = min(x["seconds"] for x in bench.runs["inference"])
        investigation[m] = {}
        if args.all_methods:  # micro-benchmarks and the float64 pass only in a full run
            print(f"investigating the statistics pass: {m}", flush=True)
            bs = args.batch_size[m]
            investigation[m] = investigate(m, bs, image_size=args.image_size)
            # the cost of the accurate alternative: float64 accumulation, same n, one run
            float64_pass = lambda: instrumented_statistics(bench.model, bench.data, bench.names, bs, None, "float64")
            seconds, mem, (_, timers) = measure(float64_pass)
            investigation[m]["stats_exact_float64_accumulation"] = {
                "seconds": round(seconds, 3),
                "ratio_over_inference": round(seconds / inf, 3),
                "peak_mem_mb": None if mem is None else round(mem, 1),
                "breakdown_s": breakdown({"seconds": seconds, "timers": dict(timers)}, inf),
            }
            print(f"  stats_exact float64 accumulation: {seconds:.2f} s ({seconds / inf:.2f}x inference)", flush=True)
        proto = {}
        for method in PROTO_METHODS:
            runs = bench.runs[method]
            fastest, peak = best_run(runs)
            proto[method] = {
                "seconds": round(fastest["seconds"], 3),
                "all_seconds": [round(x["seconds"], 3) for x in runs],
                "ratio_over_inference": round(fastest["seconds"] / inf, 3),
                "peak_mem_mb": peak,
                "breakdown_s": breakdown(fastest, inf),
            }
        library, new = bench.stats.grams, bench.proto_stats.grams
        proto["gram_max_rel_diff_vs_library"] = max(
            float((new[g].double() - library[g].double()).abs().max() / library[g].double().abs().max())
            for g in library
        )
        proto["exactly_symmetric"] = all(torch.equal(t, t.T) for t in new.values())
        investigation[m]["prototype_accumulator"] = proto
        bench.proto_stats = None
    return investigation


def memory_growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """stats_exact's peak memory growth at n and mem_factor * n (`memory_children`)."""
    growth = large["peak_growth_mb"] - small["peak_growth_mb"]
    return {
        "method": (
            "fresh subprocess per size (--quick: one subprocess, both sizes), lazily generated data, "
            "VmHWM - VmRSS around collect_statistics, glibc mmap threshold pinned"
        ),
        "n": small["n"],
        "n_peak_growth_mb": round(small["peak_growth_mb"], 1),
        "big_n": large["n"],
        "big_n_peak_growth_mb": round(large["peak_growth_mb"], 1),
        "growth_pct": round(100 * growth / small["peak_growth_mb"], 2),
        "target_le_5pct": growth / small["peak_growth_mb"] <= 0.05,
        "seconds": [round(small["seconds"], 2), round(large["seconds"], 2)],
    }


def model_summary(
    args: argparse.Namespace, m: str, bench: Bench, best: dict[str, dict[str, Any]], check: dict[str, Any], vn: int
) -> dict[str, Any]:
    """One model's summary in a full run: the targets, speed-ups, memory, weight differences and FLOP rates. `best`:
    the fastest run per method; `check`: the accuracy check's row at --alpha, on `vn` samples."""
    n, image, cap = args.n[m], args.image_size, args.cap
    seconds = {method: run["seconds"] for method, run in best.items()}
    inf, exact, subsampled = seconds["inference"], seconds["stats_exact"], seconds["stats_subsampled"]
    per_sample = {
        "forward": forward_flops_per_sample(m, image),
        "gram_exact": gram_flops_per_sample(m, image_size=image),
        "gram_subsampled": gram_flops_per_sample(m, cap, image_size=image),
        "gram_full_gemm": gram_flops_per_sample(m, block=None, image_size=image),
    }
    fwd, gram_exact, gram_sub = (per_sample[k] * n for k in ("forward", "gram_exact", "gram_subsampled"))
    timed_diff = max_relative_difference(bench.ours, bench.ref)
    ours_total = exact + seconds["eigh_project"]
    ref_mem = max(x["peak_mem_mb"] or 0 for x in bench.runs["reference_svd"])
    our_mem = max(x["peak_mem_mb"] or 0 for x in bench.runs["stats_exact"])
    tokens = tokens_per_sample(image)
    # what the reference keeps: every token's row of each encoder group's input, the CLS row of the classifier's
    stored_bytes = sum(g.in_features for g in bench.groups[:-1]) * tokens * n * 4
    return {
        "n_samples": n,
        "batch_size": args.batch_size[m],
        "tokens_per_sample": tokens,
        "token_cap": cap,
        "alpha": args.alpha,
        "groups": len(bench.groups),
        "target_layers": len(bench.names),
        "instrumented_pass_matches_library": bench.matches_library,
        "ratio_stats_exact_over_inference": round(exact / inf, 3),
        "ratio_stats_subsampled_over_inference": round(subsampled / inf, 3),
        "target_stats_exact_le_2": exact / inf <= 2.0,
        "target_stats_subsampled_le_1_2": subsampled / inf <= 1.2,
        "ours_stats_plus_eigh_s": round(ours_total, 3),
        "speedup_vs_reference_svd": round(seconds["reference_svd"] / ours_total, 3),
        "speedup_stats_exact_vs_reference_svd": round(seconds["reference_svd"] / exact, 3),
        "reference_svd_peak_mem_mb": round(ref_mem, 1),
        "stats_exact_peak_mem_mb": round(our_mem, 1),
        "memory_ratio_reference_over_stats_exact": round(ref_mem / our_mem, 2) if our_mem else None,
        "reference_stored_activations_mb": round(
            stored_bytes / 2**20 + bench.groups[-1].in_features * n * 4 / 2**20, 1
        ),
        "max_rel_diff": check["gram_float64_vs_svd_float64"],
        "max_rel_diff_check": (
            f"accumulation_dtype=float64 Gram -> eigh vs float64 SVD of the stored activations, "
            f"alpha={args.alpha:g}, n={vn}"
        ),
        "weights_match_1e-5": check["gram_float64_vs_svd_float64"] <= 1e-5,
        "max_rel_diff_default_float32_gram": check.get("gram_float32_vs_svd_float64"),
        "max_rel_diff_timed_runs": timed_diff["max_abs_over_max_abs"],
        "max_rel_diff_timed_runs_note": "library default (float32 Gram) vs reference_svd (float32 SVD), both at n",
        "frobenius_rel_diff_timed_runs": timed_diff["frobenius"],
        "flops": {
            **{f"{k}_gflop_per_sample": round(v / 1e9, 3) for k, v in per_sample.items()},
            "inference_gflops_per_s": round(fwd / inf / 1e9, 1),
            "stats_exact_gflops_per_s": round((fwd + gram_exact) / exact / 1e9, 1),
            "stats_subsampled_gflops_per_s": round((fwd + gram_sub) / subsampled / 1e9, 1),
            "stats_exact_ideal_ratio_at_inference_rate": round(1 + gram_exact / fwd, 3),
        },
        "stats_exact_breakdown_s": breakdown(best["stats_exact"], inf),
        "stats_subsampled_breakdown_s": breakdown(best["stats_subsampled"], inf),
    }


def summarise(
    args: argparse.Namespace, benches: dict[str, Bench], verification: dict[str, Any], children: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (the fastest run per model and method) and the per-model summary."""
    rows, summary = [], {}
    for m, bench in benches.items():
        best = {}
        for method in args.methods:
            runs = bench.runs[method]
            best[method], peak = best_run(runs)
            rows.append(
                {
                    "model": m,
                    "method": method,
                    "n_samples": args.n[m],
                    "seconds": round(best[method]["seconds"], 4),
                    "peak_mem_mb": peak,
                    "runs": len(runs),
                    "all_seconds": [round(x["seconds"], 4) for x in runs],
                }
            )
        inf = best["inference"]["seconds"]
        if not args.all_methods:  # a partial run: only the ratios to inference
            summary[m] = {
                "n_samples": args.n[m],
                "batch_size": args.batch_size[m],
                "methods": args.methods,
                "instrumented_pass_matches_library": bench.matches_library,
                **{
                    f"ratio_{k}_over_inference": round(best[k]["seconds"] / inf, 3)
                    for k in args.methods
                    if k in ("stats_exact", "stats_subsampled")
                },
                **{f"{k}_breakdown_s": breakdown(best[k], inf) for k in args.methods if k.startswith("stats")},
            }
            continue
        check = next(r for r in verification[m]["per_alpha"] if r["alpha"] == args.alpha)
        summary[m] = model_summary(args, m, bench, best, check, verification[m]["n_samples"])
        if m in children:
            summary[m]["memory_n_vs_4n"] = memory_growth(children[m]["1"], children[m][str(args.mem_factor)])
    return rows, summary


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env, wall_start = record_environment(args)
    benches = build_benches(args)
    time_methods(args, benches)
    children = {} if args.no_mem_children else memory_children(args)
    verification = verify_models(args, benches)
    investigation = investigate_models(args, benches) if args.investigate else {}
    rows, summary = summarise(args, benches, verification, children)
    env["loadavg_end"] = common.loadavg()
    env["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    result = {
        "rows": rows,
        "summary": summary,
        "verification": verification,
        "investigation": investigation,
        "env": env,
        "config": {
            "image_size": args.image_size,
            "patch_size": PATCH,
            "layers": LAYERS,
            "num_labels": LABELS,
            "dtype": "float32",
            "repeats": args.repeats,
            "methods": args.methods,
            "command": " ".join(sys.argv),
            "slow_seconds": args.slow_seconds,
            "quick": args.quick,
            "timing": "best of `runs` per method (after a one-batch warm-up), methods interleaved, order rotated per repeat",
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
        plot(rows, summary, investigation, out_dir / "speed.png", args.image_size)
    print(f"wrote {out_dir / 'speed.json'} (wall {env['wall_seconds']} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
