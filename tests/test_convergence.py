"""A tiny Llama trained from the same seed with peft and with fastpeft layers: the losses track.

This is the test that catches what per-op tests miss (a gradient that is right
in isolation but wired wrongly, an optimizer seeing the wrong parameters).
"""

import copy
import warnings

import pytest
import torch

from fastpeft import FastLoraLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def _swap_in_fastpeft(model, peft_model, r, alpha):
    """Replace every targeted Linear by FastLoraLinear with the peft model's adapter weights."""
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                layer = FastLoraLinear.from_linear(child, r=r, lora_alpha=alpha)
                src = peft_modules[full]
                layer.lora_A["default"].weight.data.copy_(src.lora_A["default"].weight)
                layer.lora_B["default"].weight.data.copy_(src.lora_B["default"].weight)
                setattr(module, child_name, layer)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def _train(model, steps, data, lr=5e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        ids = data[step % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, params


@pytest.mark.parametrize("steps,backend_name", [(30, "torch"), (3, "triton")])
def test_losses_track_peft(monkeypatch, steps, backend_name):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend_name)
    base = _tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = _swap_in_fastpeft(copy.deepcopy(base), ref, r=4, alpha=8)
    n_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad) > 0

    g = torch.Generator().manual_seed(1)
    # a learnable pattern: each sequence counts up by a fixed stride from a random start
    data = [(torch.randint(0, 64, (4, 1), generator=g) + 3 * torch.arange(16)) % 64 for _ in range(5)]
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    ref_losses, ref_params = _train(ref, steps, data)
    our_losses, our_params = _train(ours, steps, data)
    # Identical for the first steps; fp32 rounding differences then grow through Adam (seen:
    # 0 at steps 0–1, 1e-6 at step 2, ≤ 6e-4 by step 29) — a wrong gradient shows at step 1.
    assert abs(ref_losses[1] - our_losses[1]) <= 1e-5
    for i, (a, b) in enumerate(zip(ref_losses, our_losses)):
        assert abs(a - b) <= 1e-3 + 1e-3 * abs(a), f"step {i}: peft {a:.6f} vs fastpeft {b:.6f}"
    if steps >= 30:
        assert sum(our_losses[-5:]) / 5 < sum(our_losses[:5]) / 5 - 0.05, "training should lower the loss"
    # LoRA parameters close at the end: the two runs' updates agree to a few percent.
    ref_named = {n.split("base_model.model.")[-1]: p for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            moved = (ref_named[n] - start[n]).norm()
            assert moved > 0
            assert (p - ref_named[n]).norm() <= 0.05 * moved, n
