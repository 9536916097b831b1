"""The fused LoRA linear op on a 4-bit base weight (QLoRA): ``fastpeft::lora_linear_4bit``.

Math: exactly ``fastpeft::lora_linear`` (see ``fastpeft.ops``) with ``W0 = dequant(W4)``::

    y  = x W0ᵀ + b + scale · D(x) Aᵀ Bᵀ
    dx = dy W0 + c·m ⊙ (dS A),  dS = scale · dy B;   dA = dSᵀ D(x);   dB = scale · dyᵀ xa
    (m the dropout mask, c its keep scale: ``fastpeft.reference.dropout_params``)

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

Wide input (``compute_dtype``, what a QLoRA model after ``prepare_model_for_kbit_training`` runs: fp32 x from the
fp32 norms, bf16/fp16 ``bnb_4bit_compute_dtype``): the base product is bitsandbytes' — x rounded to the compute
dtype, W0 decoded to it, fp32 accumulation (kept in fp32, not rounded to the compute dtype) — while the LoRA branch
works on the exact fp32 x and the fp32 adapters, as peft's does; y and dx in x's dtype (fp32). Backward: ``dx =
round(dy) W0`` (bitsandbytes' backward, fp32 accumulation; on CUDA, where a product without a LoRA term goes to
cuBLAS, that base part is rounded to the compute dtype as bitsandbytes' own backward rounds it) plus the fp32 LoRA
part; dA, dB from the fp32 x and dy. Saved for backward as always: x (once, fp32), xa and the seed; the rounded
copies of x (forward) and dy (backward) are transient. See ``_forward_wide`` / ``_backward_wide``.

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
    refuse_double_backward,
    to_autocast_dtype,
    traced,
    two_routes,
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


def wide_compute_dtype(x: Tensor, compute_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """``compute_dtype`` when x is wider than it (fp32 x, bf16/fp16 compute dtype, autocast off): the op then
    rounds x to it for the base product only (see the module docstring); None otherwise (x's own dtype)."""
    if compute_dtype in (torch.bfloat16, torch.float16) and x.dtype == torch.float32:
        return compute_dtype
    return None


def _forward_wide(x2d: Tensor, w4: Weight4bit, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  seed: Optional[Tensor], scale: float, p: float, cdt: torch.dtype, triton: bool):
    """``(y, xa)`` for fp32 ``x2d`` and the 16-bit compute dtype ``cdt``: ``y = round(x) W0ᵀ + b + scale · xa Bᵀ``
    in fp32 with ``W0`` decoded to ``cdt`` and ``xa = D(x) Aᵀ`` from the exact fp32 x (fp32 adapters)."""
    xc = x2d.to(cdt)  # transient: the base product's operand (bitsandbytes' rounding of x), not saved
    if triton:
        w = _decoded(w4, cdt, True)
        thr, keep_scale = reference.dropout_params(p)
        xa = _kernels.lora_down(x2d, lora_A, out_scale=keep_scale, seed=seed, threshold=thr, dropout=thr > 0)
        # the 16-bit GEMM accumulates in fp32 and stores fp32, the rank-r term added in fp32 (one kernel)
        y = _kernels.lora_gemm(xc, w, bias, xa, lora_B.t(), lora_scale=scale, out_dtype=torch.float32)
        return y, xa
    # fp32 products of 16-bit values are exact: an fp32 matmul on the rounded operands is the 16-bit product
    # with fp32 accumulation
    y = torch.nn.functional.linear(xc.float(), w4.dequantize(cdt).float(), None if bias is None else bias.float())
    xa = reference.apply_dropout(x2d, seed, p) @ lora_A.float().t()
    return y.addmm_(xa, lora_B.float().t(), alpha=scale), xa


def _backward_wide(dy2d: Tensor, x2d: Tensor, w4: Weight4bit, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                   seed: Optional[Tensor], scale: float, p: float, cdt: torch.dtype, triton: bool, need_dx: bool,
                   need_dA: bool, need_dB: bool, need_dbias: bool):
    """``(dx, dA, dB, dbias)`` of ``_forward_wide``: ``dx = round(dy) W0 + c · m ⊙ (dS A)`` (the base part as
    bitsandbytes' backward: dy rounded to ``cdt``, fp32 accumulation), ``dS = scale · dy B``, dA, dB, db from the
    fp32 dy and x — the core's backward (``fastpeft.kernels.lora_linear_backward`` / ``reference``) otherwise."""
    if triton:
        LL = _kernels.lora_linear
        thr, inv_keep = reference.dropout_params(p)
        dropout = thr > 0
        dx = dA = dB = dbias = dS = None
        if need_dx or need_dA:
            dS = _kernels.lora_down(dy2d, lora_B.t(), out_scale=scale)  # (N, r) fp32, from the fp32 dy
        in_reduce = need_dx and dropout and LL.dx_dropout_mode() == "reduce" and LL.reduce_can_add_dx(
            lora_A.shape[0])
        if need_dx:
            w = _decoded(w4, cdt, True)
            dyc = dy2d.to(cdt)  # transient
            if in_reduce:  # the masked LoRA part is added by the dA pass below
                dx = _kernels.lora_gemm(dyc, w.t(), out_dtype=torch.float32)
            else:
                dx = _kernels.lora_gemm(dyc, w.t(), None, dS, lora_A, lora_scale=1.0, seed=seed, threshold=thr,
                                        inv_keep=inv_keep, mask_lora=dropout, out_dtype=torch.float32)
        if need_dA or in_reduce:
            dA, _ = _kernels.lora_reduce(dS, x2d, out_scale=inv_keep, seed=seed, threshold=thr, dropout=dropout,
                                         add_dx=(lora_A, dx) if in_reduce else None)
            dA = dA.to(lora_A.dtype) if need_dA else None
        if need_dB or need_dbias:
            dBf, dbias = _kernels.lora_reduce(xa, dy2d, out_scale=scale, dbias=need_dbias, transpose_out=True)
            dB = dBf.to(lora_B.dtype) if need_dB else None
        return dx, dA, dB, dbias
    keep = None
    if reference.drops(p) and (need_dx or need_dA):  # drawn once, for dx and dA
        keep = reference.dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    _, dA, dB, dbias = reference.lora_linear_backward(dy2d, x2d, dy2d.new_empty(dy2d.shape[1], 0), lora_A, lora_B,
                                                      xa, seed, scale, p, False, False, need_dA, need_dB, need_dbias,
                                                      keep=keep)
    dx = None
    if need_dx:
        dS = scale * (dy2d @ lora_B.float())
        dx = (dy2d.to(cdt).float() @ w4.dequantize(cdt).float()).add_(reference.masked(dS @ lora_A.float(), keep, p))
    return dx, dA, dB, dbias


def _forward_body(x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                  nested_code: Optional[Tensor], nested_absmax: Optional[Tensor], offset: Optional[Tensor],
                  zeros: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  seed: Optional[Tensor], fmt: int, blocksize: int, nested_blocksize: int, out_features: int,
                  in_features: int, scale: float, dropout_p: float,
                  compute_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    w4 = _weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt, blocksize, nested_blocksize,
                 out_features, in_features)
    x2d = _flat(x)
    with torch.autocast(x.device.type, enabled=False):
        if compute_dtype is not None:  # fp32 x, 16-bit base product (see the module docstring)
            y, xa = _forward_wide(x2d, w4, bias, lora_A, lora_B, seed, scale, dropout_p, compute_dtype,
                                  backend_for(x) == "triton")
        elif backend_for(x) == "triton":
            w = _decoded(w4, x.dtype, True)
            y, xa = _kernels.lora_linear_forward(x2d, w, bias, lora_A, lora_B, seed, scale, dropout_p, False,
                                                 reference.dropout_threshold(dropout_p))
        else:
            y, xa = reference.lora_linear_forward(x2d, w4.dequantize(x.dtype), bias, lora_A, lora_B, seed, scale,
                                                  dropout_p, False)
    return op_output(y, (*x.shape[:-1], out_features)), op_output(xa, xa.shape)


_lora_linear_4bit_op = torch.library.custom_op("fastpeft::lora_linear_4bit", _forward_body, mutates_args=())


@_lora_linear_4bit_op.register_fake
def _(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, seed, fmt, blocksize,
      nested_blocksize, out_features, in_features, scale, dropout_p, compute_dtype=None):
    return fake_forward(x, in_features, out_features, lora_A.shape[0])


def _backward_body(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                   nested_code: Optional[Tensor], nested_absmax: Optional[Tensor],
                   offset: Optional[Tensor], zeros: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   xa: Tensor, seed: Optional[Tensor], fmt: int, blocksize: int, nested_blocksize: int,
                   out_features: int, in_features: int, scale: float, dropout_p: float, need_dx: bool,
                   need_dA: bool, need_dB: bool, need_dbias: bool,
                   compute_dtype: Optional[torch.dtype] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w4 = _weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt, blocksize, nested_blocksize,
                 out_features, in_features)
    x2d, dy2d = _flat(x), _flat(dy)
    triton = backend_for(x) == "triton"
    if compute_dtype is not None:  # fp32 x, 16-bit base product (see the module docstring)
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward_wide(dy2d, x2d, w4, lora_A, lora_B, xa, seed, scale, dropout_p, compute_dtype, triton,
                                   need_dx, need_dA, need_dB, need_dbias)
        return op_grads(x, grads)
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


_lora_linear_4bit_backward_op = torch.library.custom_op("fastpeft::lora_linear_4bit_backward", _backward_body,
                                                        mutates_args=())


@_lora_linear_4bit_backward_op.register_fake
def _(dy, x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed, fmt,
      blocksize, nested_blocksize, out_features, in_features, scale, dropout_p, need_dx, need_dA, need_dB,
      need_dbias, compute_dtype=None):
    return fake_backward(x, lora_A, lora_B, out_features, need_dx, need_dA, need_dB, need_dbias)


_QUANT_INPUTS = slice(1, 8)  # packed … zeros


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, seed, fmt, blocksize,
     nested_blocksize, out_features, in_features, scale, dropout_p, *compute_dtype) = inputs
    _, xa = output
    ctx.save_for_backward(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa,
                          seed)
    ctx.meta = (fmt, blocksize, nested_blocksize, out_features, in_features, scale, dropout_p)
    ctx.compute_dtype = compute_dtype[0] if compute_dtype else None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(xa)


def _backward(ctx, dy, _dxa):
    refuse_double_backward("4-bit LoRA op")
    x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dbias, need_dA, need_dB = need[0], need[8], need[9], need[10]
    op = _backward_body if getattr(ctx, "eager", False) else _lora_linear_4bit_backward_op
    dx, dA, dB, dbias = op(
        dy, x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, lora_A, lora_B, xa, seed, *ctx.meta,
        need_dx, need_dA, need_dB, need_dbias, ctx.compute_dtype)
    return (dx if need_dx else None, None, None, None, None, None, None, None,
            dbias.to(ctx.bias_dtype) if need_dbias else None, dA if need_dA else None, dB if need_dB else None,
            None, None, None, None, None, None, None, None, None)


_lora_linear_4bit_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- decode dispatch point
def _decode_body(x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                 nested_code: Optional[Tensor], nested_absmax: Optional[Tensor],
                 offset: Optional[Tensor], zeros: Optional[Tensor], bias: Optional[Tensor],
                 lora_A: Tensor, lora_B: Tensor, fmt: int, blocksize: int, nested_blocksize: int,
                 out_features: int, in_features: int, scale: float,
                 compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    x2d = _flat(x)
    with torch.autocast(x.device.type, enabled=False):
        xa = x2d.float() @ lora_A.float().t()  # (N, r): tiny at decode sizes
        b = None if bias is None else bias.to(x.dtype)
        # wide input (fp32 x, 16-bit compute dtype): the GEMV multiplies x rounded to the compute dtype, xa comes
        # from the exact x, y is fp32 (as _forward_wide)
        xg, out = (x2d, {}) if compute_dtype is None else (x2d.to(compute_dtype), {"out_dtype": x.dtype})
        if fmt == FMT_INT4:
            y = _kernels.lora_gemv_int4(xg, packed, absmax, zeros, blocksize, out_features, in_features, bias=b,
                                        xa=xa, lora_B=lora_B, scale=scale, **out)
        else:
            nested = dict(nested_code=nested_code, nested_absmax=nested_absmax, nested_blocksize=nested_blocksize,
                          nested_offset=offset) if nested_code is not None else {}
            y = _kernels.lora_gemv_4bit(xg, packed, absmax, code, blocksize, out_features, in_features, bias=b,
                                        xa=xa, lora_B=lora_B, scale=scale, **nested, **out)
    return op_output(y, (*x.shape[:-1], out_features))


_lora_linear_4bit_decode_op = torch.library.custom_op("fastpeft::lora_linear_4bit_decode", _decode_body,
                                                      mutates_args=())


@_lora_linear_4bit_decode_op.register_fake
def _(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, lora_A, lora_B, fmt, blocksize,
      nested_blocksize, out_features, in_features, scale, compute_dtype=None):
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
                     seed: Optional[Tensor] = None, compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` with ``W0`` a 4-bit ``Weight4bit``, differentiable in x, A, B, b.

    Computes in x's dtype (or autocast's), whatever the stored weight's original dtype; dropout as
    ``fastpeft.ops.lora_linear`` (seed drawn here unless given). ``compute_dtype`` (bf16/fp16) acts on an fp32
    x only (autocast off): the base product ``x W0ᵀ`` is then bitsandbytes' in that dtype (x rounded to it, fp32
    accumulation) while the LoRA branch uses the exact fp32 x, as peft's QLoRA layer; y stays fp32. Example::

        w4 = Weight4bit.from_module(bnb_linear4bit)
        y = lora_linear_4bit(x, w4, None, A, B, scale=2.0, dropout_p=0.1)
        y = lora_linear_4bit(x_fp32, w4, None, A, B, scale=2.0, compute_dtype=torch.bfloat16)
    """
    in_f, out_f = weight.in_features, weight.out_features
    check_lora_inputs(x, in_f, out_f, lora_A, lora_B, dropout_p)
    x = to_autocast_dtype(x)
    cdt = wide_compute_dtype(x, compute_dtype)
    p = float(dropout_p) if training else 0.0
    fmt = FMT_INT4 if weight.quant_type == "int4" else FMT_BNB
    args = (weight.packed, weight.absmax, weight.code, weight.nested_code, weight.nested_absmax, weight.offset,
            weight.zeros, bias, lora_A, lora_B)
    meta = (fmt, int(weight.blocksize), int(weight.nested_blocksize), out_f, in_f)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))
    if _decode_gemv(x, needs_grad, p):  # (no autograd: eager calls skip the custom op's dispatch)
        return (_lora_linear_4bit_decode_op if traced(x) else _decode_body)(x, *args, *meta, float(scale), cdt)
    if p == 0.0:
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    return _lora_linear_4bit_call(x, *args, seed, *meta, float(scale), p, cdt)


_lora_linear_4bit_call = two_routes("_LoraLinear4bitFn", _lora_linear_4bit_op, _forward_body, _setup_context,
                                    _backward)
