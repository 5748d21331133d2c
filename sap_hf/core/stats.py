"""Streaming activation statistics: the Gram matrix `G = sum X^T X` of every target's input.

`G = R R^T` for the activation matrix `R = X^T` of the paper, so its eigenvectors and
eigenvalues are exactly the `U` and `sigma^2` SAP needs, and it can be accumulated batch by
batch in O(d^2) memory whatever the number of samples. With several processes each one sums
its own shard and a single all-reduce (SUM) gives every process the global statistics.

Hooks are registered in a context manager and always removed; nothing is stored on modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from ..runtime.batching import Collator, check_pixel_values, iter_shard_batches, process_layout, shard_progress
from .targets import TargetGroup, group_by_identity

logger = logging.get_logger(__name__)

STATS_FORMAT = "sap_hf.stats/1"


@dataclass
class ActivationStats:
    """Per-group Gram matrices and token counts, ready for `projection.eigendecompose`."""

    groups: list[TargetGroup]
    grams: dict[str, torch.Tensor]
    counts: dict[str, int]
    max_tokens_per_sample: Optional[int] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return [name for group in self.groups for name in group.members]

    def save(self, path: Union[str, Path]) -> Path:
        """Write the statistics as safetensors, so alpha can be re-tuned later without data."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"gram.{group.name}": self.grams[group.name].contiguous().cpu() for group in self.groups}
        metadata = {
            "format": STATS_FORMAT,
            "groups": json.dumps([[g.name, list(g.members), g.in_features] for g in self.groups]),
            "counts": json.dumps(self.counts),
            "max_tokens_per_sample": json.dumps(self.max_tokens_per_sample),
            "meta": json.dumps(self.meta),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    def check_model(self, model: nn.Module, source: str = "the statistics") -> None:
        """Raise unless these statistics were collected on exactly this model's target weights."""
        modules = dict(model.named_modules())
        for group in self.groups:
            for name in group.members:
                layer = modules.get(name)
                if getattr(layer, "in_features", None) != group.in_features:
                    raise ValueError(
                        f"{source} hold a {group.in_features}-wide layer {name!r} that this model does not have; they "
                        "belong to another model. Delete the file or pass another stats_path."
                    )
        signature, fingerprint = self.meta.get("weights_signature"), self.meta.get("fingerprint")
        if (signature is not None and signature != weights_signature(model, self.target_modules)) or (
            signature is None and fingerprint is not None and fingerprint != weights_fingerprint(model, self.target_modules)
        ):
            raise ValueError(
                f"{source} were collected on other weights than this model's (fingerprint mismatch): the model was "
                "retrained or already corrected. Delete the file or pass another stats_path to collect anew."
            )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ActivationStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No SAP statistics file at {str(path)!r}; write one with ActivationStats.save().")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != STATS_FORMAT:
            raise ValueError(f"{str(path)!r} is not a SAP statistics file (format={metadata.get('format')!r}).")
        tensors = load_file(str(path))
        groups = [TargetGroup(name, tuple(members), width) for name, members, width in json.loads(metadata["groups"])]
        return cls(
            groups=groups,
            grams={g.name: tensors[f"gram.{g.name}"] for g in groups},
            counts={k: int(v) for k, v in json.loads(metadata["counts"]).items()},
            max_tokens_per_sample=json.loads(metadata["max_tokens_per_sample"]),
            meta=json.loads(metadata.get("meta", "{}")),
        )


def weights_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """A hash of the named layers' full weights (the check of statistics files written before `weights_signature`)."""
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(modules[name].weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


SIGNATURE_SAMPLES = 4096


def weights_signature(model: nn.Module, names: Sequence[str]) -> str:
    """A hash of each named layer's shape and of up to 4096 of its weights, evenly strided.

    Statistics are only valid for the weights they came from; retraining or a SAP correction
    changes every weight, so a strided sample tells them apart without hashing (and copying to
    the CPU) the whole model on every statistics pass.
    """
    modules = dict(model.named_modules())
    digest = hashlib.sha256()
    for name in names:
        weight = modules[name].weight.detach().reshape(-1)
        stride = max(1, weight.numel() // SIGNATURE_SAMPLES)
        digest.update(f"{name}:{tuple(modules[name].weight.shape)}".encode())
        digest.update(weight[::stride].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class GramAccumulator:
    """Accumulates `X^T X` of the rows of X (tokens), exploiting symmetry.

    Only the upper block-triangle is computed (row blocks `G[s:e, s:] += X[:, s:e]^T X[:, s:]`),
    which costs about (k+1)/(2k) of a full GEMM with k blocks; `result()` mirrors it.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, block: int = 256):
        self.gram = torch.zeros(width, width, dtype=dtype, device=device)
        self.count = 0
        self.bounds = [(s, min(s + block, width)) for s in range(0, width, block)]

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).to(self.gram.dtype)
        self.count += rows.shape[0]
        if len(self.bounds) == 1:
            self.gram.addmm_(rows.T, rows)
            return
        for start, stop in self.bounds:
            self.gram[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])

    def result(self) -> torch.Tensor:
        """The full symmetric Gram: the upper block-triangle mirrored in place (no d x d temporaries)."""
        width = self.gram.shape[0]
        for start, stop in self.bounds:
            if stop < width:
                self.gram[stop:, start:stop].copy_(self.gram[start:stop, stop:].T)
        return self.gram


def subsample_tokens(x: torch.Tensor, max_tokens: Optional[int], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Keep at most `max_tokens` tokens per sequence of a (batch, seq, d) input; token 0 (CLS) always."""
    if max_tokens is None or x.dim() < 3 or x.shape[-2] <= max_tokens:
        return x
    seq = x.shape[-2]
    others = torch.randperm(seq - 1, generator=generator)[: max_tokens - 1] + 1
    keep = torch.cat([torch.zeros(1, dtype=torch.long), others.sort().values]).to(x.device)
    return x.index_select(-2, keep)


@contextlib.contextmanager
def input_hooks(model: nn.Module, names: Sequence[str], callback) -> Iterator[None]:
    """Call `callback(name, input_tensor)` on every forward of the named modules; always unhook."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in names:
            def hook(module, args, kwargs, _name=name):
                tensor = args[0] if args else kwargs.get("input")
                callback(_name, tensor)

            handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def forward_pixels(model: nn.Module, batch: dict[str, Any], device: torch.device) -> Any:
    """`model(pixel_values=...)` on the model's device and dtype, with a clear error for wrong images."""
    check_pixel_values(batch)
    pixels = batch["pixel_values"].to(device)
    dtype = next(model.parameters()).dtype
    if pixels.is_floating_point() and dtype.is_floating_point:
        pixels = pixels.to(dtype)
    config = getattr(model, "config", None)
    channels = getattr(getattr(config, "vision_config", config), "num_channels", None)
    if channels is not None and pixels.shape[1] != channels:
        raise ValueError(
            f"pixel_values have {pixels.shape[1]} channels but the model expects num_channels={channels}; convert "
            "the images (e.g. ImageTransform(num_channels=...) or the model's image processor)."
        )
    try:
        return model(pixel_values=pixels)
    except (RuntimeError, ValueError) as err:
        size = getattr(getattr(config, "vision_config", config), "image_size", None)
        expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if size is None or isinstance(err, torch.OutOfMemoryError) or tuple(pixels.shape[-2:]) == expected:
            raise
        raise ValueError(
            f"The model failed on pixel_values of shape {tuple(pixels.shape)} (model image_size={size}): {err}. "
            "Resize the images to what the model expects, e.g. with its image processor."
        ) from err


def unwrap(model: nn.Module, accelerator: Any = None) -> nn.Module:
    """The bare model behind an Accelerate/DDP wrapper (hooks and weights live there)."""
    return accelerator.unwrap_model(model) if accelerator is not None else model


def raise_on_any_process(error: Optional[BaseException], accelerator: Any) -> None:
    """Collective: every process learns whether any failed, and all raise instead of hanging.

    Call it on every process after a local pass and before the next collective operation.
    """
    _, world = process_layout(accelerator)
    if world > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item() > 0
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("Another process failed during the SAP pass; see its error above. Nothing was changed.")


def model_device(model: nn.Module, accelerator: Any = None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return next(model.parameters()).device


def discover_groups(model: nn.Module, names: Sequence[str], sample: dict[str, Any], device: torch.device) -> list[TargetGroup]:
    """Run one sample through the model and group layers that receive the same tensor.

    `collect_statistics` learns the groups from its first batch instead (no extra forward); this
    stand-alone form serves callers that need the groups before any pass (benchmarks/speed.py).
    """
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        seen.setdefault(name, tensor)

    with inference_mode(model), input_hooks(model, names, record):
        forward_pixels(model, sample, device)
    return _groups_seen(model, names, seen)


def collect_statistics(
    model: nn.Module,
    data: Any,
    target_names: Sequence[str],
    *,
    batch_size: int = 32,
    accelerator: Any = None,
    collate_fn: Optional[Collator] = None,
    max_tokens_per_sample: Optional[int] = None,
    accumulation_dtype: Union[str, torch.dtype] = torch.float32,
    seed: int = 0,
    show_progress: bool = True,
) -> ActivationStats:
    """One forward pass over `data` accumulating each target group's Gram matrix and token count.

    With an `Accelerator`, every process reads its own shard and the sums are all-reduced, so
    every process returns the same global statistics. Which layers share an input (q/k/v) is
    learnt from the first batch of the pass itself (no separate forward): on that batch each
    distinct input tensor is accumulated once, and the groups are fixed from then on.
    """
    dtype = getattr(torch, accumulation_dtype) if isinstance(accumulation_dtype, str) else accumulation_dtype
    model = unwrap(model, accelerator)
    device = model_device(model, accelerator)
    rank, world = process_layout(accelerator)
    names = list(target_names)
    generator = torch.Generator().manual_seed(seed + rank) if max_tokens_per_sample else None
    first_inputs: dict[str, torch.Tensor] = {}  # first forward only: each target's input tensor
    first_accumulators: list[tuple[torch.Tensor, GramAccumulator]] = []  # one per distinct input tensor
    accumulators: dict[str, GramAccumulator] = {}  # group name -> accumulator, once the groups are known
    groups: Optional[list[TargetGroup]] = None

    def accumulate(name: str, tensor: torch.Tensor) -> None:
        if groups is None:
            first_inputs.setdefault(name, tensor)
            if any(held is tensor for held, _ in first_accumulators):
                return  # a layer sharing this input (k/v after q) already accumulated it
            accumulator = GramAccumulator(tensor.shape[-1], dtype, device)
            first_accumulators.append((tensor, accumulator))
        elif name in accumulators:
            accumulator = accumulators[name]
        else:
            return
        accumulator.update(subsample_tokens(tensor, max_tokens_per_sample, generator))

    progress = shard_progress(data, "SAP statistics", rank=rank, world=world, show=show_progress)
    error: Optional[BaseException] = None
    try:
        with inference_mode(model), input_hooks(model, names, accumulate), progress:
            for _, batch in iter_shard_batches(
                data, batch_size=batch_size, process_index=rank, num_processes=world, collate_fn=collate_fn
            ):
                forward_pixels(model, batch, device)
                if groups is None:
                    groups = _groups_seen(model, names, first_inputs)
                    for group in groups:
                        held = first_inputs[group.name]
                        accumulators[group.name] = next(acc for tensor, acc in first_accumulators if tensor is held)
                    first_inputs.clear()
                    first_accumulators.clear()
                progress.update(batch["pixel_values"].shape[0])
    except Exception as err:  # re-raised on this process, and announced to the others
        error = err
    raise_on_any_process(error, accelerator)
    groups = _agree_on_groups(groups, accelerator)
    for group in groups:  # a process whose shard was empty contributes zeros
        accumulators.setdefault(group.name, GramAccumulator(group.in_features, dtype, device))

    grams, counts = {}, {}
    for group in groups:
        gram = accumulators[group.name].result()
        count = torch.tensor([accumulators[group.name].count], dtype=torch.float64, device=device)
        if accelerator is not None and world > 1:
            gram = accelerator.reduce(gram.contiguous(), reduction="sum")
            count = accelerator.reduce(count, reduction="sum")
        if not torch.isfinite(gram.sum(dtype=torch.float64)):  # NaN/Inf propagate; no d x d bool temporary
            raise ValueError(
                f"Non-finite activations reached {group.members} (e.g. an fp16 overflow or NaN inputs): the "
                "statistics are unusable and no weight was changed. Run the statistics in float32/bfloat16 "
                "or check the inputs for NaN/Inf."
            )
        grams[group.name] = gram
        counts[group.name] = int(count.item())
    logger.info(
        "Collected SAP statistics for %d layers in %d groups over %d tokens per layer.",
        sum(len(g.members) for g in groups),
        len(groups),
        max(counts.values(), default=0),
    )
    return ActivationStats(
        groups=groups,
        grams=grams,
        counts=counts,
        max_tokens_per_sample=max_tokens_per_sample,
        meta={"weights_signature": weights_signature(model, [n for g in groups for n in g.members])},
    )


def _groups_seen(model: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor]) -> list[TargetGroup]:
    """Groups from one forward's recorded inputs; raises if a target was never called."""
    missing = [name for name in names if name not in inputs]
    if missing:
        raise ValueError(
            f"Target modules {missing} are never called in the model's forward pass; exclude them with "
            "exclude_modules or pick other target_modules."
        )
    modules = dict(model.named_modules())
    return group_by_identity(list(names), [inputs[n] for n in names], [modules[n].in_features for n in names])


def _agree_on_groups(groups: Optional[list[TargetGroup]], accelerator: Any) -> list[TargetGroup]:
    """Every process's groups (one whose shard was empty learns them from the others); raises on empty data."""
    _, world = process_layout(accelerator)
    if world > 1:
        from accelerate.utils import gather_object

        groups = next((g for g in gather_object([groups]) if g is not None), None)
    if groups is None:
        raise ValueError(
            "The data is empty: SAP needs at least one trusted sample. Pass a non-empty dataset, list of "
            "examples or DataLoader."
        )
    return groups
