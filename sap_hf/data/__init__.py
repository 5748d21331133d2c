"""Data for SAP experiments: Clothing1M in its official layout, Fashion-MNIST with synthetic noise, and image transforms."""

from .clothing1m import CLOTHING1M_CLASSES, clothing1m_features, load_clothing1m, write_tiny_clothing1m
from .fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    noisy_fashion_mnist,
    read_idx,
)
from .transforms import ImageTransform, prepare_image_dataset, undecoded_images

__all__ = [
    "CLOTHING1M_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "ImageTransform",
    "clothing1m_features",
    "load_clothing1m",
    "load_fashion_mnist",
    "noisy_fashion_mnist",
    "prepare_image_dataset",
    "read_idx",
    "undecoded_images",
    "write_tiny_clothing1m",
]
