"""The recipe end to end on a tiny Clothing1M directory (1 and 2 processes) and the `sap-hf` CLI."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import user_error
from launching import accelerate_launch
from transformers import AutoModelForImageClassification

from sap_hf import SAPConfig
from sap_hf.cli import commands as cli
from sap_hf.hub import load_sap_record
from sap_hf.runtime.passes import Runtime


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clothing1m.py"
TINY = [
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--tiny_hidden_size",
    "32",
    "--tiny_num_layers",
    "2",
    "--tiny_patch_size",
    "8",
    "--trusted_per_class",
    "1",
    "--alphas",
    "1",
    "100",
    "--batch_size",
    "16",
    "--logging_steps",
    "2",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
]


def _launch(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    return accelerate_launch(processes, args, timeout=600, cwd=ROOT, env={"HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("processes", [1, 2])
def test_recipe_on_tiny_clothing1m(tiny_clothing1m, tmp_path, processes):
    out = tmp_path / "out"
    scope = "per_kind" if processes == 2 else "shared"  # the coordinate pass across processes, too
    refine = ["--refine", "true", "--refine_epochs", "1", "--refine_learning_rates", "1e-3"] if processes == 2 else []
    run = _launch(
        processes,
        [
            str(RECIPE),
            "--data_dir",
            str(tiny_clothing1m),
            "--output_dir",
            str(out),
            *TINY,
            "--alpha_scope",
            scope,
            *refine,
        ],
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "clean-test accuracy before SAP" in run.stdout
    summary = json.loads((out / "sap_summary.json").read_text())
    assert set(summary["chosen_kind_alphas"]) == ({"attention", "mlp", "classifier"} if scope == "per_kind" else set())
    assert summary["dataset"] == "clothing1m" and 0 <= summary["test_accuracy_after"] <= 1
    record = load_sap_record(out)
    assert record["num_trusted"] == 14 and record["rounds"][0]["alphas"] == [1.0, 100.0]
    assert record["test_metrics_before"]["accuracy"] == summary["test_accuracy_before"]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 14 and model.config.id2label[13] == "Underwear"
    assert (out / "sap_alpha_curve.png").stat().st_size > 0
    assert (out / "_sap_stats.safetensors").is_file()
    assert (out / "_label_audit" / "label_audit.csv").is_file() and record["label_audit"]["examples"] == 42
    if refine:  # the clean-up after SAP, across processes too
        assert "refine_mode" in summary and record["refine"]["config"]["epochs"] == [1]
        assert summary["val_accuracy_after_refine"] >= summary["val_accuracy_after"]
        # the second look: the refined model audits the labels again into its own folder
        assert (out / "_label_audit_refined" / "label_audit.csv").is_file()
        assert 0 <= summary["label_audit_refined_suspected"] <= 42 and "label_audit_suspected" in summary


def _pretrained_mae(folder: Path) -> Path:
    """A tiny self-supervised checkpoint (ViTMAEForPreTraining + its image processor), as `save_pretrained` writes it."""
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    ViTMAEForPreTraining(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_pretrained_encoder_loads_into_a_classifier_with_a_new_head(tmp_path):
    from transformers import ViTMAEForPreTraining

    from sap_hf.cli.sources import ModelArguments, Splits, load_model

    pretrained = _pretrained_mae(tmp_path / "mae")
    splits = Splits(None, None, None, [f"c{i}" for i in range(14)], 3, "toy")
    model, processor = load_model(ModelArguments(model_name_or_path=str(pretrained)), splits)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 14
    assert processor is not None
    encoder = ViTMAEForPreTraining.from_pretrained(pretrained).state_dict()
    loaded = model.state_dict()
    shared = [name for name in loaded if not name.startswith("classifier")]
    assert shared and all(
        torch.equal(loaded[name], encoder[name]) for name in shared
    )  # the encoder, not a random init


def test_recipe_finetunes_and_corrects_a_pretrained_checkpoint(tiny_clothing1m, tmp_path):
    """The mission's path: fine-tune a pretrained ViT (loaded with from_pretrained) on noisy labels, then correct it."""
    pretrained = _pretrained_mae(tmp_path / "mae")
    out = tmp_path / "out"
    run = _launch(
        1,
        [
            str(RECIPE),
            "--data_dir",
            str(tiny_clothing1m),
            "--output_dir",
            str(out),
            "--model_name_or_path",
            str(pretrained),
            *TINY,
        ],
    )  # the --tiny_* sizes are unused here
    assert run.returncode == 0, run.stderr[-4000:]
    assert "pretraining checkpoint, not a classifier" in run.stderr
    assert "clean-test accuracy before SAP" in run.stdout
    record = load_sap_record(out)
    assert record["base_model"] == str(pretrained) and record["num_trusted"] == 14
    card = (out / "README.md").read_text()
    assert f"base_model: {pretrained}" in card and f"Base model: `{pretrained}`" in card
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 14
    from transformers import ViTMAEForPreTraining

    encoder = ViTMAEForPreTraining.from_pretrained(pretrained).state_dict()
    name = "vit.layers.0.mlp.fc1.weight"
    assert name in encoder and not torch.equal(model.state_dict()[name], encoder[name])  # fine-tuned and/or projected


def test_recipe_checks_stats_path_before_reading_data(tmp_path, capsys):
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m

    folder = tmp_path / "a_folder"
    folder.mkdir()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    for path, match in ((folder, "is a directory"), (corrupt, "not a readable SAP statistics file")):
        argv = ["--output_dir", str(tmp_path / "out"), "--stats_path", str(path), "--report_to", "none"]
        with mock.patch.object(clothing1m, "load_splits", side_effect=AssertionError("data was read")):
            line = user_error(capsys, clothing1m.main, argv, prog="clothing1m.py")
            assert line.startswith("clothing1m.py: error: stats_path=") and match in line
            with pytest.raises(ValueError, match=f"stats_path=.*{match}"):  # the exception, for callers of run()
                clothing1m.run(argv)


def test_recipe_replaces_a_stale_default_statistics_cache(tmp_path):
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m
    from helpers import random_examples

    from sap_hf import collect_statistics
    from sap_hf.core.targets import find_target_modules
    from sap_hf.models import tiny_model

    path = tmp_path / "_sap_stats.safetensors"
    first = tiny_model("vit", num_labels=3, seed=0)
    collect_statistics(
        first, random_examples(4), find_target_modules(first), runtime=Runtime(show_progress=False)
    ).save(path)
    config = SAPConfig()
    clothing1m._drop_stale_stats(path, first, config)
    assert path.is_file()  # the same weights: reused
    clothing1m._drop_stale_stats(path, tiny_model("vit", num_labels=3, seed=1), config)
    assert not path.exists()  # an earlier run's weights: collected anew instead of failing after training


def test_recipe_replaces_a_default_statistics_cache_of_other_options(tmp_path):
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m
    from helpers import random_examples

    from sap_hf import sap_correct
    from sap_hf.models import tiny_model

    path = tmp_path / "_sap_stats.safetensors"
    config = SAPConfig(alphas=[10.0], trusted_per_class=2)
    sap_correct(
        tiny_model("vit", num_labels=3),
        random_examples(12),
        random_examples(6, seed=2),
        config,
        stats_path=path,
        runtime=Runtime(show_progress=False),
    )
    clothing1m._drop_stale_stats(path, tiny_model("vit", num_labels=3), config)
    assert path.is_file()  # the same weights and options: reused
    clothing1m._drop_stale_stats(path, tiny_model("vit", num_labels=3), SAPConfig(project_classifier=False))
    assert not path.exists()  # other targets: collected anew instead of projecting the earlier run's layers


def test_cli_correct_and_push(tiny_clothing1m, tmp_path, monkeypatch, capsys):
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    trained = tmp_path / "trained"
    ViTForImageClassification(
        tiny_vit_config(
            image_size=32, patch_size=8, num_channels=3, num_labels=14, hidden_size=32, num_hidden_layers=2
        )
    ).save_pretrained(trained)
    out = tmp_path / "corrected"
    cli.main(
        [
            "correct",
            "--model_name_or_path",
            str(trained),
            "--data_dir",
            str(tiny_clothing1m),
            "--output_dir",
            str(out),
            "--trusted_per_class",
            "1",
            "--alphas",
            "1",
            "1000",
            "--batch_size",
            "16",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"alpha", "kind_alphas", "eval_before", "eval_after", "test_before", "test_after"}
    # alpha_scope defaults to per_kind: every kind has its written alpha (None: unchanged)
    assert set(summary["kind_alphas"]) == {"attention", "mlp", "classifier"}
    assert set(summary["kind_alphas"].values()) <= {None, 1.0, 1000.0}
    assert summary["eval_after"]["accuracy"] >= summary["eval_before"]["accuracy"]
    assert load_sap_record(out)["base_model"] == str(trained)
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 14

    api = mock.MagicMock()
    with mock.patch("sap_hf.hub.HfApi", return_value=api):
        cli.main(["push", str(out), "--repo_id", "user/vit-sap"])
    sent = api.upload_folder.call_args.kwargs
    assert sent["repo_id"] == "user/vit-sap" and Path(sent["folder_path"]) == out
    api.create_repo.assert_called_once()

    api.upload_folder.side_effect = ConnectionError("network down")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with mock.patch("sap_hf.hub.HfApi", return_value=api), pytest.raises(RuntimeError, match="sap-hf push"):
        cli.main(["push", str(out), "--repo_id", "user/vit-sap"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_cli_rejects_bad_arguments(tiny_clothing1m, tmp_path, capsys):
    line = user_error(capsys, cli.main, ["correct", "--data_dir", str(tiny_clothing1m), "--output_dir", str(tmp_path)])
    assert "--model_name_or_path is required" in line
    line = user_error(
        capsys, cli.main, ["correct", "--model_name_or_path", "x", "--output_dir", str(tmp_path), "--alphas", "0.5"]
    )
    assert "alphas" in line
    line = user_error(capsys, cli.main, ["frobnicate"])
    assert "unknown command 'frobnicate'" in line and all(name in line for name in cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: sap-hf" in out and all(f"  {name} " in out for name in cli.COMMANDS)
    with mock.patch.object(cli, "load_splits", side_effect=AssertionError("data was read")):
        line = user_error(
            capsys,
            cli.main,
            [
                "correct",
                "--model_name_or_path",
                "x",
                "--output_dir",
                str(tmp_path / "o"),
                "--stats_path",
                str(tmp_path),
            ],
        )
    assert "stats_path=" in line and "is a directory" in line


def test_yaml_configs_parse_and_cli_overrides(tmp_path):
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m
    import yaml
    from transformers import HfArgumentParser

    from sap_hf.cli.args import parse_with_config

    types = clothing1m.ARGUMENT_TYPES
    known = {action.dest for action in HfArgumentParser(types)._actions}
    for config in sorted((RECIPE.parent / "configs").glob("*.yaml")):  # GPU configs (bf16) only checked for keys
        assert set(yaml.safe_load(config.read_text())) <= known, config.name
    script, training, sap, _ = parse_with_config(types, ["--config", str(RECIPE.parent / "configs" / "default.yaml")])
    assert training.output_dir and sap.alphas and script.noise_rate == 0.4
    base = RECIPE.parent / "configs" / "clothing1m_vit_base.yaml"  # TrainingArguments accept it (bf16 aside, on CPU)
    _, training, _, _ = parse_with_config(types, ["--config", str(base), "--bf16", "false"])
    assert training.load_best_model_at_end and training.metric_for_best_model == "accuracy"
    custom = tmp_path / "custom.yaml"
    custom.write_text("output_dir: /tmp/x\ntarget_modules: '.*mlp\\.fc[12]'\nalphas: [10.0, 100.0]\n")
    script, training, sap, _ = parse_with_config(types, ["--config", str(custom), "--alphas", "5"])
    assert sap.target_modules == r".*mlp\.fc[12]" and sap.alphas == [5.0]
    custom.write_text("output_dir: /tmp/x\nnot_a_field: 1\n")
    with pytest.raises(ValueError, match="not_a_field"):
        parse_with_config(types, ["--config", str(custom)])


def test_recipe_corrects_the_val_best_checkpoint_with_load_best_model_at_end(tiny_clothing1m, tmp_path):
    """`load_best_model_at_end` (the pretrained config's setting): SAP starts from the val-best checkpoint's weights."""
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m

    out = tmp_path / "out"
    best = ["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    best += ["--load_best_model_at_end", "true", "--metric_for_best_model", "loss", "--use_cpu", "true"]
    clothing1m.run(
        ["--data_dir", str(tiny_clothing1m), "--output_dir", str(out), *TINY, *best, "--learning_rate", "0.05"]
    )
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    losses = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert len(losses) == 4 and len(set(losses.values())) == 4 and state["best_model_checkpoint"]
    baseline = load_sap_record(out)["baseline_metrics"]["loss"]  # SAP's "no change": the model it was handed
    assert baseline == pytest.approx(min(losses.values()), rel=1e-5) and baseline == pytest.approx(
        state["best_metric"]
    )
