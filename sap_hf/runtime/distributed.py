"""What processes agree on: the layout, one error protocol, gathers and sums.

The error protocol: after every local pass each process says whether it failed (one all-reduce);
a process that failed re-raises its own error, the others raise one that points to it. No
process is ever left waiting in a collective that another will not reach.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def process_layout(accelerator: Any) -> tuple[int, int]:
    """`(process_index, num_processes)`; `(0, 1)` without an Accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def is_main_process(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def raise_on_any_process(error: Optional[BaseException], accelerator: Any) -> None:
    """Collective: every process learns whether any failed, and all raise instead of hanging.

    Call it on every process after a local pass and before the next collective operation.
    """
    _, world = process_layout(accelerator)
    if world > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item() > 0
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("Another process failed during the SAP pass; see its error above. Nothing was changed.")


def gather_shards(local: Any, accelerator: Any) -> list[Any]:
    """Every process's `local` (picklable), in process order, on every process; `[local]` alone.

    Passes reduce their own shard to a small summary first, so this one collective moves
    candidates and counts, never the data.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return [local]
    from accelerate.utils import gather_object

    return gather_object([local])


def sum_over_processes(tensor: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """The element-wise sum of `tensor` over every process (itself alone)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.contiguous(), reduction="sum")


def main_process_value(value: Any, accelerator: Any) -> Any:
    """The main process's `value` (picklable), on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
