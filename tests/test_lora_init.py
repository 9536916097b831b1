"""LoRA initializations that read the base weight (PiSSA fast-SVD, OLoRA, LoftQ), against peft 0.21 itself.

fastpeft and peft build the same tiny model from the same seed (no state copied between them): parameters
and rewritten base weights must agree. 4-bit bases are checked against an fp64 reference (decode, apply the
method, re-quantize) and, for OLoRA on a bitsandbytes base, against peft. peft's LoftQ only runs on CUDA
(its compute device is hard-wired): here it runs from its own source with the device set to "cpu".
"""

from __future__ import annotations

import inspect
import json
import math
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import quant as Q
from fastpeft.layers import FastLoraLinear, FastLoraLinear4bit
from helpers import Wrap, assert_rel, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

V = 96
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    return tiny_llama(V)


def _llama64():
    # in_features multiples of 64: bitsandbytes 0.50's CPU dequantize_4bit (which peft's LoftQ calls here) is
    # wrong for some other widths (e.g. (32, 32), (64, 96)); fastpeft's decoder is right for all
    return tiny_llama(V, hidden_size=64, intermediate_size=128)


def _gpt2():
    return tiny_gpt2(V)


FACTORIES = {"llama": (_llama, TARGETS), "llama64": (_llama64, TARGETS), "gpt2": (_gpt2, ["c_attn", "c_proj"])}
INPUTS = {"input_ids": torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(2))}


class Base:
    """A tiny model's weights, rebuilt as fresh identical copies."""

    def __init__(self, name: str, dtype=torch.float32):
        self.factory, self.targets = FACTORIES[name]
        self.dtype = dtype
        torch.manual_seed(0)
        self.state = {k: v.clone() for k, v in self.factory().to(dtype).state_dict().items()}

    def fresh(self):
        model = self.factory().to(self.dtype).eval()
        model.load_state_dict(self.state)
        return model


def _logits(model):
    with torch.no_grad():
        return model(**INPUTS).logits.float()


def _both(base: Base, **kw):
    """(fastpeft model, peft model) built independently on identical bases, from the same seed."""
    kw = dict(r=4, lora_alpha=8, target_modules=base.targets, **kw)
    if base.factory is _gpt2:
        kw["fan_in_fan_out"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(**kw))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(base.fresh(), peft.LoraConfig(**kw))
    return ours, theirs


def _assert_same_params(ours, theirs, tol, what):
    theirs_p = dict(theirs.named_parameters())
    ours_p = dict(ours.named_parameters())
    assert ours_p.keys() == theirs_p.keys()
    for k, p in ours_p.items():
        assert p.dtype == theirs_p[k].dtype, (k, p.dtype, theirs_p[k].dtype)
        assert_rel(p.detach(), theirs_p[k].detach(), tol, f"{what} {k}")


def _peft_on_cpu(func):
    """peft's ``func`` (from peft.utils.loftq_utils) with its hard-wired compute device "cuda" set to "cpu"."""
    module = inspect.getmodule(func)
    src = inspect.getsource(func)
    src = src.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"')
    assert '"cpu"' in src, "peft's LoftQ source changed: update the CPU patch"
    namespace = dict(vars(module))
    exec(compile(src, module.__file__, "exec"), namespace)  # noqa: S102 - peft's own installed source
    return namespace[func.__name__]


@pytest.fixture
def peft_loftq_cpu(monkeypatch):
    """peft's LoftQ running on CPU (its loftq_init and _loftq_init_new patched in where peft looks them up)."""
    from peft.tuners.lora import layer as peft_layer
    from peft.utils import loftq_utils

    monkeypatch.setattr(peft_layer, "loftq_init", _peft_on_cpu(loftq_utils.loftq_init))
    monkeypatch.setattr(loftq_utils, "_loftq_init_new", _peft_on_cpu(loftq_utils._loftq_init_new))


def _sign_align(A, B, A_ref):
    """Flip each rank-one component (row of A, column of B) to the reference's sign (SVD/QR sign freedom)."""
    s = torch.sign((A.double() * A_ref.double()).sum(1))
    s[s == 0] = 1
    return A.double() * s[:, None], B.double() * s[None, :]


# ----------------------------------------------------------------------------- dense bases vs peft
@pytest.mark.parametrize("name,init", [("llama", "pissa_niter_2"), ("llama", "olora"), ("gpt2", "pissa_niter_3"),
                                       ("llama", "pissa")])
def test_init_matches_peft_and_keeps_the_function(name, init):
    base = Base(name)
    ours, theirs = _both(base, init_lora_weights=init)
    _assert_same_params(ours, theirs, 1e-5, init)
    # the base holds the residual: the model's function is unchanged at init
    assert_rel(_logits(ours), _logits(base.fresh()), 1e-5, f"{init} identity")
    # and the adapter is not trivial: without it the model differs
    with ours.disable_adapter():
        assert (_logits(ours) - _logits(base.fresh())).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_above_a_layers_size_keeps_the_directions_it_has(init, tmp_path):
    """r = 24 on a 16 × 32 k_proj (grouped-query attention): as peft, the factors hold the 16 directions the weight
    has (A (16, 32), B (16, 16)), r and the scale stay as configured, the function is kept; parameters equal peft's
    (signs aligned), training gradients flow, and the saved adapter reloads (the init reruns at load, as in peft)."""
    base = Base("llama")
    kw = dict(r=24, lora_alpha=8, target_modules=["k_proj", "q_proj"], init_lora_weights=init)
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(**kw))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base.fresh(), peft.LoraConfig(**kw))
    k_ours = ours.base_model.model.model.layers[0].self_attn.k_proj
    k_theirs = theirs.base_model.model.model.layers[0].self_attn.k_proj
    assert tuple(k_ours.lora_A["default"].weight.shape) == tuple(k_theirs.lora_A["default"].weight.shape) == (16, 32)
    assert tuple(k_ours.lora_B["default"].weight.shape) == (16, 16) and k_ours.r["default"] == 24
    assert k_ours.scaling["default"] == pytest.approx(k_theirs.scaling["default"])
    A, B = _sign_align(k_ours.lora_A["default"].weight, k_ours.lora_B["default"].weight,
                       k_theirs.lora_A["default"].weight)
    assert_rel(A, k_theirs.lora_A["default"].weight.double(), 1e-5, "A")
    assert_rel(B, k_theirs.lora_B["default"].weight.double(), 1e-5, "B")
    assert_rel(_logits(ours), _logits(base.fresh()), 1e-5, "identity")
    ours.train()
    ours(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
    assert k_ours.lora_A["default"].weight.grad.abs().sum() > 0
    _train_like(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        back = fastpeft.PeftModel.from_pretrained(base.fresh(), tmp_path)
    assert_rel(_logits(back), _logits(ours), 1e-5, "reloaded")


@pytest.mark.parametrize("name,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_orthogonal_init_matches_peft(name, dtype):
    """init_lora_weights="orthogonal" (peft 0.21): the same factors as peft from the same seed (its draws, its
    rounding through a half base), neither zero while B·A = 0 (the model's function unchanged); odd r refused with
    peft's error."""
    base = Base(name, dtype)
    ours, theirs = _both(base, init_lora_weights="orthogonal")
    _assert_same_params(ours, theirs, 1e-6, "orthogonal")
    layer = next(m for m in ours.modules() if isinstance(m, FastLoraLinear))
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    assert A.abs().sum() > 0 and B.abs().sum() > 0
    assert (B @ A).abs().max() < 1e-2 * (B.abs().max() * A.abs().max())
    with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3"):
        fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=3, target_modules=base.targets,
                                                                  init_lora_weights="orthogonal"))


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_mica_init_matches_peft(name, dtype, tmp_path):
    """init_lora_weights="mica" (peft 0.21's Minor Component Adaptation): B = the r left singular vectors with the
    smallest singular values, frozen; A = 0 (the model unchanged): the same parameters, trainable set, counts and
    training gradients as peft; B stays frozen through set_adapter, disable_adapter and set_requires_grad; files
    load both ways with the same logits; from_peft / to_peft keep B frozen."""
    base = Base(name, dtype)
    ours, theirs = _both(base, init_lora_weights="mica")
    _assert_same_params(ours, theirs, 1e-6, "mica")
    assert _trainable(ours) == _trainable(theirs) and all("lora_A" in n for n in _trainable(ours))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_rel(_logits(ours), _logits(base.fresh()), 1e-6, "identity at init")
    for model in (ours, theirs):  # move A off zero, then one backward
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
        model.train()
        model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert sorted(ours_grads) == sorted(grads)
    for key, grad in grads.items():
        assert_rel(ours_grads[key].float(), grad.float(), 2e-2 if dtype == torch.bfloat16 else 1e-5, key)
    ours.set_adapter("default")
    with ours.disable_adapter():
        pass
    ours.base_model.set_requires_grad("default", True)
    assert _trainable(ours) == _trainable(theirs)
    ours.eval()
    theirs.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for src in ("ours", "theirs"):
            for lib in (fastpeft, peft):
                loaded = lib.PeftModel.from_pretrained(base.fresh(), tmp_path / src, is_trainable=True).eval()
                assert_rel(_logits(loaded), _logits(theirs), 1e-5, f"{src} -> {lib.__name__}")
                assert all("lora_A" in n for n in _trainable(loaded))
        converted = fastpeft.from_peft(theirs)
        assert _trainable(converted) == _trainable(ours)
        converted.base_model.set_adapter("default")
        assert all("lora_A" in n for n in _trainable(converted))
        back = fastpeft.to_peft(converted)
        back.base_model.set_adapter("default")
        assert all("lora_A" in n for n in _trainable(back))


def test_mica_refusals():
    base = Base("llama")
    # (any case, as peft's init; peft's variant — the frozen B — only takes the lower-case name, fastpeft both)
    model = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      init_lora_weights="MiCA"))
    assert all("lora_A" in n for n in _trainable(model))
    with pytest.raises(ValueError, match="MiCA requires `r` <= min"):
        fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=24, target_modules=["k_proj"],
                                                                  init_lora_weights="mica"))
    with pytest.raises(ValueError, match="'mica' on an embedding layer"):
        fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                  init_lora_weights="mica"))
    with pytest.raises(ValueError, match="does not combine it with DoRA"):
        fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                                  init_lora_weights="mica"))


def test_gaussian_init_name_in_any_case():
    """init_lora_weights="Gaussian" is peft's "gaussian" (peft compares it case-insensitively): A ~ N(0, 1/r)."""
    base = Base("llama")
    ours, theirs = _both(base, init_lora_weights="Gaussian")
    _assert_same_params(ours, theirs, 1e-6, "Gaussian")


def test_pissa_niter_is_the_randomized_svd_not_the_full_one():
    base = Base("llama")
    fast, _ = _both(base, init_lora_weights="pissa_niter_1")
    full, _ = _both(base, init_lora_weights="pissa")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    a, b = dict(fast.named_parameters())[key], dict(full.named_parameters())[key]
    assert (a.abs() - b.abs()).abs().max() > 1e-3  # one subspace iteration on a random matrix is inexact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_half_precision_bases_match_peft(dtype, init):
    torch.manual_seed(3)
    lin = nn.Linear(40, 24).to(dtype)
    kw = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=init)
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(Wrap(_copy(lin)), fastpeft.LoraConfig(**kw))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(Wrap(_copy(lin)), peft.LoraConfig(**kw))
    a, b = ours.base_model.model.proj, theirs.base_model.model.proj
    assert a.base_layer.weight.dtype == dtype
    assert torch.equal(a.base_layer.weight, b.base_layer.weight)
    for n in ("lora_A", "lora_B"):
        # both keep fp32 adapters on half bases; peft's went through the base dtype on their way (its move to
        # the base's device casts), fastpeft's keep the fp32 factors the residual was computed from
        ours_w, theirs_w = getattr(a, n)["default"].weight, getattr(b, n)["default"].weight
        assert ours_w.dtype == theirs_w.dtype == torch.float32
        assert torch.equal(ours_w.to(dtype).float(), theirs_w), n
    x = torch.randn(64, 40).to(dtype)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    assert_rel(a(x), lin(x), tol, f"{init} {dtype} identity")
    err = lambda layer: (layer(x).double() - lin(x).double()).norm().item()  # noqa: E731
    assert err(a) <= err(b)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_olora_on_conv1d_uses_the_out_in_weight():
    """peft's OLoRA ignores fan_in_fan_out (wrong shapes on GPT-2's Conv1D); fastpeft factors (out, in) as
    PiSSA does: A, B are the QR factors of Wᵀ-stored weights read as (out, in), and the function is kept."""
    base = Base("gpt2")
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                     fan_in_fan_out=True, init_lora_weights="olora"))
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    w = base.state["transformer.h.0.attn.c_attn.weight"].double().t()  # (out, in)
    Qm, R = torch.linalg.qr(w)
    A, B = _sign_align(layer.lora_A["default"].weight, layer.lora_B["default"].weight, R[:4])
    assert_rel(A, R[:4], 1e-5, "A")
    assert_rel(B, Qm[:, :4], 1e-5, "B")
    assert_rel(layer.base_layer.weight.t(), w - 2.0 * Qm[:, :4] @ R[:4], 1e-5, "residual")
    assert_rel(_logits(ours), _logits(base.fresh()), 1e-5, "olora gpt2 identity")


# ----------------------------------------------------------------------------- 4-bit bases
def _bnb_linear(fin, fout, quant_type="nf4", nested=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(fout, fin, generator=g) * fin**-0.5)
    return Q.quantize_linear(lin, quant_type, blocksize, nested, backend="bitsandbytes")


def _fastpeft_linear4bit(fin, fout, quant_type="nf4", nested=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(fout, fin, generator=g) * fin**-0.5)
    return Q.quantize_linear(lin, quant_type, blocksize, nested)


def _reference_factors(w4: Q.Weight4bit, init: str, r: int, scale: float, seed: int):
    """fp64 PiSSA/OLoRA factors of the decoded weight. The randomized SVD replays the layer's draws (its
    adapters' nn.Linear inits, then svd_lowrank's) from ``seed``: its U, S, V taken to fp64."""
    w = w4.dequantize(w4.dtype).double()
    if init == "olora":
        Qm, R = torch.linalg.qr(w)
        return R[:r], Qm[:, :r]
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        torch.manual_seed(seed)
        nn.Linear(w4.in_features, r, bias=False), nn.Linear(r, w4.out_features, bias=False)
        U, S, Vm = (t.double() for t in torch.svd_lowrank(w.float(), q=r, niter=int(init.rsplit("_", 1)[1])))
        Vh = Vm.t()
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def _requantized(w4: Q.Weight4bit, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bytes, decoded fp64) of the fp64 residual quantized in ``w4``'s format (fastpeft's quantizer,
    bitsandbytes' bytes: test_quant.py; bitsandbytes' own CPU code differs at some widths and blocksizes)."""
    if w4.quant_type == "int4":
        packed, scales, zeros = Q.quantize_int4(residual.float(), w4.blocksize)
        return packed, Q.dequantize_int4(packed, scales, zeros, w4.blocksize, w4.in_features, torch.float32).double()
    packed, state = Q.quantize_4bit(residual.to(w4.dtype), w4.blocksize, w4.quant_type, w4.nested)
    return packed, Q.dequantize_4bit(packed, state, torch.float32).double()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("kind", ["bnb-nf4-nested", "fastpeft-fp4-128", "fastpeft-int4"])
def test_4bit_init_against_fp64_reference(init, kind):
    lib, qt, *_ = kind.split("-")
    fin, fout, r, scale = 96, 40, 4, 2.0
    if lib == "bnb":
        base4, copy4 = (_bnb_linear(fin, fout, qt, nested=True) for _ in range(2))
    else:
        bs = 128 if qt == "fp4" else 32
        base4, copy4 = (_fastpeft_linear4bit(fin, fout, qt, nested=False, blocksize=bs) for _ in range(2))
    before = Q.Weight4bit.from_module(copy4)
    torch.manual_seed(5)
    layer = FastLoraLinear4bit.from_linear(base4, r=r, lora_alpha=r * scale, init_lora_weights=init)
    A_ref, B_ref = _reference_factors(before, init, r, scale, seed=5)
    A, B = _sign_align(layer.lora_A["default"].weight, layer.lora_B["default"].weight, A_ref)
    # (single singular vectors carry fp32's SVD error over the singular gaps; their product less so: 1.1e-5 and
    # 1.5e-5 were measured on an AMD EPYC CPU, whose LAPACK path rounds otherwise than the machine that set 1e-5)
    assert_rel(A, A_ref, 1e-4, f"{kind} {init} A")
    assert_rel(B, B_ref, 1e-4, f"{kind} {init} B")
    assert_rel(B @ A, B_ref @ A_ref, 5e-5, f"{kind} {init} B A")
    after = layer.weight4bit()
    # the base keeps its own format: type, blocksize, double quantization, original dtype
    assert (after.quant_type, after.blocksize, after.nested, after.dtype) == \
        (before.quant_type, before.blocksize, before.nested, before.dtype)
    got = after.dequantize(torch.float32).double()
    w = before.dequantize(before.dtype).double()
    residual = w - scale * B_ref @ A_ref
    ref_packed, ref = _requantized(before, residual)
    # the fp32 and fp64 residuals get other 4-bit codes only at rare near-ties (int4's min/max scales can move
    # a whole group when an extreme moves)
    assert (after.packed.reshape(-1) != ref_packed.reshape(-1)).double().mean() < 0.02
    assert_rel(got, ref, 1e-2, f"{kind} {init} base")
    assert (residual - got).norm() < 0.2 * residual.norm()  # the base holds the (re-quantized) residual


def test_olora_on_a_bitsandbytes_base_matches_peft():
    """peft decodes a bnb 4-bit weight for OLoRA and re-quantizes the residual (blocksize 64, fp32 state): with
    such a base fastpeft's result is peft's, bytes included."""
    base = Wrap(_bnb_linear(64, 40, "nf4", nested=True, seed=3))
    other = Wrap(_bnb_linear(64, 40, "nf4", nested=True, seed=3))
    kw = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights="olora")
    ours = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(other, peft.LoraConfig(**kw))
    a, b = ours.base_model.model.proj, theirs.base_model.model.proj
    for n in ("lora_A", "lora_B"):
        assert_rel(getattr(a, n)["default"].weight, getattr(b, n)["default"].weight, 1e-6, n)
    wa, wb = Q.Weight4bit.from_module(a.base_layer), Q.Weight4bit.from_module(b.base_layer)
    assert torch.equal(wa.packed.reshape(-1), wb.packed.reshape(-1))
    assert torch.equal(wa.dequantize(torch.float32), wb.dequantize(torch.float32))


def test_pissa_on_4bit_keeps_the_function_up_to_the_residual_rounding():
    """On a 4-bit base PiSSA decomposes the decoded weight W_q: Quant(W_q − s·B A) + s·B A equals W_q up to the
    rounding of the residual, which is small next to W_q's own quantization error (the principal part is
    held exactly by the adapter)."""
    lin = nn.Linear(128, 64)
    with torch.no_grad():  # a weight with a dominant low-rank part, as trained weights have
        lin.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 128) * 0.1 + torch.randn(64, 128) * 0.01)
    w = lin.weight.detach().double()
    plain = Q.quantize_linear(_copy(lin), "nf4", 64, True)
    layer = FastLoraLinear4bit.from_linear(_copy(plain), r=8, lora_alpha=16, init_lora_weights="pissa")
    effective = layer.dequantized_weight().double() + 2.0 * layer.lora_B["default"].weight.double() @ \
        layer.lora_A["default"].weight.double()
    w_q = Q.Weight4bit.from_module(plain).dequantize(torch.float32).double()
    assert (effective - w_q).norm() < 0.2 * (w_q - w).norm()
    x = torch.randn(6, 128)
    assert_rel(layer(x), nn.functional.linear(x.double(), w_q, plain.bias.double()), 2e-2, "pissa 4-bit function")


# ----------------------------------------------------------------------------- LoftQ
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_matches_peft(peft_loftq_cpu, iters, dtype):
    base = Base("llama64", dtype)
    loftq = {"loftq_bits": 4, "loftq_iter": iters}
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=fastpeft.LoftQConfig(loftq_iter=iters)))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base.fresh(), peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_iter=iters)))
    assert ours.peft_config["default"].loftq_config == theirs.peft_config["default"].loftq_config == loftq
    theirs_p = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        if "base_layer.weight" in k:
            assert torch.equal(p, theirs_p[k]), k  # the same NF4 bytes decoded
        elif "lora_" in k:
            # (peft's fp32 adapters went through the base dtype on their way, as for PiSSA: see above)
            assert_rel(p.to(dtype).float(), theirs_p[k], 1e-5, k)
    # the base became its NF4 round trip and B A fits what the quantization lost
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    w = base.state["model.layers.0.self_attn.q_proj.weight"].float()
    q = layer.base_layer.weight.float()
    assert torch.equal(q, Q.dequantize_nf4(*Q.quantize_nf4(w if iters == 1 else q, 64, False)).to(dtype).float()) \
        or iters > 1
    ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (w - q - ba).norm() < 0.9 * (w - Q.dequantize_nf4(*Q.quantize_nf4(w, 64, False))).norm()


def test_loftq_on_conv1d_quantizes_the_out_in_weight():
    base = Base("gpt2")
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 1}))
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    w = base.state["transformer.h.0.attn.c_attn.weight"].t()  # (out, in), GPT-2 stores (in, out)
    q = Q.dequantize_nf4(*Q.quantize_nf4(w, 64, False))
    assert torch.equal(layer.base_layer.weight.t(), q)
    U, S, Vh = torch.linalg.svd((w - q).double(), full_matrices=False)
    assert_rel(layer.lora_B["default"].weight @ layer.lora_A["default"].weight,
               U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], 1e-5, "B A")


def _save_model(tmp_path):
    base = Base("llama64")
    model = base.fresh()
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    return base


@pytest.mark.parametrize("backend", ["fastpeft", "bitsandbytes"])
def test_replace_lora_weights_loftq_matches_peft(tmp_path, peft_loftq_cpu, backend):
    base = _save_model(tmp_path)
    path = str(tmp_path / "model")

    def quantized():
        model = transformers.LlamaForCausalLM.from_pretrained(path).eval()  # (_name_or_path: the folder)
        return Q.quantize_model(model, backend="bitsandbytes" if backend == "bitsandbytes" else "fastpeft",
                                compress_statistics=False, progressbar=False)

    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS)
    ours = fastpeft.get_peft_model(quantized(), fastpeft.LoraConfig(**kw))
    seen = []
    fastpeft.replace_lora_weights_loftq(ours, callback=lambda m, name: seen.append(name) or True)  # model_path: config
    assert seen and all(not n.startswith("base_model") for n in seen)
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    w = base.state["model.layers.1.mlp.down_proj.weight"].double()
    resid = w - layer.weight4bit().dequantize(torch.float32).double()
    U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
    # (a quantization error has a flat spectrum: its rank-4 truncation is ill-conditioned, fp32 SVD error ~1e-4)
    assert_rel(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4],
               1e-3, "B A vs fp64")
    if backend == "bitsandbytes":  # peft's function needs its own (bnb) layers
        theirs = peft.get_peft_model(quantized(), peft.LoraConfig(**kw))
        peft.replace_lora_weights_loftq(theirs, model_path=path)
        theirs_p = dict(theirs.named_parameters())
        for k, p in ours.named_parameters():
            if "lora_" in k:
                assert_rel(p, theirs_p[k], 1e-5, k)


def test_replace_lora_weights_loftq_callback_rolls_back_and_errors(tmp_path):
    _save_model(tmp_path)
    path = tmp_path / "model"
    model = Q.quantize_model(transformers.LlamaForCausalLM.from_pretrained(path).eval(), progressbar=False)
    ours = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: p.clone() for k, p in ours.named_parameters() if "lora_" in k}
    keep_first = lambda m, name: name.endswith("0.self_attn.q_proj")  # noqa: E731
    fastpeft.replace_lora_weights_loftq(ours, model_path=path, callback=keep_first)
    for k, p in ours.named_parameters():
        if "lora_B" in k:
            assert torch.equal(p, before[k]) == ("layers.1." in k), k  # layer 1 rolled back, layer 0 replaced
    dense = fastpeft.get_peft_model(Base("llama64").fresh(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="4-bit"):
        fastpeft.replace_lora_weights_loftq(dense, model_path=path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        fastpeft.replace_lora_weights_loftq(ours, model_path=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- conversion at save time
def _train_like(model, seed=3):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_converted_adapter_applies_to_the_original_base(tmp_path, init, rslora):
    base = Base("llama")
    ours, theirs = _both(base, init_lora_weights=init, use_rslora=rslora)
    for lib, model in (("fastpeft", ours), ("peft", theirs)):
        model.save_pretrained(tmp_path / lib / "init")
        _train_like(model)
    trained = _logits(ours)
    assert_rel(_logits(theirs), trained, 1e-5, "same training")
    for lib, model in (("fastpeft", ours), ("peft", theirs)):
        model.save_pretrained(tmp_path / lib / "lora", path_initial_model_for_weight_conversion=str(tmp_path / lib /
                                                                                                      "init"))
    from safetensors.torch import load_file

    files = {lib: load_file(tmp_path / lib / "lora" / "adapter_model.safetensors") for lib in ("fastpeft", "peft")}
    assert files["fastpeft"].keys() == files["peft"].keys()
    for k, v in files["fastpeft"].items():
        assert v.shape[0 if ".lora_A." in k else 1] == 8
        assert_rel(v, files["peft"][k], 1e-5, k)
    for name in ("lora", "init"):
        a = json.loads((tmp_path / "fastpeft" / name / "adapter_config.json").read_text())
        b = json.loads((tmp_path / "peft" / name / "adapter_config.json").read_text())
        for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern",
                    "inference_mode"):
            assert a[key] == pytest.approx(b[key]) if isinstance(b[key], float) else a[key] == b[key], (name, key)
    cfg = json.loads((tmp_path / "fastpeft" / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (8, True)
    assert cfg["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    # the model being saved keeps its own config
    assert ours.peft_config["default"].init_lora_weights == init and ours.peft_config["default"].r == 4
    for lib in ("fastpeft", "peft"):
        loaded = fastpeft.PeftModel.from_pretrained(base.fresh(), tmp_path / lib / "lora")
        assert_rel(_logits(loaded), trained, 1e-5, f"fastpeft loads {lib}'s conversion")
        loaded = peft.PeftModel.from_pretrained(base.fresh(), tmp_path / lib / "lora")
        assert_rel(_logits(loaded), trained, 1e-5, f"peft loads {lib}'s conversion")


def test_conversion_refusals(tmp_path):
    base = Base("llama")
    ours = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2}))
    ours.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="rank_pattern"):
        ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    dora = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=TARGETS,
                                                                     init_lora_weights="pissa", use_dora=True))
    dora.save_pretrained(tmp_path / "dinit")
    with pytest.raises(ValueError, match="DoRA"):
        dora.save_pretrained(tmp_path / "dlora", path_initial_model_for_weight_conversion=str(tmp_path / "dinit"))
    first = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      init_lora_weights="olora"))
    first.save_pretrained(tmp_path / "qinit")
    other = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"],
                                                                      init_lora_weights="olora"))
    with pytest.raises(ValueError, match="initial adapter lacks"):
        other.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=str(tmp_path / "qinit"))
    small = fastpeft.get_peft_model(base.fresh(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights="olora"))
    with pytest.raises(ValueError, match="not the same adapter"):
        small.save_pretrained(tmp_path / "y", path_initial_model_for_weight_conversion=str(tmp_path / "qinit"))


# ----------------------------------------------------------------------------- configs and loading
@pytest.mark.parametrize("init", ["pissa_niter_4", "olora", "loftq"])
def test_adapter_config_round_trip_with_peft(tmp_path, init):
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}} if init == "loftq" else {}
    ours = fastpeft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init, **extra)
    theirs = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init,
                             **({"loftq_config": peft.LoftQConfig(loftq_iter=2)} if extra else {}))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert (a["init_lora_weights"], a["loftq_config"]) == (b["init_lora_weights"], b["loftq_config"])
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").loftq_config == b["loftq_config"]
    again = fastpeft.LoraConfig.from_pretrained(tmp_path / "theirs")
    assert (again.init_lora_weights, again.loftq_config) == (init, b["loftq_config"])
    with pytest.warns(UserWarning, match="loftq_config"):
        assert fastpeft.LoraConfig(init_lora_weights="olora", loftq_config={"loftq_bits": 4}).loftq_config == {}


@pytest.mark.parametrize("init", ["olora", "loftq"])
def test_trained_adapters_load_across_libraries(tmp_path, peft_loftq_cpu, init):
    """Saved by either library after training, loaded by the other onto the original base: the load runs the
    init again (rewriting the base), then takes the saved A, B: the trained model's outputs."""
    base = Base("llama64")
    kw = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
    ours, theirs = _both(base, init_lora_weights=init, **kw)
    for lib, model in (("fastpeft", ours), ("peft", theirs)):
        _train_like(model)
        model.save_pretrained(tmp_path / lib)
    trained = _logits(ours)
    assert_rel(_logits(theirs), trained, 1e-5, "same training")
    for lib, loader in (("fastpeft", peft.PeftModel), ("peft", fastpeft.PeftModel)):
        loaded = loader.from_pretrained(base.fresh(), tmp_path / lib)
        assert_rel(_logits(loaded), trained, 1e-5, f"{lib}'s adapter loaded by the other")


# ----------------------------------------------------------------------------- errors
def test_bad_inits_raise_clear_errors():
    for bad in ("pissa_niter_", "pissa_niter_x", "PiSSA", "corda", "EVA"):
        with pytest.raises(ValueError, match="not supported by fastpeft"):
            fastpeft.LoraConfig(init_lora_weights=bad)
        with pytest.raises(ValueError, match="not supported by fastpeft"):
            FastLoraLinear(8, 8, r=2, init_lora_weights=bad)
    with pytest.raises(ValueError, match="loftq_config` must be specified"):
        fastpeft.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_config` must be specified"):
        FastLoraLinear(8, 8, r=2, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits=8"):
        fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8))
    with pytest.raises(ValueError, match="loftq_iter"):
        fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0})
    assert fastpeft.LoraConfig(init_lora_weights="OLoRA").init_lora_weights == "OLoRA"  # peft: case-insensitive
    for init in ("pissa", "pissa_niter_2", "olora"):
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            FastLoraLinear.from_linear(nn.Linear(16, 8).double(), r=2, init_lora_weights=init)
    with pytest.raises(ValueError, match="replace_lora_weights_loftq"):
        FastLoraLinear4bit.from_linear(_fastpeft_linear4bit(64, 8), r=2, init_lora_weights="loftq",
                                       loftq_config={"loftq_bits": 4, "loftq_iter": 1})


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "loftq"])
def test_data_dependent_inits_run_on_the_meta_device(init):
    """fastpeft train checks its options on a meta-device skeleton: every init must run on shapes alone."""
    loftq = {"loftq_bits": 4, "loftq_iter": 2} if init == "loftq" else None
    with torch.device("meta"):
        layer = FastLoraLinear.from_linear(nn.Linear(16, 8), r=2, init_lora_weights=init, loftq_config=loftq)
    assert layer.lora_A["default"].weight.device.type == layer.base_layer.weight.device.type == "meta"
    assert layer.lora_B["default"].weight.shape == (8, 2)


def test_train_cli_takes_init_lora_weights():
    from fastpeft import train

    args = train.parse_args(["--init-lora-weights", "pissa_niter_4", "--r", "4", "--target-modules", "q_proj"])
    assert args.init_lora_weights == "pissa_niter_4"
    torch.manual_seed(1)
    model = train.build_peft_model(Base("llama").fresh(), args)
    assert model.peft_config["default"].init_lora_weights == "pissa_niter_4"
    args = train.parse_args(["--init-lora-weights", "loftq", "--target-modules", "q_proj"])
    assert train.build_peft_model(Base("llama").fresh(), args).peft_config["default"].loftq_config == \
        {"loftq_bits": 4, "loftq_iter": 1}
    assert train.parse_args([]).init_lora_weights is True
    with pytest.raises(SystemExit):
        train.parse_args(["--init-lora-weights", "bogus"])
