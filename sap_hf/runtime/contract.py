"""What users may hand a pass, checked once, up front, with errors that name the argument and the fix.

Data: a map-style dataset (`datasets.Dataset`, any `torch.utils.data.Dataset`), a stream
(`datasets.IterableDataset`, a torch `IterableDataset`), a list of examples or of ready batches, one
batch dict, a `DataLoader`, or a one-shot iterator (a generator). `as_pass_data` turns each into one
of two forms, so that the passes see nothing else: a map-style dataset (read by position) or a
stream (an iterable dataset, read in order). Every pass must see the same examples in the same order
each time it reads the data, or a selection would be paired with statistics of other samples:

* a list of examples is a map-style dataset (`ExampleList`); a list whose examples carry a `key`,
  a list of ready batches, one batch dict and a `DataLoader` over a stream are streams
  (`ExampleStream`), so keyed examples keep their keys as identities;
* a `DataLoader` over a map-style dataset (e.g. `Trainer.get_train_dataloader()`, shuffled and
  reshuffled on every iteration) is read as its dataset in index order, through the loader's own
  `collate_fn` (`LoaderData`); a sampler that draws a subset reads that subset, in index order;
* a one-shot iterator is read once and kept (in memory, with a warning), then converted as a list;
* a dict of datasets (`DatasetDict`) is refused: which split is meant must be said.

Labels: one int-like class id per sample. Integral floats and numpy integers are converted;
`-100` (the transformers ignore index) marks a sample that passes skip; strings, fractions,
multi-label targets and ids outside `[0, num_labels)` are errors naming the sample and the value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.utils import logging

from ..utils.identity import KEY_COLUMN


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
"""The transformers ignore index: a sample with this label is skipped by selection, evaluation and the audit."""

_WHOLE_DATA_SAMPLERS = (
    "SequentialSampler",
    "RandomSampler",
    "SeedableRandomSampler",
    "DistributedSampler",
    "LengthGroupedSampler",
    "DistributedLengthGroupedSampler",
)
"""Samplers that visit the whole dataset (in some order): their loader is read as the whole dataset."""


class LoaderData:
    """A DataLoader's dataset read in index order through its `collate_fn`; `indices`: only those its sampler draws.

    Sample identities are indices of the loader's dataset, whether the sampler draws all of them or
    a subset, so `result.trusted_indices` (or an audit's indices) select the same examples from
    `loader.dataset` that SAP read.
    """

    def __init__(self, dataset: Any, collate_fn: Any, indices: Optional[list[int]] = None):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.indices = indices

    def examples(self) -> Any:
        """The map-style data that positions index: the loader's whole dataset (`indices` restrict the walk)."""
        return self.dataset

    def select(self, indices: Sequence[int]) -> LoaderData:
        """The examples at `indices` of the loader's dataset (the trusted ones, say), read the same way."""
        chosen = sorted(set(int(i) for i in indices))
        allowed = set(self.indices) if self.indices is not None else None
        outside = [i for i in chosen if not 0 <= i < len(self.dataset) or (allowed is not None and i not in allowed)]
        if outside:
            raise ValueError(
                f"trusted_indices hold {outside[0]}, which the DataLoader does not draw from its {len(self.dataset)}-example "
                "dataset: pass indices of loader.dataset (e.g. result.trusted_indices of a run on the same loader)."
            )
        return LoaderData(self.dataset, self.collate_fn, chosen)

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        order = range(len(self.dataset)) if self.indices is None else self.indices
        return (self.dataset[i] for i in order)


class ExampleList(torch.utils.data.Dataset):
    """A list of examples as a map-style dataset: position `i` is example `i` (also its identity)."""

    def __init__(self, examples: Sequence[Any]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


class ExampleStream(torch.utils.data.IterableDataset):
    """Re-readable examples or ready batches read in order: what cannot be read by position without losing meaning.

    A list of keyed examples (their `key` is their identity, as in a keyed `datasets.IterableDataset`),
    a list of ready batches (one batch dict is a list of one), a `DataLoader` over a stream (its batches).
    `in_memory`: the source is a list, so reading it whole on every process costs no I/O; `batches`: its
    items are ready batches (which only a pass can read, not a training run that batches examples itself).
    """

    def __init__(self, source: Iterable[Any], batches: bool):
        self.source = source
        self.batches = batches
        self.in_memory = isinstance(source, (list, tuple))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.source)

    def __len__(self) -> int:  # the number of items (examples, or batches of a list of batches), when known
        return len(self.source)  # raises TypeError for a source without a length, as num_examples expects


def is_map_style(data: Any) -> bool:
    """Indexable data with a length (a `datasets.Dataset`, a torch map-style `Dataset`); never a stream or a list.

    A torch `IterableDataset` that defines `__len__` still has `Dataset.__getitem__` (which raises): it is a stream.
    """
    return (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple, Mapping, str, bytes, torch.utils.data.IterableDataset))
    )


def as_pass_data(data: Any, argument: str = "data") -> Any:
    """`data` in a form that gives the same examples in the same order on every read, or a ValueError naming `argument`."""
    if data is None:
        raise ValueError(
            f"{argument}=None: pass a datasets.Dataset, an IterableDataset, a list of examples or a DataLoader."
        )
    if isinstance(data, (LoaderData, ExampleList, ExampleStream)):
        return data
    if isinstance(data, (list, tuple)):
        return _from_list(data)
    if isinstance(data, (str, bytes, Path)):
        raise ValueError(
            f"{argument}={str(data)!r} is a path or name, not data: load it first, e.g. "
            "datasets.load_dataset(...) or datasets.load_from_disk(...), with the images as pixel_values."
        )
    if isinstance(data, Mapping):
        if "pixel_values" in data:  # one ready batch
            return ExampleStream([data], batches=True)
        keys = list(data)
        hint = f"{argument}=data[{keys[0]!r}]" if keys else f"a non-empty {argument}"
        raise ValueError(
            f"{argument} is a dict of {len(keys)} entries ({', '.join(map(repr, keys[:6]))}), not one dataset: pass one "
            f"of them, e.g. {hint}."
        )
    if isinstance(data, torch.utils.data.DataLoader):
        return _loader_data(data, argument)
    if is_map_style(data):
        return data
    if not isinstance(data, Iterable):
        raise ValueError(
            f"{argument} is a {type(data).__name__}, which is not data: pass a datasets.Dataset, an IterableDataset, a "
            "list of examples or a DataLoader."
        )
    if isinstance(data, Iterator):  # a generator: a second pass would find it empty
        kept = list(data)
        logger.warning(
            "%s is a one-shot iterator: it was read once and kept in memory (%d items) so that every pass sees the same "
            "examples. Pass a datasets.Dataset (or a list) to avoid the copy.",
            argument,
            len(kept),
        )
        return _from_list(kept)
    return data


def _from_list(items: Sequence[Any]) -> Any:
    """A list as one of the two forms: examples by position, or a stream when its items carry keys or are batches."""
    first = items[0] if items else None
    is_batch = isinstance(first, Mapping) and getattr(first.get("pixel_values"), "dim", lambda: 0)() == 4
    if is_batch or (isinstance(first, Mapping) and KEY_COLUMN in first):
        return ExampleStream(items, batches=is_batch)
    return ExampleList(items)


def _loader_data(loader: torch.utils.data.DataLoader, argument: str) -> Any:
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return ExampleStream(loader, batches=True)  # a stream of batches, read in the stream's own order
    sampler = _innermost_sampler(loader)
    indices = None
    if type(sampler).__name__ not in _WHOLE_DATA_SAMPLERS:
        fixed = getattr(sampler, "indices", None)  # SubsetRandomSampler: a fixed set, drawn in random order
        if fixed is None:
            logger.warning(
                "%s is a DataLoader whose sampler (%s) may draw a different set on every read and process: SAP reads its "
                "whole dataset instead. To correct on some examples only, pass them as a dataset (e.g. "
                "torch.utils.data.Subset or dataset.select(indices)).",
                argument,
                type(sampler).__name__,
            )
        else:
            indices = sorted({int(i) for i in fixed})
    logger.info(
        "%s is a DataLoader: SAP reads its dataset%s in index order through its collate_fn (its shuffling would pair "
        "one pass's samples with another's).",
        argument,
        "" if indices is None else f" ({len(indices)} sampled indices)",
    )
    return LoaderData(dataset, loader.collate_fn, indices)


def _innermost_sampler(loader: torch.utils.data.DataLoader) -> Any:
    """The sampler that decides which indices a loader visits (through accelerate's batch-sampler shards)."""
    batch_sampler = loader.batch_sampler
    while hasattr(batch_sampler, "batch_sampler"):  # accelerate.data_loader.BatchSamplerShard
        batch_sampler = batch_sampler.batch_sampler
    return getattr(batch_sampler, "sampler", None) or loader.sampler


def class_labels(
    batch: Mapping[str, Any],
    ids: Sequence[Any],
    num_labels: int,
    argument: str = "data",
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """`(labels, valid)`: int64 class ids and a mask that is False where the label is -100; None when unlabelled.

    Raises a ValueError naming `argument`, the sample and the value for labels that are not one
    class id in `[0, num_labels)` per sample. String labels in the raw examples are caught before
    collation (`check_example_labels`), where a collator would drop or choke on them.
    """
    raw = batch.get("labels", batch.get("label")) if isinstance(batch, Mapping) else None
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        raise _string_labels(argument, ids[0], raw[0])
    try:
        labels = torch.as_tensor(raw)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{argument}: the labels {raw!r} are not class ids ({err}); give one int per sample."
        ) from None
    if labels.dim() != 1 or labels.shape[0] != len(ids):
        raise ValueError(
            f"{argument}: labels of shape {tuple(labels.shape)} for {len(ids)} samples; SAP corrects single-label "
            "classifiers and needs one class id per sample (not one-hot or multi-label targets)."
        )
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{argument}: labels of dtype {labels.dtype}; give int class ids in [0, {num_labels}).")
    if labels.is_floating_point():
        whole = torch.isfinite(labels) & (labels == labels.round())
        if not whole.all():
            position = int((~whole).nonzero()[0, 0])
            raise ValueError(
                f"{argument}: sample {ids[position]!r} has label {float(labels[position])!r}, not a whole class id; "
                f"give int labels in [0, {num_labels}) (regression targets are not supported)."
            )
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= num_labels))
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{argument}: sample {ids[position]!r} has label {int(labels[position])}, outside the model's {num_labels} "
            f"classes [0, {num_labels}) (-100 is ignored); fix the label mapping or the model's num_labels."
            + (
                " A label of -1 is how datasets' ClassLabel marks a missing label: map it to -100 "
                "(ds.map(lambda e: {'label': -100 if e['label'] == -1 else e['label']})) or filter those rows."
                if int(labels[position]) == -1
                else ""
            )
        )
    return labels, valid


def check_class_names(model: Any, data: Any, argument: str = "data") -> None:
    """Refuse data whose ClassLabel orders the model's classes otherwise (a silent wrong result otherwise).

    A `datasets` split keeps its label column's `ClassLabel` names; a model names its logits in `config.id2label`.
    When both name the same classes in another order, every sample would be scored against another class's logit:
    a ValueError names `argument` and datasets' own fix (`align_labels_with_mapping`). Models with the default
    names (`LABEL_0`, ...), unnamed data, and names that differ as sets (other names for the classes) are let
    through, the last with a warning.
    """
    source = data if hasattr(data, "features") else getattr(data, "dataset", None)
    features = getattr(source, "features", None)
    if not isinstance(features, Mapping):  # not a `datasets` split (or one without features): nothing to compare
        return
    column = next((c for c in ("labels", "label") if c in features), None)
    data_names = [str(n) for n in getattr(features.get(column), "names", None) or []] if column else []
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if not data_names or not names or names == data_names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return
    if sorted(names) != sorted(data_names):
        logger.warning_once(
            f"{argument}'s ClassLabel {column!r} names its classes {data_names[:5]}..., the model's config.id2label "
            f"{names[:5]}...: check that class i of the data is logit i of the model."
        )
        return
    moved = next(name for i, name in enumerate(data_names) if names[i] != name)
    raise ValueError(
        f"{argument}: its ClassLabel {column!r} gives class {moved!r} id {data_names.index(moved)}, the model's "
        f"config.id2label id {names.index(moved)}: every sample would be scored against another class's logit. "
        f"Align the data with the model first: {argument} = {argument}.align_labels_with_mapping("
        f"model.config.label2id, {column!r})."
    )


def check_example_labels(ids: Sequence[Any], examples: Sequence[Any], argument: str = "data") -> None:
    """Before collation: a string label would make the collator fail with an unrelated message."""
    first = examples[0] if examples else None
    value = first.get("labels", first.get("label")) if isinstance(first, Mapping) else None
    if isinstance(value, str):
        raise _string_labels(argument, ids[0], value)


def _string_labels(argument: str, identity: Any, value: str) -> ValueError:
    return ValueError(
        f"{argument}: sample {identity!r} has the label {value!r}, a string; SAP needs int class ids: map the names "
        "through the model's config.label2id (or a datasets ClassLabel column, dataset.class_encode_column('label'))."
    )


IMAGE_COLUMNS = ("image", "img")
"""Columns that hold images not yet turned into `pixel_values` (as `sap_hf.data.ImageTransform` reads them)."""


def check_collatable(ids: Sequence[Any], examples: Sequence[Any], argument: str = "data") -> None:
    """Before `default_data_collator` batches raw examples: what it would fail on (or drop) with torch's words.

    Examples must be dicts, hold `pixel_values` (not an image column still to decode) and share one
    image size. Raises a ValueError naming `argument`, the sample, what is wrong and the fix; a
    `collate_fn` of the user's own is trusted with whatever its examples are.
    """
    if not examples:
        return
    first = examples[0]
    if not isinstance(first, Mapping):
        raise ValueError(
            f"{argument}: sample {ids[0]!r} is a {type(first).__name__}, not a dict of columns, which the default "
            "collator cannot batch: give examples such as {'pixel_values': tensor, 'labels': int} (e.g. a "
            "datasets.Dataset), or pass collate_fn= (SAPTrainer: data_collator=) a function that turns a list of "
            "your examples into a batch dict."
        )
    if "pixel_values" not in first:
        image_column = next((column for column in IMAGE_COLUMNS if column in first), None)
        if image_column is not None:
            raise ValueError(
                f"{argument}: the examples hold images in column {image_column!r} but no 'pixel_values': turn the "
                "images into pixel values first, e.g. data = sap_hf.data.prepare_image_dataset(data, "
                "ImageTransform(image_processor=processor)), or pass collate_fn=ImageTransform(...).collate."
            )
        return  # no images at all: `check_pixel_values` names the keys after collation
    shapes = [
        (identity, tuple(getattr(example.get("pixel_values"), "shape", ()) or ()))
        for identity, example in zip(ids, examples)
        if isinstance(example, Mapping)
    ]
    odd = next(((identity, shape) for identity, shape in shapes if shape != shapes[0][1]), None)
    if odd is not None:
        raise ValueError(
            f"{argument}: samples {shapes[0][0]!r} and {odd[0]!r} have pixel_values of shapes {shapes[0][1]} and "
            f"{odd[1]}; a batch needs one image size: resize the images to one size, e.g. with "
            "sap_hf.data.prepare_image_dataset(data, ImageTransform(image_size=224)) or the model's image processor."
        )
