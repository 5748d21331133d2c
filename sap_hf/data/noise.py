"""Synthetic label noise for experiments.

SAP is evaluated on data whose labels are partly wrong. Real noise (Clothing1M)
cannot be redistributed, so experiments inject controlled noise into clean data
instead: the flip count is exact and the flipped samples are returned, so the
precision of trusted-sample selection and the effect of a correction can be
measured against the truth.

Three kinds: ``symmetric`` (any other class, uniformly), ``asymmetric`` (a fixed
class -> class map) and ``instance`` (the chance and the target of a flip depend on
the image, through a classifier's probabilities). Real annotators err on the
ambiguous images, towards the class those images resemble: that is what
``instance`` imitates, and it is the hardest of the three, because the wrong
labels are plausible ones that a model fits early.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..utils.checks import check_choice, finite_float, integer, invalid, positive_int


logger = logging.get_logger(__name__)

NOISE_TYPES = ("symmetric", "asymmetric", "instance")

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
    probabilities: Optional[Any] = None,
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
            can be flipped); ``"instance"`` flips the samples a classifier finds
            ambiguous, to the class it finds most likely after the true one
            (see :func:`instance_flips`; needs ``probabilities``).
        num_classes: number of classes; inferred as ``max(labels) + 1`` when
            ``None`` (for ``"instance"``: from ``probabilities``); pass it
            explicitly if the top class may be absent.
        seed: seed of ``np.random.default_rng``; the same seed gives the same
            flips.
        asymmetric_map: class -> noisy class, required for ``"asymmetric"``
            (for Fashion-MNIST use :data:`FASHION_MNIST_ASYMMETRIC_MAP`).
        probabilities: ``(len(labels), num_classes)`` class probabilities of
            each sample (rows sum to 1), required for ``"instance"``: e.g. the
            out-of-fold probabilities of a small model, or
            :func:`cross_fitted_probabilities` of the images.

    Returns:
        ``(noisy_labels, is_noisy)``: int64 labels and a bool mask of the
        flipped samples (``noisy_labels != labels`` exactly where it is True).

    Raises:
        ValueError: on a bad ``rate``, ``noise_type``, ``num_classes``,
            ``labels``, ``asymmetric_map`` or ``probabilities``, naming the
            argument and the fix.
    """
    noise_type = check_choice("noise_type", noise_type, NOISE_TYPES)
    rate = check_noise_rate(rate)
    labels_arr = _as_label_array(labels)
    if noise_type == "instance" and probabilities is None:
        raise ValueError(
            "noise_type='instance' needs probabilities= (one row of class probabilities per label, e.g. "
            "sap_hf.data.noise.cross_fitted_probabilities(images, labels)); pass them."
        )
    if noise_type != "instance" and probabilities is not None:
        raise ValueError(
            f"probabilities are used by noise_type='instance' only (got noise_type={noise_type!r}); "
            "drop probabilities or pass noise_type='instance'."
        )
    if noise_type == "instance" and num_classes is None:
        num_classes = _probability_columns(probabilities)
    num_classes = _check_labels(labels_arr, num_classes)

    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * labels_arr.size))
    noisy = labels_arr.copy()
    if noise_type == "symmetric":
        if n_flip and num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: symmetric noise needs at least 2 classes.")
        chosen = rng.choice(labels_arr.size, size=n_flip, replace=False)
        # An offset in 1..K-1 modulo K is a uniform choice among the other classes.
        noisy[chosen] = (labels_arr[chosen] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    elif noise_type == "asymmetric":
        chosen, targets = _asymmetric_flips(labels_arr, asymmetric_map, num_classes, n_flip, rate, rng)
        noisy[chosen] = targets
    else:
        probs = check_probabilities(probabilities, labels_arr.size, num_classes)
        chosen, targets = instance_flips(labels_arr, probs, n_flip, rng)
        noisy[chosen] = targets

    is_noisy = noisy != labels_arr
    logger.info(
        "Flipped %d of %d labels (%s noise, rate=%g, seed=%s).", n_flip, labels_arr.size, noise_type, rate, seed
    )
    return noisy, is_noisy


def _check_labels(labels: np.ndarray, num_classes: Optional[int]) -> int:
    """`num_classes` checked (or inferred from the labels), every label inside `[0, num_classes)`."""
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    else:
        num_classes = integer(
            "num_classes", num_classes, minimum=0, hint="It is the number of classes, or None to infer it."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(
            f"labels contain {int(bad)}, outside [0, num_classes={num_classes}); "
            "pass the right num_classes or fix the labels."
        )
    return num_classes


def _asymmetric_flips(
    labels: np.ndarray,
    asymmetric_map: Optional[Mapping[int, int]],
    num_classes: int,
    n_flip: int,
    rate: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """`n_flip` samples drawn uniformly among those whose class the map moves, and their mapped classes."""
    mapping = _validate_map(asymmetric_map, num_classes)
    lookup = np.arange(num_classes, dtype=np.int64)
    for src, dst in mapping.items():
        lookup[src] = dst
    eligible = np.flatnonzero(lookup[labels] != labels)
    if eligible.size < n_flip:
        raise ValueError(
            f"rate={rate} asks for {n_flip} flips but only {eligible.size} samples belong to a class that "
            "asymmetric_map sends to a different class; lower rate or extend asymmetric_map."
        )
    chosen = rng.choice(eligible, size=n_flip, replace=False)
    return chosen, lookup[labels[chosen]]


INSTANCE_WEIGHT_FLOOR = 1e-12
"""Flip weight of a sample the classifier is certain of: it is flipped only once every doubtful one
is, so any rate below 1 can be met exactly."""


def instance_flips(
    labels: np.ndarray, probabilities: np.ndarray, n_flip: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Instance-dependent flips: which `n_flip` samples, and the class each one gets.

    A sample is drawn with weight `1 - p(true class)` (weighted sampling without replacement, by
    the exponential-key method: the `n_flip` largest `log(u) / weight`), so the images a classifier
    finds ambiguous are the ones mislabelled, yet the realised count is exact. Each is flipped to
    its most probable *other* class (the lowest class id among ties): the mistake an annotator who
    saw the image would make, not a random one.
    """
    rows = np.arange(labels.size)
    weight = np.clip(1.0 - probabilities[rows, labels], INSTANCE_WEIGHT_FLOOR, None)
    keys = np.log1p(-rng.random(labels.size)) / weight  # log(u), u uniform in (0, 1]
    chosen = np.sort(np.argsort(-keys, kind="stable")[:n_flip])
    others = probabilities[chosen].copy()
    others[np.arange(chosen.size), labels[chosen]] = -np.inf
    return chosen, others.argmax(1).astype(np.int64)


def check_probabilities(probabilities: Any, n: int, num_classes: int, name: str = "probabilities") -> np.ndarray:
    """`probabilities` as a float64 `(n, num_classes)` array of finite, non-negative rows summing to 1.

    Logits or unnormalised scores would silently skew which samples are flipped, so they are refused
    with the fix (a softmax) rather than renormalised.
    """
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().cpu().double().numpy()
    try:
        probs = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a numeric (n_samples, num_classes) array, got {type(probabilities).__name__}: {err}."
        ) from err
    if probs.ndim != 2 or probs.shape != (n, num_classes):
        raise ValueError(
            f"{name} has shape {probs.shape}, expected ({n}, {num_classes}): one row of class probabilities per "
            "label, one column per class; pass probabilities aligned with labels (and the right num_classes)."
        )
    if num_classes < 2:
        raise ValueError(f"{name} has {num_classes} column(s): instance noise needs at least 2 classes.")
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(probs.sum(1) - 1.0) > 1e-3)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} row {row} is {probs[row].tolist()[:10]} (sum {probs[row].sum():.6g}): every row must be finite, "
            "non-negative and sum to 1. Pass softmax probabilities (e.g. torch.softmax(logits, -1)), not logits."
        )
    return probs


def _probability_columns(probabilities: Any) -> int:
    shape = np.shape(probabilities)
    if len(shape) != 2:
        raise ValueError(f"probabilities has shape {shape}, expected (n_samples, num_classes); pass a 2-D array.")
    return int(shape[1])


def cross_fitted_probabilities(
    images: Any,
    labels: Union[Sequence[int], np.ndarray],
    num_classes: Optional[int] = None,
    *,
    folds: int = 2,
    pool: int = 2,
    l2: float = 3e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold class probabilities of a softmax regression on downsampled pixels: inputs for instance noise.

    Instance noise needs a view of which images look like which class. This one is cheap and
    deterministic (no random initialisation, no mini-batches: full-batch L-BFGS from zero weights,
    in float64 on the CPU), needs no training of the user's model, and errs where people do
    (shirt / T-shirt / pullover / coat, sandal / sneaker / ankle boot on Fashion-MNIST). It is
    cross-fitted: sample `i` gets the probabilities of the model fitted on the folds without it,
    so its own label cannot make it look certain. Folds are stratified by class and drawn with
    `seed` (folds by position would put whole classes in one fold when labels repeat in order).

    Args:
        images: `(n, H, W)` or `(n, H, W, C)` pixels (uint8 in 0..255, or floats).
        labels: the *clean* class ids, 1-D.
        num_classes: inferred as `max(labels) + 1` when None.
        folds: number of cross-fitting folds, at least 2.
        pool: side of the average pooling applied first (2 turns 28x28 into 14x14 features).
        l2: L2 penalty on the weights (not the bias), keeps the fit well posed.
        max_iter: L-BFGS iterations per fold.
        seed: seed of the fold assignment (the fit itself involves no randomness).

    Returns:
        `(n, num_classes)` float64 probabilities, rows summing to 1. They are rounded to 1e-9
        first: a last-bit difference between BLAS builds or thread counts then almost never
        changes them, nor the flips drawn from them.
    """
    labels_arr = _as_label_array(labels)
    num_classes = _check_labels(labels_arr, num_classes)
    features = _pixel_features(images, positive_int("pool", pool, "use 1 for no pooling, 2 to halve each side."))
    if len(features) != labels_arr.size:
        raise ValueError(f"images has {len(features)} samples but labels {labels_arr.size}; pass one label per image.")
    folds = integer("folds", folds, minimum=2, hint="Cross-fitting needs at least 2 folds.")
    if labels_arr.size < folds:
        raise ValueError(
            f"folds={folds} needs at least {folds} images, got {labels_arr.size}; pass more images or fewer folds."
        )
    l2 = finite_float("l2", l2, "It is the L2 penalty on the weights, e.g. 3e-3.")
    if l2 < 0:
        raise invalid("l2", l2, "use a penalty >= 0, e.g. 3e-3.")
    max_iter = positive_int("max_iter", max_iter, "use e.g. 100 L-BFGS iterations.")
    fold_of = _stratified_folds(labels_arr, folds, seed)
    probs = np.empty((labels_arr.size, num_classes))
    for fold in range(folds):
        held = fold_of == fold
        probs[held] = _softmax_regression(
            features[~held], labels_arr[~held], features[held], num_classes, l2, max_iter
        )
    probs = np.round(probs, 9)
    return probs / probs.sum(1, keepdims=True)


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each sample's fold: every class's members shuffled with `seed`, then dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(labels.size, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = np.arange(members.size) % folds
    return fold_of


def _pixel_features(images: Any, pool: int) -> np.ndarray:
    """Images -> float64 features: scaled to [0, 1] when integer, `pool` x `pool` average-pooled, flattened."""
    arr = np.asarray(images)
    if arr.ndim not in (3, 4) or not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(
            f"images must be a numeric (n, H, W) or (n, H, W, C) array, got shape {arr.shape}, dtype {arr.dtype}."
        )
    pixels = arr.astype(np.float64) / (255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    n, height, width, channels = pixels.shape
    if pool > min(height, width):
        raise ValueError(f"pool={pool} is larger than the images ({height}x{width}); use a smaller pool.")
    h, w = height // pool, width // pool
    pixels = pixels[:, : h * pool, : w * pool].reshape(n, h, pool, w, pool, channels).mean((2, 4))
    return pixels.reshape(n, -1)


def _softmax_regression(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, num_classes: int, l2: float, max_iter: int
) -> np.ndarray:
    """Fit a multinomial logistic regression on `train` (standardised features + bias); `test`'s probabilities."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = torch.from_numpy((train - mean) / std)
    y = torch.from_numpy(labels)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = torch.from_numpy((test - mean) / std) @ weight + bias
        return torch.softmax(logits, -1).numpy()


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
