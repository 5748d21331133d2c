"""Turn ``image`` columns into the ``pixel_values``/``labels`` a vision model takes.

Transforms run lazily (``Dataset.with_transform``, ``IterableDataset.map``), so
datasets stay small on disk and augmentation differs per epoch.

Intensities are scaled by the bit depth the image declares (its PIL mode or numpy dtype): 8-bit
images by 1/255, 16-bit ones by 1/65535, so the same picture stored in 8 or 16 bits gives the same
pixel values, and a dark 16-bit image stays dark instead of being stretched. Only containers that
declare no depth (PIL mode ``I``, int32/int64 arrays: what ``datasets`` decodes int arrays to)
are read by their values: 0..255 as 8 bits, up to 65535 as 16 bits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import default_data_collator

from ..utils.checks import check_choice, integer, invalid, plain_scalar, positive_int
from ..utils.identity import KEY_COLUMN


IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how a camera image must be rotated/flipped to display upright."""
"""PIL modes of 16-bit greyscale images: what 16-bit PNGs and TIFFs open as.

``convert("L")`` would clip their 0..65535 values at 255 (a nearly white image), so they are
rescaled instead. Mode ``I`` (32-bit integers, what older Pillow opens 16-bit PNGs as) is read as
16-bit when it holds values above 255 and as 8-bit otherwise.
"""
_SIXTEEN_TO_EIGHT_BIT = 65535.0 / 255.0  # 257: 16-bit full scale onto 8-bit full scale


class ImageTransform:
    """Batch transform: ``{"image": [...], "label": [...]}`` -> ``{"pixel_values": [C×H×W], "labels": [...]}``.

    Build it from a ``transformers`` image processor (its resize/normalisation
    match a pretrained checkpoint) or from explicit ``image_size``,
    ``num_channels``, ``mean`` and ``std`` (a model trained from scratch, e.g.
    a 1-channel ViT on 28×28 Fashion-MNIST). Images may be PIL images, uint8
    arrays (H×W or H×W×C, or nested lists from an ``Array2D`` column), uint16
    arrays or ``{"bytes", "path"}`` dicts. Columns other than the image, the
    label and ``keep_columns`` are dropped.

    16-bit greyscale images (PIL modes ``I;16``, ``I;16B``, ``I;16L``; uint16
    arrays; mode ``I`` and int arrays holding values above 255) are scaled by
    1/65535, so they give the intensities of the same picture in 8 bits; without
    a processor they keep their full precision through augmentation and resizing
    (a processor gets them rounded to 8 bits, the input processors are made for).
    16-bit colour arrays are rounded to 8 bits. Float images (PIL mode ``F``,
    float arrays) are refused: whether 1.0 means white or nearly black cannot be
    told from the data.

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
        image_processor: Optional[Any] = None,
        *,
        image_size: Optional[Union[int, tuple[int, int]]] = None,
        num_channels: int = 3,
        mean: Optional[Union[Sequence[float], float]] = None,
        std: Optional[Union[Sequence[float], float]] = None,
        augment: bool = False,
        seed: int = 0,
        keep_columns: Sequence[str] = ("index", "idx", KEY_COLUMN),
    ) -> None:
        if (image_processor is None) == (image_size is None):
            raise ValueError(
                "Pass exactly one of image_processor (a transformers image processor) or image_size "
                f"(got image_processor={type(image_processor).__name__}, image_size={image_size!r})."
            )
        num_channels = check_choice("num_channels", num_channels, (1, 3), "1 is grayscale, 3 is RGB.")
        self.image_processor = image_processor
        self.num_channels = num_channels
        self.size = _as_size(image_size) if image_size is not None else None
        if image_processor is not None and (mean is not None or std is not None):
            raise ValueError("mean/std are taken from image_processor; set them on the processor instead.")
        self.mean = _per_channel("mean", 0.5 if mean is None else mean, num_channels)
        self.std = _per_channel("std", 0.5 if std is None else std, num_channels)
        if np.any(self.std <= 0):
            raise invalid("std", std, "use positive standard deviations (the divisor of the normalisation).")
        self.augment = augment
        self.seed = integer("seed", seed, minimum=0, hint="It seeds the augmentation (numpy.random.default_rng).")
        self.keep_columns = tuple(keep_columns)
        self._rng: Optional[np.random.Generator] = None
        self._rng_owner: Optional[tuple[int, int]] = None

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> ImageTransform:
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

    def to_image_processor(self) -> Any:
        """The `transformers` image processor that turns a PIL image into this transform's pixel values.

        Saved next to a model (``processor.save_pretrained(folder)``, or ``processing_class=`` of a
        Trainer), it lets ``transformers.pipeline("image-classification", model=folder)`` feed the
        model what it was trained on: a ``ViTImageProcessor`` that resizes with PIL's bilinear filter
        to ``image_size``, scales by 1/255 and normalises with ``mean``/``std``. Built from a
        processor, that processor. One-channel transforms have none: the pipeline converts every
        image to RGB and no standard processor turns it back into one grey channel (a 3-channel
        model on grey images replicated into RGB, ``num_channels=3``, is served exactly).
        """
        if self.image_processor is not None:
            return self.image_processor
        if self.num_channels != 3:
            raise ValueError(
                "A 1-channel ImageTransform has no standard image processor (the image-classification pipeline "
                "converts images to RGB): train with num_channels=3 (grey images are replicated into RGB) to save one."
            )
        from transformers import ViTImageProcessor
        from transformers.image_utils import PILImageResampling

        height, width = self.size
        return ViTImageProcessor(
            do_resize=True,
            size={"height": height, "width": width},
            resample=PILImageResampling.BILINEAR,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[float(v) for v in self.mean],
            image_std=[float(v) for v in self.std],
        )

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A ``collate_fn``: raw examples (undecoded images) -> a model batch, decoding each image here.

        Hand SAP the raw stream and this collator (``sap_correct(raw, ..., runtime=Runtime(collate_fn=t.collate))``)
        and every image is decoded once, by the one process whose shard it is in, after the
        stream was split; the trusted samples SAP keeps are then the raw rows (a path and a label),
        not decoded tensors. String columns (``key``) are dropped from the batch.
        """
        if not examples:
            raise ValueError("collate() got no examples.")
        out = self({column: [example[column] for example in examples] for column in examples[0]})
        return default_data_collator([dict(zip(out, row)) for row in zip(*out.values())])

    def _to_pil(self, image: Any) -> Image.Image:
        """A PIL image in ``L``/``RGB`` (``num_channels``), or in ``F`` on the 0..255 scale for 16-bit input.

        ``F`` keeps a 16-bit image's precision through augmentation and resizing; ``_pixels``
        copies it into every channel, as ``convert("RGB")`` does for an ``L`` image.
        """
        if isinstance(image, dict):
            image = decode_image(image)
        elif not isinstance(image, Image.Image):
            image = _array_to_pil(np.asarray(image))
        if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
            image = _high_bit_depth(image)
            if image.mode == "F":
                if self.image_processor is None:
                    return image
                image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
        elif image.mode == "F":
            raise ValueError(
                f"A float image (PIL mode 'F', {image.width}x{image.height}) is ambiguous: 0..1 or 0..255. "
                "Convert it to 8 bits first, e.g. Image.fromarray(np.uint8(np.clip(np.asarray(image) * 255, 0, 255).round())) "
                "for 0..1 values, or to 16 bits (mode 'I;16', 0..65535)."
            )
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
            array = np.asarray(image, dtype=np.float32) / 255.0
            if array.ndim == 2:  # L, or F from a 16-bit image: its one channel into every channel
                array = np.repeat(array[:, :, None], self.num_channels, axis=2)
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


def decode_image(value: dict[str, Any]) -> Image.Image:
    """An undecoded ``{"path", "bytes"}`` image as ``datasets.Image`` decodes it: loaded, and turned upright by its
    EXIF orientation tag (camera JPEGs store pixels sideways and say so there), so both give the same pixels."""
    image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    image.load()
    if image.getexif().get(EXIF_ORIENTATION) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def prepare_image_dataset(
    dataset: Union[datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict],
    transform: ImageTransform,
    batch_size: int = 64,
) -> Union[datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict]:
    """Attach ``transform`` lazily: ``with_transform`` (map-style) or ``map(batched=True)`` (iterable).

    With ``Trainer``, set ``remove_unused_columns=False``: the raw columns
    (``image``, ``label``) are not model arguments, only the transformed ones are.
    A ``DatasetDict`` is prepared split by split. ``batch_size`` bounds the
    memory of one iterable batch (``map``'s default of 1000 images is too much at 224²).
    """
    batch_size = positive_int("batch_size", batch_size, "It bounds the images one iterable batch decodes.")
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)(
            {name: prepare_image_dataset(split, transform, batch_size) for name, split in dataset.items()}
        )
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


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """An image array as PIL: uint8 as is, uint16 as 16 bits, other ints by their values (0..255: 8 bits)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype not in (np.uint8, np.uint16):  # nested lists (Array2D columns) arrive as int64
        if not (np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() <= array.max() <= 65535):
            raise ValueError(
                f"Image arrays must be uint8, uint16 or integers in 0..65535, got dtype {array.dtype}"
                + (
                    f" with values {array.min()}..{array.max()}"
                    if array.size and np.issubdtype(array.dtype, np.number)
                    else ""
                )
                + "; convert them to uint8 (or uint16 for 16-bit data) first (floats are ambiguous: 0..1 or 0..255)."
            )
        array = array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    if array.dtype == np.uint16 and array.ndim == 3:  # PIL has no 16-bit colour mode: round to 8 bits
        array = np.rint(array / _SIXTEEN_TO_EIGHT_BIT).astype(np.uint8)
    return Image.fromarray(array)  # uint16 H x W: mode I;16, scaled with the other 16-bit images


def _high_bit_depth(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as mode ``F`` on the 8-bit scale (value / 257, its precision kept).

    Mode ``I`` declares 32 bits, not a depth: holding only 0..255 (``datasets`` decodes int arrays
    of 8-bit pictures to it) it is returned as ``L``; up to 65535 it is 16-bit; beyond, an error.
    """
    array = np.asarray(image)
    if image.mode == "I":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(
                f"A 32-bit integer image (PIL mode 'I') must hold 8-bit (0..255) or 16-bit (0..65535) values, got "
                f"{low}..{high}; rescale it to 0..65535 (mode 'I;16', a uint16 array) or to 0..255 (mode 'L', uint8)."
            )
        if high <= 255:
            return Image.fromarray(array.astype(np.uint8))
    return Image.fromarray(array.astype(np.float32) / np.float32(_SIXTEEN_TO_EIGHT_BIT))  # float32 -> mode F


def _as_size(image_size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    fix = "use a positive int or (height, width)."
    image_size = plain_scalar(image_size)  # a numpy int
    if isinstance(image_size, (str, bytes)) or not hasattr(image_size, "__len__"):
        image_size = (image_size, image_size)
    if len(image_size) != 2:
        raise invalid("image_size", image_size, fix)
    try:
        return tuple(positive_int("image_size", side) for side in image_size)
    except ValueError:
        raise invalid("image_size", image_size, fix) from None


def _per_channel(name: str, value: Union[Sequence[float], float], num_channels: int) -> np.ndarray:
    try:
        array = np.atleast_1d(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError):
        raise invalid(name, value, f"use a number or {num_channels} numbers (one per channel).") from None
    if array.size == 1:
        array = np.repeat(array, num_channels)
    if array.shape != (num_channels,):
        raise invalid(name, value, f"give 1 or num_channels={num_channels} values.")
    if not np.all(np.isfinite(array)):
        raise invalid(name, value, "use finite numbers.")
    return array
