"""``fastpeft train --packing``: samples packed into rows whose position_ids restart per sample.

The reference is the unpacked batch: the same samples padded one a row. Packed, the model's loss and the LoRA
gradients must be the same (transformers keeps packed samples apart when it gets restarting position_ids and
no attention mask), and the model check must refuse a model that lets them see each other."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.data import IGNORE_INDEX, Collator, Sample, pack
from fastpeft.train import check_packing, parse_args, train

transformers = pytest.importorskip("transformers")


def _samples(n: int, seed: int = 0, vocab: int = 64) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(2, 13)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 1)  # some samples learn every token, some only a response
        out.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_pack_keeps_every_sample_whole_once_and_restarts_positions():
    samples = _samples(40)
    rows = pack(samples, 16)
    assert all(len(r.input_ids) <= 16 for r in rows)
    assert len(rows) < len(samples) and rows == pack(samples, 16)  # packs, deterministically
    found = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        assert row.position_ids == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        for a, b in zip(starts, starts[1:]):
            found.append((row.input_ids[a:b], row.labels[a:b]))
    # every sample exactly once; its first label ignored (nothing before it in its own sequence), the rest kept
    expected = sorted((s.input_ids, [IGNORE_INDEX, *s.labels[1:]]) for s in samples)
    assert sorted(found) == expected
    # best fit: a row at most half full would have taken the first sample of any later such row
    assert sum(len(r.input_ids) <= 8 for r in rows) <= 1
    with pytest.raises(ValueError, match="a sample of 13 tokens does not fit in rows of 12"):
        pack(samples, 12)


def test_collator_gives_packed_rows_position_ids_and_the_padding_its_own_sequence():
    rows = [Sample([5, 6, 7, 8, 9], [-100, 6, 7, -100, 9], [0, 1, 2, 0, 1]), Sample([1, 2], [-100, 2], [0, 1])]
    batch = Collator(pad_token_id=0)(rows)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention mask: it would undo packing
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 2, -100, -100, -100]]
    with pytest.raises(ValueError, match="mixes packed rows and unpacked"):
        Collator(pad_token_id=0)([rows[0], Sample([1, 2], [1, 2])])


def _tiny(arch: str, attn: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                         eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1)
    config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    extra = {"use_cache": False} if "position_ids" in batch else {}
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_packed_batch_has_the_unpacked_loss_and_lora_gradients(arch, attn):
    base = _tiny(arch, attn)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for _, layer in model.base_model.lora_layers():
            layer.lora_B["default"].weight.normal_(std=0.5)  # a zero B would make the LoRA gradients trivial
    samples = _samples(12, seed=3)
    collate = Collator(pad_token_id=0)
    loss, grads = _loss_and_grads(model, collate(samples))
    rows = pack(samples, 20)
    assert len(rows) < len(samples)
    packed_loss, packed_grads = _loss_and_grads(model, collate(rows))
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads and sorted(packed_grads) == sorted(grads)
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the reference really depends on packing being honoured: the same rows as one causal sequence differ
    batch = collate(rows)
    mixed = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert (mixed - loss).abs() > 1e-3


class _IgnoresPositions(nn.Module):
    """A causal LM whose forward drops position_ids: every row is one sequence, packed samples see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, use_cache=None, **kwargs):
        return self.inner(input_ids=input_ids, use_cache=False, **kwargs)


def test_check_packing_accepts_transformers_models_and_refuses_one_that_mixes_samples():
    model = _tiny("llama", "sdpa")
    check_packing(model, torch.device("cpu"), None)
    assert model.training  # left as it was
    with pytest.raises(SystemExit, match="--packing: this model's attention lets a packed sample see"):
        check_packing(_IgnoresPositions(model), torch.device("cpu"), None)


def test_train_with_packing_runs_and_logs_the_rows(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": "x" * rng.randint(1, 6), "response": " " + "y" * rng.randint(1, 9)} for _ in range(64)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parse_args(["--data", str(data), "--packing", "--max-length", "40", "--batch-size", "4",
                       "--max-steps", "2", "--eval-steps", "2", "--output", str(tmp_path / "run"), "--no-progress"])
    result = train(args)
    log = result.log
    assert log["train_samples"] == 61 and log["packed_rows"] < 61 // 2 and 0.5 < log["packing_fill"] <= 1
    assert len(log["steps"]) == 2 and all(s["loss"] == s["loss"] for s in log["steps"])
    saved = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert saved["args"]["packing"] is True


def test_packing_refuses_methods_with_virtual_tokens(tmp_path):
    with pytest.raises(SystemExit, match="--packing does not work with --method prompt"):
        train(parse_args(["--packing", "--method", "prompt", "--output", str(tmp_path / "run")]))
