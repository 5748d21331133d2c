"""How a sample is named across processes and runs: its position, or the `key` of a keyed stream.

Trusted indices, audits, the statistics cache and every random draw per sample (a selection
subset, the curvature rule's noise) are keyed by this identity, so they must not depend on the
process count, the batch or Python's per-process `hash` of a string. Imports no other sap_hf module.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable
from typing import Union


Identity = Union[int, str]
KEY_COLUMN = "key"
"""A stream's examples are identified by this column when they have it (Clothing1M: the image path)."""


def identity_name(identity: Identity) -> str:
    """A sample identity as text that is the same in every process (Python's `hash` of a str is not)."""
    if isinstance(identity, numbers.Integral) and not isinstance(identity, bool):
        return f"position:{int(identity)}"
    return f"{type(identity).__name__}:{identity}"


def identity_digest(seed: int, identity: Identity) -> int:
    """A 64-bit number fixed by `seed` and the sample's identity alone (not by process or batch)."""
    digest = hashlib.blake2b(f"{int(seed)}|{identity_name(identity)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def identity_draw(seed: int, identity: Identity) -> float:
    """A uniform number in [0, 1) fixed by `seed` and the sample's identity alone (`identity_digest`)."""
    return identity_digest(seed, identity) / 2.0**64


class HashSample:
    """The identities whose `identity_draw` falls below `share`: a random share of a stream, decided per sample.

    Usable as `iter_shard_batches(keep=...)`: `identity in sample` needs nothing but the identity, so a
    stream is drawn from while it is read, the same on every process, and a skipped example is never
    collated (never decoded).
    """

    def __init__(self, share: float, seed: int):
        self.share, self.seed = float(share), int(seed)

    def __contains__(self, identity: Identity) -> bool:
        return identity_draw(self.seed, identity) < self.share

    def __and__(self, other: Iterable[Identity]) -> set[Identity]:
        return {identity for identity in other if identity in self}
