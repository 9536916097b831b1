"""quantize_model's 4-bit workflow against transformers 5.24 / bitsandbytes 0.50.2 / peft 0.21.2 themselves: which
modules stay in full precision (the output head, tied weights, the last module, ``_keep_in_fp32_modules``), GPT-2's
Conv1D, QLoRA sequence classification, models built on the meta device, save_pretrained / from_pretrained and
dequantize."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.quant import Linear4bit, dequantize_int4, quantize_model

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 6, 2]])


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _llama_cfg(**kw):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, pad_token_id=0, **kw)


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def _bnb_load(auto_cls, path, **bnb_kw):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, **bnb_kw)
    return auto_cls.from_pretrained(path, quantization_config=config, device_map="cpu")


def _quantized_names(model):
    return {n for n, m in model.named_modules() if fastpeft.quant.is_linear4bit(m)}


def _full_linears(model):
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


def _logits(model, ids=IDS):
    model.train()  # bitsandbytes' exact path (its CPU eval path repacks to a bf16 absmax)
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- what stays in full precision
def _seq_cls():
    return transformers.LlamaForSequenceClassification(_llama_cfg(num_labels=3))


def _causal_untied():
    return transformers.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=False))


def _causal_tied():
    return transformers.LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


MODELS = {"seq_cls": (_seq_cls, "AutoModelForSequenceClassification"),
          "causal_untied": (_causal_untied, "AutoModelForCausalLM"),
          "causal_tied": (_causal_tied, "AutoModelForCausalLM"),
          "t5": (_t5, "AutoModelForSeq2SeqLM"),
          "gpt2": (_gpt2, "AutoModelForCausalLM")}


@pytest.mark.parametrize("kind", list(MODELS))
def test_quantize_model_quantizes_what_transformers_quantizes(kind, tmp_path):
    """The same modules become 4-bit as with transformers' BitsAndBytesConfig(load_in_4bit=True) loading — the
    score head of *ForSequenceClassification (the last module), T5's _keep_in_fp32_modules ('wo'), tied and
    output embeddings stay nn.Linear; GPT-2's Conv1D layers are quantized — with the same state-dict keys, shapes
    and (fp4, no double quantization) bytes."""
    build, auto = MODELS[kind]
    torch.manual_seed(0)
    path = _save(build(), tmp_path / kind)
    ref = _bnb_load(getattr(transformers, auto), path, bnb_4bit_quant_type="fp4")
    ours = quantize_model(getattr(transformers, auto).from_pretrained(path), quant_type="fp4",
                          compress_statistics=False, progressbar=False)
    assert _quantized_names(ours) == _quantized_names(ref) and _quantized_names(ours)
    assert _full_linears(ours) == _full_linears(ref)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key, value in sd_ref.items():
        assert torch.equal(sd_ours[key], value), key
    assert ours.get_memory_footprint() == ref.get_memory_footprint()
    if kind == "gpt2":  # Conv1D's (in, out) weight transposed to (out, in), as transformers does
        layer = ours.transformer.h[0].attn.c_attn
        assert isinstance(layer, Linear4bit) and (layer.out_features, layer.in_features) == (192, 64)
        assert layer.source_cls is transformers.pytorch_utils.Conv1D
        torch.testing.assert_close(_logits(ours), _logits(ref), atol=0, rtol=0)


def test_skip_modules_add_to_the_automatic_list():
    torch.manual_seed(0)
    model = quantize_model(_seq_cls(), skip_modules=("mlp.down_proj",), progressbar=False)
    assert _full_linears(model) == {"score", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_quantize_model_warns_when_nothing_is_quantized():
    """A model with nothing to quantize (here every Linear skipped) warns and is not marked 4-bit."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no nn.Linear or Conv1D layer to quantize"):
        quantize_model(model, progressbar=False)
    assert not getattr(model, "is_loaded_in_4bit", False)
    with pytest.warns(UserWarning, match="no nn.Linear or Conv1D layer to quantize"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), skip_modules=("0",), progressbar=False)


# --------------------------------------------------------------------------- QLoRA on those models, against peft
def test_qlora_seq_cls_matches_peft(tmp_path):
    """quantize_model + get_peft_model(LoraConfig(task_type="SEQ_CLS")) trains the fp32 score head through
    modules_to_save and gives peft's logits, as peft on a transformers-quantized model."""
    torch.manual_seed(0)
    path = _save(_seq_cls(), tmp_path / "cls")
    auto = transformers.AutoModelForSequenceClassification
    ref = peft.prepare_model_for_kbit_training(_bnb_load(auto, path, bnb_4bit_quant_type="fp4"))
    ours = fastpeft.prepare_model_for_kbit_training(
        quantize_model(auto.from_pretrained(path), quant_type="fp4", compress_statistics=False, progressbar=False))
    kw = dict(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    ref = peft.get_peft_model(ref, peft.LoraConfig(**kw))
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**kw))

    def trainable(model):
        return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad}

    assert trainable(ours) == trainable(ref)
    assert trainable(ours)["base_model.model.score.modules_to_save.default.weight"] == ((3, 64), torch.float32)
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lora_kw", [{}, {"target_modules": ["c_attn", "c_proj"]},
                                     {"target_modules": ["c_fc"], "fan_in_fan_out": True}])
def test_qlora_gpt2_matches_peft(lora_kw, tmp_path):
    """GPT-2 quantized by quantize_model, then fastpeft.get_peft_model, is peft on a transformers-quantized
    GPT-2: the same targets (default c_attn), fan_in_fan_out as configured with no Conv1D warning (the bases are
    4-bit linears now), the same adapter shapes and logits."""
    torch.manual_seed(0)
    path = _save(_gpt2(), tmp_path / "gpt2")
    auto = transformers.AutoModelForCausalLM
    ref = _bnb_load(auto, path, bnb_4bit_quant_type="fp4")
    ours = quantize_model(auto.from_pretrained(path), quant_type="fp4", compress_statistics=False, progressbar=False)
    kw = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False, **lora_kw)
    with warnings.catch_warnings(record=True) as caught_ref:
        warnings.simplefilter("always")
        ref = peft.get_peft_model(ref, peft.LoraConfig(**kw))
    with warnings.catch_warnings(record=True) as caught_ours:
        warnings.simplefilter("always")
        ours = fastpeft.get_peft_model(ours, fastpeft.LoraConfig(**kw))

    def fan(caught):
        return [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]

    assert fan(caught_ours) == fan(caught_ref) == []
    assert ours.peft_config["default"].fan_in_fan_out == ref.peft_config["default"].fan_in_fan_out
    sd_ref = peft.get_peft_model_state_dict(ref)
    sd_ours = fastpeft.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in sd_ours.items()} == {k: v.shape for k, v in sd_ref.items()}
    fastpeft.set_peft_model_state_dict(ours, sd_ref)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- the meta device
def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_meta_model_load_state_dict_assign(quant_type):
    """A model quantized on the meta device takes a 4-bit checkpoint with load_state_dict(assign=True): the
    statistics land on the checkpoint's device with the weight, and the output is the source model's."""
    torch.manual_seed(0)
    src = quantize_model(_mlp(), quant_type=quant_type, progressbar=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = src(x)
    with torch.device("meta"):
        model = _mlp()
    model = quantize_model(model, quant_type=quant_type, progressbar=False)
    result = model.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    for layer in (model[0], model[2]):
        stats = [layer.quant_state.absmax, layer.quant_state.code]
        assert all(t.device.type == "cpu" for t in [layer.weight, *stats])
        assert layer.weight.quant_state is layer.quant_state
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False), ("int4", False)])
def test_meta_model_to_empty_then_load(quant_type, nested):
    """to_empty(device=...) materializes a model quantized on meta (as bitsandbytes' Linear4bit on meta); a
    checkpoint then loads into it."""
    torch.manual_seed(0)
    src = quantize_model(_mlp(), quant_type=quant_type, compress_statistics=nested, progressbar=False)
    with torch.device("meta"):
        model = _mlp()
    model = quantize_model(model, quant_type=quant_type, compress_statistics=nested, progressbar=False)
    model.to_empty(device="cpu")
    tensors = [t for layer in (model[0], model[2]) for t in (layer.weight, layer.quant_state.absmax)]
    if nested:
        tensors += [model[0].quant_state.offset, model[0].quant_state.state2.absmax]
    assert all(t.device.type == "cpu" for t in tensors)
    model.load_state_dict(src.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=0, rtol=0)


# --------------------------------------------------------------------------- save_pretrained / from_pretrained
BNB_SETTINGS = [dict(quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16),
                dict(quant_type="fp4", compress_statistics=False, compute_dtype=None),
                dict(quant_type="nf4", compress_statistics=False, compute_dtype=torch.float16)]


def _bnb_config(quant_type, compress_statistics, compute_dtype, skip=None):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=compress_statistics,
                                           bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


@pytest.mark.parametrize("settings", BNB_SETTINGS, ids=lambda s: f"{s['quant_type']}-{s['compute_dtype']}")
def test_save_pretrained_reloads_with_transformers(settings, tmp_path):
    """save_pretrained of a quantize_model model writes the quantization_config transformers writes for the same
    BitsAndBytesConfig, and AutoModelForCausalLM.from_pretrained (bitsandbytes, CPU) reloads it: 4-bit layers
    where ours are, the same bytes and logits."""
    torch.manual_seed(0)
    src = _save(_causal_untied(), tmp_path / "src")
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(src, quantization_config=_bnb_config(**settings), device_map="cpu")
    ours = quantize_model(auto.from_pretrained(src), progressbar=False, **settings)
    qc_ref = json.load(open(_save(ref, tmp_path / "ref") + "/config.json"))["quantization_config"]
    qc_ours = json.load(open(_save(ours, tmp_path / "ours") + "/config.json"))["quantization_config"]
    assert qc_ours == qc_ref
    back = auto.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert _quantized_names(back) == _quantized_names(ours)
    sd_back, sd_ours = back.state_dict(), ours.state_dict()
    assert list(sd_back) == list(sd_ours)
    assert all(torch.equal(sd_back[k], v) for k, v in sd_ours.items())
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=1e-5)


def test_save_pretrained_with_extra_skip_modules(tmp_path):
    """Extra skip_modules are written as llm_int8_skip_modules (with the automatic ones, which transformers
    drops when the list is given), so the reload keeps the same modules in full precision."""
    torch.manual_seed(0)
    src = _save(_causal_untied(), tmp_path / "src")
    auto = transformers.AutoModelForCausalLM
    ours = quantize_model(auto.from_pretrained(src), skip_modules=("lm_head", "down_proj"), progressbar=False)
    skip = ["down_proj", "lm_head"]
    assert ours.config.quantization_config.llm_int8_skip_modules == skip
    ref = auto.from_pretrained(src, quantization_config=_bnb_config("nf4", True, None, skip), device_map="cpu")
    qc_ref = json.load(open(_save(ref, tmp_path / "ref") + "/config.json"))["quantization_config"]
    qc_ours = json.load(open(_save(ours, tmp_path / "ours") + "/config.json"))["quantization_config"]
    assert qc_ours == qc_ref
    back = auto.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert _full_linears(back) == _full_linears(ours) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                          "model.layers.1.mlp.down_proj"}
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=1e-5)


def test_quantized_model_copies_and_pickles():
    """The hf_quantizer quantize_model attaches survives deepcopy and pickling."""
    torch.manual_seed(0)
    model = quantize_model(_causal_untied(), progressbar=False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.hf_quantizer) is type(model.hf_quantizer)
        assert clone.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
        torch.testing.assert_close(_logits(clone), _logits(model), atol=0, rtol=0)


def test_int4_save_pretrained_is_refused(tmp_path):
    """fastpeft's int4 is no bitsandbytes format: no quantization_config, and save_pretrained refuses (with a
    warning that says what to do) instead of writing a checkpoint transformers cannot load."""
    torch.manual_seed(0)
    model = quantize_model(_causal_untied(), quant_type="int4", progressbar=False)
    assert getattr(model.config, "quantization_config", None) is None
    with pytest.warns(UserWarning, match="int4 format is not a bitsandbytes format"):
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path / "int4")
    assert not (tmp_path / "int4" / "model.safetensors").exists()


# --------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_dequantize_matches_transformers(dtype, tmp_path):
    """model.dequantize() on a quantize_model model does what it does on a transformers-quantized one:
    nn.Linear layers with the decoded weights (GPT-2's Conv1D come back as nn.Linear), the quantization config
    and hf_quantizer removed, the same logits."""
    torch.manual_seed(0)
    src = _save(_gpt2(), tmp_path / "gpt2")
    auto = transformers.AutoModelForCausalLM
    ref = _bnb_load(auto, src, bnb_4bit_quant_type="fp4").dequantize(dtype=dtype)
    ours = quantize_model(auto.from_pretrained(src), quant_type="fp4", compress_statistics=False,
                          progressbar=False).dequantize(dtype=dtype)
    assert not _quantized_names(ours) and _full_linears(ours) == _full_linears(ref)
    assert getattr(ours, "hf_quantizer", None) is None and not hasattr(ours.config, "quantization_config")
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key, value in sd_ref.items():
        assert sd_ours[key].dtype == value.dtype and torch.equal(sd_ours[key], value), key
    layer = ours.transformer.h[0].attn.c_attn
    assert layer.weight.requires_grad == ref.transformer.h[0].attn.c_attn.weight.requires_grad
    if dtype is None:  # bf16 linears among fp32 norms: neither model runs (as transformers' own)
        torch.testing.assert_close(_logits(ours), _logits(ref), atol=0, rtol=0)


def test_dequantize_int4_and_plain_modules():
    """dequantize() of an int4 model, and dequantize_model on a plain nn.Module, decode with the documented
    int4 formula."""
    torch.manual_seed(0)
    model = quantize_model(_causal_untied(), quant_type="int4", progressbar=False)
    q = model.model.layers[0].self_attn.q_proj
    st = q.quant_state
    expected = dequantize_int4(q.weight.data, st.scales, st.zeros, st.group_size, q.in_features)
    model = model.dequantize()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear and not _quantized_names(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.data, expected, atol=0, rtol=0)
    plain = quantize_model(_mlp(), progressbar=False)
    decoded = plain[0].dequantize(torch.float32)
    plain = fastpeft.quant.dequantize_model(plain)
    assert type(plain[0]) is nn.Linear and torch.equal(plain[0].weight.data, decoded)
