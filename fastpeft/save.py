"""Adapters on disk in peft's exact format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saved keys are peft's: ``base_model.model.<path>.lora_A.weight`` (the adapter name dropped; DoRA's
magnitude as ``base_model.model.<path>.lora_magnitude_vector``, without ``.weight``, as peft writes it;
an embedding layer's ``base_model.model.<path>.lora_embedding_A`` / ``lora_embedding_B``, plain parameters),
``base_model.model.<path>.<param>`` for a ``modules_to_save`` module, and the biases
``bias="all"|"lora_only"`` asks for. As peft (``save_embedding_layers="auto"``), an adapter whose
``target_modules`` name ``embed_tokens`` or ``lm_head`` also carries the base weights of the LoRA-wrapped input and
output embeddings (``<path>.base_layer.weight``), with peft's warning; so does, whole, an adapter on a model whose
``config.vocab_size`` differs from the saved config of its base (``base_model_name_or_path``, a folder or a Hub
repo): embeddings resized for new tokens (``<path>.weight``). ``True`` always saves them, ``False`` never. Loading
never unpickles unless the caller opts in, and then only with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .config import CONFIG_NAME
from .errors import PeftWarning

if TYPE_CHECKING:
    from torch import nn

    from .model import PeftModel

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.(weight|bias)$")
_MAGNITUDE = "lora_magnitude_vector"
_EMBEDDING_KEY = re.compile(r"\.(lora_embedding_A|lora_embedding_B)\.([^.]+)$")
_TOKENS_KEY = re.compile(r"\.token_adapter\.trainable_tokens_delta\.([^.]+)$")  # trainable_token_indices
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names for save_embedding_layers="auto"


def _wrappers(peft_model: PeftModel) -> dict[str, object]:
    from .model import ModulesToSaveWrapper

    return {name: m for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _token_key_of(peft_model: PeftModel, key: str, adapter_name: str) -> str | None:
    """The saved name (adapter name dropped) of state-dict key ``key`` if it is ``adapter_name``'s trainable-token
    rows on a wrapper of its own (a head tied to the embeddings saves nothing, as in peft), else None."""
    m = _TOKENS_KEY.search(key)
    if not m or m.group(1) != adapter_name:
        return None
    wrapper = peft_model.get_submodule(key[: m.start()])
    if getattr(wrapper, "is_tied", False):
        return None
    return key[: -len(adapter_name) - 1]


def _embedding_is_targeted(peft_model: PeftModel, config: Any) -> bool:
    """peft's test for ``save_embedding_layers="auto"``: ``target_modules`` names one of ``EMBEDDING_LAYER_NAMES``
    (a list), or (a regex other than "all-linear") matches a module of the model ending in one."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        return any(re.fullmatch(targets, k) for k, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _hub_file_exists(repo_id: str, filename: str) -> bool | None:
    """Whether the Hub repo ``repo_id`` holds ``filename``; None when that cannot be told (``HF_HUB_OFFLINE``, an
    invalid repo id, no connection: the last with peft's warning), as peft's ``check_file_exists_on_hf_hub``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "y", "yes", "t", "true", "on"):
        return None
    try:
        from huggingface_hub import file_exists
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    except ImportError:
        return None
    try:
        return file_exists(repo_id, filename)
    except (HFValidationError, EntryNotFoundError):
        return None
    except Exception as e:  # noqa: BLE001 - as peft: any failure of the lookup only warns
        warnings.warn(f"Unable to fetch remote file due to the following error {e} - silently ignoring the lookup "
                      f"for the file {filename} in {repo_id}.", stacklevel=5)
        return None


def _vocab_resized(peft_model: nn.Module, config: Any) -> bool:
    """peft's other ``save_embedding_layers="auto"`` case: the model's ``config.vocab_size`` differs from the one in
    the config of the base model the adapter names (``base_model_name_or_path``: a local folder or a Hub repo with
    a ``config.json``), i.e. the embeddings were resized (new tokens); warns as peft when it is so, and when the
    base's config cannot be looked up."""
    vocab_size = getattr(getattr(peft_model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    has_base_config = False
    if model_id:
        exists = os.path.exists(os.path.join(model_id, "config.json")) or _hub_file_exists(model_id, "config.json")
        if exists is None:
            warnings.warn(f"Could not find a config file in {model_id} - will assume that the vocabulary was not "
                          "modified.", stacklevel=4)
        has_base_config = bool(exists)
    if vocab_size and model_id and has_base_config \
            and vocab_size != type(peft_model.config).from_pretrained(model_id).vocab_size:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", stacklevel=4)
        return True
    return False


def _embedding_layer_tensors(peft_model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                             targeted: bool) -> dict[str, torch.Tensor] | None:
    """The input and output embeddings' tensors ``save_embedding_layers`` adds, under their saved names, as peft
    picks them: a layer wrapped by an adapter (an ``nn.Embedding``/``nn.Linear`` ``base_layer``) contributes its base
    layer's tensors; when ``target_modules`` names no embedding, an embedding that is no such wrapper is taken
    whole (a resized vocabulary). None when the model has no ``get_input_embeddings`` (not a transformers
    model)."""
    from torch import nn

    if not hasattr(peft_model, "get_input_embeddings"):
        return None
    out: dict[str, torch.Tensor] = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(peft_model, get)()
        except (AttributeError, NotImplementedError):
            continue
        base = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base, (nn.Linear, nn.Embedding)):
            continue
        name = next((n for n, m in peft_model.named_modules()
                     if (not targeted and layer is not None and m is layer) or (base is not None and m is base)), None)
        if name:  # a base layer's keys hold no adapter name (an adapter may be called "base_layer")
            out.update({k if targeted else _drop_adapter_name(k, adapter_name): v
                        for k, v in state.items() if k.startswith(f"{name}.")})
    return out


def _drop_adapter_name(key: str, adapter_name: str) -> str:
    """A state-dict key as saved: ``<...>.<param>.<adapter>`` -> ``<...>.<param>``, ``<...>.<adapter>.<tensor>`` ->
    ``<...>.<tensor>`` (only there, never a module of the same name elsewhere in the key)."""
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, dot, last = key.rpartition(".")
    if dot and head.endswith(f".{adapter_name}"):
        return f"{head[: -len(adapter_name) - 1]}.{last}"
    return key


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with FSDP2's sharded DTensors (``fully_shard``) gathered into full tensors. ``full_tensor()`` is
    collective, so every rank must call this (``save_pretrained`` does, whatever its ``is_main_process``) with the
    keys in the same order (state-dict order is)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


def adapter_state_dict(peft_model: PeftModel, adapter_name: str = "default",
                       state_dict: dict[str, torch.Tensor] | None = None,
                       save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for one adapter, under peft's saved key names.

    ``state_dict``: the model's full state dict as gathered by the caller (transformers' Trainer passes it
    under DeepSpeed ZeRO-3 / FSDP, where the module's own parameters are partitioned), instead of
    ``peft_model.state_dict()``. ``save_embedding_layers`` (peft's argument): ``"auto"`` adds the LoRA-wrapped
    embeddings' base weights when ``target_modules`` names ``embed_tokens``/``lm_head``, else the embeddings
    when the vocabulary was resized (see the module docstring), ``True`` always, ``False`` never."""
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(peft_model.peft_config)}")
    config = peft_model.peft_config[adapter_name]
    state = peft_model.state_dict() if state_dict is None else state_dict
    wrappers = _wrappers(peft_model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _TOKENS_KEY.search(key):
            saved_key = _token_key_of(peft_model, key, adapter_name)
            if saved_key is not None:
                out[saved_key] = value
            continue
        m = _EMBEDDING_KEY.search(key)
        if m:
            if m.group(2) == adapter_name:
                out[key[: m.start()] + f".{m.group(1)}"] = value
            continue
        m = _LORA_KEY.search(key)
        if m:
            if m.group(2) == adapter_name:
                suffix = "" if m.group(1) == _MAGNITUDE else f".{m.group(3)}"  # lora_B.bias with lora_bias
                out[key[: m.start()] + f".{m.group(1)}{suffix}"] = value
            continue
        owner = next((w for w in wrappers if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            prefix = f"modules_to_save.{adapter_name}."
            if rest.startswith(prefix):
                out[f"{owner}.{rest[len(prefix):]}"] = value
            if config.bias == "all" and key.endswith(".bias"):
                # peft's bias="all" file: every bias, also the original module's (in use, and trained, while
                # another adapter's copy is inactive) and this adapter's copy once more under
                # "<owner>.modules_to_save.<param>"
                if rest.startswith("original_module."):
                    out[key] = value
                elif rest.startswith(prefix):
                    out[f"{owner}.modules_to_save.{rest[len(prefix):]}"] = value
            continue
        if key.endswith("bias") and ".lora_" not in key:
            if config.bias == "all":
                out[key] = value
            elif config.bias == "lora_only" and key.endswith(".base_layer.bias"):
                # peft's file: the base bias of every LoRA layer, whichever adapter wraps it (only this adapter's
                # own layers' biases train; the others are written as they are)
                layer = peft_model.get_submodule(key[: -len(".base_layer.bias")])
                if getattr(layer, "lora_A", None):
                    out[key] = value
    targeted = _embedding_is_targeted(peft_model, config)
    # (peft's "auto": targeted embeddings are saved, but not with trainable tokens, which exist to keep the file
    # small; otherwise a vocabulary resized against the base model's saved config)
    if save_embedding_layers == "auto" and targeted and getattr(config, "trainable_token_indices", None) is None:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      stacklevel=3)
        save_embedding_layers = True
    elif save_embedding_layers == "auto":
        save_embedding_layers = _vocab_resized(peft_model, config)
    if save_embedding_layers:
        embeddings = _embedding_layer_tensors(peft_model, state, adapter_name, targeted)
        if embeddings is None:
            warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                          stacklevel=3)
        else:
            out.update(embeddings)
    out = full_tensors(out)
    if state_dict is None:  # taken from the module itself: partitioned parameters show as empty (as peft checks)
        warn_ungathered(out, adapter_name)
    return out


def warn_ungathered(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """peft's check before writing an adapter: a ``lora_A`` / ``lora_B`` tensor that is 1-D or empty is the local
    piece of a parameter partitioned by DeepSpeed ZeRO-3 or FSDP (v1) that was not gathered before saving; the
    file would look whole and fail when loaded, so this warns (:class:`fastpeft.PeftWarning`) with the fix."""
    bad = [(k, tuple(v.shape)) for k, v in tensors.items()
           if (".lora_A" in k or ".lora_B" in k) and (v.dim() < 2 or 0 in v.shape)]
    if not bad:
        return
    shown = ", ".join(f"{k}:{shape}" for k, shape in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
    warnings.warn(f"Adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) have invalid shape: {shown}. A 1-D or "
                  "zero-sized lora_A / lora_B tensor indicates that DeepSpeed ZeRO-3 / FSDP shards were not gathered "
                  "before save_pretrained() and are therefore incomplete. Wrap the save in "
                  "deepspeed.zero.GatheredParameters([...], modifier_rank=None) for ZeRO-3, or "
                  "torch.distributed.fsdp.FullyShardedDataParallel.summon_full_params(model) for FSDP, before "
                  "calling save_pretrained() (FSDP2's fully_shard needs nothing: its DTensors are gathered here).",
                  PeftWarning, stacklevel=4)


def save_adapter(peft_model: PeftModel, adapter_name: str, save_directory: str | os.PathLike,
                 safe_serialization: bool = True, write: bool = True,
                 state_dict: dict[str, torch.Tensor] | None = None,
                 save_embedding_layers: bool | str = "auto") -> None:
    """Write one adapter's config and weights into ``save_directory``.

    With ``write=False`` only the collective part runs (gathering FSDP2-sharded weights), for the
    ranks that take part in a distributed save without writing.
    """
    state = adapter_state_dict(peft_model, adapter_name, state_dict, save_embedding_layers)
    if not write:
        return
    from .auto import auto_mapping_for

    config = peft_model.peft_config[adapter_name]
    write_adapter_files(save_directory, state, config, safe_serialization, auto_mapping_for(peft_model, config))


def save_converted_adapter(peft_model: PeftModel, adapter_name: str, save_directory: str | os.PathLike,
                           initial_path: str | os.PathLike, safe_serialization: bool = True, write: bool = True,
                           state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained(..., path_initial_model_for_weight_conversion=initial_path)`` for one adapter: the
    PiSSA/OLoRA adapter written as the plain rank-2r LoRA adapter of the original base (see
    :func:`convert_to_lora_tensors`) with peft's converted config; ``initial_path``'s config rewritten with
    ``init_lora_weights=True``, as peft does."""
    import copy
    import math

    config = peft_model.peft_config[adapter_name]
    state = adapter_state_dict(peft_model, adapter_name, state_dict)
    if not write:
        return
    tensors = convert_to_lora_tensors(config, state, read_adapter_file(initial_path))
    initial_config = copy.deepcopy(config)
    initial_config.init_lora_weights = True
    initial_config.save_pretrained(initial_path)
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha = converted.lora_alpha * (math.sqrt(2) if converted.use_rslora else 2)
    converted.rank_pattern = {k: 2 * v for k, v in converted.rank_pattern.items()}
    converted.alpha_pattern = {k: 2 * v for k, v in converted.alpha_pattern.items()}
    from .auto import auto_mapping_for

    write_adapter_files(save_directory, tensors, converted, safe_serialization, auto_mapping_for(peft_model, config))


def convert_to_lora_tensors(config: Any, trained: dict[str, torch.Tensor],
                            initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained PiSSA/OLoRA adapter (``trained``, saved keys) as a plain LoRA adapter for the original base,
    given the adapter as initialized (``initial``): ``W_res + s·BA = W + s·(BA − B0A0)``, so
    ``A' = [A; A0]`` (2r, in) and ``B' = [B, −B0]`` (out, 2r) at the same scale (peft's
    ``subtract_mutated_init``). Tensors other than LoRA factors (modules_to_save, biases) are kept as
    trained (peft drops them, losing a trained head). Raises ``ValueError`` when the conversion cannot hold
    (rsLoRA with rank/alpha patterns, DoRA) or the initial adapter does not match."""
    import warnings

    from .layers.lora_init import init_kind

    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if config.use_dora:
        raise ValueError("`path_initial_model_for_weight_conversion` cannot convert a DoRA adapter: its magnitude is "
                         "relative to the residual base, so no LoRA adapter on the original base reproduces it")
    if init_kind(config.init_lora_weights)[0] not in ("pissa", "olora", True):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/"
                      "LoRA-GA adapter to a LoRA adapter", stacklevel=4)
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        is_a, is_b = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if not (is_a or is_b):
            out[key] = value
            continue
        start = initial.get(key)
        if start is None:
            raise ValueError(f"the initial adapter lacks {key!r}: was it saved from this model right after "
                             "initialization?")
        if start.shape != value.shape:
            raise ValueError(f"the initial adapter's {key!r} has shape {tuple(start.shape)}, the trained one "
                             f"{tuple(value.shape)}: not the same adapter")
        start = start.to(device=value.device, dtype=value.dtype)
        out[key] = torch.cat([value, start], dim=0) if is_a else torch.cat([value, -start], dim=1)
    return out


def write_adapter_files(save_directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: Any,
                        safe_serialization: bool = True, auto_mapping: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (as contiguous CPU copies) and ``config`` into ``save_directory`` (created if needed) in
    peft's layout: ``adapter_model.safetensors`` (``adapter_model.bin`` without ``safe_serialization``) and
    ``adapter_config.json`` (with peft's ``auto_mapping`` field when given)."""
    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(save_directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(tensors, os.path.join(save_directory, PICKLE_NAME))
    inference_mode = config.inference_mode
    config.inference_mode = True  # peft writes adapters as loaded-for-inference
    try:
        config.save_pretrained(save_directory, auto_mapping_dict=auto_mapping)
    finally:
        config.inference_mode = inference_mode


def apply_key_mapping(weights: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
                      ) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping``: each saved key's part after ``base_model.model.`` (else ``base_model.``) is rewritten
    by the first ``{regex: replacement}`` entry that matches it (``re.subn``); a key with neither prefix raises, as
    peft's. None or ``{}``: ``weights`` as they are."""
    if not key_mapping:
        return weights
    remapped: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping needs keys starting with 'base_model.' (as peft saves them); {key!r} "
                             "does not")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        remapped[prefix + rest] = value
    return remapped


def read_adapter_file(path: str | os.PathLike, allow_pickle: bool = False,
                      key_mapping: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` from an adapter folder (a pickle only with ``allow_pickle``), its keys
    rewritten by ``key_mapping`` (see :func:`apply_key_mapping`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist")
    st = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return apply_key_mapping(load_file(st, device="cpu"), key_mapping)
    pkl = os.path.join(path, PICKLE_NAME)
    if os.path.isfile(pkl):
        if not allow_pickle:
            raise ValueError(f"{pkl} is a pickle; fastpeft loads safetensors only. If you trust the file, pass "
                             "allow_pickle=True (it is then read with torch.load(weights_only=True))")
        return apply_key_mapping(torch.load(pkl, map_location="cpu", weights_only=True), key_mapping)
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} in {path!r} (found: {sorted(os.listdir(path))})")


def load_adapter_weights(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str,
                         allow_pickle: bool = False, key_mapping: dict[str, str] | None = None,
                         ignore_mismatched_sizes: bool = False) -> None:
    """Copy a saved adapter's tensors into ``peft_model``'s adapter ``adapter_name``, strictly, after rewriting
    their keys by ``key_mapping`` (peft's, see :func:`apply_key_mapping`).

    A missing key, an unexpected key, or a shape (rank) mismatch raises ``ValueError`` naming the key; with
    ``ignore_mismatched_sizes`` (peft's) mis-shaped tensors are skipped with peft's warning instead.
    """
    saved = read_adapter_file(path, allow_pickle=allow_pickle, key_mapping=key_mapping)
    if not os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME)):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r}")
    load_adapter_state(peft_model, saved, adapter_name, f"adapter file in {os.fspath(path)!r}",
                       ignore_mismatched_sizes=ignore_mismatched_sizes)


def warn_ignored_sizes(model: nn.Module, mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """peft's warning for the tensors ``ignore_mismatched_sizes=True`` left out: ``(model key, file shape,
    model shape)`` each; nothing when the list is empty."""
    if not mismatched:
        return
    lines = "\n".join(f"- {key}: found shape {torch.Size(saved)} in the checkpoint and {torch.Size(here)} in the "
                      "model instantiated" for key, saved, here in mismatched)
    warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are "
                  f"being ignored because you passed `ignore_mismatched_sizes=True`: {lines}.", stacklevel=3)


def map_saved_keys(peft_model: PeftModel, saved: dict[str, torch.Tensor], adapter_name: str,
                   state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, torch.Tensor]]:
    """Where each of a saved adapter's tensors (peft's saved key names) goes in ``peft_model`` as adapter
    ``adapter_name``: ``{model state-dict key: (saved key, tensor)}``. Keys are mapped, not checked: a target
    the model lacks is the caller's to report."""
    state = peft_model.state_dict(keep_vars=True) if state is None else state
    wrappers = _wrappers(peft_model)
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in saved.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            target = key[: -len(".weight")] + f".{adapter_name}.weight"
        elif key.endswith(".lora_B.bias"):  # lora_bias=True
            target = key[: -len(".bias")] + f".{adapter_name}.bias"
        elif key.endswith((".lora_embedding_A", ".lora_embedding_B")):
            target = f"{key}.{adapter_name}"
        elif key.endswith(f".{_MAGNITUDE}"):
            target = f"{key}.{adapter_name}.weight"
        elif key.endswith(".token_adapter.trainable_tokens_delta"):
            target = f"{key}.{adapter_name}"
        else:
            owner = next((w for w in wrappers if key.startswith(w + ".")), None)
            rest = key[len(owner) + 1:] if owner is not None else ""
            if owner is not None and not rest.startswith(("modules_to_save.", "original_module.")):
                target = f"{owner}.modules_to_save.{adapter_name}.{rest}"
            elif owner is not None and rest.startswith("modules_to_save.") and \
                    f"{owner}.modules_to_save.{adapter_name}.{rest[len('modules_to_save.'):]}" in state:
                # peft with bias="all" saves a wrapped module's bias as "<owner>.modules_to_save.bias"
                target = f"{owner}.modules_to_save.{adapter_name}.{rest[len('modules_to_save.'):]}"
            else:
                target = key
        if target not in state and key.endswith(".base_layer.bias") \
                and key[: -len(".base_layer.bias")] + ".bias" in state:
            # peft's bias="lora_only" file of a model with several adapters also holds the base biases of layers
            # only the other adapters wrapped; here such a layer is not wrapped: its own bias
            target = key[: -len(".base_layer.bias")] + ".bias"
        elif target not in state and adapter_name == "base_layer" and \
                f"{key.rpartition('.')[0]}.base_layer.{key.rpartition('.')[2]}" in state:
            # peft saves an embedding's base weight under an adapter called "base_layer" with ".base_layer" taken
            # out as if it were the adapter's name
            target = f"{key.rpartition('.')[0]}.base_layer.{key.rpartition('.')[2]}"
        elif target not in state and ".original_module." in key and key.replace(".original_module.", ".") in state:
            # peft's bias="all" file holds a modules_to_save wrapper's original bias, also where the wrapper
            # belonged to another adapter: here the module is not wrapped
            target = key.replace(".original_module.", ".")
        mapped[target] = (key, value)
    return mapped


def load_adapter_state(peft_model: PeftModel, saved: dict[str, torch.Tensor], adapter_name: str,
                       where: str = "the state dict", ignore_mismatched_sizes: bool = False) -> None:
    """Copy tensors under peft's saved names into ``peft_model``'s adapter ``adapter_name``, strictly
    (missing, unexpected or mis-shaped tensors raise ``ValueError`` naming them and ``where``; with
    ``ignore_mismatched_sizes`` mis-shaped ones are left as they are, with peft's warning)."""
    from .moe_v5 import convert_v4_state_dict

    saved = convert_v4_state_dict(peft_model, saved, adapter_name)  # a transformers-4 MoE adapter on a v5 model
    state = peft_model.state_dict(keep_vars=True)
    wrappers = _wrappers(peft_model)
    mapped = map_saved_keys(peft_model, saved, adapter_name, state)
    expected = [k for k in state if _LORA_KEY.search(k) and _LORA_KEY.search(k).group(2) == adapter_name]
    expected += [k for k in state if _EMBEDDING_KEY.search(k) and _EMBEDDING_KEY.search(k).group(2) == adapter_name]
    expected += [k for k in state if any(k.startswith(f"{w}.modules_to_save.{adapter_name}.") for w in wrappers)]
    expected += [k for k in state if _token_key_of(peft_model, k, adapter_name) is not None]
    # a tied head's factors (ensure_weight_tying) are views of its embeddings': given those, it needs no keys of its
    # own (peft writes such files: a second adapter tied through layers that hold LoRA already)
    loaded = {state[k].untyped_storage().data_ptr() for k in mapped if k in state}
    missing = [k for k in expected if k not in mapped and state[k].untyped_storage().data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model expects "
                         f"for adapter {adapter_name!r}, e.g. {missing[:3]}")
    unexpected = [saved_key for target, (saved_key, _) in mapped.items() if target not in state]
    if unexpected:
        raise ValueError(f"{where} has {len(unexpected)} key(s) this model does not "
                         f"have, e.g. {unexpected[:3]} (was it saved for another model or other target_modules?)")
    mismatched = []
    with torch.no_grad():
        for target, (saved_key, value) in mapped.items():
            dest = state[target]
            if dest.shape != value.shape and ignore_mismatched_sizes:
                mismatched.append((target, tuple(value.shape), tuple(dest.shape)))
                continue
            if dest.shape != value.shape:
                hint = ""
                if any(f".{p}." in target for p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
                    first = ".lora_A." in target or ".lora_embedding_A." in target
                    saved_r = value.shape[0] if first else value.shape[-1]
                    model_r = dest.shape[0] if first else dest.shape[-1]
                    hint = (f" (rank mismatch: the file has r={saved_r}, the model's config r={model_r})"
                            if saved_r != model_r else
                            " (same rank: the adapted layer's size differs, so the adapter was saved for another "
                            "model)")
                raise ValueError(f"shape mismatch for {saved_key!r}: file has {tuple(value.shape)}, model expects "
                                 f"{tuple(dest.shape)}{hint} (peft's ignore_mismatched_sizes=True skips such "
                                 "tensors)")
            dest.copy_(value.to(device=dest.device, dtype=dest.dtype))
    warn_ignored_sizes(peft_model, mismatched)


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """peft's function of the same name (parameters in peft's order): the tensors ``save_pretrained`` writes for
    ``adapter_name``, under peft's saved key names (LoRA: read from ``state_dict`` when given, else from the
    model; embedding base weights per ``save_embedding_layers``, as peft). ``unwrap_compiled``: take a
    ``torch.compile``-d model's original module (no ``_orig_mod.`` in the keys)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if hasattr(model, "adapter_state_dict"):  # the other methods' models
        return model.adapter_state_dict(adapter_name)
    if _check_plain_model(model, adapter_name) is not None:  # a method injected into a plain model
        from .methods.base import tuner_state_dict

        holder = _method_holder(model, adapter_name)
        return {k[len(_HELD):]: v for k, v in tuner_state_dict(holder, adapter_name).items()}
    return adapter_state_dict(model, adapter_name, state_dict, save_embedding_layers)


_HELD = "base_model.model."  # the key prefix of a model inside a PeftModel


def _method_holder(model: nn.Module, adapter_name: str) -> nn.Module:
    """A throwaway ``PeftModel``-shaped module (``.base_model`` = the tuner ``inject_adapter_in_model`` kept on
    ``model``), so that a method's state-dict functions see the keys they expect."""
    from torch import nn

    holder = nn.Module()
    holder.base_model = model._fastpeft_method_tuners[adapter_name]
    return holder


def _check_plain_model(model: nn.Module, adapter_name: str) -> object | None:
    """A model that is no fastpeft ``PeftModel`` (``inject_adapter_in_model``'s result) must hold adapters
    (``model.peft_config``) and ``adapter_name`` among them; raise naming what is wrong otherwise. Returns the
    tuner that ``inject_adapter_in_model`` kept for a non-LoRA method's adapter, else None (LoRA)."""
    from .model import PeftModel

    if isinstance(model, PeftModel):
        return None
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError(f"{type(model).__name__} holds no fastpeft adapter (no peft_config): build it with "
                         "fastpeft.get_peft_model or fastpeft.inject_adapter_in_model")
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(configs)}")
    config = configs[adapter_name]
    if getattr(config, "peft_type", "LORA") == "LORA":
        return None
    tuner = getattr(model, "_fastpeft_method_tuners", {}).get(adapter_name)
    if tuner is None:
        raise ValueError(f"the {config.peft_type} adapter {adapter_name!r} of this model was not injected by "
                         "fastpeft.inject_adapter_in_model; fastpeft cannot read its state dict")
    return tuner


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False):
    """peft's function of the same name (parameters in peft's order): load tensors under peft's saved key names
    (as :func:`get_peft_model_state_dict` returns them, or an adapter file holds them) into ``adapter_name``.
    ``model``: a fastpeft ``PeftModel``, or a plain model with LoRA layers from ``inject_adapter_in_model``.

    Strict, unlike peft's: a missing, unexpected or mis-shaped tensor raises ``ValueError`` naming it;
    ``ignore_mismatched_sizes=True`` (peft's) skips mis-shaped tensors instead, with peft's warning.
    ``low_cpu_mem_usage`` (peft's: assign instead of copy into meta-device weights) changes nothing here:
    fastpeft's adapter weights are real tensors, copied into. Returns the load result (empty missing /
    unexpected keys)."""
    from torch.nn.modules.module import _IncompatibleKeys

    where = "the given adapter state dict"
    if not hasattr(model, "_load_adapter_state"):  # a plain model with injected adapter layers
        if _check_plain_model(model, adapter_name) is None:
            load_adapter_state(model, peft_model_state_dict, adapter_name, where, ignore_mismatched_sizes)
        else:
            from .methods.base import load_tuner_state

            held = {_HELD + k: v for k, v in peft_model_state_dict.items()}
            load_tuner_state(_method_holder(model, adapter_name), held, adapter_name, where, ignore_mismatched_sizes)
        return _IncompatibleKeys([], [])
    model._load_adapter_state(peft_model_state_dict, adapter_name, where, ignore_mismatched_sizes)
    return _IncompatibleKeys([], [])
