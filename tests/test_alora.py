"""Activated LoRA (aLoRA, ``LoraConfig(alora_invocation_tokens=...)``): adapters that act only from their invocation
sequence onward.

Layer level (both backends): outputs and gradients against an independent fp64 reference that applies the adapter
on the activated tokens only. Model level: logits, greedy generation and training gradients equal peft's aLoRA with
the same weights, mixed batches (aLoRA, plain LoRA and base rows) equal peft's ``adapter_names``, adapters
round-trip with peft both ways, and what peft refuses (merging, DoRA, non-linear targets, beam search) is refused.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers

import fastpeft
from fastpeft.alora import compute_offsets, find_invocation, token_mask
from fastpeft.layers.lora import FastLoraLinear
from helpers import assert_rel

peft = pytest.importorskip("peft")

INV = [7, 8, 9]
INV2 = [11, 12]


def _naive_offsets(ids: torch.Tensor, inv: list[int]) -> list[int | None]:
    """The definition, by brute force: ``T - start`` of the last occurrence of ``inv`` in each row."""
    out = []
    for row in ids.tolist():
        starts = [s for s in range(len(row) - len(inv) + 1) if row[s:s + len(inv)] == inv]
        out.append(len(row) - starts[-1] if starts else None)
    return out


# ----------------------------------------------------------------------------- offsets and masks
def test_find_invocation_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(0, 4, (5, int(torch.randint(1, 14, (1,), generator=g))), generator=g)
        inv = torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        assert find_invocation(ids, inv) == _naive_offsets(ids, inv), (ids, inv)
    ids = torch.tensor([[1, 7, 8, 9, 2, 7, 8, 9], [7, 8, 1, 1, 1, 1, 1, 1]])
    assert find_invocation(ids, INV) == [3, None]  # the last occurrence; none
    assert find_invocation(torch.tensor([5, 7, 8, 9]), INV) == [3]  # a 1-D prompt is one row


def test_token_mask_is_peft_s_rule():
    mask = token_mask([2, None, 9, 0], (4, 5))
    assert mask.tolist() == [[False, False, False, True, True], [False] * 5, [True] * 5, [False] * 5]
    assert token_mask([3, None], (2,)).tolist() == [True, False]  # a 2-D input: one token per row
    assert not token_mask(None, (2, 3)).any()
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        token_mask([1, 2], (3, 4))


def test_compute_offsets_per_row_adapter():
    cfg = {"a": fastpeft.LoraConfig(alora_invocation_tokens=INV, task_type="CAUSAL_LM"),
           "b": fastpeft.LoraConfig(alora_invocation_tokens=INV2, task_type="CAUSAL_LM"),
           "plain": fastpeft.LoraConfig(task_type="CAUSAL_LM")}
    ids = torch.tensor([[7, 8, 9, 1, 11, 12], [7, 8, 9, 1, 11, 12], [7, 8, 9, 1, 1, 1], [7, 8, 9, 0, 0, 0]])
    assert compute_offsets(cfg, ["a"], ids) == [6, 6, 6, 6]
    assert compute_offsets(cfg, ["plain", "b"], ids) == [2, 2, None, None]  # the first active aLoRA adapter
    assert compute_offsets(cfg, ["a"], ids, ["b", "a", "plain", "__base__"]) == [2, 6, None, None]


# ----------------------------------------------------------------------------- config
def test_config_fields_and_refusals():
    cfg = fastpeft.LoraConfig(alora_invocation_tokens=(5, 6), task_type="CAUSAL_LM")
    assert cfg.alora_invocation_tokens == [5, 6]
    assert fastpeft.LoraConfig.from_dict(cfg.to_dict()).alora_invocation_tokens == [5, 6]
    assert fastpeft.LoraConfig().to_dict()["alora_invocation_tokens"] is None
    for bad in ([], [1, -2], ["a"], 3, [True]):
        with pytest.raises(ValueError, match="alora_invocation_tokens must be"):
            fastpeft.LoraConfig(alora_invocation_tokens=bad, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="DoRA"):
        fastpeft.LoraConfig(alora_invocation_tokens=[1], use_dora=True, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
        fastpeft.LoraConfig(alora_invocation_tokens=[1])


# ----------------------------------------------------------------------------- layer level
def _alora_layer(lora_bias=False, dropout=0.0, in_f=45, out_f=37, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    layer = FastLoraLinear.from_linear(lin, r=5, lora_alpha=10, lora_dropout=dropout, use_alora=True,
                                       lora_bias=lora_bias, init_lora_weights=False)
    return layer


def _ref64(layer, x, keep, name="default", factors=None):
    """fp64: base everywhere, plus ``scale·(B A x + b_B)`` on the tokens ``keep`` marks; ``factors``: (A, B[, b_B])
    to use instead of the layer's own (e.g. fp64 leaves to differentiate)."""
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    if factors is None:
        factors = [layer.lora_A[name].weight, layer.lora_B[name].weight]
        if layer.lora_B[name].bias is not None:
            factors.append(layer.lora_B[name].bias)
    A, B, *b_B = (t.double() for t in factors)
    delta = (x.double() @ A.t()) @ B.t()
    if b_B:
        delta = delta + b_B[0]
    return x.double() @ w.t() + b + layer.scaling[name] * delta * keep.double().unsqueeze(-1)


@pytest.mark.parametrize("shape", [(4, 6), (5,)], ids=["3d", "2d"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_layer_matches_fp64_reference_on_activated_tokens(backend, shape, lora_bias):
    layer = _alora_layer(lora_bias)
    offsets = [3, None, 9, 1][:shape[0]] if len(shape) == 2 else [2, None, 0, 1, 5]
    x = torch.randn(*shape, 45, requires_grad=True)
    keep = token_mask(offsets, shape)
    assert keep.any() and not keep.all()
    y = layer(x, alora_offsets=offsets)
    ref = _ref64(layer, x, keep)
    assert_rel(y, ref, 1e-5, "y")
    dy = torch.randn_like(y)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if lora_bias:
        params.append(layer.lora_B["default"].bias)
    grads = torch.autograd.grad(y, params, dy)
    x64 = x.detach().double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in params[1:]]
    ref = _ref64(layer, x64, keep, factors=p64)
    ref_grads = torch.autograd.grad(ref, [x64, *p64], dy.double())
    for name, ours, theirs in zip(("dx", "dA", "dB", "db_B"), grads, ref_grads):
        assert_rel(ours, theirs, 1e-5, name)


def test_layer_without_offsets_is_the_base_with_zero_adapter_gradients(backend):
    layer = _alora_layer()
    x = torch.randn(3, 4, 45)
    y = layer(x)  # no offsets: nothing activated (peft's rule)
    assert torch.allclose(y, layer.base_layer(x), atol=1e-6)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None  # zero, not absent: DDP finds it used
    assert not layer.lora_A["default"].weight.grad.any() and not layer.lora_B["default"].weight.grad.any()


def test_layer_dropout_touches_activated_tokens_only(backend):
    layer = _alora_layer(dropout=0.5)
    layer.train()
    x = torch.randn(2, 6, 45)
    offsets = [2, 4]
    keep = token_mask(offsets, (2, 6))
    torch.manual_seed(3)
    y1 = layer(x, alora_offsets=offsets)
    torch.manual_seed(3)
    y2 = layer(x, alora_offsets=offsets)
    assert torch.equal(y1, y2)  # the same seed, the same mask
    base = layer.base_layer(x)
    assert torch.allclose(y1[~keep], base[~keep], atol=1e-6)
    layer.eval()
    exact = layer(x, alora_offsets=offsets)
    assert not torch.allclose(y1[keep], exact[keep], atol=1e-3)  # dropout acted on the activated ones


def test_second_active_aLoRA_adapter_and_opaque_paths_apply_the_mask():
    layer = _alora_layer()
    layer.update_layer("other", r=3, lora_alpha=3, use_alora=True, init_lora_weights=False)
    layer.set_adapter(["default", "other"])
    x = torch.randn(3, 5, 45)
    offsets = [1, 5, None]
    keep = token_mask(offsets, (3, 5))
    ref = _ref64(layer, x, keep) + layer.scaling["other"] * (
        (x.double() @ layer.lora_A["other"].weight.double().t()) @ layer.lora_B["other"].weight.double().t()
    ) * keep.double().unsqueeze(-1)
    assert_rel(layer(x, alora_offsets=offsets), ref, 1e-5, "two aLoRA adapters")


def test_4bit_layer(backend):
    from fastpeft.layers.lora4bit import FastLoraLinear4bit

    torch.manual_seed(0)
    layer = FastLoraLinear4bit.from_linear(torch.nn.Linear(64, 40), r=4, lora_alpha=8, use_alora=True,
                                           init_lora_weights=False)
    x = torch.randn(3, 5, 64)
    offsets = [2, None, 5]
    keep = token_mask(offsets, (3, 5))
    w = layer.dequantized_weight().double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    ref = x.double() @ w.t() + layer.base_layer.bias.double() \
        + layer.scaling["default"] * ((x.double() @ A.t()) @ B.t()) * keep.double().unsqueeze(-1)
    assert_rel(layer(x, alora_offsets=offsets), ref, 1e-5, "4-bit aLoRA")


def test_merge_is_refused():
    layer = _alora_layer()
    for call in (layer.merge, layer.to_linear):
        with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
            call()
    assert not layer.merged


def test_compiles_without_graph_breaks():
    layer = _alora_layer()
    x = torch.randn(3, 5, 45)
    offsets = [1, None, 4]
    ref = layer(x, alora_offsets=offsets)
    torch._dynamo.reset()
    y = torch.compile(lambda t: layer(t, alora_offsets=offsets), fullgraph=True)(x)
    assert_rel(y, ref, 1e-6, "compiled")


# ----------------------------------------------------------------------------- model level, against peft
def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
          init_lora_weights=False)


def _pair(**extra):
    """The same aLoRA adapter (random B) on peft and fastpeft, plus a plain LoRA and a second aLoRA adapter."""
    base = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KW, **extra, alora_invocation_tokens=INV))
        theirs.add_adapter("plain", peft.LoraConfig(**KW))
        theirs.add_adapter("al2", peft.LoraConfig(**KW, alora_invocation_tokens=INV2))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**KW, **extra,
                                                                                alora_invocation_tokens=INV))
        ours.add_adapter("plain", fastpeft.LoraConfig(**KW))
        ours.add_adapter("al2", fastpeft.LoraConfig(**KW, alora_invocation_tokens=INV2))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return base, ours.eval(), theirs.eval()


def _ids():
    ids = torch.randint(13, 64, (5, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 4:7] = torch.tensor(INV)
    ids[2, 1:4] = torch.tensor(INV)
    ids[2, 9:12] = torch.tensor(INV)  # the last occurrence counts
    ids[3, 2:4] = torch.tensor(INV2)
    ids[4, 5:8] = torch.tensor(INV)  # row 1 has no invocation: the base model throughout
    return ids


def test_forward_generate_and_training_match_peft():
    base, ours, theirs = _pair()
    ids = _ids()
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert_rel(b, a, 1e-6, "logits")
    assert (a - plain).abs().max() > 1e-3  # the adapter acts
    assert torch.equal(b[1], plain[1]) or torch.allclose(b[1], plain[1], atol=1e-6)  # no invocation: base
    assert torch.allclose(b[0, :4], plain[0, :4], atol=1e-6)  # before the invocation: base
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                       theirs.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    ours.train()
    theirs.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    g_ours = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {k: p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    assert set(g_ours) == set(g_theirs) and g_ours
    for k in g_ours:
        assert_rel(g_ours[k], g_theirs[k], 1e-5, k)


def test_mixed_batches_match_peft():
    _, ours, theirs = _pair()
    ids = _ids()
    names = ["default", "plain", "default", "al2", "__base__"]
    with torch.no_grad():
        assert_rel(ours(input_ids=ids, adapter_names=names).logits,
                   theirs(input_ids=ids, adapter_names=names).logits, 1e-6, "mixed logits")
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False, adapter_names=names),
                       theirs.generate(input_ids=ids, max_new_tokens=5, do_sample=False, adapter_names=names))


def test_mixed_training_gradients_come_from_each_adapters_activated_tokens():
    _, ours, theirs = _pair()
    ids = _ids()
    names = ["default", "plain", "default", "al2", "plain"]
    g = torch.randn(5, 12, 64, generator=torch.Generator().manual_seed(4))
    ours.train()
    for k, p in ours.named_parameters():
        p.requires_grad_("lora_" in k)
    (ours(input_ids=ids, adapter_names=names).logits * g).sum().backward()
    theirs.train()
    compared = 0
    for name in ("default", "plain", "al2"):  # peft, one adapter on its own rows at a time
        rows = [i for i, n in enumerate(names) if n == name]
        theirs.set_adapter(name)
        theirs.zero_grad()
        (theirs(input_ids=ids[rows]).logits * g[rows]).sum().backward()
        for k, p in theirs.named_parameters():
            if f".{name}." in k and p.grad is not None:
                assert_rel(dict(ours.named_parameters())[k].grad, p.grad, 1e-5, k)
                compared += 1
    assert compared == 3 * 2 * 2 * 3  # 3 adapters × 2 blocks × (q, v, down) × (A, B)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_replays_the_offsets(reentrant):
    _, ours, _ = _pair()
    ids = _ids()
    ours.train()

    def grads():
        ours.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ours.enable_input_require_grads()
    try:
        ckpt = grads()
    finally:
        ours.gradient_checkpointing_disable()
    assert set(ckpt) == set(plain)
    for k in plain:
        assert_rel(ckpt[k], plain[k], 1e-6, k)


def test_offsets_given_explicitly_and_inputs_embeds_only():
    base, ours, _ = _pair()
    ids = _ids()
    with torch.no_grad():
        auto = ours(input_ids=ids).logits
        given = ours(input_ids=ids, alora_offsets=find_invocation(ids, INV)).logits
        assert torch.equal(auto, given)
        embeds = base.get_input_embeddings()(ids)
        with pytest.warns(UserWarning, match="only inputs_embeds"):
            off = ours(inputs_embeds=embeds).logits
        assert torch.allclose(off, base(input_ids=ids).logits, atol=1e-6)  # aLoRA off, as in peft


def test_generate_expands_offsets_and_refuses_beam_search():
    _, ours, _ = _pair()
    ids = _ids()[:3]
    torch.manual_seed(5)
    several = ours.generate(input_ids=ids, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    torch.manual_seed(5)
    repeated = ours.generate(input_ids=ids.repeat_interleave(2, dim=0), max_new_tokens=4, do_sample=True)
    assert torch.equal(several, repeated)
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        ours.generate(input_ids=ids, max_new_tokens=2, num_beams=2)


def test_adapters_round_trip_with_peft(tmp_path):
    base, ours, theirs = _pair()
    ids = _ids()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    for sub in ("", "al2"):
        written = json.loads((tmp_path / "ours" / sub / "adapter_config.json").read_text())
        assert written["alora_invocation_tokens"] == (INV2 if sub else INV)
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        assert_rel(loaded(input_ids=ids).logits, ref, 1e-6, "fastpeft loads peft's")
        assert_rel(back(input_ids=ids).logits, ref, 1e-6, "peft loads fastpeft's")


def test_from_peft_and_to_peft_keep_aLoRA_layers():
    base, ours, theirs = _pair()
    ids = _ids()
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
    fastpeft.from_peft(theirs)
    assert any(isinstance(m, FastLoraLinear) and m.use_alora.get("default") for m in theirs.modules())
    with torch.no_grad():
        assert_rel(theirs(input_ids=ids).logits, ref, 1e-6, "converted")
    back = fastpeft.to_peft(theirs)  # peft's layers again, with peft's aLoRA variant
    assert not any(isinstance(m, FastLoraLinear) for m in back.modules())
    with torch.no_grad():
        assert_rel(back(input_ids=ids).logits, ref, 1e-6, "converted back")
        assert_rel(fastpeft.to_peft(ours)(input_ids=ids).logits, ref, 1e-6, "fastpeft model to peft")


def test_model_merge_and_targets_refused():
    _, ours, _ = _pair()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        ours.merge_and_unload()
    cfg = dict(KW, alora_invocation_tokens=INV)
    for targets in (["embed_tokens"], ["q_proj", "embed_tokens"]):
        with pytest.raises(ValueError, match="adapts linear layers only.*embed_tokens"):
            fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**dict(cfg, target_modules=targets)))
