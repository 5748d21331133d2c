"""Fine-tune a ViT on noisy labels, correct it with SAP, evaluate, save and push.

    accelerate launch recipes/clothing1m.py                                  # embedded default, no download
    accelerate launch recipes/clothing1m.py --data_dir /data/clothing1m \\
        --config recipes/configs/clothing1m_vit_base.yaml                     # a real Clothing1M copy
    accelerate launch recipes/clothing1m.py --config recipes/configs/cifar10n.yaml \
        --cifar10n_labels CIFAR-10_human.pt                                  # CIFAR-10N (images: uoft-cs/cifar10)
    accelerate launch --multi_gpu --num_processes 2 recipes/clothing1m.py    # 2 processes (CPU: gloo)

Without `--data_dir` it runs on the embedded default (real Fashion-MNIST images with 40%
symmetric label noise, a tiny ViT trained from scratch), configured by
`recipes/configs/default.yaml`. Any argument of `ScriptArguments`, `TrainingArguments`,
`SAPConfig` or `LossConfig` can be given on the command line or in a YAML `--config`:
`--loss gce --gce_q 0.7` or `--loss sce` trains with a noise-robust loss before SAP,
`--label_smoothing_factor 0.1` (with the default `--loss ce`) with label smoothing.

A user error (a bad value, a wrong path) is one line on stderr with exit code 2, and paths are
checked before any data is read or model loaded; a bare `--debug` shows the traceback instead
(`--debug OPTION` is still TrainingArguments' own debug option).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainingArguments, default_data_collator, set_seed
from transformers.utils import logging

from sap_hf import ActivationStats, SAPConfig
from sap_hf.audit.cleanup import BEST_MODES, REFINE_MODES, RefineConfig
from sap_hf.cli.args import parse_with_config
from sap_hf.cli.checks import check_paths
from sap_hf.cli.errors import pop_debug_flag, report_user_errors
from sap_hf.cli.sources import (
    DataArguments,
    ModelArguments,
    image_transforms,
    load_model,
    load_splits,
    prepare,
    saved_image_processor,
)
from sap_hf.core.cache import check_statistics_options, check_stats_path
from sap_hf.core.formatting import format_result_alphas
from sap_hf.data import undecoded_images
from sap_hf.losses import LossConfig, make_loss_func, training_loss_record
from sap_hf.plotting import plot_alpha_curve
from sap_hf.trainer import SAPTrainer


logger = logging.get_logger("sap_hf.recipes.clothing1m")
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


@dataclass
class ScriptArguments(DataArguments, ModelArguments):
    """Data and model arguments of the recipe."""

    stats_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Cache of the SAP statistics, reused when it exists and matches the model (default: "
            "output_dir/_sap_stats.safetensors, replaced when it holds an earlier run's statistics; the leading '_' "
            "keeps it out of Hub uploads). Checked before training."
        },
    )
    label_audit: bool = field(
        default=True,
        metadata={
            "help": "After SAP, audit the training labels with the corrected model: output_dir/_label_audit/ "
            "(label_audit.csv, label_audit_summary.json, label_audit_top.png; kept out of Hub uploads)."
        },
    )
    refine: bool = field(
        default=False,
        metadata={
            "help": "After SAP, fine-tune on the training data without the suspected labels (sap_hf.refine); lr and length on val."
        },
    )
    reaudit_after_refine: bool = field(
        default=True,
        metadata={
            "help": "After refine, audit the training labels again with the refined model: "
            "output_dir/_label_audit_refined/ (same files). A model fine-tuned without the suspects no longer fits "
            "most wrong labels, so this second audit ranks them better than the first (benchmarks/studies/label_audit.md)."
        },
    )
    refine_mode: str = field(
        default="best",
        metadata={
            "help": f"Refine: one of {list(REFINE_MODES)} ('best' tries {list(BEST_MODES)} and keeps the one best on val)."
        },
    )
    refine_learning_rates: Optional[list[float]] = field(
        default=None,
        metadata={"help": "Refine: learning rates tried (default: the training learning_rate and twice it)."},
    )
    refine_epochs: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 6, 8],
        metadata={"help": "Refine: epochs evaluated on val (the largest is the run length)."},
    )
    refine_relabel_threshold: float = field(
        default=0.9,
        metadata={"help": "Refine, mode 'relabel': relabel when the corrected model's probability is at least this."},
    )

    refine_augment: bool = field(
        default=True,
        metadata={
            "help": "Refine: train on flipped and shifted views of every image (RefineConfig.augment; 'pseudo' "
            "always augments its unlabelled images)."
        },
    )

    def refine_config(self) -> RefineConfig:
        return RefineConfig(
            mode=self.refine_mode,
            learning_rates=self.refine_learning_rates,
            epochs=self.refine_epochs,
            relabel_threshold=self.refine_relabel_threshold,
            augment=self.refine_augment,
        )


ARGUMENT_TYPES = (ScriptArguments, TrainingArguments, SAPConfig, LossConfig)
"""Every dataclass the recipe parses, in the order `main` unpacks them (command line and YAML)."""


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the recipe; a user error exits with code 2 and one line on stderr (a bare `--debug`: the traceback)."""
    debug, argv = pop_debug_flag(sys.argv[1:] if argv is None else argv, debug_takes_values=True)
    with report_user_errors(Path(__file__).name, debug=debug):
        return run(argv)


def run(argv: list[str]) -> dict:
    """Fine-tune, correct, audit (and refine), evaluate and save: `main` without the one-line error reporting."""
    argv = list(argv)
    if not torch.cuda.is_available() and not any(a.startswith("--use_cpu") for a in argv):
        # Without this, TrainingArguments treats N CPU processes as N independent runs (NOT_PARALLEL);
        # use_cpu makes them one gloo (MULTI_CPU) job.
        argv = ["--use_cpu", "true", *argv]
    script_args, training_args, sap_config, loss_config = parse_with_config(
        ARGUMENT_TYPES, argv, default_config=DEFAULT_CONFIG
    )
    check_paths(
        model_name_or_path=script_args.model_name_or_path,
        data_dir=script_args.data_dir,
        cifar10n_labels=script_args.cifar10n_labels,
        output_dir=training_args.output_dir,
    )  # before any data is read or model loaded
    loss_func = make_loss_func(loss_config, training_args.label_smoothing_factor)  # raises before any data is read
    refine_config = script_args.refine_config() if script_args.refine else None  # validated before training
    logging.set_verbosity_info() if training_args.should_log else None
    set_seed(training_args.seed)
    default_stats = script_args.stats_path is None
    stats_path = script_args.stats_path or str(Path(training_args.output_dir) / "_sap_stats.safetensors")
    check_stats_path(stats_path, writable=training_args.process_index == 0)  # before training, not after it

    splits = load_splits(script_args)
    model, processor = load_model(script_args, splits)
    train_transform, eval_transform = image_transforms(model, processor, script_args.augment, training_args.seed)
    training_args.remove_unused_columns = False  # the transforms produce the model inputs
    trainer = SAPTrainer(
        model=model,
        args=training_args,
        train_dataset=prepare(splits.train, train_transform),
        eval_dataset=prepare(splits.validation, eval_transform),
        data_collator=default_data_collator,
        processing_class=saved_image_processor(processor, eval_transform),  # saved: the folder loads in pipeline()
        compute_loss_func=loss_func,
        sap_config=sap_config,
        base_model_name=script_args.model_name_or_path,
    )
    trainer.train()  # to correct an already-trained model without training, use `sap-hf correct`

    test = prepare(splits.test, eval_transform)
    before = trainer.evaluate(test, metric_key_prefix="test") if test is not None else {}
    if default_stats:
        if trainer.is_world_process_zero():
            _drop_stale_stats(Path(stats_path), trainer.model, sap_config)
        trainer.accelerator.wait_for_everyone()
    audit_train = prepare(splits.train, eval_transform)  # the training labels, without augmentation
    # SAP reads the raw rows with the eval transform as collator: each training image is decoded once, by one
    # process, and the trusted samples are kept as raw rows (a path and a label) for the statistics.
    result = trainer.correct(
        selection_dataset=undecoded_images(splits.train), collate_fn=eval_transform.collate, stats_path=stats_path
    )
    sap_test = trainer.evaluate(test, metric_key_prefix="test") if test is not None and refine_config else {}
    if script_args.label_audit or refine_config:
        trainer.audit_labels(audit_train)
    first_audit = trainer.label_audit
    if refine_config:
        trainer.refine(audit_train, refine_config=refine_config)
        if script_args.reaudit_after_refine:  # the refined model's audit: the better ranking of the wrong labels
            refined = Path(training_args.output_dir) / "_label_audit_refined"  # by the refined model's probabilities
            trainer.audit_labels(audit_train, output_dir=refined, source="model")
    after = trainer.evaluate(test, metric_key_prefix="test") if test is not None else {}

    trainer.sap_extra_record = {
        "dataset": splits.name,
        "test_metrics_before": {k.removeprefix("test_"): v for k, v in before.items() if k.endswith("accuracy")},
        "test_metrics_after": {k.removeprefix("test_"): v for k, v in after.items() if k.endswith("accuracy")},
    }
    if sap_test:
        trainer.sap_extra_record["test_metrics_after_sap"] = {
            k.removeprefix("test_"): v for k, v in sap_test.items() if k.endswith("accuracy")
        }
    summary = {
        "dataset": splits.name,
        "training_loss": training_loss_record(loss_func, training_args.label_smoothing_factor),
        "chosen_alpha": result.alpha,
        "chosen_kind_alphas": result.kind_alphas,
        "val_accuracy_before": result.baseline_metrics.get("accuracy"),
        "val_accuracy_after": result.final_metrics.get("accuracy"),
        "test_accuracy_before": before.get("test_accuracy"),
        "test_accuracy_after": after.get("test_accuracy"),
    }
    if first_audit is not None:
        summary["label_audit_suspected"] = first_audit.num_suspected
    if trainer.label_audit is not first_audit:
        summary["label_audit_refined_suspected"] = trainer.label_audit.num_suspected
    if trainer.refine_result is not None:
        summary.update(
            test_accuracy_after_sap=sap_test.get("test_accuracy"),
            refine_mode=trainer.refine_result.mode,
            refine_learning_rate=trainer.refine_result.learning_rate,
            refine_epochs=trainer.refine_result.epochs,
            val_accuracy_after_refine=trainer.refine_result.final_metrics.get("accuracy"),
        )
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_alpha_curve(result, output_dir / "sap_alpha_curve.png")
        (output_dir / "sap_summary.json").write_text(json.dumps(summary, indent=2))
        refined = (
            f", after refine {_fmt(summary['test_accuracy_after'])} (mode={trainer.refine_result.mode}, "
            f"{trainer.refine_result.epochs} epoch(s))"
            if trainer.refine_result is not None
            else ""
        )
        print(
            f"[sap_hf] {splits.name} ({_loss(summary['training_loss'])}): "
            f"clean-test accuracy before SAP {_fmt(summary['test_accuracy_before'])}, "
            f"after SAP {_fmt(summary.get('test_accuracy_after_sap', summary['test_accuracy_after']))} "
            f"(alpha={format_result_alphas(result)}, "
            f"val {_fmt(summary['val_accuracy_before'])} -> {_fmt(summary['val_accuracy_after'])}){refined}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="SAP-corrected model")  # saves first, then uploads once
    else:
        trainer.save_model()
    # Every process reaches the teardown together: a process that destroys the gloo group while another is still
    # saving (the main process) or uploading could leave that one waiting in its teardown.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroy the process group before exit: a live gloo group can abort the teardown
    return summary


def _drop_stale_stats(path: Path, model: Any, config: SAPConfig) -> None:
    """The default cache in output_dir may hold an earlier run's statistics: collect anew instead of failing.

    Stale: collected on other weights, or with other targeting / accumulation / selection options
    (`check_statistics_options`). (An explicit --stats_path that does not match still raises, in `sap_correct`.)
    """
    if not path.is_file():
        return
    try:
        stats = ActivationStats.load(path)
        stats.check_model(model)
        check_statistics_options(stats, config, path, trusted_given=config.trusted_source == "training")
    except ValueError as err:
        logger.warning(
            "%s holds statistics of an earlier run in this output_dir that do not fit this one (%s): "
            "collecting new ones.",
            path,
            err,
        )
        path.unlink()


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _loss(record: dict) -> str:
    """`loss=gce, gce_q=0.7` or `loss=ce, label_smoothing_factor=0`."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


if __name__ == "__main__":
    main()
