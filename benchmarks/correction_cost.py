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
     alpha_search | write | total. The phases are timed by the library itself: `Runtime(on_phase=...)`
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
  5. Selection sources (issue #18): the same model with `selection_subset` (`--subset_share` of the training
     stream), and a model that memorised the noise (`memorise`: SAPTrainer, 60 epochs, losses recorded) corrected
     with the full pass, the share, and `SAPTrainer.correct()` with `trusted_source="training"` (no selection
     pass); rows carry `source`, `decodes_per_process` and the trusted set's `purity` (clean labels of the corpus).
  6. A table extrapolated to Clothing1M (1M noisy training images, 14k validation, ViT-B/16 at
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

from common import RESULTS_DIR, ROOT, environment, loadavg, pyplot, quiet_libraries, train_epochs, write_json


CLASSES = 14
FASHION_CLASSES = 10
PHASES = ("selection", "statistics", "eigh", "alpha_search", "write", "total")
CLOTHING1M = {"train": 1_000_000, "validation": 14_000, "trusted": 14 * 100, "processes": [1, 8]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument(
        "--reuse_runs", action="store_true", help="report the corrections measured by the last run again"
    )
    parser.add_argument(
        "--retime_epoch",
        action="store_true",
        help="time one more fine-tuning epoch of the cached model now (same recipe; the model is not saved)",
    )
    parser.add_argument(
        "--reuse_comparison", action="store_true", help="take the bracket/grid comparison from the last JSON"
    )
    parser.add_argument(
        "--subset_share",
        type=float,
        default=0.25,
        help="SAPConfig.selection_subset of the corpus's subset correction (a share of the training stream)",
    )
    parser.add_argument("--memorise_epochs", type=int, default=60, help="training epochs of the memorised model")
    parser.add_argument(
        "--selection_sources",
        default=str(RESULTS_DIR / "selection_sources.json"),
        help="benchmarks/selection_sources.py's record: the share the Clothing1M extrapolation uses",
    )
    parser.add_argument("--worker", nargs=3, metavar=("CORPUS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_trainer", nargs=3, metavar=("CORPUS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.val_per_class, args.image_size = 12, 4, 64
        args.seeds, args.settings, args.memorise_epochs, args.subset_share = [0], ["sym40"], 2, 0.5
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
    record = {
        "config": wanted,
        "train": len(train),
        "validation": len(keys["val"]),
        "test": len(keys["test"]),
        "noise_rate": float(np.mean(np.asarray(noisy) != np.asarray([clean[k] for k in train]))),
        "bytes": sum(p.stat().st_size for p in (root / "images").rglob("*.jpg")),
        "seconds_to_write": round(time.perf_counter() - started, 1),
    }
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

    config = tiny_vit_config(
        image_size=32,
        patch_size=4,
        num_channels=3,
        num_labels=CLASSES,
        hidden_size=64,
        num_hidden_layers=4,
        id2label=dict(enumerate(CLOTHING1M_CLASSES)),
    )
    return ViTForImageClassification(config)


def train_on_rows(model: Any, optimizer: Any, transform: Any, rows: list[Any], batch_size: int = 32) -> int:
    """One epoch over `rows` in their order (undecoded Clothing1M rows, decoded by `transform.collate` in batches of
    `batch_size`, the last one partial) on the benchmarks' one loop (`common.train_epochs`). Returns the number of
    images trained on."""

    def batch_loss(index: Any, epoch: int) -> Any:
        inputs = transform.collate([rows[i] for i in index.tolist()])
        return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss

    train_epochs(model, len(rows), batch_size, batch_loss, optimizer, generator=None, epochs=[0])
    return len(rows)


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
        started, before = time.perf_counter(), decodes[0]
        images = train_on_rows(model, optimizer, transform, list(train.shuffle(seed=epoch, buffer_size=2048)))
        seconds.append(time.perf_counter() - started)
        if epoch == 0:
            first_decodes = decodes[0] - before
    record = {
        "seconds": seconds[0],
        "images": images,
        "decodes": first_decodes,
        "batch_size": 32,
        "optimizer": f"AdamW lr={lr:g}",
        "threads": 1,
        "epochs_trained": epochs,
        "all_epoch_seconds": [round(x, 1) for x in seconds],
    }
    model.save_pretrained(model_dir)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def corpus_labels(corpus: Path) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """The training keys in stream order, their noisy labels and every key's clean label (for purity only)."""
    from sap_hf.data.clothing1m import CLEAN_KV, NOISY_KV

    def kv(name: str) -> dict[str, int]:
        return {
            k: int(v) for k, v in (line.split() for line in (corpus / name).read_text().splitlines() if line.strip())
        }

    keys = [line.strip() for line in (corpus / "noisy_train_key_list.txt").read_text().splitlines() if line.strip()]
    return keys, kv(NOISY_KV), kv(CLEAN_KV)


class CorpusRows:
    """The training stream's raw rows as a map-style dataset (position i = the stream's i-th key): what `SAPTrainer`
    trains on when it records losses by position. Images stay undecoded; `ImageTransform.collate` decodes them."""

    def __init__(self, corpus: Path):
        self.keys, self.noisy, _ = corpus_labels(corpus)
        self.root = corpus

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        return {"image": {"path": str(self.root / key), "bytes": None}, "label": self.noisy[key], "key": key}


def memorise(corpus: Path, model_dir: Path, epochs: int, image_size: int = 28) -> dict[str, Any]:
    """A model that has memorised the noise: `SAPTrainer` with the recipe's training (AdamW lr 2e-3, batch 128,
    5% warm-up, cosine, no weight decay) for `epochs` on the corpus's training images, with
    `trusted_source="training"` so the library records every example's training loss by position.

    The images are decoded once into tensors first (training speed is not what this model is for; its first
    epoch is not the unit). The model is the Fashion-MNIST recipe's geometry (28x28, patch 7: 16 tokens,
    hidden 64, 4 layers) on RGB, 14 classes: at 32x32 / patch 4 (64 tokens) memorising 10k images would take
    about 4x longer. Saved with the trainer's `TrainingLosses` in `model_dir` (`TrainingLosses.save`: the
    library's own `sap_training_losses-0.npz`, as in a checkpoint).
    """
    import torch
    from transformers import TrainingArguments, ViTForImageClassification

    from sap_hf import SAPConfig
    from sap_hf.data import CLOTHING1M_CLASSES, ImageTransform
    from sap_hf.models import tiny_vit_config
    from sap_hf.trainer import SAPTrainer
    from sap_hf.trainer.recorded import RECORD_FILE

    record_path = model_dir / "memorised.json"
    if record_path.is_file() and (model_dir / RECORD_FILE.format(rank=0)).is_file():
        return json.loads(record_path.read_text())
    torch.set_num_threads(1)
    rows = CorpusRows(corpus)
    transform = ImageTransform(image_size=image_size)
    batches = [
        transform.collate([rows[i] for i in range(start, min(start + 256, len(rows)))])
        for start in range(0, len(rows), 256)
    ]
    pixels = torch.cat([b["pixel_values"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    _, _, clean = corpus_labels(corpus)
    is_noisy = labels != torch.tensor([clean[k] for k in rows.keys])
    train = [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(len(labels))]
    torch.manual_seed(0)
    model = ViTForImageClassification(
        tiny_vit_config(
            image_size=image_size,
            patch_size=image_size // 4,
            num_channels=3,
            num_labels=CLASSES,
            hidden_size=64,
            num_hidden_layers=4,
            id2label=dict(enumerate(CLOTHING1M_CLASSES)),
        )
    )
    args = TrainingArguments(
        output_dir=str(model_dir / "_trainer"),
        per_device_train_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=2e-3,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        logging_strategy="no",
        seed=0,
    )
    trainer = SAPTrainer(
        model=model, args=args, train_dataset=_Listed(train), sap_config=SAPConfig(trusted_source="training")
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(pixel_values=pixels[i : i + 500]).logits.argmax(-1) for i in range(0, len(pixels), 500)]
        )
    model.save_pretrained(model_dir)
    trainer.training_losses.save(model_dir, rank=0)
    record = {
        "epochs": epochs,
        "image_size": image_size,
        "train_seconds": round(seconds, 1),
        "images": len(labels),
        "noisy_fit": float((predicted[is_noisy] == labels[is_noisy]).float().mean()),
        "clean_fit": float((predicted[~is_noisy] == labels[~is_noisy]).float().mean()),
        "training": "SAPTrainer, AdamW lr 2e-3, batch 128, warmup 5%, cosine, no weight decay, trusted_source='training'",
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


class _Listed:
    """A list as a map-style dataset (SAPTrainer records losses by position of a map-style dataset)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


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
ROW_PHASES = {
    "selection": "selection",
    "statistics": "statistics",
    "eigh": "eigh",
    "alpha_search": "evaluation",
    "write": "write",
}


def library_intact() -> dict[str, Any]:
    """That no library name was rebound (the timings come from the hook, not from wrappers): checked after the runs."""
    from common import rebound_library_names

    import sap_hf.api as api
    import sap_hf.core.projection as projection
    import sap_hf.core.search as search
    import sap_hf.core.selection as selection
    import sap_hf.core.stats as stats

    same = {
        "api.select_trusted": api.select_trusted is selection.select_trusted,
        "api.collect_statistics": api.collect_statistics is stats.collect_statistics,
        "api.search_alpha": api.search_alpha is search.search_alpha,
        "api.eigenbases": api.eigenbases is search.eigenbases,
        "search.rotate_weights": search.rotate_weights is projection.rotate_weights,
        "search.write_weights": search.write_weights is projection.write_weights,
    }
    return {"same_objects": same, "rebound": rebound_library_names()}


def _phases(log: PhaseLog, total: list[float]) -> dict[str, list[float]]:
    phases = {row: log.total(phase) for row, phase in ROW_PHASES.items()}
    phases["total"] = total
    return phases


def _rows(
    processes: int, source: str, shards: list[dict[str, Any]], name: str, evaluations: int, purity: Optional[float]
) -> list[dict[str, Any]]:
    """One correction's rows: each phase's seconds (main process), decodes summed and per process."""
    mine = shards[0][name]
    rows = []
    for phase in PHASES:
        per_process = [int(shard[name][phase][1]) for shard in shards]
        row = {
            "processes": processes,
            "source": source,
            "phase": phase,
            "seconds": round(mine[phase][0], 3),
            "decodes": sum(per_process),
            "decodes_per_process": per_process,
        }
        if phase == "alpha_search":
            row.update(search="bracket", evaluations=evaluations)
        if phase == "selection":
            row["purity"] = purity
        rows.append(row)
    return rows


def _purity(corpus: str, identities: list[Any]) -> Optional[float]:
    """Share of trusted samples (keys, or positions of the training key list) whose noisy label is the clean one."""
    keys, noisy, clean = corpus_labels(Path(corpus))
    chosen = [keys[i] if isinstance(i, int) else i for i in identities]
    return sum(noisy[k] == clean[k] for k in chosen) / len(chosen) if chosen else None


def _evaluations(search: Any) -> int:
    return 1 + len(search.metrics) + len(search.kind_trials)


def worker(corpus: str, model_dir: str, out: str) -> None:
    """`sap_correct` three times: the recipe's full selection pass (bracket), the full grid from its statistics,
    and the bracket with `selection_subset` (a random share of the training stream, `--subset_share`)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from common import recipe_sap_config
    from transformers import ViTForImageClassification

    from sap_hf import Runtime, sap_correct
    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images

    torch.set_num_threads(1)
    quiet_libraries()
    decodes = count_decodes()
    accelerator = Accelerator(cpu=True)
    model = ViTForImageClassification.from_pretrained(model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    transform = ImageTransform(image_size=model.config.image_size)
    train, val = (undecoded_images(load_clothing1m(corpus, split)) for split in ("noisy_train", "validation"))
    settings = json.loads((Path(out).parent / "worker_settings.json").read_text())
    config = recipe_sap_config(**settings["overrides"])  # recipes/configs/default.yaml's SAP settings
    # The statistics of the correction, saved by sap_correct itself, feed the full-grid search below.
    stats_path = Path(out).with_name(Path(out).stem + "_stats.safetensors")
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)  # a file left there would be loaded: no statistics pass to time
    log = PhaseLog(decodes)

    def correct(data: Any, sap_config: Any, **kwargs: Any) -> tuple[Any, dict[str, list[float]]]:
        model.load_state_dict(original)
        accelerator.wait_for_everyone()
        clock, before = time.perf_counter(), decodes[0]
        log.start()
        result = sap_correct(
            model,
            data,
            val,
            sap_config,
            runtime=Runtime(accelerator=accelerator, collate_fn=transform.collate, show_progress=False, on_phase=log),
            **kwargs,
        )
        return result, _phases(log, [time.perf_counter() - clock, decodes[0] - before])

    result, phases = correct(train, config, stats_path=stats_path)
    spans = list(log.spans)
    bracket = result.rounds[0]
    # The same alpha search with the full grid, from the same statistics (loaded from stats_path: no data pass,
    # no selection). Its row is its evaluations, as the bracket's alpha_search row.
    grid_result, grid_phases = correct(None, dataclasses.replace(config, alpha_search="grid"), stats_path=stats_path)
    grid = grid_result.rounds[0]
    subset_result, subset_phases = correct(
        train, dataclasses.replace(config, selection_subset=settings["subset_share"])
    )
    shards = gather_object([{"pass": phases, "grid": grid_phases, "subset": subset_phases}])
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)
        processes = accelerator.num_processes
        grid_row = _rows(processes, "pass", shards, "grid", _evaluations(grid), None)[3]
        record = {
            "processes": processes,
            "rows": _rows(
                processes, "pass", shards, "pass", _evaluations(bracket), _purity(corpus, result.trusted_indices)
            )
            + [dict(grid_row, search="grid")]
            + _rows(
                processes,
                "subset",
                shards,
                "subset",
                _evaluations(subset_result.rounds[0]),
                _purity(corpus, subset_result.trusted_indices),
            ),
            "timings": {k: round(v, 3) for k, v in result.timings.items()},  # SAPResult.timings of the main process
            "grid_timings": {k: round(v, 3) for k, v in grid_result.timings.items()},
            "subset_timings": {k: round(v, 3) for k, v in subset_result.timings.items()},
            "phase_log": [{"phase": name, "seconds": round(sec, 3), "decodes": d} for name, sec, d in spans],
            "choice": {
                name: _choice_record(found)
                for name, found in (("bracket", bracket), ("grid", grid), ("subset", subset_result.rounds[0]))
            },
            "val_accuracy_before": bracket.baseline.get("accuracy"),
            "num_trusted": result.num_trusted,
            "subset_share": settings["subset_share"],
            "config": config.to_dict(),
            "timing_method": "sap_correct(on_phase=...): each process times its own phases, no barrier between them",
            "library_intact": library_intact(),
        }
        Path(out).write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group before exit: a live one can abort the teardown


def _choice_record(search: Any) -> dict[str, Any]:
    return {
        "alpha": search.best_alpha,
        "kind_alphas": search.kind_alphas,
        "val_accuracy": search.best_metrics.get("accuracy"),
    }


def trainer_worker(corpus: str, model_dir: str, out: str) -> None:
    """`SAPTrainer.correct()` with `trusted_source="training"`: the trusted samples from the losses the trainer
    recorded while it trained the model (`memorise`), no selection pass; the shared evaluation of the alpha search."""
    import torch
    from accelerate.utils import gather_object
    from common import recipe_sap_config
    from transformers import TrainingArguments, ViTForImageClassification

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images
    from sap_hf.trainer import SAPTrainer
    from sap_hf.trainer.recorded import TrainingLosses

    torch.set_num_threads(1)
    quiet_libraries()
    decodes = count_decodes()
    model = ViTForImageClassification.from_pretrained(model_dir)
    transform = ImageTransform(image_size=model.config.image_size)
    val = undecoded_images(load_clothing1m(corpus, "validation"))
    settings = json.loads((Path(out).parent / "worker_settings.json").read_text())
    config = recipe_sap_config(**{**settings["overrides"], "selection_rule": "loss", "trusted_source": "training"})
    args = TrainingArguments(
        output_dir=str(Path(out).with_suffix("")),
        per_device_eval_batch_size=config.batch_size,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
    )
    trainer = SAPTrainer(
        model=model,
        args=args,
        train_dataset=CorpusRows(Path(corpus)),
        eval_dataset=val,
        data_collator=transform.collate,
        sap_config=config,
    )
    trainer.training_losses = TrainingLosses(len(trainer.train_dataset), config.training_loss_epochs)
    problem = trainer.training_losses.restore(model_dir)  # what train() recorded
    if problem is not None:
        raise RuntimeError(f"{model_dir}: {problem}; delete memorised.json there to train the model again.")
    log = PhaseLog(decodes)
    trainer.accelerator.wait_for_everyone()
    clock, before = time.perf_counter(), decodes[0]
    log.start()
    result = trainer.correct(on_phase=log)
    phases = _phases(
        log, [time.perf_counter() - clock, decodes[0] - before]
    )  # selection: from the recorded losses, 0 decodes
    shards = gather_object([{"training": phases}])
    if trainer.accelerator.is_main_process:
        processes = trainer.accelerator.num_processes
        record = {
            "processes": processes,
            "rows": _rows(
                processes,
                "training",
                shards,
                "training",
                _evaluations(result.rounds[0]),
                _purity(corpus, result.trusted_indices),
            ),
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "choice": {"training": _choice_record(result.rounds[0])},
            "num_trusted": result.num_trusted,
            "via": "SAPTrainer.correct(), trusted_source='training'",
        }
        Path(out).write_text(json.dumps(record, indent=1))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def launch(processes: int, corpus: Path, model_dir: Path, out: Path, mode: str = "--worker") -> dict[str, Any]:
    """`accelerate launch` of this script's `mode` (--worker: sap_correct; --worker_trainer: SAPTrainer.correct())."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    # The port stays bound here (SO_REUSEADDR, not listening) until the run ends: no other socket gets it,
    # the TCPStore can still listen on it (a random port may be in use: EADDRINUSE, seen with the tests' ports).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("", 0))
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(held.getsockname()[1]),
            "--num_processes",
            str(processes),
        ]
        command += (["--multi_gpu"] if processes > 1 else ["--cpu"]) + [
            __file__,
            mode,
            str(corpus),
            str(model_dir),
            str(out),
        ]
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
            selection = select_trusted(
                model, run["train_set"], recipe.trusted_per_class, rule=recipe.selection_rule, runtime=passes
            )
            stats = collect_statistics(
                model,
                run["train_set"].select(selection.indices),
                find_target_modules(model),
                accumulation_dtype=recipe.accumulation_dtype,
                runtime=passes,
            )
            bases = eigenbases(stats)
            kinds = group_kinds(stats.groups, classifier_names(model))
            evaluate = lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])}  # noqa: E731
            for scope in ("shared", "per_kind"):
                found = {}
                for method, tolerance in (
                    ("grid", 0.0),
                    ("bracket", recipe.alpha_search_tolerance),
                    ("bracket_tol0", 0.0),
                ):
                    model.load_state_dict(state)
                    res = search_alpha(
                        model,
                        stats,
                        list(DEFAULT_ALPHAS),
                        evaluate,
                        bases=bases,
                        kinds=kinds if scope == "per_kind" else None,
                        method=method.split("_")[0],
                        tolerance=tolerance,
                    )
                    found[method] = {
                        "alpha": res.best_alpha,
                        "kind_alphas": res.kind_alphas,
                        "val_accuracy": res.best_metrics["accuracy"],
                        "test_accuracy": accuracy(model, data["test_x"], data["test_y"]),
                        "evaluations": 1 + len(res.metrics) + len(res.kind_trials),
                    }
                grid, fast = found["grid"], found["bracket"]
                same_alpha = grid["alpha"] == fast["alpha"] and grid["kind_alphas"] == fast["kind_alphas"]
                zero = found["bracket_tol0"]
                zero.update(
                    same_alpha=grid["alpha"] == zero["alpha"] and grid["kind_alphas"] == zero["kind_alphas"],
                    val_gap_points=round(100 * (grid["val_accuracy"] - zero["val_accuracy"]), 3),
                )
                rows.append(
                    {
                        "setting": setting,
                        "seed": seed,
                        "scope": scope,
                        "grid": grid,
                        "bracket": fast,
                        "bracket_tolerance_0": zero,
                        "same_alpha": same_alpha,
                        "val_gap_points": round(100 * (grid["val_accuracy"] - fast["val_accuracy"]), 3),
                        "evaluation_ratio": round(fast["evaluations"] / grid["evaluations"], 3),
                    }
                )
                print(
                    f"  {setting} seed {seed} {scope:8s}: grid {grid['evaluations']:2d} evals -> "
                    f"{_choice(grid)} val {grid['val_accuracy']:.4f} | bracket {fast['evaluations']:2d} evals -> "
                    f"{_choice(fast)} val {fast['val_accuracy']:.4f}"
                )
    summary = {}
    for scope in ("shared", "per_kind"):
        chosen = [r for r in rows if r["scope"] == scope]
        if chosen:
            grid_total = sum(r["grid"]["evaluations"] for r in chosen)
            fast_total = sum(r["bracket"]["evaluations"] for r in chosen)
            summary[scope] = {
                "models": len(chosen),
                "grid_evaluations": grid_total,
                "bracket_evaluations": fast_total,
                "evaluation_ratio": round(fast_total / grid_total, 3),
                "same_choice": sum(r["same_alpha"] or abs(r["val_gap_points"]) <= 0.2 for r in chosen),
                "same_alpha": sum(r["same_alpha"] for r in chosen),
                "max_val_gap_points": max(abs(r["val_gap_points"]) for r in chosen),
                "tolerance_0": {
                    "bracket_evaluations": sum(r["bracket_tolerance_0"]["evaluations"] for r in chosen),
                    "same_choice": sum(
                        r["bracket_tolerance_0"]["same_alpha"]
                        or abs(r["bracket_tolerance_0"]["val_gap_points"]) <= 0.2
                        for r in chosen
                    ),
                    "max_val_gap_points": max(abs(r["bracket_tolerance_0"]["val_gap_points"]) for r in chosen),
                },
            }
    return {
        "alphas": list(DEFAULT_ALPHAS),
        "tolerance": recipe.alpha_search_tolerance,
        "trusted": f"{recipe.selection_rule}, {recipe.trusted_per_class} per class, {recipe.accumulation_dtype} statistics",
        "rows": rows,
        "summary": summary,
        "missing_models": missing,
    }


def _choice(found: dict[str, Any]) -> str:
    if found["kind_alphas"]:
        return ",".join("-" if a is None else f"{a:g}" for a in found["kind_alphas"].values())
    return "unchanged" if found["alpha"] is None else f"{found['alpha']:g}"


# --------------------------------------------------------------------------------------------
# Extrapolation, report, plot
# --------------------------------------------------------------------------------------------


def clothing1m_share(sources_path: Path) -> dict[str, Any]:
    """The selection_subset share for Clothing1M, from benchmarks/selection_sources.py's measurement.

    What sets a share's purity is how many candidates each trusted sample is the lowest of: the k lowest
    of m random samples of a class sit at the k/m quantile of that class's scores. So the smallest
    measured share that met the target (purity within 1 point of the full pass, same alpha choice on
    every model) fixes the candidates per trusted sample, and Clothing1M's share keeps that ratio with
    100 trusted of ~71k images per class.
    """
    if not Path(sources_path).is_file():
        return {"note": f"{sources_path} missing: no measured share", "share": None}
    sources = json.loads(Path(sources_path).read_text())
    recipe = sources["recipe"]
    per_class_train = sources["train_size"] / sources["classes"]
    shares = {float(name.split("_")[1]): v for name, v in sources["summary"].items() if name.startswith("subset_")}
    if not shares:
        return {"note": "no share measured", "share": None}
    met = sorted(share for share, v in shares.items() if v["meets_target"])
    # None met: the purest share measured (the largest), flagged; its Clothing1M row is then an optimistic bound
    chosen = met[0] if met else max(shares, key=lambda share: (-shares[share]["max_purity_gap_points"], share))
    ratio = chosen * per_class_train / recipe["trusted_per_class"]
    per_class_c1m = CLOTHING1M["train"] / CLASSES
    return {
        "measured_share": chosen,
        "met_target": bool(met),
        "purity_gap_points": shares[chosen]["max_purity_gap_points"],
        "candidates_per_trusted": ratio,
        "share": min(1.0, ratio * CLOTHING1M["trusted"] / CLASSES / per_class_c1m),
        "rule": "measured share x (per-class training images / trusted per class), kept at Clothing1M",
    }


def extrapolate(record: dict[str, Any], sources_path: Path = RESULTS_DIR / "selection_sources.json") -> dict[str, Any]:
    """Clothing1M with ViT-B/16 from per-image rates: the measured decode+transform rate and speed.json's ViT-B rates.

    Evaluation counts come from the accuracy benchmark's models (mean over models, 14-alpha grid):
    the grid's count, and the bracket's measured count, for alpha_scope shared and per_kind. Selection
    sources: 'pass' (one forward per training image, the ViT-B config's 'loss' rule), 'subset' (the same
    on `clothing1m_share`'s share) and 'training' (the losses SAPTrainer recorded: no forward; the
    per-example cost of selecting from them, measured on the corpus by SAPTrainer.correct(), times 1M).
    """
    speed_path = RESULTS_DIR / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
    base = {r["method"]: r for r in speed.get("rows", []) if r.get("model") == "base"}
    summary = record["search_comparison"].get("summary", {})
    if "inference" not in base or not summary:
        return {
            "note": "needs benchmarks/results/speed.json's ViT-Base rows and the search comparison; no extrapolation."
        }
    forward = base["inference"]["seconds"] / base["inference"]["n_samples"]  # s per image, 1 CPU thread
    stats_ratio = base["stats_exact"]["seconds"] / base["inference"]["seconds"]
    decode = record["finetune_epoch"]["decode_seconds_per_image"]
    train, val, trusted = CLOTHING1M["train"], CLOTHING1M["validation"], CLOTHING1M["trusted"]
    share = clothing1m_share(sources_path)
    recorded = [
        _by_source(r, "training")["selection"]["seconds"]
        for r in record["runs"]
        if r.get("via") == "SAPTrainer.correct"
    ]
    from_scores = min(recorded) / record["corpus"]["train"] if recorded else 0.0  # s per recorded example
    hours = lambda seconds: round(seconds / 3600, 2)  # noqa: E731
    per_pass = {
        "selection_pass": train * (decode + forward),  # the ViT-B config's rule: one forward per image
        "selection_shift_loss": train * (decode + 5 * forward),  # the image and four shifted copies
        "selection_subset": (share["share"] or 1.0) * train * (decode + forward),
        "selection_training": train * from_scores,
        "statistics": trusted * (decode + stats_ratio * forward),
        "one_evaluation": val * (decode + forward),
        "finetune_epoch": train * (decode + 3 * forward),
    }
    table = []
    for processes in CLOTHING1M["processes"]:
        for source in ("pass", "subset", "training"):
            for scope, values in summary.items():
                for search in ("grid", "bracket"):
                    evaluations = values[f"{search}_evaluations"] / values["models"]
                    seconds = {
                        "selection": per_pass[f"selection_{source}"],
                        "statistics": per_pass["statistics"],
                        "alpha_search": evaluations * per_pass["one_evaluation"],
                    }
                    seconds["total"] = sum(seconds.values())
                    table.append(
                        {
                            "processes": processes,
                            "source": source,
                            "alpha_scope": scope,
                            "search": search,
                            "evaluations": round(evaluations, 1),
                            **{k: hours(v / processes) for k, v in seconds.items()},
                            "finetune_epoch": hours(per_pass["finetune_epoch"] / processes),
                            "over_epoch": round(seconds["total"] / per_pass["finetune_epoch"], 3),
                        }
                    )
    return {
        "unit": "hours of one CPU core per process (1 torch thread), ideal scaling over processes",
        "rates": {
            "decode_and_transform_s_per_image": round(decode, 5),
            "vit_base_forward_s_per_image": round(forward, 4),
            "stats_over_inference": round(stats_ratio, 3),
            "finetune_step_over_forward": 3.0,
            "select_from_recorded_losses_s_per_example": from_scores,
        },
        "subset_share": share,
        "per_pass_hours_1_process": {k: hours(v) for k, v in per_pass.items()},
        "formulas": {
            "selection pass": "train x (decode + forward) ('loss', the ViT-B config; shift_loss: 5 forwards)",
            "selection subset": "share x train x (decode + forward)",
            "selection training": "train x (measured seconds per recorded example of SAPTrainer.correct()'s selection)",
            "statistics": "trusted x (decode + stats_ratio x forward)",
            "alpha_search": "evaluations x validation x (decode + forward)",
            "finetune_epoch": "train x (decode + 3 forward)",
            "eigh": "not included: seconds (speed.json eigh_project: once per correction)",
            "recording": "not included: one cross-entropy of logits the training step has computed, per example",
        },
        "table": table,
        "gpu": "not measured: no GPU was lent to this task",
    }


def print_report(record: dict[str, Any]) -> None:
    print(
        f"\nCorpus: {record['corpus']['train']} training + {record['corpus']['validation']} validation JPEGs "
        f"({record['corpus']['config']['image_size']}x{record['corpus']['config']['image_size']}); one fine-tuning "
        f"epoch {record['finetune_epoch']['seconds']:.1f} s (trained model), "
        f"{record['memorised_model']['epoch']['seconds']:.1f} s (memorised model, noisy fit "
        f"{100 * record['memorised_model']['noisy_fit']:.1f}%)"
    )
    print(
        f"{'model':9s} {'via':18s} {'P':>2} {'source':8s} {'phase':13s} {'search':7s} {'evals':>5s} {'seconds':>8s} "
        f"{'decodes':>8s} {'per process':>14s} {'purity':>6s}"
    )
    for run in record["runs"]:
        for row in run["rows"]:
            purity = "" if row.get("purity") is None else f"{100 * row['purity']:.0f}%"
            print(
                f"{run['model']:9s} {run['via']:18s} {row['processes']:>2} {row.get('source', ''):8s} {row['phase']:13s} "
                f"{row.get('search', ''):7s} {row.get('evaluations', ''):>5} {row['seconds']:8.2f} {row['decodes']:8d} "
                f"{str(row.get('decodes_per_process', '')):>14s} {purity:>6s}"
            )
    for name, value in record["targets"].items():
        print(f"  {name}: {value}")


def plot(record: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    labels = []
    colours = {
        "selection": "#4c72b0",
        "statistics": "#55a868",
        "eigh": "#c44e52",
        "alpha_search": "#8172b2",
        "write": "#ccb974",
    }
    bars = [
        (run, source)
        for run in record["runs"]
        for source in dict.fromkeys(r.get("source", "pass") for r in run["rows"])
    ]
    for i, (run, source) in enumerate(bars):
        rows = _by_source(run, source)
        bottom = 0.0
        for phase, colour in colours.items():
            ax.bar(i, rows[phase]["seconds"], bottom=bottom, color=colour, label=phase if i == 0 else None)
            bottom += rows[phase]["seconds"]
        labels.append(f"{run['model']}\n{source}, {run['processes']}p\n{rows['total']['decodes']} dec.")
    for j, (name, seconds) in enumerate(
        (
            ("fine-tune epoch\n(trained)", record["finetune_epoch"]["seconds"]),
            ("fine-tune epoch\n(memorised)", record["memorised_model"]["epoch"]["seconds"]),
        )
    ):
        ax.bar(len(bars) + j, seconds, color="#999999", label="1 fine-tuning epoch" if j == 0 else None)
        labels.append(name)
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("seconds (1 torch thread per process)")
    ax.set_title(f"Correction cost by selection source, {record['corpus']['train']} training JPEGs")
    ax.legend(fontsize=7)
    ax = axes[1]
    table = [r for r in record["extrapolation"].get("table", []) if r["processes"] == 1 and r["search"] == "bracket"]
    if table:
        names = [f"{r['source']}\n{r['alpha_scope']}" for r in table]
        ax.bar(range(len(table)), [r["over_epoch"] for r in table], color="#4c72b0")
        ax.axhline(0.1, color="#c44e52", linestyle="--", label="target 0.1 epoch")
        ax.set_xticks(range(len(table)), names, fontsize=8)
        ax.set_ylabel("correction / one fine-tuning epoch")
        ax.set_title("Clothing1M (1M images, ViT-B/16), extrapolated, bracket search")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return {}
    if args.worker_trainer:
        trainer_worker(*args.worker_trainer)
        return {}
    quiet_libraries()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    corpus_dir = Path(args.corpus_dir)
    started = time.perf_counter()
    print(f"Corpus in {corpus_dir} ...")
    corpus = write_corpus(corpus_dir, args.per_class, args.val_per_class, args.image_size)
    settings = {
        "overrides": {"alphas": [10, 100, 1000], "trusted_per_class": 2} if args.quick else {},
        "subset_share": args.subset_share,
    }
    (corpus_dir / "worker_settings.json").write_text(json.dumps(settings))
    model_dir = corpus_dir / ("model_tiny_vit_1epoch" if args.quick else "model_tiny_vit_3epochs")
    print("One fine-tuning epoch ...")
    epoch = finetune_epoch(corpus_dir, model_dir, epochs=1 if args.quick else 3)
    if args.retime_epoch:  # the cached timing came from another (busier) moment: time one more epoch now
        epoch = dict(epoch, **time_epoch(corpus_dir, model_dir))
    epoch = dict(epoch, decode_seconds_per_image=decode_rate(corpus_dir))
    memorised_dir = corpus_dir / f"model_memorised_{args.memorise_epochs}epochs"
    print(f"A model that memorises the noise ({args.memorise_epochs} epochs) ...", flush=True)
    memorised = memorise(corpus_dir, memorised_dir, args.memorise_epochs)
    memorised = dict(memorised, epoch=time_epoch(corpus_dir, memorised_dir))
    models = {"trained": model_dir, "memorised": memorised_dir}
    runs = []
    for name, directory in models.items():
        for processes in args.processes:
            for mode, via in (("--worker", "sap_correct"), ("--worker_trainer", "SAPTrainer.correct")):
                if via == "SAPTrainer.correct" and name != "memorised":  # only it has recorded training losses
                    continue
                if args.quick and name == "memorised" and processes != max(args.processes):  # a short smoke run
                    continue
                saved = (
                    corpus_dir / f"correction_{name}_{via.split('.')[0]}_{processes}p.json"
                )  # --reuse_runs reads it
                if args.reuse_runs and saved.is_file():
                    runs.append(json.loads(saved.read_text()))
                    continue
                print(f"{via} on the {name} model with {processes} process(es) ...", flush=True)
                run = dict(launch(processes, corpus_dir, directory, saved, mode), model=name, via=via)
                saved.write_text(json.dumps(run, indent=1))
                runs.append(run)
    previous = out_dir / f"correction_cost{suffix}.json"
    if args.reuse_comparison and previous.is_file():
        comparison = json.loads(previous.read_text())["search_comparison"]
    else:
        print("Bracket vs grid on the accuracy benchmark's models ...")
        comparison = compare_searches(args)
    record: dict[str, Any] = {
        "corpus": corpus,
        "finetune_epoch": epoch,
        "memorised_model": memorised,
        "runs": runs,
        "search_comparison": comparison,
    }
    record["extrapolation"] = extrapolate(record, args.selection_sources)
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
    transform = ImageTransform(image_size=model.config.image_size)
    model.train()
    started, before = time.perf_counter(), decodes[0]  # the stream is read inside the timing, as in training
    train_on_rows(model, optimizer, transform, list(undecoded_images(load_clothing1m(corpus, "noisy_train"))))
    return {
        "seconds": time.perf_counter() - started,
        "decodes": decodes[0] - before,
        "retimed": True,
        "loadavg_after": loadavg(),
    }


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


def _by_source(run: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """A run's rows of one correction (`source`), by phase (the bracket's alpha_search, not the grid's)."""
    return {r["phase"]: r for r in run["rows"] if r.get("source", "pass") == source and r.get("search") != "grid"}


def targets(record: dict[str, Any]) -> dict[str, Any]:
    corpus = record["corpus"]
    out: dict[str, Any] = {}
    epochs = {
        "trained": record["finetune_epoch"]["seconds"],
        "memorised": record["memorised_model"]["epoch"]["seconds"],
    }
    pass_rows = {}
    for run in record["runs"]:
        tag = f"{run['model']}_{run['processes']}p"
        for source in dict.fromkeys(r.get("source", "pass") for r in run["rows"]):
            rows = _by_source(run, source)
            evaluations = rows["alpha_search"]["evaluations"]
            selected = {
                "pass": corpus["train"],
                "subset": run.get("subset_share", 0) * corpus["train"],
                "training": 0,
            }[source]
            ideal = round(selected + run["num_trusted"] + corpus["validation"] * evaluations)
            name = f"{tag}_{source}"
            search_images = corpus["validation"] * evaluations
            out[name] = {
                "decodes": rows["total"]["decodes"],
                "ideal": ideal,
                "decode_ratio": round(rows["total"]["decodes"] / ideal, 3),
                "met_decodes_le_1.1": rows["total"]["decodes"] <= 1.1 * ideal,
                "alpha_search_max_process_share": round(
                    max(rows["alpha_search"]["decodes_per_process"]) / search_images, 3
                ),
                "total_over_finetune_epoch": round(rows["total"]["seconds"] / epochs[run["model"]], 3),
                "purity": rows["selection"].get("purity"),
                "choice": run["choice"].get("bracket" if source == "pass" else source),
            }
            if run["processes"] > 1:
                out[name]["met_alpha_search_le_0.6"] = out[name]["alpha_search_max_process_share"] <= 0.6
            if source == "pass":
                pass_rows[tag] = out[name]
    for name, values in out.items():
        reference = pass_rows.get(name.rsplit("_", 1)[0])
        if reference is not None and values is not reference:
            values["purity_gap_points"] = round(100 * (reference["purity"] - values["purity"]), 2)
            values["same_alpha_as_pass"] = values["choice"]["kind_alphas"] == reference["choice"]["kind_alphas"]
    by_p = {run["processes"]: _by_source(run, "pass") for run in record["runs"] if run["model"] == "trained"}
    if 1 in by_p and 2 in by_p:
        ratio = by_p[2]["selection"]["seconds"] / by_p[1]["selection"]["seconds"]
        out["selection_2p_over_1p"] = {"ratio": round(ratio, 3), "met_le_0.6": ratio <= 0.6}
    for run in record["runs"]:
        grid = next((r for r in run["rows"] if r.get("search") == "grid"), None)
        if grid is None:
            continue
        fast = _by_source(run, "pass")["alpha_search"]
        out[f"corpus_search_evaluations_{run['model']}_{run['processes']}p"] = {
            "bracket": fast["evaluations"],
            "grid": grid["evaluations"],
            "ratio": round(fast["evaluations"] / grid["evaluations"], 3),
            "same_alpha": run["choice"]["bracket"]["kind_alphas"] == run["choice"]["grid"]["kind_alphas"]
            and run["choice"]["bracket"]["alpha"] == run["choice"]["grid"]["alpha"],
            "val_gap_points": round(
                100 * (run["choice"]["grid"]["val_accuracy"] - run["choice"]["bracket"]["val_accuracy"]), 3
            ),
        }
    summary = record["search_comparison"].get("summary", {})
    for scope, values in summary.items():
        out[f"accuracy_models_{scope}"] = {
            **values,
            "met_le_0.5_same_choice": values["evaluation_ratio"] <= 0.5 and values["same_choice"] == values["models"],
        }
    table = record["extrapolation"].get("table", [])
    for source in dict.fromkeys(r["source"] for r in table):
        best = [r for r in table if r["source"] == source and r["search"] == "bracket" and r["processes"] == 1]
        out[f"clothing1m_{source}"] = {
            r["alpha_scope"]: {"over_epoch": r["over_epoch"], "met_le_0.1": r["over_epoch"] <= 0.1} for r in best
        }
    return out


if __name__ == "__main__":
    main()
