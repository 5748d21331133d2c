"""Noise-robust losses: hand-computed values, gradient accumulation, validation, Trainer training, record/card."""

import math

import pytest
import torch
from helpers import random_examples
from transformers import HfArgumentParser, Trainer, TrainingArguments

from sap_hf import SAPConfig
from sap_hf.hub import load_sap_record
from sap_hf.losses import (
    LossConfig,
    RobustLoss,
    cross_entropy,
    describe_training_loss,
    generalized_cross_entropy,
    make_loss_func,
    symmetric_cross_entropy,
    training_loss_record,
)
from sap_hf.models import tiny_model
from sap_hf.trainer import SAPTrainer


# Row 0: logits (0, 0), label 0 -> p_y = 1/2.  Row 1: logits (ln 3, 0), label 1 -> p_y = 1/4.
# Row 2: label -100 (ignored).
LOGITS = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, -100])
# By hand: CE = -ln p; GCE_q = (1 - p^q) / q; SCE = alpha * CE + beta * (-A) * (1 - p).
CE = (0.6931471805599453, 1.3862943611198906)  # ln 2, ln 4
GCE_07 = (0.5491825618964884, 0.8872440833891436)  # (1 - 0.5^0.7)/0.7, (1 - 0.25^0.7)/0.7
SCE_DEFAULT = (2.0693147180559945, 3.138629436111989)  # 0.1 ln 2 + 4 * 0.5, 0.1 ln 4 + 4 * 0.75


@pytest.mark.parametrize(
    "loss, by_hand",
    [
        (lambda lg, lb, **kw: cross_entropy(lg, lb, **kw), CE),
        (lambda lg, lb, **kw: generalized_cross_entropy(lg, lb, 0.7, **kw), GCE_07),
        (lambda lg, lb, **kw: generalized_cross_entropy(lg, lb, 1.0, **kw), (0.5, 0.75)),  # q = 1: MAE, 1 - p_y
        (lambda lg, lb, **kw: symmetric_cross_entropy(lg, lb, 0.1, 1.0, -4.0, **kw), SCE_DEFAULT),
        (
            lambda lg, lb, **kw: symmetric_cross_entropy(lg, lb, 1.0, 0.5, -2.0, **kw),
            (math.log(2) + 0.5, math.log(4) + 0.75),
        ),
    ],
    ids=["ce", "gce_q0.7", "gce_q1", "sce_paper", "sce_other"],
)
def test_hand_computed_values(loss, by_hand):
    for row in (0, 1):
        single = loss(LOGITS[row : row + 1], LABELS[row : row + 1])
        assert single.item() == pytest.approx(by_hand[row], rel=1e-12)
    # The ignored row does not count; mean over the labelled rows, or sum / num_items_in_batch.
    assert loss(LOGITS, LABELS).item() == pytest.approx(sum(by_hand) / 2, rel=1e-12)
    assert loss(LOGITS, LABELS, num_items_in_batch=4).item() == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    assert loss(LOGITS, LABELS, num_items_in_batch=torch.tensor(4)).item() == pytest.approx(
        sum(by_hand) / 4, rel=1e-12
    )


def test_robust_loss_dispatches_and_reads_model_outputs():
    from transformers.modeling_outputs import ImageClassifierOutput

    gce = RobustLoss(LossConfig(loss="gce", gce_q=0.7))
    outputs = ImageClassifierOutput(logits=LOGITS)
    assert gce(outputs, LABELS).item() == pytest.approx(sum(GCE_07) / 2, rel=1e-12)
    assert gce((LOGITS,), LABELS).item() == pytest.approx(sum(GCE_07) / 2, rel=1e-12)
    assert RobustLoss(LossConfig(loss="sce"))(LOGITS, LABELS).item() == pytest.approx(sum(SCE_DEFAULT) / 2, rel=1e-12)
    assert RobustLoss(LossConfig(loss="ce"))(LOGITS, LABELS).item() == pytest.approx(sum(CE) / 2, rel=1e-12)
    assert repr(gce) == "RobustLoss(loss='gce', gce_q=0.7)"
    with pytest.raises(ValueError, match="labels"):
        gce(outputs, None)
    with pytest.raises(ValueError, match="do not match logits"):
        gce(outputs, LABELS[:2])


def test_gce_tends_to_cross_entropy_as_q_vanishes():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(16) % 5
    assert generalized_cross_entropy(logits, labels, 1e-6).item() == pytest.approx(
        cross_entropy(logits, labels).item(), rel=1e-5
    )


@pytest.mark.parametrize("config", [LossConfig("ce"), LossConfig("gce"), LossConfig("sce")], ids=["ce", "gce", "sce"])
def test_num_items_in_batch_makes_accumulation_exact(config):
    """Two micro-batches normalised by the accumulated item count give the full batch's loss and gradient."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (10,), generator=generator)
    labels[3] = -100
    loss_func = RobustLoss(config)
    full = loss_func(logits, labels)
    (full_grad,) = torch.autograd.grad(full, logits)
    items = int((labels != -100).sum())
    parts = [loss_func(logits[s], labels[s], num_items_in_batch=items) for s in (slice(0, 6), slice(6, 10))]
    (accumulated_grad,) = torch.autograd.grad(sum(parts), logits)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(accumulated_grad, full_grad)


def test_half_precision_logits_are_upcast():
    logits = LOGITS[:2].to(torch.bfloat16)
    loss = generalized_cross_entropy(logits, LABELS[:2], 0.7)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(sum(GCE_07) / 2, rel=1e-2)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"loss": "mae"}, "loss"),
        ({"loss": "gce", "gce_q": 0.0}, "gce_q"),
        ({"gce_q": 1.5}, "gce_q"),
        ({"gce_q": float("nan")}, "gce_q"),
        ({"gce_q": "0.7"}, "gce_q"),
        ({"sce_alpha": 0.0}, "sce_alpha"),
        ({"sce_beta": -1.0}, "sce_beta"),
        ({"sce_log_zero": 0.0}, "sce_log_zero"),
        ({"sce_log_zero": float("-inf")}, "sce_log_zero"),
        ({"sce_alpha": True}, "sce_alpha"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field_name}="):
        LossConfig(**kwargs)


def test_config_from_the_command_line():
    (config,) = HfArgumentParser(LossConfig).parse_args_into_dataclasses(["--loss", "gce", "--gce_q", "0.5"])
    assert config.loss == "gce" and config.gce_q == 0.5 and config.parameters() == {"gce_q": 0.5}
    assert config.describe() == "generalized cross-entropy (GCE, Zhang & Sabuncu 2018) with gce_q=0.5"
    assert LossConfig("sce").parameters() == {"sce_alpha": 0.1, "sce_beta": 1.0, "sce_log_zero": -4.0}


def test_make_loss_func_and_label_smoothing():
    assert make_loss_func(LossConfig("ce")) is None and make_loss_func(None) is None
    assert make_loss_func(LossConfig("ce"), label_smoothing_factor=0.1) is None  # Trainer's label smoother
    assert isinstance(make_loss_func(LossConfig("sce")), RobustLoss)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 cannot be combined"):
        make_loss_func(LossConfig("gce"), label_smoothing_factor=0.1)


def test_training_loss_record_and_description():
    assert training_loss_record(None, 0.1) == {"loss": "ce", "label_smoothing_factor": 0.1}
    assert training_loss_record(RobustLoss(LossConfig("gce"))) == {"loss": "gce", "gce_q": 0.7}

    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum()

    custom = training_loss_record(my_loss)
    assert custom["loss"] == "custom" and custom["compute_loss_func"].endswith("my_loss")
    assert (
        describe_training_loss({"loss": "ce", "label_smoothing_factor": 0.1})
        == "cross-entropy with label smoothing 0.1"
    )
    assert describe_training_loss({"loss": "ce", "label_smoothing_factor": 0.0}) == "cross-entropy"
    assert "sce_beta=1" in describe_training_loss(training_loss_record(RobustLoss(LossConfig("sce"))))


def _args(tmp_path, **kwargs):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=15,
        learning_rate=3e-3,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    values.update(kwargs)
    return TrainingArguments(**values)


# Loss of near-uniform predictions over 3 classes (p_y ~ 1/3): what the first logged step must be close to.
AT_UNIFORM = {"gce": (1 - (1 / 3) ** 0.7) / 0.7, "sce": 0.1 * math.log(3) + 4 * (2 / 3), "ce_smoothed": math.log(3)}


@pytest.mark.parametrize("name", ["gce", "sce", "ce_smoothed"])
def test_trainer_trains_a_tiny_vit_with_each_loss(tmp_path, name):
    torch.manual_seed(0)
    model = tiny_model("vit", num_labels=3)
    smoothing = 0.1 if name == "ce_smoothed" else 0.0
    loss_func = make_loss_func(LossConfig("ce" if name == "ce_smoothed" else name), label_smoothing_factor=smoothing)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, label_smoothing_factor=smoothing),
        train_dataset=random_examples(24, seed=1),
        compute_loss_func=loss_func,
    )
    assert (trainer.label_smoother is not None) == (name == "ce_smoothed")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(AT_UNIFORM[name], rel=0.1)  # the chosen loss is the one trained on
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    """With `num_items_in_batch`, 2 accumulated micro-batches of 4 take the same step as one batch of 8."""
    states = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = tiny_model("vit", num_labels=3)
        args = _args(
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=random_examples(8, seed=1),
            compute_loss_func=RobustLoss(LossConfig("gce")),
        )
        trainer.train()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    initial = tiny_model("vit", num_labels=3).state_dict()
    assert any(not torch.equal(states[0][k], initial[k]) for k in initial)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=1e-6)


def test_sap_trainer_records_the_training_loss_on_record_and_card(tmp_path):
    model = tiny_model("vit", num_labels=3)
    trainer = SAPTrainer(
        model=model,
        args=_args(tmp_path, num_train_epochs=1),
        train_dataset=random_examples(24, seed=1),
        eval_dataset=random_examples(12, seed=2),
        compute_loss_func=RobustLoss(LossConfig("gce", gce_q=0.5)),
        sap_config=SAPConfig(alphas=[1.0, 100.0], trusted_per_class=2, batch_size=8),
    )
    trainer.correct()
    assert "training_loss" not in trainer.sap_record()  # it did not train this model: nothing to claim
    trainer.train()
    trainer.correct()
    trainer.save_model()
    assert load_sap_record(tmp_path / "out")["training_loss"] == {"loss": "gce", "gce_q": 0.5}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Training loss (on the noisy labels, before SAP): generalized cross-entropy" in card and "gce_q=0.5" in card


def test_sap_trainer_refuses_label_smoothing_with_a_robust_loss(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 cannot be combined"):
        SAPTrainer(
            model=tiny_model("vit", num_labels=3),
            args=_args(tmp_path, label_smoothing_factor=0.1),
            train_dataset=random_examples(8),
            compute_loss_func=RobustLoss(LossConfig("sce")),
        )


def _recipe():
    """The recipe module, imported in-process (one process, no `accelerate launch`)."""
    import importlib.util
    import sys

    from test_recipe_cli import RECIPE

    name = "sap_recipe_clothing1m"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RECIPE)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_recipe_trains_with_the_chosen_loss_and_records_it(tiny_clothing1m, tmp_path, capsys):
    from test_recipe_cli import TINY
    from transformers.utils import logging as hf_logging

    out = tmp_path / "out"
    verbosity = hf_logging.get_verbosity()
    try:
        summary = _recipe().main(
            ["--data_dir", str(tiny_clothing1m), "--output_dir", str(out), *TINY, "--loss", "sce", "--sce_beta", "0.5"]
        )
    finally:
        hf_logging.set_verbosity(verbosity)  # the recipe turns on info logging
    expected = {"loss": "sce", "sce_alpha": 0.1, "sce_beta": 0.5, "sce_log_zero": -4.0}
    assert summary["training_loss"] == expected
    assert "(loss=sce, sce_alpha=0.1, sce_beta=0.5, sce_log_zero=-4)" in capsys.readouterr().out
    assert load_sap_record(out)["training_loss"] == expected
    assert (
        "symmetric cross-entropy (SCE, Wang et al. 2019) with sce_alpha=0.1, sce_beta=0.5"
        in (out / "README.md").read_text()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "gce", "--label_smoothing_factor", "0.1"], "label_smoothing_factor=0.1 cannot be combined"),
        (["--loss", "mae"], r"LossConfig\.loss='mae'"),
        (["--loss", "gce", "--gce_q", "2"], r"LossConfig\.gce_q=2"),
    ],
)
def test_recipe_rejects_bad_loss_arguments_before_reading_data(tmp_path, args, message):
    empty = tmp_path / "data"  # exists (the path check passes) but holds no data: reading it would fail
    empty.mkdir()
    with pytest.raises(ValueError, match=message):
        _recipe().run(["--data_dir", str(empty), "--output_dir", str(tmp_path / "out"), *args])
