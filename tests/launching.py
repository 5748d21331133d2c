"""`accelerate launch` for the multi-process tests, on a port reserved for each launch.

A port drawn with `random.randint` is not enough on a shared machine: after transformers' `set_seed`
(any `Trainer` made in the test process seeds `random`), it is the same number in every run, so two
suite runs at once launch on the same port; and any random port may be another connection's
ephemeral port. `accelerate launch` checks a port by connecting to it, so a port bound but not
listening passes its check and the TCPStore then fails with EADDRINUSE.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Optional


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A TCP port no other socket uses, kept for the block: bound here (SO_REUSEADDR, not listening).

    While it is held, the kernel gives the port to no other bind(0) or outgoing connection, yet the
    launched TCPStore (which sets SO_REUSEADDR too) can listen on it: no window between choosing the
    port and the store binding it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("", 0))
        yield held.getsockname()[1]


def accelerate_launch(
    processes: int,
    args: Sequence[object],
    *,
    timeout: float,
    cwd: Optional[object] = None,
    env: Optional[dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch` of `args` on `processes` CPU processes (gloo when 2+), one thread each."""
    with reserved_port() as port:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            "--num_processes",
            str(processes),
            *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
            *map(str, args),
        ]
        environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd)
