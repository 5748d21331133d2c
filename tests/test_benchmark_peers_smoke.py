"""benchmarks/methods.py's SSD and SCRUB: the math on a tiny model, and `accuracy.py --quick --methods peers` end to end.

No assertion on accuracy values (a 3-epoch model on 400 images means nothing); one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _peers():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import methods as peers
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return peers


def _tiny_model(seed: int = 0):
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    torch.manual_seed(seed)
    return ViTForImageClassification(
        tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).eval()


def test_diagonal_fisher_is_the_mean_squared_per_sample_gradient_with_prefixes() -> None:
    import torch
    import torch.nn.functional as F

    peers = _peers()
    model = _tiny_model()
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 3, 3, 7, 9])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cost = peers.Cost()
    fisher = peers.diagonal_fisher(model, x, y, prefixes=[2, 5, 9], cost=cost)
    assert sorted(fisher) == [2, 5] and cost.train == 5
    squares = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(pixel_values=x[i : i + 1]).logits, y[i : i + 1]).backward()
        squares.append({n: p.grad.detach() ** 2 for n, p in model.named_parameters()})
    for k in (2, 5):
        for name in before:
            expected = sum(s[name] for s in squares[:k]) / k
            torch.testing.assert_close(fisher[k][name], expected)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_ssd_dampens_exactly_the_selected_parameters_by_min_lambda_ratio_one() -> None:
    import torch

    peers = _peers()
    theta = {"w": torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0])}
    forget = {"w": torch.tensor([1.0, 10.0, 50.0, 0.0, 30.0])}
    retain = {"w": torch.tensor([1.0, 1.0, 2.0, 0.0, 1.0])}
    new, selected = peers.ssd_dampen(theta, forget, retain, alpha=5.0, lam=1.0)
    # selected: I_f > 5 I_r -> positions 1 (10 > 5), 2 (50 > 10), 4 (30 > 5); 0 (1 > 5) and 3 (0 > 0) are not
    assert selected == 3
    torch.testing.assert_close(new["w"], torch.tensor([1.0, 2.0 * 0.1, -3.0 * 2 / 50, 4.0, 5.0 / 30]))
    # lambda large enough: beta = min(lambda I_r / I_f, 1) = 1 for all selected -> nothing changes
    same, selected = peers.ssd_dampen(theta, forget, retain, alpha=5.0, lam=100.0)
    assert selected == 3 and torch.equal(same["w"], theta["w"])
    assert torch.equal(theta["w"], torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0]))  # inputs untouched


def test_ssd_with_a_huge_alpha_changes_nothing_on_a_model() -> None:
    import torch

    peers = _peers()
    model = _tiny_model()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    forget = peers.diagonal_fisher(model, x[:3], y[:3])[3]
    retain = peers.diagonal_fisher(model, x[3:], y[3:])[3]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    new, selected = peers.ssd_dampen(params, forget, retain, alpha=1e30, lam=1.0)
    # a parameter with zero retain importance and non-zero forget importance is still selected at any alpha
    zero_retain = sum(int(((retain[n] == 0) & (forget[n] > 0)).sum()) for n in params)
    assert selected == zero_retain
    changed = sum(int((new[n] != params[n]).sum()) for n in params)
    assert changed <= zero_retain
    new, selected = peers.ssd_dampen(params, forget, {n: t + 1e-30 for n, t in retain.items()}, alpha=1e30, lam=1.0)
    assert selected == 0 and all(torch.equal(new[n], params[n]) for n in params)


def test_scrub_max_steps_push_away_from_the_teacher_and_min_steps_pull_back() -> None:
    import copy

    import torch

    peers = _peers()
    model = _tiny_model()
    teacher = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def kl() -> float:
        with torch.no_grad():
            return float(peers.kl_to_teacher(model(pixel_values=x).logits, teacher(pixel_values=x).logits, 4.0))

    kwargs = dict(temperature=4.0, ce_weight=0.0, batch_size=4, seed=0)
    assert kl() == pytest.approx(0.0, abs=1e-5)
    # one max pass on the forget set (and a retain pass without any weight on its loss): the KL grows from 0
    epochs, cost = [], peers.Cost()
    peers.scrub_train(
        model,
        teacher,
        (x, y),
        (x[:4], y[:4]),
        lr=1e-2,
        max_epochs=1,
        epochs=1,
        kl_weight=0.0,
        on_epoch=epochs.append,
        cost=cost,
        **kwargs,
    )
    pushed = kl()
    assert pushed > 1e-3 and epochs == [1] and (cost.train, cost.forward) == (12, 12)
    # min steps only (KL to the teacher, no CE, no max pass): the student comes back towards the teacher
    peers.scrub_train(
        model,
        teacher,
        (x[:0], y[:0]),
        (x, y),
        lr=1e-3,
        max_epochs=0,
        epochs=20,
        kl_weight=1.0,
        on_epoch=lambda e: None,
        **kwargs,
    )
    assert kl() < 0.5 * pushed


def test_oracle_sizes_scale_the_papers_sets() -> None:
    peers = _peers()
    assert peers.oracle_sizes(4000) == {"ssd": (400, 80), "scrub": (80, 16)}
    assert peers.oracle_sizes(50_000) == {"ssd": (5000, 1000), "scrub": (1000, 200)}


def _fashion_mnist_available() -> bool:
    from sap_hf.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR, _find_idx_files

    return all(_find_idx_files(DEBIAN_FASHION_MNIST_DIR, split) is not None for split in ("train", "test"))


@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST idx files are not installed")
def test_accuracy_quick_methods_peers_merges_ssd_and_scrub_rows(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--threads",
        "1",
        "--out_dir",
        str(tmp_path),
        "--settings",
        "sym40",
        "--no_plot",
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = json.loads((tmp_path / "accuracy.json").read_text())["rows"]

    proc = subprocess.run(
        cmd[:-1] + ["--methods", "peers"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "accuracy.json").read_text())
    rows = record["rows"]
    peer = [r for r in rows if r["method"] in ("ssd", "scrub")]
    assert len(rows) == len(before) + 4  # the other groups' rows are kept
    assert {(r["method"], r["forget_set"], r["oracle"]) for r in peer} == {
        ("ssd", "realistic", False),
        ("ssd", "oracle", True),
        ("scrub", "realistic", False),
        ("scrub", "oracle", True),
    }
    for r in peer:
        assert {
            "setting",
            "seed",
            "test_accuracy",
            "val_accuracy",
            "cost_epochs",
            "cost_epochs_final",
            "forget_size",
            "retain_size",
            "trials",
            "gain_vs_none",
        } <= set(r)
        assert (
            0.0 <= r["test_accuracy"] <= 1.0 and r["val_accuracy"] >= r["val_unchanged"]
        )  # "no change" is a candidate
        assert r["cost_epochs"] >= r["cost_epochs_final"] >= 0.0
        if r["oracle"]:  # 400 training images: SSD 40 retain / 8 forget, SCRUB 8 / 2 (when chosen)
            assert r["forget_size"] in ((0, 8) if r["method"] == "ssd" else (0, 2))
            assert r["forget_size"] == 0 or r["forget_noisy_fraction"] == 1.0
        else:
            assert r["forget_size"] <= r["forget_available"] == r["audit_suspected"]
    assert {"lam", "alpha"} <= set(next(r for r in peer if r["method"] == "ssd"))
    # SCRUB's length is `scrub_epochs`: a caller's own `epochs` (pretrained.py's fine-tuning length) is not overwritten
    assert {"lr", "max_epochs", "scrub_epochs"} <= set(next(r for r in peer if r["method"] == "scrub"))
    assert not any("epochs" in r for r in peer)
    table = record["peers"]["sym40"]
    assert [t["theirs"] for t in table["targets"]] == [
        "ssd (realistic)",
        "scrub (realistic)",
        "ssd (oracle)",
        "scrub (oracle)",
    ]
    assert record["config_peers"]["oracle_sizes"] == {"ssd": [40, 8], "scrub": [8, 2]}
