"""Correction cost at Clothing1M scale: the data work of one SAP correction, on 1 and 2 processes.

    python benchmarks/correction_cost.py            # 10,010 training JPEGs at 224x224 (corpus cached)
    python benchmarks/correction_cost.py --quick    # smoke run: a few hundred small JPEGs

Writes a Clothing1M-layout corpus of upscaled Fashion-MNIST JPEGs with 40% noisy training labels, trains the
recipe's tiny ViT on it and a second model that memorises the noise (`SAPTrainer`, losses recorded), and runs the
recipe's correction under `accelerate launch` on 1 and 2 processes: each phase's seconds from the library's own
`on_phase` hook and every PIL decode counted, with the trusted set from a full pass, a share of the training stream
or the recorded losses. Then bracket vs grid alpha search on the accuracy benchmark's models, and an extrapolation
to Clothing1M with ViT-B/16. Protocol and results: benchmarks/studies/cost.md ("Correction cost").

Writes benchmarks/results/correction_cost.json and correction_cost.png (`--quick`: *_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any, Optional

import common
from common import COMMITTED_RESULTS, RESULTS_DIR, ROOT, loadavg, quiet_libraries, recipe_sap_config


CLASSES = 14
FASHION_CLASSES = 10
#: A result row's phase -> the library's `on_phase` name it sums ("search" encloses eigh, evaluations and write).
ROW_PHASES = {
    "selection": "selection",
    "statistics": "statistics",
    "eigh": "eigh",
    "alpha_search": "evaluation",
    "write": "write",
}
PHASES = (*ROW_PHASES, "total")
CLOTHING1M = {"train": 1_000_000, "validation": 14_000, "trusted": 14 * 100, "processes": [1, 8]}
#: How each correction is launched: the worker option of this script that runs it in every process.
WORKERS = {"sap_correct": "--worker", "SAPTrainer.correct": "--worker_trainer"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out_dir", default=str(RESULTS_DIR))
    add("--quick", action="store_true", help="smoke run: small corpus, short grid, few models")
    add("--corpus_dir", default="/work/cache/c1m_corpus")
    add("--per_class", type=int, default=715, help="training images per class (14 classes)")
    add("--val_per_class", type=int, default=72)
    add("--image_size", type=int, default=224, help="side of the JPEGs written")
    add("--processes", type=int, nargs="+", default=[1, 2])
    add(
        "--cache_dir",
        default="/work/cache/accuracy",
        help="the from-scratch models of the (archived) accuracy study, `common.prepare_run`'s: cleanup.py --cache_dir fills one",
    )
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--settings", nargs="+", default=["sym40", "asym40"])
    add("--no_plot", action="store_true")
    add("--replot", action="store_true", help="the table of corrections, targets and figure again from the JSON")
    add("--reuse_runs", action="store_true", help="report the corrections measured by the last run again")
    add("--retime_epoch", action="store_true", help="time one more epoch of the cached model now (not saved)")
    add("--reuse_comparison", action="store_true", help="take the bracket/grid comparison from the last JSON")
    add("--subset_share", type=float, default=0.25, help="SAPConfig.selection_subset of the subset correction")
    add("--memorise_epochs", type=int, default=60, help="training epochs of the memorised model")
    add(
        "--selection_sources",
        default=str(COMMITTED_RESULTS / "selection_sources.json"),
        help="selection_sources.py's record: the subset share the Clothing1M extrapolation uses",
    )
    for option in WORKERS.values():  # one correction in each process of `accelerate launch`
        add(option, nargs=3, metavar=("CORPUS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.val_per_class, args.image_size = 12, 4, 64
        args.seeds, args.settings, args.memorise_epochs, args.subset_share = [0], ["sym40"], 2, 0.5
        named = sys.argv[1:] if argv is None else argv  # the options given, on the command line or in `argv`
        if "--cache_dir" not in named:  # the comparison needs trained models: only when asked for
            args.cache_dir = None
        if "--corpus_dir" not in named:
            args.corpus_dir = tempfile.mkdtemp(prefix="c1m_quick_")
    return args


# ----- The corpus and the models -----


def write_corpus(root: Path, per_class: int, val_per_class: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    """A Clothing1M-layout directory of real Fashion-MNIST images (cached: rewritten only for another config).

    Classes 10-13 are classes 0-3 rotated by 90 degrees, so the Clothing1M reader's 14 classes all exist."""
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
    split_of = [split for split, count in counts.items() for _ in range(count)]
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(FASHION_CLASSES)}
    taken = {c: 0 for c in range(FASHION_CLASSES)}
    keys: dict[str, list[str]] = {split: [] for split in counts}
    clean: dict[str, int] = {}
    for label in range(CLASSES):
        source = label % FASHION_CLASSES
        chosen = pools[source][taken[source] : taken[source] + len(split_of)]
        taken[source] += len(split_of)
        for index, split in zip(chosen, split_of):
            image = Image.fromarray(images[index]).convert("RGB")
            if label >= FASHION_CLASSES:
                image = image.transpose(Image.Transpose.ROTATE_90)
            number = len(clean)
            key = f"images/{number % 10}/{number // 10 % 100}/{number}.jpg"
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            image.resize((image_size, image_size), Image.Resampling.BICUBIC).save(
                root / key, format="JPEG", quality=90
            )
            keys[split].append(key)
            clean[key] = label
    order = rng.permutation(len(keys["train"]))  # a stream in no class order, as a web crawl
    train = [keys["train"][i] for i in order]
    noisy, _ = add_label_noise([clean[k] for k in train], 0.4, num_classes=CLASSES, seed=seed)
    files = {
        NOISY_KV: [f"{k} {int(y)}" for k, y in zip(train, noisy)],
        CLEAN_KV: [f"{k} {y}" for k, y in clean.items()],
        "noisy_train_key_list.txt": train,
        "clean_train_key_list.txt": train,
        "clean_val_key_list.txt": keys["val"],
        "clean_test_key_list.txt": keys["test"],
    }
    for name, lines in files.items():
        (root / name).write_text("".join(f"{line}\n" for line in lines))
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


def stream(corpus: Any, split: str = "noisy_train") -> Any:
    """A split of the corpus as the recipe reads it: streamed raw rows, decoded by `ImageTransform.collate`."""
    from sap_hf.data import load_clothing1m, undecoded_images

    return undecoded_images(load_clothing1m(corpus, split))


def corpus_labels(corpus: Path) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """The training keys in stream order, their noisy labels and every key's clean label (for purity only)."""
    from sap_hf.data.clothing1m import CLEAN_KV, NOISY_KV

    def read(name: str) -> list[str]:
        return [line for line in (corpus / name).read_text().splitlines() if line.strip()]

    def labels(name: str) -> dict[str, int]:
        return {key: int(label) for key, label in (line.split() for line in read(name))}

    return [key.strip() for key in read("noisy_train_key_list.txt")], labels(NOISY_KV), labels(CLEAN_KV)


def count_decodes() -> list[int]:
    """Count real PIL decodes in this process (a reload of a decoded image is not one); PIL's name, not the library's."""
    from PIL import ImageFile

    counter = [0]
    load = ImageFile.ImageFile.load

    def counting_load(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.tile:
            counter[0] += 1
        return load(self, *args, **kwargs)

    ImageFile.ImageFile.load = counting_load
    return counter


def corpus_vit(image_size: int, patch_size: int) -> Any:
    """A tiny ViT (hidden 64, 4 layers) on RGB with the Clothing1M reader's 14 classes; at 32 / patch 4 it is the
    recipe's model for a Clothing1M directory (sap_hf.cli.sources.load_model without model_name_or_path)."""
    from transformers import ViTForImageClassification

    from sap_hf.data import CLOTHING1M_CLASSES
    from sap_hf.models import tiny_vit_config

    geometry = dict(image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=64, num_hidden_layers=4)
    config = tiny_vit_config(num_labels=CLASSES, id2label=dict(enumerate(CLOTHING1M_CLASSES)), **geometry)
    return ViTForImageClassification(config)


def timed_epoch(model: Any, optimizer: Any, transform: Any, read_rows: Callable[[], Any], decodes: list[int]) -> dict:
    """One training epoch over the rows `read_rows()` streams, in their order, read inside the timing as in training
    (`transform.collate` decodes batches of 32, the last one partial; the benchmarks' loop `common.train_epochs`)."""
    started, before = time.perf_counter(), decodes[0]
    rows = list(read_rows())

    def batch_loss(index: Any, epoch: int) -> Any:
        inputs = transform.collate([rows[i] for i in index.tolist()])
        return model(pixel_values=inputs["pixel_values"], labels=inputs["labels"]).loss

    common.train_epochs(model, len(rows), 32, batch_loss, optimizer, generator=None, epochs=[0])
    return {"seconds": time.perf_counter() - started, "images": len(rows), "decodes": decodes[0] - before}


def finetune_epoch(corpus: Path, model_dir: Path, epochs: int = 3, lr: float = 5e-4) -> dict[str, Any]:
    """Train the recipe's tiny ViT on the streamed corpus (AdamW, batch 32), cached in `model_dir`. The first epoch
    is the unit the correction is compared with; the model after `epochs` (trained, not memorised) is corrected."""
    import torch

    from sap_hf.data import ImageTransform

    record_path = model_dir / "epoch.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    decodes = count_decodes()
    model = corpus_vit(32, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    transform = ImageTransform(image_size=32)
    train = stream(corpus)
    timed = [
        timed_epoch(
            model, optimizer, transform, functools.partial(train.shuffle, seed=epoch, buffer_size=2048), decodes
        )
        for epoch in range(epochs)
    ]
    record = {
        "seconds": timed[0]["seconds"],
        "images": timed[-1]["images"],
        "decodes": timed[0]["decodes"],
        "batch_size": 32,
        "optimizer": f"AdamW lr={lr:g}",
        "threads": 1,
        "epochs_trained": epochs,
        "all_epoch_seconds": [round(epoch["seconds"], 1) for epoch in timed],
    }
    model.save_pretrained(model_dir)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def time_epoch(corpus: Path, model_dir: Path, lr: float = 5e-4) -> dict[str, Any]:
    """One more training epoch of the cached model, timed like `finetune_epoch`'s first (nothing is saved)."""
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.data import ImageTransform

    torch.set_num_threads(1)
    decodes = count_decodes()
    model = ViTForImageClassification.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    transform = ImageTransform(image_size=model.config.image_size)
    timed = timed_epoch(model, optimizer, transform, lambda: stream(corpus), decodes)
    return {"seconds": timed["seconds"], "decodes": timed["decodes"], "retimed": True, "loadavg_after": loadavg()}


def decode_rate(corpus: Path, images: int = 300) -> float:
    """Seconds per image to read, decode and transform a training JPEG (the recipe's transform), 1 thread."""
    import torch

    from sap_hf.data import ImageTransform

    torch.set_num_threads(1)
    rows = list(stream(corpus).take(images))
    transform = ImageTransform(image_size=32)
    clock = time.perf_counter()
    for start in range(0, len(rows), 32):
        transform.collate(rows[start : start + 32])
    return (time.perf_counter() - clock) / len(rows)


class ListDataset:
    """A list as a map-style dataset: `SAPTrainer` records losses by position of a map-style dataset."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class CorpusRows:
    """The training stream's raw rows by position (the i-th key of the stream), undecoded: what `SAPTrainer` trains
    on when it records losses by position; `ImageTransform.collate` decodes them."""

    def __init__(self, corpus: Path):
        self.keys, self.noisy, self.clean = corpus_labels(corpus)
        self.root = corpus

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        return {"image": {"path": str(self.root / key), "bytes": None}, "label": self.noisy[key], "key": key}


def cpu_training_args(output_dir: str, **kwargs: Any) -> Any:
    """`TrainingArguments` on the CPU that report, save and show nothing."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir, report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no", **kwargs)


def memorise(corpus: Path, model_dir: Path, epochs: int, image_size: int = 28) -> dict[str, Any]:
    """A model that memorised the noise: `SAPTrainer` with the recipe's training for `epochs` and
    `trusted_source="training"`, so the library records every example's training loss by position.

    The images are decoded once into tensors (this model's training speed is not measured), at the Fashion-MNIST
    recipe's geometry (28x28, patch 7: 16 tokens): at 32x32 / patch 4 memorising would take about 4x longer.
    Saved in `model_dir` with the trainer's `TrainingLosses` (the library's own file, as in a checkpoint).
    """
    import torch

    from sap_hf import SAPConfig
    from sap_hf.data import ImageTransform
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
    is_noisy = labels != torch.tensor([rows.clean[k] for k in rows.keys])
    train = [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(len(labels))]
    torch.manual_seed(0)
    model = corpus_vit(image_size, image_size // 4)
    args = cpu_training_args(
        str(model_dir / "_trainer"),
        per_device_train_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=2e-3,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_strategy="no",
        seed=0,
    )
    sap_config = SAPConfig(trusted_source="training")
    trainer = SAPTrainer(model=model, args=args, train_dataset=ListDataset(train), sap_config=sap_config)
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


# ----- One correction, in each process of `accelerate launch` -----


class PhaseLog:
    """The `on_phase` callback of one correction: each phase's seconds (as the library reports them) and decodes.

    A phase's decodes are those counted since the previous callback. Phases run one after the other, except
    "search", which encloses its "eigh", "evaluation"s and "write" and is reported after them: so every decode goes
    to the innermost phase (a "search" entry keeps only what ran outside its parts: 0).
    """

    def __init__(self, decodes: list[int]):
        self.decodes = decodes
        self.mark = decodes[0]
        self.spans: list[tuple[str, float, int]] = []  # (phase, seconds, decodes) in the order the phases ended

    def __call__(self, phase: str, seconds: float) -> None:
        now = self.decodes[0]
        self.spans.append((phase, seconds, now - self.mark))
        self.mark = now

    def measure(self, correct: Callable[[], Any]) -> tuple[Any, dict[str, list[float]]]:
        """Run `correct()`: its result and each row's [seconds, decodes] (total: the whole call)."""
        clock, before = time.perf_counter(), self.decodes[0]
        self.mark, self.spans = before, []
        result = correct()
        total = [time.perf_counter() - clock, self.decodes[0] - before]
        phases = {}
        for row, phase in ROW_PHASES.items():
            spans = [(seconds, decodes) for name, seconds, decodes in self.spans if name == phase]
            phases[row] = [sum(s for s, _ in spans), sum(d for _, d in spans)]
        return result, {**phases, "total": total}


def phase_rows(shards: list[dict], name: str, source: str, evaluations: int, purity: Optional[float]) -> list[dict]:
    """One correction's rows (`name` in every process's shard): each phase's seconds in the main process, its
    decodes summed over the processes and per process."""
    rows = []
    for phase in PHASES:
        per_process = [int(shard[name][phase][1]) for shard in shards]
        row = {
            "processes": len(shards),
            "source": source,
            "phase": phase,
            "seconds": round(shards[0][name][phase][0], 3),
            "decodes": sum(per_process),
            "decodes_per_process": per_process,
        }
        if phase == "alpha_search":
            row.update(search="bracket", evaluations=evaluations)
        if phase == "selection":
            row["purity"] = purity
        rows.append(row)
    return rows


def purity(corpus: str, identities: list[Any]) -> Optional[float]:
    """Share of trusted samples (keys, or positions in the training key list) whose noisy label is the clean one."""
    keys, noisy, clean = corpus_labels(Path(corpus))
    chosen = [keys[i] if isinstance(i, int) else i for i in identities]
    return sum(noisy[k] == clean[k] for k in chosen) / len(chosen) if chosen else None


def evaluations_of(search: Any) -> int:
    return 1 + len(search.metrics) + len(search.kind_trials)


def choice_of(search: Any) -> dict[str, Any]:
    return {
        "alpha": search.best_alpha,
        "kind_alphas": search.kind_alphas,
        "val_accuracy": search.best_metrics.get("accuracy"),
    }


def rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


def library_intact() -> dict[str, Any]:
    """That no library name was rebound (the timings come from the hook, not from wrappers): checked after the runs."""
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
    return {"same_objects": same, "rebound": common.rebound_library_names()}


def worker_setup(model_dir: str, out: str) -> tuple[list[int], Any, Any, dict[str, Any]]:
    """What both workers start with: one torch thread, the decode counter, the model, the recipe's transform at its
    size, and the settings the main process left beside `out`."""
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.data import ImageTransform

    torch.set_num_threads(1)
    quiet_libraries()
    decodes = count_decodes()
    model = ViTForImageClassification.from_pretrained(model_dir)
    transform = ImageTransform(image_size=model.config.image_size)
    settings = json.loads((Path(out).parent / "worker_settings.json").read_text())
    return decodes, model, transform, settings


def worker(corpus: str, model_dir: str, out: str) -> None:
    """`sap_correct` three times: the recipe's full selection pass (bracket search), the full grid from its
    statistics, and the bracket with `selection_subset` (a random share of the training stream, `--subset_share`)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from sap_hf import Runtime, sap_correct

    decodes, model, transform, settings = worker_setup(model_dir, out)
    accelerator = Accelerator(cpu=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = stream(corpus), stream(corpus, "validation")
    config = recipe_sap_config(**settings["overrides"])  # recipes/configs/default.yaml's SAP settings
    # The statistics of the correction, saved by sap_correct itself, feed the full-grid search below.
    stats_path = Path(out).with_name(Path(out).stem + "_stats.safetensors")
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)  # a file left there would be loaded: no statistics pass to time
    log = PhaseLog(decodes)

    def correct(data: Any, sap_config: Any, **kwargs: Any) -> tuple[Any, dict[str, list[float]]]:
        model.load_state_dict(original)
        accelerator.wait_for_everyone()
        runtime = dict(accelerator=accelerator, collate_fn=transform.collate, show_progress=False, on_phase=log)
        return log.measure(lambda: sap_correct(model, data, val, sap_config, runtime=Runtime(**runtime), **kwargs))

    result, phases = correct(train, config, stats_path=stats_path)
    spans = list(log.spans)
    # The same alpha search with the full grid from the same statistics (loaded from stats_path: no data pass, no
    # selection); its row is its evaluations, as the bracket's alpha_search row.
    grid_result, grid_phases = correct(None, dataclasses.replace(config, alpha_search="grid"), stats_path=stats_path)
    subset_result, subset_phases = correct(
        train, dataclasses.replace(config, selection_subset=settings["subset_share"])
    )
    shards = gather_object([{"pass": phases, "grid": grid_phases, "subset": subset_phases}])
    if accelerator.is_main_process:
        stats_path.unlink(missing_ok=True)
        bracket, grid, subset = result.rounds[0], grid_result.rounds[0], subset_result.rounds[0]
        grid_row = phase_rows(shards, "grid", "pass", evaluations_of(grid), None)[PHASES.index("alpha_search")]
        record = {
            "processes": accelerator.num_processes,
            "rows": phase_rows(shards, "pass", "pass", evaluations_of(bracket), purity(corpus, result.trusted_indices))
            + [dict(grid_row, search="grid")]
            + phase_rows(
                shards, "subset", "subset", evaluations_of(subset), purity(corpus, subset_result.trusted_indices)
            ),
            "timings": rounded(result.timings),  # SAPResult.timings of the main process
            "grid_timings": rounded(grid_result.timings),
            "subset_timings": rounded(subset_result.timings),
            "phase_log": [{"phase": name, "seconds": round(sec, 3), "decodes": d} for name, sec, d in spans],
            "choice": {"bracket": choice_of(bracket), "grid": choice_of(grid), "subset": choice_of(subset)},
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


def trainer_worker(corpus: str, model_dir: str, out: str) -> None:
    """`SAPTrainer.correct()` with `trusted_source="training"`: the trusted samples from the losses the trainer
    recorded while it trained the model (`memorise`), no selection pass; the shared evaluation of the alpha search."""
    from accelerate.utils import gather_object

    from sap_hf.trainer import SAPTrainer
    from sap_hf.trainer.recorded import TrainingLosses

    decodes, model, transform, settings = worker_setup(model_dir, out)
    config = recipe_sap_config(**{**settings["overrides"], "selection_rule": "loss", "trusted_source": "training"})
    args = cpu_training_args(
        str(Path(out).with_suffix("")), per_device_eval_batch_size=config.batch_size, remove_unused_columns=False
    )
    trainer = SAPTrainer(
        model=model,
        args=args,
        train_dataset=CorpusRows(Path(corpus)),
        eval_dataset=stream(corpus, "validation"),
        data_collator=transform.collate,
        sap_config=config,
    )
    trainer.training_losses = TrainingLosses(len(trainer.train_dataset), config.training_loss_epochs)
    problem = trainer.training_losses.restore(model_dir)  # what train() recorded
    if problem is not None:
        raise RuntimeError(f"{model_dir}: {problem}; delete memorised.json there to train the model again.")
    log = PhaseLog(decodes)
    trainer.accelerator.wait_for_everyone()
    result, phases = log.measure(lambda: trainer.correct(on_phase=log))  # selection: from the recorded losses
    shards = gather_object([{"training": phases}])
    if trainer.accelerator.is_main_process:
        found = result.rounds[0]
        record = {
            "processes": trainer.accelerator.num_processes,
            "rows": phase_rows(
                shards, "training", "training", evaluations_of(found), purity(corpus, result.trusted_indices)
            ),
            "timings": rounded(result.timings),
            "choice": {"training": choice_of(found)},
            "num_trusted": result.num_trusted,
            "via": "SAPTrainer.correct(), trusted_source='training'",
        }
        Path(out).write_text(json.dumps(record, indent=1))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def launch(processes: int, corpus: Path, model_dir: Path, out: Path, via: str) -> dict[str, Any]:
    """`accelerate launch` of this script's worker for `via` (see WORKERS) on `processes` CPU processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    # The port stays bound here (SO_REUSEADDR, not listening) until the run ends: no other socket gets it, and the
    # TCPStore can still listen on it (a random port may be in use: EADDRINUSE, seen with the tests' ports).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("", 0))
        options = "--num_machines 1 --mixed_precision no --dynamo_backend no"
        options += f" --main_process_port {held.getsockname()[1]} --num_processes {processes}"
        options += " --multi_gpu" if processes > 1 else " --cpu"
        command = [sys.executable, "-m", "accelerate.commands.launch", *options.split(), __file__, WORKERS[via]]
        command += [str(corpus), str(model_dir), str(out)]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"accelerate launch with {processes} process(es) failed:\n{run.stderr[-4000:]}")
    record = json.loads(out.read_text())
    record["launch_wall_seconds"] = round(time.perf_counter() - started, 1)
    record["loadavg_after"] = loadavg()
    out.write_text(json.dumps(record, indent=1))
    return record


def corrections(args: argparse.Namespace, corpus_dir: Path, models: dict[str, Path]) -> list[dict[str, Any]]:
    """Every launch, each saved in the corpus directory (`--reuse_runs` reads them): `sap_correct` on both models,
    and `SAPTrainer.correct()` on the memorised one (the only one with recorded losses), on each process count."""
    runs = []
    for name, directory in models.items():
        for processes in args.processes:
            if args.quick and name == "memorised" and processes != max(args.processes):  # a short smoke run
                continue
            for via in WORKERS if name == "memorised" else ["sap_correct"]:
                saved = corpus_dir / f"correction_{name}_{via.split('.')[0]}_{processes}p.json"
                if args.reuse_runs and saved.is_file():
                    runs.append(json.loads(saved.read_text()))
                    continue
                print(f"{via} on the {name} model with {processes} process(es) ...", flush=True)
                run = dict(launch(processes, corpus_dir, directory, saved, via), model=name, via=via)
                saved.write_text(json.dumps(run, indent=1))
                runs.append(run)
    return runs


# ----- Bracket vs grid on the accuracy benchmark's memorised models -----


def compare_searches(args: argparse.Namespace) -> dict[str, Any]:
    """Grid vs bracket on every cached model of the accuracy benchmark (missing ones are skipped, never trained)."""
    import torch

    if not args.cache_dir:
        return {"rows": [], "summary": {}, "note": "skipped (no --cache_dir)"}
    torch.set_num_threads(1)
    recipe = recipe_sap_config()
    run_args = common.run_parser("").parse_args(["--cache_dir", args.cache_dir, "--threads", "1"])
    rows, missing = [], []
    for setting in args.settings:
        for seed in args.seeds:
            cache = common.cache_path(setting, seed, run_args)
            if cache is None or not cache.exists():
                missing.append(f"{setting}/seed{seed}")
                continue
            rows += searches_on_model(setting, seed, common.prepare_run(setting, seed, run_args), recipe)
    summary = {}
    for scope in ("shared", "per_kind"):
        if any(r["scope"] == scope for r in rows):
            summary[scope] = summarise_searches([r for r in rows if r["scope"] == scope])
    return {
        "alphas": list(common.DEFAULT_ALPHAS),
        "tolerance": recipe.alpha_search_tolerance,
        "trusted": f"{recipe.selection_rule}, {recipe.trusted_per_class} per class, {recipe.accumulation_dtype} statistics",
        "rows": rows,
        "summary": summary,
        "missing_models": missing,
    }


def searches_on_model(setting: str, seed: int, run: dict[str, Any], recipe: Any) -> list[dict[str, Any]]:
    """The recipe's trusted set and statistics once, then from them, per alpha scope: the grid, the bracket at the
    recipe's tolerance and the bracket at tolerance 0 (it stops at the first fall)."""
    from sap_hf import Runtime, collect_statistics, search_alpha, select_trusted
    from sap_hf.core.search import eigenbases
    from sap_hf.core.targets import classifier_names, find_target_modules, group_kinds

    model, data = run["model"], run["data"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    passes = Runtime(batch_size=500, show_progress=False)
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
    bases, kinds = eigenbases(stats), group_kinds(stats.groups, classifier_names(model))
    searches = {
        "grid": ("grid", 0.0),
        "bracket": ("bracket", recipe.alpha_search_tolerance),
        "bracket_tol0": ("bracket", 0.0),
    }
    rows = []
    for scope in ("shared", "per_kind"):
        found = {}
        for name, (method, tolerance) in searches.items():
            model.load_state_dict(state)
            res = search_alpha(
                model,
                stats,
                list(common.DEFAULT_ALPHAS),
                lambda m: {"accuracy": common.accuracy(m, data["val_x"], data["val_y"])},
                bases=bases,
                kinds=kinds if scope == "per_kind" else None,
                method=method,
                tolerance=tolerance,
            )
            test = common.accuracy(model, data["test_x"], data["test_y"])
            found[name] = {**choice_of(res), "test_accuracy": test, "evaluations": evaluations_of(res)}
        grid, fast, zero = found["grid"], found["bracket"], found["bracket_tol0"]
        zero.update(agreement(grid, zero))
        rows.append(
            {
                "setting": setting,
                "seed": seed,
                "scope": scope,
                "grid": grid,
                "bracket": fast,
                "bracket_tolerance_0": zero,
                **agreement(grid, fast),
                "evaluation_ratio": round(fast["evaluations"] / grid["evaluations"], 3),
            }
        )
        print(
            f"  {setting} seed {seed} {scope:8s}: grid {grid['evaluations']:2d} evals -> {describe(grid)} val "
            f"{grid['val_accuracy']:.4f} | bracket {fast['evaluations']:2d} evals -> {describe(fast)} val "
            f"{fast['val_accuracy']:.4f}"
        )
    return rows


def agreement(grid: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Whether `other` chose the grid's alphas, and its val accuracy below the grid's, in points."""
    return {
        "same_alpha": grid["alpha"] == other["alpha"] and grid["kind_alphas"] == other["kind_alphas"],
        "val_gap_points": round(100 * (grid["val_accuracy"] - other["val_accuracy"]), 3),
    }


def summarise_searches(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One scope's totals; the same choice is the same alphas or a val accuracy within 0.2 points of the grid's."""
    zero = [r["bracket_tolerance_0"] for r in rows]
    same_choice = lambda r: r["same_alpha"] or abs(r["val_gap_points"]) <= 0.2
    grid_total = sum(r["grid"]["evaluations"] for r in rows)
    fast_total = sum(r["bracket"]["evaluations"] for r in rows)
    return {
        "models": len(rows),
        "grid_evaluations": grid_total,
        "bracket_evaluations": fast_total,
        "evaluation_ratio": round(fast_total / grid_total, 3),
        "same_choice": sum(same_choice(r) for r in rows),
        "same_alpha": sum(r["same_alpha"] for r in rows),
        "max_val_gap_points": max(abs(r["val_gap_points"]) for r in rows),
        "tolerance_0": {
            "bracket_evaluations": sum(z["evaluations"] for z in zero),
            "same_choice": sum(same_choice(z) for z in zero),
            "max_val_gap_points": max(abs(z["val_gap_points"]) for z in zero),
        },
    }


def describe(found: dict[str, Any]) -> str:
    if found["kind_alphas"]:
        return ",".join("-" if a is None else f"{a:g}" for a in found["kind_alphas"].values())
    return "unchanged" if found["alpha"] is None else f"{found['alpha']:g}"


# ----- Extrapolation, targets, report, plot -----


def clothing1m_share(sources_path: Path) -> dict[str, Any]:
    """The selection_subset share for Clothing1M, from selection_sources.py's measurement (an archived study:
    its committed JSON).

    A share's purity is set by how many candidates each trusted sample is the lowest of (the k lowest of m random
    samples of a class sit at the k/m quantile of its scores). So the smallest measured share that met the target
    (purity within 1 point of the full pass, same alpha choice on every model; none met: the purest, flagged) fixes
    the candidates per trusted sample, and Clothing1M's share keeps that ratio with 100 trusted of ~71k per class.
    """
    if not Path(sources_path).is_file():
        return {"note": f"{sources_path} missing: no measured share", "share": None}
    sources = json.loads(Path(sources_path).read_text())
    shares = {float(name.split("_")[1]): v for name, v in sources["summary"].items() if name.startswith("subset_")}
    if not shares:
        return {"note": "no share measured", "share": None}
    met = sorted(share for share, v in shares.items() if v["meets_target"])
    chosen = met[0] if met else max(shares, key=lambda share: (-shares[share]["max_purity_gap_points"], share))
    ratio = chosen * (sources["train_size"] / sources["classes"]) / sources["recipe"]["trusted_per_class"]
    return {
        "measured_share": chosen,
        "met_target": bool(met),
        "purity_gap_points": shares[chosen]["max_purity_gap_points"],
        "candidates_per_trusted": ratio,
        "share": min(1.0, ratio * CLOTHING1M["trusted"] / CLASSES / (CLOTHING1M["train"] / CLASSES)),
        "rule": "measured share x (per-class training images / trusted per class), kept at Clothing1M",
    }


def hours(seconds: float) -> float:
    return round(seconds / 3600, 2)


def extrapolate(record: dict[str, Any], sources_path: Path) -> dict[str, Any]:
    """Clothing1M with ViT-B/16 from per-image rates: the measured decode+transform rate and speed.json's ViT-B rates.

    Evaluation counts: the accuracy benchmark's models' means (14-alpha grid), grid and bracket, per alpha scope.
    Selection: 'pass' (one forward per training image, the ViT-B config's 'loss' rule), 'subset' (the same on
    `clothing1m_share`'s share), 'training' (selecting from the recorded losses: the per-example seconds
    SAPTrainer.correct() took on the corpus, times 1M).
    """
    speed_path = COMMITTED_RESULTS / "speed.json"
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
        by_source(r, "training")["selection"]["seconds"]
        for r in record["runs"]
        if r.get("via") == "SAPTrainer.correct"
    ]
    from_scores = min(recorded) / record["corpus"]["train"] if recorded else 0.0  # s per recorded example
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
    sources = ("pass", "subset", "training")
    for processes, source, (scope, values), search in product(
        CLOTHING1M["processes"], sources, summary.items(), ("grid", "bracket")
    ):
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


def sources_of(run: dict[str, Any]) -> list[str]:
    """The selection sources of a run's corrections, in row order."""
    return list(dict.fromkeys(r.get("source", "pass") for r in run["rows"]))


def by_source(run: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """A run's rows of one correction (`source`), by phase (the bracket's alpha_search, not the grid's)."""
    return {r["phase"]: r for r in run["rows"] if r.get("source", "pass") == source and r.get("search") != "grid"}


def correction_table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per correction (model, processes, via, source): its phases' seconds and decodes, the selection's
    purity, the alpha search's evaluations (and the grid's, where it ran), the alphas chosen (null: unchanged) and
    the validation accuracy after; the study page's table of corrections reads these rows."""
    table = []
    for run in record["runs"]:
        for source in sources_of(run):
            rows = by_source(run, source)
            grid = next(
                (r for r in run["rows"] if r.get("search") == "grid" and r.get("source", "pass") == source), {}
            )
            choice = run["choice"]["bracket" if source == "pass" else source]
            table.append(
                {
                    **{key: run[key] for key in ("model", "processes", "via")},
                    "source": source if source != "subset" else f"subset {run['subset_share']}",
                    **{f"{phase}_seconds": rows[phase]["seconds"] for phase in PHASES},
                    **{f"{phase}_decodes": rows[phase]["decodes"] for phase in ("selection", "total")},
                    "purity_percent": 100 * rows["selection"]["purity"],
                    "evaluations": rows["alpha_search"]["evaluations"],
                    "alpha_search_decodes_per_process": max(rows["alpha_search"]["decodes_per_process"]),
                    "grid_evaluations": grid.get("evaluations"),
                    "grid_seconds": grid.get("seconds"),
                    **{f"alpha_{kind}": alpha for kind, alpha in choice["kind_alphas"].items()},
                    "val_accuracy_percent": 100 * choice["val_accuracy"],
                }
            )
    return table


def correction_targets(record: dict[str, Any]) -> dict[str, Any]:
    """Per correction: its decodes against the ideal (selected + trusted + validation x evaluations), the largest
    process share of the alpha search, its time in fine-tuning epochs and, beside the full pass, its purity gap."""
    corpus = record["corpus"]
    epochs = {
        "trained": record["finetune_epoch"]["seconds"],
        "memorised": record["memorised_model"]["epoch"]["seconds"],
    }
    out, pass_rows = {}, {}
    for run in record["runs"]:
        tag = f"{run['model']}_{run['processes']}p"
        for source in sources_of(run):
            rows = by_source(run, source)
            evaluations = rows["alpha_search"]["evaluations"]
            selected = {"pass": corpus["train"], "subset": run.get("subset_share", 0) * corpus["train"], "training": 0}
            ideal = round(selected[source] + run["num_trusted"] + corpus["validation"] * evaluations)
            target = out[f"{tag}_{source}"] = {
                "decodes": rows["total"]["decodes"],
                "ideal": ideal,
                "decode_ratio": round(rows["total"]["decodes"] / ideal, 3),
                "met_decodes_le_1.1": rows["total"]["decodes"] <= 1.1 * ideal,
                "alpha_search_max_process_share": round(
                    max(rows["alpha_search"]["decodes_per_process"]) / (corpus["validation"] * evaluations), 3
                ),
                "total_over_finetune_epoch": round(rows["total"]["seconds"] / epochs[run["model"]], 3),
                "purity": rows["selection"].get("purity"),
                "choice": run["choice"].get("bracket" if source == "pass" else source),
            }
            if run["processes"] > 1:
                target["met_alpha_search_le_0.6"] = target["alpha_search_max_process_share"] <= 0.6
            if source == "pass":
                pass_rows[tag] = target
    for name, values in out.items():
        reference = pass_rows.get(name.rsplit("_", 1)[0])
        if reference is not None and values is not reference:
            values["purity_gap_points"] = round(100 * (reference["purity"] - values["purity"]), 2)
            values["same_alpha_as_pass"] = values["choice"]["kind_alphas"] == reference["choice"]["kind_alphas"]
    return out


def targets(record: dict[str, Any]) -> dict[str, Any]:
    out = correction_targets(record)
    by_p = {run["processes"]: by_source(run, "pass") for run in record["runs"] if run["model"] == "trained"}
    if 1 in by_p and 2 in by_p:
        ratio = by_p[2]["selection"]["seconds"] / by_p[1]["selection"]["seconds"]
        out["selection_2p_over_1p"] = {"ratio": round(ratio, 3), "met_le_0.6": ratio <= 0.6}
    for run in record["runs"]:
        grid = next((r for r in run["rows"] if r.get("search") == "grid"), None)
        if grid is None:
            continue
        fast, choice = by_source(run, "pass")["alpha_search"], run["choice"]
        out[f"corpus_search_evaluations_{run['model']}_{run['processes']}p"] = {
            "bracket": fast["evaluations"],
            "grid": grid["evaluations"],
            "ratio": round(fast["evaluations"] / grid["evaluations"], 3),
            **agreement(choice["grid"], choice["bracket"]),
        }
    for scope, values in record["search_comparison"].get("summary", {}).items():
        met = values["evaluation_ratio"] <= 0.5 and values["same_choice"] == values["models"]
        out[f"accuracy_models_{scope}"] = {**values, "met_le_0.5_same_choice": met}
    table = record["extrapolation"].get("table", [])
    for source in dict.fromkeys(r["source"] for r in table):
        best = [r for r in table if r["source"] == source and r["search"] == "bracket" and r["processes"] == 1]
        out[f"clothing1m_{source}"] = {
            r["alpha_scope"]: {"over_epoch": r["over_epoch"], "met_le_0.1": r["over_epoch"] <= 0.1} for r in best
        }
    return out


def print_report(record: dict[str, Any]) -> None:
    corpus, side = record["corpus"], record["corpus"]["config"]["image_size"]
    print(
        f"\nCorpus: {corpus['train']} training + {corpus['validation']} validation JPEGs ({side}x{side}); one "
        f"fine-tuning epoch {record['finetune_epoch']['seconds']:.1f} s (trained model), "
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
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax, right) = plt.subplots(1, 2, figsize=(14, 5))
    colours = dict(zip(ROW_PHASES, ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974")))
    labels = []
    bars = [(run, source) for run in record["runs"] for source in sources_of(run)]
    for i, (run, source) in enumerate(bars):
        rows = by_source(run, source)
        bottom = 0.0
        for phase, colour in colours.items():
            ax.bar(i, rows[phase]["seconds"], bottom=bottom, color=colour, label=phase if i == 0 else None)
            bottom += rows[phase]["seconds"]
        labels.append(f"{run['model']}\n{source}, {run['processes']}p\n{rows['total']['decodes']} dec.")
    epochs = {"trained": record["finetune_epoch"], "memorised": record["memorised_model"]["epoch"]}
    for j, (name, epoch) in enumerate(epochs.items()):
        ax.bar(len(labels), epoch["seconds"], color="#999999", label="1 fine-tuning epoch" if j == 0 else None)
        labels.append(f"fine-tune epoch\n({name})")
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("seconds (1 torch thread per process)")
    ax.set_title(f"Correction cost by selection source, {record['corpus']['train']} training JPEGs")
    ax.legend(fontsize=7)
    table = [r for r in record["extrapolation"].get("table", []) if r["processes"] == 1 and r["search"] == "bracket"]
    if table:
        right.bar(range(len(table)), [r["over_epoch"] for r in table], color="#4c72b0")
        right.axhline(0.1, color="#c44e52", linestyle="--", label="target 0.1 epoch")
        right.set_xticks(range(len(table)), [f"{r['source']}\n{r['alpha_scope']}" for r in table], fontsize=8)
        right.set_ylabel("correction / one fine-tuning epoch")
        right.set_title("Clothing1M (1M images, ViT-B/16), extrapolated, bracket search")
        right.legend(fontsize=8)
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
    out_dir, corpus_dir = Path(args.out_dir), Path(args.corpus_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"correction_cost{'_quick' if args.quick else ''}.json"
    if args.replot:  # the measurements as recorded; what is computed from them computed again
        record = json.loads(out.read_text())
        return report(dict(record, corrections=correction_table(record), targets=targets(record)), out, args)
    started = time.perf_counter()
    print(f"Corpus in {corpus_dir} ...")
    corpus = write_corpus(corpus_dir, args.per_class, args.val_per_class, args.image_size)
    overrides = {"alphas": [10, 100, 1000], "trusted_per_class": 2} if args.quick else {}
    (corpus_dir / "worker_settings.json").write_text(
        json.dumps({"overrides": overrides, "subset_share": args.subset_share})
    )
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
    runs = corrections(args, corpus_dir, {"trained": model_dir, "memorised": memorised_dir})
    if args.reuse_comparison and out.is_file():
        comparison = json.loads(out.read_text())["search_comparison"]
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
    record["corrections"] = correction_table(record)
    record["targets"] = targets(record)
    record["environment"] = dict(common.environment(), loadavg=loadavg())
    record["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    return report(record, out, args)


def report(record: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    common.write_json(out, record)
    if not args.no_plot:
        plot(record, out.with_suffix(".png"))
    print_report(record)
    return record


if __name__ == "__main__":
    main()
