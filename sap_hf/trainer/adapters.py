"""A `Trainer` holding a PEFT model: SAP corrects the merged model, and the Trainer must hold that one.

The merge itself (W + s·B·A, checks, `modules_to_save`) is `sap_hf.core.adapters.merge_adapters`.
"""

from __future__ import annotations

from typing import Any

from transformers.utils import logging

from ..core.adapters import is_peft_model, merge_adapters


logger = logging.get_logger(__name__)


def merge_trainer_adapters(trainer: Any) -> None:
    """A Trainer holding a PEFT model: make the merged model its `model` (and `model_wrapped`).

    Then the evaluations of the alpha search run the very model SAP corrects, and
    `save_model()` writes that whole corrected model instead of the adapters alone. The optimizer and schedule of an
    earlier `train()` are dropped: they hold the adapter weights the merge removed, so a later `train()` kept stepping
    those (only a `modules_to_save` head moved) while the merged weights stayed put; it now makes new ones.
    """
    if not is_peft_model(trainer.model):
        return
    merged = merge_adapters(trainer.model)
    trainer.model = merged
    trainer.model_wrapped = merged
    trainer.optimizer, trainer.lr_scheduler = None, None
    logger.warning(
        "SAPTrainer.correct(): trainer.model is now the merged %s (adapters merged); save_model() writes the whole "
        "corrected model, and a later train() trains all of its weights with a new optimizer.",
        type(merged).__name__,
    )
