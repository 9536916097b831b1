"""``fastpeft estimate``: how much memory a fine-tuning run needs, before you run it.

Three numbers side by side:

- the seed notes' rule of thumb for full fine-tuning with Adam — about
  6 × batch × parameters bytes (their example: a 6B model at batch 10 → 360 GB);
  a folk estimate, shown for reference;
- fastpeft's component-wise estimate: base weights (their dtype, or ≈ 4.13
  bits for NF4 with double quantization) + trainable parameters, gradients and
  AdamW state in fp32 (16 bytes each; ``--use-dora`` adds DoRA's magnitude, one
  per output feature of each adapted layer) + saved activations per layer and
  token (fewer with activation checkpointing) + the logits and their loss;
- with ``--measure``, the peak measured over one real training step (CUDA
  allocator peak, or the growth of the process's peak RSS on CPU).

Example::

    fastpeft estimate --batch-size 8 --seq-len 512 --measure
    fastpeft estimate --model ./llama-7b --method qlora --batch-size 4 --seq-len 2048 --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import warnings
from dataclasses import asdict, dataclass

import torch

NF4_BITS = 4.127  # NF4 + double-quantized absmax (blocksize 64, 256 blocks a second-level block)
METHODS = ("lora", "qlora", "full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fastpeft estimate``."""
    p.add_argument("--model", default=None, help="local model folder or config.json (default: the embedded model)")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--use-dora", action="store_true", help="DoRA adapters (LoraConfig(use_dora=True))")
    p.add_argument("--lora-bias", action="store_true", help="a bias on each lora_B (LoraConfig(lora_bias=True))")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout (fastpeft train's default: 0.05); with --use-dora, p > 0 keeps D(x) per layer")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--measure", action="store_true", help="also run one training step and report the peak")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@dataclass
class Estimate:
    """Bytes by component (and the totals) for one configuration."""

    params: int
    trainable: int
    weights: int
    trainable_state: int
    activations: int
    logits: int
    total: int
    rule_of_thumb: int
    measured_peak: int | None = None

    def as_gib(self) -> dict:
        """The estimate as a dict, byte counts in GiB (parameter counts left as they are)."""
        return {k: (round(v / 2**30, 4) if isinstance(v, int) and k not in ("params", "trainable") else v)
                for k, v in asdict(self).items()}


def _config(model: str | None):
    from transformers import AutoConfig, LlamaConfig

    from .train import ASSETS

    if model is None:
        cfg = json.loads((ASSETS / "default_model.json").read_text())
        return LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    if os.path.isfile(model):  # this file, whatever its name (not the config.json beside it)
        try:
            with open(model, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"fastpeft estimate: --model {model}: not a readable JSON config ({exc})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise SystemExit(f"fastpeft estimate: --model {model}: a transformers config needs a 'model_type' key")
        data = dict(data)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(model)


def _lora_config(r: int, targets: str, use_dora: bool, lora_bias: bool, lora_dropout: float = 0.0):
    from . import LoraConfig

    t = targets if targets == "all-linear" else [s.strip() for s in targets.split(",")]
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=t, use_dora=use_dora, lora_bias=lora_bias,
                      lora_dropout=lora_dropout)


def _peft_on_meta(config, method: str, r: int, targets: str, use_dora: bool = False, lora_bias: bool = False):
    """The model on the meta device with the method applied: exact parameter counts, no memory."""
    from transformers import AutoModelForCausalLM

    from . import get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if method != "full":
            with warnings.catch_warnings():  # lora_bias on bias-free layers: "merging won't be possible", per layer
                warnings.filterwarnings("ignore", message="`lora_bias=True` was passed")
                model = get_peft_model(model, _lora_config(r, targets, use_dora, lora_bias))
    return model


def estimate(config, method: str = "lora", batch_size: int = 8, seq_len: int = 512, r: int = 16,
             targets: str = "all-linear", dtype: torch.dtype = torch.bfloat16,
             gradient_checkpointing: bool = False, use_dora: bool = False, lora_dropout: float = 0.0,
             lora_bias: bool = False) -> Estimate:
    """Component-wise training memory (bytes) of ``config`` under ``method``; see the module docstring.
    ``use_dora``: DoRA adapters (their magnitudes are counted as trainable parameters, and each adapted layer
    keeps one more (tokens, out) tensor for the magnitude's gradient; with ``lora_dropout`` > 0 also the dropped
    input D(x), (tokens, in), and its (tokens, r) projection). ``lora_dropout`` changes nothing else: fastpeft's
    LoRA keeps no dropout mask. ``lora_bias``: each adapted layer's ``lora_B`` bias (out_features trainable
    parameters) is counted."""
    use_dora = use_dora and method != "full"
    model = _peft_on_meta(config, method, r, targets, use_dora, lora_bias and method != "full")
    d = torch.empty(0, dtype=dtype).element_size()
    params = trainable = 0
    weights = 0
    for name, p in model.named_parameters():
        n = p.numel()
        params += n
        if method == "full" or p.requires_grad:
            trainable += n
        is_linear_weight = p.dim() == 2 and "embed" not in name and "lm_head" not in name and "lora_" not in name
        if method == "qlora" and is_linear_weight:
            weights += int(n * NF4_BITS / 8)
        elif "lora_" in name:
            weights += 4 * n
        else:
            weights += d * n
    if method == "full":
        # gradients (in the weights' dtype) + AdamW's two fp32 moments (+ an fp32 master copy of half weights);
        # the weights themselves are counted above
        state = trainable * (4 + 8) if d == 4 else trainable * (2 + 8 + 4)
    else:
        state = trainable * (4 + 8)  # fp32 gradients + AdamW's two moments (the weights are counted above)
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    tokens = batch_size * seq_len
    # Saved per token and layer: norm inputs (2h, fp32 in RMSNorm), the attention block's input (h), q, k, v
    # and the attention output (2h + 2kv), the o_proj input (h), MLP input (h), gate and up outputs (2i),
    # the activation's output (i), and the residual stream (h); LoRA adds r per adapted layer (fp32).
    per_token = d * (7 * h + 2 * kv + 3 * inter) + 2 * 4 * h
    if method != "full":
        per_token += 4 * r * 7
    if use_dora:  # per DoRA layer (the targeted ones, summed, per model layer), in the compute dtype:
        dora = [m for m in model.modules() if "default" in getattr(m, "lora_magnitude_vector", {})]
        # y − b, (tokens, out), for the magnitude's gradient (with dropout: D(x)·W0ᵀ instead) ...
        per_token += d * sum(m.out_features for m in dora) // layers
        if lora_dropout > 0:  # ... and with dropout D(x) (tokens, in) and its own (tokens, r) fp32 D(x)·Aᵀ
            per_token += sum(d * m.in_features + 4 * r for m in dora) // layers
    if gradient_checkpointing:
        activations = tokens * (layers * d * h + per_token)
    else:
        activations = tokens * layers * per_token
    vocab = config.vocab_size
    logits = tokens * vocab * (d + 4 + 4)  # logits, their fp32 upcast, and the loss's softmax gradient
    total = weights + state + activations + logits
    rule = 6 * batch_size * params
    return Estimate(params, trainable, weights, state, activations, logits, total, rule)


def _rss_peak() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * 1024 if sys.platform != "darwin" else rss


def measure(config, method: str = "lora", batch_size: int = 8, seq_len: int = 512, r: int = 16,
            targets: str = "all-linear", dtype: torch.dtype = torch.float32, device: str = "cpu",
            gradient_checkpointing: bool = False, use_dora: bool = False, lora_dropout: float = 0.0,
            lora_bias: bool = False) -> int:
    """Peak bytes of one AdamW training step (CUDA: allocator peak; CPU: growth of the peak RSS)."""
    from transformers import AutoModelForCausalLM

    from . import get_peft_model

    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
    else:
        start = _rss_peak()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=dev, dtype=dtype)
    if method != "full":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`lora_bias=True` was passed")
            model = get_peft_model(model, _lora_config(r, targets, use_dora, lora_bias, lora_dropout))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=dev)
    model.train()
    for _ in range(2):  # the second step has the optimizer state allocated
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - start
    else:
        peak = _rss_peak() - start
    del model, opt, params
    gc.collect()
    return peak


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``fastpeft estimate``."""
    from .train import resolve_device, resolve_dtype

    for flag in ("batch_size", "seq_len", "r"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"fastpeft estimate: --{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if not 0.0 <= args.lora_dropout <= 1.0:
        raise SystemExit(f"fastpeft estimate: --lora-dropout must be in [0, 1], got {args.lora_dropout}")
    if args.model is not None and not os.path.exists(args.model):
        raise SystemExit(f"fastpeft estimate: --model {args.model!r} is not a local folder or config.json "
                         "(fastpeft does not download models)")
    try:
        config = _config(args.model)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fastpeft estimate: cannot read a model config from {args.model}: {exc}") from None
    device = resolve_device(args.device, "fastpeft estimate")
    dtype = resolve_dtype(args.dtype, device)
    try:
        est = estimate(config, args.method, args.batch_size, args.seq_len, args.r, args.target_modules, dtype,
                       args.gradient_checkpointing, args.use_dora, args.lora_dropout, args.lora_bias)
    except ValueError as exc:  # e.g. --target-modules matching nothing
        raise SystemExit(f"fastpeft estimate: {exc}") from None
    if args.measure:
        if args.method == "qlora":
            print("--measure runs LoRA on the unquantized base (the qlora estimate counts NF4 weights)",
                  file=sys.stderr)
        est.measured_peak = measure(config, args.method, args.batch_size, args.seq_len, args.r, args.target_modules,
                                    dtype, str(device), args.gradient_checkpointing, args.use_dora,
                                    args.lora_dropout, args.lora_bias)
    if args.json:
        print(json.dumps(asdict(est), indent=2))
        return 0
    g = est.as_gib()
    print(f"model: {args.model or 'embedded default'}  method: {args.method}"
          + (" (DoRA)" if args.use_dora and args.method != "full" else "") + f"  batch {args.batch_size} × "
          f"{args.seq_len} tokens  dtype {str(dtype).removeprefix('torch.')}"
          + ("  (activation checkpointing)" if args.gradient_checkpointing else ""))
    print(f"parameters: {est.params:,d} ({est.trainable:,d} trainable)")
    print(f"  base and adapter weights     {g['weights']:9.3f} GiB")
    print(f"  gradients + AdamW state      {g['trainable_state']:9.3f} GiB")
    print(f"  saved activations            {g['activations']:9.3f} GiB")
    print(f"  logits and loss              {g['logits']:9.3f} GiB")
    print(f"fastpeft estimate              {g['total']:9.3f} GiB")
    print(f"rule of thumb (6 × batch × parameters bytes, full fine-tuning) {g['rule_of_thumb']:.3f} GiB")
    if est.measured_peak is not None:
        print(f"measured peak of one step      {g['measured_peak']:9.3f} GiB "
              f"(estimate / measured = {est.total / max(1, est.measured_peak):.2f})")
    return 0
