#!/usr/bin/env python
"""Which training labels are wrong: label-error detectors on the accuracy benchmark's memorised models.

For every setting (sym40, asym40) and seed, on the memorised tiny ViT of `benchmarks/accuracy.py`
(reused through `--cache_dir`), every detector scores the 4000 noisy training labels; the hidden
clean labels say which are really wrong (used for the metrics only, never for a choice):

   cleanlab_in_sample   cleanlab (`get_label_quality_scores` self-confidence, `find_label_issues`) on the
                        memorised model's own, in-sample probabilities (it fits ~99% of the noisy labels).
   cleanlab_cv5         cleanlab on 5-fold cross-validated (out-of-sample) probabilities: 5 new models of
                        the same recipe (model, AdamW, lr, batch, warm-up + cosine), each trained on 4/5 of
                        the training set for `--cv_epochs` epochs, the checkpoint with the best clean-val
                        accuracy kept (early stopping: cleanlab's practice is normally trained models, which
                        is cheaper and stronger than the 100-epoch memorising schedule), predicting its 1/5.
   cleanlab_sap         cleanlab on the probabilities of the SAP-corrected model (`sap_correct` with the
                        recipe's SAP settings, read from recipes/configs/default.yaml: shift_loss, 10 trusted
                        per class, per-kind alpha on val today; batch_size 500 here).
   sap_audit            `sap_hf.audit_labels` on the SAP-corrected model (`--audit_views`, `--audit_method`;
                        its `suspected` flag is cleanlab's `find_label_issues`).
   sap_loss, sap_shift_loss   `sap_hf.core.selection.sample_scores` ('loss', 'shift_loss') under the SAP model;
                        flagged = the model (view-averaged for shift_loss) predicts another class.
   memorised_shift_loss 'shift_loss' under the memorised model (no correction; same flag rule).
   sap_curvature        `sample_scores('curvature')` (the reference's input-loss curvature, 10 Rademacher
                        draws, h = 1e-3) under the SAP model; flagged = the SAP model predicts another class.
   sap_refine_audit     the pipeline's own second look: `sap_audit`, then `sap_hf.refine` of the SAP model
                        (`--refine_mode`, lr = 2 x the training lr, cosine over `--refine_epochs`, "no change"
                        a candidate on val), then `audit_labels` of the refined model.
   refine_audit         the same without SAP: `audit_labels` of the memorised model, refine, audit again.

Metrics per (setting, seed, detector): average precision and AUROC of the ranking (positive = the
label is wrong), precision and recall of the detector's flagged set, and `cost_epochs`: the wall
time spent to get the detector (training, SAP correction, scoring passes; the memorised model's own
training not counted) divided by the time of one training epoch over the whole training set
(AdamW, batch 128, timed in the same process just before). For cleanlab_cv5 `epochs_trained` records
the epochs actually run (5 x cv_epochs on 4/5 of the data).

Output: `<out_dir>/label_audit.json` ({"rows", "summary", "targets", "config", ...}),
`<out_dir>/label_audit_pr.png` (precision-recall curves, one seed per setting), a table on stdout.

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
from common import accuracy, cross_validated_probs, prepare_run, probabilities, refine_arguments

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    recipe = common.recipe_sap_config()  # recipes/configs/default.yaml: the correction of cleanlab_sap and sap_*
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of cleanlab_cv5")
    parser.add_argument(
        "--cv_epochs", type=int, default=15, help="training length of each CV model (best val epoch kept)"
    )
    parser.add_argument("--cv_warmup_epochs", type=float, default=1)
    parser.add_argument("--sap_alphas", nargs="+", type=float, default=list(recipe.alphas))
    parser.add_argument("--trusted_per_class", type=int, default=recipe.trusted_per_class)
    parser.add_argument("--audit_views", default="shift", choices=["image", "shift"])
    parser.add_argument("--audit_method", default="self_confidence", choices=["self_confidence", "normalized_margin"])
    parser.add_argument(
        "--detectors",
        nargs="+",
        default=list(DETECTORS),
        choices=list(DETECTORS),
        help="detectors to compute (with --merge, the others' rows are kept from label_audit.json)",
    )
    parser.add_argument(
        "--refine_mode",
        default="remove",
        choices=["remove", "relabel"],
        help="sap_refine_audit / refine_audit: how refine treats the first audit's suspects",
    )
    parser.add_argument(
        "--refine_epochs", type=int, default=4, help="sap_refine_audit / refine_audit: refine's length"
    )
    parser.add_argument("--plot_seed", type=int, default=None)
    parser.add_argument(
        "--grid_seed",
        type=int,
        default=None,
        help="seed whose top suspected images (sap_audit) are drawn per setting (default: plot_seed)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other (setting, seed) pairs already in <out_dir>/label_audit.json",
    )
    parser.add_argument(
        "--merge_only",
        nargs="+",
        default=None,
        metavar="JSON",
        help="compute nothing: merge these label_audit.json files (e.g. seeds run in parallel) into "
        "<out_dir>/label_audit.json (later files win for the same setting and seed)",
    )
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


# --------------------------------------------------------------------------------------------
# One (setting, seed)
# --------------------------------------------------------------------------------------------


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
            scores.append(
                sum(torch.nn.functional.cross_entropy(z, labels, reduction="none") for z in logits) / len(views)
            )
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
            scores[torch.as_tensor(batch.ids, dtype=torch.long)] = sample_scores(
                walk, batch, labels, "curvature"
            ).float()
    return scores


def refined_audit(
    model: Any, train_set: Any, first: Any, data: dict[str, Any], args: argparse.Namespace, seed: int
) -> tuple[Any, dict]:
    """`sap_hf.refine` of `model` with the first audit's suspects (one mode, lr 2 x training lr, "no change" a
    candidate on val), then `audit_labels` of the refined model: the audit a user gets after the pipeline's clean-up."""
    from sap_hf import RefineConfig, audit_labels, refine

    config = RefineConfig(
        mode=args.refine_mode, learning_rates=[2 * args.lr], epochs=[args.refine_epochs], augment=False
    )
    with tempfile.TemporaryDirectory() as scratch:
        result = refine(
            model,
            train_set,
            first,
            lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])},
            config,
            args=refine_arguments(scratch, 64, seed),
            runtime=Runtime(show_progress=False),
        )
    audit = audit_labels(
        model,
        train_set,
        method=args.audit_method,
        views=args.audit_views,
        runtime=Runtime(batch_size=1000, show_progress=False),
    )
    info = {
        "refine_epochs": result.epochs,
        "refine_mode": result.mode,
        "first_suspected": int(first.suspected.sum()),
        "refined_val_accuracy": result.final_metrics["accuracy"],
        "refined_test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
    }
    return audit, info


def time_one_epoch(model: Any, data: dict[str, Any], args: argparse.Namespace) -> float:
    """Seconds of one training epoch over the whole training set (a copy of `model`, the recipe's optimiser/batch): the cost unit."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    x, y = data["train_x"], data["train_y"]
    start = time.perf_counter()
    common.train_epochs(
        model,
        len(x),
        args.batch_size,
        lambda index, epoch: F.cross_entropy(model(pixel_values=x[index]).logits, y[index]),
        optimizer,
        generator=torch.Generator().manual_seed(0),
        epochs=[1],
    )
    return time.perf_counter() - start


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import ViTForImageClassification

    from sap_hf import audit_labels, sap_correct
    from sap_hf.audit.scores import cleanlab_available, flag_label_issues, label_quality_scores
    from sap_hf.data import FASHION_MNIST_CLASSES

    if not cleanlab_available():
        raise SystemExit("benchmarks/label_audit.py compares against cleanlab: pip install 'sap_hf[bench]'.")
    run = prepare_run(setting, seed, args)
    data, train_set, config, model = run["data"], run["train_set"], run["config"], run["model"]
    memorised_state = copy.deepcopy(model.state_dict())
    labels, is_noisy = data["train_y"], data["is_noisy"]
    rows, curves, timing = [], {}, {}
    base = {"setting": setting, "seed": seed}

    def cleanlab_scores(probs: Any) -> tuple[Any, Any]:
        return -label_quality_scores(probs, labels, "self_confidence", use_cleanlab=True), flag_label_issues(
            probs, labels
        )

    def add(detector: str, suspicion: Any, flagged: Any, seconds: float, **extra: Any) -> None:
        metrics = common.detector_metrics(is_noisy, suspicion, flagged)
        rows.append(dict(base, detector=detector, **metrics, cost_seconds=seconds, **extra))
        if seed == args.plot_seed:
            from sklearn.metrics import precision_recall_curve

            precision, recall, _ = precision_recall_curve(is_noisy.numpy(), suspicion.double().numpy())
            step = max(1, len(precision) // 400)
            curves[detector] = {
                "precision": precision[::step].round(4).tolist(),
                "recall": recall[::step].round(4).tolist(),
            }

    wanted = set(args.detectors)
    epoch_seconds = time_one_epoch(model, data, args)
    # (b) 5-fold cross-validation (its early-stopping evaluations on val are part of its cost).
    if "cleanlab_cv5" in wanted:
        clock = time.perf_counter()
        cv = cross_validated_probs(data, lambda: ViTForImageClassification(config), args, seed)
        cv_seconds = time.perf_counter() - clock
        suspicion, flagged = cleanlab_scores(cv["probs"])
        add(
            "cleanlab_cv5",
            suspicion,
            flagged,
            cv_seconds,
            epochs_trained=cv["epochs_trained"],
            train_epoch_equivalents=cv["samples_trained"] / len(labels),
            fold_best_epochs=cv["fold_best_epochs"],
            fold_best_val=cv["fold_best_val"],
        )

    # (a) in-sample probabilities of the memorised model.
    clock = time.perf_counter()
    memorised_probs = probabilities(model, data["train_x"])
    suspicion, flagged = cleanlab_scores(memorised_probs)
    add("cleanlab_in_sample", suspicion, flagged, time.perf_counter() - clock)
    clock = time.perf_counter()
    add("memorised_shift_loss", *_rule_scores(model, data, "shift_loss"), time.perf_counter() - clock)

    # (c) the SAP-corrected model: the recipe's configuration, alpha(s) on the clean val split.
    clock = time.perf_counter()
    sap_config = common.recipe_sap_config(
        alphas=list(args.sap_alphas), trusted_per_class=args.trusted_per_class, batch_size=500
    )
    result = sap_correct(
        model,
        train_set,
        config=sap_config,
        evaluate_fn=lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])},
        runtime=Runtime(show_progress=False),
    )
    sap_seconds = time.perf_counter() - clock
    timing["sap_correct"] = sap_seconds
    sap_info = {
        "sap_kind_alphas": result.kind_alphas,
        "sap_val_accuracy": result.final_metrics["accuracy"],
        "sap_test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
    }
    clock = time.perf_counter()
    sap_probs = probabilities(model, data["train_x"])
    suspicion, flagged = cleanlab_scores(sap_probs)
    add("cleanlab_sap", suspicion, flagged, sap_seconds + time.perf_counter() - clock, **sap_info)
    clock = time.perf_counter()
    audit = audit_labels(
        model,
        train_set,
        method=args.audit_method,
        views=args.audit_views,
        class_names=list(FASHION_MNIST_CLASSES),
        runtime=Runtime(batch_size=1000, show_progress=False),
    )
    audit_seconds = sap_seconds + time.perf_counter() - clock
    add(
        "sap_audit",
        -audit.scores,
        audit.suspected,
        audit_seconds,
        views=args.audit_views,
        method=args.audit_method,
        filter_by=audit.filter_by,
        **sap_info,
    )
    if seed == args.grid_seed and not args.no_plot:  # what a person checking the labels sees
        from sap_hf.audit.report import plot_suspected_grid

        plot_suspected_grid(audit, train_set, Path(args.out_dir) / f"label_audit_top_{setting}.png", top_k=24)
    for rule in ("loss", "shift_loss"):
        clock = time.perf_counter()
        add(f"sap_{rule}", *_rule_scores(model, data, rule), sap_seconds + time.perf_counter() - clock, **sap_info)
    if "sap_curvature" in wanted:
        clock = time.perf_counter()
        curvature = _curvature_scores(model, train_set, config.num_labels)
        add(
            "sap_curvature",
            curvature,
            sap_probs.argmax(1) != labels,
            sap_seconds + time.perf_counter() - clock,
            **sap_info,
        )
    if "sap_refine_audit" in wanted:
        clock = time.perf_counter()
        second, info = refined_audit(model, train_set, audit, data, args, seed)
        add(
            "sap_refine_audit",
            -second.scores,
            second.suspected,
            audit_seconds + time.perf_counter() - clock,
            **sap_info,
            **info,
        )
    model.load_state_dict(memorised_state)
    if "refine_audit" in wanted:
        clock = time.perf_counter()
        first = audit_labels(
            model,
            train_set,
            method=args.audit_method,
            views=args.audit_views,
            runtime=Runtime(batch_size=1000, show_progress=False),
        )
        second, info = refined_audit(model, train_set, first, data, args, seed)
        add("refine_audit", -second.scores, second.suspected, time.perf_counter() - clock, **info)
        model.load_state_dict(memorised_state)
    rows[:] = [
        row for row in rows if row["detector"] in wanted
    ]  # the SAP model's scores are computed for every SAP row
    curves = {d: curve for d, curve in curves.items() if d in wanted}

    for row in rows:
        row["cost_epochs"] = row["cost_seconds"] / epoch_seconds
    return {
        "setting": setting,
        "seed": seed,
        "rows": rows,
        "curves": curves,
        "run": {
            "setting": setting,
            "seed": seed,
            "epoch_seconds": epoch_seconds,
            "noise_rate": float(is_noisy.float().mean()),
            "memorised_train_fit": float((memorised_probs.argmax(1) == labels).float().mean()),
            "seconds": time.perf_counter() - run["started"],
            "timing": timing,
        },
    }


def _worker(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    setting, seed, args = task
    result = run_one(setting, seed, args)
    print(f"[label_audit] {setting} seed {seed} done in {result['run']['seconds']:.0f}s", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Aggregation, targets, table, plot
# --------------------------------------------------------------------------------------------

METRICS = ("average_precision", "precision", "recall", "auroc", "cost_epochs")


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Best SAP-based detector (mean AP) against cleanlab_cv5: AP >= and cost <= 1/5."""
    out = {}
    for setting, entries in summary.items():
        if "cleanlab_cv5" not in entries:
            continue
        best = max((d for d in SAP_DETECTORS if d in entries), key=lambda d: entries[d]["average_precision"]["mean"])
        cv = entries["cleanlab_cv5"]
        ap, cv_ap = entries[best]["average_precision"]["mean"], cv["average_precision"]["mean"]
        cost, cv_cost = entries[best]["cost_epochs"]["mean"], cv["cost_epochs"]["mean"]
        both = [
            d
            for d in SAP_DETECTORS
            if d in entries
            and entries[d]["average_precision"]["mean"] >= cv_ap
            and entries[d]["cost_epochs"]["mean"] <= cv_cost / 5
        ]
        out[setting] = {
            "best_sap_detector": best,
            "average_precision": ap,
            "cv5_average_precision": cv_ap,
            "ap_margin": ap - cv_ap,
            "cost_epochs": cost,
            "cv5_cost_epochs": cv_cost,
            "cost_ratio": cost / cv_cost,
            "ap_met": ap >= cv_ap,
            "cost_met": cost <= cv_cost / 5,
            "sap_detectors_meeting_both": both,
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
    if args.merge_only:
        results = []
    else:
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
        config = dict(
            previous[0]["config"], seeds=sorted({r["seed"] for r in runs}), merged_from=list(args.merge_only)
        )
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
