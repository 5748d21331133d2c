"""Small shared builders for the tests: random labelled image examples and weight snapshots."""

from __future__ import annotations

import torch


def random_examples(n: int, num_labels: int = 3, size: int = 16, channels: int = 3, seed: int = 0) -> list[dict]:
    """`n` examples with `pixel_values` and `labels` covering every class (i % num_labels)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, channels, size, size, generator=generator)
    return [{"pixel_values": pixels[i], "labels": i % num_labels} for i in range(n)]


class MapStyle(torch.utils.data.Dataset):
    """A plain map-style torch Dataset over a list (no `__iter__`, no `select`): what many users hand over."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"


def user_error(capsys, call, *args, prog: str = "sap-hf", alone: bool = True) -> str:
    """Run `call(*args)` expecting a user error: exit code 2 and one line `PROG...: error: ...` on stderr.

    Returns that line. `alone=False` for an error found after work began (a model was loaded): what
    that work logged may precede the line.
    """
    import pytest

    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and (err.count("\n") == 1 or not alone), err
    line = err.splitlines()[-1]
    assert line.startswith(prog) and ": error: " in line, err
    return line
