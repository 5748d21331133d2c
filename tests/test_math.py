"""The Gram-matrix form of SAP equals the paper's SVD of the stacked activations."""

import math

import pytest
import torch

from sap_hf.core.projection import eigendecompose, energy_ratios, project_weight, projection_matrix, scaled_importance
from sap_hf.core.stats import GramAccumulator, subsample_tokens


def _activations(n=200, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Anisotropic activations so the spectrum is spread like a real layer's.
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)


def _svd_projection(x, alpha):
    """The reference formulation: SVD of R = X^T, r from sigma^2, P = U diag(lambda) U^T."""
    u, s, _ = torch.linalg.svd(x.T, full_matrices=False)
    r = s**2 / (s**2).sum()
    lam = alpha * r / ((alpha - 1) * r + 1)
    return u @ torch.diag(lam) @ u.T, u, s


@pytest.mark.parametrize("alpha", [1.0, 10.0, 1e4])
def test_gram_route_equals_svd_of_stacked_activations(alpha):
    x = _activations()
    basis = eigendecompose(x.T @ x)
    expected_p, _, s = _svd_projection(x, alpha)
    torch.testing.assert_close(basis.eigenvalues, s**2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(projection_matrix(basis, alpha), expected_p, rtol=1e-9, atol=1e-12)
    w = torch.randn(7, x.shape[1], dtype=torch.float64)
    torch.testing.assert_close(
        project_weight(w, projection_matrix(basis, alpha)), w @ expected_p, rtol=1e-9, atol=1e-12
    )


def test_alpha_one_gives_raw_ratios_and_large_alpha_keeps_weights():
    x = _activations()
    basis = eigendecompose(x.T @ x)
    r = energy_ratios(basis.eigenvalues)
    torch.testing.assert_close(scaled_importance(r, 1.0), r)
    w = torch.randn(5, x.shape[1], dtype=torch.float64)
    # Full-rank activations: as alpha grows, lambda -> 1 and P -> I.
    torch.testing.assert_close(project_weight(w, projection_matrix(basis, math.inf)), w, rtol=1e-9, atol=1e-9)
    assert (project_weight(w, projection_matrix(basis, 1e12)) - w).abs().max() < 1e-6
    assert (project_weight(w, projection_matrix(basis, 1.0)) - w).abs().max() > 0.1


def test_importance_is_monotone_in_alpha_and_bounded():
    r = torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    lams = [scaled_importance(r, a) for a in (1.0, 10.0, 1e3)]
    for small, big in zip(lams, lams[1:]):
        assert torch.all(big >= small)
    assert torch.all(lams[-1] <= 1) and lams[-1][-1] == 0


def test_eigendecompose_clamps_negative_round_off_and_orders_descending():
    x = _activations(n=5, d=12)  # rank 5 < 12: the rest is numerically ~0, possibly negative
    basis = eigendecompose((x.T @ x).float())
    assert basis.eigenvalues.dtype == torch.float64
    assert torch.all(basis.eigenvalues >= 0)
    assert torch.all(basis.eigenvalues[:-1] >= basis.eigenvalues[1:])


@pytest.mark.parametrize("block", [4, 5, 64])
def test_block_triangular_accumulation_equals_full_gram(block):
    x = _activations(n=300, d=13)
    acc = GramAccumulator(13, torch.float64, torch.device("cpu"), block=block)
    for chunk in x.split(37):
        acc.update(chunk.reshape(1, -1, 13))
    torch.testing.assert_close(acc.result(), x.T @ x, rtol=1e-12, atol=1e-12)
    assert acc.count == 300


def test_token_cap_keeps_cls_and_caps_each_sequence():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    capped = subsample_tokens(x, 4, torch.Generator().manual_seed(0))
    assert capped.shape == (2, 4, 3)
    assert torch.equal(capped[:, 0], x[:, 0])
    assert subsample_tokens(x, None, None) is x


def test_bad_alpha_and_degenerate_statistics_raise():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for bad in (0.5, float("nan"), -1, "big"):
        with pytest.raises(ValueError, match="alpha"):
            scaled_importance(r, bad)
    with pytest.raises(ValueError, match="zero"):
        energy_ratios(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        eigendecompose(torch.full((2, 2), float("nan")))
