#!/usr/bin/env python
"""Which training labels are wrong: label-error detectors on the accuracy benchmark's memorised models.

On the memorised tiny ViTs of `benchmarks/accuracy.py` (reused through `--cache_dir`), every detector (cleanlab on
in-sample, cross-validated or SAP-corrected probabilities, `sap_hf.audit_labels` on the SAP-corrected model, the
trusted-selection scores, the audit after `sap_hf.refine`) ranks and flags the noisy training labels. The hidden
clean labels only measure them (AP, AUROC, precision, recall); each detector's cost is counted in training epochs.
Detectors, metrics and results: benchmarks/studies/label_audit.md.

Run: python benchmarks/label_audit.py --cache_dir /work/cache/accuracy --jobs 1
     python benchmarks/label_audit.py --quick      (smoke run, < 1 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import report
from audits import cross_validated_probs, detector_metrics, probabilities
from common import accuracy, prepare_run, refine_arguments

from sap_hf.runtime.passes import Runtime


DETECTORS = (
    "cleanlab_in_sample",
    "cleanlab_cv5",
    "cleanlab_sap",
    "sap_audit",
    "sap_loss",
    "sap_shift_loss",
    "memorised_shift_loss",
    "sap_curvature",
    "sap_refine_audit",
    "refine_audit",
)
SAP_DETECTORS = ("cleanlab_sap", "sap_audit", "sap_loss", "sap_shift_loss", "sap_curvature", "sap_refine_audit")
METRICS = ("average_precision", "precision", "recall", "auroc", "cost_epochs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    recipe = common.recipe_sap_config()  # recipes/configs/default.yaml: the correction of cleanlab_sap and sap_*
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of cleanlab_cv5")
    parser.add_argument("--cv_epochs", type=int, default=15, help="each CV model's length (best val epoch kept)")
    parser.add_argument("--cv_warmup_epochs", type=float, default=1)
    parser.add_argument("--sap_alphas", nargs="+", type=float, default=list(recipe.alphas))
    parser.add_argument("--trusted_per_class", type=int, default=recipe.trusted_per_class)
    parser.add_argument("--audit_views", default="shift", choices=["image", "shift"])
    parser.add_argument("--audit_method", default="self_confidence", choices=["self_confidence", "normalized_margin"])
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    # sap_refine_audit / refine_audit: how `refine` treats the first audit's suspects, and for how many epochs
    parser.add_argument("--refine_mode", default="remove", choices=["remove", "relabel"])
    parser.add_argument("--refine_epochs", type=int, default=4)
    parser.add_argument("--plot_seed", type=int, default=None)
    parser.add_argument("--grid_seed", type=int, default=None, help="seed whose top suspects are drawn (plot_seed)")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of <out_dir>/label_audit.json")
    # compute nothing: merge these label_audit.json files (later ones win) into <out_dir>/label_audit.json
    parser.add_argument("--merge_only", nargs="+", default=None, metavar="JSON")
    args = common.finish_args(parser.parse_args(argv), argv)
    args.alphas = args.sap_alphas
    if args.quick:
        args.cv_epochs, args.trusted_per_class, args.sap_alphas, args.refine_epochs = 2, 3, [10.0, 100.0, 1e4], 1
    args.jobs = 1 if args.quick else args.jobs
    if args.plot_seed is None:
        args.plot_seed = args.seeds[0]
    if args.grid_seed is None:
        args.grid_seed = args.plot_seed
    return args


# ---- Scores ----


def _rule_scores(model: Any, data: dict[str, Any], rule: str, batch_size: int = 1000) -> tuple[Any, Any]:
    """`sap_hf.core.selection.sample_scores(rule)` of every training image, and whether the model's prediction
    (averaged over the rule's views) differs from the label; one pass over the views."""
    import torch

    from sap_hf.core.selection import EXTRA_VIEWS

    model.eval()
    x, y = data["train_x"], data["train_y"]
    scores, flags = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            pixels, labels = x[i : i + batch_size], y[i : i + batch_size]
            views = [pixels] + (EXTRA_VIEWS[rule](pixels) if rule in EXTRA_VIEWS else [])
            logits = [model(pixel_values=view).logits.float() for view in views]
            losses = [torch.nn.functional.cross_entropy(z, labels, reduction="none") for z in logits]
            scores.append(sum(losses) / len(views))
            flags.append(sum(z.softmax(-1) for z in logits).argmax(-1) != labels)
    return torch.cat(scores), torch.cat(flags)


def _curvature_scores(model: Any, train_set: Any, num_labels: int, batch_size: int = 250) -> Any:
    """The 'curvature' rule's score of every training image (`sample_scores` on one `Runtime` pass), by position."""
    import torch

    from sap_hf.core.selection import sample_scores

    scores = torch.zeros(len(train_set))
    with Runtime(batch_size=batch_size, show_progress=False).run(model, train_set, "curvature") as walk:
        for batch in walk.batches():
            labels, _ = walk.require_labels(batch, num_labels, "curvature scores")
            index = torch.as_tensor(batch.ids, dtype=torch.long)
            scores[index] = sample_scores(walk, batch, labels, "curvature").float()
    return scores


def cleanlab_scores(probs: Any, labels: Any) -> tuple[Any, Any]:
    """Suspicion (minus cleanlab's self-confidence label quality) and cleanlab's `find_label_issues` flags."""
    from sap_hf.audit.scores import flag_label_issues, label_quality_scores

    return -label_quality_scores(probs, labels, "self_confidence", use_cleanlab=True), flag_label_issues(probs, labels)


def audit(model: Any, train_set: Any, args: argparse.Namespace, **extra: Any) -> Any:
    """`sap_hf.audit_labels` with `--audit_method` and `--audit_views`."""
    from sap_hf import audit_labels

    runtime = Runtime(batch_size=1000, show_progress=False)
    return audit_labels(model, train_set, method=args.audit_method, views=args.audit_views, runtime=runtime, **extra)


def refined_audit(
    model: Any, train_set: Any, first: Any, data: dict[str, Any], args: argparse.Namespace, seed: int
) -> tuple[Any, dict]:
    """`sap_hf.refine` of `model` with the first audit's suspects (one mode, lr 2 x training lr, "no change" a
    candidate on val), then the refined model's audit: the audit a user gets after the pipeline's clean-up."""
    from sap_hf import RefineConfig, refine

    lrs, epochs = [2 * args.lr], [args.refine_epochs]
    config = RefineConfig(mode=args.refine_mode, learning_rates=lrs, epochs=epochs, augment=False)
    with tempfile.TemporaryDirectory() as scratch:
        training = refine_arguments(scratch, 64, seed)
        runtime = Runtime(show_progress=False)
        result = refine(model, train_set, first, common.val_metric(data), config, args=training, runtime=runtime)
    second = audit(model, train_set, args)
    info = {
        "refine_epochs": result.epochs,
        "refine_mode": result.mode,
        "first_suspected": int(first.suspected.sum()),
        "refined_val_accuracy": result.final_metrics["accuracy"],
        "refined_test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
    }
    return second, info


def time_one_epoch(model: Any, data: dict[str, Any], args: argparse.Namespace) -> float:
    """Seconds of one training epoch over the whole training set (a copy of `model`, the recipe's optimiser and
    batch): the unit of `cost_epochs`."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    x, y = data["train_x"], data["train_y"]
    loss = lambda index, epoch: F.cross_entropy(model(pixel_values=x[index]).logits, y[index])
    start = time.perf_counter()
    common.train_epochs(
        model, len(x), args.batch_size, loss, optimizer, generator=torch.Generator().manual_seed(0), epochs=[1]
    )
    return time.perf_counter() - start


# ---- One (setting, seed) ----


class Detections:
    """The rows of one (setting, seed)'s detectors, and their precision-recall curves when the seed is plotted."""

    def __init__(self, base: dict[str, Any], is_noisy: Any, keep_curves: bool) -> None:
        self.base, self.is_noisy, self.keep_curves = base, is_noisy, keep_curves
        self.rows: list[dict[str, Any]] = []
        self.curves: dict[str, Any] = {}

    def add(self, detector: str, suspicion: Any, flagged: Any, seconds: float, **extra: Any) -> None:
        metrics = detector_metrics(self.is_noisy, suspicion, flagged)
        self.rows.append(dict(self.base, detector=detector, **metrics, cost_seconds=seconds, **extra))
        if self.keep_curves:
            from sklearn.metrics import precision_recall_curve

            precision, recall, _ = precision_recall_curve(self.is_noisy.numpy(), suspicion.double().numpy())
            step = max(1, len(precision) // 400)
            curve = {"precision": precision[::step].round(4).tolist(), "recall": recall[::step].round(4).tolist()}
            self.curves[detector] = curve


def sap_detectors(found: Detections, run: dict[str, Any], setting: str, seed: int, args: argparse.Namespace) -> float:
    """The detectors on the SAP-corrected model (the recipe's correction, alpha on val), each costing the correction
    too; the model is left corrected. Returns the correction's seconds."""
    from sap_hf import sap_correct
    from sap_hf.data import FASHION_MNIST_CLASSES

    data, train_set, model = run["data"], run["train_set"], run["model"]
    labels = data["train_y"]
    clock = time.perf_counter()
    config = common.recipe_sap_config(
        alphas=list(args.sap_alphas), trusted_per_class=args.trusted_per_class, batch_size=500
    )
    evaluate, runtime = common.val_metric(data), Runtime(show_progress=False)
    result = sap_correct(model, train_set, config=config, evaluate_fn=evaluate, runtime=runtime)
    sap_seconds = time.perf_counter() - clock
    sap = {
        "sap_kind_alphas": result.kind_alphas,
        "sap_val_accuracy": result.final_metrics["accuracy"],
        "sap_test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
    }
    clock = time.perf_counter()
    sap_probs = probabilities(model, data["train_x"])
    found.add("cleanlab_sap", *cleanlab_scores(sap_probs, labels), sap_seconds + time.perf_counter() - clock, **sap)
    clock = time.perf_counter()
    first = audit(model, train_set, args, class_names=list(FASHION_MNIST_CLASSES))
    audit_seconds = sap_seconds + time.perf_counter() - clock
    how = {"views": args.audit_views, "method": args.audit_method, "filter_by": first.filter_by}
    found.add("sap_audit", -first.scores, first.suspected, audit_seconds, **how, **sap)
    if seed == args.grid_seed and not args.no_plot:  # what a person checking the labels sees
        from sap_hf.audit.report import plot_suspected_grid

        plot_suspected_grid(first, train_set, Path(args.out_dir) / f"label_audit_top_{setting}.png", top_k=24)
    for rule in ("loss", "shift_loss"):
        clock = time.perf_counter()
        found.add(f"sap_{rule}", *_rule_scores(model, data, rule), sap_seconds + time.perf_counter() - clock, **sap)
    if "sap_curvature" in args.detectors:  # flagged: the SAP model predicts another class
        clock = time.perf_counter()
        curvature = _curvature_scores(model, train_set, run["config"].num_labels)
        flagged = sap_probs.argmax(1) != labels
        found.add("sap_curvature", curvature, flagged, sap_seconds + time.perf_counter() - clock, **sap)
    if "sap_refine_audit" in args.detectors:
        clock = time.perf_counter()
        second, info = refined_audit(model, train_set, first, data, args, seed)
        seconds = audit_seconds + time.perf_counter() - clock
        found.add("sap_refine_audit", -second.scores, second.suspected, seconds, **sap, **info)
    return sap_seconds


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import ViTForImageClassification

    from sap_hf.audit.scores import cleanlab_available

    if not cleanlab_available():
        raise SystemExit("benchmarks/label_audit.py compares against cleanlab: pip install 'sap_hf[bench]'.")
    run = prepare_run(setting, seed, args)
    data, train_set, model = run["data"], run["train_set"], run["model"]
    memorised_state = copy.deepcopy(model.state_dict())
    labels, is_noisy = data["train_y"], data["is_noisy"]
    found = Detections({"setting": setting, "seed": seed}, is_noisy, seed == args.plot_seed)
    epoch_seconds = time_one_epoch(model, data, args)
    if "cleanlab_cv5" in args.detectors:  # its early-stopping evaluations on val are part of its cost
        clock = time.perf_counter()
        cv = cross_validated_probs(data, lambda: ViTForImageClassification(run["config"]), args, seed)
        cv_seconds = time.perf_counter() - clock
        per_epoch = cv["samples_trained"] / len(labels)
        epochs = {"epochs_trained": cv["epochs_trained"], "train_epoch_equivalents": per_epoch}
        folds = {"fold_best_epochs": cv["fold_best_epochs"], "fold_best_val": cv["fold_best_val"]}
        found.add("cleanlab_cv5", *cleanlab_scores(cv["probs"], labels), cv_seconds, **epochs, **folds)
    clock = time.perf_counter()
    memorised_probs = probabilities(model, data["train_x"])
    found.add("cleanlab_in_sample", *cleanlab_scores(memorised_probs, labels), time.perf_counter() - clock)
    clock = time.perf_counter()
    found.add("memorised_shift_loss", *_rule_scores(model, data, "shift_loss"), time.perf_counter() - clock)
    sap_seconds = sap_detectors(found, run, setting, seed, args)
    model.load_state_dict(memorised_state)
    if "refine_audit" in args.detectors:
        clock = time.perf_counter()
        second, info = refined_audit(model, train_set, audit(model, train_set, args), data, args, seed)
        found.add("refine_audit", -second.scores, second.suspected, time.perf_counter() - clock, **info)
        model.load_state_dict(memorised_state)
    # Every SAP detector is computed (sap_refine_audit needs sap_audit); only the wanted ones are kept.
    rows = [row for row in found.rows if row["detector"] in args.detectors]
    for row in rows:
        row["cost_epochs"] = row["cost_seconds"] / epoch_seconds
    record = {
        "setting": setting,
        "seed": seed,
        "epoch_seconds": epoch_seconds,
        "noise_rate": float(is_noisy.float().mean()),
        "memorised_train_fit": float((memorised_probs.argmax(1) == labels).float().mean()),
        "seconds": time.perf_counter() - run["started"],
        "timing": {"sap_correct": sap_seconds},
    }
    curves = {d: curve for d, curve in found.curves.items() if d in args.detectors}
    return {"setting": setting, "seed": seed, "rows": rows, "curves": curves, "run": record}


def _worker(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    setting, seed, args = task
    result = run_one(setting, seed, args)
    print(f"[label_audit] {setting} seed {seed} done in {result['run']['seconds']:.0f}s", flush=True)
    return result


# ---- Aggregation, targets, plot ----


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Best SAP-based detector (mean AP) against cleanlab_cv5: AP >= and cost <= 1/5."""
    out = {}
    for setting, entries in summary.items():
        if "cleanlab_cv5" not in entries:
            continue
        sap = [d for d in SAP_DETECTORS if d in entries]
        ap = {d: entries[d]["average_precision"]["mean"] for d in [*sap, "cleanlab_cv5"]}
        cost = {d: entries[d]["cost_epochs"]["mean"] for d in [*sap, "cleanlab_cv5"]}
        best = max(sap, key=ap.get)
        cv_ap, cv_cost = ap["cleanlab_cv5"], cost["cleanlab_cv5"]
        out[setting] = {
            "best_sap_detector": best,
            "average_precision": ap[best],
            "cv5_average_precision": cv_ap,
            "ap_margin": ap[best] - cv_ap,
            "cost_epochs": cost[best],
            "cv5_cost_epochs": cv_cost,
            "cost_ratio": cost[best] / cv_cost,
            "ap_met": ap[best] >= cv_ap,
            "cost_met": cost[best] <= cv_cost / 5,
            "sap_detectors_meeting_both": [d for d in sap if ap[d] >= cv_ap and cost[d] <= cv_cost / 5],
        }
    return out


def plot(curves: dict[str, Any], out_dir: Path, plot_seed: int) -> list[str]:
    plt = common.pyplot()
    if plt is None or not curves:
        return []
    figure, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.6), squeeze=False)
    for axis, (setting, by_detector) in zip(axes[0], curves.items()):
        for detector, curve in by_detector.items():
            style = (
                {"lw": 2.0} if detector.startswith("sap") or detector == "cleanlab_sap" else {"lw": 1.2, "ls": "--"}
            )
            axis.plot(curve["recall"], curve["precision"], label=detector, **style)
        axis.set_xlabel("recall (share of the wrong labels found)")
        axis.set_ylabel("precision")
        axis.set_ylim(0.3, 1.01)
        axis.set_title(f"{setting}, seed {plot_seed}: which training labels are wrong", fontsize=9)
        axis.legend(fontsize=7, loc="lower left")
    return [common.save_figure(figure, out_dir / "label_audit_pr.png")]


def _merge(records: list[dict[str, Any]]) -> tuple[list, list, dict]:
    """Rows, runs and curves of several results; a later record wins for the same (setting, seed, detector).

    So a run of a few `--detectors` with `--merge` adds or replaces those rows and keeps the others
    (each row's `cost_epochs` is in the epoch time of its own run). A (setting, seed)'s runs are kept
    as a list (`runs[i]["detectors"]` says which rows each produced); curves merge by detector.
    """
    rows: dict[tuple, dict] = {}
    runs: dict[tuple, list] = {}
    curves: dict[str, Any] = {}
    for record in records:
        for run in record["runs"]:
            key = (run["setting"], run["seed"])
            produced = [r for r in record["rows"] if (r["setting"], r["seed"]) == key]
            run = dict(run, detectors=run.get("detectors") or [r["detector"] for r in produced])
            runs[key] = [old for old in runs.get(key, []) if old != run] + [run]
            rows.update({(*key, r["detector"]): r for r in produced})
        for setting, by_detector in record.get("curves", {}).items():
            curves.setdefault(setting, {}).update(by_detector)
    order = sorted(runs, key=lambda k: (list(common.SETTINGS).index(k[0]), k[1]))
    ranked = {d: i for i, d in enumerate(DETECTORS)}
    ordered_rows = [rows[k] for k in sorted(rows, key=lambda k: (order.index(k[:2]), ranked.get(k[2], len(ranked))))]
    return ordered_rows, [run for k in order for run in runs[k]], curves


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    if not args.merge_only:
        tasks = [(setting, seed, args) for seed in args.seeds for setting in args.settings]
        results = common.run_tasks(_worker, tasks, args.jobs)
        results.sort(key=lambda r: (args.settings.index(r["setting"]), r["seed"]))
    new = {
        "rows": [row for result in results for row in result["rows"]],
        "runs": [r["run"] for r in results],
        "curves": {r["setting"]: r["curves"] for r in results if r["curves"]},
    }
    sources = list(args.merge_only or []) + ([str(out_dir / "label_audit.json")] if args.merge else [])
    previous = [json.loads(Path(p).read_text()) for p in sources if Path(p).is_file()]
    rows, runs, curves = _merge(previous + [new])
    summary = report.summarise(rows, ("setting",), fields=METRICS, key="detector")
    goal = targets(summary)
    config = {k: v for k, v in vars(args).items() if k != "out_dir"}
    if args.merge_only and previous:  # the computing runs' configuration, not this merge's
        seeds = sorted({r["seed"] for r in runs})
        config = dict(previous[0]["config"], seeds=seeds, merged_from=list(args.merge_only))
    elif args.merge and previous:  # rows kept from earlier runs were computed with their configuration
        config = dict(config, earlier_config=previous[-1]["config"].get("earlier_config", previous[-1]["config"]))
    record = {
        "rows": rows,
        "summary": summary,
        "targets": goal,
        "runs": runs,
        "curves": curves,
        "config": config,
        "environment": common.environment(),
        "elapsed_seconds": time.perf_counter() - started,
    }
    if not args.no_plot:
        record["plots"] = [os.path.relpath(p, out_dir) for p in plot(curves, out_dir, args.plot_seed)]
    path = common.write_json(out_dir / "label_audit.json", record)
    report.print_tables(path)
    print(json.dumps(goal, indent=1))
    print(f"\nwrote {path} in {record['elapsed_seconds']:.0f}s")
    return record


if __name__ == "__main__":
    main()
