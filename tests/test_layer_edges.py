"""Layer behaviours at the edges of peft users' habits, each checked against peft 0.21.2's own layer (same weights)
or float64: merging while the adapters are off, safe_merge on a half-precision base, merge() with names a layer does
not hold, float64 (computed in float64 throughout: gradcheck passes), a trainable base under no_grad, and the
adapters' trainability while switched off. Both backends (Triton kernels in the interpreter)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.layers.conv import FastLoraConv
from fastpeft.layers.embedding import FastLoraEmbedding

peft = pytest.importorskip("peft")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        from fastpeft import ops

        if ops._kernels is None or not ops._kernels.interpreting():
            pytest.skip("Triton interpreter not active (TRITON_INTERPRET=1 before import)")
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


def _pair(dtype=torch.float32, bias=True, **kw):
    """A FastLoraLinear and peft's lora.Linear over copies of one nn.Linear, same (non-zero) adapter weights."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias, dtype=dtype)
    ours = fastpeft.FastLoraLinear.from_linear(copy.deepcopy(base), r=2, lora_alpha=4, **kw)
    theirs = peft.tuners.lora.Linear(copy.deepcopy(base), "default", r=2, lora_alpha=4,
                                     config=peft.LoraConfig(r=2, lora_alpha=4, **kw), **kw)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    return ours, theirs


def _conv():
    torch.manual_seed(0)
    layer = FastLoraConv.from_conv(nn.Conv2d(3, 4, 3, padding=1), r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer, torch.randn(2, 3, 5, 5)


def _embedding():
    torch.manual_seed(0)
    layer = FastLoraEmbedding.from_embedding(nn.Embedding(10, 4), r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_embedding_B["default"].normal_()
    return layer, torch.tensor([[1, 2, 3], [4, 5, 9]])


def _linear():
    layer, _ = _pair()
    return layer, torch.randn(3, 6)


# --------------------------------------------------------------------------- merging while disabled
@pytest.mark.parametrize("make", [_linear, _embedding, _conv], ids=["linear", "embedding", "conv"])
def test_merge_while_disabled_runs_the_base(make, backend):
    """merge() after enable_adapters(False): the forward is the base layer's (peft's forward unmerges first), and
    the base weight is back to the original."""
    layer, x = make()
    with torch.no_grad():
        base_out = layer.base_layer(x)
        weight = layer.base_layer.weight.clone()
        layer.enable_adapters(False)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), base_out, atol=1e-5, rtol=1e-5)
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)


def test_merge_while_disabled_like_peft(backend):
    ours, theirs = _pair()
    x = torch.randn(4, 6)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.enable_adapters(False)
            layer.merge()
        torch.testing.assert_close(ours(x), theirs(x))
        assert ours.merged_adapters == theirs.merged_adapters == []
        ours.enable_adapters(True)
        theirs.enable_adapters(True)
        torch.testing.assert_close(ours(x), theirs(x))


def test_disabled_layer_ignores_adapter_names(backend):
    """With the adapters off, a mixed-batch call is the base too (peft checks disable before adapter_names)."""
    ours, theirs = _pair()
    x = torch.randn(3, 6)
    ours.enable_adapters(False)
    theirs.enable_adapters(False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_names=["default", "__base__", "default"]), ours.base_layer(x))
        torch.testing.assert_close(theirs(x, adapter_names=["default", "__base__", "default"]), ours.base_layer(x))


# --------------------------------------------------------------------------- safe_merge on fp16
@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_safe_merge_checks_the_stored_dtype(kind):
    """An fp16 base whose merged weight is finite in fp32 but beyond fp16's range (65504): safe_merge raises, as
    peft's check in the base dtype does, and writes nothing; without safe_merge the weight overflows."""
    if kind == "linear":
        layer = fastpeft.FastLoraLinear.from_linear(nn.Linear(6, 5, dtype=torch.float16), r=2, lora_alpha=4)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    elif kind == "embedding":
        layer = FastLoraEmbedding.from_embedding(nn.Embedding(10, 4, dtype=torch.float16), r=2, lora_alpha=4)
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        layer = FastLoraConv.from_conv(nn.Conv2d(3, 4, 1, dtype=torch.float16), r=2, lora_alpha=4)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.fill_(200.0)
        b.fill_(200.0)  # ΔW = 2 · 2 · 4e4 = 1.6e5
    assert torch.isfinite(layer.get_delta_weight("default")).all()
    weight = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs or infs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged
    layer.merge()
    assert not torch.isfinite(layer.base_layer.weight).all()


def test_safe_merge_fp16_bias_overflow():
    """lora_bias: a merged bias beyond fp16's range raises under safe_merge too."""
    layer = fastpeft.FastLoraLinear.from_linear(nn.Linear(6, 5, dtype=torch.float16), r=2, lora_bias=True)
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(1e5)
    with pytest.raises(ValueError, match="merged bias"):
        layer.merge(safe_merge=True)
    assert not layer.merged


# --------------------------------------------------------------------------- merge() and names
def test_merge_skips_active_names_the_layer_lacks():
    """set_adapter(["default", "other"]) on a layer holding only 'default' (the other adapter lives in other
    layers): merge() merges 'default' without error, as peft's layer."""
    ours, theirs = _pair()
    x = torch.randn(3, 6)
    for layer in (ours, theirs):
        layer.set_adapter(["default", "other"])
    with torch.no_grad():
        before = ours(x)
        ours.merge()
        theirs.merge()
        assert ours.merged_adapters == theirs.merged_adapters == ["default"]
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)


def test_merge_refuses_unknown_names_before_writing():
    """merge(adapter_names=[...]) naming an adapter the layer lacks raises before anything is merged (a
    standalone layer: nothing else could hold it)."""
    ours, _ = _pair()
    weight = ours.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*\['default'\]"):
        ours.merge(adapter_names=["default", "nope"])
    assert ours.merged_adapters == [] and torch.equal(ours.base_layer.weight, weight)


# --------------------------------------------------------------------------- float64
def test_float64_under_autocast_stays_float64(backend):
    """Autocast leaves float64 alone (nn.Linear's output stays float64): so does the layer, equal to peft's."""
    ours, theirs = _pair(dtype=torch.float64)
    ours.double()
    theirs.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = ours(x), theirs(x)
    assert y.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", ["lora", "dropout", "dora", "mixed", "4bit"])
def test_float64_gradcheck(variant, backend):
    """A float64 layer computes in float64 throughout (the LoRA branch included), so torch.autograd.gradcheck
    passes for x and the adapter weights: plain, a layer with dropout (in eval), DoRA, a mixed-adapter batch and a
    4-bit base."""
    torch.manual_seed(0)
    if variant == "4bit":
        layer = fastpeft.FastLoraLinear4bit.from_linear(nn.Linear(64, 5), r=2, lora_alpha=4)
        layer.lora_A["default"].double()
        layer.lora_B["default"].double()
        x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    else:
        kw = {"use_dora": True} if variant == "dora" else {"lora_dropout": 0.1} if variant == "dropout" else {}
        layer = fastpeft.FastLoraLinear.from_linear(nn.Linear(6, 5).double(), r=2, lora_alpha=4, **kw).double()
        if variant == "mixed":
            layer.update_layer("b", r=3, lora_alpha=2)
            layer.double()
        x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        for name in layer.lora_B:
            layer.lora_B[name].weight.normal_()
    layer.eval()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    names = ["default", "b", "__base__"] if variant == "mixed" else None

    def run(x, A, B):
        params = {"lora_A.default.weight": A, "lora_B.default.weight": B}
        return torch.func.functional_call(layer, params, (x,), {"adapter_names": names} if names else {})

    # (DoRA's weight norm is a constant in its backward, as in the paper and peft: gradients in A and B are not
    # the numerical ones by design, so DoRA is checked in x only)
    weights_grad = variant != "dora"
    assert torch.autograd.gradcheck(run, (x, A.detach().requires_grad_(weights_grad),
                                          B.detach().requires_grad_(weights_grad)), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- no_grad, trainability while off
def test_trainable_base_runs_under_no_grad(backend):
    """A base weight left trainable (a framework unfroze the whole model) does not stop no_grad / inference_mode
    forwards (the fused path), as in peft; with gradients on, the layer runs unfused and trains it as peft does."""
    ours, theirs = _pair()
    ours.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 6)
    with torch.no_grad():
        ref = theirs(x)
        torch.testing.assert_close(ours(x), ref)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref)
    theirs.base_layer.weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the once-per-process unfused-path warning)
        ours(x).sum().backward()
    theirs(x).sum().backward()
    torch.testing.assert_close(ours.base_layer.weight.grad, theirs.base_layer.weight.grad)


def test_adapters_frozen_while_disabled_like_peft():
    """enable_adapters(False) freezes the adapter weights (as peft), enable_adapters(True) restores them; an
    adapter frozen before (loaded for inference) stays frozen after (peft would make it trainable)."""
    ours, theirs = _pair(use_dora=True)
    for layer in (ours, theirs):
        layer.enable_adapters(False)
    flags = [p.requires_grad for n, p in ours.named_parameters() if "lora_" in n]
    assert flags and not any(flags)
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if "lora_" in n)
    for layer in (ours, theirs):
        layer.enable_adapters(True)
    assert [p.requires_grad for n, p in ours.named_parameters() if "lora_" in n] == \
        [p.requires_grad for n, p in theirs.named_parameters() if "lora_" in n] == [True] * len(flags)
    ours.set_requires_grad("default", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.disable_adapter():
            ours.enable_adapters(False)  # (twice: the first flags are kept)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)


# --------------------------------------------------------------------------- peft's scale methods
@pytest.mark.parametrize("rslora", [False, True])
def test_scale_methods_like_peft(rslora, backend):
    """set_scale / scale_layer / unscale_layer (peft's LoraLayer methods): the same scalings and outputs as
    peft's layer after each call; names the layer lacks are ignored."""
    ours, theirs = _pair(use_rslora=rslora)
    x = torch.randn(3, 6)
    steps = [("set_scale", ("default", 0.5)), ("set_scale", ("nope", 3.0)), ("scale_layer", (3.0,)),
             ("scale_layer", (1,)), ("unscale_layer", (2.0,)), ("unscale_layer", ())]
    with torch.no_grad():
        for method, args in steps:
            for layer in (ours, theirs):
                getattr(layer, method)(*args)
            assert ours.scaling == pytest.approx(theirs.scaling), (method, args)
            torch.testing.assert_close(ours(x), theirs(x), msg=f"{method}{args}")
    assert ours.scaling["default"] == pytest.approx(4 / (2 ** 0.5 if rslora else 2))  # back to alpha / r (√r)


@pytest.mark.parametrize("make", [_embedding, _conv], ids=["embedding", "conv"])
def test_scale_methods_other_layers(make):
    """The embedding and convolution layers have the same methods: the output's adapter part scales with them."""
    layer, x = make()
    with torch.no_grad():
        base = layer.base_layer(x)
        full = layer(x) - base
        layer.set_scale("default", 0.25)
        torch.testing.assert_close(layer(x) - base, 0.25 * full, atol=1e-5, rtol=1e-5)
        layer.scale_layer(4.0)
        torch.testing.assert_close(layer(x) - base, full, atol=1e-5, rtol=1e-5)
        layer.unscale_layer(2.0)
        torch.testing.assert_close(layer(x) - base, 0.5 * full, atol=1e-5, rtol=1e-5)
        layer.unscale_layer()
        torch.testing.assert_close(layer(x) - base, full, atol=1e-5, rtol=1e-5)
