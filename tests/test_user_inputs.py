"""Ordinary user inputs that once gave silent wrong results or unhelpful errors (issue 26, item 4)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sap_hf.data import ImageTransform


def _oriented_jpeg(path) -> bytes:
    """A 6x4 JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6), written to `path`."""
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[:, :3] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=100)
    return path.read_bytes()


def test_image_transform_decodes_like_datasets_exif_orientation(tmp_path):
    import datasets

    path = tmp_path / "photo.jpg"
    data = _oriented_jpeg(path)
    reference = datasets.Image().decode_example({"path": str(path), "bytes": None})
    assert reference.size == (4, 6)  # datasets applies the EXIF orientation
    transform = ImageTransform(image_size=(6, 4), num_channels=3)
    expected = transform({"image": [reference], "label": [0]})["pixel_values"][0]
    for raw in ({"path": str(path), "bytes": None}, {"path": None, "bytes": data}):
        got = transform({"image": [raw], "label": [0]})["pixel_values"][0]
        assert torch.allclose(got, expected), raw.keys()
