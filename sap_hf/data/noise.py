"""Synthetic label noise for experiments.

SAP is evaluated on data whose labels are partly wrong. Real noise (Clothing1M)
cannot be redistributed, so experiments inject controlled noise into clean data
instead: the flip count is exact and the flipped samples are returned, so the
precision of trusted-sample selection and the effect of a correction can be
measured against the truth.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
from transformers.utils import logging

from ..runtime.checks import check_choice, finite_float, integer, invalid

logger = logging.get_logger(__name__)

NOISE_TYPES = ("symmetric", "asymmetric")

FASHION_MNIST_ASYMMETRIC_MAP: dict[int, int] = {
    0: 6,  # T-shirt/top -> Shirt
    1: 3,  # Trouser -> Dress
    2: 4,  # Pullover -> Coat
    3: 1,  # Dress -> Trouser
    4: 2,  # Coat -> Pullover
    5: 7,  # Sandal -> Sneaker
    6: 0,  # Shirt -> T-shirt/top
    7: 9,  # Sneaker -> Ankle boot
    8: 6,  # Bag -> Shirt
    9: 5,  # Ankle boot -> Sandal
}
"""Class-dependent ("asymmetric") flips for Fashion-MNIST.

Each class is flipped to the class an annotator most plausibly confuses it with
(T-shirt/top <-> Shirt, Trouser <-> Dress, Pullover <-> Coat, Sandal -> Sneaker
-> Ankle boot -> Sandal, Bag -> Shirt). Such structured noise is harder than
symmetric noise because the wrong labels are consistent, which is what real
annotation noise looks like.
"""


def add_label_noise(
    labels: Union[Sequence[int], np.ndarray],
    rate: float,
    noise_type: str = "symmetric",
    num_classes: Optional[int] = None,
    seed: int = 0,
    asymmetric_map: Optional[Mapping[int, int]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * len(labels))`` labels and say which ones.

    An exact count (rather than flipping each label with probability ``rate``)
    makes runs with the same rate comparable and lets tests check the count.

    Args:
        labels: 1-D integer class ids in ``[0, num_classes)``.
        rate: fraction of all samples to flip, in ``[0, 1)``.
        noise_type: ``"symmetric"`` flips to a uniformly chosen *different*
            class; ``"asymmetric"`` flips class ``c`` to ``asymmetric_map[c]``
            (only samples whose class is in the map, with a different target,
            can be flipped).
        num_classes: number of classes; inferred as ``max(labels) + 1`` when
            ``None`` (pass it explicitly if the top class may be absent).
        seed: seed of ``np.random.default_rng``; the same seed gives the same
            flips.
        asymmetric_map: class -> noisy class, required for ``"asymmetric"``
            (for Fashion-MNIST use :data:`FASHION_MNIST_ASYMMETRIC_MAP`).

    Returns:
        ``(noisy_labels, is_noisy)``: int64 labels and a bool mask of the
        flipped samples (``noisy_labels != labels`` exactly where it is True).

    Raises:
        ValueError: on a bad ``rate``, ``noise_type``, ``num_classes``,
            ``labels`` or ``asymmetric_map``, naming the argument and the fix.
    """
    noise_type = check_choice("noise_type", noise_type, NOISE_TYPES)
    rate = check_noise_rate(rate)
    labels_arr = _as_label_array(labels)
    if num_classes is None:
        num_classes = int(labels_arr.max()) + 1 if labels_arr.size else 0
    else:
        num_classes = integer("num_classes", num_classes, minimum=0, hint="It is the number of classes, or None to infer it.")
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= num_classes):
        bad = labels_arr[(labels_arr < 0) | (labels_arr >= num_classes)][0]
        raise ValueError(
            f"labels contain {int(bad)}, outside [0, num_classes={num_classes}); "
            "pass the right num_classes or fix the labels."
        )

    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * labels_arr.size))
    noisy = labels_arr.copy()
    if noise_type == "symmetric":
        if n_flip and num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: symmetric noise needs at least 2 classes.")
        chosen = rng.choice(labels_arr.size, size=n_flip, replace=False)
        # An offset in 1..K-1 modulo K is a uniform choice among the other classes.
        noisy[chosen] = (labels_arr[chosen] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    else:
        mapping = _validate_map(asymmetric_map, num_classes)
        lookup = np.arange(num_classes, dtype=np.int64)
        for src, dst in mapping.items():
            lookup[src] = dst
        eligible = np.flatnonzero(lookup[labels_arr] != labels_arr)
        if eligible.size < n_flip:
            raise ValueError(
                f"rate={rate} asks for {n_flip} flips but only {eligible.size} samples belong to a class that "
                "asymmetric_map sends to a different class; lower rate or extend asymmetric_map."
            )
        chosen = rng.choice(eligible, size=n_flip, replace=False)
        noisy[chosen] = lookup[labels_arr[chosen]]

    is_noisy = noisy != labels_arr
    logger.info("Flipped %d of %d labels (%s noise, rate=%g, seed=%s).", n_flip, labels_arr.size, noise_type, rate, seed)
    return noisy, is_noisy


def check_noise_rate(rate: float, name: str = "rate") -> float:
    """`rate` as a float in [0, 1), the fraction of labels to flip (1 would leave no label to learn from)."""
    value = finite_float(name, rate, "It is the fraction of labels to flip, in [0, 1).")
    if not 0.0 <= value < 1.0:
        raise invalid(name, rate, "use a fraction in [0, 1) (the share of labels to flip), e.g. 0.4.")
    return value


def _as_label_array(labels: Union[Sequence[int], np.ndarray]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D class ids, got an array of shape {arr.shape}; flatten it first.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            return arr.astype(np.int64)
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}; convert them to int first.")
    return arr.astype(np.int64)


def _validate_map(asymmetric_map: Optional[Mapping[int, int]], num_classes: int) -> dict[int, int]:
    if asymmetric_map is None:
        raise ValueError(
            "asymmetric_map is required for noise_type='asymmetric' (class -> noisy class); for Fashion-MNIST "
            "pass sap_hf.data.noise.FASHION_MNIST_ASYMMETRIC_MAP."
        )
    if not isinstance(asymmetric_map, Mapping):
        raise ValueError(f"asymmetric_map must be a dict class -> noisy class, got {type(asymmetric_map).__name__}.")
    mapping: dict[int, int] = {}
    for src, dst in asymmetric_map.items():
        for value in (src, dst):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < num_classes:
                raise ValueError(
                    f"asymmetric_map entry {src!r}: {dst!r} is not a pair of class ids in [0, num_classes={num_classes}); "
                    "fix the map or pass the right num_classes."
                )
        mapping[int(src)] = int(dst)
    return mapping
