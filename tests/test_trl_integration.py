"""fastpeft models under TRL's ``SFTTrainer`` (how most people run (Q)LoRA fine-tuning), against peft's own.

TRL decides whether a model is a peft model with ``accelerate.utils.is_peft_model``; a model it does not
recognize gets TRL's fused LM head patched onto the wrapper instead of the transformers model inside, and the
first step fails. Each run here is compared with the same run on a peft model over the same base weights and
the same adapter initialization (dropout 0): per-step losses and gradient norms, and the trained adapters.
"""

from __future__ import annotations

import pytest
import torch

import fastpeft
from helpers import CHATML, bpe_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM")


def _tokenizer():
    """A small byte-level BPE tokenizer built here (nothing downloaded), with ChatML's special tokens."""
    return bpe_tokenizer(CHATML, "What is 2+3? It is 5. Hello there, assistant user system\n", vocab_size=300)


def _base(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return transformers.LlamaForCausalLM(cfg)


def _dataset(kind):
    if kind == "messages":
        rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"{i}+3?"},
                              {"role": "assistant", "content": f"It is {i + 3}."}]} for i in range(8)]
    elif kind == "text":
        rows = [{"text": f"What is {i}+3? It is {i + 3}." * (1 + i % 3)} for i in range(8)]
    else:
        rows = [{"prompt": f"What is {i}+3?", "completion": f" It is {i + 3}."} for i in range(8)]
    return datasets.Dataset.from_list(rows)


def _pair(tok):
    """(fastpeft model, peft model): the same base weights, the same LoRA A and B (B made non-zero)."""
    base = _base(tok)
    state = base.state_dict()
    theirs = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    other = _base(tok)
    other.load_state_dict(state)
    ours = fastpeft.get_peft_model(other, fastpeft.LoraConfig(**LORA))
    with torch.no_grad():
        lora = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
        for n, p in lora.items():
            if "lora_B" in n:  # a zero B would hide a wrong A gradient in the first step
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        mine = dict(ours.named_parameters())
        assert set(lora) == {n for n in mine if "lora_" in n}
        for n, p in lora.items():
            mine[n].copy_(p)
    return ours, theirs


def _args(out, **kw):
    kw = {"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
          "max_length": 64, "seed": 3, "save_strategy": "no", **kw}
    return trl.SFTConfig(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, **kw)


def _train(model, tok, out, kind, **kw):
    trainer = trl.SFTTrainer(model=model, args=_args(out, **kw), train_dataset=_dataset(kind), processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, [h["loss"] for h in logs], [h["grad_norm"] for h in logs]


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


CASES = {
    "prompt-completion": ("prompt_completion", {}),  # completion-only loss: TRL's default for this format
    "messages, assistant-only loss, gradient checkpointing": (
        "messages", dict(assistant_only_loss=True, gradient_checkpointing=True)),
    "packing (bfd, padding-free)": ("text", dict(packing=True, max_length=32)),
    "reentrant checkpointing, full-sequence loss": (
        "prompt_completion", dict(completion_only_loss=False, gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": True})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_trains_fastpeft_as_it_trains_peft(tmp_path, case):
    """The same SFTTrainer run on a fastpeft and on a peft model: the same losses and gradient norms at every
    step and the same adapter at the end; only LoRA weights change."""
    kind, kw = CASES[case]
    tok = _tokenizer()
    ours, theirs = _pair(tok)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    start = _lora(ours)
    trainer, losses, norms = _train(ours, tok, tmp_path / "ours", kind, **kw)
    _, ref_losses, ref_norms = _train(theirs, tok, tmp_path / "theirs", kind, **kw)

    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6)
    final, ref = _lora(ours), _lora(theirs)
    assert all(not torch.equal(final[n], start[n]) for n in final)  # every adapter matrix trained
    for n in final:
        torch.testing.assert_close(final[n], ref[n], rtol=1e-5, atol=1e-6)
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    if kw.get("gradient_checkpointing"):
        assert ours.get_base_model().is_gradient_checkpointing and theirs.get_base_model().is_gradient_checkpointing
    for n, p in ours.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_checkpoints_and_save_model_write_peft_adapters_and_resume(tmp_path):
    """Checkpoints and ``save_model`` hold peft-format adapters (no base weights) that peft and fastpeft load
    with the trained model's outputs; a run resumed from a checkpoint ends where the uninterrupted one does;
    ``merge_and_unload`` on the trainer's model gives the same outputs."""
    tok = _tokenizer()

    def run(out, resume=None):
        model = fastpeft.get_peft_model(_base(tok), fastpeft.LoraConfig(**LORA))
        trainer = trl.SFTTrainer(model=model, args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
                                 train_dataset=_dataset("prompt_completion"), processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    trainer = run(tmp_path / "a")
    model = trainer.model
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "final"))
    saved = tmp_path / "final"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()

    ids = torch.tensor([tok("What is 4+3? It is 7.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        by_peft = peft.PeftModel.from_pretrained(_base(tok), str(saved)).eval()(input_ids=ids).logits
        by_fastpeft = fastpeft.PeftModel.from_pretrained(_base(tok), str(saved))(input_ids=ids).logits
        base = _base(tok).eval()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter did change the model
    torch.testing.assert_close(by_peft, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_fastpeft, want, rtol=1e-5, atol=1e-5)

    resumed = run(tmp_path / "b", resume=str(ckpt)).model
    final, again = _lora(model), _lora(resumed)
    for n in final:
        torch.testing.assert_close(again[n], final[n], rtol=1e-6, atol=1e-7)

    with torch.no_grad():
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)


def test_fastpeft_models_are_recognized_when_trl_was_imported_first(tmp_path, monkeypatch):
    """TRL's trainer modules hold accelerate's ``is_peft_model`` by name from their import on (``from trl import
    SFTTrainer`` before any fastpeft model exists): TRL still treats a fastpeft model as a peft model, and puts its
    fused LM head on the transformers model inside, as it does for peft's."""
    import accelerate.utils
    import trl.trainer.sft_trainer as sft

    tok = _tokenizer()
    _pair(tok)  # whatever ran before, fastpeft has widened the function once
    original = getattr(accelerate.utils.is_peft_model, "__wrapped__", accelerate.utils.is_peft_model)
    # the state of a process that imported TRL's trainer before making its first fastpeft model
    monkeypatch.setattr(accelerate.utils, "is_peft_model", original)
    monkeypatch.setattr(sft, "is_peft_model", original)
    ours, theirs = _pair(tok)
    assert sft.is_peft_model(ours) and sft.is_peft_model(theirs) and not sft.is_peft_model(_base(tok))
    assert sft.is_peft_model(torch.nn.parallel.DataParallel(ours))  # unwrapped as accelerate unwraps peft's
    trl.SFTTrainer(model=ours, args=_args(tmp_path), train_dataset=_dataset("prompt_completion"),
                   processing_class=tok)
    assert "forward" in vars(ours.get_base_model()) and "forward" not in vars(ours)


def test_peft_config_of_fastpeft_is_refused_by_trl(tmp_path):
    """``SFTTrainer(peft_config=fastpeft.LoraConfig(...))``: TRL hands the config to peft's ``get_peft_model``
    only after an ``isinstance`` check against peft's ``PeftConfig``, which refuses it before any training (the
    supported way is ``model=fastpeft.get_peft_model(...)``; see README)."""
    tok = _tokenizer()
    with pytest.raises(TypeError, match="peft.PeftConfig"):
        trl.SFTTrainer(model=_base(tok), args=_args(tmp_path), train_dataset=_dataset("prompt_completion"),
                       processing_class=tok, peft_config=fastpeft.LoraConfig(**LORA))
