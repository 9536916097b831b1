"""Shared test helpers: the fp64 reference and the tolerance rule of ../shared/TESTING.md."""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.reference import dropout_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def keep_scale64(p: float) -> float:
    """What a kept element is multiplied by at dropout probability ``p``, written out independently of fastpeft:
    the inverse of the exact keep probability of the 16-bit threshold ``round(p·65536)`` (capped at 65535 below
    p = 1), so that dropout is unbiased; 0 at p = 1, where nothing is kept."""
    threshold = 65536 if p >= 1.0 else min(round(p * 65536), 65535)
    return 0.0 if threshold == 65536 else 65536.0 / (65536 - threshold)


def lora_ref64(x2d, weight, bias, A, B, scale, p=0.0, seed=None, fan_in_fan_out=False):
    """Independent fp64 LoRA forward; the dropout mask (if any) is replayed from ``seed``."""
    xd = x2d.double()
    w = weight.double().t() if fan_in_fan_out else weight.double()
    if p > 0:
        keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p)
        xdrop = xd * keep.double() * keep_scale64(p)
    else:
        xdrop = xd
    y = xd @ w.t() + scale * (xdrop @ A.double().t()) @ B.double().t()
    if bias is not None:
        y = y + bias.double()
    return y


def lora_grads64(dy, x2d, weight, A, B, scale, p=0.0, seed=None, fan_in_fan_out=False, bias=True):
    """fp64 gradients (dx, dA, dB, dbias) of ``(lora_ref64 · dy).sum()`` by autograd."""
    x = x2d.detach().double().requires_grad_()
    A64 = A.detach().double().requires_grad_()
    B64 = B.detach().double().requires_grad_()
    b64 = torch.zeros(dy.shape[1], dtype=torch.float64, requires_grad=True) if bias else None
    y = lora_ref64(x, weight, b64, A64, B64, scale, p, seed, fan_in_fan_out)
    y.backward(dy.double())
    return x.grad, A64.grad, B64.grad, (b64.grad if bias else None)


def assert_finite_like(ours, ref, name=""):
    bad_ours, bad_ref = ~torch.isfinite(ours), ~torch.isfinite(ref)
    assert torch.equal(bad_ours, bad_ref), f"{name}: non-finite values differ ({bad_ours.sum()} vs {bad_ref.sum()})"


def rel_err(ours, ref) -> float:
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel(ours, ref, tol, name=""):
    """Relative norm error below ``tol`` (DESIGN.md numerics); NaN never passes."""
    assert_finite_like(ours, ref, name)
    err = rel_err(ours, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_rule(ours, ref, lowp, factor=2.0, name=""):
    """flash-attention's rule: max|ours − ref| ≤ factor · max|lowp − ref| + 1e-5."""
    assert_finite_like(ours, ref, name)
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item() if ours.numel() else 0.0
    base = (lowp.double() - ref).abs().max().item() if lowp.numel() else 0.0
    assert err <= factor * base + 1e-5, f"{name}: max error {err:.3e} > {factor}·{base:.3e} + 1e-5"


class Wrap(nn.Module):
    """A one-layer model whose layer is named ``proj`` (what peft's get_peft_model needs to wrap one layer)."""

    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def fwd_bwd(layer, x, dy):
    """``(y, dx, {name: grad})`` of ``layer`` on a fresh leaf copy of ``x`` with output gradient ``dy``."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}


# ChatML with transformers' {% generation %} markers around what an assistant turn adds (the reference of
# assistant-only labels, and what TRL's assistant_only_loss needs)
CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(template: str | None, corpus: str, vocab_size: int = 400):
    """A small byte-level BPE tokenizer trained here on ``corpus`` (nothing downloaded), with ChatML's special
    tokens, ``<eos>`` as eos and pad, and ``template`` as its chat template."""
    import pytest

    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size,
                                             special_tokens=["<|im_start|>", "<|im_end|>", "<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = template
    return fast


def tiny_llama(vocab_size: int = 96, **overrides):
    """A tiny random Llama-style causal LM (2 layers, hidden 32, grouped-query attention: 4 heads, 2 kv heads);
    ``overrides`` change its config."""
    import transformers

    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def _tiny_llama_task_config(vocab_size: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    num_labels=3, pad_token_id=0)


def tiny_t5(vocab_size: int = 96):
    """A tiny random T5 (one encoder and one decoder layer, dropout off)."""
    import transformers

    cfg = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, dropout_rate=0.0,
                                pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def task_factories(vocab_size: int = 96) -> dict:
    """peft task type → a builder of a tiny random model for it (Llama heads, T5 for SEQ_2_SEQ_LM)."""
    import transformers

    def llama_head(cls):
        return lambda: cls(_tiny_llama_task_config(vocab_size))

    return {"CAUSAL_LM": lambda: tiny_llama(vocab_size),
            "SEQ_CLS": llama_head(transformers.LlamaForSequenceClassification),
            "TOKEN_CLS": llama_head(transformers.LlamaForTokenClassification),
            "QUESTION_ANS": llama_head(transformers.LlamaForQuestionAnswering),
            "FEATURE_EXTRACTION": llama_head(transformers.LlamaModel),
            "SEQ_2_SEQ_LM": lambda: tiny_t5(vocab_size)}


def tiny_gpt2(vocab_size: int = 96):
    """A tiny random GPT-2 (Conv1D layers, biases), dropout off."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_qwen3_moe(vocab_size: int = 96, num_hidden_layers: int = 2):
    """A tiny random Qwen3-MoE (4 experts, 2 per token; hidden 16), in eval mode, drawn after ``manual_seed(0)``."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                      moe_intermediate_size=8, num_hidden_layers=num_hidden_layers,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def grads_match(ours, theirs, lo, lt, tol=1e-5):
    """Backward from the same random cotangent through the logits ``lo`` of ``ours`` and ``lt`` of ``theirs``:
    the trained parameters have the same names and gradients within ``tol``; returns ``ours``' gradients by name."""
    dy = torch.randn_like(lo)
    (lo * dy).sum().backward()
    (lt * dy).sum().backward()
    go = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    gt = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert list(go) == list(gt)
    for n in go:
        assert_rel(go[n], gt[n], tol, n)
    return go


# the linear layers of tiny_llama / tiny_gpt2 (target_modules lists for the fuzz tests)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]


def run_both(ours, theirs, quiet: bool = False) -> tuple[list, list]:
    """Call ``ours()`` and ``theirs()`` (fastpeft's and peft's step): ``([result or None, ...], [exception or None,
    ...])``, any exception caught (``quiet``: warnings silenced)."""
    import warnings

    results, errors = [], []
    for fn in (ours, theirs):
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                results.append(fn())
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - any refusal, compared by the caller
            results.append(None)
            errors.append(exc)
    return results, errors


def peft_lora_on(base, r: int, alpha: float, dropout: float = 0.0):
    """peft's LoRA layer (``init_lora_weights=False``) around the module ``base``, through ``get_peft_model`` on a
    one-module model: the layer itself is returned."""
    import warnings

    import peft
    from torch import nn

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"],
                          init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(Wrap(), cfg).base_model.model.proj
