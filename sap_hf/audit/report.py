"""Writing a label audit the way a person checks it: a ranked CSV, a JSON summary, a grid of images.

* `label_audit.csv`: one row per example, most suspicious first (rank, index[, key], given and
  predicted label and name, probability of each, label-quality score, suspected);
* `label_audit_summary.json`: counts, the (given -> predicted) class pairs of the suspected labels,
  per-class counts, how the scores were made;
* `label_audit_top.png`: the top suspected images with "given -> predicted" under each
  (needs matplotlib, `pip install "sap_hf[audit]"`; skipped with a log line without it).

Every file is written to a temporary name and moved into place with `os.replace`
(`sap_hf.utils.io.atomic_write`), so an interrupted audit never leaves a half-written CSV where
a reader would take it for complete.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers.utils import logging

from ..runtime.batching import Collator, iter_shard_batches
from ..runtime.contract import as_pass_data
from ..utils.io import atomic_write
from .labels import LabelAudit


logger = logging.get_logger(__name__)

CSV_NAME = "label_audit.csv"
SUMMARY_NAME = "label_audit_summary.json"
GRID_NAME = "label_audit_top.png"


def write_audit_csv(audit: LabelAudit, path: Union[str, Path]) -> Path:
    """The ranked rows of `audit` as CSV, written atomically."""

    def write(handle: Any) -> None:
        writer = None
        for row in audit.rows():
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)

    return atomic_write(Path(path), write)


def write_audit_summary(audit: LabelAudit, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
    summary = {**audit.summary(), **(extra or {})}
    return atomic_write(Path(path), lambda handle: handle.write(json.dumps(summary, indent=2, default=float)))


def _displayable(pixels: torch.Tensor) -> Any:
    """(C, H, W) model input -> an (H, W) or (H, W, 3) array in [0, 1] (each image min-max scaled)."""
    image = pixels.detach().float().cpu()
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp_min(1e-12)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def plot_suspected_grid(
    audit: LabelAudit,
    data: Any,
    path: Union[str, Path],
    *,
    top_k: int = 32,
    columns: int = 8,
    collate_fn: Optional[Collator] = None,
) -> Optional[Path]:
    """The `top_k` most suspicious suspected images with "given -> predicted (p)" under each."""
    chosen = audit.suspected_indices()[:top_k]
    if not chosen:
        logger.info("No suspected label: no image grid written.")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the image grid (pip install 'sap_hf[audit]').")
        return None
    images: dict[int, torch.Tensor] = {}
    # One batch of exactly the chosen images: a stream yields it at the last of them and is not read further.
    if not isinstance(data, Iterator):  # a generator is read once, here, up to the last image shown
        data = as_pass_data(data)  # the rest as the audit read it (a DataLoader by dataset index)
    for indices, batch in iter_shard_batches(
        data, batch_size=len(chosen), collate_fn=collate_fn, keep=set(chosen), by_key=False
    ):
        for position, index in enumerate(indices):
            images[index] = batch["pixel_values"][position]
        if len(images) == len(chosen):
            break
    position_of = {int(i): p for p, i in enumerate(audit.indices.tolist())}
    rows = -(-len(chosen) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.3 * rows), squeeze=False)
    predicted, prob_given = audit.predicted, audit.prob_given
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, chosen):
        position = position_of[index]
        if index in images:
            shown = _displayable(images[index])
            axis.imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        given, guess = int(audit.given[position]), int(predicted[position])
        name = f"…{str(audit.keys[position])[-20:]}" if audit.keys is not None else f"#{index}"
        axis.set_title(
            f"{name}\n{audit.class_name(given)} \u2192 {audit.class_name(guess)}\np(given)={float(prob_given[position]):.2f}",
            fontsize=6,
        )
    figure.suptitle(f"Top {len(chosen)} suspected labels (given \u2192 predicted)", fontsize=9)
    figure.tight_layout(h_pad=1.2)

    def write(handle: Any) -> None:
        figure.savefig(handle, dpi=120, format="png")

    try:
        return atomic_write(Path(path), write, mode="wb")
    finally:
        plt.close(figure)


def write_audit_report(
    audit: LabelAudit,
    output_dir: Union[str, Path],
    data: Any = None,
    *,
    top_k: int = 32,
    collate_fn: Optional[Collator] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Path]:
    """Write the CSV, the JSON summary and (when `data` is given) the image grid into `output_dir`."""
    output_dir = Path(output_dir)
    written = {
        "csv": write_audit_csv(audit, output_dir / CSV_NAME),
        "summary": write_audit_summary(audit, output_dir / SUMMARY_NAME, extra),
    }
    if data is not None and top_k > 0:
        grid = plot_suspected_grid(audit, data, output_dir / GRID_NAME, top_k=top_k, collate_fn=collate_fn)
        if grid is not None:
            written["grid"] = grid
    return written
