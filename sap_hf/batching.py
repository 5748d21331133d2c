"""One way to walk any user data in batches, sharded exactly across processes.

Statistics, trusted selection and evaluation all read data the same way, so it lives here once.
Accepted inputs: a map-style dataset (`datasets.Dataset`, any `torch.utils.data.Dataset`), an
iterable of examples (`datasets.IterableDataset`, a list of dicts), or an iterable of ready
batches (a `DataLoader`, a list of dicts whose `pixel_values` has a batch dimension).

Sharding never pads or repeats: example (or batch) `i` belongs to process `i % num_processes`.
`Accelerator.prepare(dataloader)` would duplicate samples to even out the last batch, which
would silently change a Gram matrix or a trusted selection; this module avoids that, so the
sum over processes equals a single-process run exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers import default_data_collator

Batch = dict[str, Any]
Collator = Callable[[list[dict[str, Any]]], Batch]


def is_map_style(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple))


def _is_batch(item: Any) -> bool:
    if not isinstance(item, Mapping):
        return False
    pixels = item.get("pixel_values")
    return isinstance(pixels, torch.Tensor) and pixels.dim() == 4


def num_examples(data: Any) -> Optional[int]:
    """Number of examples when it is known without reading the data (for progress bars)."""
    try:
        return len(data)
    except TypeError:
        return None


def process_layout(accelerator: Any) -> tuple[int, int]:
    """`(process_index, num_processes)`; `(0, 1)` without an Accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def shard_progress(data: Any, description: str, *, rank: int, world: int, show: bool) -> tqdm:
    """A progress bar over this process's share of `data`, shown on the main process only."""
    total = num_examples(data)
    return tqdm(
        total=math.ceil(total / world) if total else None,
        desc=description,
        unit="sample",
        disable=not (show and rank == 0),
    )


def iter_shard_batches(
    data: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    collate_fn: Optional[Collator] = None,
    keep: Optional[set[int]] = None,
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """Yield `(global_indices, batch)` for this process's share of `data`.

    `global_indices` are the positions of the examples in the whole data (stable across process
    counts), which is what trusted selection returns. `keep`, when given, restricts the walk to
    those global indices (a trusted subset of a stream).
    """
    collate = collate_fn or default_data_collator
    if num_processes > 1 and type(data).__name__ in ("DataLoaderShard", "DataLoaderDispatcher"):
        raise ValueError(
            "The data is a DataLoader already sharded by accelerator.prepare(); SAP shards data itself (without the "
            "padding duplicates prepare() adds). Pass the dataset or the unprepared DataLoader."
        )
    if is_map_style(data):
        positions = range(process_index, len(data), num_processes)
        if keep is not None:
            positions = [i for i in positions if i in keep]
        for start in range(0, len(positions), batch_size):
            chunk = list(positions[start : start + batch_size])
            yield torch.tensor(chunk, dtype=torch.long), collate(_fetch_examples(data, chunk))
        return
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        return
    iterator = itertools.chain([first], iterator)
    if _is_batch(first):
        offset = 0
        for batch_number, batch in enumerate(iterator):
            size = batch["pixel_values"].shape[0]
            indices = torch.arange(offset, offset + size)
            offset += size
            if batch_number % num_processes != process_index:
                continue
            if keep is not None:
                mask = torch.tensor([int(i) in keep for i in indices], dtype=torch.bool)
                if not mask.any():
                    continue
                batch = {k: (v[mask] if isinstance(v, torch.Tensor) and v.shape[:1] == mask.shape else v) for k, v in batch.items()}
                indices = indices[mask]
            yield indices, dict(batch)
        return
    buffer: list[tuple[int, Any]] = []
    for position, example in enumerate(iterator):
        if position % num_processes != process_index or (keep is not None and position not in keep):
            continue
        buffer.append((position, example))
        if len(buffer) == batch_size:
            yield _collate_buffer(buffer, collate)
            buffer = []
    if buffer:
        yield _collate_buffer(buffer, collate)


def _fetch_examples(data: Any, indices: list[int]) -> list[dict[str, Any]]:
    getitems = getattr(data, "__getitems__", None)
    if getitems is not None:
        fetched = getitems(indices)
        if isinstance(fetched, list):
            return fetched
    return [data[i] for i in indices]


def _collate_buffer(buffer: list[tuple[int, Any]], collate: Collator) -> tuple[torch.Tensor, Batch]:
    indices = torch.tensor([position for position, _ in buffer], dtype=torch.long)
    return indices, collate([example for _, example in buffer])


def first_example_batch(data: Any, collate_fn: Optional[Collator] = None) -> Batch:
    """A batch holding only the first example of `data` (used to inspect the model's wiring).

    Raises ValueError on empty data or data without `pixel_values`, before anything is changed.
    """
    for _, batch in iter_shard_batches(data, batch_size=1, collate_fn=collate_fn):
        check_pixel_values(batch)
        return {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
    raise ValueError(
        "The data is empty: SAP needs at least one trusted sample. Pass a non-empty dataset, list of "
        "examples or DataLoader."
    )


def check_pixel_values(batch: Mapping[str, Any]) -> None:
    pixels = batch.get("pixel_values") if isinstance(batch, Mapping) else None
    if not isinstance(pixels, torch.Tensor):
        seen = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"Expected batches with a 'pixel_values' tensor, got keys {seen}. Turn images into pixel values "
            "first, e.g. dataset.with_transform(sap_hf.data.ImageTransform(image_processor=processor))."
        )
    if pixels.dim() != 4:
        raise ValueError(
            f"'pixel_values' must be a (batch, channels, height, width) tensor after collation, got shape "
            f"{tuple(pixels.shape)}."
        )


def batch_labels(batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
    labels = batch.get("labels", batch.get("label"))
    if labels is None:
        return None
    return labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)


def subset(data: Any, indices: Iterable[int]) -> Any:
    """The examples of `data` at `indices` (a trusted subset), without reading a stream into memory."""
    chosen = sorted(set(int(i) for i in indices))
    if hasattr(data, "select") and is_map_style(data):
        return data.select(chosen)
    if is_map_style(data):
        return torch.utils.data.Subset(data, chosen)
    return IndexedSubset(data, set(chosen))


class IndexedSubset:
    """A re-iterable view of the examples of a stream whose positions are in `indices`."""

    def __init__(self, data: Iterable[Any], indices: set[int]):
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        stream = iter(self.data)
        first = next(stream, None)
        if first is None:
            return
        if _is_batch(first):
            raise ValueError(
                "Cannot take a subset of pre-batched data; pass a dataset or an iterable of examples."
            )
        for position, example in enumerate(itertools.chain([first], stream)):
            if position in self.indices:
                yield example
