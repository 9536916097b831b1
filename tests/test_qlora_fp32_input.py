"""QLoRA with an input wider than the compute dtype: fp32 x over a bf16/fp16 ``compute_dtype`` (what
``prepare_model_for_kbit_training`` gives: fp32 norms feed the 4-bit projections).

The rule (peft's QLoRA layer over bitsandbytes' ``Linear4bit``): the base product is bitsandbytes' — x rounded to
the compute dtype, W0 decoded to it, fp32 accumulation (fastpeft keeps it in fp32 where bitsandbytes rounds it to
the compute dtype) — while the LoRA branch works on the exact fp32 x with the fp32 adapters; y and dx are fp32,
dx's base part is ``round(dy) W0``. Checked against float64 references built from bitsandbytes' own decode
(``bitsandbytes.functional.dequantize_4bit``, taken before any bitsandbytes forward) and against peft + bnb,
on both backends (the Triton side in the interpreter, tiny shapes).
"""

import copy

import pytest
import torch
from torch import nn

from fastpeft.layers import FastLoraLinear4bit
from fastpeft.ops4bit import lora_linear_4bit
from fastpeft.quant import Weight4bit
from fastpeft.reference import dropout_keep_mask, dropout_params
from helpers import assert_rel, peft_lora_on, rel_err

bnb = pytest.importorskip("bitsandbytes")

IN, OUT, R = 64, 40, 4
CDTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _bnb_linear(quant_type, cdt, seed=0, bias=True):
    """A bitsandbytes ``Linear4bit`` (weight quantized from fp32, double quantization for NF4) computing in ``cdt``."""
    g = torch.Generator().manual_seed(seed)
    nested = quant_type == "nf4"
    lin = bnb.nn.Linear4bit(IN, OUT, bias=bias, compute_dtype=cdt, compress_statistics=nested,
                            quant_type=quant_type, device="meta")
    w = torch.randn(OUT, IN, generator=g) * IN**-0.5
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=64)
    if bias:  # fp32, as after prepare_model_for_kbit_training's upcast
        lin.bias = nn.Parameter(torch.randn(OUT, generator=g) * 0.1, requires_grad=False)
    return lin.to("cpu")


def _bnb_weight(lin, cdt):
    """W0 as bitsandbytes multiplies by it: its own decode, cast to the compute dtype, as float64."""
    w = lin.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(cdt).double()


def _adapters(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, IN, generator=g) * 0.3, torch.randn(OUT, R, generator=g) * 0.1


def _set_adapters(layer, A, B):
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)


def _bf16_layer(seed, quant_type="nf4", **layer_kwargs):
    """``(lin, w, layer, A, B)``: a bnb base computing in bf16 (``_bnb_linear(seed=seed)``), its float64 weight as bnb
    multiplies by it, the fastpeft 4-bit LoRA layer around it and its adapters (``_adapters(seed + 1)``, set)."""
    lin = _bnb_linear(quant_type, torch.bfloat16, seed=seed)
    w = _bnb_weight(lin, torch.bfloat16)
    layer = FastLoraLinear4bit.from_linear(lin, r=R, lora_alpha=8, **layer_kwargs)
    A, B = _adapters(seed=seed + 1)
    _set_adapters(layer, A, B)
    return lin, w, layer, A, B


def _ref64(x2d, w, bias, A, B, scale, cdt, keep=None, c=1.0):
    """(y, base, delta) in float64: base = round(x) W0ᵀ + b, delta = scale · D(x) Aᵀ Bᵀ on the exact x."""
    base = x2d.to(cdt).double() @ w.t()
    if bias is not None:
        base = base + bias.double()
    xd = x2d.double() if keep is None else x2d.double() * keep.double() * c
    delta = scale * (xd @ A.double().t()) @ B.double().t()
    return base + delta, base, delta


def _grads64(dy2d, x2d, w, A, B, scale, cdt, keep=None, c=1.0):
    """(dx, dA, dB) in float64: dx = round(dy) W0 + c·m ⊙ (dS A), dS = scale · dy B on the exact dy."""
    dyd = dy2d.double()
    dS = scale * dyd @ B.double()
    lora_dx = dS @ A.double()
    xd = x2d.double()
    if keep is not None:
        lora_dx = lora_dx * keep.double() * c
        xd = xd * keep.double() * c
    dx = dy2d.to(cdt).double() @ w + lora_dx
    return dx, dS.t() @ xd, scale * dyd.t() @ (xd @ A.double().t())


def _data(seed=2, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, IN, generator=g), torch.randn(*shape, OUT, generator=g)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("cdt_name", ["bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_fp32_input_vs_fp64(backend, quant_type, cdt_name, p):
    """The op with ``compute_dtype``: y, dx, dA, dB, db against float64 with the op's own mask (explicit seed)."""
    cdt = CDTS[cdt_name]
    lin = _bnb_linear(quant_type, cdt)
    w = _bnb_weight(lin, cdt)
    w4 = Weight4bit.from_module(lin)
    A, B = (t.clone().requires_grad_() for t in _adapters())
    bias = lin.bias.detach().clone().requires_grad_()
    x, dy = _data()
    x.requires_grad_()
    seed = torch.tensor([4321], dtype=torch.int64)
    y = lora_linear_4bit(x, w4, bias, A, B, scale=1.5, dropout_p=p, seed=seed, compute_dtype=cdt)
    y.backward(dy)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    x2d, dy2d = x.detach().reshape(-1, IN), dy.reshape(-1, OUT)
    keep, c = None, 1.0
    if p > 0:
        keep, c = dropout_keep_mask(seed, x2d.shape[0], IN, p), dropout_params(p)[1]
        assert 0 < keep.sum() < keep.numel()
    ref, base, delta = _ref64(x2d, w, bias.detach(), A.detach(), B.detach(), 1.5, cdt, keep, c)
    y2d = y.detach().reshape(-1, OUT)
    assert_rel(y2d, ref, 1e-5, "y")
    assert_rel(y2d.double() - base, delta, 1e-5, "the LoRA term")  # on the exact fp32 x
    dx, dA, dB = _grads64(dy2d, x2d, w, A.detach(), B.detach(), 1.5, cdt, keep, c)
    assert_rel(x.grad.reshape(-1, IN), dx, 1e-5, "dx")
    assert_rel(A.grad, dA, 1e-5, "dA")
    assert_rel(B.grad, dB, 1e-5, "dB")
    assert_rel(bias.grad, dy2d.double().sum(0), 1e-5, "db")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("cdt_name", ["bf16", "fp16"])
def test_layer_fp32_input_vs_peft_and_fp64(backend, quant_type, cdt_name):
    """The layer on fp32 x: peft's numerics (adapter gradients equal, y and dx up to bnb's rounding of its base
    output), and float64 (the LoRA term exact to fp32 accuracy)."""
    pytest.importorskip("peft")
    cdt = CDTS[cdt_name]
    lin = _bnb_linear(quant_type, cdt, seed=3)
    w = _bnb_weight(lin, cdt)
    theirs = peft_lora_on(copy.deepcopy(lin), R, 8)
    ours = FastLoraLinear4bit.from_linear(copy.deepcopy(lin), r=R, lora_alpha=8)
    A, B = _adapters(seed=4)
    _set_adapters(ours, A, B)
    _set_adapters(theirs, A, B)
    x, dy = _data(seed=5)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((theirs, ours), xs)]
    for y in ys:
        y.backward(dy)
    yp, yo = (y.detach() for y in ys)
    assert yo.dtype == torch.float32 and xs[1].grad.dtype == torch.float32
    for n in ("lora_A", "lora_B"):  # the LoRA branch is peft's: fp32 on the exact x and dy
        assert_rel(getattr(ours, n)["default"].weight.grad, getattr(theirs, n)["default"].weight.grad, 1e-5, n)
    x2d, dy2d = x.reshape(-1, IN), dy.reshape(-1, OUT)
    ref, base, delta = _ref64(x2d, w, lin.bias, A, B, ours.scaling["default"], cdt)
    # bnb rounds its base output (x W0ᵀ, then + b: twice) and dx's base part to the compute dtype; fastpeft keeps
    # them in fp32, so the two differ by those roundings only
    eps = torch.finfo(cdt).eps
    bound = eps * ((x2d.to(cdt).double() @ w.t()).abs() + lin.bias.double().abs()) + 1e-5
    assert ((yo.reshape(-1, OUT) - yp.reshape(-1, OUT)).abs() <= bound).all(), "y: more than bnb's rounding"
    assert rel_err(xs[1].grad, xs[0].grad) < eps
    assert (base - ref).abs().max() > 1e-2  # the adapter matters
    assert_rel(yo.reshape(-1, OUT), ref, 1e-5, "y")
    assert_rel(yo.reshape(-1, OUT).double() - base, delta, 1e-5, "the LoRA term")
    dx, dA, dB = _grads64(dy2d, x2d, w, A, B, ours.scaling["default"], cdt)
    assert_rel(xs[1].grad.reshape(-1, IN), dx, 1e-5, "dx")
    assert_rel(ours.lora_A["default"].weight.grad, dA, 1e-5, "dA")
    assert_rel(ours.lora_B["default"].weight.grad, dB, 1e-5, "dB")


@pytest.mark.interp
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dx_mode", ["reduce", "epilogue"])
def test_layer_dropout_backends_agree(monkeypatch, quant_type, dx_mode):
    """With dropout the layer's two backends draw the same mask: the Triton path (both places dx's masked LoRA
    part can be added) against the PyTorch one, and the LoRA term on the exact x (y − the base as bnb computes
    it is the dropped-out LoRA term, whose size is that of the no-dropout one)."""
    monkeypatch.setenv("FASTPEFT_DX_DROPOUT", dx_mode)
    cdt = torch.bfloat16
    lin = _bnb_linear(quant_type, cdt, seed=6)
    w = _bnb_weight(lin, cdt)
    layer = FastLoraLinear4bit.from_linear(lin, r=R, lora_alpha=8, lora_dropout=0.25)
    _set_adapters(layer, *_adapters(seed=7))
    x, dy = _data(seed=8, shape=(2, 5))
    outs = []
    for be in ("torch", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", be)
        xi = x.clone().requires_grad_()
        torch.manual_seed(9)
        y = layer(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
                     layer.lora_B["default"].weight.grad.clone()))
        layer.zero_grad()
    for a, b, name in zip(*outs, ("y", "dx", "dA", "dB")):
        assert a.dtype == torch.float32
        assert_rel(b, a, 1e-5, name)
    x2d = x.reshape(-1, IN)
    ref, base, delta = _ref64(x2d, w, lin.bias, *_adapters(seed=7), layer.scaling["default"], cdt)
    lora = outs[1][0].reshape(-1, OUT).double() - base
    # dropout changes the LoRA term but not its scale; base + rounding noise would leave ~2⁻⁹·|base| instead
    assert 0.2 < lora.norm() / delta.norm() < 5 and rel_err(lora, delta) > 1e-3


@pytest.mark.interp
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_gemv_fp32_input(triton_backend, quant_type):
    """Few rows, no gradient: the fused GEMV takes x rounded to the compute dtype for the base and the exact x
    for the LoRA term, and returns fp32. (Its base product decodes W0 in registers, with its own roundings: the
    LoRA term is checked as the difference to the same call with B = 0.)"""
    from fastpeft.kernels import LAUNCHES

    cdt = torch.bfloat16
    lin, w, layer, A, B = _bf16_layer(10, quant_type)
    layer.eval()
    for rows in (3, 9):  # the register path (≤ 4 rows) and the tl.dot one
        x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows))
        before = LAUNCHES["lora_gemv_4bit"]
        with torch.no_grad():
            y = layer(x)
            _set_adapters(layer, A, torch.zeros_like(B))
            y0 = layer(x)
            _set_adapters(layer, A, B)
        assert LAUNCHES["lora_gemv_4bit"] == before + 2 and y.dtype == y0.dtype == torch.float32
        ref, base, delta = _ref64(x, w, lin.bias, A, B, layer.scaling["default"], cdt)
        assert_rel(y0, base, 4e-3, "the base term")  # bf16 accuracy
        assert_rel(y.double() - y0.double(), delta, 1e-5, "the LoRA term")


def test_dora_fp32_input_vs_fp64(backend):
    """DoRA (p = 0) on fp32 x: ``k ⊙ (round(x) W0ᵀ + s·x Aᵀ Bᵀ) + b`` with the LoRA part on the exact x."""
    cdt = torch.bfloat16
    lin, w, layer, A, B = _bf16_layer(12, use_dora=True)
    x, dy = _data(seed=14)
    x.requires_grad_()
    y = layer(x)
    y.backward(dy)
    k = layer._dora_scale("default").detach().double()
    _, base, delta = _ref64(x.detach().reshape(-1, IN), w, None, A, B, layer.scaling["default"], cdt)
    ref = k * (base + delta) + lin.bias.double()
    assert y.dtype == torch.float32
    assert_rel(y.detach().reshape(-1, OUT), ref, 1e-5, "y")
    assert torch.isfinite(layer.lora_A["default"].weight.grad).all()


def test_compute_dtype_input_unchanged_and_compiles(torch_backend):
    """x already in the compute dtype keeps the 16-bit path (bf16 out); the fp32 path traces under
    torch.compile (fake kernels and autograd of the ops with ``compute_dtype``) and computes the same."""
    cdt = torch.bfloat16
    lin, w, layer, A, B = _bf16_layer(15)
    x, _ = _data(seed=17)
    assert layer(x.to(cdt)).dtype == cdt
    y = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xi = x.clone().requires_grad_()
    yc = compiled(xi)
    yc.sum().backward()
    assert yc.dtype == torch.float32 and xi.grad.dtype == torch.float32
    assert_rel(yc.detach(), y.detach(), 1e-6)
    _, base, delta = _ref64(x.reshape(-1, IN), w, lin.bias, A, B, layer.scaling["default"], cdt)
    assert_rel(yc.detach().reshape(-1, OUT).double() - base, delta, 1e-5, "the LoRA term")


@pytest.mark.parametrize("x_dtype,compute", [(torch.float64, torch.bfloat16), (torch.float16, torch.bfloat16)])
def test_float64_and_fp16_over_bf16_inputs_take_the_wide_path(x_dtype, compute):
    """Inputs carrying more than the compute dtype other than fp32: the LoRA branch from x in fp32 (peft casts x to
    its fp32 adapters), the base as bitsandbytes computes it, the output in x's dtype; adapter gradients equal the
    fp32-input ones of the same x (the wide path itself)."""
    import fastpeft
    from fastpeft.quant import quantize_model

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 48))
    model = quantize_model(lin, quant_type="nf4", compute_dtype=compute)
    model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = (torch.randn(5, 64) * 0.5).to(x_dtype)
    g = torch.randint(-4, 5, (5, 48)) / 4  # exact in every dtype: the same upstream gradient for each input dtype
    grads = {}
    for dt in (x_dtype, torch.float32):
        model.zero_grad()
        y = model(x.to(dt))
        assert y.dtype == dt
        y.backward(g.to(dt))
        grads[dt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n in grads[torch.float32]:
        torch.testing.assert_close(grads[x_dtype][n], grads[torch.float32][n], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mixed-adapter batches and aLoRA
R2 = 2  # the second adapter's rank (the stacks pad it to R)


def _two_adapters(seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(R, IN, generator=g) * 0.3, torch.randn(R2, IN, generator=g) * 0.3],
            [torch.randn(OUT, R, generator=g) * 0.1, torch.randn(OUT, R2, generator=g) * 0.1])


@pytest.mark.parametrize("cdt_name", ["bf16", "fp16"])
@pytest.mark.parametrize("ps", [(0.0, 0.0), (0.3, 0.5)])
def test_mixed_op_fp32_input_vs_fp64(backend, cdt_name, ps):
    """``lora_linear_mixed`` on a 4-bit weight with ``compute_dtype``: each row's base as bitsandbytes computes it,
    its own adapter's LoRA term (own rank, scale, dropout) on the exact fp32 x; dx, every dA/dB and db against
    float64 with the op's masks (explicit seed; adapter a drops row m as the core does at p_a)."""
    from fastpeft.ops_mixed import lora_linear_mixed

    cdt = CDTS[cdt_name]
    lin = _bnb_linear("nf4", cdt, seed=20)
    w = _bnb_weight(lin, cdt)
    As, Bs = (list(t) for t in _two_adapters(21))
    As = [a.clone().requires_grad_() for a in As]
    Bs = [b.clone().requires_grad_() for b in Bs]
    bias = lin.bias.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(22)
    x, dy = torch.randn(4, 3, IN, generator=g), torch.randn(4, 3, OUT, generator=g)
    x.requires_grad_()
    index = torch.tensor([1, -1, 0, 1])  # per sequence, unsorted, one base row
    scales, seed = [1.5, 0.75], torch.tensor([777], dtype=torch.int64)
    y = lora_linear_mixed(x, Weight4bit.from_module(lin), bias, As, Bs, index, scales=scales, dropout_ps=list(ps),
                          seed=seed, compute_dtype=cdt)
    y.backward(dy)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    x2d, dy2d = x.detach().reshape(-1, IN), dy.reshape(-1, OUT)
    rows = index.repeat_interleave(3)
    ref = x2d.to(cdt).double() @ w.t() + bias.detach().double()
    dx_ref = dy2d.to(cdt).double() @ w
    for a in range(2):
        sel = rows == a
        keep, c = None, 1.0
        if ps[a] > 0:  # the full-size mask at adapter a's threshold, read on its own rows
            keep, c = dropout_keep_mask(seed, x2d.shape[0], IN, ps[a])[sel], dropout_params(ps[a])[1]
            assert 0 < keep.sum() < keep.numel()
        A, B = As[a].detach(), Bs[a].detach()
        _, _, delta = _ref64(x2d[sel], w, None, A, B, scales[a], cdt, keep, c)
        ref[sel] += delta
        dxa, dA, dB = _grads64(dy2d[sel], x2d[sel], w, A, B, scales[a], cdt, keep, c)
        dx_ref[sel] = dxa
        assert_rel(As[a].grad, dA, 1e-5, f"dA[{a}]")
        assert_rel(Bs[a].grad, dB, 1e-5, f"dB[{a}]")
    assert_rel(y.detach().reshape(-1, OUT), ref, 1e-5, "y")
    assert_rel(x.grad.reshape(-1, IN), dx_ref, 1e-5, "dx")
    assert_rel(bias.grad, dy2d.double().sum(0), 1e-5, "db")


def test_mixed_op_compute_dtype_needs_a_4bit_weight():
    from fastpeft.ops_mixed import lora_linear_mixed

    A, B = torch.zeros(2, 8), torch.zeros(6, 2)
    with pytest.raises(ValueError, match="4-bit base weight"):
        lora_linear_mixed(torch.randn(3, 8), torch.randn(6, 8), None, [A], [B], torch.tensor([0, 0, 0]),
                          scales=[1.0], compute_dtype=torch.bfloat16)


def test_layer_mixed_batch_fp32_input_vs_peft_and_single_adapter(backend):
    """A mixed ``adapter_names`` batch on a 4-bit layer with fp32 x: each row's LoRA term equals peft's
    ``adapter_names`` one (on the exact fp32 x); each adapter's gradients equal those of the single-adapter wide
    path on its own rows (exact fp32 LoRA branch, as peft's), so the two paths agree."""
    pytest.importorskip("peft")
    cdt = torch.bfloat16
    lin = _bnb_linear("nf4", cdt, seed=23)
    w = _bnb_weight(lin, cdt)
    theirs = peft_lora_on(copy.deepcopy(lin), R, 8)
    ours = FastLoraLinear4bit.from_linear(copy.deepcopy(lin), r=R, lora_alpha=8)
    ours.update_layer("other", r=R, lora_alpha=4, init_lora_weights=False)
    ours.set_adapter(["default", "other"])  # both trainable
    from peft import LoraConfig

    theirs.update_layer("other", r=R, lora_alpha=4, config=LoraConfig(r=R, lora_alpha=4),
                        lora_dropout=0.0, init_lora_weights=False)
    theirs.float()  # (peft's update_layer moves the new adapter to the compute dtype; get_peft_model casts back)
    weights = {"default": _adapters(seed=24), "other": _adapters(seed=25)}
    for m in (ours, theirs):
        for n, (A, B) in weights.items():
            with torch.no_grad():
                m.lora_A[n].weight.copy_(A)
                m.lora_B[n].weight.copy_(B)
    names = ["other", "default", "__base__", "other"]
    x, dy = _data(seed=26, shape=(4, 3))
    # peft's LoRA term: its mixed output less its base output (bnb's, rounded to bf16 on CPU, fastpeft's is not)
    yp, yp0 = (theirs(x.clone().requires_grad_(), adapter_names=n).detach() for n in (names, ["__base__"] * 4))
    xi = x.clone().requires_grad_()
    yo = ours(xi, adapter_names=names)
    yo.backward(dy)
    assert yo.dtype == torch.float32
    base = x.reshape(-1, IN).to(cdt).double() @ w.t()
    ref = (base + lin.bias.double()).reshape(4, 3, OUT)
    assert_rel(yo.detach().double() - ref, (yp - yp0).double(), 1e-5, "the LoRA terms, against peft's")
    # the LoRA term of each row on the exact x (float64)
    for i, n in enumerate(names):
        if n != "__base__":
            A, B = weights[n]
            ref[i] += ours.scaling[n] * (x[i].double() @ A.double().t()) @ B.double().t()
    assert_rel(yo.detach(), ref, 1e-5, "y")
    mixed = {n: (ours.lora_A[n].weight.grad.clone(), ours.lora_B[n].weight.grad.clone()) for n in weights}
    for n in weights:  # the single-adapter wide path on the adapter's own rows
        ours.zero_grad()
        ours.set_adapter(n)
        rows = [i for i, m in enumerate(names) if m == n]
        ours(x[rows]).backward(dy[rows])
        assert_rel(mixed[n][0], ours.lora_A[n].weight.grad, 1e-6, f"dA {n}")
        assert_rel(mixed[n][1], ours.lora_B[n].weight.grad, 1e-6, f"dB {n}")


def test_alora_fp32_input_takes_the_wide_path(backend):
    """An aLoRA adapter on a 4-bit layer with fp32 x: base as bitsandbytes computes it everywhere, the LoRA term
    on the exact x on the activated tokens only."""
    cdt = torch.bfloat16
    lin, w, layer, A, B = _bf16_layer(27, use_alora=True)
    x, dy = _data(seed=29, shape=(3, 5))
    x.requires_grad_()
    offsets = [2, None, 5]
    y = layer(x, alora_offsets=offsets)
    y.backward(dy)
    keep = torch.zeros(3, 5, dtype=torch.bool)
    keep[0, -2:] = keep[2, :] = True
    _, base, delta = _ref64(x.detach().reshape(-1, IN), w, lin.bias, A, B, layer.scaling["default"], cdt)
    ref = base + delta * keep.reshape(-1, 1).double()
    assert y.dtype == torch.float32
    assert_rel(y.detach().reshape(-1, OUT), ref, 1e-5, "y")
    assert rel_err(y.detach().reshape(-1, OUT)[keep.reshape(-1)].double(), base[keep.reshape(-1)]) > 1e-3
    dS = layer.scaling["default"] * dy.reshape(-1, OUT).double()[keep.reshape(-1)] @ B.double()
    assert_rel(layer.lora_A["default"].weight.grad, dS.t() @ x.detach().reshape(-1, IN).double()[keep.reshape(-1)],
               1e-5, "dA")
