"""Turn ``image`` columns into the ``pixel_values``/``labels`` a vision model takes.

Transforms run lazily (``Dataset.with_transform``, ``IterableDataset.map``), so
datasets stay small on disk and augmentation differs per epoch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import default_data_collator

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")


class ImageTransform:
    """Batch transform: ``{"image": [...], "label": [...]}`` -> ``{"pixel_values": [C×H×W], "labels": [...]}``.

    Build it from a ``transformers`` image processor (its resize/normalisation
    match a pretrained checkpoint) or from explicit ``image_size``,
    ``num_channels``, ``mean`` and ``std`` (a model trained from scratch, e.g.
    a 1-channel ViT on 28×28 Fashion-MNIST). Images may be PIL images, uint8
    arrays (H×W or H×W×C, or nested lists from an ``Array2D`` column) or
    ``{"bytes", "path"}`` dicts. Columns other than the image, the label and
    ``keep_columns`` are dropped.

    Args:
        image_processor: e.g. ``AutoImageProcessor.from_pretrained(...)``; excludes ``image_size``.
        image_size: output side (int) or ``(height, width)`` when no processor is given.
        num_channels: 1 (grayscale) or 3 (RGB); images are converted to match.
        mean, std: per-channel normalisation (one value is broadcast); default 0.5, as ViT.
        augment: random horizontal flip and a random shift (pad by 1/8 of the side
            with black, crop back), for training splits only.
        seed: seeds the augmentation; each DataLoader worker and process
            (``RANK``) derives its own stream from it, so workers do not repeat each other.
        keep_columns: extra columns passed through unchanged (a sample index; ``key``, the
            identity SAP shards a stream by and picks trusted samples with).
    """

    def __init__(
        self,
        image_processor: Any | None = None,
        *,
        image_size: int | tuple[int, int] | None = None,
        num_channels: int = 3,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        augment: bool = False,
        seed: int = 0,
        keep_columns: Sequence[str] = ("index", "idx", "key"),
    ) -> None:
        if (image_processor is None) == (image_size is None):
            raise ValueError(
                "Pass exactly one of image_processor (a transformers image processor) or image_size "
                f"(got image_processor={type(image_processor).__name__}, image_size={image_size!r})."
            )
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels={num_channels!r} must be 1 (grayscale) or 3 (RGB).")
        self.image_processor = image_processor
        self.num_channels = num_channels
        self.size = _as_size(image_size) if image_size is not None else None
        if image_processor is not None and (mean is not None or std is not None):
            raise ValueError("mean/std are taken from image_processor; set them on the processor instead.")
        self.mean = _per_channel("mean", 0.5 if mean is None else mean, num_channels)
        self.std = _per_channel("std", 0.5 if std is None else std, num_channels)
        if np.any(self.std <= 0):
            raise ValueError(f"std={std!r} must be positive.")
        self.augment = augment
        self.seed = seed
        self.keep_columns = tuple(keep_columns)
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "ImageTransform":
        """Size and channels from a model config (``config.image_size``, ``config.num_channels``)."""
        return cls(image_size=config.image_size, num_channels=getattr(config, "num_channels", 3), **kwargs)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        image_column = next((c for c in IMAGE_COLUMNS if c in batch), None)
        if image_column is not None:
            images = [self._augment(self._to_pil(x)) for x in batch[image_column]]
            out["pixel_values"] = self._pixels(images)
        elif "pixel_values" in batch:
            out["pixel_values"] = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in batch["pixel_values"]]
        else:
            raise ValueError(
                f"The batch has columns {sorted(batch)} but no image column ({' or '.join(IMAGE_COLUMNS)}) "
                "nor pixel_values; rename the image column to 'image' (dataset.rename_column(old, 'image'))."
            )
        label_column = next((c for c in LABEL_COLUMNS if c in batch), None)
        if label_column is not None:
            out["labels"] = list(batch[label_column])
        for column in self.keep_columns:
            if column in batch:
                out[column] = list(batch[column])
        return out

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A ``collate_fn``: raw examples (undecoded images) -> a model batch, decoding each image here.

        Hand SAP the raw stream and this collator (``sap_correct(raw, ..., collate_fn=t.collate)``)
        and every image is decoded once, by the one process whose shard it is in, after the
        stream was split; the trusted samples SAP keeps are then the raw rows (a path and a label),
        not decoded tensors. String columns (``key``) are dropped from the batch.
        """
        if not examples:
            raise ValueError("collate() got no examples.")
        out = self({column: [example[column] for example in examples] for column in examples[0]})
        return default_data_collator([dict(zip(out, row)) for row in zip(*out.values())])

    def _to_pil(self, image: Any) -> Image.Image:
        if isinstance(image, dict):
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        elif not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8:  # nested lists (Array2D columns) arrive as int64
                if not (np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() <= array.max() <= 255):
                    raise ValueError(
                        f"Image arrays must hold integers in 0..255, got dtype {array.dtype}; "
                        "convert them to uint8 first (floats are ambiguous: 0..1 or 0..255)."
                    )
                array = array.astype(np.uint8)
            image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        mode = "L" if self.num_channels == 1 else "RGB"
        return image if image.mode == mode else image.convert(mode)

    def _augment(self, image: Image.Image) -> Image.Image:
        if not self.augment:
            return image
        rng = self._generator()
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        pad = max(1, round(min(image.size) / 8))
        dx, dy = rng.integers(0, 2 * pad + 1, size=2)
        padded = ImageOps.expand(image, border=pad, fill=0)
        return padded.crop((int(dx), int(dy), int(dx) + image.width, int(dy) + image.height))

    def _pixels(self, images: list[Image.Image]) -> list[torch.Tensor]:
        if self.image_processor is not None:
            return list(self.image_processor(images, return_tensors="pt")["pixel_values"])
        height, width = self.size
        result = []
        for image in images:
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32).reshape(height, width, self.num_channels) / 255.0
            array = (array - self.mean) / self.std
            result.append(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
        return result

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (int(os.environ.get("RANK", 0)), info.id if info is not None else -1)
        if self._rng is None or self._rng_owner != owner:
            self._rng = np.random.default_rng([self.seed, owner[0], owner[1] + 1])
            self._rng_owner = owner
        return self._rng

    def __repr__(self) -> str:
        source = type(self.image_processor).__name__ if self.image_processor is not None else f"size={self.size}"
        return f"ImageTransform({source}, num_channels={self.num_channels}, augment={self.augment})"


def prepare_image_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict,
    transform: ImageTransform,
    batch_size: int = 64,
):
    """Attach ``transform`` lazily: ``with_transform`` (map-style) or ``map(batched=True)`` (iterable).

    With ``Trainer``, set ``remove_unused_columns=False``: the raw columns
    (``image``, ``label``) are not model arguments, only the transformed ones are.
    A ``DatasetDict`` is prepared split by split. ``batch_size`` bounds the
    memory of one iterable batch (``map``'s default of 1000 images is too much at 224²).
    """
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({name: prepare_image_dataset(split, transform, batch_size) for name, split in dataset.items()})
    if isinstance(dataset, datasets.Dataset):
        return dataset.with_transform(transform)
    if isinstance(dataset, datasets.IterableDataset):
        columns = dataset.column_names
        if columns is None:  # features unknown: read one row to learn them
            columns = list(next(iter(dataset.take(1))).keys())
        return dataset.map(transform, batched=True, batch_size=batch_size, remove_columns=columns)
    raise TypeError(
        f"dataset must be a datasets.Dataset, IterableDataset or their Dict, got {type(dataset).__name__}."
    )


def undecoded_images(dataset: Any) -> Any:
    """``dataset`` with its ``datasets.Image`` columns left undecoded (``{"path", "bytes"}`` rows).

    Reading such rows costs no image decode, so a stream can be split across processes and
    scanned cheaply; ``ImageTransform.collate`` decodes the rows a process keeps. Datasets
    without an ``Image`` feature (or unknown features) are returned unchanged.
    """
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({name: undecoded_images(split) for name, split in dataset.items()})
    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(mode=feature.mode, decode=False))
    return dataset


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width).")
    return size


def _per_channel(name: str, value: Sequence[float] | float, num_channels: int) -> np.ndarray:
    array = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if array.size == 1:
        array = np.repeat(array, num_channels)
    if array.shape != (num_channels,):
        raise ValueError(f"{name}={value!r} must have 1 or num_channels={num_channels} values.")
    return array
