"""The fused LoRA linear op: registered once with ``torch.library``, with its autograd.

``fastpeft::lora_linear`` runs the Triton kernels (``fastpeft.kernels``) on CUDA
tensors and the plain-PyTorch reference (``fastpeft.reference``) elsewhere;
``FASTPEFT_BACKEND=auto|triton|torch`` overrides the choice (``triton`` with
``TRITON_INTERPRET=1`` set before import runs the kernels on CPU tensors).

Both ops are ``torch.library.custom_op`` with fake kernels, so ``torch.compile``
traces through them without a graph break. The dropout seed is drawn from
torch's generator *outside* the op (``lora_linear`` below) and passed in as a
one-element int64 tensor, so the op is a pure function of its inputs:
backward and checkpoint recomputation replay the same mask.

Chain rule (``D`` = dropout with keep-mask ``m``, ``xa = D(x) Aᵀ``,
``y = x W0ᵀ + b + scale · xa Bᵀ``, ``dS = scale · dy B``)::

    ∂L/∂x = dy W0 + c · m ⊙ (dS A)          (c = 65536 / (65536 − t): ``reference.dropout_params``)
    ∂L/∂A = dSᵀ D(x)        ∂L/∂B = scale · dyᵀ xa        ∂L/∂b = Σ_rows dy

Saved for backward: ``x`` (the caller's tensor, not a copy), ``xa`` (N×r fp32),
the seed (8 bytes), and the parameters.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:  # Triton is optional off Linux; the PyTorch path needs nothing else.
    from . import kernels as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _kernels = None

BACKENDS = ("auto", "triton", "torch")


def backend_for(t: Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation runs for a tensor on ``t``'s device."""
    choice = os.environ.get("FASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"FASTPEFT_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch" or t.dtype == torch.float64:  # (float64: the plain path, in float64 throughout)
        return "torch"
    if _kernels is None:
        if choice == "triton":
            raise RuntimeError("FASTPEFT_BACKEND=triton but triton could not be imported")
        return "torch"
    if t.device.type == "cuda":
        if t.dtype == torch.bfloat16 and _kernels.cuda_properties(t.device).major < 8:
            if choice == "triton":
                raise RuntimeError("bf16 Triton kernels need compute capability ≥ 8.0; "
                                   "use fp16 or FASTPEFT_BACKEND=torch on this GPU")
            return "torch"
        return "triton"
    if choice == "triton":
        if _kernels.interpreting():
            return "triton"
        raise RuntimeError(f"FASTPEFT_BACKEND=triton on a {t.device.type} tensor needs TRITON_INTERPRET=1 "
                           "set before fastpeft is imported (Triton's CPU interpreter)")
    return "torch"


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def op_output(t: Tensor, shape) -> Tensor:
    """``t`` (a tensor the op made) with ``shape``, as a tensor of its own rather than a view of ``t``: the same
    memory, no copy. A custom op's output that is a view cannot be modified in place by the caller (autograd
    refuses it: "a view ... created inside a custom Function"), and models do that to linear outputs (Falcon's
    ``mlp_output += attention_output``)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape and t._base is None:
        return t
    if not t.is_contiguous():
        t = t.contiguous()
    out = t.new_empty(0)
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return out.set_(t.untyped_storage(), t.storage_offset(), shape, tuple(reversed(stride)))


def _out_features(weight: Tensor, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def _forward_body(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  seed: Optional[Tensor], scale: float, dropout_p: float,
                  fan_in_fan_out: bool) -> tuple[Tensor, Tensor]:
    x2d = _flat(x)
    # The dtypes are fixed by the caller (lora_linear applies autocast's cast to x); autocast
    # must not recast the reference's fp32 LoRA matmuls inside the op.
    with torch.autocast(x.device.type, enabled=False):
        return _forward_impl(x, x2d, weight, bias, lora_A, lora_B, seed, scale, dropout_p, fan_in_fan_out)


_lora_linear_op = torch.library.custom_op("fastpeft::lora_linear", _forward_body, mutates_args=())


def _forward_impl(x, x2d, weight, bias, lora_A, lora_B, seed, scale, dropout_p, fan_in_fan_out):
    if backend_for(x) == "triton":
        thr = reference.dropout_threshold(dropout_p)
        y, xa = _kernels.lora_linear_forward(x2d, weight, bias, lora_A, lora_B, seed, scale, dropout_p,
                                             fan_in_fan_out, thr)
    else:
        y, xa = reference.lora_linear_forward(x2d, weight, bias, lora_A, lora_B, seed, scale, dropout_p,
                                              fan_in_fan_out)
    return op_output(y, (*x.shape[:-1], y.shape[-1])), op_output(xa, xa.shape)


def fake_forward(x: Tensor, in_features: int, out_features: int, rank: int) -> tuple[Tensor, Tensor]:
    """Fake-kernel outputs of a LoRA forward op (this one and the 4-bit / mixed ones): ``y`` (..., out)
    in x's dtype and ``xa`` (N, rank) fp32 (float64 for a float64 ``x``: ``reference.acc_dtype``)."""
    torch._check(x.shape[-1] == in_features, lambda: "x and the layer's weights disagree on in_features")
    n = 1
    for s in x.shape[:-1]:
        n = n * s
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(n, rank, dtype=reference.acc_dtype(x))


def fake_backward(x: Tensor, lora_A: Tensor, lora_B: Tensor, out_features: int, need_dx: bool, need_dA: bool,
                  need_dB: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake-kernel outputs of a LoRA backward op: ``(dx, dA, dB, dbias)``, empty where not needed."""
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_dA else x.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else x.new_empty(0),
            x.new_empty(out_features, dtype=reference.acc_dtype(x)) if need_dbias else x.new_empty(0))


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scale, dropout_p, fan_in_fan_out):
    return fake_forward(x, lora_A.shape[1], _out_features(weight, fan_in_fan_out), lora_A.shape[0])


def _backward_body(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                   seed: Optional[Tensor], scale: float, dropout_p: float, fan_in_fan_out: bool,
                   need_dx: bool, need_dA: bool, need_dB: bool,
                   need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _backward_impl(dy, x, weight, lora_A, lora_B, xa, seed, scale, dropout_p, fan_in_fan_out,
                              need_dx, need_dA, need_dB, need_dbias)


_lora_linear_backward_op = torch.library.custom_op("fastpeft::lora_linear_backward", _backward_body,
                                                   mutates_args=())


def _backward_impl(dy, x, weight, lora_A, lora_B, xa, seed, scale, dropout_p, fan_in_fan_out,
                   need_dx, need_dA, need_dB, need_dbias):
    x2d, dy2d = _flat(x), _flat(dy)
    if backend_for(x) == "triton":
        thr = reference.dropout_threshold(dropout_p)
        grads = _kernels.lora_linear_backward(dy2d, x2d, weight, lora_A, lora_B, xa, seed, scale, dropout_p,
                                              fan_in_fan_out, thr, need_dx, need_dA, need_dB, need_dbias)
    else:
        grads = reference.lora_linear_backward(dy2d, x2d, weight, lora_A, lora_B, xa, seed, scale, dropout_p,
                                               fan_in_fan_out, need_dx, need_dA, need_dB, need_dbias)
    return op_grads(x, grads)


def op_grads(x: Tensor, grads) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A backward op's ``(dx, dA, dB, dbias)`` as custom ops must return them: ``dx`` in x's shape, and an
    empty tensor for each gradient not computed (custom ops cannot return None)."""
    dx, dA, dB, dbias = grads
    empty = x.new_empty(0)
    return (empty if dx is None else op_output(dx, x.shape),
            empty.clone() if dA is None else dA,
            empty.clone() if dB is None else dB,
            empty.clone() if dbias is None else dbias)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scale, dropout_p, fan_in_fan_out,
      need_dx, need_dA, need_dB, need_dbias):
    return fake_backward(x, lora_A, lora_B, _out_features(weight, fan_in_fan_out), need_dx, need_dA, need_dB,
                         need_dbias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scale, dropout_p, fan_in_fan_out = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scale, ctx.dropout_p, ctx.fan_in_fan_out = scale, dropout_p, fan_in_fan_out
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(xa)


def _backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[1]:
        raise RuntimeError("fastpeft's LoRA op keeps the base weight frozen: it computes no gradient for it. "
                           "Call base_layer.weight.requires_grad_(False), or train it without fastpeft.")
    need_dx, need_dbias, need_dA, need_dB = need[0], need[2], need[3], need[4]
    if torch.is_grad_enabled():  # backward with create_graph=True: gradients that are differentiable themselves
        dx, dA, dB, dbias = _differentiable_grads(dy, x, weight, lora_A, lora_B, seed, ctx.scale, ctx.dropout_p,
                                                  ctx.fan_in_fan_out)
        return (dx if need_dx else None, None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                dA if need_dA else None, dB if need_dB else None, None, None, None, None)
    op = _backward_body if getattr(ctx, "eager", False) else _lora_linear_backward_op
    dx, dA, dB, dbias = op(dy, x, weight, lora_A, lora_B, xa, seed, ctx.scale, ctx.dropout_p, ctx.fan_in_fan_out,
                           need_dx, need_dA, need_dB, need_dbias)
    return (dx if need_dx else None, None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            dA if need_dA else None, dB if need_dB else None,
            None, None, None, None)


def _differentiable_grads(dy, x, weight, lora_A, lora_B, seed, scale, dropout_p, fan_in_fan_out):
    """``(dx, dA, dB, dbias)`` of the LoRA op by the reference backward, which is plain, differentiable PyTorch
    (the same formulas and dropout mask as the fused backward; ``xa`` recomputed from x and A rather than read back,
    so that it carries their graph), for a backward that builds a graph (``create_graph=True``: gradient penalties,
    double backward). The fused backward op has no autograd formula of its own."""
    x2d = _flat(x)
    keep = reference.dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], dropout_p, device=x2d.device) \
        if reference.drops(dropout_p) else None
    acc = reference.acc_dtype(x2d)
    xa = reference.masked(x2d.to(acc), keep, dropout_p) @ lora_A.to(acc).t()
    dx, dA, dB, dbias = reference.lora_linear_backward(_flat(dy), x2d, weight, lora_A, lora_B, xa, seed, scale,
                                                       dropout_p, fan_in_fan_out, need_dbias=True, keep=keep)
    return dx.reshape(x.shape), dA, dB, dbias


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def traced(x: Tensor) -> bool:
    """Whether a LoRA op call must go through its ``torch.library`` custom op rather than the eager Function
    (``two_routes``): under ``torch.compile`` or ``torch.jit.trace`` (traced), for a meta tensor or a tensor
    subclass or under a dispatch mode (FakeTensor / FakeTensorMode: the fake kernel runs; FlopCounterMode and
    selective checkpointing see the op), and inside ``torch.func`` transforms (``vmap``, ``grad``: the custom op's
    rules)."""
    if torch.compiler.is_compiling():  # (first: what follows is not traceable)
        return True
    return (x.device.type == "meta" or type(x) is not Tensor or _functorch_active()
            or torch._C._len_torch_dispatch_stack() > 0 or torch.jit.is_tracing())


def refuse_double_backward(what: str) -> None:
    """The backward of an op without a differentiable backward, asked to build a graph (``create_graph=True``:
    a gradient penalty, double backward): a clear error instead of gradients missing the saved ``xa``'s graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"double backward (create_graph=True) through fastpeft's {what} is not supported: only the "
                           "dense single-adapter LoRA op has a differentiable backward (not 4-bit bases, adapter_names "
                           "batches or aLoRA adapters, which run the mixed-adapter op)")


def two_routes(name: str, op, body, setup_context, backward):
    """The one call of a LoRA op with autograd: ``call(*inputs)`` gives its first output through the
    ``torch.library`` custom ``op`` where ``traced(inputs[0])``, else through a plain ``torch.autograd.Function``
    running the op's own ``body`` with its ``setup_context`` and ``backward`` (``ctx.eager`` set, so the backward
    calls its body directly too). The eager route skips the dispatcher's per-call cost of a custom op (about 55 µs
    of host time per layer fwd+bwd on a CPU core, 8 µs per forward); the compiler traces the custom op (fake
    kernels, no graph break)."""

    def forward(ctx, *inputs):
        out = body(*inputs)
        ctx.eager = True
        setup_context(ctx, inputs, out)
        return out

    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward)})

    def call(*inputs):
        return (op(*inputs) if traced(inputs[0]) else function.apply(*inputs))[0]

    return call


@torch.library.custom_op("fastpeft::philox_dropout", mutates_args=())
def _philox_dropout_op(x: Tensor, seed: Tensor, dropout_p: float) -> Tensor:
    # The mask is regenerated from Philox keyed by (seed, column group, row) over x's rows (all leading dims
    # flattened), as kernels/philox.py keys it: the same stream the LoRA ops draw from, so with the same seed
    # it drops exactly the elements they drop.
    with torch.autocast(x.device.type, enabled=False):
        return reference.apply_dropout(_flat(x), seed, dropout_p).reshape(x.shape).clone()


@_philox_dropout_op.register_fake
def _(x, seed, dropout_p):
    return torch.empty_like(x)


def _philox_dropout_setup(ctx, inputs, output):
    _, seed, dropout_p = inputs
    ctx.save_for_backward(seed)
    ctx.dropout_p = dropout_p


def _philox_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _philox_dropout_op(grad, seed, ctx.dropout_p), None, None


_philox_dropout_op.register_autograd(_philox_dropout_backward, setup_context=_philox_dropout_setup)


def philox_dropout(x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """``c · m ⊙ x`` with the keep-mask ``m`` and keep scale ``c`` of ``fastpeft.ops.lora_linear``'s dropout under
    the same ``seed`` (Philox4x32-10 keyed by ``(seed, column group, row)``; both backends agree bit for bit), as a new
    tensor, differentiable in ``x``. Autograd keeps only the seed: backward regenerates the mask. Runs the
    PyTorch Philox on every device (no fused kernel: DoRA's dropout path is its only user). Example::

        seed = draw_seed(x.device)
        xd = philox_dropout(x, 0.1, seed)   # the D(x) that lora_linear(x, ..., dropout_p=0.1, seed=seed) uses
    """
    return _philox_dropout_op(x, seed, reference.check_dropout_p(dropout_p))


def draw_seed(device: torch.device | str) -> Tensor:
    """A dropout seed from torch's generator on ``device`` (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def check_lora_inputs(x: Tensor, in_features: int, out_features: int, lora_A: Tensor, lora_B: Tensor,
                      dropout_p: float) -> None:
    """The dtype, shape and dropout checks every LoRA entry point makes, with the same messages."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input (as nn.Linear), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"expected input of shape (..., {in_features}), got {tuple(x.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, in_features) or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_A must be ({r}, {in_features}) and lora_B ({out_features}, {r}); "
                         f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    reference.check_dropout_p(dropout_p)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes ``x``'s matmuls in, or None (autocast off, or a device without autocast,
    e.g. "meta", where ``torch.is_autocast_enabled`` itself raises). float64 is left alone, as autocast leaves it
    (``nn.Linear`` on float64 input stays float64 under autocast)."""
    if x.device.type == "meta" or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def to_autocast_dtype(x: Tensor) -> Tensor:
    """``x`` cast to autocast's dtype when autocast is on (what ``nn.Linear`` computes in), else ``x``."""
    cast = autocast_dtype(x)
    return x if cast is None else x.to(cast)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, *,
                scale: float, dropout_p: float = 0.0, training: bool = True, fan_in_fan_out: bool = False,
                seed: Optional[Tensor] = None) -> Tensor:
    """``x W0ᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` as one fused op, differentiable in x, A, B, b.

    ``weight`` is (out, in), or (in, out) with ``fan_in_fan_out``. Dropout acts
    only when ``training`` and ``dropout_p > 0``; its seed is drawn here from
    torch's generator unless given. Computes in ``x``'s dtype (or autocast's)
    and returns that dtype.

    Example::

        y = lora_linear(x, lin.weight, lin.bias, A, B, scale=2.0, dropout_p=0.1)
        y.sum().backward()
    """
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    check_lora_inputs(x, in_features, _out_features(weight, fan_in_fan_out), lora_A, lora_B, dropout_p)
    x = to_autocast_dtype(x)
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    elif not (isinstance(seed, Tensor) and seed.dtype == torch.int64 and seed.numel() == 1
              and seed.device == x.device):
        got = f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}" if isinstance(seed, Tensor) else repr(seed)
        raise ValueError(f"seed must be a one-element int64 tensor on {x.device} (see draw_seed), got {got}")
    return _lora_linear_call(x, weight, bias, lora_A, lora_B, seed, float(scale), p, bool(fan_in_fan_out))


_lora_linear_call = two_routes("_LoraLinearFn", _lora_linear_op, _forward_body, _setup_context, _backward)
