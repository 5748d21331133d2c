"""Argument checks (`sap_hf.utils.checks`) and the configs built on them: numpy numbers in, plain Python out."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from sap_hf.core.config import DEFAULT_ALPHAS, FLOAT32_ALPHA_LIMIT, SAPConfig
from sap_hf.losses import LossConfig
from sap_hf.utils.checks import check_choice, finite_float, integer, positive_float, positive_int


def _plain(values):
    """Every leaf is a plain Python scalar (what json.dumps accepts without a default=)."""
    return all(type(v) in (int, float, str, bool, type(None)) for v in values)


# ---------------------------------------------------------------- the helpers


def test_check_choice_returns_the_plain_choice_and_suggests_a_near_miss():
    assert check_choice("rule", np.str_("loss"), ("loss", "shift_loss")) == "loss"
    assert type(check_choice("rule", np.str_("loss"), ("loss",))) is str
    assert check_choice("num_channels", np.int64(3), (1, 3)) == 3
    with pytest.raises(
        ValueError,
        match=r"rule='shift-loss' is invalid: choose one of \['loss', 'shift_loss'\] "
        r"\(did you mean 'shift_loss'\?\)",
    ):
        check_choice("rule", "shift-loss", ("loss", "shift_loss"))
    for bad in (True, 3.0, np.array([1, 3]), None):  # True is not 1, 3.0 is not the choice 3
        with pytest.raises(ValueError, match="num_channels="):
            check_choice("num_channels", bad, (1, 3))


def test_integer_helpers_take_numpy_ints_and_refuse_bools_and_floats():
    for value in (np.int64(10), np.int32(10), np.uint8(10), np.array(10), torch.tensor(10), 10):
        result = positive_int("k", value)
        assert result == 10 and type(result) is int
    assert integer("seed", np.int64(-3)) == -3
    for bad in (True, np.bool_(True), 10.0, "10", None, np.array([10])):
        with pytest.raises(ValueError, match=r"k=.* is invalid: use an integer >= 1"):
            positive_int("k", bad)
    with pytest.raises(ValueError, match="k=0 is invalid: use an integer >= 1. It counts things."):
        positive_int("k", 0, "It counts things.")


def test_float_helpers_take_numpy_numbers_and_refuse_the_rest():
    for value in (np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5), 0.5):
        result = finite_float("q", value)
        assert result == 0.5 and type(result) is float
    assert type(finite_float("q", np.int64(2))) is float
    for bad in (True, "0.5", float("nan"), np.float32("inf"), None, [0.5]):
        with pytest.raises(ValueError, match=r"q=.* is invalid: use a finite number"):
            finite_float("q", bad)
    with pytest.raises(ValueError, match="q=0.0 is invalid: use a positive number"):
        positive_float("q", 0.0)


# ---------------------------------------------------------------- SAPConfig


@pytest.mark.parametrize(
    "alphas, expected",
    [
        (np.float32(100), [100.0]),
        (np.array([1, 10.5]), [1.0, 10.5]),
        (np.array(1e4), [1e4]),
        ((np.int64(3), 4.0), [3.0, 4.0]),
        ([np.float32(10), np.int16(20)], [10.0, 20.0]),
        (torch.tensor([2.0, 3.0]), [2.0, 3.0]),
        ("1e4", [1e4]),  # YAML reads `alphas: 1e4` as a string
        (1000, [1000.0]),
    ],
)
def test_sap_config_alphas_accept_numpy_and_sequences(alphas, expected):
    config = SAPConfig(alphas=alphas, accumulation_dtype="float64")
    assert config.alphas == expected and _plain(config.alphas)


def test_sap_config_numeric_fields_accept_numpy_and_serialise_to_json():
    config = SAPConfig(
        alphas=np.array([10.0, 100.0]),
        trusted_per_class=np.int64(10),
        num_rounds=np.int32(2),
        batch_size=np.int64(8),
        max_tokens_per_sample=np.int16(16),
        sampling_seed=np.uint8(3),
        alpha_growth=np.float32(2.0),
        alpha_search_tolerance=np.float64(0.01),
        alpha_scope=np.str_("per_kind"),
        project_classifier=np.bool_(False),
    )
    values = config.to_dict()
    assert _plain(v for v in values.values() if not isinstance(v, list)) and _plain(values["alphas"])
    assert json.loads(json.dumps(values)) == values  # a record or a saved config holds it as is
    assert (config.trusted_per_class, config.batch_size, config.alpha_growth) == (10, 8, 2.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("trusted_per_class", True),
        ("batch_size", np.bool_(True)),
        ("num_rounds", 2.0),
        ("max_tokens_per_sample", False),
        ("sampling_seed", 1.5),
        ("alpha_growth", "2"),
        ("alpha_growth", True),
        ("alpha_search_tolerance", np.float32("nan")),
        ("alphas", [True]),
        ("alphas", np.bool_(True)),
        ("alphas", None),
        ("alphas", {"a": 1.0}),
        ("project_classifier", "false"),
    ],
)
def test_sap_config_still_rejects_bools_and_wrong_types(field, value):
    with pytest.raises(ValueError, match=rf"SAPConfig\.{field}="):
        SAPConfig(**{field: value})


def test_default_config_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="sap_hf"):
        assert SAPConfig().alphas == list(DEFAULT_ALPHAS) and SAPConfig().accumulation_dtype == "float32"
        SAPConfig(alphas=[FLOAT32_ALPHA_LIMIT])  # the grid's top, chosen by hand: no warning either
    assert not caplog.records, caplog.text


def test_defaults_are_the_measured_pipeline_and_follow_the_trusted_source():
    config = SAPConfig()
    assert (config.selection_rule, config.trusted_per_class, config.alpha_scope) == ("shift_loss", 10, "per_kind")
    assert max(config.alphas) == FLOAT32_ALPHA_LIMIT and min(config.alphas) == 10
    # Recorded training losses are one loss per example: the default rule becomes 'loss', kept in to_dict.
    recorded = SAPConfig(trusted_source="training")
    assert recorded.selection_rule == "loss" and SAPConfig.from_dict(recorded.to_dict()) == recorded
    with pytest.raises(ValueError, match="selection_rule='shift_loss'.*leave selection_rule at None"):
        SAPConfig(trusted_source="training", selection_rule="shift_loss")


def test_a_chosen_large_alpha_grid_in_float32_warns_with_no_measured_numbers(caplog):
    with caplog.at_level(logging.WARNING, logger="sap_hf"):
        SAPConfig(alphas=[1e4, 1e6])
        SAPConfig(alphas=[1e4, 1e6], accumulation_dtype="float64")
    (record,) = caplog.records
    message = record.getMessage()
    assert "accumulation_dtype='float64'" in message and "benchmarks/studies/cost.md" in message
    assert "measured" not in message and "2e-4" not in message


# ---------------------------------------------------------------- LossConfig


def test_loss_config_accepts_numpy_numbers_as_plain_floats():
    config = LossConfig(
        loss=np.str_("sce"),
        gce_q=np.float32(0.5),
        sce_alpha=np.float32(0.25),
        sce_beta=np.int64(2),
        sce_log_zero=np.array(-4.0),
    )
    assert (config.gce_q, config.sce_alpha, config.sce_beta, config.sce_log_zero) == (0.5, 0.25, 2.0, -4.0)
    assert _plain(config.to_dict().values()) and json.dumps(config.to_dict())
    assert (
        config.describe()
        == "symmetric cross-entropy (SCE, Wang et al. 2019) with sce_alpha=0.25, sce_beta=2, sce_log_zero=-4"
    )


@pytest.mark.parametrize(
    "field, value",
    [("gce_q", np.bool_(True)), ("sce_beta", True), ("sce_alpha", "0.1"), ("loss", "GCE"), ("gce_q", np.float32(1.5))],
)
def test_loss_config_rejects_bools_and_out_of_range_numpy_values(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}="):
        LossConfig(**{field: value})
