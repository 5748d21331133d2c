"""CIFAR-10N loader on a tiny generated copy (random RGB images as parquet, a fake CIFAR-10_human.pt)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sap_hf.data import CIFAR10_CLASSES, label_noise_rate, load_cifar10n, read_cifar10n_labels


N_FILE, N_TRAIN, N_TEST = 80, 60, 40  # the file labels 80 images, the copy holds the first 60 (a prefix)


def _images(n: int, offset: int) -> list[Image.Image]:
    """8x8 RGB images whose first pixel encodes their id, so a split can be traced back to its rows."""
    rng = np.random.default_rng(offset)
    images = []
    for i in range(n):
        array = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        array[0, 0] = (offset + i, 0, 0)
        images.append(Image.fromarray(array))
    return images


def _ids(split: datasets.Dataset) -> list[int]:
    return [int(np.asarray(image)[0, 0, 0]) for image in split["image"]]


def _label_file(root: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    clean = np.arange(N_FILE) % 10
    noisy = {
        name: np.where(rng.random(N_FILE) < rate, (clean + 1 + rng.integers(0, 9, N_FILE)) % 10, clean)
        for name, rate in (
            ("aggre_label", 0.1),
            ("worse_label", 0.4),
            ("random_label1", 0.2),
            ("random_label2", 0.2),
            ("random_label3", 0.2),
        )
    }
    content = {"clean_label": clean, **noisy}
    path = root / "CIFAR-10_human.pt"
    torch.save(content, path)
    return path, content


def _splits(clean: np.ndarray) -> datasets.DatasetDict:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
    test_labels = np.arange(N_TEST) % 10
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": _images(N_TRAIN, 0), "label": clean[:N_TRAIN].tolist()}, features),
        test=datasets.Dataset.from_dict({"img": _images(N_TEST, 100), "label": test_labels.tolist()}, features),
    )


@pytest.fixture(scope="module")
def tiny_cifar10n(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(parquet folder as on the Hub / the shared copy, label file, its content)."""
    root = tmp_path_factory.mktemp("cifar10n")
    labels, content = _label_file(root)
    folder = root / "cifar10"
    folder.mkdir()
    for name, split in _splits(content["clean_label"]).items():
        split.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return folder, labels, content


def test_labels_attached_by_position_with_the_noise_rate_of_the_file(tiny_cifar10n):
    folder, labels, content = tiny_cifar10n
    data = load_cifar10n(folder, labels, "worse", val_size=10)
    train = data["train"]
    assert train.column_names == ["image", "label", "clean_label"] and _ids(train) == list(range(N_TRAIN))
    assert train.features["label"].names == CIFAR10_CLASSES == train.features["clean_label"].names
    np.testing.assert_array_equal(train["label"], content["worse_label"][:N_TRAIN])
    np.testing.assert_array_equal(train["clean_label"], content["clean_label"][:N_TRAIN])
    expected = float(np.mean(content["worse_label"][:N_TRAIN] != content["clean_label"][:N_TRAIN]))
    assert label_noise_rate(train["label"], train["clean_label"]) == pytest.approx(expected) and expected > 0.2
    # the file's own key names, and the clean oracle
    same = load_cifar10n(folder, labels, "worse_label", val_size=10)["train"]
    assert same["label"] == train["label"]
    clean = load_cifar10n(folder, labels, "clean", val_size=10)["train"]
    assert label_noise_rate(clean["label"], clean["clean_label"]) == 0.0


def test_train_subset_is_seeded_and_stratified_on_the_clean_class(tiny_cifar10n):
    folder, labels, content = tiny_cifar10n
    first = load_cifar10n(folder, labels, "aggre", train_size=20, val_size=10, seed=3)["train"]
    again = load_cifar10n(folder, labels, "aggre", train_size=20, val_size=10, seed=3)["train"]
    other = load_cifar10n(folder, labels, "aggre", train_size=20, val_size=10, seed=4)["train"]
    ids = _ids(first)
    assert ids == _ids(again) != _ids(other) and len(ids) == 20 and ids == sorted(ids)
    assert np.bincount(first["clean_label"], minlength=10).tolist() == [2] * 10
    np.testing.assert_array_equal(first["label"], content["aggre_label"][ids])  # still by position


def test_validation_and_test_are_carved_from_test_disjointly_and_seeded(tiny_cifar10n):
    folder, labels, _ = tiny_cifar10n
    data = load_cifar10n(folder, labels, val_size=10, test_size=25, seed=0)
    val, test = _ids(data["validation"]), _ids(data["test"])
    assert len(val) == 10 and len(test) == 25 and not set(val) & set(test)
    assert set(val) | set(test) <= set(range(100, 100 + N_TEST))
    assert data["validation"].column_names == data["test"].column_names == ["image", "label"]
    assert sorted(data["validation"]["label"]) == list(range(10))  # stratified: one per class
    assert _ids(load_cifar10n(folder, labels, val_size=10, test_size=25, seed=0)["validation"]) == val
    assert _ids(load_cifar10n(folder, labels, val_size=10, test_size=25, seed=1)["validation"]) != val
    rest = load_cifar10n(folder, labels, val_size=10)
    assert len(rest["test"]) == N_TEST - 10
    same = load_cifar10n(folder, labels, train_size=20, val_size=10, test_size=25, seed=0)
    assert not set(_ids(same["validation"])) & set(_ids(same["test"]))  # one seeded stream: the subset comes first


def test_a_datasetdict_or_a_pair_works_and_images_stay_lazy(tiny_cifar10n):
    folder, labels, content = tiny_cifar10n
    splits = _splits(content["clean_label"])
    for source in (splits, (splits["train"], splits["test"])):
        data = load_cifar10n(source, labels, "random2", val_size=10)
        np.testing.assert_array_equal(data["train"]["label"], content["random_label2"][:N_TRAIN])
        assert isinstance(data["train"].features["image"], datasets.Image)  # decoded only when read


def test_a_shuffled_copy_is_refused_naming_the_first_differing_position(tiny_cifar10n):
    _, labels, content = tiny_cifar10n
    splits = _splits(content["clean_label"])
    swapped = splits["train"].select([0, 1, 2, 4, 3, *range(5, N_TRAIN)])  # two images out of place
    shuffled = datasets.DatasetDict(train=swapped, test=splits["test"])
    message = r"at position 3 its label is 4 \(deer\) but the file's clean_label is 3 \(cat\).*original order"
    with pytest.raises(ValueError, match=message):
        load_cifar10n(shuffled, labels, val_size=10)


def test_errors_name_the_argument_the_value_and_the_fix(tiny_cifar10n, tmp_path):
    folder, labels, content = tiny_cifar10n
    with pytest.raises(ValueError, match=r"label_set='wrose' is invalid.*did you mean 'worse'"):
        load_cifar10n(folder, labels, "wrose")
    with pytest.raises(FileNotFoundError, match=r"labels=.*missing\.pt' does not exist.*CIFAR-10_human\.pt"):
        load_cifar10n(folder, tmp_path / "missing.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"clean_label": content["clean_label"]}, partial)
    with pytest.raises(ValueError, match=r"lacks 'worse_label'"):
        read_cifar10n_labels(partial, "worse")
    with pytest.raises(ValueError, match=r"val_size=40 is invalid.*\[0, 39\]"):
        load_cifar10n(folder, labels, val_size=N_TEST)
    with pytest.raises(ValueError, match=r"train_size=61 is invalid"):
        load_cifar10n(folder, labels, train_size=61, val_size=10)
    with pytest.raises(FileNotFoundError, match=r"source=.*nowhere' does not exist"):
        load_cifar10n(tmp_path / "nowhere", labels)
    with pytest.raises(ValueError, match=r"no 'test'"):
        load_cifar10n(datasets.DatasetDict(train=_splits(content["clean_label"])["train"]), labels)


# ---------------------------------------------------------------- the recipe on CIFAR-10N

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clothing1m.py"


def test_recipe_runs_on_a_tiny_cifar10n_copy(tmp_path):
    from launching import accelerate_launch

    from sap_hf.data import write_tiny_cifar10n

    folder, labels = write_tiny_cifar10n(tmp_path / "data", n_train=60, n_test=40)
    out = tmp_path / "out"
    args = [
        RECIPE,
        "--config",
        ROOT / "recipes" / "configs" / "cifar10n.yaml",
        "--dataset_name",
        folder,
        "--cifar10n_labels",
        labels,
        "--cifar10n_label_set",
        "aggre",
        "--output_dir",
        out,
        "--train_size",
        "40",
        "--val_size",
        "20",
        "--test_size",
        "10",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "16",
        "--tiny_hidden_size",
        "32",
        "--tiny_num_layers",
        "1",
        "--trusted_per_class",
        "1",
        "--alphas",
        "1",
        "100",
        "--refine_epochs",
        "1",
        "--audit_source",
        "training",  # the audit from the margins SAPTrainer recorded (a map-style split)
        "--disable_tqdm",
        "true",
    ]
    run = accelerate_launch(1, args, timeout=300, cwd=ROOT, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "[sap_hf] cifar10n-aggre" in run.stdout and "after refine" in run.stdout
    import json

    summary = json.loads((out / "sap_summary.json").read_text())
    assert summary["dataset"] == "cifar10n-aggre" and 0 <= summary["test_accuracy_after"] <= 1
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.num_channels == 3 and config.id2label[9] == "truck" and config.patch_size == 8
    first = json.loads((out / "_label_audit" / "label_audit_summary.json").read_text())  # refine's suspects
    assert first["method"] == "training_margin" and first["source"] == "training" and first["examples"] == 40
    refined = json.loads((out / "_label_audit_refined" / "label_audit_summary.json").read_text())
    assert refined["method"] == "self_confidence"  # the refined model's own audit


def test_recipe_refuses_a_missing_label_file_before_reading_data(tmp_path, capsys):
    import sys
    from unittest import mock

    from helpers import user_error

    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m

    argv = [
        "--output_dir",
        str(tmp_path / "out"),
        "--cifar10n_labels",
        str(tmp_path / "nope.pt"),
        "--report_to",
        "none",
    ]
    with mock.patch.object(clothing1m, "load_splits", side_effect=AssertionError("data was read")):
        line = user_error(capsys, clothing1m.main, argv, prog="clothing1m.py")
    assert "--cifar10n_labels" in line and "nope.pt' does not exist" in line and "CIFAR-10_human.pt" in line
    line = user_error(capsys, clothing1m.main, [*argv, "--cifar10n_label_set", "wrose"], prog="clothing1m.py")
    assert "cifar10n_label_set='wrose' is invalid" in line and "did you mean 'worse'" in line
