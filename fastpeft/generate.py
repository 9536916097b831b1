"""``fastpeft generate``: load a base model and a peft-format adapter, generate for a prompt.

The base comes from ``--model``, else from the adapter folder's ``base_model/``
(written by ``fastpeft train`` for the embedded default; a ``checkpoint-<step>/``
folder uses its run folder's), else from the adapter config's
``base_model_name_or_path`` when that is a local folder.
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


def stop_ids(tok, model) -> list:
    """The ids generation stops at: the tokenizer's end of text and the model's own (its ``generation_config``:
    instruct and chat models list several, e.g. <|im_end|>; passing ``eos_token_id`` explicitly would otherwise
    replace them, where transformers stops at any)."""
    stop = [tok.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    stop += [t for t in configured if t is not None and t not in stop]
    return [t for t in stop if t is not None] or [None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fastpeft generate``."""
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--model", default=None,
                   help="base model folder (default: the adapter folder's base_model/, a checkpoint's run folder's, "
                        "else the adapter config's base_model_name_or_path when that is a local folder)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user turn through the tokenizer's chat template (for adapters "
                        "trained on conversation records)")
    p.add_argument("--system", default=None, help="with --chat: a system turn before each prompt")
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


def _run_folder(adapter: str) -> str | None:
    """The run folder of a ``checkpoint-<step>`` folder written by ``fastpeft train`` (its parent), else None."""
    name = os.path.basename(os.path.normpath(adapter))
    if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return os.path.dirname(os.path.normpath(adapter)) or "."
    return None


def _find(adapter: str, name: str) -> str | None:
    """``name`` in the adapter folder, else (for a checkpoint) in its run folder."""
    for folder in (adapter, _run_folder(adapter)):
        if folder is not None and os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _train_log(adapter: str) -> dict:
    path = _find(adapter, "train_log.json")
    try:
        log = json.load(open(path, encoding="utf-8")) if path else {}
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

    cmd = "fastpeft generate"
    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"{cmd}: {adapter!r} has no adapter_config.json")
    try:
        cfg = json.load(open(config_path, encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{cmd}: {config_path} is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"{cmd}: {config_path} must hold a JSON object")
    if not any(os.path.isfile(os.path.join(adapter, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise SystemExit(f"{cmd}: {adapter!r} has no adapter_model.safetensors (an incomplete adapter folder)")
    if model_path is not None and not os.path.isdir(model_path):
        raise SystemExit(f"{cmd}: --model {model_path!r} is not a local folder (fastpeft does not download "
                         "models; fetch it first, e.g. with huggingface-cli download)")
    base_path = model_path
    if base_path is None:
        base_path = _find(adapter, BASE_DIR)  # a checkpoint uses its run folder's base_model/
    named = cfg.get("base_model_name_or_path")
    if base_path is None:
        if named and isinstance(named, str) and os.path.isdir(named):
            base_path = named
        elif named == DEFAULT_MODEL:
            raise SystemExit(f"{cmd}: {adapter} was trained on the embedded default but has no "
                             f"{BASE_DIR}/ folder; pass --model")
        else:
            raise SystemExit(f"{cmd}: base model {named!r} is not a local folder; pass --model PATH")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32, got {dtype!r}")
        dtype = _DTYPES.get(dtype)
    dtype = dtype or trained_dtype(adapter)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or "auto")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{cmd}: cannot load the base model from {base_path}: {exc}") from None
    trained_4bit, trained_quantizer = trained_in_4bit(adapter)
    if load_in_4bit is None:
        load_in_4bit = trained_4bit
    if load_in_4bit:
        dtype = next(base.parameters()).dtype
        base = quantize_base(base, quantizer or trained_quantizer, dtype)
    if _find(adapter, "fastpeft_tokenizer.json") or named == DEFAULT_MODEL:
        tok = ByteTokenizer()  # the embedded default's byte-level tokenizer
    else:
        src = adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
        try:
            tok = HFTokenizer(AutoTokenizer.from_pretrained(src))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{cmd}: cannot load a tokenizer from {src}: {exc}") from None
    try:
        model = PeftModel.from_pretrained(base, adapter)
    except SystemExit:
        raise
    except Exception as exc:  # corrupt safetensors, another rank or base, a config peft cannot read: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"{cmd}: cannot load the adapter in {adapter} onto {base_path}: "
                         f"{type(exc).__name__}: {first}") from None
    return model.to(device).eval(), tok


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``fastpeft generate``."""
    from .data import DataError, chat_segments
    from .train import resolve_device

    device = resolve_device(args.device, "fastpeft generate")
    if args.merge and args.no_adapter:
        raise SystemExit("fastpeft generate: --merge and --no-adapter contradict each other")
    if args.max_new_tokens < 1:
        raise SystemExit(f"fastpeft generate: --max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise SystemExit(f"fastpeft generate: --temperature must be ≥ 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"fastpeft generate: --top-p must be in (0, 1], got {args.top_p}")
    if args.system is not None and not args.chat:
        raise SystemExit("fastpeft generate: --system needs --chat")
    torch.manual_seed(args.seed)
    model, tok = load(args.adapter, args.model, device, load_in_4bit=getattr(args, "load_in_4bit", None),
                      quantizer=getattr(args, "quantizer", None), dtype=getattr(args, "dtype", None))
    if args.merge:
        try:
            model = model.merge_and_unload()
        except (NotImplementedError, ValueError) as exc:  # prompt learning, aLoRA, ...: nothing to merge into
            raise SystemExit(f"fastpeft generate: --merge: {exc}") from None
    stop = stop_ids(tok, model)
    for prompt in args.prompt:
        if args.chat:
            turns = ([{"role": "system", "content": args.system}] if args.system is not None else []) \
                + [{"role": "user", "content": prompt}]
            try:
                pieces = chat_segments(tok, turns, "--chat", add_generation_prompt=True)
            except DataError as exc:  # no chat template, or the template refuses these turns
                raise SystemExit(f"fastpeft generate: {exc}") from None
            ids = torch.tensor([[i for piece, _ in pieces for i in piece]], device=device)
        else:
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)], device=device)
        kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=stop if len(stop) > 1 else stop[0],
                  pad_token_id=tok.pad_token_id, attention_mask=torch.ones_like(ids))
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
