#!/usr/bin/env python
"""Accuracy of SAP against the obvious baselines, on real Fashion-MNIST with synthetic label noise.

For every setting (40% symmetric noise; 40% asymmetric noise with
`sap_hf.noise.FASHION_MNIST_ASYMMETRIC_MAP`) and every seed:

1. Data: `sap_hf.data.noisy_fashion_mnist` (Debian's idx files): `--train_size` noisy training
   images, `--val_size` clean validation images (carved from the official training set, disjoint
   from train), `--test_size` clean images of the official test set. Images go through
   `sap_hf.data.ImageTransform(image_size=28, num_channels=1)` (the recipe's preprocessing) ONCE
   and are kept as one float tensor: the plain torch loops below never touch PIL again.
2. A tiny ViT (`sap_hf.models.tiny_vit_config()`: hidden 64, 4 layers, patch 7) is trained from
   scratch on the noisy labels until it memorises them (AdamW, linear warm-up + cosine, no weight
   decay, no augmentation); its accuracy on the noisy training labels is reported. The clean
   validation accuracy is measured after every epoch and the best checkpoint is kept.
3. Methods, side by side on the clean TEST split; every choice is made on the clean VALIDATION split:

   none                   the trained (memorised) model.
   best_epoch             the checkpoint with the best validation accuracy (early-stopping reference;
                          it needs a clean validation set during training, which SAP does not).
   sap                    `sap_hf.sap_correct` on the trusted samples of every candidate selection rule x
                          trusted-set size x `--alpha_scopes` (SAPConfig.alpha_scope 'shared' / 'per_kind');
                          (rule, per_class, scope, alphas) = the best validation accuracy ("no change"
                          stays a candidate, as in the library).
   sap_shared             the same restricted to the paper's single alpha ('shared').
   finetune_trusted       full fine-tuning of the same model on EXACTLY the trusted samples `sap` chose
                          (the paper's Finetune baseline); lr x epochs picked on validation.
   sap+finetune           `sap`'s model, then the same fine-tuning grid on the same samples (a composition).
   sap[rule/k], sap_per_kind[rule/k]  diagnostic rows: SAP restricted to one trusted set and scope.
   finetune_trusted[rule/k]  the same for fine-tuning; `finetune_trusted_best` is the best of these
                          by validation accuracy (the strongest fine-tuning baseline).

   Trusted selection rules (`sap_hf.select_trusted`): 'loss' (the paper: lowest loss under the
   memorised model), 'shift_loss' (mean loss over the image and 4 one-pixel shifts), 'early_loss'
   (lowest loss under the best-validation checkpoint), 'agreement' (loss over the image and its
   horizontal flip, both must predict the label). Purity = fraction of trusted samples whose noisy
   label equals the clean label (needs the hidden clean labels: reported, never used to choose).

   Diagnostics on the training set: `noisy_fit` (share of mislabelled training images still
   predicted as their noisy label: how much memorised noise is left) and `clean_fit` (share of
   correctly labelled training images predicted correctly).

Output: `<out_dir>/accuracy.json` ({"rows": [...], "summary", "purity", "runs", "curves", ...}),
`<out_dir>/accuracy_alpha.png` (test/val accuracy against alpha for one seed per setting) and
`<out_dir>/accuracy_methods.png` (mean +- std per method), and a table on stdout.

Run: python benchmarks/accuracy.py            (full run: 2 settings x 3 seeds, ~35 min on 2 cores;
                                              add --cache_dir DIR to reuse trained models)
     python benchmarks/accuracy.py --quick    (smoke run, < 1 min)
Workers: `--jobs` processes (default 2), each with `--threads` torch threads (default 1: on a
shared 2-core machine, 2 threads per process are oversubscribed and run tens of times slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import common
from common import RULES, SETTINGS, accuracy, finetune_grid, fit_diagnostics, mean_std, prepare_run

MAIN_METHODS = ("none", "best_epoch", "sap", "finetune_trusted")
EXTRA_METHODS = ("sap_shared", "finetune_trusted_best", "sap+finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--trusted_per_class", nargs="+", type=int, default=[10])
    parser.add_argument("--alpha_scopes", nargs="+", default=["shared", "per_kind"], choices=["shared", "per_kind"],
                        help="SAPConfig.alpha_scope values tried for every trusted set (the val-best one is 'sap')")
    parser.add_argument("--plot_seed", type=int, default=None, help="seed whose alpha curves are plotted (default: first)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots/table from <out_dir>/accuracy.json")
    args = common.finish_args(parser.parse_args(argv), argv)
    if args.quick:
        args.trusted_per_class = [3]
    if args.plot_seed is None:
        args.plot_seed = args.seeds[0]
    return args


# --------------------------------------------------------------------------------------------
# One (setting, seed) run, in a worker process
# --------------------------------------------------------------------------------------------


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sap_hf import SAPConfig, find_target_modules, sap_correct, select_trusted

    run = prepare_run(setting, seed, args)
    data, train_set, config, model, early_model, trained, timing, started = (
        run[k] for k in ("data", "train_set", "config", "model", "early_model", "trained", "timing", "started"))
    noise_type, rate = run["noise_type"], run["noise_rate"]
    clock = time.perf_counter()
    final_state = copy.deepcopy(model.state_dict())

    def test_acc(m: Any) -> float:
        return accuracy(m, data["test_x"], data["test_y"])

    def val_acc(m: Any) -> float:
        return accuracy(m, data["val_x"], data["val_y"])

    base = {"setting": setting, "seed": seed}
    none_val, none_test = val_acc(model), test_acc(model)
    train_noisy_acc = accuracy(model, data["train_x"], data["train_y"])
    none_fit = fit_diagnostics(model, data)
    rows = [
        dict(base, method="none", test_accuracy=none_test, val_accuracy=none_val, train_noisy_accuracy=train_noisy_acc,
             epochs=args.epochs, **none_fit),
        dict(base, method="best_epoch", test_accuracy=test_acc(early_model), val_accuracy=trained["best"]["val_accuracy"],
             epoch=trained["best"]["epoch"], **fit_diagnostics(early_model, data)),
    ]

    # ---- SAP: every (rule, per_class) trusted set, alpha searched on val by sap_correct ----
    def evaluate_fn(m: Any) -> dict[str, float]:
        return {"accuracy": val_acc(m)}

    timing["baselines"] = time.perf_counter() - clock
    timing["sap"], timing["sap_test_curves"], timing["finetune"] = {}, 0.0, {}
    candidates = []
    for rule in args.rules:
        for per_class in args.trusted_per_class:
            model.load_state_dict(final_state)
            clock = time.perf_counter()
            try:
                selection = select_trusted(
                    model, train_set, per_class, num_labels=config.num_labels, rule=rule,
                    selection_model=early_model if rule == "early_loss" else None, batch_size=500, show_progress=False,
                )
            except ValueError as err:  # e.g. 'agreement' leaves a class with no sample
                candidates.append({"rule": rule, "per_class": per_class, "error": str(err)})
                continue
            index = torch.tensor(selection.indices, dtype=torch.long)
            purity = float((data["train_y"][index] == data["clean_y"][index]).float().mean())
            for scope in args.alpha_scopes:
                model.load_state_dict(final_state)
                sap_config = SAPConfig(alphas=list(args.alphas), trusted_per_class=per_class, selection_rule=rule,
                                       batch_size=500, alpha_scope=scope)
                result = sap_correct(model, train_set, config=sap_config, trusted_indices=selection.indices,
                                     evaluate_fn=evaluate_fn, show_progress=False)
                candidates.append({
                    "rule": rule, "per_class": per_class, "scope": scope, "num_trusted": len(selection.indices),
                    "purity": purity, "indices": selection.indices,
                    "alpha": result.alpha, "kind_alphas": result.kind_alphas,
                    "val_accuracy": result.final_metrics["accuracy"],
                    "test_accuracy": test_acc(model), **fit_diagnostics(model, data),
                    "val_curve": [round(m["accuracy"], 4) for m in result.rounds[0].metrics],
                    "state": copy.deepcopy(model.state_dict()),
                })
            timing["sap"][f"{rule}/{per_class}"] = time.perf_counter() - clock
    model.load_state_dict(final_state)

    usable = [c for c in candidates if "error" not in c]
    shared = [c for c in usable if c["scope"] == "shared"]
    # Ties on val go to the earlier candidate: rules in the order given, smaller trusted sets first, shared alpha
    # before per-kind alphas.
    chosen = max(usable, key=lambda c: c["val_accuracy"]) if usable else None
    chosen_shared = max(shared, key=lambda c: c["val_accuracy"]) if shared else None
    x_of = lambda c: data["train_x"][torch.tensor(c["indices"])]
    y_of = lambda c: data["train_y"][torch.tensor(c["indices"])]

    def sap_row(method: str, c: dict) -> dict:
        return dict(base, method=method, test_accuracy=c["test_accuracy"], val_accuracy=c["val_accuracy"],
                    alpha=c["alpha"], alpha_scope=c["scope"], kind_alphas=c["kind_alphas"], rule=c["rule"],
                    trusted_per_class=c["per_class"], num_trusted=c["num_trusted"],
                    purity=c["purity"], noisy_fit=c["noisy_fit"], clean_fit=c["clean_fit"])

    def ft_row(method: str, c: dict, ft: dict) -> dict:
        return dict(base, method=method, test_accuracy=ft["test_accuracy"], val_accuracy=ft["val_accuracy"],
                    lr=ft["lr"], ft_epochs=ft["epochs"], rule=c["rule"], trusted_per_class=c["per_class"],
                    num_trusted=c["num_trusted"], purity=c["purity"])

    # The alpha-vs-accuracy figure (one seed): test accuracy at every alpha of the paper's rule and of
    # the val-chosen trusted set. Reporting only: nothing is chosen from these numbers.
    if seed == args.plot_seed:
        from sap_hf.projection import current_weights, plan_projection, write_weights
        from sap_hf.search import eigenbases
        from sap_hf.stats import collect_statistics

        clock = time.perf_counter()
        paper = next((c for c in shared if c["rule"] == "loss"), None)
        same_set = next((c for c in shared if chosen and (c["rule"], c["per_class"]) == (chosen["rule"], chosen["per_class"])), None)
        for c in {id(c): c for c in (paper, same_set) if c is not None}.values():
            model.load_state_dict(final_state)
            targets = find_target_modules(model, None, None, True)
            stats = collect_statistics(model, train_set.select(c["indices"]), targets, batch_size=500, show_progress=False)
            bases, originals = eigenbases(stats), current_weights(model, stats.target_modules)
            c["test_curve"] = []
            for alpha in args.alphas:
                write_weights(model, plan_projection(originals, stats.groups, bases, alpha))
                c["test_curve"].append(round(test_acc(model), 4))
        model.load_state_dict(final_state)
        timing["sap_test_curves"] = time.perf_counter() - clock

    finetunes = {}
    for c in usable:
        key = (c["rule"], c["per_class"])
        if key not in finetunes:
            clock = time.perf_counter()
            finetunes[key] = finetune_grid(model, final_state, x_of(c), y_of(c), data, args, seed)
            timing["finetune"][f"{c['rule']}/{c['per_class']}"] = time.perf_counter() - clock
            rows.append(ft_row(f"finetune_trusted[{c['rule']}/{c['per_class']}]", c, finetunes[key]))
        prefix = "sap" if c["scope"] == "shared" else f"sap_{c['scope']}"
        rows.append(sap_row(f"{prefix}[{c['rule']}/{c['per_class']}]", c))
    if chosen is not None:
        rows.append(sap_row("sap", chosen))
        if chosen_shared is not None and "per_kind" in args.alpha_scopes:
            rows.append(sap_row("sap_shared", chosen_shared))
        rows.append(ft_row("finetune_trusted", chosen, finetunes[(chosen["rule"], chosen["per_class"])]))
        # SAP, then the same fine-tuning grid on the same trusted samples (a composition, not a baseline).
        rows.append(ft_row("sap+finetune", chosen, finetune_grid(model, chosen["state"], x_of(chosen), y_of(chosen), data, args, seed)))
        model.load_state_dict(final_state)
        best_ft_key = max(finetunes, key=lambda k: finetunes[k]["val_accuracy"])
        best_ft_c = next(c for c in usable if (c["rule"], c["per_class"]) == best_ft_key)
        rows.append(ft_row("finetune_trusted_best", best_ft_c, finetunes[best_ft_key]))
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test

    return {
        "setting": setting, "seed": seed, "rows": rows,
        "run": {
            "setting": setting, "seed": seed, "noise_type": noise_type, "noise_rate": rate,
            "actual_noise_rate": float(data["is_noisy"].float().mean()),
            "train_noisy_accuracy": train_noisy_acc, "train_seconds": trained["seconds"],
            "best_epoch": trained["best"]["epoch"], "val_history": trained["history"],
            "candidates": [{k: v for k, v in c.items() if k not in ("indices", "state")} for c in candidates],
            "finetune_grids": {f"{r}/{k}": ft["grid"] for (r, k), ft in finetunes.items()},
            "seconds": time.perf_counter() - started, "timing": timing,
        },
    }


def _worker(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    setting, seed, args = task
    result = run_one(setting, seed, args)
    print(f"[accuracy] {setting} seed {seed} done in {result['run']['seconds']:.0f}s "
          f"(train fit on noisy labels {result['run']['train_noisy_accuracy']:.3f})", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Aggregation, table, plots
# --------------------------------------------------------------------------------------------


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        summary[setting] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["setting"] == setting):
            chosen = [r for r in rows if r["setting"] == setting and r["method"] == method]
            entry = {"test_accuracy": mean_std([r["test_accuracy"] for r in chosen]),
                     "gain_vs_none": mean_std([r["gain_vs_none"] for r in chosen])}
            if all("purity" in r for r in chosen):
                entry["purity"] = mean_std([r["purity"] for r in chosen])
            keys = ("rule", "trusted_per_class", "alpha", "alpha_scope", "kind_alphas", "lr", "ft_epochs", "epoch")
            entry["choices"] = [{k: r[k] for k in keys if k in r} for r in chosen]
            summary[setting][method] = entry
    return summary


def purity_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting and rule/k: mean purity, SAP gain and fine-tuning gain over `none`."""
    out: dict[str, Any] = {}
    for row in rows:
        if not row["method"].startswith("sap["):
            continue
        key = row["method"][4:-1]
        ft = next(r for r in rows if r["setting"] == row["setting"] and r["seed"] == row["seed"]
                  and r["method"] == f"finetune_trusted[{key}]")
        per_kind = next((r for r in rows if r["setting"] == row["setting"] and r["seed"] == row["seed"]
                         and r["method"] == f"sap_per_kind[{key}]"), None)
        entry = out.setdefault(row["setting"], {}).setdefault(
            key, {"purity": [], "sap_gain": [], "sap_per_kind_gain": [], "finetune_gain": []})
        entry["purity"].append(row["purity"])
        entry["sap_gain"].append(row["gain_vs_none"])
        if per_kind is not None:
            entry["sap_per_kind_gain"].append(per_kind["gain_vs_none"])
        entry["finetune_gain"].append(ft["gain_vs_none"])
    return {s: {k: {m: mean_std(v) for m, v in e.items() if v} for k, e in d.items()} for s, d in out.items()}


def _choice(choice: dict[str, Any]) -> str:
    if not choice:
        return ""
    if "epoch" in choice:
        return f"ep{choice['epoch']}"
    text = f"{choice.get('rule')}/{choice.get('trusted_per_class')}"
    if choice.get("kind_alphas"):
        short = {"attention": "att", "mlp": "mlp", "classifier": "cls"}
        return text + "/" + ",".join(f"{short.get(k, k)}={'-' if a is None else f'{a:g}'}" for k, a in choice["kind_alphas"].items())
    if "alpha" in choice:
        return text + (f"/a={choice['alpha']:g}" if choice["alpha"] is not None else "/unchanged")
    return text + (f"/lr={choice['lr']:g}x{choice['ft_epochs']}ep" if choice.get("lr") is not None else "/unchanged")


def print_table(summary: dict[str, Any], purity: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    pct = lambda s: f"{100 * s['mean']:5.1f} ± {100 * s['std']:4.1f}"
    for setting, methods in summary.items():
        fits = [r["train_noisy_accuracy"] for r in runs if r["setting"] == setting]
        print(f"\n== {setting}: test accuracy (%), mean ± std over {len(fits)} seed(s); "
              f"memorised model fits {100 * statistics.fmean(fits):.1f}% of the noisy training labels ==")
        print(f"{'method':34s} {'test acc':>14s} {'gain vs none':>14s}  choices (per seed)")
        for method, entry in methods.items():
            if "[" in method:
                continue
            choices = " ".join(_choice(setting_rows) for setting_rows in entry.get("choices", []))
            print(f"{method:34s} {pct(entry['test_accuracy']):>14s} {pct(entry['gain_vs_none']):>14s}  {choices}")
        print(f"  {'trusted set (rule/k)':32s} {'purity':>14s} {'SAP gain':>14s} {'per-kind gain':>14s} {'finetune gain':>14s}")
        for key, entry in purity.get(setting, {}).items():
            per_kind = pct(entry["sap_per_kind_gain"]) if "sap_per_kind_gain" in entry else "-"
            print(f"  {key:32s} {pct(entry['purity']):>14s} {pct(entry['sap_gain']):>14s} {per_kind:>14s} "
                  f"{pct(entry['finetune_gain']):>14s}")


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], summary: dict[str, Any], alphas: list[float],
         plot_seed: int, out_dir: Path) -> list[str]:
    """The alpha figure (one seed per setting) and the methods bar chart, from what accuracy.json holds."""
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    shown = [run for run in runs if run["seed"] == plot_seed]
    if shown:
        figure, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.8), squeeze=False)
        for axis, run in zip(axes[0], shown):
            by_method = {r["method"]: r for r in rows if r["setting"] == run["setting"] and r["seed"] == run["seed"]}
            for c in run["candidates"]:
                if "error" in c or c.get("scope", "shared") != "shared":  # per-kind rows share the shared curve
                    continue
                name = f"{c['rule']}/{c['per_class']} (purity {c['purity']:.2f})"
                if "test_curve" in c:
                    line, = axis.plot(alphas, c["test_curve"], marker="o", ms=3, lw=1.8, label=f"SAP {name}: test")
                    axis.plot(alphas, c["val_curve"], ls=":", color=line.get_color(), lw=1, label=f"SAP {name}: val")
                else:
                    axis.plot(alphas, c["val_curve"], ls=":", lw=1, label=f"SAP {name}: val")
            for method, style in (("none", {"color": "grey", "ls": "--"}), ("best_epoch", {"color": "green", "ls": "-."}),
                                  ("finetune_trusted", {"color": "purple", "ls": "--"}),
                                  ("finetune_trusted_best", {"color": "purple", "ls": ":"})):
                if method in by_method:
                    axis.axhline(by_method[method]["test_accuracy"], label=f"{method} (test)", lw=1.2, **style)
            sap = by_method.get("sap")
            if sap is not None and sap.get("kind_alphas"):
                axis.axhline(sap["test_accuracy"], color="red", lw=1.2,
                             label=f"sap: val-chosen per-kind alphas ({_choice(sap)}) (test)")
            elif sap is not None and sap["alpha"] is not None:
                axis.scatter([sap["alpha"]], [sap["test_accuracy"]], s=140, facecolors="none", edgecolors="red", zorder=5,
                             label=f"sap: val-chosen ({sap['rule']}/{sap['trusted_per_class']}, alpha={sap['alpha']:g})")
            axis.set_xscale("log")
            axis.set_xlabel("alpha")
            axis.set_ylabel("clean accuracy (solid: test, dotted: val)")
            axis.set_title(f"{run['setting']}, seed {run['seed']}: tiny ViT fitting "
                           f"{100 * run['train_noisy_accuracy']:.1f}% of the noisy training labels", fontsize=9)
            axis.legend(fontsize=6, loc="lower right")
        figure.tight_layout()
        path = out_dir / "accuracy_alpha.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(str(path))

    methods = list(MAIN_METHODS) + list(EXTRA_METHODS)
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(summary))
    for i, (setting, entries) in enumerate(summary.items()):
        present = [m for m in methods if m in entries]
        xs = [methods.index(m) + i * width for m in present]
        axis.bar(xs, [100 * entries[m]["test_accuracy"]["mean"] for m in present], width,
                 yerr=[100 * entries[m]["test_accuracy"]["std"] for m in present], capsize=3, label=setting)
    axis.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(methods))], methods, rotation=15, fontsize=8)
    axis.set_ylabel("clean test accuracy (%)")
    axis.set_title("Tiny ViT memorising 40% label noise on Fashion-MNIST (mean ± std over seeds)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = out_dir / "accuracy_methods.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(str(path))
    return written


def replot(out_dir: Path) -> None:
    """Redraw the figures and reprint the table from an existing accuracy.json (no training)."""
    record = json.loads((out_dir / "accuracy.json").read_text())
    config = record["config"]
    plot(record["rows"], record["runs"], record["summary"], config["alphas"], config["plot_seed"], out_dir)
    print_table(record["summary"], record["purity"], record["runs"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        replot(out_dir)
        return {}
    started = time.perf_counter()
    tasks = [(setting, seed, args) for seed in args.seeds for setting in args.settings]
    results = common.run_tasks(_worker, tasks, args.jobs)
    results.sort(key=lambda r: (args.settings.index(r["setting"]), r["seed"]))
    rows = [row for result in results for row in result["rows"]]
    runs = [result["run"] for result in results]
    summary = summarise(rows)
    purity = purity_table(rows)

    from sap_hf.noise import FASHION_MNIST_ASYMMETRIC_MAP

    record = {
        "rows": rows,
        "summary": summary,
        "purity": purity,
        "runs": runs,
        "settings": {name: {"noise_type": t, "noise_rate": r} for name, (t, r) in SETTINGS.items() if name in args.settings},
        "asymmetric_map": {"name": "sap_hf.noise.FASHION_MNIST_ASYMMETRIC_MAP",
                           "map": {str(k): v for k, v in FASHION_MNIST_ASYMMETRIC_MAP.items()}},
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "environment": common.environment(),
        "elapsed_seconds": time.perf_counter() - started,
    }
    if not args.no_plot:
        written = plot(rows, runs, summary, list(args.alphas), args.plot_seed, out_dir)
        record["plots"] = [os.path.relpath(p, out_dir) for p in written]
    path = common.write_json(out_dir / "accuracy.json", record)
    print_table(summary, purity, runs)
    print(f"\nwrote {path} in {record['elapsed_seconds']:.0f}s")
    return record


if __name__ == "__main__":
    main()
