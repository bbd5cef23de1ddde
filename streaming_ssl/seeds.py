"""One way to derive seeds: `derive_seed(base, "what", index, ...)`, never ad-hoc offsets of a base seed."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (ints, strings); the same on every machine and run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
