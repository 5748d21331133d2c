#!/usr/bin/env python
"""Accuracy of SAP against the obvious baselines, on real Fashion-MNIST with synthetic label noise.

For every setting (40% symmetric noise; 40% asymmetric noise with
`sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP`) and every seed:

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
   sap+refine             `sap`'s model, its label audit (`sap_hf.audit_labels`), then `sap_hf.refine`: fine-tuning
                          on the training set without the suspected labels ('remove') or with the confident ones
                          relabelled ('relabel'); mode, lr and length picked on validation (--refine_* arguments).
   ssd, scrub             (`--methods peers`) the corrective-unlearning peers of `benchmarks/methods.py`, which need a
                          forget set: 'realistic' (top-k of `sap`'s audit suspects / the recipe's trusted samples)
                          and 'oracle' (truly mislabelled / correctly labelled samples: hidden labels); `forget_set`
                          in the row, summary names 'ssd (realistic)', ...; the `peers` table of accuracy.json.
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
4. Robust losses (`--methods robust_gce robust_sce robust_ls`): the same model, data and schedule trained
   with a noise-robust loss at its paper's defaults (GCE q=0.7, `sap_hf.losses`; SCE alpha=0.1, beta=1,
   A=-4, `sap_hf.losses`; label smoothing 0.1, transformers' `LabelSmoother`), cached under a name that
   adds the loss to the training key. Rows per loss: `robust_<loss>` (the final model),
   `robust_<loss>_best_epoch` (its best-val checkpoint), `robust_<loss>+sap` (SAP on it, by exactly the
   protocol of `sap`: every rule x trusted_per_class x alpha_scope, alpha grid, choice on val) and the
   diagnostic `robust_<loss>+sap[rule/k]` / `robust_<loss>+sap_per_kind[rule/k]`. `gain_vs_none` is
   against the cross-entropy model `none`, `gain_vs_base` against the robust model itself (what SAP adds).

Output: `<out_dir>/accuracy.json` ({"rows": [...], "summary", "purity", "robust", "runs",
"robust_runs", ...}), `<out_dir>/accuracy_alpha.png` (test/val accuracy against alpha for one seed
per setting), `<out_dir>/accuracy_methods.png` (mean +- std per method), `<out_dir>/accuracy_robust.png`
(per loss: model, best epoch, + SAP), and tables on stdout.

Run: python benchmarks/accuracy.py            (full run: 'ce', 'robust_gce', 'robust_sce' x 2 settings x
                                              3 seeds; add --cache_dir DIR to reuse trained models)
     python benchmarks/accuracy.py --methods robust_gce robust_sce --cache_dir DIR
                                             (only those rows, merged into the existing accuracy.json)
     python benchmarks/accuracy.py --quick    (smoke run, < 1 min)
     python benchmarks/accuracy.py --cache_dir DIR --methods sap+refine
                                              (only the sap+refine rows, merged into <out_dir>/accuracy.json; `sap`
                                              is rebuilt from its recorded choice and checked against its recorded
                                              val accuracy: no 20-minute rerun to add one row)
Workers: `--jobs` processes (default 2), each with `--threads` torch threads (default 1: on a
shared 2-core machine, 2 threads per process are oversubscribed and run tens of times slower).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import report
from common import RULES, SETTINGS, accuracy, finetune_grid, fit_diagnostics, mean_std, prepare_run
from methods import add_peer_arguments, add_refine_arguments, oracle_sizes, peer_rows, peer_settings, sap_refine_row

from sap_hf.runtime.passes import Runtime


MAIN_METHODS = ("none", "best_epoch", "sap", "finetune_trusted")
EXTRA_METHODS = ("sap_shared", "finetune_trusted_best", "sap+finetune", "sap+refine")
#: Noise-robust training losses of the `robust_<loss>` rows, at their papers' defaults (never tuned here):
#: GCE q=0.7 (Zhang & Sabuncu 2018), SCE alpha=0.1, beta=1, A=-4 (Wang et al. 2019), label smoothing 0.1.
ROBUST_LOSSES = ("gce", "sce", "ls")
LABEL_SMOOTHING = 0.1
#: Row groups `--methods` can compute: "ce" (every cross-entropy row above) and one group per robust loss.
#: "sap+refine" recomputes only that row from the recorded `sap` choice (the "ce" group computes it too).
#: "peers": SSD and SCRUB (benchmarks/methods.py) on the recorded `sap`'s audit and the recipe's trusted set.
#: "curvature" adds SAP with the reference's curvature rule (`sap_curvature*` rows) and the selection cost per rule.
METHOD_GROUPS = ("ce", "sap+refine", "peers", "curvature", *(f"robust_{loss}" for loss in ROBUST_LOSSES))
PEER_METHODS = ("ssd", "scrub")
#: Rules whose selection seconds the "curvature" group measures side by side.
COST_RULES = ("loss", "shift_loss", "curvature")
DEFAULT_METHOD_GROUPS = ("ce", "robust_gce", "robust_sce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    recipe = common.recipe_sap_config()  # recipes/configs/default.yaml
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=[*RULES, "curvature"])
    parser.add_argument(
        "--trusted_per_class",
        nargs="+",
        type=int,
        default=[recipe.trusted_per_class],
        help="trusted-set sizes tried for every rule (default: the recipe's)",
    )
    parser.add_argument(
        "--alpha_scopes",
        nargs="+",
        default=["shared", "per_kind"],
        choices=["shared", "per_kind"],
        help="SAPConfig.alpha_scope values tried for every trusted set (the val-best one is 'sap')",
    )
    parser.add_argument(
        "--plot_seed", type=int, default=None, help="seed whose alpha curves are plotted (default: first)"
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plots/table from <out_dir>/accuracy.json"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHOD_GROUPS),
        help="row groups to compute: 'ce' (the cross-entropy model: none, best_epoch, sap, fine-tuning) "
        "and robust_<loss> (gce, sce, ls: that loss's model, its best epoch, SAP on it). Default: "
        f"{' '.join(DEFAULT_METHOD_GROUPS)} ('ce' with --quick), written as a new accuracy.json. Given "
        "explicitly, only those are computed and their rows are merged into <out_dir>/accuracy.json "
        "(the other rows are kept).",
    )
    add_refine_arguments(parser)
    add_peer_arguments(parser)
    args = common.finish_args(parser.parse_args(argv), argv)
    args.merge = args.methods is not None
    args.methods = list(dict.fromkeys(args.methods or (["ce"] if args.quick else DEFAULT_METHOD_GROUPS)))
    if args.refine_lrs is None:
        args.refine_lrs = [args.lr, 2 * args.lr]
    if args.quick:
        args.trusted_per_class = [3]
        args.refine_lrs, args.refine_epochs = [1e-3], [1]
    if args.plot_seed is None:
        args.plot_seed = args.seeds[0]
    return args


# --------------------------------------------------------------------------------------------
# One (setting, seed) run, in a worker process
# --------------------------------------------------------------------------------------------


def sap_candidates(
    run: dict[str, Any],
    final_state: dict,
    args: argparse.Namespace,
    timing: dict[str, Any],
    selections: dict[tuple[str, int], Any] | None = None,
) -> list[dict]:
    """`sap_correct` on the trusted set of every rule x `--trusted_per_class` x `--alpha_scopes`, alpha on val.

    `run` is a `prepare_run` result (its model is left at `final_state`'s weights only between
    candidates: reload it after). One candidate per (rule, per_class, scope), in that order (ties on val
    go to the earlier one), with its val/test accuracy, fit diagnostics, trusted indices, purity and
    corrected `state`; a rule that cannot fill every class gives `{"rule", "per_class", "error"}`.
    `selections[(rule, per_class)]`: a `select_trusted` result already made (it is used instead of selecting again).
    """
    import torch

    from sap_hf import SAPConfig, sap_correct, select_trusted

    data, model, early_model, config, train_set = (
        run[k] for k in ("data", "model", "early_model", "config", "train_set")
    )

    def evaluate_fn(m: Any) -> dict[str, float]:
        return {"accuracy": accuracy(m, data["val_x"], data["val_y"])}

    timing["sap"] = {}
    candidates = []
    for rule in args.rules:
        for per_class in args.trusted_per_class:
            model.load_state_dict(final_state)
            clock = time.perf_counter()
            try:
                selection = (selections or {}).get((rule, per_class)) or select_trusted(
                    model,
                    train_set,
                    per_class,
                    num_labels=config.num_labels,
                    rule=rule,
                    selection_model=early_model if rule == "early_loss" else None,
                    runtime=Runtime(batch_size=500, show_progress=False),
                )
            except ValueError as err:  # e.g. 'agreement' leaves a class with no sample
                candidates.append({"rule": rule, "per_class": per_class, "error": str(err)})
                continue
            index = torch.tensor(selection.indices, dtype=torch.long)
            purity = float((data["train_y"][index] == data["clean_y"][index]).float().mean())
            for scope in args.alpha_scopes:
                model.load_state_dict(final_state)
                # alpha_search="grid": this study plots and records every alpha's val/test curve
                sap_config = SAPConfig(
                    alphas=list(args.alphas),
                    trusted_per_class=per_class,
                    selection_rule=rule,
                    alpha_search="grid",
                    batch_size=500,
                    alpha_scope=scope,
                )
                result = sap_correct(
                    model,
                    train_set,
                    config=sap_config,
                    trusted_indices=selection.indices,
                    evaluate_fn=evaluate_fn,
                    runtime=Runtime(show_progress=False),
                )
                candidates.append(
                    {
                        "rule": rule,
                        "per_class": per_class,
                        "scope": scope,
                        "num_trusted": len(selection.indices),
                        "purity": purity,
                        "indices": selection.indices,
                        "alpha": result.alpha,
                        "kind_alphas": result.kind_alphas,
                        "val_accuracy": result.final_metrics["accuracy"],
                        "test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
                        **fit_diagnostics(model, data),
                        "val_curve": [round(m["accuracy"], 4) for m in result.rounds[0].metrics],
                        "state": copy.deepcopy(model.state_dict()),
                    }
                )
            timing["sap"][f"{rule}/{per_class}"] = time.perf_counter() - clock
    return candidates


def sap_row(base: dict[str, Any], method: str, c: dict) -> dict:
    """The row of one SAP candidate (`sap_candidates`)."""
    return dict(
        base,
        method=method,
        test_accuracy=c["test_accuracy"],
        val_accuracy=c["val_accuracy"],
        alpha=c["alpha"],
        alpha_scope=c["scope"],
        kind_alphas=c["kind_alphas"],
        rule=c["rule"],
        trusted_per_class=c["per_class"],
        num_trusted=c["num_trusted"],
        purity=c["purity"],
        noisy_fit=c["noisy_fit"],
        clean_fit=c["clean_fit"],
    )


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sap_hf.core.targets import find_target_modules

    run = prepare_run(setting, seed, args)
    data, train_set, config, model, early_model, trained, timing, started = (
        run[k] for k in ("data", "train_set", "config", "model", "early_model", "trained", "timing", "started")
    )
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
        dict(
            base,
            method="none",
            test_accuracy=none_test,
            val_accuracy=none_val,
            train_noisy_accuracy=train_noisy_acc,
            epochs=args.epochs,
            **none_fit,
        ),
        dict(
            base,
            method="best_epoch",
            test_accuracy=test_acc(early_model),
            val_accuracy=trained["best"]["val_accuracy"],
            epoch=trained["best"]["epoch"],
            **fit_diagnostics(early_model, data),
        ),
    ]

    # ---- SAP: every (rule, per_class) trusted set, alpha searched on val by sap_correct ----
    timing["baselines"] = time.perf_counter() - clock
    timing["sap_test_curves"], timing["finetune"] = 0.0, {}
    candidates = sap_candidates(run, final_state, args, timing)
    model.load_state_dict(final_state)

    usable = [c for c in candidates if "error" not in c]
    shared = [c for c in usable if c["scope"] == "shared"]
    # Ties on val go to the earlier candidate: rules in the order given, smaller trusted sets first, shared alpha
    # before per-kind alphas.
    chosen = max(usable, key=lambda c: c["val_accuracy"]) if usable else None
    chosen_shared = max(shared, key=lambda c: c["val_accuracy"]) if shared else None
    x_of = lambda c: data["train_x"][torch.tensor(c["indices"])]
    y_of = lambda c: data["train_y"][torch.tensor(c["indices"])]

    def ft_row(method: str, c: dict, ft: dict) -> dict:
        return dict(
            base,
            method=method,
            test_accuracy=ft["test_accuracy"],
            val_accuracy=ft["val_accuracy"],
            lr=ft["lr"],
            ft_epochs=ft["epochs"],
            rule=c["rule"],
            trusted_per_class=c["per_class"],
            num_trusted=c["num_trusted"],
            purity=c["purity"],
        )

    # The alpha-vs-accuracy figure (one seed): test accuracy at every alpha of the paper's rule and of
    # the val-chosen trusted set. Reporting only: nothing is chosen from these numbers.
    if seed == args.plot_seed:
        from sap_hf.core.projection import current_weights, plan_projection, write_weights
        from sap_hf.core.search import eigenbases
        from sap_hf.core.stats import collect_statistics

        clock = time.perf_counter()
        paper = next((c for c in shared if c["rule"] == "loss"), None)
        same_set = next(
            (c for c in shared if chosen and (c["rule"], c["per_class"]) == (chosen["rule"], chosen["per_class"])),
            None,
        )
        for c in {id(c): c for c in (paper, same_set) if c is not None}.values():
            model.load_state_dict(final_state)
            targets = find_target_modules(model, None, None, True)
            stats = collect_statistics(
                model, train_set.select(c["indices"]), targets, runtime=Runtime(batch_size=500, show_progress=False)
            )
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
        rows.append(sap_row(base, f"{prefix}[{c['rule']}/{c['per_class']}]", c))
    if chosen is not None:
        rows.append(sap_row(base, "sap", chosen))
        if chosen_shared is not None and "per_kind" in args.alpha_scopes:
            rows.append(sap_row(base, "sap_shared", chosen_shared))
        rows.append(ft_row("finetune_trusted", chosen, finetunes[(chosen["rule"], chosen["per_class"])]))
        # SAP, then the same fine-tuning grid on the same trusted samples (a composition, not a baseline).
        rows.append(
            ft_row(
                "sap+finetune",
                chosen,
                finetune_grid(model, chosen["state"], x_of(chosen), y_of(chosen), data, args, seed),
            )
        )
        clock = time.perf_counter()
        rows.append(sap_refine_row(model, chosen["state"], sap_row(base, "sap", chosen), run, args))
        timing["sap+refine"] = time.perf_counter() - clock
        model.load_state_dict(final_state)
        best_ft_key = max(finetunes, key=lambda k: finetunes[k]["val_accuracy"])
        best_ft_c = next(c for c in usable if (c["rule"], c["per_class"]) == best_ft_key)
        rows.append(ft_row("finetune_trusted_best", best_ft_c, finetunes[best_ft_key]))
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test

    return {
        "setting": setting,
        "seed": seed,
        "rows": rows,
        "run": {
            "setting": setting,
            "seed": seed,
            "noise_type": noise_type,
            "noise_rate": rate,
            "actual_noise_rate": float(data["is_noisy"].float().mean()),
            "train_noisy_accuracy": train_noisy_acc,
            "train_seconds": trained["seconds"],
            "best_epoch": trained["best"]["epoch"],
            "val_history": trained["history"],
            "candidates": [{k: v for k, v in c.items() if k not in ("indices", "state")} for c in candidates],
            "finetune_grids": {f"{r}/{k}": ft["grid"] for (r, k), ft in finetunes.items()},
            "seconds": time.perf_counter() - started,
            "timing": timing,
        },
    }


def robust_loss(name: str) -> tuple[Any, str, dict[str, Any]]:
    """The `BatchLoss` of `robust_<name>`, its model-cache tag and its parameters.

    GCE and SCE come from `sap_hf.losses` (what `Trainer(compute_loss_func=...)` gets); label
    smoothing is transformers' own `LabelSmoother` (what `TrainingArguments.label_smoothing_factor` uses).
    """
    if name == "ls":
        from transformers.trainer_pt_utils import LabelSmoother

        smoother = LabelSmoother(epsilon=LABEL_SMOOTHING)
        params: dict[str, Any] = {"loss": "ce", "label_smoothing_factor": LABEL_SMOOTHING}

        def loss_fn(logits: Any, labels: Any, *, indices: Any = None, epoch: int = 0) -> Any:
            return smoother({"logits": logits}, labels)
    else:
        from sap_hf.losses import LossConfig, RobustLoss

        loss_config = LossConfig(loss=name)
        robust = RobustLoss(loss_config)
        params = {"loss": name, **loss_config.parameters()}

        def loss_fn(logits: Any, labels: Any, *, indices: Any = None, epoch: int = 0) -> Any:
            return robust(logits, labels)

    tag = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return loss_fn, tag, params


def run_robust(setting: str, seed: int, args: argparse.Namespace, loss: str) -> dict[str, Any]:
    """The `robust_<loss>` rows of one (setting, seed): the same schedule trained with that loss, its best epoch,
    and SAP on it (`sap_candidates`: the same trusted sets, scopes, alpha grid and choice on val as `sap`).

    `gain_vs_none` is against the cross-entropy model of the same (setting, seed) (`none`), `gain_vs_base`
    against the robust model itself (what SAP adds on top of the loss).
    """
    loss_fn, tag, params = robust_loss(loss)
    reference = prepare_run(setting, seed, args)  # the cross-entropy model (cached): `none`
    none_test = accuracy(reference["model"], reference["data"]["test_x"], reference["data"]["test_y"])
    del reference
    run = prepare_run(setting, seed, args, loss_fn=loss_fn, cache_tag=tag)
    data, model, early_model, trained, timing = (run[k] for k in ("data", "model", "early_model", "trained", "timing"))
    final_state = copy.deepcopy(model.state_dict())
    name = f"robust_{loss}"
    base = {"setting": setting, "seed": seed, "loss": loss, "loss_params": params}
    base_test = accuracy(model, data["test_x"], data["test_y"])
    train_noisy_acc = accuracy(model, data["train_x"], data["train_y"])
    rows = [
        dict(
            base,
            method=name,
            test_accuracy=base_test,
            val_accuracy=accuracy(model, data["val_x"], data["val_y"]),
            train_noisy_accuracy=train_noisy_acc,
            epochs=args.epochs,
            **fit_diagnostics(model, data),
        ),
        dict(
            base,
            method=f"{name}_best_epoch",
            test_accuracy=accuracy(early_model, data["test_x"], data["test_y"]),
            val_accuracy=trained["best"]["val_accuracy"],
            epoch=trained["best"]["epoch"],
            **fit_diagnostics(early_model, data),
        ),
    ]
    candidates = sap_candidates(run, final_state, args, timing)
    model.load_state_dict(final_state)
    usable = [c for c in candidates if "error" not in c]
    for c in usable:
        prefix = f"{name}+sap" if c["scope"] == "shared" else f"{name}+sap_{c['scope']}"
        rows.append(sap_row(base, f"{prefix}[{c['rule']}/{c['per_class']}]", c))
    if usable:
        rows.append(sap_row(base, f"{name}+sap", max(usable, key=lambda c: c["val_accuracy"])))
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
        row["gain_vs_base"] = row["test_accuracy"] - base_test
    return {
        "setting": setting,
        "seed": seed,
        "loss": loss,
        "rows": rows,
        "run": {
            "setting": setting,
            "seed": seed,
            "loss": loss,
            "loss_params": params,
            "cache_tag": tag,
            "train_noisy_accuracy": train_noisy_acc,
            "train_seconds": trained["seconds"],
            "best_epoch": trained["best"]["epoch"],
            "val_history": trained["history"],
            "candidates": [{k: v for k, v in c.items() if k not in ("indices", "state")} for c in candidates],
            "seconds": time.perf_counter() - run["started"],
            "timing": timing,
        },
    }


def rebuild_sap(run: dict[str, Any], sap: dict[str, Any]) -> dict:
    """The state of `sap`'s model from its recorded choice (trusted rule/k, alpha or per-kind alphas).

    Selection and projection are deterministic, so this is the model the full run measured; its
    val accuracy is checked against the recorded one.
    """
    from sap_hf import SAPConfig, sap_project, select_trusted

    model, train_set, data = run["model"], run["train_set"], run["data"]
    state = copy.deepcopy(model.state_dict())
    alpha = sap["kind_alphas"] if sap.get("alpha_scope") == "per_kind" else sap["alpha"]
    unchanged = alpha is None or (isinstance(alpha, dict) and all(a is None for a in alpha.values()))
    if not unchanged:
        selection = select_trusted(
            model,
            train_set,
            sap["trusted_per_class"],
            num_labels=run["config"].num_labels,
            rule=sap["rule"],
            selection_model=run["early_model"] if sap["rule"] == "early_loss" else None,
            runtime=Runtime(batch_size=500, show_progress=False),
        )
        sap_project(model, train_set.select(selection.indices), alpha=alpha, config=SAPConfig(batch_size=500))
    val = accuracy(model, data["val_x"], data["val_y"])
    if abs(val - sap["val_accuracy"]) > 1e-6:
        raise RuntimeError(
            f"Rebuilt 'sap' model of {sap['setting']} seed {sap['seed']} has val accuracy {val:.4f}, the "
            f"recorded one {sap['val_accuracy']:.4f}: the cached models differ from the recorded run; rerun in full."
        )
    sap_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return sap_state


def run_sap_refine(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `sap+refine` group alone: `sap` rebuilt from its row in <out_dir>/accuracy.json, then `sap_refine_row`."""
    path = Path(args.out_dir) / "accuracy.json"
    recorded = (
        [r for r in json.loads(path.read_text())["rows"] if (r["setting"], r["seed"]) == (setting, seed)]
        if path.exists()
        else []
    )
    sap = next((r for r in recorded if r["method"] == "sap"), None)
    none = next((r for r in recorded if r["method"] == "none"), None)
    if sap is None or none is None:
        raise SystemExit(
            f"--methods sap+refine refines the recorded 'sap' model of {setting} seed {seed}, which {path} "
            "does not hold: compute the 'ce' group first."
        )
    run = prepare_run(setting, seed, args)
    row = sap_refine_row(run["model"], rebuild_sap(run, sap), sap, run, args)
    row["gain_vs_none"] = row["test_accuracy"] - none["test_accuracy"]
    return {
        "setting": setting,
        "seed": seed,
        "group": "sap+refine",
        "rows": [row],
        "run": {"seconds": time.perf_counter() - run["started"]},
    }


def recorded_rows(
    setting: str, seed: int, args: argparse.Namespace, needed: tuple[str, ...], group: str
) -> dict[str, dict]:
    """The rows of <out_dir>/accuracy.json for (setting, seed) by method; SystemExit when one of `needed` is missing."""
    path = Path(args.out_dir) / "accuracy.json"
    recorded = (
        [r for r in json.loads(path.read_text())["rows"] if (r["setting"], r["seed"]) == (setting, seed)]
        if path.exists()
        else []
    )
    by_method = {r["method"]: r for r in recorded if "forget_set" not in r}
    missing = [m for m in needed if m not in by_method]
    if missing:
        raise SystemExit(
            f"--methods {group} needs the recorded {missing} rows of {setting} seed {seed}, which {path} "
            "does not hold: compute the 'ce' group first."
        )
    return by_method


def run_peers(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `peers` group: SSD and SCRUB (`methods.peer_rows`) on the memorised model of (setting, seed).

    Suspects: the label audit of `sap`'s model (rebuilt from its recorded choice), as `sap+refine` audits
    (`sap_hf.audit_labels`, `--refine_views`), most suspicious first. Trusted: `sap_hf.select_trusted` with the
    recipe's rule and per-class count (`common.recipe_sap_config()`) on the memorised model.
    """
    from sap_hf import audit_labels, select_trusted

    recorded = recorded_rows(setting, seed, args, ("sap", "none"), "peers")
    run = prepare_run(setting, seed, args)
    model, data, train_set = run["model"], run["data"], run["train_set"]
    final_state = copy.deepcopy(model.state_dict())
    clock = time.perf_counter()
    model.load_state_dict(rebuild_sap(run, recorded["sap"]))
    audit = audit_labels(
        model, train_set, views=args.refine_views, runtime=Runtime(batch_size=1000, show_progress=False)
    )
    suspects = audit.suspected_indices()
    model.load_state_dict(final_state)
    recipe = common.recipe_sap_config()
    selection = select_trusted(
        model,
        train_set,
        recipe.trusted_per_class,
        num_labels=run["config"].num_labels,
        rule=recipe.selection_rule,
        selection_model=run["early_model"] if recipe.selection_rule == "early_loss" else None,
        runtime=Runtime(batch_size=500, show_progress=False),
    )
    inputs_seconds = time.perf_counter() - clock
    rows = peer_rows(model, data, trusted_indices=selection.indices, suspects=suspects, args=args, seed=seed)
    trusted = torch_index(selection.indices)
    purity = float((data["train_y"][trusted] == data["clean_y"][trusted]).float().mean())
    for row in rows:
        row.update(
            setting=setting,
            seed=seed,
            gain_vs_none=row["test_accuracy"] - recorded["none"]["test_accuracy"],
            trusted_rule=recipe.selection_rule,
            trusted_per_class=recipe.trusted_per_class,
            trusted_purity=purity,
            audit_suspected=len(suspects),
        )
    return {
        "setting": setting,
        "seed": seed,
        "group": "peers",
        "rows": rows,
        "run": {
            "seconds": time.perf_counter() - run["started"],
            "inputs_seconds": inputs_seconds,
            "peers_seconds": time.perf_counter() - clock - inputs_seconds,
        },
    }


def torch_index(indices: Any) -> Any:
    import torch

    return torch.as_tensor(list(indices), dtype=torch.long)


def run_curvature(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `curvature` group: SAP on the trusted set of rule='curvature' by exactly `sap_candidates`' protocol
    (every `--trusted_per_class` x `--alpha_scopes`, alpha grid, choice on val): rows `sap_curvature_<scope>[k]`
    (compare `sap[shift_loss/k]`, `sap_per_kind[shift_loss/k]`) and `sap_curvature` (the val-best of them); and the
    seconds of trusted selection under each of `COST_RULES`, timed one after the other in this process."""
    from sap_hf import select_trusted

    run = prepare_run(setting, seed, args)
    model, data = run["model"], run["data"]
    final_state = copy.deepcopy(model.state_dict())
    none_test = accuracy(model, data["test_x"], data["test_y"])
    cost, selections = {}, {}
    for rule in COST_RULES:
        clock = time.perf_counter()
        selections[(rule, args.trusted_per_class[0])] = select_trusted(
            model,
            run["train_set"],
            args.trusted_per_class[0],
            num_labels=run["config"].num_labels,
            rule=rule,
            runtime=Runtime(batch_size=500, show_progress=False),
        )
        cost[rule] = time.perf_counter() - clock
    curvature_args = copy.copy(args)
    curvature_args.rules = ["curvature"]
    candidates = [
        c for c in sap_candidates(run, final_state, curvature_args, run["timing"], selections) if "error" not in c
    ]
    base = {"setting": setting, "seed": seed, "group": "curvature", "selection_seconds": cost}
    rows = [sap_row(base, f"sap_curvature_{c['scope']}[{c['per_class']}]", c) for c in candidates]
    if candidates:
        rows.append(sap_row(base, "sap_curvature", max(candidates, key=lambda c: c["val_accuracy"])))
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
    return {
        "setting": setting,
        "seed": seed,
        "group": "curvature",
        "rows": rows,
        "run": {"seconds": time.perf_counter() - run["started"], "selection_seconds": cost},
    }


def _worker(task: tuple[str, int, argparse.Namespace, str]) -> dict[str, Any]:
    setting, seed, args, group = task
    if group == "ce":
        result = run_one(setting, seed, args)
    elif group == "sap+refine":
        result = run_sap_refine(setting, seed, args)
    elif group == "peers":
        result = run_peers(setting, seed, args)
    elif group == "curvature":
        result = run_curvature(setting, seed, args)
    else:
        result = run_robust(setting, seed, args, group.removeprefix("robust_"))
    fit = result["run"].get("train_noisy_accuracy")
    print(
        f"[accuracy] {group} {setting} seed {seed} done in {result['run']['seconds']:.0f}s"
        + (f" (train fit on noisy labels {fit:.3f})" if fit is not None else ""),
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------
# Aggregation, table, plots
# --------------------------------------------------------------------------------------------


def _choice(choice: dict[str, Any]) -> str:
    if not choice:
        return ""
    if "epoch" in choice:
        return f"ep{choice['epoch']}"
    if "forget_set" in choice:
        if not choice.get("forget_size") or choice.get("scrub_epochs") == 0:
            return "unchanged"
        if "lam" in choice:
            return f"k={choice['forget_size']}/a={choice['alpha']:g}/l={choice['lam']:g}"
        return f"k={choice['forget_size']}/lr={choice['lr']:g}/m={choice['max_epochs']}x{choice['scrub_epochs']}ep"
    if "refine_mode" in choice:
        mode = choice["refine_mode"]
        return f"{mode}/lr={choice['lr']:g}x{choice['refine_epochs']}ep" if mode else "unchanged"
    text = f"{choice.get('rule')}/{choice.get('trusted_per_class')}"
    if choice.get("kind_alphas"):
        short = {"attention": "att", "mlp": "mlp", "classifier": "cls"}
        return (
            text
            + "/"
            + ",".join(f"{short.get(k, k)}={'-' if a is None else f'{a:g}'}" for k, a in choice["kind_alphas"].items())
        )
    if "alpha" in choice:
        return text + (f"/a={choice['alpha']:g}" if choice["alpha"] is not None else "/unchanged")
    return text + (f"/lr={choice['lr']:g}x{choice['ft_epochs']}ep" if choice.get("lr") is not None else "/unchanged")


def _unchanged(row: dict[str, Any]) -> bool:
    """True when the val-chosen SAP candidate left the model as it was ("no change" won on val)."""
    return row.get("alpha") is None and all(a is None for a in (row.get("kind_alphas") or {}).values())


def robust_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting and loss ('ce' = the plain rows): fit of the noisy labels, the trained model, its best epoch,
    SAP on it, SAP's gain over the model (mean, std, per seed) and the seeds where SAP kept the model unchanged."""
    out: dict[str, Any] = {}
    settings = dict.fromkeys(r["setting"] for r in rows)
    losses = ["ce"] + [loss for loss in ROBUST_LOSSES if any(r.get("loss") == loss for r in rows)]
    for setting in settings:
        for loss in losses:
            names = (
                ("none", "best_epoch", "sap")
                if loss == "ce"
                else (f"robust_{loss}", f"robust_{loss}_best_epoch", f"robust_{loss}+sap")
            )
            by_seed: dict[int, dict[str, dict]] = {}
            for r in rows:
                if r["setting"] == setting and r["method"] in names:
                    by_seed.setdefault(r["seed"], {})[r["method"]] = r
            seeds = sorted(seed for seed, found in by_seed.items() if set(names) <= set(found))
            if not seeds:
                continue
            model, best, sap = ([by_seed[seed][n] for seed in seeds] for n in names)
            gains = [s["test_accuracy"] - m["test_accuracy"] for s, m in zip(sap, model)]
            out.setdefault(setting, {})[loss] = {
                "seeds": seeds,
                "train_noisy_accuracy": mean_std([m["train_noisy_accuracy"] for m in model]),
                "noisy_fit": mean_std([m["noisy_fit"] for m in model]),
                "model": mean_std([m["test_accuracy"] for m in model]),
                "best_epoch": mean_std([b["test_accuracy"] for b in best]),
                "sap": mean_std([s["test_accuracy"] for s in sap]),
                "sap_gain": mean_std(gains),
                "sap_gain_per_seed": gains,
                "sap_unchanged_seeds": [seed for seed, s in zip(seeds, sap) if _unchanged(s)],
                "sap_choices": [_choice(s) for s in sap],
                "best_epochs": [b["epoch"] for b in best],
            }
    return out


#: The peers table's columns (summary names) and its targets: (ours, theirs) where ours should be >= theirs.
PEER_TABLE = (
    "finetune_trusted",
    "sap",
    "sap+refine",
    "ssd (realistic)",
    "scrub (realistic)",
    "ssd (oracle)",
    "scrub (oracle)",
)
PEER_TARGETS = (
    ("sap", "ssd (realistic)"),
    ("sap", "scrub (realistic)"),
    ("sap+refine", "ssd (oracle)"),
    ("sap+refine", "scrub (oracle)"),
)


def peers_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting, over the seeds that have every column of `PEER_TABLE`: each column's test accuracy (mean, std,
    per seed), the peers' cost and chosen forget sizes, and every target's difference ours - theirs (mean, per seed)."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by_seed: dict[int, dict[str, dict]] = {}
        for r in rows:
            if r["setting"] == setting and report.row_name(r) in PEER_TABLE:
                by_seed.setdefault(r["seed"], {})[report.row_name(r)] = r
        seeds = sorted(seed for seed, found in by_seed.items() if set(PEER_TABLE) <= set(found))
        if not seeds:
            continue
        # Fine-tuning on the peers' realistic retain set (the recipe's trusted set), when the 'ce' rows hold it.
        peer = by_seed[seeds[0]]["scrub (realistic)"]
        same_retain = f"finetune_trusted[{peer.get('trusted_rule')}/{peer.get('trusted_per_class')}]"
        for r in rows:
            if r["setting"] == setting and r["method"] == same_retain and r["seed"] in by_seed:
                by_seed[r["seed"]][same_retain] = r
        columns = list(PEER_TABLE) + ([same_retain] if all(same_retain in by_seed[s] for s in seeds) else [])
        entry: dict[str, Any] = {"seeds": seeds, "methods": {}, "targets": [], "same_retain_finetune": same_retain}
        for name in columns:
            chosen = [by_seed[seed][name] for seed in seeds]
            method = {
                "test_accuracy": mean_std([r["test_accuracy"] for r in chosen]),
                "per_seed": [r["test_accuracy"] for r in chosen],
            }
            if "forget_set" in chosen[0]:
                method.update(
                    cost_epochs=mean_std([r["cost_epochs"] for r in chosen]),
                    cost_epochs_final=mean_std([r["cost_epochs_final"] for r in chosen]),
                    forget_sizes=[r["forget_size"] for r in chosen],
                    retain_sizes=[r["retain_size"] for r in chosen],
                    forget_noisy_fraction=[r["forget_noisy_fraction"] for r in chosen],
                    choices=[_choice(r) for r in chosen],
                )
            entry["methods"][name] = method
        for ours, theirs in PEER_TARGETS:
            diffs = [by_seed[s][ours]["test_accuracy"] - by_seed[s][theirs]["test_accuracy"] for s in seeds]
            entry["targets"].append(
                {
                    "ours": ours,
                    "theirs": theirs,
                    "difference": mean_std(diffs),
                    "per_seed": diffs,
                    "met": statistics.fmean(diffs) >= 0,
                }
            )
        out[setting] = entry
    return out


#: The bar figures: file -> the methods each shows (all of them, for the robust losses).
FIGURES = {
    "accuracy_methods.png": (*MAIN_METHODS, *EXTRA_METHODS),
    "accuracy_peers.png": PEER_TABLE,
    "accuracy_robust.png": None,
}


def plot(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    alphas: list[float],
    plot_seed: int,
    out_dir: Path,
) -> list[str]:
    """The alpha figure (one seed per setting) and the bar figures (`FIGURES`), from what accuracy.json holds."""
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    for name, shown in FIGURES.items():
        robust = name == "accuracy_robust.png"
        chosen = {
            setting: {
                m: e
                for m, e in methods.items()
                if (m in shown if shown else "[" not in m and (m.startswith("robust_") or m in ("none", "sap")))
            }
            for setting, methods in summary.items()
        }
        if any(len(methods) > 1 for methods in chosen.values()) and (
            not robust or any(m.startswith("robust_") for methods in chosen.values() for m in methods)
        ):
            written.append(report.bars(chosen, out_dir / name, "Fashion-MNIST, tiny ViT memorising 40% noise:"))
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
                    (line,) = axis.plot(alphas, c["test_curve"], marker="o", ms=3, lw=1.8, label=f"SAP {name}: test")
                    axis.plot(alphas, c["val_curve"], ls=":", color=line.get_color(), lw=1, label=f"SAP {name}: val")
                else:
                    axis.plot(alphas, c["val_curve"], ls=":", lw=1, label=f"SAP {name}: val")
            for method, style in (
                ("none", {"color": "grey", "ls": "--"}),
                ("best_epoch", {"color": "green", "ls": "-."}),
                ("finetune_trusted", {"color": "purple", "ls": "--"}),
                ("finetune_trusted_best", {"color": "purple", "ls": ":"}),
            ):
                if method in by_method:
                    axis.axhline(by_method[method]["test_accuracy"], label=f"{method} (test)", lw=1.2, **style)
            sap = by_method.get("sap")
            if sap is not None and sap.get("kind_alphas"):
                axis.axhline(
                    sap["test_accuracy"],
                    color="red",
                    lw=1.2,
                    label=f"sap: val-chosen per-kind alphas ({_choice(sap)}) (test)",
                )
            elif sap is not None and sap["alpha"] is not None:
                axis.scatter(
                    [sap["alpha"]],
                    [sap["test_accuracy"]],
                    s=140,
                    facecolors="none",
                    edgecolors="red",
                    zorder=5,
                    label=f"sap: val-chosen ({sap['rule']}/{sap['trusted_per_class']}, alpha={sap['alpha']:g})",
                )
            axis.set_xscale("log")
            axis.set_xlabel("alpha")
            axis.set_ylabel("clean accuracy (solid: test, dotted: val)")
            axis.set_title(
                f"{run['setting']}, seed {run['seed']}: tiny ViT fitting "
                f"{100 * run['train_noisy_accuracy']:.1f}% of the noisy training labels",
                fontsize=9,
            )
            axis.legend(fontsize=6, loc="lower right")
        figure.tight_layout()
        path = out_dir / "accuracy_alpha.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(str(path))

    return written


def replot(out_dir: Path) -> None:
    """Redraw the figures and reprint the tables from an existing accuracy.json (no training)."""
    record = json.loads((out_dir / "accuracy.json").read_text())
    record["peers"] = peers_table(record["rows"])  # recomputed from the rows (the table's columns may have changed)
    with _exclusive(out_dir / ".accuracy.json.lock"):
        stored = json.loads((out_dir / "accuracy.json").read_text())
        if stored.get("peers") != record["peers"] and stored["rows"] == record["rows"]:
            stored["peers"] = record["peers"]
            common.write_json(out_dir / "accuracy.json", stored)
    config = record["config"]
    summary = report.summarise(record["rows"], ("setting",))
    plot(record["rows"], record["runs"], summary, config["alphas"], config["plot_seed"], out_dir)
    report.print_tables(out_dir / "accuracy.json")


def _result_group(result: dict[str, Any]) -> str:
    """The `--methods` group a worker result belongs to."""
    return result.get("group") or ("robust_" + result["loss"] if "loss" in result else "ce")


def _group(row: dict[str, Any]) -> str:
    """The `--methods` group a row belongs to."""
    if row["method"] == "sap+refine":
        return "sap+refine"
    if row["method"] in PEER_METHODS:
        return "peers"
    if row.get("group") == "curvature":
        return "curvature"
    return f"robust_{row['loss']}" if "loss" in row else "ce"


def merge(
    existing: dict[str, Any], rows: list[dict], runs: list[dict], robust_runs: list[dict]
) -> tuple[list, list, list]:
    """Rows/runs of `existing` (an accuracy.json) whose (setting, seed, group) was not recomputed, plus the new ones."""
    computed = {(r["setting"], r["seed"], _group(r)) for r in rows}
    keep = [r for r in existing.get("rows", []) if (r["setting"], r["seed"], _group(r)) not in computed]
    keep_runs = [r for r in existing.get("runs", []) if (r["setting"], r["seed"], "ce") not in computed]
    keep_robust = [
        r for r in existing.get("robust_runs", []) if (r["setting"], r["seed"], f"robust_{r['loss']}") not in computed
    ]
    return keep + rows, keep_runs + runs, keep_robust + robust_runs


def _robust_config(
    previous: dict[str, Any] | None, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any] | None:
    robust = [g for g in args.methods if g.startswith("robust_")]
    if not robust:
        return previous
    merged = dict(config, methods=robust)
    for key in ("seeds", "settings", "methods") if previous else ():
        merged[key] = list(dict.fromkeys([*previous.get(key, []), *merged[key]]))
    return merged


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): runs merging into one accuracy.json take turns."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        replot(out_dir)
        return {}
    started = time.perf_counter()
    tasks = [
        (setting, seed, args, group) for group in args.methods for seed in args.seeds for setting in args.settings
    ]
    results = common.run_tasks(_worker, tasks, args.jobs)
    order = {group: i for i, group in enumerate(args.methods)}
    results.sort(key=lambda r: (order[_result_group(r)], args.settings.index(r["setting"]), r["seed"]))
    path = out_dir / "accuracy.json"
    with _exclusive(out_dir / ".accuracy.json.lock"):  # read, merge and write as one step
        existing = json.loads(path.read_text()) if args.merge and path.exists() else {}
        record = build_record(args, results, existing, out_dir, started)
        common.write_json(path, record)
    report.print_tables(path)
    print(f"\nwrote {path} in {record['elapsed_seconds']:.0f}s")
    return record


def build_record(
    args: argparse.Namespace, results: list[dict[str, Any]], existing: dict[str, Any], out_dir: Path, started: float
) -> dict[str, Any]:
    """accuracy.json's content: the new results merged into `existing` (empty unless --methods), tables, plots."""
    rows = [row for result in results for row in result["rows"]]
    runs = [result["run"] for result in results if _result_group(result) == "ce"]
    robust_runs = [result["run"] for result in results if "loss" in result]
    rows, runs, robust_runs = merge(existing, rows, runs, robust_runs)
    summary = report.summarise(rows, ("setting",))
    robust = robust_table(rows)
    peer_table = peers_table(rows)

    from sap_hf.data.noise import FASHION_MNIST_ASYMMETRIC_MAP

    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "merge")}
    settings = dict.fromkeys([*existing.get("settings", {}), *args.settings])
    record = {
        "rows": rows,
        "summary": summary,
        "robust": robust,
        "peers": peer_table,
        "runs": runs,
        "robust_runs": robust_runs,
        "settings": {
            name: {"noise_type": t, "noise_rate": r} for name, (t, r) in SETTINGS.items() if name in settings
        },
        "asymmetric_map": {
            "name": "sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP",
            "map": {str(k): v for k, v in FASHION_MNIST_ASYMMETRIC_MAP.items()},
        },
        # The arguments of the run that computed the 'ce' rows (config) and of the robust_<loss> rows
        # (config_robust: seeds, settings and methods are the union over the merged runs).
        "config": config if "ce" in args.methods or "config" not in existing else existing["config"],
        "config_robust": _robust_config(existing.get("config_robust"), config, args),
        # The arguments of the last run that computed sap+refine rows (its --refine_* arguments).
        "config_refine": (config if {"ce", "sap+refine"} & set(args.methods) else existing.get("config_refine")),
        # The last run that computed peers rows, with its grids (`methods.peer_settings`) and the scaled oracle sizes.
        "config_peers": (
            dict(config, grids=peer_settings(args), oracle_sizes=oracle_sizes(args.train_size))
            if "peers" in args.methods
            else existing.get("config_peers")
        ),
        "environment": common.environment(),
        "elapsed_seconds": time.perf_counter() - started,
    }
    if existing.get("merged"):  # the record of earlier merges (older runs wrote it): kept
        record["merged"] = existing["merged"]
    if not args.no_plot:
        written = plot(rows, runs, summary, list(record["config"]["alphas"]), record["config"]["plot_seed"], out_dir)
        record["plots"] = [os.path.relpath(p, out_dir) for p in written]
    elif existing.get("plots"):
        record["plots"] = existing["plots"]  # redraw them with --replot
    return record


if __name__ == "__main__":
    main()
