"""Fashion-MNIST, the embedded default data set, with optional synthetic label noise.

Real images that need no download on Debian (package ``dataset-fashion-mnist``),
so the default recipe, tests and benchmarks run offline. Images are resolved in
this order: a ``data_dir`` given by the user, Debian's directory, the Hub copy
``zalando-datasets/fashion_mnist`` (for online users), else an error that says
how to get them. Nothing is cached outside the Hugging Face datasets cache.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np
from transformers.utils import logging

from ..utils.checks import check_choice, integer, invalid
from .noise import (
    FASHION_MNIST_ASYMMETRIC_MAP,
    NOISE_TYPES,
    add_label_noise,
    check_noise_rate,
    cross_fitted_probabilities,
)


logger = logging.get_logger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_REPO_ID = "zalando-datasets/fashion_mnist"
SPLITS = ("train", "test")
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, into a numpy array.

    Gzip is detected from the content, not the file name, so renamed files work.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the magic number or size is not that of an idx file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} does not exist.")
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path} is not an idx file: bad magic number {raw[:4].hex() or '(empty file)'} "
            "(expected 0x0000 + a type byte + the number of dimensions); re-download the Fashion-MNIST idx files."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(shape) != ndim or len(raw) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw)} bytes, its header {shape} implies {expected}.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", data_dir: Optional[Union[str, Path]] = None) -> datasets.Dataset:
    """Load one official split as a ``Dataset`` with ``image`` (``Image``) and ``label`` (``ClassLabel``).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (the official t10k, 10,000).
        data_dir: directory holding the idx files (``train-images-idx3-ubyte[.gz]`` ...).
            When given it must contain them; when ``None`` Debian's directory, then
            the Hub, are tried.

    Raises:
        FileNotFoundError: the files are in none of the places, with how to get them.
    """
    source = _resolve(split, data_dir)
    return source.build(np.arange(len(source.labels)))


def fashion_mnist_arrays(
    split: str = "train", data_dir: Optional[Union[str, Path]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """One official split as arrays, without building a ``Dataset``: ``(images, labels)``.

    ``images`` is ``(n, 28, 28)`` uint8 and ``labels`` ``(n,)``, read from the same places as
    `load_fashion_mnist` (``data_dir``, Debian's directory, then the Hub copy, which is decoded for it).
    """
    source = _resolve(split, data_dir)
    return source.pixels(np.arange(len(source.labels))), source.labels


def noisy_fashion_mnist(
    noise_rate: float = 0.4,
    noise_type: str = "symmetric",
    seed: int = 0,
    train_size: Optional[int] = None,
    val_size: int = 5000,
    test_size: Optional[int] = None,
    data_dir: Optional[Union[str, Path]] = None,
) -> datasets.DatasetDict:
    """Fashion-MNIST with synthetic label noise on the training split: the SAP experiment data.

    The clean ``validation`` split is carved from the official training set
    (stratified, disjoint from ``train``) because SAP's alpha search needs
    clean labels that the test set must not provide.

    Args:
        noise_rate: fraction of training labels flipped, in ``[0, 1)``.
        noise_type: ``"symmetric"``, ``"asymmetric"`` (uses
            :data:`~sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP`) or
            ``"instance"`` (flips the images a pixel-level softmax regression,
            cross-fitted on the clean training labels, finds ambiguous, to the
            class it confuses them with: see
            :func:`~sap_hf.data.noise.cross_fitted_probabilities`).
        seed: seeds the validation carve-out, the training subset and the noise.
        train_size: number of training images (stratified subset chosen before
            the noise); ``None`` keeps all that the validation split leaves.
        val_size: number of clean validation images (0 gives an empty split).
        test_size: subsample the official test set to this size; ``None`` keeps all.
        data_dir: see :func:`load_fashion_mnist`.

    Returns:
        ``DatasetDict`` with ``train`` (``image``, noisy ``label``,
        ``clean_label``, ``is_noisy``), ``validation`` and ``test`` (``image``,
        clean ``label``).
    """
    noise_type = check_choice("noise_type", noise_type, NOISE_TYPES)  # checked before any file is read
    noise_rate = check_noise_rate(noise_rate, "noise_rate")
    train_source, test_source = _resolve("train", data_dir), _resolve("test", data_dir)
    n_train_total, n_test_total = len(train_source.labels), len(test_source.labels)
    val_size = _check_size("val_size", val_size, 0, n_train_total - 1)
    if train_size is not None:
        train_size = _check_size("train_size", train_size, 1, n_train_total - val_size)
    if test_size is not None:
        test_size = _check_size("test_size", test_size, 1, n_test_total)

    rng = np.random.default_rng(seed)
    all_train = np.arange(n_train_total)
    val_idx = stratified_choice(all_train, train_source.labels, val_size, rng)
    pool = np.setdiff1d(all_train, val_idx, assume_unique=True)
    train_idx = pool if train_size is None else stratified_choice(pool, train_source.labels[pool], train_size, rng)
    test_idx = np.arange(n_test_total)
    if test_size is not None:
        test_idx = np.sort(rng.choice(n_test_total, size=test_size, replace=False))

    clean = train_source.labels[train_idx].astype(np.int64)
    noisy, is_noisy = add_label_noise(
        clean,
        noise_rate,
        noise_type=noise_type,
        num_classes=len(FASHION_MNIST_CLASSES),
        seed=seed,
        asymmetric_map=FASHION_MNIST_ASYMMETRIC_MAP if noise_type == "asymmetric" else None,
        probabilities=_instance_probabilities(train_source, train_idx, clean, seed)
        if noise_type == "instance"
        else None,
    )
    train = train_source.build(train_idx, label=noisy, clean_label=clean, is_noisy=is_noisy)
    return datasets.DatasetDict(train=train, validation=train_source.build(val_idx), test=test_source.build(test_idx))


@dataclass
class _Source:
    """One split from idx arrays (``images`` set) or from the Hub (``hub`` set)."""

    labels: np.ndarray
    images: Optional[np.ndarray] = None
    hub: Optional[datasets.Dataset] = None

    def build(self, indices: np.ndarray, **columns: np.ndarray) -> datasets.Dataset:
        """Rows ``indices`` as a Dataset; ``columns`` override or add per-row columns."""
        class_label = datasets.ClassLabel(names=FASHION_MNIST_CLASSES)
        features = {"image": datasets.Image(), "label": class_label}
        if "clean_label" in columns:
            features["clean_label"] = class_label
        if "is_noisy" in columns:
            features["is_noisy"] = datasets.Value("bool")
        data = {"label": self.labels[indices].astype(np.int64), **columns}
        if self.images is not None:
            # Image() accepts uint8 arrays and stores them PNG-encoded, once, when the split is built
            # (its cost for the 60k training images: benchmarks/studies/cost.md, "Data loading").
            data = {"image": list(self.images[indices]), **data}
            return datasets.Dataset.from_dict(data, features=datasets.Features(features))
        dataset = self.hub.select(indices)
        dataset = dataset.remove_columns([c for c in dataset.column_names if c != "image"])
        for name, values in data.items():
            dataset = dataset.add_column(name, values.tolist(), feature=features[name])
        return dataset.cast(datasets.Features(features))

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """The grey images at `indices` as an `(n, 28, 28)` uint8 array (the Hub copy is decoded for it)."""
        if self.images is not None:
            return self.images[indices]
        return np.stack([np.asarray(image.convert("L")) for image in self.hub.select(indices)["image"]])


def _instance_probabilities(source: _Source, indices: np.ndarray, clean: np.ndarray, seed: int) -> np.ndarray:
    """Cross-fitted probabilities of the training subset's own images: cheap, deterministic, no model training."""
    logger.info("Fitting the pixel-level classifier behind instance-dependent noise on %d images.", len(indices))
    return cross_fitted_probabilities(source.pixels(indices), clean, len(FASHION_MNIST_CLASSES), seed=seed)


def _resolve(split: str, data_dir: Optional[Union[str, Path]]) -> _Source:
    split = check_choice("split", split, SPLITS, "Fashion-MNIST has an official train and test split.")
    if data_dir is not None:
        return _from_dir(Path(data_dir), split, user_given=True)
    if _find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None:
        return _from_dir(DEBIAN_FASHION_MNIST_DIR, split, user_given=False)
    logger.info(
        "No Fashion-MNIST idx files in %s; trying the Hub copy %s (HF_HUB_OFFLINE=1 skips the network retries).",
        DEBIAN_FASHION_MNIST_DIR,
        HUB_REPO_ID,
    )
    try:
        hub = datasets.load_dataset(HUB_REPO_ID, split=split)
    except Exception as err:  # offline, no such repo, auth...: all mean "not available here"
        raise FileNotFoundError(
            f"Fashion-MNIST not found: no idx files in {DEBIAN_FASHION_MNIST_DIR} and the Hub copy {HUB_REPO_ID} "
            f"could not be loaded ({type(err).__name__}: {err}). Install them with "
            "`apt-get install dataset-fashion-mnist`, or pass data_dir pointing at a directory with the idx "
            f"files ({', '.join(s + '[.gz]' for stems in _IDX_STEMS.values() for s in stems)}), or go online."
        ) from err
    return _from_hub(hub, split)


def _find_idx_files(directory: Path, split: str) -> Optional[tuple[Path, Path]]:
    found = []
    for stem in _IDX_STEMS[split]:
        candidates = [directory / f"{stem}.gz", directory / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _from_dir(directory: Path, split: str, user_given: bool) -> _Source:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"data_dir={str(directory)!r} is not a directory; pass the directory holding the Fashion-MNIST idx "
            "files, or data_dir=None to use Debian's copy (`apt-get install dataset-fashion-mnist`) or the Hub."
        )
    files = _find_idx_files(directory, split)
    if files is None:
        missing = [s for s in _IDX_STEMS[split] if not any((directory / n).is_file() for n in (s, s + ".gz"))]
        raise FileNotFoundError(
            f"data_dir={str(directory)!r} lacks {missing[0]}[.gz], needed for split={split!r}; it must hold "
            f"{', '.join(s + '[.gz]' for stems in _IDX_STEMS.values() for s in stems)} "
            "(the official Fashion-MNIST idx files)."
        )
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{files[0]} (shape {images.shape}) and {files[1]} (shape {labels.shape}) do not form an image/label "
            "pair; expected N x 28 x 28 images and N labels."
        )
    logger.info("Loaded Fashion-MNIST %s (%d images) from %s.", split, len(labels), directory)
    return _Source(labels=labels, images=images)


def _from_hub(hub: datasets.Dataset, split: str) -> _Source:
    renames = {"img": "image", "labels": "label"}
    hub = hub.rename_columns({k: v for k, v in renames.items() if k in hub.column_names})
    if "image" not in hub.column_names or "label" not in hub.column_names:
        raise ValueError(f"{HUB_REPO_ID} split {split!r} has columns {hub.column_names}, expected image and label.")
    logger.info("Loaded Fashion-MNIST %s (%d images) from the Hub (%s).", split, len(hub), HUB_REPO_ID)
    return _Source(labels=np.asarray(hub["label"], dtype=np.int64), hub=hub)


def stratified_choice(indices: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` of ``indices`` without replacement, each class in proportion to its share, sorted.

    The splits of `noisy_fashion_mnist` and `load_cifar10n` are drawn with it, so a caller that draws its own
    split with the same ``rng`` stream gets the same positions. Per-class quotas by largest remainder
    (ties to the earlier class), then one ``rng.choice`` per class in the order of ``np.unique(labels)``.

    Args:
        indices: the candidate positions.
        labels: the label of each candidate (same length as ``indices``).
        size: how many to draw, at most ``len(indices)``.
        rng: the numpy generator the draws consume.
    """
    if size == 0:
        return indices[:0]
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / counts.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: size - quota.sum()]] += 1
    chosen = [rng.choice(indices[labels == c], size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


def _check_size(name: str, value: int, low: int, high: int) -> int:
    size = integer(name, value, minimum=low, hint=f"Fashion-MNIST allows [{low}, {high}] here.")
    if size > high:
        raise invalid(name, value, f"use an integer in [{low}, {high}] for Fashion-MNIST.")
    return size
