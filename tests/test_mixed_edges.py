"""Mixed-adapter batches (``adapter_names``) at the edges of peft users' habits, against peft 0.21.2 with the same
weights: LoRA on the embeddings under autocast (a Trainer with bf16=True), names given as a numpy array, and a
generation config passed positionally to ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastpeft
from helpers import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIGS = {"a": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
           "b": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"])}
IDS = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(0))
NAMES = ["a", "__base__", "b", "a"]


def _pair():
    """fastpeft and peft models with adapters 'a' and 'b' holding the same non-zero weights."""
    models = {}
    for lib in (fastpeft, peft):
        torch.manual_seed(0)
        base = tiny_llama(96).eval()
        model = None
        for name, cfg in CONFIGS.items():
            config = lib.LoraConfig(init_lora_weights=False, **cfg)
            if model is None:
                model = lib.get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        models[lib] = model.eval()
    ours = dict(models[fastpeft].named_parameters())
    with torch.no_grad():
        for key, value in models[peft].named_parameters():
            if "lora_" in key:
                value.copy_(ours[key])
    return models[fastpeft], models[peft]


def test_embedding_adapter_in_a_mixed_batch_under_autocast():
    """An fp32 model under bf16 autocast (what Trainer(bf16=True) runs), LoRA on embed_tokens in a mixed batch:
    the logits are peft's to bf16's precision, and a training step runs (the embedding's bf16 delta used to be
    index-added into its fp32 output: a RuntimeError)."""
    ours, theirs = _pair()
    with torch.no_grad():
        ref = theirs(input_ids=IDS, adapter_names=NAMES).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(input_ids=IDS, adapter_names=NAMES).logits
            theirs_bf16 = theirs(input_ids=IDS, adapter_names=NAMES).logits
    scale = ref.abs().max()
    assert (got.float() - ref).abs().max() <= 2 * (theirs_bf16.float() - ref).abs().max() + 1e-3 * scale
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(input_ids=IDS, adapter_names=NAMES, labels=IDS).loss.backward()
    grad = ours.base_model.model.model.embed_tokens.lora_embedding_B["a"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_embedding_layer_mixed_batch_under_autocast():
    """The embedding layer itself: its mixed batch under autocast equals each row's output computed alone (same
    autocast), so rows are not mixed up by the dtype fix."""
    ours, _ = _pair()
    layer = ours.base_model.model.model.embed_tokens
    names = ["a", "__base__", "__base__", "a"]  # (the layer holds 'a' only)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(IDS, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                alone = layer.base_layer(IDS[i:i + 1])
            else:
                layer.set_adapter(name)
                alone = layer(IDS[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone.to(mixed.dtype), atol=1e-2, rtol=1e-2)


def test_adapter_names_as_numpy_array():
    """A numpy array of names works as the list does (as in peft)."""
    ours, theirs = _pair()
    with torch.no_grad():
        ref = theirs(input_ids=IDS, adapter_names=np.array(NAMES)).logits
        torch.testing.assert_close(ours(input_ids=IDS, adapter_names=np.array(NAMES)).logits, ref)
        torch.testing.assert_close(ours(input_ids=IDS, adapter_names=NAMES).logits, ref)
    with pytest.raises(TypeError, match="list of adapter names"):
        ours(input_ids=IDS, adapter_names=np.array([1, 2, 3, 4]))


def test_generation_config_passed_positionally_expands_the_names():
    """generate(ids, generation_config, adapter_names=...) with beams: the names are expanded per beam as with
    the keyword, and each row equals its own adapter generating alone."""
    ours, _ = _pair()
    ids, names = IDS[:3, :5], ["a", "__base__", "b"]
    config = transformers.GenerationConfig(num_beams=3, max_new_tokens=4, do_sample=False, pad_token_id=0)
    by_keyword = ours.generate(input_ids=ids, generation_config=config, adapter_names=names)
    positional = ours.generate(ids, config, adapter_names=names)
    assert torch.equal(positional, by_keyword)
    for i, name in enumerate(names):
        alone = ours.generate(ids[i:i + 1], config, adapter_names=[name])
        assert torch.equal(alone, positional[i:i + 1])


def test_idle_adapters_draw_no_dropout_seed():
    """A trainable adapter with dropout and no row in the batch joins the op with zero rows; it must not draw a
    dropout seed (it drops nothing): otherwise torch's generator advanced with grad on and not without, so reentrant
    checkpointing (forward under no_grad, recomputation with grad) recomputed other masks, and a batch all of one
    adapter dropped other elements than that adapter alone."""
    model = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.add_adapter("b", fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["q_proj"],
                                               init_lora_weights=False))
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(0))

    def loss(**kw):
        torch.manual_seed(123)
        return model(ids, labels=ids, **kw).loss

    names = ["b", "b", "__base__", "b"]
    with_grad = loss(adapter_names=names)
    with torch.no_grad():
        without = loss(adapter_names=names)
    assert with_grad.item() == without.item()
    all_b = loss(adapter_names=["b"] * 4).item()
    model.base_model.set_adapter("b")
    assert loss().item() == all_b
