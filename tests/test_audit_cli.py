"""`sap-hf audit` on a tiny Clothing1M copy, its errors, and the audit ranking on 1 vs 2 processes."""

import csv
import json
from pathlib import Path

import pytest
from helpers import user_error
from launching import accelerate_launch

from sap_hf.audit.report import CSV_NAME, GRID_NAME, SUMMARY_NAME
from sap_hf.cli import commands as cli


WORKER = Path(__file__).with_name("distributed_audit_worker.py")


def _tiny_model(path: Path, num_labels: int = 14) -> Path:
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    config = tiny_vit_config(
        image_size=32, patch_size=8, num_channels=3, num_labels=num_labels, hidden_size=32, num_hidden_layers=2
    )
    ViTForImageClassification(config).save_pretrained(path)
    return path


def test_cli_audit_writes_csv_summary_and_grid(tiny_clothing1m, tmp_path, capsys):
    model = _tiny_model(tmp_path / "model")
    out = tmp_path / "audit"
    cli.main(
        [
            "audit",
            "--model_name_or_path",
            str(model),
            "--data_dir",
            str(tiny_clothing1m),
            "--output_dir",
            str(out),
            "--filter_by",
            "predicted_neq_given",
            "--top_k",
            "6",
            "--batch_size",
            "16",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["examples"] == 42 and printed["filter_by"] == "predicted_neq_given"
    with open(out / CSV_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["key"].endswith(".jpg")  # Clothing1M's key column names each row
    assert len(rows) == 42 and {r["given_name"] for r in rows} <= {
        "T-Shirt",
        "Shirt",
        "Knitwear",
        "Chiffon",
        "Sweater",
        "Hoodie",
        "Windbreaker",
        "Jacket",
        "Downcoat",
        "Suit",
        "Shawl",
        "Dress",
        "Vest",
        "Underwear",
    }
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert (
        summary["dataset"] == "clothing1m"
        and summary["split"] == "train"
        and summary["suspected"] == printed["suspected"]
    )
    assert (out / GRID_NAME).stat().st_size > 0 or printed["suspected"] == 0


def test_cli_audit_rejects_bad_arguments(tiny_clothing1m, tmp_path, capsys):
    data = ["--data_dir", str(tiny_clothing1m)]
    line = user_error(capsys, cli.main, ["audit", *data, "--output_dir", str(tmp_path)], prog="sap-hf audit")
    assert "--model_name_or_path is required" in line
    line = user_error(capsys, cli.main, ["audit", *data, "--model_name_or_path", "x"], prog="sap-hf audit")
    assert "--output_dir is required: where to write the label audit" in line
    line = user_error(capsys, cli.main, ["correct", *data, "--model_name_or_path", "x"], prog="sap-hf correct")
    assert "--output_dir is required: where to save the corrected model" in line
    other = _tiny_model(tmp_path / "model3", num_labels=3)
    for command, fix in (
        ("audit", "audit with a model trained on this data"),
        ("correct", "correct a model trained on this data"),
    ):
        line = user_error(
            capsys,
            cli.main,
            [command, "--model_name_or_path", str(other), *data, "--output_dir", str(tmp_path / command)],
            alone=False,
        )  # found once the model is read
        assert f"has num_labels=3 but the data has 14 classes; {fix}" in line
    line = user_error(
        capsys, cli.main, ["audit", "--model_name_or_path", "x", "--output_dir", str(tmp_path), "--views", "flip"]
    )
    assert "--views 'flip' is invalid" in line


def _launch(out: Path, processes: int) -> dict:
    out.mkdir()
    run = accelerate_launch(processes, [WORKER, out], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_audit_and_refine_two_processes_equal_one(tmp_path):
    one, two = _launch(tmp_path / "one", 1), _launch(tmp_path / "two", 2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["ranking"] == two["ranking"] and len(one["ranking"]) == 23
    assert one["suspected"] == two["suspected"]
    assert max(abs(a - b) for a, b in zip(one["scores"], two["scores"])) <= 1e-6
    assert one["refine_epochs"] == two["refine_epochs"] == 2  # the weights compared below were trained
    assert one["refine_trials"] == pytest.approx(two["refine_trials"], abs=1e-6)
    # The same update up to float32 summation order (the gradient is summed over shards), which Adam's
    # normalisation amplifies where a gradient is near zero: 5e-5 measured after 2 epochs at lr 1e-2.
    scale = max(abs(a) for a in one["weights"])
    assert max(abs(a - b) for a, b in zip(one["weights"], two["weights"])) <= 1e-4 * scale
