"""Clean-up after SAP (`refine`): fine-tune the corrected model with `transformers.Trainer`, learning from every image.

SAP removes memorised noise but uses no labels, so it stops short of a model trained on clean
data. The corrected model's label audit (`sap_hf.audit`) says which training labels look wrong;
`refine` then fine-tunes the corrected model on the training data, in one of these modes:

* `remove`: the suspected examples are dropped (40% of the images teach nothing at 40% noise);
* `relabel`: a suspected example takes the corrected model's class where it is confident, else is dropped;
* `soft`: every example is kept with a soft target, its given label mixed with the corrected model's
  sharpened probabilities in proportion to the probability the model gives the given label (label
  refinement, as in DivideMix);
* `pseudo`: unsuspected examples keep their labels; the suspected ones are unlabelled data, each
  trained to predict, on a strongly augmented view, the class the model itself gives a weakly
  augmented view when it is confident (FixMatch consistency).

The corrected model is the teacher (the audit's probabilities, for `soft`) and the starting point.
Modes, learning rates and length are chosen on a clean validation split, and "no change" (the SAP
model) stays a candidate, so refine never hands back a model worse on validation than its input.

Each run is a `transformers.Trainer` (`CleanupTrainer`): mixed precision, gradient accumulation,
DDP, gradient clipping (`max_grad_norm`) and the optimiser come from the `TrainingArguments` given
(a `SAPTrainer` gives its own); `RefineConfig` holds only what is the clean-up's own. Trainer reports
nothing of its own (`refine` returns every trial; `SAPTrainer.refine` logs them). The loss of a batch
is its per-example sum over the global example count (one all-reduce of the count), and each image's
augmentation is seeded by its position and the step, so one and several processes make the same
update when the global batch is the same and divides the data (accelerate pads an uneven last batch
with repeated examples; with gradient accumulation the update is a mean of micro-batch means).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.state import PartialState
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from ..core.search import maximises
from ..data.augment import STRONG_DRAWS, WEAK_DRAWS, hashed_uniform, strong_view, weak_view
from ..runtime.batching import Collator, examples_and_collate, fetch_examples
from ..runtime.contract import ExampleStream, LoaderData, as_pass_data, is_map_style
from ..runtime.modeling import logits_of
from ..runtime.passes import Runtime, resolve_runtime
from ..utils.checks import check_choice, finite_float, invalid, positive_float, positive_int
from .labels import LabelAudit


logger = logging.get_logger(__name__)

MODES: tuple[str, ...] = ("remove", "relabel", "soft", "pseudo")
BEST_MODES: tuple[str, ...] = ("remove", "pseudo")
"""What `mode="best"` tries (benchmarks/studies/cleanup.md, "Learning from the doubted images" measured every mode)."""
REFINE_MODES: tuple[str, ...] = (*MODES, "best")

TARGET_COLUMN = "sap_cleanup_target"
"""Each training example's soft target (a probability vector; all zeros for an unlabelled example)."""
UNLABELLED_COLUMN = "sap_cleanup_unlabelled"
"""1 for an example whose label is not used (`pseudo`: the suspected ones), 0 otherwise."""
POSITION_COLUMN = "sap_cleanup_position"
"""Each example's position in the training data: with the step, it seeds the example's augmentation."""


@dataclass
class RefineConfig:
    """The clean-up's own settings; batch size, optimiser, schedule, precision and seed come from `TrainingArguments`."""

    mode: Union[str, list[str]] = field(
        default="best",
        metadata={
            "help": (
                f"One of {list(MODES)}, a list of them, or 'best' (= {list(BEST_MODES)}): each is tried and the eval set "
                "picks one. 'remove' drops the suspected examples; 'relabel' gives a suspect the corrected model's class "
                "when its probability >= relabel_threshold; 'soft' trains every example on its label mixed with the "
                "corrected model's sharpened probabilities; 'pseudo' treats the suspects as unlabelled images trained "
                "to agree, on a strong augmentation, with the model's confident prediction on a weak one (FixMatch)."
            )
        },
    )
    learning_rates: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": (
                "Learning rates tried; the eval set picks one. None: SAPTrainer.refine uses its "
                "TrainingArguments.learning_rate x 1 and x 2; sap_hf.refine() needs them given."
            )
        },
    )
    epochs: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 6, 8],
        metadata={
            "help": "Epochs after which the eval set is measured; the largest is the run length (the schedule "
            "spans it). Epoch 0 (no change) is a candidate."
        },
    )
    relabel_threshold: float = field(
        default=0.9,
        metadata={
            "help": "mode='relabel': relabel a suspect when the corrected model gives its class at least this probability."
        },
    )
    temperature: float = field(
        default=0.5,
        metadata={
            "help": "mode='soft': sharpening temperature of the corrected model's probabilities (DivideMix: 0.5)."
        },
    )
    pseudo_threshold: float = field(
        default=0.95,
        metadata={
            "help": "mode='pseudo': an unlabelled image trains only when the weak view's top probability is at least "
            "this (FixMatch: 0.95)."
        },
    )
    unlabelled_weight: float = field(
        default=1.0,
        metadata={"help": "mode='pseudo': weight of the unlabelled images' loss beside the labelled ones'."},
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "Train on a weakly augmented view (flip, shift by 1/8 of the side) of every image, in every "
            "mode ('pseudo' always augments its unlabelled images)."
        },
    )

    def __post_init__(self) -> None:
        self.mode = _check_modes(self.mode)
        if self.learning_rates is not None:
            rates = (
                [self.learning_rates]
                if np.ndim(self.learning_rates) == 0
                else list(np.asarray(self.learning_rates).tolist())
            )
            if not rates:
                raise invalid(
                    "RefineConfig.learning_rates",
                    self.learning_rates,
                    "give positive finite numbers, e.g. [1e-4, 3e-4].",
                )
            self.learning_rates = [
                positive_float("RefineConfig.learning_rates", lr, "e.g. [1e-4, 3e-4].") for lr in rates
            ]
        epochs = [self.epochs] if np.ndim(self.epochs) == 0 else list(self.epochs)
        if not epochs:
            raise invalid("RefineConfig.epochs", self.epochs, "give positive integers, e.g. [1, 2, 4, 8].")
        self.epochs = sorted({positive_int("RefineConfig.epochs", e, "e.g. [1, 2, 4, 8].") for e in epochs})
        for name in ("relabel_threshold", "pseudo_threshold"):
            value = finite_float(f"RefineConfig.{name}", getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise invalid(f"RefineConfig.{name}", getattr(self, name), "use a probability in (0, 1].")
            setattr(self, name, value)
        self.temperature = positive_float("RefineConfig.temperature", self.temperature, "e.g. 0.5.")
        self.unlabelled_weight = finite_float("RefineConfig.unlabelled_weight", self.unlabelled_weight)
        if self.unlabelled_weight < 0:
            raise invalid("RefineConfig.unlabelled_weight", self.unlabelled_weight, "use a number >= 0, e.g. 1.0.")

    @property
    def modes(self) -> list[str]:
        """The modes tried, in order."""
        return (
            list(BEST_MODES)
            if self.mode == "best"
            else ([self.mode] if isinstance(self.mode, str) else list(self.mode))
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_modes(mode: Any) -> Union[str, list[str]]:
    if isinstance(mode, str):
        return check_choice("RefineConfig.mode", mode, REFINE_MODES)
    modes = list(mode) if isinstance(mode, (list, tuple)) else None
    if not modes:
        raise invalid(
            "RefineConfig.mode", mode, f"use one of {list(REFINE_MODES)} or a non-empty list of {list(MODES)}."
        )
    return list(dict.fromkeys(check_choice("RefineConfig.mode", m, MODES) for m in modes))


@dataclass
class RefineResult:
    """What the clean-up did: the chosen mode, lr and length, how many labels it kept/removed/changed, every trial.

    `cost_epochs`: forward + backward passes of all runs, in epochs of the training set (an unlabelled
    image of `pseudo` counts twice: its weak and its strong view).
    """

    mode: Optional[str]
    learning_rate: Optional[float]
    epochs: int
    baseline_metrics: dict[str, float]
    final_metrics: dict[str, float]
    examples: dict[str, dict[str, int]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    cost_epochs: float = 0.0

    @property
    def changed(self) -> bool:
        return self.epochs > 0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), changed=self.changed)


# ----------------------------------------------------------------------------------------------
# Plans: which examples train, on which target (pure functions of the audit)
# ----------------------------------------------------------------------------------------------


@dataclass
class CleanupPlan:
    """The training examples of one mode: positions in the training data, soft targets, which are unlabelled."""

    positions: list[int]
    targets: torch.Tensor
    unlabelled: torch.Tensor
    given: Optional[list[int]] = None  # the audit's label of each example: checked against the data's as it is read

    def __len__(self) -> int:
        return len(self.positions)

    def hard_labels(self) -> dict[int, int]:
        """Position -> the class of its target, for the labelled examples."""
        labels = self.targets.argmax(1).tolist()
        return {p: y for p, y, u in zip(self.positions, labels, self.unlabelled.tolist()) if not u}

    def counts(self, audit: LabelAudit) -> dict[str, int]:
        given = dict(zip(audit.indices.tolist(), audit.given.tolist()))
        labels = self.hard_labels()
        return {
            "kept": len(labels),
            "removed": len(audit) - len(self),
            "unlabelled": int(self.unlabelled.sum()),
            "relabelled": sum(1 for p, y in labels.items() if given[p] != y),
        }


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """`p^(1/T)` renormalised per row (T < 1 sharpens)."""
    logits = probs.clamp_min(1e-12).log() / temperature
    return logits.softmax(-1)


def cleanup_plan(audit: LabelAudit, mode: str, config: Optional[RefineConfig] = None) -> CleanupPlan:
    """The examples and targets `mode` trains on, from the audit of the corrected model."""
    config = config or RefineConfig()
    check_choice("mode", mode, MODES)
    probs = audit.probs.double()
    onehot = F.one_hot(audit.given, probs.shape[1]).double()
    keep = ~audit.suspected
    unlabelled = torch.zeros_like(keep)
    targets = onehot.clone()
    if mode == "relabel":
        confident = audit.suspected & (probs.max(1).values >= config.relabel_threshold)
        targets[confident] = F.one_hot(audit.predicted[confident], probs.shape[1]).double()
        keep = keep | confident
    elif mode == "soft":
        trust = audit.prob_given.double()[:, None]  # the corrected model's probability of the given label
        targets = trust * onehot + (1 - trust) * sharpen(probs, config.temperature)
        keep = torch.ones_like(keep)
    elif mode == "pseudo":
        unlabelled = audit.suspected.clone()
        targets[unlabelled] = 0.0
        keep = torch.ones_like(keep)
    order = torch.argsort(audit.indices)  # positions ascending: the data's order
    chosen = order[keep[order]]
    return CleanupPlan(
        positions=audit.indices[chosen].tolist(),
        targets=targets[chosen].float(),
        unlabelled=unlabelled[chosen],
        given=audit.given[chosen].tolist(),
    )


def cleaned_labels(audit: LabelAudit, mode: str, relabel_threshold: float = 0.9) -> dict[int, int]:
    """Global index -> hard label to train on for `remove`/`relabel`; indices absent are dropped."""
    check_choice("mode", mode, ("remove", "relabel"))
    return cleanup_plan(audit, mode, RefineConfig(relabel_threshold=relabel_threshold)).hard_labels()


# ----------------------------------------------------------------------------------------------
# The data a run trains on, and its collator
# ----------------------------------------------------------------------------------------------


def _with_target(
    example: Any, position: int, target: torch.Tensor, unlabelled: bool, given: Optional[int] = None
) -> dict[str, Any]:
    if not isinstance(example, Mapping):
        raise ValueError(
            f"refine trains on examples that are dicts of columns (pixel_values, label); got a {type(example).__name__}."
        )
    _check_given(example, position, given)
    hard = -100 if unlabelled else int(target.argmax())  # for collators that read a label; not trained on
    keys = [k for k in ("label", "labels") if k in example] or ["labels"]
    example = {**example, **{k: hard for k in keys}}
    example[TARGET_COLUMN] = target
    example[UNLABELLED_COLUMN] = int(unlabelled)
    example[POSITION_COLUMN] = int(position)
    return example


def _check_given(example: Mapping, position: int, given: Optional[int]) -> None:
    """The example at `position` carries the label the audit saw there; else the audit is of other data or another
    order (a shuffled or filtered copy), and every target would land on the wrong image."""
    label = next((example[k] for k in ("labels", "label") if k in example), None)
    if given is None or label is None:
        return
    try:
        label = int(label.item() if hasattr(label, "item") else label)
    except (TypeError, ValueError):  # a label the audit mapped (e.g. a class name): not comparable here
        return
    if label != given:
        raise ValueError(
            f"train_data's example at position {position} has label {label}, but the audit saw label {given} there: "
            "the audit was made on other data or another order (a shuffled, filtered or re-split copy). Pass the "
            "audit of this very train_data (audit_labels(model, train_data)), in the same order."
        )


class PlanExamples(torch.utils.data.Dataset):
    """The examples of a plan from indexable data, each carrying its target: what the Trainer shuffles."""

    def __init__(self, data: Any, plan: CleanupPlan):
        self.data, self.plan = data, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        positions = [self.plan.positions[i] for i in indices]
        examples = fetch_examples(self.data, positions)
        given = self.plan.given
        return [
            _with_target(
                e, p, self.plan.targets[i], bool(self.plan.unlabelled[i]), given[i] if given is not None else None
            )
            for e, p, i in zip(examples, positions, indices)
        ]


class PlanStream(torch.utils.data.IterableDataset):
    """The examples of a plan from a stream, in stream order (a stream has no positions to shuffle)."""

    def __init__(self, data: Any, plan: CleanupPlan):
        self.data, self.plan = data, plan
        self.row = {p: i for i, p in enumerate(plan.positions)}

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position, example in enumerate(self.data):
            row = self.row.get(position)
            if row is not None:
                given = self.plan.given[row] if self.plan.given is not None else None
                yield _with_target(example, position, self.plan.targets[row], bool(self.plan.unlabelled[row]), given)


class PlanCollator:
    """The user's collator on the examples without the plan's columns; those come back as tensors."""

    def __init__(self, collate: Collator):
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [dict(f) for f in features]
        targets = torch.stack([torch.as_tensor(f.pop(TARGET_COLUMN)) for f in features])
        unlabelled = torch.tensor([f.pop(UNLABELLED_COLUMN) for f in features], dtype=torch.bool)
        positions = torch.tensor([f.pop(POSITION_COLUMN) for f in features], dtype=torch.long)
        batch = dict(self.collate(features))
        batch[TARGET_COLUMN], batch[UNLABELLED_COLUMN], batch[POSITION_COLUMN] = targets.float(), unlabelled, positions
        return batch


# ----------------------------------------------------------------------------------------------
# The Trainer of one run
# ----------------------------------------------------------------------------------------------


class CleanupTrainer(Trainer):
    """A `Trainer` whose loss is the clean-up's: soft-target cross-entropy, plus FixMatch on the unlabelled examples.

    Only `compute_loss` is overridden (why: the targets are soft and the unlabelled examples need two views).
    """

    def __init__(self, *args: Any, refine_config: RefineConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.refine_config = refine_config
        self.model_accepts_loss_kwargs = (
            False  # our loss is normalised here; Trainer only divides by accumulation steps
        )
        self.loss_is_scaled_for_ga = False
        self.passes = 0  # examples forwarded and backpropagated by this process (the cost)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        config = self.refine_config
        targets = inputs.pop(TARGET_COLUMN).float()
        unlabelled = inputs.pop(UNLABELLED_COLUMN).bool()
        positions = inputs.pop(POSITION_COLUMN)
        pixels = inputs["pixel_values"]
        salt = (self.args.seed * 1_000_003 + self.state.global_step) * 2  # per step; an image's draws are its own
        views = [weak_view(pixels, hashed_uniform(positions, salt, WEAK_DRAWS)) if config.augment else pixels]
        if unlabelled.any():
            views.append(
                strong_view(pixels[unlabelled], hashed_uniform(positions[unlabelled], salt + 1, STRONG_DRAWS))
            )
        logits = logits_of(model(pixel_values=torch.cat(views))).float()
        count = pixels.shape[0]
        self.passes += count + int(unlabelled.sum())
        first = logits[:count]
        total = -(targets * first.log_softmax(-1)).sum()  # unlabelled rows have all-zero targets
        if unlabelled.any():
            with torch.no_grad():
                confidence, pseudo = first[unlabelled].softmax(-1).max(-1)
                confident = (confidence >= config.pseudo_threshold).float()
            strong = F.cross_entropy(logits[count:], pseudo, reduction="none")
            total = total + config.unlabelled_weight * (strong * confident).sum()
        world = self.accelerator.num_processes
        if world > 1:  # the global batch's example count: DDP averages the processes' gradients
            count = self.accelerator.reduce(torch.tensor(count, device=logits.device), reduction="sum").item()
        loss = total * world / count
        return (loss, {"logits": first}) if return_outputs else loss


class _Checkpoints(TrainerCallback):
    """Calls `on_epoch(epoch)` at the end of each epoch listed (all processes: the evaluation is shared)."""

    def __init__(self, epochs: Sequence[int], on_epoch: Callable[[int], None]):
        self.epochs, self.on_epoch = set(epochs), on_epoch

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = int(round(state.epoch or 0))
        if epoch in self.epochs:
            self.on_epoch(epoch)


def run_arguments(
    args: Optional[TrainingArguments],
    output_dir: str,
    learning_rate: float,
    epochs: int,
    show_progress: bool,
    stream: bool = False,
) -> TrainingArguments:
    """The user's `TrainingArguments` for one clean-up run: its lr and length; Trainer saves, evaluates, reports nothing.

    (`refine` evaluates and reports the trials itself; `SAPTrainer.refine` logs them through its own `log`.)
    A scheduler that needs an eval metric becomes cosine; a stream is read by the main loader process only
    (`PlanStream` numbers the examples by their position, which DataLoader workers would each restart).
    """
    configured = bool(
        PartialState._shared_state
    )  # keep the caller's process group (a new TrainingArguments resets it)
    if args is None:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=64,
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not show_progress,
            accelerator_config={"use_configured_state": configured},
        )
    accelerator_config = args.accelerator_config
    if configured:
        accelerator_config = dataclasses.replace(accelerator_config, use_configured_state=True)
    scheduler = args.lr_scheduler_type
    if str(getattr(scheduler, "value", scheduler)) in ("reduce_lr_on_plateau", "greedy"):
        logger.info(
            "SAP refine: lr_scheduler_type=%s needs an eval metric during training; the clean-up runs use cosine.",
            getattr(scheduler, "value", scheduler),
        )
        scheduler = "cosine"
    workers = 0 if stream else args.dataloader_num_workers
    return dataclasses.replace(
        args,
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=-1,
        eval_strategy="no",
        eval_on_start=False,
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        remove_unused_columns=False,
        logging_strategy="no",
        report_to=[],
        lr_scheduler_type=scheduler,
        dataloader_num_workers=workers,
        accelerator_config=accelerator_config,
        **({"dataloader_persistent_workers": False, "dataloader_prefetch_factor": None} if workers == 0 else {}),
    )


# ----------------------------------------------------------------------------------------------
# refine: every (mode, lr) run, the choice on the eval set
# ----------------------------------------------------------------------------------------------


def baseline_metrics(
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    model: nn.Module,
    metric: str,
    measured: Optional[Mapping[str, float]] = None,
) -> dict:
    """The eval metrics before any fine-tune (`measured`, when the caller has taken them); checks `metric` is among
    them before any training (a missing metric would otherwise fail after the first epoch)."""
    metrics = evaluate_fn(model) if measured is None else measured
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"evaluate_fn(model) returned a {type(metrics).__name__}: it must return a dict of eval metrics, "
            f"e.g. {{'accuracy': 0.91}} (the one refine compares is metric={metric!r})."
        )
    baseline = dict(metrics)
    if metric not in baseline:
        raise ValueError(
            f"metric={metric!r} is not among the eval metrics {sorted(baseline)}: pass one of them as metric= "
            "(SAPTrainer: TrainingArguments.metric_for_best_model)."
        )
    if not math.isfinite(float(baseline[metric])):
        raise ValueError(
            f"evaluate_fn gave {metric}={baseline[metric]} for the model before any fine-tune: no candidate can be "
            "compared with it; check the eval set and the model's outputs (NaN weights or logits)."
        )
    return baseline


def _trial_trainer(
    base: nn.Module,
    data: Any,
    plan: Any,
    collate: Callable,
    config: RefineConfig,
    lr: float,
    args: Optional[TrainingArguments],
    scratch: str,
    runtime: Runtime,
    checkpoint: Callable[[int], None],
) -> CleanupTrainer:
    """The `CleanupTrainer` of one (mode, lr) trial: `plan`'s examples of `data`, `checkpoint(epoch)` at each of
    `config.epochs`."""
    trainer = CleanupTrainer(
        model=base,
        args=run_arguments(
            args, scratch, lr, max(config.epochs), runtime.show_progress, stream=not is_map_style(data)
        ),
        train_dataset=(PlanExamples if is_map_style(data) else PlanStream)(data, plan),
        data_collator=PlanCollator(collate),
        callbacks=[_Checkpoints(config.epochs, checkpoint)],
        refine_config=config,
    )
    if not runtime.show_progress:
        trainer.remove_callback(PrinterCallback)  # its end-of-run line; the trials are logged
    return trainer


def refine(
    model: nn.Module,
    train_data: Any,
    audit: LabelAudit,
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    config: Optional[RefineConfig] = None,
    *,
    args: Optional[TrainingArguments] = None,
    runtime: Optional[Runtime] = None,
    metric: str = "accuracy",
    greater_is_better: Optional[bool] = None,
    baseline: Optional[Mapping[str, float]] = None,
) -> RefineResult:
    """Fine-tune `model` (the SAP-corrected one) on `train_data` as `audit` says; mode, lr and length by `evaluate_fn`.

    `audit` must come from `audit_labels(model, train_data)` (the indices are positions in
    `train_data`). `evaluate_fn(model) -> metrics` measures a clean validation split. `args`: the
    `TrainingArguments` of each run (batch size, optimiser, schedule, precision, seed, `report_to`;
    default: batch 64, AdamW, cosine, no weight decay); their learning rate and length are the
    config's. `runtime.collate_fn` batches the examples. The model is left at the best candidate, in the train/eval
    mode it came in; unchanged when no fine-tune beats it, and restored if a run fails. `greater_is_better` defaults to
    transformers' rule: False for a metric whose name ends in "loss", else True. `baseline`: `evaluate_fn(model)`
    when the caller has measured it (`baseline_metrics`; `SAPTrainer.refine` does, to check the metric before its
    audit pass), so the eval set is not read again.
    """
    config = config or RefineConfig()
    runtime = resolve_runtime(runtime)
    base = runtime.unwrap(model)
    train_data = as_pass_data(train_data, "train_data")
    plans, examples = _plans(audit, train_data, config)
    _check_drop_last(plans, args)
    data, collate = examples_and_collate(train_data, runtime.collate_fn)
    _check_order(data, plans)
    start = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}  # copies off the accelerator
    training = base.training  # each run leaves train mode: the caller's mode is given back, as every pass gives it
    baseline = baseline_metrics(evaluate_fn, base, metric, measured=baseline)
    best = _Best(baseline, metric, greater_is_better)
    trials: list[dict[str, Any]] = []
    passes = 0
    try:
        with tempfile.TemporaryDirectory(prefix="sap_refine_") as scratch:
            for mode, lr in [(mode, lr) for mode in plans for lr in config.learning_rates]:
                base.load_state_dict(start)

                def checkpoint(epoch: int, mode: str = mode, lr: float = lr) -> None:
                    metrics = dict(evaluate_fn(base))
                    trials.append({"mode": mode, "learning_rate": lr, "epochs": epoch, "metrics": metrics})
                    logger.info(
                        "SAP refine: mode=%s lr=%g epochs=%d -> %s=%.4f", mode, lr, epoch, metric, metrics[metric]
                    )
                    best.offer(metrics, base, mode=mode, learning_rate=lr, epochs=epoch)

                trainer = _trial_trainer(
                    base, data, plans[mode], collate, config, lr, args, scratch, runtime, checkpoint
                )
                trainer.train()
                passes += int(runtime.sum(torch.tensor(float(trainer.passes), dtype=torch.float64)).item())
    except BaseException:
        base.load_state_dict(start)
        base.train(training)
        raise
    base.load_state_dict(best.state if best.state is not None else start)
    base.train(training)
    if best.state is None:
        logger.warning("SAP refine: no fine-tune beat the corrected model on the eval set; the model is unchanged.")
    return RefineResult(
        baseline_metrics=baseline,
        final_metrics=best.metrics,
        examples=examples,
        trials=trials,
        config=config.to_dict(),
        cost_epochs=passes / max(1, len(audit)),
        **best.choice,
    )


def _check_order(data: Any, plans: Mapping[str, CleanupPlan]) -> None:
    """A few examples of a map-style `data` read now: a copy in another order than the audit's fails before any
    weight changes (`PlanExamples` checks each example's label against the audit's as it reads it)."""
    if is_map_style(data):
        first = next(iter(plans.values()))
        PlanExamples(data, first).__getitems__(list(range(min(32, len(first)))))


def _check_drop_last(plans: Mapping[str, CleanupPlan], args: Optional[TrainingArguments]) -> None:
    """With `dataloader_drop_last`, a mode that trains on fewer examples than one global batch has no batch to train
    on: refused before any run, not after the earlier modes' runs (Trainer fails then, on an empty loader). Not
    worked around: a batch the user asked to drop (often for a fixed shape or BatchNorm) would be trained on, and
    only for some trials."""
    if args is None or not args.dataloader_drop_last:
        return
    batch = args.train_batch_size * args.world_size
    devices = batch // args.per_device_train_batch_size
    for mode, plan in plans.items():
        if len(plan) < batch:
            most = len(plan) // devices
            raise ValueError(
                f"TrainingArguments.dataloader_drop_last=True leaves the clean-up's mode={mode!r} no batch: it trains "
                f"on {len(plan)} examples, fewer than one batch of {batch} (per_device_train_batch_size="
                f"{args.per_device_train_batch_size} x {devices} device(s)). Set dataloader_drop_last=False"
                + (f", per_device_train_batch_size <= {most}" if most else "")
                + f", or leave {mode!r} out of RefineConfig.mode."
            )


class _Best:
    """The best candidate so far: "no change" (the baseline) until a fine-tune beats it on the eval metric."""

    def __init__(self, baseline: Mapping[str, float], metric: str, greater_is_better: Optional[bool]):
        self.metric, self.sign = metric, 1.0 if maximises(metric, greater_is_better) else -1.0
        self.metrics = dict(baseline)
        self.choice: dict[str, Any] = {"mode": None, "learning_rate": None, "epochs": 0}
        self.state: Optional[dict[str, torch.Tensor]] = None

    def offer(self, metrics: Mapping[str, float], model: nn.Module, **choice: Any) -> None:
        if self.sign * float(metrics[self.metric]) > self.sign * float(self.metrics[self.metric]):
            self.metrics, self.choice = dict(metrics), choice
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _plans(
    audit: LabelAudit, train_data: Any, config: RefineConfig
) -> tuple[dict[str, CleanupPlan], dict[str, dict[str, int]]]:
    """Per mode, what it trains on and what it kept, removed, relabelled, left unlabelled; raises on bad input."""
    if config.learning_rates is None:
        raise ValueError(
            "RefineConfig.learning_rates=None: refine() needs the learning rates to try, e.g. the training lr and twice it "
            "(RefineConfig(learning_rates=[2e-5, 4e-5])); SAPTrainer.refine fills them from TrainingArguments.learning_rate."
        )
    if len(audit) == 0:
        raise ValueError("The audit is empty: run audit_labels on the training data first.")
    if isinstance(train_data, ExampleStream) and train_data.batches:  # a loader over a stream, a list of batches
        raise ValueError(
            "train_data holds ready batches (a DataLoader over a stream, or a list of batches): refine trains on "
            "examples and batches them itself; pass the examples (e.g. train_data=loader.dataset) and their collate_fn "
            "as Runtime(collate_fn=...)."
        )
    size = (
        len(train_data.dataset)
        if isinstance(train_data, LoaderData)
        else len(train_data)
        if is_map_style(train_data)
        else None
    )
    if size is not None and int(audit.indices.max()) >= size:
        raise ValueError(
            f"The audit covers example index {int(audit.indices.max())} but train_data has {size} examples: "
            "pass the audit of this train_data (audit_labels(model, train_data))."
        )
    if size is None:
        logger.warning(
            "SAP refine: train_data is a stream, so every epoch sees the examples in stream order (no shuffle). "
            "For shuffled epochs pass a map-style dataset (e.g. load it with streaming=False / --streaming false)."
        )
    plans = {mode: cleanup_plan(audit, mode, config) for mode in config.modes}
    examples = {}
    for mode, plan in plans.items():
        if len(plan) == len(plan.unlabelled.nonzero()):
            raise ValueError(
                f"mode={mode!r} leaves no labelled training example ({audit.num_suspected} of {len(audit)} suspected); "
                "nothing to fine-tune on."
            )
        examples[mode] = plan.counts(audit)
    if "relabel" in plans and "remove" in plans and plans["relabel"].hard_labels() == plans["remove"].hard_labels():
        # No suspect reaches relabel_threshold: 'relabel' would repeat every 'remove' run exactly.
        logger.info(
            "SAP refine: no suspected label reaches relabel_threshold=%g; 'relabel' equals 'remove', trying it once.",
            config.relabel_threshold,
        )
        del plans["relabel"]
    return plans, examples
