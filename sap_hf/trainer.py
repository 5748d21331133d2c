"""`SAPTrainer`: a `Trainer` that can also correct the model it trained with SAP.

It adds only what it must: `correct()` (trusted selection -> statistics -> alpha search on the
eval set -> write), logging of every alpha's metrics through `Trainer.log` (so `report_to`
backends see them), and saving/pushing the SAP record and model card with the model.
Evaluations (alpha search, refine) apply the Trainer's `compute_metrics` to predictions that every
process computes on its own shard of the eval set, gathered once (`core.evaluation.eval_predictions`):
`Trainer.evaluate` would have the main process read a whole streaming eval set for each of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EvalPrediction, Trainer
from transformers.trainer_utils import denumpify_detensorize
from transformers.utils import logging

from .api import SAPResult, sap_correct
from .audit.cleanup import MODES, RefineConfig, RefineResult, refine
from .audit.labels import LabelAudit, audit_labels
from .audit.report import write_audit_report
from .checkpoints import install as install_checkpoint_weights
from .core.adapters import merge_trainer_adapters
from .core.config import SAPConfig
from .core.evaluation import eval_predictions
from .core.recorded import INDEX_COLUMN, IndexCarryingCollator, IndexedExamples, TrainingLosses, merge_losses
from .core.selection import TrustedSelection, select_from_scores
from .core.targets import check_classifier
from .hub import sap_record, staged_save, write_sap_files
from .losses import check_label_smoothing, training_loss_record
from .runtime.batching import batch_labels, first_example_batch
from .runtime.contract import IGNORE_INDEX, LoaderData, as_pass_data
from .runtime.modeling import logits_of
from .runtime.passes import PhaseHook, Runtime


logger = logging.get_logger(__name__)

_ACCURACY = None
_BOOKKEEPING = ("runtime", "per_second", "epoch", "model_preparation_time")


def accuracy_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """`evaluate`'s accuracy; offline (its script lives on the Hub) the same formula computed here.

    Predictions are logits (`(samples, classes)`, argmaxed here) or class ids already (one int per
    sample: what a `preprocess_logits_for_metrics` returning `logits.argmax(-1)` hands on).
    """
    global _ACCURACY
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    logits = np.asarray(logits)
    references = np.asarray(prediction.label_ids)
    ids = logits.ndim == references.ndim and np.issubdtype(logits.dtype, np.integer)
    if not ids and logits.ndim != references.ndim + 1:
        raise ValueError(
            f"accuracy_metrics: predictions of shape {logits.shape} for labels of shape {references.shape}; give "
            "(samples, classes) logits or one class id per sample (preprocess_logits_for_metrics returning "
            "logits.argmax(-1)), or pass your own compute_metrics."
        )
    predictions = logits if ids else logits.argmax(-1)
    num_classes = None if ids else logits.shape[-1]
    labelled = references != IGNORE_INDEX  # -100: the transformers ignore index, not a class
    predictions, references = predictions[labelled], references[labelled]
    outside = (references < 0) | (references >= (num_classes if num_classes is not None else np.inf))
    if outside.any():
        classes = "" if num_classes is None else f", outside the model's {num_classes} classes"
        raise ValueError(
            f"The eval labels hold {int(references[outside][0])}{classes} (-100 is ignored): fix the label mapping of "
            "the eval set or the model's num_labels."
        )
    if _ACCURACY is None:
        try:
            import evaluate

            _ACCURACY = evaluate.load("accuracy")
        except Exception as err:  # the metric script is fetched from the Hub
            logger.info("evaluate.load('accuracy') unavailable (%s); computing accuracy locally.", type(err).__name__)
            _ACCURACY = False
    if _ACCURACY:
        return _ACCURACY.compute(predictions=predictions, references=references)
    return {"accuracy": float((predictions == references).mean()) if references.size else float("nan")}


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
    `core.recorded` says how the position travels through the shuffled, sharded batches) and
    `correct()` selects the trusted samples from those losses: no selection pass over the training set.
    """

    def __init__(
        self, *args: Any, sap_config: Optional[SAPConfig] = None, base_model_name: Optional[str] = None, **kwargs: Any
    ):
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
        self.refine_result: Optional[RefineResult] = None
        self.sap_extra_record: dict[str, Any] = {}
        self._sap_saved = False
        self.training_losses: Optional[TrainingLosses] = None
        self._checkpoint_weights = install_checkpoint_weights(self)  # exact best/resumed weights (sap_hf.checkpoints)

    @property
    def _records_losses(self) -> bool:
        return self.sap_config.trusted_source == "training"

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; with `trusted_source="training"` each example's losses are recorded (anew on every call)."""
        if self._records_losses:
            if self.train_dataset is None:
                raise ValueError("Trainer: training requires a train_dataset.")
            IndexedExamples(self.train_dataset)  # a stream is refused here, before any step
            self.training_losses = TrainingLosses(len(self.train_dataset), self.sap_config.training_loss_epochs)
            self._restore_losses(kwargs.get("resume_from_checkpoint", args[0] if args else None))
        self._checkpoint_weights.arm(args, kwargs, self.args.output_dir)
        return super().train(*args, **kwargs)

    def _restore_losses(self, checkpoint: Any) -> None:
        """Resuming: the losses recorded before the checkpoint (saved in it by `_save_checkpoint`), or a warning."""
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
                "train(resume_from_checkpoint=%r): %s, so trusted_source='training' selects from the epochs "
                "trained from now on only. Train from the start (or from a checkpoint SAPTrainer saved with this "
                "sap_config) to average every epoch.",
                str(checkpoint),
                problem,
            )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`; with recorded losses, each process's record goes into the checkpoint too."""
        super()._save_checkpoint(model, trial)
        if self._records_losses and self.training_losses is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.training_losses.save(folder, self.args.process_index)

    def get_train_dataloader(self) -> Any:
        """The Trainer's loader; when recording, over examples that carry their position (`core.recorded`)."""
        if not self._records_losses or self.training_losses is None:
            return super().get_train_dataloader()
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            plain = (
                self._remove_unused_columns(dataset, "training") if isinstance(dataset, datasets.Dataset) else dataset
            )
        except ImportError:  # pragma: no cover - datasets is a dependency
            plain = dataset
        self.train_dataset, self.data_collator = IndexedExamples(plain), IndexCarryingCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._records_losses and INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)  # kept by the Trainer's column removal

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """`Trainer.compute_loss`; a training batch that carries positions also records its per-example losses."""
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
            raise ValueError(
                f"SAPConfig.trusted_source='training' records one loss per example and needs class-id labels, one per "
                f"example, and (batch, classes) logits; got labels {None if labels is None else tuple(torch.as_tensor(labels).shape)} "
                f"and logits {tuple(logits.shape)}. Use trusted_source='pass'."
            )
        labels = torch.as_tensor(labels, device=logits.device).long()
        with torch.no_grad():
            losses = F.cross_entropy(logits.detach().float(), labels.clamp_min(0), reduction="none")
        self.training_losses.add(int(self.state.epoch or 0), positions, losses, labels)

    def _recorded_selection(self, selection_dataset: Any) -> tuple[TrustedSelection, float]:
        """The trusted samples from the recorded training losses of every process (`select_from_scores`)."""
        if self.training_losses is None:
            raise ValueError(
                "SAPConfig.trusted_source='training' selects from the losses that train() records: call trainer.train() "
                "first (with this sap_config), or use trusted_source='pass'."
            )
        if selection_dataset is not None and len(selection_dataset) != self.training_losses.size:
            raise ValueError(
                f"selection_dataset has {len(selection_dataset)} examples, the train_dataset whose losses were recorded "
                f"{self.training_losses.size}: the recorded positions are those of train_dataset. Pass that dataset (or "
                "None), or use trusted_source='pass'."
            )
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
        merge_trainer_adapters(self)  # PEFT: self.model becomes the merged model, corrected and saved whole
        recorded = None
        if self._records_losses and trusted_indices is None and selection_model is None:
            recorded, selection_seconds = self._recorded_selection(selection_dataset)
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
            accelerator=self.accelerator,
            collate_fn=collate_fn or self.data_collator,
            evaluate_fn=evaluate_fn,
            metric=metric,
            greater_is_better=greater,
            selection_model=selection_model,
            trusted_indices=trusted_indices,
            stats_path=stats_path,
            on_evaluate=on_evaluate,
            on_phase=on_phase,
            show_progress=not self.args.disable_tqdm,
        )
        if recorded is not None and result.trusted_indices == recorded.indices:  # (a stats_path cache may hold others)
            result.trusted_per_class = {int(k): v for k, v in recorded.per_class.items()}
            result.timings = {"selection": selection_seconds, **result.timings}
        self.sap_result = result
        for search in result.rounds:  # alpha_scope="per_kind": every trial of the coordinate pass, one log entry each
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
        return result

    def _runtime(self, batch_size: int) -> Runtime:
        """The runtime of a pass this Trainer makes: its accelerator, its data collator, its progress setting."""
        return Runtime(
            accelerator=self.accelerator,
            collate_fn=self.data_collator,
            batch_size=batch_size,
            show_progress=not self.args.disable_tqdm,
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

    def _sap_evaluator(self, eval_dataset: Any) -> tuple[str, bool, Any]:
        """(metric, greater_is_better, evaluate_fn) on a clean labelled eval set.

        The evaluation is shared by every process (`_shared_evaluate`) unless the Trainer is set up
        for something only `Trainer.evaluate` gives (`_evaluate_fallback` says what).
        """
        metric = (self.args.metric_for_best_model or "accuracy").removeprefix("eval_")
        greater = self.args.greater_is_better if self.args.greater_is_better is not None else True
        eval_dataset = as_pass_data(
            eval_dataset, "eval_dataset"
        )  # one set (not a dict), re-readable (not a generator)
        fallback = self._evaluate_fallback()
        if fallback is not None and isinstance(eval_dataset, LoaderData):  # Trainer.evaluate batches a dataset itself
            eval_dataset = eval_dataset.examples()
        if batch_labels(first_example_batch(eval_dataset, self.data_collator, "eval_dataset")) is None:
            raise ValueError(
                "The eval dataset has no 'labels'/'label' column: SAP's alpha search and refine's choices need a clean, "
                "labelled eval set; pass eval_dataset= with labels."
            )
        self._log_evaluation_path(fallback)
        if fallback is None:
            return metric, greater, lambda model: self._shared_evaluate(model, eval_dataset)

        def evaluate_fn(model: nn.Module) -> dict[str, float]:
            metrics = self.evaluate(eval_dataset, metric_key_prefix="sap_eval")
            return {key.removeprefix("sap_eval_"): value for key, value in metrics.items()}

        return metric, greater, evaluate_fn

    def _evaluate_fallback(self) -> Optional[str]:
        """Why the shared evaluation cannot stand in for `Trainer.evaluate` here (None: it can).

        The shared evaluation hands `compute_metrics` the logits and labels only, concatenated; metrics
        that need the inputs or per-batch losses (`include_for_metrics`), per-batch metrics
        (`batch_eval_metrics`), unconcatenated batches, or a subclass's own evaluation code keep
        `Trainer.evaluate`.
        """
        args = self.args
        included = list(getattr(args, "include_for_metrics", None) or [])
        if included:
            return (
                f"TrainingArguments.include_for_metrics={included} (compute_metrics needs what only Trainer gathers)"
            )
        if getattr(args, "batch_eval_metrics", False):
            return "TrainingArguments.batch_eval_metrics=True"
        if not getattr(args, "eval_do_concat_batches", True):
            return "TrainingArguments.eval_do_concat_batches=False"
        for name in ("evaluate", "evaluation_loop", "prediction_step"):
            if getattr(type(self), name) is not getattr(SAPTrainer, name):
                return f"{type(self).__name__} overrides {name}()"
        return None

    def _log_evaluation_path(self, fallback: Optional[str]) -> None:
        """Say (main process) how SAP evaluates; a warning where `Trainer.evaluate` costs more than a shared pass."""
        if not self.is_world_process_zero():
            return
        processes = self.accelerator.num_processes
        if fallback is None:
            logger.info(
                "SAP evaluation: shared by the %d process(es), each reading and scoring only its shard of the eval "
                "set; metrics from compute_metrics on the gathered predictions.",
                processes,
            )
            return
        (logger.warning if processes > 1 else logger.info)(
            "SAP evaluation through Trainer.evaluate because %s: with %d processes, a streaming eval set is read whole by "
            "the main process for every evaluation.",
            fallback,
            processes,
        )

    def _shared_evaluate(self, model: nn.Module, eval_dataset: Any) -> dict[str, float]:
        """`compute_metrics` and `loss` on the eval set, each process reading only its shard (`eval_predictions`).

        Metrics equal a one-process run's. `loss` is plain cross-entropy over the labelled samples (as
        `eval_loss` of a model with a standard classification head), even where the model or
        `compute_loss_func` would compute another loss, so `metric_for_best_model="loss"` compares
        alphas on the clean set by likelihood. As in `Trainer.evaluate`, no `compute_metrics` (or
        `prediction_loss_only`) means the loss alone.
        """
        loss_only = self.compute_metrics is None or self.args.prediction_loss_only
        output = eval_predictions(
            model,
            eval_dataset,
            runtime=self._runtime(self.args.per_device_eval_batch_size),
            preprocess=self.preprocess_logits_for_metrics,
            with_predictions=not loss_only,
        )
        metrics: dict[str, Any] = {}
        if not loss_only:
            metrics = denumpify_detensorize(
                dict(self.compute_metrics(EvalPrediction(predictions=output.predictions, label_ids=output.label_ids)))
            )
        metrics["loss"] = output.loss
        return metrics

    def audit_labels(
        self,
        dataset: Any = None,
        output_dir: Optional[Union[str, Path]] = None,
        *,
        method: str = "self_confidence",
        filter_by: str = "auto",
        views: str = "shift",
        top_k: int = 32,
    ) -> LabelAudit:
        """Which training labels look wrong to the (corrected) model: `sap_hf.audit_labels` on `dataset`.

        `dataset` defaults to the training set (pass it with the eval-time transform: no
        augmentation). Writes `label_audit.csv` (ranked, written atomically),
        `label_audit_summary.json` and `label_audit_top.png` into `output_dir` (default
        `args.output_dir/_label_audit`; the leading '_' keeps it out of Hub uploads). The summary
        goes into the SAP record.
        """
        dataset = dataset if dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("audit_labels() needs a labelled dataset (or a Trainer with train_dataset).")
        given = dataset
        dataset = as_pass_data(dataset, "dataset")  # read once as every pass reads it (the report reads it again)
        audit = audit_labels(
            self.model,
            dataset,
            method=method,
            filter_by=filter_by,
            views=views,
            runtime=self._runtime(self.args.per_device_eval_batch_size),
        )
        self.label_audit, self._audited_data = audit, given
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
        (default: `self.label_audit`, or a new audit of `train_dataset`). Each run is a `Trainer`
        with this trainer's `TrainingArguments` (batch size, optimiser, schedule, precision, seed),
        learning rate and length from `refine_config`. Learning rate, length and mode are chosen on
        `eval_dataset` (default: the Trainer's); the result goes into the SAP record and the model card.
        """
        given_train = train_dataset if train_dataset is not None else self.train_dataset
        train_dataset, eval_dataset = self._train_and_eval(
            "refine()", "train_dataset", train_dataset, eval_dataset, "lr and length"
        )
        metric, greater, evaluate_fn = self._sap_evaluator(eval_dataset)
        train_dataset = as_pass_data(
            train_dataset, "train_dataset"
        )  # the audit and the fine-tune read the same examples
        if audit is None:  # the trainer's last audit, when it is of this very data; else a new one
            audited = self.label_audit is not None and self._audited_data is given_train
            audit = self.label_audit if audited else self.audit_labels(given_train)
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
        )
        self.refine_result = result
        for trial in result.trials:
            self.log(
                {
                    "sap/refine_lr": trial["learning_rate"],
                    "sap/refine_epochs": float(trial["epochs"]),
                    "sap/refine_mode": float(MODES.index(trial["mode"])),
                    **{f"sap/refine_{k}": v for k, v in trial["metrics"].items() if not k.endswith(_BOOKKEEPING)},
                }
            )
        return result

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save atomically (staged files moved into place) plus the SAP record and card once corrected."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        is_main = self.args.should_save
        with staged_save(output_dir, is_main=is_main) as stage:
            super().save_model(str(stage), _internal_call=True)
            if is_main and self.sap_result is not None:
                write_sap_files(stage, self.sap_record(), self._card_name(output_dir))
        self._sap_saved = True
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`; a failed upload says the local save is intact and what to rerun."""
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
        """The SAP card (what SAP did, the numbers, tags, citation) once corrected; Trainer's otherwise."""
        if self.sap_result is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            write_sap_files(self.args.output_dir, self.sap_record(), self._card_name(self.args.output_dir))

    def _card_name(self, output_dir: Union[str, Path]) -> str:
        return self.args.hub_model_id or Path(output_dir).name
