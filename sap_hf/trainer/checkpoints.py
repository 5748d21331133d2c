"""Exact weights from a Trainer checkpoint: `load_best_model_at_end` and `resume_from_checkpoint`.

`Trainer` reads a checkpoint's `model.safetensors` itself and loads it with
`load_state_dict(strict=False)`. Since transformers 5, `save_pretrained` writes some models (ViT
among them) with their legacy parameter names (`vit.encoder.layer.0.attention.attention.query`)
while the live modules carry the new ones (`vit.layers.0.attention.q_proj`): only the names both
share (embeddings, head) come back, the encoder keeps the last epoch's (or the initial) weights,
and a missing-keys line in the log is the only sign. `from_pretrained` converts the names.

`CheckpointWeights` is a `TrainerCallback` that, after the Trainer's own load, reads the
checkpoint's names; when they are not the live model's, it loads the checkpoint through
`type(model).from_pretrained` (which renames) and copies every tensor in with `strict=True`.
Where the names match (transformers 4.x, or once transformers loads checkpoints through the
conversion) it does nothing. It does not act for PEFT models (the Trainer loads the adapter
through PEFT, which names the tensors as the live model does), DeepSpeed or FSDP (they load
their own sharded states), nor for a checkpoint that holds no `model.safetensors` / `pytorch_model.bin`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging


logger = logging.get_logger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


def checkpoint_names(folder: Union[str, os.PathLike]) -> Optional[set[str]]:
    """The tensor names a checkpoint folder stores (read from headers, no tensor loaded); None: no weights file."""
    for index in (SAFE_INDEX, TORCH_INDEX):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as handle:
                return set(json.load(handle)["weight_map"])
    path = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    path = os.path.join(folder, TORCH_WEIGHTS)
    if os.path.isfile(path):
        return set(torch.load(path, map_location="cpu", weights_only=True))
    return None


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_checkpoint_weights(model: nn.Module, folder: Union[str, os.PathLike]) -> bool:
    """Make `model`'s weights exactly those saved in `folder`, whatever names the file uses; True if it had to load.

    Nothing is loaded when the checkpoint's names are the model's own (the Trainer's plain load was
    then complete), when the model is a PEFT model or not a `PreTrainedModel`, or when the folder
    holds no full weights file. When renaming leaves a parameter without a saved value, nothing is
    copied and a warning names it: a partial copy would silently mix two models.
    """
    if _is_peft(model) or not isinstance(model, PreTrainedModel):
        return False
    saved = checkpoint_names(folder)
    live = model.state_dict()
    if saved is None or saved >= set(live):
        return False
    loaded, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True)
    state = loaded.state_dict()
    missing = sorted(set(info.get("missing_keys", ())) | (set(live) - set(state)))
    if missing:
        logger.warning(
            "The checkpoint %s names its tensors differently from the model and from_pretrained could not map %s: "
            "the model keeps what Trainer loaded (possibly not the checkpoint's weights). Reload it with "
            "%s.from_pretrained(%r).",
            folder,
            missing[:5],
            type(model).__name__,
            str(folder),
        )
        return False
    with torch.no_grad():
        model.load_state_dict(state, strict=True)  # copies in place: the optimizer and any wrapper keep their tensors
    logger.info(
        "Loaded %s with its legacy tensor names converted (Trainer's own load left %d tensors unloaded).",
        folder,
        len(set(live) - saved),
    )
    return True


class CheckpointWeights(TrainerCallback):
    """Completes the Trainer's checkpoint loads: the resumed checkpoint at train begin, the best one at train end.

    `resume_from_checkpoint` is set by `SAPTrainer.train` (`arm`) from its argument; the Trainer
    has loaded that checkpoint before `on_train_begin`, and the best one (with `load_best_model_at_end`)
    before `on_train_end`, so this callback only finishes what those loads left out.
    """

    def __init__(self, uses_own_loading: Any = None) -> None:
        self.resume_from_checkpoint: Optional[str] = None
        self.uses_own_loading = uses_own_loading  # () -> bool: DeepSpeed / FSDP, whose loads are theirs

    def arm(self, args: tuple, kwargs: dict, output_dir: str) -> None:
        """Remember the checkpoint `Trainer.train(*args, **kwargs)` resumes from (`True`: output_dir's last one)."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(resume, bool):
            resume = get_last_checkpoint(output_dir) if resume else None
        self.resume_from_checkpoint = None if resume is None else str(resume)

    def _skip(self) -> bool:
        return bool(self.uses_own_loading is not None and self.uses_own_loading())

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if self.resume_from_checkpoint and model is not None and not self._skip():
            load_checkpoint_weights(model, self.resume_from_checkpoint)
        self.resume_from_checkpoint = None

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isdir(best) and model is not None and not self._skip():
            load_checkpoint_weights(model, best)


def install(trainer: Any) -> CheckpointWeights:
    """Add a `CheckpointWeights` to `trainer`, first among its callbacks (before reporters that read the model)."""
    callback = CheckpointWeights(lambda: bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled))
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
