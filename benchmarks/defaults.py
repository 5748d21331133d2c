#!/usr/bin/env python
"""Defaults: what a user who changes nothing gets from `SAPConfig()`, in both regimes.

On the accuracy benchmark's memorised tiny ViTs (`scratch`) and on pretrained.py's fine-tuned models (`pretrained`),
three SAP corrections one after the other from the same trained state, alpha on the clean val split: the paper's
settings (the old defaults), `SAPConfig()` and the recipe's SAP. Protocol and results: benchmarks/studies/defaults.md.

    python benchmarks/defaults.py --scratch_cache /work/cache/accuracy --pretrained_cache /work/cache/pretrained
    python benchmarks/defaults.py --quick        # smoke run: tiny data, one model per regime
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import common
import methods
import pretrained_regime
import report


REGIMES = ("scratch", "pretrained")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one seed, one length")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lengths", nargs="+", type=int, default=[20, 40], help="pretrained: fine-tuning epochs")
    parser.add_argument(
        "--scratch_cache",
        default=None,
        help="the from-scratch models' cache (`common.prepare_run`; cleanup.py --cache_dir fills one)",
    )
    parser.add_argument("--pretrained_cache", default=None, help="pretrained.py's model cache")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.lengths, args.jobs = [0], [2], 1
    return args


def regime_args(regime: str, args: argparse.Namespace) -> argparse.Namespace:
    """The regime's data, training and cache arguments, as the from-scratch and pretrained studies parse them (their study's
    own flags aside): the shared ones of `common.run_parser`, plus `pretrained_regime`'s for the pretrained one."""
    cache = args.scratch_cache if regime == "scratch" else args.pretrained_cache
    argv = ["--threads", str(args.threads), "--out_dir", str(args.out_dir)]
    argv += ["--cache_dir", cache] if cache else []
    argv += ["--quick"] if args.quick else []
    parser = common.run_parser(f"the {regime} regime's models")
    if regime == "pretrained":
        pretrained_regime.add_regime_arguments(parser)
    parsed = common.finish_args(parser.parse_args(argv), argv)
    return pretrained_regime.finish_regime_args(parsed) if regime == "pretrained" else parsed


def tasks(args: argparse.Namespace) -> list[tuple[str, str, int, int, argparse.Namespace]]:
    out = []
    if "scratch" in args.regimes:
        scratch = regime_args("scratch", args)
        out += [("scratch", s, seed, scratch.epochs, scratch) for s in common.SETTINGS for seed in args.seeds]
    if "pretrained" in args.regimes:
        tuned = regime_args("pretrained", args)
        pretrained_regime.pretrain(tuned)  # the backbone, once, before any worker fine-tunes from it
        noises = pretrained_regime.NOISES
        out += [("pretrained", n, seed, e, tuned) for n in noises for seed in args.seeds for e in args.lengths]
    return out


def configs() -> dict[str, Any]:
    from sap_hf import SAPConfig

    return {
        "paper": SAPConfig(**common.PAPER_SAP, batch_size=500),
        "defaults": SAPConfig(batch_size=500),
        "recipe": common.recipe_sap_config(batch_size=500),
    }


def _worker(task: tuple[str, str, int, int, argparse.Namespace]) -> list[dict[str, Any]]:
    """Every config's row on one model (and the model's own `none` row)."""
    import torch

    regime, noise, seed, epochs, args = task
    torch.set_num_threads(args.threads)
    common.quiet_libraries()
    if regime == "scratch":
        run = common.prepare_run(noise, seed, args)
    else:
        run = pretrained_regime.finetuned(noise, seed, epochs, args)
    data, model = run["data"], run["model"]
    state = copy.deepcopy(model.state_dict())
    base = {"regime": regime, "noise": noise, "seed": seed, "epochs": epochs}
    test = common.accuracy(model, data["test_x"], data["test_y"])
    val = common.accuracy(model, data["val_x"], data["val_y"])
    rows = [dict(base, config="none", test_accuracy=test, val_accuracy=val, **common.fit_diagnostics(model, data))]
    trusted = {}
    for name, config in configs().items():
        out = methods.sap_row(model, state, data, config, name, audit=False)
        rows.append(dict(base, **out["row"], config=name, accumulation_dtype=config.accumulation_dtype))
        trusted[name] = out["trusted"].tolist()
    # same_choice: SAPConfig() wrote the same alphas, from the same trusted samples, as the recipe
    by = {r["config"]: r for r in rows}
    defaults, recipe = by["defaults"], by["recipe"]
    same_alphas = (defaults["kind_alphas"], defaults["alpha"]) == (recipe["kind_alphas"], recipe["alpha"])
    defaults["same_choice"] = same_alphas and trusted["defaults"] == trusted["recipe"]
    accuracies = " ".join(f"{r['config']}={100 * r['test_accuracy']:.1f}" for r in rows)
    print(f"[defaults] {regime} {noise} seed {seed} {epochs} ep: {accuracies}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "defaults_quick" if args.quick else "defaults"
    started = time.perf_counter()
    rows = [row for result in common.run_tasks(_worker, tasks(args), args.jobs) for row in result]
    summary = report.summarise(rows, ("regime", "noise", "epochs"), key="config", flat=True)
    record = {
        "rows": rows,
        "summary": summary,
        "configs": {k: v.to_dict() for k, v in configs().items()},
        "seconds": time.perf_counter() - started,
        "environment": common.environment(),
    }
    figure = report.bars(summary, out_dir / f"{name}.png", "SAP configs:")
    record["figures"] = [figure] if figure else []
    common.write_json(out_dir / f"{name}.json", record)
    report.print_tables(out_dir / f"{name}.json", "defaults.json")
    same = sum(bool(row.get("same_choice")) for row in rows)
    models = sum(r["config"] == "defaults" for r in rows)
    print(f"SAPConfig() chose what the recipe chose on {same} of {models} models")
    return record


if __name__ == "__main__":
    main()
