"""Targets, statistics, trusted selection and alpha search on tiny models of every ViT family."""

import logging

import pytest
import torch

from sap_hf import (
    ActivationStats,
    SAPConfig,
    collect_statistics,
    find_target_modules,
    sap_correct,
    sap_project,
    search_alpha,
    select_trusted,
)
from sap_hf.models import FAMILIES, tiny_model
from sap_hf.stats import input_hooks
from sap_hf.targets import linear_layers
from sap_hf.trusted import shifted_views

from helpers import assert_identical, random_examples, snapshot


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_and_mlp_linear_is_projected(family):
    model = tiny_model(family)
    targets = find_target_modules(model)
    backbone = [n for n in linear_layers(model) if n != "classifier"]
    assert set(targets) == set(backbone) | {"classifier"}
    before = snapshot(model)
    sap_project(model, random_examples(6), alpha=2.0, config=SAPConfig(batch_size=4))
    after = model.state_dict()
    for name in targets:
        assert not torch.equal(before[f"{name}.weight"], after[f"{name}.weight"]), name
        if f"{name}.bias" in before:  # some layers (BEiT's k_proj, Swin's reduction) have no bias
            assert torch.equal(before[f"{name}.bias"], after[f"{name}.bias"]), f"{name} bias must not change"
    assert _hook_count(model) == 0


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_qkv_share_one_statistic_computed_once(family, monkeypatch):
    model = tiny_model(family)
    from sap_hf import stats as stats_module

    calls = []
    original = stats_module.GramAccumulator.update
    monkeypatch.setattr(stats_module.GramAccumulator, "update", lambda self, rows: (calls.append(id(self)), original(self, rows)))
    stats = collect_statistics(model, random_examples(4), find_target_modules(model), batch_size=4, show_progress=False)
    qkv = [g for g in stats.groups if len(g.members) == 3]
    assert len(qkv) == 2  # one per layer
    assert {m.rsplit(".", 1)[-1] for m in qkv[0].members} == {"q_proj", "k_proj", "v_proj"}
    assert len(calls) == len(stats.groups)  # one update per group per batch, not per layer


def test_statistics_equal_stacked_activations_gram():
    model = tiny_model("vit")
    data = random_examples(10)
    targets = find_target_modules(model)
    captured = {}
    with input_hooks(model, targets, lambda name, x: captured.setdefault(name, []).append(x.detach().double())):
        model.eval()
        with torch.no_grad():
            model(pixel_values=torch.stack([e["pixel_values"] for e in data]))
    stats = collect_statistics(model, data, targets, batch_size=3, accumulation_dtype="float64", show_progress=False)
    for group in stats.groups:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[group.name]])
        torch.testing.assert_close(stats.grams[group.name], x.T @ x, rtol=1e-10, atol=1e-9)
        assert stats.counts[group.name] == x.shape[0]


def test_hooks_removed_after_exception_mid_pass():
    model = tiny_model("vit")
    data = random_examples(8)
    data[5] = {"pixel_values": torch.randn(3, 9, 9), "labels": 0}  # wrong size: the model raises mid-pass
    before = snapshot(model)
    with pytest.raises(Exception):
        collect_statistics(model, data, find_target_modules(model), batch_size=2, show_progress=False)
    assert _hook_count(model) == 0
    assert_identical(model, before)
    model.train()
    collect_statistics(model, random_examples(2), find_target_modules(model), show_progress=False)
    assert model.training, "the pass must restore the previous train/eval mode"
    assert _hook_count(model) == 0


def test_statistics_save_load_roundtrip(tmp_path):
    model = tiny_model("vit")
    stats = collect_statistics(model, random_examples(4), find_target_modules(model), show_progress=False)
    loaded = ActivationStats.load(stats.save(tmp_path / "stats.safetensors"))
    assert loaded.groups == stats.groups and loaded.counts == stats.counts
    for name, gram in stats.grams.items():
        assert torch.equal(gram, loaded.grams[name])
    a, b = tiny_model("vit"), tiny_model("vit")
    sap_project(a, random_examples(4), alpha=5.0)
    sap_project(b, None, alpha=5.0, stats=loaded)
    for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=na)


def test_target_patterns_regex_suffix_and_exclude():
    model = tiny_model("vit")
    assert find_target_modules(model, r".*\.fc1", project_classifier=False) == ["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"]
    assert find_target_modules(model, ["q_proj"], project_classifier=False) == [
        "vit.layers.0.attention.q_proj",
        "vit.layers.1.attention.q_proj",
    ]
    assert "classifier" not in find_target_modules(model, exclude_modules=["classifier"])
    assert find_target_modules(model, ["nothing"], project_classifier=True) == ["classifier"]
    with pytest.raises(ValueError, match="vit.layers.0.attention.q_proj"):
        find_target_modules(model, ["nothing"], project_classifier=False)


def test_trusted_selection_keeps_lowest_loss_per_class_and_warns(caplog):
    torch.manual_seed(0)
    model = tiny_model("vit", num_labels=3)
    data = random_examples(30, num_labels=3)
    selection = select_trusted(model, data, 4, batch_size=7, show_progress=False)
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([e["pixel_values"] for e in data])).logits
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor([e["labels"] for e in data]), reduction="none")
    expected = []
    for c in range(3):
        members = [i for i in range(30) if data[i]["labels"] == c]
        expected += sorted(members, key=lambda i: (losses[i].item(), i))[:4]
    assert selection.indices == sorted(expected)
    assert selection.per_class == {0: 4, 1: 4, 2: 4}
    with caplog.at_level(logging.WARNING):
        small = select_trusted(model, data[:7], 4, show_progress=False)
    assert small.per_class == {0: 3, 1: 2, 2: 2}
    assert "fewer than 4" in caplog.text

def test_shifted_views_move_the_image_by_one_step_with_replicated_edges():
    image = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
    right, left, down, up = shifted_views(image)
    for view in (right, left, down, up):
        assert view.shape == image.shape
    assert torch.equal(right[..., 1:], image[..., :-1]) and torch.equal(right[..., 0], image[..., 0])
    assert torch.equal(left[..., :-1], image[..., 1:]) and torch.equal(left[..., -1], image[..., -1])
    assert torch.equal(down[..., 1:, :], image[..., :-1, :]) and torch.equal(up[..., :-1, :], image[..., 1:, :])
    assert len(shifted_views(torch.zeros(1, 1, 56, 56))) == 4 and shifted_views(torch.zeros(1, 1, 1, 1)) == []


def test_shift_loss_ranks_by_the_mean_loss_over_the_image_and_its_shifts():
    torch.manual_seed(0)
    model = tiny_model("vit", num_labels=3)
    data = random_examples(30, num_labels=3)
    selection = select_trusted(model, data, 2, rule="shift_loss", batch_size=7, show_progress=False)
    pixels, labels = torch.stack([e["pixel_values"] for e in data]), torch.tensor([e["labels"] for e in data])
    with torch.no_grad():
        views = [pixels, *shifted_views(pixels)]
        losses = sum(torch.nn.functional.cross_entropy(model(pixel_values=v).logits, labels, reduction="none") for v in views)
    expected = []
    for c in range(3):
        members = [i for i in range(30) if data[i]["labels"] == c]
        expected += sorted(members, key=lambda i: (losses[i].item(), i))[:2]
    assert selection.indices == sorted(expected)



def test_alpha_search_never_returns_a_worse_model():
    model = tiny_model("vit")
    stats = collect_statistics(model, random_examples(6), find_target_modules(model), show_progress=False)
    before = snapshot(model)
    # An evaluator under which every projection looks worse: the search must keep the original.
    reference = model.classifier.weight.detach().clone()
    score = lambda m: {"accuracy": 1.0 - float((m.classifier.weight.detach() - reference).abs().sum())}
    result = search_alpha(model, stats, [1.0, 100.0], score)
    assert not result.improved and result.best_alpha is None
    assert len(result.metrics) == 2 and result.baseline["accuracy"] == 1.0
    assert_identical(model, before)
    # An evaluator that prefers change picks the alpha that changes most (alpha=1) and writes it.
    result = search_alpha(model, stats, [1.0, 100.0], lambda m: {"accuracy": float((m.classifier.weight.detach() - reference).abs().sum())})
    assert result.best_alpha == 1.0
    assert not torch.equal(model.classifier.weight, reference)


def test_sap_correct_end_to_end_reports_every_alpha():
    model = tiny_model("vit")
    train, evals = random_examples(24, seed=1), random_examples(12, seed=2)
    config = SAPConfig(alphas=[1.0, 1e3], trusted_per_class=2, batch_size=8)
    result = sap_correct(model, train, evals, config, show_progress=False)
    assert result.num_trusted == 6 and result.trusted_per_class == {0: 2, 1: 2, 2: 2}
    assert result.rounds[0].alphas == [1.0, 1e3]
    assert result.final_metrics["accuracy"] >= result.baseline_metrics["accuracy"]
    assert "classifier" in result.target_modules
    assert result.to_dict()["alpha"] == result.alpha
