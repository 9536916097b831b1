"""Mixed-adapter LoRA (SGMV-style): every row reads the A/B of its own adapter by index.

The adapters of one batch are stacked, zero-padded to the largest rank ``R``::

    A_stack (n, R, in)       B_stack (n, out, R)       (padding rows/columns are zero)

and each row of the flattened input carries an adapter index (``-1`` = base only). The caller
sorts the rows by adapter once per call (``idx_s`` = sorted indices, ``perm`` = original row
of each sorted row, ``seg[a] .. seg[a+1]`` = the sorted rows of adapter ``a``), so a row block
almost always touches one adapter; a block straddling a boundary loops over its (two or three)
adapters. Results keep the caller's row order: loads and stores go through ``perm``.

Math per row ``m`` of adapter ``a`` (``s_a`` = scale, ``k_a`` = keep scale ``65536 / (65536 − thr_a)``, 0 at
``p_a = 1``: ``fastpeft.reference.dropout_params``; ``D_a`` = the keep-mask keyed by ``(seed, m, col)``
exactly as ``kernels/philox.py`` keys the core)::

    forward   xa[i] = k_a · D_a(x[m]) A_aᵀ              mixed_down     (i = sorted position of m)
              y[m] = x W0ᵀ + b  (cuBLAS / core GEMM)  + s_a · xa[i] B_aᵀ     mixed_up (in place)
    backward  dS[i] = s_a · dy[m] B_a                    mixed_down (no dropout)
              dx[m] = dy W0 + k_a · keep ⊙ (dS[i] A_a)   core GEMM + mixed_up with the mask
              dA_a = k_a · Σ_{i∈a} dS[i]ᵀ D(x[m])        mixed_reduce (segmented, split, no atomics)
              dB_a = s_a · Σ_{i∈a} dy[m]ᵀ xa[i]          mixed_reduce

``xa`` and ``dS`` live in sorted order (N, R) fp32. No Python loop over adapters: the adapter
of each row block comes from ``idx_s`` in the kernel, the segment bounds from ``seg`` on the
device (no host synchronization). The reductions split each adapter's segment into ``splits``
chunks whose fp32 partials are summed in a fixed order: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, down_configs, interpreting, keep_for_down, keep_for_rows, reduce_configs
from .lora_linear import (
    LAUNCHES,
    _block_r,
    _f32_exact_precision,
    _f32_precision,
    _launch,
    _m_key,
    _num_sms,
    _or,
    lora_gemm,
)
from .philox import keep_tile

# Larger than any adapter index: the empty minimum of a block of base rows.
_NO_ADAPTER = tl.constexpr(2147483647)


@triton.jit
def _block_adapters(idx_ptr, offs_m, m_ok):
    """Adapter indices of a block of sorted rows and the (lowest, highest) adapter among them."""
    a_rows = tl.load(idx_ptr + offs_m, mask=m_ok, other=-1)
    a_lo = tl.min(tl.where(a_rows >= 0, a_rows, _NO_ADAPTER), axis=0)
    a_hi = tl.max(a_rows, axis=0)
    return a_rows, a_lo, a_hi


@triton.jit
def _mixed_down_kernel(
    x_ptr, w_ptr, out_ptr, idx_ptr, perm_ptr, scale_ptr, thr_ptr, seed_ptr,
    M, K, R, M_KEY,
    stride_xm, stride_xk, stride_wa, stride_wr, stride_wk, stride_om, stride_or,
    DROPOUT: tl.constexpr, F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[i, R] = scale[a] · (keep_a ⊙ x[perm[i]]) · w[a, R, K]ᵀ in fp32, a = idx[i] (0 for a = -1)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    a_rows, a_lo, a_hi = _block_adapters(idx_ptr, offs_m, m_ok)
    rows = tl.load(perm_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    rr = offs_r.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for a in range(a_lo, a_hi + 1):
        sel = m_ok & (a_rows == a)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            if DROPOUT:
                thr = tl.load(thr_ptr + a)
            w_base = w_ptr + (tl.full((), 0, tl.int64) + a) * stride_wa  # int64 (a is a plain int when interpreted)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < K
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk.to(tl.int64)[None, :] * stride_xk,
                             mask=sel[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                if DROPOUT:
                    keep = keep_tile(seed, rows, k0, BLOCK_K, thr)
                    xt = tl.where(keep, xt, 0.0)
                wt = tl.load(w_base + rr[None, :] * stride_wr + kk.to(tl.int64)[:, None] * stride_wk,
                             mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(xt, wt, acc, input_precision=F32_PRECISION)
            total += acc * tl.load(scale_ptr + a)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or
    tl.store(out_ptrs, total, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _mixed_up_kernel(
    l_ptr, r_ptr, out_ptr, idx_ptr, perm_ptr, scale_ptr, thr_ptr, seed_ptr,
    M, N, R, M_KEY,
    stride_lm, stride_lr, stride_ra, stride_rr, stride_rn, stride_om, stride_on,
    DROPOUT: tl.constexpr, F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[perm[i], N] += scale[a] · keep_a ⊙ (l[i, R] · r[a, R, N]) in place, a = idx[i] ≥ 0
    (keep_a = dropout mask of element (perm[i], n) when DROPOUT; base rows are left untouched)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows, a_lo, a_hi = _block_adapters(idx_ptr, offs_m, m_ok)
    if a_lo <= a_hi:  # a block of base rows only has nothing to add
        rows = tl.load(perm_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        rn = offs_n.to(tl.int64)
        if DROPOUT:
            seed = tl.load(seed_ptr)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lm = offs_m.to(tl.int64)
        for a in range(a_lo, a_hi + 1):
            sel = m_ok & (a_rows == a)
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                r_base = r_ptr + (tl.full((), 0, tl.int64) + a) * stride_ra
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + offs_r
                    rk = rr < R
                    lt = tl.load(l_ptr + lm[:, None] * stride_lm + rr.to(tl.int64)[None, :] * stride_lr,
                                 mask=sel[:, None] & rk[None, :], other=0.0).to(tl.float32)
                    rt = tl.load(r_base + rr.to(tl.int64)[:, None] * stride_rr + rn[None, :] * stride_rn,
                                 mask=rk[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                    acc = tl.dot(lt, rt, acc, input_precision=F32_PRECISION)
                acc = acc * tl.load(scale_ptr + a)
                if DROPOUT:
                    keep = keep_tile(seed, rows, pid_n * BLOCK_N, BLOCK_N, tl.load(thr_ptr + a))
                    acc = tl.where(keep, acc, 0.0)
                total += acc
        io_mask = (m_ok & (a_rows >= 0))[:, None] & n_ok[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
        cur = tl.load(out_ptrs, mask=io_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (cur + total).to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _mixed_reduce_kernel(
    g_ptr, x_ptr, part_ptr, perm_ptr, seg_ptr, scale_ptr, thr_ptr, seed_ptr,
    K, R, SPLITS, M_KEY,
    stride_gm, stride_gr, stride_xm, stride_xk,
    stride_ps, stride_pa, stride_pr, stride_pk,
    DROPOUT: tl.constexpr, F32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[s, a, R, K] = scale[a] · Σ g[i, R]ᵀ (keep_a ⊙ x[perm[i], K]) over chunk s of adapter a's
    sorted rows ``seg[a] .. seg[a+1]`` (segmented reduction; partials summed by the caller)."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_as = tl.program_id(2)
    a = pid_as // SPLITS
    s = pid_as % SPLITS
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    rk = offs_k.to(tl.int64)
    seg_start = tl.load(seg_ptr + a)
    seg_end = tl.load(seg_ptr + a + 1)
    chunk = tl.cdiv(seg_end - seg_start, SPLITS)
    m_start = seg_start + s * chunk
    m_end = tl.minimum(seg_end, m_start + chunk)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        thr = tl.load(thr_ptr + a)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        rows = tl.load(perm_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        gt = tl.load(g_ptr + offs_m.to(tl.int64)[None, :] * stride_gm + offs_r.to(tl.int64)[:, None] * stride_gr,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            keep = keep_tile(seed, rows, pid_k * BLOCK_K, BLOCK_K, thr)
            xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(gt, xt, acc, input_precision=F32_PRECISION)
    acc = acc * tl.load(scale_ptr + a)
    p_ptrs = (part_ptr + s.to(tl.int64) * stride_ps + a.to(tl.int64) * stride_pa
              + offs_r.to(tl.int64)[:, None] * stride_pr + rk[None, :] * stride_pk)
    tl.store(p_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


def up_configs(interpret: bool | None = None) -> list[triton.Config]:
    """The per-row rank-r up-projection added in place (y += s·xa Bᵀ, dx += masked dS A)."""
    if interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bm, bn, s, w in [(64, 128, 3, 4), (128, 64, 3, 4), (128, 128, 3, 8), (64, 64, 4, 4),
                             (64, 256, 3, 8), (16, 128, 4, 4), (32, 128, 4, 4)]
    ]


_PRUNE = {"early_config_prune": keep_for_rows}
_down_tuned = triton.autotune(configs=down_configs(), key=["M_KEY", "K", "R", "DROPOUT"],
                              prune_configs_by={"early_config_prune": keep_for_down})(
    _mixed_down_kernel)
# out is updated in place: tuning runs must start from the same out each time.
_up_tuned = triton.autotune(configs=up_configs(), key=["M_KEY", "N", "R", "DROPOUT"], prune_configs_by=_PRUNE,
                            restore_value=["out_ptr"])(_mixed_up_kernel)
_reduce_tuned = triton.autotune(configs=reduce_configs(), key=["M_KEY", "K", "R", "SPLITS", "DROPOUT"])(
    _mixed_reduce_kernel)


def mixed_down(x, w, idx_s, perm, scale, *, thr=None, seed=None, dropout=False, config=None):
    """fp32 (M, R) in sorted row order: ``scale[a] · (keep_a ⊙ x[perm[i]]) · w[a]ᵀ`` with ``a = idx_s[i]``.

    ``w`` is (n, R, K) of any strides (``B_stack.transpose(1, 2)`` for ``dS = dy B``); ``scale`` and
    ``thr`` are per-adapter fp32 / int32 tensors. Rows of index -1 get zeros.
    """
    M, K = x.shape
    R = w.shape[1]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or R == 0:
        return out
    block_r = _block_r(R, 128)
    args = (x, w, out, idx_s, perm, scale, _or(thr, idx_s), _or(seed, perm), M, K, R, _m_key(M),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1))
    kwargs = dict(DROPOUT=bool(dropout), F32_PRECISION=_f32_exact_precision(x.dtype), BLOCK_R=block_r)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r))

    LAUNCHES["mixed_down"] += 1
    _launch(_down_tuned, _mixed_down_kernel, grid, args, kwargs, config)
    return out


def mixed_up_(out, l, r, idx_s, perm, scale, *, thr=None, seed=None, dropout=False, config=None):
    """In place: ``out[perm[i]] += scale[a] · keep_a ⊙ (l[i] · r[a])`` with ``a = idx_s[i] ≥ 0``.

    ``out`` (M, N) in the caller's row order, ``l`` (M, R) in sorted order, ``r`` (n, R, N) of any
    strides (``B_stack.transpose(1, 2)`` for y, ``A_stack`` for dx). Returns ``out``.
    """
    M, N = out.shape
    R = l.shape[1]
    if M == 0 or N == 0 or R == 0:
        return out
    args = (l, r, out, idx_s, perm, scale, _or(thr, idx_s), _or(seed, perm), M, N, R, _m_key(M),
            l.stride(0), l.stride(1), r.stride(0), r.stride(1), r.stride(2), out.stride(0), out.stride(1))
    kwargs = dict(DROPOUT=bool(dropout), F32_PRECISION=_f32_precision(out.dtype), BLOCK_R=_block_r(R, 32))

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))

    LAUNCHES["mixed_up"] += 1
    _launch(_up_tuned, _mixed_up_kernel, grid, args, kwargs, config)
    return out


def mixed_reduce(g, x, perm, seg, scale, n_adapters, *, thr=None, seed=None, dropout=False, transpose_out=False,
                 config=None):
    """Per-adapter fp32 ``scale[a] · Σ_{i∈a} g[i]ᵀ (keep_a ⊙ x[perm[i]])`` as (n, R, K), or (n, K, R)
    with ``transpose_out``. ``g`` (M, R) is in sorted order, ``x`` (M, K) in the caller's; ``seg``
    (n+1,) holds the adapters' sorted row bounds. Deterministic (fixed-order partial sums)."""
    M, K = x.shape
    R = g.shape[1]
    n = int(n_adapters)
    out_shape = (n, K, R) if transpose_out else (n, R, K)
    if M == 0 or n == 0 or R == 0 or K == 0:
        return torch.zeros(out_shape, device=x.device, dtype=torch.float32)
    block_r = _block_r(R, 64)
    tiles = cdiv(K, 64) * cdiv(R, block_r) * n
    splits = max(1, min(cdiv(M, 256 * n), (4 * _num_sms(x.device)) // max(tiles, 1)))
    part = torch.empty((splits, *out_shape), device=x.device, dtype=torch.float32)
    stride_pr, stride_pk = (part.stride(3), part.stride(2)) if transpose_out else (part.stride(2), part.stride(3))
    args = (g, x, part, perm, seg, scale, _or(thr, perm), _or(seed, perm), K, R, splits, _m_key(M),
            g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            part.stride(0), part.stride(1), stride_pr, stride_pk)
    kwargs = dict(DROPOUT=bool(dropout), F32_PRECISION=_f32_exact_precision(x.dtype), BLOCK_R=block_r)

    def grid(meta):
        return (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r), n * splits)

    LAUNCHES["mixed_reduce"] += 1
    _launch(_reduce_tuned, _mixed_reduce_kernel, grid, args, kwargs, config)
    return part[0] if splits == 1 else part.sum(0)


def _base(weight, fan_in_fan_out, dtype):
    w = weight.t() if fan_in_fan_out else weight
    return w if w.dtype == dtype else w.to(dtype)


def lora_mixed_forward(x2d, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, meta, fan_in_fan_out,
                       base_dtype=None):
    """Mixed-adapter forward on a 2-D input. Returns ``(y, xa)``, ``xa`` (M, R) fp32 in sorted order.

    ``meta`` = ``(scale, inv_keep, thr, dropout)``: per-adapter fp32, fp32, int32 tensors on x's device
    and whether any adapter drops. The base GEMM is cuBLAS on CUDA (the core's pointer GEMM in the
    interpreter); the rank-r term is added in place by ``mixed_up_``. ``base_dtype`` (fp32 x over a 16-bit
    base, the 4-bit layers' wide input): the base GEMM takes x rounded to it and writes y in x's dtype, the
    rank-r terms read the exact x.
    """
    scale, inv_keep, thr, dropout = meta
    w = _base(weight, fan_in_fan_out, base_dtype or x2d.dtype)
    xb = x2d if base_dtype is None else x2d.to(base_dtype)
    b = None if bias is None else (bias if bias.dtype == x2d.dtype else bias.to(x2d.dtype))
    xa = mixed_down(x2d, A_stack, idx_s, perm, inv_keep, thr=thr, seed=seed, dropout=dropout)
    y = lora_gemm(xb, w, b, out_dtype=x2d.dtype)
    mixed_up_(y, xa, B_stack.transpose(1, 2), idx_s, perm, scale)
    return y, xa


def lora_mixed_backward(dy, x2d, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, meta, fan_in_fan_out,
                        need_dx=True, need_dA=True, need_dB=True, need_dbias=False, base_dtype=None):
    """Mixed-adapter backward. Returns ``(dx, dA_stack, dB_stack, dbias)``; ``None`` where not needed.
    ``base_dtype`` as in ``lora_mixed_forward``: dx's base GEMM takes dy rounded to it."""
    scale, inv_keep, thr, dropout = meta
    n = A_stack.shape[0]
    dx = dA = dB = dbias = None
    dS = None
    if need_dx or need_dA:
        dS = mixed_down(dy, B_stack.transpose(1, 2), idx_s, perm, scale)
    if need_dx:
        dyb = dy if base_dtype is None else dy.to(base_dtype)
        dx = lora_gemm(dyb, _base(weight, fan_in_fan_out, dyb.dtype).t(), out_dtype=x2d.dtype)
        mixed_up_(dx, dS, A_stack, idx_s, perm, inv_keep, thr=thr, seed=seed, dropout=dropout)
    if need_dA:
        dA = mixed_reduce(dS, x2d, perm, seg, inv_keep, n, thr=thr, seed=seed, dropout=dropout).to(A_stack.dtype)
    if need_dB:
        dB = mixed_reduce(xa, dy, perm, seg, scale, n, transpose_out=True).to(B_stack.dtype)
    if need_dbias:
        dbias = dy.float().sum(0)
    return dx, dA, dB, dbias
