"""One engine under every pass over the data: `Runtime` carries the setup, `Runtime.run` owns the walk.

Selection, statistics, evaluation and the label audit each keep only their own logic (what to
do with one batch, what to gather at the end). Everything else is here, once:

* the bare model behind its wrappers, its device, eval mode without grad (`modeling`);
* the input contract: data forms and labels (`contract`), checked before the first forward;
* the process layout: each process reads its own shard, exactly once (`batching`);
* a progress bar on the main process, and the phase's wall time (`on_phase`, `timings`);
* one error protocol: an error on any process is raised on every process (`distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..utils.checks import positive_int
from ..utils.identity import Identity
from .batching import Batch, Collator, iter_shard_batches, shard_progress
from .contract import as_pass_data, check_class_names, check_example_labels, class_labels
from .distributed import (
    gather_shards,
    is_main_process,
    main_process_value,
    process_layout,
    raise_on_any_process,
    sum_over_processes,
)
from .modeling import inference_mode, model_device, predict_logits, unwrap_model


PhaseHook = Callable[[str, float], None]


@dataclass
class Runtime:
    """How passes read data and where they run: one object instead of arguments threaded through every call.

    Args:
        accelerator: an `accelerate.Accelerator` for several processes (None: this process alone).
        collate_fn: turns a list of examples into a batch (default `transformers.default_data_collator` on the
            columns the passes use: `batching.default_collate`);
            a `DataLoader` given as data brings its own.
        batch_size: examples per batch and process.
        show_progress: a progress bar per pass, on the main process.
        on_phase: called as `on_phase(phase, seconds)` after each pass ("selection", "statistics",
            "evaluation", ...), e.g. to time the phases of a correction; `timings` sums them too.
    """

    accelerator: Any = None
    collate_fn: Optional[Collator] = None
    batch_size: int = 32
    show_progress: bool = True
    on_phase: Optional[PhaseHook] = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.batch_size = positive_int("Runtime.batch_size", self.batch_size)

    @property
    def rank(self) -> int:
        return process_layout(self.accelerator)[0]

    @property
    def world(self) -> int:
        return process_layout(self.accelerator)[1]

    @property
    def is_main(self) -> bool:
        return is_main_process(self.accelerator)

    def replace(self, **changes: Any) -> Runtime:
        """A copy with some settings changed; the copy adds to the same `timings`."""
        return dataclasses.replace(self, **changes, timings=self.timings)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model, self.accelerator)

    def device(self, model: nn.Module) -> torch.device:
        return model_device(model, self.accelerator)

    def gather(self, local: Any) -> list[Any]:
        """Every process's `local`, in process order, on every process."""
        return gather_shards(local, self.accelerator)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_processes(tensor, self.accelerator)

    def main_value(self, value: Any) -> Any:
        return main_process_value(value, self.accelerator)

    def check(self, error: Optional[BaseException]) -> None:
        """Collective: raise `error` here, or the other processes' failure, on every process."""
        raise_on_any_process(error, self.accelerator)

    def record(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        if self.on_phase is not None:
            self.on_phase(phase, seconds)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a phase that is not a data pass of its own (e.g. a caller's own `evaluate_fn`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(phase, time.perf_counter() - start)

    @contextlib.contextmanager
    def run(
        self, model: nn.Module, data: Any, phase: str, *, argument: str = "data", description: Optional[str] = None
    ) -> Iterator[DataPass]:
        """A pass over `data` with `model` in inference mode: yields the `DataPass` to iterate.

        An exception inside the block is announced to every process and re-raised on all of them
        (the others raise a RuntimeError that points to it), so no process waits forever.
        """
        start = time.perf_counter()
        error: Optional[BaseException] = None
        bare = self.unwrap(model)
        try:
            check_class_names(bare, data, argument)
            walk = DataPass(self, bare, as_pass_data(data, argument), argument, description or f"SAP {phase}")
            with inference_mode(bare), walk.progress:
                yield walk
        except Exception as err:  # re-raised on this process below, announced to the others
            error = err
        self.check(error)
        self.record(phase, time.perf_counter() - start)


@dataclass
class PassBatch:
    """One batch of a pass: the samples' identities (positions or keys), the collated batch, the raw examples."""

    ids: list[Identity]
    batch: Batch
    examples: Optional[list[Any]]

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.batch["pixel_values"]

    def __len__(self) -> int:
        return len(self.ids)


class DataPass:
    """This process's share of one pass: its batches, the model's logits, the checked labels."""

    def __init__(self, runtime: Runtime, model: nn.Module, data: Any, argument: str, description: str):
        self.runtime = runtime
        self.model = model
        self.data = data
        self.argument = argument
        self.device = runtime.device(model)
        self.progress = shard_progress(
            data, description, rank=runtime.rank, world=runtime.world, show=runtime.show_progress
        )

    def batches(
        self, *, with_examples: bool = False, by_key: bool = True, keep: Optional[set] = None
    ) -> Iterator[PassBatch]:
        """This process's batches (each example read by one process only); the progress bar follows them."""
        for ids, batch, examples in iter_shard_batches(
            self.data,
            batch_size=self.runtime.batch_size,
            process_index=self.runtime.rank,
            num_processes=self.runtime.world,
            collate_fn=self.runtime.collate_fn,
            keep=keep,
            with_examples=True,
            by_key=by_key,
            check=lambda ids, examples: check_example_labels(ids, examples, self.argument),
            argument=self.argument,
        ):
            yield PassBatch(list(ids), batch, examples if with_examples else None)
            self.progress.update(len(ids))

    def logits(self, batch: PassBatch, pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's float logits for the batch (or for `pixels` in place of its images)."""
        return predict_logits(self.model, batch.batch, self.device, pixels)

    def labels(self, batch: PassBatch, num_labels: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """`(labels, valid)` checked against the contract (`contract.class_labels`); None for unlabelled data."""
        return class_labels(batch.batch, batch.ids, num_labels, self.argument)

    def require_labels(self, batch: PassBatch, num_labels: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch.batch, Mapping):  # e.g. a DataLoader of (image, label) tuples
            raise ValueError(
                f"{self.argument} gives batches of type {type(batch.batch).__name__}; {purpose} needs dict batches "
                "with 'pixel_values' and 'labels' (e.g. a collate_fn returning {'pixel_values': ..., 'labels': ...})."
            )
        checked = self.labels(batch, num_labels)
        if checked is None:
            raise ValueError(
                f"{self.argument} has no 'labels'/'label' (batch keys: {sorted(batch.batch)}); {purpose} needs labels."
            )
        return checked


def resolve_runtime(runtime: Optional[Runtime], **defaults: Any) -> Runtime:
    """`runtime`, or a new one with `defaults` (the settings of a caller that was given none)."""
    return runtime if runtime is not None else Runtime(**defaults)


def finite_samples(pixels: torch.Tensor) -> torch.Tensor:
    """One bool per sample: every pixel finite (a NaN image must not score, or corrupt a class's selection)."""
    return (
        torch.isfinite(pixels.reshape(pixels.shape[0], -1)).all(1)
        if pixels.is_floating_point()
        else torch.ones(pixels.shape[0], dtype=torch.bool, device=pixels.device)
    )


__all__: Sequence[str] = ["DataPass", "PassBatch", "PhaseHook", "Runtime", "finite_samples", "resolve_runtime"]
