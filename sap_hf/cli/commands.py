"""`sap-hf`: correct an already-trained model without training, or push a saved correction.

    sap-hf correct --model_name_or_path ./my-vit --data_dir /data/clothing1m --output_dir ./my-vit-sap
    sap-hf correct --model_name_or_path user/vit-noisy --dataset_name user/my-images --push_to_hub --hub_model_id user/vit-sap
    sap-hf push ./my-vit-sap --repo_id user/vit-sap
    sap-hf audit --model_name_or_path ./my-vit-sap --data_dir /data/clothing1m --output_dir ./label-audit
    sap-hf --version

`correct` reads the same data arguments as the recipe (Clothing1M layout, a `datasets` dataset,
or the embedded Fashion-MNIST default) and every `SAPConfig` field; `--config FILE.yaml` gives
defaults. It runs under `accelerate launch` with any number of processes.

A user error (a bad value, a wrong path, a missing argument) is one line on stderr naming the
argument and the fix, with exit code 2; paths are checked before any data or model is read.
`--debug` (any command) shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from transformers import AutoModelForImageClassification
from transformers.utils import logging

from .. import __version__
from ..api import sap_correct
from ..audit.labels import FILTERS, SCORE_METHODS, VIEWS, audit_labels
from ..audit.report import write_audit_report
from ..core.cache import check_stats_path
from ..core.config import SAPConfig
from ..data import undecoded_images
from ..evaluation import evaluate_accuracy
from ..hub import push_folder, sap_record, staged_save, write_sap_files
from ..runtime.passes import Runtime
from .args import ArgumentParser, parse_with_config
from .checks import check_paths, hub_model_errors
from .errors import pop_debug_flag, report_user_errors
from .sources import (
    DataArguments,
    align_labels,
    image_transforms,
    load_processor,
    load_splits,
    prepare,
    saved_image_processor,
)


logger = logging.get_logger(__name__)


def _require(arguments: object, **why: str) -> None:
    """Raise for the first empty one of the named arguments, saying what it is for."""
    for name, purpose in why.items():
        if not getattr(arguments, name):
            raise ValueError(f"--{name} is required: {purpose}.")


@dataclass
class CorrectArguments(DataArguments):
    """Arguments of `sap-hf correct` besides the data arguments and `SAPConfig`."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Trained image classifier to correct: a Hub id or a local path (required)."}
    )
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the corrected model is saved (required)."}
    )
    stats_path: Optional[str] = field(
        default=None, metadata={"help": "Statistics cache: reused when it exists (no data pass), written otherwise."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the corrected model to the Hub."})
    hub_model_id: Optional[str] = field(
        default=None, metadata={"help": "Hub repo id to push to (needed with --push_to_hub)."}
    )
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the logged-in token)."})
    hub_private_repo: Optional[bool] = field(default=None, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self,
            model_name_or_path="the trained model (Hub id or local path) to correct",
            output_dir="where to save the corrected model",
        )
        # Here, before the next dataclasses are parsed: a wrong path is the only line printed.
        check_paths(
            model_name_or_path=self.model_name_or_path,
            data_dir=self.data_dir,
            output_dir=self.output_dir,
            cifar10n_labels=self.cifar10n_labels,
        )
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/vit-sap).")


def _load_classifier(model_name_or_path: str, splits: Any, fix: str) -> tuple[Any, Any]:
    """The trained classifier, refused (before any data pass) when its classes are not the data's, and the splits
    with labels as the model's class ids (`align_labels`: remapped when its id2label orders the names otherwise)."""
    with hub_model_errors(model_name_or_path):
        model = AutoModelForImageClassification.from_pretrained(model_name_or_path)
    if model.config.num_labels != len(splits.class_names):
        raise ValueError(
            f"The model {model_name_or_path!r} has num_labels={model.config.num_labels} but the data has "
            f"{len(splits.class_names)} classes; {fix}."
        )
    return model, align_labels(splits, model, model_name_or_path)


def _save_corrected(args: Any, is_main: bool, model: Any, processor: Any, transform: Any, record: dict) -> None:
    """The corrected model's folder, written atomically by the main process: weights, the image processor (so the
    folder loads in `transformers.pipeline()`), the SAP record and card."""
    with staged_save(args.output_dir, is_main=is_main) as stage:
        if is_main:
            model.save_pretrained(stage)
            saved_processor = saved_image_processor(processor, transform)
            if saved_processor is not None:
                saved_processor.save_pretrained(stage)
            write_sap_files(stage, record, args.hub_model_id or Path(args.output_dir).name)


def correct(argv: Optional[Sequence[str]] = None) -> dict:
    from accelerate import Accelerator

    args, config = parse_with_config((CorrectArguments, SAPConfig), argv, prog="sap-hf correct")
    if "training" in (config.trusted_source, config.audit_source):
        raise ValueError(
            f"trusted_source={config.trusted_source!r}, audit_source={config.audit_source!r}: 'training' reads what "
            "SAPTrainer.train() records while it trains, and `sap-hf correct` corrects a model already trained. Use "
            "'pass' / 'model' here, or train with SAPTrainer (recipes/clothing1m.py)."
        )
    accelerator = Accelerator()
    if args.stats_path:  # before the data is loaded and evaluated
        check_stats_path(args.stats_path, writable=accelerator.is_main_process)
    splits = load_splits(args)
    model, splits = _load_classifier(args.model_name_or_path, splits, "correct a model trained on this data")
    if splits.validation is None:
        raise ValueError("The data has no clean validation split: SAP chooses alpha on it. Set --validation_split.")
    if config.selection_rule == "early_loss":
        raise ValueError(
            "selection_rule='early_loss' needs an earlier checkpoint, which `sap-hf correct` cannot take; use the "
            "Python API (sap_correct(..., selection_model=...)) or another selection_rule."
        )
    processor = load_processor(args.model_name_or_path)
    model.to(accelerator.device)
    _, transform = image_transforms(model, processor, augment=False, seed=0)
    # Raw rows, decoded by the collator: each image is decoded once per pass, by the one process that reads it.
    train, validation, test = (
        None if s is None else undecoded_images(s) for s in (splits.train, splits.validation, splits.test)
    )
    runtime = Runtime(accelerator=accelerator, collate_fn=transform.collate, batch_size=config.batch_size)
    evaluate = lambda: evaluate_accuracy(model, test, runtime=runtime)  # noqa: E731
    test_before = evaluate() if test is not None else {}
    result = sap_correct(model, train, validation, config, runtime, stats_path=args.stats_path)
    test_after = evaluate() if test is not None else {}
    record = sap_record(
        result,
        args.model_name_or_path,
        {"dataset": splits.name, "test_metrics_before": test_before, "test_metrics_after": test_after},
    )
    _save_corrected(args, accelerator.is_main_process, model, processor, transform, record)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = {
            "alpha": result.alpha,
            "kind_alphas": result.kind_alphas,
            "eval_before": result.baseline_metrics,
            "eval_after": result.final_metrics,
            "test_before": test_before,
            "test_after": test_after,
        }
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")  # the command's result, for scripts
        if args.push_to_hub:
            push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.wait_for_everyone()  # teardown together: not while the main process still uploads
    accelerator.end_training()  # destroy the process group before exit: a live gloo group can abort the teardown
    return record


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "A folder saved by `sap-hf correct` or SAPTrainer.save_model()."})
    repo_id: str = field(metadata={"help": "Hub repo id, e.g. user/vit-sap."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the logged-in token)."})
    private: Optional[bool] = field(default=None, metadata={"help": "Create the repo as private."})


def push(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):
        argv = ["--folder", argv[0], *argv[1:]]
    (args,) = ArgumentParser(PushArguments, prog="sap-hf push").parse_strict(argv)
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        reason = (
            "it does not exist"
            if not folder.exists()
            else "it is a file"
            if not folder.is_dir()
            else "it has no config.json"
        )
        raise FileNotFoundError(
            f"FOLDER {args.folder!r} holds no saved model ({reason}); pass a folder written by `sap-hf correct` or "
            "SAPTrainer.save_model()."
        )
    push_folder(args.folder, args.repo_id, token=args.token, private=args.private)


@dataclass
class AuditArguments(DataArguments):
    """Arguments of `sap-hf audit`: which model judges which labels, and where the report goes."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "The (SAP-corrected) image classifier whose view of the labels is reported (required)."},
    )
    output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where label_audit.csv, label_audit_summary.json and label_audit_top.png go (required)."},
    )
    split: str = field(
        default="train", metadata={"help": "Which split's labels to audit: 'train', 'validation' or 'test'."}
    )
    method: str = field(
        default="self_confidence", metadata={"help": f"Label-quality score: one of {list(SCORE_METHODS)}."}
    )
    filter_by: str = field(
        default="auto",
        metadata={
            "help": f"How 'suspected' is decided: one of {list(FILTERS)} (all but 'predicted_neq_given' need cleanlab)."
        },
    )
    views: str = field(
        default="shift",
        metadata={
            "help": f"Probabilities of the image alone or averaged over it and 4 one-pixel shifts (default: it ranks wrong labels better, see benchmarks/studies/label_audit.md): {list(VIEWS)}."
        },
    )
    top_k: int = field(
        default=32, metadata={"help": "Suspected images shown in label_audit_top.png (0: no image grid)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Batch size of the audit pass (per process)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self,
            model_name_or_path="the (SAP-corrected) model whose view of the labels to report",
            output_dir="where to write the label audit",
        )
        check_paths(
            model_name_or_path=self.model_name_or_path,
            data_dir=self.data_dir,
            output_dir=self.output_dir,
            cifar10n_labels=self.cifar10n_labels,
        )
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"--split {self.split!r} is invalid: choose 'train', 'validation' or 'test'.")
        for name, allowed in (("method", SCORE_METHODS), ("filter_by", FILTERS), ("views", VIEWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: choose one of {list(allowed)}.")
        if self.top_k < 0 or self.batch_size < 1:
            raise ValueError(f"--top_k must be >= 0 and --batch_size >= 1, got {self.top_k} and {self.batch_size}.")


def audit(argv: Optional[Sequence[str]] = None) -> dict:
    """`sap-hf audit`: which labels of a split look wrong to the model; CSV + JSON + PNG in --output_dir."""
    from accelerate import Accelerator

    (args,) = parse_with_config((AuditArguments,), argv, prog="sap-hf audit")
    accelerator = Accelerator()
    splits = load_splits(args)
    model, splits = _load_classifier(args.model_name_or_path, splits, "audit with a model trained on this data")
    data = getattr(splits, args.split)
    if data is None:
        raise ValueError(f"The data has no {args.split!r} split to audit; pass --split train.")
    processor = load_processor(args.model_name_or_path)
    model.to(accelerator.device)
    _, transform = image_transforms(model, processor, augment=False, seed=0)
    transform.keep_columns = (*transform.keep_columns, "key")  # Clothing1M's image path names each row of the CSV
    data = prepare(data, transform)
    result = audit_labels(
        model,
        data,
        method=args.method,
        filter_by=args.filter_by,
        views=args.views,
        class_names=splits.class_names,
        runtime=Runtime(accelerator=accelerator, batch_size=args.batch_size),
    )
    summary = result.summary()
    if accelerator.is_main_process:
        written = write_audit_report(
            result,
            args.output_dir,
            data,
            top_k=args.top_k,
            extra={"model": args.model_name_or_path, "dataset": splits.name, "split": args.split},
        )
        short = {k: summary[k] for k in ("examples", "suspected", "suspected_fraction", "scorer", "filter_by")}
        short["files"] = {k: str(v) for k, v in written.items()}
        short["top_pairs"] = dict(list(summary["suspected_pairs"].items())[:5])
        sys.stdout.write(json.dumps(short, indent=2) + "\n")  # the command's result, for scripts
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


COMMANDS = {"correct": correct, "push": push, "audit": audit}
COMMAND_HELP = {
    "correct": "correct a trained classifier with SAP and save it (with its SAP record and model card)",
    "push": "upload a saved (corrected) model folder to the Hub",
    "audit": "rank which labels of a split look wrong to a (SAP-corrected) model: CSV, JSON, image grid",
}


def _usage() -> str:
    """The command listing: argparse knows one command's arguments, not which commands exist."""
    listing = "".join(f"  {name:<8} {text}\n" for name, text in COMMAND_HELP.items())
    return (
        f"usage: sap-hf {{{','.join(COMMANDS)}}} [--help] [--debug] ...\n       sap-hf --version\n{listing}"
        "  --debug  show the traceback of an error instead of its one-line message\n"
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run one command; a user error exits with code 2 and one line on stderr (`--debug`: the traceback)."""
    debug, argv = pop_debug_flag(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(_usage())
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        raise SystemExit(0)
    if argv[0] == "--version":
        sys.stdout.write(f"sap-hf {__version__}\n")
        return
    if argv[0] not in COMMANDS:
        what = "option" if argv[0].startswith("-") else "command"
        sys.stderr.write(
            f"sap-hf: error: unknown {what} {argv[0]!r}; choose a command: {', '.join(COMMANDS)} "
            "(`sap-hf --help` describes them).\n"
        )
        raise SystemExit(2)
    with report_user_errors(f"sap-hf {argv[0]}", debug=debug):
        COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
