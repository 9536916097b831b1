"""Philox4x32-10 counter-based random numbers for in-kernel dropout.

Cost is what shapes this file. One Philox4x32-10 call is ~120 integer ops;
spent on a single dropout decision, that is ~100 ops per element, which on an
H100 (~17 int32 TOPS) makes a 4096×8192 mask cost ~0.2 ms — more than the
bytes it saves, three times per step (forward down pass, dgrad epilogue, dA).
So each call feeds **eight** decisions: its four 32-bit words, split into
16-bit halves, each compared with ``threshold = round(p · 2¹⁶)`` (p is thus
quantized to 1/65536; ``fastpeft.reference.dropout_threshold`` gives the exact
rule: 65536, i.e. drop everything, only for p = 1, and the keep scale
``dropout_keep_scale`` that makes the quantized dropout unbiased).

Element (row m, column n) of an (N, in) input uses counter
``(n // 8, m_lo, m_hi, 0)`` with key ``(seed_lo, seed_hi)``, and inside the
group slot ``n % 8`` of the interleaved 16-bit values (see ``keep_tile``).
``fastpeft.reference.dropout_keep_mask`` replays exactly this in PyTorch, so
both backends drop the same elements.

The rounds are the textbook Philox4x32 (Salmon et al., SC'11), written here
rather than taken from ``tl.randint4x`` so the stream is fixed by this file,
not by a Triton release; a test checks they equal ``tl.randint4x``.
"""

import triton
import triton.language as tl

# Globals a @triton.jit function reads must be tl.constexpr (the interpreter does not check this).
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
N_ROUNDS = tl.constexpr(10)
# Columns sharing one Philox call (4 words × 2 halves).
COLS_PER_CALL = tl.constexpr(8)


@triton.jit
def philox4x32(seed, c0, c1, c2, c3):
    """Philox4x32-10 of uint32 counter blocks (c0..c3) under a 64-bit ``seed``: four uint32 blocks."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
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
    return c0, c1, c2, c3


@triton.jit
def _halves(w):
    """Interleave a word block's low and high 16 bits along the last axis: (.., G) → (.., 2G)."""
    return tl.interleave(w & 0xFFFF, w >> 16)


@triton.jit
def keep_tile(seed, rows, col0, BLOCK_N: tl.constexpr, threshold):
    """Dropout keep-mask of shape (len(rows), BLOCK_N) for columns ``col0 + [0, BLOCK_N)``.

    ``rows`` is an int64 block of row indices; ``col0`` must be a multiple of 8.
    """
    G: tl.constexpr = BLOCK_N // COLS_PER_CALL
    BM: tl.constexpr = rows.shape[0]
    rows = rows.to(tl.int64)
    groups = (tl.arange(0, G) + col0 // COLS_PER_CALL).to(tl.uint32)  # tensor first: col0 may be a constexpr
    c0 = tl.broadcast_to(groups[None, :], (BM, G))
    c1 = tl.broadcast_to((rows & 0xFFFFFFFF).to(tl.uint32)[:, None], (BM, G))
    c2 = tl.broadcast_to(((rows >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None], (BM, G))
    w0, w1, w2, w3 = philox4x32(seed, c0, c1, c2, c0 * 0)
    bits = tl.interleave(tl.interleave(_halves(w0), _halves(w1)), tl.interleave(_halves(w2), _halves(w3)))
    return bits.to(tl.int32) >= threshold
