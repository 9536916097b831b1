"""FastLoraLinear against peft's own LoRA layer, and the layer's conveniences."""

import copy
import warnings

import pytest
import torch
from torch import nn

from fastpeft import FastLoraLinear
from helpers import Wrap, assert_rel, fwd_bwd

peft = pytest.importorskip("peft")


def _peft_layer(base, r, alpha, p=0.0, rslora=False, fifo=False, bias="none"):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_rslora=rslora,
                          init_lora_weights=False, fan_in_fan_out=fifo, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Wrap(base), cfg).base_model.model.proj


def _pair(fin, fout, r, alpha, dtype=torch.float32, rslora=False, fifo=False, bias_trainable=False):
    torch.manual_seed(fin + fout + r)
    if fifo:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(fout, fin).to(dtype)
        nn.init.normal_(base.weight, std=fin**-0.5)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(fin, fout).to(dtype)
    ref = _peft_layer(copy.deepcopy(base), r, alpha, rslora=rslora, fifo=fifo,
                      bias="all" if bias_trainable else "none")
    ours = FastLoraLinear.from_linear(base, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    ours.load_state_dict(ref.state_dict())  # same keys, same shapes as peft
    if bias_trainable:
        ours.base_layer.bias.requires_grad_(True)
    return ref, ours


CASES = [  # (fin, fout, r, alpha, x shape prefix, dtype, rslora, fifo, bias trainable)
    (37, 29, 8, 16, (3, 5), torch.float32, False, False, True),
    (64, 48, 1, 4, (1,), torch.float32, True, False, False),
    (33, 70, 16, 32, (2, 9), torch.float32, False, True, False),
    (45, 31, 4, 8, (4, 6), torch.float16, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}_r{c[2]}_{str(c[5])[6:]}"
                         + ("_rslora" if c[6] else "") + ("_fifo" if c[7] else "") + ("_bias" if c[8] else ""))
def test_matches_peft(backend, case):
    fin, fout, r, alpha, prefix, dtype, rslora, fifo, bias_tr = case
    ref, ours = _pair(fin, fout, r, alpha, dtype, rslora, fifo, bias_tr)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.scaling == ref.scaling
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*prefix, fin, generator=g).to(dtype)
    dy = torch.randn(*prefix, fout, generator=g).to(dtype)
    y_ref, dx_ref, g_ref = fwd_bwd(ref, x, dy)
    y, dx, g_ours = fwd_bwd(ours, x, dy)
    assert y.dtype == y_ref.dtype == dtype
    base_only = ours.base_layer(x)
    assert not torch.allclose(y, base_only), "adapter must change the output (B ≠ 0)"
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert_rel(y, y_ref, tol, "y")
    assert_rel(dx, dx_ref, tol, "dx")
    assert set(g_ours) == set(g_ref)
    for name in g_ref:
        assert_rel(g_ours[name], g_ref[name], tol if dtype == torch.float32 else 1e-2, name)


def test_constructor_defaults_like_peft():
    layer = FastLoraLinear(40, 24, r=8, lora_alpha=16, dtype=torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (8, 40) and B.shape == (24, 8)
    assert A.dtype == B.dtype == torch.float32  # fp32 adapters on a half base
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    bound = (1 / 40) ** 0.5  # kaiming_uniform(a=√5) on fan_in 40
    assert A.abs().max() <= bound
    assert not layer.base_layer.weight.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == \
        ["lora_A.default.weight", "lora_B.default.weight"]
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    g = FastLoraLinear(40, 24, r=8, init_lora_weights="gaussian")
    assert torch.count_nonzero(g.lora_B["default"].weight) == 0
    half = FastLoraLinear(40, 24, r=8, dtype=torch.float16, autocast_adapter_dtype=False)
    assert half.lora_A["default"].weight.dtype == torch.float16
    assert "r=8" in repr(layer) and "lora_A" in repr(layer)


def test_merge_unmerge_and_to_linear(backend):
    torch.manual_seed(0)
    layer = FastLoraLinear(30, 20, r=4, lora_alpha=8, init_lora_weights=False)
    layer.eval()
    x = torch.randn(5, 30)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_rel(layer(x), y, 1e-5, "merged")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert_rel(layer(x), y, 1e-5, "merged twice")
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear
    assert_rel(lin(x), y, 1e-5, "to_linear")


def test_merge_conv1d_and_safe_merge():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(20, 30)
    nn.init.normal_(base.weight)
    layer = FastLoraLinear.from_linear(base, r=4, init_lora_weights=False)
    assert layer.fan_in_fan_out
    x = torch.randn(5, 30)
    y = layer(x)
    assert_rel(layer.to_linear()(x), y, 1e-5, "conv1d to_linear")
    layer.merge()
    assert_rel(layer(x), y, 1e-5, "conv1d merged")
    layer.unmerge()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_disable_adapter(backend):
    torch.manual_seed(0)
    layer = FastLoraLinear(16, 12, r=2, init_lora_weights=False)
    x = torch.randn(4, 16)
    y = layer(x)
    with layer.disable_adapter():
        assert layer.disable_adapters
        assert torch.equal(layer(x), layer.base_layer(x))
    assert not layer.disable_adapters
    assert torch.equal(layer(x), y)


def test_several_adapters_sum_like_peft():
    torch.manual_seed(0)
    layer = FastLoraLinear(16, 12, r=2, init_lora_weights=False)
    layer.add_adapter("other", r=3, lora_alpha=6, init_lora_weights=False)
    assert layer.active_adapter == "other"
    x = torch.randn(4, 16)
    y_other = layer(x)
    layer.set_adapter(["default", "other"])
    y_both = layer(x)
    layer.set_adapter("default")
    y_default = layer(x)
    base = layer.base_layer(x)
    assert_rel(y_both - base, (y_other - base) + (y_default - base), 1e-5, "sum of adapters")
    assert not layer.lora_A["other"].weight.requires_grad
    # peft's layer semantics: a name this layer does not hold is ignored (the model may hold it elsewhere)
    layer.set_adapter("missing")
    assert torch.equal(layer(x), base)
    assert not layer.lora_A["default"].weight.requires_grad
    layer.set_adapter("default")
    layer.delete_adapter("other")
    assert list(layer.lora_A) == ["default"]


def test_autocast_follows_autocast_dtype():
    layer = FastLoraLinear(16, 12, r=2, init_lora_weights=False)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert y.shape == (4, 12) and torch.isfinite(y).all()
    assert_rel(y.float(), layer(x), 2e-2, "autocast close to fp32")


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        FastLoraLinear(8, 8, r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\]"):
        FastLoraLinear(8, 8, lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\]"):
        FastLoraLinear(8, 8, lora_dropout=-0.1)
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers' Conv1D, got Conv2d"):
        FastLoraLinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="init_lora_weights"):
        FastLoraLinear(8, 8, init_lora_weights="corda")
    layer = FastLoraLinear(8, 8)
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 8\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating-point input.*int64"):  # not integer-truncated weights
        layer(torch.ones(2, 8, dtype=torch.long))
    layer.base_layer.weight.requires_grad_(True)  # trains, unfused, as peft (tests/test_module_habits.py)
    with pytest.warns(UserWarning, match="base weight requires grad"):
        import fastpeft.layers.lora as L

        L._TRAINABLE_BASE_WARNED.clear()
        layer(torch.randn(2, 8)).sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_forward_on_the_meta_device_gives_shapes_like_peft():
    """A layer moved to "meta" runs its forward (shape inference), in training with dropout too."""
    layer = FastLoraLinear(8, 6, r=2, lora_dropout=0.1).to("meta")
    peft = pytest.importorskip("peft")
    peft_layer = peft.tuners.lora.Linear(nn.Linear(8, 6), "default", r=2,
                                         config=peft.LoraConfig(r=2, lora_dropout=0.1)).to("meta")
    x = torch.randn(3, 5, 8, device="meta")
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        assert y.device.type == "meta" and y.shape == peft_layer(x).shape == (3, 5, 6)


def test_from_linear_shares_weight():
    lin = nn.Linear(10, 6)
    layer = FastLoraLinear.from_linear(lin, r=2)
    assert layer.base_layer.weight.data_ptr() == lin.weight.data_ptr()


def test_dropout_train_vs_eval(backend):
    torch.manual_seed(0)
    layer = FastLoraLinear(32, 16, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 32)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), y1)
    layer.eval()
    y_eval = layer(x)
    assert not torch.equal(y1, y_eval)
    state = torch.random.get_rng_state()
    assert torch.equal(layer(x), y_eval)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_layer_compiles_without_graph_break(backend):
    """torch.compile(fullgraph=True) over the whole layer, dropout on: same output as eager."""
    torch.manual_seed(0)
    layer = FastLoraLinear(32, 24, r=4, lora_dropout=0.1, init_lora_weights=False)
    x = torch.randn(5, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    y_c = compiled(x)
    torch.manual_seed(1)
    y_e = layer(x)
    assert torch.equal(y_c, y_e)
    y_c.sum().backward()
    assert torch.count_nonzero(layer.lora_A["default"].weight.grad) > 0
    layer.eval()
    assert torch.equal(compiled(x), layer(x))
