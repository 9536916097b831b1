"""The 4-bit LoRA op and layer: outputs and gradients against fp64 on the dequantized weight, peft + bnb
parity, the shared workspace, the decode dispatch, merge / to_linear / quantize_model / kbit prep."""

import copy
import warnings

import pytest
import torch
from torch import nn

from fastpeft import quant as Q
from fastpeft.layers import FastLoraLinear4bit
from fastpeft.ops4bit import _WORKSPACES, lora_linear_4bit
from helpers import assert_rel, lora_grads64, lora_ref64, peft_lora_on

bnb = pytest.importorskip("bitsandbytes")


def _bnb_linear(fin, fout, quant_type="nf4", nested=True, blocksize=64, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(fin, fout, bias=bias, compute_dtype=dtype, compress_statistics=nested,
                            quant_type=quant_type, device="meta")
    w = (torch.randn(fout, fin, generator=g) * fin**-0.5).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=blocksize)
    if bias:
        lin.bias = nn.Parameter(torch.randn(fout, generator=g).to(dtype) * 0.1, requires_grad=False)
    return lin.to("cpu")


def _adapters(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A.copy_(torch.randn(A.shape, generator=g) * 0.3)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3)  # non-zero B: the LoRA term matters


def _base_w(layer):
    return layer.weight4bit().dequantize(torch.float32)


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int4"])
@pytest.mark.parametrize("fin,fout,r", [(64, 37, 4), (96, 45, 8)])
def test_layer_outputs_and_grads_vs_fp64(backend, kind, fin, fout, r):
    if kind == "int4":
        base = Q.quantize_linear(nn.Linear(fin, fout), "int4", blocksize=32)
    else:
        qt = kind.split("-")[0]
        base = _bnb_linear(fin, fout, qt, nested=kind.endswith("nested"), blocksize=32 if qt == "fp4" else 64)
    layer = FastLoraLinear4bit.from_linear(base, r=r, lora_alpha=2 * r)
    _adapters(layer)
    x = torch.randn(3, 7, fin, requires_grad=True)  # 3-D input, 21 rows
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = _base_w(layer)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x2d, dy2d = x.detach().reshape(-1, fin), dy.reshape(-1, fout)
    ref = lora_ref64(x2d, w, layer.base_layer.bias.detach(), A, B, layer.scaling["default"])
    assert_rel(y.detach().reshape(-1, fout), ref, 1e-5, "y")
    base_only = x2d.double() @ w.double().t() + layer.base_layer.bias.double()
    assert (ref - base_only).abs().max() > 1e-2  # the adapter changes the output
    dx, dA, dB, _ = lora_grads64(dy2d, x2d, w, A, B, layer.scaling["default"])
    assert_rel(x.grad.reshape(-1, fin), dx, 1e-5, "dx")
    assert_rel(layer.lora_A["default"].weight.grad, dA, 1e-5, "dA")
    assert_rel(layer.lora_B["default"].weight.grad, dB, 1e-5, "dB")
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_dropout_and_bias_grad_vs_fp64(backend, p):
    base = _bnb_linear(80, 33, "nf4", nested=True)
    w4 = Q.Weight4bit.from_module(base)
    w = w4.dequantize(torch.float32)
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(6, 80, generator=g) * 0.2).requires_grad_()
    B = (torch.randn(33, 6, generator=g) * 0.2).requires_grad_()
    bias = torch.randn(33, generator=g).requires_grad_()
    x = torch.randn(19, 80, generator=g, requires_grad=True)
    seed = torch.tensor([1234], dtype=torch.int64)
    y = lora_linear_4bit(x, w4, bias, A, B, scale=1.5, dropout_p=p, seed=seed)
    dy = torch.randn(19, 33, generator=g)
    y.backward(dy)
    assert_rel(y.detach(), lora_ref64(x.detach(), w, bias.detach(), A.detach(), B.detach(), 1.5, p, seed), 1e-5)
    dx, dA, dB, db = lora_grads64(dy, x.detach(), w, A.detach(), B.detach(), 1.5, p, seed)
    for got, want, name in ((x.grad, dx, "dx"), (A.grad, dA, "dA"), (B.grad, dB, "dB"), (bias.grad, db, "db")):
        assert_rel(got, want, 1e-5, name)


@pytest.mark.interp
def test_triton_path_uses_kernels_and_a_shared_workspace(triton_backend):
    from fastpeft.kernels import LAUNCHES

    l1 = FastLoraLinear4bit.from_linear(_bnb_linear(64, 40, seed=4), r=4, init_lora_weights=False)
    l2 = FastLoraLinear4bit.from_linear(_bnb_linear(64, 24, seed=5), r=4, init_lora_weights=False)
    before = dict(LAUNCHES)
    x = torch.randn(20, 64, requires_grad=True)
    (l1(x).sum() + l2(x).sum()).backward()
    assert LAUNCHES["dequant4"] - before.get("dequant4", 0) == 4  # 2 layers × (forward + dx)
    assert LAUNCHES["lora_down"] > before.get("lora_down", 0)
    bufs = [b for (dev, dt), b in _WORKSPACES.items() if dt == torch.float32 and dev.type == "cpu"]
    assert len(bufs) == 1 and bufs[0].numel() >= 64 * 40  # one buffer, sized for the larger layer
    # and no layer keeps a decoded copy: its tensors are the 4-bit ones only
    for layer in (l1, l2):
        assert all(t.dtype in (torch.uint8, torch.float32) and t.numel() < 64 * 40
                   for t in layer.base_layer.state_dict().values())


@pytest.mark.interp
def test_backends_agree(monkeypatch):
    layer = FastLoraLinear4bit.from_linear(_bnb_linear(96, 45, "fp4", nested=True), r=8, init_lora_weights=False)
    x = torch.randn(23, 96)
    outs = []
    for be in ("torch", "triton"):
        monkeypatch.setenv("FASTPEFT_BACKEND", be)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone()))
        layer.zero_grad()
    for a, b in zip(*outs):
        assert_rel(a, b, 1e-5)


@pytest.mark.interp
def test_decode_dispatch_uses_gemv(triton_backend):
    from fastpeft.kernels import LAUNCHES

    layer = FastLoraLinear4bit.from_linear(_bnb_linear(128, 40, seed=6), r=4, init_lora_weights=False).eval()
    x = torch.randn(2, 128)
    before = LAUNCHES["lora_gemv_4bit"]
    with torch.no_grad():
        y = layer(x)
    assert LAUNCHES["lora_gemv_4bit"] == before + 1
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = lora_ref64(x, _base_w(layer), layer.base_layer.bias, A, B, layer.scaling["default"])
    assert_rel(y, ref, 1e-5)
    x.requires_grad_()
    before = LAUNCHES["lora_gemv_4bit"]
    layer(x).sum().backward()  # a gradient is needed: the workspace path
    assert LAUNCHES["lora_gemv_4bit"] == before and x.grad is not None


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_matches_peft_on_bnb_linear4bit(backend, quant_type, nested):
    pytest.importorskip("peft")
    base = _bnb_linear(72, 50, quant_type, nested=nested, seed=7)
    theirs = peft_lora_on(copy.deepcopy(base), 8, 16)
    ours = FastLoraLinear4bit.from_linear(copy.deepcopy(base), r=8, lora_alpha=16)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    _adapters(ours, seed=8)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    x = torch.randn(4, 9, 72)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((theirs, ours), xs)]
    dy = torch.randn_like(ys[0])
    for y in ys:
        y.backward(dy)
    assert_rel(ys[1].detach(), ys[0].detach(), 1e-5, "y")
    assert_rel(xs[1].grad, xs[0].grad, 1e-5, "dx")
    for n in ("lora_A", "lora_B"):
        assert_rel(getattr(ours, n)["default"].weight.grad, getattr(theirs, n)["default"].weight.grad, 1e-5, n)
    assert ours.base_layer.weight.data_ptr() != base.weight.data_ptr()  # deep copies …
    wrapped = FastLoraLinear4bit.from_linear(base, r=2)
    assert wrapped.base_layer is base  # … but wrapping itself copies nothing
    assert wrapped.weight4bit().packed.data_ptr() == base.weight.data_ptr()


def test_merge_requantizes_with_warning_and_to_linear():
    torch.manual_seed(12)
    for base in (_bnb_linear(64, 30, seed=9), Q.quantize_linear(nn.Linear(64, 30), "nf4")):
        layer = FastLoraLinear4bit.from_linear(base, r=4, lora_alpha=8)
        _adapters(layer, seed=10)
        x = torch.randn(6, 64)
        with torch.no_grad():
            y = layer(x)
            lin = layer.to_linear(torch.float32)
            assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float32
            assert_rel(lin(x), y, 1e-5, "to_linear")
            assert layer.to_linear().weight.dtype == torch.bfloat16
            w_exact = _base_w(layer) + layer.get_delta_weight("default")
            with pytest.warns(UserWarning, match="re-quantizes"):
                layer.merge()
            assert layer.merged
            merged = _base_w(layer)
            # the merged base is the 4-bit rounding of the exact merged weight, nothing else (fastpeft's
            # quantizer: bitsandbytes' bytes, test_quant.py; bnb's native CPU one differs at rare near-ties)
            qb, sb = Q.quantize_4bit(w_exact, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(merged, Q.dequantize_4bit(qb, sb))
            qn, sn = bnb.functional.quantize_4bit(w_exact, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(qn, qb) and torch.equal(sn.state2.absmax, sb.state2.absmax)
            with torch.enable_grad():  # (bnb repacks its weight for a CPU GEMM in no-grad eval mode)
                assert_rel(layer(x), x @ merged.t() + layer.base_layer.bias, 1e-5, "merged output")
            assert_rel(layer(x), y, 0.25, "merged vs unmerged (a 4-bit rounding apart)")
            with pytest.warns(UserWarning, match="re-quantizes"):
                layer.unmerge()
            assert not layer.merged


def test_linear4bit_module_state_dict_round_trips_with_bitsandbytes():
    lin = nn.Linear(64, 24)
    ours = Q.quantize_linear(lin, "nf4", blocksize=64, compress_statistics=True)
    theirs = _bnb_linear(64, 24, seed=11)
    x = torch.randn(5, 64)
    sd = ours.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"} <= set(sd)
    # bitsandbytes loads fastpeft's state dict with its own prequantized loader (as transformers does) …
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu",
                                                        module=theirs)
    theirs.bias = nn.Parameter(sd["bias"], requires_grad=False)
    assert torch.equal(bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state),
                       ours.dequantize(torch.float32))
    with torch.enable_grad():  # (bnb repacks its weight for a CPU GEMM in no-grad eval mode)
        assert_rel(theirs(x), lin(x), 0.1)
    back = Q.quantize_linear(nn.Linear(64, 24), "nf4")
    back.load_state_dict(theirs.state_dict())  # … and fastpeft loads bitsandbytes'
    assert torch.equal(back(x), ours(x))
    assert torch.equal(Q.Linear4bit.from_bnb(theirs)(x), ours(x))
    assert torch.equal(ours.to_bnb().weight.data, ours.weight.data)
    i4 = Q.quantize_linear(lin, "int4", blocksize=32)
    i4b = Q.quantize_linear(nn.Linear(64, 24), "int4", blocksize=64)
    i4b.load_state_dict(i4.state_dict())
    assert i4b.blocksize == 32 and torch.equal(i4b(x), i4(x))
    assert_rel(i4(x), lin(x), 0.1)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_quantize_model_and_prepare_for_kbit_training():
    model = _tiny_llama()
    Q.quantize_model(model, compute_dtype=torch.bfloat16)
    kinds = {type(m).__name__ for m in model.model.layers.modules()}
    assert "Linear4bit" in kinds and "Linear" not in kinds
    assert type(model.lm_head) is nn.Linear  # the head stays full precision
    Q.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.float32 for p in floats)  # norms, embeddings, head in fp32
    ids = torch.randint(0, 64, (2, 8))
    emb = model.get_input_embeddings()(ids)
    assert emb.requires_grad  # input grads on for reentrant checkpointing
    with pytest.raises(ValueError, match="backend"):
        Q.quantize_model(_tiny_llama(), backend="gptq")


def test_model_merge_warns_once_for_all_requantized_layers():
    import fastpeft

    model = Q.quantize_model(_tiny_llama(), compute_dtype=torch.bfloat16)
    model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                               init_lora_weights=False))
    n = sum(isinstance(m, FastLoraLinear4bit) for m in model.modules())
    assert n == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    msgs = [str(w.message) for w in caught if "re-quantiz" in str(w.message)]
    assert len(msgs) == 1 and f"{n} 4-bit base layer(s)" in msgs[0] and "relative error up to" in msgs[0]
    model.unmerge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    msgs = [str(w.message) for w in caught if "re-quantiz" in str(w.message)]
    assert len(msgs) == 1 and f"{n} 4-bit base layer(s)" in msgs[0]
    assert not any(isinstance(m, FastLoraLinear4bit) for m in merged.modules())
    # one layer alone still warns with its own error
    layer = FastLoraLinear4bit.from_linear(nn.Linear(64, 32), r=2, init_lora_weights=False)
    with pytest.warns(UserWarning, match=r"re-quantizes its weight.*relative error"):
        layer.merge()


def test_bad_inputs():
    with pytest.raises(TypeError, match="Linear4bit or an nn.Linear"):
        FastLoraLinear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        FastLoraLinear4bit.from_linear(_bnb_linear(64, 8), fan_in_fan_out=True)
    layer = FastLoraLinear4bit.from_linear(nn.Linear(64, 8), r=2)  # quantized by fastpeft
    assert isinstance(layer.base_layer, Q.Linear4bit)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(3, 65))
    with pytest.raises(ValueError, match="even"):
        Q.quantize_linear(nn.Linear(63, 8), "int4", blocksize=32)


# --------------------------------------------------------------------------- bitsandbytes' CPU repacking
def _hetero_bnb_linear(nested, storage=torch.uint8, quant_type="nf4", fin=256, fout=64, seed=20):
    """A bnb Linear4bit whose block scales differ a lot along each row (as in trained models)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(fout, fin, generator=g) * 0.05
    w[:, : fin // 2] *= 8
    lin = bnb.nn.Linear4bit(fin, fout, bias=True, compress_statistics=nested, quant_type=quant_type,
                            quant_storage=storage, device="meta")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=64, quant_storage=storage, module=lin)
    lin.bias = nn.Parameter(torch.randn(fout, generator=g) * 0.1, requires_grad=False)
    return lin.to("cpu")


def _bf16_absmax_reference(lin):
    """bnb's own decoding of the weight before repacking, with the absmax bnb's CPU GEMM keeps: rounded to
    bf16 (bitsandbytes' Python paths only)."""
    qs = lin.weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    st = bnb.functional.QuantState(absmax=absmax.bfloat16().float(), shape=qs.shape, code=qs.code,
                                   blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)
    data = lin.weight.data.reshape(-1).view(torch.uint8).clone()
    return data, bnb.functional.dequantize_4bit(data, st).float()


@pytest.mark.parametrize("nested,storage,quant_type", [(False, torch.uint8, "nf4"), (True, torch.uint8, "nf4"),
                                                       (False, torch.bfloat16, "fp4"), (True, torch.float32, "nf4")])
def test_from_module_restores_a_synthetic_bnb_cpu_packed_weight(nested, storage, quant_type):
    """bnb's repacking applied by hand (its Python function, any machine): the read-back weight is bnb's
    pre-repack decoding with the bf16 absmax bnb computes with, the codes bit for bit."""
    lin = _hetero_bnb_linear(nested, storage, quant_type)
    data0, ref = _bf16_absmax_reference(lin)
    exact = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    lin.weight.data, _ = bnb.functional._convert_weight_packed_for_cpu(lin.weight.data, lin.weight.quant_state)
    qs = lin.weight.quant_state
    assert qs.packing_format_for_cpu and tuple(qs.absmax.shape) == (256 // 64, 64)  # bnb's (in/bs, out) bf16
    w4 = Q.Weight4bit.from_module(lin)
    assert torch.equal(w4.packed.reshape(-1), data0)  # codes restored bit for bit
    assert lin.weight.data.dtype == storage and not qs.packing_format_for_cpu
    assert torch.equal(w4.dequantize(torch.float32), ref)
    assert_rel(w4.dequantize(torch.float32), exact, 4e-3, "vs pre-repack weight")  # a bf16 absmax apart
    # bitsandbytes reads the restored state too, and a second repack/restore cycle changes nothing
    assert torch.equal(bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float(), ref)
    lin.weight.data, _ = bnb.functional._convert_weight_packed_for_cpu(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(Q.Weight4bit.from_module(lin).dequantize(torch.float32), ref)
    # the layer built on it computes with that weight; a merge re-quantizes in the format bnb was built with
    layer = FastLoraLinear4bit.from_linear(lin, r=4)
    x = torch.randn(5, 256)
    assert_rel(layer(x), x.double() @ ref.double().t() + lin.bias.double(), 1e-5, "zero-LoRA output")
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert lin.weight.quant_state.nested == nested


@pytest.mark.parametrize("nested", [False, True])
def test_wrapping_a_bnb_layer_after_its_cpu_forward_repacked_it(nested):
    """The real flow: bnb's eval-mode no-grad CPU forward repacks the weight (on AVX512-bf16 machines; the
    test skips where bnb did not), then fastpeft wraps the layer."""
    lin = _hetero_bnb_linear(nested)
    _, ref = _bf16_absmax_reference(lin)
    x = torch.randn(5, 256)
    lin.eval()
    with torch.no_grad():
        y_bnb = lin(x)
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack its weight for the CPU here")
    y_ref = x.double() @ ref.double().t() + lin.bias.double()
    assert_rel(y_bnb, y_ref, 1e-2, "bnb's CPU GEMM")  # (bnb computes in bf16)
    layer = FastLoraLinear4bit.from_linear(lin, r=4).eval()
    assert torch.equal(layer.weight4bit().dequantize(torch.float32), ref)
    with torch.no_grad():
        assert_rel(layer(x), y_ref, 1e-5, "zero-LoRA output")


# --------------------------------------------------------------------------- the base's compute_dtype
def _compute_dtype_base(kind, fin=128, fout=48):
    """A 4-bit base computing in bf16 (compute_dtype) while the activations are fp32."""
    if kind == "bnb":
        lin = _bnb_linear(fin, fout, "nf4", nested=True, seed=21)
        lin.compute_dtype, lin.compute_type_is_set = torch.bfloat16, True  # bnb_4bit_compute_dtype=bf16
        return lin
    torch.manual_seed(21)
    return Q.quantize_linear(nn.Linear(fin, fout), kind, blocksize=64 if kind != "int4" else 32,
                             compute_dtype=torch.bfloat16)


def _ref_in(dtype, x, w, bias, A, B, scale):
    """fp64 reference of the layer computing in ``dtype``: x, W0 and the bias rounded to it first."""
    xc = x.detach().to(dtype).double()
    return lora_ref64(xc, w.to(dtype), bias.to(dtype), A, B, scale)


@pytest.mark.parametrize("kind", ["nf4", "int4", "bnb"])
def test_layer_computes_in_the_base_compute_dtype(backend, kind):
    base = _compute_dtype_base(kind)
    layer = FastLoraLinear4bit.from_linear(base, r=4, lora_alpha=8)
    x = torch.randn(3, 5, 128, requires_grad=True)  # fp32 activations, as after prepare_model_for_kbit_training
    w = _base_w(layer)
    bias = layer.base_layer.bias.detach()
    # a zero adapter (B = 0) gives the base layer's output up to its final rounding: the base product as the base
    # computes it (x and W0 rounded to bf16, fp32 accumulation), kept in fp32 where the base rounds it to bf16
    y0 = layer(x)
    assert y0.dtype == torch.float32
    with torch.enable_grad():  # (no bnb CPU repacking)
        y_base = base(x)
    y_bf16 = nn.functional.linear(x.detach().bfloat16(), w.bfloat16(), bias.bfloat16()).float()
    x2d = x.detach().reshape(-1, 128)
    base64 = x2d.bfloat16().double() @ w.bfloat16().double().t() + bias.double()
    assert_rel(y0.reshape(-1, 48), base64, 1e-5, "y (zero adapter)")
    assert_rel(y0, y_bf16, 1e-2, "y (zero adapter) vs the bf16 computation")
    assert_rel(y_base, y_bf16, 1e-2, "base")
    assert not torch.equal(y0, nn.functional.linear(x.detach(), w, bias))  # not the fp32 computation
    # with an adapter: the LoRA branch on the exact fp32 x (peft's QLoRA layer), the base product as above;
    # dx's base part from dy rounded to bf16 and W0 in bf16 (the base's backward), dA and dB from the fp32 x, dy
    _adapters(layer, seed=22)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    scale = layer.scaling["default"]
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    dy2d = dy.reshape(-1, 48)
    # (bitsandbytes' forward above cast its bias to bf16 in place: the bias as the layer has it now)
    base64 = base64 - bias.double() + layer.base_layer.bias.detach().double()
    ref = base64 + lora_ref64(x2d, torch.zeros_like(w), None, A, B, scale)
    assert_rel(y.detach().reshape(-1, 48), ref, 1e-5, "y")
    _, dA, dB, _ = lora_grads64(dy2d, x2d, w, A, B, scale)
    dx = dy2d.bfloat16().double() @ w.bfloat16().double() + scale * (dy2d.double() @ B.double()) @ A.double()
    assert_rel(x.grad.reshape(-1, 128), dx, 1e-5, "dx")
    assert_rel(layer.lora_A["default"].weight.grad, dA, 1e-5, "dA")
    assert_rel(layer.lora_B["default"].weight.grad, dB, 1e-5, "dB")


def test_decode_gemv_runs_in_the_base_compute_dtype(triton_backend, monkeypatch):
    from fastpeft import kernels

    layer = FastLoraLinear4bit.from_linear(_compute_dtype_base("nf4"), r=4, init_lora_weights=False).eval()
    seen = []
    real = kernels.lora_gemv_4bit

    def spy(x2d, *args, **kwargs):
        seen.append(x2d.dtype)
        return real(x2d, *args, **kwargs)

    monkeypatch.setattr(kernels, "lora_gemv_4bit", spy)
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = layer(x)
    assert seen == [torch.bfloat16] and y.dtype == torch.float32  # the base product on x rounded to bf16 …
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = _ref_in(torch.bfloat16, x, _base_w(layer), layer.base_layer.bias, A, B, layer.scaling["default"])
    assert_rel(y, ref, 8e-3)
    assert not (y.bfloat16().float() == y).all()  # … returned in fp32, not rounded (tests/test_qlora_fp32_input.py)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_mixed_adapter_batch_on_fp32_input_takes_the_wide_path(backend, kind):
    """fp32 x over a bf16 compute dtype in a mixed batch: every row's base as bitsandbytes computes it (x rounded
    to bf16, fp32 accumulation, kept fp32), the adapter rows' LoRA term on the exact x, dx in fp32 (not rounded
    to bf16) — as the single-adapter path (``tests/test_qlora_fp32_input.py``)."""
    layer = FastLoraLinear4bit.from_linear(_compute_dtype_base(kind), r=4, lora_alpha=8)
    _adapters(layer, seed=23)
    layer.update_layer("other", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True)  # B = 0
    x = torch.randn(3, 4, 128, requires_grad=True)
    names = ["default", "__base__", "other"]
    y = layer(x, adapter_names=names)
    assert y.dtype == torch.float32
    w, bias = _base_w(layer), layer.base_layer.bias.detach()
    base = nn.functional.linear(x.detach().bfloat16().double(), w.bfloat16().double(), bias.double())
    if backend == "torch":  # the rows without an adapter (or with a zero one): the fp32 product of bf16 operands
        assert torch.equal(y[1:].detach(), nn.functional.linear(x.detach()[1:].bfloat16().float(),
                                                                w.bfloat16().float(), bias))
    assert_rel(y[1:].detach(), base[1:], 1e-5, "base rows")
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    delta = layer.scaling["default"] * (x.detach()[0].double() @ A.double().t()) @ B.double().t()
    assert_rel(y[0].detach().double() - base[0], delta, 1e-5, "adapter row's LoRA term (exact x)")
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and not (x.grad.bfloat16().float() == x.grad).all()


# --------------------------------------------------------------------------- Linear4bit.load_state_dict
def _bnb_decoded(module):
    """The module's weight as bitsandbytes decodes it (its Python path), fp32."""
    if module.quant_type == "int4":
        return module.dequantize(torch.float32)
    return bnb.functional.dequantize_4bit(module.weight.data, module.quant_state.to_bnb()).float()


@pytest.mark.parametrize("src_shape", [(128, 32), (32, 64), (64, 16)])
@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_linear4bit_load_refuses_another_weight_shape_and_changes_nothing(src_shape, quant_type):
    torch.manual_seed(30)
    src = Q.Linear4bit.from_linear(nn.Linear(*src_shape), quant_type, 64 if quant_type == "nf4" else 32,
                                   compress_statistics=False)
    dst = Q.Linear4bit.from_linear(nn.Linear(64, 32), quant_type, 64 if quant_type == "nf4" else 32)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    w_before, x = _bnb_decoded(dst), torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="size mismatch for weight") as got:  # as nn.Linear
        dst.load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        nn.Linear(64, 32).load_state_dict(nn.Linear(*src_shape).state_dict())
    assert "torch.Size([32, 64])" in str(got.value)
    after = dst.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_bnb_decoded(dst), w_before) and dst.compress_statistics
    assert_rel(dst(x), x.double() @ w_before.double().t() + dst.bias.double(), 1e-6)


def test_linear4bit_load_error_later_leaves_the_weight_as_it_was():
    torch.manual_seed(31)
    src = Q.Linear4bit.from_linear(nn.Linear(64, 32), "fp4", 128, compress_statistics=False)
    dst = Q.Linear4bit.from_linear(nn.Linear(64, 32), "nf4", 64)
    w_before, x = _bnb_decoded(dst), torch.randn(3, 64)
    sd = src.state_dict()
    sd["bias"] = torch.zeros(33)  # a bias of the wrong size: the load fails after the weight's keys
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        dst.load_state_dict(sd)
    assert (dst.quant_type, dst.blocksize, dst.compress_statistics) == ("nf4", 64, True)
    assert dst.weight.quant_state is dst.quant_state and dst.quant_state.nested
    assert torch.equal(_bnb_decoded(dst), w_before)
    assert_rel(dst(x), x.double() @ w_before.double().t() + dst.bias.double(), 1e-6)


@pytest.mark.parametrize("src_nested", [False, True])
def test_load_takes_the_checkpoint_double_quantization_for_later_merges(src_nested):
    torch.manual_seed(32)
    src = Q.Linear4bit.from_linear(nn.Linear(128, 32), "nf4", 64, compress_statistics=src_nested)
    dst = Q.Linear4bit(128, 32, compress_statistics=not src_nested)
    dst.load_state_dict(src.state_dict())
    assert dst.compress_statistics == src_nested and dst.quant_state.nested == src_nested
    layer = FastLoraLinear4bit.from_linear(dst, r=4, init_lora_weights=False)
    w_exact = _bnb_decoded(dst) + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert dst.quant_state.nested == src_nested
    assert ("weight.nested_absmax" in dst.state_dict()) == src_nested
    qb, sb = bnb.functional.quantize_4bit(w_exact, blocksize=64, quant_type="nf4", compress_statistics=src_nested)
    assert torch.equal(_bnb_decoded(dst), bnb.functional.dequantize_4bit(qb, sb).float())


def test_fp32_compute_dtype_with_half_input_warns_like_bitsandbytes():
    """bitsandbytes warns when half inputs meet its float32 compute_dtype default (slow fp32 compute);
    the fused 4-bit layer, which then computes in fp32 too, says so."""
    layer = FastLoraLinear4bit.from_linear(torch.nn.Linear(64, 32), r=2)
    layer.base_layer.compute_dtype = torch.float32
    with pytest.warns(UserWarning, match="compute_dtype is float32"):
        y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
