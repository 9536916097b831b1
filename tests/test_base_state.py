"""``get_base_model_state_dict`` / ``set_base_model_state_dict``: the base's tensors under its original keys.

The reference is the base model's own ``state_dict()`` taken before the adapters were injected (same keys,
same tensors), and peft's functions on the same model wrapped by peft.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
from helpers import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 96


def _llama(**overrides):
    torch.manual_seed(0)
    return tiny_llama(V, **overrides).eval()


CASES = {
    "lora": (_llama, dict(r=2, target_modules=["q_proj", "v_proj"])),
    "lora+embed+mts": (_llama, dict(r=2, target_modules=["q_proj", "embed_tokens"],
                                    modules_to_save=["norm"])),
    "dora": (_llama, dict(r=2, target_modules=["k_proj", "down_proj"], use_dora=True)),
    "tokens-tied": (lambda: _llama(tie_word_embeddings=True),
                    dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5])),
    "gpt2-conv1d-bias": (lambda: (torch.manual_seed(0), tiny_gpt2(V).eval())[1],
                         dict(r=2, target_modules=["c_attn", "c_fc"], bias="all", fan_in_fan_out=True)),
}


def _compare(got: dict, want: dict):
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_keys_and_tensors_are_the_original_models_and_peft_agrees(case):
    factory, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = factory()
        want = {k: v.clone() for k, v in base.state_dict().items()}
        ours = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw))
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kw))
    _compare(fastpeft.get_base_model_state_dict(ours), want)
    _compare(peft.get_base_model_state_dict(theirs), want)  # (the same function on peft's side)


@pytest.mark.parametrize("case", list(CASES))
def test_set_writes_the_base_and_leaves_the_adapters(case):
    factory, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.get_peft_model(factory(), fastpeft.LoraConfig(**kw))
    adapters = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(9)
    drawn: dict[int, torch.Tensor] = {}  # tied weights (one tensor under two keys) get one new value
    new = {k: drawn.setdefault(v.data_ptr(), torch.randn_like(v)) if v.is_floating_point() else v
           for k, v in fastpeft.get_base_model_state_dict(model).items()}
    result = fastpeft.set_base_model_state_dict(model, new)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _compare(fastpeft.get_base_model_state_dict(model), new)
    peft_keys = set(fastpeft.get_peft_model_state_dict(model))
    assert peft_keys  # the adapter's own tensors are untouched
    after = model.state_dict()
    for key in after:
        if ".lora_" in key or ".modules_to_save." in key or "trainable_tokens_delta" in key:
            assert torch.equal(after[key], adapters[key]), key


def test_strict_errors_and_non_strict_result():
    model = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    sd = fastpeft.get_base_model_state_dict(model)
    first = next(iter(sd))
    partial = {k: v for k, v in sd.items() if k != first}
    partial["not.a.key"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=rf"(?s)Missing key\(s\) in state_dict: \['{first}'\].*"
                                           r"Unexpected key\(s\) in state_dict: \['not.a.key'\]"):
        fastpeft.set_base_model_state_dict(model, partial)
    result = fastpeft.set_base_model_state_dict(model, partial, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([first], ["not.a.key"])


def test_other_methods_4bit_and_a_plain_injected_model():
    base = _llama()
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for config in (fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                   fastpeft.AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10),
                   fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)):
        model = fastpeft.get_peft_model(_llama(), config)
        _compare(fastpeft.get_base_model_state_dict(model), want)
    plain = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=2, target_modules=["q_proj"]), _llama())
    _compare(fastpeft.get_base_model_state_dict(plain), want)
    quantized = fastpeft.quantize_model(_llama(), progressbar=False)
    want4 = {k: v.clone() for k, v in quantized.state_dict().items()}
    model = fastpeft.get_peft_model(quantized, fastpeft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    _compare(fastpeft.get_base_model_state_dict(model), want4)
