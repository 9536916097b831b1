"""``LoraConfig(trainable_token_indices=...)`` against peft 0.21.2 on a tiny Llama (tied and untied embeddings)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import fastpeft
from fastpeft.layers.tokens import TrainableTokensWrapper
from helpers import assert_rel, grads_match, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 96
IDS = [1, 5, 7]
EMB = "base_model.model.model.embed_tokens"
DELTA = f"{EMB}.token_adapter.trainable_tokens_delta"


def _llama(tie=False):
    torch.manual_seed(0)
    return tiny_llama(V, tie_word_embeddings=tie).eval()


def _kw(**overrides):
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
              trainable_token_indices=IDS)
    kw.update(overrides)
    return kw


def _pair(tie=False, **overrides):
    """(fastpeft model, peft model) on the same base, the same LoRA weights and trained-looking token rows."""
    kw = _kw(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_llama(tie), fastpeft.LoraConfig(**kw))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_llama(tie), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, theirs


def _ids():
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    ids[:, :3] = torch.tensor(IDS)
    return ids


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("tie", [False, True])
def test_layout_trainable_set_and_init_like_peft(tie):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ours = fastpeft.get_peft_model(_llama(tie), fastpeft.LoraConfig(**_kw()))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_llama(tie), peft.LoraConfig(**_kw()))
    assert _trainable(ours) == _trainable(theirs)
    assert f"{DELTA}.default" in _trainable(ours)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)  # tied: lm_head.token_adapter.* too, as peft
    for k in sd_ours:
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], rtol=0, atol=0, msg=k)
    delta = ours.get_parameter(f"{DELTA}.default")
    assert torch.equal(delta, _llama(tie).model.embed_tokens.weight[IDS])  # the original rows at init
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.base_model.model.model.embed_tokens.num_embeddings == V  # attributes of the wrapped layer
    if tie:  # the head follows the embeddings: one parameter, shared
        head = ours.base_model.model.lm_head
        assert isinstance(head, TrainableTokensWrapper) and head.is_tied
        assert head.token_adapter.trainable_tokens_delta["default"] is delta


@pytest.mark.parametrize("tie", [False, True])
def test_forward_and_gradients_like_peft(tie):
    ours, theirs = _pair(tie)
    ids = _ids()
    lo, lt = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(lo, lt, rtol=0, atol=0)
    base = _llama(tie)(input_ids=ids).logits
    assert not torch.allclose(lo, base)
    go = grads_match(ours, theirs, lo, lt)  # (within 1e-5: fastpeft's LoRA kernels sum in another order)
    assert go[f"{DELTA}.default"].abs().sum() > 0
    emb = ours.base_model.model.model.embed_tokens.token_adapter.base_layer.weight
    assert emb.grad is None and not emb.requires_grad


@pytest.mark.parametrize("tie", [False, True])
def test_saved_files_like_peft_and_loaded_both_ways(tmp_path, tie):
    ours, theirs = _pair(tie)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    so = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    st = safetensors_torch.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(so) == sorted(st)
    assert DELTA in so and not any("lm_head" in k or "base_layer" in k for k in so)
    for k in so:
        assert torch.equal(so[k], st[k]), k
    co = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ct = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert co["trainable_token_indices"] == ct["trainable_token_indices"] == IDS
    ids = _ids()
    want = theirs(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours2 = fastpeft.PeftModel.from_pretrained(_llama(tie), tmp_path / "theirs")
        theirs2 = peft.PeftModel.from_pretrained(_llama(tie), tmp_path / "ours")
    torch.testing.assert_close(ours2(input_ids=ids).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(theirs2(input_ids=ids).logits, want, rtol=0, atol=0)
    assert ours2.peft_config["default"].trainable_token_indices == IDS


@pytest.mark.parametrize("tie", [False, True])
def test_disable_merge_unmerge_and_unload_like_peft(tie):
    ours, theirs = _pair(tie)
    ids = _ids()
    base = _llama(tie)(input_ids=ids).logits
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(input_ids=ids).logits, base, rtol=1e-6, atol=1e-6)
    want = theirs(input_ids=ids).logits
    ours.base_model.merge_adapter()
    emb = ours.base_model.model.model.embed_tokens
    assert emb.token_adapter.merged
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
    ours.base_model.unmerge_adapter()
    assert torch.equal(emb.token_adapter.base_layer.weight, _llama(tie).model.embed_tokens.weight)
    merged_o, merged_t = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_o.model.embed_tokens) is torch.nn.Embedding
    assert type(merged_o.lm_head) is torch.nn.Linear
    assert (merged_o.lm_head.weight is merged_o.model.embed_tokens.weight) == tie
    so, st = merged_o.state_dict(), merged_t.state_dict()
    assert list(so) == list(st)
    for k in so:
        torch.testing.assert_close(so[k], st[k], rtol=0, atol=0, msg=k)
    unloaded = _pair(tie)[0].unload()
    assert torch.equal(unloaded.model.embed_tokens.weight, _llama(tie).model.embed_tokens.weight)


def test_dict_form_on_untied_embeddings_and_head_like_peft(tmp_path):
    tti = {"embed_tokens": [2, 3], "lm_head": [4, 90]}
    ours, theirs = _pair(False, trainable_token_indices=tti)
    assert _trainable(ours) == _trainable(theirs)
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default" in _trainable(ours)
    ids = _ids()
    lo, lt = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(lo, lt, rtol=0, atol=0)
    lo.sum().backward()
    lt.sum().backward()
    for (n, p), (_, q) in zip(((n, p) for n, p in ours.named_parameters() if p.requires_grad),
                              ((n, p) for n, p in theirs.named_parameters() if p.requires_grad)):
        assert_rel(p.grad, q.grad, 1e-5, n)
    ours.save_pretrained(tmp_path / "o")
    theirs.save_pretrained(tmp_path / "t")
    so = safetensors_torch.load_file(tmp_path / "o" / "adapter_model.safetensors")
    st = safetensors_torch.load_file(tmp_path / "t" / "adapter_model.safetensors")
    assert sorted(so) == sorted(st) and all(torch.equal(so[k], st[k]) for k in so)


def test_tied_pair_with_same_ids_in_dict_form_follows_like_peft():
    ours, theirs = _pair(True, trainable_token_indices={"embed_tokens": IDS, "lm_head": IDS})
    assert _trainable(ours) == _trainable(theirs) == [n for n in _trainable(ours) if "lm_head" not in n]
    assert ours.base_model.model.lm_head.is_tied
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


def test_second_adapter_set_adapter_and_delete_like_peft():
    ours, theirs = _pair(False)
    for m in (ours, theirs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(4)
            m.add_adapter("other", type(m.peft_config["default"])(**_kw(trainable_token_indices=[10, 11])))
    assert _trainable(ours) == _trainable(theirs)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert _trainable(ours) == _trainable(theirs)
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Only one adapter"):
        ours.set_adapter(["default", "other"])
    ours.delete_adapter("other")
    theirs.delete_adapter("other")
    assert _trainable(ours) == _trainable(theirs)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


def test_config_field_kept_and_checked():
    cfg = fastpeft.LoraConfig(trainable_token_indices=(3, 4))
    assert cfg.trainable_token_indices == [3, 4] and cfg.to_dict()["trainable_token_indices"] == [3, 4]
    assert "trainable_token_indices" not in cfg.extra
    assert fastpeft.LoraConfig.from_dict(cfg.to_dict()).trainable_token_indices == [3, 4]
    with pytest.raises(ValueError, match="non-negative"):
        fastpeft.LoraConfig(trainable_token_indices=[-1, 2])
    with pytest.raises(ValueError, match="more than once"):
        fastpeft.LoraConfig(trainable_token_indices=[2, 2])
    with pytest.raises(TypeError, match="list of ints"):
        fastpeft.LoraConfig(trainable_token_indices={"embed_tokens": "1"})
    with pytest.raises(TypeError, match="list of ints"):
        fastpeft.LoraConfig(trainable_token_indices=[1.0])


@pytest.mark.parametrize("kw, err, match", [
    (dict(trainable_token_indices=[1, V]), ValueError, "out of range"),
    (dict(trainable_token_indices={"nonexistent": [1]}), ValueError, "not found"),
    (dict(trainable_token_indices={"q_proj": [1]}), TypeError, "cannot be applied"),
    (dict(target_modules=["q_proj", "embed_tokens"]), TypeError, "cannot be applied"),
    (dict(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"]), ValueError,
     "trained fully"),
    (dict(trainable_token_indices={"norm": [1]}), TypeError, "cannot be applied"),
])
def test_bad_input_raises_before_anything_is_wrapped(kw, err, match):
    model = _llama()
    with pytest.raises(err, match=match):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(**_kw(**kw)))
    assert not any(isinstance(m, TrainableTokensWrapper) or hasattr(m, "lora_A") for m in model.modules())


def test_a_tied_head_in_modules_to_save_is_refused_before_anything_is_wrapped():
    """The head follows the embeddings' rows and would be a fully trained copy: contradictory (peft nests its
    modules_to_save wrapper inside the token wrapper); refused, naming both options, with the model untouched."""
    for first in (None, dict(target_modules=["q_proj"])):
        model = _llama(True)
        kw = _kw(modules_to_save=["lm_head"])
        if first is not None:  # the same as a second adapter
            model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**first))
        before = sorted(n for n, _ in model.named_modules())
        with pytest.raises(ValueError, match="'lm_head' shares its weight.*in modules_to_save"):
            if first is None:
                fastpeft.get_peft_model(model, fastpeft.LoraConfig(**kw))
            else:
                model.add_adapter("other", fastpeft.LoraConfig(**kw))
        assert sorted(n for n, _ in model.named_modules()) == before


def test_lora_on_a_tied_head_and_mixed_batches_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.get_peft_model(_llama(True), fastpeft.LoraConfig(**_kw(target_modules=["q_proj", "lm_head"])))
    ours, _ = _pair(False)
    with pytest.raises(ValueError, match="mixed adapter batches"):
        ours(input_ids=_ids(), adapter_names=["default", "default"])


def test_loading_a_file_with_other_rows_count_fails_clearly(tmp_path):
    ours, _ = _pair(False)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [1, 2]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        fastpeft.PeftModel.from_pretrained(_llama(), tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize("tie", [False, True])
def test_to_peft_keeps_the_rows(tie):
    ours, theirs = _pair(tie)
    ids = _ids()
    converted = fastpeft.to_peft(ours)
    assert isinstance(converted, peft.PeftModel)
    torch.testing.assert_close(converted(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
