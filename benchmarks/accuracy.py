#!/usr/bin/env python
"""Accuracy of SAP against the obvious baselines, on real Fashion-MNIST with synthetic label noise.

Tiny ViTs trained from scratch until they memorise 40% symmetric or asymmetric label noise; then SAP (every trusted
selection rule x trusted-set size x alpha scope), fine-tuning on the trusted samples, their compositions with SAP,
noise-robust losses, the corrective-unlearning peers SSD and SCRUB and the curvature rule. Every choice is made on a
clean validation split, accuracy is reported on the clean test split. Protocol, rows and results:
benchmarks/studies/accuracy.md.

Run: python benchmarks/accuracy.py            (full run: 'ce', 'robust_gce', 'robust_sce' x 2 settings x 3 seeds;
                                              add --cache_dir DIR to reuse trained models)
     python benchmarks/accuracy.py --cache_dir DIR --methods sap+refine
                                              (only those rows, merged into <out_dir>/accuracy.json)
     python benchmarks/accuracy.py --quick    (smoke run, < 1 min)
     python benchmarks/accuracy.py --replot   (the figures and tables again, from <out_dir>/accuracy.json)
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
from methods import add_refine_arguments, sap_refine_row
from peers import add_peer_arguments, oracle_sizes, peer_rows, peer_settings

from sap_hf.runtime.passes import Runtime


MAIN_METHODS = ("none", "best_epoch", "sap", "finetune_trusted")
EXTRA_METHODS = ("sap_shared", "finetune_trusted_best", "sap+finetune", "sap+refine")
#: Noise-robust training losses of the `robust_<loss>` rows, at their papers' defaults (never tuned here):
#: GCE q=0.7 (Zhang & Sabuncu 2018), SCE alpha=0.1, beta=1, A=-4 (Wang et al. 2019), label smoothing 0.1.
ROBUST_LOSSES = ("gce", "sce", "ls")
LABEL_SMOOTHING = 0.1
#: The row groups of `--methods`: "ce" (every row of the cross-entropy model), "sap+refine" (that row alone, from the
#: recorded `sap` choice), "peers" (SSD and SCRUB), "curvature" (SAP with the curvature rule, and the selection cost
#: of each of `COST_RULES`) and one group per robust loss.
METHOD_GROUPS = ("ce", "sap+refine", "peers", "curvature", *(f"robust_{loss}" for loss in ROBUST_LOSSES))
DEFAULT_METHOD_GROUPS = ("ce", "robust_gce", "robust_sce")
PEER_METHODS = ("ssd", "scrub")
COST_RULES = ("loss", "shift_loss", "curvature")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    recipe = common.recipe_sap_config()  # recipes/configs/default.yaml
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=[*RULES, "curvature"])
    parser.add_argument("--trusted_per_class", nargs="+", type=int, default=[recipe.trusted_per_class])
    parser.add_argument("--alpha_scopes", nargs="+", default=["shared", "per_kind"], choices=["shared", "per_kind"])
    parser.add_argument("--plot_seed", type=int, default=None, help="seed of the alpha figure (default: the first)")
    parser.add_argument("--replot", action="store_true", help="only redraw the figures and tables from the JSON")
    # Given, only these row groups are computed and merged into <out_dir>/accuracy.json (the other rows are kept);
    # else DEFAULT_METHOD_GROUPS ('ce' with --quick) are written as a new accuracy.json.
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHOD_GROUPS))
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


# ---- Small helpers ----


def on_test(model: Any, data: dict[str, Any]) -> float:
    return accuracy(model, data["test_x"], data["test_y"])


def on_val(model: Any, data: dict[str, Any]) -> float:
    return accuracy(model, data["val_x"], data["val_y"])


def as_index(indices: Any) -> Any:
    import torch

    return torch.as_tensor(list(indices), dtype=torch.long)


def purity(data: dict[str, Any], indices: Any) -> float:
    """Share of the samples whose noisy label is the clean one (hidden labels: reported, never used to choose)."""
    index = as_index(indices)
    return float((data["train_y"][index] == data["clean_y"][index]).float().mean())


def select(run: dict[str, Any], rule: str, per_class: int) -> Any:
    """`select_trusted` under the run's model (the 'early_loss' rule scores with the best-val checkpoint)."""
    from sap_hf import select_trusted

    early = run["early_model"] if rule == "early_loss" else None
    runtime = Runtime(batch_size=500, show_progress=False)
    model, train_set, num_labels = run["model"], run["train_set"], run["config"].num_labels
    return select_trusted(
        model, train_set, per_class, num_labels=num_labels, rule=rule, selection_model=early, runtime=runtime
    )


def trusted_name(c: dict[str, Any]) -> str:
    """'rule/k': a candidate's trusted set."""
    return f"{c['rule']}/{c['per_class']}"


def val_best(candidates: list[dict]) -> dict | None:
    """The candidate with the best val accuracy; ties go to the earlier one."""
    return max(candidates, key=lambda c: c["val_accuracy"]) if candidates else None


# ---- SAP candidates and the rows made of them ----


def sap_candidates(run: dict[str, Any], final_state: dict, args: argparse.Namespace, selections: Any = None) -> list:
    """`sap_correct` on the trusted set of every rule x `--trusted_per_class` x `--alpha_scopes`, alpha on val.

    One candidate per (rule, per_class, scope), in that order (ties on val go to the earlier one: rules in the order
    given, smaller sets first, shared alpha before per-kind), with its accuracies, fit diagnostics, trusted indices,
    purity and corrected `state`; a rule that cannot fill every class gives `{"rule", "per_class", "error"}`.
    `selections[(rule, per_class)]`: a `select_trusted` result already made. The model is left at any state:
    reload `final_state` after.
    """
    model, timing = run["model"], run["timing"]
    timing["sap"] = {}
    candidates = []
    for rule in args.rules:
        for per_class in args.trusted_per_class:
            model.load_state_dict(final_state)
            clock = time.perf_counter()
            try:
                selection = (selections or {}).get((rule, per_class)) or select(run, rule, per_class)
            except ValueError as err:  # e.g. 'agreement' leaves a class with no sample
                candidates.append({"rule": rule, "per_class": per_class, "error": str(err)})
                continue
            for scope in args.alpha_scopes:
                model.load_state_dict(final_state)
                candidates.append(sap_candidate(run, selection.indices, rule, per_class, scope, args))
            timing["sap"][f"{rule}/{per_class}"] = time.perf_counter() - clock
    return candidates


def sap_candidate(
    run: dict[str, Any], indices: list[int], rule: str, per_class: int, scope: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One candidate of `sap_candidates`: `sap_correct` of the loaded model on the trusted `indices`."""
    from sap_hf import SAPConfig, sap_correct

    model, data, train_set = run["model"], run["data"], run["train_set"]
    # alpha_search="grid": this study plots and records every alpha's val/test curve
    config = SAPConfig(
        alphas=list(args.alphas),
        trusted_per_class=per_class,
        selection_rule=rule,
        alpha_search="grid",
        batch_size=500,
        alpha_scope=scope,
    )
    evaluate, runtime = common.val_metric(data), Runtime(show_progress=False)
    result = sap_correct(
        model, train_set, config=config, trusted_indices=indices, evaluate_fn=evaluate, runtime=runtime
    )
    return {
        "rule": rule,
        "per_class": per_class,
        "scope": scope,
        "num_trusted": len(indices),
        "purity": purity(data, indices),
        "indices": indices,
        "alpha": result.alpha,
        "kind_alphas": result.kind_alphas,
        "val_accuracy": result.final_metrics["accuracy"],
        "test_accuracy": on_test(model, data),
        **fit_diagnostics(model, data),
        "val_curve": [round(m["accuracy"], 4) for m in result.rounds[0].metrics],
        "state": copy.deepcopy(model.state_dict()),
    }


def candidate_method(sap: str, c: dict[str, Any]) -> str:
    """The diagnostic row of one candidate: 'sap[rule/k]' (shared alpha) or 'sap_per_kind[rule/k]'."""
    scope = "" if c["scope"] == "shared" else f"_{c['scope']}"
    return f"{sap}{scope}[{trusted_name(c)}]"


def sap_row(base: dict[str, Any], method: str, c: dict) -> dict:
    """The row of one SAP candidate."""
    row = dict(base, method=method, test_accuracy=c["test_accuracy"], val_accuracy=c["val_accuracy"], alpha=c["alpha"])
    row.update(alpha_scope=c["scope"], kind_alphas=c["kind_alphas"], rule=c["rule"], trusted_per_class=c["per_class"])
    row.update({key: c[key] for key in ("num_trusted", "purity", "noisy_fit", "clean_fit")})
    return row


def finetune_row(base: dict[str, Any], method: str, c: dict, ft: dict) -> dict:
    """The row of a `finetune_grid` on candidate `c`'s trusted samples."""
    row = dict(base, method=method, test_accuracy=ft["test_accuracy"], val_accuracy=ft["val_accuracy"], lr=ft["lr"])
    row.update(ft_epochs=ft["epochs"], rule=c["rule"], trusted_per_class=c["per_class"])
    row.update(num_trusted=c["num_trusted"], purity=c["purity"])
    return row


def trained_rows(base: dict[str, Any], names: tuple[str, str], run: dict[str, Any], args: argparse.Namespace) -> list:
    """The rows of the trained model (its final state) and of its best-val checkpoint."""
    data, model, early_model, best = run["data"], run["model"], run["early_model"], run["trained"]["best"]
    final = dict(base, method=names[0], test_accuracy=on_test(model, data), val_accuracy=on_val(model, data))
    final.update(train_noisy_accuracy=accuracy(model, data["train_x"], data["train_y"]), epochs=args.epochs)
    early = dict(base, method=names[1], test_accuracy=on_test(early_model, data), val_accuracy=best["val_accuracy"])
    early["epoch"] = best["epoch"]
    return [{**final, **fit_diagnostics(model, data)}, {**early, **fit_diagnostics(early_model, data)}]


def run_record(run: dict[str, Any], identity: dict[str, Any], rows: list, candidates: list, **extra: Any) -> dict:
    """The `run` entry of a trained model's result: its training, its candidates (without indices and states)."""
    trained = run["trained"]
    return {
        **identity,
        "train_noisy_accuracy": rows[0]["train_noisy_accuracy"],
        "train_seconds": trained["seconds"],
        "best_epoch": trained["best"]["epoch"],
        "val_history": trained["history"],
        "candidates": [{k: v for k, v in c.items() if k not in ("indices", "state")} for c in candidates],
        **extra,
        "seconds": time.perf_counter() - run["started"],
        "timing": run["timing"],
    }


# ---- The row groups of one (setting, seed), each in a worker process ----


def run_ce(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The 'ce' group: the memorised model, its best epoch, SAP on every trusted set, fine-tuning on the trusted
    samples, and SAP followed by fine-tuning or by `sap_refine_row`."""
    run = prepare_run(setting, seed, args)
    data, model, timing = run["data"], run["model"], run["timing"]
    clock = time.perf_counter()
    final_state = copy.deepcopy(model.state_dict())
    base = {"setting": setting, "seed": seed}
    rows = trained_rows(base, ("none", "best_epoch"), run, args)
    timing["baselines"] = time.perf_counter() - clock
    timing["sap_test_curves"], timing["finetune"] = 0.0, {}
    candidates = sap_candidates(run, final_state, args)
    model.load_state_dict(final_state)
    usable = [c for c in candidates if "error" not in c]
    shared = [c for c in usable if c["scope"] == "shared"]
    chosen = val_best(usable)
    if seed == args.plot_seed:
        clock = time.perf_counter()
        add_test_curves(run, final_state, shared, chosen, args)
        timing["sap_test_curves"] = time.perf_counter() - clock

    def trusted_xy(c: dict) -> tuple[Any, Any]:
        index = as_index(c["indices"])
        return data["train_x"][index], data["train_y"][index]

    finetunes: dict[str, tuple[dict, dict]] = {}  # trusted set -> (its first candidate, the fine-tuning grid)
    for c in usable:
        name = trusted_name(c)
        if name not in finetunes:
            clock = time.perf_counter()
            finetunes[name] = (c, finetune_grid(model, final_state, *trusted_xy(c), data, args, seed))
            timing["finetune"][name] = time.perf_counter() - clock
            rows.append(finetune_row(base, f"finetune_trusted[{name}]", c, finetunes[name][1]))
        rows.append(sap_row(base, candidate_method("sap", c), c))
    if chosen is not None:
        rows.append(sap_row(base, "sap", chosen))
        if shared and "per_kind" in args.alpha_scopes:
            rows.append(sap_row(base, "sap_shared", val_best(shared)))
        rows.append(finetune_row(base, "finetune_trusted", chosen, finetunes[trusted_name(chosen)][1]))
        # SAP, then the same fine-tuning grid on the same trusted samples (a composition, not a baseline).
        sap_ft = finetune_grid(model, chosen["state"], *trusted_xy(chosen), data, args, seed)
        rows.append(finetune_row(base, "sap+finetune", chosen, sap_ft))
        clock = time.perf_counter()
        rows.append(sap_refine_row(model, chosen["state"], sap_row(base, "sap", chosen), run, args))
        timing["sap+refine"] = time.perf_counter() - clock
        model.load_state_dict(final_state)
        best_c, best_ft = max(finetunes.values(), key=lambda pair: pair[1]["val_accuracy"])
        rows.append(finetune_row(base, "finetune_trusted_best", best_c, best_ft))
    none_test = rows[0]["test_accuracy"]
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
    noise = {"noise_type": run["noise_type"], "noise_rate": run["noise_rate"]}
    noise["actual_noise_rate"] = float(data["is_noisy"].float().mean())
    grids = {name: ft["grid"] for name, (_, ft) in finetunes.items()}
    record = run_record(run, {**base, **noise}, rows, candidates, finetune_grids=grids)
    return {"setting": setting, "seed": seed, "group": "ce", "rows": rows, "run": record}


def add_test_curves(
    run: dict[str, Any], final_state: dict, shared: list[dict], chosen: dict | None, args: argparse.Namespace
) -> None:
    """`test_curve`: the test accuracy at every alpha of the paper's rule ('loss') and of the val-chosen trusted set,
    shared alpha. For the alpha figure only: nothing is chosen from these numbers."""
    from sap_hf.core.projection import current_weights, plan_projection, write_weights
    from sap_hf.core.search import eigenbases
    from sap_hf.core.stats import collect_statistics
    from sap_hf.core.targets import find_target_modules

    model = run["model"]
    paper = next((c for c in shared if c["rule"] == "loss"), None)
    same_set = next((c for c in shared if chosen and trusted_name(c) == trusted_name(chosen)), None)
    for c in {id(c): c for c in (paper, same_set) if c is not None}.values():
        model.load_state_dict(final_state)
        targets = find_target_modules(model, None, None, True)
        trusted = run["train_set"].select(c["indices"])
        stats = collect_statistics(model, trusted, targets, runtime=Runtime(batch_size=500, show_progress=False))
        bases, originals = eigenbases(stats), current_weights(model, stats.target_modules)
        c["test_curve"] = []
        for alpha in args.alphas:
            write_weights(model, plan_projection(originals, stats.groups, bases, alpha))
            c["test_curve"].append(round(on_test(model, run["data"]), 4))
    model.load_state_dict(final_state)


def robust_loss(name: str) -> tuple[Any, str, dict[str, Any]]:
    """The `BatchLoss` of `robust_<name>`, its model-cache tag and its parameters.

    GCE and SCE come from `sap_hf.losses` (what `Trainer(compute_loss_func=...)` gets); label
    smoothing is transformers' own `LabelSmoother` (what `TrainingArguments.label_smoothing_factor` uses).
    """
    if name == "ls":
        from transformers.trainer_pt_utils import LabelSmoother

        smoother = LabelSmoother(epsilon=LABEL_SMOOTHING)
        params: dict[str, Any] = {"loss": "ce", "label_smoothing_factor": LABEL_SMOOTHING}
        loss = lambda logits, labels: smoother({"logits": logits}, labels)
    else:
        from sap_hf.losses import LossConfig, RobustLoss

        config = LossConfig(loss=name)
        params, loss = {"loss": name, **config.parameters()}, RobustLoss(config)

    def loss_fn(logits: Any, labels: Any, *, indices: Any = None, epoch: int = 0) -> Any:
        return loss(logits, labels)

    tag = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return loss_fn, tag, params


def run_robust(setting: str, seed: int, args: argparse.Namespace, loss: str) -> dict[str, Any]:
    """The `robust_<loss>` group: the same schedule trained with that loss, its best epoch, and SAP on it by exactly
    `sap`'s protocol (`sap_candidates`). `gain_vs_none` is against the cross-entropy model (`none`), `gain_vs_base`
    against the robust model itself (what SAP adds on top of the loss)."""
    loss_fn, tag, params = robust_loss(loss)
    reference = prepare_run(setting, seed, args)  # the cross-entropy model (cached): `none`
    none_test = on_test(reference["model"], reference["data"])
    del reference
    run = prepare_run(setting, seed, args, loss_fn=loss_fn, cache_tag=tag)
    model = run["model"]
    final_state = copy.deepcopy(model.state_dict())
    name = f"robust_{loss}"
    base = {"setting": setting, "seed": seed, "loss": loss, "loss_params": params}
    rows = trained_rows(base, (name, f"{name}_best_epoch"), run, args)
    candidates = sap_candidates(run, final_state, args)
    model.load_state_dict(final_state)
    usable = [c for c in candidates if "error" not in c]
    rows += [sap_row(base, candidate_method(f"{name}+sap", c), c) for c in usable]
    if usable:
        rows.append(sap_row(base, f"{name}+sap", val_best(usable)))
    base_test = rows[0]["test_accuracy"]
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
        row["gain_vs_base"] = row["test_accuracy"] - base_test
    identity = {"setting": setting, "seed": seed, "loss": loss, "loss_params": params, "cache_tag": tag}
    record = run_record(run, identity, rows, candidates)
    return {"setting": setting, "seed": seed, "group": f"robust_{loss}", "loss": loss, "rows": rows, "run": record}


def recorded_rows(setting: str, seed: int, args: argparse.Namespace, group: str) -> dict[str, dict]:
    """The rows of <out_dir>/accuracy.json for (setting, seed) by method (peers' rows aside); `sap` and `none` must be
    there (the 'ce' group computed first)."""
    path = Path(args.out_dir) / "accuracy.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = [r for r in rows if (r["setting"], r["seed"]) == (setting, seed)]
    by_method = {r["method"]: r for r in mine if "forget_set" not in r}
    missing = [m for m in ("sap", "none") if m not in by_method]
    if missing:
        raise SystemExit(
            f"--methods {group} needs the recorded {missing} rows of {setting} seed {seed}, which {path} "
            "does not hold: compute the 'ce' group first."
        )
    return by_method


def rebuild_sap(run: dict[str, Any], sap: dict[str, Any]) -> dict:
    """The state of `sap`'s model from its recorded choice (trusted rule/k, alpha or per-kind alphas).

    Selection and projection are deterministic, so this is the model the full run measured (no 20-minute rerun to
    add one row); its val accuracy is checked against the recorded one. The run's model is left as it was.
    """
    from sap_hf import SAPConfig, sap_project

    model, data = run["model"], run["data"]
    state = copy.deepcopy(model.state_dict())
    alpha = sap["kind_alphas"] if sap.get("alpha_scope") == "per_kind" else sap["alpha"]
    unchanged = alpha is None or (isinstance(alpha, dict) and all(a is None for a in alpha.values()))
    if not unchanged:
        selection = select(run, sap["rule"], sap["trusted_per_class"])
        trusted = run["train_set"].select(selection.indices)
        sap_project(model, trusted, alpha=alpha, config=SAPConfig(batch_size=500))
    val = on_val(model, data)
    if abs(val - sap["val_accuracy"]) > 1e-6:
        raise RuntimeError(
            f"Rebuilt 'sap' model of {sap['setting']} seed {sap['seed']} has val accuracy {val:.4f}, the "
            f"recorded one {sap['val_accuracy']:.4f}: the cached models differ from the recorded run; rerun in full."
        )
    sap_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return sap_state


def run_sap_refine(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `sap+refine` group alone: `sap` rebuilt from its recorded row, then `sap_refine_row`."""
    recorded = recorded_rows(setting, seed, args, "sap+refine")
    run = prepare_run(setting, seed, args)
    row = sap_refine_row(run["model"], rebuild_sap(run, recorded["sap"]), recorded["sap"], run, args)
    row["gain_vs_none"] = row["test_accuracy"] - recorded["none"]["test_accuracy"]
    record = {"seconds": time.perf_counter() - run["started"]}
    return {"setting": setting, "seed": seed, "group": "sap+refine", "rows": [row], "run": record}


def run_peers(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `peers` group: SSD and SCRUB (`peers.peer_rows`) on the memorised model of (setting, seed).

    Suspects: the label audit of `sap`'s model (rebuilt from its recorded choice), as `sap+refine` audits, most
    suspicious first. Trusted: the recipe's rule and per-class count (`common.recipe_sap_config()`).
    """
    from sap_hf import audit_labels

    recorded = recorded_rows(setting, seed, args, "peers")
    run = prepare_run(setting, seed, args)
    model, data = run["model"], run["data"]
    final_state = copy.deepcopy(model.state_dict())
    clock = time.perf_counter()
    model.load_state_dict(rebuild_sap(run, recorded["sap"]))
    runtime = Runtime(batch_size=1000, show_progress=False)
    suspects = audit_labels(model, run["train_set"], views=args.refine_views, runtime=runtime).suspected_indices()
    model.load_state_dict(final_state)
    recipe = common.recipe_sap_config()
    selection = select(run, recipe.selection_rule, recipe.trusted_per_class)
    inputs_seconds = time.perf_counter() - clock
    rows = peer_rows(model, data, trusted_indices=selection.indices, suspects=suspects, args=args, seed=seed)
    trusted_purity = purity(data, selection.indices)
    for row in rows:
        row.update(
            setting=setting,
            seed=seed,
            gain_vs_none=row["test_accuracy"] - recorded["none"]["test_accuracy"],
            trusted_rule=recipe.selection_rule,
            trusted_per_class=recipe.trusted_per_class,
            trusted_purity=trusted_purity,
            audit_suspected=len(suspects),
        )
    record = {
        "seconds": time.perf_counter() - run["started"],
        "inputs_seconds": inputs_seconds,
        "peers_seconds": time.perf_counter() - clock - inputs_seconds,
    }
    return {"setting": setting, "seed": seed, "group": "peers", "rows": rows, "run": record}


def run_curvature(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The `curvature` group: SAP on the trusted set of rule='curvature' by `sap_candidates`' protocol: rows
    `sap_curvature_<scope>[k]` (compare `sap[shift_loss/k]`) and `sap_curvature` (the val-best of them); and the
    seconds of trusted selection under each of `COST_RULES`, timed one after the other in this process."""
    run = prepare_run(setting, seed, args)
    model = run["model"]
    final_state = copy.deepcopy(model.state_dict())
    none_test = on_test(model, run["data"])
    per_class = args.trusted_per_class[0]
    cost, selections = {}, {}
    for rule in COST_RULES:
        clock = time.perf_counter()
        selections[(rule, per_class)] = select(run, rule, per_class)
        cost[rule] = time.perf_counter() - clock
    curvature_args = copy.copy(args)
    curvature_args.rules = ["curvature"]
    candidates = sap_candidates(run, final_state, curvature_args, selections)
    candidates = [c for c in candidates if "error" not in c]
    base = {"setting": setting, "seed": seed, "group": "curvature", "selection_seconds": cost}
    rows = [sap_row(base, f"sap_curvature_{c['scope']}[{c['per_class']}]", c) for c in candidates]
    if candidates:
        rows.append(sap_row(base, "sap_curvature", val_best(candidates)))
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
    record = {"seconds": time.perf_counter() - run["started"], "selection_seconds": cost}
    return {"setting": setting, "seed": seed, "group": "curvature", "rows": rows, "run": record}


GROUP_RUNS = {"ce": run_ce, "sap+refine": run_sap_refine, "peers": run_peers, "curvature": run_curvature}


def _worker(task: tuple[str, int, argparse.Namespace, str]) -> dict[str, Any]:
    setting, seed, args, group = task
    if group in GROUP_RUNS:
        result = GROUP_RUNS[group](setting, seed, args)
    else:
        result = run_robust(setting, seed, args, group.removeprefix("robust_"))
    fit = result["run"].get("train_noisy_accuracy")
    fitted = f" (train fit on noisy labels {fit:.3f})" if fit is not None else ""
    print(f"[accuracy] {group} {setting} seed {seed} done in {result['run']['seconds']:.0f}s{fitted}", flush=True)
    return result


# ---- Aggregation, tables, plots ----


def _choice(row: dict[str, Any]) -> str:
    """What val chose for a SAP or a peer row, in short."""
    if "forget_set" in row:
        if not row.get("forget_size") or row.get("scrub_epochs") == 0:
            return "unchanged"
        if "lam" in row:
            return f"k={row['forget_size']}/a={row['alpha']:g}/l={row['lam']:g}"
        return f"k={row['forget_size']}/lr={row['lr']:g}/m={row['max_epochs']}x{row['scrub_epochs']}ep"
    text = f"{row.get('rule')}/{row.get('trusted_per_class')}"
    if row.get("kind_alphas"):
        short = {"attention": "att", "mlp": "mlp", "classifier": "cls"}
        alphas = ",".join(f"{short.get(k, k)}={'-' if a is None else f'{a:g}'}" for k, a in row["kind_alphas"].items())
        return f"{text}/{alphas}"
    return text + (f"/a={row['alpha']:g}" if row["alpha"] is not None else "/unchanged")


def _unchanged(row: dict[str, Any]) -> bool:
    """True when the val-chosen SAP candidate left the model as it was ("no change" won on val)."""
    return row.get("alpha") is None and all(a is None for a in (row.get("kind_alphas") or {}).values())


def complete_seeds(rows: list[dict[str, Any]], setting: str, names: tuple[str, ...]) -> dict[int, dict[str, dict]]:
    """{seed: {name: row}} of the setting's rows named in `names` (`report.row_name`), for the seeds that have all."""
    found: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["setting"] == setting and report.row_name(r) in names:
            found.setdefault(r["seed"], {})[report.row_name(r)] = r
    return {seed: found[seed] for seed in sorted(found) if set(names) <= set(found[seed])}


def robust_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting and loss ('ce' = the plain rows): fit of the noisy labels, the trained model, its best epoch,
    SAP on it, SAP's gain over the model (mean, std, per seed) and the seeds where SAP kept the model unchanged."""
    out: dict[str, Any] = {}
    losses = ["ce"] + [loss for loss in ROBUST_LOSSES if any(r.get("loss") == loss for r in rows)]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for loss in losses:
            name = f"robust_{loss}"
            names = ("none", "best_epoch", "sap") if loss == "ce" else (name, f"{name}_best_epoch", f"{name}+sap")
            by_seed = complete_seeds(rows, setting, names)
            if not by_seed:
                continue
            model, best, sap = ([found[n] for found in by_seed.values()] for n in names)
            gains = [s["test_accuracy"] - m["test_accuracy"] for s, m in zip(sap, model)]
            out.setdefault(setting, {})[loss] = {
                "seeds": list(by_seed),
                "train_noisy_accuracy": mean_std([m["train_noisy_accuracy"] for m in model]),
                "noisy_fit": mean_std([m["noisy_fit"] for m in model]),
                "model": mean_std([m["test_accuracy"] for m in model]),
                "best_epoch": mean_std([b["test_accuracy"] for b in best]),
                "sap": mean_std([s["test_accuracy"] for s in sap]),
                "sap_gain": mean_std(gains),
                "sap_gain_per_seed": gains,
                "sap_unchanged_seeds": [seed for seed, s in zip(by_seed, sap) if _unchanged(s)],
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
        by_seed = complete_seeds(rows, setting, PEER_TABLE)
        if not by_seed:
            continue
        seeds = list(by_seed)
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
            met = statistics.fmean(diffs) >= 0
            target = {"ours": ours, "theirs": theirs, "difference": mean_std(diffs), "per_seed": diffs, "met": met}
            entry["targets"].append(target)
        out[setting] = entry
    return out


def _robust_figure(method: str) -> bool:
    return "[" not in method and (method.startswith("robust_") or method in ("none", "sap"))


#: The bar figures: file -> which summary methods each shows.
FIGURES = {
    "accuracy_methods.png": lambda method: method in (*MAIN_METHODS, *EXTRA_METHODS),
    "accuracy_peers.png": lambda method: method in PEER_TABLE,
    "accuracy_robust.png": _robust_figure,
}


def plot(record: dict[str, Any], out_dir: Path) -> list[str]:
    """The bar figures (`FIGURES`) and the alpha figure (one seed per setting), from what accuracy.json holds."""
    rows, runs, summary, config = record["rows"], record["runs"], record["summary"], record["config"]
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    for name, shows in FIGURES.items():
        chosen = {setting: {m: e for m, e in methods.items() if shows(m)} for setting, methods in summary.items()}
        has_robust = any(m.startswith("robust_") for methods in chosen.values() for m in methods)
        if any(len(methods) > 1 for methods in chosen.values()) and (name != "accuracy_robust.png" or has_robust):
            written.append(report.bars(chosen, out_dir / name, "Fashion-MNIST, tiny ViT memorising 40% noise:"))
    shown = [run for run in runs if run["seed"] == config["plot_seed"]]
    if shown:
        figure, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.8), squeeze=False)
        for axis, run in zip(axes[0], shown):
            mine = {r["method"]: r for r in rows if r["setting"] == run["setting"] and r["seed"] == run["seed"]}
            plot_alpha_curves(axis, run, mine, list(config["alphas"]))
        figure.tight_layout()
        path = out_dir / "accuracy_alpha.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(str(path))
    return written


def plot_alpha_curves(axis: Any, run: dict[str, Any], by_method: dict[str, dict], alphas: list[float]) -> None:
    """One (setting, seed): SAP's val (and test) accuracy against alpha per shared-alpha candidate, the baselines."""
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
        label = f"sap: val-chosen per-kind alphas ({_choice(sap)}) (test)"
        axis.axhline(sap["test_accuracy"], color="red", lw=1.2, label=label)
    elif sap is not None and sap["alpha"] is not None:
        label = f"sap: val-chosen ({sap['rule']}/{sap['trusted_per_class']}, alpha={sap['alpha']:g})"
        axis.scatter(
            [sap["alpha"]], [sap["test_accuracy"]], s=140, facecolors="none", edgecolors="red", zorder=5, label=label
        )
    axis.set_xscale("log")
    axis.set_xlabel("alpha")
    axis.set_ylabel("clean accuracy (solid: test, dotted: val)")
    fit = 100 * run["train_noisy_accuracy"]
    title = f"{run['setting']}, seed {run['seed']}: tiny ViT fitting {fit:.1f}% of the noisy training labels"
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=6, loc="lower right")


def replot(out_dir: Path) -> None:
    """Redraw the figures and reprint the tables from an existing accuracy.json (no training)."""
    record = json.loads((out_dir / "accuracy.json").read_text())
    record["peers"] = peers_table(record["rows"])  # recomputed from the rows (the table's columns may have changed)
    with _exclusive(out_dir / ".accuracy.json.lock"):
        stored = json.loads((out_dir / "accuracy.json").read_text())
        if stored.get("peers") != record["peers"] and stored["rows"] == record["rows"]:
            stored["peers"] = record["peers"]
            common.write_json(out_dir / "accuracy.json", stored)
    record["summary"] = report.summarise(record["rows"], ("setting",))
    plot(record, out_dir)
    report.print_tables(out_dir / "accuracy.json")


# ---- Merging into accuracy.json ----


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
    """The arguments of the robust_<loss> rows: seeds, settings and methods are the union over the merged runs."""
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
    results.sort(key=lambda r: (order[r["group"]], args.settings.index(r["setting"]), r["seed"]))
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
    from sap_hf.data.noise import FASHION_MNIST_ASYMMETRIC_MAP

    rows = [row for result in results for row in result["rows"]]
    runs = [result["run"] for result in results if result["group"] == "ce"]
    robust_runs = [result["run"] for result in results if "loss" in result]
    rows, runs, robust_runs = merge(existing, rows, runs, robust_runs)
    summary = report.summarise(rows, ("setting",))
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "merge")}
    settings = dict.fromkeys([*existing.get("settings", {}), *args.settings])
    record = {
        "rows": rows,
        "summary": summary,
        "robust": robust_table(rows),
        "peers": peers_table(rows),
        "runs": runs,
        "robust_runs": robust_runs,
        "settings": {
            name: {"noise_type": t, "noise_rate": r} for name, (t, r) in SETTINGS.items() if name in settings
        },
        "asymmetric_map": {
            "name": "sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP",
            "map": {str(k): v for k, v in FASHION_MNIST_ASYMMETRIC_MAP.items()},
        },
        # The arguments of the last run of each part: the 'ce' rows, the robust rows, sap+refine (its --refine_*
        # arguments) and the peers (with their grids, `peers.peer_settings`, and the scaled oracle sizes).
        "config": config if "ce" in args.methods or "config" not in existing else existing["config"],
        "config_robust": _robust_config(existing.get("config_robust"), config, args),
        "config_refine": config if {"ce", "sap+refine"} & set(args.methods) else existing.get("config_refine"),
        "config_peers": (
            dict(config, grids=peer_settings(args), oracle_sizes=oracle_sizes(args.train_size))
            if "peers" in args.methods
            else existing.get("config_peers")
        ),
        "environment": common.environment(),
        "elapsed_seconds": time.perf_counter() - started,
    }
    # What this run does not recompute (`merged`, older summaries) is kept.
    record.update({key: value for key, value in existing.items() if key not in record})
    if not args.no_plot:
        record["plots"] = [os.path.relpath(p, out_dir) for p in plot(record, out_dir)]
    return record


if __name__ == "__main__":
    main()
