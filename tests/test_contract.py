"""The input contract, tried with the objects users really hand over.

Each case was observed going wrong before the one runtime existed: a shuffled DataLoader paired
one selection with other statistics, a DataParallel model lost `project_classifier=False`, a NaN
image broke a class, -100 labels halved the accuracy, strings/floats/regression heads failed with
raw errors, a generator was "empty" on the second read.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import assert_identical, random_examples, snapshot
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTModel

from sap_hf import Runtime, SAPConfig, evaluate_accuracy, sap_correct, sap_project, select_trusted
from sap_hf.models import tiny_model
from sap_hf.runtime.contract import LoaderData, as_pass_data, class_labels
from sap_hf.runtime.modeling import unwrap_model
from sap_hf.trainer import SAPTrainer, accuracy_metrics


QUIET = Runtime(batch_size=4, show_progress=False)


def _config(**overrides):
    values = dict(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=4, alpha_search="grid")
    values.update(overrides)
    return SAPConfig(**values)


def _corrected(model, train, val, **kwargs):
    result = sap_correct(model, train, val, _config(), runtime=Runtime(show_progress=False), **kwargs)
    return result, snapshot(model)


# ------------------------------------------------------------------------------------------------
# Data forms: read twice, the same examples in the same order
# ------------------------------------------------------------------------------------------------


def test_a_shuffled_dataloader_gives_the_same_correction_as_its_dataset():
    train, val = random_examples(18, seed=1), random_examples(9, seed=2)
    expected, weights = _corrected(tiny_model("vit", num_labels=3), train, val)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(train, batch_size=5, shuffle=True)
    got, loader_weights = _corrected(tiny_model("vit", num_labels=3), loader, val)
    assert got.trusted_indices == expected.trusted_indices
    assert got.final_metrics == expected.final_metrics
    for name, tensor in weights.items():
        torch.testing.assert_close(loader_weights[name], tensor, rtol=0, atol=1e-6)


def test_the_trainers_own_shuffled_dataloader_selects_by_dataset_position(tmp_path):
    train, val = random_examples(16, seed=3), random_examples(8, seed=4)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = SAPTrainer(model=tiny_model("vit", num_labels=3), args=args, train_dataset=train, eval_dataset=val)
    loader = trainer.get_train_dataloader()  # shuffled, reshuffled on every iteration
    model = trainer.model
    by_loader = select_trusted(model, loader, 2, runtime=QUIET)
    by_dataset = select_trusted(model, train, 2, runtime=QUIET)
    assert by_loader.indices == by_dataset.indices and by_loader.losses == pytest.approx(by_dataset.losses)


def test_a_sampler_that_draws_a_subset_reads_that_subset_in_index_order():
    train = random_examples(12, seed=5)
    loader = torch.utils.data.DataLoader(
        train, batch_size=3, sampler=torch.utils.data.SubsetRandomSampler([9, 1, 5, 4, 11, 0])
    )
    view = as_pass_data(loader, "train_data")
    assert isinstance(view, LoaderData) and view.indices == [0, 1, 4, 5, 9, 11] and len(view) == 6
    model = tiny_model("vit", num_labels=3)
    chosen = select_trusted(model, loader, 1, runtime=QUIET)
    assert set(chosen.indices) <= {0, 1, 4, 5, 9, 11}  # identities are indices of loader.dataset
    drawn = [0, 1, 4, 5, 9, 11]
    direct = select_trusted(model, [train[i] for i in drawn], 1, runtime=QUIET)
    assert chosen.indices == [drawn[i] for i in direct.indices]
    with pytest.raises(ValueError, match="trusted_indices hold 2, which the DataLoader does not draw"):
        view.select([1, 2])


def test_a_generator_is_read_once_and_kept(caplog):
    model = tiny_model("vit", num_labels=3)
    val = random_examples(9, seed=2)
    expected = evaluate_accuracy(model, val, runtime=QUIET)
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        result = sap_correct(
            model, random_examples(12, seed=1), (e for e in val), _config(), runtime=Runtime(show_progress=False)
        )
    assert result.baseline_metrics["accuracy"] == expected["accuracy"]
    assert len(result.rounds[0].metrics) == 2  # every alpha saw the whole eval set, not an exhausted generator
    assert "one-shot iterator" in caplog.text


def test_a_dict_of_eval_sets_is_refused_naming_the_keys():
    model = tiny_model("vit", num_labels=3)
    before = snapshot(model)
    evals = {"validation": random_examples(6), "test": random_examples(6)}
    with pytest.raises(
        ValueError, match=r"eval_data is a dict of 2 entries \('validation', 'test'\).*eval_data=data\['validation'\]"
    ):
        sap_correct(model, random_examples(9), evals, _config(), runtime=Runtime(show_progress=False))
    assert_identical(model, before)


def test_trusted_indices_outside_the_data_are_an_error_not_dropped():
    model = tiny_model("vit", num_labels=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="trusted_indices hold 40, outside the 9 examples"):
        sap_correct(
            model,
            random_examples(9),
            random_examples(6),
            _config(),
            trusted_indices=[0, 1, 40],
            runtime=Runtime(show_progress=False),
        )
    import datasets

    rows = [{"pixel_values": e["pixel_values"].tolist(), "labels": e["labels"]} for e in random_examples(9)]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset().with_format("torch")  # counted after the pass
    with pytest.raises(ValueError, match="name 3 samples but the data holds only 2"):
        sap_correct(
            model,
            stream,
            random_examples(6),
            _config(),
            trusted_indices=[0, 1, 40],
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)


# ------------------------------------------------------------------------------------------------
# Model wrappers and kinds
# ------------------------------------------------------------------------------------------------


def test_dataparallel_keeps_project_classifier_false_and_corrects_like_the_bare_model():
    train, val = random_examples(12, seed=1), random_examples(6, seed=2)
    config = _config(project_classifier=False)
    bare = tiny_model("vit", num_labels=3)
    expected = sap_correct(bare, train, val, config, runtime=Runtime(show_progress=False))
    wrapped = torch.nn.DataParallel(tiny_model("vit", num_labels=3))
    got = sap_correct(wrapped, train, val, config, runtime=Runtime(show_progress=False))
    assert "classifier" not in got.target_modules and got.target_modules == expected.target_modules
    assert got.trusted_indices == expected.trusted_indices
    assert_identical(wrapped.module, snapshot(bare))
    sap_project(torch.nn.DataParallel(tiny_model("vit", num_labels=3)), random_examples(6), 100.0, config)


def test_unwrap_peels_dataparallel_and_torch_compile():
    model = tiny_model("vit", num_labels=3)
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model  # compile is lazy: nothing is compiled here


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tiny_model("vit", num_labels=1), "num_labels=1: a one-output head is a regression model"),
        (lambda: _with_problem("multi_label_classification"), "multi_label_classification model"),
        (lambda: _with_problem("regression"), "regression model"),
        (
            lambda: ViTModel(
                ViTConfig(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=64,
                )
            ),
            "has no classification head",
        ),
        (lambda: _on_meta(), "meta device"),
    ],
)
def test_models_that_are_not_single_label_classifiers_are_refused_before_any_pass(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        sap_correct(model, random_examples(6), random_examples(6), _config(), runtime=Runtime(show_progress=False))


def _with_problem(problem_type):
    model = tiny_model("vit", num_labels=3)
    model.config.problem_type = problem_type
    return model


def _on_meta():
    with torch.device("meta"):
        return ViTForImageClassification(
            ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        )


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def test_minus_100_labels_are_ignored_by_evaluation_selection_and_the_trainer_metric():
    model = tiny_model("vit", num_labels=3)
    val = random_examples(9, seed=2)
    expected = evaluate_accuracy(model, val, runtime=QUIET)
    padded = val + [dict(e, labels=-100) for e in random_examples(9, seed=7)]
    got = evaluate_accuracy(model, padded, runtime=QUIET)
    assert got == expected  # same accuracy over the same 9 labelled samples
    train = random_examples(12, seed=1)
    ignored = train + [dict(e, labels=-100) for e in random_examples(6, seed=8)]
    assert (
        select_trusted(model, ignored, 2, runtime=QUIET).indices
        == select_trusted(model, train, 2, runtime=QUIET).indices
    )
    from transformers import EvalPrediction

    logits = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert (
        accuracy_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, -100, -100])))["accuracy"] == 1.0
    )


def test_labels_outside_the_classes_are_an_error_naming_the_sample_and_value():
    model = tiny_model("vit", num_labels=3)
    val = random_examples(6, seed=2)
    val[4] = dict(val[4], labels=7)
    with pytest.raises(ValueError, match=r"eval data: sample 4 has label 7, outside the model's 3 classes"):
        evaluate_accuracy(model, val, runtime=QUIET)


def test_int_like_labels_are_converted_and_non_class_labels_refused():
    model = tiny_model("vit", num_labels=3)
    train = random_examples(12, seed=1)
    expected = select_trusted(model, train, 2, runtime=QUIET)
    for convert in (float, np.int64, np.float32):
        got = select_trusted(model, [dict(e, labels=convert(e["labels"])) for e in train], 2, runtime=QUIET)
        assert got.indices == expected.indices
    names = ["shirt", "shoe", "bag"]
    with pytest.raises(ValueError, match="sample 0 has the label 'shirt', a string.*label2id"):
        select_trusted(model, [dict(e, labels=names[e["labels"]]) for e in train], 2, runtime=QUIET)
    with pytest.raises(ValueError, match="has label 0.5, not a whole class id"):
        select_trusted(model, [dict(e, labels=0.5) for e in train], 2, runtime=QUIET)
    with pytest.raises(ValueError, match="one class id per sample"):
        class_labels({"labels": torch.zeros(4, 3)}, [0, 1, 2, 3], 3)


def test_a_nan_image_is_excluded_and_counted_never_corrupting_its_class(caplog):
    model = tiny_model("vit", num_labels=3)
    train = random_examples(15, seed=1)
    clean = select_trusted(model, train, 2, runtime=QUIET)
    poisoned = [dict(e) for e in train]
    for i in (0, 3):  # two NaN images of class 0
        poisoned[i]["pixel_values"] = torch.full_like(poisoned[i]["pixel_values"], float("nan"))
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        got = select_trusted(model, poisoned, 2, runtime=QUIET)
    assert "excluded 2 sample(s) with non-finite" in caplog.text
    assert got.per_class == {0: 2, 1: 2, 2: 2}
    assert not {0, 3} & set(got.indices)
    best_finite = [i for i in sorted(clean.indices) if i not in (0, 3)]
    assert set(best_finite) <= set(got.indices)  # the finite lowest-loss samples are kept


def test_phases_are_timed_through_the_public_hook():
    seen = []
    result = sap_correct(
        tiny_model("vit", num_labels=3),
        random_examples(12, seed=1),
        random_examples(6, seed=2),
        _config(alpha_scope="shared"),  # one evaluation per alpha (per_kind adds its trials)
        Runtime(show_progress=False, on_phase=lambda phase, seconds: seen.append((phase, seconds))),
    )
    phases = [phase for phase, _ in seen]
    assert phases[:3] == ["selection", "statistics", "eigh"] and phases[-2:] == ["write", "search"]
    assert phases.count("evaluation") == 1 + len(result.rounds[0].metrics)  # the unchanged model, then each alpha
    assert set(result.timings) == set(phases) and all(seconds >= 0 for _, seconds in seen)
    assert result.timings["evaluation"] == pytest.approx(sum(s for p, s in seen if p == "evaluation"))


def test_the_run_is_one_runtime_and_the_former_keywords_still_make_it(caplog):
    """`sap_correct(data, config, runtime)`: the Runtime's batch size is config.batch_size's, its timings are this
    call's; `accelerator=`/`collate_fn=`/`show_progress=`/`on_phase=` still work (a deprecation warning), alike."""
    from transformers import default_data_collator

    train, val, config = random_examples(12, seed=1), random_examples(6, seed=2), _config(alpha_scope="shared")
    seen, sizes = [], []

    def collate(examples):
        sizes.append(len(examples))
        return default_data_collator(examples)

    runtime = Runtime(batch_size=5, collate_fn=collate, show_progress=False, on_phase=lambda p, s: seen.append(p))
    sap_correct(tiny_model("vit", num_labels=3), train, val, config, runtime, trusted_indices=[0, 1, 2, 3, 4, 5])
    assert max(sizes) == config.batch_size  # not the Runtime's 5
    before = len(seen)
    again = sap_correct(tiny_model("vit", num_labels=3), train, val, config, runtime)
    assert "selection" in again.timings and runtime.timings == {}
    assert set(again.timings) == set(seen[before:])  # this call's phases only
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        legacy = sap_correct(tiny_model("vit", num_labels=3), train, val, config, show_progress=False)
        collated = sap_correct(tiny_model("vit", num_labels=3), train, val, config, collate_fn=collate)
    assert "deprecated" in caplog.text and "runtime=sap_hf.Runtime(" in caplog.text
    for other in (legacy, collated):
        assert other.trusted_indices == again.trusted_indices and other.alphas == again.alphas
        assert other.final_metrics == again.final_metrics
    with pytest.raises(TypeError, match="set those in the Runtime"):
        sap_correct(tiny_model("vit", num_labels=3), train, val, config, QUIET, show_progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_size'"):
        sap_correct(tiny_model("vit", num_labels=3), train, val, config, batch_size=4)


def test_sap_project_takes_the_run_as_sap_correct_does(caplog):
    """`sap_project(model, trusted, alpha, config, runtime)`: the same weights as the former `collate_fn=` keyword."""
    from transformers import default_data_collator

    trusted, config, sizes = random_examples(9, seed=3), _config(batch_size=4), []

    def collate(examples):
        sizes.append(len(examples))
        return default_data_collator(examples)

    new = sap_project(tiny_model("vit", num_labels=3), trusted, 10.0, config, Runtime(collate_fn=collate))
    assert sizes and max(sizes) == 4
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        old = sap_project(tiny_model("vit", num_labels=3), trusted, 10.0, config, collate_fn=collate)
    assert "sap_project(accelerator=, collate_fn=" in caplog.text
    for name, tensor in new.state_dict().items():
        assert torch.equal(tensor, old.state_dict()[name]), name
    with pytest.raises(TypeError, match="sap_project\\(\\) got runtime= and collate_fn="):
        sap_project(tiny_model("vit", num_labels=3), trusted, 10.0, config, QUIET, collate_fn=collate)


def test_string_labels_under_either_key_are_named_before_the_collator_fails():
    model = tiny_model("vit", num_labels=3)
    names = ["shirt", "shoe", "bag"]
    for key in ("label", "labels"):
        data = [{"pixel_values": e["pixel_values"], key: names[e["labels"]]} for e in random_examples(6)]
        with pytest.raises(ValueError, match="has the label 'shirt', a string"):
            select_trusted(model, data, 1, runtime=QUIET)


def test_runtime_batch_size_is_checked():
    with pytest.raises(ValueError, match="Runtime.batch_size=0 is invalid"):
        Runtime(batch_size=0)


def test_a_random_draw_sampler_reads_the_whole_dataset_with_a_warning(caplog):
    train = random_examples(9, seed=5)
    weights = torch.ones(9)
    loader = torch.utils.data.DataLoader(
        train, batch_size=3, sampler=torch.utils.data.WeightedRandomSampler(weights, 4)
    )
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        view = as_pass_data(loader, "train_data")
    assert view.indices is None and len(view) == 9 and "WeightedRandomSampler" in caplog.text


def test_refine_accepts_the_audit_of_a_subset_sampling_loader():
    from sap_hf import RefineConfig, audit_labels, refine

    model = tiny_model("vit", num_labels=3)
    train = random_examples(12, seed=1)
    loader = torch.utils.data.DataLoader(
        train, batch_size=4, sampler=torch.utils.data.SubsetRandomSampler(range(3, 12))
    )
    view = as_pass_data(loader, "train_data")
    audit = audit_labels(model, view, filter_by="predicted_neq_given", runtime=QUIET)
    assert audit.indices.tolist() == list(range(3, 12))  # indices of loader.dataset
    result = refine(
        model,
        view,
        audit,
        lambda m: evaluate_accuracy(m, random_examples(6, seed=2), runtime=QUIET),
        RefineConfig(learning_rates=[1e-3], epochs=[1], mode="remove"),
        runtime=QUIET,
    )
    assert result.examples["remove"]["kept"] + result.examples["remove"]["removed"] == 9


def test_a_default_data_collator_instance_batches_like_the_function_beside_a_leftover_image_column():
    """The image-classification guide builds `DefaultDataCollator()`; with the PIL `image` column `with_transform`
    leaves beside `pixel_values`, the instance failed inside torch.tensor where the function worked."""
    from PIL import Image
    from transformers import DefaultDataCollator, default_data_collator

    model = tiny_model("vit", num_labels=3)
    data = [dict(e, image=Image.new("RGB", (4, 4))) for e in random_examples(9)]
    chosen = [
        select_trusted(model, data, 1, runtime=Runtime(collate_fn=collate, show_progress=False)).indices
        for collate in (default_data_collator, DefaultDataCollator())
    ]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 3
