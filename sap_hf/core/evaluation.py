"""Accuracy on a clean eval set, exact across processes (no padded duplicates).

Used by `sap_correct` when no `Trainer` is around; `SAPTrainer` uses `Trainer.evaluate` so its
`compute_metrics` and logging apply. Samples labelled -100 (the transformers ignore index) are
not counted; any other label outside the model's classes is an error, since a label-mapping bug
would otherwise read as "SAP does not help".
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..runtime.passes import Runtime, resolve_runtime
from .targets import check_classifier

EvalFn = Callable[[nn.Module], dict[str, float]]


def evaluate_accuracy(model: nn.Module, data: Any, *, runtime: Optional[Runtime] = None) -> dict[str, float]:
    """`{"accuracy": correct / total, "samples": total}` over every labelled example of `data` exactly once."""
    runtime = resolve_runtime(runtime, batch_size=64, show_progress=False)
    num_labels = check_classifier(runtime.unwrap(model))
    with runtime.run(model, data, "evaluation", argument="eval data", description="SAP eval") as walk:
        counts = torch.zeros(2, dtype=torch.float64)
        for batch in walk.batches():
            labels, valid = walk.require_labels(batch, num_labels, "an evaluation (alpha search, refine)")
            predicted = walk.logits(batch).argmax(-1).cpu()
            counts += torch.tensor([float((predicted == labels)[valid].sum()), float(valid.sum())], dtype=torch.float64)
    counts = runtime.sum(counts.to(walk.device)).cpu()
    if counts[1] == 0:
        raise ValueError("The eval data has no labelled sample (empty, or every label is -100): pass a clean labelled eval set.")
    return {"accuracy": float(counts[0] / counts[1]), "samples": int(counts[1])}


def accuracy_evaluator(data: Any, runtime: Optional[Runtime] = None) -> EvalFn:
    """Bind `evaluate_accuracy` to one eval set: the `evaluate_fn` an alpha search calls."""
    return lambda model: evaluate_accuracy(model, data, runtime=runtime)
