"""`SAPTrainer` and the pieces that only a `Trainer` needs, beside it.

* `trainer.py`: `SAPTrainer`, a `Trainer` subclass on public hooks: `correct()`, audit, refine, the SAP record on save.
* `recorded.py`: per-example training losses and label margins recorded while it trains (`SAPConfig(trusted_source=
  "training")` selects from the losses, `audit_source="training"` audits the labels by the margins).
* `evaluation.py`: its evaluations (alpha search, refine): `compute_metrics` on a pass every process shares.
* `adapters.py`: a PEFT model's adapters merged into the model the Trainer holds.
* `checkpoints.py`: exact weights when the Trainer reloads a checkpoint (best model, resume).
"""

from .evaluation import accuracy_metrics
from .trainer import SAPTrainer


__all__ = ["SAPTrainer", "accuracy_metrics"]
