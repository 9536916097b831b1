"""Hopper path of the LoRA GEMM: persistent, TMA-fed, warp-specialized.

Same contract as ``lora_gemm`` in ``lora_linear.py`` (``out = x·wᵀ (+ bias) +
lora_scale · l·r``, the rank-r term masked by dropout when ``MASK_LORA``), but
with the main operands streamed by TMA descriptors into a persistent grid of
one program per SM. Why: ../shared/TARGETS.md measured on an H100 that a
pointer-based (tutorial) Triton GEMM runs at ~72 % of cuBLAS while a
persistent TMA kernel with warp specialization is within 2–12 %, and that the
rank-r term folded in as one extra K step costs ≈ 1–3 %.

The dropout-masked rank-r term (dgrad with p > 0) cannot be folded into the
accumulator — the mask applies to the product — and a second full (BM, BN)
accumulator spilled badly there (12× slower at 128×256). Here the epilogue is
cut into ``EPILOGUE_SPLIT`` column slices; each slice computes its own small
masked product, adds it, and is stored before the next one is computed.

Requirements checked by ``tma_supported``: compute capability ≥ 9 (or the
interpreter), unit stride on the last dim of x and out and on one dim of w,
16-byte aligned base pointers and row strides. Anything else takes the
pointer kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cuda_properties, interpreting
from .philox import keep_tile
from .tiles import rank_r_update

try:  # triton ≥ 3.3 (host-side descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path is used
    TensorDescriptor = None


@triton.jit
def _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue_slice(acc, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n,
                    M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
                    lora_scale, threshold, inv_keep,
                    HAS_BIAS: tl.constexpr, MASK_LORA: tl.constexpr, F32_PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    """Finish one (BLOCK_M, SLICE_N) slice: masked rank-r term, bias, cast, TMA store."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, SLICE_N)
    if MASK_LORA:
        lora = rank_r_update(tl.zeros((BLOCK_M, SLICE_N), dtype=tl.float32), l_ptr, r_ptr,
                             (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64), R,
                             stride_lm, stride_lr, stride_rr, stride_rn, lora_scale,
                             BLOCK_R, F32_PRECISION, tl.float32)
        keep = keep_tile(seed, offs_m.to(tl.int64), off_n, SLICE_N, threshold)
        acc += tl.where(keep, lora * inv_keep, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _lora_gemm_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, l_ptr, r_ptr, seed_ptr,
    M, N, K, R, M_KEY,
    stride_lm, stride_lr, stride_rr, stride_rn,
    lora_scale, threshold, inv_keep,
    W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, MASK_LORA: tl.constexpr,
    UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """out[M, N] = x[M, K]·w[N, K]ᵀ (+ bias) + lora_scale·l[M, R]·r[R, N] (masked when MASK_LORA).

    ``w_desc`` describes w as stored: (N, K) rows, or (K, N) rows when W_KN.
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    # A second tile counter for the epilogue keeps it independent of the pipelined
    # main loop (the Triton persistent-matmul tutorial does the same).
    tile_id_c = start_pid - NUM_SMS
    seed = 0
    if MASK_LORA:
        seed = tl.load(seed_ptr)
    FOLD_LORA: tl.constexpr = HAS_LORA and not MASK_LORA

    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = x_desc.load([off_m, off_k])
            if W_KN:
                b = w_desc.load([off_k, off_n])
            else:
                b = w_desc.load([off_n, off_k]).T
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            elif a.dtype == tl.float32:
                acc = tl.dot(a, b, acc, input_precision=F32_PRECISION)
            else:
                acc = tl.dot(a, b, acc)
        if FOLD_LORA:
            # No dropout on this side: the rank-r term is one more K step of the accumulator
            # (B pre-scaled), as measured in TARGETS.md.
            rm = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
            rn = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
            # bf16 operands for the fold (bf16 has fp32's range); fp16 would overflow for
            # |xa| > 65504, so fp16 and fp32 activations keep fp32 (TF32) operands.
            if UPCAST or x_desc.dtype != tl.bfloat16:
                acc = rank_r_update(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn,
                                    lora_scale, BLOCK_R, F32_PRECISION, tl.float32)
            else:
                acc = rank_r_update(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn,
                                    lora_scale, BLOCK_R, F32_PRECISION, x_desc.dtype)

        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if EPILOGUE_SPLIT == 1:
            _epilogue_slice(acc, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n, M, N, R,
                            stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                            HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, BLOCK_N)
        else:
            HALF: tl.constexpr = BLOCK_N // 2
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            if EPILOGUE_SPLIT == 2:
                _epilogue_slice(acc0, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, HALF)
                _epilogue_slice(acc1, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n + HALF, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, HALF)
            else:
                Q: tl.constexpr = BLOCK_N // 4
                acc00, acc01 = tl.split(tl.permute(tl.reshape(acc0, (BLOCK_M, 2, Q)), (0, 2, 1)))
                acc10, acc11 = tl.split(tl.permute(tl.reshape(acc1, (BLOCK_M, 2, Q)), (0, 2, 1)))
                _epilogue_slice(acc00, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, Q)
                _epilogue_slice(acc01, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n + Q, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, Q)
                _epilogue_slice(acc10, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n + 2 * Q, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, Q)
                _epilogue_slice(acc11, out_desc, bias_ptr, l_ptr, r_ptr, seed, off_m, off_n + 3 * Q, M, N, R,
                                stride_lm, stride_lr, stride_rr, stride_rn, lora_scale, threshold, inv_keep,
                                HAS_BIAS, MASK_LORA, F32_PRECISION, BLOCK_R, BLOCK_M, Q)


def set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: descriptors take their block shapes from the chosen config."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]
    nargs["out_desc"].block_shape = [bm, bn // nargs["EPILOGUE_SPLIT"]]


def tma_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Hopper configs around the one TARGETS.md measured (128×256×64, 3 stages, 8 warps, WS);
    4 stages at 128×256×64 ran out of shared memory there."""
    def cfg(bm, bn, bk, stages, warps, split, ws):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                              "EPILOGUE_SPLIT": split, "WARP_SPECIALIZE": ws},
                             num_stages=stages, num_warps=warps, pre_hook=set_block_shapes)

    if interpreting() if interpret is None else interpret:
        return [cfg(32, 64, 32, 1, 4, 2, False)]
    return [
        cfg(128, 256, 64, 3, 8, 1, True),
        cfg(128, 256, 64, 3, 8, 2, True),
        cfg(128, 256, 64, 3, 8, 4, True),
        cfg(128, 128, 64, 4, 8, 1, True),
        cfg(128, 128, 64, 4, 8, 2, True),
        cfg(128, 128, 128, 3, 8, 2, True),
        cfg(64, 128, 64, 4, 4, 1, False),
    ]


def _aligned(t: torch.Tensor, unit_dim: int) -> bool:
    other = 1 - unit_dim
    return (t.stride(unit_dim) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(other) * t.element_size()) % 16 == 0 and t.shape[other] > 0)


def tma_supported(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the TMA kernel can run on these (already shaped) operands."""
    if TensorDescriptor is None:
        return False
    if x.device.type == "cuda":
        if cuda_properties(x.device).major < 9:
            return False
    elif not interpreting():
        return False
    if x.dtype != w.dtype or x.element_size() not in (2, 4):
        return False
    return _aligned(x, 1) and _aligned(out, 1) and (_aligned(w, 1) or _aligned(w, 0))


def make_descriptors(x, w, out):
    """Host descriptors for x (M, K), w as stored, and out (M, N); returns (x_d, w_d, out_d, w_kn)."""
    w_kn = w.stride(1) != 1  # stored (K, N): describe wᵀ's rows
    w_stored = w.t() if w_kn else w
    dummy = [16, 16]  # replaced by set_block_shapes before launch
    return (TensorDescriptor.from_tensor(x, dummy), TensorDescriptor.from_tensor(w_stored, dummy),
            TensorDescriptor.from_tensor(out, dummy), w_kn)
