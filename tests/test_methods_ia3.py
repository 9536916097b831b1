"""IA3 against peft on tiny Llama / GPT-2 / T5 / BERT: parameter names and counts, logits, saved keys, loading both
ways, training, merge, generation."""

from __future__ import annotations

import pytest
import torch
from test_methods_common import TASKS, batch, bert, fresh, gpt2, llama, saved, t5, train, trainable, twin

import fastpeft
from fastpeft.methods import IA3Config
from helpers import assert_rel

peft = pytest.importorskip("peft")


def _pair(factory, **kw):
    a, b, state = twin(factory)
    ours = fastpeft.get_peft_model(a, IA3Config(task_type=TASKS[factory], init_ia3_weights=False, **kw))
    theirs = peft.get_peft_model(b, peft.IA3Config(task_type=TASKS[factory], **kw))
    res = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not res.unexpected_keys
    return ours, theirs, state


@pytest.mark.parametrize("factory", [llama, gpt2, t5, bert], ids=lambda f: f.__name__)
def test_ia3_equals_peft_and_round_trips(factory, tmp_path):
    ours, theirs, state = _pair(factory)
    assert {k for k, _ in ours.named_parameters()} == {k for k, _ in theirs.named_parameters()}
    assert trainable(ours) == trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = batch(factory, labels=False)
    lo = ours(**x).logits
    assert_rel(lo, theirs(**x).logits, 1e-6, "logits")
    with ours.disable_adapter():
        assert (ours(**x).logits - lo).abs().max() > 1e-4, "random IA3 vectors must change the output"
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for loader in (peft.PeftModel, fastpeft.PeftModel):
        loaded = loader.from_pretrained(fresh(factory, state), tmp_path / "ours")
        assert_rel(loaded(**x).logits, lo, 1e-6, f"{loader.__module__} load")
    back = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path / "theirs")
    assert_rel(back(**x).logits, lo, 1e-6, "peft-saved adapter loaded by fastpeft")
    assert not trainable(back)


@pytest.mark.parametrize("factory", [llama, t5], ids=lambda f: f.__name__)
def test_ia3_trains_and_merges(factory):
    a, _, _ = twin(factory)
    model = fastpeft.get_peft_model(a, IA3Config(task_type=TASKS[factory]))
    x = batch(factory)
    with torch.no_grad():
        base = model(**x).logits
    losses = train(model, x, steps=10, lr=0.2)
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        tuned = model(**x).logits
        merged = model.merge_and_unload()
        assert not any("ia3" in n for n, _ in merged.named_parameters())
        assert_rel(merged(**x).logits, tuned, 1e-5, "merged")
    assert (tuned - base).abs().max() > 1e-3


def test_ia3_generates():
    a, _, _ = twin(gpt2)
    model = fastpeft.get_peft_model(a, IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    x = batch(gpt2, labels=False, mask=False)
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 11) and torch.equal(out[:, :7], x["input_ids"])


@pytest.mark.parametrize("factory", [llama, gpt2], ids=lambda f: f.__name__)
def test_ia3_merge_unmerge_disable_like_peft(factory):
    from test_methods_common import check_merge_unmerge_like_peft

    from fastpeft.methods.ia3 import IA3Linear

    ours, theirs, state = _pair(factory)
    with torch.no_grad():  # scales away from zero: unmerging divides by them
        theirs_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) + 0.5), theirs_params[name].copy_(p)
    check_merge_unmerge_like_peft(ours, theirs, fresh(factory, state), batch(factory, labels=False), IA3Linear)


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_merge_and_unload_takes_peft_arguments(method, capsys):
    """merge_and_unload(progressbar, safe_merge, adapter_names) as peft's: a NaN in the adapter raises under
    safe_merge in both libraries (fastpeft used to drop the arguments and write the NaN); without it both merge;
    the progress bar shows."""
    def make(lib):
        torch.manual_seed(0)
        cfg = (lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM") if method == "ia3" else
               lib.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"],
                                 task_type="CAUSAL_LM"))
        model = lib.get_peft_model(llama().eval(), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("ia3_l" in name or "lora_A" in name) and "layers.0." in name:
                    p.view(-1)[0] = float("nan")
        return model

    for lib in (peft, fastpeft):
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            make(lib).merge_and_unload(safe_merge=True)
        merged = make(lib).merge_and_unload(progressbar=lib is fastpeft, adapter_names=["default"])
        assert not torch.isfinite(merged.model.layers[0].mlp.down_proj.weight if method == "ia3"
                                  else merged.model.layers[0].self_attn.q_proj.weight).all()
    assert "Unloading and merging model" in capsys.readouterr().err


def _two_adapter_models():
    """peft and fastpeft IA3 models on identical Llamas with adapters 'default' (k/down) and 'b' (v/down, random
    vectors copied from fastpeft's into peft's)."""
    models = {}
    for lib in (peft, fastpeft):
        torch.manual_seed(0)
        model = lib.get_peft_model(llama().eval(), lib.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
        model.add_adapter("b", lib.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                             task_type="CAUSAL_LM", init_ia3_weights=False))
        models[lib] = model
    ours = {k: v for k, v in models[fastpeft].state_dict().items() if "ia3_l" in k}
    theirs = models[peft].state_dict()
    assert sorted(ours) == sorted(k for k in theirs if "ia3_l" in k)
    with torch.no_grad():
        for key, value in ours.items():
            theirs[key].copy_(value)
    return models


def _trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_several_ia3_adapters_like_peft(tmp_path):
    """add_adapter / set_adapter / delete_adapter with two IA3 adapters (one layer shared, one each): the same
    outputs and trainable parameters as peft's for each active adapter, peft's folder layout, files that load into
    either library with the same outputs, and a merge of the active adapter only."""
    models = _two_adapter_models()
    ids = batch(llama, labels=False, mask=False)["input_ids"]
    outs = {}
    for name in ("default", "b", "default"):
        for lib in (peft, fastpeft):
            models[lib].set_adapter(name)
            with torch.no_grad():
                outs[lib] = models[lib](input_ids=ids).logits
        torch.testing.assert_close(outs[fastpeft], outs[peft])
        assert _trainable_names(models[fastpeft]) == _trainable_names(models[peft])
    for lib in (peft, fastpeft):
        models[lib].set_adapter("b")
        models[lib].save_pretrained(tmp_path / lib.__name__)
    with torch.no_grad():
        ref = models[peft](input_ids=ids).logits
    for src in (peft, fastpeft):
        assert sorted(p.name for p in (tmp_path / src.__name__).iterdir()) == \
            ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]
        for lib in (peft, fastpeft):
            loaded = lib.PeftModel.from_pretrained(llama_twin(), tmp_path / src.__name__)
            loaded.load_adapter(tmp_path / src.__name__ / "b", adapter_name="b")
            loaded.set_adapter("b")
            with torch.no_grad():
                torch.testing.assert_close(loaded(input_ids=ids).logits, ref, msg=f"{src.__name__}->{lib.__name__}")
    merged = models[fastpeft].merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    models[peft].delete_adapter("b")
    ours = _two_adapter_models()[fastpeft]
    ours.delete_adapter("b")
    assert list(ours.peft_config) == ["default"] and ours.active_adapter == "default"
    assert not any(n.endswith(".b") for n, _ in ours.named_parameters())
    assert _trainable_names(ours) == _trainable_names(models[peft])


def llama_twin():
    torch.manual_seed(0)
    return llama().eval()


def test_ia3_vectors_frozen_inside_disable_adapter():
    """Inside disable_adapter() the IA3 vectors are frozen, as peft's (no optimizer built there sees them), and
    come back as they were after; an adapter loaded for inference stays frozen."""
    models = _two_adapter_models()
    for lib in (peft, fastpeft):
        before = models[lib].get_nb_trainable_parameters()
        with models[lib].disable_adapter():
            assert models[lib].get_nb_trainable_parameters()[0] == 0
        assert models[lib].get_nb_trainable_parameters() == before
    ours = models[fastpeft]
    ours.set_requires_grad("default", False)
    with ours.disable_adapter():
        pass
    assert ours.get_nb_trainable_parameters()[0] == 0
