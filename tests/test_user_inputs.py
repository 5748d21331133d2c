"""Ordinary user inputs that once gave silent wrong results or unhelpful errors (issue 26, item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sap_hf.data import ImageTransform


def _oriented_jpeg(path) -> bytes:
    """A 6x4 JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6), written to `path`."""
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[:, :3] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=100)
    return path.read_bytes()


def test_image_transform_decodes_like_datasets_exif_orientation(tmp_path):
    import datasets

    path = tmp_path / "photo.jpg"
    data = _oriented_jpeg(path)
    reference = datasets.Image().decode_example({"path": str(path), "bytes": None})
    assert reference.size == (4, 6)  # datasets applies the EXIF orientation
    transform = ImageTransform(image_size=(6, 4), num_channels=3)
    expected = transform({"image": [reference], "label": [0]})["pixel_values"][0]
    for raw in ({"path": str(path), "bytes": None}, {"path": None, "bytes": data}):
        got = transform({"image": [raw], "label": [0]})["pixel_values"][0]
        assert torch.allclose(got, expected), raw.keys()


# --- 1. the statistics cache is matched on its options, not on the weights alone -----------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": ["q_proj", "k_proj", "v_proj"]},
        {"exclude_modules": ["fc2"]},
        {"project_classifier": False},
        {"max_tokens_per_sample": 2},
        {"accumulation_dtype": "float64"},
        {"trusted_per_class": 1},
        {"selection_rule": "loss"},
    ],
)
def test_stats_path_with_other_options_is_refused_before_any_weight_changes(tmp_path, change):
    from helpers import assert_identical, random_examples, snapshot

    from sap_hf import Runtime, SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    stats_path = tmp_path / "stats.safetensors"
    train, evals = random_examples(12), random_examples(6, seed=2)
    base = dict(alphas=[10.0], trusted_per_class=2)
    sap_correct(
        tiny_model("vit", num_labels=3),
        train,
        evals,
        SAPConfig(**base),
        stats_path=stats_path,
        runtime=Runtime(show_progress=False),
    )
    model = tiny_model("vit", num_labels=3)  # the same weights the statistics were collected on
    before = snapshot(model)
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"stats_path=.*{name}=.*this run has {name}=.*Delete"):
        sap_correct(
            model,
            train,
            evals,
            SAPConfig(**{**base, **change}),
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)
    again = sap_correct(
        model, train, evals, SAPConfig(**base), stats_path=stats_path, runtime=Runtime(show_progress=False)
    )  # the same options: reused
    assert again.num_trusted == 6


def test_stats_path_with_other_trusted_indices_is_refused(tmp_path):
    from helpers import random_examples

    from sap_hf import Runtime, SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    stats_path = tmp_path / "stats.safetensors"
    train, evals = random_examples(12), random_examples(6, seed=2)
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    first = sap_correct(
        tiny_model("vit", num_labels=3),
        train,
        evals,
        config,
        trusted_indices=[0, 1, 2],
        stats_path=stats_path,
        runtime=Runtime(show_progress=False),
    )
    with pytest.raises(ValueError, match=r"stats_path=.*trusted_indices"):
        sap_correct(
            tiny_model("vit", num_labels=3),
            train,
            evals,
            config,
            trusted_indices=[3, 4, 5],
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    with pytest.raises(ValueError, match=r"stats_path=.*given trusted_indices.*selects"):
        sap_correct(
            tiny_model("vit", num_labels=3),
            train,
            evals,
            config,
            stats_path=stats_path,
            runtime=Runtime(show_progress=False),
        )
    again = sap_correct(
        tiny_model("vit", num_labels=3),
        train,
        evals,
        config,
        trusted_indices=first.trusted_indices,
        stats_path=stats_path,
        runtime=Runtime(show_progress=False),
    )
    assert again.trusted_indices == [0, 1, 2]


def test_trusted_indices_as_a_tensor_or_array_name_the_same_samples_as_a_list(tmp_path):
    """A tensor's elements are 0-d tensors: a stream matched none of them ('The trusted data is empty') and a cache of
    the same samples was refused as other samples. Arrays and tensors now name what the list names."""
    import datasets
    from helpers import random_examples

    from sap_hf import Runtime, SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    train, evals = random_examples(12), random_examples(6, seed=2)
    rows = [{"pixel_values": example["pixel_values"].numpy(), "labels": example["labels"]} for example in train]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    config, runtime = SAPConfig(alphas=[10.0], trusted_per_class=2), Runtime(show_progress=False)
    for data, given in (
        (stream, torch.tensor([0, 1, 2])),
        (train, np.array([0, 1, 2])),
        (train, torch.tensor([0, 1, 2])),
    ):
        for _ in range(2):  # the second run reads the cache the first wrote
            result = sap_correct(
                tiny_model("vit", num_labels=3),
                data,
                evals,
                config,
                runtime,
                trusted_indices=given,
                stats_path=tmp_path / f"{type(data).__name__}-{type(given).__name__}.safetensors",
            )
            assert result.trusted_indices == [0, 1, 2] and result.num_trusted == 3


# --- 2. the CLI: the model's class names against the data's ---------------------------------------------------


def _named_image_folder(tmp_path, names=("cat", "dog", "fox")):
    """A local `datasets` folder (train/validation/test parquet) of 6x6 RGB images, labels a ClassLabel of `names`."""
    import datasets

    folder = tmp_path / "images"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        rows = {
            "image": [Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)) for _ in range(n)],
            "label": [i % len(names) for i in range(n)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _classifier_folder(tmp_path, id2label, name="model"):
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    path = tmp_path / name
    config = tiny_vit_config(
        image_size=6,
        patch_size=3,
        num_channels=3,
        num_labels=len(id2label),
        hidden_size=16,
        num_hidden_layers=1,
        id2label=dict(enumerate(id2label)),
    )
    ViTForImageClassification(config).save_pretrained(path)
    return path


def test_cli_remaps_the_data_labels_to_a_model_that_orders_the_classes_otherwise(tmp_path, caplog):
    from sap_hf.cli import commands
    from sap_hf.cli.sources import DataArguments, load_splits

    splits = load_splits(DataArguments(dataset_name=str(_named_image_folder(tmp_path)), streaming=False))
    model_path = _classifier_folder(tmp_path, ["fox", "cat", "dog"])
    with caplog.at_level("WARNING"):
        model, aligned = commands._load_classifier(str(model_path), splits, "fix")
    assert "remapped" in caplog.text
    assert aligned.class_names == ["fox", "cat", "dog"]
    for before, after in zip(splits.train, aligned.train):  # each sample keeps its class *name*
        assert model.config.id2label[after["label"]] == ["cat", "dog", "fox"][before["label"]]
    same_order = _classifier_folder(tmp_path, ["cat", "dog", "fox"], "same")
    _, kept = commands._load_classifier(str(same_order), splits, "")
    assert kept is splits


def test_the_library_refuses_data_whose_class_label_orders_the_models_classes_otherwise(tmp_path):
    """Outside the CLI nothing remapped the labels: a `from_pretrained` model naming cat/dog/fox in another order than
    the split's ClassLabel was scored, audited and corrected against the wrong logits, silently. Every pass refuses,
    naming datasets' fix, before any weight changes; the aligned split runs."""
    import datasets
    from helpers import assert_identical, snapshot
    from transformers import AutoModelForImageClassification

    from sap_hf import audit_labels, evaluate_accuracy, sap_correct, select_trusted

    model = AutoModelForImageClassification.from_pretrained(_classifier_folder(tmp_path, ["fox", "cat", "dog"]))
    folder = _named_image_folder(tmp_path)
    raw = datasets.load_dataset("parquet", data_files={"train": str(folder / "train.parquet")}, split="train")
    transform = ImageTransform(image_size=6, num_channels=3, mean=0.5, std=0.5)
    split = raw.with_transform(transform)
    before = snapshot(model)
    fix = r"class 'cat' id 0, the model's config.id2label id 1.*align_labels_with_mapping\(model.config.label2id, 'label'\)"
    for call in (
        lambda: select_trusted(model, split, 1),
        lambda: evaluate_accuracy(model, split),
        lambda: audit_labels(model, split),
        lambda: sap_correct(model, split, split),
    ):
        with pytest.raises(ValueError, match=fix):
            call()
    assert_identical(model, before)
    aligned = raw.align_labels_with_mapping(model.config.label2id, "label").with_transform(transform)
    assert len(select_trusted(model, aligned, 1).indices) == 3
    renamed = raw.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"])).with_transform(transform)
    assert len(select_trusted(model, renamed, 1).indices) == 3  # other names: a warning, not an error

    class WithFeatures(torch.utils.data.Dataset):  # a user's dataset whose `features` is not datasets'
        features = np.zeros((3, 4))

        def __len__(self):
            return len(aligned)

        def __getitem__(self, index):
            return aligned[index]

    assert len(select_trusted(model, WithFeatures(), 1).indices) == 3


def test_cli_refuses_a_model_whose_class_names_are_not_the_data_s(tmp_path, capsys):
    from helpers import user_error

    from sap_hf.cli import commands

    folder = _named_image_folder(tmp_path)
    model_path = _classifier_folder(tmp_path, ["cat", "dog", "cow"])
    line = user_error(
        capsys,
        commands.main,
        [
            "correct",
            "--model_name_or_path",
            str(model_path),
            "--dataset_name",
            str(folder),
            "--output_dir",
            str(tmp_path / "out"),
            "--streaming",
            "false",
        ],
        alone=False,
    )
    assert "--model_name_or_path" in line and "'cow'" in line and "'fox'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        (["--selection_rule", "None"], "selection_rule", "shift_loss"),  # help: "None (default)"
        (["--max_tokens_per_sample", "None"], "max_tokens_per_sample", None),
        (["--selection_subset", "None"], "selection_subset", None),
        (["--training_loss_epochs", "None"], "training_loss_epochs", None),
        (["--test_split", "None"], "test_split", None),  # help: "(None: no test)"
        (["--train_size", "None"], "train_size", None),  # help: "(None: all)"
        (["--target_modules", ".*(q_proj|v_proj)"], "target_modules", ".*(q_proj|v_proj)"),  # README: a regex string
        (["--target_modules", "[]"], "target_modules", []),  # help: "[] with it projects the head alone"
        (["--target_modules", "all-linear"], "target_modules", "all-linear"),
        (["--target_modules", "q_proj", "mlp.fc1"], "target_modules", ["q_proj", "mlp.fc1"]),
    ],
)
def test_documented_option_values_are_taken_on_the_command_line(tmp_path, argv, field, expected):
    from sap_hf.cli.args import parse_with_config
    from sap_hf.cli.commands import CorrectArguments
    from sap_hf.core.config import SAPConfig

    model = _classifier_folder(tmp_path, ["cat", "dog", "fox"])
    base = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")]
    args, config = parse_with_config((CorrectArguments, SAPConfig), base + argv, prog="sap-hf correct")
    assert getattr(config if hasattr(config, field) else args, field) == expected


def test_a_command_line_regex_selects_layers():
    from sap_hf import SAPConfig
    from sap_hf.core.targets import find_target_modules
    from sap_hf.models import tiny_model

    config = SAPConfig(target_modules=[".*(q_proj|v_proj)"], project_classifier=False)
    names = find_target_modules(tiny_model("vit", num_labels=3), config.target_modules, None, False)
    assert names and all(name.endswith(("q_proj", "v_proj")) for name in names)


# --- 4. models at the edge of the contract ---------------------------------------------------------------------


class _ConvNet(torch.nn.Module):
    """A conv backbone with a Linear head: no nn.Linear for SAP to project but the head."""

    def __init__(self, num_labels: int = 3):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(num_labels=num_labels)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        self.classifier = torch.nn.Linear(4, num_labels)

    def forward(self, pixel_values, labels=None):
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.classifier(self.features(pixel_values)))


def test_a_model_without_backbone_linears_is_refused_unless_the_head_alone_is_asked_for():
    from helpers import assert_identical, random_examples, snapshot

    from sap_hf import Runtime, SAPConfig, sap_correct, sap_project

    model = _ConvNet()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no nn.Linear layer besides its classification head.*target_modules=\[\]"):
        sap_correct(
            model,
            random_examples(12),
            random_examples(6, seed=2),
            SAPConfig(alphas=[10.0], trusted_per_class=2),
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)
    sap_project(model, random_examples(6), alpha=10.0, config=SAPConfig(target_modules=[]))  # asked for: allowed


def test_errors_advise_only_arguments_the_function_takes():
    import inspect
    import re

    from helpers import random_examples

    from sap_hf import sap_correct, sap_project

    class Plain(torch.nn.Module):  # no config: the number of classes is unknown
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 3)

    for call, args in ((sap_correct, (random_examples(4), random_examples(4))), (sap_project, (random_examples(4),))):
        with pytest.raises(ValueError) as info:
            call(Plain(), *args)
        advised = re.findall(r"\b(?:pass|give|set) (\w+)=", str(info.value))
        assert set(advised) <= set(inspect.signature(call).parameters), (call.__name__, str(info.value))


def test_a_head_that_disagrees_with_id2label_is_named():
    from sap_hf.core.targets import check_classifier
    from sap_hf.models import tiny_model

    model = tiny_model("vit", num_labels=3)
    model.config.id2label = {i: f"c{i}" for i in range(5)}  # 5 names, a 3-output head
    with pytest.raises(ValueError, match=r"num_labels=5 .*'classifier', has 3 outputs.*disagree"):
        check_classifier(model)


# --- 5. recorded training losses: resumed training, tuple examples ---------------------------------------------


def _recording_trainer(tmp_path, train, **args):
    from helpers import random_examples
    from transformers import TrainingArguments

    from sap_hf import SAPConfig
    from sap_hf.models import tiny_model
    from sap_hf.trainer import SAPTrainer

    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=0.0,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="epoch",
        seed=0,
    )
    training_args = TrainingArguments(**{**defaults, **args})
    config = SAPConfig(alphas=[10.0], trusted_per_class=2, batch_size=8, trusted_source="training")
    return SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=training_args,
        train_dataset=train,
        eval_dataset=random_examples(6, seed=2),
        sap_config=config,
    )


def test_resumed_training_keeps_the_recorded_losses(tmp_path, caplog):
    from helpers import MapStyle, random_examples

    train = MapStyle(random_examples(12, seed=1))
    whole = _recording_trainer(tmp_path / "whole", train)
    whole.train()
    full = whole.training_losses.summary()
    assert full["count"].tolist() == [2] * 12

    first = _recording_trainer(tmp_path, train, num_train_epochs=1)
    first.train()  # saves checkpoint-3 (one epoch of 3 steps)
    resumed = _recording_trainer(tmp_path, train)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    record = resumed.training_losses.summary()
    assert record["count"].tolist() == [2] * 12  # both epochs, not only the one trained after resuming
    np.testing.assert_allclose(record["total"], full["total"], rtol=1e-5)
    assert "resume_from_checkpoint" not in caplog.text


def test_resuming_from_a_checkpoint_without_recorded_losses_warns(tmp_path, caplog):
    from helpers import MapStyle, random_examples

    train = MapStyle(random_examples(12, seed=1))
    _recording_trainer(tmp_path, train, num_train_epochs=1).train()
    for path in (tmp_path / "out").glob("checkpoint-*/sap_training_losses-*.npz"):
        path.unlink()  # as a plain Trainer's checkpoint
    resumed = _recording_trainer(tmp_path, train)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "resume_from_checkpoint" in caplog.text and "from now on only" in caplog.text


def test_recorded_losses_take_tuple_examples_the_trainer_takes(tmp_path):
    from helpers import MapStyle, random_examples

    examples = [(e["pixel_values"], e["labels"]) for e in random_examples(12, seed=1)]

    def collate(rows):
        return {"pixel_values": torch.stack([p for p, _ in rows]), "labels": torch.tensor([y for _, y in rows])}

    trainer = _recording_trainer(tmp_path, MapStyle(examples), save_strategy="no")
    trainer.data_collator = collate
    trainer.train()
    assert trainer.training_losses.summary()["count"].tolist() == [2] * 12


# --- 6. the default metric with predictions that are class ids already -------------------------------------------


def test_accuracy_metrics_takes_class_ids_from_preprocess_logits_for_metrics():
    from transformers import EvalPrediction

    from sap_hf.trainer import accuracy_metrics

    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, -100])
    expected = accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels))["accuracy"]
    assert expected == pytest.approx(2 / 3)
    ids = accuracy_metrics(EvalPrediction(predictions=logits.argmax(-1), label_ids=labels))["accuracy"]
    assert ids == pytest.approx(expected)


def test_sap_trainer_with_preprocess_logits_for_metrics_evaluates_alphas(tmp_path):
    from helpers import random_examples
    from transformers import TrainingArguments

    from sap_hf import SAPConfig
    from sap_hf.models import tiny_model
    from sap_hf.trainer import SAPTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4)
    trainer = SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=args,
        train_dataset=random_examples(12),
        eval_dataset=random_examples(6, seed=2),
        sap_config=SAPConfig(alphas=[10.0], trusted_per_class=2),
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    result = trainer.correct()
    assert 0.0 <= result.baseline_metrics["accuracy"] <= 1.0


# --- 7. numbers with two meanings: selection_subset=1 ----------------------------------------------------------


@pytest.mark.parametrize("whole", [1, 1.0])
def test_selection_subset_one_is_the_whole_data(whole):
    from helpers import MapStyle, random_examples

    from sap_hf.core.selection import select_trusted
    from sap_hf.models import tiny_model
    from sap_hf.runtime.passes import Runtime

    model, data = tiny_model("vit", num_labels=3), MapStyle(random_examples(12, seed=1))
    runtime = Runtime(show_progress=False)
    every = select_trusted(model, data, 2, runtime=runtime)
    assert select_trusted(model, data, 2, runtime=runtime, subset=whole).indices == every.indices


def test_a_selection_subset_that_misses_a_class_is_named():
    from helpers import MapStyle, random_examples

    from sap_hf.core.selection import select_trusted
    from sap_hf.models import tiny_model
    from sap_hf.runtime.passes import Runtime

    with pytest.raises(ValueError, match=r"selection_subset=2 \(a count of examples\).*larger selection_subset"):
        select_trusted(
            tiny_model("vit", num_labels=3),
            MapStyle(random_examples(12, seed=1)),
            2,
            runtime=Runtime(show_progress=False),
            subset=2,
        )


# --- 8. examples that the default collator would fail on ------------------------------------------------------


def _unequal_sizes():
    from helpers import random_examples

    examples = random_examples(6, size=16)
    examples[3] = {"pixel_values": torch.randn(3, 20, 20), "labels": 0}
    return examples


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: [(e["pixel_values"], e["labels"]) for e in __import__("helpers").random_examples(6)],
            r"train_data: sample 0 is a tuple, not a dict.*collate_fn=",
        ),
        (
            lambda: [{"image": Image.new("RGB", (8, 8)), "label": i % 3} for i in range(6)],
            r"train_data: the examples hold images in column 'image' but no 'pixel_values'.*prepare_image_dataset",
        ),
        (
            _unequal_sizes,
            r"train_data: samples 0 and 3 have pixel_values of shapes \(3, 16, 16\) and \(3, 20, 20\).*resize",
        ),
    ],
)
def test_examples_the_collator_cannot_batch_are_explained_before_any_weight_changes(make, pattern):
    from helpers import assert_identical, random_examples, snapshot

    from sap_hf import Runtime, SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    model = tiny_model("vit", num_labels=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        sap_correct(
            model,
            make(),
            random_examples(6, seed=2),
            SAPConfig(alphas=[10.0], trusted_per_class=1),
            runtime=Runtime(show_progress=False),
        )
    assert_identical(model, before)


def test_first_example_batch_names_the_argument():
    from sap_hf.runtime.batching import first_example_batch

    with pytest.raises(ValueError, match=r"eval_dataset: the examples hold images in column 'img'"):
        first_example_batch([{"img": Image.new("RGB", (8, 8)), "label": 0}], argument="eval_dataset")


# --- 9. a list of keyed examples takes back its own trusted identities -----------------------------------------


def test_a_list_of_keyed_examples_takes_back_its_trusted_identities():
    from helpers import random_examples

    from sap_hf import Runtime, SAPConfig, sap_correct
    from sap_hf.models import tiny_model

    train = [dict(example, key=f"img_{i:02d}.jpg") for i, example in enumerate(random_examples(12, seed=1))]
    evals = random_examples(6, seed=2)
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    first = sap_correct(tiny_model("vit", num_labels=3), train, evals, config, runtime=Runtime(show_progress=False))
    assert all(isinstance(identity, str) for identity in first.trusted_indices)
    again = sap_correct(
        tiny_model("vit", num_labels=3),
        train,
        evals,
        config,
        trusted_indices=first.trusted_indices,
        runtime=Runtime(show_progress=False),
    )
    assert again.trusted_indices == first.trusted_indices
    assert again.final_metrics == first.final_metrics
