"""Fixes from the model-coverage bug hunt: reloading an ``ensure_weight_tying`` LoRA adapter on models whose input
embeddings are not called ``embed_tokens`` (GPT-2, BLOOM), merging into a parametrized (``weight_norm``) base
layer, merging ``trainable_token_indices`` given different rows per half of a tied pair, the ``"all-linear"``
list in ``adapter_config.json`` (as peft's), and refusing ``modules_to_save`` ties that T5 / BART cannot follow.
Where peft 0.21.2 is wrong (it loads an untied model, merges nothing, merges crossed rows, builds a model whose
every forward crashes) the reference is the adapter model itself."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from helpers import tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = 96
IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 2]])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _perturb(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """As after training: every trainable parameter moved by random noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model: nn.Module, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def _tiny_bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4))


# --------------------------------------------------------------------------- 1: ensure_weight_tying reload
@pytest.mark.parametrize("make", [tiny_gpt2, _tiny_bloom, lambda: tiny_llama(V, tie_word_embeddings=True)],
                         ids=["gpt2", "bloom", "llama"])
def test_tied_lora_adapter_reloads_tied(make, tmp_path):
    torch.manual_seed(0)
    base = make().eval()
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, init_lora_weights=False, target_modules=["lm_head"], ensure_weight_tying=True)).eval()
    want = _logits(model)
    model.save_pretrained(tmp_path / "fast")
    emb_name = [n for n, m in base.named_modules() if m is base.get_input_embeddings()][0]
    assert json.loads((tmp_path / "fast" / "adapter_config.json").read_text())["target_modules"] == [emb_name]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, init_lora_weights=False, target_modules=["lm_head"], ensure_weight_tying=True)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    for folder in ("fast", "peft"):  # its own file and peft's: the trained (tied) model back
        loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / folder).eval()
        assert torch.equal(_logits(loaded), want if folder == "fast" else _logits(theirs))
        head = loaded.base_model.model.lm_head
        assert isinstance(head, fastpeft.layers.lora.FastLoraLinear)


def test_tied_modules_to_save_reloads_on_gpt2(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2(V).eval()
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True)).eval()
    _perturb(model)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    for lib in (fastpeft, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)


def test_short_embedding_name_still_not_tied_as_peft():
    """``target_modules=["wte"]`` is not the embeddings' full name: neither library ties (peft's name test)."""
    torch.manual_seed(0)
    base = tiny_gpt2(V)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["wte"], ensure_weight_tying=True))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["wte"], ensure_weight_tying=True))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


# --------------------------------------------------------------------------- 2: parametrized base weight
class _WeightNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        wn = torch.nn.utils.parametrizations.weight_norm
        self.emb = wn(nn.Embedding(20, 8), dim=0)
        self.lin = wn(nn.Linear(8, 8))
        self.conv = wn(nn.Conv1d(8, 8, 3, padding=1))

    def forward(self, ids):
        return self.conv(self.lin(self.emb(ids)).transpose(1, 2)).transpose(1, 2)


def _originals(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if "original" in n}


@pytest.mark.parametrize("target", ["lin", "conv", "emb"])
def test_merge_through_weight_norm(target):
    torch.manual_seed(0)
    net = _WeightNormNet().eval()
    ids = torch.tensor([[1, 4, 7, 19, 2]])
    model = fastpeft.get_peft_model(copy.deepcopy(net), fastpeft.LoraConfig(r=2, target_modules=[target]))
    model.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=[target]))
    with torch.no_grad():  # both adapters trained (peft's init leaves one factor 0)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        base_out = net(ids)
        want = model(ids)
        assert (want - base_out).abs().max() > 0.1
        before = _originals(model)
        model.base_model.merge_adapter(["default", "other"], safe_merge=True)  # two adapters, one after the other
        layer = model.base_model.model.get_submodule(target)
        assert layer.merged_adapters == ["default", "other"]
        model.base_model.model.get_submodule(target)._disable_adapters = False
        torch.testing.assert_close(model(ids), _with_both(model, net, ids, target), rtol=0, atol=1e-5)
        model.base_model.unmerge_adapter()  # exact: the parametrization's tensors back as they were
        after = _originals(model)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        model.set_adapter("default")
        torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids), want, rtol=0, atol=1e-5)


def _with_both(model, net, ids, target):
    """The unmerged output of both adapters together (a fresh copy with both active)."""
    m = copy.deepcopy(model)
    m.base_model.unmerge_adapter()
    m.base_model.set_adapter(["default", "other"])
    return m(ids)


def test_merge_into_parametrization_without_right_inverse_refused():
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    net = nn.Module()
    net.lin = nn.Linear(8, 8)
    torch.nn.utils.parametrize.register_parametrization(net.lin, "weight", Doubled())
    model = fastpeft.get_peft_model(net, fastpeft.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    before = _originals(model)
    with pytest.raises(ValueError, match="right_inverse"):
        model.merge_and_unload()
    after = _originals(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wav2vec2_pos_conv_merge():
    cfg = transformers.Wav2Vec2Config(
        vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=1, mask_time_prob=0.0)
    torch.manual_seed(0)
    base = transformers.Wav2Vec2Model(cfg).eval()
    x = torch.randn(2, 64)
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["encoder.pos_conv_embed.conv"])).eval()
    with torch.no_grad():
        want = model(input_values=x).last_hidden_state
        assert (want - base(input_values=x).last_hidden_state).abs().max() > 0.5  # (peft's merge: 1.5 off)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_values=x).last_hidden_state, want, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- 3: tokens on a tied pair
def _tied_tokens_cases():
    return {"llama": (lambda: tiny_llama(V, tie_word_embeddings=True), "embed_tokens", "lm_head"),
            "gpt2": (lambda: tiny_gpt2(V), "wte", "lm_head")}


@pytest.mark.parametrize("case", ["llama", "gpt2"])
@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_tokens_dict_on_tied_pair_merges_as_unmerged(case, how, tmp_path):
    make, emb, head = _tied_tokens_cases()[case]
    torch.manual_seed(0)
    base = make().eval()
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj"] if case == "llama" else ["c_attn"],
        trainable_token_indices={emb: [5, 9], head: [3, 9]})).eval()
    _perturb(model, scale=1.0)
    want = _logits(model)
    if how == "merge_adapter":
        with pytest.warns(UserWarning, match="own copy now"):
            model.base_model.merge_adapter()
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-4)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-4)
        return
    with pytest.warns(UserWarning, match="own copy now"):
        merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-4)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)  # the saved model keeps the two weights apart
    again = type(merged).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again), want, rtol=0, atol=1e-4)


def test_tokens_list_on_tied_pair_stays_tied():
    """The same rows on both halves (peft's tie): merged once into the shared weight, which stays shared."""
    torch.manual_seed(0)
    base = tiny_llama(V, tie_word_embeddings=True).eval()
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices=[5, 9])).eval()
    _perturb(model, scale=1.0)
    want = _logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-4)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


# --------------------------------------------------------------------------- 4: "all-linear" in adapter_config.json
def _mixtral_seq_cls():
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, num_labels=3, pad_token_id=0)
    return transformers.MixtralForSequenceClassification(cfg)


ALL_LINEAR_CASES = {
    "llama_mts_head": (lambda: tiny_llama(V), dict(task_type="CAUSAL_LM", modules_to_save=["lm_head"])),
    "mixtral_seq_cls": (_mixtral_seq_cls, dict(task_type="SEQ_CLS")),
    "gpt2_exclude": (lambda: tiny_gpt2(V), dict(exclude_modules=["c_proj"])),
    "t5_exclude_regex": (lambda: tiny_t5(V), dict(exclude_modules=r"encoder\..*")),
}


@pytest.mark.parametrize("case", sorted(ALL_LINEAR_CASES))
def test_all_linear_saved_list_as_peft(case, tmp_path):
    make, kw = ALL_LINEAR_CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    models, saved, adapted = {}, {}, {}
    for lib in (fastpeft, peft):
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules="all-linear", **kw)).eval()
        _perturb(m)
        d = tmp_path / lib.__name__
        m.save_pretrained(d)
        models[lib.__name__], saved[lib.__name__] = m, json.loads((d / "adapter_config.json").read_text())
        adapted[lib.__name__] = {n for n, mm in m.named_modules()
                                 if hasattr(mm, "lora_A") and "modules_to_save" not in n}
    assert sorted(saved["fastpeft"]["target_modules"]) == sorted(saved["peft"]["target_modules"])
    assert adapted["fastpeft"] == adapted["peft"]
    inputs = dict(input_ids=IDS)
    if case.startswith("t5"):
        inputs["decoder_input_ids"] = IDS[:, :4]
    for owner in ("fastpeft", "peft"):  # each library loads the other's folder: the same model
        with torch.no_grad():
            want = models[owner](**inputs).logits
        for lib in (fastpeft, peft):
            loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / owner).eval()
            with torch.no_grad():
                torch.testing.assert_close(loaded(**inputs).logits, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 5: T5 / BART modules_to_save tie
def _tiny_bart():
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg)


@pytest.mark.parametrize("make", [lambda: tiny_t5(V), _tiny_bart], ids=["t5", "bart"])
def test_seq2seq_modules_to_save_tie_refused_up_front(make):
    torch.manual_seed(0)
    base = make().eval()
    kinds = [type(m) for _, m in base.named_modules()]
    with pytest.raises(ValueError, match="ensure_weight_tying=True: .*embed_tokens.* only an nn.Linear"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "q"],
                                                          modules_to_save=["lm_head"], ensure_weight_tying=True))
    assert [type(m) for _, m in base.named_modules()] == kinds  # nothing was wrapped
    with torch.no_grad():
        base(input_ids=IDS, decoder_input_ids=IDS[:, :4])


def test_llama_modules_to_save_tie_still_builds():
    torch.manual_seed(0)
    base = tiny_llama(V, tie_word_embeddings=True).eval()
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True))
    _logits(model)


def test_target_names_do_not_reach_inside_a_parametrization():
    """``target_modules=["0"]`` on a model whose layer "0" is weight-normalized adapts that layer only, not the
    module "0" torch keeps inside its parametrization ("0.parametrizations.weight.0"; peft crashes there)."""
    import fastpeft

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(3, 8)
    want = model(x)
    m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    adapted = [n for n, mod in m.named_modules() if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict)]
    assert adapted == ["base_model.model.0"]
    with m.disable_adapter():
        torch.testing.assert_close(m(x), want)
