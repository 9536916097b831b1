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
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import (
    DEFAULT_TASK_NAME,
    IGNORE_INDEX,
    ByteTokenizer,
    Collator,
    DataError,
    HFTokenizer,
    Sample,
    auto_max_length,
    batches,
    default_task,
    pack,
    read_records,
    tokenize,
)

METHODS = ("lora", "qlora", "prefix", "prompt", "ptuning", "bitfit", "freeze", "adapter", "ia3", "adalora", "ln_tuning",
           "trainable_tokens")
PROMPT_METHODS = ("prefix", "prompt", "ptuning")  # virtual tokens before the input
DEFAULT_MODEL = "fastpeft:default"
ASSETS = Path(__file__).parent / "assets"
STATE_NAME = "trainer_state.pt"
BASE_DIR = "base_model"
INITIAL_DIR = "initial_adapter"  # pissa_niter_K runs: the adapter as initialized (see saved_adapter_options)


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
    g.add_argument("--data", default=None, help="JSONL (prompt/response, text or conversation records) or a "
                                                "plain-text file (default: the embedded uppercase-words task)")
    g.add_argument("--eval-data", default=None, help="held-out file (default: --eval-split of --data)")
    g.add_argument("--eval-split", type=float, default=0.05, help="fraction held out when no --eval-data")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--response-field", default="response")
    g.add_argument("--text-field", default="text")
    g.add_argument("--messages-field", default="messages",
                   help="field of conversation records (role/content turns; ShareGPT's 'conversations' with "
                        "from/value is read too): laid out by the tokenizer's chat template, assistant turns "
                        "learned")
    g.add_argument("--max-length", default="auto", help="tokens per sample, or auto (1.5 × mean length)")
    g.add_argument("--group-by-length", action="store_true", help="batch samples of similar length")
    g.add_argument("--packing", action="store_true",
                   help="pack several samples into each row of --max-length tokens, each attending only to itself "
                        "(position_ids restart per sample; no padding between them); --batch-size counts rows")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=METHODS)
    g.add_argument("--r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names, a regex, or all-linear")
    g.add_argument("--use-rslora", action="store_true")
    g.add_argument("--init-lora-weights", default=True, type=_init_lora_weights, metavar="INIT",
                   help="LoRA init (lora/qlora), peft's init_lora_weights: true (default), false, gaussian, "
                        "orthogonal (even --r), mica (B frozen), pissa, "
                        "pissa_niter_K (fast SVD, K iterations), olora, loftq (NF4 LoftQ with loftq_bits=4, "
                        "loftq_iter=1; on a 4-bit base (--load-in-4bit/qlora) the adapters are fitted to the "
                        "original weights of --model instead, as peft's replace_lora_weights_loftq), eva (A from "
                        "the SVD of each layer's inputs over the training batches, ranks redistributed; EvaConfig "
                        "fields through --method-options '{\"eva_config\": {...}}'; one process)")
    g.add_argument("--use-dora", action="store_true",
                   help="DoRA (lora/qlora): a trained magnitude per output feature beside A and B, as peft's "
                        "use_dora")
    g.add_argument("--modules-to-save", default="auto",
                   help="comma-separated modules trained in full beside the adapter (any method), or none "
                        "(auto: the embeddings and head for LoRA/QLoRA on the embedded default, whose random "
                        "base has no vocabulary to reuse, unless the adapter is aLoRA; none otherwise)")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prefix/prompt/ptuning")
    g.add_argument("--freeze-layers", type=int, default=2, help="freeze: the last N blocks train")
    g.add_argument("--method-options", default=None,
                   help="JSON object of further options for the method's config (e.g. '{\"init_r\": 12}')")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default: set by --max-steps)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 400 for the embedded "
                                                              "default, else --epochs or 1 epoch; -1: not set, "
                                                              "as transformers' max_steps)")
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
                   help="continue from the latest checkpoint in --output (or the given checkpoint folder); "
                        "the options that shape the adapter or the data order must be the same")
    g.add_argument("--overwrite-output-dir", action="store_true",
                   help="start afresh in an --output that holds checkpoint-* folders of an earlier run, deleting "
                        "them (without it such a folder is refused unless --resume)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None, help="YAML or JSON file whose keys mirror these flags")


def _init_lora_weights(value: str) -> bool | str:
    """``--init-lora-weights``: "true"/"false" as booleans, the other values of peft's ``init_lora_weights`` as
    they are (checked)."""
    from .layers.lora_init import init_kind

    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        init_kind(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``fastpeft train`` flags, a ``--config`` file's values acting as defaults under explicit flags."""
    p = argparse.ArgumentParser(prog="fastpeft train")
    add_train_arguments(p)
    return resolve_config(p, p.parse_args(argv), argv)


def resolve_config(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """Apply ``args.config``: its keys become defaults, explicit command-line flags still win.

    Each value goes through its flag's checks (type, choices; booleans are true/false), errors naming the file
    and the key; ``resume: true`` means the latest checkpoint."""
    if not args.config:
        return args
    values = load_config_file(args.config)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    bad = sorted(k for k in values if k not in actions)
    if bad:
        raise SystemExit(f"fastpeft train: unknown key(s) in {args.config}: {bad}")
    converted = {}
    for key, value in values.items():
        if value is not None:  # `key:` with no value in YAML: the flag's default
            converted[key] = _config_value(actions[key], value, f"fastpeft train: {args.config}: {key}")
    p.set_defaults(**converted)
    return p.parse_args(argv)


_STRUCTURED = {"target_modules": list, "modules_to_save": list, "method_options": dict}


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a config file checked and converted as the command line would for ``action``."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise SystemExit(f"{where}: expected true or false, got {value!r}")
        return value
    if action.dest == "init_lora_weights":  # true/false (YAML booleans too) or one of peft's init names
        try:
            return _init_lora_weights(value if isinstance(value, bool) else str(value))
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"{where}: {exc}") from None
    if action.dest == "resume":  # --resume [CHECKPOINT]: true = the latest, false = a new run
        if isinstance(value, bool):
            return action.const if value else None
        if not isinstance(value, str) or not value:
            raise SystemExit(f"{where}: expected true, false or a checkpoint folder, got {value!r}")
        return value
    kind = _STRUCTURED.get(action.dest)
    if kind is not None and isinstance(value, kind):
        if kind is list and not all(isinstance(v, str) for v in value):
            raise SystemExit(f"{where}: expected a list of module names, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SystemExit(f"{where}: expected {_kind(action)}, got {value!r}")
    if action.type in (int, float):
        if action.type is int and isinstance(value, float):
            raise SystemExit(f"{where}: expected an integer, got {value!r}")
        try:
            value = action.type(value)
        except ValueError:
            raise SystemExit(f"{where}: expected {_kind(action)}, got {value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise SystemExit(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _kind(action: argparse.Action) -> str:
    return {int: "an integer", float: "a number"}.get(action.type, "a single value")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict with flag names (dashes turned to underscores)."""
    if not os.path.isfile(path):
        raise SystemExit(f"fastpeft train: config file {path!r} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"fastpeft train: cannot read config file {path}: {exc}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SystemExit(f"fastpeft train: {path}: not valid YAML{at} "
                             f"({getattr(exc, 'problem', None) or exc})") from None
    else:
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"fastpeft train: {path}: not valid JSON at line {exc.lineno}, column {exc.colno} "
                             f"({exc.msg})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"fastpeft train: {path} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that make no sense, naming the flag, before anything is built or written.

    ``--max-steps -1`` is turned into None (not set), as transformers' ``max_steps=-1``."""
    def bad(flag: str, why: str, value: Any) -> SystemExit:
        return SystemExit(f"fastpeft train: --{flag} {why}, got {value!r}")

    def number(name: str, ok, why: str, optional: bool = False) -> None:
        value = getattr(args, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not ok(value):
            raise bad(name.replace("_", "-"), why, value)

    if args.max_steps == -1:
        args.max_steps = None
    number("batch_size", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1")
    number("grad_accum", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1")
    number("max_steps", lambda v: int(v) == v and v >= 1, "must be ≥ 1 (or -1: not set)", optional=True)
    number("epochs", lambda v: v > 0, "must be > 0", optional=True)
    number("lr", lambda v: v > 0, "must be > 0", optional=True)
    number("eval_split", lambda v: 0 <= v < 1, "must be in [0, 1)")
    number("warmup_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    number("weight_decay", lambda v: v >= 0, "must be ≥ 0")
    number("max_grad_norm", lambda v: v >= 0, "must be ≥ 0 (0: no clipping)")
    number("r", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1")
    number("lora_alpha", lambda v: True, "must be a finite number")
    number("lora_dropout", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    number("num_virtual_tokens", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1")
    number("freeze_layers", lambda v: int(v) == v and v >= 0, "must be an integer ≥ 0")
    number("eval_steps", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1", optional=True)
    number("save_steps", lambda v: int(v) == v and v >= 1, "must be an integer ≥ 1", optional=True)
    number("eval_generate", lambda v: int(v) == v and v >= 0, "must be an integer ≥ 0", optional=True)
    if str(args.max_length) != "auto":
        try:
            n = int(str(args.max_length))
        except ValueError:
            n = 0
        if n < 1:
            raise bad("max-length", "must be a positive integer or auto", args.max_length)
    if args.resume and getattr(args, "overwrite_output_dir", False):
        raise SystemExit("fastpeft train: --resume and --overwrite-output-dir contradict each other")
    if args.method not in METHODS:
        raise bad("method", f"must be one of {', '.join(METHODS)}", args.method)
    if getattr(args, "packing", False) and args.method in PROMPT_METHODS:
        raise SystemExit(f"fastpeft train: --packing does not work with --method {args.method}: its virtual tokens "
                         "come before the whole row, so packed samples would share them and see each other")
    if args.method == "trainable_tokens" and not method_options(args).get("token_indices"):
        raise SystemExit("fastpeft train: --method trainable_tokens trains chosen rows of the embeddings: name them "
                         "with --method-options '{\"token_indices\": [id, ...]}' (e.g. the ids of added tokens)")
    method_options(args)
    resolve_device(args.device, "fastpeft train")


def method_options(args: argparse.Namespace) -> dict:
    """``--method-options`` as a dict (a JSON object on the command line, a mapping in a config file)."""
    value = args.method_options
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"fastpeft train: --method-options is not valid JSON ({exc.msg} at column "
                             f"{exc.colno}): {args.method_options!r}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"fastpeft train: --method-options must be a JSON object, got {args.method_options!r}")
    return value


# --------------------------------------------------------------------------- model
def resolve_device(name: str, command: str | None = None) -> torch.device:
    """``auto`` (cuda when present), ``cpu``, ``cuda``, ``cuda:1``, …; with ``command``, a device that is not
    there is a ``SystemExit`` naming it (``"fastpeft train: --device ..."``)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        if command is None:
            raise
        raise SystemExit(f"{command}: --device {name!r} is not a device (auto, cpu, cuda, cuda:1, …)") from None
    if command is None or device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise SystemExit(f"{command}: --device {name!r}: no {device.type.upper()} device is available here")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise SystemExit(f"{command}: --device {name!r}: there are only {count()} {device.type} device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype; ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
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


def _check_model_folder(model: str | None, command: str = "fastpeft train") -> None:
    if model not in (None, DEFAULT_MODEL) and not os.path.isdir(model):
        raise SystemExit(f"{command}: --model {model!r} is not a local folder (fastpeft does not download "
                         "models; fetch it first, e.g. with huggingface-cli download)")


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer of ``args.model`` (the byte-level one for the embedded default)."""
    _check_model_folder(args.model)
    if args.model in (None, DEFAULT_MODEL):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(args.model))


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok=None):
    """(model, tokenizer) for ``args.model`` (or the embedded default), quantized with ``--load-in-4bit``."""
    _check_model_folder(args.model)
    tok = tok if tok is not None else load_tokenizer(args)
    if args.model in (None, DEFAULT_MODEL):
        model = build_default_model(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
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


def check_alora_samples(args: argparse.Namespace, samples: list, packing: bool) -> None:
    """With an aLoRA adapter (``--method-options '{"alora_invocation_tokens": [...]}'``): the adapter only trains on
    what follows its invocation, so packing (one row, several samples: only the last invocation would count) is
    refused, a dataset in which no sample holds the invocation is an error (nothing would train), and samples
    without it are counted in a warning."""
    tokens = method_options(args).get("alora_invocation_tokens") if args.method in ("lora", "qlora") else None
    if not tokens:
        return
    if packing:
        raise SystemExit("fastpeft train: --packing cannot be used with an aLoRA adapter (alora_invocation_tokens): "
                         "a packed row would be activated only from its last sample's invocation")
    from .alora import find_invocation

    missing = sum(find_invocation(torch.tensor([s.input_ids]), tokens)[0] is None for s in samples)
    if missing == len(samples):
        raise SystemExit(f"fastpeft train: no training sample contains the aLoRA invocation tokens {tokens}: the "
                         "adapter would never be activated (put the invocation text before each response, tokenized "
                         "as in context, e.g. at the end of the prompt)")
    if missing:
        warnings.warn(f"{missing} of {len(samples)} training samples do not contain the aLoRA invocation tokens "
                      f"{tokens}: they train nothing", stacklevel=2)


def randomized_init(args: argparse.Namespace) -> bool:
    """Whether the LoRA init draws random numbers while rewriting the base (``pissa_niter_K``: a randomized SVD), so
    that rerunning it when the adapter is loaded would give another base."""
    from .layers.lora_init import init_kind

    kind, niter = init_kind(getattr(args, "init_lora_weights", True))  # (checked when the flag was parsed)
    return args.method in ("lora", "qlora") and kind == "pissa" and niter is not None


def saved_adapter_options(args: argparse.Namespace, out: Path) -> dict:
    """``save_pretrained`` keywords for the run's adapter folders (the output and each checkpoint). A
    ``pissa_niter_K`` adapter is written converted (peft's ``path_initial_model_for_weight_conversion``, from the
    initial adapter kept in ``initial_adapter/``): a plain LoRA adapter of rank 2r on the original base, which
    loads anywhere to the trained model. Saved as such, its config would make every load rerun the randomized SVD
    on the original base and get another residual: not the model that was trained."""
    if randomized_init(args) and (out / INITIAL_DIR).is_dir():
        return {"path_initial_model_for_weight_conversion": str(out / INITIAL_DIR)}
    return {}


def check_method(args: argparse.Namespace, total_steps: int | None = None) -> None:
    """Build the method on the model's skeleton (meta device, nothing allocated) so that options which do not
    fit it (``--method-options`` keys, ``--target-modules`` matching nothing) fail before the model is loaded."""
    if args.method == "prefix" and args.gradient_checkpointing:
        raise SystemExit("fastpeft train: --method prefix cannot use --gradient-checkpointing: prefix tuning passes "
                         "its prefixes through the KV cache, which checkpointed layers do not keep (use --method "
                         "prompt or ptuning, or leave checkpointing off)")
    try:
        with torch.device("meta"):
            if args.model in (None, DEFAULT_MODEL):
                skeleton = build_default_model()
            else:
                from transformers import AutoConfig, AutoModelForCausalLM

                skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    except Exception:  # noqa: BLE001 - an odd model folder: loading it for real reports the problem
        return
    try:
        with torch.device("meta"):
            build_peft_model(skeleton, args, total_steps)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if args.method_options and ("option" in text or "keyword argument" in text):
            flag = f"--method {args.method} with --method-options {args.method_options!r}"
        elif "arget modules" in text or "target_modules" in text:
            flag = f"--target-modules {args.target_modules!r}"
        else:
            flag = f"--method {args.method}"
        raise SystemExit(f"fastpeft train: {flag}: {text}") from None


def check_packing(model, device: torch.device, autocast: torch.dtype | None) -> None:
    """Refuse ``--packing`` on a model whose attention lets packed samples see each other.

    transformers keeps the samples of a packed row apart when it gets ``position_ids`` that restart and no
    attention mask (its packed-sequence masks; flash-attention's varlen path), but a model's own attention code
    may not. Two rows that share their second sample and differ in the first are run through the model: the
    logits of the shared sample must not change."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return
    g = torch.Generator().manual_seed(0)
    first = torch.randint(vocab, (2, 6), generator=g)
    shared = torch.randint(vocab, (1, 5), generator=g).expand(2, -1)
    ids = torch.cat([first, shared], 1).to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).repeat(2, 1).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, autocast):
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 6:].float()
    finally:
        model.train(was_training)
    scale = logits.abs().max().clamp_min(1e-6)
    if not torch.isfinite(logits).all() or (logits[0] - logits[1]).abs().max() > 1e-2 * scale:
        raise SystemExit("fastpeft train: --packing: this model's attention lets a packed sample see the samples "
                         "before it in its row (its attention code ignores the position_ids restarts that "
                         "transformers reads as separate sequences); train without --packing")


class _EvaBatches:
    """The first epoch's training batches, collated (and moved to ``device``) as they are read: the sized,
    re-iterable dataloader EVA cycles over."""

    def __init__(self, samples, args: argparse.Namespace, collator, device):
        self.samples, self.args, self.collator, self.device = samples, args, collator, device
        self.n = sum(1 for _ in batches(samples, args.batch_size, args.seed, 0, args.group_by_length))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        a = self.args
        for batch in batches(self.samples, a.batch_size, a.seed, 0, a.group_by_length):
            yield {n: t.to(self.device) for n, t in self.collator(batch).items()}


def eva_init(model, args: argparse.Namespace, samples, collator, device, autocast, packing: bool, world: int,
             show_progress_bar: bool = True) -> None:
    """``--init-lora-weights eva``: ``fastpeft.initialize_lora_eva_weights`` over the training batches (the
    first epoch's order, as the run reads them; default ``EvaConfig``; one process only). Deterministic, so a
    ``--resume`` redoes it and gets the same ranks before the checkpoint's weights are loaded."""
    from .eva import initialize_lora_eva_weights

    if world > 1:
        raise SystemExit("fastpeft train: --init-lora-weights eva runs on a single process (initialize the adapter "
                         "with fastpeft.initialize_lora_eva_weights, save it, and train from there)")

    def forward(m, inputs):
        with _autocast(device, autocast):
            return m(**inputs, use_cache=False) if packing else m(**inputs)

    initialize_lora_eva_weights(model, _EvaBatches(samples, args, collator, device), forward_fn=forward,
                                show_progress_bar=show_progress_bar)


def build_peft_model(model, args: argparse.Namespace, total_steps: int | None = None):
    """Wrap ``model`` for ``args.method`` through ``fastpeft.get_peft_model``."""
    from . import LoraConfig, get_peft_model

    targets: Any = args.target_modules
    if isinstance(targets, str) and targets != "all-linear" and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    elif isinstance(targets, str) and targets != "all-linear" and targets.isidentifier():
        targets = [targets]
    extra = method_options(args)
    save = args.modules_to_save
    is_lora = args.method in ("lora", "qlora")
    if save == "auto":  # the random embedded base: LoRA trains its embeddings and head too (not aLoRA, whose
        # tokens before the invocation must see the base model alone: full copies would change every token)
        alora = extra.get("alora_invocation_tokens") is not None
        save = ["embed_tokens", "lm_head"] if is_lora and not alora and args.model in (None, DEFAULT_MODEL) else None
    elif isinstance(save, str):
        save = None if save.lower() == "none" else [m.strip() for m in save.split(",") if m.strip()]
    if is_lora:
        init = getattr(args, "init_lora_weights", True)
        from .quant import is_linear4bit

        loftq_4bit = init == "loftq" and any(is_linear4bit(m) for m in model.modules())
        options = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
                       use_rslora=args.use_rslora, use_dora=getattr(args, "use_dora", False), task_type="CAUSAL_LM",
                       modules_to_save=save, init_lora_weights=True if loftq_4bit else init)
        if init == "loftq" and not loftq_4bit:
            options["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        if init == "eva":  # peft's defaults (--method-options '{"eva_config": {"rho": 1.0}}' changes them)
            options["eva_config"] = {}
        config = LoraConfig(**{**options, **extra})
        if loftq_4bit:  # the base is quantized already: LoftQ fits the adapters to the original weights
            if args.model in (None, DEFAULT_MODEL):
                raise ValueError("--init-lora-weights loftq on a 4-bit base reads the original weights from the "
                                 "--model folder's safetensors; the embedded default model has none")
            from .loftq import replace_lora_weights_loftq

            peft_model = get_peft_model(model, config)
            replace_lora_weights_loftq(peft_model, model_path=args.model)
            return peft_model
    else:
        import dataclasses

        from . import methods

        if getattr(args, "use_dora", False):
            raise ValueError("--use-dora applies to --method lora and qlora")
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
        if save:
            if "modules_to_save" not in applicable:
                raise SystemExit(f"fastpeft train: --modules-to-save does not apply to --method {key}")
            options["modules_to_save"] = save
        options.update(extra)
        config = methods.build_config(key, task_type="CAUSAL_LM", **options)
    model = get_peft_model(model, config)
    for param in model.parameters():  # trainable parameters in fp32 (fp16 ones overflow)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


# --------------------------------------------------------------------------- helpers
def _targets(batch: list[Sample]) -> int:
    """The tokens a batch's loss is the mean over: labels other than -100 after the causal shift."""
    return sum(sum(1 for t in s.labels[1:] if t != IGNORE_INDEX) for s in batch)


def _global_count(count: int, world: int, device: Any) -> int:
    """``count`` summed over the processes of a distributed run."""
    if world == 1:
        return count
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


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


# --------------------------------------------------------------------------- stopping on a signal
class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption); ``checkpoint`` is the folder
    saved at the last completed step (None before the first step), from which ``--resume`` continues."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"; {checkpoint} holds step {step}: continue with --resume" if checkpoint else " before step 1"
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")


class _StopOnSignal:
    """While active, SIGINT and SIGTERM only set ``signum`` (the loop stops at the next micro-batch, where the
    model and optimizer are consistent); a second SIGINT interrupts at once. A signal the process was started
    ignoring (``nohup``, a background job's SIGINT) stays ignored. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                # None: a handler not installed from Python (an embedding program's): give back the default
                self._previous[sig] = signal.signal(sig, self._handle) or signal.SIG_DFL
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


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


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-<step>`` folders in ``out``, (step, path) by increasing step."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        tail = path.name[len("checkpoint-"):]
        if path.is_dir() and tail.isdigit():
            found.append((int(tail), path))
    return sorted(found)


def save_checkpoint(model, optimizer, out: Path, step: int, epoch: int, batch_in_epoch: int, log: dict,
                    limit: int, tok=None, rng: dict | None = None, save_options: dict | None = None) -> Path:
    """Adapter (peft format) + optimizer/RNG/position in ``out/checkpoint-<step>``; keeps the newest ``limit``.
    ``rng``: the generators' state to record (default: their state now); ``save_options``: the adapter's
    ``save_pretrained`` keywords (:func:`saved_adapter_options`).

    The folder is written under a temporary name and renamed, so a run killed mid-save leaves no truncated
    checkpoint; it also gets the tokenizer and the log so far (``fastpeft generate`` reads them). The checkpoint
    just written is never deleted."""
    ckpt = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **(save_options or {}))
    if tok is not None:
        tok.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    torch.save({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "optimizer": optimizer.state_dict(),
                "rng": rng or _rng_state(), "log": log, "tensors": _resume_tensors(model),
                "allocator": _allocator_state(model)}, tmp / STATE_NAME)
    if ckpt.exists():  # resumed from an earlier checkpoint of this run: the step is written again
        old = out / f".checkpoint-{step}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt)
    others = [p for _, p in checkpoints(out) if p != ckpt]
    if limit > 0:
        for stale in others[: max(0, len(others) - (limit - 1))]:
            shutil.rmtree(stale)
    return ckpt


def load_checkpoint(out: Path, resume: str) -> tuple[Path, dict]:
    """(folder, state) of the checkpoint ``--resume`` names: the given folder, or the latest readable one in
    ``out`` (an unreadable latest one, e.g. cut by a kill mid-save, is skipped with a warning)."""
    if resume != "auto":
        candidates = [Path(resume)]
        if not (candidates[0] / STATE_NAME).is_file():
            raise SystemExit(f"fastpeft train: --resume {resume!r} is not a checkpoint folder (no {STATE_NAME})")
    else:
        candidates = [p for _, p in reversed(checkpoints(out)) if (p / STATE_NAME).is_file()]
        if not candidates:
            raise SystemExit(f"fastpeft train: --resume: no checkpoint in {out}")
    for i, ckpt in enumerate(candidates):
        try:
            state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state or "tensors" not in state:
                raise ValueError("not a fastpeft train checkpoint")
            return ckpt, state
        except Exception as exc:  # a truncated or foreign file: torch raises several kinds
            if i + 1 < len(candidates):
                print(f"fastpeft train: warning: {ckpt / STATE_NAME} is unreadable ({type(exc).__name__}: {exc}); "
                      f"resuming from {candidates[i + 1]} instead", file=sys.stderr)
                continue
            raise SystemExit(f"fastpeft train: --resume: {ckpt / STATE_NAME} is unreadable "
                             f"({type(exc).__name__}: {exc})") from None
    raise AssertionError("unreachable")


# options that must not change across --resume: they shape the adapter, its training (dropout), the base, or the
# data order (the base's dtype is compared as resolved: see check_resume)
RESUME_OPTIONS = ("model", "method", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                  "init_lora_weights", "target_modules", "modules_to_save", "num_virtual_tokens", "freeze_layers",
                  "method_options", "load_in_4bit", "quantizer", "data", "eval_data", "eval_split", "prompt_field",
                  "response_field", "text_field", "messages_field", "max_length", "group_by_length", "packing",
                  "batch_size", "grad_accum", "seed")


def _resume_value(key: str, value: Any) -> Any:
    if key == "method_options":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        return value or None
    if key in ("model", "data", "eval_data") and isinstance(value, str) and value != DEFAULT_MODEL:
        return os.path.abspath(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value) if key == "max_length" else value


def check_resume(ckpt: Path, state: dict, args: argparse.Namespace, total_steps: int,
                 dtype: torch.dtype | None = None) -> None:
    """Refuse a checkpoint this run cannot continue: at or past its last step, saved with other options, or
    trained with the base in another dtype than ``dtype`` (this run's, resolved: ``--dtype auto`` on a GPU and on
    a CPU differ; ``auto`` and ``fp32`` on a CPU do not)."""
    if state["step"] >= total_steps:
        raise SystemExit(f"fastpeft train: cannot resume from {ckpt}: it is at step {state['step']}, and this run "
                         f"has {total_steps} steps in all (raise --max-steps/--epochs, or start afresh with "
                         "--overwrite-output-dir or another --output)")
    saved = (state.get("log") or {}).get("args")
    if not isinstance(saved, dict):
        return
    for key in RESUME_OPTIONS:
        if key not in saved:
            continue
        old, new = _resume_value(key, saved[key]), _resume_value(key, getattr(args, key, None))
        if old != new:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"fastpeft train: cannot resume from {ckpt}: it was trained with {flag} {saved[key]!r}, "
                             f"this run has {flag} {getattr(args, key, None)!r} (resume with the same --method "
                             "and options, or start afresh with --overwrite-output-dir or another --output)")
    trained = (state.get("log") or {}).get("dtype")
    if dtype is not None and trained is not None and trained != str(dtype).removeprefix("torch."):
        raise SystemExit(f"fastpeft train: cannot resume from {ckpt}: its base ran in {trained}, this run's in "
                         f"{str(dtype).removeprefix('torch.')} (pass the --dtype it was trained with)")


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


_ADALORA_RANKED = (".lora_A.", ".lora_B.", ".lora_E.", ".ranknum.")


def _restore(model, state: dict, method: str | None = None) -> None:
    """Load a checkpoint's tensors (and AdaLoRA allocator state) into ``model``; names and shapes must match
    (only AdaLoRA's rank-pruned tensors may come back smaller)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    hint = "(resume with the same --method and options)"
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state["tensors"])
    if missing:
        raise SystemExit(f"fastpeft train: the checkpoint lacks {missing[0]!r}, which this model trains {hint}")
    with torch.no_grad():
        for name, value in state["tensors"].items():
            target = buffers.get(name[len("buffer:"):]) if name.startswith("buffer:") else params.get(name)
            if target is None:
                raise SystemExit(f"fastpeft train: the checkpoint has {name!r}, which this model lacks {hint}")
            if target.shape == value.shape:
                target.copy_(value)
            elif method == "adalora" and any(part in f".{name}." for part in _ADALORA_RANKED) \
                    and value.dim() == target.dim():  # AdaLoRA may have pruned ranks: take the saved shape
                target.data = value.to(device=target.device, dtype=target.dtype)
            else:
                raise SystemExit(f"fastpeft train: the checkpoint's {name!r} has shape {tuple(value.shape)}, this "
                                 f"model's {tuple(target.shape)} {hint}")
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
    check_args(args)  # flags first: nothing is built or written for a run that cannot start
    rank, world, dist_device = _init_distributed(args)
    main_rank = rank == 0
    device = dist_device or resolve_device(args.device, "fastpeft train")
    dtype = resolve_dtype(args.dtype, device)
    autocast = dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    is_default = args.model in (None, DEFAULT_MODEL)
    default_data = args.data is None
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.output)
    earlier = checkpoints(out)
    if earlier and not args.resume and not getattr(args, "overwrite_output_dir", False):
        names = ", ".join(p.name for _, p in earlier[-3:])
        raise SystemExit(f"fastpeft train: {out} holds checkpoints of an earlier run ({names}); pass --resume to "
                         "continue it, --overwrite-output-dir to delete them and start afresh, or another --output")
    tok = load_tokenizer(args)

    # data
    fields = (args.prompt_field, args.response_field, args.text_field, args.messages_field)
    if default_data:
        train_rows, eval_rows = default_task()
        source = f"embedded:{DEFAULT_TASK_NAME}"
        if args.eval_data:  # the embedded task's training rows, evaluated on the given file
            eval_rows = read_records(args.eval_data, *fields)
    else:
        rows = read_records(args.data, *fields)
        source = args.data
        if args.eval_data:
            eval_rows = read_records(args.eval_data, *fields)
            train_rows = rows
        else:
            order = list(range(len(rows)))
            random.Random(args.seed).shuffle(order)
            n_eval = int(len(rows) * args.eval_split) if len(rows) >= 20 else 0
            if args.eval_split > 0 and n_eval == 0:
                print(f"fastpeft train: warning: {len(rows)} rows in {args.data} hold out no evaluation rows at "
                      f"--eval-split {args.eval_split} (a split needs 20 rows or more and one held-out row); "
                      "no eval_loss will be reported (pass --eval-data to evaluate)", file=sys.stderr)
            eval_rows = [rows[i] for i in order[:n_eval]]
            train_rows = [rows[i] for i in order[n_eval:]]
    packing = bool(getattr(args, "packing", False))
    if str(args.max_length) != "auto":
        max_length = int(args.max_length)
    else:  # packed rows hold whole samples: auto keeps (nearly) every sample whole
        max_length = auto_max_length(train_rows, tok, source=source, quantile=0.98 if packing else None)
    train_samples = tokenize(train_rows, tok, max_length, source)
    eval_samples = tokenize(eval_rows, tok, max_length, args.eval_data or source) if eval_rows else []
    n_samples = len(train_samples)
    if packing:
        train_samples = pack(train_samples, max_length)
    collator = Collator(tok.pad_token_id)
    n_generate = args.eval_generate if args.eval_generate is not None else (100 if default_data else 0)
    gen_rows = [r for r in eval_rows if "prompt" in r][:n_generate]

    # what the loop's batches give per epoch (full batches; one short batch when the data is smaller than one):
    # no full optimizer step at all is refused here, before anything is built or written
    n_batches = len(train_samples) // args.batch_size if len(train_samples) >= args.batch_size else 1
    if n_batches < world * args.grad_accum:
        what = f"{len(train_samples)} packed rows" if packing else f"{len(train_samples)} samples"
        raise SystemExit(f"fastpeft train: {what} give no full step of batch {args.batch_size} × grad-accum "
                         f"{args.grad_accum} × {world} process(es)")
    micro_per_epoch = max(1, len(train_samples) // (args.batch_size * world))  # rows, when packed
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    if args.max_steps is not None:
        total_steps = args.max_steps
    elif args.epochs is not None:
        total_steps = max(1, int(args.epochs * steps_per_epoch))
    else:
        total_steps = 400 if (is_default and default_data) else steps_per_epoch
    resume_from = None
    if args.resume:
        resume_from = load_checkpoint(out, args.resume)
        check_resume(*resume_from, args, total_steps, dtype)
    check_method(args, total_steps)
    check_alora_samples(args, train_samples, packing)

    out.mkdir(parents=True, exist_ok=True)
    if earlier and not args.resume and main_rank:  # --overwrite-output-dir
        for _, path in earlier:
            shutil.rmtree(path)
    model, tok = load_model(args, device, dtype, tok)
    if is_default and main_rank:  # the random embedded base is kept so `fastpeft generate` reloads it exactly
        base_dir = out / BASE_DIR
        if not (base_dir / "model.safetensors").is_file():  # unquantized, whatever --load-in-4bit does
            build_default_model(dtype=dtype).save_pretrained(base_dir)

    # method
    model = build_peft_model(model, args, total_steps)
    if randomized_init(args) and main_rank and not (args.resume and (out / INITIAL_DIR).is_dir()):
        model.save_pretrained(out / INITIAL_DIR)  # (the same draw on resume: the run is seeded)
    if args.method in ("lora", "qlora") and getattr(args, "init_lora_weights", True) == "eva":
        eva_init(model, args, train_samples, collator, device, autocast, packing, world,
                 show_progress_bar=not args.no_progress and main_rank)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    if packing:
        check_packing(model, device, autocast)
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
                 "train_samples": n_samples, "eval_samples": len(eval_samples),
                 "trainable_params": trainable, "all_params": total, "total_steps": total_steps,
                 "world_size": world, "global_batch": args.batch_size * args.grad_accum * world,
                 "steps": [], "evals": []}
    if packing:
        log["packed_rows"] = len(train_samples)
        log["packing_fill"] = round(sum(len(s.input_ids) for s in train_samples) / (len(train_samples) * max_length), 4)
    step, epoch, skip = 0, 0, 0
    if resume_from is not None:
        ckpt, state = resume_from
        _restore(model, state, args.method)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        log["steps"], log["evals"] = state["log"]["steps"], state["log"]["evals"]
        log["resumed_from"] = str(ckpt)
        _set_rng_state(state["rng"])
        if main_rank:
            print(f"resumed from {ckpt} at step {step}")
    # the step whose checkpoint in ``out`` holds this run's state (a stop on a signal need not save it again)
    saved_step = step if resume_from is not None and Path(resume_from[0]).resolve() == \
        (out / f"checkpoint-{step}").resolve() else None

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
          f"{n_samples} train / {len(eval_samples)} eval samples, max_length {max_length}, "
          + (f"packed into {log['packed_rows']} rows ({100 * log['packing_fill']:.0f}% full), " if packing else "")
          + f"{total_steps} steps on {device} ({log['dtype']})")
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
    # Where a checkpoint of the last completed step would resume (epoch, batch, RNG): what a stop on SIGINT /
    # SIGTERM saves. Micro-batches after it are dropped and replayed on --resume with the same dropout masks.
    boundary = (epoch, skip, _rng_state())
    stop_now = False
    stopper = _StopOnSignal().__enter__()
    span = world * args.grad_accum  # every optimizer step takes grad_accum micro-batches on every rank
    try:
        while not done:
            micro = 0
            loss_acc, tok_acc = 0.0, 0
            epoch_batches = list(batches(train_samples, args.batch_size, args.seed, epoch, args.group_by_length))
            epoch_batches = epoch_batches[: len(epoch_batches) // span * span]
            if not epoch_batches:
                what = f"{len(train_samples)} packed rows" if packing else f"{len(train_samples)} samples"
                raise SystemExit(f"fastpeft train: {what} give no full step of batch "
                                 f"{args.batch_size} × grad-accum {args.grad_accum} × {world} process(es)")
            for index, batch in enumerate(epoch_batches):
                if index < skip or index % world != rank:
                    continue
                if micro % args.grad_accum == 0:  # a step's first micro-batch: the target tokens of the whole step
                    targets = [_targets(b) for j, b in enumerate(epoch_batches[index: index + span])
                               if (index + j) % world == rank][: args.grad_accum]  # this process's micro-batches
                    step_targets = _global_count(sum(targets), world, device)
                inputs = {n: t.to(device) for n, t in collator(batch).items()}
                last_micro = (micro + 1) % args.grad_accum == 0
                sync = runner.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
                # each micro-batch's mean loss weighted by its share of the step's target tokens (times the
                # processes, whose gradients DDP averages): the step's gradient is that of one batch holding all
                # of them, as transformers' Trainer does with num_items_in_batch
                weight = targets[micro % args.grad_accum] * world / max(step_targets, 1)
                with sync:
                    with _autocast(device, autocast):
                        # packed rows: no KV cache, which would turn transformers' packed-sequence masks off
                        loss = (runner(**inputs, use_cache=False) if packing else runner(**inputs)).loss
                    (loss * weight).backward()
                loss_acc += loss.item() * weight
                tok_acc += sum(len(s.input_ids) for s in batch)
                micro += 1
                in_step += 1
                if micro % args.grad_accum:
                    if stopper.signum and world == 1:  # mid-accumulation: dropped now, replayed on --resume
                        stop_now = True
                        break
                    continue
                scale = cosine_lr(step, total_steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * scale
                # without clipping (max_norm inf: a factor of 1) the norm is still measured and logged
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0
                                                           else float("inf"))
                optimizer.step()
                update = getattr(model, "update_and_allocate", None)
                if callable(update) and args.method == "adalora":
                    update(step)  # AdaLoRA's budget schedule reads the gradients: after step(), before zero_grad()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if world > 1:  # report the mean loss and the total tokens over the processes
                    import torch.distributed as dist

                    # the third entry: whether any process was asked to stop (all stop after this same step)
                    stats = torch.tensor([loss_acc, float(tok_acc), float(stopper.signum > 0)], dtype=torch.float64,
                                         device=device)
                    dist.all_reduce(stats)
                    loss_acc, tok_acc = stats[0].item() / world, int(stats[1].item())
                    stop_now = stats[2].item() > 0
                else:
                    stop_now = stopper.signum > 0
                # where the next step's micro-batches start, for every process: the end of this step's group
                # of world × grad_accum batches (index + 1 is that only for the last process of the group)
                step_end = (index // span + 1) * span
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
                if step % save_every == 0 and step < total_steps:
                    if main_rank:
                        save_checkpoint(model, optimizer, out, step, epoch, step_end, log, args.save_total_limit,
                                        tok, save_options=saved_adapter_options(args, out))
                    saved_step = step
                if step >= total_steps:
                    done = True
                    break
                boundary = (epoch, step_end, _rng_state())
                if stop_now:
                    break
            if stop_now:
                break
            skip = 0
            epoch += 1
    finally:
        stopper.__exit__(None, None, None)
    if stop_now and not done:
        optimizer.zero_grad(set_to_none=True)
        ckpt = None
        if step > 0:
            ckpt = out / f"checkpoint-{step}"
            if main_rank and saved_step != step:  # an earlier run's checkpoint-<step> is overwritten
                save_checkpoint(model, optimizer, out, step, boundary[0], boundary[1], log, args.save_total_limit,
                                tok, rng=boundary[2], save_options=saved_adapter_options(args, out))
        bar.close()
        if world > 1:
            import torch.distributed as dist

            runner = None  # noqa: F841 - the DDP reducer goes first (see the end of this function)
            dist.barrier()
            dist.destroy_process_group()
        raise TrainingInterrupted(stopper.signum or signal.SIGTERM, step, ckpt)
    bar.close()

    log["final"] = log["evals"][-1] if log["evals"] else {}
    log["train_seconds"] = round(time.perf_counter() - t_start, 2)
    if main_rank:
        model.save_pretrained(out, **saved_adapter_options(args, out))
        tok.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
        plot_log(log, out / "loss.png")
        print(f"saved the adapter, train_log.json and loss.png in {out}")
    if world > 1:
        import torch.distributed as dist

        # The DDP wrapper is freed while the group is still registered: freed after destroy_process_group it
        # would drop the group's last reference with the GIL held, and gloo's destructor can then wait forever
        # on a thread that needs the GIL.
        runner = None  # noqa: F841
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
    except TrainingInterrupted as exc:
        print(f"fastpeft train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    final = result.log.get("final", {})
    print(f"final: {final}")
    evals = result.log.get("evals", [])
    if evals and "exact_match" in evals[0] and "exact_match" in final:
        print(f"held-out exact match: {evals[0]['exact_match']:.2f} before training → {final['exact_match']:.2f} "
              f"after {final['step']} steps")
    return 0
