"""Noise-robust training losses that plug into `transformers.Trainer(compute_loss_func=...)`.

SAP corrects a model *after* training; users who fight label noise usually try a robust loss
*during* training first. This module gives the two standard ones, so the two can be combined and
compared (the SAP paper reports SAP still helps models trained with them):

* **GCE**, generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018):
  `L_q = (1 - p_y^q) / q`, `q in (0, 1]`. `q -> 0` is cross-entropy, `q = 1` is the mean absolute
  error `1 - p_y`; in between, samples the model finds unlikely (often the mislabelled ones) get a
  gradient damped by `p_y^q`. The paper's default `q = 0.7`.
* **SCE**, symmetric cross-entropy (Wang et al., ICCV 2019): `alpha * CE + beta * RCE`, with the
  reverse cross-entropy `RCE = -sum_k p_k log y_k` of the one-hot label `y`, where `log 0` is
  clamped to a constant `A < 0`. Since `log 1 = 0`, `RCE = -A (1 - p_y)`: a bounded, MAE-like
  term. The paper's defaults `alpha = 0.1, beta = 1.0, A = -4` (its public code clamps the one-hot
  label at 1e-4 instead, i.e. `A = log 1e-4 ~ -9.2`; we follow the paper's text).
* **Label smoothing** is already in `transformers`: `TrainingArguments(label_smoothing_factor=...)`
  with the default cross-entropy (`loss="ce"`). It is not re-implemented here.

Every loss follows transformers' convention for gradient accumulation: the per-sample losses of
labels other than `ignore_index` (-100) are SUMMED and divided by `num_items_in_batch` (the number
of labelled items in the whole accumulated batch, which `Trainer` passes to `compute_loss_func`),
or averaged over the micro-batch when it is `None`. `Trainer` then treats the loss as already
scaled for gradient accumulation, so k micro-batches give exactly the gradient of one batch k
times larger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .runtime.contract import IGNORE_INDEX
from .runtime.modeling import logits_of
from .utils.checks import check_choice, finite_float, invalid, positive_float


LOSSES: tuple[str, ...] = ("ce", "gce", "sce")
_LOSS_PARAMETERS: dict[str, tuple[str, ...]] = {
    "ce": (),
    "gce": ("gce_q",),
    "sce": ("sce_alpha", "sce_beta", "sce_log_zero"),
}
_LOSS_TITLES = {
    "ce": "cross-entropy",
    "gce": "generalized cross-entropy (GCE, Zhang & Sabuncu 2018)",
    "sce": "symmetric cross-entropy (SCE, Wang et al. 2019)",
}


@dataclass
class LossConfig:
    """Which loss trains the model: cross-entropy (`ce`, Trainer's own) or a noise-robust one.

    HfArgumentParser-friendly (every field has `help`), validated in `__post_init__`. Only the
    parameters of the chosen loss are used (and recorded). Label smoothing goes through
    `TrainingArguments.label_smoothing_factor` with `loss="ce"`.
    """

    loss: str = field(
        default="ce",
        metadata={
            "help": (
                "Training loss: 'ce' (cross-entropy, the Trainer's own; combine with label_smoothing_factor for "
                "label smoothing), 'gce' (generalized cross-entropy, Zhang & Sabuncu 2018: gce_q) or 'sce' "
                "(symmetric cross-entropy, Wang et al. 2019: sce_alpha, sce_beta, sce_log_zero)."
            )
        },
    )
    gce_q: float = field(
        default=0.7,
        metadata={
            "help": "GCE exponent q in (0, 1]: q -> 0 is cross-entropy, q = 1 is MAE (1 - p_y). The paper uses 0.7."
        },
    )
    sce_alpha: float = field(
        default=0.1, metadata={"help": "SCE weight (> 0) of the cross-entropy term (paper: 0.1)."}
    )
    sce_beta: float = field(
        default=1.0, metadata={"help": "SCE weight (> 0) of the reverse cross-entropy term (paper: 1.0)."}
    )
    sce_log_zero: float = field(
        default=-4.0,
        metadata={"help": "SCE's clamp A < 0 of log(0) in the reverse cross-entropy, RCE = -A (1 - p_y) (paper: -4)."},
    )

    def __post_init__(self) -> None:
        self.loss = check_choice(
            "LossConfig.loss",
            self.loss,
            LOSSES,
            "(label smoothing: loss='ce' with TrainingArguments.label_smoothing_factor.)",
        )
        self.gce_q = finite_float("LossConfig.gce_q", self.gce_q)
        if not 0.0 < self.gce_q <= 1.0:
            raise invalid(
                "LossConfig.gce_q",
                self.gce_q,
                "use a number in (0, 1] (0.7 in Zhang & Sabuncu 2018; q -> 0 is cross-entropy, q = 1 is MAE).",
            )
        for name in ("sce_alpha", "sce_beta"):
            setattr(
                self,
                name,
                positive_float(
                    f"LossConfig.{name}",
                    getattr(self, name),
                    "It is a weight (Wang et al. 2019: sce_alpha=0.1, sce_beta=1.0).",
                ),
            )
        self.sce_log_zero = finite_float("LossConfig.sce_log_zero", self.sce_log_zero)
        if self.sce_log_zero >= 0:
            raise invalid(
                "LossConfig.sce_log_zero",
                self.sce_log_zero,
                "use a negative number: it stands for log(0) (paper: -4).",
            )

    def parameters(self) -> dict[str, float]:
        """The parameters the chosen loss uses (what a record should show)."""
        return {name: getattr(self, name) for name in _LOSS_PARAMETERS[self.loss]}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """`'generalized cross-entropy (GCE, ...) with gce_q=0.7'`: for logs and model cards."""
        params = ", ".join(f"{k}={v:g}" for k, v in self.parameters().items())
        return _LOSS_TITLES[self.loss] + (f" with {params}" if params else "")


def _reduce(per_item: torch.Tensor, valid: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """Sum over the labelled items / `num_items_in_batch` (or their count when None), as transformers does."""
    total = per_item.masked_fill(~valid, 0.0).sum()
    if num_items_in_batch is None:
        return total / valid.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _label_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_y per item (float32 at least) and the mask of labelled items; logits (..., C), labels (...)."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}: the losses take "
            "one integer class label per row of logits (single-label classification)."
        )
    log_probs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    valid = labels != ignore_index
    index = labels.masked_fill(~valid, 0).long().unsqueeze(-1)
    return log_probs.gather(-1, index).squeeze(-1), valid


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: Any = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy `-log p_y` with the same reduction as the robust losses (the `ce` baseline)."""
    log_p, valid = _label_log_probs(logits, labels, ignore_index)
    return _reduce(-log_p, valid, num_items_in_batch)


def generalized_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    q: float = 0.7,
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """GCE `(1 - p_y^q) / q` (Zhang & Sabuncu 2018); `p_y^q` as `exp(q log p_y)` for stability."""
    log_p, valid = _label_log_probs(logits, labels, ignore_index)
    return _reduce(-torch.expm1(q * log_p) / q, valid, num_items_in_batch)


def symmetric_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """SCE `alpha * CE + beta * RCE` (Wang et al. 2019), `RCE = -log_zero * (1 - p_y)`."""
    log_p, valid = _label_log_probs(logits, labels, ignore_index)
    per_item = alpha * (-log_p) + beta * (-log_zero) * (-torch.expm1(log_p))
    return _reduce(per_item, valid, num_items_in_batch)


class RobustLoss:
    """The loss of a `LossConfig` as a `Trainer` `compute_loss_func`: `(outputs, labels, num_items_in_batch)`.

    `outputs` may be a model output with `logits`, a tuple whose first item is the logits, or the
    logits tensor itself (for plain torch loops).

    Example:
        trainer = SAPTrainer(model=model, args=args, ..., compute_loss_func=RobustLoss(LossConfig(loss="gce")))
    """

    def __init__(self, config: Optional[LossConfig] = None, ignore_index: int = IGNORE_INDEX):
        self.config = config if config is not None else LossConfig()
        self.ignore_index = ignore_index

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"{self!r} needs labels: the batches must carry a 'labels' column.")
        logits, c = logits_of(outputs), self.config
        kwargs = {"num_items_in_batch": num_items_in_batch, "ignore_index": self.ignore_index}
        if c.loss == "gce":
            return generalized_cross_entropy(logits, labels, c.gce_q, **kwargs)
        if c.loss == "sce":
            return symmetric_cross_entropy(logits, labels, c.sce_alpha, c.sce_beta, c.sce_log_zero, **kwargs)
        return cross_entropy(logits, labels, **kwargs)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in self.config.parameters().items())
        return f"RobustLoss(loss={self.config.loss!r}{', ' + params if params else ''})"


def make_loss_func(config: Optional[LossConfig], label_smoothing_factor: float = 0.0) -> Optional[RobustLoss]:
    """What to pass as `Trainer(compute_loss_func=...)` for `config`: None for 'ce' (the model's own
    loss, or `TrainingArguments.label_smoothing_factor`'s smoother), a `RobustLoss` otherwise.

    Raises when a robust loss is combined with label smoothing: `Trainer` silently skips its label
    smoother whenever `compute_loss_func` is set, so the smoothing would be lost without a word.
    """
    if config is None or config.loss == "ce":
        return None
    loss_func = RobustLoss(config)
    check_label_smoothing(loss_func, label_smoothing_factor)
    return loss_func


def check_label_smoothing(loss_func: Optional[Callable], label_smoothing_factor: float) -> None:
    """Refuse label smoothing together with a `compute_loss_func`, which would silently drop it."""
    if loss_func is not None and label_smoothing_factor:
        raise ValueError(
            f"TrainingArguments.label_smoothing_factor={label_smoothing_factor!r} cannot be combined with "
            f"compute_loss_func={loss_func!r}: Trainer ignores label smoothing when a compute_loss_func is given. "
            "Use loss='ce' with label smoothing, or set label_smoothing_factor=0 for a robust loss."
        )


def training_loss_record(loss_func: Optional[Callable], label_smoothing_factor: float = 0.0) -> dict[str, Any]:
    """What trained the model, for the SAP record: `{'loss': 'gce', 'gce_q': 0.7}`,
    `{'loss': 'ce', 'label_smoothing_factor': 0.1}` or `{'loss': 'custom', 'compute_loss_func': 'pkg.fn'}`."""
    if loss_func is None:
        return {"loss": "ce", "label_smoothing_factor": float(label_smoothing_factor or 0.0)}
    if isinstance(loss_func, RobustLoss):
        return {"loss": loss_func.config.loss, **loss_func.config.parameters()}
    name = getattr(loss_func, "__qualname__", None) or type(loss_func).__qualname__
    return {"loss": "custom", "compute_loss_func": f"{getattr(loss_func, '__module__', '?')}.{name}"}


def describe_training_loss(record: Mapping[str, Any]) -> str:
    """One line for a model card from a `training_loss_record`."""
    loss = record.get("loss", "ce")
    if loss == "custom":
        return f"a custom `compute_loss_func` (`{record.get('compute_loss_func')}`)"
    if loss == "ce" and record.get("label_smoothing_factor"):
        return f"cross-entropy with label smoothing {record['label_smoothing_factor']:g}"
    if loss in LOSSES:
        values = {k: record[k] for k in _LOSS_PARAMETERS[loss] if k in record}
        return LossConfig(loss=loss, **values).describe()
    return str(loss)
