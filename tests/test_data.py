"""Data readers: Fashion-MNIST (idx files, Debian, Hub fallback), Clothing1M layout, image transforms."""

from __future__ import annotations

import gzip
import io
import logging
import struct
from pathlib import Path

import datasets
import datasets.distributed
import numpy as np
import pytest
import torch
from PIL import Image

import sap_hf.data.fashion_mnist as fm
from sap_hf.data import (
    CLOTHING1M_CLASSES,
    FASHION_MNIST_CLASSES,
    ImageTransform,
    fashion_mnist_arrays,
    load_clothing1m,
    load_fashion_mnist,
    noisy_fashion_mnist,
    prepare_image_dataset,
    read_idx,
    stratified_choice,
    write_tiny_clothing1m,
)
from sap_hf.data.noise import FASHION_MNIST_ASYMMETRIC_MAP


DEBIAN_PRESENT = (fm.DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


# ---------------------------------------------------------------- idx helpers


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fashion_dir(root: Path, n_train: int = 600, n_test: int = 100, gz: bool = False) -> Path:
    """Idx files whose image i carries i in its first two pixels, so splits can be traced back."""
    for split, n, offset in (("train", n_train, 0), ("t10k", n_test, 30000)):
        ids = np.arange(n) + offset
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
        suffix = ".gz" if gz else ""
        _write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    return root


def _ids(dataset: datasets.Dataset) -> set[int]:
    return {int(a[0, 0]) * 256 + int(a[0, 1]) for a in (np.asarray(img) for img in dataset["image"])}


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x", array, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


def test_read_idx_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad-idx3-ubyte.*magic"):
        read_idx(path)


def test_read_idx_truncated_and_missing(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEBIAN_PRESENT, reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist():
    test = load_fashion_mnist("test")
    assert len(test) == 10000
    assert test.features["label"].names == FASHION_MNIST_CLASSES
    image = test[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    assert np.bincount(test["label"]).tolist() == [1000] * 10

    data = noisy_fashion_mnist(noise_rate=0.4, seed=1, train_size=2000, val_size=500, test_size=300)
    assert {k: len(v) for k, v in data.items()} == {"train": 2000, "validation": 500, "test": 300}
    train = data["train"]
    assert set(train.column_names) == {"image", "label", "clean_label", "is_noisy"}
    assert data["validation"].column_names == data["test"].column_names == ["image", "label"]
    labels, clean, is_noisy = (np.asarray(train[c]) for c in ("label", "clean_label", "is_noisy"))
    assert is_noisy.sum() == 800
    np.testing.assert_array_equal(is_noisy, labels != clean)
    assert np.bincount(data["validation"]["label"]).tolist() == [50] * 10  # stratified


def test_noisy_fashion_mnist_splits_are_disjoint_and_seeded(tmp_path):
    root = _fake_fashion_dir(tmp_path)
    data = noisy_fashion_mnist(
        noise_rate=0.3, noise_type="asymmetric", seed=5, train_size=300, val_size=100, test_size=50, data_dir=root
    )
    train_ids, val_ids, test_ids = (_ids(data[s]) for s in ("train", "validation", "test"))
    assert len(train_ids) == 300 and len(val_ids) == 100 and len(test_ids) == 50
    assert not train_ids & val_ids
    assert all(i >= 30000 for i in test_ids)
    assert np.bincount(data["validation"]["label"]).tolist() == [10] * 10
    train = data["train"]
    assert sum(train["is_noisy"]) == 90
    for y, c, flipped in zip(train["label"], train["clean_label"], train["is_noisy"]):
        assert y == (FASHION_MNIST_ASYMMETRIC_MAP[c] if flipped else c)
    again = noisy_fashion_mnist(
        noise_rate=0.3, noise_type="asymmetric", seed=5, train_size=300, val_size=100, test_size=50, data_dir=root
    )
    assert again["train"]["label"] == train["label"] and _ids(again["validation"]) == val_ids
    other = noisy_fashion_mnist(noise_rate=0.3, seed=6, train_size=300, val_size=100, data_dir=root)
    assert _ids(other["validation"]) != val_ids


def test_noisy_fashion_mnist_defaults_use_the_rest_of_train(tmp_path):
    root = _fake_fashion_dir(tmp_path, gz=True)
    data = noisy_fashion_mnist(noise_rate=0.0, val_size=100, data_dir=root)
    assert len(data["train"]) == 500 and len(data["test"]) == 100
    assert not any(data["train"]["is_noisy"])
    assert _ids(data["train"]) | _ids(data["validation"]) == set(range(600))


def test_fashion_mnist_arrays_and_stratified_choice_redraw_noisy_fashion_mnists_split(tmp_path):
    root = _fake_fashion_dir(tmp_path)
    images, labels = fashion_mnist_arrays("train", data_dir=root)
    assert (
        images.shape == (600, 28, 28) and images.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(600)]
    )
    ids = images[:, 0, 0].astype(int) * 256 + images[:, 0, 1]
    assert ids.tolist() == list(range(600))
    # the same seed's stream, drawn the same way: the same validation and training images
    data = noisy_fashion_mnist(noise_rate=0.0, seed=5, train_size=300, val_size=100, data_dir=root)
    rng = np.random.default_rng(5)
    val = stratified_choice(np.arange(600), labels, 100, rng)
    pool = np.setdiff1d(np.arange(600), val)
    train = stratified_choice(pool, labels[pool], 300, rng)
    assert set(ids[val].tolist()) == _ids(data["validation"]) and set(ids[train].tolist()) == _ids(data["train"])


def test_stratified_choice_keeps_the_class_shares_by_largest_remainder():
    labels, indices = np.array([0] * 5 + [1] * 3 + [2] * 2), np.arange(10) + 100
    chosen = stratified_choice(indices, labels, 5, np.random.default_rng(0))
    # exact shares 2.5, 1.5, 1.0: floors 2, 1, 1; the one left goes to the earlier tied remainder (class 0)
    assert np.bincount(labels[chosen - 100]).tolist() == [3, 1, 1]
    assert chosen.tolist() == sorted(set(chosen.tolist())) and set(chosen.tolist()) <= set(indices.tolist())
    assert stratified_choice(indices, labels, 5, np.random.default_rng(0)).tolist() == chosen.tolist()
    assert stratified_choice(indices, labels, 0, np.random.default_rng(0)).tolist() == []


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"val_size": 600}, "val_size"),
        ({"train_size": 590, "val_size": 100}, "train_size"),
        ({"val_size": 10, "test_size": 0}, "test_size"),
    ],
)
def test_noisy_fashion_mnist_bad_sizes(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        noisy_fashion_mnist(data_dir=_fake_fashion_dir(tmp_path), **kwargs)


def test_noisy_fashion_mnist_takes_numpy_numbers_and_checks_the_noise_before_reading(tmp_path):
    root = _fake_fashion_dir(tmp_path)
    data = noisy_fashion_mnist(
        noise_rate=np.float32(0.5),
        seed=1,
        train_size=np.int64(100),
        val_size=np.int32(50),
        test_size=np.int64(20),
        data_dir=root,
    )
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (100, 50, 20)
    assert sum(data["train"]["is_noisy"]) == 50
    for kwargs, argument in [({"noise_type": "pairflip"}, "noise_type"), ({"noise_rate": 1.0}, "noise_rate")]:
        with pytest.raises(ValueError, match=f"{argument}="):  # before the (absent) files are looked for
            noisy_fashion_mnist(data_dir=tmp_path / "absent", **kwargs)
    with pytest.raises(ValueError, match="val_size=True"):
        noisy_fashion_mnist(data_dir=root, val_size=True)


def test_missing_data_dir_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir.*dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=tmp_path / "absent")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_nothing_available_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", tmp_path)

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*data_dir.*online"):
        load_fashion_mnist("test")


def test_hub_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", tmp_path)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    images = [np.full((28, 28), i, dtype=np.uint8) for i in range(40)]
    hub = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(40)]}, features=features)
    calls = []

    def fake_load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = noisy_fashion_mnist(noise_rate=0.5, train_size=20, val_size=10, test_size=5)
    assert calls == [(fm.HUB_REPO_ID, "train"), (fm.HUB_REPO_ID, "test")]
    assert len(data["train"]) == 20 and sum(data["train"]["is_noisy"]) == 10
    assert data["train"].features["clean_label"].names == FASHION_MNIST_CLASSES
    row = data["validation"][0]
    assert np.asarray(row["image"])[0, 0] % 10 == row["label"]


# ---------------------------------------------------------------- Clothing1M


def _kv(root: Path, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (root / name).read_text().splitlines())}


def test_tiny_clothing1m_streaming_rows(tiny_clothing1m):
    ds = load_clothing1m(tiny_clothing1m, "noisy_train")
    assert isinstance(ds, datasets.IterableDataset)
    assert ds.n_shards == 8
    assert ds.features["label"].names == CLOTHING1M_CLASSES and len(CLOTHING1M_CLASSES) == 14
    rows = list(ds)
    keys = (tiny_clothing1m / "noisy_train_key_list.txt").read_text().split()
    assert [r["key"] for r in rows] == keys and len(keys) == 42
    noisy = _kv(tiny_clothing1m, "noisy_label_kv.txt")
    assert [r["label"] for r in rows] == [noisy[k] for k in keys]
    image = rows[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)


def test_tiny_clothing1m_labels_come_from_the_right_file(tiny_clothing1m, tmp_path):
    noisy = {r["key"]: r["label"] for r in load_clothing1m(tiny_clothing1m, "noisy_train")}
    clean = {r["key"]: r["label"] for r in load_clothing1m(tiny_clothing1m, "clean_train")}
    assert noisy.keys() == clean.keys()
    assert sum(noisy[k] != clean[k] for k in noisy) == round(0.3 * 42)
    assert clean == {k: v for k, v in _kv(tiny_clothing1m, "clean_label_kv.txt").items() if k in clean}
    val = load_clothing1m(tiny_clothing1m, "validation", streaming=False, cache_dir=tmp_path)
    test = load_clothing1m(tiny_clothing1m, "test", streaming=False, cache_dir=tmp_path)
    assert isinstance(val, datasets.Dataset) and len(val) == len(test) == 42
    assert np.bincount(val["label"]).tolist() == [3] * 14
    assert not set(val["key"]) & set(test["key"]) and not set(val["key"]) & noisy.keys()


def test_tiny_clothing1m_map_style_matches_streaming(tiny_clothing1m, tmp_path):
    streamed = list(load_clothing1m(tiny_clothing1m, "noisy_train", num_shards=3))
    table = load_clothing1m(tiny_clothing1m, "noisy_train", streaming=False, cache_dir=tmp_path)
    assert table["key"] == [r["key"] for r in streamed]
    assert table["label"] == [r["label"] for r in streamed]
    assert np.array_equal(np.asarray(table[5]["image"]), np.asarray(streamed[5]["image"]))


def test_clothing1m_shards_split_across_processes_and_workers(tiny_clothing1m):
    ds = load_clothing1m(tiny_clothing1m, "test", num_shards=4)
    parts = [list(datasets.distributed.split_dataset_by_node(ds, rank=r, world_size=2)) for r in range(2)]
    keys = [[row["key"] for row in part] for part in parts]
    assert len(keys[0]) + len(keys[1]) == 42 and not set(keys[0]) & set(keys[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(row["key"] for row in loader) == sorted(keys[0] + keys[1])
    assert load_clothing1m(tiny_clothing1m, "test", num_shards=1000).n_shards == 42


@pytest.fixture
def clothing_copy(tmp_path) -> Path:
    return write_tiny_clothing1m(tmp_path / "c1m", per_class=1, image_size=16, classes=4)


def test_clothing1m_missing_files_are_named(clothing_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir.*noisy_label_kv.txt"):
        load_clothing1m(tmp_path / "absent")
    (clothing_copy / "clean_val_key_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="clean_val_key_list.txt.*layout"):
        load_clothing1m(clothing_copy, "validation")
    with pytest.raises(ValueError, match="split"):
        load_clothing1m(clothing_copy, "val")
    with pytest.raises(ValueError, match="num_shards"):
        load_clothing1m(clothing_copy, "test", num_shards=0)
    with pytest.raises(ValueError, match="num_shards=True"):
        load_clothing1m(clothing_copy, "test", num_shards=True)
    assert load_clothing1m(clothing_copy, "test", num_shards=np.int64(2)).n_shards == 2
    with pytest.raises(ValueError, match=r"split='val' is invalid.*did you mean 'validation'"):
        load_clothing1m(clothing_copy, "val")


def test_clothing1m_key_without_label(clothing_copy):
    with open(clothing_copy / "clean_test_key_list.txt", "a") as handle:
        handle.write("images/9/9/unlabelled.jpg\n")
    with pytest.raises(ValueError, match="images/9/9/unlabelled.jpg.*clean_label_kv.txt"):
        load_clothing1m(clothing_copy, "test")


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("images/0/0/x.jpg", "line 5 is malformed"),
        ("images/0/0/x.jpg three", "malformed"),
        ("images/0/0/x.jpg 14", "outside 0..13"),
    ],
)
def test_clothing1m_bad_kv_lines(clothing_copy, line, pattern):
    kv = clothing_copy / "noisy_label_kv.txt"
    assert len(kv.read_text().splitlines()) == 4
    with open(kv, "a") as handle:
        handle.write(line + "\n")
    with pytest.raises(ValueError, match=f"noisy_label_kv.txt.*{pattern}"):
        load_clothing1m(clothing_copy, "noisy_train")


def test_clothing1m_corrupt_jpeg(clothing_copy, caplog):
    keys = (clothing_copy / "clean_test_key_list.txt").read_text().split()
    bad = clothing_copy / keys[1]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with caplog.at_level(logging.WARNING, logger="sap_hf.data.clothing1m"):
        rows = list(load_clothing1m(clothing_copy, "test"))
    assert [r["key"] for r in rows] == [keys[0]] + keys[2:]
    messages = [r.getMessage() for r in caplog.records]
    assert any(keys[1] in m and "1 skipped" in m for m in messages)
    assert any("skipped 1 unreadable" in m for m in messages)
    with pytest.raises(OSError, match=f"{keys[1]}.*skip_unreadable_images"):
        list(load_clothing1m(clothing_copy, "test", skip_unreadable_images=False))


def test_write_tiny_clothing1m_validates(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        write_tiny_clothing1m(tmp_path, classes=15)
    with pytest.raises(ValueError, match="per_class"):
        write_tiny_clothing1m(tmp_path, per_class=0)


# ---------------------------------------------------------------- transforms


def test_transform_gray_to_rgb_and_size():
    transform = ImageTransform(image_size=32, num_channels=3)
    gray = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    out = transform({"image": [gray, np.full((28, 28), 255, dtype=np.uint8)], "label": [3, 4], "key": ["a", "b"]})
    assert set(out) == {"pixel_values", "labels", "key"}  # the key identifies a stream's samples for SAP
    assert out["labels"] == [3, 4] and out["key"] == ["a", "b"]
    assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, 32, 32)] * 2
    assert out["pixel_values"][0].dtype == torch.float32
    assert torch.allclose(out["pixel_values"][0], torch.tensor(-1.0))  # (0 - 0.5) / 0.5
    assert torch.allclose(out["pixel_values"][1], torch.tensor(1.0))


def test_transform_one_channel_arrays_and_index():
    transform = ImageTransform(image_size=(28, 20), num_channels=1, mean=0.2, std=[0.25])
    rgb = Image.new("RGB", (10, 10), (255, 255, 255))
    nested = np.zeros((28, 28), dtype=np.uint8).tolist()  # what an Array2D column returns
    out = transform({"img": [rgb, nested], "labels": [1, 2], "index": [7, 8]})
    assert [tuple(p.shape) for p in out["pixel_values"]] == [(1, 28, 20)] * 2
    assert out["labels"] == [1, 2] and out["index"] == [7, 8]
    assert torch.allclose(out["pixel_values"][0], torch.tensor((1 - 0.2) / 0.25))


def test_transform_missing_image_column_names_the_columns():
    with pytest.raises(ValueError, match=r"\['label', 'photo'\].*image"):
        ImageTransform(image_size=8)({"photo": [None], "label": [0]})


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        ImageTransform()
    with pytest.raises(ValueError, match="num_channels"):
        ImageTransform(image_size=8, num_channels=2)
    with pytest.raises(ValueError, match="mean"):
        ImageTransform(image_size=8, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(image_size=0)


def _fashion_image() -> np.ndarray:
    """A real picture (Fashion-MNIST's first test image) when Debian's copy is installed, else a gradient."""
    if DEBIAN_PRESENT:
        return read_idx(fm.DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[0]
    return (np.add.outer(np.arange(28), np.arange(28)) * 255 // 54).astype(np.uint8)


def _sixteen_bit_versions(image8: np.ndarray) -> dict[str, object]:
    """The same picture in every 16-bit form: value x 257 maps 0..255 onto 0..65535."""
    wide = image8.astype(np.uint16) * 257
    png = io.BytesIO()
    Image.fromarray(wide).save(png, format="PNG")
    return {
        "I;16": Image.fromarray(wide),
        "I;16B": Image.fromarray(wide.astype(">u2")),
        "I;16L": Image.frombytes("I;16L", (wide.shape[1], wide.shape[0]), wide.astype("<u2").tobytes()),
        "I": Image.fromarray(wide.astype(np.int32)),
        "uint16 array": wide,
        "16-bit PNG bytes": {"bytes": png.getvalue(), "path": None},
    }


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("size, augment", [(28, False), (32, False), (32, True)])
def test_sixteen_bit_images_give_the_intensities_of_the_8_bit_picture(num_channels, size, augment):
    """16-bit greyscale used to be clipped at 255 by convert('L'): a nearly white image."""
    image8 = _fashion_image()
    versions = _sixteen_bit_versions(image8)
    assert versions["I;16"].mode == "I;16" and versions["I;16B"].mode == "I;16B" and versions["I"].mode == "I"

    def pixels(image):
        transform = ImageTransform(
            image_size=size, num_channels=num_channels, mean=0.0, std=1.0, augment=augment, seed=5
        )
        return transform({"image": [image]})["pixel_values"][0]

    reference = pixels(Image.fromarray(image8))
    for name, image in versions.items():
        out = pixels(image)
        assert out.shape == reference.shape, name
        assert float((out - reference).abs().max()) <= 1.01 / 255, name  # 8-bit rounding of a resize at most
    assert float(reference.mean()) < 0.9  # the picture is not white, so a clipped copy could not pass


def test_sixteen_bit_images_keep_their_precision_and_reach_a_processor_in_8_bits():
    from transformers import ViTImageProcessor

    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # steps of 1000/65535, finer than 1/255
    out = ImageTransform(image_size=8, num_channels=1, mean=0.0, std=1.0)({"image": [Image.fromarray(ramp)]})
    assert torch.allclose(out["pixel_values"][0][0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-6)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    image8 = _fashion_image()
    ours = ImageTransform(processor)({"image": [Image.fromarray(image8.astype(np.uint16) * 257)]})["pixel_values"][0]
    assert torch.equal(ours, ImageTransform(processor)({"image": [Image.fromarray(image8)]})["pixel_values"][0])


@pytest.mark.filterwarnings("ignore:Downcasting array dtype")
def test_integer_containers_without_a_bit_depth_are_read_by_their_values():
    """Mode 'I' / int64 arrays holding 0..255 are 8-bit pictures (datasets decodes int arrays so)."""
    image8 = _fashion_image()
    transform = ImageTransform(image_size=28, num_channels=1, mean=0.0, std=1.0)
    reference = transform({"image": [Image.fromarray(image8)]})["pixel_values"][0]
    for image in (Image.fromarray(image8.astype(np.int32)), image8.astype(np.int64), (image8.astype(np.int64) * 257)):
        assert torch.allclose(transform({"image": [image]})["pixel_values"][0], reference, atol=1e-6)
    stored = datasets.Dataset.from_dict(
        {"image": [image8.astype(np.int64)]}, features=datasets.Features({"image": datasets.Image()})
    )
    assert torch.allclose(transform({"image": [stored[0]["image"]]})["pixel_values"][0], reference, atol=1e-6)


def test_float_and_out_of_range_images_are_refused_with_the_fix():
    transform = ImageTransform(image_size=8)
    with pytest.raises(ValueError, match=r"mode 'F'.*ambiguous.*Image.fromarray"):
        transform({"image": [Image.fromarray(np.zeros((8, 8), dtype=np.float32))]})
    with pytest.raises(ValueError, match=r"mode 'I'.*70000\.\.70000.*I;16"):
        transform({"image": [Image.fromarray(np.full((8, 8), 70000, dtype=np.int32))]})
    with pytest.raises(ValueError, match="dtype float32.*uint8"):
        transform({"image": [np.zeros((8, 8), dtype=np.float32)]})


def test_transform_takes_numpy_numbers_and_checks_them():
    transform = ImageTransform(
        image_size=np.int64(16), num_channels=np.int64(1), mean=np.float32(0.5), seed=np.int64(2)
    )
    assert transform.size == (16, 16) and transform.num_channels == 1 and type(transform.num_channels) is int
    assert ImageTransform(image_size=np.array([12, 10])).size == (12, 10)
    for kwargs, field in [
        ({"num_channels": True}, "num_channels"),
        ({"image_size": 8.0}, "image_size"),
        ({"std": 0.0}, "std"),
        ({"mean": float("nan")}, "mean"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=f"{field}="):
            ImageTransform(**{"image_size": 8, **kwargs})


def test_transform_augmentation_is_seeded():
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)) for i in range(8)]
    plain = ImageTransform(image_size=16, num_channels=1)({"image": images})["pixel_values"]
    first = ImageTransform(image_size=16, num_channels=1, augment=True, seed=3)({"image": images})["pixel_values"]
    second = ImageTransform(image_size=16, num_channels=1, augment=True, seed=3)({"image": images})["pixel_values"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, plain))
    assert all(a.shape == (1, 16, 16) for a in first)


def test_transform_from_image_processor_and_config():
    from transformers import ViTConfig, ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 24, "width": 24})
    out = ImageTransform(processor)({"image": [Image.new("L", (28, 28))], "label": [1]})
    assert tuple(out["pixel_values"][0].shape) == (3, 24, 24) and out["labels"] == [1]
    transform = ImageTransform.from_config(ViTConfig(image_size=28, num_channels=1))
    assert transform.size == (28, 28) and transform.num_channels == 1


def test_prepare_map_style_and_streaming(tiny_clothing1m):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    table = datasets.Dataset.from_dict(
        {"image": [np.zeros((28, 28), dtype=np.uint8)] * 4, "label": [0, 1, 0, 1]}, features=features
    )
    prepared = prepare_image_dataset(table, ImageTransform(image_size=28, num_channels=1))
    assert tuple(prepared[0]["pixel_values"].shape) == (1, 28, 28) and prepared[1]["labels"] == 1
    loader = torch.utils.data.DataLoader(prepared, batch_size=4)
    assert tuple(next(iter(loader))["pixel_values"].shape) == (4, 1, 28, 28)

    streamed = prepare_image_dataset(load_clothing1m(tiny_clothing1m, "validation"), ImageTransform(image_size=16))
    rows = list(streamed)
    assert len(rows) == 42 and set(rows[0]) == {"pixel_values", "labels", "key"}
    assert tuple(rows[0]["pixel_values"].shape) == (3, 16, 16)

    both = prepare_image_dataset(datasets.DatasetDict(a=table), ImageTransform(image_size=8, num_channels=1))
    assert tuple(both["a"][0]["pixel_values"].shape) == (1, 8, 8)
    with pytest.raises(TypeError, match="dataset"):
        prepare_image_dataset([1, 2], ImageTransform(image_size=8))


def _count_decodes(monkeypatch):
    from PIL import ImageFile

    decodes = []
    load = ImageFile.ImageFile.load

    def counting_load(self, *args, **kwargs):
        decodes.extend([1] if self.tile else [])  # a real decode, not a reload of a decoded image
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return decodes


def test_clothing1m_decodes_each_image_once_per_pass(tiny_clothing1m, monkeypatch):
    decodes = _count_decodes(monkeypatch)
    rows = list(load_clothing1m(tiny_clothing1m, "validation"))
    assert len(rows) == 42 and len(decodes) == 42


def test_undecoded_rows_are_decoded_by_collate_only(tiny_clothing1m, monkeypatch):
    from sap_hf.data import undecoded_images

    decodes = _count_decodes(monkeypatch)
    raw = list(undecoded_images(load_clothing1m(tiny_clothing1m, "validation")))
    assert not decodes and set(raw[0]["image"]) == {"path", "bytes"} and raw[0]["key"].startswith("images/")
    batch = ImageTransform(image_size=16).collate(raw[:5])
    assert len(decodes) == 5 and tuple(batch["pixel_values"].shape) == (5, 3, 16, 16)
    assert batch["labels"].tolist() == [row["label"] for row in raw[:5]] and "key" not in batch


def test_streams_are_split_before_decoding_with_stable_identities(tiny_clothing1m, monkeypatch):
    from sap_hf.runtime.batching import iter_shard_batches

    transform = ImageTransform(image_size=16)
    keyed = load_clothing1m(tiny_clothing1m, "validation", num_shards=4)
    all_keys = [row["key"] for row in undecoded_list(keyed)]
    decodes = _count_decodes(monkeypatch)
    seen = []
    for rank in range(2):  # keyed, 4 shards on 2 processes: each reads and decodes its own shards only
        for ids, batch in iter_shard_batches(
            prepare_image_dataset(keyed, transform), batch_size=5, process_index=rank, num_processes=2
        ):
            seen.extend(ids)
            assert len(ids) == batch["pixel_values"].shape[0]
    assert sorted(seen) == sorted(all_keys) and len(decodes) == len(all_keys)
    keyless = keyed.remove_columns("key")  # identities are then global positions (every process reads the stream)
    parts = [
        [
            i
            for ids, _ in iter_shard_batches(
                keyless, batch_size=5, process_index=r, num_processes=2, collate_fn=transform.collate
            )
            for i in ids
        ]
        for r in range(2)
    ]
    assert parts[0] == list(range(0, 42, 2)) and parts[1] == list(range(1, 42, 2))


def undecoded_list(dataset):
    from sap_hf.data import undecoded_images

    return list(undecoded_images(dataset))
