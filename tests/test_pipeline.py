"""Every folder sap_hf writes loads in `transformers.pipeline("image-classification")` and predicts as the model does.

The pipeline converts a raw PIL image to RGB and runs the folder's saved image processor; the
model's own prediction is its argmax on the same image through the library's transform (the one
it was trained / corrected with). Offline: tiny models, local data.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_examples
from PIL import Image
from transformers import AutoModelForImageClassification, TrainingArguments, pipeline

from sap_hf.cli import commands as cli
from sap_hf.cli.sources import image_transforms, saved_image_processor
from sap_hf.data import ImageTransform
from sap_hf.models import tiny_model, tiny_vit_config
from sap_hf.trainer import SAPTrainer


ROOT = Path(__file__).resolve().parents[1]


def _images(size: int, grey: bool) -> list[Image.Image]:
    """Raw images: at the model's size and at another size (the processor resizes as the transform does)."""
    rng = np.random.default_rng(0)
    shapes = [(size, size), (size + 9, size + 4)]
    return [Image.fromarray(rng.integers(0, 256, shape if grey else (*shape, 3), dtype=np.uint8)) for shape in shapes]


def _check_pipeline_matches_model(folder: Path, transform: ImageTransform, images: list[Image.Image]) -> None:
    assert (folder / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    for image in images:
        pixels = torch.stack(transform({"image": [image]})["pixel_values"])
        with torch.no_grad():
            probabilities = model(pixel_values=pixels).logits.softmax(-1)[0]
        top = classify(image, top_k=1)[0]
        assert top["label"] == model.config.id2label[int(probabilities.argmax())]
        assert top["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_recipe_embedded_default_folder_loads_in_pipeline(tmp_path):
    """The embedded default (grey Fashion-MNIST, tiny ViT from a config) saves a processor reproducing its input."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import clothing1m

    out = tmp_path / "out"
    clothing1m.run(
        [
            "--output_dir",
            str(out),
            "--train_size",
            "60",
            "--val_size",
            "30",
            "--test_size",
            "30",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "16",
            "--tiny_hidden_size",
            "32",
            "--tiny_num_layers",
            "2",
            "--trusted_per_class",
            "1",
            "--alphas",
            "1",
            "100",
            "--alpha_scope",
            "shared",
            "--label_audit",
            "false",
            "--refine",
            "false",
            "--disable_tqdm",
            "true",
            "--report_to",
            "none",
        ]
    )
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_channels == 3 and model.config.image_size == 28
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 28, "width": 28} and processor["image_mean"] == [0.5] * 3
    _, transform = image_transforms(model, None, augment=False, seed=0)  # what the recipe trained with
    _check_pipeline_matches_model(out, transform, _images(28, grey=True) + _images(28, grey=False))


def test_trainer_save_model_with_processing_class_loads_in_pipeline(tmp_path):
    transform = ImageTransform(image_size=16, num_channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, use_cpu=True)
    trainer = SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=args,
        train_dataset=random_examples(6),
        eval_dataset=random_examples(6),
        processing_class=transform.to_image_processor(),
    )
    trainer.save_model()
    _check_pipeline_matches_model(tmp_path / "out", transform, _images(16, grey=False) + _images(16, grey=True))


def test_cli_correct_folder_loads_in_pipeline(tiny_clothing1m, tmp_path, capsys):
    """A trained model saved without an image processor or class names: `sap-hf correct` saves the processor its
    transform implies and the data's class names."""
    from transformers import ViTForImageClassification

    trained = tmp_path / "trained"
    config = tiny_vit_config(
        image_size=32, patch_size=8, num_channels=3, num_labels=14, hidden_size=32, num_hidden_layers=2
    )
    ViTForImageClassification(config).save_pretrained(trained)
    out = tmp_path / "corrected"
    cli.main(
        [
            "correct",
            "--model_name_or_path",
            str(trained),
            "--data_dir",
            str(tiny_clothing1m),
            "--output_dir",
            str(out),
            "--trusted_per_class",
            "1",
            "--alphas",
            "1",
            "1000",
            "--batch_size",
            "16",
        ]
    )
    capsys.readouterr()
    model = AutoModelForImageClassification.from_pretrained(out)
    # the trained model's classes were LABEL_0...: the saved folder names them after the data's ClassLabel
    assert model.config.id2label[13] == "Underwear" and model.config.label2id["Underwear"] == 13
    _, transform = image_transforms(model, None, augment=False, seed=0)  # what `sap-hf correct` evaluated with
    _check_pipeline_matches_model(out, transform, _images(32, grey=False))


def test_one_channel_transform_has_no_standard_processor():
    with pytest.raises(ValueError, match="num_channels=3"):
        ImageTransform(image_size=28, num_channels=1).to_image_processor()
    processor = object()
    assert ImageTransform(processor).to_image_processor() is processor
    assert saved_image_processor(None, ImageTransform(image_size=28, num_channels=1)) is None  # saved without one
    assert saved_image_processor(processor, ImageTransform(image_size=28, num_channels=1)) is processor
