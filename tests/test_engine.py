"""Targets, statistics, trusted selection and alpha search on tiny models of every ViT family."""

import logging

import pytest
import torch
from helpers import MapStyle, assert_identical, random_examples, snapshot

from sap_hf import (
    ActivationStats,
    SAPConfig,
    collect_statistics,
    sap_correct,
    sap_project,
    search_alpha,
    select_trusted,
)
from sap_hf.core.selection import shifted_views
from sap_hf.core.stats import input_hooks
from sap_hf.core.targets import classifier_names, find_target_modules, group_kinds, linear_layers
from sap_hf.models import FAMILIES, tiny_model
from sap_hf.runtime.passes import Runtime


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
    from sap_hf.core import stats as stats_module

    calls = []
    original = stats_module.GramAccumulator.update
    monkeypatch.setattr(
        stats_module.GramAccumulator, "update", lambda self, rows: (calls.append(id(self)), original(self, rows))
    )
    stats = collect_statistics(
        model, random_examples(4), find_target_modules(model), runtime=Runtime(batch_size=4, show_progress=False)
    )
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
    stats = collect_statistics(
        model, data, targets, accumulation_dtype="float64", runtime=Runtime(batch_size=3, show_progress=False)
    )
    for group in stats.groups:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[group.name]])
        torch.testing.assert_close(stats.grams[group.name], x.T @ x, rtol=1e-10, atol=1e-9)
        assert stats.counts[group.name] == x.shape[0]


def test_hooks_removed_after_exception_mid_pass():
    model = tiny_model("vit")
    data = random_examples(8)
    data[5] = {"pixel_values": torch.randn(3, 9, 9), "labels": 0}  # wrong size: the model raises mid-pass
    before = snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 (whatever the model raises: the hooks must go either way)
        collect_statistics(model, data, find_target_modules(model), runtime=Runtime(batch_size=2, show_progress=False))
    assert _hook_count(model) == 0
    assert_identical(model, before)
    model.train()
    collect_statistics(model, random_examples(2), find_target_modules(model), runtime=Runtime(show_progress=False))
    assert model.training, "the pass must restore the previous train/eval mode"
    assert _hook_count(model) == 0


def test_statistics_save_load_roundtrip(tmp_path):
    model = tiny_model("vit")
    stats = collect_statistics(
        model, random_examples(4), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
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
    assert find_target_modules(model, r".*\.fc1", project_classifier=False) == [
        "vit.layers.0.mlp.fc1",
        "vit.layers.1.mlp.fc1",
    ]
    assert find_target_modules(model, ["q_proj"], project_classifier=False) == [
        "vit.layers.0.attention.q_proj",
        "vit.layers.1.attention.q_proj",
    ]
    assert "classifier" not in find_target_modules(model, exclude_modules=["classifier"])
    with pytest.raises(ValueError, match="vit.layers.0.attention.q_proj"):
        find_target_modules(model, ["nothing"], project_classifier=False)


@pytest.mark.parametrize("patterns", [["qkv_typo"], r".*typo.*", ["classifier"]], ids=["list", "regex", "head-name"])
def test_target_typo_raises_even_with_the_head_projected(patterns):
    """A pattern matching no backbone layer must not silently shrink SAP to the classifier."""
    model = tiny_model("vit")
    with pytest.raises(
        ValueError, match=r"No backbone nn.Linear layer matches.*vit.layers.0.mlp.fc1.*target_modules=\[\]"
    ):
        find_target_modules(model, patterns, project_classifier=True)
    with pytest.raises(ValueError, match="only the classifier"):  # exclusions that empty the backbone too
        find_target_modules(model, ["q_proj"], exclude_modules=["q_proj"])


def test_empty_target_list_with_head_projects_the_head_alone_and_says_so(caplog):
    model = tiny_model("vit")
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        assert find_target_modules(model, [], project_classifier=True) == ["classifier"]
    assert "projects the classification head alone (classifier)" in caplog.text
    with pytest.raises(ValueError, match="No backbone"):
        find_target_modules(model, [], project_classifier=False)


def test_trusted_selection_keeps_lowest_loss_per_class_and_warns(caplog):
    torch.manual_seed(0)
    model = tiny_model("vit", num_labels=3)
    data = random_examples(30, num_labels=3)
    selection = select_trusted(model, data, 4, rule="loss", runtime=Runtime(batch_size=7, show_progress=False))
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
        small = select_trusted(model, data[:7], 4, rule="loss", runtime=Runtime(show_progress=False))
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
    selection = select_trusted(model, data, 2, rule="shift_loss", runtime=Runtime(batch_size=7, show_progress=False))
    pixels, labels = torch.stack([e["pixel_values"] for e in data]), torch.tensor([e["labels"] for e in data])
    with torch.no_grad():
        views = [pixels, *shifted_views(pixels)]
        losses = sum(
            torch.nn.functional.cross_entropy(model(pixel_values=v).logits, labels, reduction="none") for v in views
        )
    expected = []
    for c in range(3):
        members = [i for i in range(30) if data[i]["labels"] == c]
        expected += sorted(members, key=lambda i: (losses[i].item(), i))[:2]
    assert selection.indices == sorted(expected)


def test_alpha_search_never_returns_a_worse_model():
    model = tiny_model("vit")
    stats = collect_statistics(
        model, random_examples(6), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    before = snapshot(model)
    # An evaluator under which every projection looks worse: the search must keep the original.
    reference = model.classifier.weight.detach().clone()
    score = lambda m: {"accuracy": 1.0 - float((m.classifier.weight.detach() - reference).abs().sum())}
    result = search_alpha(model, stats, [1.0, 100.0], score)
    assert not result.improved and result.best_alpha is None
    assert len(result.metrics) == 2 and result.baseline["accuracy"] == 1.0
    assert_identical(model, before)
    # An evaluator that prefers change picks the alpha that changes most (alpha=1) and writes it.
    result = search_alpha(
        model,
        stats,
        [1.0, 100.0],
        lambda m: {"accuracy": float((m.classifier.weight.detach() - reference).abs().sum())},
    )
    assert result.best_alpha == 1.0
    assert not torch.equal(model.classifier.weight, reference)


def test_sap_correct_end_to_end_reports_every_alpha():
    model = tiny_model("vit")
    train, evals = random_examples(24, seed=1), random_examples(12, seed=2)
    config = SAPConfig(alphas=[1.0, 1e3], trusted_per_class=2, batch_size=8)
    result = sap_correct(model, train, evals, config, runtime=Runtime(show_progress=False))
    assert result.num_trusted == 6 and result.trusted_per_class == {0: 2, 1: 2, 2: 2}
    assert (
        result.trusted_indices
        == select_trusted(tiny_model("vit"), train, 2, runtime=Runtime(batch_size=8, show_progress=False)).indices
    )
    assert result.rounds[0].alphas == [1.0, 1e3]
    assert result.final_metrics["accuracy"] >= result.baseline_metrics["accuracy"]
    assert "classifier" in result.target_modules
    assert result.to_dict()["alpha"] == result.alpha


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_kinds_split_attention_mlp_and_classifier(family):
    model = tiny_model(family)
    stats = collect_statistics(
        model, random_examples(2), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    kinds = group_kinds(stats.groups, classifier_names(model))
    by_kind = {kind: [g for g in stats.groups if kinds[g.name] == kind] for kind in ("attention", "mlp", "classifier")}
    assert [g.name for g in by_kind["classifier"]] == ["classifier"]
    assert all(len(g.members) == 3 or g.name.endswith(("o_proj", "out_proj")) for g in by_kind["attention"])
    qkv = [g for g in by_kind["attention"] if len(g.members) == 3]
    assert qkv and 2 * len(qkv) == len(by_kind["attention"])  # q/k/v + the attention output, per block
    assert {g.name.rsplit(".", 1)[-1] for g in by_kind["mlp"]} <= {"fc1", "fc2", "reduction"}
    assert {g.name.rsplit(".", 1)[-1] for g in by_kind["mlp"]} >= {"fc1", "fc2"}


def _change(model, before, kind, kinds, groups):
    names = [m for g in groups if kinds[g.name] == kind for m in g.members]
    return sum(float((model.get_submodule(n).weight.detach() - before[f"{n}.weight"]).abs().sum()) for n in names)


def _kind_scored_setup(mlp_penalty):
    """A tiny ViT, its statistics and kinds, and an evaluator that rewards changing the attention layers
    and charges `mlp_penalty` per unit of change of the MLP layers (the classifier does not count)."""
    model = tiny_model("vit")
    stats = collect_statistics(
        model, random_examples(6), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    kinds = group_kinds(stats.groups, classifier_names(model))
    before = snapshot(model)
    score = lambda m: {
        "accuracy": _change(m, before, "attention", kinds, stats.groups)
        - mlp_penalty * _change(m, before, "mlp", kinds, stats.groups)
    }
    return model, stats, kinds, before, score


def _assert_sap_project_reproduces(model, kind_alphas):
    written = snapshot(model)
    again = tiny_model("vit")
    sap_project(again, random_examples(6), alpha=kind_alphas)
    for name, tensor in written.items():
        assert torch.allclose(again.state_dict()[name], tensor, rtol=0, atol=1e-6), name


def test_per_kind_search_gives_each_layer_kind_its_own_alpha():
    # MLP changes cost so much that no shared alpha helps; one alpha per kind can (attention at the
    # strongest alpha, MLP unchanged).
    model, stats, kinds, before, score = _kind_scored_setup(mlp_penalty=100)
    shared = search_alpha(model, stats, [1.0, 100.0], score)
    assert not shared.improved and shared.kind_alphas == {}
    assert_identical(model, before)

    result = search_alpha(model, stats, [1.0, 100.0], score, kinds=kinds, method="grid")
    assert result.best_alpha is None  # the shared part of the search
    assert result.kind_alphas == {"attention": 1.0, "mlp": None, "classifier": None} and result.improved
    assert [(t["kind"], t["alpha"]) for t in result.kind_trials] == [
        ("attention", 1.0),
        ("attention", 100.0),
        ("mlp", 1.0),
        ("mlp", 100.0),
        ("classifier", 1.0),
        ("classifier", 100.0),
    ]
    assert result.best_metrics == max((t["metrics"] for t in result.kind_trials), key=lambda m: m["accuracy"])
    assert _change(model, before, "mlp", kinds, stats.groups) == 0.0
    assert torch.equal(model.classifier.weight, before["classifier.weight"])
    _assert_sap_project_reproduces(model, result.kind_alphas)  # the very same weights


def test_kind_alphas_are_validated_before_any_change():
    model = tiny_model("vit")
    before = snapshot(model)
    with pytest.raises(ValueError, match="unknown layer kind.*'attn'"):
        sap_project(model, random_examples(4), alpha={"attn": 10.0})
    with pytest.raises(ValueError, match="projects no targeted layer"):
        sap_project(model, random_examples(4), alpha={})  # e.g. kind_alphas of a shared-scope run
    with pytest.raises(ValueError, match="project_classifier"):
        sap_project(model, random_examples(4), alpha={"classifier": 10.0}, config=SAPConfig(project_classifier=False))
    with pytest.raises(ValueError, match="alpha\\['mlp'\\]"):
        sap_project(model, random_examples(4), alpha={"mlp": 0.5})
    with pytest.raises(ValueError, match="alpha_scope"):
        SAPConfig(alpha_scope="per_layer")
    assert_identical(model, before)


def test_sap_correct_per_kind_records_kind_alphas():
    model = tiny_model("vit")
    train, evals = random_examples(24, seed=1), random_examples(12, seed=2)
    config = SAPConfig(
        alphas=[1.0, 1e3], trusted_per_class=2, batch_size=8, alpha_scope="per_kind", alpha_search="grid"
    )
    result = sap_correct(model, train, evals, config, runtime=Runtime(show_progress=False))
    assert set(result.kind_alphas) == {"attention", "mlp", "classifier"}
    assert len(result.rounds[0].kind_trials) == 6
    assert result.final_metrics["accuracy"] >= max(
        m["accuracy"] for m in result.rounds[0].metrics + [result.baseline_metrics]
    )
    record = result.to_dict()
    assert record["kind_alphas"] == result.kind_alphas and record["config"]["alpha_scope"] == "per_kind"


def test_per_kind_pass_starts_from_the_shared_alpha_and_never_rescores_a_configuration():
    # Changing attention pays more than changing MLP costs: the shared search already improves (alpha=1),
    # then the per-kind pass leaves the MLP unchanged; the classifier does not matter, so it keeps alpha=1.
    model, stats, kinds, before, score = _kind_scored_setup(mlp_penalty=0.1)
    result = search_alpha(model, stats, [1.0, 100.0], score, kinds=kinds, method="grid")
    assert result.best_alpha == 1.0
    assert result.kind_alphas == {"attention": 1.0, "mlp": None, "classifier": 1.0}
    configurations = [tuple(sorted(t["alphas"].items(), key=str)) for t in result.kind_trials]
    assert len(configurations) == len(set(configurations)) == 6  # 2 new alphas per kind, no configuration twice
    _assert_sap_project_reproduces(model, result.kind_alphas)


def test_interrupted_per_kind_pass_restores_the_original_weights():
    model = tiny_model("vit")
    stats = collect_statistics(
        model, random_examples(6), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    kinds = group_kinds(stats.groups, classifier_names(model))
    before = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 6:  # baseline + 2 shared alphas + 2 kind trials, then Ctrl-C
            raise KeyboardInterrupt
        return {"accuracy": float(len(calls))}  # every new evaluation looks better

    with pytest.raises(KeyboardInterrupt):
        search_alpha(model, stats, [1.0, 100.0], evaluate, kinds=kinds, method="grid")
    assert_identical(model, before)


def test_per_kind_with_two_rounds():
    model = tiny_model("vit")
    train, evals = random_examples(24, seed=1), random_examples(12, seed=2)
    config = SAPConfig(alphas=[1.0, 1e3], trusted_per_class=2, batch_size=8, alpha_scope="per_kind", num_rounds=2)
    result = sap_correct(model, train, evals, config, runtime=Runtime(show_progress=False))
    assert 1 <= len(result.rounds) <= 2
    for search in result.rounds:
        assert set(search.kind_alphas) == {"attention", "mlp", "classifier"}
    if len(result.rounds) == 2:  # the second round searched the grown grid
        assert result.rounds[1].alphas == [10.0, 1e4]
    assert result.final_metrics == result.rounds[-1].best_metrics


def _unimodal(rng, size):
    """A random unimodal curve on `size` points, with plateaus (repeated values) now and then."""
    peak = int(rng.integers(0, size))
    steps = rng.choice([0.0, 0.01, 0.05, 0.2], size=size)
    curve = [0.0] * size
    for i in range(peak - 1, -1, -1):
        curve[i] = curve[i + 1] - steps[i]
    for i in range(peak + 1, size):
        curve[i] = curve[i - 1] - steps[i]
    return curve


def test_bracket_returns_the_grids_choice_on_unimodal_curves_with_fewer_evaluations():
    import numpy as np

    from sap_hf.core.search import bracket_indices

    rng = np.random.default_rng(0)
    evaluations = []
    for trial in range(500):
        size = int(rng.integers(2, 16))
        curve = _unimodal(rng, size)
        known_index = int(rng.integers(0, size))
        preference = [known_index, *[i for i in range(size) if i != known_index]]
        start = None if trial % 2 else int(rng.integers(0, size))
        calls = []
        scores = bracket_indices(
            lambda i: calls.append(i) or curve[i], size, {known_index: curve[known_index]}, preference, start=start
        )
        grid_best = max(preference, key=lambda i: (curve[i], -preference.index(i)))
        bracket_best = max(scores, key=lambda i: (scores[i], -preference.index(i)))
        assert bracket_best == grid_best, (curve, known_index, start, scores)
        assert len(calls) == len(set(calls))  # no point scored twice
        evaluations.append((len(calls) + 1) / size)
    assert np.mean(evaluations) < 0.8


def test_bracket_search_matches_the_grid_per_kind_with_fewer_evaluations():
    for penalty in (100, 0.1):
        model, stats, kinds, before, score = _kind_scored_setup(mlp_penalty=penalty)
        alphas = [1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4]
        grid = search_alpha(model, stats, alphas, score, kinds=kinds, method="grid")
        grid_weights = snapshot(model)
        model.load_state_dict(before)
        bracket = search_alpha(model, stats, alphas, score, kinds=kinds)
        assert bracket.best_alpha == grid.best_alpha and bracket.kind_alphas == grid.kind_alphas
        assert len(bracket.metrics) + len(bracket.kind_trials) < len(grid.metrics) + len(grid.kind_trials)
        assert_identical(model, grid_weights)
    with pytest.raises(ValueError, match="method='golden'"):
        search_alpha(model, stats, alphas, score, method="golden")
    with pytest.raises(ValueError, match="alpha_search"):
        SAPConfig(alpha_search="golden")


def test_cached_rotation_gives_the_same_weights():
    from sap_hf.core.projection import current_weights, plan_projection, rotate_weights
    from sap_hf.core.search import eigenbases

    model = tiny_model("vit")
    stats = collect_statistics(
        model, random_examples(6), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    originals, bases = current_weights(model, stats.target_modules), eigenbases(stats)
    rotated = rotate_weights(originals, stats.groups, bases)
    for alpha in (1.0, 50.0):
        plain, cached = (
            plan_projection(originals, stats.groups, bases, alpha),
            plan_projection(originals, stats.groups, bases, alpha, rotated),
        )
        assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
        for name, weight in plain.items():  # and it is W P with P = U diag(lambda) U^T
            group = next(g for g in stats.groups if name in g.members)
            from sap_hf.core.projection import project_weight, projection_matrix

            torch.testing.assert_close(
                weight, project_weight(originals[name], projection_matrix(bases[group.name], alpha))
            )


def test_map_style_selection_reads_by_index_and_keeps_no_examples():
    data = random_examples(12)
    selection = select_trusted(tiny_model("vit"), MapStyle(data), 2, runtime=Runtime(show_progress=False))
    assert selection.examples is None
    assert (
        selection.indices == select_trusted(tiny_model("vit"), data, 2, runtime=Runtime(show_progress=False)).indices
    )


def test_a_loss_metric_is_minimised_unless_told_otherwise():
    """metric='loss' follows TrainingArguments' rule for metric_for_best_model (it was maximised: the worst alpha
    won); greater_is_better= still decides when given."""
    from sap_hf.core.search import maximises

    assert maximises("accuracy") and not maximises("loss") and not maximises("eval_loss") and maximises("loss", True)
    model = tiny_model("vit", num_labels=3)
    before = snapshot(model)

    def loss_of(candidate: torch.nn.Module) -> dict[str, float]:
        unchanged = all(torch.equal(t, before[n]) for n, t in candidate.state_dict().items())
        return {"loss": 1.0 if unchanged else 2.0}  # every projection makes it worse

    config = SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=4)
    result = sap_correct(model, random_examples(12), evaluate_fn=loss_of, metric="loss", config=config)
    assert not result.changed and result.final_metrics["loss"] == 1.0
    assert_identical(model, before)
    result = sap_correct(model, random_examples(12), evaluate_fn=loss_of, metric="loss", greater_is_better=True)
    assert result.changed and result.final_metrics["loss"] == 2.0


def test_a_selection_model_the_rule_would_ignore_is_refused_naming_the_rule():
    model = tiny_model("vit", num_labels=3)
    with pytest.raises(ValueError, match="rule='early_loss' only; rule='shift_loss'"):
        select_trusted(model, random_examples(12), 2, selection_model=tiny_model("vit", num_labels=3))
    config = SAPConfig(selection_rule="loss", trusted_per_class=2, batch_size=4)
    with pytest.raises(ValueError, match="rule='early_loss' only; rule='loss'"):
        sap_correct(model, random_examples(12), random_examples(6), config, selection_model=model)
    early = select_trusted(model, random_examples(12), 2, rule="early_loss", selection_model=model)
    assert early.indices == select_trusted(model, random_examples(12), 2, rule="loss").indices


def test_sap_project_refuses_a_bool_alpha_before_any_weight_changes():
    """`alpha=True` was taken as alpha=1 (the strongest shrinkage); a string is read as a number, as YAML gives one."""
    model = tiny_model("vit", num_labels=3)
    stats = collect_statistics(model, random_examples(6), find_target_modules(model), runtime=Runtime(batch_size=6))
    before = snapshot(model)
    with pytest.raises(ValueError, match="alpha=True is not a number"):
        sap_project(model, None, alpha=True, stats=stats)
    assert_identical(model, before)
    sap_project(model, None, alpha="1e4", stats=stats)
    with pytest.raises(AssertionError):
        assert_identical(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_names="classifier"), "target_names='classifier' is invalid: give a list"),  # was read per letter
        (dict(target_names=[]), r"target_names=\[\] is invalid"),  # was an empty ActivationStats
        (dict(target_names=["classifer"]), r"\['classifer'\] is invalid: not nn.Linear layers"),  # was a KeyError
        (dict(target_names=["classifier"], accumulation_dtype="fp64"), "choose one of"),  # was an AttributeError
    ],
)
def test_collect_statistics_names_a_bad_target_list_or_dtype(kwargs, message):
    with pytest.raises(ValueError, match=message):
        collect_statistics(
            tiny_model("vit", num_labels=3), random_examples(4), runtime=Runtime(batch_size=4), **kwargs
        )
