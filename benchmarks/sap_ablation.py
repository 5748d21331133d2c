#!/usr/bin/env python
"""Why SAP gains what it gains: which layers, which alpha per layer kind, which trusted samples.

On the memorised tiny ViTs of `accuracy.py` (same data and training; `--cache_dir` shares the trained models), the
paper's projection is varied one choice at a time: the projected layers (`LAYER_VARIANTS`), one alpha per layer kind,
where the statistics come from (random, clean or only mislabelled samples: diagnostics built with the hidden clean
labels), and fine-tuning on the trusted set with and without SAP before it. Every alpha is chosen on the clean
validation split, the clean test split only reports. Variants and results: benchmarks/studies/accuracy.md
("Ablation: which layers, which samples").

Run: python benchmarks/sap_ablation.py --cache_dir ~/.cache/sap_hf_bench   (2 settings x 3 seeds)
     python benchmarks/sap_ablation.py --quick                              (smoke run, < 1 min)
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import common
import report
from common import RULES, accuracy, finetune_grid, prepare_run

from sap_hf.runtime.passes import Runtime


LAYER_VARIANTS: dict[str, tuple[str, ...]] = {
    "all": ("attention", "fc1", "fc2", "head"),
    "no_head": ("attention", "fc1", "fc2"),
    "attention": ("attention",),
    "mlp": ("fc1", "fc2"),
    "no_fc2": ("attention", "fc1", "head"),
}
SAMPLE_VARIANTS = ("random", "clean", "mislabelled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.run_parser(__doc__.split("\n\n")[0])
    recipe = common.recipe_sap_config()  # recipes/configs/default.yaml: the trusted set of the recipe
    parser.add_argument("--rule", default=recipe.selection_rule, choices=list(RULES))
    parser.add_argument("--per_class", type=int, default=recipe.trusted_per_class)
    args = common.finish_args(parser.parse_args(argv), argv)
    if args.quick:
        args.per_class = 3
    return args


def layer_kind(name: str, head: str) -> str:
    """'head', 'attention', 'fc1' or 'fc2': the library's layer kinds with the MLP split in its two layers."""
    from sap_hf.core.targets import layer_kind as library_kind

    kind = library_kind(name, [head])
    if kind == "classifier":
        return "head"
    if kind == "attention":
        return kind
    return "fc1" if ".intermediate." in name or name.endswith(("fc1", "mlp.0")) else "fc2"


class Projector:
    """Statistics of one trusted set, and new weights for any (layer kind -> alpha) choice."""

    def __init__(self, model: Any, examples: Any, head: str):
        from sap_hf.core.projection import current_weights
        from sap_hf.core.search import eigenbases
        from sap_hf.core.stats import collect_statistics
        from sap_hf.core.targets import find_target_modules

        targets = find_target_modules(model, None, None, True)
        self.stats = collect_statistics(model, examples, targets, runtime=Runtime(batch_size=500, show_progress=False))
        self.bases = eigenbases(self.stats)
        self.originals = current_weights(model, self.stats.target_modules)
        self.kind = {g.name: layer_kind(g.name, head) for g in self.stats.groups}

    def weights(self, alphas: Mapping[str, float | None]) -> dict[str, Any]:
        """New weights with `alphas[kind]` per layer kind; a kind absent or None keeps its original weights."""
        from sap_hf.core.projection import plan_projection

        new = dict(self.originals)
        for kind in ("attention", "fc1", "fc2", "head"):
            alpha = alphas.get(kind)
            groups = [g for g in self.stats.groups if self.kind[g.name] == kind]
            if alpha is not None and groups:
                new.update(plan_projection(self.originals, groups, self.bases, alpha))
        return new


def best_on_val(
    model: Any, projector: Projector, choices: Sequence[Mapping[str, float | None]], data: Mapping[str, Any]
) -> tuple[Mapping[str, float | None], float]:
    """The choice with the best val accuracy ("unchanged" = `{}` is always a candidate, ties to earlier)."""
    from sap_hf.core.projection import write_weights

    best, best_val = {}, accuracy(model, data["val_x"], data["val_y"])
    try:
        for choice in choices:
            write_weights(model, projector.weights(choice))
            val = accuracy(model, data["val_x"], data["val_y"])
            if val > best_val:
                best, best_val = choice, val
    finally:
        write_weights(model, projector.originals)
    return best, best_val


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sap_hf import select_trusted
    from sap_hf.core.projection import write_weights
    from sap_hf.core.targets import find_target_modules

    run = prepare_run(setting, seed, args)
    data, train_set, model = run["data"], run["train_set"], run["model"]
    num_labels = run["config"].num_labels
    final_state = copy.deepcopy(model.state_dict())
    head = next(n for n in find_target_modules(model, None, None, True) if n.startswith("classifier"))
    base = {"setting": setting, "seed": seed}
    none_val = accuracy(model, data["val_x"], data["val_y"])
    none_test = accuracy(model, data["test_x"], data["test_y"])
    rows = [dict(base, variant="none", alpha=None, val_accuracy=none_val, test_accuracy=none_test)]
    train_fit = accuracy(model, data["train_x"], data["train_y"])  # the memorised model's fit of the noisy labels

    def purity_of(indices: Any) -> float:  # hidden clean labels: reported, never used to choose
        return float((data["train_y"][indices] == data["clean_y"][indices]).float().mean())

    def add(variant: str, projector: Projector, choices: list[dict[str, float | None]], purity: float) -> None:
        """The val-best of `choices` (`best_on_val`) as the row `variant`, its test accuracy measured."""
        choice, val = best_on_val(model, projector, choices, data)
        write_weights(model, projector.weights(choice))
        row = dict(base, variant=variant, alpha=dict(choice) or None, val_accuracy=val)
        row.update(test_accuracy=accuracy(model, data["test_x"], data["test_y"]), purity=purity)
        rows.append(row)
        write_weights(model, projector.originals)

    early = run["early_model"] if args.rule == "early_loss" else None
    runtime = Runtime(batch_size=500, show_progress=False)
    selection = select_trusted(
        model, train_set, args.per_class, num_labels=num_labels, rule=args.rule, selection_model=early, runtime=runtime
    )
    trusted = torch.tensor(selection.indices, dtype=torch.long)
    trusted_purity = purity_of(trusted)
    projector = Projector(model, train_set.select(selection.indices), head)
    alphas = list(args.alphas)
    for variant, kinds in LAYER_VARIANTS.items():
        add(variant, projector, [{k: a for k in kinds} for a in alphas], trusted_purity)
    grid = [None, *alphas]
    joint = [{"attention": a, "fc1": m, "fc2": m, "head": m} for a in grid for m in grid if (a, m) != (None, None)]
    add("kind_alpha", projector, joint, trusted_purity)
    sap_choice = next(r["alpha"] for r in rows if r["variant"] == "all") or {}

    # Diagnostic trusted sets of the same size (hidden clean labels used to build them, never to choose alpha).
    generator = torch.Generator().manual_seed(seed)
    pools = {
        "random": torch.arange(len(data["train_y"])),
        "clean": torch.nonzero(~data["is_noisy"]).flatten(),
        "mislabelled": torch.nonzero(data["is_noisy"]).flatten(),
    }
    for name in SAMPLE_VARIANTS:
        pool = pools[name]
        picked = pool[torch.randperm(len(pool), generator=generator)[: args.per_class * num_labels]].tolist()
        other = Projector(model, train_set.select(picked), head)
        add(f"trusted={name}", other, [{k: a for k in LAYER_VARIANTS["all"]} for a in alphas], purity_of(picked))

    # Fine-tuning on the trusted set, from the memorised model and from the SAP-corrected one.
    write_weights(model, projector.weights(sap_choice))
    sap_state = copy.deepcopy(model.state_dict())
    starts = (("finetune_trusted", final_state, None), ("sap+finetune", sap_state, dict(sap_choice) or None))
    for variant, state, alpha in starts:
        ft = finetune_grid(model, state, data["train_x"][trusted], data["train_y"][trusted], data, args, seed)
        row = dict(base, variant=variant, alpha=alpha, val_accuracy=ft["val_accuracy"])
        row.update(test_accuracy=ft["test_accuracy"], lr=ft["lr"], ft_epochs=ft["epochs"], purity=trusted_purity)
        rows.append(row)
    for row in rows:
        row["gain_vs_none"] = row["test_accuracy"] - none_test
    return {"rows": rows, "seconds": time.perf_counter() - run["started"], "train_noisy_accuracy": train_fit}


def _worker(task: tuple[str, int, argparse.Namespace]) -> dict[str, Any]:
    setting, seed, args = task
    result = run_one(setting, seed, args)
    print(f"[sap_ablation] {setting} seed {seed} done in {result['seconds']:.0f}s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(setting, seed, args) for seed in args.seeds for setting in args.settings]
    results = common.run_tasks(_worker, tasks, args.jobs)
    rows = [row for result in results for row in result["rows"]]
    summary = report.summarise(rows, ("setting",), key="variant")
    record = {
        "rows": rows,
        "summary": summary,
        "train_noisy_accuracy": [result["train_noisy_accuracy"] for result in results],
        "config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "cache_dir")},
        "elapsed_seconds": time.perf_counter() - started,
    }
    if not args.no_plot and report.bars(summary, out_dir / "sap_ablation.png", "SAP ablations:", "gain_vs_none"):
        record["plot"] = "sap_ablation.png"
    path = common.write_json(out_dir / "sap_ablation.json", record)
    report.print_tables(path)
    print(f"\nwrote {path} in {record['elapsed_seconds']:.0f}s")
    return record


if __name__ == "__main__":
    main()
