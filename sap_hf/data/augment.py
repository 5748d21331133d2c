"""Batch image augmentations in torch, on `pixel_values` that are already normalised (torchvision-free).

The clean-up after SAP (`sap_hf.audit.cleanup`) learns from the images whose labels it doubts by
consistency between two views of each image (FixMatch, Sohn et al. 2020): a *weak* view (flip and a
small shift) gives the pseudo-label, a *strong* view (the weak one plus colour jitter and a cut-out
square) is trained to predict it. They work on a whole batch at once, on the batch's device, so they
cost little beside the forward pass; torchvision does not install beside the CPU wheel this project
uses, so they are written here.

Every function draws from `draws`, a `(batch, k)` tensor of uniform numbers in [0, 1], one row per image:
`hashed_uniform(keys, salt, k)` makes them from each image's identity (its position in the training
data) and the training step, so an image gets the same augmentation however the batch is split
across processes (one and several processes then make the same update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


WEAK_DRAWS = 3
"""Uniform numbers per image that `weak_view` reads (flip, two shifts)."""
STRONG_DRAWS = WEAK_DRAWS + 4
"""Uniform numbers per image that `strong_view` reads (the weak view's, brightness, contrast, cut-out centre)."""

_MASK64 = (1 << 64) - 1


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as unsigned."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hashed_uniform(keys: torch.Tensor, salt: int, k: int) -> torch.Tensor:
    """`(len(keys), k)` numbers in [0, 1] that depend only on (key, salt, column): a splitmix64 hash in torch.

    (1.0 itself is possible after the float32 rounding; every user clamps or clips it.)"""
    keys = keys.to(torch.int64).reshape(-1, 1)
    columns = torch.arange(k, dtype=torch.int64, device=keys.device).reshape(1, -1)
    x = (
        keys * 0x3C6EF372FE94F82B
        + columns * 0x1F83D9ABFB41BD6B
        + (int(salt) * 0x5BE0CD19137E2179 & 0x7FFFFFFFFFFFFFFF)
    )
    for multiplier, shift in ((0x3F58476D1CE4E5B9, 30), (0x14057B7EF767814F, 27)):
        x = (x ^ _shift_right(x, shift)) * multiplier  # int64 products wrap: arithmetic modulo 2^64
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).to(torch.float64).div(float(1 << 53)).to(torch.float32)


def random_flip(pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right where its draw is below 1/2 (`draws`: one number per image)."""
    flip = draws.reshape(-1).to(pixels.device) < 0.5
    return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)


def random_shift(pixels: torch.Tensor, max_shift: int, draws: torch.Tensor) -> torch.Tensor:
    """Translate each image by whole pixels in [-max_shift, max_shift] per axis (`draws`: 2 per image), borders reflected."""
    if max_shift <= 0:
        return pixels
    n, _, height, width = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="reflect" if max_shift < min(height, width) else "replicate")
    offsets = (draws.reshape(n, 2).to(pixels.device) * (2 * max_shift + 1)).long().clamp_max(2 * max_shift)
    rows = offsets[:, 0, None] + torch.arange(height, device=pixels.device)  # (n, H): source rows of each image
    cols = offsets[:, 1, None] + torch.arange(width, device=pixels.device)
    batch = torch.arange(n, device=pixels.device)[:, None, None]
    # (n, H, W, C) by advanced indexing, back to (n, C, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def colour_jitter(pixels: torch.Tensor, draws: torch.Tensor, strength: float = 0.4) -> torch.Tensor:
    """Per-image contrast (a scale about the image mean) and brightness (an offset) of up to +-`strength` (2 draws)."""
    n = pixels.shape[0]
    signed = draws.reshape(n, 2).to(device=pixels.device, dtype=pixels.dtype) * 2 - 1
    scale = (1 + strength * signed[:, 0]).view(n, 1, 1, 1)
    offset = (strength * signed[:, 1]).view(n, 1, 1, 1)
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    return (pixels - mean) * scale + mean + offset


def cutout(pixels: torch.Tensor, draws: torch.Tensor, size: float = 0.5) -> torch.Tensor:
    """Set one square of side `size` x the image side (centre from 2 draws, clipped at the borders) to 0 per image.

    0 is the dataset mean of normalised pixels, so the square carries no information.
    """
    n, _, height, width = pixels.shape
    side_h, side_w = max(1, round(size * height)), max(1, round(size * width))
    centres = draws.reshape(n, 2).to(pixels.device)
    top = (centres[:, 0] * height).long() - side_h // 2
    left = (centres[:, 1] * width).long() - side_w // 2
    rows = torch.arange(height, device=pixels.device)[None, :]
    cols = torch.arange(width, device=pixels.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + side_h)  # (n, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + side_w)  # (n, W)
    hole = inside_rows[:, :, None] & inside_cols[:, None, :]
    return pixels.masked_fill(hole[:, None], 0.0)


def weak_view(pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Flip, and shift by up to 1/8 of the image side (FixMatch's weak augmentation); `WEAK_DRAWS` draws per image."""
    shift = max(1, pixels.shape[-1] // 8)
    return random_shift(random_flip(pixels, draws[:, 0]), shift, draws[:, 1:3])


def strong_view(pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The weak view, then colour jitter and a cut-out of half the image side; `STRONG_DRAWS` draws per image."""
    weak = weak_view(pixels, draws[:, :WEAK_DRAWS])
    return cutout(
        colour_jitter(weak, draws[:, WEAK_DRAWS : WEAK_DRAWS + 2]), draws[:, WEAK_DRAWS + 2 : WEAK_DRAWS + 4]
    )
