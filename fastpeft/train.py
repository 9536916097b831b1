"""``fastpeft train``: QLoRA-style fine-tuning of a causal LM, from a local model folder or the embedded default.

With no ``--model`` and no ``--data`` it trains the embedded default — a small
Llama-style model built from ``fastpeft/assets/default_model.json`` with a
byte-level tokenizer, on a word-capitalization task whose held-out exact-match
accuracy starts near 0 — so the whole pipeline runs anywhere with nothing
downloaded. The output folder receives the adapter in peft's format,
``train_log.json``, ``loss.png``, and checkpoints that ``--resume`` continues.

Example::

    fastpeft train                                  # the embedded default, a few minutes on 2 CPU cores
    fastpeft train --model ./llama --data chat.jsonl --load-in-4bit --method qlora --max-length 1024 \\
        --batch-size 8 --grad-accum 4 --lr 2e-4 --epochs 2 --gradient-checkpointing --output runs/chat
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import (
    DEFAULT_TASK_NAME,
    ByteTokenizer,
    Collator,
    DataError,
    HFTokenizer,
    Sample,
    auto_max_length,
    batches,
    default_task,
    read_records,
    tokenize,
)

METHODS = ("lora", "qlora", "prefix", "prompt", "ptuning", "bitfit", "freeze", "adapter", "ia3", "adalora")
DEFAULT_MODEL = "fastpeft:default"
ASSETS = Path(__file__).parent / "assets"
STATE_NAME = "trainer_state.pt"
BASE_DIR = "base_model"


# --------------------------------------------------------------------------- arguments
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fastpeft train`` (a config file's keys mirror them, dashes or underscores)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local transformers model folder (default: the embedded "
                                                 "tiny Llama-style model, built from a config; nothing downloaded)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="base weights dtype (auto: bf16 on a bf16-capable GPU, fp32 on CPU)")
    g.add_argument("--load-in-4bit", action="store_true", help="quantize the base to NF4 on load (QLoRA)")
    g.add_argument("--quantizer", default="fastpeft", choices=["fastpeft", "bitsandbytes"],
                   help="who quantizes with --load-in-4bit (default fastpeft: works without CUDA)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="JSONL (prompt/response or text records) or a plain-text file "
                                                "(default: the embedded uppercase-words task)")
    g.add_argument("--eval-data", default=None, help="held-out file (default: --eval-split of --data)")
    g.add_argument("--eval-split", type=float, default=0.05, help="fraction held out when no --eval-data")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--response-field", default="response")
    g.add_argument("--text-field", default="text")
    g.add_argument("--max-length", default="auto", help="tokens per sample, or auto (1.5 × mean length)")
    g.add_argument("--group-by-length", action="store_true", help="batch samples of similar length")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=METHODS)
    g.add_argument("--r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names, a regex, or all-linear")
    g.add_argument("--use-rslora", action="store_true")
    g.add_argument("--modules-to-save", default="auto",
                   help="comma-separated modules trained in full beside the adapter, or none (auto: the "
                        "embeddings and head for the embedded default, whose random base has no vocabulary "
                        "to reuse; none otherwise)")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prefix/prompt/ptuning")
    g.add_argument("--freeze-layers", type=int, default=2, help="freeze: the last N blocks train")
    g.add_argument("--method-options", default=None,
                   help="JSON object of further options for the method's config (e.g. '{\"init_r\": 12}')")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default: set by --max-steps)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 400 for the embedded "
                                                              "default, else 1 epoch)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4; 3e-3 for the "
                                                         "embedded default)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging and output")
    g.add_argument("--output", default="runs/fastpeft", help="output folder")
    g.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: 4 times a run)")
    g.add_argument("--eval-generate", type=int, default=None,
                   help="held-out samples scored by greedy generation, exact match (default 100 on the "
                        "embedded task, 0 otherwise)")
    g.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: at each eval)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint in --output (or the given checkpoint folder)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None, help="YAML or JSON file whose keys mirror these flags")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``fastpeft train`` flags, a ``--config`` file's values acting as defaults under explicit flags."""
    p = argparse.ArgumentParser(prog="fastpeft train")
    add_train_arguments(p)
    return resolve_config(p, p.parse_args(argv), argv)


def resolve_config(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """Apply ``args.config``: its keys become defaults, explicit command-line flags still win."""
    if not args.config:
        return args
    values = load_config_file(args.config)
    known = {a.dest for a in p._actions}
    bad = sorted(k for k in values if k not in known or k == "config")
    if bad:
        raise SystemExit(f"fastpeft train: unknown key(s) in {args.config}: {bad}")
    p.set_defaults(**values)
    return p.parse_args(argv)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict with flag names (dashes turned to underscores)."""
    if not os.path.isfile(path):
        raise SystemExit(f"fastpeft train: config file {path!r} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"fastpeft train: {path} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# --------------------------------------------------------------------------- model
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_default_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The embedded default: a Llama-style causal LM from the shipped config, random weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((ASSETS / "default_model.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    config = LlamaConfig(**cfg)
    config._name_or_path = DEFAULT_MODEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) for ``args.model`` (or the embedded default), quantized with ``--load-in-4bit``."""
    if args.model in (None, DEFAULT_MODEL):
        model, tok = build_default_model(dtype=dtype), ByteTokenizer()
    else:
        if not os.path.isdir(args.model):
            raise SystemExit(f"fastpeft train: --model {args.model!r} is not a local folder (fastpeft does not "
                             "download models; fetch it first, e.g. with huggingface-cli download)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tok = HFTokenizer(AutoTokenizer.from_pretrained(args.model))
    if args.load_in_4bit or args.method == "qlora":
        from .quant import prepare_model_for_kbit_training

        model = quantize_base(model, args.quantizer, dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    return model.to(device), tok


def quantize_base(model, quantizer: str, compute_dtype: torch.dtype):
    """NF4-quantize every linear layer except the output head (fastpeft's or bitsandbytes' quantizer)."""
    try:
        from . import quant
    except ImportError as exc:
        raise SystemExit(f"fastpeft train: 4-bit loading needs fastpeft.quant ({exc})") from None
    if quantizer == "bitsandbytes":
        return quant.quantize_model(model, quant_type="nf4", compute_dtype=compute_dtype, backend="bitsandbytes")
    return quant.quantize_model(model, quant_type="nf4", compute_dtype=compute_dtype)


def build_peft_model(model, args: argparse.Namespace, total_steps: int | None = None):
    """Wrap ``model`` for ``args.method`` through ``fastpeft.get_peft_model``."""
    from . import LoraConfig, get_peft_model

    targets: Any = args.target_modules
    if isinstance(targets, str) and targets != "all-linear" and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    elif isinstance(targets, str) and targets != "all-linear" and targets.isidentifier():
        targets = [targets]
    extra = json.loads(args.method_options) if isinstance(args.method_options, str) else (args.method_options or {})
    save = args.modules_to_save
    if save == "auto":
        save = ["embed_tokens", "lm_head"] if args.model in (None, DEFAULT_MODEL) else None
    elif isinstance(save, str):
        save = None if save.lower() == "none" else [m.strip() for m in save.split(",") if m.strip()]
    if args.method in ("lora", "qlora"):
        config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, use_rslora=args.use_rslora, task_type="CAUSAL_LM",
                            modules_to_save=save, **extra)
    else:
        import dataclasses

        from . import methods

        key = args.method
        cls = methods.METHODS[key]
        applicable = {f.name for f in dataclasses.fields(cls)} | set(methods._ALIASES.get(key, {}))
        options = dict(r=args.r, num_virtual_tokens=args.num_virtual_tokens, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, total_step=total_steps,
                       num_layers=args.freeze_layers if key == "freeze" else None,  # prefix's num_layers = model's
                       # BitFit on a model without biases (Llama) gives its linear layers zero biases to train
                       add_bias=not any(n.endswith(".bias") for n, _ in model.named_parameters()),
                       # "all-linear" is LoRA's default; the other methods have their own per model type
                       target_modules=None if args.target_modules == "all-linear" else targets)
        options = {k: v for k, v in options.items() if k in applicable and v is not None}
        options.update(extra)
        config = methods.build_config(key, task_type="CAUSAL_LM", **options)
    model = get_peft_model(model, config)
    for param in model.parameters():  # trainable parameters in fp32 (fp16 ones overflow)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


# --------------------------------------------------------------------------- helpers
def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0: the multiplier of the peak learning rate at ``step``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30


@torch.no_grad()
def evaluate(model, samples: list[Sample], collator: Collator, batch_size: int, device: torch.device,
             autocast: torch.dtype | None) -> float:
    """Mean loss per response token over ``samples`` (the model's loss, weighted by each batch's token count)."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(samples), batch_size):
        batch = {n: t.to(device) for n, t in collator(samples[k:k + batch_size]).items()}
        with _autocast(device, autocast):
            loss = model(**batch, use_cache=False).loss  # the model's own loss (prompt methods prepend tokens)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += loss.float().item() * n
        count += n
    model.train()
    return total / max(1, count)


@torch.no_grad()
def exact_match(model, records: list[dict], tok, device: torch.device, max_new_tokens: int = 32) -> float:
    """Fraction of held-out prompts whose greedy continuation equals the reference response."""
    if not records:
        return float("nan")
    model.eval()
    hits = 0
    for r in records:
        ids = torch.tensor([tok.encode(r["prompt"], add_special_tokens=True)], device=device)
        want = tok.encode(r["response"])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=min(max_new_tokens, len(want) + 2), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        got = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in got:
            got = got[: got.index(tok.eos_token_id)]
        hits += got == want
    model.train()
    return hits / len(records)


class _autocast:
    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


@dataclass
class TrainResult:
    """What ``train`` returns: the folder, the log, the final figures."""

    output: Path
    log: dict
    model: Any


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model, optimizer, out: Path, step: int, epoch: int, batch_in_epoch: int, log: dict,
                    limit: int) -> Path:
    """Adapter (peft format) + optimizer/RNG/position in ``out/checkpoint-<step>``; keeps the newest ``limit``."""
    ckpt = out / f"checkpoint-{step}"
    model.save_pretrained(ckpt)
    torch.save({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "optimizer": optimizer.state_dict(),
                "rng": _rng_state(), "log": log, "tensors": _resume_tensors(model),
                "allocator": _allocator_state(model)}, ckpt / STATE_NAME)
    old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[:-limit] if limit > 0 else []:
        for f in sorted(stale.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        stale.rmdir()
    return ckpt


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise SystemExit(f"fastpeft train: --resume {resume!r} is not a checkpoint folder (no {STATE_NAME})")
        return path
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    found = [p for p in found if (p / STATE_NAME).is_file()]
    if not found:
        raise SystemExit(f"fastpeft train: --resume: no checkpoint in {out}")
    return found[-1]


def _resume_tensors(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter and every buffer, by name: what resuming needs, whatever the method (the saved
    adapter alone is not enough: P-tuning saves its table, not its encoder; AdaLoRA keeps rank state)."""
    out = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer:{n}": b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return out


def _allocator_state(model) -> dict | None:
    alloc = getattr(model, "rankallocator", None) or getattr(getattr(model, "base_model", None), "rankallocator", None)
    if alloc is None:
        return None
    return {k: v for k, v in vars(alloc).items() if k != "model"}


def _restore(model, state: dict) -> None:
    """Load a checkpoint's tensors (and AdaLoRA allocator state) into ``model``; names must match exactly."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state["tensors"].items():
            target = buffers.get(name[len("buffer:"):]) if name.startswith("buffer:") else params.get(name)
            if target is None:
                raise SystemExit(f"fastpeft train: the checkpoint has {name!r}, which this model lacks "
                                 "(resume with the same --method and options)")
            if target.shape != value.shape:  # AdaLoRA may have pruned: take the saved shape
                target.data = value.to(device=target.device, dtype=target.dtype)
            else:
                target.copy_(value)
    if state.get("allocator"):
        alloc = getattr(model, "rankallocator", None) or model.base_model.rankallocator
        vars(alloc).update(state["allocator"])


# --------------------------------------------------------------------------- the loop
def _init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device | None]:
    """(rank, world size, device) under torchrun / accelerate launch (``WORLD_SIZE`` > 1), else (0, 1, None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") and \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(args: argparse.Namespace) -> TrainResult:
    """Run the training ``args`` describe; returns the output folder and the log.

    Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1) it runs data-parallel with PyTorch's
    DDP: each process takes every world-th batch, gradients are averaged, only rank 0 reports and writes.
    """
    rank, world, dist_device = _init_distributed(args)
    main_rank = rank == 0
    device = dist_device or resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    autocast = dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    is_default = args.model in (None, DEFAULT_MODEL)
    default_data = args.data is None
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    model, tok = load_model(args, device, dtype)
    if is_default and main_rank:  # the random embedded base is kept so `fastpeft generate` reloads it exactly
        base_dir = out / BASE_DIR
        if not (base_dir / "model.safetensors").is_file():  # unquantized, whatever --load-in-4bit does
            build_default_model(dtype=dtype).save_pretrained(base_dir)

    # data
    if default_data:
        train_rows, eval_rows = default_task()
        source = f"embedded:{DEFAULT_TASK_NAME}"
    else:
        rows = read_records(args.data, args.prompt_field, args.response_field, args.text_field)
        source = args.data
        if args.eval_data:
            eval_rows = read_records(args.eval_data, args.prompt_field, args.response_field, args.text_field)
            train_rows = rows
        else:
            order = list(range(len(rows)))
            random.Random(args.seed).shuffle(order)
            n_eval = int(len(rows) * args.eval_split) if len(rows) >= 20 else 0
            eval_rows = [rows[i] for i in order[:n_eval]]
            train_rows = [rows[i] for i in order[n_eval:]]
    max_length = auto_max_length(train_rows, tok) if str(args.max_length) == "auto" else int(args.max_length)
    train_samples = tokenize(train_rows, tok, max_length, source)
    eval_samples = tokenize(eval_rows, tok, max_length, args.eval_data or source) if eval_rows else []
    collator = Collator(tok.pad_token_id)
    n_generate = args.eval_generate if args.eval_generate is not None else (100 if default_data else 0)
    gen_rows = [r for r in eval_rows if "prompt" in r][:n_generate]

    micro_per_epoch = max(1, len(train_samples) // (args.batch_size * world))
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    if args.max_steps is not None:
        total_steps = args.max_steps
    elif args.epochs is not None:
        total_steps = max(1, int(args.epochs * steps_per_epoch))
    else:
        total_steps = 400 if (is_default and default_data) else steps_per_epoch

    # method
    model = build_peft_model(model, args, total_steps)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    runner = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SystemExit("fastpeft train: the method left no trainable parameter")
    lr = args.lr if args.lr is not None else (3e-3 if is_default else 2e-4)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=device.type == "cuda")

    warmup = int(args.warmup_ratio * total_steps)
    eval_every = args.eval_steps or max(1, total_steps // 4)
    save_every = args.save_steps or eval_every
    trainable, total = model.get_nb_trainable_parameters()

    log: dict = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "device": str(device),
                 "dtype": str(dtype).removeprefix("torch."), "data": source, "max_length": max_length,
                 "train_samples": len(train_samples), "eval_samples": len(eval_samples),
                 "trainable_params": trainable, "all_params": total, "total_steps": total_steps,
                 "world_size": world, "global_batch": args.batch_size * args.grad_accum * world,
                 "steps": [], "evals": []}
    step, epoch, skip = 0, 0, 0
    if args.resume:
        ckpt = find_checkpoint(out, args.resume)
        state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=False)
        _restore(model, state)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        log["steps"], log["evals"] = state["log"]["steps"], state["log"]["evals"]
        log["resumed_from"] = str(ckpt)
        _set_rng_state(state["rng"])
        if main_rank:
            print(f"resumed from {ckpt} at step {step}")

    def run_eval() -> dict:
        entry: dict = {"step": step}
        if eval_samples:
            entry["eval_loss"] = round(evaluate(model, eval_samples, collator, args.batch_size, device, autocast), 5)
        if gen_rows:
            entry["exact_match"] = round(exact_match(model, gen_rows, tok, device), 4)
        return entry

    say = print if main_rank else (lambda *a, **k: None)
    say(f"fastpeft train: {args.method} on {getattr(model.config, '_name_or_path', '?')} "
          f"({total:,d} params, {trainable:,d} trainable = {100 * trainable / total:.2f}%), data {source}: "
          f"{len(train_samples)} train / {len(eval_samples)} eval samples, max_length {max_length}, "
          f"{total_steps} steps on {device} ({log['dtype']})")
    if step == 0:
        first = run_eval()
        log["evals"].append(first)
        say(f"before training: {first}")

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or not main_rank, desc="train",
               dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    done = step >= total_steps
    in_step = 0  # micro-batches backpropagated since the last optimizer step (never reset by an epoch's end)
    while not done:
        micro = 0
        loss_acc, tok_acc = 0.0, 0
        epoch_batches = list(batches(train_samples, args.batch_size, args.seed, epoch, args.group_by_length))
        group = world * args.grad_accum  # every optimizer step takes grad_accum micro-batches on every rank
        epoch_batches = epoch_batches[: len(epoch_batches) // group * group]
        if not epoch_batches:
            raise SystemExit(f"fastpeft train: {len(train_samples)} samples give no full step of batch "
                             f"{args.batch_size} × grad-accum {args.grad_accum} × {world} process(es)")
        for index, batch in enumerate(epoch_batches):
            if index < skip or index % world != rank:
                continue
            inputs = {n: t.to(device) for n, t in collator(batch).items()}
            last_micro = (micro + 1) % args.grad_accum == 0
            sync = runner.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with _autocast(device, autocast):
                    loss = runner(**inputs).loss
                (loss / args.grad_accum).backward()
            loss_acc += loss.item() / args.grad_accum
            tok_acc += int(inputs["attention_mask"].sum())
            micro += 1
            in_step += 1
            if micro % args.grad_accum:
                continue
            scale = cosine_lr(step, total_steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0 \
                else torch.tensor(0.0)
            optimizer.step()
            update = getattr(model, "update_and_allocate", None)
            if callable(update) and args.method == "adalora":
                update(step)  # AdaLoRA's budget schedule reads the gradients: after step(), before zero_grad()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:  # report the mean loss and the total tokens over the processes
                import torch.distributed as dist

                stats = torch.tensor([loss_acc, float(tok_acc)], dtype=torch.float64, device=device)
                dist.all_reduce(stats)
                loss_acc, tok_acc = stats[0].item() / world, int(stats[1].item())
            tokens_seen += tok_acc
            elapsed = time.perf_counter() - t_start
            entry = {"step": step, "loss": round(loss_acc, 5), "lr": lr * scale,
                     "grad_norm": round(float(grad_norm), 4), "micro_batches": in_step,
                     "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                     "peak_mem_gb": round(peak_memory_gb(device), 3)}
            log["steps"].append(entry)
            bar.set_postfix(loss=f"{loss_acc:.3f}", lr=f"{lr * scale:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}",
                            mem=f"{entry['peak_mem_gb']:.2f}G")
            bar.update(1)
            loss_acc, tok_acc, in_step = 0.0, 0, 0
            if step % eval_every == 0 or step == total_steps:
                result = run_eval()
                log["evals"].append(result)
                if main_rank:
                    bar.write(f"step {step}: {result}")
            if step % save_every == 0 and step < total_steps and main_rank:
                save_checkpoint(model, optimizer, out, step, epoch, index + 1, log, args.save_total_limit)
            if step >= total_steps:
                done = True
                break
        skip = 0
        epoch += 1
    bar.close()

    log["final"] = log["evals"][-1] if log["evals"] else {}
    log["train_seconds"] = round(time.perf_counter() - t_start, 2)
    if main_rank:
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
        plot_log(log, out / "loss.png")
        print(f"saved the adapter, train_log.json and loss.png in {out}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, log, model)


def plot_log(log: dict, path: Path) -> Path | None:
    """Loss curve (and eval loss / exact match) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in log["steps"]]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [s["loss"] for s in log["steps"]], label="train loss", lw=1)
    ev = [e for e in log["evals"] if "eval_loss" in e]
    if ev:
        ax.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    em = [e for e in log["evals"] if "exact_match" in e]
    if em:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in em], [e["exact_match"] for e in em], "s--", color="tab:green",
                 label="held-out exact match")
        ax2.set_ylabel("exact match")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"fastpeft train: {log['args'].get('method')} on {log['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``fastpeft train``."""
    try:
        result = train(args)
    except DataError as exc:
        print(f"fastpeft train: {exc}", file=sys.stderr)
        return 2
    final = result.log.get("final", {})
    print(f"final: {final}")
    evals = result.log.get("evals", [])
    if evals and "exact_match" in evals[0] and "exact_match" in final:
        print(f"held-out exact match: {evals[0]['exact_match']:.2f} before training → {final['exact_match']:.2f} "
              f"after {final['step']} steps")
    return 0
