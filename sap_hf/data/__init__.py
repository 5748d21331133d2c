"""Data for SAP experiments: Clothing1M in its official layout, Fashion-MNIST with synthetic noise, CIFAR-10N with
real human noise, and image transforms."""

from .cifar10n import (
    CIFAR10_CLASSES,
    CIFAR10N_LABEL_SETS,
    cifar10n_label_key,
    cifar10n_label_set_name,
    label_noise_rate,
    load_cifar10n,
    read_cifar10n_labels,
    write_tiny_cifar10n,
)
from .clothing1m import CLOTHING1M_CLASSES, clothing1m_features, load_clothing1m, write_tiny_clothing1m
from .fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    fashion_mnist_arrays,
    load_fashion_mnist,
    noisy_fashion_mnist,
    read_idx,
    stratified_choice,
)
from .transforms import ImageTransform, prepare_image_dataset, undecoded_images


__all__ = [
    "CIFAR10N_LABEL_SETS",
    "CIFAR10_CLASSES",
    "CLOTHING1M_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "ImageTransform",
    "cifar10n_label_key",
    "cifar10n_label_set_name",
    "clothing1m_features",
    "fashion_mnist_arrays",
    "label_noise_rate",
    "load_cifar10n",
    "load_clothing1m",
    "load_fashion_mnist",
    "noisy_fashion_mnist",
    "prepare_image_dataset",
    "read_cifar10n_labels",
    "read_idx",
    "stratified_choice",
    "undecoded_images",
    "write_tiny_cifar10n",
    "write_tiny_clothing1m",
]
