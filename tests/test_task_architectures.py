"""A sweep over transformers' non-causal architectures and task types (tiny random configs): fastpeft's LoRA against
peft's for SEQ_CLS (encoders and a decoder classifier), TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION and SEQ_2_SEQ_LM
(text and speech) — the adapted layers and the head peft adds to ``modules_to_save`` (state-dict keys, saved config
fields, seeded init), outputs with labels, gradients and which parameters train, greedy generation, files both ways,
merge_and_unload; and the default targets (``target_modules=None``) of each model type, or peft's refusal.

Known differences left as they are (peft's quirks or crashes, see the comments): peft crashes on "all-linear" for
TOKEN_CLS/QUESTION_ANS and DistilBERT SEQ_CLS, and on Whisper under PeftModelForSeq2SeqLM; peft repeats the head names
in modules_to_save (["classifier", "classifier", "score"] when given "classifier"), fastpeft lists each once."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

_BERT = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0, num_labels=3)
ENCODERS = {
    "bert": _BERT,
    "roberta": dict(_BERT, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "distilbert": dict(vocab_size=97, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
                       pad_token_id=0, num_labels=3),
    "deberta-v2": _BERT,
    "electra": dict(_BERT, embedding_size=32),
    "modernbert": dict(_BERT, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=16,
                       global_attn_every_n_layers=2),
    "albert": dict(_BERT, embedding_size=16, bos_token_id=1, eos_token_id=2),
    "llama": dict(_BERT, num_key_value_heads=2, bos_token_id=1, eos_token_id=2),
    "deberta": _BERT,
}
_S2S = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
_T5 = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
SEQ2SEQ = {
    "t5": _T5, "mt5": _T5, "bart": dict(_S2S, forced_eos_token_id=None),
    "marian": dict(_S2S, decoder_start_token_id=0, decoder_vocab_size=97), "pegasus": _S2S,
    "whisper": dict(_S2S, num_mel_bins=8, max_source_positions=8, max_target_positions=32, suppress_tokens=None,
                    begin_suppress_tokens=None),
}
IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 2]])
DEC = torch.tensor([[1, 6, 10, 12, 2]])
_TASK_AUTO = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
              "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
              "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def _base(model_type: str, task: str) -> torch.nn.Module:
    kw = SEQ2SEQ[model_type] if task == "SEQ_2_SEQ_LM" or model_type not in ENCODERS else ENCODERS[model_type]
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = transformers.AutoConfig.for_model(model_type, **dict(kw, num_labels=2 if task == "QUESTION_ANS" else 3))
    auto = getattr(transformers, "WhisperForConditionalGeneration" if model_type == "whisper" else _TASK_AUTO[task])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (auto(config) if model_type == "whisper" else auto.from_config(config)).eval()


def _both(base, task, **kw):
    # peft's PeftModelForSeq2SeqLM.forward passes input_ids=None, which Whisper hands on to its decoder next to
    # decoder_input_ids (TypeError: got multiple values for 'input_ids'): Whisper is adapted without a task type,
    # as in peft's Whisper examples
    task = None if base.config.model_type == "whisper" else task
    kw = {"r": 4, "lora_alpha": 8, "task_type": task, "init_lora_weights": False, **kw}
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib in (peft, fastpeft):
            torch.manual_seed(1)
            models.append(lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**copy.deepcopy(kw))))  # (peft
            # extends the modules_to_save list it is given)
    return models


def _config_fields(model) -> tuple:
    c = model.peft_config["default"]
    return (sorted(c.target_modules) if not isinstance(c.target_modules, str) else c.target_modules,
            sorted(set(c.modules_to_save or ())), dict(c.rank_pattern or {}), dict(c.alpha_pattern or {}))


def _inputs(model_type: str, task: str, labels: bool = True) -> dict:
    if model_type == "whisper":
        torch.manual_seed(2)
        x = {"input_features": torch.randn(1, 8, 16), "decoder_input_ids": DEC}
    elif task == "SEQ_2_SEQ_LM":
        x = {"input_ids": IDS, "decoder_input_ids": DEC}
    else:
        x = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    if labels:
        x.update({"SEQ_CLS": {"labels": torch.tensor([2])}, "TOKEN_CLS": {"labels": IDS % 3},
                  "QUESTION_ANS": {"start_positions": torch.tensor([2]), "end_positions": torch.tensor([5])},
                  "SEQ_2_SEQ_LM": {"labels": DEC}}.get(task, {}))
    return x


def _out(y):
    if hasattr(y, "logits"):
        return y.logits
    if hasattr(y, "start_logits"):
        return torch.cat([y.start_logits, y.end_logits])
    return y.last_hidden_state


def _loss(y):
    return y.loss if getattr(y, "loss", None) is not None else _out(y).pow(2).mean()


def _saved(path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def _check(model_type, task, tmp_path, full=True, **kw):
    base = _base(model_type, task)
    p, f = _both(base, task, **kw)
    assert type(f).__name__ == type(p).__name__
    assert set(f.state_dict()) == set(p.state_dict())
    assert _config_fields(f) == _config_fields(p)
    for key, value in p.state_dict().items():  # the same draws under the same seed
        torch.testing.assert_close(f.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    trainable = {n for n, q in p.named_parameters() if q.requires_grad}
    assert {n for n, q in f.named_parameters() if q.requires_grad} == trainable
    if any(hasattr(base, h) for h in ("classifier", "score", "qa_outputs")):  # the head: trained in full and saved
        assert any(".modules_to_save.default." in n for n in trainable)
    x = _inputs(model_type, task)
    yp, yf = p(**x), f(**x)
    torch.testing.assert_close(_out(yf), _out(yp), rtol=1e-5, atol=1e-5)
    if full:
        _loss(yp).backward()
        _loss(yf).backward()
        ours = dict(f.named_parameters())
        for name, param in p.named_parameters():
            if param.requires_grad:
                # fp32 sums in another order (peft's unfused path vs the fused op): elementwise up to 1e-5 of the
                # tensor's largest gradient (4e-6 of 3.3 seen on an AMD EPYC CPU for mt5's attention)
                scale = max(float(param.grad.abs().max()), 1e-3) if param.grad is not None else 1.0
                torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    plain = _inputs(model_type, task, labels=False)
    with torch.no_grad():
        if task == "SEQ_2_SEQ_LM" and full:
            gen = {k: v for k, v in plain.items() if k != "decoder_input_ids"}
            assert torch.equal(f.generate(**gen, max_new_tokens=4, do_sample=False),
                               p.generate(**gen, max_new_tokens=4, do_sample=False))
        want = _out(p(**plain))
        p.save_pretrained(tmp_path / "p")
        f.save_pretrained(tmp_path / "f")
        assert _saved(tmp_path / "f").keys() == _saved(tmp_path / "p").keys()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "f").eval()
            by_fast = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
        assert type(by_fast).__name__ == type(by_peft).__name__
        torch.testing.assert_close(_out(by_peft(**plain)), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_out(by_fast(**plain)), want, rtol=1e-5, atol=1e-5)
        if full:
            merged = f.merge_and_unload()
            torch.testing.assert_close(_out(merged(**plain)), want, rtol=1e-4, atol=1e-5)


# (BART's classifier (as T5's) is "classification_head", a name peft does not add to modules_to_save: not trained)
CASES = [*[(m, "SEQ_CLS") for m in [*ENCODERS, "bart"]], ("bert", "TOKEN_CLS"), ("roberta", "TOKEN_CLS"),
         ("llama", "TOKEN_CLS"), ("bert", "QUESTION_ANS"), ("deberta-v2", "QUESTION_ANS"),
         ("bert", "FEATURE_EXTRACTION"), ("llama", "FEATURE_EXTRACTION"), *[(m, "SEQ_2_SEQ_LM") for m in SEQ2SEQ]]


# peft crashes with "all-linear" on these (TypeError: modules_to_save cannot be applied to modules of type
# lora.Linear): for TOKEN_CLS/QUESTION_ANS it adds the head to modules_to_save only after injecting LoRA into it (the
# head is left out of "all-linear" only for SEQ_CLS); for DistilBERT it wraps modules_to_save by a bare suffix match,
# so "classifier" takes in the already adapted "pre_classifier". fastpeft keeps the head out of the targets.
# (fastpeft's outputs there are checked against peft's of explicit targets in test_all_linear_on_heads_peft_refuses)
def _peft_crashes(model_type, task):
    return task in ("TOKEN_CLS", "QUESTION_ANS") or (model_type, task) == ("distilbert", "SEQ_CLS")


@pytest.mark.parametrize(("model_type", "task"), CASES)
def test_all_linear_matches_peft(model_type, task, tmp_path):
    if _peft_crashes(model_type, task):
        pytest.skip("peft's get_peft_model raises TypeError (see _peft_crashes)")
    _check(model_type, task, tmp_path, target_modules="all-linear")


@pytest.mark.parametrize(("model_type", "task"), CASES)
def test_default_targets_match_peft(model_type, task, tmp_path):
    base = _base(model_type, task)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task))
    except ValueError:  # peft has no default for this model type: fastpeft refuses too
        with pytest.raises(ValueError, match="target_modules"):
            fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(task_type=task))
        return
    _check(model_type, task, tmp_path, full=False)  # (gradients, generate and merging: in the all-linear test)


def test_all_linear_config_lists_layers_as_peft():
    """Regressions: the saved target_modules of "all-linear" name, as peft's, the linear layers inside
    modules_to_save (roberta's classifier.dense, not adapted) but not a SEQ_CLS head, and a list of 20 or more is
    condensed to name suffixes (T5); the classifier head's names ("classifier", "score") both go into
    modules_to_save whichever the model has."""
    _, f = _both(_base("roberta", "SEQ_CLS"), "SEQ_CLS", target_modules="all-linear")
    c = f.peft_config["default"]
    assert {"classifier.dense", "classifier.out_proj"} <= set(c.target_modules)
    assert c.modules_to_save == ["classifier", "score"]
    assert not hasattr(f.base_model.model.classifier.modules_to_save.default.dense, "lora_A")
    _, f = _both(_base("bert", "SEQ_CLS"), "SEQ_CLS", target_modules="all-linear")
    assert "classifier" not in f.peft_config["default"].target_modules
    _, f = _both(_base("t5", "SEQ_2_SEQ_LM"), "SEQ_2_SEQ_LM", target_modules="all-linear")
    assert f.peft_config["default"].target_modules == ["k", "o", "q", "v", "wi", "wo"]


def test_default_target_modules_are_peft_s():
    """Regression: fastpeft's defaults for target_modules=None are peft's mapping, entry for entry (fastpeft had
    defaults of its own for distilbert, mbart, phi3, …, where peft raises, and others for deberta and phi)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    from fastpeft.config import DEFAULT_TARGET_MODULES as ours

    assert ours == theirs


def test_distilbert_pre_classifier_is_saved_as_peft_s(tmp_path):
    """Regression: peft wraps modules_to_save by a bare suffix match (``key.endswith("classifier")``), so on DistilBERT
    its SEQ_CLS model trains and saves ``pre_classifier`` in full with the head; fastpeft does the same (it matched at
    a dot, and a peft file's trained pre_classifier was lost when saved again)."""
    base = _base("distilbert", "SEQ_CLS")
    _check("distilbert", "SEQ_CLS", tmp_path, target_modules=["q_lin", "v_lin"])
    p, f = _both(base, "SEQ_CLS", target_modules=["q_lin", "v_lin"])
    assert "base_model.model.pre_classifier.modules_to_save.default.weight" in dict(f.named_parameters())
    # "all-linear": peft adapts pre_classifier and then fails to wrap it (TypeError); fastpeft leaves it a LoRA layer
    f = fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert hasattr(f.base_model.model.pre_classifier, "lora_A")
    assert isinstance(f.base_model.model.classifier, fastpeft.ModulesToSaveWrapper)


@pytest.mark.parametrize(("model_type", "task"), [("bert", "TOKEN_CLS"), ("bert", "QUESTION_ANS")])
def test_all_linear_on_heads_peft_refuses(model_type, task, tmp_path):
    """Where peft's get_peft_model crashes on "all-linear" (the head adapted, then wrapped), fastpeft adapts the same
    layers as peft's explicit list of them and keeps the head in modules_to_save: the same model, and the file loads
    in peft (the head not in the saved target_modules)."""
    base = _base(model_type, task)
    torch.manual_seed(1)
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, task_type=task, target_modules="all-linear", init_lora_weights=False))
    names = f.peft_config["default"].target_modules
    head = _config_fields(f)[1][0]
    assert head not in names and isinstance(f.base_model.model.get_submodule(head), fastpeft.ModulesToSaveWrapper)
    p, g = _both(base, task, target_modules=names)
    assert set(g.state_dict()) == set(f.state_dict()) == set(p.state_dict())
    x = _inputs(model_type, task, labels=False)
    with torch.no_grad():
        torch.testing.assert_close(_out(f(**x)), _out(p(**x)), rtol=1e-5, atol=1e-5)
        f.save_pretrained(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(_out(loaded(**x)), _out(p(**x)), rtol=1e-5, atol=1e-5)


def test_whisper_seq2seq_task_type_runs_where_peft_s_does_not():
    """peft's PeftModelForSeq2SeqLM cannot run Whisper (its forward passes input_ids=None, which Whisper hands to the
    decoder with decoder_input_ids: TypeError); fastpeft's does, with the outputs of peft's task-less model."""
    base = _base("whisper", "SEQ_2_SEQ_LM")
    p, _ = _both(base, "SEQ_2_SEQ_LM", target_modules=["q_proj", "fc1"])
    torch.manual_seed(1)
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM", target_modules=["q_proj", "fc1"], init_lora_weights=False))
    assert type(f).__name__ == "PeftModelForSeq2SeqLM"
    x = _inputs("whisper", "SEQ_2_SEQ_LM")
    torch.testing.assert_close(f(**x).logits, p(**x).logits, rtol=1e-5, atol=1e-5)


def test_other_methods_name_both_heads_as_peft():
    """Regression: IA3 and prompt tuning on a SEQ_CLS model save modules_to_save with both head names, as peft (only
    the present one before); peft's prompt tuning repeats them, hence the set."""
    base = _base("bert", "SEQ_CLS")
    for name, kw in [("IA3Config", dict(target_modules=["query", "value"], feedforward_modules=[])),
                     ("PromptTuningConfig", dict(num_virtual_tokens=2))]:
        got = []
        for lib in (peft, fastpeft):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, name)(task_type="SEQ_CLS", **kw))
            got.append(model.peft_config["default"].modules_to_save)
        assert got[1] == ["classifier", "score"] and set(got[0]) == set(got[1]), name


@pytest.mark.parametrize("model_type", ["t5", "marian"])
def test_trainable_tokens_reach_seq2seq_embeddings_as_peft(model_type, tmp_path):
    """Regression: on transformers 5's T5 and Marian the encoder's and decoder's embed_tokens are embeddings of their
    own over the shared weight; trainable_token_indices follow the input embeddings' rows in them (and in lm_head),
    as peft does, not only in ``shared`` and the head (the tokens did not reach the encoder or decoder inputs);
    Marian's ``shared`` (the weight's holder, unused) is not wrapped, as in peft."""
    _check(model_type, "SEQ_2_SEQ_LM", tmp_path, full=False, target_modules=["q" if model_type == "t5" else "q_proj"],
           trainable_token_indices=[3, 5])
    base = _base(model_type, "SEQ_2_SEQ_LM")
    p, f = _both(base, "SEQ_2_SEQ_LM", target_modules=["q" if model_type == "t5" else "q_proj"],
                 trainable_token_indices=[3, 5])
    x = {"input_ids": torch.tensor([[3, 5, 7, 3, 2]]), "decoder_input_ids": torch.tensor([[0, 5, 3]])}
    with torch.no_grad():
        for model in (p, f):
            for name, q in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    q.add_(1.0)
        torch.testing.assert_close(f(**x).logits, p(**x).logits, rtol=1e-5, atol=1e-5)
