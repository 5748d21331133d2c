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


# --- 1. the statistics cache is matched on its options, not on the weights alone -----------------------------


@pytest.mark.parametrize("change", [
    {"target_modules": ["q_proj", "k_proj", "v_proj"]},
    {"exclude_modules": ["fc2"]},
    {"project_classifier": False},
    {"max_tokens_per_sample": 2},
    {"accumulation_dtype": "float64"},
    {"trusted_per_class": 1},
    {"selection_rule": "loss"},
])
def test_stats_path_with_other_options_is_refused_before_any_weight_changes(tmp_path, change):
    from helpers import assert_identical, random_examples, snapshot

    from sap_hf import SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    stats_path = tmp_path / "stats.safetensors"
    train, evals = random_examples(12), random_examples(6, seed=2)
    base = dict(alphas=[10.0], trusted_per_class=2)
    sap_correct(tiny_model("vit", num_labels=3), train, evals, SAPConfig(**base), stats_path=stats_path,
                show_progress=False)
    model = tiny_model("vit", num_labels=3)  # the same weights the statistics were collected on
    before = snapshot(model)
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"stats_path=.*{name}=.*this run has {name}=.*Delete"):
        sap_correct(model, train, evals, SAPConfig(**{**base, **change}), stats_path=stats_path, show_progress=False)
    assert_identical(model, before)
    again = sap_correct(model, train, evals, SAPConfig(**base),
                        stats_path=stats_path, show_progress=False)  # the same options: reused
    assert again.num_trusted == 6


def test_stats_path_with_other_trusted_indices_is_refused(tmp_path):
    from helpers import random_examples

    from sap_hf import SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    stats_path = tmp_path / "stats.safetensors"
    train, evals = random_examples(12), random_examples(6, seed=2)
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    first = sap_correct(tiny_model("vit", num_labels=3), train, evals, config, trusted_indices=[0, 1, 2],
                        stats_path=stats_path, show_progress=False)
    with pytest.raises(ValueError, match=r"stats_path=.*trusted_indices"):
        sap_correct(tiny_model("vit", num_labels=3), train, evals, config, trusted_indices=[3, 4, 5],
                    stats_path=stats_path, show_progress=False)
    with pytest.raises(ValueError, match=r"stats_path=.*given trusted_indices.*selects"):
        sap_correct(tiny_model("vit", num_labels=3), train, evals, config, stats_path=stats_path, show_progress=False)
    again = sap_correct(tiny_model("vit", num_labels=3), train, evals, config, trusted_indices=first.trusted_indices,
                        stats_path=stats_path, show_progress=False)
    assert again.trusted_indices == [0, 1, 2]
