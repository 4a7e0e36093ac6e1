"""Seeds for counter-based randomness (dropout masks, and later DP noise).

Each draw is a fresh 63-bit Philox key from a stream seeded by the OS, never
by a constant. ``manual_seed`` makes a run replayable.
"""
from __future__ import annotations

import os
import random

_stream = random.Random(int.from_bytes(os.urandom(16), "little"))


def manual_seed(seed: int) -> None:
    """Make every later seed draw reproducible."""
    _stream.seed(int(seed))


def next_seed() -> int:
    """A fresh Philox key in [0, 2**63)."""
    return _stream.getrandbits(63)


def os_seed() -> int:
    """A 63-bit Philox key straight from the operating system, for noise that protects data:
    never replayed by ``manual_seed``."""
    return int.from_bytes(os.urandom(8), "little") >> 1
