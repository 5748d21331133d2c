"""The math of SAP as pure functions, plus one safe way to write the result into a model.

Gram `G = U diag(sigma^2) U^T`  ->  energy ratios `r_i = sigma_i^2 / sum_j sigma_j^2`
->  scaled importance `lambda_i = alpha r_i / ((alpha - 1) r_i + 1)`  ->  `P = U diag(lambda) U^T`
->  `W <- W P` (bias unchanged), computed as `(W U) diag(lambda) U^T` so that `W U` can be reused
across alphas (`rotate_weights`).

Everything up to the new weights is computed from tensors alone (and checked for NaN/Inf)
before the first parameter is touched; `write_weights` then copies them in and restores every
already-written layer if anything fails, so the model is either fully projected or bit-identical.

The bottom of the import graph: nothing here imports another sap_hf module (a layer group is any
object with `name` and `members`, such as `sap_hf.core.targets.TargetGroup`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import torch
from torch import nn
from transformers.utils import logging

from ..utils.checks import is_bool


logger = logging.get_logger(__name__)


class LayerGroup(Protocol):
    """Layers projected with one statistic: `name` keys it in `bases`, `members` are the layer names."""

    @property
    def name(self) -> str: ...

    @property
    def members(self) -> Sequence[str]: ...


def validate_alpha(alpha: Any, name: str = "alpha") -> float:
    """Return `alpha` as a float, or raise: SAP's scaling is only defined for finite alpha >= 1. A string is read as
    a number (PyYAML reads `1e4` as one); a bool is refused, not taken as alpha=1, the strongest shrinkage."""
    try:
        if is_bool(alpha):
            raise TypeError
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={alpha!r} is not a number: use a finite float >= 1, e.g. 1e4.") from None
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(
            f"{name}={alpha!r} is invalid: SAP needs a finite alpha >= 1 (alpha=1 keeps the raw importance, "
            "larger alpha shrinks less), e.g. 1e4."
        )
    return value


@dataclass
class Eigenbasis:
    """Eigenvectors (columns, float64) and non-negative eigenvalues of one Gram matrix, descending."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def eigendecompose(gram: torch.Tensor) -> Eigenbasis:
    """float64 `eigh` of a Gram matrix; falls back to the CPU if the device's eigh fails.

    Round-off can make tiny eigenvalues slightly negative; they are clamped to 0 since a Gram
    matrix is positive semi-definite.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"A Gram matrix must be square, got shape {tuple(gram.shape)}.")
    if not torch.isfinite(gram).all():
        raise ValueError("The Gram matrix holds NaN/Inf: the activations were not finite. No weight was changed.")
    sym = gram.to(torch.float64)
    sym = (sym + sym.T) / 2
    try:
        values, vectors = torch.linalg.eigh(sym)
    except RuntimeError:  # includes torch.linalg.LinAlgError
        logger.warning("eigh failed on %s; retrying on the CPU.", sym.device)
        values, vectors = torch.linalg.eigh(sym.cpu())
    values = values.flip(0).clamp_min(0.0)
    return Eigenbasis(eigenvalues=values, eigenvectors=vectors.flip(1))


def energy_ratios(eigenvalues: torch.Tensor) -> torch.Tensor:
    """`r_i = sigma_i^2 / sum_j sigma_j^2`: the share of activation energy along each direction."""
    total = eigenvalues.sum()
    if not total > 0:
        raise ValueError("All activations are zero: the trusted samples give SAP no direction to keep.")
    return eigenvalues / total


def scaled_importance(ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """`lambda = alpha r / ((alpha - 1) r + 1)`: alpha=1 gives r, alpha -> inf gives 1 on every r > 0."""
    if isinstance(alpha, (int, float)) and alpha == math.inf:
        return (ratios > 0).to(ratios.dtype)
    alpha = validate_alpha(alpha)
    return alpha * ratios / ((alpha - 1.0) * ratios + 1.0)


def projection_matrix(basis: Eigenbasis, alpha: float) -> torch.Tensor:
    """`P = U diag(lambda) U^T` (float64, d x d)."""
    lam = scaled_importance(energy_ratios(basis.eigenvalues), alpha)
    vectors = basis.eigenvectors
    return (vectors * lam) @ vectors.T


def project_weight(weight: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """`W P` computed in float64 and returned in the weight's dtype and device."""
    projected = weight.detach().to(device=projection.device, dtype=torch.float64) @ projection
    return projected.to(device=weight.device, dtype=weight.dtype)


def rotate_weights(
    weights: Mapping[str, torch.Tensor], groups: Sequence[LayerGroup], bases: Mapping[str, Eigenbasis]
) -> dict[str, torch.Tensor]:
    """`W U` (float64, on the eigenbasis' device) for every member of every group.

    `W P = (W U) diag(lambda) U^T`: with `W U` computed once, each further alpha costs one
    `out x d x d` product instead of a new `d x d x d` projection matrix plus that product
    (an alpha search writes many alphas from the same originals). Costs a float64 copy of the weights.
    """
    rotated: dict[str, torch.Tensor] = {}
    for group in groups:
        vectors = bases[group.name].eigenvectors
        for name in group.members:
            weight = weights[name]
            if weight.shape[-1] != vectors.shape[0]:
                raise ValueError(
                    f"{name} has in_features={weight.shape[-1]} but its statistics are {vectors.shape[0]}-wide: "
                    "the statistics belong to another model."
                )
            rotated[name] = weight.detach().to(device=vectors.device, dtype=torch.float64) @ vectors
    return rotated


def plan_projection(
    weights: Mapping[str, torch.Tensor],
    groups: Sequence[LayerGroup],
    bases: Mapping[str, Eigenbasis],
    alpha: Union[float, Mapping[str, Optional[float]]],
    rotated: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """New weights for every member of every group, from `weights` (originals), all checked finite.

    `alpha` is one value for every group, or a mapping group name -> alpha where None (or a
    missing group) means "leave this group's layers as they are": they are then absent from the
    result. `rotated` (from `rotate_weights`) skips recomputing `W U`; the result is the same
    either way. Raises before returning anything if a result holds NaN/Inf, so the caller never
    writes a partial projection.
    """
    new_weights: dict[str, torch.Tensor] = {}
    for group in groups:
        group_alpha = alpha.get(group.name) if isinstance(alpha, Mapping) else alpha
        if group_alpha is None:
            continue
        basis = bases[group.name]
        lam = scaled_importance(energy_ratios(basis.eigenvalues), group_alpha)
        group_rotated = rotated if rotated is not None else rotate_weights(weights, [group], bases)
        for name in group.members:
            weight = weights[name]
            new = ((group_rotated[name] * lam) @ basis.eigenvectors.T).to(device=weight.device, dtype=weight.dtype)
            if not torch.isfinite(new).all():
                raise ValueError(
                    f"Projecting {name} with alpha={group_alpha} gives NaN/Inf (weights or statistics not finite); "
                    "no weight was changed."
                )
            new_weights[name] = new
    return new_weights


def current_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named layers' weights (the originals a search rewrites from)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().clone() for name in names}


def write_weights(model: nn.Module, new_weights: Mapping[str, torch.Tensor]) -> None:
    """Copy `new_weights` into the model, all or nothing.

    The previous values of every layer are kept until all copies succeed; on any exception the
    layers already written are restored and the exception propagates.
    """
    modules = dict(model.named_modules())
    for name, value in new_weights.items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"The model has no layer named {name!r} with a weight; nothing was changed.")
        if modules[name].weight.shape != value.shape:
            raise ValueError(
                f"{name}.weight has shape {tuple(modules[name].weight.shape)}, the new value {tuple(value.shape)}; "
                "nothing was changed."
            )
    backup: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, value in new_weights.items():
                weight = modules[name].weight
                backup[name] = weight.detach().clone()
                weight.copy_(value)
    except BaseException:
        with torch.no_grad():
            for name, saved in backup.items():
                modules[name].weight.copy_(saved)
        logger.error("Writing SAP projections failed; restored %d already-written layers.", len(backup))
        raise
