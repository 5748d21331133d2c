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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from ..runtime.passes import Runtime, resolve_runtime
from ..utils.checks import check_choice, invalid
from ..utils.io import atomic_path
from .config import ACCUMULATION_DTYPES
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
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
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
        signature = self.meta.get("weights_signature")
        if signature != weights_signature(model, self.target_modules):
            raise ValueError(
                f"{source} were collected on other weights than this model's (fingerprint mismatch): the model was "
                "retrained or already corrected. Delete the file or pass another stats_path to collect anew."
            )

    @classmethod
    def load(cls, path: Union[str, Path]) -> ActivationStats:
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
def input_hooks(
    model: nn.Module, names: Sequence[str], callback: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call `callback(name, input_tensor)` on every forward of the named modules; always unhook."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in names:

            def hook(module: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
                tensor = args[0] if args else kwargs.get("input")
                callback(_name, tensor)

            handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class GroupedGrams:
    """The Gram accumulators of one statistics pass, grouped by shared input as the first batch shows.

    On the first forward every target records its input tensor, and each *distinct* tensor (q/k/v
    share one) is accumulated once; after that forward `fix_groups` turns what was seen into the
    groups, and every later forward accumulates once per group. No separate discovery forward.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
        max_tokens_per_sample: Optional[int],
        generator: Optional[torch.Generator],
    ):
        self.model, self.names, self.dtype, self.device = model, list(names), dtype, device
        self.max_tokens, self.generator = max_tokens_per_sample, generator
        self.groups: Optional[list[TargetGroup]] = None
        self.accumulators: dict[str, GramAccumulator] = {}  # group name -> accumulator, once the groups are known
        self.samples = 0
        self._first_inputs: dict[str, torch.Tensor] = {}
        self._first: list[tuple[torch.Tensor, GramAccumulator]] = []  # one per distinct input tensor

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self.groups is None:
            self._first_inputs.setdefault(name, tensor)
            if any(held is tensor for held, _ in self._first):
                return  # a layer sharing this input (k/v after q) already accumulated it
            accumulator = GramAccumulator(tensor.shape[-1], self.dtype, self.device)
            self._first.append((tensor, accumulator))
        elif name in self.accumulators:
            accumulator = self.accumulators[name]
        else:
            return
        accumulator.update(subsample_tokens(tensor, self.max_tokens, self.generator))

    def fix_groups(self) -> None:
        """After the first forward: the groups, each with the accumulator of its input tensor."""
        if self.groups is not None:
            return
        self.groups = _groups_seen(self.model, self.names, self._first_inputs)
        for group in self.groups:
            held = self._first_inputs[group.name]
            self.accumulators[group.name] = next(acc for tensor, acc in self._first if tensor is held)
        self._first_inputs.clear()
        self._first.clear()

    def reduce(self, groups: list[TargetGroup], runtime: Runtime) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Every process's sums added up (a process whose shard was empty contributes zeros), checked finite."""
        grams, counts = {}, {}
        for group in groups:
            accumulator = self.accumulators.setdefault(
                group.name, GramAccumulator(group.in_features, self.dtype, self.device)
            )
            gram = runtime.sum(accumulator.result())
            count = runtime.sum(torch.tensor([accumulator.count], dtype=torch.float64, device=self.device))
            if not torch.isfinite(gram.sum(dtype=torch.float64)):  # NaN/Inf propagate; no d x d bool temporary
                raise ValueError(
                    f"Non-finite activations reached {group.members} (e.g. an fp16 overflow or NaN inputs): the "
                    "statistics are unusable and no weight was changed. Run the statistics in float32/bfloat16 "
                    "or check the inputs for NaN/Inf."
                )
            grams[group.name], counts[group.name] = gram, int(count.item())
        return grams, counts


def _accumulation_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """'float32'/'float64' or the torch dtype, else a ValueError naming the choices (not an AttributeError)."""
    if isinstance(value, torch.dtype) and value in (torch.float32, torch.float64):
        return value
    return getattr(torch, check_choice("accumulation_dtype", value, ACCUMULATION_DTYPES))


def _check_target_names(model: nn.Module, target_names: Sequence[str]) -> None:
    """A list of the model's `nn.Linear` names, else a ValueError naming the bad ones and `find_target_modules`
    (a string was read letter by letter, a misspelt name failed as a bare KeyError inside the pass)."""
    fix = "give a list of the model's nn.Linear names, e.g. sap_hf.core.targets.find_target_modules(model)."
    if isinstance(target_names, str) or not target_names:
        raise invalid("target_names", target_names, fix)
    modules = dict(model.named_modules())
    unknown = [name for name in target_names if not isinstance(modules.get(name), nn.Linear)]
    if unknown:
        raise invalid("target_names", unknown[:3], f"not nn.Linear layers of the model; {fix}")


def collect_statistics(
    model: nn.Module,
    data: Any,
    target_names: Sequence[str],
    *,
    runtime: Optional[Runtime] = None,
    max_tokens_per_sample: Optional[int] = None,
    accumulation_dtype: Union[str, torch.dtype] = torch.float32,
    seed: int = 0,
) -> ActivationStats:
    """One forward pass over `data` accumulating each target group's Gram matrix and token count.

    With several processes (`runtime.accelerator`), every process reads its own shard and the sums
    are all-reduced, so every process returns the same global statistics, equal to one process's.
    Which layers share an input (q/k/v) is learnt from the first batch of the pass itself.
    """
    runtime = resolve_runtime(runtime)
    dtype = _accumulation_dtype(accumulation_dtype)
    _check_target_names(runtime.unwrap(model), target_names)
    with runtime.run(model, data, "statistics", argument="trusted data") as walk:
        generator = torch.Generator().manual_seed(seed + runtime.rank) if max_tokens_per_sample else None
        grams = GroupedGrams(walk.model, target_names, dtype, walk.device, max_tokens_per_sample, generator)
        with input_hooks(walk.model, grams.names, grams):
            for batch in walk.batches():
                walk.logits(batch)
                grams.fix_groups()
                grams.samples += len(batch)
    groups = _agree_on_groups(grams.groups, runtime)
    gram_of, counts = grams.reduce(groups, runtime)
    samples = int(runtime.sum(torch.tensor([grams.samples], dtype=torch.float64, device=walk.device)).item())
    logger.info(
        "Collected SAP statistics for %d layers in %d groups over %d samples (%d tokens per layer).",
        sum(len(g.members) for g in groups),
        len(groups),
        samples,
        max(counts.values(), default=0),
    )
    return ActivationStats(
        groups=groups,
        grams=gram_of,
        counts=counts,
        max_tokens_per_sample=max_tokens_per_sample,
        meta={
            "weights_signature": weights_signature(walk.model, [n for g in groups for n in g.members]),
            "samples": samples,
        },
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


def _agree_on_groups(groups: Optional[list[TargetGroup]], runtime: Runtime) -> list[TargetGroup]:
    """Every process's groups (one whose shard was empty learns them from the others); raises on empty data."""
    if runtime.world > 1:
        groups = next((g for g in runtime.gather(groups) if g is not None), None)
    if groups is None:
        raise ValueError(
            "The trusted data is empty: SAP needs at least one trusted sample. Pass a non-empty dataset, list of "
            "examples or DataLoader."
        )
    return groups
