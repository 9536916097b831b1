"""The registered op and its autograd, on both backends (Triton interpreted on CPU)."""

import pytest
import torch

import fastpeft.kernels as K
from fastpeft import lora_linear
from fastpeft.ops import backend_for, draw_seed
from fastpeft.reference import dropout_keep_mask
from helpers import assert_rel, lora_ref64


def _inputs(N=(3, 7), fin=37, fout=29, r=5, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*N, fin, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(fout, fin, generator=g) / fin**0.5).to(dtype)
    b = torch.randn(fout, generator=g).to(dtype).requires_grad_() if bias else None
    A = (torch.randn(r, fin, generator=g) / fin**0.5).requires_grad_()
    B = torch.randn(fout, r, generator=g).requires_grad_()
    return x, W, b, A, B


def _run(x, W, b, A, B, p, seed, dy=None):
    for t in (x, b, A, B):
        if t is not None:
            t.grad = None
    y = lora_linear(x, W, b, A, B, scale=1.5, dropout_p=p, seed=seed)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), x.grad, A.grad, B.grad, (None if b is None else b.grad)


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.35])
def test_backends_agree_with_dropout(monkeypatch, dtype, p):
    """Same seed → the same mask on both backends, so they agree to rounding with dropout on."""
    x, W, b, A, B = _inputs(dtype=dtype)
    seed = torch.tensor([99], dtype=torch.int64)
    dy = torch.randn(3, 7, 29).to(dtype)
    out = {}
    for be in ("torch", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", be)
        assert backend_for(x) == be
        out[be] = _run(x, W, b, A, B, p, seed, dy)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, t, k in zip(("y", "dx", "dA", "dB", "db"), out["torch"], out["triton"]):
        assert_rel(k, t, tol, name)
    y64 = lora_ref64(x.detach().reshape(-1, 37), W, b.detach(), A.detach(), B.detach(), 1.5, p, seed)
    assert_rel(out["triton"][0].reshape(-1, 29), y64, tol, "y vs fp64")


def test_kernels_really_launch(triton_backend):
    before = sum(K.LAUNCHES.values())
    x, W, b, A, B = _inputs()
    _run(x, W, b, A, B, 0.1, None)
    assert sum(K.LAUNCHES.values()) - before >= 5  # down + gemm forward; down, gemm, 2× reduce backward


def test_backward_uses_forward_mask_finite_differences(backend):
    """y is linear in x (and in A for fixed B) under a fixed mask: a central difference equals
    ⟨grad, v⟩ to rounding — and would not if backward regenerated a different mask."""
    x, W, b, A, B = _inputs(N=(11,), r=4)
    seed = torch.tensor([2024], dtype=torch.int64)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(11, 29, generator=g)
    _, dx, dA, dB, _ = _run(x, W, b, A, B, 0.5, seed, dy)

    def f(xv, Av, Bv):
        with torch.no_grad():
            return (lora_linear(xv, W, b, Av, Bv, scale=1.5, dropout_p=0.5, seed=seed) * dy).sum().double()

    eps = 1e-2
    for grad, which in ((dx, 0), (dA, 1), (dB, 2)):
        args = [x.detach(), A.detach(), B.detach()]
        v = torch.randn(args[which].shape, generator=g)
        plus = list(args)
        minus = list(args)
        plus[which] = args[which] + eps * v
        minus[which] = args[which] - eps * v
        fd = (f(*plus) - f(*minus)) / (2 * eps)
        an = (grad.double() * v.double()).sum()
        assert abs(fd - an) <= 2e-3 * abs(an) + 1e-3, (which, fd.item(), an.item())
    # and the same check with a different seed in the difference must fail
    wrong = torch.tensor([7], dtype=torch.int64)
    with torch.no_grad():
        v = torch.randn(x.shape, generator=g)
        fd_wrong = ((lora_linear(x + eps * v, W, b, A, B, scale=1.5, dropout_p=0.5, seed=wrong)
                     - lora_linear(x - eps * v, W, b, A, B, scale=1.5, dropout_p=0.5, seed=wrong)) * dy).sum()
    assert abs(fd_wrong / (2 * eps) - (dx * v).sum()) > 1e-2


def test_seed_reproducibility_and_independent_masks(backend):
    x, W, b, A, B = _inputs()
    torch.manual_seed(3)
    y1 = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.5)
    y2 = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.5)  # a second module's call: a new seed
    torch.manual_seed(3)
    y3 = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.5)
    assert torch.equal(y1, y3)
    assert not torch.equal(y1, y2)


def test_p0_and_eval_draw_no_random_numbers(backend):
    x, W, b, A, B = _inputs()
    state = torch.random.get_rng_state()
    y0 = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.0)
    y0.sum().backward()
    y_eval = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.4, training=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(y0, y_eval)  # eval dropout is the identity, bit for bit


def test_dropout_statistics():
    """≥ 1M elements: dropped fraction within 0.01 of p; mean of D(1) unbiased."""
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(torch.tensor([123]), 1024, 1024, p)
        assert abs((1 - keep.float().mean().item()) - p) < 0.01
        assert abs(keep.float().mean().item() / (1 - p) - 1.0) < 0.01


def test_saved_bytes_are_x_once_plus_xa(backend):
    """Autograd keeps x (the caller's storage, once for q/k/v sharing it), xa and the seed — no mask."""
    fin, r = 37, 5
    layers = [_inputs(N=(6, 7), r=r, seed=s)[1:] for s in range(3)]
    x = torch.randn(6, 7, fin, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for lw in layers for t in lw if t is not None}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.1) for (W, b, A, B) in layers]
    assert x.untyped_storage().data_ptr() in seen
    n = 6 * 7
    assert sum(seen.values()) == x.numel() * 4 + 3 * (n * r * 4 + 8)
    sum(y.sum() for y in ys).backward()
    assert x.grad is not None


def test_bad_input_errors():
    x, W, b, A, B = _inputs()
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 37\)"):
        lora_linear(torch.randn(4, 36), W, b, A, B, scale=1.0)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\]"):
        lora_linear(x, W, b, A, B, scale=1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, W, b, A[:, :10], B, scale=1.0)


def test_backend_env_validation(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of"):
        backend_for(torch.zeros(1))


def test_no_graph_break_under_compile(backend):
    """The op is a registered custom op with a fake kernel: dynamo traces it whole."""
    x, W, b, A, B = _inputs()
    seed = draw_seed("cpu")

    def f(x, A, B):
        return lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.2, seed=seed)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y_c = compiled(x, A, B)
    y_e = f(x, A, B)
    assert torch.equal(y_c, y_e)
    gc = torch.autograd.grad(y_c.sum(), (x, A, B))
    ge = torch.autograd.grad(y_e.sum(), (x, A, B))
    for a, c in zip(gc, ge):
        assert torch.equal(a, c)


def test_frozen_weight_is_enforced():
    x, W, b, A, B = _inputs()
    W.requires_grad_()
    y = lora_linear(x, W, b, A, B, scale=1.0)
    with pytest.raises(RuntimeError, match="base weight frozen"):
        y.sum().backward()


def test_empty_batch(backend):
    x, W, b, A, B = _inputs(N=(0, 3))
    y = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.2)
    assert y.shape == (0, 3, 29)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0
    assert torch.count_nonzero(b.grad) == 0


def test_expanded_and_transposed_grad_output(backend):
    """A stride-0 dy (from expand) and a transposed x give the contiguous results."""
    x, W, b, A, B = _inputs(N=(6,))
    seed = torch.tensor([5], dtype=torch.int64)
    g = torch.randn(1, 29)
    res = []
    for make_dy, make_x in ((lambda y: g.expand_as(y), lambda t: t),
                            (lambda y: g.expand_as(y).contiguous(), lambda t: t.t().contiguous().t())):
        xx = make_x(x.detach()).requires_grad_()
        y = lora_linear(xx, W, b, A, B, scale=1.0, dropout_p=0.3, seed=seed)
        A.grad = B.grad = None
        y.backward(make_dy(y))
        res.append((y.detach(), xx.grad, A.grad, B.grad))
    for a, c in zip(*res):
        if backend == "triton":  # the kernels read any strides in the same order: bit-identical
            assert torch.equal(a, c)
        else:  # the torch path hands the transposed x to the CPU BLAS, which may pick another kernel (seen: the
            # last bit differs on an AMD EPYC CPU)
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_backward_under_autocast(backend):
    """Under CPU autocast the op computes in bf16 like nn.Linear, and backward works (the op's
    body must not let autocast recast its fp32 LoRA products)."""
    x, W, b, A, B = _inputs(N=(5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert torch.isfinite(A.grad).all() and torch.count_nonzero(B.grad) > 0


def test_seed_is_validated():
    x, W, b, A, B = _inputs()
    for bad in (7, torch.tensor([7], dtype=torch.int32), torch.tensor([1, 2]), torch.tensor(3.0)):
        with pytest.raises(ValueError, match="seed must be a one-element int64 tensor"):
            lora_linear(x, W, b, A, B, scale=1.0, dropout_p=0.1, seed=bad)


def test_philox_dropout_drops_what_the_lora_op_drops(backend):
    """``philox_dropout(x, p, seed)`` is the D(x) of ``lora_linear(..., dropout_p=p, seed=seed)``: with A = I
    and B = I the op's LoRA term is D(x) itself. Backward applies the same mask; only the seed is kept."""
    from fastpeft.ops import philox_dropout

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    seed = draw_seed("cpu")
    xd = philox_dropout(x, 0.3, seed)
    eye = torch.eye(16)
    op = lora_linear(x.detach(), torch.zeros(16, 16), None, eye, eye, scale=1.0, dropout_p=0.3, seed=seed)
    assert_rel(xd.detach(), op, 1e-6, "D(x)")
    keep = dropout_keep_mask(seed, 18, 16, 0.3).reshape(2, 9, 16)
    assert torch.equal(xd == 0, ~keep & (x != 0))
    dy = torch.randn(2, 9, 16, generator=g)
    xd.backward(dy)
    keep_scale = 65536 / (65536 - round(0.3 * 65536))  # the exact keep probability's inverse (≈ 1/0.7)
    assert_rel(x.grad, torch.where(keep, dy * keep_scale, 0.0), 1e-6, "backward")
    with pytest.raises(ValueError, match="dropout probability"):
        philox_dropout(x, 1.5, seed)


@pytest.mark.parametrize("N", [(6,), (2, 3)])
def test_outputs_can_be_modified_in_place(backend, N):
    """The ops' outputs are tensors of their own, not views made inside the custom Function, so a model may add into
    them in place (Falcon: ``mlp_output += attention_output``); the gradients then are those of the out-of-place
    sum. Dense, 4-bit and mixed-adapter ops, 2-D and 3-D inputs."""
    import torch.nn as nn

    from fastpeft import FastLoraLinear
    from fastpeft import quant as Q
    from fastpeft.layers import FastLoraLinear4bit

    torch.manual_seed(0)
    dense = FastLoraLinear(37, 29, r=5, init_lora_weights=False)
    quantized = FastLoraLinear4bit.from_linear(Q.quantize_linear(nn.Linear(64, 24), "nf4", blocksize=32), r=4,
                                               init_lora_weights=False)
    mixed = FastLoraLinear(37, 29, r=5, init_lora_weights=False)
    mixed.add_adapter("other", r=3, init_lora_weights=False)
    cases = [(dense, 37, {}), (quantized, 64, {}), (mixed, 37, {"adapter_names": (["other", "default"] * 3)[:N[0]]})]
    for layer, fin, kw in cases:
        x = torch.randn(*N, fin)
        extra = torch.randn(*N, layer.out_features)
        grads = []
        for in_place in (False, True):
            layer.zero_grad(set_to_none=True)
            y = layer(x, **kw)
            if in_place:
                y += extra
            else:
                y = y + extra
            y.square().sum().backward()
            grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_gradient_penalty(backend, p):
    """A gradient penalty (``create_graph=True``, then backward through the gradient): the op's gradients are
    differentiable, with the forward's dropout mask; against the same function in float64 plain PyTorch."""
    from fastpeft.reference import dropout_keep_mask

    g = torch.Generator().manual_seed(3)
    x0, W, b0 = torch.randn(2, 3, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    A0, B0, gy = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 3, 4, generator=g)
    seed = torch.tensor([7], dtype=torch.int64)
    keep = dropout_keep_mask(seed, 6, 5, p).reshape(2, 3, 5) if p else torch.ones(2, 3, 5, dtype=torch.bool)

    def penalty(op, dtype):
        x, b, A, B = [t.detach().to(dtype).clone().requires_grad_() for t in (x0, b0, A0, B0)]
        y = op(x, W.to(dtype), b, A, B)
        gx, = torch.autograd.grad((y * gy.to(dtype)).sum(), x, create_graph=True)
        ((gx ** 2).sum() + (y ** 2).sum()).backward()
        return [t.grad for t in (x, b, A, B)]

    ours = penalty(lambda x, W, b, A, B: lora_linear(x, W, b, A, B, scale=1.5, dropout_p=p, seed=seed), torch.float32)
    ref = penalty(lambda x, W, b, A, B: x @ W.t() + b + 1.5 * ((x * keep / (1 - p)) @ A.t()) @ B.t(), torch.float64)
    for got, want in zip(ours, ref):
        assert_rel(got.double(), want, 1e-5)
