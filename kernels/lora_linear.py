"""Fused LoRA linear: Triton kernels and their launchers.

Math (``D`` = dropout with keep-mask ``m``, ``dS = scale · dy B``)::

    forward   xa = D(x) Aᵀ                       _lora_down_kernel     reads x once
              y  = x W0ᵀ + b + xa (scale·B)ᵀ      GEMM, rank-r term as one extra K step
    backward  dS = scale · dy B                   _lora_down_kernel     reads dy once
              dx = dy W0                           GEMM (cuBLAS on CUDA when p > 0)
                 + c · m ⊙ (dS A)                 added in place by the dA pass (p > 0),
                                                   or folded as one K step (p = 0)
              dA = dSᵀ D(x)                       _lora_reduce_kernel   reads x once
              dB = scale · dyᵀ xa, db = Σ dy      _lora_reduce_kernel   reads dy once

    D(x) = c · m ⊙ x with the keep scale c = 65536 / (65536 − threshold), the inverse of the exact
    keep probability (``fastpeft.reference.dropout_params``; c = 0 at p = 1, where nothing is kept).

The GEMM is ``lora_gemm_tma`` (persistent, TMA, Hopper) where it applies and
``_lora_gemm_kernel`` (pointer-based; Ampere, odd strides) elsewhere.

No mask is stored and nothing of size (N, out) or (N, in) is written besides
y and dx. Dropout decisions come from Philox keyed by ``(seed, column group,
row)`` (``kernels/philox.py``, eight 16-bit decisions per call): once in the
forward's down pass, once in the backward's dA pass — which, holding the mask
anyway, also adds dx's masked term. (TARGETS.md measured that term as a
second accumulator tile in the dgrad epilogue at +22–64 %, an in-place pass
at ≈ +12 %; ``FASTPEFT_DX_DROPOUT=epilogue`` keeps the epilogue variant,
with sliced epilogues in the TMA kernel, for measurement.)

Byte floor (bf16 x/dy, 4096×4096, N=8192; ../shared/TARGETS.md): the frozen
layer moves ≈ x + y + dy + dx; LoRA must add at least a read of x (down
pass), one of dy (dS/dB) and one of x (dA): ≈ 2N(2·in+out) bytes ≈ 192 MiB ≈
67 µs at 3 TB/s on ≈ 0.69 ms, a floor near 1.1×. This layout adds to that
one more read of dy (dS and dB read it separately) and, with dropout, one
read + write of dx in the dA pass.

All launchers take 2-D tensors of any strides, return fresh tensors (or
update ``dx`` in place where documented), and never synchronize. Offsets are
int64 throughout (tokens × features may exceed 2³¹).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from ..reference import dropout_keep_scale
from .configs import (
    REDUCE_ROW_UNIT,
    autotune_mode,
    cdiv,
    cuda_properties,
    down_configs,
    gemm_configs,
    interpreting,
    keep_for_down,
    keep_for_rows,
    next_pow2,
    reduce_configs,
)
from .lora_gemm_tma import _lora_gemm_tma_kernel, make_descriptors, tma_configs, tma_supported
from .philox import keep_tile
from .tiles import rank_r_update

# Number of launches per kernel name; tests use it to prove the kernels ran.
LAUNCHES: Counter = Counter()
# Set to the error text if the TMA kernel ever fails to compile/launch under FASTPEFT_GEMM=auto.
_TMA_STATE: dict = {"disabled": None}


@triton.jit
def _mma_operand(t, UPCAST: tl.constexpr):
    """Operand for ``tl.dot``. Triton's CPU interpreter multiplies bf16 wrongly,
    so interpreter runs upcast to fp32 here (and only here); compiled GPU code
    never takes this branch."""
    if UPCAST:
        return t.to(tl.float32)
    else:
        return t


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on,
    lora_scale, threshold, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, MASK_LORA: tl.constexpr,
    UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]) + lora_scale · l[M, R] · r[R, N],
    the LoRA product masked by the dropout mask of element (m, n) when MASK_LORA."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every load in bounds without a mask; stores are masked.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + rn[None, :] * stride_wn
    # int64 pointer steps: BLOCK_K · stride overflows int32 for a column-major x of > 2³¹/BLOCK_K rows.
    x_step = tl.full((), BLOCK_K, tl.int64) * stride_xk
    w_step = tl.full((), BLOCK_K, tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=F32_PRECISION)
        else:
            acc = tl.dot(_mma_operand(a, UPCAST), _mma_operand(b, UPCAST), acc)
        x_ptrs += x_step
        w_ptrs += w_step

    if HAS_LORA:
        if MASK_LORA:
            lora = rank_r_update(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), l_ptr, r_ptr, rm, rn, R,
                                 stride_lm, stride_lr, stride_rr, stride_rn, lora_scale,
                                 BLOCK_R, F32_PRECISION, tl.float32)
        else:
            # No dropout: the rank-r term is one more K step of the same accumulator.
            acc = rank_r_update(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn,
                                lora_scale, BLOCK_R, F32_PRECISION, tl.float32)
        if MASK_LORA:
            keep = keep_tile(tl.load(seed_ptr), offs_m.to(tl.int64), pid_n * BLOCK_N, BLOCK_N, threshold)
            acc += tl.where(keep, lora * inv_keep, 0.0)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_down_kernel(
    x_ptr, w_ptr, out_ptr, seed_ptr,
    M, K, R, M_KEY,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om, stride_or,
    out_scale, threshold,
    DROPOUT: tl.constexpr, F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, R] = out_scale · (keep ⊙ x)[M, K] · w[R, K]ᵀ in fp32 (keep = dropout mask of (m, k))."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    rm = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_r.to(tl.int64)[None, :] * stride_wr + offs_k[:, None].to(tl.int64) * stride_wk
    x_step = tl.full((), BLOCK_K, tl.int64) * stride_xk
    w_step = tl.full((), BLOCK_K, tl.int64) * stride_wk
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            keep = keep_tile(seed, rm, k0, BLOCK_K, threshold)
            xt = tl.where(keep, xt, 0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=F32_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step
    out_ptrs = out_ptr + rm[:, None] * stride_om + offs_r.to(tl.int64)[None, :] * stride_or
    tl.store(out_ptrs, acc * out_scale, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_reduce_kernel(
    g_ptr, x_ptr, part_ptr, bias_part_ptr, seed_ptr, a_ptr, dx_ptr,
    M, K, R, ROWS_PER_SPLIT, M_KEY,
    stride_gm, stride_gr, stride_xm, stride_xk,
    stride_ps, stride_pr, stride_pk, stride_bs,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    out_scale, threshold,
    DROPOUT: tl.constexpr, DBIAS: tl.constexpr, ADD_DX: tl.constexpr, F32_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[s, R, K] = out_scale · g[rows_s, R]ᵀ · (keep ⊙ x)[rows_s, K] over split s's rows;
    with DBIAS also bias_part[s, K] = Σ_rows x (the bias gradient when x is dy);
    with ADD_DX (one R block covers all of R) also dx += out_scale · keep ⊙ (g · a[R, K]) in place —
    the dropout-masked LoRA part of dx, added where the same mask is already at hand."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    rk = offs_k.to(tl.int64)
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = min(M, m_start + ROWS_PER_SPLIT)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if ADD_DX:
        at = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar + rk[None, :] * stride_ak,
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * out_scale
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        rm = offs_m.to(tl.int64)
        gt = tl.load(g_ptr + rm[None, :] * stride_gm + offs_r.to(tl.int64)[:, None] * stride_gr,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DBIAS:
            bacc += tl.sum(xt, axis=0)
        if DROPOUT:
            keep = keep_tile(seed, rm, pid_k * BLOCK_K, BLOCK_K, threshold)
            xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(gt, xt, acc, input_precision=F32_PRECISION)
        if ADD_DX:
            lora = tl.dot(tl.trans(gt), at, input_precision=F32_PRECISION)
            if DROPOUT:
                lora = tl.where(keep, lora, 0.0)
            dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
            io_mask = m_ok[:, None] & k_ok[None, :]
            dxt = tl.load(dx_ptrs, mask=io_mask, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, (dxt + lora).to(dx_ptr.dtype.element_ty), mask=io_mask)
    p_ptrs = part_ptr + pid_s * stride_ps + offs_r.to(tl.int64)[:, None] * stride_pr + rk[None, :] * stride_pk
    tl.store(p_ptrs, acc * out_scale, mask=r_ok[:, None] & k_ok[None, :])
    if DBIAS:
        if pid_r == 0:
            tl.store(bias_part_ptr + pid_s * stride_bs + rk, bacc, mask=k_ok)


_PRUNE = {"early_config_prune": keep_for_rows}
_gemm_tuned = triton.autotune(configs=gemm_configs(), key=["M_KEY", "N", "K", "R", "MASK_LORA"],
                              prune_configs_by=_PRUNE)(_lora_gemm_kernel)
_gemm_tma_tuned = triton.autotune(configs=tma_configs(), key=["M_KEY", "N", "K", "R", "MASK_LORA", "W_KN"])(
    _lora_gemm_tma_kernel)
_down_tuned = triton.autotune(configs=down_configs(), key=["M_KEY", "K", "R"],
                              prune_configs_by={"early_config_prune": keep_for_down})(
    _lora_down_kernel)
_reduce_tuned = triton.autotune(configs=reduce_configs(), key=["M_KEY", "K", "R"])(_lora_reduce_kernel)
# dx is updated in place: tuning runs must start from the same dx each time.
_reduce_dx_tuned = triton.autotune(configs=reduce_configs(), key=["M_KEY", "K", "R"], restore_value=["dx_ptr"])(
    _lora_reduce_kernel)


def _m_key(m: int) -> int:
    """Autotuning bucket for the token count: varying sequence lengths do not retune."""
    return 1 << max(0, (m - 1).bit_length())


def _launch(tuned, raw, grid, args, kwargs, config):
    if config is None:
        mode = autotune_mode()
        if mode == "tune":
            tuned[grid](*args, **kwargs)
            return
        if mode == "warm":
            _compile_pruned(tuned, raw, grid, args, kwargs)
        _launch_untuned(tuned, raw, grid, args, kwargs)
        return
    _pre_hook(config, raw, args, kwargs)
    raw[grid](*args, **kwargs, **config.all_kwargs())


def _pre_hook(config, raw, args, kwargs) -> None:
    """Run ``config``'s pre-hook (if any) on the launch's named arguments, as the autotuner does before a call."""
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(raw.arg_names, args)), **kwargs, **config.kwargs})


def _pruned(tuned, raw, args, kwargs) -> list:
    """The configs the autotuner would time for these arguments: its list after its own prune."""
    candidates = tuned.configs
    prune = getattr(tuned, "early_config_prune", None)
    if prune is not None:
        candidates = prune(candidates, {**dict(zip(raw.arg_names, args)), **kwargs}) or candidates
    return candidates


def _compile_pruned(tuned, raw, grid, args, kwargs):
    """``FASTPEFT_AUTOTUNE=warm``: compile (never launch) each config the autotuner would time, with the
    arguments it would pass, so each lands in Triton's on-disk cache under the key the timed run looks up.
    Each config's pre-hook runs first, as before the autotuner's timed call of it (the TMA configs set
    their descriptors' block shapes there: part of the compiled signature). A config that fails to
    compile is skipped, as the autotuner skips it (its timing is infinite)."""
    if not hasattr(raw, "warmup") or interpreting():  # the interpreter compiles nothing
        return
    for cfg in _pruned(tuned, raw, args, kwargs):
        try:
            _pre_hook(cfg, raw, args, kwargs)  # e.g. the TMA configs set their descriptors' block shapes
            raw.warmup(*args, grid=grid, **kwargs, **cfg.all_kwargs())
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            continue


def _launch_untuned(tuned, raw, grid, args, kwargs):
    """``FASTPEFT_AUTOTUNE=0``: the autotuner's own pruning, then the first config that fits the device
    (a config over the shared-memory or register limit raises OutOfResources, as the autotuner skips)."""
    candidates = _pruned(tuned, raw, args, kwargs)
    for i, cfg in enumerate(candidates):
        try:
            _launch(tuned, raw, grid, args, kwargs, cfg)
            return
        except OutOfResources:
            if i == len(candidates) - 1:
                raise


def _f32_precision(dtype: torch.dtype) -> str:
    """Precision of fp32-operand dots whose result lands in ``dtype``, the output's (the rank-r fold of the
    GEMMs, the up-projection): fp32 outputs follow torch's TF32 switch, as nn.Linear does (also for a
    half-precision x with an fp32 output, the QLoRA fp32-input path); half-precision outputs use TF32 (its
    10-bit mantissa is below the bf16/fp16 output's rounding)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _f32_exact_precision(dtype: torch.dtype) -> str:
    """Precision of fp32-operand dots with fp32 results (xa, dS, dA, dB): as accurate as peft's fp32
    LoRA branch. Half-precision activations use 3×TF32 (fp32-level accuracy on tensor cores; these
    passes are bandwidth-bound, so the extra MMAs are nearly free); one TF32 pass would leave dA/dB
    with ~2⁻¹¹ relative operand error. fp32 activations follow torch's TF32 switch."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32x3"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _block_r(r: int, cap: int) -> int:
    return min(max(16, next_pow2(r)), cap)


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or for an absent optional operand a stand-in pointer the kernel never reads
    (its constexpr flag is off)."""
    return stand_in if t is None else t


def _gemm_choice(impl: str | None) -> str:
    impl = (impl or os.environ.get("FASTPEFT_GEMM", "auto")).lower()
    if impl not in ("auto", "tma", "pointer", "cublas"):
        raise ValueError(f"FASTPEFT_GEMM must be auto, tma, pointer or cublas, got {impl!r}")
    return impl


def _use_cublas(x, impl: str | None, has_lora: bool) -> bool:
    impl = _gemm_choice(impl)
    return not has_lora and (impl == "cublas" or (impl == "auto" and x.device.type == "cuda"))


def gemm_impl(x, w, out, impl: str | None = None, has_lora: bool = True) -> str:
    """``"tma"`` (persistent TMA kernel, Hopper), ``"pointer"`` (any GPU) or ``"cublas"``.

    ``impl`` (or ``FASTPEFT_GEMM``) may force ``"pointer"``, ask for ``"tma"`` (which the
    interpreter also runs) or ``"cublas"`` (no rank-r term only). ``auto``: cuBLAS for a plain
    GEMM on CUDA (TARGETS.md: our best Triton GEMM trails it by 2–12 %), TMA on sm90+ with
    aligned operands, the pointer kernel otherwise.
    """
    if _use_cublas(x, impl, has_lora):
        return "cublas"
    impl = _gemm_choice(impl)
    if impl == "pointer" or not tma_supported(x, w, out):
        return "pointer"
    if impl == "auto" and (_TMA_STATE["disabled"] or x.shape[0] <= 32):
        return "pointer"  # few tokens: the pointer kernel has thin row tiles, the TMA configs do not
    if impl == "auto" and out.dtype != x.dtype:
        return "pointer"  # the TMA autotune key cannot see the output descriptor's dtype
    if impl == "auto" and x.dtype == torch.float32:
        # fp32 operands: the TMA configs are sized for 2-byte elements (most overflow shared memory in
        # fp32, each compiled before it fails); the pointer kernel's smaller tiles fit.
        return "pointer"
    if impl == "auto" and interpreting():
        return "pointer"
    return "tma"


def lora_gemm(x, w, bias=None, l=None, r=None, *, lora_scale=1.0, seed=None, threshold=0, inv_keep=1.0,
              mask_lora=False, out_dtype=None, config=None, impl=None):
    """``x[M,K] · w[N,K]ᵀ (+ bias) + lora_scale · l[M,R] · r[R,N]`` (masked by dropout when ``mask_lora``).

    ``w`` and ``r`` may be any strided views (pass ``W0.t()`` for the dgrad GEMM). ``impl``
    picks the kernel (see ``gemm_impl``); ``config`` forces one autotune config of it.
    """
    M, K = x.shape
    N = w.shape[0]
    has_lora = l is not None
    R = l.shape[1] if has_lora else 0
    if M > 0 and N > 0 and _use_cublas(x, impl, has_lora and R > 0):
        LAUNCHES["cublas"] += 1  # (a wider bias, e.g. an fp32 one beside 16-bit operands, is rounded to x's dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias).to(out_dtype or x.dtype)
    out = torch.empty(M, N, device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return out
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernels read the bias with unit stride
    l_ = l if has_lora else x
    r_ = r if has_lora else x
    chosen = gemm_impl(x, w, out, impl, has_lora and R > 0)
    if chosen == "tma":
        try:
            _lora_gemm_tma(x, w, bias, l_, r_, out, seed, R, has_lora, lora_scale, threshold, inv_keep,
                           mask_lora, config)
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a Triton/GPU combination the TMA kernel was never compiled on
            if _gemm_choice(impl) == "tma":
                raise
            _TMA_STATE["disabled"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"fastpeft: the TMA GEMM failed ({_TMA_STATE['disabled'][:300]}); using the "
                          "pointer-based kernel from now on (slower on Hopper). Please report this.",
                          RuntimeWarning, stacklevel=2)
    args = (x, w, _or(bias, x), l_, r_, out, _or(seed, x),
            M, N, K, R, _m_key(M),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            l_.stride(0), l_.stride(1), r_.stride(0), r_.stride(1),
            out.stride(0), out.stride(1),
            float(lora_scale), int(threshold), float(inv_keep))
    kwargs = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora and R > 0, MASK_LORA=bool(mask_lora),
                  UPCAST=_upcast(x.dtype), F32_PRECISION=_f32_precision(out.dtype), BLOCK_R=_block_r(R, 32))

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    LAUNCHES["lora_gemm"] += 1
    _launch(_gemm_tuned, _lora_gemm_kernel, grid, args, kwargs, config)
    return out


def _lora_gemm_tma(x, w, bias, l_, r_, out, seed, R, has_lora, lora_scale, threshold, inv_keep, mask_lora,
                   config):
    M, K = x.shape
    N = w.shape[0]
    x_d, w_d, out_d, w_kn = make_descriptors(x, w, out)
    num_sms = _num_sms(x.device)
    args = (x_d, w_d, out_d, _or(bias, x), l_, r_, _or(seed, x),
            M, N, K, R, _m_key(M),
            l_.stride(0), l_.stride(1), r_.stride(0), r_.stride(1),
            float(lora_scale), int(threshold), float(inv_keep))
    kwargs = dict(W_KN=w_kn, HAS_BIAS=bias is not None, HAS_LORA=has_lora and R > 0, MASK_LORA=bool(mask_lora),
                  UPCAST=_upcast(x.dtype), F32_PRECISION=_f32_precision(out.dtype), BLOCK_R=_block_r(R, 32),
                  NUM_SMS=num_sms)

    def grid(meta):
        return (min(num_sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    LAUNCHES["lora_gemm_tma"] += 1
    _launch(_gemm_tma_tuned, _lora_gemm_tma_kernel, grid, args, kwargs, config)


def lora_down(x, w, *, out_scale=1.0, seed=None, threshold=0, dropout=False, config=None):
    """fp32 ``out_scale · (keep ⊙ x)[M,K] · w[R,K]ᵀ`` — the skinny (M, R) projection."""
    M, K = x.shape
    R = w.shape[0]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0 or R == 0:
        return out
    block_r = _block_r(R, 128)
    args = (x, w, out, _or(seed, x), M, K, R, _m_key(M),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            float(out_scale), int(threshold))
    kwargs = dict(DROPOUT=bool(dropout), F32_PRECISION=_f32_exact_precision(x.dtype), BLOCK_R=block_r)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r))

    LAUNCHES["lora_down"] += 1
    _launch(_down_tuned, _lora_down_kernel, grid, args, kwargs, config)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_properties(device).multi_processor_count
    return 2


def reduce_can_add_dx(r: int) -> bool:
    """Whether ``lora_reduce(add_dx=...)`` applies: one program must see all of the rank."""
    return _block_r(r, 64) >= r


def lora_reduce(g, x, *, out_scale=1.0, seed=None, threshold=0, dropout=False, dbias=False,
                transpose_out=False, add_dx=None, config=None):
    """fp32 ``out_scale · g[M,R]ᵀ · (keep ⊙ x)[M,K]`` as (R, K), or (K, R) with ``transpose_out``;
    with ``dbias`` also returns ``Σ_rows x`` (K,). Rows are split across programs and the
    fp32 partials summed in a fixed order, so results are deterministic (no atomics).

    ``add_dx=(a, dx)`` also adds ``out_scale · keep ⊙ (g · a)`` into ``dx`` (M, K) in place
    (needs ``reduce_can_add_dx(R)``): the masked LoRA part of the input gradient.
    """
    M, K = x.shape
    R = g.shape[1]
    if add_dx is not None and not reduce_can_add_dx(R):
        raise ValueError(f"add_dx needs r ≤ 64, got r={R}")
    out_shape = (K, R) if transpose_out else (R, K)
    if M == 0:
        zeros = torch.zeros(out_shape, device=x.device, dtype=torch.float32)
        return zeros, (torch.zeros(K, device=x.device, dtype=torch.float32) if dbias else None)
    block_r = _block_r(R, 64)
    tiles = cdiv(K, 64) * cdiv(R, block_r)
    row_blocks = cdiv(M, REDUCE_ROW_UNIT)
    splits = max(1, min(row_blocks, (4 * _num_sms(x.device)) // max(tiles, 1)))
    rows_per_split = cdiv(row_blocks, splits) * REDUCE_ROW_UNIT
    splits = cdiv(M, rows_per_split)
    part = torch.empty((splits, *out_shape), device=x.device, dtype=torch.float32)
    stride_pr, stride_pk = (part.stride(2), part.stride(1)) if transpose_out else (part.stride(1), part.stride(2))
    bias_part = torch.empty(splits, K, device=x.device, dtype=torch.float32) if dbias else part
    a, dx = add_dx if add_dx is not None else (g, x)
    args = (g, x, part, bias_part, _or(seed, x), a, dx,
            M, K, R, rows_per_split, _m_key(M),
            g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            part.stride(0), stride_pr, stride_pk, bias_part.stride(0),
            a.stride(0), a.stride(1), dx.stride(0), dx.stride(1),
            float(out_scale), int(threshold))
    kwargs = dict(DROPOUT=bool(dropout), DBIAS=bool(dbias), ADD_DX=add_dx is not None,
                  F32_PRECISION=_f32_exact_precision(x.dtype), BLOCK_R=block_r)

    def grid(meta):
        return (cdiv(K, meta["BLOCK_K"]), cdiv(R, block_r), splits)

    LAUNCHES["lora_reduce"] += 1
    tuned = _reduce_dx_tuned if add_dx is not None else _reduce_tuned
    _launch(tuned, _lora_reduce_kernel, grid, args, kwargs, config)
    return part.sum(0), (bias_part.sum(0) if dbias else None)


def dx_dropout_mode() -> str:
    """Where dx's dropout-masked LoRA term is added: ``"reduce"`` (default; in the dA pass) or
    ``"epilogue"`` (in the dgrad GEMM's epilogue). ``FASTPEFT_DX_DROPOUT`` overrides."""
    mode = os.environ.get("FASTPEFT_DX_DROPOUT", "reduce").lower()
    if mode not in ("reduce", "epilogue"):
        raise ValueError(f"FASTPEFT_DX_DROPOUT must be reduce or epilogue, got {mode!r}")
    return mode


def _base_view(weight, fan_in_fan_out):
    """W0 as an (out, in) view: GPT-2's Conv1D stores (in, out)."""
    return weight.t() if fan_in_fan_out else weight


def lora_linear_forward(x2d, weight, bias, lora_A, lora_B, seed, scale, p, fan_in_fan_out, threshold):
    """Fused forward on a 2-D input. Returns ``(y, xa)`` with ``xa = D(x) Aᵀ`` in fp32.

    ``threshold`` is ``fastpeft.reference.dropout_threshold(p)`` (kept values are scaled by its exact keep scale,
    ``dropout_keep_scale(threshold)``; ``p`` itself is not read); ``seed`` an int64 tensor of one element on x's
    device (unused when the threshold is 0: nothing drops).
    """
    w = _base_view(weight, fan_in_fan_out)
    if w.dtype != x2d.dtype:
        w = w.to(x2d.dtype)
    dropout = threshold > 0
    # xa = D(x) Aᵀ  (the mask never leaves registers; the keep scale applied to the (N, r) result)
    xa = lora_down(x2d, lora_A, out_scale=dropout_keep_scale(threshold), seed=seed, threshold=threshold,
                   dropout=dropout)
    # y = x W0ᵀ + b + xa · (scale·B)ᵀ
    b = None if bias is None else (bias if bias.dtype == x2d.dtype else bias.to(x2d.dtype))
    y = lora_gemm(x2d, w, b, xa, lora_B.t(), lora_scale=scale)
    return y, xa


def lora_linear_backward(dy, x2d, weight, lora_A, lora_B, xa, seed, scale, p, fan_in_fan_out, threshold,
                         need_dx=True, need_dA=True, need_dB=True, need_dbias=False):
    """Fused backward. Returns ``(dx, dA, dB, dbias)``; entries not needed are ``None``. ``threshold`` as in
    ``lora_linear_forward``."""
    dropout = threshold > 0
    inv_keep = dropout_keep_scale(threshold)
    dx = dA = dB = dbias = None
    dS = None
    if need_dx or need_dA:
        # dS = scale · dy B   (N, r), fp32
        dS = lora_down(dy, lora_B.t(), out_scale=scale)
    # With dropout, the masked term of dx is added by the dA pass, which regenerates the same
    # mask anyway (TARGETS.md: a masked second tile in the GEMM epilogue cost 22–64 %, an
    # in-place pass ≈ 12 %); the GEMM is then plain.
    dx_in_reduce = need_dx and dropout and dx_dropout_mode() == "reduce" and reduce_can_add_dx(lora_A.shape[0])
    if need_dx:
        w = _base_view(weight, fan_in_fan_out)
        if w.dtype != dy.dtype:
            w = w.to(dy.dtype)
        if dx_in_reduce:
            # dx = dy W0   (+ c · m ⊙ (dS A) below)
            dx = lora_gemm(dy, w.t(), out_dtype=x2d.dtype)
        else:
            # dx = dy W0 + c · m ⊙ (dS A): W0 read through a transposed view, no copy.
            dx = lora_gemm(dy, w.t(), None, dS, lora_A, lora_scale=1.0, seed=seed, threshold=threshold,
                           inv_keep=inv_keep, mask_lora=dropout, out_dtype=x2d.dtype)
    if need_dA or dx_in_reduce:
        # dA = dSᵀ D(x)
        dA, _ = lora_reduce(dS, x2d, out_scale=inv_keep, seed=seed, threshold=threshold, dropout=dropout,
                            add_dx=(lora_A, dx) if dx_in_reduce else None)
        dA = dA.to(lora_A.dtype) if need_dA else None
    if need_dB or need_dbias:
        # dB = scale · dyᵀ xa  (written transposed), db = Σ_rows dy — one pass over dy
        dBf, dbias = lora_reduce(xa, dy, out_scale=scale, dbias=need_dbias, transpose_out=True)
        dB = dBf.to(lora_B.dtype) if need_dB else None
    return dx, dA, dB, dbias
