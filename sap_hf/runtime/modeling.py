"""The model side of every pass: the bare model behind its wrappers, its device, eval mode, its logits.

Hooks and weights live on the bare model, so wrappers are peeled once, here, for every pass:
`torch.nn.DataParallel` / DDP (`.module`), `torch.compile` (`._orig_mod`) and Accelerate
(`accelerator.unwrap_model`). PEFT models are not a wrapper to peel: `sap_hf.core.adapters`
merges them first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .batching import check_pixel_values


def unwrap_model(model: nn.Module, accelerator: Any = None) -> nn.Module:
    """The bare model behind Accelerate, DataParallel/DDP and `torch.compile` wrappers (any nesting)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module, accelerator: Any = None) -> torch.device:
    """Where the batches go: the accelerator's device, else the device of the model's first parameter."""
    if accelerator is not None:
        return accelerator.device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """TF32 off for CUDA matmuls (exact float32 Grams); the previous setting is restored.

    Uses torch's `fp32_precision` setting where it exists (torch >= 2.9; transformers sets TF32
    through it and mixing it with the legacy `allow_tf32` flag raises), else the legacy flag.
    """
    matmul = torch.backends.cuda.matmul
    attribute, exact = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, attribute)
    setattr(matmul, attribute, exact)
    try:
        yield
    finally:
        setattr(matmul, attribute, previous)


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, exact float32 matmuls; the previous state is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), exact_float32_matmul():
            yield
    finally:
        model.train(was_training)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: `output.logits` (transformers), `output[0]` (a tuple) or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"The model returned {type(output).__name__} without logits: SAP needs an image classifier whose output "
            "has .logits (e.g. AutoModelForImageClassification)."
        )
    return logits


def forward_pixels(
    model: nn.Module, batch: Mapping[str, Any], device: torch.device, pixels: Optional[torch.Tensor] = None
) -> Any:
    """`model(pixel_values=...)` on the model's device and dtype, with a clear error for wrong images.

    `pixels` replaces the batch's `pixel_values` (a shifted view of them, say).
    """
    if pixels is None:
        check_pixel_values(batch)
        pixels = batch["pixel_values"]
    pixels = pixels.to(device)
    dtype = next(model.parameters()).dtype
    if pixels.is_floating_point() and dtype.is_floating_point:
        pixels = pixels.to(dtype)
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", config)
    channels = getattr(vision, "num_channels", None)
    if channels is not None and pixels.shape[1] != channels:
        raise ValueError(
            f"pixel_values have {pixels.shape[1]} channels but the model expects num_channels={channels}; convert "
            "the images (e.g. ImageTransform(num_channels=...) or the model's image processor)."
        )
    try:
        return model(pixel_values=pixels)
    except (RuntimeError, ValueError) as err:
        size = getattr(vision, "image_size", None)
        expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if size is None or isinstance(err, torch.OutOfMemoryError) or tuple(pixels.shape[-2:]) == expected:
            raise
        raise ValueError(
            f"The model failed on pixel_values of shape {tuple(pixels.shape)} (model image_size={size}): {err}. "
            "Resize the images to what the model expects, e.g. with its image processor."
        ) from err


def predict_logits(
    model: nn.Module, batch: Mapping[str, Any], device: torch.device, pixels: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The logits of `batch` (or of `pixels` in its place), as float32 or wider."""
    logits = logits_of(forward_pixels(model, batch, device, pixels))
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
