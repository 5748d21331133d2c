"""Clothing1M in its official directory layout, read as (streaming) ``datasets``.

Clothing1M (Xiao et al., 2015) is the real-world label-noise benchmark SAP
targets. Its licence forbids redistribution, so users point this reader at
their own copy::

    data_dir/
      images/0/12/123.jpg ...
      noisy_label_kv.txt        "images/0/12/123.jpg 3" per line (1M web labels)
      clean_label_kv.txt        same format (72k human labels)
      noisy_train_key_list.txt  one relative image path per line
      clean_train_key_list.txt
      clean_val_key_list.txt
      clean_test_key_list.txt

Only the key and label lists are held in memory; images are read one at a time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np
from PIL import Image, ImageDraw
from transformers.utils import logging

from ..utils.checks import check_choice, integer, invalid, positive_int
from ..utils.identity import KEY_COLUMN
from .noise import add_label_noise


logger = logging.get_logger(__name__)

CLOTHING1M_CLASSES = [
    "T-Shirt",
    "Shirt",
    "Knitwear",
    "Chiffon",
    "Sweater",
    "Hoodie",
    "Windbreaker",
    "Jacket",
    "Downcoat",
    "Suit",
    "Shawl",
    "Dress",
    "Vest",
    "Underwear",
]
NOISY_KV, CLEAN_KV = "noisy_label_kv.txt", "clean_label_kv.txt"
SPLIT_FILES = {
    "noisy_train": ("noisy_train_key_list.txt", NOISY_KV),
    "clean_train": ("clean_train_key_list.txt", CLEAN_KV),
    "validation": ("clean_val_key_list.txt", CLEAN_KV),
    "test": ("clean_test_key_list.txt", CLEAN_KV),
}
_LAYOUT = (
    "expected the official Clothing1M layout: images/... (JPEG files), noisy_label_kv.txt and clean_label_kv.txt "
    "(lines like 'images/0/12/123.jpg 3'), and noisy_train_key_list.txt, clean_train_key_list.txt, "
    "clean_val_key_list.txt, clean_test_key_list.txt (one relative image path per line)"
)


def clothing1m_features() -> datasets.Features:
    """Features of every split: ``image`` (RGB), ``label`` (14-way ``ClassLabel``) and ``key`` (relative path).

    The key column is ``sap_hf.utils.identity.KEY_COLUMN``, the name SAP reads a sample's
    identity from when it shards a stream and keeps trusted samples.
    """
    return datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "label": datasets.ClassLabel(names=CLOTHING1M_CLASSES),
            KEY_COLUMN: datasets.Value("string"),
        }
    )


def load_clothing1m(
    data_dir: Union[str, Path],
    split: str = "noisy_train",
    streaming: bool = True,
    skip_unreadable_images: bool = True,
    num_shards: int = 8,
    *,
    cache_dir: Optional[Union[str, Path]] = None,
    num_proc: Optional[int] = None,
) -> Union[datasets.IterableDataset, datasets.Dataset]:
    """Read one Clothing1M split; rows are ``{"image": PIL RGB, "label": int, "key": str}``.

    ``noisy_train`` takes its labels from ``noisy_label_kv.txt``, the other
    splits (``clean_train``, ``validation``, ``test``) from ``clean_label_kv.txt``.
    All list files are validated before any image is read, so a broken copy
    fails in seconds instead of hours into training.

    Each image is checked without decoding it when it is yielded (its header
    parses, and a JPEG/PNG holds its end marker: truncated files would otherwise
    crash the training loop), so each pass decodes it once, in the ``image``
    feature (or, after ``sap_hf.data.undecoded_images(dataset)``, in the
    transform's ``collate``). With
    ``skip_unreadable_images=True`` (the default) an unreadable or missing image
    is skipped with a logged warning and a running count, and each shard logs
    how many it skipped when it ends; with ``False`` it raises ``OSError``
    naming the file.

    Args:
        data_dir: root of the official layout (see the module docstring).
        split: ``"noisy_train"``, ``"clean_train"``, ``"validation"`` or ``"test"``.
        streaming: ``True`` returns an ``IterableDataset`` whose ``num_shards``
            shards spread over DataLoader workers and processes
            (``datasets.distributed.split_dataset_by_node``); ``False`` returns a
            map-style ``Dataset`` with the same rows, written once to the
            datasets cache (images stored as absolute paths, decoded lazily).
        skip_unreadable_images: skip (default) or raise on an unreadable image.
        num_shards: number of key chunks; use a multiple of workers x processes.
        cache_dir: datasets cache for ``streaming=False`` (default: HF cache).
        num_proc: processes that check images when ``streaming=False``.

    Raises:
        FileNotFoundError: ``data_dir`` or a list file is missing.
        ValueError: a bad ``split``/``num_shards``, a malformed kv line, a label
            outside 0..13, or a key without a label.
    """
    split = check_choice("split", split, SPLIT_FILES, "These are Clothing1M's official lists.")
    num_shards = positive_int("num_shards", num_shards, "Use e.g. a multiple of your DataLoader workers x processes.")
    if num_proc is not None:
        num_proc = positive_int("num_proc", num_proc, "None checks the images in this process.")
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; {_LAYOUT}.")
    key_file, kv_file = SPLIT_FILES[split]
    keys = read_key_list(root / key_file)
    label_of = read_label_kv(root / kv_file, wanted=set(keys))
    missing = [k for k in keys if k not in label_of]
    if missing:
        raise ValueError(
            f"{len(missing)} key(s) of {key_file} have no label in {kv_file}, e.g. {missing[0]!r}; "
            f"add them to {root / kv_file} or remove them from the key list."
        )
    labels = [label_of[k] for k in keys]
    bounds = np.linspace(0, len(keys), min(num_shards, len(keys)) + 1).astype(int)
    gen_kwargs = {
        "keys": [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
        "labels": [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
        "root": str(root),
        "skip_unreadable_images": skip_unreadable_images,
    }
    logger.info("Clothing1M %s: %d images in %d shards from %s.", split, len(keys), len(gen_kwargs["keys"]), root)
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_examples, features=clothing1m_features(), gen_kwargs=gen_kwargs
        )
    return datasets.Dataset.from_generator(
        _generate_examples,
        features=clothing1m_features(),
        gen_kwargs=gen_kwargs,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        num_proc=num_proc,
        fingerprint=_fingerprint(root, split, skip_unreadable_images),
    )


def read_key_list(path: Path) -> list[str]:
    """Relative image paths of a key list file, blank lines ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_LAYOUT}.")
    with open(path, encoding="utf-8") as handle:
        keys = [line.strip() for line in handle if line.strip()]
    if not keys:
        raise ValueError(f"{path} lists no image; it should hold one relative image path per line.")
    return keys


def read_label_kv(path: Path, wanted: Optional[set[str]] = None) -> dict[str, int]:
    """Parse a ``<relative path> <label>`` file; every line is validated, only ``wanted`` keys are kept."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_LAYOUT}.")
    label_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ValueError(
                    f"{path} line {number} is malformed: {line.rstrip()!r}; expected "
                    "'<relative image path> <label>', e.g. 'images/0/12/123.jpg 3'."
                )
            label = int(fields[1])
            if not 0 <= label < len(CLOTHING1M_CLASSES):
                raise ValueError(
                    f"{path} line {number}: label {label} is outside 0..{len(CLOTHING1M_CLASSES) - 1} "
                    f"(Clothing1M has {len(CLOTHING1M_CLASSES)} classes): {line.rstrip()!r}."
                )
            if wanted is None or fields[0] in wanted:
                label_of[fields[0]] = label
    return label_of


def _generate_examples(keys: list[list[str]], labels: list[list[int]], root: str, skip_unreadable_images: bool):
    """Yield the rows of the key chunks ``datasets`` gave this job; runs inside DataLoader workers, so it only logs."""
    skipped = total = 0
    for key, label in ((k, y) for chunk, ys in zip(keys, labels) for k, y in zip(chunk, ys)):
        total += 1
        path = Path(root) / key
        try:
            _check_image(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if not skip_unreadable_images:
                raise OSError(
                    f"Clothing1M image {path} is unreadable ({type(err).__name__}: {err}); replace the file, "
                    "or pass skip_unreadable_images=True to skip it."
                ) from err
            skipped += 1
            logger.warning(
                "Skipping unreadable Clothing1M image %s (%s); %d skipped so far in this pass.", path, err, skipped
            )
            continue
        yield {"image": {"path": str(path), "bytes": None}, "label": label, KEY_COLUMN: key}
    if skipped:
        logger.warning(
            "Clothing1M: skipped %d unreadable of %d images in this pass over shard(s) starting at %s.",
            skipped,
            total,
            keys[0][0],
        )


_TAIL_BYTES = 1024


def _check_image(path: Path) -> None:
    """Check a file is a whole image without decoding it, so each pass decodes every image once.

    `Image.open` parses the header only (format, size, mode); a JPEG must also hold its
    end-of-image marker (FFD9) in its last kilobyte (a truncated download lacks it; web images
    with a few bytes appended after it pass), a PNG its IEND chunk. Decoding happens once, in the
    ``image`` feature or the transform that turns the image into pixels.
    """
    with Image.open(path) as image:
        image_format, width, height = image.format, image.width, image.height
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(image_format)
    if marker is None:
        return
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - _TAIL_BYTES))
        if marker not in handle.read():
            raise OSError(f"truncated {image_format} file: no {marker!r} end marker in its last {_TAIL_BYTES} bytes")


def _fingerprint(root: Path, split: str, skip: bool) -> str:
    """Cache key of a map-style split: the list files' identity, not a hash of a million keys."""
    parts = [str(root), split, str(skip)]
    for name in SPLIT_FILES[split]:
        stat = (root / name).stat()
        parts += [name, str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def write_tiny_clothing1m(
    root: Union[str, Path],
    per_class: int = 3,
    image_size: int = 32,
    seed: int = 0,
    noise_rate: float = 0.3,
    classes: int = 14,
) -> Path:
    """Write a tiny Clothing1M copy in exactly the official layout; a helper for tests and demos.

    Each class gets ``per_class`` training, validation and test JPEGs whose
    colour and stripe pattern depend on the class (so a small model can learn
    them). ``noisy_label_kv.txt`` holds the training labels with
    ``round(noise_rate * n_train)`` of them flipped (symmetric); the clean
    labels of all images are in ``clean_label_kv.txt``. Returns ``root``.
    """
    classes = integer("classes", classes, minimum=2, hint=f"Clothing1M has {len(CLOTHING1M_CLASSES)} classes.")
    if classes > len(CLOTHING1M_CLASSES):
        raise invalid("classes", classes, f"use an integer in [2, {len(CLOTHING1M_CLASSES)}] (Clothing1M's classes).")
    per_class = positive_int("per_class", per_class)
    image_size = integer("image_size", image_size, minimum=8, hint="The stripes need at least 8 pixels.")
    root = Path(root)
    rng = np.random.default_rng(seed)
    split_keys: dict[str, list[str]] = {}
    clean: dict[str, int] = {}
    counter = 0
    for split in ("train", "val", "test"):
        split_keys[split] = []
        for label in range(classes):
            for _ in range(per_class):
                key = f"images/{counter % 10}/{counter // 10 % 100}/{counter}.jpg"
                path = root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                _tiny_image(label, classes, image_size, rng).save(path, format="JPEG", quality=95)
                split_keys[split].append(key)
                clean[key] = label
                counter += 1
    train = split_keys["train"]
    noisy, _ = add_label_noise([clean[k] for k in train], noise_rate, num_classes=classes, seed=seed)
    _write_lines(root / NOISY_KV, [f"{k} {int(y)}" for k, y in zip(train, noisy)])
    _write_lines(root / CLEAN_KV, [f"{k} {y}" for k, y in clean.items()])
    _write_lines(root / "noisy_train_key_list.txt", train)
    _write_lines(root / "clean_train_key_list.txt", train)
    _write_lines(root / "clean_val_key_list.txt", split_keys["val"])
    _write_lines(root / "clean_test_key_list.txt", split_keys["test"])
    logger.info("Wrote a tiny Clothing1M (%d images, %d classes) to %s.", counter, classes, root)
    return root


def _tiny_image(label: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = int(255 * label / classes)
    base = Image.new("HSV", (size, size), (hue, 200, 220)).convert("RGB")
    draw = ImageDraw.Draw(base)
    period = 2 + label % 4
    for offset in range(0, size, 2 * period):  # horizontal stripes for even labels, vertical for odd
        box = (0, offset, size, offset + period - 1) if label % 2 == 0 else (offset, 0, offset + period - 1, size)
        draw.rectangle(box, fill=(255 - hue, 40, 40 + hue // 2))
    pixels = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
