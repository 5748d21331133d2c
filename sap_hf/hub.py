"""Saving and pushing a corrected model: atomic local saves, the SAP record, the model card.

A corrected model is an ordinary `from_pretrained`-loadable folder plus `sap_record.json` (what
SAP did and measured) and a `README.md` model card. Files are staged in a hidden folder and
moved into place one by one with `os.replace` (`sap_hf.utils.io.staged_save`), and the record
and card are each written atomically, so an interrupted save never leaves a half-written file
where a previous, readable one stood. A failed push leaves the local folder intact and says what
to rerun.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.utils import logging

from .core.formatting import format_alpha, format_kind_alphas
from .losses import describe_training_loss
from .utils.io import (
    STAGING_NAME,
    atomic_write,
    staged_save,  # noqa: F401  (callers import the save mechanism from here)
)


logger = logging.get_logger(__name__)

SAP_RECORD_NAME = "sap_record.json"
SAP_TAGS = ["sap", "label-noise", "vision-transformer", "image-classification", "sap_hf"]

CITATION = """@inproceedings{kodge2025sap,
  title     = {SAP: Corrective Machine Unlearning with Scaled Activation Projection for Label Noise Robustness},
  author    = {Kodge, Sangamesh and Ravikumar, Deepak and Saha, Gobinda and Roy, Kaushik},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2025},
  eprint    = {2403.08618},
  archivePrefix = {arXiv}
}"""

CARD_TEMPLATE = """
# {model_name}

This model was corrected for label noise with **SAP (Scaled Activation Projection)**
(Kodge et al., AAAI 2025, [arXiv:2403.08618](https://arxiv.org/abs/2403.08618)) using
the `sap_hf` Python package. Base model: `{base_model}`.

## What SAP did

SAP picked {num_trusted} trusted training samples ({per_class} per class, lowest score under the
selection rule `{rule}`),
collected the Gram matrix of the input activations of {num_targets} Linear layers in one forward
pass, and projected every targeted weight onto the trusted activation space,
`W <- W U diag(lambda) U^T` with `lambda = alpha r / ((alpha - 1) r + 1)`. The scaling alpha was
chosen on a clean evaluation split.

- {alpha_label}: {alphas}{kind_alphas}
- Result: {verdict}{training_loss}

## Results

{results_table}

### Evaluation metric for each alpha (first round)

| alpha | {metric} |
|---|---|
| unchanged | {baseline_metric} |
{alpha_rows}
{refine_section}
## Targeted modules

{targets}

## Reproduce

```python
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{model_name}")
```

The full record (configuration, every alpha's metrics, trusted samples per class) is in
`sap_record.json`.

## Citation

```bibtex
{citation}
```
"""


def sap_record(
    result: Any, base_model: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    from . import __version__

    record = {"sap_hf_version": __version__, "base_model": base_model, **result.to_dict()}
    record.update(extra or {})
    return record


def write_sap_files(
    output_dir: Union[str, Path],
    record: Mapping[str, Any],
    model_name: Optional[str] = None,
    card_fields: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write `sap_record.json` and the model card into `output_dir`, each atomically.

    Usually `output_dir` is a `staged_save` folder already; writing each file atomically as well
    keeps a direct call (a record refreshed in a finished save folder) just as safe. `card_fields`: the card
    metadata the caller chose (`build_model_card`).
    """
    output_dir = Path(output_dir)
    text = json.dumps(record, indent=2, default=float)
    card = str(build_model_card(record, model_name or output_dir.name, card_fields))
    atomic_write(output_dir / SAP_RECORD_NAME, lambda handle: handle.write(text))
    atomic_write(output_dir / "README.md", lambda handle: handle.write(card))


def load_sap_record(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    path = path / SAP_RECORD_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"No {SAP_RECORD_NAME} at {str(path)!r}: was this model corrected with sap_hf?")
    return json.loads(path.read_text())


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


STEPS = {"before": "before SAP", "sap": "after SAP", "refine": "after clean-up (refine)"}
"""The steps a corrected model went through, in order: the card has one column, the model-index one result, each."""
SPLITS = {"eval": "validation", "test": "test"}
"""The card's split names and the dataset split each one is recorded as in the model-index."""


def step_metrics(record: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """`{"eval"|"test": {step: metrics}}` for the steps the record measured (`STEPS`' keys), each its own numbers.

    Eval: `baseline_metrics` (before SAP), `final_metrics` (after SAP), `refine.final_metrics`.
    Test: `test_metrics_before`; after SAP `test_metrics_after_sap`, or, when no clean-up followed,
    `test_metrics_after`; after the clean-up `test_metrics_after` (the recipe's final model). Kept apart so
    that no column mixes a test number after refine with an eval number after SAP.
    """
    refined = bool(record.get("refine"))
    eval_steps = {
        "before": record.get("baseline_metrics"),
        "sap": record.get("final_metrics"),
        "refine": (record.get("refine") or {}).get("final_metrics"),
    }
    after_sap = record.get("test_metrics_after_sap") or (None if refined else record.get("test_metrics_after"))
    test_steps = {
        "before": record.get("test_metrics_before"),
        "sap": after_sap,
        "refine": record.get("test_metrics_after") if refined else None,
    }
    return {
        split: {step: metrics for step, metrics in steps.items() if metrics}
        for split, steps in (("eval", eval_steps), ("test", test_steps))
    }


def _results_table(record: Mapping[str, Any], metric: str) -> str:
    """The card's results table: one row per split and metric, one column per step (refine's only when it ran)."""
    steps = [step for step in STEPS if step != "refine" or record.get("refine")]
    measured = step_metrics(record)
    lines = [
        "| split | metric | " + " | ".join(STEPS[step] for step in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for split, by_step in measured.items():
        keys = [metric] if split == "eval" else sorted({key for metrics in by_step.values() for key in metrics})
        for key in keys:
            values = " | ".join(_fmt(by_step.get(step, {}).get(key, "n/a")) for step in steps)
            lines.append(f"| {split} | {key} | {values} |")
    return "\n".join(lines)


def eval_results(record: Mapping[str, Any]) -> list[EvalResult]:
    """The model-index: accuracy after each step on the test and eval splits of `record["dataset"]`.

    Empty when the record names no dataset (a model-index result must say on which data it was
    measured): `SAPTrainer` users set `trainer.sap_extra_record["dataset"]`, as the recipe does.
    """
    dataset = record.get("dataset")
    if not dataset:
        return []
    results = []
    for split in ("test", "eval"):
        for step, metrics in step_metrics(record)[split].items():
            value = metrics.get("accuracy")
            if isinstance(value, (int, float)) and value == value:  # NaN: not measured
                results.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name="Image Classification",
                        dataset_type=str(dataset),
                        dataset_name=str(dataset),
                        dataset_split=SPLITS[split],
                        metric_type="accuracy",
                        metric_value=float(value),
                        metric_name=f"{split} accuracy {STEPS[step]}",
                    )
                )
    return results


def build_model_card(
    record: Mapping[str, Any], model_name: str, card_fields: Optional[Mapping[str, Any]] = None
) -> ModelCard:
    """A model card from the template: what SAP did, the numbers of each step, model-index, tags, citation.

    `card_fields` (`SAPTrainer.create_model_card`'s, i.e. `Trainer.push_to_hub(license=..., tags=...)`'s) add to the
    metadata: `language`, `license`, `datasets`, `tags` (after SAP's) and `base_model` (over the record's).
    """
    fields = dict(card_fields or {})
    base_model = fields.get("base_model") or record.get("base_model") or None
    tags = list(SAP_TAGS) + [tag for tag in fields.get("tags") or [] if tag not in SAP_TAGS]
    first = record["rounds"][0] if record.get("rounds") else {"alphas": [], "metrics": [], "baseline": {}}
    metric = first.get("metric", "accuracy")
    per_class = record.get("trusted_per_class") or {}
    results = eval_results(record)
    data = ModelCardData(
        library_name="transformers",
        tags=tags,
        base_model=base_model,
        pipeline_tag="image-classification",
        license=fields.get("license") or record.get("license"),
        language=fields.get("language"),
        datasets=fields.get("datasets"),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    content = CARD_TEMPLATE.format(
        model_name=model_name,
        base_model=base_model or "trained from scratch",
        training_loss=(
            f"\n- Training loss (on the noisy labels, before SAP): {describe_training_loss(record['training_loss'])}"
            if record.get("training_loss")
            else ""
        ),
        num_trusted=record.get("num_trusted", 0),
        rule=record.get("config", {}).get("selection_rule", "loss"),
        per_class=(min(per_class.values()) if per_class else record.get("config", {}).get("trusted_per_class")),
        num_targets=len(record.get("target_modules", [])),
        alphas=", ".join(format_alpha(a) for a in record.get("alphas", [])),
        alpha_label="Best shared alpha per round" if record.get("kind_alphas") else "Chosen alpha per round",
        kind_alphas=(
            '\n- Written alpha per layer kind (`alpha_scope="per_kind"`, round 1): '
            + format_kind_alphas(record["kind_alphas"])
            if record.get("kind_alphas")
            else ""
        ),
        verdict="weights projected"
        if record.get("changed")
        else "no alpha beat the uncorrected model; weights unchanged",
        results_table=_results_table(record, metric),
        metric=metric,
        baseline_metric=_fmt(first.get("baseline", {}).get(metric)),
        alpha_rows="\n".join(f"| {a:g} | {_fmt(m.get(metric))} |" for a, m in zip(first["alphas"], first["metrics"])),
        targets="\n".join(f"- `{name}`" for name in record.get("target_modules", [])),
        citation=CITATION,
        refine_section=_refine_section(record),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{content}")


def _refine_section(record: Mapping[str, Any]) -> str:
    """The card's label-audit / clean-up paragraph, when the record has them ('' otherwise)."""
    lines = []
    audit = record.get("label_audit")
    if audit:
        pairs = ", ".join(f"{pair} ({n})" for pair, n in list(audit.get("suspected_pairs", {}).items())[:5])
        lines += [
            "",
            "## Label audit",
            "",
            f"The corrected model flags {audit.get('suspected')} of {audit.get('examples')} training labels as likely wrong "
            f"(score `{audit.get('method')}`, filter `{audit.get('filter_by')}`, {audit.get('scorer')}). "
            f"Most frequent (given -> predicted): {pairs or 'none'}.",
        ]
    refine = record.get("refine")
    if refine:
        metric = (record.get("rounds") or [{}])[0].get("metric", "accuracy")
        verbs = {
            "remove": "the suspected labels removed",
            "relabel": "the suspected labels relabelled where the model is confident, removed otherwise",
            "soft": "every label mixed with the corrected model's sharpened probabilities",
            "pseudo": "the suspected images kept as unlabelled data (FixMatch pseudo-labels)",
        }
        if refine.get("changed"):
            counts = refine.get("examples", {}).get(refine.get("mode"), {})
            what = (
                f"fine-tuned the corrected model on the training data with {verbs.get(refine.get('mode'), refine.get('mode'))} "
                f"({counts.get('kept')} labelled examples kept, {counts.get('removed')} removed, "
                f"{counts.get('unlabelled', 0)} unlabelled, {counts.get('relabelled')} with another top class), "
                f"lr {refine.get('learning_rate'):g}, {refine.get('epochs')} epoch(s); mode, lr and length chosen on the eval set"
            )
        else:
            what = "tried fine-tuning on the cleaned training data; no trial beat the corrected model on the eval set, so it was kept"
        lines += [
            "",
            "## Clean-up after SAP (refine)",
            "",
            f"`sap_hf.refine` {what}: eval {metric} {_fmt(refine.get('baseline_metrics', {}).get(metric))} -> "
            f"{_fmt(refine.get('final_metrics', {}).get(metric))}.",
        ]
    return "\n".join(lines) + ("\n" if lines else "")


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "SAP-corrected model",
) -> Any:
    """Upload a saved folder to the Hub; on failure say that the local copy is intact and what to rerun."""
    folder = Path(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=[f"{STAGING_NAME}/*", "checkpoint-*", "_*"],
        )
    except Exception as err:
        raise RuntimeError(
            f"Pushing {str(folder)!r} to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}). The local save "
            f"is intact; rerun `sap-hf push {folder} --repo_id {repo_id}` once the Hub is reachable."
        ) from err
