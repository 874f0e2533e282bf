"""Every random number in cwa comes from a CPU `torch.Generator` seeded from
`(seed, purpose, index)`.

purpose is one of data, probe, label, control, noise; index is the window, probe, draw or
parameter index it serves. Because the stream for one window or one parameter never
depends on what else is processed, results do not change with batch size, device order
or the number of distributed ranks.
"""

from __future__ import annotations

import hashlib

PURPOSES = ("data", "probe", "label", "control", "noise", "eval", "bootstrap")


def derive_seed(seed: int, purpose: str, *index: int) -> int:
    """A 63-bit seed from (seed, purpose, index...), stable across platforms and runs."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown randomness purpose {purpose!r}")
    key = f"cwa|{int(seed)}|{purpose}|" + "|".join(str(int(i)) for i in index)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def generator(seed: int, purpose: str, *index: int):
    """A fresh CPU torch.Generator for (seed, purpose, index...)."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, purpose, *index))
    return g


def numpy_rng(seed: int, purpose: str, *index: int):
    """A numpy Generator for (seed, purpose, index...) (used for bootstrap resampling)."""
    import numpy as np

    return np.random.default_rng(derive_seed(seed, purpose, *index))
