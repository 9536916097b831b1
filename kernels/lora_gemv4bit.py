"""Decode GEMV on 4-bit weights with the LoRA branch fused: Triton kernel and launchers.

Math (N ≤ 16 token rows, W (out, in) stored as 4-bit codes)::

    y = x Wᵀ + b + scale · xa Bᵀ          xa = D(x) Aᵀ (N, r) comes in precomputed (it is tiny)
    W[o, k] = (lut(q[o, k]) + shift) · mult
        bitsandbytes NF4/FP4:  lut = code[q] (16-entry fp32 table), shift = 0,
                               mult = absmax[f // blocksize] over the flattened index f = o·in + k
                               (double quantization: absmax = ncode[a8[i]] · nabsmax[i // 256] + offset)
        fastpeft int4:          lut = q, shift = −zero[o, g], mult = scale[o, g], g = k // group_size

Layouts. bitsandbytes packs the row-major flattened W two codes a byte, element 2i in the high
nibble and 2i+1 in the low one (checked against ``bitsandbytes.functional.dequantize_4bit``,
0.50.2); its blocks run over the flattened index, so with ``in % blocksize != 0`` a block
straddles two rows, and with an odd ``in`` a row starts in the middle of a byte. fastpeft's int4
packs each row on its own (``packed`` (out, ⌈in/2⌉), same nibble order) with per-row groups.

Bytes (TARGETS.md §3): at N = 1 the floor is the packed weight, ≈ 0.5 byte a weight plus the
scales (4096×14336 NF4 ≈ 30 MB ≈ 10 µs at 3 TB/s, against bf16 cuBLAS's 54 µs). So the kernel
reads each packed byte once, for all N rows of x (x is N×in, a few KB: L1/L2-resident), and
dequantizes in registers: the 16-entry table is a gather from a 64-byte table that stays in L1.
When a K step lies inside one scale block (every row starts on a block boundary and
BLOCK_K ≤ blocksize — the common case, e.g. in = 4096, blocksize 64) the scale is one load per
row and step, applied after the step's dot product; otherwise it is gathered per element.

N rows: N = 1…4 multiply and reduce in registers (a static loop over the rows, fp32); 5…16 pad
to 16 rows and use ``tl.dot`` with the dequantized tile in x's dtype (what bitsandbytes does:
dequantize to the compute dtype, then multiply). Larger N works, 16 rows a launch, but is not
what this kernel is for (use the GEMM). Accumulation is fp32 throughout.

Split-K: out alone gives too few programs at decode sizes (4096 rows / 64 = 64 programs for
132 SMs), so K is split across SPLIT_K programs. Each writes its fp32 partial to a workspace
and bumps a per-tile arrival counter; the last to arrive sums the SPLIT_K partials in split
order (so the result does not depend on arrival order: deterministic, no float atomics), adds
the bias and the LoRA term once, writes y and resets the counter for the next launch. One
launch, so the autotuner times the whole thing. The counters are a persistent zeroed int32
buffer per (device, stream); two launches running concurrently on different streams each get
their own.

Offsets that can pass 2³¹ (row · in) are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, interpreting, next_pow2
from .lora_linear import LAUNCHES, _f32_precision, _launch, _or, _upcast

QUANT_BNB = 0  # bitsandbytes NF4/FP4: code table + absmax over the flattened index
QUANT_INT4 = 1  # fastpeft group-wise int4: (q − zero) · scale per row group
MAX_N_PER_LAUNCH = 16


@triton.jit
def _operand(t, UPCAST: tl.constexpr):
    """``tl.dot`` operand; under the interpreter bf16 is upcast (its bf16 dot is wrong)."""
    if UPCAST:
        return t.to(tl.float32)
    else:
        return t


@triton.jit
def _nibble(q_ptr, e, ok):
    """The 4-bit code of flattened element ``e`` (high nibble for even ``e``)."""
    b = tl.load(q_ptr + (e >> 1), mask=ok, other=0).to(tl.int32)
    return tl.where((e & 1) == 0, b >> 4, b & 15)


@triton.jit
def _lut(q, code_ptr, QUANT: tl.constexpr):
    """Code value of 4-bit ``q``: a gather from the 16-entry table (bnb) or ``q`` itself (int4)."""
    if QUANT == 0:
        return tl.load(code_ptr + q)
    else:
        return q.to(tl.float32)


@triton.jit
def _scale_at(idx, s_ptr, z_ptr, ncode_ptr, nabs_ptr, noff_ptr, nested_offset,
              QUANT: tl.constexpr, NESTED: tl.constexpr, OFFSET_PTR: tl.constexpr, LOG_NBS: tl.constexpr):
    """(mult, shift) of scale entry ``idx``: ``w = (lut(q) + shift) · mult``."""
    if QUANT == 0:
        if NESTED:
            a = tl.load(s_ptr + idx).to(tl.int32)
            if OFFSET_PTR:
                off = tl.load(noff_ptr).to(tl.float32)
            else:
                off = nested_offset
            mult = tl.load(ncode_ptr + a).to(tl.float32) * tl.load(nabs_ptr + (idx >> LOG_NBS)).to(tl.float32) + off
        else:
            mult = tl.load(s_ptr + idx).to(tl.float32)
        shift = tl.zeros_like(mult)
    else:
        mult = tl.load(s_ptr + idx).to(tl.float32)
        shift = -tl.load(z_ptr + idx).to(tl.float32)
    return mult, shift


@triton.jit
def _rows_dot(acc, x_ptr, N, stride_xn, stride_xk, offs_n, n_ok, k_even, ok0, ok1, w0, w1, mult,
              PER_ROW: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """``acc[n, o] += Σ_j x[n, k_even[j]] · w0[o, j] + x[n, k_even[j] + 1] · w1[o, j]`` (× mult[o] when PER_ROW);
    for one row (BLOCK_N = 1) ``acc`` is (BLOCK_OUT, BLOCK_K/2) and the sum over j is left to the caller."""
    ke = k_even.to(tl.int64) * stride_xk
    if USE_DOT:
        rn = offs_n.to(tl.int64) * stride_xn
        x0 = tl.load(x_ptr + rn[:, None] + ke[None, :], mask=n_ok[:, None] & ok0[None, :], other=0.0)
        x1 = tl.load(x_ptr + rn[:, None] + ke[None, :] + stride_xk, mask=n_ok[:, None] & ok1[None, :], other=0.0)
        if x0.dtype == tl.float32:
            part = tl.dot(x0, tl.trans(w0), input_precision=F32_PRECISION)
            part = tl.dot(x1, tl.trans(w1), part, input_precision=F32_PRECISION)
        else:
            part = tl.dot(_operand(x0, UPCAST), _operand(tl.trans(w0.to(x0.dtype)), UPCAST))
            part = tl.dot(_operand(x1, UPCAST), _operand(tl.trans(w1.to(x1.dtype)), UPCAST), part)
        if PER_ROW:
            part = part * mult[None, :]
        acc += part
    elif BLOCK_N == 1:
        # acc is the (BLOCK_OUT, BLOCK_K/2) tile of per-lane partial sums: no reduction and no
        # layout change in the loop; the kernel reduces it once after the last step.
        x0 = tl.load(x_ptr + ke, mask=ok0, other=0.0).to(tl.float32)  # N ≥ 1: row 0 exists
        x1 = tl.load(x_ptr + ke + stride_xk, mask=ok1, other=0.0).to(tl.float32)
        part = w0 * x0[None, :] + w1 * x1[None, :]
        if PER_ROW:
            part = part * mult[:, None]
        acc += part
    else:
        for n in tl.static_range(BLOCK_N):
            xn = x_ptr + n * stride_xn
            row_ok = (k_even * 0 + n) < N  # a tensor: the interpreter rejects a scalar mask here
            x0 = tl.load(xn + ke, mask=ok0 & row_ok, other=0.0).to(tl.float32)
            x1 = tl.load(xn + ke + stride_xk, mask=ok1 & row_ok, other=0.0).to(tl.float32)
            part = tl.sum(w0 * x0[None, :] + w1 * x1[None, :], axis=1)
            if PER_ROW:
                part = part * mult
            acc += tl.where(offs_n[:, None] == n, part[None, :], 0.0)
    return acc


@triton.jit
def _epilogue(acc, offs_n, n_ok, offs_o, o_ok, ro, bias_ptr, xa_ptr, lb_ptr, y_ptr, N, R,
              stride_an, stride_ar, stride_bo, stride_br, stride_yn, stride_yo, lora_scale,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, USE_DOT: tl.constexpr,
              F32_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """``y = acc + bias + lora_scale · xa Bᵀ`` for this tile, stored in y's dtype."""
    if HAS_LORA:
        rn = (offs_n % N).to(tl.int64)  # wrapped: in bounds, the extra rows are not stored
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_ok = offs_r < R - r0
            rr = (r0 + offs_r).to(tl.int64)
            a = tl.load(xa_ptr + rn[:, None] * stride_an + rr[None, :] * stride_ar, mask=r_ok[None, :], other=0.0)
            b = tl.load(lb_ptr + ro[:, None] * stride_bo + rr[None, :] * stride_br, mask=r_ok[None, :], other=0.0)
            a = a.to(tl.float32)
            b = b.to(tl.float32) * lora_scale
            if USE_DOT:
                acc = tl.dot(a, tl.trans(b), acc, input_precision=F32_PRECISION)
            else:
                acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ro).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * stride_yn + offs_o.to(tl.int64)[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & o_ok[None, :])


@triton.jit
def _gemv4_kernel(
    x_ptr, q_ptr, code_ptr, s_ptr, z_ptr, ncode_ptr, nabs_ptr, noff_ptr, bias_ptr, xa_ptr, lb_ptr,
    ws_ptr, cnt_ptr, y_ptr,
    N, OUT, IN, R, ROW_ELEMS, ROW_BYTES, SCALE_ROW_ELEMS,
    stride_xn, stride_xk, stride_an, stride_ar, stride_bo, stride_br, stride_yn, stride_yo, stride_ws,
    nested_offset, lora_scale,
    QUANT: tl.constexpr, LOG_BS: tl.constexpr, LOG_NBS: tl.constexpr, NESTED: tl.constexpr,
    OFFSET_PTR: tl.constexpr, ROW_ALIGNED: tl.constexpr, EVEN_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """y[N, OUT] = x[N, IN] · W[OUT, IN]ᵀ (+ bias) (+ lora_scale · xa · Bᵀ), W dequantized from 4-bit codes.

    Program (pid_o, pid_k): rows pid_o·BLOCK_OUT…, K steps pid_k·steps_per… of BLOCK_K elements.
    ROW_ELEMS / SCALE_ROW_ELEMS: a row's first element in the code / scale index space
    (bnb: both ``in``; int4: 2 · packed row stride and scale row stride · group size); the scale
    of element (o, k) is ``(o · SCALE_ROW_ELEMS + k) >> LOG_BS``. EVEN_ROWS: rows start on a byte
    (ROW_BYTES = ROW_ELEMS / 2). ROW_ALIGNED: rows start on a scale block. EVEN_K: every split
    holds whole, full K steps (no masks on K).
    """
    BKH: tl.constexpr = BLOCK_K // 2
    USE_DOT: tl.constexpr = BLOCK_N >= 16
    # One scale per row and step: the step lies in one block, applied after the step's product.
    PER_ROW: tl.constexpr = ROW_ALIGNED and (BLOCK_K <= (1 << LOG_BS))
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    o_ok = offs_o < OUT
    ro = (offs_o % OUT).to(tl.int64)  # wrapped rows: loads need no row mask, stores are masked
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kh = tl.arange(0, BKH)

    row_e = ro * ROW_ELEMS
    row_s = ro * SCALE_ROW_ELEMS
    s_base = row_s >> LOG_BS
    s_rem = (row_s & ((1 << LOG_BS) - 1)).to(tl.int32)

    total_steps = tl.cdiv(IN, BLOCK_K)
    steps_per = tl.cdiv(total_steps, SPLIT_K)
    first = pid_k * steps_per
    my_steps = tl.minimum(steps_per, total_steps - first)

    if BLOCK_N == 1:
        acc_in = tl.zeros((BLOCK_OUT, BKH), dtype=tl.float32)
    else:
        acc_in = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
    for kk in range(0, my_steps):
        t = first + kk
        k0 = t * BLOCK_K
        k_even = k0 + 2 * kh
        if EVEN_K:
            ok0 = kh < BKH
            ok1 = ok0
        else:
            ok0 = k_even < IN
            ok1 = k_even + 1 < IN
        # the codes of elements k_even (w0) and k_even + 1 (w1)
        if EVEN_ROWS:
            byte_ptrs = q_ptr + (ro * ROW_BYTES)[:, None] + (t * BKH + kh)[None, :]
            if EVEN_K:
                byte = tl.load(byte_ptrs).to(tl.int32)
            else:
                byte = tl.load(byte_ptrs, mask=ok0[None, :], other=0).to(tl.int32)
            q0 = byte >> 4
            q1 = byte & 15
        else:
            e0 = row_e[:, None] + k_even[None, :]
            q0 = _nibble(q_ptr, e0, ok0[None, :])
            q1 = _nibble(q_ptr, e0 + 1, ok1[None, :])
        if PER_ROW:
            mult, shift = _scale_at(s_base + (k0 >> LOG_BS), s_ptr, z_ptr, ncode_ptr, nabs_ptr, noff_ptr,
                                    nested_offset, QUANT, NESTED, OFFSET_PTR, LOG_NBS)
            if QUANT == 0:
                w0 = _lut(q0, code_ptr, QUANT)
                w1 = _lut(q1, code_ptr, QUANT)
            else:
                w0 = _lut(q0, code_ptr, QUANT) + shift[:, None]
                w1 = _lut(q1, code_ptr, QUANT) + shift[:, None]
        else:
            # Scale indices of the tail step's columns past IN are clamped to the row's last column: their
            # x is masked to 0, but an out-of-range scale read could be NaN/Inf (NaN·0) or unmapped.
            if EVEN_K:
                k_s0 = k_even
                k_s1 = k_even + 1
            else:
                k_s0 = tl.minimum(k_even, IN - 1)
                k_s1 = tl.minimum(k_even + 1, IN - 1)
            sk = s_rem[:, None] + k_s0[None, :]
            mult0, shift0 = _scale_at(s_base[:, None] + (sk >> LOG_BS), s_ptr, z_ptr, ncode_ptr, nabs_ptr,
                                      noff_ptr, nested_offset, QUANT, NESTED, OFFSET_PTR, LOG_NBS)
            w0 = (_lut(q0, code_ptr, QUANT) + shift0) * mult0
            if EVEN_ROWS:  # k_even and k_even + 1 share a block (an even start, an even block size)
                w1 = (_lut(q1, code_ptr, QUANT) + shift0) * mult0
            else:
                mult1, shift1 = _scale_at(s_base[:, None] + ((s_rem[:, None] + k_s1[None, :]) >> LOG_BS), s_ptr,
                                          z_ptr, ncode_ptr, nabs_ptr, noff_ptr, nested_offset, QUANT, NESTED,
                                          OFFSET_PTR, LOG_NBS)
                w1 = (_lut(q1, code_ptr, QUANT) + shift1) * mult1
            mult = mult0
        acc_in = _rows_dot(acc_in, x_ptr, N, stride_xn, stride_xk, offs_n, n_ok, k_even, ok0, ok1, w0, w1, mult,
                        PER_ROW, USE_DOT, UPCAST, F32_PRECISION, BLOCK_N)
    if BLOCK_N == 1:
        acc = tl.sum(acc_in, axis=1)[None, :]
    else:
        acc = acc_in

    if SPLIT_K == 1:
        _epilogue(acc, offs_n, n_ok, offs_o, o_ok, ro, bias_ptr, xa_ptr, lb_ptr, y_ptr, N, R,
                  stride_an, stride_ar, stride_bo, stride_br, stride_yn, stride_yo, lora_scale,
                  HAS_BIAS, HAS_LORA, USE_DOT, F32_PRECISION, BLOCK_R)
    else:
        # Partial to the workspace (SPLIT_K, N, OUT); the last program of this row tile reduces.
        ws_tile = offs_n.to(tl.int64)[:, None] * OUT + offs_o[None, :]
        io_mask = n_ok[:, None] & o_ok[None, :]
        tl.store(ws_ptr + pid_k * stride_ws + ws_tile, acc, mask=io_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + pid_o, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # fixed order: the sum does not depend on who came last
                total += tl.load(ws_ptr + s * stride_ws + ws_tile, mask=io_mask, other=0.0, cache_modifier=".cg")
            _epilogue(total, offs_n, n_ok, offs_o, o_ok, ro, bias_ptr, xa_ptr, lb_ptr, y_ptr, N, R,
                      stride_an, stride_ar, stride_bo, stride_br, stride_yn, stride_yo, lora_scale,
                      HAS_BIAS, HAS_LORA, USE_DOT, F32_PRECISION, BLOCK_R)
            tl.store(cnt_ptr + pid_o, 0)  # ready for the next launch


# ------------------------------------------------------------------------------------- configs
def _gcfg(bo, bk, split, warps, stages=2):
    return triton.Config({"BLOCK_OUT": bo, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


def gemv4bit_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Autotuning configs of the 4-bit GEMV (BLOCK_OUT rows × BLOCK_K columns a step, SPLIT_K splits of K).

    Sized for bandwidth at N = 1: a step loads BLOCK_OUT·BLOCK_K/2 packed bytes, 8–16 a thread
    (one 16-byte load); with 32 bytes a thread (128×64 on 4 warps, 64×128 on 4) ptxas (sm90,
    CUDA 13.4 via triton 3.9, same kernel) went to 168–255 registers and, at BLOCK_K ≥ 128, spilled
    (12–470 bytes; the fp32 dot path at N > 4 spilled kilobytes), so those are out. BLOCK_OUT ×
    SPLIT_K spans 256–1792 programs on 4096 or 14336 output rows (132 SMs, several programs
    resident per SM at ≤ 128 registers). BLOCK_K = 64 first: with bitsandbytes' default blocksize
    of 64 only those apply the scale once per row and step (``_prune`` keeps them); the wider
    steps serve larger blocksizes and int4's groups of 128. The interpreter gets one small config
    that still splits K, so the split path and its reduction are what the CPU tests run.
    """
    if interpreting() if interpret is None else interpret:
        return [_gcfg(16, 32, 2, 4, 1)]
    return [
        _gcfg(64, 64, 4, 4),
        _gcfg(64, 64, 8, 4),
        _gcfg(32, 64, 8, 4),
        _gcfg(128, 64, 4, 8),
        _gcfg(64, 64, 2, 4),
        _gcfg(64, 64, 1, 4),
        _gcfg(32, 128, 4, 4),
        _gcfg(16, 256, 4, 4),
    ]


def _arg(named_args: dict, kwargs: dict, name: str):
    return named_args[name] if name in named_args else kwargs[name]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs that suit the shape: steps inside one scale block where rows are aligned
    (one scale load per row and step instead of one per element), and no more splits than K steps."""
    k = _arg(named_args, kwargs, "IN")
    bs = 1 << _arg(named_args, kwargs, "LOG_BS")
    kept = configs
    if _arg(named_args, kwargs, "ROW_ALIGNED"):
        kept = [c for c in kept if c.kwargs["BLOCK_K"] <= bs] or kept
    if _arg(named_args, kwargs, "BLOCK_N") >= 16:  # the tl.dot path spills at BLOCK_K ≥ 128
        kept = [c for c in kept if c.kwargs["BLOCK_K"] <= 64] or kept
    kept = [c for c in kept if cdiv(k, c.kwargs["BLOCK_K"]) >= c.kwargs["SPLIT_K"]] or kept[:1]
    return kept


def _even_k(args: dict) -> bool:
    return args["IN"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


# Not keyed on the LoRA term or the bias: they run once per tile, after the K loop.
_KEY = ["OUT", "IN", "BLOCK_N", "QUANT", "LOG_BS", "NESTED", "ROW_ALIGNED", "EVEN_ROWS"]
_gemv4_heur = triton.heuristics({"EVEN_K": _even_k})(_gemv4_kernel)
_gemv4_tuned = triton.autotune(configs=gemv4bit_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _gemv4_heur)

# Arrival counters of the split-K reduction, per (device, stream); the kernel leaves them at zero.
_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


# ------------------------------------------------------------------------------------ launchers
def _log2_pow2(v: int, what: str) -> int:
    v = int(v)
    if v <= 0 or v & (v - 1):
        raise ValueError(f"{what} must be a power of two, got {v}")
    return v.bit_length() - 1


def _check_common(x2d, out_features, in_features, bias, xa, lora_B):
    if x2d.dim() != 2 or x2d.shape[1] != in_features:
        raise ValueError(f"x2d must be (N, {in_features}), got {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x2d must be fp32, fp16 or bf16, got {x2d.dtype}")
    if (xa is None) != (lora_B is None):
        raise ValueError("xa and lora_B go together: pass both or neither")
    if xa is not None and (xa.dim() != 2 or lora_B.dim() != 2 or xa.shape[0] != x2d.shape[0]
                           or lora_B.shape != (out_features, xa.shape[1])):
        raise ValueError(f"LoRA shapes: xa must be (N, r) and lora_B ({out_features}, r), got "
                         f"{tuple(xa.shape)} and {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")


def _run(x2d, q, code, s, z, ncode, nabs, noff, bias, xa, lora_B, scale, out_features, in_features, *,
         quant, log_bs, log_nbs, nested, nested_offset, row_elems, scale_row_elems, row_aligned, config,
         out_dtype=None):
    n_rows = x2d.shape[0]
    y = torch.empty(n_rows, out_features, device=x2d.device, dtype=out_dtype or x2d.dtype)
    if n_rows == 0 or out_features == 0:
        return y
    has_lora = xa is not None and xa.shape[1] > 0
    offset_ptr = isinstance(nested_offset, torch.Tensor)
    if bias is not None:
        bias = bias.contiguous()  # read with unit stride
    splits = [config] if config is not None else _gemv4_tuned.configs
    max_split = max(c.kwargs["SPLIT_K"] for c in splits)
    counters = _counters(x2d.device, cdiv(out_features, 16))
    for n0 in range(0, n_rows, MAX_N_PER_LAUNCH):  # meant for N ≤ 16: one launch
        xs = x2d[n0:n0 + MAX_N_PER_LAUNCH]
        ys = y[n0:n0 + MAX_N_PER_LAUNCH]
        n = xs.shape[0]
        block_n = next_pow2(n) if n <= 4 else 16
        xas = xa[n0:n0 + MAX_N_PER_LAUNCH] if has_lora else xs
        lb = lora_B if has_lora else xs
        ws = torch.empty(max_split, n, out_features, device=x2d.device, dtype=torch.float32) if max_split > 1 else y
        args = (xs, q, _or(code, s), s, _or(z, s), _or(ncode, s), _or(nabs, s),
                nested_offset if offset_ptr else s, _or(bias, s), xas, lb, ws, counters, ys,
                n, out_features, in_features, xa.shape[1] if has_lora else 0,
                row_elems, row_elems // 2, scale_row_elems,
                xs.stride(0), xs.stride(1), xas.stride(0), xas.stride(1), lb.stride(0), lb.stride(1),
                ys.stride(0), ys.stride(1), ws.stride(0) if max_split > 1 else 0,
                0.0 if offset_ptr else float(nested_offset), float(scale))
        kwargs = dict(QUANT=quant, LOG_BS=log_bs, LOG_NBS=log_nbs, NESTED=nested, OFFSET_PTR=offset_ptr,
                      ROW_ALIGNED=row_aligned, EVEN_ROWS=row_elems % 2 == 0, HAS_BIAS=bias is not None,
                      HAS_LORA=has_lora, UPCAST=_upcast(xs.dtype), F32_PRECISION=_f32_precision(ys.dtype),
                      BLOCK_N=block_n, BLOCK_R=16)

        def grid(meta):
            return (cdiv(out_features, meta["BLOCK_OUT"]), meta["SPLIT_K"])

        LAUNCHES["lora_gemv_4bit" if quant == QUANT_BNB else "lora_gemv_int4"] += 1
        _launch(_gemv4_tuned, _gemv4_heur, grid, args, kwargs, config)
    return y


def lora_gemv_4bit(x2d, packed, absmax, code, blocksize, out_features, in_features, *, nested_code=None,
                   nested_absmax=None, nested_blocksize=256, nested_offset=0.0, bias=None, xa=None, lora_B=None,
                   scale=1.0, config=None, out_dtype=None):
    """``y = x2d Wᵀ + bias + scale · xa lora_Bᵀ`` with W (out, in) in bitsandbytes' NF4/FP4 layout.

    ``packed``: the quantized bytes (any shape, e.g. bnb's (n, 1); uint8 or another
    ``quant_storage`` dtype viewed as bytes), two codes a byte, high nibble first, over the
    row-major flattened W; ``code`` the 16-entry table; ``absmax`` one scale per ``blocksize``
    flattened elements — fp32, or uint8 with double quantization (``nested_code``,
    ``nested_absmax``, ``nested_blocksize``, ``nested_offset`` = bnb's ``state2.code``,
    ``state2.absmax``, ``state2.blocksize``, ``offset``; the offset may be a one-element tensor,
    read on the device, so no sync). ``xa`` (N, r) and ``lora_B`` (out, r): both or neither.
    Meant for N ≤ 16 (decode); larger N runs 16 rows a launch. ``config`` forces one autotune
    config. Returns y (N, out) in x2d's dtype, or ``out_dtype`` (e.g. fp32 from a bf16 x: the fp32
    accumulator stored as it is — a QLoRA layer's fp32 input after its base product's rounding). Example::

        q, st = bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        y = lora_gemv_4bit(x, q, st.absmax, st.code, st.blocksize, *w.shape)
    """
    _check_common(x2d, out_features, in_features, bias, xa, lora_B)
    log_bs = _log2_pow2(blocksize, "blocksize")
    if (nested_code is None) != (nested_absmax is None):
        raise ValueError("double quantization needs both nested_code and nested_absmax")
    nested = nested_code is not None
    numel = out_features * in_features
    q = packed.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.contiguous().view(torch.uint8)
    if q.numel() < (numel + 1) // 2:
        raise ValueError(f"packed holds {q.numel()} bytes, W ({out_features}×{in_features}) needs {(numel + 1) // 2}")
    absmax = absmax.reshape(-1)
    if absmax.numel() < cdiv(numel, blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {cdiv(numel, blocksize)}")
    if nested and absmax.dtype != torch.uint8:
        raise TypeError(f"with double quantization absmax holds uint8 codes, got {absmax.dtype}")
    if code.numel() < 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")
    ncode = nabs = None
    log_nbs = 0
    if nested:
        log_nbs = _log2_pow2(nested_blocksize, "nested_blocksize")
        ncode = nested_code.reshape(-1).float()
        nabs = nested_absmax.reshape(-1).float()
        if isinstance(nested_offset, torch.Tensor):
            nested_offset = nested_offset.reshape(-1).float()
    return _run(x2d, q, code.reshape(-1).float(), absmax, None, ncode, nabs, nested_offset, bias, xa, lora_B,
                scale, out_features, in_features, quant=QUANT_BNB, log_bs=log_bs, log_nbs=log_nbs, nested=nested,
                nested_offset=nested_offset, row_elems=in_features, scale_row_elems=in_features,
                row_aligned=in_features % blocksize == 0, config=config, out_dtype=out_dtype)


def lora_gemv_int4(x2d, packed, scales, zeros, group_size, out_features, in_features, *, bias=None, xa=None,
                   lora_B=None, scale=1.0, config=None, out_dtype=None):
    """``y = x2d Wᵀ + bias + scale · xa lora_Bᵀ`` with W in fastpeft's group-wise int4 layout.

    ``packed`` uint8 (out, ⌈in/2⌉): element 2j of a row in the high nibble of byte j, 2j+1 in
    the low one; ``scales`` (fp16) and ``zeros`` (uint8, 0…15) (out, ⌈in/group_size⌉);
    ``W[o, k] = (q − zeros[o, g]) · scales[o, g]`` in fp32, g = k // group_size. Meant for
    N ≤ 16 (decode). ``config`` forces one autotune config; ``out_dtype`` as ``lora_gemv_4bit``. Example::

        y = lora_gemv_int4(x, packed, scales, zeros, 128, out_features, in_features, xa=xa, lora_B=B, scale=2.0)
    """
    _check_common(x2d, out_features, in_features, bias, xa, lora_B)
    log_gs = _log2_pow2(group_size, "group_size")
    groups = cdiv(in_features, group_size)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != out_features \
            or packed.shape[1] < (in_features + 1) // 2:
        raise ValueError(f"packed must be uint8 ({out_features}, {(in_features + 1) // 2}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dim() != 2 or t.shape[0] != out_features or t.shape[1] < groups:
            raise ValueError(f"{name} must be ({out_features}, {groups}), got {tuple(t.shape)}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    if scales.stride(1) != 1 or zeros.stride() != scales.stride():
        scales, zeros = scales.contiguous(), zeros.contiguous()
        if zeros.stride() != scales.stride():  # different widths: one index must address both
            zeros = zeros[:, :groups].contiguous()
            scales = scales[:, :groups].contiguous()
    return _run(x2d, packed, None, scales, zeros, None, None, 0.0, bias, xa, lora_B, scale, out_features,
                in_features, quant=QUANT_INT4, log_bs=log_gs, log_nbs=0, nested=False, nested_offset=0.0,
                row_elems=2 * packed.stride(0), scale_row_elems=scales.stride(0) << log_gs, row_aligned=True,
                config=config, out_dtype=out_dtype)
