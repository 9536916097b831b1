"""Standalone 4-bit dequantization: bitsandbytes NF4/FP4 (double quantization included) and fastpeft int4.

Math (W flattened row-major, f = o·in + k, two codes a byte, element 2j in the high nibble)::

    q      = nibble f of packed
    NF4/FP4   w = code[q] · absmax[f >> LOG_BS]                       one fp32 product, then the cast
              absmax[i] = ncode[a8[i]] · nabs[i >> LOG_NBS] + offset  (double quant: product, then sum)
    int4      w = (q − zero[o, g]) · scale[o, g],   g = k // group    (in even, so byte f >> 1 as well)

Bit for bit equal to ``bitsandbytes.functional.dequantize_4bit`` (and to ``fastpeft.quant``): the
same two fp32 roundings in the same order. The launch passes ``enable_fp_fusion=False`` so the
compiler cannot contract the nested ``product + offset`` into an FMA (one rounding, different
bits); the int4 path has no multiply-add to contract.

Bytes: each program reads BLOCK/2 packed bytes once, splits them into high and low codes and
interleaves them with ``tl.join`` (no byte read twice), gathers from the 16-entry table (64 bytes,
L1-resident), and writes BLOCK outputs contiguously. The absmax (or its uint8 code) is read once
per element from L1/L2 (a block shares it). Traffic ≈ n/2 + 2n bytes for a bf16 output, e.g.
4096×4096 NF4 → ≈ 42 MB ≈ 14 µs at 3 TB/s (TARGETS.md §2). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv, interpreting
from .lora_linear import LAUNCHES

QUANT_BNB = 0
QUANT_INT4 = 1


@triton.jit
def _cast_rtne(w, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 → ``dtype`` rounding to nearest even, as torch casts. Triton's interpreter rounds fp32 → bf16
    wrongly (truncation by default; its "rtne" rounds half up without carry), so interpreter runs
    (MANUAL_BF16) round by integer arithmetic on the bits — exact for finite values; compiled GPU
    code never takes this branch and uses the hardware's cvt.rn."""
    if dtype == tl.bfloat16 and MANUAL_BF16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(dtype)


@triton.jit
def _dequant4_kernel(q_ptr, code_ptr, s_ptr, z_ptr, ncode_ptr, nabs_ptr, noff_ptr, out_ptr,
                     n, in_features, groups,
                     QUANT: tl.constexpr, NESTED: tl.constexpr, LOG_BS: tl.constexpr, LOG_NBS: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """out[f] for f in this program's BLOCK (BLOCK even): decode, scale, cast to out's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = BLOCK // 2
    byte = pid * half + tl.arange(0, half).to(tl.int64)
    b_ok = byte < (n + 1) // 2
    b = tl.load(q_ptr + byte, mask=b_ok, other=0).to(tl.int32)
    q = tl.reshape(tl.join(b >> 4, b & 15), (BLOCK,))  # element 2j: high nibble, 2j+1: low
    f = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = f < n
    if QUANT == 0:
        v = tl.load(code_ptr + q)
        blk = f >> LOG_BS
        if NESTED:
            a8 = tl.load(s_ptr + blk, mask=ok, other=0).to(tl.int32)
            scale = tl.load(ncode_ptr + a8) * tl.load(nabs_ptr + (blk >> LOG_NBS), mask=ok, other=0.0)
            scale = scale + tl.load(noff_ptr)
        else:
            scale = tl.load(s_ptr + blk, mask=ok, other=0.0)
        w = v * scale
    else:
        row = f // in_features
        g = row * groups + (f - row * in_features) // GROUP
        s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + f, _cast_rtne(w, out_ptr.dtype.element_ty, MANUAL_BF16), mask=ok)


def dequant_block(interpret: bool | None = None) -> tuple[int, int]:
    """(elements per program, warps): one fixed config — a streaming kernel has little to tune."""
    if interpreting() if interpret is None else interpret:
        return 512, 4
    return 2048, 4


def _log2_pow2(v: int, what: str) -> int:
    if v <= 0 or v & (v - 1):
        raise ValueError(f"{what} must be a power of two, got {v}")
    return v.bit_length() - 1


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    q = packed.reshape(-1)
    return q if q.dtype == torch.uint8 else q.contiguous().view(torch.uint8)


def _launch(q, code, s, z, ncode, nabs, noff, out, n, in_features, groups, quant, nested, log_bs, log_nbs, group):
    block, warps = dequant_block()
    grid = (cdiv(n, block),)
    LAUNCHES["dequant4"] += 1
    _dequant4_kernel[grid](q, code, s, z, ncode, nabs, noff, out, n, in_features, groups,
                           QUANT=quant, NESTED=nested, LOG_BS=log_bs, LOG_NBS=log_nbs, GROUP=group, BLOCK=block,
                           MANUAL_BF16=interpreting(),
                           num_warps=warps, enable_fp_fusion=False)
    return out


def _out(out, out_features, in_features, dtype, device):
    if out is None:
        return torch.empty(out_features, in_features, dtype=dtype, device=device)
    if tuple(out.shape) != (out_features, in_features) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({out_features}, {in_features}) {dtype} tensor")
    return out


def dequantize_4bit(packed, absmax, code, blocksize, out_features, in_features, dtype=torch.bfloat16, *,
                    nested_code=None, nested_absmax=None, nested_blocksize=256, nested_offset=None, out=None):
    """W (out, in) in ``dtype`` from bitsandbytes NF4/FP4 bytes (``packed``: any shape/storage dtype).

    ``absmax`` fp32 per ``blocksize`` flattened elements, or uint8 with double quantization
    (``nested_code`` (256 fp32), ``nested_absmax``, ``nested_blocksize``, ``nested_offset`` — a
    one-element tensor, read on the device, or a float). ``out`` (contiguous) is written in place
    when given, e.g. a reused workspace. Example::

        w = dequantize_4bit(p.data, st.absmax, st.code, st.blocksize, *st.shape, torch.bfloat16)
    """
    n = out_features * in_features
    q = _bytes(packed)
    if q.numel() < (n + 1) // 2:
        raise ValueError(f"packed holds {q.numel()} bytes, W ({out_features}×{in_features}) needs {(n + 1) // 2}")
    log_bs = _log2_pow2(int(blocksize), "blocksize")
    if absmax.numel() < cdiv(n, blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {cdiv(n, blocksize)}")
    if code.numel() < 16 or code.dtype != torch.float32:
        raise ValueError("code must be the 16-entry fp32 table")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize_4bit writes float32/float16/bfloat16, got {dtype}")
    nested = nested_code is not None
    if nested != (nested_absmax is not None):
        raise ValueError("double quantization needs both nested_code and nested_absmax")
    out = _out(out, out_features, in_features, dtype, q.device)
    if n == 0:
        return out
    absmax = absmax.reshape(-1)
    if nested:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"with double quantization absmax holds uint8 codes, got {absmax.dtype}")
        noff = nested_offset if isinstance(nested_offset, torch.Tensor) else \
            torch.tensor(float(nested_offset or 0.0), device=q.device)
        noff = noff.reshape(1).to(torch.float32)
        ncode, nabs = nested_code.reshape(-1).float(), nested_absmax.reshape(-1).float()
        log_nbs = _log2_pow2(int(nested_blocksize), "nested_blocksize")
    else:
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
        ncode = nabs = noff = absmax  # unused stand-ins
        log_nbs = 0
    return _launch(q, code.reshape(-1), absmax, absmax, ncode, nabs, noff, out, n, in_features, 1, QUANT_BNB, nested,
                   log_bs, log_nbs, 1)


def dequantize_int4(packed, scales, zeros, group_size, out_features, in_features, dtype=torch.bfloat16, *, out=None):
    """W (out, in) in ``dtype`` from fastpeft int4: ``packed`` (out, in/2) uint8, high nibble first,
    ``scales`` fp16 / ``zeros`` uint8 (out, ⌈in/group⌉); ``w = (q − zero) · scale`` in fp32, then cast."""
    if in_features % 2:
        raise ValueError(f"int4 needs an even in_features, got {in_features}")
    groups = cdiv(in_features, group_size)
    if packed.dtype != torch.uint8 or packed.numel() != out_features * in_features // 2:
        raise ValueError(f"packed must be ({out_features}, {in_features // 2}) uint8")
    if scales.numel() != out_features * groups or zeros.numel() != out_features * groups:
        raise ValueError(f"scales/zeros must be ({out_features}, {groups})")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequantize_int4 writes float32/float16/bfloat16, got {dtype}")
    out = _out(out, out_features, in_features, dtype, packed.device)
    n = out_features * in_features
    if n == 0:
        return out
    s, z = scales.contiguous(), zeros.contiguous()
    return _launch(packed.contiguous(), s, s, z, s, s, s, out, n, in_features, groups, QUANT_INT4, False, 0, 0,
                   int(group_size))
