"""The label audits the studies compare and the clean-ups' suspects (a support module, not a script).

`probabilities` (the library's `predict_probs` over one pass), `cross_validated_probs` (k-fold out-of-fold
probabilities: cleanlab's input), `detector_metrics` / `audit_ap` (an audit's ranking and flags against the hidden
truth), `shift_audit` (the recipe's audit, `views="shift"`), and the audit from the training dynamics:
`dynamics_audit` ranks each example by its label margin averaged over the first epochs `train_from_scratch`
recorded (`common.DYNAMICS_WINDOWS` names the windows), `dynamics_diagnostics` the average precision of each window.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any, Optional

from common import COUNT_FROM_EVERY_EPOCH, DYNAMICS_WINDOWS, TensorExamples, train_from_scratch


def probabilities(model: Any, pixels: Any, views: str = "image", batch_size: int = 1000) -> Any:
    """Softmax probabilities (float64) of every image, through the library's `predict_probs` on one `Runtime` pass."""
    import torch

    from sap_hf.audit.labels import predict_probs
    from sap_hf.runtime.passes import Runtime

    images = TensorExamples(pixels, torch.zeros(len(pixels), dtype=torch.long))  # labels unread
    probs = None
    with Runtime(batch_size=batch_size, show_progress=False).run(model, images, "probabilities") as walk:
        for batch in walk.batches():
            chunk = predict_probs(walk, batch, views)
            if probs is None:
                probs = torch.zeros(len(pixels), chunk.shape[-1], dtype=chunk.dtype)
            probs[torch.as_tensor(batch.ids, dtype=torch.long)] = chunk
    return probs


def cross_validated_probs(
    data: dict[str, Any], new_model: Callable[[], Any], args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Out-of-sample probabilities of every training image from `args.folds` models, each `new_model()` (called
    after `torch.manual_seed(100 seed + fold)`) trained by `train_from_scratch` for `args.cv_epochs` on the other
    folds and early-stopped on val: cleanlab's cross-validation, the label audits' costly reference."""
    import torch

    n = len(data["train_y"])
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed)) % args.folds
    probs = None
    cv_args = copy.copy(args)
    cv_args.epochs, cv_args.warmup_epochs = args.cv_epochs, args.cv_warmup_epochs
    record = {
        "fold_best_epochs": [],
        "fold_best_val": [],
        "train_seconds": 0.0,
        "epochs_trained": 0,
        "samples_trained": 0,
    }
    for fold in range(args.folds):
        held = folds == fold
        fold_data = dict(data, train_x=data["train_x"][~held], train_y=data["train_y"][~held])
        torch.manual_seed(seed * 100 + fold)
        model = new_model()
        trained = train_from_scratch(model, fold_data, cv_args, seed * 100 + fold)
        model.load_state_dict(trained["best"]["state"])
        held_probs = probabilities(model, data["train_x"][held])
        if probs is None:
            probs = torch.zeros(n, held_probs.shape[-1], dtype=torch.float64)
        probs[held] = held_probs
        record["fold_best_epochs"].append(trained["best"]["epoch"])
        record["fold_best_val"].append(round(trained["best"]["val_accuracy"], 4))
        record["train_seconds"] += trained["seconds"]
        record["epochs_trained"] += args.cv_epochs
        record["samples_trained"] += args.cv_epochs * int((~held).sum())
    record["probs"] = probs
    return record


def detector_metrics(is_noisy: Any, suspicion: Any, flagged: Any) -> dict[str, float]:
    """AP and AUROC of the ranking (higher suspicion = more likely wrong), precision/recall of the flags."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = is_noisy.numpy().astype(bool)
    score = suspicion.double().numpy()
    flags = flagged.numpy().astype(bool)
    hits = int((flags & truth).sum())
    return {
        "average_precision": float(average_precision_score(truth, score)),
        "auroc": float(roc_auc_score(truth, score)),
        "precision": hits / max(1, int(flags.sum())),
        "recall": hits / max(1, int(truth.sum())),
        "flagged": int(flags.sum()),
    }


def audit_ap(audit: Any, data: dict[str, Any]) -> float:
    """Average precision of an audit's ranking (most suspicious first) against the true label errors (`is_noisy`)."""
    from sklearn.metrics import average_precision_score

    truth = data["is_noisy"][audit.indices].numpy()
    return float(average_precision_score(truth, -audit.scores.double().numpy())) if truth.any() else float("nan")


def shift_audit(model: Any, data: dict[str, Any]) -> Any:
    """The recipe's label audit (`views="shift"`) of the noisy training set under `model`."""
    from sap_hf import audit_labels
    from sap_hf.runtime.passes import Runtime

    train_set = TensorExamples(data["train_x"], data["train_y"])
    return audit_labels(model, train_set, views="shift", runtime=Runtime(batch_size=1000, show_progress=False))


def mean_margins(margins: Any, epochs: Optional[int] = None) -> Any:
    """Each example's label margin averaged over the first `epochs` training epochs (all: None), float64."""
    return margins[:epochs].double().mean(0)


def dynamics_audit(
    audit: Any, margins: Any, epochs: Optional[int] = None, count_from_every_epoch: bool = False
) -> Any:
    """`audit` ranked and flagged by the training dynamics (`sap_hf.audit.dynamics_audit`, what `SAPTrainer` does with
    `audit_source="training"`): each example's label margin averaged over the first `epochs` training epochs (all:
    None), from the logits training computed anyway (`train_from_scratch` records them). `count_from_every_epoch`:
    flag the k lowest of that ranking, k = how many the mixture on every epoch's margins flags."""
    import dataclasses

    import torch

    from sap_hf.audit import dynamics_audit as by_margins

    positions = range(margins.shape[1])
    ranked = by_margins(audit, positions, mean_margins(margins, epochs))
    if not count_from_every_epoch:
        return ranked
    count = int(by_margins(audit, positions, mean_margins(margins)).suspected.sum())
    suspected = torch.zeros_like(ranked.suspected)
    suspected[torch.argsort(ranked.scores, stable=True)[:count]] = True
    return dataclasses.replace(ranked, suspected=suspected)


def dynamics_audit_of(kind: str, audit: Any, margins: Any, best_epoch: int) -> Any:
    """The `--audits` kind `kind` (one of `DYNAMICS_WINDOWS`) of a training whose val-best epoch is `best_epoch`:
    `dynamics_audit` over its window, with every epoch's count where `COUNT_FROM_EVERY_EPOCH` says so."""
    return dynamics_audit(audit, margins, DYNAMICS_WINDOWS[kind](best_epoch), kind in COUNT_FROM_EVERY_EPOCH)


def dynamics_diagnostics(trained: dict[str, Any], data: dict[str, Any]) -> dict[str, float]:
    """Average precision of the training-dynamics ranking against the true errors, by window: every epoch, up to the
    val-best epoch, twice that, and the first 40% of the epochs (diagnostics: which window ranks best). `trained` is
    `train_from_scratch`'s record; one cached before the margins were recorded has none: no fields."""
    from sklearn.metrics import average_precision_score

    if "margins" not in trained:
        return {}
    margins, best_epoch = trained["margins"], trained["best"]["epoch"]
    truth = data["is_noisy"].numpy()
    windows = {"all": None, "best": best_epoch, "2best": 2 * best_epoch, "40pct": max(1, round(0.4 * len(margins)))}
    return {
        f"aum_ap_{name}": float(average_precision_score(truth, -mean_margins(margins, epochs).numpy()))
        for name, epochs in windows.items()
    }
