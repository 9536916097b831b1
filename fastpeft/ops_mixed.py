"""Mixed-adapter LoRA: one op for a batch whose rows use different adapters.

``fastpeft::lora_mixed`` computes, for every row ``m`` of the flattened input with adapter
index ``a = index[m]`` (``-1``: the base layer only)::

    y[m] = x[m] W0ᵀ + b + s_a · (D_a(x[m]) A_aᵀ) B_aᵀ        (s_a = alpha_a / r_a or alpha_a / √r_a)

with ``D_a`` dropout of probability ``p_a`` whose mask is the core's Philox keyed by
``(seed, m, col)`` — so a batch with one adapter drops exactly what ``fastpeft.ops.lora_linear``
drops. Gradients of adapter ``a`` come only from its own rows.

The adapters are stacked, zero-padded to the largest rank (``A_stack`` (n, R, in), ``B_stack``
(n, out, R)) by differentiable ``torch.stack``/``pad``, so autograd hands each adapter its slice of
the stacked gradient. Rows are sorted by adapter once per call (``torch.sort``, stable, on the
device: no host synchronization); ``xa`` and the saved permutation live in sorted order.
On CUDA the Triton kernels of ``fastpeft.kernels.lora_mixed`` run (gather-style; no loop over
adapters on the host); elsewhere a plain-PyTorch twin loops over the adapters' row segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops4bit as _ops4bit
from . import reference
from .ops import (
    _flat,
    _out_features,
    backend_for,
    draw_seed,
    fake_backward,
    fake_forward,
    op_grads,
    op_output,
    refuse_double_backward,
    to_autocast_dtype,
    two_routes,
)
from .quant import Weight4bit

try:
    from .kernels import lora_mixed as _kmixed
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _kmixed = None

BASE = "__base__"
_META_CACHE: dict = {}


def _meta(scales: Sequence[float], ps: Sequence[float], device) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Per-adapter (scale, keep scale, 16-bit threshold) tensors on ``device`` (``reference.dropout_params``) and
    whether any adapter drops, cached (small H2D copies)."""
    key = (tuple(scales), tuple(ps), str(device))
    hit = _META_CACHE.get(key)
    if hit is None:
        if len(_META_CACHE) > 256:
            _META_CACHE.clear()
        scale = torch.tensor(list(scales), dtype=torch.float32, device=device)
        params = [reference.dropout_params(p) for p in ps]
        inv_keep = torch.tensor([c for _, c in params], dtype=torch.float32, device=device)
        thr = torch.tensor([t for t, _ in params], dtype=torch.int32, device=device)
        hit = _META_CACHE[key] = (scale, inv_keep, thr, any(t > 0 for t, _ in params))
    return hit


# ----------------------------------------------------------------------------- plain PyTorch twin
def _segments(seg: Tensor) -> list[tuple[int, int]]:
    b = seg.tolist()
    return [(b[a], b[a + 1]) for a in range(len(b) - 1)]


def _keep(seed, rows: Tensor, n_cols: int, p: float) -> Optional[Tensor]:
    return reference.dropout_keep_rows(seed, rows, n_cols, p) if reference.drops(p) else None


def _base_operand(t: Tensor, base_dtype: Optional[torch.dtype]) -> Tensor:
    """``t`` rounded to ``base_dtype`` and back (the wide path's base-product operand; exact products in fp32)."""
    return t if base_dtype is None else t.to(base_dtype).to(t.dtype)


def torch_mixed_forward(x2d, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, ps, fan_in_fan_out,
                        base_dtype=None):
    """Reference forward (segment loop). Returns ``(y, xa)`` with ``xa`` (N, R) in ``reference.acc_dtype`` (fp32)
    in sorted row order. ``base_dtype`` (wide input: fp32 x, a 16-bit ``weight``): the base product multiplies x
    rounded to it, accumulated and kept in fp32; the LoRA rows use the exact x."""
    acc = reference.acc_dtype(x2d)
    w = (weight.t() if fan_in_fan_out else weight).to(x2d.dtype)
    y = F.linear(_base_operand(x2d, base_dtype), w, None if bias is None else bias.to(x2d.dtype))
    N, R = x2d.shape[0], A_stack.shape[1]
    xa = torch.zeros(N, R, dtype=acc, device=x2d.device)
    lora = torch.zeros(N, y.shape[1], dtype=acc, device=x2d.device)
    for a, (s, e) in enumerate(_segments(seg)):
        if e == s:
            continue
        rows = perm[s:e]
        xs = x2d.index_select(0, rows).to(acc)
        xs = reference.masked(xs, _keep(seed, rows, x2d.shape[1], ps[a]), ps[a])
        xa[s:e] = xs @ A_stack[a].to(acc).t()
        lora[s:e] = scales[a] * (xa[s:e] @ B_stack[a].to(acc).t())
    out = torch.zeros_like(lora).index_copy_(0, perm, lora)
    return (y.to(acc) + out).to(x2d.dtype), xa


def torch_mixed_backward(dy, x2d, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales, ps, fan_in_fan_out,
                         need_dx=True, need_dA=True, need_dB=True, need_dbias=False, base_dtype=None):
    """Reference backward (segment loop). Returns ``(dx, dA_stack, dB_stack, dbias)``. ``base_dtype`` as in
    ``torch_mixed_forward``: dx's base part multiplies dy rounded to it (bitsandbytes' backward)."""
    acc = reference.acc_dtype(x2d)
    w = (weight.t() if fan_in_fan_out else weight).to(dy.dtype)
    dyf = dy.to(acc)
    dx = dA = dB = dbias = None
    lora_dx = torch.zeros(x2d.shape, dtype=acc, device=x2d.device) if need_dx else None
    if need_dA:
        dA = torch.zeros(A_stack.shape, dtype=acc, device=x2d.device)
    if need_dB:
        dB = torch.zeros(B_stack.shape, dtype=acc, device=x2d.device)
    for a, (s, e) in enumerate(_segments(seg)):
        if e == s:
            continue
        rows = perm[s:e]
        dys = dyf.index_select(0, rows)
        keep = _keep(seed, rows, x2d.shape[1], ps[a]) if need_dx or need_dA else None
        dS = scales[a] * (dys @ B_stack[a].to(acc))
        if need_dx:
            lora_dx[s:e] = reference.masked(dS @ A_stack[a].to(acc), keep, ps[a])
        if need_dA:
            dA[a] = dS.t() @ reference.masked(x2d.index_select(0, rows).to(acc), keep, ps[a])
        if need_dB:
            dB[a] = scales[a] * (dys.t() @ xa[s:e])
    if need_dx:
        lora_dx = torch.zeros_like(lora_dx).index_copy_(0, perm, lora_dx)
        dx = (_base_operand(dyf, base_dtype) @ w.to(acc) + lora_dx).to(x2d.dtype) if dy.dtype == acc else \
            (dy @ w).to(acc).add_(lora_dx).to(x2d.dtype)
    if need_dbias:
        dbias = dyf.sum(0)
    return (dx, None if dA is None else dA.to(A_stack.dtype), None if dB is None else dB.to(B_stack.dtype), dbias)


# ----------------------------------------------------------------------------- the op
def _mixed_body(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stack: Tensor, B_stack: Tensor,
                idx_s: Tensor, perm: Tensor, seg: Tensor, seed: Optional[Tensor], scales: list[float],
                dropout_ps: list[float], fan_in_fan_out: bool) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, dropout_ps,
                         fan_in_fan_out, backend_for(x) == "triton")


_lora_mixed_op = torch.library.custom_op("fastpeft::lora_mixed", _mixed_body, mutates_args=())


def _forward_impl(x, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, dropout_ps, fan_in_fan_out,
                  triton, base_dtype=None):
    x2d = _flat(x)
    with torch.autocast(x.device.type, enabled=False):
        if triton:
            y, xa = _kmixed.lora_mixed_forward(x2d, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed,
                                               _meta(scales, dropout_ps, x.device), fan_in_fan_out,
                                               base_dtype=base_dtype)
        else:
            y, xa = torch_mixed_forward(x2d, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales,
                                        dropout_ps, fan_in_fan_out, base_dtype=base_dtype)
    return op_output(y, (*x.shape[:-1], y.shape[-1])), op_output(xa, xa.shape)


@_lora_mixed_op.register_fake
def _(x, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, dropout_ps, fan_in_fan_out):
    return fake_forward(x, A_stack.shape[2], _out_features(weight, fan_in_fan_out), A_stack.shape[1])


def _mixed_backward_body(dy: Tensor, x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, xa: Tensor,
                         idx_s: Tensor, perm: Tensor, seg: Tensor, seed: Optional[Tensor], scales: list[float],
                         dropout_ps: list[float], fan_in_fan_out: bool, need_dx: bool, need_dA: bool,
                         need_dB: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(dy, x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales, dropout_ps,
                          fan_in_fan_out, need_dx, need_dA, need_dB, need_dbias, backend_for(x) == "triton")


_lora_mixed_backward_op = torch.library.custom_op("fastpeft::lora_mixed_backward", _mixed_backward_body,
                                                  mutates_args=())


def _backward_impl(dy, x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales, dropout_ps, fan_in_fan_out,
                   need_dx, need_dA, need_dB, need_dbias, triton, base_dtype=None):
    x2d, dy2d = _flat(x), _flat(dy)
    with torch.autocast(x.device.type, enabled=False):
        if triton:
            grads = _kmixed.lora_mixed_backward(dy2d, x2d, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed,
                                                _meta(scales, dropout_ps, x.device), fan_in_fan_out,
                                                need_dx, need_dA, need_dB, need_dbias, base_dtype=base_dtype)
        else:
            grads = torch_mixed_backward(dy2d, x2d, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales,
                                         dropout_ps, fan_in_fan_out, need_dx, need_dA, need_dB, need_dbias,
                                         base_dtype=base_dtype)
    return op_grads(x, grads)


@_lora_mixed_backward_op.register_fake
def _(dy, x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales, dropout_ps, fan_in_fan_out,
      need_dx, need_dA, need_dB, need_dbias):
    return fake_backward(x, A_stack, B_stack, _out_features(weight, fan_in_fan_out), need_dx, need_dA, need_dB,
                         need_dbias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, dropout_ps, fan_in_fan_out = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed)
    ctx.scales, ctx.dropout_ps, ctx.fan_in_fan_out = scales, dropout_ps, fan_in_fan_out
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(xa)


def _backward(ctx, dy, _dxa):
    refuse_double_backward("mixed-adapter LoRA op")
    x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[1]:
        raise RuntimeError("fastpeft's LoRA op keeps the base weight frozen: it computes no gradient for it. "
                           "Call base_layer.weight.requires_grad_(False), or train it without fastpeft.")
    need_dx, need_dbias, need_dA, need_dB = need[0], need[2], need[3], need[4]
    op = _mixed_backward_body if getattr(ctx, "eager", False) else _lora_mixed_backward_op
    dx, dA, dB, dbias = op(
        dy, x, weight, A_stack, B_stack, xa, idx_s, perm, seg, seed, ctx.scales, ctx.dropout_ps,
        ctx.fan_in_fan_out, need_dx, need_dA, need_dB, need_dbias)
    return (dx if need_dx else None, None, dbias.to(ctx.bias_dtype) if need_dbias else None,
            dA if need_dA else None, dB if need_dB else None) + (None,) * 7


_lora_mixed_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the op on a 4-bit base
# Same math with W0 = dequant(W4): decoded into the shared workspace (``fastpeft.ops4bit``) for the
# call and decoded again in backward for dx — no dense copy of the base is kept between the two
# (QLoRA's memory saving holds for mixed batches too). Format arguments as ``fastpeft::lora_linear_4bit``.
def _mixed_4bit_body(x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_absmax: Optional[Tensor], offset: Optional[Tensor],
                     zeros: Optional[Tensor], bias: Optional[Tensor], A_stack: Tensor, B_stack: Tensor,
                     idx_s: Tensor, perm: Tensor, seg: Tensor, seed: Optional[Tensor], fmt: int, blocksize: int,
                     nested_blocksize: int, out_features: int, in_features: int, scales: list[float],
                     dropout_ps: list[float], compute_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    triton = backend_for(x) == "triton"
    w = _ops4bit._decoded(_ops4bit._weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt,
                                           blocksize, nested_blocksize, out_features, in_features),
                          compute_dtype or x.dtype, triton)
    return _forward_impl(x, w, bias, A_stack, B_stack, idx_s, perm, seg, seed, scales, dropout_ps, False, triton,
                         base_dtype=compute_dtype)


_lora_mixed_4bit_op = torch.library.custom_op("fastpeft::lora_mixed_4bit", _mixed_4bit_body, mutates_args=())


@_lora_mixed_4bit_op.register_fake
def _(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, A_stack, B_stack, idx_s, perm, seg,
      seed, fmt, blocksize, nested_blocksize, out_features, in_features, scales, dropout_ps, compute_dtype=None):
    return fake_forward(x, in_features, out_features, A_stack.shape[1])


def _mixed_4bit_backward_body(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Optional[Tensor],
                              nested_code: Optional[Tensor], nested_absmax: Optional[Tensor],
                              offset: Optional[Tensor], zeros: Optional[Tensor], A_stack: Tensor, B_stack: Tensor,
                              xa: Tensor, idx_s: Tensor, perm: Tensor, seg: Tensor, seed: Optional[Tensor],
                              fmt: int, blocksize: int, nested_blocksize: int, out_features: int,
                              in_features: int, scales: list[float], dropout_ps: list[float], need_dx: bool,
                              need_dA: bool, need_dB: bool, need_dbias: bool,
                              compute_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    triton = backend_for(x) == "triton"
    if need_dx:  # W0 is read for dx only
        w = _ops4bit._decoded(_ops4bit._weight(packed, absmax, code, nested_code, nested_absmax, offset, zeros, fmt,
                                               blocksize, nested_blocksize, out_features, in_features),
                              compute_dtype or dy.dtype, triton)
    else:
        w = dy.new_empty(out_features, 0)  # never read without dx
    return _backward_impl(dy, x, w, A_stack, B_stack, xa, idx_s, perm, seg, seed, scales, dropout_ps, False,
                          need_dx, need_dA, need_dB, need_dbias, triton, base_dtype=compute_dtype)


_lora_mixed_4bit_backward_op = torch.library.custom_op("fastpeft::lora_mixed_4bit_backward",
                                                       _mixed_4bit_backward_body, mutates_args=())


@_lora_mixed_4bit_backward_op.register_fake
def _(dy, x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, A_stack, B_stack, xa, idx_s, perm,
      seg, seed, fmt, blocksize, nested_blocksize, out_features, in_features, scales, dropout_ps, need_dx, need_dA,
      need_dB, need_dbias, compute_dtype=None):
    return fake_backward(x, A_stack, B_stack, out_features, need_dx, need_dA, need_dB, need_dbias)


def _setup_context_4bit(ctx, inputs, output):
    (x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, bias, A_stack, B_stack, idx_s, perm, seg,
     seed, fmt, blocksize, nested_blocksize, out_features, in_features, scales, dropout_ps, *compute_dtype) = inputs
    _, xa = output
    ctx.save_for_backward(x, packed, absmax, code, nested_code, nested_absmax, offset, zeros, A_stack, B_stack, xa,
                          idx_s, perm, seg, seed)
    ctx.meta = (fmt, blocksize, nested_blocksize, out_features, in_features, scales, dropout_ps)
    ctx.compute_dtype = compute_dtype[0] if compute_dtype else None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(xa)


def _backward_4bit(ctx, dy, _dxa):
    refuse_double_backward("mixed-adapter LoRA op on a 4-bit base")
    need = ctx.needs_input_grad
    need_dx, need_dbias, need_dA, need_dB = need[0], need[8], need[9], need[10]
    op = _mixed_4bit_backward_body if getattr(ctx, "eager", False) else _lora_mixed_4bit_backward_op
    dx, dA, dB, dbias = op(dy, *ctx.saved_tensors, *ctx.meta, need_dx, need_dA, need_dB,
                                                     need_dbias, ctx.compute_dtype)
    return ((dx if need_dx else None,) + (None,) * 7
            + (dbias.to(ctx.bias_dtype) if need_dbias else None, dA if need_dA else None, dB if need_dB else None)
            + (None,) * 12)


_lora_mixed_4bit_op.register_autograd(_backward_4bit, setup_context=_setup_context_4bit)


# ----------------------------------------------------------------------------- public entry points
def stack_adapters(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(A_stack (n, R, in), B_stack (n, out, R))``, each adapter zero-padded to the largest rank ``R``.

    Differentiable: the gradient of a stack flows back to each adapter's own (unpadded) tensor.
    """
    if not As or len(As) != len(Bs):
        raise ValueError(f"need as many lora_A as lora_B tensors (≥ 1), got {len(As)} and {len(Bs)}")
    r_max = max(A.shape[0] for A in As)
    A_stack = torch.stack([A if A.shape[0] == r_max else F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A in As])
    B_stack = torch.stack([B if B.shape[1] == r_max else F.pad(B, (0, r_max - B.shape[1])) for B in Bs])
    return A_stack, B_stack


def sort_rows(index: Tensor, n_adapters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx_s int32, perm int64, seg int64 (n+1,))``: rows sorted by adapter (stable; base rows first),
    the original row of each sorted row, and each adapter's sorted row bounds ``seg[a] .. seg[a+1]``.
    All on the device, without a host synchronization."""
    idx_s, perm = torch.sort(index.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(n_adapters + 1, dtype=torch.int32, device=index.device)
    seg = torch.searchsorted(idx_s, bounds)
    return idx_s, perm, seg


def mixed_rows(index: Tensor, x: Tensor, n_adapters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``index`` against ``x`` and sort its rows by adapter: ``(idx_s, perm, seg)`` as
    :func:`sort_rows` gives them. ``index`` has ``x.shape[:-1]`` (one adapter per row) or ``x.shape[:1]``
    (one per sequence). Layers that share one batch can compute this once and pass it as ``rows=``."""
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    lead = tuple(x.shape[:-1])
    if tuple(index.shape) != lead:
        if x.dim() >= 2 and index.dim() == 1 and index.shape[0] == x.shape[0]:
            index = index.to(x.device).reshape(-1, *([1] * (x.dim() - 2))).expand(lead)
        else:
            raise ValueError(f"index must have shape {lead} (per row) or ({x.shape[0]},) (per sequence), "
                             f"got {tuple(index.shape)}")
    if index.numel() and not torch.compiler.is_compiling():
        valid = ((index >= -1) & (index < n_adapters)).all()
        if index.device.type == "cpu":
            if not bool(valid):
                raise ValueError(f"index values must be in [-1, {n_adapters}) (-1 = base only)")
        else:  # no host synchronization: a device-side assert (the kernels would read past the stacks)
            torch._assert_async(valid, f"index values must be in [-1, {n_adapters}) (-1 = base only)")
    return sort_rows(index.to(x.device), n_adapters)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_As: Sequence[Tensor],
                      lora_Bs: Sequence[Tensor], index: Optional[Tensor], *, scales: Sequence[float],
                      dropout_ps: Sequence[float] | None = None, training: bool = True,
                      fan_in_fan_out: bool = False, seed: Optional[Tensor] = None,
                      rows: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                      stacks: Optional[tuple[Tensor, Tensor]] = None,
                      compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``y[m] = x[m] W0ᵀ + b + s_a · (D_a(x[m]) A_aᵀ) B_aᵀ`` with ``a = index[m]`` (``-1``: base only).

    ``weight`` is a dense (out, in) tensor ((in, out) with ``fan_in_fan_out``) or a 4-bit
    ``fastpeft.quant.Weight4bit`` (decoded per call into the shared workspace, never kept).

    ``rows`` (from :func:`mixed_rows`) replaces ``index`` when several layers share one batch;
    ``stacks`` (from :func:`stack_adapters` of the same adapters) skips restacking them, e.g. across
    the decode steps of one ``generate`` call (no gradient flows through a reused stack).

    ``lora_As[a]`` (r_a, in) and ``lora_Bs[a]`` (out, r_a) may differ in rank; ``scales[a]`` and
    ``dropout_ps[a]`` are per adapter. ``index`` is an integer tensor with ``x.shape[:-1]`` (one
    adapter per row/token) or ``x.shape[:1]`` (one per sequence). Differentiable in x, every A/B, b;
    each adapter's gradient comes only from its own rows.

    ``compute_dtype`` (bf16/fp16; a 4-bit ``weight`` only) acts on an fp32 x as in
    ``fastpeft.ops4bit.lora_linear_4bit``: the base product is bitsandbytes' in that dtype (x, and dy in
    backward, rounded to it; fp32 accumulation) while every adapter's rows use the exact fp32 x; y stays fp32.
    Example::

        y = lora_linear_mixed(x, lin.weight, lin.bias, [A0, A1], [B0, B1], torch.tensor([0, 1, -1]),
                              scales=[2.0, 0.5])
    """
    n = len(lora_As)
    quantized = isinstance(weight, Weight4bit)
    if compute_dtype is not None and not quantized:
        raise ValueError("compute_dtype applies to a 4-bit base weight (Weight4bit) only; a dense base computes in "
                         "x's dtype")
    if quantized:
        if fan_in_fan_out:
            raise ValueError("a 4-bit base stores its weight as (out, in): fan_in_fan_out must be False")
        in_features, out_features = weight.in_features, weight.out_features
    else:
        in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
        out_features = _out_features(weight, fan_in_fan_out)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"expected input of shape (..., {in_features}), got {tuple(x.shape)}")
    if n == 0 or len(lora_Bs) != n or len(scales) != n:
        raise ValueError(f"need one lora_A, lora_B and scale per adapter, got {len(lora_As)}, {len(lora_Bs)}, "
                         f"{len(scales)}")
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or A.shape[1] != in_features or tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"adapter {a}: lora_A must be (r, {in_features}) and lora_B ({out_features}, r); "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
    ps = [0.0] * n if dropout_ps is None else [float(p) for p in dropout_ps]
    if len(ps) != n or not all(0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"need one dropout probability in [0, 1] per adapter, got {ps}")
    if rows is None:
        if index is None:
            raise ValueError("lora_linear_mixed needs index (or rows from mixed_rows)")
        rows = mixed_rows(index, x, n)
    elif not all(t.is_contiguous() for t in rows):
        raise ValueError("rows must be the contiguous (idx_s, perm, seg) tensors mixed_rows returns")
    elif rows[0].numel() != x.numel() // max(1, x.shape[-1]) or rows[2].numel() != n + 1:
        raise ValueError(f"rows were sorted for {rows[0].numel()} rows and {rows[2].numel() - 1} adapters; "
                         f"this call has {x.numel() // max(1, x.shape[-1])} rows and {n} adapters")
    x = to_autocast_dtype(x)
    ps = ps if training else [0.0] * n
    if not any(p > 0.0 for p in ps):
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    A_stack, B_stack = stacks if stacks is not None else stack_adapters(list(lora_As), list(lora_Bs))
    idx_s, perm, seg = rows
    if quantized:
        fmt = _ops4bit.FMT_INT4 if weight.quant_type == "int4" else _ops4bit.FMT_BNB
        args = (x, weight.packed, weight.absmax, weight.code, weight.nested_code, weight.nested_absmax,
                weight.offset, weight.zeros, bias, A_stack, B_stack, idx_s, perm, seg, seed, fmt,
                int(weight.blocksize), int(weight.nested_blocksize), out_features, in_features,
                [float(s) for s in scales], ps, _ops4bit.wide_compute_dtype(x, compute_dtype))
        return _lora_mixed_4bit_call(*args)
    args = (x, weight, bias, A_stack, B_stack, idx_s, perm, seg, seed, [float(s) for s in scales], ps,
            bool(fan_in_fan_out))
    return _lora_mixed_call(*args)


_lora_mixed_call = two_routes("_LoraMixedFn", _lora_mixed_op, _mixed_body, _setup_context, _backward)
_lora_mixed_4bit_call = two_routes("_LoraMixed4bitFn", _lora_mixed_4bit_op, _mixed_4bit_body, _setup_context_4bit,
                                   _backward_4bit)

__all__ = ["BASE", "lora_linear_mixed", "mixed_rows", "sort_rows", "stack_adapters", "torch_mixed_backward",
           "torch_mixed_forward"]
