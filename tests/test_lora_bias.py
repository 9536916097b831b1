"""peft's ``lora_bias=True`` (a bias on ``lora_B``) against peft 0.21.2 itself and an fp64 reference: the layer
(dense fp32/fp16, GPT-2 Conv1D, bitsandbytes 4-bit, bitsandbytes 8-bit), dropout, several adapters, mixed
batches, merge, saving and loading both ways, conversion, add_weighted_adapter and the refusals."""

from __future__ import annotations

import contextlib
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import FastLoraLinear
from helpers import Wrap, assert_rel, assert_rule, fwd_bwd, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft_layer(base, r=4, alpha=8, p=0.0, fifo=False, bias="none", init=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], init_lora_weights=init,
                          fan_in_fan_out=fifo, bias=bias, lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Wrap(base), cfg).base_model.model.proj


def _base(fin, fout, fifo=False, has_bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if fifo:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(fout, fin)
        nn.init.normal_(base.weight, std=fin**-0.5)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(fin, fout, bias=has_bias)
    return base.to(dtype)


def _pair(fin, fout, fifo=False, has_bias=True, dtype=torch.float32, p=0.0, bias_trainable=False):
    base = _base(fin, fout, fifo, has_bias, dtype)
    ref = _peft_layer(copy.deepcopy(base), p=p, fifo=fifo, bias="all" if bias_trainable else "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no base bias: peft's warning, checked elsewhere)
        ours = FastLoraLinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False,
                                          lora_bias=True)
    ours.load_state_dict(ref.state_dict())  # same keys (lora_B.default.bias included), same shapes
    with torch.no_grad():  # a bias well away from zero, so it shows in every comparison
        for layer in (ref, ours):
            layer.lora_B["default"].bias.copy_(torch.linspace(-1.0, 1.0, fout))
    if bias_trainable:
        ours.base_layer.bias.requires_grad_(True)
    return ref, ours


CASES = [  # (fin, fout, x prefix, fifo, base has bias, base bias trains)
    (37, 29, (3, 5), False, True, True),
    (33, 22, (2, 7), True, True, False),
    (19, 26, (4,), False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=["linear_bias_trains", "conv1d", "no_base_bias"])
def test_layer_forward_and_grads_equal_peft(backend, case):
    fin, fout, prefix, fifo, has_bias, bias_tr = case
    ref, ours = _pair(fin, fout, fifo, has_bias, bias_trainable=bias_tr)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert "lora_B.default.bias" in ours.state_dict() and ours.lora_bias == ref.lora_bias == {"default": True}
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(*prefix, fin, generator=g), torch.randn(*prefix, fout, generator=g)
    y_ref, dx_ref, g_ref = fwd_bwd(ref, x, dy)
    y, dx, g_ours = fwd_bwd(ours, x, dy)
    assert set(g_ours) == set(g_ref) and "lora_B.default.bias" in g_ours
    assert ("base_layer.bias" in g_ours) == bias_tr
    assert_rel(y, y_ref, 1e-5, "y")
    assert_rel(dx, dx_ref, 1e-5, "dx")
    for name in g_ref:
        assert_rel(g_ours[name], g_ref[name], 1e-5, name)
    # the bias is scaled like the rest of the LoRA term: d(b_B) = scale · Σ dy
    assert_rel(g_ours["lora_B.default.bias"], ours.scaling["default"] * dy.reshape(-1, fout).sum(0), 1e-6, "db_B")


def test_half_precision_against_fp64_reference(backend):
    """fp16 base, fp32 adapters: the tolerance rule of TESTING.md against an fp64 computation, peft in fp16 as
    the plain-PyTorch low-precision result."""
    ref, ours = _pair(45, 31, dtype=torch.float16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 45, generator=g).half()
    dy = torch.randn(4, 6, 31, generator=g).half()
    y_ref, _, g_ref = fwd_bwd(ref, x, dy)
    y, _, g_ours = fwd_bwd(ours, x, dy)
    assert y.dtype == torch.float16
    w, b = ours.base_layer.weight.double(), ours.base_layer.bias.double()
    A, B = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
    bB, s = ours.lora_B["default"].bias.double(), ours.scaling["default"]
    x64, dy64 = x.double(), dy.double()
    y64 = x64 @ w.t() + b + s * (x64 @ A.t() @ B.t() + bB)
    assert_rule(y, y64, y_ref, name="y")
    db64 = s * dy64.reshape(-1, 31).sum(0)
    assert_rule(g_ours["lora_B.default.bias"], db64, g_ref["lora_B.default.bias"], factor=3.0, name="db_B")
    dB64 = s * dy64.reshape(-1, 31).t() @ (x64.reshape(-1, 45) @ A.t())
    assert_rule(g_ours["lora_B.default.weight"], dB64, g_ref["lora_B.default.weight"], factor=3.0, name="dB")


def test_dropout_never_touches_the_bias(backend):
    """p > 0 in training: the output with the bias minus the output without it (the same dropout seed) is
    exactly ``scale · b_B`` on every row, and the bias gradient is ``scale · Σ dy`` whatever was dropped."""
    _, ours = _pair(40, 24, p=0.3)
    plain = copy.deepcopy(ours)
    plain.lora_B["default"].bias = None  # the same layer without lora_bias
    assert plain.lora_bias == {"default": False}
    ours.train(), plain.train()
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(5, 40, generator=g), torch.randn(5, 24, generator=g)
    torch.manual_seed(11)
    y, dx, grads = fwd_bwd(ours, x, dy)
    torch.manual_seed(11)
    y0, dx0, grads0 = fwd_bwd(plain, x, dy)
    s, bB = ours.scaling["default"], ours.lora_B["default"].bias.detach()
    assert not torch.equal(y0, plain.eval()(x).detach()), "dropout acted"
    assert_rel(y - y0, (s * bB).expand_as(y), 1e-5, "y difference")
    assert_rel(dx, dx0, 1e-6, "dx")
    for name in ("lora_A.default.weight", "lora_B.default.weight"):
        assert_rel(grads[name], grads0[name], 1e-6, name)
    assert_rel(grads["lora_B.default.bias"], s * dy.sum(0), 1e-6, "db_B")


def test_init_and_trainability_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    torch.manual_seed(5)
    theirs = _peft_layer(copy.deepcopy(base), init=True)
    torch.manual_seed(5)
    ours = FastLoraLinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8, lora_bias=True)
    for key, value in theirs.state_dict().items():  # same draws from torch's generator, B and its bias zero
        assert torch.equal(ours.state_dict()[key], value), key
    assert not ours.lora_B["default"].bias.any()
    # init_lora_weights=False keeps nn.Linear's default bias (non-zero), drawn as peft draws it
    torch.manual_seed(6)
    theirs = _peft_layer(copy.deepcopy(base), init=False)
    torch.manual_seed(6)
    ours = FastLoraLinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8, lora_bias=True, init_lora_weights=False)
    assert torch.equal(ours.lora_B["default"].bias, theirs.lora_B["default"].bias)
    assert ours.lora_B["default"].bias.any()
    ours.update_layer("other", r=2, lora_alpha=2, lora_bias=True)
    assert ours.lora_B["other"].bias.requires_grad and not ours.lora_B["default"].bias.requires_grad
    assert "lora_bias" in repr(ours)


def test_several_active_adapters_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(24, 18)
    cfgs = {"a": dict(r=4, lora_alpha=8, lora_bias=True), "b": dict(r=2, lora_alpha=6, lora_bias=False),
            "c": dict(r=3, lora_alpha=3, lora_bias=True)}
    with _quiet():
        theirs = peft.get_peft_model(Wrap(copy.deepcopy(base)), peft.LoraConfig(
            target_modules=["proj"], init_lora_weights=False, **cfgs["a"]), adapter_name="a")
        for n in ("b", "c"):
            theirs.add_adapter(n, peft.LoraConfig(target_modules=["proj"], init_lora_weights=False, **cfgs[n]))
    ours = FastLoraLinear.from_linear(copy.deepcopy(base), adapter_name="a", init_lora_weights=False, **cfgs["a"])
    for n in ("b", "c"):
        ours.update_layer(n, init_lora_weights=False, **cfgs[n])
    layer = theirs.base_model.model.proj
    ours.load_state_dict(layer.state_dict())
    assert ours.lora_bias == layer.lora_bias == {"a": True, "b": False, "c": True}
    layer.set_adapter(["a", "b", "c"])
    ours.set_adapter(["a", "b", "c"])
    x, dy = torch.randn(3, 4, 24), torch.randn(3, 4, 18)
    y_ref, dx_ref, g_ref = fwd_bwd(layer, x, dy)
    y, dx, g_ours = fwd_bwd(ours, x, dy)
    assert set(g_ours) == set(g_ref) and {"lora_B.a.bias", "lora_B.c.bias"} <= set(g_ours)
    assert_rel(y, y_ref, 1e-5, "y")
    assert_rel(dx, dx_ref, 1e-5, "dx")
    for name in g_ref:
        assert_rel(g_ours[name], g_ref[name], 1e-5, name)
    ours.merge()
    assert_rel(ours(x), y, 1e-5, "merged")
    ours.unmerge()
    assert_rel(ours.base_layer.bias, base.bias, 1e-6, "bias restored")


def _models(factory, targets, **kw):
    """(fastpeft model, peft model) over identical bases and identical adapters (lora_bias=True)."""
    torch.manual_seed(0)
    base_a = factory().eval()
    base_b = factory().eval()
    base_b.load_state_dict(base_a.state_dict())
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True, target_modules=targets, **kw)
    with _quiet():
        ours = fastpeft.get_peft_model(base_a, fastpeft.LoraConfig(**cfg))
        theirs = peft.get_peft_model(base_b, peft.LoraConfig(**cfg))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
    assert any(k.endswith("lora_B.default.bias") for k in ours.state_dict())
    return ours, theirs


def _ids(seed=2):
    return torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_gpt2_model_merge_and_unload_like_peft():
    ours, theirs = _models(tiny_gpt2, ["c_attn", "c_fc"])
    ids = _ids()
    la, lb = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert_rel(la, lb, 1e-5, "logits")
    la.sum().backward()
    lb.sum().backward()
    pa = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            assert_rel(pa[name].grad, p.grad, 1e-4, name)
    with torch.no_grad():
        ours.merge_adapter()
        assert_rel(ours(input_ids=ids).logits, la, 1e-5, "merged")
        ours.unmerge_adapter()
        assert_rel(ours(input_ids=ids).logits, la, 1e-5, "unmerged")
        merged_a, merged_b = ours.merge_and_unload(), theirs.merge_and_unload()
        for (ka, va), (kb, vb) in zip(sorted(merged_a.state_dict().items()), sorted(merged_b.state_dict().items())):
            assert ka == kb
            assert_rel(va, vb, 1e-6, ka)  # the base biases hold b + scale·b_B in both
        assert_rel(merged_a(input_ids=ids).logits, la, 1e-5, "merge_and_unload")


def test_base_without_bias_warns_and_refuses_to_merge_like_peft():
    with pytest.warns(UserWarning, match="has no bias"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    ours, theirs = _models(tiny_llama, ["q_proj", "v_proj"])
    ids = _ids()
    assert_rel(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, 1e-5, "logits")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for model in (ours, theirs):
        with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
            model.merge_and_unload()
    # (peft has written the first merged weight by then; fastpeft checks before writing anything)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.merged
    lin = layer.to_linear()  # fastpeft's own full-precision merge gives the new layer a bias
    x = torch.randn(3, 32)
    assert lin.bias is not None
    assert_rel(lin(x), layer(x), 1e-5, "to_linear")


def test_mixed_batch_each_row_gets_its_own_bias_like_peft(backend):
    ours, theirs = _models(tiny_gpt2, ["c_attn", "c_fc"])
    plain = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["c_attn", "c_fc"])
    with _quiet():
        ours.add_adapter("plain", fastpeft.LoraConfig(**plain))
        theirs.add_adapter("plain", peft.LoraConfig(**plain))
        ours.add_adapter("other", fastpeft.LoraConfig(**plain, lora_bias=True))
        theirs.add_adapter("other", peft.LoraConfig(**plain, lora_bias=True))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(1, V, (5, 6), generator=torch.Generator().manual_seed(3))
    names = ["default", "__base__", "plain", "default", "other"]
    ours.eval(), theirs.eval()  # (peft refuses adapter_names in training mode; p = 0: the same gradients)
    la = ours(input_ids=ids, adapter_names=names).logits
    lb = theirs(input_ids=ids, adapter_names=names).logits
    assert_rel(la, lb, 1e-5, "mixed logits")
    la.pow(2).mean().backward()
    lb.pow(2).mean().backward()
    pa = dict(ours.named_parameters())
    checked = 0
    for name, p in theirs.named_parameters():
        if p.grad is not None and "lora_B" in name and name.endswith("bias"):
            assert_rel(pa[name].grad, p.grad, 1e-4, name)
            checked += 1
    assert checked > 0
    # one row of each: per row, the same as that adapter alone
    with torch.no_grad():
        ours.eval()
        for i, n in enumerate(names):
            if n == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[i:i + 1]).logits
            else:
                ours.set_adapter(n)
                alone = ours(input_ids=ids[i:i + 1]).logits
            assert_rel(ours(input_ids=ids, adapter_names=names).logits[i:i + 1], alone, 1e-5, f"row {i}")


def test_save_and_load_both_ways_with_peft(tmp_path):
    ours, theirs = _models(tiny_gpt2, ["c_attn", "c_fc"])
    ids = _ids()
    expected = theirs(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    sa = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    sb = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(sa) == set(sb) and any(k.endswith(".lora_B.bias") for k in sa)
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ca["lora_bias"] is True
    torch.manual_seed(0)
    fresh = tiny_gpt2().eval()
    fresh.load_state_dict(ours.get_base_model().state_dict(), strict=False)
    with _quiet():
        loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "ours")
        loaded_ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "theirs")
    assert loaded_ours.peft_config["default"].lora_bias is True
    with torch.no_grad():
        assert_rel(loaded_peft(input_ids=ids).logits, expected, 1e-5, "fastpeft-saved, peft-loaded")
        assert_rel(loaded_ours(input_ids=ids).logits, expected, 1e-5, "peft-saved, fastpeft-loaded")


def test_from_peft_and_to_peft_keep_the_bias():
    ours, theirs = _models(tiny_gpt2, ["c_attn", "c_fc"])
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    peft_bias = theirs.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].bias
    fastpeft.from_peft(theirs)
    layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, FastLoraLinear) and layer.lora_B["default"].bias is peft_bias
    assert layer.lora_bias == {"default": True}
    with torch.no_grad():
        assert_rel(theirs(input_ids=ids).logits, expected, 1e-5, "from_peft")
    fastpeft.to_peft(theirs)
    layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert not isinstance(layer, FastLoraLinear) and layer.lora_bias == {"default": True}
    with torch.no_grad():
        assert_rel(theirs(input_ids=ids).logits, expected, 1e-5, "to_peft (layers)")
        back = fastpeft.to_peft(ours)  # a fastpeft PeftModel -> a new peft PeftModel
        assert back.peft_config["default"].lora_bias is True
        assert_rel(back(input_ids=ids).logits, expected, 1e-5, "to_peft (model)")


@pytest.mark.parametrize("init", [True, False])
def test_add_weighted_adapter_like_peft(init):
    """peft combines only the lora_A/lora_B weights: the new adapter inherits ``lora_bias`` from the first
    adapter's config and keeps its bias as initialized. fastpeft gives the same tensors and says so."""
    ours, theirs = _models(tiny_gpt2, ["c_attn"])
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=init, lora_bias=True, target_modules=["c_attn"])
    with _quiet():
        torch.manual_seed(3)
        ours.add_adapter("two", fastpeft.LoraConfig(**cfg))
        torch.manual_seed(3)
        theirs.add_adapter("two", peft.LoraConfig(**cfg))
        ours.peft_config["default"].init_lora_weights = init
        theirs.peft_config["default"].init_lora_weights = init
    theirs.load_state_dict(ours.state_dict(), strict=False)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="lora_B biases"):
        ours.add_weighted_adapter(["default", "two"], [0.7, 0.5], "mix", combination_type="cat")
    torch.manual_seed(4)
    with _quiet():
        theirs.add_weighted_adapter(["default", "two"], [0.7, 0.5], "mix", combination_type="cat")
    sa, sb = ours.state_dict(), theirs.state_dict()
    mixed = [k for k in sb if ".mix." in k]
    assert any(k.endswith("lora_B.mix.bias") for k in mixed)
    for k in mixed:
        assert_rel(sa[k], sb[k], 1e-6, k) if sb[k].any() else torch.equal(sa[k], sb[k])
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        assert_rel(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits, 1e-5, "mix logits")


def test_refusals_like_peft():
    for kw in (dict(use_dora=True), dict(init_lora_weights="gaussian"), dict(init_lora_weights="pissa")):
        with pytest.raises(ValueError):
            peft.LoraConfig(lora_bias=True, **kw)
        with pytest.raises(ValueError, match="lora_bias"):
            fastpeft.LoraConfig(lora_bias=True, **kw)
    cfg = fastpeft.LoraConfig(r=4, lora_bias=True)
    assert cfg.lora_bias is True and cfg.to_dict()["lora_bias"] is True and "lora_bias" not in cfg.extra
    assert fastpeft.LoraConfig.from_dict(cfg.to_dict()).lora_bias is True
    layer = FastLoraLinear(16, 8, r=2)
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        layer.update_layer("d", r=2, use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias=True is only supported"):
        layer.update_layer("p", r=2, init_lora_weights="olora", lora_bias=True)
    # embeddings: peft refuses (while injecting); fastpeft before wrapping anything
    targets = dict(r=2, target_modules=["embed_tokens", "q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias"):
        with _quiet():
            peft.get_peft_model(tiny_llama(), peft.LoraConfig(**targets))
    model = tiny_llama()
    with pytest.raises(ValueError, match="lora_bias=True is not supported for the embedding layer"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(**targets))
    assert not any("lora_" in k for k in model.state_dict())


def test_4bit_layer_like_peft_and_merge():
    bnb = pytest.importorskip("bitsandbytes")
    from fastpeft.layers import FastLoraLinear4bit

    g = torch.Generator().manual_seed(0)
    # (in_features 72: with some other widths, e.g. 48, bitsandbytes 0.50.2's own CPU forward of a Linear4bit
    # quantized on the CPU is far from x·dequantize(W)ᵀ, so peft's reference would be off by itself)
    lin = bnb.nn.Linear4bit(72, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(torch.randn(40, 72, generator=g) * 72**-0.5, requires_grad=False,
                                   quant_type="nf4", blocksize=64)
    lin.bias = nn.Parameter(torch.randn(40, generator=g) * 0.1, requires_grad=False)
    lin = lin.to("cpu")
    theirs = _peft_layer(copy.deepcopy(lin))  # (on CPU peft wraps the Linear4bit in its generic LoRA Linear)
    assert theirs.lora_bias == {"default": True}
    ours = FastLoraLinear4bit.from_linear(copy.deepcopy(lin), r=4, lora_alpha=8, init_lora_weights=False,
                                          lora_bias=True)
    with torch.no_grad():
        for key in ("lora_A", "lora_B"):
            getattr(ours, key)["default"].load_state_dict(getattr(theirs, key)["default"].state_dict())
        for layer in (ours, theirs):
            layer.lora_B["default"].bias.copy_(torch.linspace(-1, 1, 40))
    x, dy = torch.randn(3, 5, 72, generator=g), torch.randn(3, 5, 40, generator=g)
    y_ref, dx_ref, g_ref = fwd_bwd(theirs, x, dy)
    y, dx, g_ours = fwd_bwd(ours, x, dy)
    assert_rel(y, y_ref, 1e-5, "y")
    assert_rel(dx, dx_ref, 1e-5, "dx")
    for name in ("lora_A.default.weight", "lora_B.default.weight", "lora_B.default.bias"):
        assert_rel(g_ours[name], g_ref[name], 1e-5, name)
    with torch.no_grad():
        ours.eval()
        y_eval = ours(x)  # (no gradient: the decode path takes the effective bias too)
        assert_rel(y_eval, y, 1e-5, "eval")
        assert_rel(ours.to_linear(torch.float32)(x), y, 1e-5, "to_linear")
        b0 = ours.base_layer.bias.clone()
        with pytest.warns(UserWarning, match="re-quantizes"):
            ours.merge()
        # b + scale·b_B, as the dense layer and as the forward (peft's 4-bit merge adds b_B unscaled)
        assert_rel(ours.base_layer.bias, b0 + 2.0 * ours.lora_B["default"].bias, 1e-6, "merged bias")
        merged = nn.functional.linear(x, ours.dequantized_weight(), ours.base_layer.bias)  # (bnb's CPU forward
        assert_rel(merged, y, 0.15, "merged (4-bit rounding)")  # asserts on 40 output features after a merge)
        with pytest.warns(UserWarning):
            ours.unmerge()
        assert_rel(ours.base_layer.bias, b0, 1e-6, "unmerged bias")
    # a mixed batch on the 4-bit base (fastpeft's fused mixed op): each row its own adapter's bias
    ours.update_layer("nobias", r=2, lora_alpha=2, init_lora_weights=False)
    with torch.no_grad():
        mixed = ours(x, adapter_names=["default", "nobias", "__base__"])
        ours.set_adapter("default")
        assert_rel(mixed[:1], ours(x[:1]), 1e-5, "default row")
        ours.set_adapter("nobias")
        assert_rel(mixed[1:2], ours(x[1:2]), 1e-5, "nobias row")
        assert_rel(mixed[2:], nn.functional.linear(x[2:], ours.dequantized_weight(), b0), 1e-5, "base row")


def test_opaque_int8_base_like_peft():
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear8bitLt

    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    q = bnb.nn.Linear8bitLt(48, 40, bias=True, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    ours = FastLoraLinear.from_linear(q, r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True)
    assert ours._opaque_base
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True)
    theirs = Linear8bitLt(q, "default", cfg, r=4, lora_alpha=8)
    with torch.no_grad():
        for key in ("lora_A", "lora_B"):
            getattr(theirs, key)["default"].load_state_dict(getattr(ours, key)["default"].state_dict())
        ours.lora_B["default"].bias.copy_(torch.linspace(-1, 1, 40))
        theirs.lora_B["default"].bias.copy_(torch.linspace(-1, 1, 40))
    x, dy = torch.randn(2, 5, 48), torch.randn(2, 5, 40)
    y_ref, _, g_ref = fwd_bwd(theirs, x, dy)
    y, _, g_ours = fwd_bwd(ours, x, dy)
    assert_rel(y, y_ref, 1e-6, "y")
    assert_rel(g_ours["lora_B.default.bias"], g_ref["lora_B.default.bias"], 1e-6, "db_B")
    ours.update_layer("other", r=2, lora_alpha=2, init_lora_weights=False)  # no bias
    with torch.no_grad():
        mixed = ours(x, adapter_names=["default", "other"])
        ours.set_adapter("default")
        assert_rel(mixed[:1], ours(x[:1]), 1e-6, "mixed row with lora_bias")


def test_compiles_without_graph_break():
    """The effective bias is built outside the fused op: torch.compile(fullgraph=True) still sees one graph, and
    the bias gradient is eager's."""
    torch.manual_seed(0)
    layer = FastLoraLinear(32, 24, r=4, init_lora_weights=False, lora_bias=True)
    x = torch.randn(5, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    y_c.pow(2).sum().backward()
    grad_c = layer.lora_B["default"].bias.grad.clone()
    layer.zero_grad()
    y_e = layer(x)
    y_e.pow(2).sum().backward()
    assert torch.equal(y_c, y_e)
    assert_rel(grad_c, layer.lora_B["default"].bias.grad, 1e-6, "db_B")


def test_mixed_batch_training_gives_absent_adapters_a_zero_bias_gradient(backend):
    """In training every trainable adapter takes part in the op (DDP finds all its parameters used): one with no
    row in the batch gets zero gradients, its lora_B bias included; the other's bias gradient is scale · Σ dy of
    its own rows."""
    torch.manual_seed(0)
    layer = FastLoraLinear(20, 14, r=3, lora_alpha=6, init_lora_weights=False, lora_bias=True)
    layer.update_layer("b", r=2, lora_alpha=2, init_lora_weights=False, lora_bias=True)
    layer.set_adapter(["default", "b"])
    layer.train()
    x, dy = torch.randn(3, 4, 20), torch.randn(3, 4, 14)
    layer(x, adapter_names=["default", "__base__", "default"]).backward(dy)
    assert layer.lora_B["b"].bias.grad is not None and not layer.lora_B["b"].bias.grad.any()
    expected = layer.scaling["default"] * (dy[0] + dy[2]).sum(0)
    assert_rel(layer.lora_B["default"].bias.grad, expected, 1e-6, "db_B")


def test_estimate_counts_the_lora_b_biases(capsys):
    """``fastpeft estimate --lora-bias``: one trainable bias entry per output feature of each adapted layer."""
    import transformers

    from fastpeft import cli
    from fastpeft.estimate import estimate

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    kw = dict(batch_size=2, seq_len=8, r=4, dtype=torch.bfloat16)
    plain, biased = estimate(cfg, "lora", **kw), estimate(cfg, "lora", lora_bias=True, **kw)
    outs = 2 * (3 * 32 + 2 * 16 + 2 * 64)  # q, o, down: h; k, v: kv; gate, up: intermediate — 2 layers
    assert biased.trainable - plain.trainable == outs
    assert biased.trainable_state - plain.trainable_state == 12 * outs
    qv = estimate(cfg, "lora", targets="q_proj,v_proj", lora_bias=True, **kw)
    assert qv.trainable - estimate(cfg, "lora", targets="q_proj,v_proj", **kw).trainable == 2 * (32 + 16)
    assert cli.main(["estimate", "--batch-size", "2", "--seq-len", "16", "--lora-bias"]) == 0
    with pytest.raises(SystemExit, match="DoRA"):
        cli.main(["estimate", "--batch-size", "2", "--seq-len", "16", "--lora-bias", "--use-dora"])
