"""Instance-dependent label noise: exact rate, seeded, flips to the most probable other class,
more flips where the classifier doubts the label, clear errors, and the Fashion-MNIST pass-through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import DEBIAN_PRESENT, _fake_fashion_dir

from sap_hf.data import noisy_fashion_mnist
from sap_hf.data.noise import NOISE_TYPES, add_label_noise, cross_fitted_probabilities


def _probabilities(n: int = 1000, num_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_instance_is_a_noise_type():
    assert "instance" in NOISE_TYPES


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.8, 0.999])
def test_instance_flips_exactly_the_asked_count(rate):
    labels, probs = _probabilities()
    noisy, is_noisy = add_label_noise(labels, rate, noise_type="instance", probabilities=probs, seed=1)
    assert noisy.dtype == np.int64 and is_noisy.dtype == np.bool_
    assert is_noisy.sum() == round(rate * len(labels))
    np.testing.assert_array_equal(is_noisy, noisy != labels)


def test_instance_is_seeded():
    labels, probs = _probabilities()
    a = add_label_noise(labels, 0.3, noise_type="instance", probabilities=probs, seed=4)
    b = add_label_noise(list(labels), 0.3, noise_type="instance", probabilities=torch.tensor(probs), seed=4)
    c = add_label_noise(labels, 0.3, noise_type="instance", probabilities=probs, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_instance_flips_go_to_the_most_probable_other_class():
    labels, probs = _probabilities()
    noisy, is_noisy = add_label_noise(labels, 0.5, noise_type="instance", probabilities=probs)
    for i in np.flatnonzero(is_noisy):
        others = probs[i].copy()
        others[labels[i]] = -1
        assert noisy[i] == others.argmax()
    np.testing.assert_array_equal(noisy[~is_noisy], labels[~is_noisy])


def test_instance_flips_more_where_the_true_class_is_doubted():
    n = 2000
    labels = np.zeros(n, dtype=np.int64)
    p_true = np.where(np.arange(n) % 2 == 0, 0.9, 0.2)  # even samples look like their class, odd ones do not
    probs = np.stack([p_true, (1 - p_true) * 0.7, (1 - p_true) * 0.3], 1)
    _, is_noisy = add_label_noise(labels, 0.3, noise_type="instance", probabilities=probs, seed=0)
    sure, doubted = is_noisy[0::2].mean(), is_noisy[1::2].mean()
    assert doubted > 2 * sure and is_noisy.sum() == 600
    # A classifier certain of every label still yields the exact count (then the flips are uniform).
    certain = np.eye(3)[labels]
    assert add_label_noise(labels, 0.1, noise_type="instance", probabilities=certain)[1].sum() == 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs probabilities="),
        ({"probabilities": np.full((10, 3), 1 / 3), "noise_type": "symmetric"}, "noise_type='instance' only"),
        ({"probabilities": np.full((9, 3), 1 / 3)}, r"probabilities has shape \(9, 3\), expected \(10, 3\)"),
        ({"probabilities": np.full((10, 3), 1 / 3), "num_classes": 4}, "probabilities has shape"),
        ({"probabilities": np.full(10, 0.5)}, "probabilities has shape"),
        ({"probabilities": np.full((10, 3), 0.5)}, "probabilities row 0 .* sum to 1"),
        ({"probabilities": np.where(np.eye(10, 3) > 0, np.nan, 0.5)}, "probabilities row 0"),
        ({"probabilities": np.tile([1.5, -0.5, 0.0], (10, 1))}, "non-negative"),
        ({"probabilities": [["a"] * 3] * 10}, "probabilities must be a numeric"),
        ({"probabilities": np.full((10, 1), 1.0)}, "labels contain"),
        ({"probabilities": np.full((10, 3), 1 / 3), "rate": 1.0}, "rate"),
    ],
)
def test_instance_bad_inputs_name_the_argument(kwargs, match):
    labels = np.arange(10) % 3
    kwargs = {"rate": 0.2, "noise_type": "instance", **kwargs}
    with pytest.raises(ValueError, match=match):
        add_label_noise(labels, **kwargs)


def test_cross_fitted_probabilities_are_deterministic_and_out_of_fold():
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 4
    images = (rng.random((80, 8, 8)) * 60 + labels[:, None, None] * 40).astype(
        np.uint8
    )  # classes differ in brightness
    probs = cross_fitted_probabilities(images, labels)
    assert probs.shape == (80, 4) and np.allclose(probs.sum(1), 1)
    np.testing.assert_array_equal(probs, cross_fitted_probabilities(images, labels))
    assert (probs.argmax(1) == labels).mean() > 0.8
    assert not np.array_equal(probs, cross_fitted_probabilities(images, labels, seed=1))  # other folds
    # Out of fold: a sample's own (wrong) label does not make it look like that class.
    relabelled = labels.copy()
    relabelled[[0, 4, 8]] = 3
    assert cross_fitted_probabilities(images, relabelled)[[0, 4, 8], 3].max() < 0.2
    for kwargs, argument in [
        ({"folds": 1}, "folds"),
        ({"pool": 0}, "pool"),
        ({"l2": -1.0}, "l2"),
        ({"pool": 9}, "pool"),
    ]:
        with pytest.raises(ValueError, match=argument):
            cross_fitted_probabilities(images, labels, **kwargs)
    with pytest.raises(ValueError, match="images"):
        cross_fitted_probabilities(images[:5], labels)


def test_noisy_fashion_mnist_instance_on_a_small_subset(tmp_path):
    root = _fake_fashion_dir(tmp_path)
    kwargs = dict(
        noise_rate=0.3, noise_type="instance", seed=2, train_size=200, val_size=50, test_size=20, data_dir=root
    )
    data = noisy_fashion_mnist(**kwargs)
    train = data["train"]
    assert sum(train["is_noisy"]) == 60
    assert [y != c for y, c in zip(train["label"], train["clean_label"])] == train["is_noisy"]
    assert noisy_fashion_mnist(**kwargs)["train"]["label"] == train["label"]


@pytest.mark.skipif(not DEBIAN_PRESENT, reason="Debian's dataset-fashion-mnist is not installed")
def test_instance_noise_on_real_fashion_mnist_follows_the_confusable_classes():
    train = noisy_fashion_mnist(noise_rate=0.4, noise_type="instance", train_size=600, val_size=100, test_size=10)[
        "train"
    ]
    clean, noisy = np.array(train["clean_label"]), np.array(train["label"])
    flipped = noisy != clean
    assert flipped.sum() == 240
    # Tops (T-shirt 0, pullover 2, coat 4, shirt 6) are confused with each other more than with anything else.
    tops = {0, 2, 4, 6}
    within = [c in tops and y in tops for c, y in zip(clean[flipped], noisy[flipped]) if c in tops]
    assert np.mean(within) > 0.7
