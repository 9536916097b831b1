"""Activation checkpointing: same gradients as without it, dropout masks included.

fastpeft draws each layer's dropout seed from torch's generator in the forward (``fastpeft.ops.draw_seed``).
``torch.utils.checkpoint`` (reentrant and non-reentrant) saves and restores the RNG state around the
recomputation (``preserve_rng_state=True``, the default), so the recomputed forward redraws the same seed,
hence the same mask, and the gradients equal the un-checkpointed run's exactly. With dropout on (p = 0.3)
and ``preserve_rng_state=False`` they must differ — that proves the comparison sees the masks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastpeft
from fastpeft import FastLoraLinear
from helpers import DEVICE

P = 0.3


class Block(nn.Module):
    """Two LoRA layers sharing one input (separate masks) and a third after a nonlinearity."""

    def __init__(self, device="cpu"):
        super().__init__()
        kw = dict(r=4, lora_alpha=8, lora_dropout=P, init_lora_weights=False, device=device)
        self.q = FastLoraLinear(24, 20, **kw)
        self.v = FastLoraLinear(24, 20, **kw)
        self.o = FastLoraLinear(20, 24, **kw)

    def forward(self, x):
        return self.o(torch.nn.functional.gelu(self.q(x)) * self.v(x)) + x


class Net(nn.Module):
    def __init__(self, device="cpu", ckpt=None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(device) for _ in range(2)])
        self.ckpt = ckpt  # None, or the kwargs of torch.utils.checkpoint.checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.ckpt is None else checkpoint(block, x, **self.ckpt)
        return x


def _grads(net, x, seed=7):
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = net(x)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _count_forwards(net):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    for m in net.modules():
        if isinstance(m, FastLoraLinear):
            m.register_forward_pre_hook(hook)  # pre: early-stopped recomputation skips post hooks
    return counter


def _assert_grads_equal(a, b):
    (ya, dxa, ga), (yb, dxb, gb) = a, b
    assert torch.equal(ya, yb)
    assert torch.equal(dxa, dxb)
    assert ga.keys() == gb.keys() and len(ga) == 12
    for name in ga:
        assert torch.count_nonzero(ga[name]) > 0, name
        assert torch.equal(ga[name], gb[name]), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_same_grads_with_dropout(backend, reentrant):
    """torch.utils.checkpoint, p = 0.3: output and every gradient equal the un-checkpointed run, bit for bit."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 5, 24)
    plain = _grads(net, x)
    net.ckpt = dict(use_reentrant=reentrant)
    calls = _count_forwards(net)
    checkpointed = _grads(net, x)
    assert calls["n"] == 2 * 6, "the checkpointed blocks were not recomputed"
    _assert_grads_equal(checkpointed, plain)


def test_checkpoint_without_rng_restore_changes_the_masks():
    """Negative control: preserve_rng_state=False redraws other seeds on recomputation → other gradients."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 5, 24)
    plain = _grads(net, x)
    net.ckpt = dict(use_reentrant=False, preserve_rng_state=False)
    y, dx, grads = _grads(net, x)
    assert torch.equal(y, plain[0])  # the forward is the same …
    assert not torch.equal(dx, plain[1])  # … but backward replayed other masks
    net.eval()  # without dropout there is nothing to replay: equal again
    net.ckpt = None
    plain_eval = _grads(net, x)
    net.ckpt = dict(use_reentrant=False, preserve_rng_state=False)
    _assert_grads_equal(_grads(net, x), plain_eval)


transformers_mod = pytest.importorskip("transformers")
V = 96


def _peft_llama():
    cfg = transformers_mod.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers_mod.LlamaForCausalLM(cfg)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=P,
                                 init_lora_weights=False)
    return fastpeft.get_peft_model(model, config).train()


def _model_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}],
                         ids=["default", "nonreentrant", "reentrant"])
def test_transformers_gradient_checkpointing_same_grads(kwargs):
    """``model.gradient_checkpointing_enable()`` on a fastpeft model (p = 0.3): same loss and LoRA grads."""
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _model_grads(_peft_llama(), ids)
    model = _peft_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert model.is_gradient_checkpointing
    calls = _count_forwards(model)
    loss, grads = _model_grads(model, ids)
    assert calls["n"] == 2 * 14, "the decoder layers were not recomputed"
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys() and len(grads0) == 28
    for name in grads0:
        assert torch.count_nonzero(grads0[name]) > 0, name
        assert torch.equal(grads[name], grads0[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_same_grads_with_dropout_gpu(reentrant, monkeypatch):
    """The same on CUDA with the Triton kernels (the CUDA generator's state is restored too)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    torch.manual_seed(0)
    net = Net(device=DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    plain = _grads(net, x)
    net.ckpt = dict(use_reentrant=reentrant)
    _assert_grads_equal(_grads(net, x), plain)
