"""Bad input raises a clear error before any weight changes; faults never cost the user their model."""

import math

import pytest
import torch
from helpers import assert_identical, random_examples, snapshot

from sap_hf import SAPConfig, collect_statistics, sap_correct, sap_project, select_trusted
from sap_hf import api as api_module
from sap_hf.core.targets import find_target_modules
from sap_hf.models import tiny_model
from sap_hf.runtime.passes import Runtime


@pytest.fixture
def model():
    return tiny_model("vit", num_labels=3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("alphas", [], "alphas"),
        ("alphas", [0.5], "alphas"),
        ("alphas", [float("nan")], "alphas"),
        ("alphas", ["big"], "alphas"),
        ("trusted_per_class", 0, "trusted_per_class"),
        ("trusted_per_class", -3, "trusted_per_class"),
        ("num_rounds", 0, "num_rounds"),
        ("alpha_growth", 0.5, "alpha_growth"),
        ("max_tokens_per_sample", 0, "max_tokens_per_sample"),
        ("accumulation_dtype", "float16", "accumulation_dtype"),
        ("selection_rule", "magic", "selection_rule"),
        ("target_modules", [1, 2], "target_modules"),
    ],
)
def test_config_errors_name_field_value_and_fix(field, value, match):
    with pytest.raises(ValueError, match=match) as info:
        SAPConfig(**{field: value})
    assert repr(value)[:4] in str(info.value) or field == "alphas"


@pytest.mark.parametrize("alpha", [0.5, float("nan"), math.inf, -2])
def test_bad_alpha_leaves_model_identical(model, alpha):
    before = snapshot(model)
    with pytest.raises(ValueError, match="alpha"):
        sap_project(model, random_examples(4), alpha=alpha)
    assert_identical(model, before)


BAD_DATA = [
    ("empty", [], "empty"),
    ("no pixel_values", [{"image": [0], "labels": 0}] * 3, "pixel_values"),
    ("wrong channels", [{"pixel_values": torch.randn(1, 16, 16), "labels": 0}] * 3, "num_channels"),
    ("wrong size", [{"pixel_values": torch.randn(3, 20, 20), "labels": 0}] * 3, "image_size"),
    ("non-finite", [{"pixel_values": torch.full((3, 16, 16), float("inf")), "labels": 0}] * 3, "[Nn]on-finite|NaN"),
]


@pytest.mark.parametrize("name, data, match", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_trusted_data_leaves_model_identical(model, name, data, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sap_project(model, data, alpha=10.0)
    assert_identical(model, before)


def test_no_matching_module_lists_linear_layers(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="vit.layers.0.mlp.fc1"):
        sap_project(
            model, random_examples(4), alpha=10.0, config=SAPConfig(target_modules=["nope"], project_classifier=False)
        )
    assert_identical(model, before)


def test_target_typo_with_the_default_head_raises_before_any_data_pass(model):
    """SAPConfig(target_modules=["qkv_typo"]) used to project the classifier alone and report success."""
    before = snapshot(model)
    for call in (
        lambda c: sap_project(model, random_examples(4), alpha=10.0, config=c),
        lambda c: sap_correct(
            model, random_examples(6), random_examples(6), config=c, runtime=Runtime(show_progress=False)
        ),
    ):
        with pytest.raises(ValueError, match=r"No backbone nn.Linear layer matches target_modules=\['qkv_typo'\]"):
            call(SAPConfig(target_modules=["qkv_typo"]))
    assert_identical(model, before)


def test_selection_errors(model):
    data = random_examples(9)
    with pytest.raises(ValueError, match=r"label 7, outside the model's 3 classes"):
        select_trusted(
            model,
            data + [{"pixel_values": torch.randn(3, 16, 16), "labels": 7}],
            2,
            runtime=Runtime(show_progress=False),
        )
    with pytest.raises(ValueError, match=r"Classes \[2\] have no usable sample"):
        select_trusted(model, [e for e in data if e["labels"] != 2], 2, runtime=Runtime(show_progress=False))
    with pytest.raises(ValueError, match="no 'labels'"):
        select_trusted(
            model, [{"pixel_values": e["pixel_values"]} for e in data], 2, runtime=Runtime(show_progress=False)
        )
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="per_class"):
            select_trusted(model, data, bad, runtime=Runtime(show_progress=False))


def test_stream_keys_identify_samples_and_bad_keys_are_named(model):
    data = [dict(e, key=f"img{i}.jpg") for i, e in enumerate(random_examples(9))]
    selection = select_trusted(model, data, 2, runtime=Runtime(show_progress=False))
    assert all(isinstance(k, str) for k in selection.indices) and len(selection) == 6
    assert [e["key"] for e in selection.examples] == selection.indices  # the raw trusted examples, kept
    keyless = select_trusted(model, random_examples(9), 2, runtime=Runtime(show_progress=False))
    assert keyless.indices == sorted(keyless.indices) and all(isinstance(i, int) for i in keyless.indices)
    twice = [dict(e) for e in data]
    twice[7]["key"] = "img2.jpg"
    with pytest.raises(ValueError, match=r"key 'img2.jpg' identifies two examples"):
        select_trusted(model, twice, 2, runtime=Runtime(show_progress=False))
    mixed = [dict(e) for e in data]
    del mixed[4]["key"]
    with pytest.raises(ValueError, match=r"Example 4 of the stream lacks a 'key'"):
        select_trusted(model, mixed, 2, runtime=Runtime(show_progress=False))
    before = snapshot(model)
    with pytest.raises(ValueError, match="img2.jpg"):
        sap_correct(
            model,
            twice,
            random_examples(6, seed=2),
            SAPConfig(alphas=[10.0], trusted_per_class=2),
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)


def test_eval_set_without_labels_is_rejected_before_any_change(model):
    before = snapshot(model)
    unlabeled = [{"pixel_values": e["pixel_values"]} for e in random_examples(6)]
    with pytest.raises(ValueError, match="labels"):
        sap_correct(
            model, random_examples(12), unlabeled, SAPConfig(trusted_per_class=2), runtime=Runtime(show_progress=False)
        )
    assert_identical(model, before)


def test_failure_while_writing_third_layer_restores_every_layer(model, monkeypatch):
    real_plan = api_module.plan_projection

    def plan_with_broken_third(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        third = list(plan)[2]
        plan[third] = torch.empty(plan[third].shape, device="meta")  # copying from meta raises mid-write
        return plan

    monkeypatch.setattr(api_module, "plan_projection", plan_with_broken_third)
    before = snapshot(model)
    with pytest.raises((NotImplementedError, RuntimeError)):
        sap_project(model, random_examples(4), alpha=10.0)
    assert_identical(model, before)


def test_interrupted_correct_resumes_from_saved_statistics(model, tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    train, evals = random_examples(12, seed=1), random_examples(6, seed=2)
    config = SAPConfig(alphas=[1.0, 10.0, 100.0], trusted_per_class=2)
    calls = []

    def interrupted(m):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"accuracy": float(len(calls))}

    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        sap_correct(
            model,
            train,
            config=config,
            evaluate_fn=interrupted,
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)
    assert stats_path.is_file()

    class NoDataPass(list):
        def __iter__(self):
            raise AssertionError("the rerun must not read the data")

    result = sap_correct(
        model, NoDataPass(train), evals, config, stats_path=stats_path, runtime=Runtime(show_progress=False)
    )
    assert result.rounds[0].alphas == [1.0, 10.0, 100.0]


class _NoDataPass(list):
    def __iter__(self):
        raise AssertionError("a bad stats_path must fail before any data is read")

    def __getitem__(self, index):
        raise AssertionError("a bad stats_path must fail before any data is read")


def _bad_stats_paths(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    wrong_format = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(wrong_format), metadata={"format": "something else"})
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    return [
        (folder, r"stats_path='.*a_folder' is a directory.*a_folder/sap_stats.safetensors"),
        (
            garbage,
            r"stats_path='.*garbage.safetensors' is not a readable SAP statistics file \(SafetensorError.*Delete it",
        ),
        (
            wrong_format,
            r"stats_path='.*other.safetensors' is not a readable SAP statistics file \(format='something else'",
        ),
        (in_the_way / "stats.safetensors", r"stats_path='.*a_file/stats.safetensors' cannot be written"),
    ]


def test_bad_stats_path_fails_before_any_data_is_read(model, tmp_path):
    before = snapshot(model)
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    for path, match in _bad_stats_paths(tmp_path):
        with pytest.raises(ValueError, match=match):
            sap_correct(
                model,
                _NoDataPass(random_examples(6)),
                config=config,
                evaluate_fn=lambda m: {"accuracy": 0.0},
                stats_path=path,
                runtime=Runtime(show_progress=False),
            )
    assert_identical(model, before)


def test_truncated_statistics_file_names_stats_path(model, tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    collect_statistics(
        model, random_examples(4), find_target_modules(model), runtime=Runtime(show_progress=False)
    ).save(stats_path)
    stats_path.write_bytes(stats_path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"stats_path=.* is not a readable SAP statistics file.*Delete it"):
        sap_correct(
            model,
            random_examples(6),
            config=config,
            evaluate_fn=lambda m: {"accuracy": 0.0},
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )


def test_same_seed_same_selection_and_weights():
    outcomes = []
    for _ in range(2):
        model = tiny_model("vit", num_labels=3, seed=3)
        selection = select_trusted(model, random_examples(18, seed=4), 2, runtime=Runtime(show_progress=False))
        sap_project(model, [random_examples(18, seed=4)[i] for i in selection.indices], alpha=10.0)
        outcomes.append((selection.indices, snapshot(model)))
    assert outcomes[0][0] == outcomes[1][0]
    assert_identical(tiny_model("vit", num_labels=3, seed=3), snapshot(tiny_model("vit", num_labels=3, seed=3)))
    for name, tensor in outcomes[0][1].items():
        assert torch.equal(tensor, outcomes[1][1][name]), name


def test_non_finite_gram_rejected_before_write(model):
    stats = collect_statistics(
        model, random_examples(4), find_target_modules(model), runtime=Runtime(show_progress=False)
    )
    name = stats.groups[0].name
    stats.grams[name] = stats.grams[name].clone()
    stats.grams[name][0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        sap_project(model, None, alpha=10.0, stats=stats)
    assert_identical(model, before)


def test_tf32_setting_is_respected_and_restored(model):
    from sap_hf.runtime.modeling import inference_mode

    matmul = torch.backends.cuda.matmul
    attribute = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    previous = getattr(matmul, attribute)
    setattr(matmul, attribute, "tf32" if attribute == "fp32_precision" else True)  # as transformers' enable_tf32 does
    try:
        with inference_mode(model):
            assert getattr(matmul, attribute) in ("ieee", False)
        assert getattr(matmul, attribute) in ("tf32", True)
    finally:
        setattr(matmul, attribute, previous)


def test_stale_statistics_are_rejected(tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    first = tiny_model("vit", num_labels=3, seed=0)
    sap_correct(
        first,
        random_examples(12),
        random_examples(6, seed=2),
        config,
        stats_path=stats_path,
        runtime=Runtime(show_progress=False),
    )
    other = tiny_model("vit", num_labels=3, seed=1)
    before = snapshot(other)
    with pytest.raises(ValueError, match="stats_path"):
        sap_correct(
            other,
            random_examples(12),
            random_examples(6, seed=2),
            config,
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    smaller = tiny_model("vit", num_labels=3, hidden_size=16)
    with pytest.raises(ValueError, match="another model"):
        sap_correct(
            smaller,
            random_examples(12),
            random_examples(6, seed=2),
            config,
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    assert_identical(other, before)


def test_resumed_run_keeps_the_trusted_record(tmp_path):
    stats_path = tmp_path / "stats.safetensors"
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    model = tiny_model("vit", num_labels=3)
    train, evals = random_examples(12), random_examples(6, seed=2)
    first = sap_correct(model, train, evals, config, stats_path=stats_path, runtime=Runtime(show_progress=False))
    if first.changed:
        model = tiny_model("vit", num_labels=3)  # the statistics belong to the uncorrected weights
    again = sap_correct(model, train, evals, config, stats_path=stats_path, runtime=Runtime(show_progress=False))
    assert again.num_trusted == first.num_trusted == 6
    assert again.trusted_per_class == first.trusted_per_class == {0: 2, 1: 2, 2: 2}


def test_failure_in_a_later_round_restores_the_original_weights(model, monkeypatch):
    real_collect = api_module.collect_statistics
    calls = []

    def collect_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk gone in round 2")
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(api_module, "collect_statistics", collect_then_fail)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="round 2"):
        sap_project(model, random_examples(6), alpha=10.0, config=SAPConfig(num_rounds=2))
    assert len(calls) == 2
    assert_identical(model, before)


def test_single_alpha_from_yaml_is_one_value():
    assert SAPConfig(alphas="1e4").alphas == [1e4]
    assert SAPConfig(alphas=100).alphas == [100.0]
