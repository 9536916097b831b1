"""Prefix tuning / P-tuning v2 against peft on tiny Llama (grouped-query attention) / GPT-2 / T5: names and counts,
outputs and losses through transformers' Cache, saved tensors, loading both ways, training, generation (checked
against a no-cache greedy reference). BERT classifiers: peft 0.21.2 cannot run prefix tuning under transformers 5,
so there fastpeft is checked on its own (the prefix changes and trains the output; save → load)."""

from __future__ import annotations

import pytest
import torch
from test_methods_common import (
    TASKS,
    assert_same_layout,
    batch,
    bert,
    bert_tok,
    fresh,
    gpt2,
    greedy_reference,
    llama,
    pair_with_peft,
    saved,
    t5,
    train,
    trainable,
    twin,
)

import fastpeft
from fastpeft.methods import PrefixTuningConfig, PromptTuningConfig
from helpers import assert_rel

peft = pytest.importorskip("peft")


def _pair(factory, projection=False, n=4):
    kw = dict(num_virtual_tokens=n, task_type=TASKS[factory], prefix_projection=projection)
    return pair_with_peft(factory, PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw))


@pytest.mark.parametrize("factory,projection", [(llama, False), (llama, True), (gpt2, False), (t5, False),
                                                (t5, True)], ids=lambda v: getattr(v, "__name__", str(v)))
def test_equals_peft_and_round_trips(factory, projection, tmp_path):
    ours, theirs, state = _pair(factory, projection)
    assert_same_layout(ours, theirs)
    cfg = ours.peft_config["default"]
    if factory is llama:  # grouped-query attention: the prefix covers the 2 key/value heads
        assert (cfg.num_attention_heads, cfg.token_dim) == (2, 16)
    x = batch(factory)
    ours.train(), theirs.train()
    out_o, out_t = ours(**x), theirs(**x)
    assert_rel(out_o.logits, out_t.logits, 1e-6, "logits")
    assert abs(out_o.loss.item() - out_t.loss.item()) < 1e-6
    with ours.disable_adapter():
        assert (ours(**x).logits - out_o.logits).abs().max() > 1e-4, "the prefix must change the output"
    ours.eval()
    lo = ours(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert a.keys() == b.keys() == {"prompt_embeddings"}
    assert_rel(a["prompt_embeddings"], b["prompt_embeddings"], 1e-6, "prompt_embeddings")
    for loader in (peft.PeftModel, fastpeft.PeftModel):
        loaded = loader.from_pretrained(fresh(factory, state), tmp_path / "ours")
        assert_rel(loaded(**x).logits, lo, 1e-5, f"{loader.__module__} load")
    back = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path / "theirs")
    assert_rel(back(**x).logits, lo, 1e-5, "peft-saved adapter loaded by fastpeft")
    assert not trainable(back)


def test_position_ids_are_shifted():
    ours, theirs, _ = _pair(llama)
    x = batch(llama, mask=False, labels=False)
    pos = torch.arange(7).unsqueeze(0).expand(2, -1)
    assert_rel(ours(**x, position_ids=pos).logits, ours(**x).logits, 1e-6, "explicit positions")
    assert_rel(ours(**x, position_ids=pos).logits, theirs(**x, position_ids=pos).logits, 1e-6, "vs peft")


@pytest.mark.parametrize("factory", [llama, t5], ids=lambda f: f.__name__)
def test_training_lowers_loss(factory):
    ours, _, _ = _pair(factory, projection=True)
    losses = train(ours, batch(factory), steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("factory", [llama, gpt2], ids=lambda f: f.__name__)
def test_generate_causal(factory):
    ours, _, _ = _pair(factory)
    ids = batch(factory, labels=False, mask=False)["input_ids"]
    out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 12) and torch.equal(out, greedy_reference(ours, ids))
    # without the cache every step starts from a fresh prefix (Llama hands the grown cache back even then)
    no_cache = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             use_cache=False)
    assert torch.equal(no_cache, out)


def test_generate_seq2seq():
    ours, theirs, _ = _pair(t5)
    ids = batch(t5, labels=False, mask=False)["input_ids"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    out = ours.generate(**kw)
    assert torch.equal(out, greedy_reference(ours, ids, seq2seq=True))
    assert torch.equal(out, theirs.generate(**kw))


@pytest.mark.parametrize("factory", [bert, bert_tok], ids=lambda f: f.__name__)
def test_encoder_classifiers(factory, tmp_path):
    a, b, state = twin(factory)
    kw = dict(num_virtual_tokens=4, task_type=TASKS[factory])
    ours = fastpeft.get_peft_model(a, PrefixTuningConfig(**kw))
    theirs = peft.get_peft_model(b, peft.PrefixTuningConfig(**kw))
    assert_same_layout(ours, theirs)
    x = batch(factory)
    with torch.no_grad():
        out = ours(**x).logits
        with ours.disable_adapter():
            base = ours(**x).logits
    assert out.shape == base.shape and (out - base).abs().max() > 1e-4
    losses = train(ours, x, steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    lo = ours(**x).logits
    ours.save_pretrained(tmp_path)
    assert set(saved(tmp_path)) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    loaded = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path)
    assert_rel(loaded(**x).logits, lo, 1e-5, "loaded")
    peft.PeftModel.from_pretrained(fresh(factory, state), tmp_path)  # peft reads the folder


def test_gradient_checkpointing_is_refused():
    model = llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastpeft.get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    # turned on afterwards through the peft model (peft fails there later, on a shape mismatch in attention)
    peft_model = fastpeft.get_peft_model(llama(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft_model.gradient_checkpointing_enable()
    prompt = fastpeft.get_peft_model(llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    prompt.gradient_checkpointing_enable()  # prompt tuning: fine
    assert prompt.get_base_model().is_gradient_checkpointing


def _bert_labels(num_labels, problem_type=None):
    from test_methods_common import _bert_cfg

    cfg = _bert_cfg()
    cfg.num_labels, cfg.problem_type = num_labels, problem_type
    torch.manual_seed(0)
    import transformers

    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("num_labels,problem_type,labels", [
    (1, None, torch.tensor([0.5, -1.0])),                            # regression (MSE, squeezed)
    (3, "regression", torch.tensor([[0.5, 2.0, 1.0], [-1.0, 3.0, 0.0]])),  # problem_type from the config
    (3, None, torch.tensor([0, 2])),                                 # single-label (cross-entropy)
    (3, None, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),     # multi-label (BCE with logits)
    (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
], ids=["regression", "problem_type_regression", "single_label", "multi_label", "problem_type_multi"])
def test_encoder_classifier_loss_follows_transformers(num_labels, problem_type, labels):
    """BERT takes no cache, so fastpeft runs the head itself: its loss must be transformers' own
    (ForSequenceClassificationLoss) on the same logits, and problem_type is recorded as transformers records it."""
    import copy

    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    base = _bert_labels(num_labels, problem_type)
    ref_config = copy.deepcopy(base.config)
    model = fastpeft.get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    x = batch(bert, labels=False)
    with torch.no_grad():
        out = model(**x, labels=labels)
        expected = ForSequenceClassificationLoss(labels, out.logits, ref_config)
    assert torch.allclose(out.loss, expected, atol=1e-6), (out.loss, expected)
    assert model.base_model.config.problem_type == ref_config.problem_type


def test_token_classifier_loss_follows_transformers():
    from transformers.loss.loss_utils import ForTokenClassification

    a, _, _ = twin(bert_tok)
    model = fastpeft.get_peft_model(a, PrefixTuningConfig(num_virtual_tokens=3, task_type="TOKEN_CLS")).eval()
    x = batch(bert_tok)
    x["labels"][0, :2] = -100  # ignored positions
    with torch.no_grad():
        out = model(**x)
        expected = ForTokenClassification(out.logits, x["labels"], model.base_model.config)
    assert torch.allclose(out.loss, expected, atol=1e-6), (out.loss, expected)
