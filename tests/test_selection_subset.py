"""selection_subset: the trusted selection scores a seeded random part of the data; identities stay the whole data's."""

import datasets
import pytest
import torch
from helpers import MapStyle, random_examples

from sap_hf import SAPConfig, sap_correct, select_trusted
from sap_hf.core.selection import subset_keep
from sap_hf.models import tiny_model
from sap_hf.runtime.passes import Runtime
from sap_hf.utils.identity import HashSample


def _runtime(**kwargs):
    return Runtime(batch_size=8, show_progress=False, **kwargs)


class _Counting(MapStyle):
    """Counts the examples read (what a selection pass pays for)."""

    def __init__(self, examples):
        super().__init__(examples)
        self.read = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def test_subset_scores_only_the_drawn_share_and_keeps_whole_data_positions():
    examples = random_examples(90, seed=4)
    data = _Counting(examples)
    model = tiny_model("vit", num_labels=3)
    kept = subset_keep(data, 1 / 3, seed=7)
    assert len(kept) == 30 and kept == subset_keep(data, 1 / 3, seed=7) and kept != subset_keep(data, 1 / 3, seed=8)
    chosen = select_trusted(model, data, 2, runtime=_runtime(), seed=7, subset=1 / 3)
    assert sorted(set(data.read)) == sorted(kept)  # only the drawn examples were read
    assert set(chosen.indices) <= kept and len(chosen.indices) == 6
    # The same choice as a full pass over just those examples, mapped back to whole-data positions.
    order = sorted(kept)
    alone = select_trusted(model, MapStyle([examples[i] for i in order]), 2, runtime=_runtime())
    assert chosen.indices == sorted(order[i] for i in alone.indices)
    assert chosen.labels == [examples[i]["labels"] for i in chosen.indices]


def test_count_and_none_and_whole():
    data = MapStyle(random_examples(40))
    assert subset_keep(data, None, 0) is None and subset_keep(data, 40, 0) is None  # everything: a plain pass
    assert len(subset_keep(data, 12, 0)) == 12
    model = tiny_model("vit", num_labels=3)
    full = select_trusted(model, data, 2, runtime=_runtime())
    assert select_trusted(model, data, 2, runtime=_runtime(), subset=40).indices == full.indices


def test_stream_subset_is_hashed_per_key_and_the_same_on_every_process():
    rows = [
        {"pixel_values": e["pixel_values"].tolist(), "labels": e["labels"], "key": f"img/{i}.jpg"}
        for i, e in enumerate(random_examples(60, seed=5))
    ]
    stream = datasets.Dataset.from_list(rows).with_format("torch").to_iterable_dataset(num_shards=2)
    keep = subset_keep(stream, 0.5, seed=3)
    assert isinstance(keep, HashSample)
    drawn = {r["key"] for r in rows if r["key"] in keep}
    assert 15 <= len(drawn) <= 45
    model = tiny_model("vit", num_labels=3)
    chosen = select_trusted(model, stream, 2, runtime=_runtime(), seed=3, subset=0.5)
    assert set(chosen.indices) <= drawn and all(isinstance(i, str) for i in chosen.indices)
    # Two "processes" (rank 0 and 1 of a fake layout) draw the same keys: one process's choice is their merge.
    from sap_hf.core.selection import _Candidates  # noqa: F401  (the merge is the one select_trusted uses)

    assert {k for k in drawn if k in subset_keep(stream, 0.5, seed=3)} == drawn
    with pytest.raises(ValueError, match="no len\\(\\).*share in \\(0, 1\\]"):
        select_trusted(model, stream, 2, runtime=_runtime(), subset=20)


def test_config_checks_and_sap_correct_uses_it():
    for bad in (0, -0.5, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="selection_subset"):
            SAPConfig(selection_subset=bad)
    assert SAPConfig(selection_subset=14000).selection_subset == 14000.0
    train = MapStyle(random_examples(60, seed=1))
    config = SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8, selection_subset=0.5, sampling_seed=2)
    result = sap_correct(
        tiny_model("vit", num_labels=3),
        train,
        random_examples(12, seed=2),
        config,
        runtime=Runtime(show_progress=False),
    )
    assert set(result.trusted_indices) <= subset_keep(train, 0.5, seed=2)
    assert result.config["selection_subset"] == 0.5


class _Stream(torch.utils.data.IterableDataset):
    """A torch stream of examples that also knows its length (as many users' streams do): still a stream."""

    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)

    def __len__(self):
        return len(self.examples)


def _batched(examples, size):
    return [
        {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples[i : i + size]]),
            "labels": torch.tensor([e["labels"] for e in examples[i : i + size]]),
        }
        for i in range(0, len(examples), size)
    ]


def test_keyed_lists_and_lists_of_batches_are_subsampled_by_identity():
    """A keyed list is known by its keys, a list of batches by example positions: a subset draws those.

    (Both were once drawn as positions of the list itself: the keyed list scored nothing, the list of
    batches only as many examples as it had batches.) A torch stream with a `__len__` is read as a stream.
    """
    examples = random_examples(60, seed=5)
    model = tiny_model("vit", num_labels=3)
    drawn = HashSample(0.5, 3)
    keyed = [dict(e, key=f"img{i}") for i, e in enumerate(examples)]
    from_keys = select_trusted(model, keyed, 2, runtime=_runtime(), seed=3, subset=0.5)
    assert len(from_keys.indices) == 6 and all(key.startswith("img") and key in drawn for key in from_keys.indices)
    from_stream = select_trusted(model, _Stream(examples), 2, runtime=_runtime(), seed=3, subset=0.5)
    assert len(from_stream.indices) == 6 and all(int(i) in drawn for i in from_stream.indices)
    from_batches = select_trusted(model, _batched(examples, 8), 2, runtime=_runtime(), seed=3, subset=0.5)
    assert sorted(from_batches.indices) == sorted(from_stream.indices)
