"""User errors of `sap-hf` and the recipe: one line on stderr naming the argument, exit code 2, no traceback.

Paths are checked before any data is read (load_splits is mocked to fail if called) and no test
trains or loads a model: a folder with an empty config.json passes the model-folder check.
"""

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from helpers import user_error

import sap_hf
from sap_hf.cli import commands as cli
from sap_hf.cli.checks import check_model_path, looks_like_local_path
from sap_hf.cli.errors import one_line, pop_debug_flag


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clothing1m.py"
NOT_READ = AssertionError("data was read")


def _model_folder(path: Path) -> Path:
    """Enough of a saved model for the up-front check (the tests stop before it is read)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _correct(capsys, *argv: str, command: str = "correct") -> str:
    """`sap-hf COMMAND ARGV...`'s one-line error, asserting no data was read."""
    with mock.patch.object(cli, "load_splits", side_effect=NOT_READ) as load_splits:
        line = user_error(capsys, cli.main, [command, *argv], prog=f"sap-hf {command}: error: ")
    load_splits.assert_not_called()
    return line


@pytest.mark.parametrize("command", ["correct", "audit"])
def test_missing_or_incomplete_model_folder(tmp_path, capsys, command):
    out = ["--output_dir", str(tmp_path / "out")]
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    for value, reason in (
        (str(tmp_path / "missing"), "it does not exist"),
        ("./runs/missing", "it does not exist"),
        ("runs/exp1/checkpoint-5", "it does not exist"),
        (str(empty), "it has no config.json"),
        (str(a_file), "it is a file"),
    ):
        line = _correct(capsys, "--model_name_or_path", value, *out, command=command)
        assert line == (
            f"sap-hf {command}: error: --model_name_or_path: no model folder at {value!r} ({reason}); pass a "
            "folder saved with save_pretrained, or a Hub id such as google/vit-base-patch16-224."
        )
        assert "Repo id must be in the form" not in line


def test_hub_ids_are_left_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no local folder shadows the ids below
    for hub_id in ("google/vit-base-patch16-224", "gpt2", "user/vit-sap"):
        assert not looks_like_local_path(hub_id)
        check_model_path(hub_id)  # no error: from_pretrained asks the Hub
    for local in ("./vit", "../vit", "/abs/vit", "~/vit", "a/b/c", "my model", "runs\\vit"):
        assert looks_like_local_path(local), local
    _model_folder(tmp_path / "user" / "vit-sap")
    assert looks_like_local_path("user/vit-sap")  # an existing folder wins, as in from_pretrained
    check_model_path("user/vit-sap")


@pytest.mark.parametrize("command", ["correct", "audit"])
def test_output_dir_that_is_a_file_fails_before_any_data_is_read(tmp_path, capsys, command):
    model = str(_model_folder(tmp_path / "model"))
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    line = _correct(capsys, "--model_name_or_path", model, "--output_dir", str(a_file), command=command)
    assert (
        line
        == f"sap-hf {command}: error: --output_dir {str(a_file)!r} is a file; pass a folder (it is created if missing)."
    )
    inside = a_file / "sub"
    line = _correct(capsys, "--model_name_or_path", model, "--output_dir", str(inside), command=command)
    assert f"--output_dir {str(inside)!r} cannot be created: {str(a_file)!r} is a file" in line


def test_missing_data_dir_fails_before_any_data_is_read(tmp_path, capsys):
    model = str(_model_folder(tmp_path / "model"))
    missing = str(tmp_path / "clothing1m")
    line = _correct(
        capsys, "--model_name_or_path", model, "--data_dir", missing, "--output_dir", str(tmp_path / "out")
    )
    assert f"--data_dir {missing!r} does not exist; pass the folder of a Clothing1M copy" in line
    assert "--dataset_name" in line  # the other way to give data


def test_push_folder_without_a_saved_model(tmp_path, capsys):
    for folder, reason in ((tmp_path, "it has no config.json"), (tmp_path / "missing", "it does not exist")):
        with mock.patch("sap_hf.hub.HfApi", side_effect=AssertionError("the Hub was called")):
            line = user_error(capsys, cli.main, ["push", str(folder), "--repo_id", "user/vit-sap"], prog="sap-hf push")
        assert line == (
            f"sap-hf push: error: FOLDER {str(folder)!r} holds no saved model ({reason}); pass a folder "
            "written by `sap-hf correct` or SAPTrainer.save_model()."
        )


def test_usage_errors_are_one_line_naming_the_argument(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    line = _correct(capsys, "--model_name_or_path", "x", *out, "--alphas", "ten")
    assert line == (
        "sap-hf correct: error: argument --alphas: invalid float value: 'ten' "
        "(`sap-hf correct --help` lists the arguments)."
    )
    line = _correct(capsys, "--model_name_or_pth", "x", *out)  # the typo is reported, not the missing argument
    assert "unrecognized arguments: --model_name_or_pth x" in line
    line = _correct(capsys, "--model_name_or_path", "x", *out, "--push_to_hub", "maybe")
    assert "argument --push_to_hub" in line
    line = user_error(capsys, cli.main, ["push", str(tmp_path)], prog="sap-hf push")
    assert "the following arguments are required: --repo_id" in line
    line = _correct(capsys, "--output_dir", str(tmp_path))
    assert line.endswith("--model_name_or_path is required: the trained model (Hub id or local path) to correct.")
    assert "unknown option '--frob'" in user_error(capsys, cli.main, ["--frob"])


def test_what_only_training_records_is_refused_before_any_data_is_read(tmp_path, capsys):
    model = _model_folder(tmp_path / "model")
    for option in ("--trusted_source", "--audit_source"):
        line = _correct(
            capsys, "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"), option, "training"
        )
        assert "'training' reads what SAPTrainer.train() records" in line and "recipes/clothing1m.py" in line


def test_config_file_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert f"--config {missing!r} does not exist" in _correct(capsys, "--config", missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("alphas: [1, 2\noutput_dir: x\n")
    line = _correct(capsys, "--config", str(broken))
    assert f"--config {str(broken)!r} is not valid YAML" in line  # yaml's multi-line message, on one line
    assert "--config" in _correct(capsys, "--config")  # the flag without its value


def test_messages_are_collapsed_to_one_line_and_other_errors_keep_their_traceback(tmp_path, capsys):
    argv = ["correct", "--model_name_or_path", "x", "--output_dir", str(tmp_path / "out")]
    with mock.patch.object(cli, "check_paths", side_effect=ValueError("first line\n\n   second line\n")):
        assert user_error(capsys, cli.main, argv) == "sap-hf correct: error: first line second line"
    with (
        mock.patch.object(cli, "check_paths", side_effect=RuntimeError("a worker failed")),
        pytest.raises(RuntimeError, match="a worker failed"),
    ):
        cli.main(argv)  # not the user's: the traceback is kept
    assert one_line(ValueError()) == "ValueError"


def test_debug_shows_the_exception_and_is_stripped_anywhere(tmp_path):
    missing = str(tmp_path / "missing")
    for argv in (
        ["--debug", "correct", "--model_name_or_path", missing, "--output_dir", str(tmp_path)],
        ["correct", "--model_name_or_path", missing, "--debug", "--output_dir", str(tmp_path)],
    ):
        with (
            mock.patch.object(cli, "load_splits", side_effect=NOT_READ),
            pytest.raises(FileNotFoundError, match="no model folder at"),
        ):
            cli.main(argv)
    assert pop_debug_flag(["push", "f", "--debug"]) == (True, ["push", "f"])
    assert pop_debug_flag(["--output_dir", "o"]) == (False, ["--output_dir", "o"])
    # The recipe: TrainingArguments has its own `--debug OPTION`, left to it; only a bare --debug is taken.
    recipe = ["--debug", "underflow_overflow", "--seed", "1"]
    assert pop_debug_flag(recipe, debug_takes_values=True) == (False, recipe)
    assert pop_debug_flag(["--seed", "1", "--debug"], debug_takes_values=True) == (True, ["--seed", "1"])
    assert pop_debug_flag(["--debug", "--seed", "1"], debug_takes_values=True) == (True, ["--seed", "1"])


def test_version_comes_from_the_package_metadata(capsys):
    assert sap_hf.__version__ == importlib.metadata.version("sap_hf")
    cli.main(["--version"])
    assert capsys.readouterr().out == f"sap-hf {sap_hf.__version__}\n"
    try:
        with mock.patch("importlib.metadata.distributions", return_value=iter(())):  # not installed
            assert importlib.reload(sap_hf).__version__ == "0+unknown"
    finally:
        importlib.reload(sap_hf)
    assert sap_hf.__version__ == importlib.metadata.version("sap_hf")


def test_recipe_checks_paths_before_reading_data(tmp_path, capsys):
    sys.path.insert(0, str(RECIPE.parent))
    import clothing1m

    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    cases = (
        (["--output_dir", str(a_file)], f"--output_dir {str(a_file)!r} is a file; pass a folder"),
        (["--output_dir", str(tmp_path / "o"), "--data_dir", str(tmp_path / "none")], "--data_dir"),
        (
            ["--output_dir", str(tmp_path / "o"), "--model_name_or_path", "./none"],
            "--model_name_or_path: no model folder",
        ),
        (["--output_dir", str(tmp_path / "o"), "--num_train_epochs", "many"], "argument --num_train_epochs"),
    )
    for argv, expected in cases:
        with mock.patch.object(clothing1m, "load_splits", side_effect=NOT_READ):
            line = user_error(capsys, clothing1m.main, [*argv, "--report_to", "none"], prog="clothing1m.py: error: ")
        assert expected in line, line
    with mock.patch.object(clothing1m, "load_splits", side_effect=NOT_READ), pytest.raises(NotADirectoryError):
        clothing1m.main(["--output_dir", str(a_file), "--report_to", "none", "--debug"])


def test_command_line_prints_no_traceback_unless_debug(tmp_path):
    """The installed entry point's path (`python -m sap_hf.cli`), in a fresh process: what a user sees."""
    missing = str(tmp_path / "no-such-model")
    command = [
        sys.executable,
        "-m",
        "sap_hf.cli",
        "correct",
        "--model_name_or_path",
        missing,
        "--output_dir",
        str(tmp_path / "out"),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"sap-hf correct: error: --model_name_or_path: no model folder at {missing!r}")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert (
        debug.returncode == 1
        and "Traceback" in debug.stderr
        and "FileNotFoundError: --model_name_or_path" in debug.stderr
    )


@pytest.mark.parametrize("command", ["correct", "audit"])
def test_hub_id_that_cannot_be_loaded_is_one_line(tmp_path, capsys, monkeypatch, command):
    """A mistyped or uncached Hub id: one line naming the argument and the fixes, not the Hub client's traceback."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    hub_id = "nobody-sap-hf/no-such-model"
    splits = mock.Mock(class_names=["a", "b"])
    with mock.patch.object(cli, "load_splits", return_value=splits):
        line = user_error(
            capsys,
            cli.main,
            [command, "--model_name_or_path", hub_id, "--output_dir", "out"],
            prog=f"sap-hf {command}: error: ",
        )
    assert line.startswith(f"sap-hf {command}: error: --model_name_or_path: cannot load {hub_id!r} (")
    assert line.endswith("unset HF_HUB_OFFLINE to download it, or pass a folder saved with save_pretrained.")


def test_recipe_hub_id_that_cannot_be_loaded_names_the_argument(monkeypatch):
    import huggingface_hub.constants

    from sap_hf.cli.sources import ModelArguments, load_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path: cannot load 'nobody-sap-hf/no-such-model'"):
        load_model(ModelArguments(model_name_or_path="nobody-sap-hf/no-such-model"), mock.Mock(class_names=["a", "b"]))


def test_python_dash_m_sap_hf_runs_the_command_line(tmp_path):
    """`python -m sap_hf` (where the sap-hf script is not on PATH) failed with 'No module named sap_hf.__main__'."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "sap_hf", "--version"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0 and run.stdout.startswith("sap-hf "), run.stderr
