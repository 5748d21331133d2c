"""The model card keeps each step's numbers apart (before SAP, after SAP, after refine; eval and test) and
carries them as model-index metadata that `huggingface_hub` parses back."""

from helpers import random_examples
from huggingface_hub import ModelCard
from transformers import TrainingArguments

from sap_hf import SAPConfig
from sap_hf.hub import write_sap_files
from sap_hf.models import tiny_model
from sap_hf.trainer import SAPTrainer


DATASET = "fashion_mnist-symmetric40"
REFINE = {
    "mode": "remove",
    "learning_rate": 1e-3,
    "epochs": 2,
    "changed": True,
    "baseline_metrics": {"accuracy": 0.5},
    "final_metrics": {"accuracy": 0.6},
    "examples": {"remove": {"kept": 8, "removed": 2, "relabelled": 0}},
}


def _record(**extra):
    first = {"metric": "accuracy", "alphas": [10.0], "metrics": [{"accuracy": 0.5}], "baseline": {"accuracy": 0.4}}
    return {
        "rounds": [first],
        "alphas": [10.0],
        "changed": True,
        "baseline_metrics": {"accuracy": 0.4, "loss": 1.5},
        "final_metrics": {"accuracy": 0.5, "loss": 1.2},
        "base_model": "tiny-vit",
        **extra,
    }


def _results(folder):
    card = ModelCard.load(folder / "README.md")
    return card, {result.metric_name: result for result in card.data.eval_results or []}


def test_each_step_has_its_own_column_and_model_index_entry(tmp_path):
    record = _record(
        dataset=DATASET,
        refine=REFINE,
        test_metrics_before={"accuracy": 0.3},
        test_metrics_after_sap={"accuracy": 0.45},
        test_metrics_after={"accuracy": 0.55},
    )
    write_sap_files(tmp_path, record, "user/tiny-sap")
    card, results = _results(tmp_path)
    assert "| split | metric | before SAP | after SAP | after clean-up (refine) |" in card.text
    assert "| eval | accuracy | 0.4000 | 0.5000 | 0.6000 |" in card.text
    assert "| test | accuracy | 0.3000 | 0.4500 | 0.5500 |" in card.text  # test after SAP is not test after refine
    assert {name: result.metric_value for name, result in results.items()} == {
        "test accuracy before SAP": 0.3,
        "test accuracy after SAP": 0.45,
        "test accuracy after clean-up (refine)": 0.55,
        "eval accuracy before SAP": 0.4,
        "eval accuracy after SAP": 0.5,
        "eval accuracy after clean-up (refine)": 0.6,
    }
    for name, result in results.items():
        assert result.task_type == "image-classification" and result.metric_type == "accuracy"
        assert result.dataset_name == DATASET
        assert result.dataset_split == ("test" if name.startswith("test") else "validation")
    assert card.data.model_name == "user/tiny-sap"


def test_without_refine_the_final_test_numbers_are_after_sap(tmp_path):
    """`sap-hf correct` records test_metrics_after as the corrected model's: no clean-up column, no refine result."""
    write_sap_files(
        tmp_path,
        _record(dataset=DATASET, test_metrics_before={"accuracy": 0.3}, test_metrics_after={"accuracy": 0.45}),
    )
    card, results = _results(tmp_path)
    assert "| split | metric | before SAP | after SAP |\n" in card.text and "refine)" not in card.text
    assert "| test | accuracy | 0.3000 | 0.4500 |" in card.text
    assert {name: result.metric_value for name, result in results.items()} == {
        "test accuracy before SAP": 0.3,
        "test accuracy after SAP": 0.45,
        "eval accuracy before SAP": 0.4,
        "eval accuracy after SAP": 0.5,
    }


def test_a_record_without_a_dataset_has_no_model_index(tmp_path):
    write_sap_files(tmp_path, _record())
    card, results = _results(tmp_path)
    assert results == {} and "model-index" not in card.content
    assert "| eval | accuracy | 0.4000 | 0.5000 |" in card.text


def test_sap_trainer_card_parses_back(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_eval_batch_size=8, report_to=[], disable_tqdm=True, use_cpu=True
    )
    trainer = SAPTrainer(
        model=tiny_model("vit", num_labels=3),
        args=args,
        train_dataset=random_examples(24, seed=1),
        eval_dataset=random_examples(12, seed=2),
        sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8),
    )
    result = trainer.correct()
    trainer.sap_extra_record = {
        "dataset": "random",
        "test_metrics_before": {"accuracy": 0.25},
        "test_metrics_after": {"accuracy": 0.75},
    }
    trainer.save_model()
    _, results = _results(tmp_path / "out")
    assert results["eval accuracy before SAP"].metric_value == result.baseline_metrics["accuracy"]
    assert results["eval accuracy after SAP"].metric_value == result.final_metrics["accuracy"]
    assert results["test accuracy after SAP"].metric_value == 0.75 and len(results) == 4
