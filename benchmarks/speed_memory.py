"""Memory probes of `speed.py` (a support module, not a script); the protocol is on
`benchmarks/studies/cost.md#speed-and-memory`.

`measure(fn)` gives one call's seconds and the growth of the resident set during it (VmHWM - VmRSS before). `run_child`
measures `collect_statistics` at each n of a spec such as `{"model": "tiny", "ns": [4, 16], "batch_size": 2,
"threads": 1, "image_size": 64}` in a fresh interpreter.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from speed_methods import IMAGE, RandomBatches, build_model, run_inference, run_stats


def status_mb(field: str) -> Optional[float]:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@functools.cache
def libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """gc, then hand freed heap pages back to the OS, so that the next RSS growth counts only new memory."""
    gc.collect()
    if libc():
        libc().malloc_trim(0)


def measure(fn: Callable[[], Any]) -> tuple[float, Optional[float], Any]:
    """(seconds, peak RSS growth in MB or None, result) of one call."""
    release_free_memory()
    before = status_mb("VmRSS")
    can_reset = reset_hwm()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    growth = (peak - before) if (can_reset and peak is not None and before is not None) else None
    return seconds, growth, out


def child_main(spec: dict[str, Any]) -> None:
    """In the fresh process: stats_exact at every n of `spec["ns"]`; prints one `CHILD_RESULT <json>` line."""
    from sap_hf.core.targets import find_target_modules

    image_size = spec.get("image_size", IMAGE)
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], image_size=image_size)
    names = find_target_modules(model)
    run_inference(model, RandomBatches(1, 1, seed=99, image_size=image_size))  # torch / oneDNN lazy init, not measured
    results = []
    for n in spec["ns"]:
        data = RandomBatches(n, spec["batch_size"], seed=1, image_size=image_size)
        seconds, growth, stats = measure(lambda: run_stats(model, data, names, spec["batch_size"], spec.get("cap")))
        tokens = max(stats.counts.values())
        results.append(
            {"n": n, "seconds": seconds, "peak_growth_mb": growth, "peak_rss_mb": status_mb("VmHWM"), "tokens": tokens}
        )
        del stats
    print("CHILD_RESULT " + json.dumps(results))


def run_child(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """`child_main(spec)` in a fresh interpreter. glibc's mmap threshold is pinned (no dynamic raise), so every large
    tensor is its own mapping, returned to the OS when freed: RSS then follows live memory."""
    here = str(Path(__file__).resolve().parent)
    child = f"import json, sys; sys.path.insert(0, {here!r}); import speed_memory as m; m.child_main(json.loads(sys.argv[1]))"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-c", child, json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
