"""BitFit and Freeze (fastpeft's own formats): which parameters train, counted independently; saved keys;
save → load gives the same outputs; a short training run lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
from test_methods_common import TASKS, batch, bert, fresh, gpt2, llama, saved, t5, train, trainable, twin

import fastpeft
from fastpeft.methods import BitFitConfig, FreezeConfig
from helpers import assert_rel


def _perturb_trainable(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("factory", [gpt2, bert], ids=lambda f: f.__name__)
def test_bitfit_trains_only_biases(factory, tmp_path):
    a, _, state = twin(factory)
    base_biases = {f"base_model.model.{n}" for n, p in a.named_parameters() if n.endswith(".bias")}
    heads = {n for n, _ in a.named_modules() if n.split(".")[-1] in ("classifier", "score")}
    model = fastpeft.get_peft_model(a, BitFitConfig(task_type=TASKS[factory]))
    names = trainable(model)
    expected = {n for n in base_biases if not any(f".{h}." in n for h in heads)}
    head_copies = {n for n in names if ".modules_to_save.default." in n}
    assert names - head_copies == expected
    assert bool(head_copies) == (TASKS[factory] == "SEQ_CLS")
    n_expected = sum(p.numel() for n, p in model.named_parameters() if n in names)
    model.print_trainable_parameters()
    assert model.get_nb_trainable_parameters()[0] == n_expected
    x = batch(factory)
    losses = train(model, x, steps=10)
    assert losses[-1] < losses[0] - 0.05, losses
    lo = model(**x).logits
    model.save_pretrained(tmp_path)
    keys = set(saved(tmp_path))
    assert keys == {n.replace(".modules_to_save.default.", ".") for n in names}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    loaded = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path)
    assert_rel(loaded(**x).logits, lo, 1e-6, "loaded")
    assert not trainable(loaded)
    with pytest.raises(NotImplementedError):
        with model.disable_adapter():
            pass


def test_bitfit_add_bias_on_llama(tmp_path):
    a, _, state = twin(llama)
    model = fastpeft.get_peft_model(a, BitFitConfig(task_type="CAUSAL_LM", add_bias=True,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    names = trainable(model)
    assert len(names) == 6 and all(n.endswith(".bias") for n in names)
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 16 + 32)
    x = batch(llama)
    before = model(**x).logits
    assert_rel(before, fresh(llama, state)(**x).logits, 1e-6, "zero biases are the identity")
    _perturb_trainable(model)
    lo = model(**x).logits
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(fresh(llama, state), tmp_path)
    assert_rel(loaded(**x).logits, lo, 1e-6, "loaded with re-created biases")


@pytest.mark.parametrize("factory,k", [(llama, 1), (t5, 1), (gpt2, 2)], ids=lambda v: getattr(v, "__name__", v))
def test_freeze_last_blocks(factory, k, tmp_path):
    a, _, state = twin(factory)
    model = fastpeft.get_peft_model(a, FreezeConfig(num_trainable_layers=k, trainable_modules=["lm_head"]
                                                    if factory is t5 else None, task_type=TASKS[factory]))
    names = trainable(model)
    stacks = {"llama": ["model.layers"], "t5": ["encoder.block", "decoder.block"], "gpt2": ["transformer.h"]}
    want = set()
    for stack in stacks[factory.__name__]:
        blocks = fresh(factory, state).get_submodule(stack)
        for i in range(len(blocks) - k, len(blocks)):
            want |= {f"base_model.model.{stack}.{i}.{p}" for p, _ in blocks[i].named_parameters()}
    if factory is t5:
        want.add("base_model.model.shared.weight")  # lm_head is tied to the shared embedding
    assert names == want
    x = batch(factory)
    losses = train(model, x, steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    lo = model(**x).logits
    model.save_pretrained(tmp_path)
    assert set(saved(tmp_path)) == want
    loaded = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path, is_trainable=True)
    assert_rel(loaded(**x).logits, lo, 1e-6, "loaded")
    assert trainable(loaded) == want


def test_freeze_patterns_and_strict_load(tmp_path):
    a, _, state = twin(llama)
    model = fastpeft.get_peft_model(a, FreezeConfig(trainable_modules=r".*\.mlp\.down_proj"))
    assert trainable(model) == {f"base_model.model.model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    model.save_pretrained(tmp_path)
    other = fastpeft.get_peft_model(fresh(llama, state), FreezeConfig(num_trainable_layers=1))
    with pytest.raises(ValueError, match="lacks|does not have"):
        type(other).from_pretrained(fresh(llama, state), tmp_path, config=other.peft_config["default"])


@pytest.mark.parametrize("factory,config", [
    (bert, BitFitConfig(task_type="SEQ_CLS")),  # with the classifier head as a modules_to_save copy
    (gpt2, FreezeConfig(task_type="CAUSAL_LM", num_trainable_layers=1)),
], ids=["bitfit", "freeze"])
def test_merge_and_unload_gives_the_trained_model(factory, config, tmp_path):
    """The trained parameters are the model's own: merge_and_unload returns the plain transformers model, which
    equals a fresh base model given the saved tensors by transformers' own load_state_dict. Disabling (or unloading)
    cannot give the base model back: a clear error."""
    a, _, state = twin(factory)
    model = fastpeft.get_peft_model(a, config)
    _perturb_trainable(model)
    x = batch(factory, labels=False)
    with torch.no_grad():
        lo = model(**x).logits
    model.save_pretrained(tmp_path)
    for what in ("disable", "unload", "unmerge"):
        with pytest.raises(NotImplementedError, match="in place.*cannot be restored"):
            if what == "disable":
                with model.disable_adapter():
                    pass
            else:
                getattr(model, "unload" if what == "unload" else "unmerge_adapter")()
    reference = fresh(factory, state)
    tensors = {k.removeprefix("base_model.model."): v for k, v in saved(tmp_path).items()}
    assert not reference.load_state_dict(tensors, strict=False).unexpected_keys
    merged = model.merge_and_unload()
    assert type(merged) is type(reference)
    assert not any(isinstance(m, fastpeft.model.ModulesToSaveWrapper) for m in merged.modules())
    with torch.no_grad():
        assert_rel(merged(**x).logits, reference(**x).logits, 1e-6, "merged vs transformers with the saved tensors")
        assert_rel(merged(**x).logits, lo, 1e-6, "merged vs the peft model")
