"""The fused LoRA linear op on a 4-bit base weight (QLoRA): ``fastpeft::lora_linear_4bit``.

Math: exactly ``fastpeft::lora_linear`` (see ``fastpeft.ops``) with ``W0 = dequant(W4)``::

    y  = x W0ᵀ + b + scale · D(x) Aᵀ Bᵀ
    dx = dy W0 + m ⊙ (dS A)/(1 − p),  dS = scale · dy B;   dA = dSᵀ D(x);   dB = scale · dyᵀ xa

Where the time goes (TARGETS.md §2, 4096×4096, N = 8192): dequantizing W0 moves ≈ 40 MB (≈ 14 µs),
the GEMM takes ≈ 0.4 ms. So for training-sized N the Triton path decodes W0 with
``fastpeft.kernels.dequantize_4bit`` into a **workspace** — one buffer per (device, dtype), grown to
the largest layer, shared by every layer, never kept per layer (that would undo QLoRA's memory
saving) — and runs the core's fused kernels (``lora_linear_forward`` / ``lora_linear_backward``) on
it; backward decodes again into the same workspace for dx. Autograd keeps what the core keeps: x,
xa (N×r fp32) and the 8-byte seed (the 4-bit tensors are the module's own). The workspace is reused
in stream order: launches on one stream are safe; ops on concurrent streams would need their own.

Decode (N ≤ 16 rows, no grad needed): ``fastpeft.kernels.lora_gemv_4bit`` / ``lora_gemv_int4`` (the
LoRA term fused into a 4-bit GEMV) when present, see ``_decode_gemv``. The PyTorch path (CPU and
``FASTPEFT_BACKEND=torch``) decodes with ``fastpeft.quant`` and runs ``fastpeft.reference``.

Format arguments (flat, so the op schema is plain tensors): ``fmt`` 0 = bitsandbytes NF4/FP4
(``absmax`` fp32, or uint8 with ``nested_code``/``nested_absmax``/``offset``; ``code`` 16 fp32),
1 = fastpeft int4 (``absmax`` = fp16 scales, ``zeros``; ``blocksize`` = group size).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .ops import (
    _flat,
    backend_for,
    check_lora_inputs,
    draw_seed,
    fake_backward,
    fake_forward,
    op_grads,
    op_output,
    to_autocast_dtype,
)
from .quant import Weight4bit, dequantize_kernel

try:
    from . import kernels as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _kernels = None

FMT_BNB, FMT_INT4 = 0, 1
DECODE_MAX_ROWS = 16

# (device, dtype) -> flat buffer: the decoded W0 of whichever layer runs now.
_WORKSPACES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def workspace(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Tensor:
    """A contiguous (out, in) view of the shared decode buffer for ``device``/``dtype`` (grown as needed)."""
    key = (torch.device(device), dtype)
    n = out_features * in_features
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, device=device, dtype=dtype)
        _WORKSPACES[key] = buf
    return buf[:n].view(out_features, in_features)


def clear_workspaces() -> None:
    """Free the shared decode buffers (they are re-created on the next call)."""
    _WORKSPACES.clear()


def _weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt, blocksize, nested_blocksize,
            out_features, in_features) -> Weight4bit:
    if fmt == FMT_INT4:
        return Weight4bit(packed, "int4", out_features, in_features, blocksize, absmax, zeros=zeros)
    # quant_type only names the table; the table itself is ``code``
    return Weight4bit(packed, "nf4", out_features, in_features, blocksize, absmax, code=code,
                      nested_code=nested_code, nested_absmax=nested_absmax, nested_blocksize=nested_blocksize,
                      offset=offset)


def _decoded(w4: Weight4bit, dtype: torch.dtype, triton: bool) -> Tensor:
    if triton:
        return dequantize_kernel(w4, dtype, out=workspace(w4.packed.device, dtype, w4.out_features, w4.in_features))
    return w4.dequantize(dtype)


@torch.library.custom_op("fastpeft::lora_linear_4bit", mutates_args=())
def _lora_linear_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                         nested_code: Optional[Tensor], nested_absmax: Optional[Tensor], offset: Optional[Tensor],
                         zeros: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                         seed: Optional[Tensor], fmt: int, blocksize: int, nested_blocksize: int, out_features: int,
                         in_features: int, scale: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    w4 = _weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt, blocksize, nested_blocksize,
                 out_features, in_features)
    x2d = _flat(x)
    with torch.autocast(x.device.type, enabled=False):
        if backend_for(x) == "triton":
            w = _decoded(w4, x.dtype, True)
            y, xa = _kernels.lora_linear_forward(x2d, w, bias, lora_A, lora_B, seed, scale, dropout_p, False,
                                                 reference.dropout_threshold(dropout_p))
        else:
            y, xa = reference.lora_linear_forward(x2d, w4.dequantize(x.dtype), bias, lora_A, lora_B, seed, scale,
                                                  dropout_p, False)
    return op_output(y, (*x.shape[:-1], out_features)), op_output(xa, xa.shape)


@_lora_linear_4bit_op.register_fake
def _(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, seed, fmt, blocksize,
      nested_blocksize, out_features, in_features, scale, dropout_p):
    return fake_forward(x, in_features, out_features, lora_A.shape[0])


@torch.library.custom_op("fastpeft::lora_linear_4bit_backward", mutates_args=())
def _lora_linear_4bit_backward_op(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                                  nested_code: Optional[Tensor], nested_absmax: Optional[Tensor],
                                  offset: Optional[Tensor], zeros: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                                  xa: Tensor, seed: Optional[Tensor], fmt: int, blocksize: int, nested_blocksize: int,
                                  out_features: int, in_features: int, scale: float, dropout_p: float, need_dx: bool,
                                  need_dA: bool, need_dB: bool,
                                  need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w4 = _weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt, blocksize, nested_blocksize,
                 out_features, in_features)
    x2d, dy2d = _flat(x), _flat(dy)
    triton = backend_for(x) == "triton"
    # W0 is needed for dx only: decoded again (into the workspace on the Triton path), never saved.
    w = _decoded(w4, dy.dtype, triton) if need_dx else dy.new_empty(out_features, 0)
    with torch.autocast(x.device.type, enabled=False):
        if triton:
            grads = _kernels.lora_linear_backward(dy2d, x2d, w, lora_A, lora_B, xa, seed, scale, dropout_p, False,
                                                  reference.dropout_threshold(dropout_p), need_dx, need_dA, need_dB,
                                                  need_dbias)
        else:
            grads = reference.lora_linear_backward(dy2d, x2d, w, lora_A, lora_B, xa, seed, scale, dropout_p, False,
                                                   need_dx, need_dA, need_dB, need_dbias)
    return op_grads(x, grads)


@_lora_linear_4bit_backward_op.register_fake
def _(dy, x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed, fmt,
      blocksize, nested_blocksize, out_features, in_features, scale, dropout_p, need_dx, need_dA, need_dB,
      need_dbias):
    return fake_backward(x, lora_A, lora_B, out_features, need_dx, need_dA, need_dB, need_dbias)


_QUANT_INPUTS = slice(1, 8)  # packed … zeros


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, seed, fmt, blocksize,
     nested_blocksize, out_features, in_features, scale, dropout_p) = inputs
    _, xa = output
    ctx.save_for_backward(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa,
                          seed)
    ctx.meta = (fmt, blocksize, nested_blocksize, out_features, in_features, scale, dropout_p)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(xa)


def _backward(ctx, dy, _dxa):
    x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dbias, need_dA, need_dB = need[0], need[8], need[9], need[10]
    dx, dA, dB, dbias = _lora_linear_4bit_backward_op(
        dy, x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed, *ctx.meta,
        need_dx, need_dA, need_dB, need_dbias)
    return (dx if need_dx else None, None, None, None, None, None, None, None,
            dbias.to(ctx.bias_dtype) if need_dbias else None, dA if need_dA else None, dB if need_dB else None,
            None, None, None, None, None, None, None, None)


_lora_linear_4bit_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- decode dispatch point
@torch.library.custom_op("fastpeft::lora_linear_4bit_decode", mutates_args=())
def _lora_linear_4bit_decode_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                                nested_code: Optional[Tensor], nested_absmax: Optional[Tensor],
                                offset: Optional[Tensor], zeros: Optional[Tensor], bias: Optional[Tensor],
                                lora_A: Tensor, lora_B: Tensor, fmt: int, blocksize: int, nested_blocksize: int,
                                out_features: int, in_features: int, scale: float) -> Tensor:
    x2d = _flat(x)
    with torch.autocast(x.device.type, enabled=False):
        xa = x2d.float() @ lora_A.float().t()  # (N, r): tiny at decode sizes
        b = None if bias is None else bias.to(x.dtype)
        if fmt == FMT_INT4:
            y = _kernels.lora_gemv_int4(x2d, packed, absmax, zeros, blocksize, out_features, in_features, bias=b,
                                        xa=xa, lora_B=lora_B, scale=scale)
        else:
            nested = dict(nested_code=nested_code, nested_absmax=nested_absmax, nested_blocksize=nested_blocksize,
                          nested_offset=offset) if nested_code is not None else {}
            y = _kernels.lora_gemv_4bit(x2d, packed, absmax, code, blocksize, out_features, in_features, bias=b,
                                        xa=xa, lora_B=lora_B, scale=scale, **nested)
    return op_output(y, (*x.shape[:-1], out_features))


@_lora_linear_4bit_decode_op.register_fake
def _(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, fmt, blocksize,
      nested_blocksize, out_features, in_features, scale):
    return x.new_empty(*x.shape[:-1], out_features)


def _decode_gemv(x: Tensor, needs_grad: bool, p: float) -> bool:
    """DISPATCH POINT (decode): the fused 4-bit GEMV when it exists, the rows are few (N ≤ 16), nothing
    needs a gradient and dropout is off; otherwise the workspace path."""
    if needs_grad or p > 0.0 or _kernels is None or not hasattr(_kernels, "lora_gemv_4bit"):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows <= DECODE_MAX_ROWS and backend_for(x) == "triton"


def lora_linear_4bit(x: Tensor, weight: Weight4bit, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, *,
                     scale: float, dropout_p: float = 0.0, training: bool = True,
                     seed: Optional[Tensor] = None) -> Tensor:
    """``x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` with ``W0`` a 4-bit ``Weight4bit``, differentiable in x, A, B, b.

    Computes in x's dtype (or autocast's), whatever the stored weight's original dtype; dropout as
    ``fastpeft.ops.lora_linear`` (seed drawn here unless given). Example::

        w4 = Weight4bit.from_module(bnb_linear4bit)
        y = lora_linear_4bit(x, w4, None, A, B, scale=2.0, dropout_p=0.1)
    """
    in_f, out_f = weight.in_features, weight.out_features
    check_lora_inputs(x, in_f, out_f, lora_A, lora_B, dropout_p)
    x = to_autocast_dtype(x)
    p = float(dropout_p) if training else 0.0
    fmt = FMT_INT4 if weight.quant_type == "int4" else FMT_BNB
    args = (weight.packed, weight.absmax, weight.code, weight.nested_code, weight.nested_absmax, weight.offset,
            weight.zeros, bias, lora_A, lora_B)
    meta = (fmt, int(weight.blocksize), int(weight.nested_blocksize), out_f, in_f)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))
    if _decode_gemv(x, needs_grad, p):
        return _lora_linear_4bit_decode_op(x, *args, *meta, float(scale))
    if p == 0.0:
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    y, _ = _lora_linear_4bit_op(x, *args, seed, *meta, float(scale), p)
    return y
