"""Selection rules are registered by name (`SCORERS`): one function each, a new one works everywhere by name."""

import dataclasses

import pytest
import torch
from helpers import random_examples

from sap_hf import SAPConfig, select_trusted
from sap_hf.core.selection import EXPERIMENTAL_RULES, SCORERS
from sap_hf.models import tiny_model
from sap_hf.runtime.passes import Runtime


def test_every_registered_rule_scores_through_the_one_signature():
    model, runtime = tiny_model("vit", num_labels=3), Runtime(batch_size=7, show_progress=False)
    with runtime.run(model, random_examples(10, seed=1), "selection") as walk:
        for batch in walk.batches():
            labels, _ = walk.require_labels(batch, 3, "a test")
            for rule, scorer in SCORERS.items():
                scores = scorer(walk, batch, labels, 0)
                assert scores.device.type == "cpu" and scores.shape == (len(batch),), rule
                assert not torch.isnan(scores).any(), rule


def test_a_new_rule_is_one_function(monkeypatch):
    def last_positions(walk, batch, labels, seed=0):  # prefers the latest examples of each class
        return -torch.tensor(batch.ids, dtype=torch.float32)

    monkeypatch.setitem(SCORERS, "last", last_positions)
    config = SAPConfig(selection_rule="last", trusted_per_class=2)
    selection = select_trusted(
        tiny_model("vit", num_labels=3),
        random_examples(18, seed=1),
        config.trusted_per_class,
        rule=config.selection_rule,
        runtime=Runtime(batch_size=7, show_progress=False),
    )
    assert selection.indices == [12, 13, 14, 15, 16, 17]
    with pytest.raises(ValueError, match="selection_rule"):
        SAPConfig(selection_rule="unknown")


def test_the_rules_without_a_measured_gain_say_they_are_experimental():
    help_text = next(f for f in dataclasses.fields(SAPConfig) if f.name == "selection_rule").metadata["help"]
    start = help_text.index("Experimental")
    assert set(EXPERIMENTAL_RULES) == {"agreement", "curvature"}
    assert all(help_text.index(f"'{rule}'") > start for rule in EXPERIMENTAL_RULES)
    assert all(help_text.index(f"'{rule}'") < start for rule in set(SCORERS) - set(EXPERIMENTAL_RULES))
