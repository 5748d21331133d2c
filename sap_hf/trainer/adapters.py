"""A `Trainer` holding a PEFT model: SAP corrects the merged model, and the Trainer must hold that one.

The merge itself (W + s·B·A, checks, `modules_to_save`) is `sap_hf.core.adapters.merge_adapters`.
"""

from __future__ import annotations

from typing import Any

from transformers.utils import logging

from ..core.adapters import merge_adapters


logger = logging.get_logger(__name__)


def merge_trainer_adapters(trainer: Any) -> None:
    """A Trainer holding a PEFT model: make the merged model its `model` (and `model_wrapped`).

    Then the evaluations of the alpha search run the very model SAP corrects, and
    `save_model()` writes that whole corrected model instead of the adapters alone.
    """
    merged = merge_adapters(trainer.model)
    if merged is trainer.model:
        return
    trainer.model = merged
    trainer.model_wrapped = merged
    logger.warning(
        "SAPTrainer.correct(): trainer.model is now the merged %s (adapters merged); save_model() writes the whole "
        "corrected model.",
        type(merged).__name__,
    )
