"""peft 0.21.2's keyword arguments and signatures on the functions and classes users call by name, each checked
against peft itself: ``ignore_mismatched_sizes`` (``from_pretrained``, ``load_adapter``,
``set_peft_model_state_dict``), ``unwrap_compiled`` on ``get_peft_model_state_dict``, the constructors'
``low_cpu_mem_usage`` / ``peft_config`` / ``state_dict`` keywords, and ``inspect.signature(PeftModel)``."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import fastpeft
from helpers import task_factories

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

V = 96
IDS = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 6, 2]])
FACTORIES = task_factories(V)


def base(task="CAUSAL_LM", num_labels=2):
    torch.manual_seed(0)
    if task == "SEQ_CLS":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=0)
        return LlamaForSequenceClassification(cfg).eval()
    return FACTORIES[task]().eval()


def lora_of(model, prefix="lora_"):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if prefix in k}


def _saved_r8(tmp_path, task="CAUSAL_LM", **extra):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task, **extra)
    m = peft.get_peft_model(base(task), cfg)
    m.save_pretrained(tmp_path / "r8")
    return tmp_path / "r8", peft.get_peft_model_state_dict(m)


def test_from_pretrained_ignore_mismatched_sizes_skips_as_peft(tmp_path):
    """A rank-8 adapter loaded with a rank-4 config: peft keeps the rank-4 init where shapes differ and warns."""
    path, _ = _saved_r8(tmp_path)
    got = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(2)
        with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
            m = lib.PeftModel.from_pretrained(base(), path, config=lib.LoraConfig(r=4, target_modules=["q_proj",
                                                                                                   "v_proj"]),
                                              ignore_mismatched_sizes=True)
        got[lib] = m
    a = got[fastpeft].base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    b = got[peft].base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.shape == b.shape == (4, 32)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):  # without it: refused, naming the option
        fastpeft.PeftModel.from_pretrained(base(), path, config=fastpeft.LoraConfig(r=4, target_modules=["q_proj",
                                                                                                       "v_proj"]))


def test_classifier_head_of_other_size_is_skipped_and_lora_loaded(tmp_path):
    """The common case: an adapter trained with 2 labels onto a 3-label model; the LoRA factors load, the score
    head keeps its init (peft's result, key for key)."""
    path, saved = _saved_r8(tmp_path, task="SEQ_CLS")
    models = {}
    for lib in (peft, fastpeft):
        with pytest.warns(UserWarning, match="score"):
            models[lib] = lib.PeftModel.from_pretrained(base("SEQ_CLS", num_labels=3), path,
                                                        ignore_mismatched_sizes=True)
    ours, theirs = lora_of(models[fastpeft]), lora_of(models[peft])
    assert ours.keys() == theirs.keys() and ours
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    head = lambda m: m.base_model.model.score.modules_to_save["default"].weight  # noqa: E731
    assert head(models[fastpeft]).shape == (3, 32)
    torch.testing.assert_close(head(models[fastpeft]), head(models[peft]), rtol=0, atol=0)  # both: the base's


@pytest.mark.parametrize("where", ["set_state_dict", "load_adapter"])
def test_set_state_dict_and_load_adapter_take_ignore_mismatched_sizes(tmp_path, where):
    path, saved = _saved_r8(tmp_path)
    results = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(3)
        m = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
            if where == "set_state_dict":
                lib.set_peft_model_state_dict(m, saved, ignore_mismatched_sizes=True)
            else:
                m.load_adapter(path, "default", ignore_mismatched_sizes=True)
        results[lib] = lora_of(m)
    for k in results[peft]:
        torch.testing.assert_close(results[fastpeft][k], results[peft][k], rtol=0, atol=0)


def test_unknown_loading_keyword_warns(tmp_path):
    path, _ = _saved_r8(tmp_path)
    with pytest.warns(UserWarning, match="ignore_mismatched_size"):  # a misspelt keyword is not silently dropped
        fastpeft.PeftModel.from_pretrained(base(), path, ignore_mismatched_size=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's own keyword (passed on to load_adapter): no warning
        fastpeft.PeftModel.from_pretrained(base(), path, torch_device="cpu")


def test_get_peft_model_state_dict_unwrap_compiled_and_order():
    names = list(inspect.signature(peft.get_peft_model_state_dict).parameters)
    assert list(inspect.signature(fastpeft.get_peft_model_state_dict).parameters) == names
    names = list(inspect.signature(peft.set_peft_model_state_dict).parameters)
    assert list(inspect.signature(fastpeft.set_peft_model_state_dict).parameters) == names
    keys = {}
    for lib in (peft, fastpeft):
        m = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=["q_proj"]))
        compiled = torch.compile(m)  # no call: nothing is compiled, only wrapped
        keys[lib] = sorted(lib.get_peft_model_state_dict(compiled, unwrap_compiled=True))
        assert keys[lib] and not any("_orig_mod" in k for k in keys[lib])
    assert keys[fastpeft] == keys[peft]


def test_constructors_take_peft_keywords():
    cfg = lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")  # noqa: E731
    for lib in (peft, fastpeft):
        lib.PeftModel(base(), cfg(lib), low_cpu_mem_usage=False)
        lib.PeftModelForCausalLM(base(), cfg(lib), "default", low_cpu_mem_usage=False)
        lib.LoraModel(base(), peft_config=cfg(lib), adapter_name="default")
        lib.LoraModel(base(), cfg(lib), "default", low_cpu_mem_usage=False)
        lib.PeftModel(base(), lib.IA3Config(target_modules=["q_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]), low_cpu_mem_usage=False)
    with pytest.warns(UserWarning, match="low_cpu_mem_usage"):
        fastpeft.PeftModel(base(), cfg(fastpeft), low_cpu_mem_usage=True)
    ours = list(inspect.signature(fastpeft.PeftModel).parameters)
    assert ours == list(inspect.signature(peft.PeftModel).parameters)
    assert list(inspect.signature(fastpeft.LoraModel).parameters)[:5] == \
        list(inspect.signature(peft.LoraModel).parameters)[:5]


def test_lora_model_state_dict_injects_where_the_state_dict_says():
    """peft's ``LoraModel(model, config, name, state_dict=...)``: targets from the state dict's keys."""
    m = peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    sd = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(m).items()}
    mods = {}
    for lib in (peft, fastpeft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuner = lib.LoraModel(base(), lib.LoraConfig(r=4, target_modules=["q_proj"]), "default", state_dict=sd)
        mods[lib] = sorted(n for n, _ in tuner.named_modules() if n.endswith(("q_proj", "o_proj"))
                           and hasattr(_, "lora_A"))
    assert mods[fastpeft] == mods[peft] and any("o_proj" in n for n in mods[peft])


def test_config_from_pretrained_keywords_as_peft(tmp_path):
    path, _ = _saved_r8(tmp_path)
    (tmp_path / "outer").mkdir()
    import shutil

    shutil.copytree(path, tmp_path / "outer" / "sub")
    for lib in (peft, fastpeft):
        cfg = lib.LoraConfig.from_pretrained(pretrained_model_name_or_path=tmp_path / "outer", subfolder="sub")
        assert cfg.r == 8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fastpeft warns that the keyword lost
            cfg = lib.LoraConfig.from_pretrained(path, r=16)  # saved values win over keywords, as peft
        assert cfg.r == 8
    data = fastpeft.LoraConfig.from_json_file(path / "adapter_config.json")
    assert data == peft.LoraConfig.from_json_file(str(path / "adapter_config.json"))
    assert isinstance(data, dict) and data["r"] == 8
    with pytest.warns(UserWarning, match="ignores the keyword"):
        fastpeft.LoraConfig.from_pretrained(path, not_a_field=1)
    cfg = fastpeft.PeftConfig.from_peft_type(**data)
    assert isinstance(cfg, fastpeft.LoraConfig) and cfg.r == 8
    ia3 = fastpeft.LoraConfig.from_peft_type(peft_type="IA3", target_modules=["q_proj"], feedforward_modules=[])
    assert type(ia3).__name__ == "IA3Config"


def test_config_save_pretrained_auto_mapping_dict(tmp_path):
    for lib in (peft, fastpeft):
        lib.LoraConfig(r=4).save_pretrained(tmp_path / lib.__name__, auto_mapping_dict={"base_model_class": "X"})
        import json

        saved = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())
        assert saved["auto_mapping"] == {"base_model_class": "X"}
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="directory"):
        fastpeft.LoraConfig(r=4).save_pretrained(tmp_path / "file")


def test_disable_input_dtype_casting_on_a_bf16_base():
    """fastpeft's fused layers read x as given (no cast to the adapter's dtype), so the block changes nothing;
    the result equals peft's under its helper with autocast doing the casting."""
    from fastpeft.helpers import disable_input_dtype_casting

    model = fastpeft.get_peft_model(base().to(torch.bfloat16), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                                   init_lora_weights=False))
    before = model(IDS).logits
    with disable_input_dtype_casting(model):
        inside = model(IDS).logits
    torch.testing.assert_close(inside, before, rtol=0, atol=0)
    assert "disable_input_dtype_casting" in fastpeft.helpers.__all__
