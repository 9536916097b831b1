"""One worker of the multi-process tests in ``tests/test_distributed.py`` (run by torchrun, or in-process).

A tiny Llama with fastpeft LoRA on every linear layer is trained for ``STEPS`` SGD steps on a fixed
batch of ``BATCH`` sequences. Under torchrun each of the ``WORLD_SIZE`` ranks takes its contiguous
slice of the batch, wrapped in DDP or FSDP2 (``fully_shard``); with ``--mode single`` one process takes
the whole batch. Rank 0 writes, per step, the loss (averaged over ranks) and the full LoRA gradients,
the final LoRA weights, and (with ``--save``) the adapter saved with ``save_pretrained`` — the test
compares all of it with the single-process run.

Usage::

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_scripts/lora_worker.py --modes ddp,fsdp --out DIR
    python tests/dist_scripts/lora_worker.py --modes single --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

VOCAB = 96
BATCH = 4
SEQ = 9
STEPS = 2
LR = 0.5


def build_model(fourbit: bool = False):
    """The tiny fastpeft-wrapped Llama every rank builds identically (seeded); dropout off (see the test)."""
    import transformers

    import fastpeft

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if fourbit:
        model = _quantize_4bit(model)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                 init_lora_weights=False)
    torch.manual_seed(1)
    return fastpeft.get_peft_model(model, config)


def _quantize_4bit(model):
    """Replace the decoder's linear layers with bitsandbytes NF4 ``Linear4bit`` (CPU quantization)."""
    import bitsandbytes as bnb

    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q = q.to("cpu")
            parent = model.model.layers.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q)
    return model


def batch() -> torch.Tensor:
    """The whole batch (same on every rank)."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def lora_params(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, with DDP's ``module.`` prefix dropped."""
    return {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of ``t``; a sharded DTensor (FSDP2) is all-gathered first (collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def train(model, ids: torch.Tensor, world: int, accelerator=None) -> dict:
    """``STEPS`` SGD steps; returns losses (mean over ranks), full grads per step and final weights."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    if accelerator is not None:  # accelerate wraps the model (DDP here) and the optimizer itself
        model, opt = accelerator.prepare(model, opt)
    record: dict = {"loss": [], "grads": []}
    model.train()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        record["loss"].append(mean.item())
        record["grads"].append({n: full(p.grad) for n, p in lora_params(model).items()})
        opt.step()
    record["weights"] = {n: full(p) for n, p in lora_params(model).items()}
    record["world"], record["wrapper"] = world, type(model).__name__
    return record


def run_mode(mode: str, out: str, device: torch.device, world: int, rank: int, save: bool,
             accelerator=None) -> None:
    """Build, wrap (``single``/``ddp``/``fsdp``/``fsdp_bf16``/``fsdp4bit``/``accelerate``), train, record in ``out``."""
    fourbit = mode.endswith("4bit")
    model = build_model(fourbit).to(device)
    if mode == "single_bf16":  # what FSDP2's bf16 param_dtype computes, in one process (the low-precision baseline)
        model = model.to(torch.bfloat16)
    ids = batch().to(device)
    if world > 1:
        assert BATCH % world == 0
        per = BATCH // world
        ids = ids[rank * per:(rank + 1) * per]

    wrapped = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters stays False: every trainable (LoRA) parameter takes part in each forward.
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif mode.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        kw = {}
        if mode == "fsdp_bf16":  # FSDP2 mixed precision: bf16 compute (LoRA weights too), fp32 gradient reduction
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # bitsandbytes' Params4bit loses its quant_state when FSDP2 swaps in the all-gathered plain tensor
        # ("ValueError: quant_state is required", torch 2.13 / bnb 0.50): keep the 4-bit weights replicated.
        four_bit = {p for p in model.parameters() if type(p).__name__ == "Params4bit"}
        if four_bit:
            kw["ignored_params"] = four_bit
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)

    os.makedirs(out, exist_ok=True)
    if save:  # every rank calls save_pretrained: gathering sharded weights is collective
        model.save_pretrained(os.path.join(out, "adapter_init"), is_main_process=rank == 0)
    record = train(wrapped, ids, world, accelerator if mode == "accelerate" else None)
    if save:
        model.save_pretrained(os.path.join(out, "adapter_trained"), is_main_process=rank == 0)
    record["sharded"] = {n: type(p).__name__ for n, p in lora_params(wrapped).items()}
    record["base_sharded"] = [n for n, p in wrapped.named_parameters()
                              if not p.requires_grad and type(p).__name__ == "DTensor"]
    if rank == 0:
        torch.save(record, os.path.join(out, "record.pt"))
    if world > 1:
        dist.barrier()


def main(argv=None) -> int:
    """Parse arguments, run each mode in turn in one process group, write the records on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", required=True,
                        help="comma-separated: single, ddp, fsdp, fsdp_bf16, fsdp4bit; "
                             "or accelerate alone (under accelerate launch)")
    parser.add_argument("--out", required=True, help="folder; each mode writes into <out>/<mode>")
    parser.add_argument("--save", action="store_true", help="save the adapter before and after training")
    parser.add_argument("--shared-gpu", action="store_true",
                        help="every rank on cuda:0 with gloo (NCCL refuses two ranks on one GPU): DDP only")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    accelerator = None
    if "accelerate" in modes:  # accelerate sets up the process group (gloo with --cpu) from its launcher
        from accelerate import Accelerator

        assert modes == ["accelerate"], "accelerate runs alone"
        accelerator = Accelerator()
        world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    elif world > 1 and args.shared_gpu:
        assert all(m == "ddp" for m in modes), "FSDP2 needs a collective gloo lacks on CUDA tensors; DDP only"
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    elif world > 1:
        if torch.cuda.is_available() and torch.cuda.device_count() >= world:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=60))
    try:
        for mode in modes:
            run_mode(mode, os.path.join(args.out, mode), device, world, rank, args.save, accelerator)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
