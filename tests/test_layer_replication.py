"""``LoraConfig(layer_replication=...)``: decoder layers repeated with shared weights, each copy adapted.

Against peft (same adapter weights: outputs, gradients, saved files, loading both ways, greedy generation), and
against an independent reference: a model built with the longer layer list whose layers are copies of the
originals (with zero-initialized B the adapted model must compute exactly that).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import fastpeft
from helpers import assert_rel, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 96
MAP = [[0, 2], [1, 3]]  # 3 layers -> 0, 1, 1, 2
ORDER = [0, 1, 1, 2]
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))


def _llama():
    torch.manual_seed(0)
    return tiny_llama(V, num_hidden_layers=3).eval()


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _pair(**kw):
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=MAP, **kw)
    ours = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(init_lora_weights=False, **kw))
    fastpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


def _expanded_reference(base_factory, order, layers_of):
    """A plain model with ``len(order)`` layers, layer k a copy of the original's layer ``order[k]``."""
    original = base_factory()
    cfg = original.config.to_dict()
    cfg["num_hidden_layers" if "num_hidden_layers" in cfg else "n_layer"] = len(order)
    cfg.pop("layer_types", None)
    ref = type(original)(type(original.config).from_dict(cfg)).eval()
    state = original.state_dict()
    ref_state = ref.state_dict()
    prefix = layers_of
    for key in ref_state:
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            ref_state[key] = state[f"{prefix}{order[int(idx)]}.{rest}"]
        else:
            ref_state[key] = state[key]
    ref.load_state_dict(ref_state)
    return ref


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_adapters_compute_the_expanded_model(family):
    if family == "llama":
        factory, layers_of, targets = _llama, "model.layers.", ["q_proj", "down_proj"]
    else:
        def factory():
            torch.manual_seed(0)
            return tiny_gpt2(V).eval()
        layers_of, targets = "transformer.h.", ["c_attn"]
    order = [0, 1, 1, 2] if family == "llama" else [0, 1, 0, 1]
    layer_map = MAP if family == "llama" else [[0, 2], [0, 2]]
    model = fastpeft.get_peft_model(factory(), fastpeft.LoraConfig(r=2, target_modules=targets,
                                                                   layer_replication=layer_map))
    ref = _expanded_reference(factory, order, layers_of)
    with torch.no_grad():
        assert_rel(model(input_ids=IDS).logits, ref(input_ids=IDS).logits, 1e-6, family)
    layers = model.get_base_model().model.layers if family == "llama" else model.get_base_model().transformer.h
    assert len(layers) == len(order) and model.get_base_model().config.num_hidden_layers == len(order)
    w = [layer.self_attn.q_proj.base_layer.weight if family == "llama" else layer.attn.c_attn.base_layer.weight
         for layer in layers]
    assert w[1] is w[2] if family == "llama" else (w[0] is w[2] and w[1] is w[3])  # shared, not copied
    a = [layer.self_attn.q_proj.lora_A["default"].weight if family == "llama"
         else layer.attn.c_attn.lora_A["default"].weight for layer in layers]
    assert len({id(t) for t in a}) == len(order)  # each position its own adapter


def test_outputs_gradients_and_files_match_peft(tmp_path):
    ours, theirs = _pair()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.train()
    theirs.train()
    out_o = ours(input_ids=IDS, labels=IDS)
    out_t = theirs(input_ids=IDS, labels=IDS)
    assert_rel(out_o.logits, out_t.logits, 1e-6, "logits")
    out_o.loss.backward()
    out_t.loss.backward()
    grads_t = dict(theirs.named_parameters())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in theirs.named_parameters() if p.requires_grad] and len(trained) == 4 * 3 * 2
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_rel(p.grad, grads_t[name].grad, 1e-5, name)
    ours.eval()
    theirs.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with _quiet():
        peft_loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
        ours_loaded = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "theirs").eval()
    assert ours_loaded.peft_config["default"].layer_replication == MAP
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
        assert_rel(peft_loaded(input_ids=IDS).logits, expected, 1e-6, "peft loads fastpeft's adapter")
        assert_rel(ours_loaded(input_ids=IDS).logits, expected, 1e-6, "fastpeft loads peft's adapter")


def test_generation_uses_one_cache_entry_per_position():
    ours, theirs = _pair()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        g_o = ours.generate(input_ids=IDS, **kw)
        g_t = theirs.generate(input_ids=IDS, **kw)
        g_nocache = ours.generate(input_ids=IDS, use_cache=False, **kw)
    assert torch.equal(g_o, g_t) and torch.equal(g_o, g_nocache)
    attn = [layer.self_attn.layer_idx for layer in ours.get_base_model().model.layers]
    assert attn == [0, 1, 2, 3]


def test_layer_types_follow_the_layers():
    """Qwen3 reads ``config.layer_types`` per layer: it is replicated with the layers (peft leaves it short)."""
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32, layer_types=["full_attention", "full_attention",
                                                                            "sliding_attention"],
                                   sliding_window=4, use_sliding_window=True)
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(transformers.Qwen3ForCausalLM(cfg).eval(),
                                    fastpeft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=MAP))
    config = model.get_base_model().config
    assert config.layer_types == ["full_attention", "full_attention", "full_attention", "sliding_attention"]
    with torch.no_grad():
        cached = model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False, pad_token_id=0)
        fresh = model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, fresh)


def test_merging_is_refused_and_unload_keeps_the_layers():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="layers are replicated"):
        ours.merge_and_unload()
    with pytest.raises(ValueError, match="layers are replicated"):
        ours.merge_adapter()
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    with ours.disable_adapter(), torch.no_grad():
        base_out = ours(input_ids=IDS).logits
    assert not torch.equal(expected, base_out)
    plain = ours.unload()
    assert len(plain.model.layers) == 4
    with torch.no_grad():
        assert_rel(plain(input_ids=IDS).logits, base_out, 1e-6, "unloaded")


def test_second_adapter_and_errors():
    model = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  layer_replication=MAP))
    model.add_adapter("same", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=MAP))
    assert len(model.get_base_model().model.layers) == 4
    assert "same" in model.get_base_model().model.layers[3].self_attn.q_proj.lora_A
    with pytest.raises(ValueError, match="already replicated"):
        model.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 3]]))
    with pytest.raises(ValueError, match="does not fit the model's 3 layers"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 4]]))
    for bad in ([[2, 1]], [[0]], [[-1, 2]], [["0", 1]], 3):
        with pytest.raises((ValueError, TypeError), match="layer_replication"):
            fastpeft.LoraConfig(target_modules=["q_proj"], layer_replication=bad)
    assert fastpeft.LoraConfig(layer_replication=[]).layer_replication is None
    assert fastpeft.LoraConfig(layer_replication=((0, 2),)).layer_replication == [[0, 2]]
    with pytest.raises(ValueError, match="Could not locate the layers"):
        fastpeft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                fastpeft.LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))


def test_to_peft_and_back_keep_the_replicated_layers(tmp_path):
    """``to_peft`` hands the replicated base to peft without letting peft replicate it again, and keeps the
    option in the config (the saved adapter still asks for it)."""
    ours, _ = _pair()
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    converted = fastpeft.to_peft(ours)
    assert len(converted.get_base_model().model.layers) == 4
    assert converted.peft_config["default"].layer_replication == MAP
    with torch.no_grad():
        assert_rel(converted(input_ids=IDS).logits, expected, 1e-6, "to_peft")
    back = fastpeft.from_peft(converted)
    with torch.no_grad():
        assert_rel(back(input_ids=IDS).logits, expected, 1e-6, "from_peft")
    converted.save_pretrained(tmp_path / "p")
    with _quiet():
        loaded = fastpeft.PeftModel.from_pretrained(_llama(), tmp_path / "p").eval()
    with torch.no_grad():
        assert_rel(loaded(input_ids=IDS).logits, expected, 1e-6, "saved after the round trip")
