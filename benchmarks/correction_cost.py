"""Correction cost at Clothing1M scale: the data work of one SAP correction, on 1 and 2 processes.

    python benchmarks/correction_cost.py            # 10,010 training JPEGs at 224x224 (corpus cached)
    python benchmarks/correction_cost.py --quick    # smoke run: a few hundred small JPEGs

What it measures
  1. A Clothing1M-layout corpus written by this script (not committed; default under
     /work/cache/c1m_corpus): real Fashion-MNIST images upscaled to 224x224 RGB JPEGs, 14 classes
     (the 10 Fashion-MNIST classes and classes 0-3 rotated by 90 degrees, so the Clothing1M reader's
     14 classes are all present), 40% symmetric noise on the training labels; 715 training, 72
     validation and 10 test images per class (validation/training = 1.4%, as Clothing1M's 14k/1M).
  2. The recipe's tiny ViT (32x32 input, images decoded and resized by the recipe's transform) trained
     for 3 epochs on the streamed training set (AdamW, lr 5e-4, batch 32; ~50% clean val accuracy:
     trained, not memorised); its first epoch, timed, is the unit the correction is compared with.
  3. The recipe's correction (`sap_correct` with recipes/configs/default.yaml's SAP settings, read from the
     file by `common.recipe_sap_config`: today shift_loss selection, 10 per class, per-kind alphas over an
     11-point grid, float64 statistics; raw rows decoded by `ImageTransform.collate`, as the recipe does)
     under `accelerate launch` with 1 process and with 2 (`--multi_gpu --num_processes 2`, gloo on CPU),
     one torch thread each. Rows `{processes, phase, seconds, decodes}` for selection | statistics | eigh |
     alpha_search | write | total. The phases are timed by the library itself: `sap_correct(on_phase=...)`
     (seconds as the main process measured them, no barrier between phases; `timings` in the record is
     its `SAPResult.timings`); alpha_search is the sum of the search's "evaluation" phases. PIL decodes
     are counted in every process (a wrapper around PIL's `ImageFile.load` that counts real decodes),
     given to the phase that ended next (the innermost one: "search" encloses eigh, evaluations and
     write) and summed over processes. The alpha search runs with the default bracketing search, then
     again with the full grid from the same statistics (saved by that correction to `stats_path` and
     loaded by a second `sap_correct` with alpha_search="grid"; rows `search: "bracket" | "grid"`,
     `evaluations`).
  4. Bracket vs grid on the accuracy benchmark's memorised models (`--cache_dir`, default
     /work/cache/accuracy: tiny ViTs that fit 40% sym/asym noise, seeds 0-2; models missing from the
     cache are skipped, never trained here): same choice (alpha, or val accuracy within 0.2 points)
     and the evaluations each needs, for alpha_scope shared and per_kind on the 14-point grid, with the
     recipe's tolerance (SAPConfig's default, 0.0025) and with 0 (stop at the first fall); the trusted
     set and statistics dtype are the recipe's.
  5. A table extrapolated to Clothing1M (1M noisy training images, 14k validation, ViT-B/16 at
     224x224) from the measured per-image decode rate and benchmarks/results/speed.json's ViT-B rates.

Writes benchmarks/results/correction_cost.json and correction_cost.png (`--quick`: *_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from common import RESULTS_DIR, ROOT, environment, loadavg, pyplot, quiet_libraries, write_json

CLASSES = 14
FASHION_CLASSES = 10
PHASES = ("selection", "statistics", "eigh", "alpha_search", "write", "total")
CLOTHING1M = {"train": 1_000_000, "validation": 14_000, "trusted": 14 * 100, "processes": [1, 8]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpus, short grid, few models")
    parser.add_argument("--corpus_dir", default="/work/cache/c1m_corpus")
    parser.add_argument("--per_class", type=int, default=715, help="training images per class (14 classes)")
    parser.add_argument("--val_per_class", type=int, default=72)
    parser.add_argument("--image_size", type=int, default=224, help="side of the JPEGs written")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache_dir", default="/work/cache/accuracy", help="the accuracy benchmark's trained models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["sym40", "asym40"])
    parser.add_argument("--no_plot", action="store_true")
    parser.add_argument("--reuse_runs", action="store_true", help="report the corrections measured by the last run again")
    parser.add_argument("--retime_epoch", action="store_true",
                        help="time one more fine-tuning epoch of the cached model now (same recipe; the model is not saved)")
    parser.add_argument("--reuse_comparison", action="store_true", help="take the bracket/grid comparison from the last JSON")
    parser.add_argument("--worker", nargs=3, metavar=("CORPUS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.val_per_class, args.image_size = 12, 4, 64
        args.seeds, args.settings = [0], ["sym40"]
        if not argv or "--cache_dir" not in argv:  # the comparison needs trained models: only when asked for
            args.cache_dir = None
        if not argv or "--corpus_dir" not in argv:
            args.corpus_dir = tempfile.mkdtemp(prefix="c1m_quick_")
    return args


# --------------------------------------------------------------------------------------------
# The corpus and the model
# --------------------------------------------------------------------------------------------


def write_corpus(root: Path, per_class: int, val_per_class: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    """A Clothing1M-layout directory of real Fashion-MNIST images (see the module docstring)."""
    import numpy as np
    from PIL import Image

    from sap_hf.data import DEBIAN_FASHION_MNIST_DIR, read_idx
    from sap_hf.data.clothing1m import CLEAN_KV, NOISY_KV
    from sap_hf.data.noise import add_label_noise

    marker = root / "corpus.json"
    wanted = {"per_class": per_class, "val_per_class": val_per_class, "image_size": image_size, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()).get("config") == wanted:
        return json.loads(marker.read_text())
    started = time.perf_counter()
    images = read_idx(DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").astype(int)
    rng = np.random.default_rng(seed)
    counts = {"train": per_class, "val": val_per_class, "test": 10}
    need = sum(counts.values())
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(FASHION_CLASSES)}
    taken = {c: 0 for c in range(FASHION_CLASSES)}
    keys: dict[str, list[str]] = {split: [] for split in counts}
    clean: dict[str, int] = {}
    number = 0
    for label in range(CLASSES):
        source = label if label < FASHION_CLASSES else label - FASHION_CLASSES
        chosen = pools[source][taken[source] : taken[source] + need]
        taken[source] += need
        split_of = ["train"] * counts["train"] + ["val"] * counts["val"] + ["test"] * counts["test"]
        for index, split in zip(chosen, split_of):
            image = Image.fromarray(images[index]).convert("RGB")
            if label >= FASHION_CLASSES:
                image = image.transpose(Image.Transpose.ROTATE_90)
            key = f"images/{number % 10}/{number // 10 % 100}/{number}.jpg"
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            image.resize((image_size, image_size), Image.Resampling.BICUBIC).save(path, format="JPEG", quality=90)
            keys[split].append(key)
            clean[key] = label
            number += 1
    order = rng.permutation(len(keys["train"]))  # a stream in no class order, as a web crawl
    train = [keys["train"][i] for i in order]
    noisy, _ = add_label_noise([clean[k] for k in train], 0.4, num_classes=CLASSES, seed=seed)
    lines = lambda rows: "".join(f"{row}\n" for row in rows)  # noqa: E731
    (root / NOISY_KV).write_text(lines(f"{k} {int(y)}" for k, y in zip(train, noisy)))
    (root / CLEAN_KV).write_text(lines(f"{k} {y}" for k, y in clean.items()))
    (root / "noisy_train_key_list.txt").write_text(lines(train))
    (root / "clean_train_key_list.txt").write_text(lines(train))
    (root / "clean_val_key_list.txt").write_text(lines(keys["val"]))
    (root / "clean_test_key_list.txt").write_text(lines(keys["test"]))
    record = {"config": wanted, "train": len(train), "validation": len(keys["val"]), "test": len(keys["test"]),
              "noise_rate": float(np.mean(np.asarray(noisy) != np.asarray([clean[k] for k in train]))),
              "bytes": sum(p.stat().st_size for p in (root / "images").rglob("*.jpg")),
              "seconds_to_write": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(record, indent=1))
    return record


def count_decodes() -> list[int]:
    """Count real PIL decodes in this process (a reload of a decoded image is not one)."""
    from PIL import ImageFile

    counter = [0]
    load = ImageFile.ImageFile.load

    def counting_load(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.tile:
            counter[0] += 1
        return load(self, *args, **kwargs)

    ImageFile.ImageFile.load = counting_load
    return counter


def tiny_model() -> Any:
    """The recipe's tiny ViT for a Clothing1M directory (sap_hf.cli.sources.load_model without model_name_or_path)."""
    from transformers import ViTForImageClassification

    from sap_hf.data import CLOTHING1M_CLASSES
    from sap_hf.models import tiny_vit_config

    config = tiny_vit_config(image_size=32, patch_size=4, num_channels=3, num_labels=CLASSES, hidden_size=64,
                             num_hidden_layers=4, id2label=dict(enumerate(CLOTHING1M_CLASSES)))
    return ViTForImageClassification(config)


def finetune_epoch(corpus: Path, model_dir: Path, epochs: int = 3, lr: float = 5e-4) -> dict[str, Any]:
    """Train the recipe's tiny ViT on the streamed corpus (decode + forward + backward per epoch); time epoch 1.

    The first epoch is the unit the correction is compared with; after `epochs` the model (about 50% clean
    val accuracy on the full corpus: trained, not memorised) is what the correction runs on. Cached in `model_dir`.
    """
    import torch

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images

    record_path = model_dir / "epoch.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    decodes = count_decodes()
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    transform = ImageTransform(image_size=32)
    train = undecoded_images(load_clothing1m(corpus, "noisy_train"))
    model.train()
    seconds = []
    for epoch in range(epochs):
        started, batch, images, before = time.perf_counter(), [], 0, decodes[0]
        for row in list(train.shuffle(seed=epoch, buffer_size=2048)) + [None]:
            if row is not None:
                batch.append(row)
            if len(batch) == 32 or (row is None and batch):
                inputs = transform.collate(batch)
                loss = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                images += len(batch)
                batch = []
        seconds.append(time.perf_counter() - started)
        if epoch == 0:
            first_decodes = decodes[0] - before
    record = {"seconds": seconds[0], "images": images, "decodes": first_decodes, "batch_size": 32,
              "optimizer": f"AdamW lr={lr:g}", "threads": 1, "epochs_trained": epochs,
              "all_epoch_seconds": [round(x, 1) for x in seconds]}
    model.save_pretrained(model_dir)
    record_path.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------
# One correction, in each process of `accelerate launch`
# --------------------------------------------------------------------------------------------


class PhaseLog:
    """The `on_phase` callback of one correction: each phase's seconds (as the library reports them) and decodes.

    A phase's decodes are those counted since the previous callback: phases run one after the other,
    except "search", which encloses its "eigh", "evaluation"s and "write" and is reported after them, so
    every decode goes to the innermost phase (a "search" entry keeps only what ran outside its parts: 0).
    """

    def __init__(self, decodes: list[int]):
        self.decodes = decodes
        self.mark = decodes[0]
        self.spans: list[tuple[str, float, int]] = []  # (phase, seconds, decodes) in the order the phases ended

    def start(self) -> None:
        self.mark, self.spans = self.decodes[0], []

    def __call__(self, phase: str, seconds: float) -> None:
        now = self.decodes[0]
        self.spans.append((phase, seconds, now - self.mark))
        self.mark = now

    def total(self, phase: str) -> list[float]:
        """[seconds, decodes] of every span of `phase`."""
        chosen = [(s, d) for name, s, d in self.spans if name == phase]
        return [sum(s for s, _ in chosen), sum(d for _, d in chosen)]


#: The rows' phases from the library's ("alpha_search" = its evaluations; "search" encloses eigh, evaluations, write).
ROW_PHASES = {"selection": "selection", "statistics": "statistics", "eigh": "eigh", "alpha_search": "evaluation",
              "write": "write"}


def library_intact() -> dict[str, Any]:
    """That no library name was rebound (the timings come from the hook, not from wrappers): checked after the runs."""
    import sap_hf.api as api
    import sap_hf.core.projection as projection
    import sap_hf.core.search as search
    import sap_hf.core.selection as selection
    import sap_hf.core.stats as stats
    from common import rebound_library_names

    same = {"api.select_trusted": api.select_trusted is selection.select_trusted,
            "api.collect_statistics": api.collect_statistics is stats.collect_statistics,
            "api.search_alpha": api.search_alpha is search.search_alpha,
            "api.eigenbases": api.eigenbases is search.eigenbases,
            "search.rotate_weights": search.rotate_weights is projection.rotate_weights,
            "search.write_weights": search.write_weights is projection.write_weights}
    return {"same_objects": same, "rebound": rebound_library_names()}


def worker(corpus: str, model_dir: str, out: str) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import ViTForImageClassification

    from common import recipe_sap_config
    from sap_hf import sap_correct
    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images

    torch.set_num_threads(1)
    quiet_libraries()
    decodes = count_decodes()
    accelerator = Accelerator(cpu=True)
    model = ViTForImageClassification.from_pretrained(model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    transform = ImageTransform(image_size=32)
    train, val = (undecoded_images(load_clothing1m(corpus, split)) for split in ("noisy_train", "validation"))
    config = recipe_sap_config()  # recipes/configs/default.yaml's SAP settings
    quick = json.loads((Path(corpus) / "corpus.json").read_text())["train"] < 1000
    if quick:
        config = recipe_sap_config(alphas=[10, 100, 1000], trusted_per_class=2)
    # The statistics of the correction, saved by sap_correct itself, feed the full-grid search below.
    stats_path = Path(out).with_name(Path(out).stem + "_stats.safetensors")
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)  # a file left there would be loaded: no statistics pass to time
    log = PhaseLog(decodes)

    accelerator.wait_for_everyone()
    clock, before = time.perf_counter(), decodes[0]
    log.start()
    result = sap_correct(model, train, val, config, accelerator, collate_fn=transform.collate, show_progress=False,
                         stats_path=stats_path, on_phase=log)
    total = [time.perf_counter() - clock, decodes[0] - before]
    bracket = result.rounds[0]
    evaluations = 1 + len(bracket.metrics) + len(bracket.kind_trials)
    phases = {row: log.total(phase) for row, phase in ROW_PHASES.items()}
    phases["total"] = total
    spans = list(log.spans)

    # The same alpha search with the full grid, from the same statistics (loaded from stats_path: no data pass,
    # no selection). Its row is its evaluations, as the bracket's alpha_search row.
    model.load_state_dict(original)
    accelerator.wait_for_everyone()
    log.start()
    grid_config = dataclasses.replace(config, alpha_search="grid")
    grid_result = sap_correct(model, None, val, grid_config, accelerator, collate_fn=transform.collate,
                              show_progress=False, stats_path=stats_path, on_phase=log)
    accelerator.wait_for_everyone()
    grid = grid_result.rounds[0]
    grid_cost = log.total("evaluation")
    grid_evaluations = 1 + len(grid.metrics) + len(grid.kind_trials)

    shards = gather_object([{"phases": phases, "grid": grid_cost}])
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)
        summed = {name: [phases[name][0], sum(s["phases"][name][1] for s in shards)] for name in PHASES}
        record = {
            "processes": accelerator.num_processes,
            "rows": [{"processes": accelerator.num_processes, "phase": name, "seconds": round(summed[name][0], 3),
                      "decodes": summed[name][1], **({"search": "bracket", "evaluations": evaluations}
                                                      if name == "alpha_search" else {})} for name in PHASES]
            + [{"processes": accelerator.num_processes, "phase": "alpha_search", "search": "grid",
                "evaluations": grid_evaluations, "seconds": round(grid_cost[0], 3),
                "decodes": sum(s["grid"][1] for s in shards)}],
            "timings": {k: round(v, 3) for k, v in result.timings.items()},  # SAPResult.timings of the main process
            "grid_timings": {k: round(v, 3) for k, v in grid_result.timings.items()},
            "phase_log": [{"phase": name, "seconds": round(sec, 3), "decodes": d} for name, sec, d in spans],
            "choice": {"bracket": {"alpha": bracket.best_alpha, "kind_alphas": bracket.kind_alphas,
                                   "val_accuracy": bracket.best_metrics.get("accuracy")},
                       "grid": {"alpha": grid.best_alpha, "kind_alphas": grid.kind_alphas,
                                "val_accuracy": grid.best_metrics.get("accuracy")}},
            "val_accuracy_before": bracket.baseline.get("accuracy"),
            "num_trusted": result.num_trusted,
            "config": config.to_dict(),
            "timing_method": "sap_correct(on_phase=...): each process times its own phases, no barrier between them",
            "library_intact": library_intact(),
        }
        Path(out).write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group before exit: a live one can abort the teardown


def launch(processes: int, corpus: Path, model_dir: Path, out: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    # The port stays bound here (SO_REUSEADDR, not listening) until the run ends: no other socket gets it,
    # the TCPStore can still listen on it (a random port may be in use: EADDRINUSE, seen with the tests' ports).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("", 0))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(held.getsockname()[1]),
                   "--num_processes", str(processes)]
        command += (["--multi_gpu"] if processes > 1 else ["--cpu"]) + [__file__, "--worker", str(corpus), str(model_dir), str(out)]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"accelerate launch with {processes} process(es) failed:\n{run.stderr[-4000:]}")
    record = json.loads(out.read_text())
    record["launch_wall_seconds"] = round(time.perf_counter() - started, 1)
    record["loadavg_after"] = loadavg()
    out.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------
# Bracket vs grid on the accuracy benchmark's memorised models
# --------------------------------------------------------------------------------------------


def compare_searches(args: argparse.Namespace) -> dict[str, Any]:
    """For every cached model: the recipe's trusted set (selection rule, per class, statistics dtype of
    recipes/configs/default.yaml), then the searches (grid, bracket at the recipe's tolerance, bracket at 0)
    from one set of statistics."""
    import torch

    from common import DEFAULT_ALPHAS, accuracy, cache_path, prepare_run, recipe_sap_config, run_parser

    from sap_hf import Runtime, collect_statistics, search_alpha, select_trusted
    from sap_hf.core.search import eigenbases
    from sap_hf.core.targets import classifier_names, find_target_modules, group_kinds

    if not args.cache_dir:
        return {"rows": [], "summary": {}, "note": "skipped (no --cache_dir)"}
    torch.set_num_threads(1)
    recipe = recipe_sap_config()
    run_args = run_parser("").parse_args(["--cache_dir", args.cache_dir, "--threads", "1"])
    rows, missing = [], []
    passes = Runtime(batch_size=500, show_progress=False)
    for setting in args.settings:
        for seed in args.seeds:
            cache = cache_path(setting, seed, run_args)
            if cache is None or not cache.exists():
                missing.append(f"{setting}/seed{seed}")
                continue
            run = prepare_run(setting, seed, run_args)
            model, data = run["model"], run["data"]
            state = {k: v.clone() for k, v in model.state_dict().items()}
            selection = select_trusted(model, run["train_set"], recipe.trusted_per_class, rule=recipe.selection_rule,
                                       runtime=passes)
            stats = collect_statistics(model, run["train_set"].select(selection.indices), find_target_modules(model),
                                       accumulation_dtype=recipe.accumulation_dtype, runtime=passes)
            bases = eigenbases(stats)
            kinds = group_kinds(stats.groups, classifier_names(model))
            evaluate = lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])}  # noqa: E731
            for scope in ("shared", "per_kind"):
                found = {}
                for method, tolerance in (("grid", 0.0), ("bracket", recipe.alpha_search_tolerance), ("bracket_tol0", 0.0)):
                    model.load_state_dict(state)
                    res = search_alpha(model, stats, list(DEFAULT_ALPHAS), evaluate, bases=bases,
                                       kinds=kinds if scope == "per_kind" else None, method=method.split("_")[0],
                                       tolerance=tolerance)
                    found[method] = {"alpha": res.best_alpha, "kind_alphas": res.kind_alphas,
                                     "val_accuracy": res.best_metrics["accuracy"],
                                     "test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
                                     "evaluations": 1 + len(res.metrics) + len(res.kind_trials)}
                grid, fast = found["grid"], found["bracket"]
                same_alpha = grid["alpha"] == fast["alpha"] and grid["kind_alphas"] == fast["kind_alphas"]
                zero = found["bracket_tol0"]
                zero.update(same_alpha=grid["alpha"] == zero["alpha"] and grid["kind_alphas"] == zero["kind_alphas"],
                            val_gap_points=round(100 * (grid["val_accuracy"] - zero["val_accuracy"]), 3))
                rows.append({"setting": setting, "seed": seed, "scope": scope, "grid": grid, "bracket": fast,
                             "bracket_tolerance_0": zero,
                             "same_alpha": same_alpha,
                             "val_gap_points": round(100 * (grid["val_accuracy"] - fast["val_accuracy"]), 3),
                             "evaluation_ratio": round(fast["evaluations"] / grid["evaluations"], 3)})
                print(f"  {setting} seed {seed} {scope:8s}: grid {grid['evaluations']:2d} evals -> "
                      f"{_choice(grid)} val {grid['val_accuracy']:.4f} | bracket {fast['evaluations']:2d} evals -> "
                      f"{_choice(fast)} val {fast['val_accuracy']:.4f}")
    summary = {}
    for scope in ("shared", "per_kind"):
        chosen = [r for r in rows if r["scope"] == scope]
        if chosen:
            grid_total = sum(r["grid"]["evaluations"] for r in chosen)
            fast_total = sum(r["bracket"]["evaluations"] for r in chosen)
            summary[scope] = {
                "models": len(chosen), "grid_evaluations": grid_total, "bracket_evaluations": fast_total,
                "evaluation_ratio": round(fast_total / grid_total, 3),
                "same_choice": sum(r["same_alpha"] or abs(r["val_gap_points"]) <= 0.2 for r in chosen),
                "same_alpha": sum(r["same_alpha"] for r in chosen),
                "max_val_gap_points": max(abs(r["val_gap_points"]) for r in chosen),
                "tolerance_0": {
                    "bracket_evaluations": sum(r["bracket_tolerance_0"]["evaluations"] for r in chosen),
                    "same_choice": sum(r["bracket_tolerance_0"]["same_alpha"]
                                       or abs(r["bracket_tolerance_0"]["val_gap_points"]) <= 0.2 for r in chosen),
                    "max_val_gap_points": max(abs(r["bracket_tolerance_0"]["val_gap_points"]) for r in chosen),
                },
            }
    return {"alphas": list(DEFAULT_ALPHAS), "tolerance": recipe.alpha_search_tolerance,
            "trusted": f"{recipe.selection_rule}, {recipe.trusted_per_class} per class, {recipe.accumulation_dtype} statistics",
            "rows": rows, "summary": summary, "missing_models": missing}


def _choice(found: dict[str, Any]) -> str:
    if found["kind_alphas"]:
        return ",".join("-" if a is None else f"{a:g}" for a in found["kind_alphas"].values())
    return "unchanged" if found["alpha"] is None else f"{found['alpha']:g}"


# --------------------------------------------------------------------------------------------
# Extrapolation, report, plot
# --------------------------------------------------------------------------------------------


def extrapolate(record: dict[str, Any]) -> dict[str, Any]:
    """Clothing1M with ViT-B/16 from per-image rates: the measured decode+transform rate and speed.json's ViT-B rates.

    Evaluation counts come from the accuracy benchmark's models (mean over models, 14-alpha grid):
    the grid's count, and the bracket's measured count, for alpha_scope shared and per_kind.
    """
    speed_path = RESULTS_DIR / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    base = {r["method"]: r for r in speed.get("rows", []) if r.get("model") == "base"}
    summary = record["search_comparison"].get("summary", {})
    if "inference" not in base or not summary:
        return {"note": "needs benchmarks/results/speed.json's ViT-Base rows and the search comparison; no extrapolation."}
    forward = base["inference"]["seconds"] / base["inference"]["n_samples"]  # s per image, 1 CPU thread
    stats_ratio = base["stats_exact"]["seconds"] / base["inference"]["seconds"]
    decode = record["finetune_epoch"]["decode_seconds_per_image"]
    train, val, trusted = CLOTHING1M["train"], CLOTHING1M["validation"], CLOTHING1M["trusted"]
    hours = lambda seconds: round(seconds / 3600, 2)  # noqa: E731
    per_pass = {
        "selection_loss": train * (decode + forward),  # the ViT-B config's rule: one forward per image
        "selection_shift_loss": train * (decode + 5 * forward),  # the image and four shifted copies
        "statistics": trusted * (decode + stats_ratio * forward),
        "one_evaluation": val * (decode + forward),
        "finetune_epoch": train * (decode + 3 * forward),
    }
    table = []
    for processes in CLOTHING1M["processes"]:
        for scope, values in summary.items():
            for search in ("grid", "bracket"):
                evaluations = values[f"{search}_evaluations"] / values["models"]
                seconds = {"selection": per_pass["selection_loss"], "statistics": per_pass["statistics"],
                           "alpha_search": evaluations * per_pass["one_evaluation"]}
                seconds["total"] = sum(seconds.values())
                table.append({"processes": processes, "alpha_scope": scope, "search": search,
                              "evaluations": round(evaluations, 1),
                              **{k: hours(v / processes) for k, v in seconds.items()},
                              "finetune_epoch": hours(per_pass["finetune_epoch"] / processes)})
    return {
        "unit": "hours of one CPU core per process (1 torch thread), ideal scaling over processes",
        "rates": {"decode_and_transform_s_per_image": round(decode, 5), "vit_base_forward_s_per_image": round(forward, 4),
                  "stats_over_inference": round(stats_ratio, 3), "finetune_step_over_forward": 3.0},
        "per_pass_hours_1_process": {k: hours(v) for k, v in per_pass.items()},
        "formulas": {"selection": "train x (decode + forward) ('loss', the ViT-B config; shift_loss: 5 forwards)",
                     "statistics": "trusted x (decode + stats_ratio x forward)",
                     "alpha_search": "evaluations x validation x (decode + forward)",
                     "finetune_epoch": "train x (decode + 3 forward)",
                     "eigh": "not included: seconds (speed.json eigh_project: once per correction)"},
        "table": table,
        "gpu": "not measured: no GPU was lent to this task",
    }


def print_report(record: dict[str, Any]) -> None:
    print(f"\nCorpus: {record['corpus']['train']} training + {record['corpus']['validation']} validation JPEGs "
          f"({record['corpus']['config']['image_size']}x{record['corpus']['config']['image_size']}); one fine-tuning "
          f"epoch {record['finetune_epoch']['seconds']:.1f} s")
    print(f"{'P':>2} {'phase':14s} {'search':8s} {'evals':>5s} {'seconds':>9s} {'decodes':>8s}")
    for run in record["runs"]:
        for row in run["rows"]:
            print(f"{row['processes']:>2} {row['phase']:14s} {row.get('search', ''):8s} {row.get('evaluations', ''):>5} "
                  f"{row['seconds']:9.2f} {row['decodes']:8d}")
    for name, value in record["targets"].items():
        print(f"  {name}: {value}")


def plot(record: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    labels, bottoms = [], []
    colours = {"selection": "#4c72b0", "statistics": "#55a868", "eigh": "#c44e52", "alpha_search": "#8172b2", "write": "#ccb974"}
    for i, run in enumerate(record["runs"]):
        rows = {r["phase"]: r for r in run["rows"] if r.get("search") != "grid"}
        bottom = 0.0
        for phase, colour in colours.items():
            ax.bar(i, rows[phase]["seconds"], bottom=bottom, color=colour, label=phase if i == 0 else None)
            bottom += rows[phase]["seconds"]
        labels.append(f"SAP, {run['processes']} proc.\n{rows['total']['decodes']} decodes")
    ax.bar(len(record["runs"]), record["finetune_epoch"]["seconds"], color="#999999", label="1 fine-tuning epoch")
    labels.append(f"fine-tune epoch\n{record['finetune_epoch']['decodes']} decodes")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("seconds (1 torch thread per process)")
    ax.set_title(f"Correction cost, {record['corpus']['train']} training JPEGs")
    ax.legend(fontsize=8)
    ax = axes[1]
    comparison = record.get("search_comparison", {}).get("rows", [])
    if comparison:
        names = [f"{r['setting']}/s{r['seed']}\n{r['scope']}" for r in comparison]
        x = range(len(comparison))
        ax.bar([i - 0.2 for i in x], [r["grid"]["evaluations"] for r in comparison], width=0.4, label="grid", color="#999999")
        ax.bar([i + 0.2 for i in x], [r["bracket"]["evaluations"] for r in comparison], width=0.4, label="bracket", color="#8172b2")
        for i, r in enumerate(comparison):
            ax.text(i + 0.2, r["bracket"]["evaluations"] + 0.5, "=" if r["same_alpha"] else f"{r['val_gap_points']:+.2f}",
                    ha="center", fontsize=7)
        ax.set_xticks(list(x), names, fontsize=6, rotation=90)
        ax.set_ylabel("evaluations (full passes over val)")
        ax.set_title("Alpha search: grid vs bracket (= same choice, else val gap in points)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return {}
    quiet_libraries()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    corpus_dir = Path(args.corpus_dir)
    started = time.perf_counter()
    print(f"Corpus in {corpus_dir} ...")
    corpus = write_corpus(corpus_dir, args.per_class, args.val_per_class, args.image_size)
    model_dir = corpus_dir / ("model_tiny_vit_1epoch" if args.quick else "model_tiny_vit_3epochs")
    print("One fine-tuning epoch ...")
    epoch = finetune_epoch(corpus_dir, model_dir, epochs=1 if args.quick else 3)
    if args.retime_epoch:  # the cached timing came from another (busier) moment: time one more epoch now
        epoch = dict(epoch, **time_epoch(corpus_dir, model_dir))
    epoch = dict(epoch, decode_seconds_per_image=decode_rate(corpus_dir))
    runs = []
    for processes in args.processes:
        saved = corpus_dir / f"correction_{processes}p.json"  # kept beside the corpus: --reuse_runs reports it again
        if args.reuse_runs and saved.is_file():
            runs.append(json.loads(saved.read_text()))
            continue
        print(f"Correction with {processes} process(es) ...")
        runs.append(launch(processes, corpus_dir, model_dir, saved))
    previous = out_dir / f"correction_cost{suffix}.json"
    if args.reuse_comparison and previous.is_file():
        comparison = json.loads(previous.read_text())["search_comparison"]
    else:
        print("Bracket vs grid on the accuracy benchmark's models ...")
        comparison = compare_searches(args)
    record: dict[str, Any] = {"corpus": corpus, "finetune_epoch": epoch, "runs": runs, "search_comparison": comparison}
    record["extrapolation"] = extrapolate(record)
    record["targets"] = targets(record)
    record["environment"] = dict(environment(), loadavg=loadavg())
    record["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out_dir / f"correction_cost{suffix}.json", record)
    if not args.no_plot:
        plot(record, out_dir / f"correction_cost{suffix}.png")
    print_report(record)
    return record


def time_epoch(corpus: Path, model_dir: Path, lr: float = 5e-4) -> dict[str, Any]:
    """One more training epoch of the cached model, timed like `finetune_epoch`'s first (nothing is saved)."""
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images

    torch.set_num_threads(1)
    decodes = count_decodes()
    model = ViTForImageClassification.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    transform = ImageTransform(image_size=32)
    model.train()
    started, before = time.perf_counter(), decodes[0]  # the stream is read inside the timing, as in training
    rows = list(undecoded_images(load_clothing1m(corpus, "noisy_train")))
    for start in range(0, len(rows), 32):
        inputs = transform.collate(rows[start : start + 32])
        loss = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"seconds": time.perf_counter() - started, "decodes": decodes[0] - before, "retimed": True,
            "loadavg_after": loadavg()}


def decode_rate(corpus: Path, images: int = 300) -> float:
    """Seconds per image to read, decode and transform a training JPEG (the recipe's transform), 1 thread."""
    import torch

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images

    torch.set_num_threads(1)
    rows = list(undecoded_images(load_clothing1m(corpus, "noisy_train")).take(images))
    transform = ImageTransform(image_size=32)
    clock = time.perf_counter()
    for start in range(0, len(rows), 32):
        transform.collate(rows[start : start + 32])
    return (time.perf_counter() - clock) / len(rows)


def targets(record: dict[str, Any]) -> dict[str, Any]:
    corpus = record["corpus"]
    out: dict[str, Any] = {}
    by_p = {run["processes"]: {r["phase"]: r for r in run["rows"] if r.get("search") != "grid"} for run in record["runs"]}
    for processes, rows in by_p.items():
        evaluations = rows["alpha_search"]["evaluations"]
        bound = corpus["train"] + corpus["validation"] * evaluations
        out[f"decodes_{processes}p"] = {"decodes": rows["total"]["decodes"], "ideal": bound,
                                        "ratio": round(rows["total"]["decodes"] / bound, 3),
                                        "met_le_1.1": rows["total"]["decodes"] <= 1.1 * bound}
        out[f"total_over_finetune_epoch_{processes}p"] = round(rows["total"]["seconds"] / record["finetune_epoch"]["seconds"], 3)
    if 1 in by_p and 2 in by_p:
        ratio = by_p[2]["selection"]["seconds"] / by_p[1]["selection"]["seconds"]
        out["selection_2p_over_1p"] = {"ratio": round(ratio, 3), "met_le_0.6": ratio <= 0.6}
    for run in record["runs"]:
        grid = next(r for r in run["rows"] if r.get("search") == "grid")
        fast = by_p[run["processes"]]["alpha_search"]
        out[f"corpus_search_evaluations_{run['processes']}p"] = {
            "bracket": fast["evaluations"], "grid": grid["evaluations"],
            "ratio": round(fast["evaluations"] / grid["evaluations"], 3),
            "same_alpha": run["choice"]["bracket"]["kind_alphas"] == run["choice"]["grid"]["kind_alphas"]
            and run["choice"]["bracket"]["alpha"] == run["choice"]["grid"]["alpha"],
            "val_gap_points": round(100 * (run["choice"]["grid"]["val_accuracy"] - run["choice"]["bracket"]["val_accuracy"]), 3)}
    summary = record["search_comparison"].get("summary", {})
    for scope, values in summary.items():
        out[f"accuracy_models_{scope}"] = {**values, "met_le_0.5_same_choice": values["evaluation_ratio"] <= 0.5
                                           and values["same_choice"] == values["models"]}
    return out


if __name__ == "__main__":
    main()
