"""Tiny ViT-family models built from configs in code: the embedded default and the tests' models.

Real runs load a pretrained checkpoint with `AutoModelForImageClassification.from_pretrained`;
these builders exist so that the recipe, the benchmarks and the tests run offline on a CPU.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import (
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    PreTrainedModel,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)


FAMILIES: tuple[str, ...] = ("vit", "deit", "beit", "dinov2", "swin", "clip")


def tiny_vit_config(
    image_size: int = 28,
    patch_size: int = 7,
    num_channels: int = 1,
    num_labels: int = 10,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: Optional[int] = None,
    id2label: Optional[dict[int, str]] = None,
    **kwargs: Any,
) -> ViTConfig:
    """A small ViT config (defaults fit Fashion-MNIST: 28x28 grey images, 16 patches + CLS)."""
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_labels=num_labels,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        **extra,
        **kwargs,
    )


def tiny_model(
    family: str = "vit",
    image_size: int = 16,
    num_channels: int = 3,
    num_labels: int = 3,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised image classifier of one ViT family, small enough for unit tests."""
    import torch

    common = dict(image_size=image_size, patch_size=4, num_channels=num_channels, num_labels=num_labels)
    blocks = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
    )
    torch.manual_seed(seed)
    if family == "vit":
        return ViTForImageClassification(ViTConfig(**common, **blocks))
    if family == "deit":
        return DeiTForImageClassification(DeiTConfig(**common, **blocks))
    if family == "beit":
        return BeitForImageClassification(BeitConfig(**common, **blocks))
    if family == "dinov2":
        return Dinov2ForImageClassification(Dinov2Config(**common, **blocks))
    if family == "swin":
        config = SwinConfig(**common, embed_dim=hidden_size // 2, depths=[1, 1], num_heads=[2, 2], window_size=2)
        return SwinForImageClassification(config)
    if family == "clip":
        vision = dict(**common, **blocks)
        vision.pop("num_labels")
        text = dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=hidden_size)
        return CLIPForImageClassification(CLIPConfig(vision_config=vision, text_config=text, num_labels=num_labels))
    raise ValueError(f"family={family!r} is unknown; choose one of {list(FAMILIES)}.")
