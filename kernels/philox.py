"""Philox4x32-10 counter-based random numbers for in-kernel dropout.

Why our own rounds instead of ``tl.randint``: the exact bit stream is part of
fastpeft's contract (``fastpeft.reference.philox_keep`` replays it in plain
PyTorch so the two backends agree bit for bit with dropout on), and Triton's
``randint4x`` has changed how it feeds 64-bit offsets between releases. These
rounds are the textbook Philox4x32 (Salmon et al., SC'11): counter
``(offset_lo, offset_hi, 0, 0)``, key ``(seed_lo, seed_hi)``; the first output
word is used.

A dropout decision for element ``e`` (its flat index in the (N, in) input) is
``keep = (philox(seed, e) >> 1) >= threshold`` with ``threshold = round(p·2³¹)``:
an integer compare, so both backends decide identically.
"""

import triton
import triton.language as tl

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10


@triton.jit
def philox_u32(seed, offsets):
    """First Philox4x32-10 output word for an int64 block of ``offsets``."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    offsets = offsets.to(tl.int64)
    c0 = (offsets & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    ra = tl.full(c0.shape, PHILOX_ROUND_A, tl.uint32)
    rb = tl.full(c0.shape, PHILOX_ROUND_B, tl.uint32)
    for _ in tl.static_range(N_ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(rb, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(ra, _c0) ^ c3 ^ k1
        c1 = rb * _c2
        c3 = ra * _c0
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0


@triton.jit
def dropout_keep(seed, offsets, threshold):
    """Boolean keep-mask: ``(philox(seed, offsets) >> 1) >= threshold``."""
    bits = (philox_u32(seed, offsets) >> 1).to(tl.int32)
    return bits >= threshold
