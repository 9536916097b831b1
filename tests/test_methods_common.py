"""Shared pieces of the tests of fastpeft.methods (tiny models from configs, inputs, a short training loop),
and the tests of the dispatch point itself (build_config, errors for bad configs)."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft import methods
from helpers import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

V = 96


def llama():
    """Tiny Llama-style causal LM (grouped-query attention: 4 heads, 2 kv heads)."""
    return tiny_llama(V)


def gpt2():
    """Tiny GPT-2 (Conv1D layers, biases)."""
    return tiny_gpt2(V)


def t5():
    """Tiny T5 encoder-decoder."""
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, dropout_rate=0.0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _bert_cfg():
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64, num_labels=3,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   classifier_dropout=0.0)


def bert():
    """Tiny BERT sequence classifier (3 labels)."""
    return transformers.BertForSequenceClassification(_bert_cfg())


def bert_tok():
    """Tiny BERT token classifier (3 labels)."""
    return transformers.BertForTokenClassification(_bert_cfg())


TASKS = {llama: "CAUSAL_LM", gpt2: "CAUSAL_LM", t5: "SEQ_2_SEQ_LM", bert: "SEQ_CLS", bert_tok: "TOKEN_CLS"}


def twin(factory):
    """Two base models with identical weights (and the state dict to make more)."""
    torch.manual_seed(0)
    a = factory().eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    return a, fresh(factory, state), state


def fresh(factory, state):
    """A new base model holding ``state``."""
    m = factory().eval()
    m.load_state_dict(state)
    return m


def batch(factory, labels=True, mask=True, seed=2, n=2, length=7):
    """Inputs (with labels) fitting the task of ``factory``'s model; a ragged attention mask when ``mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, length), generator=g)
    out = {"input_ids": ids}
    if mask:
        am = torch.ones_like(ids)
        am[0, :2] = 0  # some left padding in the first row
        out["attention_mask"] = am
    task = TASKS[factory]
    if task == "SEQ_2_SEQ_LM":
        dec = torch.randint(3, V, (n, 4), generator=g)
        if labels:
            out["labels"] = dec
        else:
            out["decoder_input_ids"] = dec
    elif labels and task == "CAUSAL_LM":
        out["labels"] = ids.clone()
    elif labels and task == "SEQ_CLS":
        out["labels"] = torch.randint(0, 3, (n,), generator=g)
    elif labels and task == "TOKEN_CLS":
        out["labels"] = torch.randint(0, 3, (n, length), generator=g)
    return out


def train(model, inputs, steps=12, lr=3e-2, hook=None):
    """A few AdamW steps on one batch; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        if hook is not None:
            hook(step)
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def trainable(model):
    """Names of the trainable parameters."""
    return {k for k, p in model.named_parameters() if p.requires_grad}


def saved(folder):
    """The tensors of a saved adapter folder."""
    from safetensors.torch import load_file

    return load_file(f"{folder}/adapter_model.safetensors")


# --------------------------------------------------------------------------- build_config and dispatch
@pytest.mark.parametrize("method,opts,cls,field,value", [
    ("prefix", dict(num_virtual_tokens=5, projection=True), methods.PrefixTuningConfig, "prefix_projection", True),
    ("prompt", dict(num_virtual_tokens=3), methods.PromptTuningConfig, "num_virtual_tokens", 3),
    ("ptuning", dict(num_virtual_tokens=3, hidden_size=16), methods.PromptEncoderConfig, "encoder_hidden_size", 16),
    ("bitfit", dict(target_modules=["c_attn"]), methods.BitFitConfig, "target_modules", ["c_attn"]),
    ("freeze", dict(num_layers=1), methods.FreezeConfig, "num_trainable_layers", 1),
    ("adapter", dict(r=8), methods.BottleneckConfig, "bottleneck_size", 8),
    ("ia3", dict(target_modules=["k_proj"], feedforward_modules=[]), methods.IA3Config, "target_modules", ["k_proj"]),
    ("adalora", dict(r=6, target_r=2, total_step=10), methods.AdaLoraConfig, "init_r", 6),
])
def test_build_config(method, opts, cls, field, value):
    config = methods.build_config(method, task_type="CAUSAL_LM", unused=None, **opts)  # None options are dropped
    assert type(config) is cls and getattr(config, field) == value and config.task_type == "CAUSAL_LM"


def test_build_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        methods.build_config("dora")
    with pytest.raises(ValueError, match="does not apply"):
        methods.build_config("prefix", num_virtual_tokens=4, bottleneck_size=3)


@pytest.mark.parametrize("make,match", [
    (lambda: methods.PromptTuningConfig(num_virtual_tokens=0, task_type="CAUSAL_LM"), "num_virtual_tokens"),
    (lambda: methods.PrefixTuningConfig(task_type="CAUSAL_LM"), "num_virtual_tokens"),
    (lambda: methods.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                        prompt_tuning_init_text="hello"), "needs a tokenizer"),
    (lambda: methods.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), "MLP"),
    (lambda: methods.AdaLoraConfig(), "total_step"),
    (lambda: methods.AdaLoraConfig(total_step=10, tinit=8, tfinal=2), "budgeting phase"),
    (lambda: methods.BottleneckConfig(bottleneck_size=0), "bottleneck_size"),
    (lambda: methods.FreezeConfig(), "trains nothing"),
    (lambda: methods.FreezeConfig(num_trainable_layers=True), "num_trainable_layers"),
    (lambda: methods.BottleneckConfig(scaling="a"), "scaling"),
    (lambda: methods.BottleneckConfig(scaling=float("nan")), "scaling"),
    (lambda: methods.AdaLoraConfig(total_step=10, target_r=True), "target_r"),
    (lambda: methods.IA3Config(target_modules=["k"], feedforward_modules=["wo"]), "subset"),
    (lambda: methods.IA3Config(task_type="CLASSIFY"), "task_type"),
])
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("factory,config,match", [
    (llama, methods.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"), "encoder-decoder"),
    (t5, methods.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "SEQ_2_SEQ_LM"),
    (bert, methods.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "language-model head"),
    (llama, methods.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"), "classification head"),
    (llama, methods.PromptTuningConfig(num_virtual_tokens=4), "needs task_type"),
    (llama, methods.BitFitConfig(), "no bias parameters"),
    (llama, methods.IA3Config(target_modules=["nope"]), "not found"),
    (llama, methods.FreezeConfig(num_trainable_layers=5), "only 2 blocks"),
])
def test_method_does_not_fit(factory, config, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(factory(), config)


def test_unknown_saved_peft_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "VERA"}')
    with pytest.raises(ValueError, match="VERA"):
        fastpeft.PeftModel.from_pretrained(llama(), tmp_path)


def pair_with_peft(factory, ours_config, peft_config, seed=1):
    """fastpeft and peft models over identical base weights, with ours' adapter weights copied into peft's."""
    peft = pytest.importorskip("peft")
    a, b, state = twin(factory)
    torch.manual_seed(seed)
    ours = fastpeft.get_peft_model(a, ours_config)
    theirs = peft.get_peft_model(b, peft_config)
    res = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    return ours, theirs, state


def assert_same_layout(ours, theirs):
    """Same parameter names, same trainable set and counts as peft."""
    assert {k for k, _ in ours.named_parameters()} == {k for k, _ in theirs.named_parameters()}
    assert trainable(ours) == trainable(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def greedy_reference(model, input_ids, steps=5, seq2seq=False):
    """Greedy decoding by re-running the full forward each step (no cache): the reference for generate()."""
    with torch.no_grad():
        if seq2seq:
            dec = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
            for _ in range(steps):
                nxt = model(input_ids=input_ids, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
                dec = torch.cat([dec, nxt], 1)
            return dec
        cur = input_ids
        for _ in range(steps):
            nxt = model(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], 1)
        return cur


def test_peft_config_objects_are_accepted():
    peft = pytest.importorskip("peft")
    model = fastpeft.get_peft_model(llama(), peft.IA3Config(task_type="CAUSAL_LM"))
    assert isinstance(model.peft_config["default"], methods.IA3Config)
    assert model.get_nb_trainable_parameters()[0] == 2 * (16 + 16 + 48)


def test_forward_reports_the_base_signature():
    import inspect

    model = fastpeft.get_peft_model(t5(), methods.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    assert "decoder_input_ids" in inspect.signature(model.forward).parameters  # Trainer keeps these columns
    model = fastpeft.get_peft_model(gpt2(), methods.BitFitConfig())
    assert "token_type_ids" in inspect.signature(model.forward).parameters


def check_merge_unmerge_like_peft(ours, theirs, base_model, x, layer_type):
    """merge_adapter / unmerge_adapter / disable_adapter on a merged model, layer by layer and model-wide, against
    peft doing the same on its twin (same weights): merged base weights equal peft's, the ``merged`` state follows
    peft's, and a merged model with the adapter disabled gives the plain base model's output (peft unmerges first)."""
    import warnings

    from helpers import assert_rel

    def same_state(what):
        sd_o, sd_t = ours.state_dict(), theirs.state_dict()
        assert sd_o.keys() == sd_t.keys()
        for k in sd_t:
            assert_rel(sd_o[k].float(), sd_t[k].float(), 1e-6, f"{what}: {k}")

    layers = [m for m in ours.modules() if isinstance(m, layer_type)]
    their_layers = [m for m in theirs.modules() if type(m).__name__ == "Linear" and hasattr(m, "merged_adapters")
                    or type(m).__name__ == layer_type.__name__]
    assert layers and their_layers
    ours.eval(), theirs.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_out = base_model(**x).logits
        adapted = ours(**x).logits
        assert_rel(adapted, theirs(**x).logits, 1e-6, "adapted")
        assert (adapted - base_out).abs().max() > 1e-4, "the adapter must change the output"
        ours.merge_adapter(), theirs.merge_adapter()
        assert all(layer.merged and layer.merged_adapters == ["default"] for layer in layers)
        assert all(layer.merged for layer in their_layers)
        same_state("merged")
        assert_rel(ours(**x).logits, adapted, 1e-5, "merged output")
        ours.unmerge_adapter(), theirs.unmerge_adapter()
        assert not any(layer.merged for layer in layers) and not any(layer.merged for layer in their_layers)
        same_state("unmerged")
        assert_rel(ours(**x).logits, adapted, 1e-5, "unmerged output")
        ours.merge_adapter(), theirs.merge_adapter()
        with ours.disable_adapter(), theirs.disable_adapter():
            disabled = ours(**x).logits
            assert_rel(disabled, theirs(**x).logits, 1e-6, "merged, disabled: vs peft")
            assert_rel(disabled, base_out, 1e-5, "merged, disabled: vs the base model")
        assert not any(layer.merged for layer in layers) and not any(layer.merged for layer in their_layers)
        same_state("unmerged by disable")
        assert_rel(ours(**x).logits, adapted, 1e-5, "re-enabled")
    with pytest.warns(UserWarning, match="Already unmerged"):
        layers[0].unmerge()
    layers[0].merge()
    with pytest.warns(UserWarning, match="already merged"):
        layers[0].merge()
    layers[0].unmerge()
