"""Bases whose own forward computes their output: ``nn.Linear`` subclasses that override ``forward``, above all
bitsandbytes' 8-bit ``Linear8bitLt`` (``load_in_8bit=True``), whose weight holds int8 codes. fastpeft runs the base
and adds the adapters in plain PyTorch, as peft does; the fused ops, which multiply by the stored weight, are
never used on them. Compared with peft's own LoRA layers on the same base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from helpers import assert_rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


def _int8(linear: nn.Linear) -> nn.Module:
    """``linear`` as bitsandbytes' 8-bit layer, quantized (on CPU, by moving it to the CPU)."""
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    assert q.weight.dtype == torch.int8
    return q


def _tiny_int8(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "q_proj"), (layer.self_attn, "v_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, _int8(getattr(parent, name)))
    return model


def _randomize_b(model):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_int8_base_layer_matches_peft(dropout):
    base = _int8(nn.Linear(48, 40))
    ours = fastpeft.FastLoraLinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=dropout)
    from peft.tuners.lora.bnb import Linear8bitLt

    theirs = Linear8bitLt(base, "default", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout), r=4,
                          lora_alpha=8)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        ours.lora_B["default"].weight.normal_(std=0.1)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    x = torch.randn(2, 5, 48)
    outs, grads = [], []
    for layer in (ours, theirs):
        layer.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout mask: both draw it with torch's dropout on the same input
        y = layer(xi)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append([xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
    assert (outs[0] - base(x)).abs().max() > 1e-3  # the adapter contributes
    assert_rel(outs[0], outs[1], 1e-6, "output")
    for name, a, b in zip(("x", "A", "B"), *grads):
        assert_rel(a, b, 1e-5, f"grad {name}")


def test_int8_model_matches_peft_and_round_trips(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = fastpeft.get_peft_model(_tiny_int8(), fastpeft.LoraConfig(**config))
    theirs = peft.get_peft_model(_tiny_int8(), peft.LoraConfig(**config))
    _randomize_b(ours)
    _randomize_b(theirs)
    ids = torch.randint(0, 64, (2, 7))
    la, lb = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert_rel(la, lb, 1e-5, "logits")
    la.sum().backward()
    lb.sum().backward()
    pa = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            assert_rel(pa[name].grad, p.grad, 1e-4, name)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = fastpeft.PeftModel.from_pretrained(_tiny_int8(), tmp_path / "peft")  # in eval mode, as peft loads
    with torch.no_grad():  # (bitsandbytes' int8 matmul rounds differently in eval mode)
        assert_rel(loaded(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, 1e-5, "loaded by fastpeft")
    # mixed batches: the base on every row, each adapter on its rows
    for model in (ours, theirs):
        torch.manual_seed(5)  # the same A for both
        model.add_adapter("other", type(model.peft_config["default"])(**config))
    _randomize_b(ours)
    _randomize_b(theirs)
    ours.eval()
    theirs.eval()
    names = ["other", "__base__"]
    with torch.no_grad():
        assert_rel(ours(input_ids=ids, adapter_names=names).logits, theirs(input_ids=ids, adapter_names=names).logits,
                   1e-5, "mixed batch")


def test_int8_base_refuses_what_needs_a_dense_weight():
    layer = fastpeft.FastLoraLinear.from_linear(_int8(nn.Linear(16, 8)), r=2)
    for action in (layer.merge, layer.to_linear):
        with pytest.raises(TypeError, match="Linear8bitLt computes its own forward"):
            action()
    with pytest.raises(TypeError, match="DoRA needs the base weight"):
        fastpeft.FastLoraLinear.from_linear(_int8(nn.Linear(16, 8)), r=2, use_dora=True)
    with pytest.raises(TypeError, match="init_lora_weights='pissa' needs the base weight"):
        fastpeft.FastLoraLinear.from_linear(_int8(nn.Linear(16, 8)), r=2, init_lora_weights="pissa")


class _Doubling(nn.Linear):
    """A linear layer whose forward is its own (here: twice the plain product)."""

    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


def test_a_linear_with_its_own_forward_keeps_it():
    torch.manual_seed(0)
    base = _Doubling(12, 6)
    layer = fastpeft.FastLoraLinear.from_linear(base, r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert_rel(layer(x), base(x) + x @ A.t() @ B.t(), 1e-6, "own forward kept")


def test_a_quantized_weight_never_reaches_the_fused_op():
    layer = fastpeft.FastLoraLinear.from_linear(nn.Linear(16, 8), r=2)
    layer.base_layer.weight = nn.Parameter(torch.zeros(8, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8, not a float matrix"):
        layer(torch.randn(2, 16))


def test_a_layer_offloaded_by_accelerate_runs_its_hook_and_gets_real_adapters():
    """``device_map`` offloading: the weight waits on the meta device and accelerate's hook loads it for each
    forward. The adapter is made where the hook computes (not on meta) and added to the hooked forward."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    plain = linear(x).detach()
    weights = {k: v.detach().clone() for k, v in linear.state_dict().items()}
    add_hook_to_module(linear, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))
    assert linear.weight.device.type == "meta"
    layer = fastpeft.FastLoraLinear.from_linear(linear, r=2, lora_alpha=4, init_lora_weights=False)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.device.type == "cpu" and B.device.type == "cpu"
    y = layer(x)
    assert_rel(y, plain + 2 * (x @ A.t() @ B.t()), 1e-6, "offloaded base")
    y.sum().backward()
    assert A.grad is not None and B.grad.abs().max() > 0


def test_a_model_offloaded_by_accelerate_gives_the_unoffloaded_models_outputs():
    from accelerate import cpu_offload

    def tiny():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(config).eval()

    config = fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    reference = fastpeft.get_peft_model(tiny(), config)
    offloaded = tiny()
    cpu_offload(offloaded, execution_device="cpu")
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(offloaded, config)
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "meta"
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert_rel(ours(input_ids=ids).logits, reference(input_ids=ids).logits, 1e-5, "offloaded model")


class _CodesTensor(torch.Tensor):
    """A stand-in for a quantized weight held as a tensor subclass (torchao's ``Int8Tensor`` and kin): ``F.linear``
    works through it, but it refuses custom operators and raw matrix products, as such subclasses refuse the
    operators they do not implement."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
                or func in (torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__):
            raise NotImplementedError(f"_CodesTensor does not implement {func}")
        if func is F.linear:  # a plain output, as a quantized weight's linear gives
            with torch._C.DisableTorchFunctionSubclass():
                plain = [a.as_subclass(torch.Tensor) if isinstance(a, cls) else a for a in args]
                return func(*plain, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _codes_linear(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(_CodesTensor), requires_grad=False)
    assert type(linear.weight) is _CodesTensor
    return linear


def _same_as_peft(p: nn.Module, f: nn.Module) -> None:
    """fastpeft's model ``f`` with peft's adapter weights: peft's logits and LoRA gradients (to 1e-5)."""
    f.load_state_dict(p.state_dict())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    yp, yf = p(ids).logits, f(ids).logits
    assert_rel(yf, yp, 1e-5)
    yp.square().sum().backward()
    yf.square().sum().backward()
    theirs = dict(p.named_parameters())
    for name, param in f.named_parameters():
        if param.requires_grad:
            assert_rel(param.grad, theirs[name].grad, 1e-5)


def test_tensor_subclass_weight_runs_the_base_forward_like_peft():
    """A weight that is a tensor subclass only the base's own forward can multiply by: fastpeft adds its adapters
    around ``base(x)`` (as peft does) instead of handing the weight to its fused op; outputs and gradients equal
    peft's, and merging is refused with a clear error."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    models = []
    for lib in (peft, fastpeft):
        copied = copy.deepcopy(base)  # (before the swap: the stand-in subclass does not deep-copy)
        for layer in copied.model.layers:
            _codes_linear(layer.self_attn.q_proj)
            _codes_linear(layer.mlp.down_proj)
        kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "v_proj"], init_lora_weights=False)
        models.append(lib.get_peft_model(copied, lib.LoraConfig(**kw)))
    p, f = models
    assert type(f.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight) is _CodesTensor
    _same_as_peft(p, f)
    with pytest.raises(TypeError, match="dense matrix"):
        f.merge_adapter()


def test_torchao_int8_weights_like_peft():
    """torchao's own int8 weight-only quantization (``quantize_``), where installed: outputs and gradients as peft's
    ``TorchaoLoraLinear``."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    quantize_(base, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    _same_as_peft(p, f)
