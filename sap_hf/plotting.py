"""A picture of the alpha search: eval metric against alpha, with the unchanged model as a line.

matplotlib is optional (`pip install sap_hf[plot]`); without it the plot is skipped with a log line.
The image is written atomically (`sap_hf.utils.io.atomic_write`), like every other output file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from transformers.utils import logging

from .core.formatting import format_kind_alphas
from .utils.io import atomic_write


logger = logging.get_logger(__name__)


def plot_alpha_curve(
    result: Any,
    path: Union[str, Path],
    *,
    extra_curves: Optional[Mapping[str, tuple[Sequence[float], Sequence[float]]]] = None,
    title: Optional[str] = None,
) -> Optional[Path]:
    """Plot each round's metric against alpha (log scale); `extra_curves` adds e.g. test accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the alpha plot (pip install 'sap_hf[plot]').")
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, search in enumerate(result.rounds):
        values = [m[search.metric] for m in search.metrics]
        axis.plot(search.alphas, values, marker="o", label=f"eval {search.metric}, round {index + 1}")
        axis.axhline(
            search.baseline[search.metric],
            linestyle="--",
            color="grey",
            label="unchanged (round 1)" if index == 0 else None,
        )
        if search.best_alpha is not None:  # the best shared alpha, on its own curve
            shared_best = search.metrics[search.alphas.index(search.best_alpha)][search.metric]
            axis.scatter([search.best_alpha], [shared_best], s=120, facecolors="none", edgecolors="red")
    first = result.rounds[0]
    for kind in dict.fromkeys(t["kind"] for t in first.kind_trials):  # alpha_scope="per_kind": the coordinate pass
        trials = sorted(
            (t["alpha"], t["metrics"][first.metric])
            for t in first.kind_trials
            if t["kind"] == kind and t["alpha"] is not None
        )
        if trials:
            axis.plot(*zip(*trials), marker=".", linestyle=":", label=f"per-kind pass: {kind} alpha varied")
    if first.kind_alphas and first.improved:
        label = f"chosen per kind: {format_kind_alphas(first.kind_alphas)}"
        axis.axhline(first.best_metrics[first.metric], color="red", linewidth=1, label=label)
    for label, (xs, ys) in (extra_curves or {}).items():
        axis.plot(xs, ys, marker="s", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("alpha")
    axis.set_ylabel(result.rounds[0].metric)
    axis.set_title(title or "SAP: metric against alpha (red circle: best shared alpha)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    image_format = path.suffix.lstrip(".").lower() or "png"  # a handle has no name to infer it from
    try:
        return atomic_write(path, lambda handle: figure.savefig(handle, dpi=120, format=image_format), mode="wb")
    finally:
        plt.close(figure)
