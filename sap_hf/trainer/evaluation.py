"""SAP's evaluations for a `Trainer` (alpha search, refine): `compute_metrics` on a pass every process shares.

One path: each process reads and scores only its shard of the eval set (`sap_hf.evaluation.eval_predictions`),
the predictions are gathered once, and the Trainer's `compute_metrics` gets an `EvalPrediction` built as
`Trainer.evaluate` builds it, honouring `preprocess_logits_for_metrics`, `prediction_loss_only`,
`include_for_metrics` (`inputs`: the `pixel_values`; `loss`: each sample's cross-entropy),
`batch_eval_metrics` and `eval_do_concat_batches`. `Trainer.evaluate` itself is not called: with a
streaming eval set it would have the main process read the whole set for every alpha while the others wait.
Metrics equal a one-process run's. The model's forward is SAP's (`model(pixel_values=...)`): a subclass's
`prediction_step` or `evaluate` is not used for these evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction
from transformers.trainer_utils import denumpify_detensorize
from transformers.utils import logging

from ..evaluation import EvalPredictions, eval_predictions
from ..runtime.batching import batch_labels, first_example_batch
from ..runtime.contract import IGNORE_INDEX, as_pass_data
from ..runtime.passes import Runtime


logger = logging.get_logger(__name__)

_ACCURACY = None

EvalFn = Callable[[nn.Module], dict[str, float]]


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


def sap_evaluator(trainer: Any, eval_dataset: Any, runtime: Runtime) -> tuple[str, bool, EvalFn]:
    """(metric, greater_is_better, evaluate_fn) of a Trainer on a clean labelled eval set.

    `metric` is `metric_for_best_model` without its `eval_` prefix (default accuracy); `evaluate_fn(model)`
    returns `compute_metrics`' metrics and `loss` (`trainer_metrics`).
    """
    args = trainer.args
    metric = (args.metric_for_best_model or "accuracy").removeprefix("eval_")
    greater = args.greater_is_better if args.greater_is_better is not None else True
    eval_dataset = as_pass_data(eval_dataset, "eval_dataset")  # one set (not a dict), re-readable (not a generator)
    if batch_labels(first_example_batch(eval_dataset, trainer.data_collator, "eval_dataset")) is None:
        raise ValueError(
            "The eval dataset has no 'labels'/'label' column: SAP's alpha search and refine's choices need a clean, "
            "labelled eval set; pass eval_dataset= with labels."
        )
    if trainer.is_world_process_zero():
        logger.info(
            "SAP evaluation: shared by the %d process(es), each reading and scoring only its shard of the eval "
            "set; metrics from compute_metrics on the gathered predictions.",
            runtime.world,
        )
    return metric, greater, lambda model: trainer_metrics(trainer, model, eval_dataset, runtime)


def trainer_metrics(trainer: Any, model: nn.Module, eval_dataset: Any, runtime: Runtime) -> dict[str, float]:
    """`compute_metrics` and `loss` on the eval set, each process reading only its shard (`eval_predictions`).

    `loss` is plain cross-entropy over the labelled samples (as `eval_loss` of a model with a standard
    classification head), even where the model or `compute_loss_func` would compute another loss, so
    `metric_for_best_model="loss"` compares alphas on the clean set by likelihood. As in `Trainer.evaluate`,
    no `compute_metrics` (or `prediction_loss_only`) means the loss alone.
    """
    args = trainer.args
    included = set(args.include_for_metrics or [])
    loss_only = trainer.compute_metrics is None or args.prediction_loss_only
    output = eval_predictions(
        model,
        eval_dataset,
        runtime=runtime,
        preprocess=trainer.preprocess_logits_for_metrics,
        with_predictions=not loss_only,
        with_inputs=not loss_only and "inputs" in included,
    )
    metrics: dict[str, Any] = {}
    if not loss_only:
        metrics = denumpify_detensorize(dict(_compute_metrics(trainer.compute_metrics, output, args, included)))
    metrics["loss"] = output.loss
    return metrics


def _compute_metrics(compute: Callable, output: EvalPredictions, args: Any, included: set) -> Any:
    """`compute(EvalPrediction(...))` as `Trainer.evaluate` calls it: whole, per batch, or with a list of batches."""
    fields = {
        "predictions": output.predictions,
        "label_ids": output.label_ids,
        "inputs": output.inputs if "inputs" in included else None,
        "losses": output.losses.astype(np.float32) if "loss" in included else None,
    }
    if not args.batch_eval_metrics and args.eval_do_concat_batches:
        return compute(EvalPrediction(**fields))
    size = args.per_device_eval_batch_size
    starts = range(0, len(output.label_ids), size)
    if not args.batch_eval_metrics:  # eval_do_concat_batches=False: a list of per-batch arrays for each field
        return compute(EvalPrediction(**{k: _batches(v, starts, size) for k, v in fields.items()}))
    metrics = None
    for start in starts:  # batch_eval_metrics: one call per batch, tensors, compute_result on the last
        part = {k: _rows(v, start, size, as_tensor=True) for k, v in fields.items()}
        metrics = compute(EvalPrediction(**part), compute_result=start == starts[-1])
    return metrics


def _rows(value: Any, start: int, size: int, as_tensor: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_rows(v, start, size, as_tensor) for v in value)
    part = value[start : start + size]
    return torch.from_numpy(np.ascontiguousarray(part)) if as_tensor else part


def _batches(value: Any, starts: range, size: int) -> Any:
    return None if value is None else [_rows(value, start, size) for start in starts]
