"""Per-example training losses (and label margins) recorded while a model trains, for a trusted selection with no
pass of its own (and a label audit from the training dynamics, `SAPConfig.audit_source="training"`).

The paper's selection scores every training example with the trained model: a full inference pass
over the training set, a large share of a fine-tuning epoch's cost on a large training set.
Training computes the logits of every example anyway, once per epoch, so `SAPTrainer` keeps each
example's cross-entropy from them (`SAPConfig.trusted_source="training"`) and `correct()` selects
from those (`select_from_scores`) without reading the data again.

Which losses: mislabelled examples are learned late, so a model that has memorised them gives them a
low loss at the end, while their loss averaged over the whole training stays high. The mean over
every epoch (`training_loss_epochs=None`) is therefore the default, the mean over the last few epochs
the alternative (benchmarks/studies/cost.md, "Trusted selection sources", measures both).

How an example is recognised in a shuffled, sharded batch: `SAPTrainer.get_train_dataloader` builds the
Trainer's loader (same sampler, batch size, workers, column removal) over `IndexedExamples`, which adds
each example's position (`INDEX_COLUMN`); `IndexCarryingCollator` takes it out before the user's collator
and puts it back into the batch as a tensor, and `SAPTrainer.compute_loss` pops it before the forward. Positions are those of the training dataset,
the positions `select_trusted` and `trusted_indices` use. Streams have no positions that survive a
shuffle: recording needs a map-style training dataset. Examples that are not dicts (a torch Dataset of
`(pixels, label)` tuples, batched by the user's own collator) travel as `PositionedExample`s instead.

Resuming: every checkpoint the Trainer saves holds each process's record (`RECORD_FILE`, written by
`RecordSaver.on_save`), and `train(resume_from_checkpoint=...)` restores it, so the selection still
averages every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..runtime.batching import fetch_examples
from ..runtime.contract import IGNORE_INDEX, is_map_style


INDEX_COLUMN = "sap_index"
"""The column that carries each training example's position through the Trainer's collator."""


RECORD_FILE = "sap_training_losses-{rank}.npz"
"""A checkpoint's recorded losses, one file per process (`TrainingLosses.save` / `restore`)."""


class PositionedExample(NamedTuple):
    """An example that is not a dict (a tuple, say), with its position: the user's collator gets `example` back."""

    example: Any
    position: int


def _with_index(example: Any, index: int) -> Any:
    if not isinstance(example, Mapping):
        return PositionedExample(example, int(index))
    return {**example, INDEX_COLUMN: int(index)}


class IndexedExamples(torch.utils.data.Dataset):
    """A map-style dataset whose examples also carry their position (`INDEX_COLUMN`)."""

    def __init__(
        self, data: Any, setting: str = "SAPConfig.trusted_source='training'", fix: str = "trusted_source='pass'"
    ):
        if not is_map_style(data):
            raise ValueError(
                f"{setting} needs a map-style train_dataset (a datasets.Dataset or a torch Dataset with len()): a "
                f"{type(data).__name__} has no positions that survive the Trainer's shuffle. Use {fix}"
                + (" (with selection_subset to score only a share of a stream)." if "pass" in fix else ".")
            )
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _with_index(self.data[index], index)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [_with_index(example, i) for example, i in zip(fetch_examples(self.data, list(indices)), indices)]


class IndexCarryingCollator:
    """`collate(examples)` with each example's `INDEX_COLUMN` taken out first and put back as one tensor."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate

    def __call__(self, features: list[Any]) -> Any:
        if features and isinstance(features[0], PositionedExample):
            positions = [feature.position for feature in features]
            batch = self.collate([feature.example for feature in features])
        else:
            features = [dict(feature) for feature in features]
            positions = [feature.pop(INDEX_COLUMN) for feature in features]
            batch = self.collate(features)
        batch[INDEX_COLUMN] = torch.tensor(positions, dtype=torch.long)
        return batch


class TrainingLosses:
    """This process's record: each position's summed loss, summed label margin and count per epoch kept, and its label.

    `epochs=None` keeps one running sum over every epoch; `epochs=k` keeps the last k epochs seen (older
    epochs are dropped as new ones begin). Arrays of the dataset's size: no per-example Python objects.
    The loss ranks the trusted samples (`trusted_source="training"`), the margin audits the labels
    (`audit_source="training"`, `sap_hf.audit.dynamics_audit`).
    """

    VALUES: tuple[str, ...] = ("total", "margin")
    """The summed values per position: the loss (`total`, the name earlier checkpoints used) and the margin."""

    def __init__(self, size: int, epochs: Optional[int] = None):
        self.size, self.epochs = int(size), epochs
        self.windows: dict[int, dict[str, np.ndarray]] = {}
        self.labels = np.full(self.size, IGNORE_INDEX, dtype=np.int64)

    def _window(self, window: int) -> dict[str, np.ndarray]:
        if window not in self.windows:
            self.windows[window] = {
                **{name: np.zeros(self.size) for name in self.VALUES},
                "count": np.zeros(self.size, dtype=np.int64),
            }
        return self.windows[window]

    def add(
        self, epoch: int, positions: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor
    ) -> None:
        """Record one batch's per-example losses and label margins (labels -100 are not recorded)."""
        window = 0 if self.epochs is None else int(epoch)
        if window not in self.windows and self.epochs is not None:
            for old in [w for w in self.windows if w <= window - self.epochs]:
                del self.windows[old]
        sums = self._window(window)
        labelled = (labels != IGNORE_INDEX).cpu().numpy()
        where = positions.cpu().numpy()[labelled]
        for name, values in (("total", losses), ("margin", margins)):
            np.add.at(sums[name], where, values.detach().double().cpu().numpy()[labelled])
        np.add.at(sums["count"], where, 1)
        self.labels[where] = labels.cpu().numpy()[labelled]

    def summary(self) -> dict[str, np.ndarray]:
        """The recorded positions with their summed loss and margin, count and label (what each process hands to
        the merge)."""
        sums = {
            name: sum((w[name] for w in self.windows.values()), np.zeros(self.size, dtype=dtype))
            for name, dtype in [*((n, np.float64) for n in self.VALUES), ("count", np.int64)]
        }
        seen = np.flatnonzero(sums["count"])
        return {
            "positions": seen,
            **{name: values[seen] for name, values in sums.items()},
            "labels": self.labels[seen],
        }

    def save(self, folder: Any, rank: int) -> Path:
        """Write this process's record into a checkpoint `folder` (`RECORD_FILE`)."""
        path = Path(folder) / RECORD_FILE.format(rank=rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "size": np.array(self.size),
            "epochs": np.array(-1 if self.epochs is None else self.epochs),
            "labels": self.labels,
            "windows": np.array(sorted(self.windows), dtype=np.int64),
        }
        for window, sums in self.windows.items():
            arrays.update({f"{name}_{window}": values for name, values in sums.items()})
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    def restore(self, folder: Any) -> Optional[str]:
        """Add the records saved in checkpoint `folder` (every process's: the merge sums them); None, or why not."""
        paths = sorted(Path(folder).glob(RECORD_FILE.format(rank="*")))
        if not paths:
            return "it holds no recorded losses (saved without trusted_source='training', or by another trainer)"
        loaded = []
        for path in paths:
            with np.load(path) as record:
                epochs = None if int(record["epochs"]) < 0 else int(record["epochs"])
                if int(record["size"]) != self.size or epochs != self.epochs:
                    return (
                        f"its losses were recorded for {int(record['size'])} examples and training_loss_epochs="
                        f"{epochs}, this run has {self.size} and {self.epochs}"
                    )
                windows = record["windows"].tolist()
                if any(f"margin_{w}" not in record.files for w in windows):
                    return "it was saved by an earlier sap_hf that recorded no label margins"
                loaded.append({key: record[key] for key in record.files})
        for record in loaded:
            for window in record["windows"].tolist():
                sums = self._window(window)
                for name in sums:
                    sums[name] += record[f"{name}_{window}"]
            labelled = record["labels"] != IGNORE_INDEX
            self.labels[labelled] = record["labels"][labelled]
        return None


class RecordSaver(TrainerCallback):
    """Writes each process's record into every checkpoint the Trainer saves (`on_save` follows each save).

    `record()` gives the trainer's current `TrainingLosses` (a new one each `train()`), or None: nothing to write.
    """

    def __init__(self, record: Callable[[], Optional[TrainingLosses]]):
        self.record = record

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        record = self.record()
        if record is not None:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            record.save(folder, args.process_index)


def merge_losses(
    shards: list[dict[str, np.ndarray]], value: str = "total"
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Every process's record -> (positions, mean of `value` (the loss; "margin": the label margin), label), each
    position once (a position two processes saw, as a distributed sampler's padding repeats a few, has its values
    averaged over both)."""
    positions = np.concatenate([s["positions"] for s in shards]) if shards else np.zeros(0, dtype=np.int64)
    if positions.size == 0:
        return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    unique, inverse = np.unique(positions, return_inverse=True)
    total, count = np.zeros(len(unique)), np.zeros(len(unique), dtype=np.int64)
    labels = np.zeros(len(unique), dtype=np.int64)
    np.add.at(total, inverse, np.concatenate([s[value] for s in shards]))
    np.add.at(count, inverse, np.concatenate([s["count"] for s in shards]))
    labels[inverse] = np.concatenate([s["labels"] for s in shards])
    return unique.tolist(), torch.from_numpy(total / count), torch.from_numpy(labels)
