"""``fastpeft generate``: load a base model and a peft-format adapter, generate for a prompt.

The base comes from ``--model``, else from the adapter folder's ``base_model/``
(written by ``fastpeft train`` for the embedded default), else from the
adapter config's ``base_model_name_or_path`` when that is a local folder.
A QLoRA adapter (its ``train_log.json`` says ``--method qlora`` or
``--load-in-4bit``) gets its base quantized to NF4 as in training, so the
adapter sees the weights it was trained on; ``--load-in-4bit`` /
``--no-load-in-4bit`` decide explicitly. The base is loaded in the dtype it
was trained in (the log's ``dtype``; ``--dtype`` overrides, and without a log
the checkpoint's own dtype is kept).

Example::

    fastpeft generate --adapter runs/fastpeft --prompt "upper: hello ="
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fastpeft generate``."""
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--model", default=None, help="base model folder (default: see above)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base first")
    p.add_argument("--no-adapter", action="store_true", help="generate with the base alone (for comparison)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the base to NF4 before loading the adapter (default: as the adapter was "
                        "trained, read from its train_log.json)")
    p.add_argument("--quantizer", default=None, choices=["fastpeft", "bitsandbytes"],
                   help="who quantizes with --load-in-4bit (default: as in training, else fastpeft)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="base weights dtype (auto: as in training, read from train_log.json, else the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _train_log(adapter: str) -> dict:
    try:
        log = json.load(open(os.path.join(adapter, "train_log.json"), encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return log if isinstance(log, dict) else {}


def trained_in_4bit(adapter: str) -> tuple[bool, str]:
    """(whether ``fastpeft train`` quantized the base for this adapter, its quantizer), from train_log.json."""
    args = _train_log(adapter).get("args")
    if not isinstance(args, dict):
        return False, "fastpeft"
    return bool(args.get("load_in_4bit") or args.get("method") == "qlora"), args.get("quantizer") or "fastpeft"


def trained_dtype(adapter: str) -> torch.dtype | None:
    """The base dtype ``fastpeft train`` used for this adapter (train_log.json's ``dtype``), or None."""
    return _DTYPES.get(str(_train_log(adapter).get("dtype")))


def load(adapter: str, model_path: str | None = None, device: str | torch.device = "cpu",
         load_in_4bit: bool | None = None, quantizer: str | None = None, dtype: torch.dtype | str | None = None):
    """(peft model, tokenizer) for an adapter folder, the base found as described in the module docstring.

    ``load_in_4bit=None`` quantizes the base when the adapter was trained on a 4-bit base; ``dtype=None``
    (or ``"auto"``) loads the base in its training dtype when train_log.json records it, else in the
    checkpoint's dtype."""
    from . import PeftModel
    from .data import ByteTokenizer, HFTokenizer
    from .train import BASE_DIR, DEFAULT_MODEL, quantize_base

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise SystemExit(f"fastpeft generate: {adapter!r} has no adapter_config.json")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8"))
    base_path = model_path
    if base_path is None and os.path.isdir(os.path.join(adapter, BASE_DIR)):
        base_path = os.path.join(adapter, BASE_DIR)
    if base_path is None:
        named = cfg.get("base_model_name_or_path")
        if named and os.path.isdir(named):
            base_path = named
        elif named == DEFAULT_MODEL:
            raise SystemExit(f"fastpeft generate: {adapter} was trained on the embedded default but has no "
                             f"{BASE_DIR}/ folder; pass --model")
        else:
            raise SystemExit(f"fastpeft generate: base model {named!r} is not a local folder; pass --model PATH")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32, got {dtype!r}")
        dtype = _DTYPES.get(dtype)
    dtype = dtype or trained_dtype(adapter)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or "auto")
    trained_4bit, trained_quantizer = trained_in_4bit(adapter)
    if load_in_4bit is None:
        load_in_4bit = trained_4bit
    if load_in_4bit:
        dtype = next(base.parameters()).dtype
        base = quantize_base(base, quantizer or trained_quantizer, dtype)
    if os.path.isfile(os.path.join(adapter, "fastpeft_tokenizer.json")):
        tok = ByteTokenizer()
    else:
        src = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
        tok = HFTokenizer(AutoTokenizer.from_pretrained(src))
    model = PeftModel.from_pretrained(base, adapter)
    return model.to(device).eval(), tok


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``fastpeft generate``."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.merge and args.no_adapter:
        raise SystemExit("fastpeft generate: --merge and --no-adapter contradict each other")
    torch.manual_seed(args.seed)
    model, tok = load(args.adapter, args.model, device, load_in_4bit=getattr(args, "load_in_4bit", None),
                      quantizer=getattr(args, "quantizer", None), dtype=getattr(args, "dtype", None))
    if args.merge:
        model = model.merge_and_unload()
    for prompt in args.prompt:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)], device=device)
        kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  attention_mask=torch.ones_like(ids))
        if args.temperature > 0:
            kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            if args.no_adapter and hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, **kw)
            else:
                out = model.generate(input_ids=ids, **kw)
        text = tok.decode(out[0, ids.shape[1]:].tolist())
        print(f"{prompt}{text}")
    sys.stdout.flush()
    return 0
