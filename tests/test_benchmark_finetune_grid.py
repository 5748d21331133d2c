"""benchmarks/common.finetune_grid: "no change" is the `state` it is given, not what the model held before the call
(the CIFAR-10N benchmark ran it right after a clean-up had changed the model, and compared every fine-tune against
the clean-up's accuracy instead of the last model's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sap_hf.models import tiny_model


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import accuracy, finetune_grid  # noqa: E402


def test_no_change_is_the_given_state_whatever_the_model_held():
    torch.manual_seed(0)
    model = tiny_model("vit", num_labels=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 3, (40,))
    data = {"val_x": x[:20], "val_y": y[:20], "test_x": x[20:], "test_y": y[20:]}
    given = accuracy(model, data["val_x"], data["val_y"])
    constant = next(c for c in range(3) if float((data["val_y"] == c).float().mean()) != given)
    with torch.no_grad():  # what a clean-up before the call would leave: other weights (here: one class always)
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.eye(3)[constant] * 100)
    held = accuracy(model, data["val_x"], data["val_y"])
    args = argparse.Namespace(ft_lrs=[0.0], ft_epochs=[1], ft_batch_size=8)  # lr 0: no fine-tune can beat `state`
    result = finetune_grid(model, state, x[:8], y[:8], data, args, seed=0)
    model.load_state_dict(state)
    assert result["epochs"] == 0 and result["val_accuracy"] == accuracy(model, data["val_x"], data["val_y"])
    assert result["test_accuracy"] == accuracy(model, data["test_x"], data["test_y"])
    assert held != result["val_accuracy"]  # the test would see the bug: the held model scores differently
