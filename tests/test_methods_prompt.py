"""Prompt tuning and P-tuning v1 against peft on tiny Llama / GPT-2 / T5 / BERT: parameter names and counts,
outputs and losses (attention mask with padding, labels), saved tensors, loading both ways, text init, training,
generation (against a no-cache greedy reference: peft 0.21.2's own generate is wrong under transformers 5)."""

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
)

import fastpeft
from fastpeft.methods import PromptEncoderConfig, PromptTuningConfig
from helpers import assert_rel

peft = pytest.importorskip("peft")

KINDS = {
    "prompt": (PromptTuningConfig, "PromptTuningConfig", {}),
    "ptuning_mlp": (PromptEncoderConfig, "PromptEncoderConfig", dict(encoder_hidden_size=16)),
    "ptuning_lstm": (PromptEncoderConfig, "PromptEncoderConfig",
                     dict(encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
}


def _pair(factory, kind, n=4):
    ours_cls, peft_name, kw = KINDS[kind]
    task = TASKS[factory]
    return pair_with_peft(factory, ours_cls(num_virtual_tokens=n, task_type=task, **kw),
                          getattr(peft, peft_name)(num_virtual_tokens=n, task_type=task, **kw))


@pytest.mark.parametrize("factory,kind", [(llama, "prompt"), (gpt2, "ptuning_mlp"), (t5, "prompt"),
                                          (t5, "ptuning_mlp"), (bert, "prompt"), (llama, "ptuning_lstm")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_equals_peft_and_round_trips(factory, kind, tmp_path):
    ours, theirs, state = _pair(factory, kind)
    assert_same_layout(ours, theirs)
    x = batch(factory)  # ragged attention mask and labels
    ours.train(), theirs.train()
    out_o, out_t = ours(**x), theirs(**x)
    assert_rel(out_o.logits, out_t.logits, 1e-6, "logits")
    assert abs(out_o.loss.item() - out_t.loss.item()) < 1e-6
    with ours.disable_adapter():
        base = ours(**x).logits
    n = 4 if TASKS[factory] in ("CAUSAL_LM",) else 0
    assert (out_o.logits[:, n:] - base).abs().max() > 1e-4, "the virtual tokens must change the output"
    ours.eval()
    lo = ours(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert a.keys() == b.keys() and "prompt_embeddings" in a
    for k in a:
        assert_rel(a[k], b[k], 1e-6, k)
    for loader in (peft.PeftModel, fastpeft.PeftModel):
        loaded = loader.from_pretrained(fresh(factory, state), tmp_path / "ours")
        assert_rel(loaded(**x).logits, lo, 1e-5, f"{loader.__module__} load")
    back = fastpeft.PeftModel.from_pretrained(fresh(factory, state), tmp_path / "theirs", is_trainable=True)
    assert_rel(back(**x).logits, lo, 1e-5, "peft-saved adapter loaded by fastpeft")
    assert trainable(back) >= {"prompt_encoder.default.embedding.weight"}


def _tokenizer(folder):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["classify", "the", "sentiment", "of", "this", "review", "[UNK]"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: 10 + i for i, w in enumerate(words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)
    return fast


def test_text_init_equals_peft(tmp_path):
    tok = _tokenizer(tmp_path / "tok")
    text = "classify the sentiment"
    kw = dict(num_virtual_tokens=7, task_type="CAUSAL_LM", prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    ours, theirs, _ = pair_with_peft(llama, PromptTuningConfig(tokenizer_name_or_path=str(tmp_path / "tok"), **kw),
                                     peft.PromptTuningConfig(tokenizer_name_or_path=str(tmp_path / "tok"), **kw))
    w = theirs.prompt_encoder["default"].embedding.weight
    emb = theirs.get_base_model().get_input_embeddings().weight
    assert torch.equal(w[:3], emb[[10, 11, 12]]) and torch.equal(w[3:6], w[:3]), "peft repeats the text's tokens"
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, w)
    with_obj = fastpeft.get_peft_model(llama(), PromptTuningConfig(tokenizer=tok, **kw))
    emb2 = with_obj.get_base_model().get_input_embeddings().weight
    assert torch.equal(with_obj.prompt_encoder["default"].embedding.weight, emb2[[10, 11, 12, 10, 11, 12, 10]])
    assert "tokenizer" not in with_obj.peft_config["default"].to_dict()


def test_sample_vocab_init_uses_vocabulary_rows():
    model = fastpeft.get_peft_model(llama(), PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM",
                                                                prompt_tuning_init="SAMPLE_VOCAB"))
    w = model.prompt_encoder["default"].embedding.weight
    emb = model.get_base_model().get_input_embeddings().weight
    assert all(any(torch.equal(row, e) for e in emb) for row in w)


@pytest.mark.parametrize("factory,kind", [(llama, "prompt"), (t5, "ptuning_mlp")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_training_lowers_loss(factory, kind):
    ours, _, _ = _pair(factory, kind)
    losses = train(ours, batch(factory), steps=10, lr=0.3)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in ours.named_parameters() if "prompt" not in n)


@pytest.mark.parametrize("factory,kind", [(llama, "prompt"), (gpt2, "ptuning_mlp")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_generate_causal(factory, kind):
    ours, _, _ = _pair(factory, kind)
    ids = batch(factory, labels=False, mask=False)["input_ids"]
    out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_reference(ours, ids))


def test_generate_seq2seq_equals_peft():
    ours, theirs, _ = _pair(t5, "prompt")
    ids = batch(t5, labels=False, mask=False)["input_ids"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    out = ours.generate(**kw)
    assert torch.equal(out, theirs.generate(**kw))
    assert torch.equal(out, greedy_reference(ours, ids, seq2seq=True))


def test_token_classification_extends_labels():
    model = fastpeft.get_peft_model(bert_tok(), PromptTuningConfig(num_virtual_tokens=3, task_type="TOKEN_CLS"))
    x = batch(bert_tok)
    out = model(**x)
    assert out.logits.shape == (2, 10, 3)
    ref = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, 3), x["labels"].reshape(-1))
    assert abs(out.loss.item() - ref.item()) < 1e-6
    assert {n for n in trainable(model) if "classifier" in n} == {
        "base_model.classifier.modules_to_save.default.weight", "base_model.classifier.modules_to_save.default.bias"}


class _NamelessTokenizer:
    """A tokenizer object without ``name_or_path`` (e.g. built in code): word -> id, nothing to load by name."""

    def __call__(self, text):
        return {"input_ids": [10 + len(w) for w in text.split()]}


def test_text_init_with_a_nameless_tokenizer_reloads(tmp_path):
    import json

    kw = dict(num_virtual_tokens=5, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
              prompt_tuning_init_text="classify the sentiment")
    base = llama().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = fastpeft.get_peft_model(base, PromptTuningConfig(tokenizer=_NamelessTokenizer(), **kw)).eval()
    emb = ours.get_base_model().get_input_embeddings().weight
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, emb[[18, 13, 19, 18, 13]])
    x = batch(llama, labels=False)
    lo = ours(**x).logits
    ours.save_pretrained(tmp_path / "a")
    saved_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved_cfg["tokenizer_name_or_path"] is None and saved_cfg["prompt_tuning_init"] == "RANDOM"
    for loader, trainable_ in ((peft.PeftModel, False), (fastpeft.PeftModel, False), (fastpeft.PeftModel, True)):
        loaded = loader.from_pretrained(fresh(llama, state), tmp_path / "a", is_trainable=trainable_).eval()
        assert_rel(loaded(**x).logits, lo, 1e-5, f"{loader.__module__} load, is_trainable={trainable_}")
    # a folder as older fastpeft wrote it (TEXT, no tokenizer name): fastpeft still loads it
    saved_cfg["prompt_tuning_init"] = "TEXT"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved_cfg))
    loaded = fastpeft.PeftModel.from_pretrained(fresh(llama, state), tmp_path / "a")
    assert_rel(loaded(**x).logits, lo, 1e-5, "fastpeft load of a TEXT config without tokenizer name")
    assert loaded.peft_config["default"].prompt_tuning_init == "TEXT"
    # such a config cannot initialise a new adapter: it asks for a tokenizer
    config = PromptTuningConfig.from_pretrained(tmp_path / "a")
    config.inference_mode = False
    with pytest.raises(ValueError, match="needs a tokenizer"):
        fastpeft.get_peft_model(fresh(llama, state), config)
