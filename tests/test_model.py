"""Model level against Hugging Face peft on tiny randomly initialized transformers models (no download).

For each architecture: fastpeft and peft with the same config and the same adapter weights give the
same logits and LoRA gradients; adapters saved by either load in the other with identical outputs;
merge_and_unload equals the unmerged model; adapters switch like peft's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from torch import nn

import fastpeft
from helpers import assert_rel, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96  # vocab


def _llama():
    return tiny_llama(V)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def _gpt2():
    return tiny_gpt2(V)


def _bloom():
    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0)
    return transformers.BloomForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(cfg)


# name: (factory, LoraConfig kwargs, needs decoder ids)
MODELS = {
    "llama": (_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"), False),
    "qwen2": (_qwen2, dict(target_modules="all-linear", task_type="CAUSAL_LM"), False),
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"), False),
    "bloom": (_bloom, dict(target_modules=["query_key_value"], task_type="CAUSAL_LM"), False),
    "bert": (_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS"), False),
    "t5": (_t5, dict(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM"), True),
}


def _pair(name, **overrides):
    """(fastpeft model, peft model, inputs) over identical base weights and identical adapter weights."""
    factory, kwargs, seq2seq = MODELS[name]
    torch.manual_seed(0)
    base_a = factory().eval()
    state = {k: v.clone() for k, v in base_a.state_dict().items()}
    base_b = factory().eval()
    base_b.load_state_dict(state)
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    kw.update(overrides)
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(base_a, fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(base_b, peft.LoraConfig(**kw))
    # same adapter (and modules_to_save) weights: copy ours into theirs
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "lora_" in k or "modules_to_save" in k], missing
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(1, V, (2, 9), generator=g)}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(1, V, (2, 5), generator=g)
    return ours, theirs, inputs, (factory, state)


def _logits(model, inputs):
    return model(**inputs).logits


def _fresh(base):
    factory, state = base
    m = factory().eval()
    m.load_state_dict(state)
    return m


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_grads_equal_peft(name):
    ours, theirs, inputs, _ = _pair(name)
    ours.train(), theirs.train()  # lora_dropout = 0: training mode is deterministic
    names = {k for k, _ in theirs.named_parameters()}
    assert {k for k, _ in ours.named_parameters()} == names, "parameter names differ from peft's"
    ta = {k for k, p in ours.named_parameters() if p.requires_grad}
    tb = {k for k, p in theirs.named_parameters() if p.requires_grad}
    assert ta == tb and ta, f"trainable sets differ: {sorted(ta ^ tb)[:5]}"
    la, lb = _logits(ours, inputs), _logits(theirs, inputs)
    assert_rel(la, lb, 1e-5, f"{name} logits")
    g = torch.randn_like(la)
    (la * g).sum().backward()
    (lb * g).sum().backward()
    grads_b = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, k
            assert_rel(p.grad, grads_b[k].grad, 1e-4, f"{name} grad {k}")


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trips_with_peft(name, tmp_path):
    ours, theirs, inputs, base = _pair(name)
    ref = _logits(ours, inputs).detach()
    ours.save_pretrained(tmp_path / "fp")
    theirs.save_pretrained(tmp_path / "pf")
    files = sorted(os.listdir(tmp_path / "fp"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert files == sorted(os.listdir(tmp_path / "pf"))  # peft's files, model card included
    from safetensors.torch import load_file

    ka = load_file(tmp_path / "fp" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "pf" / "adapter_model.safetensors")
    assert sorted(ka) == sorted(kb), sorted(set(ka) ^ set(kb))
    assert all(k.startswith("base_model.model.") for k in ka)
    for k in ka:
        assert torch.equal(ka[k], kb[k]), k
    # fastpeft-saved → peft loads
    loaded_peft = peft.PeftModel.from_pretrained(_fresh(base), tmp_path / "fp")
    assert_rel(_logits(loaded_peft, inputs), ref, 1e-5, "peft loads fastpeft")
    # peft-saved → fastpeft loads
    loaded_ours = fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path / "pf")
    assert_rel(_logits(loaded_ours, inputs), ref, 1e-5, "fastpeft loads peft")
    assert not any(p.requires_grad for p in loaded_ours.parameters()), "inference load must be frozen"
    trainable = fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path / "pf", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5"])
def test_merge_and_unload_equals_unmerged(name):
    ours, _, inputs, _ = _pair(name)
    ref = _logits(ours, inputs).detach()
    with ours.disable_adapter():
        base_out = _logits(ours, inputs).detach()
    assert (ref - base_out).abs().max() > 1e-4, "adapter has no effect; the test would prove nothing"
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, fastpeft.FastLoraLinear) for m in merged.modules())
    assert not any(isinstance(m, fastpeft.ModulesToSaveWrapper) for m in merged.modules())
    assert_rel(_logits(merged, inputs), ref, 1e-5, "merged")


def test_unload_gives_back_the_base():
    ours, _, inputs, base = _pair("llama")
    plain = ours.unload()
    assert_rel(_logits(plain, inputs), _logits(_fresh(base), inputs), 1e-6, "unloaded")


def test_several_adapters_switch_like_peft(tmp_path):
    ours, theirs, inputs, _ = _pair("llama")
    second = dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    ours.add_adapter("second", fastpeft.LoraConfig(**second))
    theirs.add_adapter("second", peft.LoraConfig(**second))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    assert ours.active_adapter == "default"
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".second." in n)
    for active in ("second", "default", "second"):
        ours.set_adapter(active)
        theirs.set_adapter(active)
        assert_rel(_logits(ours, inputs), _logits(theirs, inputs), 1e-5, f"active={active}")
        ta = {k for k, p in ours.named_parameters() if p.requires_grad}
        assert ta == {k for k, p in theirs.named_parameters() if p.requires_grad}
    ours.base_model.set_adapter(["default", "second"])
    theirs.base_model.set_adapter(["default", "second"])
    assert_rel(_logits(ours, inputs), _logits(theirs, inputs), 1e-5, "both active")
    ours.set_adapter("default")
    # peft's folder layout for several adapters: default at the root, others in sub-folders
    ours.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
    ours.delete_adapter("second")
    assert list(ours.peft_config) == ["default"]
    assert not any(".second." in n for n, _ in ours.named_parameters())
    with pytest.raises(ValueError, match="does not exist"):
        ours.delete_adapter("second")


def test_load_adapter_adds_a_second_one(tmp_path):
    ours, _, inputs, base = _pair("llama")
    ours.save_pretrained(tmp_path)
    ref = _logits(ours, inputs).detach()
    other = fastpeft.get_peft_model(_fresh(base), fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    other.load_adapter(tmp_path, "loaded")
    assert other.active_adapter == "default"
    other.set_adapter("loaded")
    assert_rel(_logits(other, inputs), ref, 1e-5, "loaded adapter")


def test_print_trainable_parameters_matches_peft():
    for name, bias in (("llama", "none"), ("bert", "all"), ("gpt2", "lora_only")):
        ours, theirs, _, _ = _pair(name, bias=bias)
        a, b = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(a):
            ours.print_trainable_parameters()
        with contextlib.redirect_stdout(b):
            theirs.print_trainable_parameters()
        assert a.getvalue() == b.getvalue(), (name, a.getvalue(), b.getvalue())
        assert a.getvalue().startswith("trainable params: ")


def test_targeted_module_names_as_peft():
    config = dict(r=4, target_modules=["q_proj", "down_proj"])
    ours = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**config))
    ref = peft.get_peft_model(_llama(), peft.LoraConfig(**config))
    assert ours.targeted_module_names == ref.targeted_module_names
    assert len(ours.targeted_module_names) == 4
    # a second adapter's new modules follow the first's, in injection order as peft keeps them
    for model, lib in ((ours, fastpeft), (ref, peft)):
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["k_proj", "down_proj"]))
    assert ours.targeted_module_names == ref.targeted_module_names
    assert len(ours.targeted_module_names) == 6


def test_targets_patterns_and_layer_selection_match_peft():
    kw = dict(target_modules="all-linear", rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
              alpha_pattern={"o_proj": 3}, exclude_modules=["k_proj"], use_rslora=True)
    ours, theirs, inputs, _ = _pair("llama", **kw)

    def layout(model, cls):
        return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
                for n, m in model.named_modules() if isinstance(m, cls)}

    la = layout(ours, fastpeft.FastLoraLinear)
    lb = layout(theirs, peft.tuners.lora.LoraLayer)
    assert la == lb and la
    assert not any(n.endswith("lm_head") or n.endswith("k_proj") for n in la)
    assert_rel(_logits(ours, inputs), _logits(theirs, inputs), 1e-5, "patterns")
    ours, theirs, _, _ = _pair("llama", target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                               layers_pattern="layers")
    assert layout(ours, fastpeft.FastLoraLinear) == layout(theirs, peft.tuners.lora.LoraLayer)
    assert all(".layers.1." in n for n in layout(ours, fastpeft.FastLoraLinear))
    ours, theirs, _, _ = _pair("llama", target_modules=r".*\.(q|v)_proj")
    assert layout(ours, fastpeft.FastLoraLinear) == layout(theirs, peft.tuners.lora.LoraLayer)


def test_default_targets_and_seq_cls_head_like_peft():
    ours, theirs, inputs, _ = _pair("bert", target_modules=None)
    names = sorted(n for n, m in ours.named_modules() if isinstance(m, fastpeft.FastLoraLinear))
    assert names and all(n.endswith(("query", "value")) for n in names)
    assert isinstance(ours.base_model.model.classifier, fastpeft.ModulesToSaveWrapper)
    assert ours.peft_config["default"].modules_to_save == ["classifier", "score"]  # peft's, "score" absent
    assert_rel(_logits(ours, inputs), _logits(theirs, inputs), 1e-5, "bert default targets")


def test_pissa_init_keeps_the_models_function():
    # (_pair copies fastpeft's weights into peft's model: the comparison with peft's own PiSSA, built
    # independently, is in test_lora_init)
    ours, _, inputs, base = _pair("llama", init_lora_weights="pissa")
    fresh_out = _logits(_fresh(base), inputs)
    assert_rel(_logits(ours, inputs), fresh_out, 1e-4, "pissa identity")  # the base holds the residual


def test_trained_pissa_adapter_reloads_onto_the_original_base(tmp_path):
    """A PiSSA adapter, trained (A, B changed), saved by either library and loaded by fastpeft onto the
    original base: the same function as the trained model (the load re-runs the init, turning the base
    into the residual, as peft does)."""
    ours, theirs, inputs, base = _pair("llama", init_lora_weights="pissa")
    with torch.no_grad():
        for model in (ours, theirs):
            g = torch.Generator().manual_seed(3)
            for n, p in sorted(model.named_parameters()):
                if "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    for lib, model in (("fastpeft", ours), ("peft", theirs)):
        model.save_pretrained(tmp_path / lib)
        trained = _logits(model, inputs).detach()
        loaded = fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path / lib)
        assert_rel(_logits(loaded, inputs), trained, 1e-5, f"pissa adapter saved by {lib}")
        other = fastpeft.get_peft_model(_fresh(base), fastpeft.LoraConfig(r=2, target_modules=["k_proj"]))
        other.load_adapter(tmp_path / lib, "pissa")
        other.set_adapter("pissa")
        assert_rel(_logits(other, inputs), trained, 1e-5, f"pissa adapter saved by {lib}, load_adapter")


def test_add_adapter_all_linear_covers_layers_another_adapter_wraps():
    ours, theirs, _, _ = _pair("llama", target_modules=["q_proj"])
    for model, lib in ((ours, fastpeft), (theirs, peft)):
        model.add_adapter("all", lib.LoraConfig(r=2, target_modules="ALL-LINEAR"))

    def wrapped(model):
        return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "all" in m.lora_A)

    assert wrapped(ours) == wrapped(theirs) and any(n.endswith("q_proj") for n in wrapped(ours))


def test_load_adapter_and_set_adapter_modes_like_peft(tmp_path):
    ours, theirs, inputs, _ = _pair("llama")
    ours.save_pretrained(tmp_path)
    for model in (ours, theirs):
        model.train()
        result = model.load_adapter(tmp_path, "other")
        assert not model.training and list(result.missing_keys) == [] and list(result.unexpected_keys) == []
        model.set_adapter("other")

    def trainable(model):
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    assert trainable(ours) == trainable(theirs) and any(".other." in n for n in trainable(ours))
    for model in (ours, theirs):
        model.set_adapter("default", inference_mode=True)
    assert trainable(ours) == trainable(theirs) == []
    for model in (ours, theirs):
        model.load_adapter(tmp_path, "third", is_trainable=True)
    assert trainable(ours) == trainable(theirs) and any(".third." in n for n in trainable(ours))
    # an existing name gets the file's weights (how transformers' Trainer resumes)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".default." in n:
                p.zero_()
    ours.load_adapter(tmp_path, "default", is_trainable=True)
    assert_rel(_logits(ours, inputs), _logits(theirs, inputs), 1e-5, "reloaded over an existing adapter")


def test_merge_and_unload_inside_disable_adapter_merges_like_peft():
    ours, theirs, inputs, _ = _pair("llama")
    with ours.disable_adapter():
        merged_ours = ours.merge_and_unload()
    with theirs.disable_adapter():
        merged_theirs = theirs.merge_and_unload()
    assert_rel(_logits(merged_ours, inputs), _logits(merged_theirs, inputs), 1e-5, "merged inside disable")


def test_set_adapter_refuses_two_modules_to_save_copies_like_peft():
    ours, _, _, _ = _pair("llama", modules_to_save=["lm_head"])
    ours.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        ours.base_model.set_adapter(["default", "other"])


def test_peft_methods_keep_working_after_from_peft(tmp_path):
    """On a peft model converted with from_peft, peft's own add_adapter / load_adapter / delete_adapter /
    set_adapter and forward(adapter_names=...) give what they give on the unconverted peft model; an
    eval-mode model stays in eval mode."""
    ours, theirs, inputs, base = _pair("llama")
    ours.save_pretrained(tmp_path)
    plain = peft.PeftModel.from_pretrained(_fresh(base), tmp_path).eval()
    conv = fastpeft.from_peft(peft.PeftModel.from_pretrained(_fresh(base), tmp_path).eval())
    assert not any(m.training for m in conv.modules() if isinstance(m, fastpeft.FastLoraLinear))
    x = inputs["input_ids"]
    with torch.no_grad():
        assert torch.equal(conv(input_ids=x).logits, conv(input_ids=x).logits)  # no dropout in eval
    for model in (plain, conv):
        torch.manual_seed(4)
        model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
        model.load_adapter(tmp_path, adapter_name="c")
    assert any(isinstance(m, fastpeft.FastLoraLinear) and "b" in m.lora_A for m in conv.modules())
    with torch.no_grad():
        for names in (["default", "b"], ["b", "__base__"], ["c", "default"]):
            assert_rel(conv(input_ids=x, adapter_names=names).logits,
                       plain(input_ids=x, adapter_names=names).logits, 1e-5, f"adapter_names={names}")
    for model in (plain, conv):
        model.set_adapter("b")
    assert sorted(n for n, p in conv.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in plain.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert_rel(conv(input_ids=x).logits, plain(input_ids=x).logits, 1e-5, "adapter b active")
    for model in (plain, conv):
        model.set_adapter("c")
        model.delete_adapter("b")
    with torch.no_grad():
        assert_rel(conv(input_ids=x).logits, plain(input_ids=x).logits, 1e-5, "after deleting b")


@pytest.mark.parametrize("name,targets", [("llama", "all-linear"), ("llama", None), ("gpt2", None)])
def test_saved_config_names_what_was_adapted_like_peft(tmp_path, name, targets):
    """target_modules None / "all-linear" are written resolved (peft's default names, the adapted modules'
    full names), and fan_in_fan_out is recorded for Conv1D targets, as peft writes them."""
    ours, theirs, _, _ = _pair(name, target_modules=targets)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(a["target_modules"]) == sorted(b["target_modules"])
    assert a["fan_in_fan_out"] == b["fan_in_fan_out"]


def test_peft_model_attributes_and_base_model_unload_like_peft():
    ours, theirs, inputs, _ = _pair("llama", modules_to_save=["lm_head"])
    assert ours.peft_type == str(theirs.peft_type.value) == "LORA"
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}
    merged_ours, merged_theirs = ours.base_model.merge_and_unload(), theirs.base_model.merge_and_unload()
    assert type(merged_ours) is type(merged_theirs)
    assert_rel(_logits(merged_ours, inputs), _logits(merged_theirs, inputs), 1e-5, "base_model.merge_and_unload")


def test_state_dict_functions_and_task_type_like_peft():
    """fastpeft.get_peft_model_state_dict / set_peft_model_state_dict / TaskType as peft's: same tensors under
    the same names, and a state dict taken from peft loads into fastpeft with peft's outputs."""
    ours, theirs, inputs, base = _pair("llama", task_type=fastpeft.TaskType.CAUSAL_LM, modules_to_save=["lm_head"])
    assert ours.peft_config["default"].task_type == peft.TaskType.CAUSAL_LM == "CAUSAL_LM"
    a, b = fastpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = fastpeft.get_peft_model(_fresh(base), fastpeft.LoraConfig.from_dict(ours.peft_config["default"].to_dict()))
    result = fastpeft.set_peft_model_state_dict(other, b)
    assert not result.missing_keys and not result.unexpected_keys
    assert_rel(_logits(other, inputs), _logits(theirs, inputs), 1e-5, "set_peft_model_state_dict")
    with pytest.raises(ValueError, match="lacks"):
        fastpeft.set_peft_model_state_dict(other, {k: v for k, v in b.items() if "q_proj" not in k})


def test_state_dict_functions_for_ia3_like_peft():
    torch.manual_seed(0)
    base = _llama()
    cfg = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    ours = fastpeft.get_peft_model(base, fastpeft.IA3Config(**cfg))
    theirs = peft.get_peft_model(_llama(), peft.IA3Config(**cfg))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    a, b = fastpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.zero_()
    fastpeft.set_peft_model_state_dict(ours, b)
    assert all(torch.equal(v, fastpeft.get_peft_model_state_dict(ours)[k]) for k, v in b.items())


def test_auto_peft_model_loads_base_and_adapter_like_peft(tmp_path):
    """AutoPeftModelForCausalLM.from_pretrained(adapter folder): the base named in adapter_config.json, then
    the adapter; the same logits as the trained model and as peft's AutoPeftModelForCausalLM."""
    ours, _, inputs, base = _pair("llama")
    _fresh(base).save_pretrained(tmp_path / "base")
    ours.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    ours.save_pretrained(tmp_path / "adapter")
    loaded = fastpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, fastpeft.PeftModel) and not loaded.training
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert_rel(_logits(loaded, inputs), _logits(ours, inputs), 1e-5, "AutoPeftModelForCausalLM")
    assert_rel(_logits(loaded, inputs), _logits(theirs, inputs), 1e-5, "vs peft's AutoPeftModelForCausalLM")
    ours.peft_config["default"].base_model_name_or_path = None
    ours.save_pretrained(tmp_path / "nameless")
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "nameless")


def test_model_and_layer_status_like_peft():
    ours, theirs, _, _ = _pair("llama", modules_to_save=["lm_head"])
    ours.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (ours, theirs):
        model.merge_adapter()
    a, b = fastpeft.get_model_status(ours), peft.get_model_status(theirs)
    for field in ("base_model_type", "adapter_model_type", "trainable_params", "total_params", "num_adapter_layers",
                  "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.peft_types == {"default": "LORA", "other": "LORA"}
    la, lb = fastpeft.get_layer_status(ours), peft.get_layer_status(theirs)
    assert [s.name for s in la] == [s.name for s in lb]
    for x, y in zip(la, lb):
        assert (x.enabled, x.active_adapters, x.merged_adapters, x.requires_grad, x.available_adapters) == \
            (y.enabled, y.active_adapters, y.merged_adapters, y.requires_grad, y.available_adapters), x.name


def test_model_status_of_a_model_holding_adapter_layers_like_peft():
    """Not a PeftModel: the transformers model inside one (and any other module holding it), as peft reports it;
    the 4-bit base's packed weights counted as peft counts them."""
    pytest.importorskip("bitsandbytes")
    ours, theirs, _, _ = _pair("llama")
    for module_a, module_b in ((ours.base_model.model, theirs.base_model.model),
                               (nn.Sequential(ours.base_model.model), nn.Sequential(theirs.base_model.model))):
        a, b = fastpeft.get_model_status(module_a), peft.get_model_status(module_b)
        for field in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                      "num_adapter_layers", "active_adapters", "available_adapters"):
            assert getattr(a, field) == getattr(b, field), field
    import bitsandbytes as bnb

    holder = nn.Sequential(nn.Linear(64, 32), bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4"))
    holder[1].weight = bnb.nn.Params4bit(holder[1].weight.data, requires_grad=False, quant_type="nf4")
    holder[1].weight.requires_grad_(False)
    holder[0] = fastpeft.FastLoraLinear.from_linear(holder[0], r=2)
    status = fastpeft.get_model_status(holder)
    assert (status.trainable_params, status.total_params) == peft.PeftModel.get_nb_trainable_parameters(holder)


def test_generate_passes_through():
    ours, theirs, inputs, _ = _pair("llama")
    ids = inputs["input_ids"][:1]
    out_a = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    out_b = theirs.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out_a.shape == (1, ids.shape[1] + 5)
    assert torch.equal(out_a, out_b)


def test_from_peft_and_to_peft_keep_everything(tmp_path):
    _, theirs, inputs, base = _pair("gpt2")
    theirs.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj"], init_lora_weights=False))
    ref = _logits(theirs, inputs).detach()
    params_before = {k: p for k, p in theirs.named_parameters()}
    out = fastpeft.from_peft(theirs)
    assert out is theirs
    layers = [m for m in theirs.modules() if isinstance(m, fastpeft.FastLoraLinear)]
    assert layers and all(m.fan_in_fan_out for m in layers)
    params_after = dict(theirs.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before), "parameters must be adopted, not copied"
    assert theirs.active_adapter == "default"
    assert_rel(_logits(theirs, inputs), ref, 1e-5, "converted")
    # peft's own model-level API keeps working on the converted model
    with theirs.disable_adapter():
        assert_rel(_logits(theirs, inputs), _logits(_fresh(base), inputs), 1e-6, "disabled")
    theirs.set_adapter("two")
    assert all(m.active_adapters == ["two"] for m in layers)
    ref_two = _logits(theirs, inputs).detach()
    theirs.set_adapter("default")
    theirs.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path)
    assert_rel(_logits(loaded, inputs), ref, 1e-5, "saved after conversion")
    fastpeft.to_peft(theirs)
    assert not any(isinstance(m, fastpeft.FastLoraLinear) for m in theirs.modules())
    assert_rel(_logits(theirs, inputs), ref, 1e-5, "back to peft")
    theirs.set_adapter("two")
    assert_rel(_logits(theirs, inputs), ref_two, 1e-5, "back to peft, second adapter")


def test_to_peft_from_fastpeft_model():
    ours, _, inputs, _ = _pair("bert")
    ref = _logits(ours, inputs).detach()
    back = fastpeft.to_peft(ours)
    assert type(back).__module__.startswith("peft")
    assert_rel(_logits(back, inputs), ref, 1e-5, "to_peft")


def test_trains_and_lowers_the_loss():
    ours, _, inputs, _ = _pair("llama")
    ids = inputs["input_ids"]
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(25):
        loss = ours(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, [round(v, 3) for v in losses]


# ----------------------------------------------------------------------------- configs and errors
def test_config_json_round_trip_keeps_unknown_fields(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM")
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["some_future_peft_field"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    ours = fastpeft.LoraConfig.from_pretrained(tmp_path)
    assert (ours.r, ours.lora_alpha, ours.target_modules, ours.task_type) == (4, 16, ["q_proj"], "CAUSAL_LM")
    ours.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["some_future_peft_field"] == {"x": 1}
    for key, value in data.items():
        if key not in ("target_modules",):
            assert again[key] == value, key
    assert peft.LoraConfig.from_pretrained(tmp_path / "again").r == 4


@pytest.mark.parametrize("field,value", [("use_qalora", True), ("megatron_config", {"tp": 2}),
                                         ("init_lora_weights", "corda")])
def test_unsupported_peft_options_are_refused(tmp_path, field, value):
    data = fastpeft.LoraConfig(target_modules=["q_proj"]).to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=field if field != "init_lora_weights" else "init_lora_weights"):
        fastpeft.LoraConfig.from_dict(data)


def test_peft_keywords_at_neutral_values_are_accepted_like_peft():
    """``LoraConfig(lora_bias=False, ...)`` as peft users write it: accepted (peft accepts it too), written
    back, and the same keywords with a feature switched on are refused naming it."""
    kw = dict(use_dora=False, lora_bias=False, layer_replication=None, target_parameters=None)
    peft.LoraConfig(r=4, target_modules=["q_proj"], **kw)  # the reference accepts them
    ours = fastpeft.LoraConfig(r=4, target_modules=["q_proj"], **kw)
    assert ours.r == 4 and all(ours.to_dict()[k] == v for k, v in kw.items())
    with pytest.raises(ValueError, match="use_qalora"):
        fastpeft.LoraConfig(r=4, use_qalora=True)
    with pytest.raises(TypeError, match="lora_alfa"):
        fastpeft.LoraConfig(r=4, lora_alfa=8)  # a typo still fails like a dataclass


def test_bad_configs():
    with pytest.raises(ValueError, match="positive integer"):
        fastpeft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        fastpeft.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.LoraConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match="peft_type"):
        fastpeft.LoraConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match=r"not found in the base model.*q_proj"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match=r"'model.norm' \(LlamaRMSNorm\) is not supported"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["norm"]))


def test_bad_adapter_files(tmp_path):
    ours, _, _, base = _pair("llama")
    ours.save_pretrained(tmp_path / "good")
    from safetensors.torch import load_file, save_file

    good = load_file(tmp_path / "good" / "adapter_model.safetensors")
    cfg = (tmp_path / "good" / "adapter_config.json").read_text()

    def write(name, tensors, pickle=False):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg)
        if pickle:
            torch.save(tensors, d / "adapter_model.bin")
        else:
            save_file(tensors, d / "adapter_model.safetensors")
        return d

    key = next(k for k in good if k.endswith("lora_A.weight"))
    missing = write("missing", {k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="lacks"):
        fastpeft.PeftModel.from_pretrained(_fresh(base), missing)
    extra = write("extra", {**good, "base_model.model.model.nothing.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="nothing"):
        fastpeft.PeftModel.from_pretrained(_fresh(base), extra)
    wrong = write("wrong", {**good, key: torch.zeros(3, good[key].shape[1])})
    with pytest.raises(ValueError, match=r"rank mismatch.*r=3"):
        fastpeft.PeftModel.from_pretrained(_fresh(base), wrong)
    pickled = write("pickled", good, pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        fastpeft.PeftModel.from_pretrained(_fresh(base), pickled)
    loaded = fastpeft.PeftModel.from_pretrained(_fresh(base), pickled, allow_pickle=True)
    assert torch.equal(loaded.state_dict()[key.replace("lora_A.weight", "lora_A.default.weight")], good[key])
    with pytest.raises(FileNotFoundError):
        fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path / "nowhere")


def test_bitsandbytes_4bit_model_matches_peft(tmp_path):
    """get_peft_model on a model whose linears are bitsandbytes Linear4bit (NF4): same logits, grads, files."""
    pytest.importorskip("bitsandbytes")
    from fastpeft.quant import quantize_model

    # rows of whole 64-blocks: bitsandbytes' native CPU dequantize is wrong for rows that split a block
    # (its pure-torch reference and fastpeft agree; see tests/test_quant.py), which would blur the comparison
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(cfg).state_dict()

    def quantized():
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(state)
        return quantize_model(m, quant_type="nf4", compute_dtype=torch.float32, backend="bitsandbytes")

    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(quantized(), fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(quantized(), peft.LoraConfig(**kw))
    assert any(type(m).__name__ == "FastLoraLinear4bit" for m in ours.modules())
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(3))
    ours.train(), theirs.train()
    la, lb = _logits(ours, {"input_ids": ids}), _logits(theirs, {"input_ids": ids})
    assert_rel(la, lb, 1e-4, "4-bit logits")
    la.square().mean().backward()
    lb.square().mean().backward()
    grads = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        if p.requires_grad:
            assert_rel(p.grad, grads[k].grad, 1e-3, f"4-bit grad {k}")
    ours.save_pretrained(tmp_path)
    # train mode (no dropout here): bitsandbytes' CPU eval path repacks the weight and computes differently
    loaded = peft.PeftModel.from_pretrained(quantized(), tmp_path).train()
    assert_rel(_logits(loaded, {"input_ids": ids}), _logits(ours, {"input_ids": ids}), 1e-4, "peft loads 4-bit")
    # from_peft on the peft + bitsandbytes model: fused 4-bit layers adopting the same Params4bit, same logits
    ref = _logits(theirs, {"input_ids": ids}).detach()
    weights = {id(p) for p in theirs.parameters()}
    fastpeft.from_peft(theirs)
    assert any(type(m).__name__ == "FastLoraLinear4bit" for m in theirs.modules())
    assert {id(p) for p in theirs.parameters()} == weights, "from_peft must adopt the parameters, not copy them"
    assert_rel(_logits(theirs, {"input_ids": ids}), ref, 1e-4, "from_peft on 4-bit")


def test_peft_bias_all_with_modules_to_save_loads(tmp_path):
    """peft saves a wrapped head's bias as '<head>.modules_to_save.bias' under bias="all"; fastpeft reads it."""
    kw = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all",
              init_lora_weights=False)
    _, theirs, inputs, base = _pair("bert", **{k: v for k, v in kw.items() if k not in ("r", "lora_alpha",
                                                                                       "init_lora_weights")})
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "classifier.modules_to_save" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(_fresh(base), tmp_path)
    assert_rel(_logits(loaded, inputs), _logits(theirs, inputs), 1e-5, "bias=all + modules_to_save from peft")


def test_from_peft_then_to_peft_keeps_inactive_adapters_off():
    _, theirs, inputs, _ = _pair("llama")
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                            init_lora_weights=False))
    ref = _logits(theirs, inputs).detach()
    fastpeft.from_peft(theirs)
    assert_rel(_logits(theirs, inputs), ref, 1e-5, "converted")
    fastpeft.to_peft(theirs)
    assert_rel(_logits(theirs, inputs), ref, 1e-5, "converted back: o_proj must not run adapter 'b'")


def test_to_peft_keeps_the_original_module_to_save():
    ours, _, inputs, _ = _pair("llama", modules_to_save=["lm_head"])
    with torch.no_grad():
        ours.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    ref = _logits(ours, inputs).detach()
    with ours.disable_adapter():
        ref_base = _logits(ours, inputs).detach()
    back = fastpeft.to_peft(ours)
    assert_rel(_logits(back, inputs), ref, 1e-5, "to_peft")
    with back.disable_adapter():
        assert_rel(_logits(back, inputs), ref_base, 1e-5, "to_peft keeps the original head")


def _tied_tiny():
    """A one-layer Llama whose lm_head is tied to its input embeddings."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def test_merging_into_a_tied_head_leaves_the_embeddings_alone(tmp_path):
    """lm_head tied to the input embeddings: the merged model (and its saved and reloaded copy) computes what the
    adapter model did, and the embeddings keep their weights (merging into the shared weight would change the
    input side too)."""
    ids = torch.randint(0, 64, (2, 6))
    config = fastpeft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    for how in ("merge_adapter", "merge_and_unload"):
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match=r"\['lm_head'\] share their weight with the input embeddings"):
            model = fastpeft.get_peft_model(_tied_tiny(), config)
        base = model.get_base_model()
        assert base.lm_head.base_layer.weight is base.model.embed_tokens.weight
        embeddings = base.model.embed_tokens.weight.detach().clone()
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            with pytest.warns(UserWarning, match="lm_head shared its weight with the input embeddings"):
                merged = getattr(model, how)()
            if how == "merge_adapter":
                assert_rel(model(input_ids=ids).logits, expected, 1e-5, "merged in place")
                model.unmerge_adapter()
                assert_rel(model(input_ids=ids).logits, expected, 1e-5, "unmerged")
            else:
                assert_rel(merged(input_ids=ids).logits, expected, 1e-5, "merge_and_unload")
                assert merged.config.tie_word_embeddings is False
                merged.save_pretrained(tmp_path / "merged")
                reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
                assert_rel(reloaded(input_ids=ids).logits, expected, 1e-5, "reloaded")
        assert torch.equal(base.model.embed_tokens.weight, embeddings)


def test_merging_a_trained_copy_of_a_tied_head_unties_the_config_like_peft(tmp_path):
    ids = torch.randint(0, 64, (2, 6))
    for lib in (fastpeft, peft):
        model = lib.get_peft_model(_tied_tiny(), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                              modules_to_save=["lm_head"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".modules_to_save." in name:
                    p.add_(0.1)  # the head's own copy trained away from the embeddings
            expected = model(input_ids=ids).logits
            merged = model.merge_and_unload()
            assert merged.config.tie_word_embeddings is False, lib.__name__
            merged.save_pretrained(tmp_path / lib.__name__)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / lib.__name__).eval()
            assert_rel(reloaded(input_ids=ids).logits, expected, 1e-5, lib.__name__)


def test_bias_options_with_several_adapters_like_peft():
    """``bias="lora_only"`` trains the base biases of the layers *its* adapter adapts (those its file saves), not
    of layers only another adapter wraps; a second adapter with a bias option is refused with peft's error (one
    without bias next to it is not)."""
    def trainable_biases(model):
        return sorted(n.replace("base_model.model.transformer.", "") for n, p in model.named_parameters()
                      if p.requires_grad and "bias" in n and "h.0." in n)

    first = dict(r=1, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)
    second = dict(r=1, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    got, files = [], []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(**first))
        model.add_adapter("other", lib.LoraConfig(**second))
        files.append(sorted(lib.get_peft_model_state_dict(model)))  # peft's file: every LoRA layer's base bias
        states = [trainable_biases(model)]
        for active in (["other", "default"], "other", "default"):
            model.base_model.set_adapter(active)
            states.append(trainable_biases(model))
        got.append(states)
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            model.add_adapter("third", lib.LoraConfig(r=1, target_modules=["c_fc"], bias="all", fan_in_fan_out=True))
        model.delete_adapter("default")
        model.add_adapter("third", lib.LoraConfig(r=1, target_modules=["c_fc"], bias="all", fan_in_fan_out=True))
    assert got[0] == got[1]
    assert got[0][0] == ["h.0.attn.c_attn.base_layer.bias"]
    assert files[0] == files[1] and any(".c_fc.base_layer.bias" in k for k in files[0])


def test_peft_lora_only_file_of_a_model_with_several_adapters_loads(tmp_path):
    """peft's ``bias="lora_only"`` file also holds the base biases of layers only another adapter wrapped
    (``<layer>.base_layer.bias``); loaded alone, those layers are not wrapped: the keys go to their own biases."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=1, target_modules=["c_proj"], bias="lora_only",
                                                              fan_in_fan_out=True, init_lora_weights=False))
    theirs.add_adapter("other", peft.LoraConfig(r=1, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("base_layer.bias"):  # (what the file holds)
                p.add_(0.5)
    theirs.save_pretrained(tmp_path)
    saved = peft.utils.load_peft_weights(tmp_path, device="cpu")
    assert any(".c_attn.base_layer.bias" in k for k in saved)  # the other adapter's layer
    torch.manual_seed(0)
    ours = fastpeft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    state = ours.state_dict()
    for key, value in saved.items():
        if ".c_attn.base_layer.bias" in key:
            assert torch.equal(state[key.replace(".base_layer.bias", ".bias")], value), key
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    theirs.base_model.set_adapter("default")
    with torch.no_grad():
        assert_rel(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, 1e-6, "logits")


@pytest.mark.parametrize("case", ["own copy", "another adapter's copy"])
def test_bias_all_with_modules_to_save_saves_and_trains_like_peft(case):
    """``bias="all"`` next to a modules_to_save wrapper: peft's file holds the original module's bias (in use while
    no active adapter has a copy there, and then trained) and the adapter's own copy once more as
    ``<module>.modules_to_save.bias``; fastpeft writes the same keys and trains the same biases."""
    if case == "own copy":
        configs = [dict(r=1, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"], fan_in_fan_out=True)]
    else:
        configs = [dict(r=1, target_modules=["c_attn"], modules_to_save=["ln_f"], fan_in_fan_out=True),
                   dict(r=1, target_modules=["c_proj"], bias="all", fan_in_fan_out=True)]
    got = []
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(**configs[0]))
        for i, kw in enumerate(configs[1:], 1):
            model.add_adapter(f"a{i}", lib.LoraConfig(**kw))
        model.base_model.set_adapter(list(model.peft_config)[-1])
        files = {a: sorted(lib.get_peft_model_state_dict(model, adapter_name=a)) for a in model.peft_config}
        got.append((files, sorted(n for n, p in model.named_parameters() if p.requires_grad and "ln_f" in n)))
    assert got[0] == got[1]
    assert any(k.endswith("ln_f.original_module.bias") for k in got[0][0][list(got[0][0])[-1]])


@pytest.mark.parametrize("method", ["ia3", "adalora", "ln_tuning", "trainable_tokens", "lora_with_tokens", "prompt"])
def test_status_of_the_other_methods_like_peft(method):
    """get_model_status / get_layer_status on IA3, AdaLoRA, LN tuning, trainable tokens (alone and inside LoRA):
    peft's fields; a prompt-learning model gets peft's TypeError."""
    from helpers import tiny_llama

    configs = {
        "ia3": lambda lib: lib.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "adalora": lambda lib: lib.AdaLoraConfig(target_modules=["q_proj"], total_step=10),
        "ln_tuning": lambda lib: lib.LNTuningConfig(),
        "trainable_tokens": lambda lib: lib.TrainableTokensConfig(token_indices=[1, 2]),
        "lora_with_tokens": lambda lib: lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]),
        "prompt": lambda lib: lib.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }
    ours = fastpeft.get_peft_model(tiny_llama(), configs[method](fastpeft))
    theirs = peft.get_peft_model(tiny_llama(), configs[method](peft))
    if method == "prompt":
        for fn in ("get_model_status", "get_layer_status"):
            with pytest.raises(TypeError, match="prefix tuning and adaption prompt are not supported"):
                getattr(ours, fn)()
        return
    a, b = ours.get_model_status(), theirs.get_model_status()
    for field in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                  "num_adapter_layers",
                  "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
        assert getattr(a, field) == getattr(b, field), field
    la, lb = ours.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in la] == [s.name for s in lb]
    for x, y in zip(la, lb):
        assert (x.enabled, x.active_adapters, x.merged_adapters, x.requires_grad, x.available_adapters) == \
            (y.enabled, y.active_adapters, y.merged_adapters, y.requires_grad, y.available_adapters), x.name
