"""Bottleneck adapters (fastpeft's own format): placement, identity at init, an independent reference forward,
parameter counts, training, save → load, generation."""

from __future__ import annotations

import json

import pytest
import torch
from test_methods_common import TASKS, batch, bert, fresh, gpt2, llama, saved, t5, train, trainable, twin

import fastpeft
from fastpeft.methods import BottleneckConfig
from helpers import assert_rel

PLACES = {  # (attention outputs, MLP outputs) per layer
    llama: (["model.layers.{i}.self_attn.o_proj"], ["model.layers.{i}.mlp.down_proj"]),
    gpt2: (["transformer.h.{i}.attn.c_proj"], ["transformer.h.{i}.mlp.c_proj"]),
    bert: (["bert.encoder.layer.{i}.attention.output.dense"], ["bert.encoder.layer.{i}.output.dense"]),
    t5: (["encoder.block.{i}.layer.0.SelfAttention.o", "decoder.block.{i}.layer.0.SelfAttention.o",
          "decoder.block.{i}.layer.1.EncDecAttention.o"],
         ["encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"]),
}


@pytest.mark.parametrize("factory", [llama, gpt2, bert, t5], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_placement_and_identity_init(factory, kind):
    a, _, state = twin(factory)
    r = 4
    model = fastpeft.get_peft_model(a, BottleneckConfig(bottleneck_size=r, adapter_type=kind,
                                                        task_type=TASKS[factory]))
    attn, ffn = PLACES[factory]
    where = [p.format(i=i) for i in range(2) for p in (attn + ffn if kind == "houlsby" else ffn)]
    want = {f"base_model.model.{w}.{part}.default.{t}" for w in where for part in ("adapter_down", "adapter_up")
            for t in ("weight", "bias")}
    got = {n for n in trainable(model) if ".modules_to_save." not in n}
    assert got == want
    width = {n: p.shape for n, p in model.named_parameters() if n in want}
    assert model.get_nb_trainable_parameters()[0] == sum(torch.Size(s).numel() for s in width.values()) + (
        99 if factory is bert else 0)
    x = batch(factory, labels=False)
    assert_rel(model(**x).logits, fresh(factory, state)(**x).logits, 1e-6, "identity at init")


def test_forward_equals_reference():
    a, _, state = twin(llama)
    model = fastpeft.get_peft_model(a, BottleneckConfig(bottleneck_size=3, non_linearity="gelu", scaling=0.5,
                                                        init_weights=False, task_type="CAUSAL_LM"))
    ref = fresh(llama, state)
    layers = dict(model.get_base_model().named_modules())

    def hook(name):
        layer = layers[name]
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]

        def f(mod, inp, out):
            return out + 0.5 * torch.nn.functional.linear(
                torch.nn.functional.gelu(torch.nn.functional.linear(out, down.weight, down.bias)), up.weight, up.bias)
        return f

    for name, mod in ref.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            mod.register_forward_hook(hook(name))
    x = batch(llama, labels=False)
    out = model(**x).logits
    assert_rel(out, ref(**x).logits, 1e-6, "reference")
    with model.disable_adapter():
        assert_rel(model(**x).logits, fresh(llama, state)(**x).logits, 1e-6, "disabled")


@pytest.mark.parametrize("factory", [gpt2, t5], ids=lambda f: f.__name__)
def test_train_save_load_generate(factory, tmp_path):
    a, _, state = twin(factory)
    model = fastpeft.get_peft_model(a, BottleneckConfig(bottleneck_size=4, task_type=TASKS[factory]))
    x = batch(factory)
    losses = train(model, x, steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    lo = model(**x).logits
    model.save_pretrained(tmp_path)
    keys = set(saved(tmp_path))
    assert keys and all(".adapter_down." in k or ".adapter_up." in k for k in keys)
    assert not any(".default." in k for k in keys) and all(k.startswith("base_model.model.") for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    loaded = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path)
    assert_rel(loaded(**x).logits, lo, 1e-6, "loaded")
    out = loaded.generate(input_ids=x["input_ids"], max_new_tokens=3, do_sample=False)
    assert out.shape == ((2, 10) if factory is gpt2 else (2, 4))
    with pytest.raises(ValueError, match="lacks|does not have|shape"):
        fastpeft.methods.from_pretrained(fresh(factory, state), tmp_path, "BOTTLENECK",
                                         config=BottleneckConfig(bottleneck_size=5, task_type=TASKS[factory]))
