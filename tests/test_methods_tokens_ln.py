"""Standalone trainable tokens (``TrainableTokensConfig``) and LayerNorm tuning (``LNTuningConfig``) against peft 0.21.2
on a tiny Llama (tied and untied embeddings): trainable names and counts, outputs and gradients with the same
weights, optimizer steps, files saved by either loading in the other, merge_and_unload / unload, several adapters,
errors for bad input."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastpeft
from helpers import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 96
IDS = [1, 5, 7]


def _base(tie=False):
    torch.manual_seed(0)
    return tiny_llama(V, tie_word_embeddings=tie).eval()


def _pair(tie=False):
    """Two base models with the same weights."""
    a = _base(tie)
    b = tiny_llama(V, tie_word_embeddings=tie).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def _inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=g)
    ids[0, :3] = torch.tensor(IDS)  # the trained rows appear in the input
    return {"input_ids": ids, "labels": ids.clone()}


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _make(kind, tie=False, **kw):
    """(fastpeft model, peft model) on identical bases."""
    a, b = _pair(tie)
    if kind == "tokens":
        kw.setdefault("token_indices", IDS)
        return (fastpeft.get_peft_model(a, fastpeft.TrainableTokensConfig(**kw)),
                peft.get_peft_model(b, peft.TrainableTokensConfig(**kw)))
    kw.setdefault("task_type", "CAUSAL_LM")
    return fastpeft.get_peft_model(a, fastpeft.LNTuningConfig(**kw)), peft.get_peft_model(b, peft.LNTuningConfig(**kw))


def _perturb_and_sync(ours, theirs, seed=3):
    """Random values in our trainable weights, the same put into peft's (the names are the same)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in _trainable(ours).items():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
            params[name].copy_(p)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x["input_ids"]).logits


KINDS = [("tokens", False), ("tokens", True), ("ln", False), ("ln", True)]
KIND_IDS = ["tokens-untied", "tokens-tied", "ln-untied", "ln-tied"]


# --------------------------------------------------------------------------- both methods
@pytest.mark.parametrize("kind,tie", KINDS, ids=KIND_IDS)
def test_names_counts_outputs_grads_steps_match_peft(kind, tie, capsys):
    ours, theirs = _make(kind, tie)
    assert set(_trainable(ours)) == set(_trainable(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    x = _inputs()
    # init is a no-op: the base model's outputs
    base = _base(tie)
    torch.testing.assert_close(_logits(ours, x), _logits(base, x), rtol=0, atol=0)
    _perturb_and_sync(ours, theirs)
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(ours, x), _logits(base, x))
    ours(**x).loss.backward()
    theirs(**x).loss.backward()
    tp = dict(theirs.named_parameters())
    for name, p in _trainable(ours).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, tp[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    for m in (ours, theirs):
        m.zero_grad()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            m(**x).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, p in _trainable(ours).items():
        torch.testing.assert_close(p, tp[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-5, atol=1e-5)
    # frozen base weights did not move
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, tp[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind,tie", KINDS, ids=KIND_IDS)
def test_saved_files_match_and_load_both_ways(kind, tie, tmp_path):
    ours, theirs = _make(kind, tie)
    _perturb_and_sync(ours, theirs)
    x = _inputs()
    expected = _logits(theirs, x)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "target_modules", "token_indices", "init_weights", "exclude_modules", "modules_to_save",
                "task_type", "inference_mode"):
        va, vb = ca.get(key), cb.get(key)
        if isinstance(va, list) and key != "token_indices":  # peft writes these in set order
            va, vb = sorted(va), sorted(vb)
        assert va == vb, key
    # ours -> peft, peft -> ours
    loaded_p = peft.PeftModel.from_pretrained(_base(tie), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded_p, x), expected, rtol=1e-6, atol=1e-6)
    loaded_f = fastpeft.PeftModel.from_pretrained(_base(tie), tmp_path / "theirs")
    assert type(loaded_f.peft_config["default"]).__name__ == type(ours.peft_config["default"]).__name__
    torch.testing.assert_close(_logits(loaded_f, x), expected, rtol=1e-6, atol=1e-6)
    assert not _trainable(loaded_f)
    trainable = fastpeft.PeftModel.from_pretrained(_base(tie), tmp_path / "theirs", is_trainable=True)
    assert set(_trainable(trainable)) == set(_trainable(ours))


@pytest.mark.parametrize("kind,tie", KINDS, ids=KIND_IDS)
def test_merge_and_unload_and_unload_match_peft(kind, tie):
    x = _inputs()
    ours, theirs = _make(kind, tie)
    _perturb_and_sync(ours, theirs)
    adapted = _logits(ours, x)
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours, x), _logits(_base(tie), x), rtol=0, atol=0)
    torch.testing.assert_close(_logits(ours, x), adapted, rtol=0, atol=0)
    m_ours, m_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert sorted(m_ours.state_dict()) == sorted(m_theirs.state_dict()) == sorted(_base(tie).state_dict())
    torch.testing.assert_close(_logits(m_ours, x), _logits(m_theirs, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(m_ours, x), adapted, rtol=1e-6, atol=1e-6)
    if tie:
        assert m_ours.lm_head.weight is m_ours.model.embed_tokens.weight
    ours, _ = _make(kind, tie)
    _perturb_and_sync(ours, _)
    plain = ours.unload()
    assert sorted(plain.state_dict()) == sorted(_base(tie).state_dict())
    torch.testing.assert_close(_logits(plain, x), _logits(_base(tie), x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tokens", "ln"])
def test_several_adapters_match_peft(kind, tmp_path):
    second = (dict(token_indices=[2, 3, 9]) if kind == "tokens"
              else dict(task_type="CAUSAL_LM"))
    cfg_f = fastpeft.TrainableTokensConfig if kind == "tokens" else fastpeft.LNTuningConfig
    cfg_p = peft.TrainableTokensConfig if kind == "tokens" else peft.LNTuningConfig
    ours, theirs = _make(kind)
    _perturb_and_sync(ours, theirs, seed=4)
    x = _inputs()
    first = _logits(ours, x)
    ours.add_adapter("b", cfg_f(**second))
    theirs.add_adapter("b", cfg_p(**second))
    assert set(_trainable(ours)) == set(_trainable(theirs))
    assert ours.active_adapter == theirs.active_adapter == "default"
    torch.testing.assert_close(_logits(ours, x), first, rtol=0, atol=0)  # adding does not activate
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert set(_trainable(ours)) == set(_trainable(theirs)) and all(".b" in n for n in _trainable(ours))
    _perturb_and_sync(ours, theirs, seed=5)
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-6, atol=1e-6)
    out_b = _logits(ours, x)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter_model.safetensors").exists()
    # peft reads both adapters of our folder
    loaded_p = peft.PeftModel.from_pretrained(_base(), tmp_path)
    loaded_p.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(_logits(loaded_p, x), first, rtol=1e-6, atol=1e-6)
    loaded_p.set_adapter("b")
    torch.testing.assert_close(_logits(loaded_p, x), out_b, rtol=1e-6, atol=1e-6)
    # and so does fastpeft (load_adapter of a new name: added, not active, frozen)
    loaded_f = fastpeft.PeftModel.from_pretrained(_base(), tmp_path)
    loaded_f.load_adapter(tmp_path / "b", adapter_name="b")
    assert loaded_f.active_adapter == "default" and not _trainable(loaded_f)
    torch.testing.assert_close(_logits(loaded_f, x), first, rtol=1e-6, atol=1e-6)
    loaded_f.set_adapter("b")
    torch.testing.assert_close(_logits(loaded_f, x), out_b, rtol=1e-6, atol=1e-6)
    # merge_and_unload merges the active adapter, as peft
    torch.testing.assert_close(_logits(ours.merge_and_unload(), x), _logits(theirs.merge_and_unload(), x),
                               rtol=1e-6, atol=1e-6)


def test_merge_and_unload_named_adapter_matches_peft():
    """``merge_and_unload(adapter_names=["b"])`` merges ``b`` although ``default`` is active, as in peft."""
    x = _inputs()
    for kind, second in (("tokens", dict(token_indices=[39, 66])), ("ln", dict(task_type="CAUSAL_LM"))):
        ours, theirs = _make(kind)
        ours.add_adapter("b", (fastpeft.TrainableTokensConfig if kind == "tokens" else fastpeft.LNTuningConfig)(
            **second))
        theirs.add_adapter("b", (peft.TrainableTokensConfig if kind == "tokens" else peft.LNTuningConfig)(**second))
        ours.set_adapter("b")
        theirs.set_adapter("b")
        _perturb_and_sync(ours, theirs, seed=6)
        ours.set_adapter("default")
        theirs.set_adapter("default")
        m_ours = ours.merge_and_unload(adapter_names=["b"])
        m_theirs = theirs.merge_and_unload(adapter_names=["b"])
        assert not torch.allclose(_logits(m_ours, x), _logits(_base(), x))
        torch.testing.assert_close(_logits(m_ours, x), _logits(m_theirs, x), rtol=1e-6, atol=1e-6)


def test_ln_adapter_on_fewer_layers_runs_base_elsewhere():
    """Deliberate difference: with an LN adapter active that has no copy in some adapted layer, peft fails there
    (KeyError); fastpeft runs that layer's base module."""
    ours, _ = _make("ln")
    _perturb_and_sync(ours, _)
    ours.add_adapter("c", fastpeft.LNTuningConfig(target_modules=["norm"]))
    ours.set_adapter("c")
    assert set(_trainable(ours)) == {"base_model.model.model.norm.ln_tuning_layers.c.weight"}
    x = _inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(_base(), x), rtol=0, atol=0)  # "c" starts as the base


@pytest.mark.parametrize("kind", ["tokens", "ln"])
def test_delete_adapter_and_errors(kind):
    second = dict(token_indices=[2, 3]) if kind == "tokens" else dict(target_modules=["norm"])
    cfg_f = fastpeft.TrainableTokensConfig if kind == "tokens" else fastpeft.LNTuningConfig
    ours, theirs = _make(kind)
    ours.add_adapter("b", cfg_f(**second))
    theirs.add_adapter("b", (peft.TrainableTokensConfig if kind == "tokens" else peft.LNTuningConfig)(**second))
    ours.set_adapter("b")
    theirs.set_adapter("b")
    ours.delete_adapter("b")
    theirs.delete_adapter("b")
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert set(_trainable(ours)) == set(_trainable(theirs))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    with pytest.raises(ValueError, match="not found"):
        ours.set_adapter("nope")
    other = fastpeft.LNTuningConfig(target_modules=["norm"]) if kind == "tokens" \
        else fastpeft.TrainableTokensConfig(token_indices=[1])
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        ours.add_adapter("c", other)
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter("default", cfg_f(**second))


# --------------------------------------------------------------------------- trainable tokens specifics
def test_tokens_only_listed_rows_change():
    ours, _ = _make("tokens")
    x = _inputs()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ours(**x).loss.backward()
    opt.step()
    merged = ours.merge_and_unload().model.embed_tokens.weight
    orig = _base().model.embed_tokens.weight
    changed = (merged != orig).any(dim=1).nonzero().flatten().tolist()
    assert changed == IDS


def test_tokens_bad_input_errors_match_peft():
    for lib in (fastpeft, peft):
        with pytest.raises(IndexError, match="out of bounds"):
            lib.get_peft_model(_base(), lib.TrainableTokensConfig(token_indices=[1, V]))
        with pytest.raises(ValueError, match="Target modules .*nope.* not found in the base model"):
            lib.get_peft_model(_base(), lib.TrainableTokensConfig(token_indices=[1], target_modules=["nope"]))
    # deliberate difference: peft accepts a row listed twice (its value is then undefined); fastpeft refuses it
    with pytest.raises(ValueError, match="more than once"):
        fastpeft.get_peft_model(_base(), fastpeft.TrainableTokensConfig(token_indices=[1, 1]))
    with pytest.raises(TypeError, match="list of ints"):
        fastpeft.TrainableTokensConfig(token_indices=["a"])
    # deliberate difference: peft accepts no rows at all and then fails in the forward (index_copy_ on a float
    # index); fastpeft refuses it when wrapping, for this method and for LoRA's trainable_token_indices
    with pytest.raises(ValueError, match="empty"):
        fastpeft.get_peft_model(_base(), fastpeft.TrainableTokensConfig(token_indices=[]))
    with pytest.raises(ValueError, match="empty"):
        fastpeft.get_peft_model(_base(), fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[]))


def test_tokens_explicit_target_and_random_init():
    for lib in (fastpeft, peft):
        torch.manual_seed(1)
        m = lib.get_peft_model(_base(), lib.TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"],
                                                                  init_weights=False))
        assert set(_trainable(m)) == {"base_model.model.model.embed_tokens.trainable_tokens_delta.default"}
        delta = m.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
        assert not torch.equal(delta, _base().model.embed_tokens.weight[IDS])


# --------------------------------------------------------------------------- LN tuning specifics
def test_ln_targets_exclude_and_modules_to_save_match_peft(tmp_path):
    kw = dict(target_modules=["input_layernorm", "norm"], exclude_modules=["model.layers.1.input_layernorm"],
              modules_to_save=["lm_head"])
    ours, theirs = _make("ln", **kw)
    assert set(_trainable(ours)) == set(_trainable(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    _perturb_and_sync(ours, theirs)
    x = _inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-6, atol=1e-6)
    ours.save_pretrained(tmp_path / "o")
    theirs.save_pretrained(tmp_path / "t")
    a = safetensors_torch.load_file(tmp_path / "o" / "adapter_model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "t" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "o")
    torch.testing.assert_close(_logits(loaded, x), _logits(ours, x), rtol=1e-6, atol=1e-6)
    # a regex target, as peft matches it
    o2, t2 = _make("ln", target_modules=r".*layers\.0\..*layernorm")
    assert set(_trainable(o2)) == set(_trainable(t2)) and len(_trainable(o2)) == 2


def test_ln_bad_input_errors_match_peft():
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=48))
    for lib in (fastpeft, peft):
        with pytest.raises(ValueError, match="Target modules .*nope.* not found in the base model"):
            lib.get_peft_model(_base(), lib.LNTuningConfig(target_modules=["nope"]))
        with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
            lib.get_peft_model(_base(), lib.LNTuningConfig(target_modules=["norm"], exclude_modules=["norm"]))
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            lib.get_peft_model(bert, lib.LNTuningConfig())


def test_ln_merge_adapter_unmerge_roundtrip():
    ours, theirs = _make("ln")
    _perturb_and_sync(ours, theirs)
    x = _inputs()
    adapted = _logits(ours, x)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(_logits(ours, x), adapted, rtol=0, atol=0)
    torch.testing.assert_close(_logits(theirs, x), adapted, rtol=1e-6, atol=1e-6)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours, x), adapted, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.disable_adapter():
            torch.testing.assert_close(_logits(ours, x), _logits(_base(), x), rtol=0, atol=0)


def test_configs_exported_and_peft_type():
    assert "TrainableTokensConfig" in fastpeft.__all__ and "LNTuningConfig" in fastpeft.__all__
    assert fastpeft.TrainableTokensConfig(token_indices=[1]).peft_type == fastpeft.PeftType.TRAINABLE_TOKENS
    assert fastpeft.LNTuningConfig().peft_type == fastpeft.PeftType.LN_TUNING
    assert os.fspath(fastpeft.methods.build_config("ln_tuning", target_modules=["norm"]).target_modules[0]) == "norm"


@pytest.mark.parametrize("tie,targets", [(False, ["embed_tokens", "lm_head"]), (False, ["lm_head"]),
                                         (True, ["lm_head"]), (True, r".*embed_tokens")])
def test_tokens_other_targets_match_peft(tie, targets):
    ours, theirs = _make("tokens", tie, target_modules=targets)
    assert set(_trainable(ours)) == set(_trainable(theirs))
    assert set(fastpeft.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    _perturb_and_sync(ours, theirs)
    x = _inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-6, atol=1e-6)


def test_tokens_tied_head_targeted_too_follows_embeddings(tmp_path):
    """Deliberate difference: with tied embeddings, targeting ``lm_head`` as well gives it the embeddings' rows
    (one trained delta, the head tied); peft 0.21.2 builds a layer there that fails in forward."""
    ours = fastpeft.get_peft_model(_base(True), fastpeft.TrainableTokensConfig(
        token_indices=IDS, target_modules=["embed_tokens", "lm_head"]))
    assert set(_trainable(ours)) == {"base_model.model.model.embed_tokens.trainable_tokens_delta.default"}
    assert ours.base_model.model.lm_head.tied_adapter is ours.base_model.model.model.embed_tokens
    plain = fastpeft.get_peft_model(_base(True), fastpeft.TrainableTokensConfig(token_indices=IDS))
    _perturb_and_sync(ours, plain)
    x = _inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(plain, x), rtol=0, atol=0)


def test_ln_on_gpt2_layernorm_matches_peft(tmp_path):
    """nn.LayerNorm (weight and bias) on GPT-2 with peft's default targets (ln_1, ln_2, ln_f)."""
    from helpers import tiny_gpt2

    torch.manual_seed(0)
    a = tiny_gpt2(V).eval()
    b = tiny_gpt2(V).eval()
    b.load_state_dict(a.state_dict())
    ours = fastpeft.get_peft_model(a, fastpeft.LNTuningConfig(task_type="CAUSAL_LM"))
    theirs = peft.get_peft_model(b, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    assert set(_trainable(ours)) == set(_trainable(theirs)) and len(_trainable(ours)) == 10
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    _perturb_and_sync(ours, theirs)
    x = _inputs()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-6, atol=1e-6)
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights as ``a``
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(V).eval(), tmp_path)
    torch.testing.assert_close(_logits(loaded, x), _logits(ours, x), rtol=1e-6, atol=1e-6)
