"""Synthetic label noise: exact counts, valid flips, determinism, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from sap_hf.data.noise import FASHION_MNIST_ASYMMETRIC_MAP, add_label_noise


def _labels(n: int = 1000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.4, 0.8, 0.999])
def test_symmetric_flips_exact_count_to_other_classes(rate):
    labels = _labels()
    noisy, is_noisy = add_label_noise(labels, rate, num_classes=10, seed=3)
    assert noisy.dtype == np.int64 and is_noisy.dtype == np.bool_
    assert noisy.shape == is_noisy.shape == labels.shape
    assert is_noisy.sum() == round(rate * len(labels))
    np.testing.assert_array_equal(is_noisy, noisy != labels)
    assert noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_targets_are_uniform_over_the_other_classes():
    labels = np.zeros(20000, dtype=np.int64)
    noisy, is_noisy = add_label_noise(labels, 0.9, num_classes=5, seed=0)
    counts = np.bincount(noisy[is_noisy], minlength=5)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] / counts[1:].sum() - 0.25) < 0.02)


def test_asymmetric_follows_the_map():
    labels = _labels(2000)
    noisy, is_noisy = add_label_noise(
        labels, 0.4, noise_type="asymmetric", num_classes=10, seed=1, asymmetric_map=FASHION_MNIST_ASYMMETRIC_MAP
    )
    assert is_noisy.sum() == 800
    for clean, flipped in zip(labels[is_noisy], noisy[is_noisy]):
        assert flipped == FASHION_MNIST_ASYMMETRIC_MAP[int(clean)]
    np.testing.assert_array_equal(noisy[~is_noisy], labels[~is_noisy])


def test_asymmetric_partial_map_only_flips_mapped_classes():
    labels = np.array([0, 1, 2, 3] * 25)
    noisy, is_noisy = add_label_noise(labels, 0.2, noise_type="asymmetric", asymmetric_map={0: 1, 1: 0, 2: 2})
    assert is_noisy.sum() == 20
    assert set(labels[is_noisy].tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="asymmetric_map"):
        add_label_noise(labels, 0.6, noise_type="asymmetric", asymmetric_map={0: 1, 1: 0})


def test_fashion_mnist_map_is_a_valid_flip_for_every_class():
    assert sorted(FASHION_MNIST_ASYMMETRIC_MAP) == list(range(10))
    assert all(src != dst and 0 <= dst < 10 for src, dst in FASHION_MNIST_ASYMMETRIC_MAP.items())
    assert FASHION_MNIST_ASYMMETRIC_MAP[0] == 6 and FASHION_MNIST_ASYMMETRIC_MAP[9] == 5


def test_deterministic_for_a_seed():
    labels = _labels()
    a = add_label_noise(labels, 0.3, seed=7)
    b = add_label_noise(list(labels), 0.3, seed=7)
    c = add_label_noise(labels, 0.3, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_input_is_not_modified_and_num_classes_is_inferred():
    labels = _labels()
    before = labels.copy()
    noisy, _ = add_label_noise(labels, 0.5)
    np.testing.assert_array_equal(labels, before)
    assert noisy.max() <= 9


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rate": 1.0}, "rate"),
        ({"rate": -0.1}, "rate"),
        ({"rate": "0.2"}, "rate"),
        ({"rate": 0.2, "noise_type": "pairflip"}, "noise_type"),
        ({"rate": 0.2, "noise_type": "asymmetric"}, "asymmetric_map"),
        ({"rate": 0.2, "noise_type": "asymmetric", "asymmetric_map": {0: 12}}, "asymmetric_map"),
        ({"rate": 0.2, "num_classes": 3}, "num_classes"),
        ({"rate": 0.2, "num_classes": 2.5}, "num_classes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        add_label_noise(_labels(), **kwargs)


@pytest.mark.parametrize(
    "labels", [np.zeros((4, 2), dtype=int), np.array([0.5, 1.0]), np.array([-1, 2]), np.array(["a", "b"])]
)
def test_bad_labels_are_rejected(labels):
    with pytest.raises(ValueError, match="labels"):
        add_label_noise(labels, 0.2, num_classes=3)


def test_numpy_numbers_are_accepted_and_bools_refused():
    labels = _labels()
    noisy, is_noisy = add_label_noise(
        labels, np.float32(0.25), noise_type=np.str_("symmetric"), num_classes=np.int64(10)
    )
    assert is_noisy.sum() == 250
    for kwargs, argument in [
        ({"rate": True}, "rate"),
        ({"rate": 0.2, "num_classes": np.bool_(True)}, "num_classes"),
        ({"rate": 0.2, "noise_type": "symetric"}, "did you mean 'symmetric'"),
    ]:
        with pytest.raises(ValueError, match=argument):
            add_label_noise(labels, **kwargs)
