"""Save a non-LoRA adapter (IA3, AdaLoRA, LN tuning, prompt tuning) from an FSDP2-sharded model (run by torchrun,
for ``tests/test_distributed.py``), or from one process (``--single``): the same file must come out.

Each method's trainable tensors are set to seeded random values first (so the comparison is not of initial
values), then ``fully_shard`` per decoder layer and at the root, then ``save_pretrained`` on every rank
(``is_main_process`` = rank 0): FSDP2's gather is collective.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_scripts/methods_save_worker.py --out DIR
    python tests/dist_scripts/methods_save_worker.py --single --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

METHODS = ("ia3", "adalora", "lntuning", "prompt")


def build(method: str):
    import transformers

    import fastpeft

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    config = {"ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]),
              "adalora": lambda: fastpeft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"],
                                                        total_step=10),
              "lntuning": lambda: fastpeft.LNTuningConfig(task_type="CAUSAL_LM"),
              "prompt": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}[method]()
    torch.manual_seed(1)
    peft_model = fastpeft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--single", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rank = 0
    if not args.single:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank = dist.get_rank()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        for method in METHODS:
            model = build(method)
            if not args.single:
                for layer in model.get_base_model().model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            model.save_pretrained(os.path.join(args.out, method), is_main_process=rank == 0)
    finally:
        if not args.single:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
