"""``LoraConfig(ensure_weight_tying=True)`` against peft 0.21.2 on a tiny Llama with tied (and untied) embeddings:
LoRA on ``embed_tokens`` / ``lm_head``, ``modules_to_save`` and ``trainable_token_indices`` on the tied pair."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastpeft
from fastpeft.layers.embedding import FastLoraEmbedding
from fastpeft.layers.lora import FastLoraLinear
from helpers import assert_rel, grads_match, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 96
PRE = "base_model.model."
LORA_CASES = {  # target_modules -> what peft's config then says
    "embed": ["q_proj", "embed_tokens"],
    "head": ["q_proj", "lm_head"],
    "regex": r".*(q_proj|lm_head)",
}
SAVE_CASES = {"embed": ["embed_tokens"], "head": ["lm_head"]}


def _llama(tie=True):
    torch.manual_seed(0)
    return tiny_llama(V, tie_word_embeddings=tie).eval()


def _same_forward_and_grads(ours, theirs):
    """Logits equal, then one backward each from the same cotangent: the trained names and gradients equal
    peft's; returns fastpeft's gradients by name."""
    ids = _ids()
    lo, lt = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-5)
    return grads_match(ours, theirs, lo, lt)


def _kw(**overrides):
    kw = dict(r=4, lora_alpha=8, ensure_weight_tying=True)
    kw.update(overrides)
    return kw


def _build(lib, tie=True, **overrides):
    """A model of ``lib`` (fastpeft or peft) and the warnings its creation gave (seeded: the same init)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        model = lib.get_peft_model(_llama(tie), lib.LoraConfig(**_kw(**overrides)))
    return model, [str(w.message) for w in caught if "deprecated" not in str(w.message)]


def _pair(tie=True, **overrides):
    ours, _ = _build(fastpeft, tie, **overrides)
    theirs, _ = _build(peft, tie, **overrides)
    return ours, theirs


def _ids():
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _same_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _assert_lora_tied(model, adapter="default"):
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert isinstance(emb, FastLoraEmbedding) and isinstance(head, FastLoraLinear)
    A, B = emb.lora_embedding_A[adapter], emb.lora_embedding_B[adapter]
    hA, hB = head.lora_A[adapter].weight, head.lora_B[adapter].weight
    assert hA is not B and _same_memory(hA, B) and _same_memory(hB, A)  # peft's layout: own parameters, one memory
    assert torch.equal(hA, B.t()) and torch.equal(hB, A.t())
    assert head.base_layer.weight is emb.base_layer.weight


def _perturb(model):
    """Trained-looking adapter weights (in place, so tied memory stays tied)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _config_json(path):
    data = json.loads((path / "adapter_config.json").read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])  # peft writes a set in its own order
    return data


_CONFIG_KEYS = ("target_modules", "modules_to_save", "ensure_weight_tying", "trainable_token_indices", "r",
                "lora_alpha", "exclude_modules")


# ----------------------------------------------------------------------------- LoRA on the tied pair
@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_tied_like_peft(case, init):
    (ours, w_ours), (theirs, w_theirs) = (_build(lib, target_modules=LORA_CASES[case], init_lora_weights=init)
                                          for lib in (fastpeft, peft))
    assert w_ours == w_theirs == []
    _assert_lora_tied(ours)
    co, ct = ours.peft_config["default"], theirs.peft_config["default"]
    tm = ct.target_modules
    assert co.target_modules == (tm if isinstance(tm, str) else sorted(tm))
    assert _trainable(ours) == _trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    for k in so:  # the same seeded init, the embeddings' B re-initialized through the head as peft does
        assert torch.equal(so[k], st[k]), k
    if init is True:
        assert not ours.base_model.model.model.embed_tokens.lora_embedding_A["default"].any()

    go = _same_forward_and_grads(ours, theirs)
    assert go[f"{PRE}lm_head.lora_B.default.weight"].abs().sum() > 0

    # an optimizer step on both sides of the shared memory: the same numbers as peft, still one memory
    for m in (ours, theirs):
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    _assert_lora_tied(ours)
    so, st = ours.state_dict(), theirs.state_dict()
    for k in so:
        assert_rel(so[k], st[k], 1e-5, k)


@pytest.mark.parametrize("case", ["embed", "head"])
def test_lora_saved_files_and_loading_both_ways(tmp_path, case):
    ours, theirs = _pair(target_modules=LORA_CASES[case])
    _perturb(ours)
    theirs.load_state_dict(ours.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    fo = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ft = safetensors_torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(fo) == sorted(ft)
    assert f"{PRE}lm_head.lora_A.weight" in fo
    # peft's save_embedding_layers="auto": the base weights too when target_modules names embed_tokens
    assert (f"{PRE}lm_head.base_layer.weight" in fo) == (case == "embed")
    for k in fo:
        assert torch.equal(fo[k], ft[k]), k
    assert torch.equal(fo[f"{PRE}lm_head.lora_A.weight"], fo[f"{PRE}model.embed_tokens.lora_embedding_B"].t())
    co, ct = _config_json(tmp_path / "ours"), _config_json(tmp_path / "theirs")
    for key in _CONFIG_KEYS:
        assert co.get(key) == ct.get(key), key
    assert co["ensure_weight_tying"] is True and "model.embed_tokens" in co["target_modules"]
    assert "lm_head" not in co["target_modules"]

    ids = _ids()
    want = theirs(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours2 = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "theirs")
        theirs2 = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours")
    _assert_lora_tied(ours2)
    torch.testing.assert_close(ours2(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs2(input_ids=ids).logits, want, rtol=0, atol=0)


def test_lora_merge_keeps_the_tie_and_the_function():
    ours, _ = _pair(target_modules=LORA_CASES["embed"])
    _perturb(ours)
    ids = _ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        base = ours.base_model.model.model.embed_tokens.base_layer.weight.clone()
        ours.base_model.merge_adapter()
        emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
        assert emb.merged and head.merged and head.base_layer.weight is emb.base_layer.weight
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        ours.base_model.unmerge_adapter()
        assert not head.merged
        torch.testing.assert_close(emb.base_layer.weight, base, rtol=0, atol=1e-6)
        merged = ours.merge_and_unload()  # (peft adds the shared delta twice here)
        assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config.tie_word_embeddings
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_lora_second_adapter_tied_on_its_own():
    ours, _ = _pair(target_modules=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_adapter("other", fastpeft.LoraConfig(**_kw(target_modules=["lm_head"], r=2)))
    _assert_lora_tied(ours, "default")
    _assert_lora_tied(ours, "other")
    _perturb(ours)
    ids = _ids()
    out = {}
    for name in ("default", "other"):
        ours.set_adapter(name)
        out[name] = ours(input_ids=ids).logits
    assert not torch.allclose(out["default"], out["other"])


# ----------------------------------------------------------------------------- modules_to_save on the tied pair
@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_modules_to_save_tied_like_peft(tmp_path, case):
    ours, theirs = _pair(target_modules=["q_proj"], modules_to_save=SAVE_CASES[case])
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert emb.original_module.weight is head.original_module.weight  # the base stays as it was
    assert _trainable(ours) == _trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    for k in so:
        assert torch.equal(so[k], st[k]), k

    _same_forward_and_grads(ours, theirs)
    ids = _ids()
    for m in (ours, theirs):
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert not torch.equal(emb.modules_to_save["default"].weight, emb.original_module.weight)

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    fo = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ft = safetensors_torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(fo) == sorted(ft) and f"{PRE}lm_head.weight" in fo
    for k in fo:
        assert_rel(fo[k], ft[k], 1e-5, k)
    co, ct = _config_json(tmp_path / "ours"), _config_json(tmp_path / "theirs")
    for key in _CONFIG_KEYS:
        assert co.get(key) == ct.get(key), key

    want = ours(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours2 = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "theirs")
        theirs2 = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours")
    emb2, head2 = ours2.base_model.model.model.embed_tokens, ours2.base_model.model.lm_head
    assert head2.modules_to_save["default"].weight is emb2.modules_to_save["default"].weight
    torch.testing.assert_close(ours2(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs2(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config.tie_word_embeddings
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- trainable tokens
def test_trainable_tokens_tie_and_peft_messages():
    ids_ = [1, 5, 7]
    (ours, w_ours), (theirs, w_theirs) = (_build(lib, target_modules=["q_proj"], trainable_token_indices=ids_)
                                          for lib in (fastpeft, peft))
    assert w_ours == w_theirs and "no tied modules are added" in w_ours[0]
    assert ours.base_model.model.lm_head.is_tied
    assert _trainable(ours) == _trainable(theirs)
    torch.testing.assert_close(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)
    mismatch = {"embed_tokens": [1, 2], "lm_head": [3, 4]}
    for lib in (fastpeft, peft):
        with pytest.raises(ValueError, match="Cannot ensure weight tying when different token indices"):
            _build(lib, target_modules=["q_proj"], trainable_token_indices=mismatch)
    # the default (False) keeps two independent sets for different ids, as peft
    ours, theirs = _pair(target_modules=["q_proj"], trainable_token_indices=mismatch, ensure_weight_tying=False)
    assert _trainable(ours) == _trainable(theirs)
    assert not ours.base_model.model.lm_head.is_tied


# ----------------------------------------------------------------------------- untied model, default, refusals
@pytest.mark.parametrize("extra", [dict(target_modules=["q_proj", "embed_tokens"]),
                                   dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                                   dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])])
def test_untied_model_warns_like_peft_and_ties_nothing(extra):
    (ours, w_ours), (theirs, w_theirs) = (_build(lib, tie=False, **extra) for lib in (fastpeft, peft))
    assert w_ours == w_theirs
    assert "You have requested `ensure_weight_tying`, but no tied modules were found in the model" in w_ours
    head = ours.base_model.model.lm_head
    assert type(head) is torch.nn.Linear
    assert _trainable(ours) == _trainable(theirs)
    co, ct = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(co.target_modules) == sorted(ct.target_modules)
    assert co.modules_to_save == ct.modules_to_save


def test_default_false_unchanged(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _pair(target_modules=["q_proj", "embed_tokens", "lm_head"], ensure_weight_tying=False)
    assert sorted(ours.peft_config["default"].target_modules) == ["embed_tokens", "lm_head", "q_proj"]
    emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
    assert not _same_memory(head.lora_A["default"].weight, emb.lora_embedding_B["default"])
    assert _trainable(ours) == _trainable(theirs)
    ours.save_pretrained(tmp_path)
    assert _config_json(tmp_path)["ensure_weight_tying"] is False
    assert fastpeft.LoraConfig(ensure_weight_tying=None).ensure_weight_tying is False
    with pytest.raises(TypeError, match="ensure_weight_tying must be a bool"):
        fastpeft.LoraConfig(ensure_weight_tying="yes")


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="same r for the embeddings and the head"):
        _build(fastpeft, target_modules=["embed_tokens"], rank_pattern={"lm_head": 2})
    with pytest.raises(ValueError, match="get no LoRA adapter here"):
        _build(fastpeft, target_modules=["embed_tokens", "q_proj"], exclude_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="init_lora_weights True, False or 'gaussian' only"):
        _build(fastpeft, target_modules=["embed_tokens"], init_lora_weights="olora")
    with pytest.raises(ValueError, match="also follows the input embeddings' modules_to_save copy"):
        _build(fastpeft, target_modules=["lm_head"], modules_to_save=["embed_tokens"])


def test_weighted_adapter_of_tied_adapters_stays_tied():
    # (peft 0.21.2 raises KeyError here)
    ours, _ = _pair(target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_adapter("b", fastpeft.LoraConfig(**_kw(target_modules=["embed_tokens"], init_lora_weights=False)))
    ours.add_weighted_adapter(["default", "b"], [0.5, 0.7], "c", combination_type="cat")
    _assert_lora_tied(ours, "c")
    emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
    want = 0.5 * emb.get_delta_weight("default") + 0.7 * emb.get_delta_weight("b")
    torch.testing.assert_close(emb.get_delta_weight("c"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.get_delta_weight("c"), want, rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_the_tie_with_fp32_adapters():
    # peft's autocast_adapter_dtype re-creates each adapter parameter in fp32 one by one, which gives the head its
    # own copies (the tie is lost); fastpeft builds the head's factors over the embeddings' fp32 ones
    def bf16(lib):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lib.get_peft_model(_llama().to(torch.bfloat16),
                                      lib.LoraConfig(**_kw(target_modules=["q_proj", "embed_tokens"])))
    ours, theirs = bf16(fastpeft), bf16(peft)
    _assert_lora_tied(ours)
    assert ours.base_model.model.lm_head.lora_A["default"].weight.dtype == torch.float32
    so, st = ours.state_dict(), theirs.state_dict()
    for k in so:
        assert so[k].dtype == st[k].dtype, k
        if "embed_tokens.lora_" not in k and "lm_head.lora_" not in k:
            torch.testing.assert_close(so[k], st[k], rtol=1e-2, atol=1e-3, msg=k)
    # The tied pair's initial values: peft draws them into bf16 tensors, which torch 2.11 and 2.13 fill from the
    # generator differently; so the pair gets peft's values, and must stay tied and compute what peft computes.
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    _assert_lora_tied(ours)
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("extra", [dict(target_modules=["q_proj", "embed_tokens"]),
                                   dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])])
def test_to_peft_and_from_peft_keep_the_tie(extra):
    ours, _ = _pair(**extra)
    _perturb(ours)
    ids = _ids()
    want = ours(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = fastpeft.to_peft(ours)
    emb, head = theirs.base_model.model.model.embed_tokens, theirs.base_model.model.lm_head
    if "modules_to_save" in extra:
        assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    else:
        assert _same_memory(head.lora_A["default"].weight, emb.lora_embedding_B["default"])
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    if "modules_to_save" not in extra:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = fastpeft.from_peft(theirs)
        head = back.base_model.model.lm_head  # (from_peft keeps peft's embedding layer)
        assert isinstance(head, FastLoraLinear)
        assert _same_memory(head.lora_A["default"].weight, emb.lora_embedding_B["default"])
        assert _same_memory(head.lora_B["default"].weight, emb.lora_embedding_A["default"])
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_modules_to_save_second_adapter_tied_on_its_own():
    # (peft 0.21.2's add_adapter gives the head an untied copy here and the embeddings none)
    ours, _ = _pair(target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_adapter("b", fastpeft.LoraConfig(**_kw(target_modules=["q_proj"], modules_to_save=["lm_head"])))
    assert ours.peft_config["b"].modules_to_save == ["model.embed_tokens"]
    emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
    for name in ("default", "b"):
        assert head.modules_to_save[name].weight is emb.modules_to_save[name].weight
    with torch.no_grad():
        emb.modules_to_save["b"].weight.add_(1.0)
    ids = _ids()
    ours.set_adapter("b")
    out_b = ours(input_ids=ids).logits
    ours.set_adapter("default")
    assert not torch.allclose(out_b, ours(input_ids=ids).logits)


def _qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _gemma():  # scaled word embeddings (embed_scale)
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.GemmaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_qwen2, _gemma])
@pytest.mark.parametrize("extra", [dict(target_modules=["q_proj", "lm_head"]),
                                   dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])])
def test_other_architectures_like_peft(make, extra):
    models = []
    for lib in (fastpeft, peft):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(make(), lib.LoraConfig(**_kw(init_lora_weights=False, **extra))))
    ours, theirs = models
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    for k in so:
        assert torch.equal(so[k], st[k]), k
    ids = _ids()
    want = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    if "modules_to_save" not in extra:
        _assert_lora_tied(ours)
        merged = ours.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_inject_adapter_in_model_like_peft():
    states, models = {}, {}
    for lib in (fastpeft, peft):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[lib] = lib.inject_adapter_in_model(
                lib.LoraConfig(**_kw(target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)), _llama())
        states[lib] = lib.get_peft_model_state_dict(models[lib])
    so, st = states[fastpeft], states[peft]
    assert sorted(so) == sorted(st) and all(torch.equal(so[k], st[k]) for k in so)
    assert models[fastpeft].peft_config["default"].target_modules == sorted(
        models[peft].peft_config["default"].target_modules)
    # from a state dict (its keys choose the layers): tied as well, the config rewritten as peft's
    lora_only = {k: v for k, v in st.items() if "base_layer" not in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.inject_adapter_in_model(
            fastpeft.LoraConfig(**_kw(target_modules=["q_proj", "embed_tokens"])), _llama(), state_dict=lora_only)
    assert _same_memory(model.lm_head.lora_A["default"].weight, model.model.embed_tokens.lora_embedding_B["default"])
    assert model.peft_config["default"].target_modules == sorted(models[peft].peft_config["default"].target_modules)


def test_tied_head_through_the_triton_kernels(triton_backend):
    # the head's factors are transposed views of the embeddings' (strided, not contiguous): the fused kernels
    # (interpreted on CPU; compiled on a GPU) read them by their strides and give the reference's numbers
    ours, theirs = _pair(target_modules=["embed_tokens"], init_lora_weights=False)
    head = ours.base_model.model.lm_head
    assert not head.lora_A["default"].weight.is_contiguous()
    ids = _ids()
    lo, lt = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-4)
    grads_match(ours, theirs, lo, lt, 1e-4)


def test_peft_file_of_a_tied_pair_without_head_keys_loads(tmp_path):
    """peft writes an adapter tied through layers that hold LoRA already (add_adapter targeting lm_head with
    ensure_weight_tying) with the embeddings' factors only; the head's are views of those. fastpeft loads such a
    file (it refused it as lacking the head's tensors) and gives peft's logits, the pair tied."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, ensure_weight_tying=True,
                                                           target_modules=["embed_tokens"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, ensure_weight_tying=True,
                                                target_modules=["lm_head"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path, selected_adapters=["other"])
    from safetensors.torch import load_file

    assert not [k for k in load_file(tmp_path / "other" / "adapter_model.safetensors") if "lm_head" in k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(_llama(), tmp_path / "other").eval()
        ours = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "other").eval()
    ids = _ids()
    with torch.no_grad():
        assert_rel(ours(input_ids=ids).logits, ref(input_ids=ids).logits, 1e-6, "logits")
    _assert_lora_tied(ours)
