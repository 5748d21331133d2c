"""One way to walk any user data in batches, sharded exactly across processes.

Every pass (`runtime.passes.Runtime.run`) reads data through `iter_shard_batches`, so it lives here
once. Inputs are one of the two forms `runtime.contract.as_pass_data` gives: a map-style dataset
(`datasets.Dataset`, any `torch.utils.data.Dataset`, a list as `ExampleList`, a DataLoader's dataset
in index order through its collate_fn as `LoaderData`), read by position; or a stream
(`datasets.IterableDataset`, a torch `IterableDataset`, `ExampleStream`), read in order, whose items are
examples or ready batches (dicts whose `pixel_values` has a batch dimension).

Sharding never pads or repeats: example (or batch) `i` belongs to process `i % num_processes`.
`Accelerator.prepare(dataloader)` would duplicate samples to even out the last batch, which
would silently change a Gram matrix or a trusted selection; this module avoids that, so the
sum over processes equals a single-process run exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from tqdm.auto import tqdm
from transformers import DefaultDataCollator, default_data_collator
from transformers.utils import logging

from ..utils.identity import KEY_COLUMN, Identity
from .contract import LoaderData, check_collatable, is_map_style


logger = logging.get_logger(__name__)
Batch = dict[str, Any]
Collator = Callable[[list[dict[str, Any]]], Batch]

PASS_COLUMNS = ("pixel_values", "labels", "label", "label_ids", KEY_COLUMN)
"""What `default_collate` batches: the passes call `model(pixel_values=...)` and read the labels (and keys)."""


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
    keep: Optional[set[Identity]] = None,
    with_examples: bool = False,
    by_key: bool = True,
    check: Optional[Callable[[list, list], None]] = None,
    argument: str = "data",
) -> Iterator[tuple]:
    """Yield `(identities, batch)` for this process's share of `data` (`+ examples` with `with_examples`).

    `identities` are stable across process counts: the `key` of each example of a stream that has
    one, else the example's position in the whole data (a list of ints or strs). `keep`, when given,
    restricts the walk to those identities. `examples` are the uncollated examples of the batch
    (what trusted selection keeps, so the statistics need no second pass over the stream).

    Every example is read and decoded by exactly one process where the data allows it: a map-style
    dataset reads only this process's indices; a keyed `datasets.IterableDataset` with at least as
    many shards as processes is split by shards (`split_dataset_by_node`) before any row is decoded.
    Other streams are read whole by every process, each keeping every N-th example; with the image
    decoding in `collate_fn` (see `sap_hf.data.ImageTransform.collate`) that reading is cheap, but it
    is still every row's I/O on every process, so the main process warns once (`_warn_read_whole`).
    `by_key=False` ignores keys: identities are positions and every process reads the whole stream.
    Examples batched by `default_collate` are checked first (`check_collatable`, naming `argument`).
    """
    if isinstance(data, IndexedSubset):  # walk the stream itself, sharded, keeping the subset's identities
        keep = data.indices if keep is None else keep & data.indices
        data = data.data
    if isinstance(data, LoaderData) and data.indices is not None:  # the indices its sampler draws, by dataset index
        keep = set(data.indices) if keep is None else keep & set(data.indices)
    data, collate = examples_and_collate(data, collate_fn)

    def emit(ids: list, examples: list) -> tuple:
        if check is not None:  # the caller's checks of the raw examples (string labels), before the collator sees them
            check(ids, examples)
        if collate is default_collate:  # its failures speak torch's words: say what is wrong, and the fix
            check_collatable(ids, examples, argument)
        batch = collate(examples)
        return (ids, batch, examples) if with_examples else (ids, batch)

    if is_map_style(data):
        positions = range(process_index, len(data), num_processes)
        if keep is not None:
            positions = [i for i in positions if i in keep]
        for start in range(0, len(positions), batch_size):
            chunk = list(positions[start : start + batch_size])
            yield emit(chunk, fetch_examples(data, chunk))
        return
    stream, sharded = _own_shards(data, process_index, num_processes) if by_key else (data, False)
    iterator = iter(stream)
    first = next(iterator, None)
    if sharded and first is None:  # this process's shards are empty: is the stream keyed (then nothing to do)?
        first = next(iter(data), None)
        if first is None or _has_key(first):
            return
    if first is None:
        return
    keyed = by_key and _has_key(first)
    if sharded and not keyed:  # positions are only global on the whole stream: read it all, keep every N-th
        iterator, sharded = iter(data), False
        first = next(iterator, None)
    iterator = itertools.chain([first], iterator)
    if _is_batch(first):
        yield from _iter_prebatched(iterator, process_index, num_processes, keep, with_examples)
        return
    _warn_read_whole(data, sharded or not by_key, keyed, process_index, num_processes)
    step, offset = (1, 0) if sharded else (num_processes, process_index)
    yield from _chunked(iterator, step, offset, keyed, by_key, keep, batch_size, emit)


def _chunked(
    iterator: Iterator[Any],
    step: int,
    offset: int,
    keyed: bool,
    by_key: bool,
    keep: Optional[set],
    batch_size: int,
    emit: Callable[[list, list], tuple],
) -> Iterator[tuple]:
    """Every `step`-th example from `offset` (those in `keep`), in batches of `batch_size`, with their identities."""
    ids: list[Identity] = []
    examples: list[Any] = []
    for position, example in enumerate(iterator):
        if position % step != offset:
            continue
        identity = example_identity(example, position, keyed) if by_key else position
        if keep is not None and identity not in keep:
            continue
        ids.append(identity)
        examples.append(example)
        if len(examples) == batch_size:
            yield emit(ids, examples)
            ids, examples = [], []
    if examples:
        yield emit(ids, examples)


def examples_and_collate(data: Any, collate_fn: Optional[Collator]) -> tuple[Any, Collator]:
    """What to read and how to batch it: a DataLoader's dataset through its own collate_fn, else `collate_fn`;
    `default_collate` for none, `default_data_collator` (a Trainer's data_collator when it was given none) or a
    `DefaultDataCollator()` returning torch tensors (the one the image-classification guide builds)."""
    collate = (data.collate_fn if isinstance(data, LoaderData) else None) or collate_fn
    torch_default = isinstance(collate, DefaultDataCollator) and collate.return_tensors == "pt"
    collate = default_collate if collate in (None, default_data_collator) or torch_default else collate
    return (data.examples() if isinstance(data, LoaderData) else data), collate


def default_collate(examples: list[Any]) -> Batch:
    """`default_data_collator` on the `PASS_COLUMNS` of examples that hold `pixel_values`.

    As `Trainer` drops the columns its model's forward does not take (`remove_unused_columns`), so that an image
    column left beside `pixel_values` (a PIL image `map` or `with_transform` keeps unless told to remove it) is not
    batched: `default_data_collator` fails on it inside `torch.tensor`. Examples without `pixel_values` are batched
    whole, so that the error after collation names their keys.
    """
    if examples and isinstance(examples[0], Mapping) and "pixel_values" in examples[0]:
        examples = [{k: v for k, v in e.items() if k in PASS_COLUMNS} for e in examples]
    return default_data_collator(examples)


def _has_key(example: Any) -> bool:
    return isinstance(example, Mapping) and KEY_COLUMN in example


def example_identity(example: Any, position: int, keyed: bool) -> Identity:
    """The example's `key` in a keyed stream, else its position; a stream must not mix the two."""
    has_key = _has_key(example)
    if has_key != keyed:
        raise ValueError(
            f"Example {position} of the stream {'lacks' if keyed else 'has'} a {KEY_COLUMN!r} while the first example "
            f"{'has' if keyed else 'lacks'} one: give every example a unique {KEY_COLUMN!r} (or none)."
        )
    if not keyed:
        return position
    key = example[KEY_COLUMN]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise ValueError(
            f"Example {position} has {KEY_COLUMN}={key!r} ({type(key).__name__}); keys identify samples across "
            "processes and must be str or int."
        )
    return key


def _own_shards(data: Any, rank: int, world: int) -> tuple[Any, bool]:
    """This process's shards of a `datasets.IterableDataset` (nothing else is read or decoded), if it can be split so."""
    if world == 1:
        return data, False
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError:  # pragma: no cover - datasets is a dependency
        return data, False
    if not isinstance(data, datasets.IterableDataset) or data.num_shards < world:
        return data, False
    if data.num_shards % world == 0:
        return split_dataset_by_node(data, rank=rank, world_size=world), True
    try:  # datasets >= 4.x: uneven shard counts per process
        return split_dataset_by_node(data, rank=rank, world_size=world, strategy="shards"), True
    except TypeError:
        return data, False


def _warn_read_whole(stream: Any, split: bool, keyed: bool, rank: int, num_processes: int) -> None:
    """Say once (main process) why every process reads every row of `stream`, and how to give each only its share.

    Nothing to say for a `split` stream, one process, a list (`ExampleStream.in_memory`), or a `by_key=False`
    pass (which reads positions whole by design; a key would not change it).

    Without keys a stream is not split: identities must not depend on the process count, and a
    row's position in the whole stream is known only to a process that read every row before it.
    (Per-shard positions would change with the shard layout and would replace the positions a
    single process gives today.) A keyed stream is split only by whole shards.
    """
    if split or rank != 0 or num_processes == 1 or getattr(stream, "in_memory", False):
        return
    shards = getattr(stream, "num_shards", None)
    if not keyed:
        reason, fix = f"has no {KEY_COLUMN!r} column", f"add a unique {KEY_COLUMN!r} column (e.g. the image path)"
        fix += "" if shards is None or shards >= num_processes else f" and at least {num_processes} shards"
    elif shards is None:
        reason, fix = (
            f"is a {type(stream).__name__}, which cannot be split by shards",
            "pass a datasets.IterableDataset",
        )
        fix += f" with a {KEY_COLUMN!r} column and at least {num_processes} shards"
    elif shards >= num_processes:  # an older datasets: no split of uneven shard counts
        reason = f"has {shards} shards, which this datasets version cannot split evenly over {num_processes} processes"
        fix = f"update datasets, or give it a multiple of {num_processes} shards"
    else:
        reason = f"has {shards} shard(s) for {num_processes} processes"
        fix = f"give it at least {num_processes} shards (e.g. Dataset.to_iterable_dataset(num_shards={num_processes}))"
    logger.warning_once(
        f"The stream {reason}: every one of the {num_processes} processes reads all its rows and keeps every "
        f"{num_processes}-th. To have each process read only its own share, {fix}, or pass a map-style Dataset."
    )


def _iter_prebatched(
    iterator: Iterator[Any], rank: int, world: int, keep: Optional[set], with_examples: bool
) -> Iterator[tuple]:
    """Ready batches (a DataLoader): batch `b` belongs to process `b % world`; identities are positions.

    There are no separate examples to keep (`with_examples` yields None for them).
    """
    offset = 0
    for batch_number, batch in enumerate(iterator):
        size = batch["pixel_values"].shape[0]
        indices = list(range(offset, offset + size))
        offset += size
        if batch_number % world != rank:
            continue
        if keep is not None:
            mask = torch.tensor([i in keep for i in indices], dtype=torch.bool)
            if not mask.any():
                continue
            batch = {
                k: (v[mask] if isinstance(v, torch.Tensor) and v.shape[:1] == mask.shape else v)
                for k, v in batch.items()
            }
            indices = [i for i, kept in zip(indices, mask.tolist()) if kept]
        yield (indices, dict(batch), None) if with_examples else (indices, dict(batch))


def fetch_examples(data: Any, indices: list[int]) -> list[dict[str, Any]]:
    getitems = getattr(data, "__getitems__", None)
    if getitems is not None:
        fetched = getitems(indices)
        if isinstance(fetched, list):
            return fetched
    return [data[i] for i in indices]


def first_example_batch(data: Any, collate_fn: Optional[Collator] = None, argument: str = "data") -> Batch:
    """A batch holding only the first example of `data` (used to inspect the model's wiring).

    Raises ValueError on empty data or data without `pixel_values`, before anything is changed.
    """
    for _, batch in iter_shard_batches(data, batch_size=1, collate_fn=collate_fn, argument=argument):
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


def subset(data: Any, indices: Iterable[Identity]) -> Any:
    """The examples of `data` at `indices` (positions, or keys of a keyed stream or list), without loading a stream.

    Map-style data is indexed directly (each process later reads only its own indices). A stream is
    re-read, sharded like every other pass; `select_trusted` keeps a stream's trusted examples so
    that `sap_correct` needs no such second pass.
    """
    if isinstance(data, LoaderData):
        return data.select(list(indices))
    if is_map_style(data):
        chosen = sorted(set(int(i) for i in indices))
        outside = [i for i in chosen[:1] + chosen[-1:] if not 0 <= i < len(data)]
        if outside:
            raise ValueError(
                f"trusted_indices hold {outside[0]}, outside the {len(data)} examples of the data: pass positions of this "
                "data (e.g. result.trusted_indices of a run on the same data)."
            )
        return data.select(chosen) if hasattr(data, "select") else torch.utils.data.Subset(data, chosen)
    return IndexedSubset(data, set(indices))  # a stream is walked again: keyed examples are known by key


class IndexedSubset:
    """A re-iterable view of the examples of a stream whose identities (keys or positions) are in `indices`.

    `iter_shard_batches` recognises it and walks the underlying stream with `keep=indices`, so
    every process reads (and decodes) only its own shard; iterating it directly reads the whole stream.
    """

    def __init__(self, data: Iterable[Any], indices: set[Identity]):
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
            raise ValueError("Cannot take a subset of pre-batched data; pass a dataset or an iterable of examples.")
        keyed = _has_key(first)
        for position, example in enumerate(itertools.chain([first], stream)):
            if example_identity(example, position, keyed) in self.indices:
                yield example
