"""``fastpeft.helpers`` (peft's ``peft.helpers``) against peft's own helpers on the same weights."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.helpers import (
    check_if_peft_model,
    rescale_adapter_scale,
    update_forward_signature,
    update_generate_signature,
    update_signature,
)
from helpers import tiny_llama

peft = pytest.importorskip("peft")
from peft import helpers as peft_helpers  # noqa: E402


def _twins(config_kwargs=None):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "task_type": "CAUSAL_LM",
          **(config_kwargs or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
        f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in p.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    f.load_state_dict(p.state_dict())
    return p.eval(), f.eval()


IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


@pytest.mark.parametrize("multiplier", [0.0, 0.5, 2, -1.0])
def test_rescale_adapter_scale_matches_peft_and_restores(multiplier):
    p, f = _twins()
    with torch.no_grad():
        before = f(IDS).logits
        with peft_helpers.rescale_adapter_scale(p, multiplier):
            want = p(IDS).logits
        with rescale_adapter_scale(f, multiplier):
            got = f(IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f(IDS).logits, before)  # restored
    if multiplier == 0.0:  # the base model
        with torch.no_grad(), f.disable_adapter():
            torch.testing.assert_close(got, f(IDS).logits, rtol=1e-5, atol=1e-6)


def test_rescale_adapter_scale_is_restored_after_an_exception_and_checks_input():
    _, f = _twins()
    scales = {n: dict(m.scaling) for n, m in f.named_modules() if hasattr(m, "lora_A")}
    with pytest.raises(RuntimeError, match="boom"), rescale_adapter_scale(f, 3.0):
        raise RuntimeError("boom")
    assert scales == {n: dict(m.scaling) for n, m in f.named_modules() if hasattr(m, "lora_A")}
    with pytest.raises(TypeError, match="multiplier"), rescale_adapter_scale(f, "2"):
        pass
    with pytest.raises(ValueError, match="LoraLayer"), rescale_adapter_scale(nn.Linear(2, 2), 2.0):
        pass


def test_rescale_adapter_scale_warns_on_merged_adapters():
    _, f = _twins({"target_modules": ["q_proj"]})
    f.merge_adapter()
    with pytest.warns(UserWarning, match="merged adapters"), rescale_adapter_scale(f, 0.5):
        pass


def test_check_if_peft_model(tmp_path):
    _, f = _twins()
    f.save_pretrained(tmp_path / "adapter")
    assert check_if_peft_model(str(tmp_path / "adapter")) is True
    assert peft_helpers.check_if_peft_model(str(tmp_path / "adapter")) is True
    (tmp_path / "empty").mkdir()
    assert check_if_peft_model(str(tmp_path / "empty")) is False
    assert check_if_peft_model(str(tmp_path / "missing")) is False


def test_update_signatures():
    _, f = _twins()
    base_cls = type(f.get_base_model())
    update_forward_signature(f)  # already the base's: unchanged
    assert "input_ids" in inspect.signature(f.forward).parameters
    update_generate_signature(f)
    assert f.generate.__doc__ == base_cls.generate.__doc__
    assert "generation_config" in inspect.signature(f.generate).parameters
    out = f.generate(IDS, max_new_tokens=3, do_sample=False)  # still fastpeft's generate (adapter_names works)
    assert out.shape == (1, IDS.shape[1] + 3)
    mixed = f.generate(IDS, max_new_tokens=3, do_sample=False, adapter_names=["__base__"])
    with f.disable_adapter():
        torch.testing.assert_close(mixed, f.generate(IDS, max_new_tokens=3, do_sample=False))
    update_signature(f, "all")
    with pytest.raises(ValueError, match="not supported"):
        update_signature(f, "backward")
