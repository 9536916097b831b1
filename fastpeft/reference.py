"""Plain-PyTorch reference of every fastpeft op: the CPU path and the test oracle.

The LoRA linear layer computes (``D`` = dropout, ``m`` its keep-mask)::

    xa = D(x) Aᵀ                      D(x) = c · m ⊙ x              (N, r)
    y  = x W0ᵀ + b + scale · xa Bᵀ                                    (N, out)

and, with ``dS = scale · dy B`` (N, r)::

    dx = dy W0 + c · m ⊙ (dS A)
    dA = dSᵀ D(x)          dB = scale · dyᵀ xa          db = Σ_rows dy

Dropout is decided on 16 random bits: an element is kept when its bits are
≥ the threshold ``t = dropout_threshold(p)``, so it is kept with probability
exactly ``(65536 − t) / 65536`` — ``p`` quantized to a multiple of 2⁻¹⁶ — and
kept values are scaled by ``c = 65536 / (65536 − t)``, the inverse of that
keep probability (``dropout_params``), which makes ``E[D(x)] = x`` exactly
for every ``p`` (scaling by ``1/(1 − p)`` instead would be biased by the
quantization: ×1.07 at p = 0.9999). The rule: ``t = round(p · 65536)``,
except that only ``p = 1`` gives ``t = 65536`` (everything dropped, ``c = 0``:
the LoRA branch is exactly zero, as ``nn.Dropout(p=1)``); ``1 − 2⁻¹⁷ < p < 1``
gives ``t = 65535`` (one element in 65536 kept, scaled by 65536), and
``p < 2⁻¹⁷`` gives ``t = 0``: nothing dropped and ``c = 1`` (the identity).

The dropout mask is never stored: it is regenerated from ``(seed, element
index)`` with the same Philox4x32-10 stream the Triton kernels use
(``fastpeft.kernels.philox``), so this path and the kernels agree bit for bit
on which elements are dropped. What autograd keeps is ``x`` (the caller's own
tensor), ``xa`` and an 8-byte seed.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# Rows of the mask generated at once; bounds the int64 temporaries on CPU.
_MASK_CHUNK_ELEMS = 1 << 22


def philox4x32(seed: int | torch.Tensor, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on uint32 counters held in int64 tensors: four words in [0, 2³²).

    Bit-identical to ``fastpeft.kernels.philox.philox4x32`` (and to Triton's
    ``tl.randint4x`` for counter ``(offset_lo, offset_hi, 0, 0)``). A uint32 × uint32
    product wraps in int64 arithmetic, and both of its words survive the wrap:
    ``p & M`` is the low word and ``(p >> 32) & M`` the high one (the arithmetic
    shift is off by exactly 2³² for wrapped values, which the mask removes).
    """
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    # In place into preallocated buffers: ~35 % faster on CPU than fresh temporaries.
    c0, c1, c2, c3 = (t.contiguous().clone() for t in (c0, c1, c2, c3))
    pa, pb = torch.empty_like(c0), torch.empty_like(c0)
    for _ in range(10):
        torch.mul(c2, _ROUND_B, out=pb)
        torch.mul(c0, _ROUND_A, out=pa)
        torch.bitwise_right_shift(pb, 32, out=c0).bitwise_and_(_M32).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(pa, 32, out=c2).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1)
        torch.bitwise_and(pb, _M32, out=c1)
        torch.bitwise_and(pa, _M32, out=c3)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


# Random bits per dropout decision, as a count: thresholds lie in [0, DROPOUT_ONE].
DROPOUT_ONE = 1 << 16


def check_dropout_p(p: float, what: str = "dropout probability") -> float:
    """``p`` as a float, or ValueError unless ``0 ≤ p ≤ 1`` (``p = 1`` drops everything, as ``nn.Dropout(p=1)``)."""
    p = float(p)
    if not 0.0 <= p <= 1.0:  # (NaN fails too)
        raise ValueError(f"{what} must be in [0, 1], got {p}")
    return p


def dropout_threshold(p: float) -> int:
    """The keep threshold of dropout probability ``p``, in [0, 65536]: an element is kept when its 16 random bits
    are ≥ it. ``round(p · 65536)``, capped at 65535 for ``p < 1``, so that only ``p = 1`` drops everything (the
    rule in this module's docstring)."""
    p = check_dropout_p(p)
    if p == 1.0:
        return DROPOUT_ONE
    return min(int(round(p * DROPOUT_ONE)), DROPOUT_ONE - 1)


def dropout_keep_scale(threshold: int) -> float:
    """The factor kept elements are multiplied by under ``threshold``: ``65536 / (65536 − threshold)``, the inverse
    of the exact keep probability, so dropout is unbiased; 1.0 at threshold 0 (the identity), and 0.0 at 65536
    (nothing is kept: no division by zero, and the LoRA branch is exactly 0)."""
    threshold = int(threshold)
    if not 0 <= threshold <= DROPOUT_ONE:
        raise ValueError(f"dropout threshold must be in [0, {DROPOUT_ONE}], got {threshold}")
    return 0.0 if threshold == DROPOUT_ONE else DROPOUT_ONE / (DROPOUT_ONE - threshold)


def dropout_params(p: float) -> tuple[int, float]:
    """``(threshold, keep_scale)`` of dropout probability ``p``: what every backend (this reference, the Triton
    kernels, the mixed-adapter and 4-bit ops) drops and how it scales what it keeps."""
    threshold = dropout_threshold(p)
    return threshold, dropout_keep_scale(threshold)


def drops(p: float) -> bool:
    """Whether dropout of probability ``p`` changes anything (its threshold is not 0): ``p < 2⁻¹⁷`` is the
    identity (nothing dropped, nothing scaled) and needs no mask."""
    return dropout_threshold(p) > 0


def dropout_keep_rows(seed: int | torch.Tensor, rows: torch.Tensor, n_cols: int, p: float) -> torch.Tensor:
    """Keep-mask of the given rows (int64 indices), shape (len(rows), n_cols) — the kernels'
    ``keep_tile`` replayed: element (m, n) takes 16 bits from Philox counter
    ``(n // 8, m_lo, m_hi, 0)``.

    The kernel interleaves the words' low/high halves three times (``tl.interleave``);
    within a group of eight columns that gives the order lo0, lo2, lo1, lo3, hi0, hi2,
    hi1, hi3 — built here by one ``stack`` of booleans.
    """
    thr = dropout_threshold(p)
    rows = rows.to(torch.int64)[:, None]
    c0 = torch.arange((n_cols + 7) // 8, dtype=torch.int64, device=rows.device)[None, :].expand(rows.shape[0], -1)
    w0, w1, w2, w3 = philox4x32(seed, c0, (rows & _M32).expand_as(c0), (rows >> 32).expand_as(c0),
                                torch.zeros_like(c0))
    order = (w0, w2, w1, w3)
    keep = torch.stack([(w & 0xFFFF) >= thr for w in order] + [(w >> 16) >= thr for w in order], dim=-1)
    return keep.flatten(-2)[:, :n_cols]


def dropout_keep_mask(seed: int | torch.Tensor, n_rows: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (n_rows, n_cols) keep-mask under ``seed`` (rows generated in bounded chunks)."""
    out = torch.empty(n_rows, n_cols, dtype=torch.bool, device=device)
    step = max(1, _MASK_CHUNK_ELEMS // max(n_cols, 1))
    for r0 in range(0, n_rows, step):
        rows = torch.arange(r0, min(r0 + step, n_rows), dtype=torch.int64, device=device)
        out[r0 : r0 + step] = dropout_keep_rows(seed, rows, n_cols, p)
    return out


def masked(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``c · keep ⊙ t`` in t's dtype, ``c = dropout_params(p)[1]`` (``t`` itself when there is no mask)."""
    if keep is None:
        return t
    return torch.where(keep, t * dropout_params(p)[1], torch.zeros((), dtype=t.dtype, device=t.device))


def apply_dropout(x2d: torch.Tensor, seed, p: float) -> torch.Tensor:
    """``c · m ⊙ x`` in x's dtype, with the mask regenerated from ``seed`` (``x2d`` itself when nothing drops)."""
    if not drops(p):
        return x2d
    return masked(x2d, dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device), p)


def _base_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.t() if fan_in_fan_out else weight


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision merges, deltas and DoRA norms are computed in: float32, or float64 for a float64
    tensor (``t.float()`` would round a float64 model's merge to fp32 accuracy; peft stays in float64)."""
    return t if t.dtype == torch.float64 else t.float()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA branch is computed and ``xa`` kept in for input ``x``: float32 (the kernels' accumulator),
    or float64 for a float64 input (computed in float64 throughout, as ``nn.Linear`` and peft do: gradient checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lora_linear_forward(x2d, weight, bias, lora_A, lora_B, seed, scale: float, p: float, fan_in_fan_out: bool):
    """Reference forward on a 2-D input. Returns ``(y, xa)``; ``xa`` (N, r) is in :func:`acc_dtype` (fp32)."""
    acc = acc_dtype(x2d)
    w = _base_weight(weight, fan_in_fan_out).to(x2d.dtype)
    y = torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))
    xa = apply_dropout(x2d.to(acc), seed, p) @ lora_A.to(acc).t()
    y = (y.to(acc) + scale * (xa @ lora_B.to(acc).t())).to(x2d.dtype)
    return y, xa


def lora_linear_backward(dy, x2d, weight, lora_A, lora_B, xa, seed, scale: float, p: float, fan_in_fan_out: bool,
                         need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dbias: bool = False,
                         keep: torch.Tensor | None = None):
    """Reference backward. Returns ``(dx, dA, dB, dbias)`` with ``None`` for what is not needed. ``keep``: the
    forward's keep-mask when the caller already drew it (otherwise regenerated from ``seed``)."""
    acc = acc_dtype(x2d)
    w = _base_weight(weight, fan_in_fan_out).to(dy.dtype)
    dyf = dy.to(acc)
    dS = scale * (dyf @ lora_B.to(acc))  # (N, r)
    dx = dA = dB = dbias = None
    # The mask is regenerated once here and serves both dx and dA.
    if keep is None and drops(p) and (need_dx or need_dA):
        keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)

    if need_dx:
        lora_dx = masked(dS @ lora_A.to(acc), keep, p)
        dx = (dyf @ w.to(acc) + lora_dx).to(x2d.dtype) if dy.dtype == acc else \
            (dy @ w).to(acc).add_(lora_dx).to(x2d.dtype)
    if need_dA:
        dA = (dS.t() @ masked(x2d.to(acc), keep, p)).to(lora_A.dtype)
    if need_dB:
        dB = (scale * (dyf.t() @ xa.to(acc))).to(lora_B.dtype)
    if need_dbias:
        dbias = dyf.sum(0)
    return dx, dA, dB, dbias
