"""The table and the figure of `speed.py` (a support module), from its rows and summary (what speed.json holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report import pyplot, save_figure
from speed_methods import IMAGE, METHODS


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print()
    print(f"{'model':<6} {'method':<17} {'n':>5} {'seconds':>9} {'x inference':>12} {'peak MB':>9} {'runs':>5}")
    inference = {r["model"]: r["seconds"] for r in rows if r["method"] == "inference"}
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(
            f"{r['model']:<6} {r['method']:<17} {r['n_samples']:>5} {r['seconds']:>9.2f} "
            f"{r['seconds'] / inference[r['model']]:>12.2f} {mem:>9} {r['runs']:>5}"
        )
    for m, s in summary.items():
        if "methods" in s:  # partial run
            print(f"[{m}] " + ", ".join(f"{k}={v}" for k, v in s.items() if k.startswith("ratio_")))
            continue
        print(
            f"[{m}] stats_exact/inference={s['ratio_stats_exact_over_inference']} (target <=2.0: "
            f"{s['target_stats_exact_le_2']}), stats_subsampled/inference={s['ratio_stats_subsampled_over_inference']} "
            f"(cap {s['token_cap']}, target <=1.2: {s['target_stats_subsampled_le_1_2']}), "
            f"reference/(stats+eigh)={s['speedup_vs_reference_svd']}x, memory ref/ours="
            f"{s['memory_ratio_reference_over_stats_exact']}x, max_rel_diff={s['max_rel_diff']:.2e} "
            f"(float64 Gram; default float32 Gram vs reference at n: {s['max_rel_diff_timed_runs']:.2e})"
        )
        if "memory_n_vs_4n" in s:
            mm = s["memory_n_vs_4n"]
            print(
                f"[{m}] stats_exact peak growth n={mm['n']}: {mm['n_peak_growth_mb']} MB, n={mm['big_n']}: "
                f"{mm['big_n_peak_growth_mb']} MB ({mm['growth_pct']:+.2f}%, target <=5%: {mm['target_le_5pct']})"
            )
        f = s["flops"]
        print(
            f"[{m}] GFLOP/sample forward={f['forward_gflop_per_sample']} gram={f['gram_exact_gflop_per_sample']}; achieved "
            f"GFLOP/s inference={f['inference_gflops_per_s']} stats_exact={f['stats_exact_gflops_per_s']}"
        )


def label_bars(ax, bars, values: list[float], fmt: str) -> None:
    for bar, value in zip(bars, values):
        x, y = bar.get_x() + bar.get_width() / 2, bar.get_height()
        ax.annotate(fmt.format(value), (x, y), ha="center", va="bottom", fontsize=7)


def plot(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    investigation: dict[str, Any],
    path: Path,
    image_size: int = IMAGE,
) -> None:
    """Time and peak memory per method and model (log scales), and the statistics/inference ratios with their targets
    (and the prototype accumulator's, where it was measured)."""
    plt = pyplot()
    if plt is None:
        return
    models = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [5, 5, 3]})
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        by_method = {r["method"]: r for r in rows if r["model"] == m}
        xs = [j + i * width for j in range(len(METHODS))]
        secs = [by_method[k]["seconds"] for k in METHODS]
        mems = [by_method[k]["peak_mem_mb"] or 0 for k in METHODS]
        label = f"ViT-{m} (n={summary[m]['n_samples']})"
        label_bars(axes[0], axes[0].bar(xs, secs, width, label=label), secs, "{:.1f}")
        label_bars(axes[1], axes[1].bar(xs, mems, width, label=f"ViT-{m}"), mems, "{:.0f}")
    for ax, title, label in [
        (axes[0], "time (best of runs)", "seconds (log)"),
        (axes[1], "peak RSS growth during the call", "MB (log)"),
    ]:
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(METHODS))])
        ax.set_xticklabels(METHODS, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=8)

    ax = axes[2]
    for i, m in enumerate(models):
        values = [summary[m][f"ratio_{k}_over_inference"] for k in ("stats_exact", "stats_subsampled")]
        xs = [j + i * width for j in range(2)]
        label_bars(ax, ax.bar(xs, values, width, label=f"ViT-{m}"), values, "{:.2f}")
        proto = investigation.get(m, {}).get("prototype_accumulator")
        if proto:
            pv = [proto[f"{k}_proto"]["ratio_over_inference"] for k in ("stats_exact", "stats_subsampled")]
            label = "prototype accumulator" if i == 0 else None
            ax.scatter(xs, pv, marker="_", s=300, color="black", zorder=3, label=label)
    ax.axhline(2.0, ls="--", lw=1, color="tab:red")
    ax.axhline(1.2, ls=":", lw=1, color="tab:red")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(2)])
    ax.set_xticklabels(["exact", "subsampled"])
    ax.set_title("statistics pass / inference (targets 2.0, 1.2)")
    ax.legend(fontsize=8)
    fig.suptitle(f"SAP statistics vs inference vs stored-activation SVD (CPU, float32, {image_size}x{image_size})")
    save_figure(fig, path, dpi=110)
