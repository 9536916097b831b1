"""Outside torch.compile the LoRA ops run as a plain ``torch.autograd.Function`` over the custom ops' own code
(``fastpeft.ops.two_routes``, less host time per call); what the custom ops gave before must still hold:
``torch.func.vmap`` over a layer, a FakeTensorMode forward in training with dropout, a clear error for double
backward through the 4-bit and mixed-adapter ops (which have no differentiable backward), and the same numbers as
the custom-op route (taken under ``torch.compile(backend="aot_eager")``)."""

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.layers import FastLoraLinear, FastLoraLinear4bit
from fastpeft.ops_mixed import lora_linear_mixed


class _M(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(x)


def test_vmap_over_a_layer_equals_the_loop():
    model = fastpeft.get_peft_model(_M(), fastpeft.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(3, 5, 16)
    y = torch.func.vmap(model)(x)
    torch.testing.assert_close(y, torch.stack([model(xi) for xi in x]))


def test_fake_tensor_forward_in_training_with_dropout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = fastpeft.get_peft_model(_M(), fastpeft.LoraConfig(r=2, target_modules=["lin"], lora_dropout=0.1)).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = model(torch.empty(2, 3, 16))
    assert tuple(y.shape) == (2, 3, 8)


def _penalty_backward(y, x, params):
    (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    gx.square().sum().backward()


def test_double_backward_refused_by_the_4bit_and_mixed_ops(backend):
    x = torch.randn(3, 16, requires_grad=True)
    layer4 = FastLoraLinear4bit.from_linear(nn.Linear(16, 8), r=2, init_lora_weights=False)
    with pytest.raises(RuntimeError, match="double backward .* 4-bit LoRA op is not supported"):
        _penalty_backward(layer4(x), x, None)
    lin = nn.Linear(16, 8).requires_grad_(False)
    A, B = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    y = lora_linear_mixed(x, lin.weight, lin.bias, [A], [B], torch.tensor([0, -1, 0]), scales=[1.0])
    with pytest.raises(RuntimeError, match="double backward .* mixed-adapter LoRA op is not supported"):
        _penalty_backward(y, x, None)
    dense = FastLoraLinear(16, 8, r=2, init_lora_weights=False)  # the dense op supports it
    _penalty_backward(dense(x), x, None)
    assert dense.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_eager_route_equals_the_custom_op_route(backend, dropout):
    """Eager (Function) and compiled (custom ops, aot_eager) forward and gradients agree bit for bit, dense and 4-bit,
    with dropout under the same seed."""
    for make in (lambda: FastLoraLinear(16, 8, r=4, lora_dropout=dropout, init_lora_weights=False),
                 lambda: FastLoraLinear4bit.from_linear(nn.Linear(16, 8), r=4, lora_dropout=dropout,
                                                        init_lora_weights=False)):
        torch.manual_seed(1)
        layer = make().train()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        x = torch.randn(2, 3, 16)
        outs = []
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_()
            torch.manual_seed(7)
            y = fn(xi)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
                         layer.lora_B["default"].weight.grad.clone()))
            layer.zero_grad()
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jit_trace_records_the_custom_op(backend):
    """``torch.jit.trace`` takes the custom op (as before the eager route) and replays it on new inputs."""
    import warnings

    layer = FastLoraLinear(16, 8, r=2, init_lora_weights=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, torch.randn(3, 16))
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x))


def test_real_input_under_fake_tensor_mode(backend):
    """A real input inside ``FakeTensorMode(allow_non_fake_inputs=True)`` (shape / memory estimates): the fake
    kernel runs (the eager route ran the real body: seed.item() failed, and the Triton path set a storage)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    layer = FastLoraLinear(16, 4, r=2, lora_dropout=0.1).train()
    x = torch.randn(2, 3, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(x)
    assert isinstance(y, FakeTensor) and tuple(y.shape) == (2, 3, 4)
