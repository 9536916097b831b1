"""transformers' Trainer with fastpeft models: adapter checkpoints for every method, whatever the import order,
and ``save_pretrained(state_dict=...)`` as the Trainer calls it under ZeRO-3 / FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastpeft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _config(method):
    from fastpeft.methods.configs import IA3Config, PromptTuningConfig

    if method == "lora":
        return fastpeft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "ia3":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                         task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")


class _DS(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_trainer_checkpoints_are_adapters_and_resume(tmp_path, method):
    """LoRA (on GPT-2, whose head is tied to its embeddings: a whole state dict cannot be saved), IA3 and
    prompt tuning through the Trainer: checkpoints are adapter files peft reads, and
    resume_from_checkpoint loads them into the model's own adapter and continues exactly."""

    def run(out, resume=None):
        model = fastpeft.get_peft_model(_gpt2(), _config(method))
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                                              save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                                              disable_tqdm=True, seed=3)
        transformers.Trainer(model=model, args=args, train_dataset=_DS()).train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    peft.PeftModel.from_pretrained(_gpt2(), str(ckpt))  # peft reads the checkpoint as its own adapter
    resumed = run(tmp_path / "b", resume=str(ckpt))
    final = dict(full.named_parameters())
    trained = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert trained and (method != "lora" or all("lora_" in n for n in trained))
    for n in trained:
        assert torch.allclose(dict(resumed.named_parameters())[n], final[n], atol=1e-6), n


def test_trainer_recognizes_fastpeft_models_whatever_the_import_order(tmp_path):
    """transformers imports its trainer modules lazily: a model made before the first ``transformers.Trainer``
    is still recognized as a peft model (the import hook widens the name when the module loads)."""
    code = (
        "import transformers, fastpeft, sys\n"
        "assert 'transformers.trainer_utils' not in sys.modules\n"
        "cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)\n"
        "m = fastpeft.get_peft_model(transformers.GPT2LMHeadModel(cfg), fastpeft.LoraConfig(r=2))\n"
        "from transformers.trainer_utils import _is_peft_model\n"
        "import transformers.trainer as t\n"
        "print(_is_peft_model(m), isinstance(m, (t.PreTrainedModel, t.PeftModel)))\n"
    )
    env = {**os.environ, "FASTPEFT_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True True"


def test_save_pretrained_reads_a_given_state_dict(tmp_path):
    """``save_pretrained(state_dict=...)`` (peft's keyword; the Trainer passes the gathered state dict under
    ZeRO-3 / FSDP) writes the given tensors, not the module's own."""
    model = fastpeft.get_peft_model(_gpt2(), fastpeft.LoraConfig(r=2, target_modules=["c_attn"]))
    state = {k: v + 1.0 if "lora_" in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved and len(saved) == len(own)
    for key, value in own.items():
        saved_key = key.replace(".default.weight", ".weight")
        assert torch.equal(saved[saved_key], value + 1.0), key
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
