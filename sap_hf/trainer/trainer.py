"""`SAPTrainer`: a `Trainer` that can also correct the model it trained with SAP.

It adds only what it must: `correct()` (trusted selection -> statistics -> alpha search on the
eval set -> write), logging of every alpha's metrics through `Trainer.log` (so `report_to`
backends see them), and saving/pushing the SAP record and model card with the model. It overrides
public `Trainer` hooks only (each says why), and uses no private `Trainer` attribute.
Evaluations (alpha search, refine) apply the Trainer's `compute_metrics` to predictions that every
process computes on its own shard of the eval set, gathered once (`sap_hf.trainer.evaluation`):
`Trainer.evaluate` would have the main process read a whole streaming eval set for each of them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import Trainer
from transformers.trainer_utils import RemoveColumnsCollator, seed_worker
from transformers.utils import logging

from ..api import SAPResult, sap_correct
from ..audit.cleanup import RefineConfig, RefineResult, baseline_metrics, refine
from ..audit.labels import LabelAudit, audit_labels, dynamics_audit
from ..audit.report import write_audit_report
from ..audit.scores import label_margins
from ..core.config import AUDIT_SOURCES, SAPConfig
from ..core.selection import TrustedSelection, select_from_scores
from ..core.targets import check_classifier
from ..hub import sap_record, staged_save, write_sap_files
from ..losses import check_label_smoothing, training_loss_record
from ..runtime.contract import as_pass_data
from ..runtime.modeling import logits_of
from ..runtime.passes import PhaseHook, Runtime
from ..utils.checks import check_choice
from .adapters import merge_trainer_adapters
from .checkpoints import install as install_checkpoint_weights
from .evaluation import EvalFn, accuracy_metrics, sap_evaluator
from .recorded import (
    INDEX_COLUMN,
    IndexCarryingCollator,
    IndexedExamples,
    RecordSaver,
    TrainingLosses,
    merge_losses,
)


logger = logging.get_logger(__name__)

_BOOKKEEPING = ("runtime", "per_second", "epoch", "model_preparation_time")
_RECORDING_SAMPLERS = ("random", "sequential")


def _measured_first(metrics: dict[str, float], evaluate_fn: Callable[[nn.Module], dict[str, float]]) -> Callable:
    """`evaluate_fn` whose first call returns `metrics`, measured on the same weights just before (the alpha search
    starts with the model as it is), so the eval set is read once for the baseline."""
    pending = [metrics]

    def evaluate(model: nn.Module) -> dict[str, float]:
        return dict(pending.pop()) if pending else evaluate_fn(model)

    return evaluate


class SAPTrainer(Trainer):
    """`Trainer` + `correct()`: fine-tune on noisy labels as usual, then correct with SAP.

    Args:
        sap_config: the `SAPConfig` of the correction (defaults to `SAPConfig()`).
        base_model_name: recorded in the SAP record and model card (`base_model`).
        Other arguments are those of `transformers.Trainer`. Without `compute_metrics`,
        accuracy is used. A noise-robust loss goes in as usual, e.g.
        `compute_loss_func=sap_hf.losses.RobustLoss(LossConfig(loss="gce"))`; once this trainer
        has trained, the SAP record and card say which loss it was (`training_loss`).

    With `SAPConfig(trusted_source="training")`, `train()` records every training example's
    cross-entropy (from the logits of its training step, by its position in `train_dataset`;
    `sap_hf.trainer.recorded` says how the position travels through the shuffled, sharded batches) and
    `correct()` selects the trusted samples from those losses: no selection pass over the training set.
    With `SAPConfig(audit_source="training")` it records each example's label margin as well, and
    `audit_labels()` (so `refine()`) ranks and flags the labels by the margin averaged over training.
    """

    def __init__(
        self, *args: Any, sap_config: Optional[SAPConfig] = None, base_model_name: Optional[str] = None, **kwargs: Any
    ):
        """`Trainer.__init__`, overridden to add the SAP settings, accuracy as the default `compute_metrics` (the alpha
        search needs a metric), and the callbacks that keep checkpoints exact (`.checkpoints`, `.recorded`)."""
        kwargs.setdefault("compute_metrics", None)
        if kwargs["compute_metrics"] is None:
            kwargs["compute_metrics"] = accuracy_metrics
        super().__init__(*args, **kwargs)
        check_label_smoothing(self.compute_loss_func, self.args.label_smoothing_factor)
        self.sap_config = sap_config or SAPConfig()
        self.base_model_name = base_model_name
        self.sap_result: Optional[SAPResult] = None
        self.label_audit: Optional[LabelAudit] = None
        self._audited_data: Any = None  # what label_audit was made on (refine reuses the audit for that data only)
        self._audit_is_current = False  # False once train() or correct() has changed the weights it audited
        self.refine_result: Optional[RefineResult] = None
        self.sap_extra_record: dict[str, Any] = {}
        self._sap_saved = False
        self._card_fields: dict[str, Any] = {}  # what create_model_card() was given: save_model()'s card keeps it
        self._card_model_name: Optional[str] = None
        self.training_losses: Optional[TrainingLosses] = None
        self._checkpoint_weights = install_checkpoint_weights(self)  # exact best/resumed weights (.checkpoints)
        self.add_callback(RecordSaver(lambda: self.training_losses if self._records_losses else None))

    @property
    def _records_losses(self) -> bool:
        return "training" in (self.sap_config.trusted_source, self.sap_config.audit_source)

    @property
    def _recording(self) -> tuple[str, str]:
        """(the setting that makes train() record, its alternative): what the recording's errors name."""
        named = [
            (f"{name}='training'", fix)
            for name, fix in (("trusted_source", "trusted_source='pass'"), ("audit_source", "audit_source='model'"))
            if getattr(self.sap_config, name) == "training"
        ]
        return "SAPConfig." + " and ".join(n for n, _ in named), " / ".join(f for _, f in named)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, overridden to start the loss record (a `"training"` source, anew on every call)
        and to arm the exact reload of a resumed checkpoint's weights."""
        if self._records_losses:
            if self.train_dataset is None:
                raise ValueError("Trainer: training requires a train_dataset.")
            IndexedExamples(self.train_dataset, *self._recording)  # a stream is refused here, before any step
            self._check_recording_args()
            self.training_losses = TrainingLosses(len(self.train_dataset), self.sap_config.training_loss_epochs)
            self._restore_losses(kwargs.get("resume_from_checkpoint", args[0] if args else None))
        self._checkpoint_weights.arm(args, kwargs, self.args.output_dir)
        self._audit_is_current = False  # the weights the last audit read are about to change
        return super().train(*args, **kwargs)

    def _restore_losses(self, checkpoint: Any) -> None:
        """Resuming: the losses recorded before the checkpoint (saved in it by `RecordSaver`), or a warning."""
        if checkpoint is None or checkpoint is False:
            return
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if checkpoint is None:
                return  # Trainer.train raises: no checkpoint to resume from
        if self.args.process_index != 0:
            return  # the main process restores every process's record; the merge sums them
        problem = self.training_losses.restore(checkpoint)
        if problem is not None:
            logger.warning(
                "train(resume_from_checkpoint=%r): %s, so %s reads the epochs trained from now on only. Train from "
                "the start (or from a checkpoint SAPTrainer saved with this sap_config) to average every epoch.",
                str(checkpoint),
                problem,
                self._recording[0],
            )

    def _check_recording_args(self) -> None:
        """What the recording loader (`_indexed_train_dataloader`) cannot build as the Trainer would: refused."""
        setting, fix = self._recording
        if self.args.auto_find_batch_size:
            raise ValueError(
                f"{setting} builds the training loader with TrainingArguments' batch size, and "
                "auto_find_batch_size=True changes it inside Trainer: set per_device_train_batch_size yourself, "
                f"or use {fix}."
            )
        if self.args.train_sampling_strategy not in _RECORDING_SAMPLERS:
            raise ValueError(
                f"{setting} records with the Trainer's {' or '.join(_RECORDING_SAMPLERS)} "
                f"sampler; train_sampling_strategy={self.args.train_sampling_strategy!r} groups examples by a "
                f"length images do not have: use 'random', or {fix}."
            )

    def get_train_dataloader(self) -> DataLoader:
        """`Trainer.get_train_dataloader`, overridden so that, when recording losses, each example carries its
        position (`.recorded`) through the shuffled, sharded batches."""
        if not self._records_losses or self.training_losses is None:
            return super().get_train_dataloader()
        return self._indexed_train_dataloader()

    def _indexed_train_dataloader(self) -> DataLoader:
        """The Trainer's training loader over `IndexedExamples`: its column removal, sampler, batch size and worker
        settings, prepared by its accelerator (which seeds and shards the sampler as for the Trainer's own)."""
        args, dataset = self.args, self.train_dataset
        columns = self._model_columns()
        collator = IndexCarryingCollator(self.data_collator)
        if args.remove_unused_columns:
            dataset = self._without_unused_columns(dataset, columns)
            collator = RemoveColumnsCollator(
                collator,
                signature_columns=[*columns, INDEX_COLUMN],
                logger=logger,
                model_name=type(self.model).__name__,
                description="Training",
            )
        indexed = IndexedExamples(dataset, *self._recording)
        sampler = (
            SequentialSampler(indexed) if args.train_sampling_strategy == "sequential" else RandomSampler(indexed)
        )
        loader = DataLoader(
            indexed,
            batch_size=args.train_batch_size,
            sampler=sampler,
            collate_fn=collator,
            drop_last=args.dataloader_drop_last,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor,
            in_order=args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return self.accelerator.prepare(loader)

    def _model_columns(self) -> list[str]:
        """The example keys the model's forward takes, plus the label names: what the Trainer's column removal keeps."""
        model = self.model
        if hasattr(model, "get_base_model"):  # a PeftModel: its base model's forward names the inputs
            model = model.get_base_model()
        elif type(model).__name__ == "PeftMixedModel":  # no get_base_model
            model = model.base_model.model
        return [*inspect.signature(model.forward).parameters, *sorted({"label", "label_ids", *self.label_names})]

    @staticmethod
    def _without_unused_columns(dataset: Any, columns: list[str]) -> Any:
        """A `datasets.Dataset` without the columns the model does not take (as the Trainer removes them)."""
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            return dataset  # other datasets: the RemoveColumnsCollator drops the keys
        if not set(columns) & set(dataset.column_names):
            raise ValueError(
                f"No columns in the training dataset match the model's forward method signature: ({', '.join(columns)})."
                f" Its columns are {dataset.column_names}. Check the dataset and model, or set "
                "remove_unused_columns=False in TrainingArguments."
            )
        return dataset.remove_columns([name for name in dataset.column_names if name not in columns])

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """`Trainer.compute_loss`, overridden to record each example's loss from a batch that carries positions."""
        positions = inputs.pop(INDEX_COLUMN, None) if isinstance(inputs, dict) else None
        if positions is None or not model.training or self.training_losses is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.get("labels", inputs.get("label"))
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record_losses(positions, logits_of(outputs), labels)
        return (loss, outputs) if return_outputs else loss

    def _record_losses(self, positions: torch.Tensor, logits: torch.Tensor, labels: Any) -> None:
        """Each example's plain cross-entropy from the step's logits (whatever the training loss), under its position."""
        if labels is None or logits.dim() != 2 or torch.as_tensor(labels).shape != positions.shape:
            setting, fix = self._recording
            raise ValueError(
                f"{setting} records one loss per example and needs class-id labels, one per "
                f"example, and (batch, classes) logits; got labels {None if labels is None else tuple(torch.as_tensor(labels).shape)} "
                f"and logits {tuple(logits.shape)}. Use {fix}."
            )
        labels = torch.as_tensor(labels, device=logits.device).long()
        with torch.no_grad():
            losses = F.cross_entropy(logits.detach().float(), labels.clamp_min(0), reduction="none")
            margins = label_margins(logits, labels.clamp_min(0))
        self.training_losses.add(int(self.state.epoch or 0), positions, losses, labels, margins)

    def _recorded_selection(self) -> tuple[TrustedSelection, float]:
        """The trusted samples from the recorded training losses of every process (`select_from_scores`; the record
        and the selection dataset checked by `_selects_from_record`)."""
        runtime = self._runtime(self.args.per_device_eval_batch_size)
        with runtime.timed("selection"):
            positions, scores, labels = merge_losses(runtime.gather(self.training_losses.summary()))
            selection = select_from_scores(
                positions,
                scores,
                labels,
                self.sap_config.trusted_per_class,
                check_classifier(runtime.unwrap(self.model)),
                source="the training losses SAPTrainer recorded",
                is_main=runtime.is_main,
            )
        return selection, runtime.timings["selection"]

    def _check_recorded(self, what: str, fix: str, dataset: Any, argument: str = "dataset") -> None:
        """Refuse, naming `what` needs them and `fix`, when no losses were recorded or `dataset` is not the data whose
        losses they are (positions are those of train_dataset; a dataset of another size cannot be it)."""
        if self.training_losses is None:
            raise ValueError(
                f"{what} the losses that train() records: call trainer.train() first (with this sap_config), or use "
                f"{fix}."
            )
        if dataset is None:
            return
        size = len(dataset) if hasattr(dataset, "__len__") else None
        if size != self.training_losses.size:
            has = f"has {size} examples" if size is not None else "has no len()"
            raise ValueError(
                f"{argument} {has}, the train_dataset whose losses were recorded {self.training_losses.size}: the "
                f"recorded positions are those of train_dataset. Pass that dataset (or None), or use {fix}."
            )

    def correct(
        self,
        selection_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        selection_model: Optional[nn.Module] = None,
        trusted_indices: Optional[list[Union[int, str]]] = None,
        stats_path: Optional[Union[str, Path]] = None,
        collate_fn: Optional[Any] = None,
        on_phase: Optional[PhaseHook] = None,
    ) -> SAPResult:
        """Correct `self.model` with SAP and return what was measured.

        Trusted samples come from `selection_dataset` (default: the training set); alpha is
        chosen by `compute_metrics`' `metric_for_best_model` (default accuracy) on `eval_dataset`
        (default: the Trainer's). `stats_path` caches the statistics, so an interrupted run or a
        new alpha grid needs no new data pass. `collate_fn` turns `selection_dataset`'s examples into
        batches (default: the Trainer's `data_collator`): give the raw stream
        (`sap_hf.data.undecoded_images(split)`) and `ImageTransform.collate` so that each training image
        is decoded once, by one process, and the trusted samples are kept as raw rows.
        A PEFT (LoRA) model is merged first and `self.model` becomes the merged model, so that
        `save_model()` writes the whole corrected model (a PEFT save would keep only the adapters).
        `on_phase(phase, seconds)` is called after each phase, as in `sap_correct`.
        """
        selection_dataset, eval_dataset = self._train_and_eval(
            "correct()", "selection_dataset", selection_dataset, eval_dataset, "alpha"
        )
        metric, greater, evaluate_fn = self._sap_evaluator(eval_dataset)
        from_record = self._selects_from_record(trusted_indices, selection_model, selection_dataset)
        runtime = self._runtime(self.sap_config.batch_size, collate_fn=collate_fn, on_phase=on_phase)
        unmerged = self.model
        # The search's first evaluation (the model as it is), measured first: a missing metric fails before any pass.
        with runtime.timed("evaluation"):
            baseline = baseline_metrics(evaluate_fn, unmerged, metric)
        merge_trainer_adapters(self)  # PEFT: self.model becomes the merged model, corrected and saved whole
        if self.model is unmerged:  # the search's first evaluation is this baseline: not measured twice
            evaluate_fn = _measured_first(baseline, evaluate_fn)
        recorded = None
        if from_record:  # audit_source='training' alone records too, but the trusted samples come from the pass
            recorded, selection_seconds = self._recorded_selection()
            trusted_indices = recorded.indices
            if on_phase is not None:
                on_phase("selection", selection_seconds)

        def on_evaluate(alpha: Optional[float], metrics: dict[str, float]) -> None:
            scores = {f"sap/{k}": v for k, v in metrics.items() if not k.endswith(_BOOKKEEPING)}
            self.log({"sap/alpha": -1.0 if alpha is None else float(alpha), **scores})

        result = sap_correct(
            self.model,
            selection_dataset,
            config=self.sap_config,
            runtime=runtime,
            evaluate_fn=evaluate_fn,
            metric=metric,
            greater_is_better=greater,
            selection_model=selection_model,
            trusted_indices=trusted_indices,
            stats_path=stats_path,
            on_evaluate=on_evaluate,
        )
        result.timings["evaluation"] = result.timings.get("evaluation", 0.0) + runtime.timings["evaluation"]
        if recorded is not None and result.trusted_indices == recorded.indices:  # (a stats_path cache may hold others)
            result.trusted_per_class = {int(k): v for k, v in recorded.per_class.items()}
            result.timings = {"selection": selection_seconds, **result.timings}
        self.sap_result = result
        self._audit_is_current = False  # an audit made before the projection read other weights
        self._log_correction(result, metric)
        return result

    def _selects_from_record(self, trusted_indices: Any, selection_model: Any, selection_dataset: Any) -> bool:
        """Whether `correct()` takes the trusted samples from the recorded losses (`trusted_source="training"`, none
        given); checked before the baseline evaluation and the PEFT merge, so a refusal leaves the model as it is."""
        from_record = self.sap_config.trusted_source == "training" and trusted_indices is None
        if from_record and selection_model is not None:
            raise ValueError(
                "SAPTrainer.correct(selection_model=...) ranks the trusted candidates with that model, and "
                "SAPConfig.trusted_source='training' selects them from the losses train() recorded: use "
                "trusted_source='pass' with selection_model, or leave selection_model out."
            )
        if from_record:
            what = "SAPConfig.trusted_source='training' selects from"
            self._check_recorded(what, "trusted_source='pass'", selection_dataset, "selection_dataset")
        return from_record

    def _log_correction(self, result: SAPResult, metric: str) -> None:
        """Every per-kind trial (alpha_scope="per_kind": the coordinate pass, one entry each) and the choice."""
        for search in result.rounds:
            for trial in search.kind_trials:
                scores = {f"sap/{k}": v for k, v in trial["metrics"].items() if not k.endswith(_BOOKKEEPING)}
                alphas = {f"sap/alpha_{kind}": -1.0 if a is None else float(a) for kind, a in trial["alphas"].items()}
                self.log({**alphas, **scores})
        self.log(
            {
                "sap/chosen_alpha": -1.0 if result.alpha is None else float(result.alpha),
                **{
                    f"sap/chosen_alpha_{kind}": -1.0 if a is None else float(a)
                    for kind, a in result.kind_alphas.items()
                },
                f"sap/{metric}_before": float(result.baseline_metrics[metric]),
                f"sap/{metric}_after": float(result.final_metrics[metric]),
            }
        )

    def _runtime(
        self, batch_size: int, collate_fn: Optional[Any] = None, on_phase: Optional[PhaseHook] = None
    ) -> Runtime:
        """The runtime of a pass this Trainer makes: its accelerator, its data collator (or `collate_fn`), its
        progress setting, and `on_phase`."""
        return Runtime(
            accelerator=self.accelerator,
            collate_fn=collate_fn or self.data_collator,
            batch_size=batch_size,
            show_progress=not self.args.disable_tqdm,
            on_phase=on_phase,
        )

    def _train_and_eval(
        self, caller: str, train_name: str, train: Any, eval_dataset: Any, chosen: str
    ) -> tuple[Any, Any]:
        """The labelled training data and the clean eval set, defaulting to the Trainer's; raise naming the missing one."""
        train = train if train is not None else self.train_dataset
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if train is None:
            raise ValueError(
                f"{caller} needs labelled training data: pass {train_name}= (or a Trainer with train_dataset)."
            )
        if eval_dataset is None:
            raise ValueError(
                f"{caller} needs a clean labelled eval set to choose {chosen}: pass eval_dataset= (or a Trainer with eval_dataset)."
            )
        return train, eval_dataset

    def _sap_evaluator(self, eval_dataset: Any) -> tuple[str, bool, EvalFn]:
        """(metric, greater_is_better, evaluate_fn) on a clean labelled eval set (`.evaluation.sap_evaluator`)."""
        return sap_evaluator(self, eval_dataset, self._runtime(self.args.per_device_eval_batch_size))

    def audit_labels(
        self,
        dataset: Any = None,
        output_dir: Optional[Union[str, Path]] = None,
        *,
        method: str = "self_confidence",
        filter_by: str = "auto",
        views: str = "shift",
        top_k: int = 32,
        source: Optional[str] = None,
    ) -> LabelAudit:
        """Which training labels look wrong to the (corrected) model: `sap_hf.audit_labels` on `dataset`.

        `dataset` defaults to the training set (pass it with the eval-time transform: no
        augmentation). Writes `label_audit.csv` (ranked, written atomically),
        `label_audit_summary.json` and `label_audit_top.png` into `output_dir` (default
        `args.output_dir/_label_audit`; the leading '_' keeps it out of Hub uploads). The summary
        goes into the SAP record. `source` (default `sap_config.audit_source`): 'model' ranks and flags by the
        model's probabilities (`method`, `filter_by`); 'training' by the label margins `train()` recorded
        (`sap_hf.audit.dynamics_audit`), the model's probabilities kept for the predicted classes; the margins are
        those of the last `train()`, so after `refine()` the refined model's own view is `source="model"`.
        """
        source = check_choice("audit_labels(source=...)", source or self.sap_config.audit_source, AUDIT_SOURCES)
        dataset = dataset if dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("audit_labels() needs a labelled dataset (or a Trainer with train_dataset).")
        if source == "training":
            self._check_recorded("audit_source='training' audits the labels with", "audit_source='model'", dataset)
        given = dataset
        dataset = as_pass_data(dataset, "dataset")  # read once as every pass reads it (the report reads it again)
        runtime = self._runtime(self.args.per_device_eval_batch_size)
        audit = audit_labels(self.model, dataset, method=method, filter_by=filter_by, views=views, runtime=runtime)
        if source == "training":
            positions, margins, _ = merge_losses(runtime.gather(self.training_losses.summary()), "margin")
            audit = dynamics_audit(audit, positions, margins)
        self.label_audit, self._audited_data, self._audit_is_current = audit, given, True
        if self.is_world_process_zero():
            folder = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / "_label_audit"
            write_audit_report(audit, folder, dataset, top_k=top_k, collate_fn=self.data_collator)
        summary = audit.summary()
        self.log(
            {
                "sap/audit_suspected": float(summary["suspected"]),
                "sap/audit_suspected_fraction": summary["suspected_fraction"],
            }
        )
        return audit

    def refine(
        self,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        audit: Optional[LabelAudit] = None,
        refine_config: Optional[RefineConfig] = None,
    ) -> RefineResult:
        """Clean-up after `correct()`: fine-tune as the label audit says (`sap_hf.audit.cleanup.refine`).

        `train_dataset` (default: the training set) must be the data `audit` was made on
        (default: `self.label_audit` when it was made on `train_dataset` and no `train()`, `correct()` or clean-up
        has changed the weights since; else a new audit of `train_dataset`, with a warning). Each run is a `Trainer`
        with this trainer's `TrainingArguments` (batch size, optimiser, schedule, precision, seed),
        learning rate and length from `refine_config`. Learning rate, length and mode are chosen on
        `eval_dataset` (default: the Trainer's); the result goes into the SAP record and the model card.
        """
        given_train = train_dataset if train_dataset is not None else self.train_dataset
        train_dataset, eval_dataset = self._train_and_eval(
            "refine()", "train_dataset", train_dataset, eval_dataset, "lr and length"
        )
        metric, greater, evaluate_fn = self._sap_evaluator(eval_dataset)
        baseline = baseline_metrics(evaluate_fn, self.model, metric)  # a missing metric fails before the audit pass
        train_dataset = as_pass_data(
            train_dataset, "train_dataset"
        )  # the audit and the fine-tune read the same examples
        if audit is None:  # the trainer's last audit, when it is of this very data and model; else a new one
            audit = self._current_audit(given_train)
        refine_config = refine_config or RefineConfig()
        if refine_config.learning_rates is None:
            lr = self.args.learning_rate
            refine_config = dataclasses.replace(refine_config, learning_rates=[lr, 2 * lr])
        result = refine(
            self.model,
            train_dataset,
            audit,
            evaluate_fn,
            refine_config,
            args=self.args,
            runtime=self._runtime(self.args.per_device_eval_batch_size),
            metric=metric,
            greater_is_better=greater,
            baseline=baseline,
        )
        self.refine_result = result
        self._audit_is_current = self._audit_is_current and not result.changed
        for trial in result.trials:  # the mode by name (log_history, console, TensorBoard text, W&B; MLflow drops it)
            self.log(
                {
                    "sap/refine_lr": trial["learning_rate"],
                    "sap/refine_epochs": float(trial["epochs"]),
                    "sap/refine_mode": trial["mode"],
                    **{f"sap/refine_{k}": v for k, v in trial["metrics"].items() if not k.endswith(_BOOKKEEPING)},
                }
            )
        return result

    def _current_audit(self, train_dataset: Any) -> LabelAudit:
        """`label_audit` when it was made on `train_dataset` by the current weights; else a new audit, saying why."""
        if self.label_audit is not None and self._audit_is_current and self._audited_data is train_dataset:
            return self.label_audit
        if self.label_audit is not None:
            why = (
                "train() or correct() changed the weights since"
                if not self._audit_is_current
                else "it was made on other data than refine's train_dataset"
            )
            logger.warning(
                "SAP refine: the last label audit is not used (%s); auditing train_dataset with the current model. "
                "To use an audit of your own, pass refine(audit=...).",
                why,
            )
        return self.audit_labels(train_dataset)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, overridden to save atomically (staged files moved into place) and to add the SAP
        record and card once corrected."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        is_main = self.args.should_save
        with staged_save(output_dir, is_main=is_main) as stage:
            super().save_model(str(stage), _internal_call=True)
            if is_main and self.sap_result is not None:
                write_sap_files(stage, self.sap_record(), self._card_name(output_dir), self._card_fields)
        self._sap_saved = True
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, overridden so that a failed upload says the local save is intact and what to rerun."""
        self._sap_saved = False
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as err:
            if not self._sap_saved:  # the save itself failed: nothing to claim
                raise
            repo = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            raise RuntimeError(
                f"Pushing to the Hub failed ({type(err).__name__}: {err}). The local save in "
                f"{self.args.output_dir!r} is intact; rerun trainer.push_to_hub() or "
                f"`sap-hf push {self.args.output_dir} --repo_id {repo}`."
            ) from err

    def sap_record(self) -> dict[str, Any]:
        if self.sap_result is None:
            raise ValueError("No SAP correction yet: call trainer.correct() first.")
        extra = dict(self.sap_extra_record)
        if self.state.global_step > 0:  # this trainer trained the model: say with which loss
            extra.setdefault(
                "training_loss", training_loss_record(self.compute_loss_func, self.args.label_smoothing_factor)
            )
        if self.label_audit is not None:
            extra["label_audit"] = {k: v for k, v in self.label_audit.summary().items() if k != "disagreement_pairs"}
        if self.refine_result is not None:
            extra["refine"] = self.refine_result.to_dict()
        return sap_record(self.sap_result, self.base_model_name, extra)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card`, overridden to write the SAP card (what SAP did, the numbers, tags, citation)
        once corrected; Trainer's otherwise.

        Its arguments (also `push_to_hub(license=..., tags=...)`'s) go into the SAP card's metadata as into Trainer's:
        `language`, `license`, `tags` (after SAP's), `finetuned_from` (the base model), `dataset_tags` or `dataset`
        (the datasets), `model_name` (the title, when no `hub_model_id` names it). The card's task is
        image-classification whatever `tasks` says, and `dataset_args` has no place in it. Later `save_model()`
        calls keep them.
        """
        if self.sap_result is None:
            return super().create_model_card(*args, **kwargs)
        given = inspect.signature(Trainer.create_model_card).bind(self, *args, **kwargs).arguments
        listed = {k: [given[k]] if isinstance(given.get(k), str) else given.get(k) for k in ("tags", "dataset_tags")}
        datasets = listed["dataset_tags"] or ([given["dataset"]] if isinstance(given.get("dataset"), str) else None)
        fields = dict(
            language=given.get("language"),
            license=given.get("license"),
            tags=listed["tags"],
            base_model=given.get("finetuned_from"),
            datasets=datasets or given.get("dataset"),
        )
        self._card_fields = {k: v for k, v in fields.items() if v}
        self._card_model_name = given.get("model_name") or self._card_model_name
        if self.is_world_process_zero():
            card_name = self._card_name(self.args.output_dir)
            write_sap_files(self.args.output_dir, self.sap_record(), card_name, self._card_fields)

    def _card_name(self, output_dir: Union[str, Path]) -> str:
        return self.args.hub_model_id or self._card_model_name or Path(output_dir).name
