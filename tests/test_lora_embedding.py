"""LoRA on embedding layers (``target_modules=[..., "embed_tokens"]``) against peft's ``lora.Embedding``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft
from helpers import assert_rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96
TARGETS = ["embed_tokens", "q_proj"]
EMB = "base_model.model.model.embed_tokens"


def _llama(tie=False, pad=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, pad_token_id=pad)
    return transformers.LlamaForCausalLM(cfg).eval()


def _pair(tie=False, pad=None, **overrides):
    """(fastpeft model, peft model, input ids) on the same base, same adapter weights (B non-zero)."""
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_llama(tie, pad), fastpeft.LoraConfig(**kw))
        theirs = peft.get_peft_model(_llama(tie, pad), peft.LoraConfig(**kw))
    _copy(ours, theirs)
    ids = torch.randint(1, V, (3, 7), generator=torch.Generator().manual_seed(2))
    if pad is not None:
        ids[:, -2:] = pad
    return ours, theirs, ids


def _copy(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)


def _emb(model):
    return model.get_submodule(EMB)


def _logits(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


def test_layer_names_shapes_and_init_like_peft():
    for init in (True, False, "gaussian"):
        kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**kw))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_llama(), peft.LoraConfig(**kw))
        shapes = {k: tuple(p.shape) for k, p in theirs.named_parameters()}
        assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == shapes
        assert shapes[f"{EMB}.lora_embedding_A.default"] == (4, V)
        assert shapes[f"{EMB}.lora_embedding_B.default"] == (32, 4)
        ea, eb = _emb(ours), _emb(theirs)
        assert isinstance(ea, fastpeft.FastLoraEmbedding)
        for part in ("lora_embedding_A", "lora_embedding_B"):  # drawn as peft draws them: the same tensors
            assert torch.equal(getattr(ea, part)["default"], getattr(eb, part)["default"]), (init, part)
        if init is not False:  # A is the zero factor on embeddings (B on linear layers)
            assert not ea.lora_embedding_A["default"].any() and ea.lora_embedding_B["default"].any()
        trainable = {k for k, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {k for k, p in theirs.named_parameters() if p.requires_grad}
        assert f"{EMB}.lora_embedding_A.default" in trainable and f"{EMB}.base_layer.weight" not in trainable
    assert ea.scaling["default"] == eb.scaling["default"] == 2.0
    ours = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 use_rslora=True))
    assert _emb(ours).scaling["default"] == 4.0


@pytest.mark.parametrize("pad", [None, 0])
def test_logits_and_grads_equal_peft(pad):
    ours, theirs, ids = _pair(pad=pad)
    ours.train(), theirs.train()
    la, lb = _logits(ours, ids), _logits(theirs, ids)
    with torch.no_grad(), _emb(ours).disable_adapter():
        base = _logits(ours, ids)
    assert (la - base).abs().max() > 1e-3  # the embedding adapter is not an identity
    g = torch.randn_like(la)
    (la * g).sum().backward()
    (lb * g).sum().backward()
    params_b = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        if "embed_tokens.lora" in k:
            assert_rel(p.grad, params_b[k].grad, 1e-5, k)
    if pad is not None:  # the padding row of Aᵀ gets no gradient (padding_idx is passed to the lookup of A)
        assert not _emb(ours).lora_embedding_A["default"].grad[:, pad].any()
        assert _emb(ours).lora_embedding_A["default"].grad[:, 1:].any()
    assert_rel(la.detach(), lb.detach(), 1e-5, "logits")


def test_lora_dropout_is_not_applied_to_embeddings_like_peft():
    ours, theirs, ids = _pair(target_modules=["embed_tokens"], lora_dropout=0.5)
    ours.train(), theirs.train()
    with torch.no_grad():
        la = _logits(ours, ids)
        assert torch.equal(la, _logits(ours, ids))  # no random mask
        assert_rel(la, _logits(theirs, ids), 1e-6, "training mode, lora_dropout=0.5")
        assert_rel(la, _logits(ours.eval(), ids), 1e-6, "train == eval")


def test_embed_scale_applies_to_the_adapter_like_peft():
    class Scaled(nn.Embedding):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.embed_scale = 3.0

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    outs = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("embed_tokens", Scaled(10, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            pm = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                         init_lora_weights=False))
        outs.append(pm.base_model.model(torch.tensor([[1, 2, 9]])))
    assert_rel(outs[0], outs[1], 1e-6, "embed_scale")


def test_save_and_load_both_ways(tmp_path):
    ours, theirs, ids = _pair()
    ref = _logits(ours, ids).detach()
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        ours.save_pretrained(tmp_path / "ours")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    saved_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    saved_theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(saved_ours) == sorted(saved_theirs)
    assert f"{EMB}.lora_embedding_A" in saved_ours and f"{EMB}.lora_embedding_B" in saved_ours
    assert f"{EMB}.base_layer.weight" in saved_ours  # as peft's save_embedding_layers="auto"
    for k, v in saved_ours.items():
        assert torch.equal(v, saved_theirs[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
        ours_loaded = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "theirs").eval()
    assert isinstance(_emb(ours_loaded), fastpeft.FastLoraEmbedding)
    assert_rel(_logits(peft_loaded, ids), ref, 1e-5, "fastpeft -> peft")
    assert_rel(_logits(ours_loaded, ids), ref, 1e-5, "peft -> fastpeft")
    ours.save_pretrained(tmp_path / "small", save_embedding_layers=False)
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert not [k for k in small if "base_layer" in k] and f"{EMB}.lora_embedding_A" in small


def test_merge_unmerge_and_merge_and_unload_equal_unmerged():
    ours, theirs, ids = _pair()
    with torch.no_grad():
        ref = _logits(ours, ids)
        base_weight = _emb(ours).base_layer.weight.clone()
        delta = _emb(ours).get_delta_weight("default")
        assert delta.shape == (V, 32)
        assert_rel(delta, _emb(theirs).get_delta_weight("default"), 1e-6, "delta")
        ours.base_model.merge_adapter()
        assert _emb(ours).merged
        assert_rel(_logits(ours, ids), ref, 1e-5, "merged")
        with pytest.warns(UserWarning, match="already merged"):
            ours.base_model.merge_adapter()
        ours.base_model.unmerge_adapter()
        assert_rel(_emb(ours).base_layer.weight, base_weight, 1e-5, "unmerged weight")
        with ours.disable_adapter():
            assert_rel(_logits(ours, ids), _base_logits(ids), 1e-5, "disabled")
        assert_rel(_logits(ours, ids), ref, 1e-5, "enabled again")
        merged = ours.merge_and_unload(safe_merge=True)
        assert type(merged.model.embed_tokens) is nn.Embedding
        assert_rel(_logits(merged, ids), ref, 1e-5, "merge_and_unload")
        assert_rel(_logits(theirs.merge_and_unload(), ids), ref, 1e-5, "peft's merge_and_unload")


def _base_logits(ids):
    with torch.no_grad():
        return _logits(_llama(), ids)


def test_safe_merge_refuses_nan():
    ours, _, _ = _pair()
    with torch.no_grad():
        _emb(ours).lora_embedding_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        ours.merge_and_unload(safe_merge=True)


def test_several_active_adapters_set_and_delete_like_peft():
    ours, theirs, ids = _pair()
    other = dict(r=2, lora_alpha=3, target_modules=["embed_tokens"], init_lora_weights=False)
    torch.manual_seed(5)
    ours.add_adapter("other", fastpeft.LoraConfig(**other))
    theirs.add_adapter("other", peft.LoraConfig(**other))
    _copy(ours, theirs)
    for active in (["default", "other"], "other", "default"):
        ours.set_adapter(active)
        theirs.base_model.set_adapter(active)
        assert_rel(_logits(ours, ids), _logits(theirs, ids), 1e-5, f"active {active}")
        names = [active] if isinstance(active, str) else active
        assert {n for n in ("default", "other") if _emb(ours).lora_embedding_A[n].requires_grad} == set(names)
    ours.delete_adapter("other")
    theirs.delete_adapter("other")
    assert list(_emb(ours).lora_embedding_A) == ["default"]
    assert_rel(_logits(ours, ids), _logits(theirs, ids), 1e-5, "after delete")
    status = fastpeft.get_layer_status(ours)
    emb = [s for s in status if s.name == "model.model.embed_tokens"]
    assert emb and emb[0].module_type == "fastpeft.FastLoraEmbedding" and emb[0].available_adapters == ["default"]
    assert fastpeft.get_model_status(ours).num_adapter_layers == len(peft.get_layer_status(theirs))


@pytest.mark.parametrize("training", [False, True])
def test_mixed_batch_equals_peft(training):
    ours, theirs, ids = _pair()
    other = dict(r=2, lora_alpha=3, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    ours.add_adapter("other", fastpeft.LoraConfig(**other))
    theirs.add_adapter("other", peft.LoraConfig(**other))
    _copy(ours, theirs)
    names = ["other", "__base__", "default"]
    if training:
        ours.train()
        ours.base_model.set_requires_grad(["default", "other"], True)
        la = _logits(ours, ids, adapter_names=names)
        la.sum().backward()
        # each row from its own adapter: the same gradient as the adapter alone on that row
        A_other = _emb(ours).lora_embedding_A["other"].grad.clone()
        ours.zero_grad()
        ours.set_adapter("other")
        _logits(ours, ids[:1]).sum().backward()
        assert_rel(A_other, _emb(ours).lora_embedding_A["other"].grad, 1e-5, "per-row gradient")
    with torch.no_grad():
        ours.eval(), theirs.eval()
        la = _logits(ours, ids, adapter_names=names)
        lb = _logits(theirs, ids, adapter_names=names)
    assert_rel(la, lb, 1e-5, "mixed batch")
    with pytest.raises(ValueError, match="non-existing adapter"):
        _logits(ours, ids, adapter_names=["nope", "default", "default"])


def test_from_peft_and_to_peft():
    ours, theirs, ids = _pair()
    ref = _logits(theirs, ids).detach()
    with pytest.warns(UserWarning, match="kept peft's layers"):
        fastpeft.from_peft(theirs)
    assert isinstance(theirs.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"),
                      fastpeft.FastLoraLinear)
    assert_rel(_logits(theirs, ids), ref, 1e-5, "from_peft")
    fastpeft.to_peft(theirs)
    assert_rel(_logits(theirs, ids), ref, 1e-5, "to_peft of a converted model")
    ref_ours = _logits(ours, ids).detach()
    back = fastpeft.to_peft(ours)
    assert type(back.get_submodule(EMB)).__name__ == "Embedding" and hasattr(back.get_submodule(EMB),
                                                                             "lora_embedding_A")
    assert_rel(_logits(back, ids), ref_ours, 1e-5, "to_peft of a fastpeft model")


def test_add_weighted_adapter_matches_peft():
    ours, theirs, ids = _pair()
    other = dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    ours.add_adapter("other", fastpeft.LoraConfig(**other))
    theirs.add_adapter("other", peft.LoraConfig(**other))
    _copy(ours, theirs)
    for kind in ("cat", "svd", "linear"):
        ours.add_weighted_adapter(["default", "other"], [0.7, -0.4], f"w_{kind}", combination_type=kind)
        theirs.add_weighted_adapter(["default", "other"], [0.7, -0.4], f"w_{kind}", combination_type=kind)
        ours.set_adapter(f"w_{kind}")
        theirs.set_adapter(f"w_{kind}")
        assert_rel(_emb(ours).get_delta_weight(f"w_{kind}"), _emb(theirs).get_delta_weight(f"w_{kind}"), 1e-5, kind)
        assert_rel(_logits(ours, ids), _logits(theirs, ids), 1e-5, f"{kind} logits")


def test_merging_an_embedding_tied_to_the_head_keeps_the_head(tmp_path):
    with pytest.warns(UserWarning, match=r"\['model.embed_tokens'\] share their weight with the output embeddings"):
        model = fastpeft.get_peft_model(_llama(tie=True), fastpeft.LoraConfig(
            r=4, target_modules=["embed_tokens"], init_lora_weights=False))
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.base_layer.weight
    head = base.lm_head.weight.detach().clone()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        expected = _logits(model, ids)
        with pytest.warns(UserWarning, match="shared its weight with the output embeddings"):
            merged = model.merge_and_unload()
        assert torch.equal(merged.lm_head.weight, head)
        assert merged.config.tie_word_embeddings is False
        assert_rel(_logits(merged, ids), expected, 1e-5, "merged")
        merged.save_pretrained(tmp_path / "merged")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert_rel(_logits(reloaded, ids), expected, 1e-5, "reloaded")


def test_dora_and_bad_input_on_embeddings_are_refused():
    model = _llama()
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) on the embedding layer 'model.embed_tokens'"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert type(model.model.embed_tokens) is nn.Embedding  # refused before anything was wrapped
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    layer = fastpeft.FastLoraEmbedding(10, 4, r=2)
    with pytest.raises(ValueError, match="DoRA"):
        layer.update_layer("d", r=2, use_dora=True)
    with pytest.raises(ValueError, match="lora_bias"):
        layer.update_layer("b", r=2, lora_bias=True)
    with pytest.raises(ValueError, match="positive integer"):
        layer.update_layer("z", r=0)
    with pytest.raises(TypeError, match="wraps nn.Embedding"):
        fastpeft.FastLoraEmbedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(torch.tensor([[1, 2]]), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="unknown adapter"):
        layer(torch.tensor([[1, 2]]), adapter_names=["nope"])


def test_bf16_base_keeps_fp32_adapters_and_rounds_like_peft():
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(_llama().to(torch.bfloat16), fastpeft.LoraConfig(**kw)).eval()
        theirs = peft.get_peft_model(_llama().to(torch.bfloat16), peft.LoraConfig(**kw)).eval()
    _copy(ours, theirs)
    ea, eb = _emb(ours), _emb(theirs)
    assert ea.lora_embedding_A["default"].dtype == eb.lora_embedding_A["default"].dtype == torch.float32
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        assert ea(ids).dtype == torch.bfloat16
        assert torch.equal(ea(ids), eb(ids))
        assert torch.equal(ea(ids, adapter_names=names), eb(ids, adapter_names=names))
        assert not torch.equal(ea(ids), ea.base_layer(ids))


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_merging_both_sides_of_a_tied_pair(how):
    """LoRA on embed_tokens and on the lm_head tied to it: each merges into a weight of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        model = fastpeft.get_peft_model(_llama(tie=True), fastpeft.LoraConfig(
            r=4, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False))
    base = model.get_base_model()
    assert base.lm_head.base_layer.weight is base.model.embed_tokens.base_layer.weight
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _logits(model, ids)
        merged = getattr(model, how)()
        out = _logits(model if how == "merge_adapter" else merged, ids)
    assert_rel(out, expected, 1e-5, how)
    assert base.config.tie_word_embeddings is False


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2"])
def test_a_base_rewriting_init_leaves_embeddings_at_the_default_init_like_peft(init):
    """A config asking OLoRA/fast PiSSA for its linear targets: the embedding target gets the default init (A zero,
    B normal) as in peft, drawn the same; the linear target gets the init, the embedding base is untouched."""
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**kw))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_llama(), peft.LoraConfig(**kw))
    ea, eb = _emb(ours), _emb(theirs)
    assert not ea.lora_embedding_A["default"].any()
    assert torch.equal(ea.lora_embedding_B["default"], eb.lora_embedding_B["default"])
    assert torch.equal(ea.base_layer.weight, _llama().model.embed_tokens.weight)


def test_loftq_on_an_embedding_is_refused():
    config = fastpeft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="loftq",
                                 loftq_config=fastpeft.LoftQConfig(loftq_bits=4, loftq_iter=1))
    with pytest.raises(ValueError, match="init_lora_weights='loftq' on an embedding layer"):
        fastpeft.get_peft_model(_llama(), config)
