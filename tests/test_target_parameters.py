"""LoRA on ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``) against peft's ``lora.ParamWrapper``, on tiny
transformers MoE models whose experts are 3-D parameters: Qwen3-MoE (``(experts, out, in)``) and GPT-OSS
(``is_transposed``: ``(experts, in, out)``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastpeft
from helpers import assert_rel, tiny_qwen3_moe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 64
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXP = "base_model.model.model.layers.0.mlp.experts"


def _qwen3_moe():
    return tiny_qwen3_moe(V)


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=32, sliding_window=8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(cfg).eval()


MODELS = {"qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss}


def _pair(build=_qwen3_moe, **overrides):
    """(fastpeft model, peft model, input ids), each built from the same seed (so the same adapter init)."""
    kw = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"], target_parameters=EXPERTS)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_ours, base_theirs = build(), build()
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(base_ours, fastpeft.LoraConfig(**kw))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(base_theirs, peft.LoraConfig(**kw))
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    return ours, theirs, ids


def _logits(model, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits


def _assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("init", [True, False, "gaussian"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_names_shapes_init_and_trainable_counts_like_peft(model, init):
    ours, theirs, _ = _pair(MODELS[model], init_lora_weights=init)
    _assert_same_state(ours, theirs)  # same keys, order, shapes and (same seed) the same initial values
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    assert ours.base_model.targeted_parameter_names == theirs.base_model.targeted_parameter_names
    assert ours.base_model.targeted_module_names == theirs.base_model.targeted_module_names
    assert ours.get_submodule(EXP).parameter_name == theirs.get_submodule(EXP).parameter_name


@pytest.mark.parametrize("targets", [["q_proj"], []])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_logits_and_grads_equal_peft(model, targets):
    ours, theirs, ids = _pair(MODELS[model], target_modules=targets)
    ours.train(), theirs.train()
    lo, lt = _logits(ours, ids), _logits(theirs, ids)
    assert_rel(lo, lt, 1e-6, "logits")
    lo.square().mean().backward()
    lt.square().mean().backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert list(grads_o) == list(grads_t) and any("experts" in n for n in grads_o)
    for name, grad in grads_o.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_rel(grad, grads_t[name], 1e-5, name)
    with ours.disable_adapter():  # the adapter changes the logits at all
        assert (lo - _logits(ours, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("model", sorted(MODELS))
def test_disable_merge_unmerge_and_merge_and_unload_like_peft(model):
    ours, theirs, ids = _pair(MODELS[model])
    plain = _logits(MODELS[model](), ids)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(_logits(ours, ids), plain)
        assert torch.equal(_logits(theirs, ids), plain)
    adapted = _logits(ours, ids)
    experts = ours.get_submodule(EXP).get_base_layer()
    before = experts.down_proj.detach().clone()
    ours.base_model.merge_adapter()
    theirs.base_model.merge_adapter()
    assert ours.get_submodule(EXP).merged
    assert_rel(experts.down_proj, theirs.get_submodule(EXP).get_base_layer().down_proj, 1e-6, "merged down_proj")
    assert_rel(_logits(ours, ids), adapted, 1e-5, "merged logits")
    ours.base_model.unmerge_adapter()
    assert_rel(experts.down_proj, before, 1e-6, "unmerged down_proj")
    assert_rel(_logits(ours, ids), adapted, 1e-6, "unmerged logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_o = ours.merge_and_unload()
        merged_t = theirs.merge_and_unload()
    assert type(merged_o.model.layers[0].mlp.experts) is type(merged_t.model.layers[0].mlp.experts)
    assert list(merged_o.state_dict()) == list(merged_t.state_dict())
    for key, value in merged_o.state_dict().items():
        assert_rel(value, merged_t.state_dict()[key], 1e-6, key)
    assert_rel(_logits(merged_o, ids), adapted, 1e-5, "merge_and_unload logits")


def test_safe_merge_refuses_nan_and_unload_gives_the_base_back():
    ours, _, ids = _pair(target_modules=[])
    with torch.no_grad():
        ours.get_submodule(EXP).lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.base_model.merge_adapter(safe_merge=True)
    plain = _logits(_qwen3_moe(), ids)
    base = ours.unload()
    assert type(base.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert torch.equal(_logits(base, ids), plain)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_save_and_load_both_ways(model, tmp_path):
    from safetensors.torch import load_file

    ours, theirs, ids = _pair(MODELS[model])
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved_o = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    saved_t = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(saved_o) == sorted(saved_t) and any(".base_layer.lora_A.weight" in k for k in saved_o)
    for key in saved_o:
        assert torch.equal(saved_o[key], saved_t[key]), key
    cfg_o = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_t = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("target_modules", "r", "lora_alpha", "peft_type"):
        assert cfg_o[field] == cfg_t[field], field
    # peft turns target_parameters into a set while injecting and writes it in the set's (hash) order;
    # fastpeft keeps the order it was given
    assert cfg_o["target_parameters"] == EXPERTS and sorted(cfg_t["target_parameters"]) == sorted(EXPERTS)
    expected = _logits(ours, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(MODELS[model](), tmp_path / "ours").eval()
        ours_loaded = fastpeft.PeftModel.from_pretrained(MODELS[model](), tmp_path / "theirs").eval()
    assert sorted(ours_loaded.peft_config["default"].target_parameters) == sorted(EXPERTS)
    assert_rel(_logits(peft_loaded, ids), expected, 1e-6, "peft loads fastpeft's adapter")
    assert_rel(_logits(ours_loaded, ids), expected, 1e-6, "fastpeft loads peft's adapter")


def test_several_adapters_like_peft():
    ours, theirs, ids = _pair()
    for model, lib in ((ours, fastpeft), (theirs, peft)):
        torch.manual_seed(3)
        model.add_adapter("other", lib.LoraConfig(r=3, lora_alpha=3, init_lora_weights=False,
                                                  target_modules=["q_proj"], target_parameters=EXPERTS))
    _assert_same_state(ours, theirs)  # the second adapter joins the existing wrappers (no further nesting)
    for names in (["other"], ["default", "other"]):
        ours.base_model.set_adapter(names)
        theirs.base_model.set_adapter(names)
        assert_rel(_logits(ours, ids), _logits(theirs, ids), 1e-6, f"active {names}")
    for model, lib in ((ours, fastpeft), (theirs, peft)):  # peft's rule: every adapter targets the same parameters
        with pytest.raises(ValueError, match="must target the same set of parameters"):
            model.add_adapter("third", lib.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS[:1]))
    ours.delete_adapter("other")
    theirs.delete_adapter("other")
    _assert_same_state(ours, theirs)


def test_two_d_parameters_rank_pattern_and_no_target_modules_like_peft(tmp_path):
    """2-D parameters (the router weight, a linear layer's weight) are adapted like ``nn.Linear``; rank_pattern
    applies on the parameter's key; ``target_modules=None`` on a model type without defaults targets only the
    parameters and stays None in the saved config."""
    targets = ["mlp.gate.weight", "self_attn.o_proj.weight", *EXPERTS]
    ours, theirs, ids = _pair(target_modules=None, target_parameters=targets,
                              rank_pattern={"layers.1.mlp.experts.down_proj": 5})
    _assert_same_state(ours, theirs)
    assert ours.get_submodule("base_model.model.model.layers.1.mlp.experts").r["default"] == 5
    assert_rel(_logits(ours, ids), _logits(theirs, ids), 1e-6, "logits")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert saved[0]["target_modules"] == saved[1]["target_modules"] == []
    assert saved[0]["target_parameters"] == targets and sorted(saved[1]["target_parameters"]) == sorted(targets)


def test_what_peft_refuses_is_refused():
    cases = [
        (dict(lora_dropout=0.1), "lora_dropout"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(use_dora=True), "use_dora"),
        (dict(target_modules=[], fan_in_fan_out=True), "fan_in_fan_out"),
    ]
    for overrides, match in cases:
        for lib in (fastpeft, peft):
            kw = dict(target_modules=["q_proj"], target_parameters=EXPERTS)
            kw.update(overrides)
            with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
                warnings.simplefilter("ignore")
                lib.get_peft_model(_qwen3_moe(), lib.LoraConfig(**kw))
    for lib in (fastpeft, peft):
        with pytest.raises(TypeError, match="list of strings"):
            lib.LoraConfig(target_parameters="mlp.experts.down_proj")
        # a module targeted both ways
        with pytest.raises(ValueError, match="not a valid target"):
            lib.get_peft_model(_qwen3_moe(), lib.LoraConfig(target_modules=["q_proj"],
                                                            target_parameters=["q_proj.weight"]))
        with pytest.raises(ValueError, match="no `target_parameters` found"):
            lib.get_peft_model(_qwen3_moe(), lib.LoraConfig(target_modules=[], target_parameters=["nothing"]))
    for lib in (fastpeft, peft):  # fan_in_fan_out is dropped on the linear layers first (with a warning)
        with pytest.warns(UserWarning, match="fan_in_fan_out"):
            lib.get_peft_model(_qwen3_moe(), lib.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS,
                                                            fan_in_fan_out=True))
    with pytest.raises(TypeError, match="list of non-empty strings"):
        fastpeft.LoraConfig(target_parameters=[3])
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):  # fastpeft leaves this init out
        fastpeft.get_peft_model(_qwen3_moe(), fastpeft.LoraConfig(target_modules=[], target_parameters=EXPERTS,
                                                                  init_lora_weights="pissa"))


def test_mixed_batches_and_weighted_adapters_are_refused_like_peft():
    ours, theirs, ids = _pair()
    for model in (ours.eval(), theirs.eval()):
        with pytest.raises(ValueError, match="mixed"):
            model(input_ids=ids, adapter_names=["default"] * 3)
        with pytest.raises(ValueError, match="does not support targeting nn.Parameter"):
            model.add_weighted_adapter(["default"], [1.0], "merged", combination_type="linear")
    with pytest.raises(ValueError, match="mixed adapter batches"):  # the layer itself too
        ours.get_submodule(EXP)(torch.zeros(1, 16), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                                adapter_names=["default"])


def test_target_parameters_written_and_read_back_by_the_config(tmp_path):
    config = fastpeft.LoraConfig(target_modules=[], target_parameters=tuple(EXPERTS))
    assert config.target_parameters == EXPERTS
    config.save_pretrained(tmp_path)
    assert fastpeft.LoraConfig.from_pretrained(tmp_path).target_parameters == EXPERTS
    assert peft.LoraConfig.from_pretrained(tmp_path).target_parameters == EXPERTS


def test_from_peft_keeps_param_wrappers_and_to_peft_carries_them():
    ours, theirs, ids = _pair(target_parameters=[*EXPERTS, "self_attn.o_proj.weight"])
    expected = _logits(theirs, ids)
    with pytest.warns(UserWarning, match="ParamWrapper"):
        fastpeft.from_peft(theirs)
    assert type(theirs.get_submodule(EXP)).__name__ == "ParamWrapper"  # not taken for a linear layer
    assert type(theirs.get_submodule("base_model.model.model.layers.0.self_attn.o_proj")).__name__ == "ParamWrapper"
    assert_rel(_logits(theirs, ids), expected, 1e-6, "after from_peft")
    expected = _logits(ours, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = fastpeft.to_peft(ours)
    assert type(converted.get_submodule(EXP)).__name__ == "ParamWrapper"
    assert_rel(_logits(converted, ids), expected, 1e-6, "after to_peft")


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_adapter_dtype_init_and_logits_like_peft(autocast):
    """bf16 experts: the adapters are fp32 (autocast_adapter_dtype=True, peft's default, holding peft's
    bf16-rounded init) or bf16; state and logits equal peft's."""
    kw = dict(r=2, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_qwen3_moe().to(torch.bfloat16), fastpeft.LoraConfig(**kw),
                                       autocast_adapter_dtype=autocast)
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_qwen3_moe().to(torch.bfloat16), peft.LoraConfig(**kw),
                                     autocast_adapter_dtype=autocast)
    assert ours.get_submodule(EXP).lora_A["default"].weight.dtype == (torch.float32 if autocast else torch.bfloat16)
    _assert_same_state(ours, theirs)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
