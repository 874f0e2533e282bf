"""Every random number in cwa is a function of `(seed, purpose, index...)` and, for bulk
draws, of the element's position.

purpose is one of data, probe, label, control, noise, eval, bootstrap; index is the window,
probe, draw or parameter index it serves. Because the stream for one window or one
parameter never depends on what else is processed, results do not change with batch size,
device order or the number of distributed ranks.

Bulk draws (Hutchinson probes, sampled labels, perturbation noise, control draws) come
from a counter-based generator (`bits`, `uniform`, `rademacher`, `Stream`), version
`RNG_VERSION`:

    key_a, key_b = the first and second 64-bit words of SHA-256("cwa|rng2|seed|purpose|index...")
    word(i)      = mix(mix(key_a + (offset + i) * γ) ^ key_b),   i the element's flat index

with γ = 0x9E3779B97F4A7C15 and ``mix`` the SplitMix64 finalizer (xor-shift 30, multiply,
xor-shift 27, multiply, xor-shift 31), arithmetic modulo 2^64. The first round is exactly
SplitMix64's stream for state key_a; the second, keyed by key_b, keeps two streams apart
even where their first-round states overlap (key_a2 − key_a1 a small multiple of γ).
It runs as int64 tensor ops on the tensor's own device — wrap-around multiplication, and
logical right shifts as an arithmetic shift then a mask — so the words are bit-identical
on CPU and CUDA, and a range computed in chunks equals the range computed whole. Floats
are taken from the top bits of a word: float64 uniforms are (word >>> 11) / 2^53, float32
ones (word >>> 40) / 2^24 (in general as many bits as the dtype's significand holds), so
every uniform is an exact multiple of 2^-bits in [0, 1); a Rademacher sign is the top bit.
Nothing is drawn on the host or copied to the device; the only host work is one SHA-256
per stream.

`generator` (CPU `torch.Generator`) is kept for the small draws whose order of record it
defines (the data windows); `numpy_rng` for bootstrap resampling.
"""

from __future__ import annotations

import hashlib

PURPOSES = ("data", "probe", "label", "control", "noise", "eval", "bootstrap")

# Version of the counter-based generator: part of the fingerprint of every stage whose
# result it determines (stochastic metrics, random controls, seeded perturbations).
# 2: counter-based, on the device (1 drew everything from CPU torch.Generators).
RNG_VERSION = 2

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Elements per pass. On the CPU a pass that stays in cache is 2.5x faster (16 M Rademacher
# values: 0.27 s in 2^18-element passes, 0.66 s in 2^24, torch.randint 0.18-0.21 s); on an
# accelerator larger passes mean fewer kernel launches. Either bounds the int64
# temporaries (2 x 2 MiB, 2 x 128 MiB). The values do not depend on it.
_CHUNK = 1 << 18
_CHUNK_DEVICE = 1 << 24


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


# --------------------------------------------------------------------------- counter-based


def stream_keys(seed: int, purpose: str, *index: int) -> tuple[int, int]:
    """The two 64-bit keys (unsigned Python ints) of the stream (seed, purpose, index...)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown randomness purpose {purpose!r}")
    key = f"cwa|rng{RNG_VERSION}|{int(seed)}|{purpose}|" + "|".join(str(int(i)) for i in index)
    d = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:16], "little")


def _mix_py(z: int) -> int:
    z ^= z >> 30
    z = (z * _MIX1) & _M64
    z ^= z >> 27
    z = (z * _MIX2) & _M64
    return z ^ (z >> 31)


def reference_word(seed: int, purpose: str, *index: int, element: int) -> int:
    """The 64-bit word (unsigned) of one element, in plain Python integers: the
    specification the tensor code is tested against."""
    ka, kb = stream_keys(seed, purpose, *index)
    return _mix_py(_mix_py((ka + element * _GAMMA) & _M64) ^ kb)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_(z, tmp):
    """SplitMix64's finalizer on int64 tensor ``z`` in place (``tmp`` a scratch buffer)."""
    import torch

    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)  # arithmetic on int64 ...
        tmp.bitwise_and_((1 << (64 - shift)) - 1)  # ... made logical by the mask
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))  # wraps modulo 2^64
    return z


def _words(keys: tuple[int, int], start: int, n: int, device):
    """Words start..start+n-1 of a stream as int64 (two's complement of the unsigned word)."""
    import torch

    z = torch.arange(start, start + n, dtype=torch.int64, device=device)
    tmp = torch.empty_like(z)
    z.mul_(_signed(_GAMMA)).add_(_signed(keys[0]))
    _mix_(z, tmp)
    z.bitwise_xor_(_signed(keys[1]))
    return _mix_(z, tmp)


def _top_bits(w, nbits: int):
    """The top ``nbits`` (1..63) of int64 words ``w`` as non-negative int64, in place."""
    return w.bitwise_right_shift_(64 - nbits).bitwise_and_((1 << nbits) - 1)


def _fill(out, keys: tuple[int, int], offset: int, convert) -> None:
    """Fill ``out`` (contiguous) with convert(words) chunk by chunk, element i of its flat
    view taking word offset + i."""
    flat = out.view(-1)
    step = _CHUNK if out.device.type == "cpu" else _CHUNK_DEVICE
    for a in range(0, flat.numel(), step):
        b = min(a + step, flat.numel())
        flat[a:b] = convert(_words(keys, offset + a, b - a, out.device))


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def bits(seed: int, purpose: str, *index: int, shape, device=None, nbits: int = 64, offset: int = 0):
    """Random words of the stream (seed, purpose, index...), element i of the flattened
    ``shape`` taking word ``offset + i``: int64, the full 64-bit word (two's complement)
    for ``nbits=64``, else its top ``nbits`` bits, uniform on [0, 2^nbits)."""
    import torch

    if not 1 <= nbits <= 64:
        raise ValueError(f"nbits must be in 1..64, got {nbits}")
    keys = stream_keys(seed, purpose, *index)
    out = torch.empty(_shape(shape), dtype=torch.int64, device=device)
    _fill(out, keys, int(offset), (lambda w: w) if nbits == 64 else (lambda w: _top_bits(w, nbits)))
    return out


def _float_bits(dtype) -> int:
    import torch

    if not dtype.is_floating_point:
        raise ValueError(f"uniforms need a floating dtype, got {dtype}")
    import math

    return min(1 - round(math.log2(torch.finfo(dtype).eps)), 53)  # eps = 2^(1 - bits)


def uniform(seed: int, purpose: str, *index: int, shape, device=None, dtype=None, offset: int = 0):
    """Uniforms on [0, 1) of the stream (seed, purpose, index...): exact multiples of
    2^-b, b the significand bits of ``dtype`` (53 for float64, 24 for float32, the
    default), computed from the top b bits of each word."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    b = _float_bits(dtype)
    work = torch.float64 if b > 24 else torch.float32  # exact for the b-bit integers
    scale = 2.0**-b

    def convert(w):
        return _top_bits(w, b).to(work).mul_(scale)

    out = torch.empty(_shape(shape), dtype=dtype, device=device)
    _fill(out, stream_keys(seed, purpose, *index), int(offset), convert)
    return out


def rademacher(seed: int, purpose: str, *index: int, shape, device=None, dtype=None, offset: int = 0):
    """±1 of the stream (seed, purpose, index...): −1 where the word's top bit is set."""
    import torch

    dtype = torch.float32 if dtype is None else dtype

    def convert(w):
        return w.lt(0).to(dtype).mul_(-2).add_(1)

    out = torch.empty(_shape(shape), dtype=dtype, device=device)
    _fill(out, stream_keys(seed, purpose, *index), int(offset), convert)
    return out


class Stream:
    """A sequential reader of one counter-based stream: each call continues where the
    previous one stopped, so a loop that asks for more draws (rejection sampling, top-ups)
    reads words 0, 1, 2, ... of (seed, purpose, index...) whatever its call sizes."""

    def __init__(self, seed: int, purpose: str, *index: int, device=None):
        self.key = (int(seed), purpose, *(int(i) for i in index))
        stream_keys(seed, purpose, *index)  # check the purpose now
        self.device = device
        self.offset = 0

    def bits(self, n: int, nbits: int = 64):
        out = bits(*self.key, shape=(int(n),), device=self.device, nbits=nbits, offset=self.offset)
        self.offset += int(n)
        return out

    def uniform(self, n: int, dtype=None):
        out = uniform(*self.key, shape=(int(n),), device=self.device, dtype=dtype, offset=self.offset)
        self.offset += int(n)
        return out


def stream(seed: int, purpose: str, *index: int, device=None) -> Stream:
    """A fresh `Stream` at word 0 of (seed, purpose, index...)."""
    return Stream(seed, purpose, *index, device=device)
