"""CIFAR-10N: CIFAR-10 images with the real human label noise of Wei et al. (ICLR 2022).

The CIFAR-10N release is one label file, ``CIFAR-10_human.pt``: for each of the 50,000 training
images, in the original order of the python version, the clean label and five noisy label sets
(``aggre_label``, ``random_label1..3``, ``worse_label``). It ships no images, so the loader takes
them from any ``datasets`` source (a Hub id such as ``uoft-cs/cifar10``, a local folder of
``train-*.parquet``/``test-*.parquet`` files, or splits the user already has) and attaches the
labels by position. Position is the only link between images and labels, so the train split's own
clean ``label`` column is checked against the file's ``clean_label`` first: a copy in another order
(TFDS, a shuffled or filtered copy) would otherwise get wrong noisy labels without any error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from ..utils.checks import check_choice, integer, invalid
from .fashion_mnist import stratified_choice


logger = logging.get_logger(__name__)

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
#: The label sets of ``CIFAR-10_human.pt``: short name -> the file's key. ``clean`` is the oracle (no noise).
CIFAR10N_LABEL_SETS: dict[str, str] = {
    "aggre": "aggre_label",
    "random1": "random_label1",
    "random2": "random_label2",
    "random3": "random_label3",
    "worse": "worse_label",
    "clean": "clean_label",
}
CIFAR10N_TRAIN_SIZE = 50000
HUB_REPO_ID = "uoft-cs/cifar10"
_IMAGE_COLUMNS = ("img", "image")

CIFAR10Source = Union[str, Path, datasets.DatasetDict, dict, tuple, list]


def cifar10n_label_key(label_set: str, name: str = "label_set") -> str:
    """The file's key for ``label_set``: a short name (``"worse"``) or the key itself (``"worse_label"``).

    ``name`` is the argument named in the error (the recipe's ``cifar10n_label_set``).
    """
    keys = {key: key for key in CIFAR10N_LABEL_SETS.values()}
    choice = check_choice(
        name,
        label_set,
        [*CIFAR10N_LABEL_SETS, *keys],
        "These are the label sets of CIFAR-10N's CIFAR-10_human.pt ('clean': no noise).",
    )
    return CIFAR10N_LABEL_SETS.get(choice, choice)


def read_cifar10n_labels(path: Union[str, Path], label_set: str = "worse") -> tuple[np.ndarray, np.ndarray]:
    """``(noisy, clean)`` labels of all training images from the official ``CIFAR-10_human.pt``.

    The file is a pickled dict of numpy arrays, hence ``weights_only=False``: load only the official file.

    Raises:
        FileNotFoundError: ``path`` does not exist, with where to get the file.
        ValueError: ``label_set`` is unknown, or the file is not a dict holding it and ``clean_label``.
    """
    import torch

    key = cifar10n_label_key(label_set)  # a typo fails before the file is read
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"labels={str(path)!r} does not exist{' (it is a folder)' if path.is_dir() else ''}; pass the path of "
            "CIFAR-10_human.pt, the label file of the CIFAR-N release (github.com/UCSC-REAL/cifar-10-100n, data/)."
        )
    try:
        content = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # a truncated download, an HTML page saved as .pt, ...: the file is not the release's
        raise ValueError(
            f"labels={str(path)!r} could not be read ({type(err).__name__}: {err}); download CIFAR-10_human.pt again."
        ) from err
    if not isinstance(content, dict):
        raise ValueError(
            f"labels={str(path)!r} holds a {type(content).__name__}, not the dict of label arrays of "
            "CIFAR-10_human.pt; pass the official file."
        )
    missing = [k for k in (key, "clean_label") if k not in content]
    if missing:
        raise ValueError(
            f"labels={str(path)!r} lacks {missing[0]!r} (it has {sorted(content)}); pass the official "
            f"CIFAR-10_human.pt, or a label_set among {sorted(content)}."
        )
    noisy, clean = (np.asarray(content[k]).astype(np.int64).reshape(-1) for k in (key, "clean_label"))
    if len(noisy) != len(clean):
        raise ValueError(f"labels={str(path)!r}: {key} has {len(noisy)} labels but clean_label has {len(clean)}.")
    return noisy, clean


def cifar10n_label_set_name(label_set: str) -> str:
    """The short name of ``label_set`` (``"worse_label"`` -> ``"worse"``), for run and data set names."""
    key = cifar10n_label_key(label_set)
    return next(short for short, k in CIFAR10N_LABEL_SETS.items() if k == key)


def label_noise_rate(labels: Any, clean_labels: Any) -> float:
    """The share of ``labels`` that differ from ``clean_labels`` (0.0 for no labels)."""
    labels, clean_labels = np.asarray(labels), np.asarray(clean_labels)
    if labels.shape != clean_labels.shape:
        raise ValueError(f"labels (shape {labels.shape}) and clean_labels (shape {clean_labels.shape}) must match.")
    return float(np.mean(labels != clean_labels)) if labels.size else 0.0


def load_cifar10n(
    source: CIFAR10Source = HUB_REPO_ID,
    labels: Union[str, Path] = "CIFAR-10_human.pt",
    label_set: str = "worse",
    train_size: Optional[int] = None,
    val_size: int = 1000,
    test_size: Optional[int] = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """CIFAR-10 images with one CIFAR-10N label set on the training split: the SAP benchmark with real noise.

    Args:
        source: the CIFAR-10 images: a Hub id (``uoft-cs/cifar10``), a local folder that
            ``datasets.load_dataset`` reads (e.g. ``train-*.parquet`` and ``test-*.parquet``) or that
            ``save_to_disk`` wrote, a ``DatasetDict`` with ``train`` and ``test``, or a ``(train, test)``
            pair of ``Dataset``. Images in ``img`` or ``image``, the clean class in ``label``. The train
            split must be the official training set in its original order, or a prefix of it.
        labels: path of ``CIFAR-10_human.pt`` (see :func:`read_cifar10n_labels`).
        label_set: ``"aggre"``, ``"random1"``, ``"random2"``, ``"random3"``, ``"worse"`` (or the file's
            key, e.g. ``"worse_label"``), or ``"clean"`` for the noise-free oracle.
        train_size: keep this many training images, a seeded subset stratified on the clean class (so
            every class keeps its share and the subset is not chosen by its noisy labels); ``None``
            keeps the whole train split.
        val_size: clean validation images carved from the test split (seeded, stratified), which SAP's
            alpha search reads; 0 gives an empty split.
        test_size: cap the rest of the test split at this many images (a seeded subset); ``None`` keeps all.
        seed: seeds the training subset and the validation/test carve-out.

    Returns:
        ``DatasetDict`` with ``train`` (``image``, ``label`` = the noisy label, ``clean_label`` = the true
        label, which only benchmarks read), ``validation`` and ``test`` (``image``, clean ``label``); the
        labels are ``ClassLabel`` with the ten CIFAR-10 names. Images stay undecoded until read.

    Raises:
        ValueError: an unknown label set, a size out of range, a source without the expected splits or
            columns, or a train split whose order differs from the label file's (naming the first position).
        FileNotFoundError: the label file or a local source is missing.
    """
    noisy_all, clean_all = read_cifar10n_labels(labels, label_set)  # the cheap checks first, before any image
    train, test = _train_test(source)
    train, test = _standard_columns(train, "train"), _standard_columns(test, "test")
    n_train, n_test = len(train), len(test)
    if n_train > len(clean_all):
        raise ValueError(
            f"source={_describe(source)}: the train split has {n_train} images but labels={str(labels)!r} labels "
            f"{len(clean_all)}; pass the official CIFAR-10 training split (or a prefix of it)."
        )
    train_clean = np.asarray(train.with_format("numpy")["label"], dtype=np.int64)
    _check_order(train_clean, clean_all[:n_train], source)
    val_size = _check_size("val_size", val_size, 0, n_test - 1)
    if train_size is not None:
        train_size = _check_size("train_size", train_size, 1, n_train)
    if test_size is not None:
        test_size = _check_size("test_size", test_size, 1, n_test - val_size)

    # One seeded stream: the training subset first, then the validation/test carve-out.
    train_rng = test_rng = np.random.default_rng(seed)
    train_idx = np.arange(n_train)
    if train_size is not None and train_size < n_train:
        train_idx = stratified_choice(train_idx, train_clean, train_size, train_rng)
    test_labels = np.asarray(test.with_format("numpy")["label"], dtype=np.int64)
    all_test = np.arange(n_test)
    val_idx = stratified_choice(all_test, test_labels, val_size, test_rng)
    test_idx = np.setdiff1d(all_test, val_idx, assume_unique=True)
    if test_size is not None and test_size < len(test_idx):
        test_idx = np.sort(test_rng.choice(test_idx, size=test_size, replace=False))

    noisy = noisy_all[train_idx]
    class_label = datasets.ClassLabel(names=CIFAR10_CLASSES)
    train_split = train.select(train_idx).remove_columns("label")
    train_split = train_split.add_column("label", noisy.tolist(), feature=class_label)
    train_split = train_split.add_column("clean_label", train_clean[train_idx].tolist(), feature=class_label)
    logger.info(
        "CIFAR-10N %s: %d training images (noise rate %.4f), %d validation, %d test.",
        cifar10n_label_key(label_set),
        len(train_idx),
        label_noise_rate(noisy, train_clean[train_idx]),
        len(val_idx),
        len(test_idx),
    )
    return datasets.DatasetDict(train=train_split, validation=test.select(val_idx), test=test.select(test_idx))


def _train_test(source: CIFAR10Source) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The (train, test) ``Dataset`` pair of any accepted source."""
    if isinstance(source, (tuple, list)):
        if len(source) != 2 or not all(isinstance(s, datasets.Dataset) for s in source):
            raise ValueError(
                f"source={_describe(source)} is invalid: pass a (train, test) pair of datasets.Dataset, a "
                f"DatasetDict, a Hub id such as {HUB_REPO_ID!r} or a local folder."
            )
        return source[0], source[1]
    if isinstance(source, (str, Path)):
        source = _load_source(str(source))
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError(
            f"source={_describe(source)} is a stream: CIFAR-10N labels are attached by position and the splits "
            "subsampled, so load it without streaming=True (CIFAR-10 is small)."
        )
    if not isinstance(source, (datasets.DatasetDict, dict)):
        raise ValueError(
            f"source={_describe(source)} is invalid: pass a Hub id such as {HUB_REPO_ID!r}, a local folder, a "
            "DatasetDict with train and test, or a (train, test) pair of datasets.Dataset."
        )
    missing = [name for name in ("train", "test") if name not in source]
    if missing:
        raise ValueError(
            f"source={_describe(source)} has splits {sorted(source)}, no {missing[0]!r}; CIFAR-10N needs the official "
            "train split (labelled by position) and the test split (validation and test are carved from it)."
        )
    return source["train"], source["test"]


def _load_source(name: str) -> Any:
    """A Hub id or a local folder as a ``DatasetDict``, with an error that names the argument."""
    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    looks_local = path.exists() or name.startswith((".", "/", "~"))
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"source={name!r} {'is a file' if path.exists() else 'does not exist'}; pass a folder with "
            "train-*.parquet and test-*.parquet, a folder written by save_to_disk, or a Hub id such as "
            f"{HUB_REPO_ID!r}."
        )
    try:
        return datasets.load_dataset(str(path) if looks_local else name)
    except Exception as err:  # offline, no such repo, no data files: all mean "not loadable from here"
        raise FileNotFoundError(
            f"source={name!r} could not be loaded ({type(err).__name__}: {err}); pass a folder with train-*.parquet "
            f"and test-*.parquet, or a Hub id such as {HUB_REPO_ID!r} (online, or cached under HF_HUB_OFFLINE=1)."
        ) from err


def _standard_columns(split: datasets.Dataset, name: str) -> datasets.Dataset:
    """``split`` with exactly ``image`` and ``label`` (ClassLabel with the CIFAR-10 names), images undecoded."""
    columns = split.column_names
    image = next((c for c in _IMAGE_COLUMNS if c in columns), None)
    if image is None or "label" not in columns:
        raise ValueError(
            f"the {name} split has columns {columns}; CIFAR-10N needs the image in 'img' or 'image' and the clean "
            "class in 'label' (rename them with dataset.rename_column)."
        )
    split = split.remove_columns([c for c in columns if c not in (image, "label")])
    if image != "image":
        split = split.rename_column(image, "image")
    feature = split.features["label"]
    names = getattr(feature, "names", None)
    if names is not None and list(names) != CIFAR10_CLASSES:
        raise ValueError(
            f"the {name} split's label names are {list(names)}, not CIFAR-10's {CIFAR10_CLASSES} in this order; "
            "pass CIFAR-10 (CIFAR-100 has no CIFAR-10N labels)."
        )
    if names is None:
        split = split.cast_column("label", datasets.ClassLabel(names=CIFAR10_CLASSES))
    return split


def _check_order(train_labels: np.ndarray, file_clean: np.ndarray, source: Any) -> None:
    """Refuse a train split whose clean labels are not the file's: its noisy labels would belong to other images."""
    differ = np.flatnonzero(train_labels != file_clean)
    if differ.size == 0:
        return
    i = int(differ[0])
    raise ValueError(
        f"source={_describe(source)}: the train split is not in the order of the CIFAR-10N label file: at position "
        f"{i} its label is {int(train_labels[i])} ({_name(train_labels[i])}) but the file's clean_label is "
        f"{int(file_clean[i])} ({_name(file_clean[i])}); {differ.size} of {len(train_labels)} positions differ. "
        "CIFAR-10N labels are attached by position, so the images must be the official training set in its "
        f"original order (the python version's data_batch_1..5, as on the Hub's {HUB_REPO_ID}); a shuffled or "
        "filtered copy, or another order (e.g. TensorFlow Datasets'), does not work."
    )


def _name(label: Any) -> str:
    label = int(label)
    return CIFAR10_CLASSES[label] if 0 <= label < len(CIFAR10_CLASSES) else "not a CIFAR-10 class"


def _describe(source: Any) -> str:
    """A short description of ``source`` for error messages (not the repr of a whole dataset)."""
    if isinstance(source, (str, Path)):
        return repr(str(source))
    return type(source).__name__


def _check_size(name: str, value: int, low: int, high: int) -> int:
    size = integer(name, value, minimum=low, hint=f"This CIFAR-10N copy allows [{low}, {high}] here.")
    if size > high:
        raise invalid(name, value, f"use an integer in [{low}, {high}] for this CIFAR-10N copy.")
    return size


def write_tiny_cifar10n(
    root: Union[str, Path], n_train: int = 60, n_test: int = 40, image_size: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny CIFAR-10N copy for tests and smoke runs: ``(images folder, label file)`` under ``root``.

    The folder holds ``train-00000-of-00001.parquet`` and ``test-00000-of-00001.parquet`` (random RGB
    images, columns ``img`` and ``label`` as on the Hub); the label file is a ``CIFAR-10_human.pt`` with
    every key of the real one for ``n_train`` images, the noisy sets flipping some labels at random.
    """
    import torch

    root = Path(root)
    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clean = np.arange(n_train) % len(CIFAR10_CLASSES)
    labels = {"clean_label": clean}
    for key, rate in (
        ("aggre_label", 0.1),
        ("random_label1", 0.2),
        ("random_label2", 0.2),
        ("random_label3", 0.2),
        ("worse_label", 0.4),
    ):
        flip = rng.random(n_train) < rate
        labels[key] = np.where(flip, (clean + rng.integers(1, len(CIFAR10_CLASSES), n_train)) % 10, clean)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
    for split, targets in (("train", clean), ("test", np.arange(n_test) % len(CIFAR10_CLASSES))):
        images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in targets]
        dataset = datasets.Dataset.from_dict({"img": images, "label": targets.tolist()}, features=features)
        dataset.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    label_path = root / "CIFAR-10_human.pt"
    torch.save(labels, label_path)
    return folder, label_path
