"""A sweep over transformers' decoder architectures (tiny random configs): fastpeft's LoRA against peft's on each —
the adapted layers (state-dict keys and saved config), outputs, gradients, greedy generation, files loaded by
peft, and merge_and_unload. The transformers-5 MoE models go through peft's rewrite of v4 layer names into
``target_parameters`` (fastpeft.moe_v5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

_C = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": _C, "mistral": _C, "qwen2": _C, "qwen3": dict(_C, head_dim=8), "gemma": dict(_C, head_dim=8),
    "gemma2": dict(_C, head_dim=8), "gemma3_text": dict(_C, head_dim=8, sliding_window=16), "phi3": _C, "phi": _C,
    "stablelm": _C, "starcoder2": _C, "olmo2": _C, "cohere": _C, "granite": _C, "smollm3": _C,
    "glm4": dict(_C, head_dim=8), "ernie4_5": _C, "exaone4": _C, "seed_oss": dict(_C, head_dim=8),
    "gpt2": _GPT, "gpt_bigcode": _GPT, "gpt_neox": _C,
    "falcon": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bloom": dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2),
    "mixtral": dict(_C, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_C, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1),
    "deepseek_v3": dict(_C, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
    "granitemoe": dict(_C, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(_C, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
}
IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 8]])


def _base(model_type: str) -> torch.nn.Module:
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = transformers.AutoConfig.for_model(model_type, **ARCHS[model_type])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _both(base, **kw):
    kw = {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", "init_lora_weights": False, **kw}
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib in (peft, fastpeft):
            torch.manual_seed(1)
            models.append(lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw)))
    return models


def _config_fields(model) -> tuple:
    c = model.peft_config["default"]
    return (sorted(c.target_modules) if not isinstance(c.target_modules, str) else c.target_modules,
            sorted(c.target_parameters or ()), dict(c.rank_pattern or {}), dict(c.alpha_pattern or {}))


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_all_linear_matches_peft(model_type, tmp_path):
    base = _base(model_type)
    p, f = _both(base, target_modules="all-linear")
    assert set(f.state_dict()) == set(p.state_dict())
    assert _config_fields(f) == _config_fields(p)
    for key, value in p.state_dict().items():  # the same draws under the same seed
        torch.testing.assert_close(f.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    yp, yf = p(input_ids=IDS, labels=IDS), f(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(yf.logits, yp.logits, rtol=1e-5, atol=1e-5)
    yp.loss.backward()
    yf.loss.backward()
    ours = dict(f.named_parameters())
    for name, param in p.named_parameters():
        if param.requires_grad:
            assert ours[name].requires_grad, name
            torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert torch.equal(f.generate(input_ids=IDS, max_new_tokens=4, do_sample=False),
                           p.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))
        f.save_pretrained(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, yp.logits, rtol=1e-5, atol=1e-5)
        merged = f.merge_and_unload()(input_ids=IDS).logits
        torch.testing.assert_close(merged, yf.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_v4_moe_layer_names_become_expert_parameters_as_in_peft(model_type):
    """A config naming transformers 4's expert layers (and the router) targets transformers 5's stacked expert
    parameters, the fused gate/up pair at twice the rank and alpha: peft's rewrite, field for field."""
    base = _base(model_type)
    names = ["w1", "w2", "w3", "gate", "q_proj"] if model_type == "mixtral" else \
        ["gate_proj", "up_proj", "down_proj", "gate", "o_proj"]
    p, f = _both(base, target_modules=names)
    assert _config_fields(f) == _config_fields(p)
    assert "gate_up_proj" in _config_fields(f)[1]
    assert set(f.state_dict()) == set(p.state_dict())
    f.load_state_dict(p.state_dict())
    torch.testing.assert_close(f(input_ids=IDS).logits, p(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    half = names[:1]  # one of a fused pair alone
    with pytest.raises(ValueError, match="fused into gate_up_proj"):
        fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=half))
    with pytest.raises(ValueError, match="fused into gate_up_proj"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=half))


def test_configs_of_other_models_and_without_v4_names_stay_as_written():
    base = _base("qwen3_moe")
    _, f = _both(base, target_modules=r".*\.layers\.0\.self_attn\.q_proj")
    assert f.peft_config["default"].target_modules == r".*\.layers\.0\.self_attn\.q_proj"
    assert [n for n, m in f.named_modules() if type(m).__name__ == "FastLoraLinear"] == \
        ["base_model.model.model.layers.0.self_attn.q_proj"]
    _, f = _both(_base("llama"), target_modules=["gate_proj", "up_proj"])
    assert _config_fields(f)[:2] == (["gate_proj", "up_proj"], [])


def _v4_adapter(path, model_type: str, r: int = 2, base=None) -> None:
    """An adapter file as peft saved it for transformers 4's layout of ``model_type`` (one linear per expert
    projection, a linear router): q_proj, the experts and the router, random factors; with ``base``, also the
    linear layers of ``base`` with expert-projection names outside the experts (a dense MLP, shared experts)."""
    import json

    from safetensors.torch import save_file

    block, projections = ("block_sparse_moe", {"w1": "up", "w3": "up", "w2": "down"}) if model_type == "mixtral" \
        else ("mlp", {"gate_proj": "up", "up_proj": "up", "down_proj": "down"})
    config = ARCHS[model_type]
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size", config["intermediate_size"])
    experts = config.get("num_local_experts", config.get("num_experts", config.get("n_routed_experts")))
    g = torch.Generator().manual_seed(3)
    state = {}
    prefix = "base_model.model.model.layers"
    moe_layers = range(config.get("first_k_dense_replace", 0), config["num_hidden_layers"])
    for layer in range(config["num_hidden_layers"]):
        state[f"{prefix}.{layer}.self_attn.o_proj.lora_A.weight"] = torch.randn(r, 32, generator=g)
        state[f"{prefix}.{layer}.self_attn.o_proj.lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.1
        if layer not in moe_layers:
            continue
        state[f"{prefix}.{layer}.{block}.gate.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        state[f"{prefix}.{layer}.{block}.gate.lora_B.weight"] = torch.randn(experts, r, generator=g) * 0.1
        for e in range(experts):
            for name, kind in projections.items():
                fin, fout = (hidden, inter) if kind == "up" else (inter, hidden)
                key = f"{prefix}.{layer}.{block}.experts.{e}.{name}"
                state[f"{key}.lora_A.weight"] = torch.randn(r, fin, generator=g)
                state[f"{key}.lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.1
    for name, module in (base.named_modules() if base is not None else ()):
        if name.rsplit(".", 1)[-1] in projections and isinstance(module, torch.nn.Linear):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=g)
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=g)
    path.mkdir()
    save_file(state, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": ["o_proj", "gate", *projections], "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_transformers_4_moe_adapter_files_load_as_in_peft(model_type, tmp_path):
    """An adapter trained on transformers 4's per-expert layers loads onto the transformers-5 model as peft loads
    it: the experts' factors stacked into the expert-parameter adapters (gate/up fused at rank 2r), the router's
    moved to the v5 block; the same logits as peft's, and not the base's. DeepSeek-V3's dense first layer and
    shared experts have layers of the same names: their factors are left out with a warning (peft drops them)."""
    base = _base(model_type)
    dense = model_type == "deepseek_v3"
    _v4_adapter(tmp_path / "v4", model_type, base=base if dense else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v4").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v4").eval()
    assert any("outside the MoE experts" in str(w.message) for w in caught) == dense
    with torch.no_grad():
        want, got, plain = p(input_ids=IDS).logits, f(input_ids=IDS).logits, base(input_ids=IDS).logits
        with f.disable_adapter():
            assert torch.allclose(f(input_ids=IDS).logits, plain)
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _config_fields(f) == _config_fields(p)


def test_regex_with_excluded_experts_leaves_them_alone_as_in_peft():
    base = _base("qwen3_moe")
    p, f = _both(base, target_modules=r".*\.(gate_proj|up_proj|q_proj)", exclude_modules=r".*experts.*")
    assert set(f.state_dict()) == set(p.state_dict())
    assert not _config_fields(f)[1] and not any("experts.lora_A" in k for k in f.state_dict())
