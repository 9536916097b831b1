"""QLoRA habits at the edges, against peft 0.21.2 and bitsandbytes 0.50.2 themselves: to_peft of a model quantized
by fastpeft (bitsandbytes' Linear4bit over the same bytes), checkpoints stored with bitsandbytes' quant_storage
(bf16: FSDP-QLoRA's layout) surviving dtype casts, and prepare_model_for_kbit_training's conditions."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.quant import Linear4bit

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 6, 2]])


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_to_peft_of_a_fastpeft_quantized_model(quant_type, nested, monkeypatch):
    """to_peft on a model from quantize_model: peft's LoRA layers over bitsandbytes' Linear4bit holding the same
    bytes and statistics, the same logits (computed in fp32 on both sides), and from_peft back again."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    base = fastpeft.quantize_model(_llama(), quant_type=quant_type, compress_statistics=nested, progressbar=False)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    model.eval()
    ref = _logits(model)
    packed = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fastpeft.to_peft(model)
    assert isinstance(out, peft.PeftModel)
    q_proj = out.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.data.data_ptr() == packed.data_ptr()  # the same bytes, not a copy
    untouched = out.base_model.model.model.layers[0].mlp.down_proj  # not targeted: converted too
    assert isinstance(untouched, bnb.nn.Linear4bit)
    for module in out.modules():  # bitsandbytes' CPU inference path repacks to a bf16 absmax on AVX512-BF16 CPUs
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(_logits(out.eval()), ref, atol=1e-5, rtol=1e-5)
    back = fastpeft.from_peft(out)
    torch.testing.assert_close(_logits(back.eval()), ref, atol=1e-5, rtol=1e-5)


def test_to_peft_refuses_int4_before_changing_anything():
    base = fastpeft.quantize_model(_llama(), quant_type="int4", progressbar=False)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                              init_lora_weights=False)).eval()
    ref = _logits(model)
    with pytest.raises(ValueError, match="int4.*the model is unchanged"):
        fastpeft.to_peft(model)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, fastpeft.FastLoraLinear4bit)
    torch.testing.assert_close(_logits(model), ref)


def _bnb_bf16_storage_layer():
    torch.manual_seed(0)
    w = torch.randn(64, 128) / 128 ** 0.5
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16,
                                     module=layer)
    layer = layer.to("cpu")
    return layer, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@pytest.mark.parametrize("cast", ["prepare", "float", "half", "bfloat16"])
def test_bf16_quant_storage_checkpoint_survives_dtype_casts(cast):
    """bitsandbytes' state dict of a layer stored with quant_storage=bf16 loads into fastpeft's Linear4bit as the
    same bytes (uint8), so prepare_model_for_kbit_training's upcast or a module dtype cast leaves the decoded
    weight equal to bitsandbytes' (a bf16-typed byte buffer would be converted as numbers)."""
    layer, ref = _bnb_bf16_storage_layer()
    assert layer.weight.dtype == torch.bfloat16
    model = nn.Sequential(Linear4bit(128, 64, bias=False, quant_type="nf4"))
    model[0].load_state_dict(layer.state_dict())
    assert model[0].weight.dtype == torch.uint8
    torch.testing.assert_close(model[0].dequantize(torch.float32), ref, atol=0, rtol=0)
    if cast == "prepare":
        fastpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        getattr(model, cast)()
    torch.testing.assert_close(model[0].dequantize(torch.float32), ref, atol=0, rtol=0)


def test_prepare_model_for_kbit_training_conditions_like_peft():
    """A model that is not k-bit: both libraries freeze and upcast, neither turns on gradient checkpointing nor
    adds the input-grad hook; a k-bit model (quantize_model sets is_loaded_in_4bit) gets both, as with peft on a
    bitsandbytes model. peft's auto_clear_cache keyword is taken."""
    states = {}
    for lib in (peft, fastpeft):
        model = _llama(torch.bfloat16)
        lib.prepare_model_for_kbit_training(model, auto_clear_cache=False)
        states[lib] = (model.is_gradient_checkpointing, len(model.get_input_embeddings()._forward_hooks),
                       {p.dtype for p in model.parameters()}, any(p.requires_grad for p in model.parameters()))
    assert states[peft] == states[fastpeft] == (False, 0, {torch.float32}, False)
    quantized = fastpeft.quantize_model(_llama(torch.bfloat16), progressbar=False)
    fastpeft.prepare_model_for_kbit_training(quantized)
    assert quantized.is_gradient_checkpointing
    assert {p.dtype for p in quantized.parameters() if p.is_floating_point()} == {torch.float32}


def test_parameter_counts_of_fastpeft_quantized_models_like_peft():
    """get_nb_trainable_parameters counts fastpeft's packed 4-bit bytes as two values each, as peft counts
    bitsandbytes' Params4bit: the same (trainable, all) on a fastpeft- and a bitsandbytes-quantized twin, and
    the same as peft's count on the latter."""
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = fastpeft.get_peft_model(fastpeft.quantize_model(_llama(), progressbar=False), fastpeft.LoraConfig(**config))
    on_bnb = fastpeft.quantize_model(_llama(), backend="bitsandbytes", progressbar=False)
    theirs = peft.get_peft_model(on_bnb, peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable, total = ours.get_nb_trainable_parameters()
    assert total == sum(p.numel() for p in _llama().parameters()) + trainable  # every 4-bit value counted once
