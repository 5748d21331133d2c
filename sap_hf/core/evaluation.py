"""Accuracy on a clean eval set, exact across processes (no padded duplicates).

Used by `sap_correct` when no `Trainer` is around; `SAPTrainer` uses `Trainer.evaluate` so its
`compute_metrics` and logging apply.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..runtime.batching import Collator, batch_labels, iter_shard_batches, process_layout, shard_progress
from .stats import forward_pixels, inference_mode, model_device, raise_on_any_process, unwrap

EvalFn = Callable[[nn.Module], dict[str, float]]


def evaluate_accuracy(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 64,
    accelerator: Any = None,
    collate_fn: Optional[Collator] = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """`{"accuracy": correct / total, "samples": total}` over every example of `data` exactly once."""
    model = unwrap(model, accelerator)
    device = model_device(model, accelerator)
    rank, world = process_layout(accelerator)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter_shard_batches(data, batch_size=batch_size, process_index=rank, num_processes=world, collate_fn=collate_fn)
    progress = shard_progress(data, "SAP eval", rank=rank, world=world, show=show_progress)
    error: Optional[BaseException] = None
    try:
        with inference_mode(model), progress:
            for _, batch in batches:
                labels = batch_labels(batch)
                if labels is None:
                    raise ValueError(
                        f"The eval data has no 'labels'/'label' (keys: {sorted(batch)}); alpha search needs a labelled, "
                        "clean eval set."
                    )
                output = forward_pixels(model, batch, device)
                logits = output.logits if hasattr(output, "logits") else output
                counts[0] += (logits.argmax(-1).cpu() == labels.cpu()).sum().item()
                counts[1] += labels.numel()
                progress.update(labels.numel())
    except Exception as err:  # re-raised here, announced to the other processes
        error = err
    raise_on_any_process(error, accelerator)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    if counts[1] == 0:
        raise ValueError("The eval data is empty: alpha search needs at least one labelled eval sample.")
    return {"accuracy": float(counts[0] / counts[1]), "samples": int(counts[1])}


def accuracy_evaluator(data: Any, **kwargs: Any) -> EvalFn:
    """Bind `evaluate_accuracy` to one eval set: the `evaluate_fn` an alpha search calls."""
    return lambda model: evaluate_accuracy(model, data, **kwargs)
