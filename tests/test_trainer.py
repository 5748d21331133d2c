"""SAPTrainer: train, correct, save with record and card, reload equal, mocked push."""

import json
import re
from unittest import mock

import pytest
import torch
from helpers import random_examples
from transformers import AutoModelForImageClassification, TrainingArguments

from sap_hf import SAPConfig
from sap_hf.hub import SAP_RECORD_NAME, load_sap_record
from sap_hf.models import tiny_model
from sap_hf.trainer import SAPTrainer


def _trainer(tmp_path, sap_config=None, **args):
    model = tiny_model("vit", num_labels=3)
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        **args,
    )
    return SAPTrainer(
        model=model,
        args=training_args,
        train_dataset=random_examples(24, seed=1),
        eval_dataset=random_examples(12, seed=2),
        sap_config=sap_config or SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8),
        base_model_name="tiny-vit",
    )


def test_train_correct_save_reload(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    result = trainer.correct()
    assert result.rounds[0].alphas == [1.0, 100.0]
    assert result.final_metrics["accuracy"] >= result.baseline_metrics["accuracy"]
    logged = [entry for entry in trainer.state.log_history if "sap/alpha" in entry]
    assert [entry["sap/alpha"] for entry in logged] == [-1.0, 1.0, 100.0]
    out = tmp_path / "out"
    trainer.save_model()
    record = load_sap_record(out)
    assert record["base_model"] == "tiny-vit" and record["rounds"][0]["alphas"] == [1.0, 100.0]
    card = (out / "README.md").read_text()
    for expected in ("sap", "label-noise", "vision-transformer", "tiny-vit", "2403.08618", "kodge2025sap"):
        assert expected in card
    # Only links that exist: the paper. The package is named, not linked (it has no public repository).
    assert re.findall(r"https?://[^\s)>\]]+", card) == ["https://arxiv.org/abs/2403.08618"]
    assert "the `sap_hf` Python package" in card
    assert not (out / ".sap_staging").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    pixels = torch.randn(4, 3, 16, 16)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, trainer.model(pixel_values=pixels).logits)


def test_per_kind_alphas_are_logged_recorded_and_on_the_card(tmp_path):
    config = SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8, alpha_scope="per_kind")
    trainer = _trainer(tmp_path, sap_config=config)
    result = trainer.correct()
    assert set(result.kind_alphas) == {"attention", "mlp", "classifier"}
    trials = [entry for entry in trainer.state.log_history if "sap/alpha_attention" in entry]
    assert len(trials) == len(result.rounds[0].kind_trials) == 6 and all("sap/accuracy" in entry for entry in trials)
    final = trainer.state.log_history[-1]
    for kind, alpha in result.kind_alphas.items():
        assert final[f"sap/chosen_alpha_{kind}"] == (-1.0 if alpha is None else alpha)
    trainer.save_model()
    assert load_sap_record(tmp_path / "out")["kind_alphas"] == result.kind_alphas
    from sap_hf.plotting import plot_alpha_curve

    assert plot_alpha_curve(result, tmp_path / "curve.png").stat().st_size > 0  # with the per-kind trial curves
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Written alpha per layer kind" in card and "Best shared alpha per round" in card
    assert "selection rule `shift_loss`" in card  # SAPConfig's default rule
    for kind in result.kind_alphas:
        assert kind in card.split("Written alpha per layer kind")[1].splitlines()[0]


def test_push_to_hub_sends_model_record_and_card(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.correct()
    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "user/tiny-sap"
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded["files"] = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        uploaded["repo_id"] = kwargs["repo_id"]

    api.upload_folder.side_effect = upload_folder
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        trainer.args.hub_model_id = "user/tiny-sap"
        trainer.push_to_hub()
    assert uploaded["repo_id"] == "user/tiny-sap"
    for name in ("config.json", "model.safetensors", SAP_RECORD_NAME, "README.md"):
        assert name in uploaded["files"]
    assert "user/tiny-sap" in (tmp_path / "out" / "README.md").read_text()


def test_interrupted_save_keeps_previous_files(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.correct()
    trainer.save_model()
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with mock.patch("transformers.modeling_utils.PreTrainedModel.save_pretrained", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            trainer.save_model()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert json.loads((out / SAP_RECORD_NAME).read_text())["changed"] in (True, False)


def test_failed_push_keeps_local_save_and_says_what_to_rerun(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.correct()
    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "user/tiny-sap"
    api.upload_folder.side_effect = ConnectionError("network down")
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        trainer.args.hub_model_id = "user/tiny-sap"
        with pytest.raises(RuntimeError, match="sap-hf push .* --repo_id user/tiny-sap"):
            trainer.push_to_hub()
    out = tmp_path / "out"
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 3
    assert load_sap_record(out)["base_model"] == "tiny-vit"


def test_save_model_with_push_to_hub_uploads_once_without_caches(tmp_path):
    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "user/tiny-sap"
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        trainer = _trainer(tmp_path, push_to_hub=True, hub_model_id="user/tiny-sap")
        trainer.correct(stats_path=tmp_path / "out" / "_sap_stats.safetensors")
        trainer.save_model()
    assert api.upload_folder.call_count == 1
    ignored = api.upload_folder.call_args.kwargs["ignore_patterns"]
    assert any(__import__("fnmatch").fnmatch("_sap_stats.safetensors", pattern) for pattern in ignored)


def test_correct_and_refine_name_the_missing_dataset(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.eval_dataset = None
    with pytest.raises(
        ValueError, match=r"correct\(\) needs a clean labelled eval set to choose alpha: pass eval_dataset="
    ):
        trainer.correct()
    with pytest.raises(ValueError, match=r"refine\(\) needs a clean labelled eval set to choose lr and length"):
        trainer.refine()
    trainer.train_dataset = None
    with pytest.raises(ValueError, match=r"refine\(\) needs labelled training data: pass train_dataset="):
        trainer.refine(eval_dataset=random_examples(4))
    with pytest.raises(ValueError, match=r"correct\(\) needs labelled training data: pass selection_dataset="):
        trainer.correct(eval_dataset=random_examples(4))
    unlabelled = [{"pixel_values": example["pixel_values"]} for example in random_examples(4)]
    with pytest.raises(ValueError, match="no 'labels'/'label' column.*pass eval_dataset= with labels"):
        trainer.refine(train_dataset=random_examples(4), eval_dataset=unlabelled)


def test_sap_trainer_uses_public_trainer_hooks_only():
    """Each override is a public `Trainer` method whose docstring says why it is overridden, and nothing in trainer/
    reads or sets a private `Trainer` attribute (`self._x` / `trainer._x` that `Trainer` itself uses)."""
    import ast
    import inspect
    from pathlib import Path

    import transformers.trainer
    from transformers import Trainer

    import sap_hf.trainer

    bookkeeping = ("__doc__", "__module__", "__dict__", "__weakref__")
    overrides = {name: value for name, value in vars(SAPTrainer).items() if hasattr(Trainer, name)}
    overrides = {name: value for name, value in overrides.items() if name not in bookkeeping}
    assert not [name for name in overrides if name.startswith("_") and name != "__init__"], sorted(overrides)
    unexplained = [name for name, value in overrides.items() if "overridden" not in (value.__doc__ or "")]
    assert not unexplained, unexplained
    private = set(re.findall(r"\bself\.(_[a-z]\w*)", inspect.getsource(transformers.trainer)))
    used = set()
    for path in Path(sap_hf.trainer.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
                if node.value.id in ("self", "trainer") and not node.attr.startswith("__"):
                    used.add(node.attr)
    assert private and not used & private, sorted(used & private)


def test_push_to_hub_card_arguments_reach_the_sap_card(tmp_path):
    """Trainer.push_to_hub(license=, tags=, dataset=, language=, finetuned_from=) hands them to create_model_card;
    the SAP card dropped them (a pushed model had no license); a later save_model() keeps them."""
    from huggingface_hub import ModelCard

    trainer = _trainer(tmp_path)
    trainer.correct()
    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "user/tiny-sap"
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        trainer.args.hub_model_id = "user/tiny-sap"
        trainer.push_to_hub(license="mit", tags="my-tag", dataset="beans", language="en", finetuned_from="google/vit")
    for _ in range(2):
        data = ModelCard.load(tmp_path / "out" / "README.md").data
        assert (data.license, data.language, data.datasets, data.base_model) == ("mit", "en", ["beans"], "google/vit")
        assert data.tags[-2:] == ["sap_hf", "my-tag"]
        trainer.save_model()
