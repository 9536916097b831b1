"""AdaLoRA against peft on tiny Llama / GPT-2 / T5 / BERT: names and counts, logits and the loss with the
orthogonality penalty, the whole rank-allocation schedule step by step (same ranks, same weights), the saved
rank-pruned tensors and rank_pattern, loading both ways, merge, the training-loop hook."""

from __future__ import annotations

import json

import pytest
import torch
from test_methods_common import (
    TASKS,
    assert_same_layout,
    batch,
    bert,
    fresh,
    gpt2,
    llama,
    pair_with_peft,
    saved,
    t5,
    trainable,
)

import fastpeft
from fastpeft import methods
from fastpeft.methods import AdaLoraConfig
from helpers import assert_rel

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


def _pair(factory, **kw):
    kw = dict(task_type=TASKS[factory], init_lora_weights=False, **SCHEDULE, **kw)
    return pair_with_peft(factory, AdaLoraConfig(**kw), peft.AdaLoraConfig(**kw))


@pytest.mark.parametrize("factory", [llama, gpt2, t5, bert], ids=lambda f: f.__name__)
def test_equals_peft(factory):
    ours, theirs, _ = _pair(factory)
    assert_same_layout(ours, theirs)
    x = batch(factory)
    ours.train(), theirs.train()
    o, t = ours(**x), theirs(**x)
    assert_rel(o.logits, t.logits, 1e-6, "logits")
    assert abs(o.loss.item() - t.loss.item()) < 1e-5, "loss with the orthogonality penalty"
    with ours.disable_adapter():
        assert (ours(**x).logits - o.logits).abs().max() > 1e-4


@pytest.mark.parametrize("factory", [llama, t5], ids=lambda f: f.__name__)
def test_rank_allocation_follows_peft(factory, tmp_path):
    ours, theirs, state = _pair(factory)
    x = batch(factory)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (ours, theirs)]
    for step in range(SCHEDULE["total_step"]):
        for model, opt in zip((ours, theirs), opts):
            model.train()
            loss = model(**x).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        po, pt = ours.peft_config["default"].rank_pattern, theirs.peft_config["default"].rank_pattern
        assert (po is None) == (pt is None) and (po is None or po == pt), f"rank pattern differs at step {step}"
        theirs_params = dict(theirs.named_parameters())
        for n, a in ours.named_parameters():
            if a.requires_grad:
                assert_rel(a, theirs_params[n], 1e-4, f"{n} at step {step}")
    pattern = ours.peft_config["default"].rank_pattern
    kept = sum(sum(v) for v in pattern.values())
    assert kept <= SCHEDULE["target_r"] * len(pattern) < SCHEDULE["init_r"] * len(pattern)
    ours.eval(), theirs.eval()
    xi = batch(factory, labels=False)
    lo = ours(**xi).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert_rel(a[k], b[k], 1e-4, k)
    cfg_o = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_t = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert cfg_o["rank_pattern"] == cfg_t["rank_pattern"] and cfg_o["peft_type"] == "ADALORA"
    for loader in (peft.PeftModel, fastpeft.PeftModel):
        loaded = loader.from_pretrained(fresh(factory, state), tmp_path / "ours")
        assert_rel(loaded(**xi).logits, lo, 1e-5, f"{loader.__module__} load")
    back = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path / "theirs", is_trainable=True)
    assert_rel(back(**xi).logits, lo, 1e-4, "peft-saved adapter loaded by fastpeft")
    assert trainable(back)


def test_training_lowers_loss():
    from test_methods_common import train

    model = fastpeft.get_peft_model(llama(), AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE))
    losses = train(model, batch(llama), steps=SCHEDULE["total_step"], lr=2e-2, hook=methods.step_hook(model))
    assert losses[-1] < losses[0] - 0.05, losses
    assert model.peft_config["default"].rank_pattern is not None


def test_merge_and_step_hook():
    ours, _, _ = _pair(gpt2)
    assert methods.step_hook(ours) == ours.update_and_allocate
    lora = fastpeft.get_peft_model(llama(), fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert methods.step_hook(lora) is None
    x = batch(gpt2, labels=False)
    with torch.no_grad():
        lo = ours(**x).logits
        merged = ours.merge_and_unload()
        assert_rel(merged(**x).logits, lo, 1e-5, "merged")
    with pytest.raises(RuntimeError, match="gradients"):
        fresh_model, _, _ = _pair(gpt2)
        fresh_model.update_and_allocate(0)


@pytest.mark.parametrize("factory", [llama, gpt2], ids=lambda f: f.__name__)
def test_merge_unmerge_disable_like_peft(factory):
    from test_methods_common import check_merge_unmerge_like_peft

    from fastpeft.methods.adalora import SVDLinear

    ours, theirs, state = _pair(factory)  # random A, E, B (init_lora_weights=False): a visible update
    check_merge_unmerge_like_peft(ours, theirs, fresh(factory, state), batch(factory, labels=False), SVDLinear)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_orthogonality_penalty_where_peft_adds_it(task_type):
    """peft adds AdaLoRA's penalty to ``loss`` in its task classes only (a model without ``task_type`` is a plain
    ``PeftModel``, whose forward calls the transformers model itself); fastpeft's loss is peft's in both cases."""
    from helpers import tiny_gpt2

    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(target_modules=["c_fc"], lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
              task_type=task_type, **SCHEDULE)
    models = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        models.append(lib.get_peft_model(tiny_gpt2(), lib.AdaLoraConfig(**kw)))
    ours, theirs = models
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    out_o, out_t = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert_rel(out_o.loss, out_t.loss, 1e-6, "loss")
    logits = out_o.logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert (out_o.loss - ce).abs().item() > 1e-3 if task_type else (out_o.loss - ce).abs().item() < 1e-6
    out_o.loss.backward()
    out_t.loss.backward()
    grads_t = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_rel(p.grad, grads_t[n].grad, 1e-4, n)
