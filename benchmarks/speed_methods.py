"""What `speed.py` compares (a support module, not a script): the ViT shapes, their random data, FLOP counts, and
one call of each method; nothing here times or measures memory. The protocol is on
`benchmarks/studies/cost.md#speed-and-memory`.

`run_inference` (plain forward), `run_stats` (sap_hf's streaming statistics), `run_eigh_project` (eigh of every
Gram, projection and write, one alpha), `run_reference_svd` (the paper's stored-activations SVD, the yardstick);
`verify` checks that the Gram path and the SVD give the same projected weights.
"""

from __future__ import annotations

from typing import Any, Optional

import common  # noqa: F401  (puts this checkout's sap_hf first on sys.path)
import torch

from sap_hf.runtime.passes import Runtime


METHODS = ["inference", "stats_exact", "stats_subsampled", "eigh_project", "reference_svd"]
SHAPES = {
    "tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
IMAGE, PATCH, LAYERS, LABELS = 224, 16, 12, 10  # IMAGE: the default image size (--image_size)
GRAM_BLOCK = 256  # sap_hf.core.stats.GramAccumulator's default block


def build_model(shape: str, seed: int = 0, image_size: int = IMAGE):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        num_hidden_layers=LAYERS, image_size=image_size, patch_size=PATCH, num_labels=LABELS, **SHAPES[shape]
    )
    return ViTForImageClassification(config).eval()


class RandomBatches:
    """Re-iterable, deterministic batches `{"pixel_values": (b, 3, image_size, image_size)}`, generated lazily."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, image_size: int = IMAGE):
        self.n, self.batch_size, self.seed, self.image_size = n, batch_size, seed, image_size

    def __len__(self) -> int:  # only used for progress totals (no __getitem__: not map-style)
        return self.n

    def __iter__(self):
        for index, start in enumerate(range(0, self.n, self.batch_size)):
            size = min(self.batch_size, self.n - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            yield {"pixel_values": torch.randn(size, 3, self.image_size, self.image_size, generator=generator)}


def tokens_per_sample(image_size: int = IMAGE) -> int:
    return (image_size // PATCH) ** 2 + 1


def forward_flops_per_sample(shape: str, image_size: int = IMAGE) -> float:
    """L [2T(4h^2 + 2hm) + 4T^2 h] (q,k,v,o, fc1,fc2, QK^T and AV) + 2(T-1) 3p^2 h (patch embedding) + 2hC
    (classifier); 2 FLOPs per multiply-add, elementwise ops (LayerNorm, GELU, softmax) ignored."""
    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample(image_size)
    per_layer = 2 * T * (4 * h * h + 2 * h * m) + 4 * T * T * h
    return LAYERS * per_layer + 2 * (T - 1) * 3 * PATCH * PATCH * h + 2 * h * LABELS


def gram_flops_per_token(width: int, block: Optional[int] = GRAM_BLOCK) -> float:
    """2 * sum over row blocks [s, e) of (e - s) * (width - s): the upper block-triangle of X^T X."""
    if block is None or block >= width:
        return 2.0 * width * width
    return 2.0 * sum((min(s + block, width) - s) * (width - s) for s in range(0, width, block))


def gram_flops_per_sample(
    shape: str, token_cap: Optional[int] = None, block: Optional[int] = GRAM_BLOCK, image_size: int = IMAGE
) -> float:
    """Per layer: q/k/v (one group), o, fc1 read h-wide rows, fc2 m-wide rows, t = min(cap, T) rows per sample;
    the classifier reads 1 row (CLS) per sample."""
    h, m, T = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"], tokens_per_sample(image_size)
    t = T if token_cap is None else min(token_cap, T)
    per_layer = t * (3 * gram_flops_per_token(h, block) + gram_flops_per_token(m, block))
    return LAYERS * per_layer + gram_flops_per_token(h, block)


def run_inference(model, data) -> None:
    with torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"])


def run_stats(model, data, names, batch_size: int, cap: Optional[int], accumulation_dtype: str = "float32"):
    from sap_hf.core.stats import collect_statistics

    runtime = Runtime(batch_size=batch_size, show_progress=False)
    return collect_statistics(
        model, data, names, max_tokens_per_sample=cap, accumulation_dtype=accumulation_dtype, runtime=runtime
    )


def run_eigh_project(model, stats, alpha: float) -> dict[str, torch.Tensor]:
    from sap_hf.core.projection import current_weights, plan_projection, write_weights
    from sap_hf.core.search import eigenbases

    new = plan_projection(current_weights(model, stats.target_modules), stats.groups, eigenbases(stats), alpha)
    write_weights(model, new)
    return new


def store_activations(model, data, groups) -> dict[str, torch.Tensor]:
    """One forward keeping every group's input rows (N x d, as produced: float32), stacked."""
    from sap_hf.core.stats import input_hooks

    stored: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}

    def keep(name: str, tensor: torch.Tensor) -> None:
        stored[name].append(tensor.detach().reshape(-1, tensor.shape[-1]).clone())

    with input_hooks(model, list(stored), keep), torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"])
    for name in list(stored):  # stack one group at a time: peak = everything + one group
        stored[name] = torch.cat(stored[name]) if len(stored[name]) > 1 else stored[name][0]
    return stored


def svd_basis(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """U (float64) and singular values (float64) of R = X^T (d x N) by torch.linalg.svd in `dtype`."""
    u, s, _ = torch.linalg.svd(rows.T.to(dtype), full_matrices=False)
    return u.double(), s.double()


def svd_projected(
    weights: dict[str, torch.Tensor], u: torch.Tensor, s: torch.Tensor, alpha: float
) -> dict[str, torch.Tensor]:
    """lambda from the singular values (the SAP formula), P = U diag(lambda) U^T, W P in float64."""
    energy = s**2
    ratios = energy / energy.sum()
    lam = alpha * ratios / ((alpha - 1.0) * ratios + 1.0)
    projection = (u * lam) @ u.T
    return {name: (w.detach().double() @ projection).to(w.dtype) for name, w in weights.items()}


def run_reference_svd(
    model, data, groups, alpha: float, svd_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The stored-activations approach: R = X^T (d x N) per distinct input, SVD, P = U diag(lambda) U^T, W <- W P.

    The activations are kept as they come (float32, all in memory at once, like the reference code); the SVD runs in
    `svd_dtype` (float32 like the reference code; float64 for the accuracy check)."""
    modules = dict(model.named_modules())
    stored = store_activations(model, data, groups)
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group in groups:
            u, s = svd_basis(stored.pop(group.name), svd_dtype)
            new.update(svd_projected({name: modules[name].weight for name in group.members}, u, s, alpha))
        for name, value in new.items():
            modules[name].weight.copy_(value)
    return new


def max_relative_difference(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """max over layers of max|W_ours - W_ref| / max|W_ref| (and the Frobenius-norm version)."""
    assert ours.keys() == ref.keys(), "ours and the reference projected different layers"
    worst_max, worst_fro = 0.0, 0.0
    for name in ours:
        a, b = ours[name].double(), ref[name].double()
        worst_max = max(worst_max, float((a - b).abs().max() / b.abs().max()))
        worst_fro = max(worst_fro, float(torch.linalg.norm(a - b) / torch.linalg.norm(b)))
    return {"max_abs_over_max_abs": worst_max, "frobenius": worst_fro}


def verify(model, names, groups, data, batch_size: int, alphas: list[float], full: bool) -> dict[str, Any]:
    """Projected weights of the Gram path vs the SVD of the stored activations, per alpha.

    Truth: the float64 SVD of the stored (float32) activations, against a Gram accumulated in float64. With `full`
    also the library default (float32 Gram) and a float32 SVD (the reference's dtype): where a mismatch comes from."""
    from sap_hf.core.projection import current_weights, plan_projection
    from sap_hf.core.search import eigenbases

    dtypes = ["float64", "float32"] if full else ["float64"]
    originals = current_weights(model, names)
    stored = store_activations(model, data, groups)
    svds = {dtype: {g.name: svd_basis(stored[g.name], getattr(torch, dtype)) for g in groups} for dtype in dtypes}
    del stored
    grams = {dtype: eigenbases(run_stats(model, data, names, batch_size, None, dtype)) for dtype in dtypes}

    def from_svd(dtype: str, alpha: float) -> dict[str, torch.Tensor]:
        out = {}
        for group in groups:
            u, s = svds[dtype][group.name]
            out.update(svd_projected({n: originals[n] for n in group.members}, u, s, alpha))
        return out

    def difference(ours: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
        return max_relative_difference(ours, truth)["max_abs_over_max_abs"]

    result: dict[str, Any] = {"n_samples": sum(b["pixel_values"].shape[0] for b in data), "per_alpha": []}
    for alpha in alphas:
        truth = from_svd("float64", alpha)
        row = {"alpha": alpha}
        for dtype, bases in grams.items():
            row[f"gram_{dtype}_vs_svd_float64"] = difference(plan_projection(originals, groups, bases, alpha), truth)
        if full:
            row["svd_float32_vs_svd_float64"] = difference(from_svd("float32", alpha), truth)
        result["per_alpha"].append(row)
    return result
