"""Unit tests of the benchmarks' support code (the end-to-end runs are tests/test_benchmark_smoke.py): peers.py's
SSD and SCRUB on a tiny model, common's recipe settings, report's summary, targets and README tables, the audit from
the training dynamics, the method registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import audits  # noqa: E402
import common  # noqa: E402
import methods  # noqa: E402
import peers  # noqa: E402


def _tiny_model(seed: int = 0):
    import torch
    from transformers import ViTForImageClassification

    from sap_hf.models import tiny_vit_config

    torch.manual_seed(seed)
    return ViTForImageClassification(
        tiny_vit_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).eval()


def test_diagonal_fisher_is_the_mean_squared_per_sample_gradient_with_prefixes() -> None:
    import torch
    import torch.nn.functional as F

    model = _tiny_model()
    x, y = torch.randn(5, 1, 28, 28), torch.tensor([0, 3, 3, 7, 9])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cost = peers.Cost()
    fisher = peers.diagonal_fisher(model, x, y, prefixes=[2, 5, 9], cost=cost)
    assert sorted(fisher) == [2, 5] and cost.train == 5
    squares = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(pixel_values=x[i : i + 1]).logits, y[i : i + 1]).backward()
        squares.append({n: p.grad.detach() ** 2 for n, p in model.named_parameters()})
    for k in (2, 5):
        for name in before:
            expected = sum(s[name] for s in squares[:k]) / k
            torch.testing.assert_close(fisher[k][name], expected)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_ssd_dampens_exactly_the_selected_parameters_by_min_lambda_ratio_one() -> None:
    import torch

    theta = {"w": torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0])}
    forget = {"w": torch.tensor([1.0, 10.0, 50.0, 0.0, 30.0])}
    retain = {"w": torch.tensor([1.0, 1.0, 2.0, 0.0, 1.0])}
    new, selected = peers.ssd_dampen(theta, forget, retain, alpha=5.0, lam=1.0)
    # selected: I_f > 5 I_r -> positions 1 (10 > 5), 2 (50 > 10), 4 (30 > 5); 0 (1 > 5) and 3 (0 > 0) are not
    assert selected == 3
    torch.testing.assert_close(new["w"], torch.tensor([1.0, 2.0 * 0.1, -3.0 * 2 / 50, 4.0, 5.0 / 30]))
    # lambda large enough: beta = min(lambda I_r / I_f, 1) = 1 for all selected -> nothing changes
    same, selected = peers.ssd_dampen(theta, forget, retain, alpha=5.0, lam=100.0)
    assert selected == 3 and torch.equal(same["w"], theta["w"])
    assert torch.equal(theta["w"], torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0]))  # inputs untouched


def test_ssd_with_a_huge_alpha_changes_nothing_on_a_model() -> None:
    import torch

    model = _tiny_model()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    forget = peers.diagonal_fisher(model, x[:3], y[:3])[3]
    retain = peers.diagonal_fisher(model, x[3:], y[3:])[3]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    new, selected = peers.ssd_dampen(params, forget, retain, alpha=1e30, lam=1.0)
    # a parameter with zero retain importance and non-zero forget importance is still selected at any alpha
    zero_retain = sum(int(((retain[n] == 0) & (forget[n] > 0)).sum()) for n in params)
    assert selected == zero_retain
    changed = sum(int((new[n] != params[n]).sum()) for n in params)
    assert changed <= zero_retain
    new, selected = peers.ssd_dampen(params, forget, {n: t + 1e-30 for n, t in retain.items()}, alpha=1e30, lam=1.0)
    assert selected == 0 and all(torch.equal(new[n], params[n]) for n in params)


def test_scrub_max_steps_push_away_from_the_teacher_and_min_steps_pull_back() -> None:
    import copy

    import torch

    model = _tiny_model()
    teacher = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def kl() -> float:
        with torch.no_grad():
            return float(peers.kl_to_teacher(model(pixel_values=x).logits, teacher(pixel_values=x).logits, 4.0))

    kwargs = dict(temperature=4.0, ce_weight=0.0, batch_size=4, seed=0)
    assert kl() == pytest.approx(0.0, abs=1e-5)
    # one max pass on the forget set (and a retain pass without any weight on its loss): the KL grows from 0
    epochs, cost = [], peers.Cost()
    peers.scrub_train(
        model,
        teacher,
        (x, y),
        (x[:4], y[:4]),
        lr=1e-2,
        max_epochs=1,
        epochs=1,
        kl_weight=0.0,
        on_epoch=epochs.append,
        cost=cost,
        **kwargs,
    )
    pushed = kl()
    assert pushed > 1e-3 and epochs == [1] and (cost.train, cost.forward) == (12, 12)
    # min steps only (KL to the teacher, no CE, no max pass): the student comes back towards the teacher
    peers.scrub_train(
        model,
        teacher,
        (x[:0], y[:0]),
        (x, y),
        lr=1e-3,
        max_epochs=0,
        epochs=20,
        kl_weight=1.0,
        on_epoch=lambda e: None,
        **kwargs,
    )
    assert kl() < 0.5 * pushed


def test_oracle_sizes_scale_the_papers_sets() -> None:
    assert peers.oracle_sizes(4000) == {"ssd": (400, 80), "scrub": (80, 16)}
    assert peers.oracle_sizes(50_000) == {"ssd": (5000, 1000), "scrub": (1000, 200)}


def test_recipe_settings_come_from_the_yaml(tmp_path):
    """The benchmarks' recipe settings are read from recipes/configs/default.yaml, not copied."""
    settings = common.recipe_settings()
    config = common.recipe_sap_config()
    assert (config.accumulation_dtype, config.batch_size) == (settings["accumulation_dtype"], settings["batch_size"])
    # The YAML leaves the rest of the SAP settings at SAPConfig's defaults (it does not copy them).
    from sap_hf import SAPConfig

    assert {k: v for k, v in config.to_dict().items() if k not in settings} == {
        k: v for k, v in SAPConfig().to_dict().items() if k not in settings
    }
    changed = tmp_path / "recipe.yaml"
    changed.write_text(common.RECIPE_CONFIG.read_text() + "\ntrusted_per_class: 7\nalpha_scope: shared\n")
    assert (common.recipe_sap_config(changed).trusted_per_class, common.recipe_sap_config(changed).alpha_scope) == (
        7,
        "shared",
    )
    assert common.recipe_sap_config(changed, batch_size=500).batch_size == 500
    training = common.recipe_training()
    parser_defaults = common.run_parser("").parse_args([])
    assert (parser_defaults.epochs, parser_defaults.lr, parser_defaults.batch_size) == (
        settings["num_train_epochs"],
        settings["learning_rate"],
        settings["per_device_train_batch_size"],
    )
    assert (
        parser_defaults.warmup_epochs
        == training["warmup_epochs"]
        == pytest.approx(settings["warmup_steps"] * settings["num_train_epochs"])
    )


def _rows() -> list[dict]:
    """Two settings x two seeds of none / best_epoch / sap / sap+refine, and the clean-label oracle once per seed."""
    values = {"none": 0.50, "best_epoch": 0.70, "sap": 0.55, "sap+refine": 0.74}
    rows = [
        {"setting": "oracle", "seed": seed, "method": "oracle", "test_accuracy": 0.8 + 0.02 * seed} for seed in (0, 1)
    ]
    for setting in ("sym40", "asym40"):
        for seed in (0, 1):
            for method, value in values.items():
                shift = 0.01 * seed + (0.1 if setting == "sym40" else 0.0)
                fit = 0.9 if method == "none" else None
                rows.append(
                    dict(setting=setting, seed=seed, method=method, test_accuracy=value + shift, noisy_fit=fit)
                )
    return rows


def test_report_summarises_by_setting_with_shared_rows_and_checks_the_targets() -> None:
    import report

    rows = _rows()
    summary = report.summarise(rows, ("setting",), shared="oracle")
    assert set(summary) == {"sym40", "asym40"} and summary["asym40"]["oracle"]["test_accuracy"]["mean"] == 0.81
    assert summary["sym40"]["sap"]["test_accuracy"]["mean"] == pytest.approx(0.655)
    assert summary["sym40"]["sap"]["seeds"] == [0, 1] and "noisy_fit" in summary["sym40"]["none"]
    assert "noisy_fit" not in summary["sym40"]["sap"]  # None in its rows: not averaged
    sym = report.gap_targets(summary, 1, pipelines=("sap+refine",))["sym40"]
    assert sym["sap_minus_none"] == pytest.approx(5.0) and sym["sap+refine_minus_best_epoch"] == pytest.approx(4.0)
    assert sym["sap+refine_gap_closed"] == pytest.approx((0.845 - 0.605) / (0.81 - 0.605))
    nested = report.summarise(rows, ("setting", "seed"))
    assert set(nested["sym40"]) == {"0", "1"} and "sap" in nested["sym40"]["0"]


def test_report_prints_the_readme_tables_of_a_result_leaving_out_rows_it_lacks(tmp_path, capsys) -> None:
    import json

    import report

    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- table results/study.json\ncolumns: setting\nrows:\n  none\n  sap\n  sap+pseudo\n"
        "  diff(sap, none)\n-->\n| old |\n<!-- /table -->\n"
    )
    result = tmp_path / "run" / "study.json"
    result.parent.mkdir()
    result.write_text(json.dumps({"rows": [r for r in _rows() if r["method"] in ("none", "sap")]}))
    assert report.print_tables(result, pages=[readme]) == 1
    printed = capsys.readouterr().out
    assert "| sap | 65.5 ± 0.7 | 55.5 ± 0.7 |" in printed and "| sap − none | +5.0 | +5.0 |" in printed
    assert "sap+pseudo" not in printed  # no row of it in this run: left out, the rest shown
    assert report.print_tables(result, "other.json", pages=[readme]) == 0


def test_the_dynamics_audit_flags_the_low_margins_of_the_window() -> None:
    import torch

    from sap_hf.audit.labels import LabelAudit

    # three epochs of margins; example 1's mean is low (a wrong label), the others' high
    margins = torch.tensor([[0.9, -0.8, 0.7, 0.8], [0.8, -0.6, 0.9, 0.7], [0.9, -0.7, 0.8, 0.9]])
    audit = LabelAudit(
        indices=torch.arange(4),
        given=torch.zeros(4, dtype=torch.long),
        probs=torch.full((4, 2), 0.5, dtype=torch.float64),
        scores=torch.zeros(4, dtype=torch.float64),
        suspected=torch.zeros(4, dtype=torch.bool),
    )
    found = audits.dynamics_audit(audit, margins)
    assert found.suspected.tolist() == [False, True, False, False]
    assert found.ranking[0] == 1 and torch.equal(found.probs, audit.probs)
    assert torch.allclose(found.scores, (margins.double().mean(0) + 1) / 2)
    # the first epoch alone: the window is read
    assert float(audits.dynamics_audit(audit, margins, epochs=1).scores[1]) == pytest.approx((-0.8 + 1) / 2)
    # the first epoch's ranking with every epoch's count: as many flagged as the mixture on every epoch flags (one
    # here), the lowest of epoch 1 (example 2 there, example 1 over every epoch)
    early = torch.tensor([[0.9, -0.6, 0.9, 0.8]]).repeat(10, 1)
    early[0, 1], early[0, 2] = 0.2, -0.9
    assert audits.dynamics_audit(audit, early).suspected.tolist() == [False, True, False, False]
    counted = audits.dynamics_audit(audit, early, epochs=1, count_from_every_epoch=True)
    assert counted.suspected.tolist() == [False, False, True, False]
    assert torch.allclose(counted.scores, (early[0].double() + 1) / 2)


def test_a_row_keeps_its_specific_fields_beside_the_named_ones_and_leaves_out_what_was_not_measured() -> None:
    row = {"method": "sap", "test_accuracy": 0.5, "alpha": 30.0, "trials": [{"mode": "remove"}], "examples": None}
    parsed = methods.Row.of(row)
    assert (parsed.method, parsed.test_accuracy, parsed.purity) == ("sap", 0.5, None)
    assert parsed.specific == {"alpha": 30.0, "trials": [{"mode": "remove"}], "examples": None}
    assert parsed.as_dict() == row  # no purity, cost_epochs, seconds... in the JSON row; a specific None stays
    assert list(parsed.as_dict()) == list(row)  # in the order the method wrote it
    assert list(methods.Row("m", seconds=1.0, test_accuracy=0.5, specific={"k": 1}).as_dict()) == [
        "method",
        "test_accuracy",
        "seconds",
        "k",
    ]


def test_run_methods_runs_the_named_methods_in_order_each_from_the_last_state(monkeypatch) -> None:
    import argparse

    import torch

    model = torch.nn.Linear(2, 1)
    last = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def nudge(cell):  # changes the weights; the next method must start from `last` all the same
        seen.append(float(cell.model.weight.sum()))
        with torch.no_grad():
            cell.model.weight += 1.0
        return [methods.Row("nudge", test_accuracy=float(cell.model.weight.sum()), specific={"k": 1})]

    monkeypatch.setitem(methods.METHODS, "nudge", nudge)
    cell = methods.Cell(model, last, {}, {}, argparse.Namespace(), seed=0)
    rows = methods.run_methods(cell, ["nudge", "nudge"])
    assert seen == [float(last["weight"].sum())] * 2
    assert [row["method"] for row in rows] == ["nudge", "nudge"] and all(row["k"] == 1 for row in rows)
    assert [row["test_accuracy"] for row in rows] == pytest.approx([seen[0] + 2.0] * 2)
    assert torch.equal(model.weight, last["weight"])
    with pytest.raises(ValueError, match=r"unknown methods \['sap\+magic'\].*'best_epoch'"):
        methods.run_methods(cell, ["nudge", "sap+magic"])
    assert len(seen) == 2  # nothing ran
    with pytest.raises(ValueError, match="registered twice"):
        methods.register("none")(nudge)
    # the oracle's methods read a model trained on the clean labels, the others one trained on noisy labels
    with pytest.raises(ValueError, match=r"\['oracle'\] do not apply to a model trained on noisy labels"):
        methods.run_methods(cell, ["nudge", "oracle"])
    clean = methods.Cell(model, last, {}, {}, argparse.Namespace(), seed=0, clean_labels=True)
    with pytest.raises(ValueError, match=r"\['nudge'\] do not apply to a model trained on the clean labels"):
        methods.run_methods(clean, ["nudge"])
    assert len(seen) == 2  # nothing ran
    offered = methods.noisy_label_methods()
    assert "none" in offered and not set(methods.CLEAN_LABEL_METHODS) & set(offered)


def test_the_pretrained_regime_rejects_the_from_scratch_options_it_would_overwrite(capsys) -> None:
    """`pretrained.py --settings sym40` once ran every noise: the regime sets --settings, --epochs and
    --warmup_epochs from --noises, --lengths and --warmup_share, so giving them is an error naming the right one."""
    import pretrained

    for given, instead in (["--settings", "sym40"], "--noises"), (["--epochs=3"], "--lengths"):
        with pytest.raises(SystemExit):
            pretrained.parse_args(["--quick", *given])
        assert f"give {instead} instead" in capsys.readouterr().err
    assert pretrained.parse_args(["--quick", "--noises", "inst40"]).noises == ["inst40"]
