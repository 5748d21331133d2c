"""Trusted selection without a full pass: a random share of the training set, or the losses recorded in training.

    python benchmarks/selection_sources.py            # the accuracy benchmark's 6 memorised models
    python benchmarks/selection_sources.py --quick    # smoke run: tiny data, 3 epochs, one model

Each of the accuracy benchmark's models is trained again with a loss that keeps every example's loss per epoch (the
same model: the gradient is the same mean cross-entropy). The recipe's trusted set is then taken from each source (a
full selection pass, a seeded random share, the recorded losses), and its purity and the SAP result from it are
compared with the full pass's. Protocol and results: benchmarks/studies/cost.md ("Trusted selection sources").

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
    parser.add_argument("--models", nargs="+", metavar="SETTING:SEED", help="only these, e.g. sym40:0 asym40:1")
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
    """The model of (setting, seed) and its per-epoch training losses (trained with `RecordingLoss`, cached in
    `--loss_cache`). Where the accuracy cache holds the same model, that cached model is used, after checking that
    the retrained weights equal it."""
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    torch.set_num_threads(args.threads)
    common.quiet_libraries()
    data = load_run_data(setting, seed, args)
    config = tiny_vit_config(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, patch_size=args.patch_size
    )
    path = cache_path(
        setting, seed, argparse.Namespace(**{**vars(args), "cache_dir": args.loss_cache}), tag="epoch_losses"
    )
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


def timed(select: Any) -> tuple[Any, float]:
    clock = time.perf_counter()
    return select(), time.perf_counter() - clock


def sources(run: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every source's trusted indices (of every draw) and selection seconds, measured side by side in this process:
    `pass`, `subset_<share>` (draws 0.., seeded) and `training_all` / `training_last<k>` (from the recorded losses:
    the selection alone, what `SAPTrainer.correct()` runs)."""
    from sap_hf import Runtime, select_trusted
    from sap_hf.core.selection import select_from_scores

    recipe = recipe_sap_config()
    model, data, losses = run["model"], run["data"], run["losses"]
    train_set = common.TensorExamples(data["train_x"], data["train_y"])
    runtime = Runtime(batch_size=500, show_progress=False)
    per_class, labels, rule = recipe.trusted_per_class, data["train_y"], recipe.selection_rule

    def select(**subset: Any) -> list[int]:
        return select_trusted(model, train_set, per_class, rule=rule, runtime=runtime, **subset).indices

    def from_losses(last: Optional[int]) -> Any:  # the mean loss over the last `last` epochs (None: all)
        mean = losses[-last:].mean(0) if last else losses.mean(0)
        return select_from_scores(list(range(len(labels))), mean.double(), labels, per_class, int(labels.max()) + 1)

    def source(name: str, draws: list, seconds: float, **extra: Any) -> dict[str, Any]:
        return {"source": name, "indices": draws[0], "draws": draws, "seconds": seconds, **extra}

    indices, seconds = timed(select)
    out = [source("pass", [indices], seconds, rule=rule)]
    for share in args.shares:
        draws = [timed(lambda: select(seed=draw, subset=share)) for draw in range(args.draws)]
        seconds = sum(s for _, s in draws) / len(draws)
        out.append(source(f"subset_{share:g}", [d for d, _ in draws], seconds, rule=rule, share=share))

    for name, last in [("training_all", None)] + [(f"training_last{k}", k) for k in args.last_epochs]:
        chosen, seconds = timed(lambda: from_losses(last))
        out.append(source(name, [chosen.indices], seconds, rule="loss", epochs=last or len(losses)))
    return out


def run_one(task: tuple[str, int, argparse.Namespace]) -> list[dict[str, Any]]:
    """One model's rows: each source's purity (mean over draws) and the SAP result from its trusted set (draw 0)."""
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
            float((data["train_y"][d] == data["clean_y"][d]).float().mean()) for d in map(torch.tensor, found["draws"])
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
    full = rows[0]
    for row in rows:
        row.update(
            test_before=before,
            purity_gap_points=round(100 * (full["purity"] - row["purity"]), 2),
            same_choice=row["kind_alphas"] == full["kind_alphas"] and row["alpha"] == full["alpha"],
            test_gap_points=round(100 * (full["test_accuracy"] - row["test_accuracy"]), 2),
            same_as_cached_model=run["same_as_cached_model"],
            train_seconds=round(run["train_seconds"], 1),
        )
    print(
        f"  {setting} seed {seed}: " + ", ".join(f"{r['source']} {100 * r['purity']:.1f}%" for r in rows), flush=True
    )
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per source over the models; the target: purity within 1 point of the full pass and the same alpha choice."""
    summary = {}
    for source in dict.fromkeys(r["source"] for r in rows):
        chosen = [r for r in rows if r["source"] == source]
        mean = lambda key: round(sum(r[key] for r in chosen) / len(chosen), 4)
        summary[source] = {
            "models": len(chosen),
            "purity": mean("purity"),
            "max_purity_gap_points": max(r["purity_gap_points"] for r in chosen),
            "same_choice": sum(r["same_choice"] for r in chosen),
            "test_accuracy": mean("test_accuracy"),
            "max_test_gap_points": max(r["test_gap_points"] for r in chosen),
            "selection_seconds": mean("selection_seconds"),
        }
        met = summary[source]["max_purity_gap_points"] <= 1.0 and summary[source]["same_choice"] == len(chosen)
        summary[source]["meets_target"] = met
    return summary


def plot(record: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    summary = record["summary"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = {
        "purity": ("#4c72b0", "trusted purity (%)", "Purity of the trusted set (mean over models)"),
        "test_accuracy": (
            "#55a868",
            "test accuracy after SAP (%)",
            "SAP result (label: same alpha choice as the full pass)",
        ),
    }
    for ax, (key, (colour, label, title)) in zip(axes, panels.items()):
        values = [100 * summary[n][key] for n in names]
        ax.bar(names, values, color=colour)
        ax.set_ylabel(label)
        ax.set_ylim(min(values) - 5, 100)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    for i, n in enumerate(names):
        same = f"{summary[n]['same_choice']}/{summary[n]['models']}"
        axes[1].text(i, 100 * summary[n]["test_accuracy"] + 0.3, same, ha="center", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models] if args.models else None
    pairs = models or [(setting, seed) for setting in args.settings for seed in args.seeds]
    rows = [row for rows in common.run_tasks(run_one, [(*pair, args) for pair in pairs], args.jobs) for row in rows]
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
    out = Path(args.out_dir) / f"selection_sources{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(out, record)
    if not args.no_plot:
        plot(record, out.with_suffix(".png"))
    print(f"\n{'source':16s} {'purity':>7s} {'gap':>6s} {'same':>5s} {'test':>7s} {'sel. s':>7s}")
    for name, s in record["summary"].items():
        print(
            f"{name:16s} {100 * s['purity']:6.2f}% {s['max_purity_gap_points']:6.2f} {s['same_choice']:>2d}/{s['models']:<2d} "
            f"{100 * s['test_accuracy']:6.2f}% {s['selection_seconds']:7.3f}"
        )
    return record


if __name__ == "__main__":
    main()
