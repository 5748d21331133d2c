"""Memory measurement for `speed.py` (a support module, not a script): /proc probes around one call, fresh processes.

`measure(fn)` gives the seconds and the growth of the resident set during one call
(VmHWM - VmRSS(before), the high-water mark reset just before the call and freed heap memory
handed back first). `run_child(spec)` calls `child_main(spec)` in a fresh interpreter that
measures `collect_statistics` at each n of `spec["ns"]` on lazily generated data, with glibc's mmap
threshold pinned, so that nothing but what the method keeps can grow with n. The spec, e.g.
`{"model": "tiny", "ns": [4, 16], "batch_size": 2, "threads": 1, "image_size": 64}`.
"""

from __future__ import annotations

import ctypes
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


# --------------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> Optional[float]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def hwm_mb() -> Optional[float]:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def release_free_memory() -> None:
    """gc, then hand freed heap pages back to the OS so the next RSS growth is honest."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def measure(fn: Callable[[], Any]) -> tuple[float, Optional[float], Any]:
    """(seconds, peak RSS growth in MB or None, result) of one call."""
    release_free_memory()
    before = rss_mb()
    can_reset = reset_hwm()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = hwm_mb()
    growth = (peak - before) if (can_reset and peak is not None and before is not None) else None
    return seconds, growth, out


# --------------------------------------------------------------------------------------------
# Child process: one stats_exact memory measurement in a fresh interpreter
# --------------------------------------------------------------------------------------------


def child_main(spec: dict[str, Any]) -> None:
    """Measure stats_exact at every n of `spec["ns"]` and print one `CHILD_RESULT <json>` line."""
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
        results.append(
            {
                "n": n,
                "seconds": seconds,
                "peak_growth_mb": growth,
                "peak_rss_mb": hwm_mb(),
                "tokens": max(stats.counts.values()),
            }
        )
        del stats
    print("CHILD_RESULT " + json.dumps(results))


def run_child(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Fresh interpreter; glibc's mmap threshold is pinned (no dynamic raise) so that every large
    tensor is its own mapping, returned to the OS when freed: RSS then follows live memory."""
    here = str(Path(__file__).resolve().parent)
    child = (
        "import json, sys; sys.path.insert(0, " + repr(here) + "); "
        "import speed_memory as m; m.child_main(json.loads(sys.argv[1]))"
    )
    cmd = [sys.executable, "-c", child, json.dumps(spec)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
