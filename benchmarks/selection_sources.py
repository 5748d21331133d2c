"""Trusted selection without a full pass: a random share of the training set, or the losses recorded in training.

    python benchmarks/selection_sources.py            # the accuracy benchmark's 6 memorised models
    python benchmarks/selection_sources.py --quick    # smoke run: tiny data, 3 epochs, one model

Protocol
  Models: the accuracy benchmark's (`common.prepare_run` arguments, default training: tiny ViT, 4,000
  noisy Fashion-MNIST images, 100 epochs, memorises the noise), sym40/asym40 x seeds 0-2. Per-epoch
  training losses are not in that cache, so each model is trained again here with a recording loss
  (`RecordingLoss`: the same mean cross-entropy for the gradient, so the same model; the per-example
  losses are taken from the same logits under no_grad) and the losses are kept in `--loss_cache`
  (default /work/cache/selection_sources). Where the accuracy cache (`--cache_dir`) holds the model,
  the retrained final weights are compared with it (`same_as_cached_model`) and the cached model is used.

  Sources, each giving the recipe's trusted set (recipes/configs/default.yaml: 10 per class):
    pass            select_trusted with the recipe's rule (shift_loss) over the whole training set (today)
    subset_<share>  the same rule over a seeded random share (SAPConfig.selection_subset), draws 0-2
                    (purity: mean over draws; SAP: draw 0)
    training_all    SAPTrainer's trusted_source='training' default: each example's cross-entropy averaged
                    over every epoch of training, lowest per class (`select_from_scores`, the library's code)
    training_last<k> the same over the last k epochs only (SAPConfig.training_loss_epochs=k)
  Purity: share of trusted samples whose noisy label equals the hidden clean label. SAP result:
  `sap_correct` with the recipe's SAP settings (per-kind alphas, 11-point grid, bracket search,
  float64 statistics) from those trusted indices, alpha chosen on the clean val set; test accuracy after.
  `same_choice`: the written alphas (kind_alphas) equal the full pass's. Selection seconds are measured
  side by side in one process (the training sources: the selection from the recorded losses alone).

Writes benchmarks/results/selection_sources.json and selection_sources.png (`--quick`: *_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import accuracy, cache_path, load_run_data, recipe_sap_config, train_from_scratch


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.5, 0.25, 0.1], help="selection_subset shares")
    parser.add_argument("--draws", type=int, default=3, help="random draws per share (purity averaged over them)")
    parser.add_argument("--last_epochs", nargs="+", type=int, default=[1, 10], help="training_loss_epochs windows")
    parser.add_argument("--loss_cache", default="/work/cache/selection_sources")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="SETTING:SEED",
        help="only these (setting, seed) models, e.g. sym40:0 asym40:1 (default: --settings x --seeds)",
    )
    parser.set_defaults(cache_dir="/work/cache/accuracy", jobs=1)
    argv = sys.argv[1:] if argv is None else argv
    args = common.finish_args(parser.parse_args(argv), argv)
    if args.quick:
        args.shares, args.draws, args.last_epochs = [0.5], 1, [1]
        args.settings = args.settings if "--settings" in argv else ["sym40"]
        if "--loss_cache" not in argv:
            args.loss_cache = tempfile.mkdtemp(prefix="selection_sources_")
        if "--cache_dir" not in argv:
            args.cache_dir = None
    return args


class RecordingLoss:
    """`common.cross_entropy` for the gradient (so training is unchanged) + each example's loss per epoch, kept."""

    def __init__(self, size: int, epochs: int):
        import torch

        self.losses = torch.full((epochs, size), float("nan"))

    def __call__(self, logits: Any, labels: Any, *, indices: Any, epoch: int) -> Any:
        import torch
        import torch.nn.functional as F

        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            self.losses[epoch - 1, indices] = F.cross_entropy(logits.detach(), labels, reduction="none")
        return loss


def recorded_run(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The model of (setting, seed) and its per-epoch training losses (trained with `RecordingLoss`, cached)."""
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    torch.set_num_threads(args.threads)
    common.quiet_libraries()
    data = load_run_data(setting, seed, args)
    config = tiny_vit_config(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, patch_size=args.patch_size
    )
    record_args = argparse.Namespace(**{**vars(args), "cache_dir": args.loss_cache})
    path = cache_path(setting, seed, record_args, tag="epoch_losses")
    if path.exists():
        saved = torch.load(path, weights_only=False)
    else:
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
        recorder = RecordingLoss(len(data["train_y"]), args.epochs)
        trained = train_from_scratch(model, data, args, seed, loss_fn=recorder)
        saved = {"losses": recorder.losses, "final_state": model.state_dict(), "seconds": trained["seconds"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    model = ViTForImageClassification(config)
    model.load_state_dict(saved["final_state"])
    cached = cache_path(setting, seed, args) if args.cache_dir else None
    same = None
    if cached is not None and cached.exists():
        state = torch.load(cached, weights_only=False)["final_state"]
        same = all(torch.equal(state[k], v) for k, v in saved["final_state"].items())
        model.load_state_dict(state)  # the accuracy benchmark's model itself
    return {
        "data": data,
        "model": model,
        "losses": saved["losses"],
        "same_as_cached_model": same,
        "train_seconds": saved["seconds"],
    }


def sources(run: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every source's trusted indices (and selection seconds); see the module docstring."""

    from sap_hf import select_trusted
    from sap_hf.core.selection import select_from_scores
    from sap_hf.runtime.passes import Runtime

    recipe = recipe_sap_config()
    model, data, losses = run["model"], run["data"], run["losses"]
    train_set = common.TensorExamples(data["train_x"], data["train_y"])
    runtime = Runtime(batch_size=500, show_progress=False)
    per_class, labels = recipe.trusted_per_class, data["train_y"]
    out = []

    def add(name: str, draws: list, seconds: float, **extra: Any) -> None:
        out.append({"source": name, "indices": draws[0], "draws": draws, "seconds": seconds, **extra})

    clock = time.perf_counter()
    full = select_trusted(model, train_set, per_class, rule=recipe.selection_rule, runtime=runtime)
    add("pass", [full.indices], time.perf_counter() - clock, rule=recipe.selection_rule)
    for share in args.shares:
        draws, seconds = [], []
        for draw in range(args.draws):
            clock = time.perf_counter()
            draws.append(
                select_trusted(
                    model, train_set, per_class, rule=recipe.selection_rule, runtime=runtime, seed=draw, subset=share
                ).indices
            )
            seconds.append(time.perf_counter() - clock)
        add(f"subset_{share:g}", draws, sum(seconds) / len(seconds), rule=recipe.selection_rule, share=share)
    windows = [("training_all", None)] + [(f"training_last{k}", k) for k in args.last_epochs]
    for name, last in windows:
        clock = time.perf_counter()
        mean = losses[-last:].mean(0) if last else losses.mean(0)
        chosen = select_from_scores(list(range(len(labels))), mean.double(), labels, per_class, int(labels.max()) + 1)
        add(name, [chosen.indices], time.perf_counter() - clock, rule="loss", epochs=last or len(losses))
    return out


def run_one(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    import torch

    from sap_hf import Runtime, sap_correct

    setting, seed, args = task
    run = recorded_run(setting, seed, args)
    model, data = run["model"], run["data"]
    state = copy.deepcopy(model.state_dict())
    train_set = common.TensorExamples(data["train_x"], data["train_y"])
    recipe = recipe_sap_config(batch_size=500)
    rows = []
    for found in sources(run, args):
        purities = [
            float((data["train_y"][torch.tensor(d)] == data["clean_y"][torch.tensor(d)]).float().mean())
            for d in found["draws"]
        ]
        model.load_state_dict(state)
        result = sap_correct(
            model,
            train_set,
            config=recipe,
            trusted_indices=found["indices"],
            evaluate_fn=lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])},
            runtime=Runtime(show_progress=False),
        )
        rows.append(
            {
                "setting": setting,
                "seed": seed,
                "source": found["source"],
                "rule": found["rule"],
                **{k: found[k] for k in ("share", "epochs") if k in found},
                "selection_seconds": round(found["seconds"], 4),
                "purity": sum(purities) / len(purities),
                "purity_draws": purities,
                "num_trusted": len(found["indices"]),
                "alpha": result.alpha,
                "kind_alphas": result.kind_alphas,
                "val_accuracy": result.final_metrics["accuracy"],
                "test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
            }
        )
    model.load_state_dict(state)
    before = accuracy(model, data["test_x"], data["test_y"])
    pass_row = rows[0]
    for row in rows:
        row.update(
            test_before=before,
            purity_gap_points=round(100 * (pass_row["purity"] - row["purity"]), 2),
            same_choice=row["kind_alphas"] == pass_row["kind_alphas"] and row["alpha"] == pass_row["alpha"],
            test_gap_points=round(100 * (pass_row["test_accuracy"] - row["test_accuracy"]), 2),
            same_as_cached_model=run["same_as_cached_model"],
            train_seconds=round(run["train_seconds"], 1),
        )
    print(
        f"  {setting} seed {seed}: " + ", ".join(f"{r['source']} {100 * r['purity']:.1f}%" for r in rows), flush=True
    )
    return {"rows": rows}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    for source in dict.fromkeys(r["source"] for r in rows):
        chosen = [r for r in rows if r["source"] == source]
        summary[source] = {
            "models": len(chosen),
            "purity": round(sum(r["purity"] for r in chosen) / len(chosen), 4),
            "max_purity_gap_points": max(r["purity_gap_points"] for r in chosen),
            "same_choice": sum(r["same_choice"] for r in chosen),
            "test_accuracy": round(sum(r["test_accuracy"] for r in chosen) / len(chosen), 4),
            "max_test_gap_points": max(r["test_gap_points"] for r in chosen),
            "selection_seconds": round(sum(r["selection_seconds"] for r in chosen) / len(chosen), 4),
        }
        summary[source]["meets_target"] = summary[source]["max_purity_gap_points"] <= 1.0 and summary[source][
            "same_choice"
        ] == len(chosen)
    return summary


def plot(record: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    summary = record["summary"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [100 * summary[n]["purity"] for n in names], color="#4c72b0")
    axes[0].set_ylabel("trusted purity (%)")
    axes[0].set_ylim(min(100 * summary[n]["purity"] for n in names) - 5, 100)
    axes[0].set_title("Purity of the trusted set (mean over models)")
    axes[1].bar(names, [100 * summary[n]["test_accuracy"] for n in names], color="#55a868")
    for i, n in enumerate(names):
        axes[1].text(
            i,
            100 * summary[n]["test_accuracy"] + 0.3,
            f"{summary[n]['same_choice']}/{summary[n]['models']}",
            ha="center",
            fontsize=8,
        )
    axes[1].set_ylabel("test accuracy after SAP (%)")
    axes[1].set_ylim(min(100 * summary[n]["test_accuracy"] for n in names) - 5, 100)
    axes[1].set_title("SAP result (label: same alpha choice as the full pass)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    pairs = (
        [(m.split(":")[0], int(m.split(":")[1])) for m in args.models]
        if args.models
        else [(setting, seed) for setting in args.settings for seed in args.seeds]
    )
    tasks = [(setting, seed, args) for setting, seed in pairs]
    rows = [row for result in common.run_tasks(run_one, tasks, args.jobs) for row in result["rows"]]
    record = {
        "rows": rows,
        "summary": summarise(rows),
        "recipe": recipe_sap_config().to_dict(),
        "train_size": args.train_size,
        "classes": 10,
        "shares": args.shares,
        "draws": args.draws,
        "last_epochs": args.last_epochs,
        "environment": dict(common.environment(), loadavg=common.loadavg()),
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    common.write_json(out / f"selection_sources{suffix}.json", record)
    if not args.no_plot:
        plot(record, out / f"selection_sources{suffix}.png")
    print(f"\n{'source':16s} {'purity':>7s} {'gap':>6s} {'same':>5s} {'test':>7s} {'sel. s':>7s}")
    for name, s in record["summary"].items():
        print(
            f"{name:16s} {100 * s['purity']:6.2f}% {s['max_purity_gap_points']:6.2f} {s['same_choice']:>2d}/{s['models']:<2d} "
            f"{100 * s['test_accuracy']:6.2f}% {s['selection_seconds']:7.3f}"
        )
    return record


if __name__ == "__main__":
    main()
