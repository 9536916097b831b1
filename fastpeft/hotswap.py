"""Hot-swapping LoRA adapters in place: peft's ``peft.utils.hotswap`` for fastpeft models.

A server that holds one base model and answers with many adapters loads a new adapter's weights into the tensors
of the one already loaded instead of adding a second adapter, so a ``torch.compile``-d model keeps its compiled
graph::

    model = fastpeft.PeftModel.from_pretrained(base, "adapter-0")
    fastpeft.prepare_model_for_compiled_hotswap(model, target_rank=64)   # only if ranks or alphas differ
    model = torch.compile(model)
    ...
    fastpeft.hotswap_adapter(model, "adapter-1", adapter_name="default")  # no recompilation

What is swapped: the LoRA factors (``lora_A``/``lora_B``, their ``lora_B`` bias with ``lora_bias=True``,
embedding factors, ``target_parameters`` factors), DoRA's magnitude, and the per-module scale; modules the new
adapter does not target get zero factors (DoRA: a magnitude equal to the base's row norms), so they add nothing.
``modules_to_save`` copies and trainable-token rows present in both adapters are copied too (peft's hot-swap
has no path for them).

Differences from peft 0.21, all on purpose:

- The scale ``alpha/r`` is a Python float in fastpeft's fused op, as in its other layers; a compiled graph guards
  on it. ``prepare_model_for_compiled_hotswap`` therefore *fixes* each layer's scale instead of turning it into a
  tensor, and a later swap to a different scale multiplies the new ``lora_B`` (and its bias) by
  ``new_scale / fixed_scale``: the layer computes ``fixed·(ratio·B)·A = new_scale·B·A``. Outputs are the new
  adapter's; the stored ``lora_B`` differs from the file by that factor. Saving the model afterwards writes an
  adapter that computes the same thing under the model's config only while that config still gives the fixed
  scales: not after ``config=`` raised its ``r`` to ``target_rank`` (peft's bookkeeping; neither library's
  save after a swap reproduces the swapped-in adapter then). Without the preparation the float is replaced, as
  peft does (a compiled model then recompiles once for the new value).
- ``rank_pattern``/``alpha_pattern`` are matched against the module's name, as when the adapter was created
  (peft's hot-swap matches them against the parameter's full key, where a module-name pattern never matches).
- A swap to another rank on an unprepared model replaces the factors by the new adapter's exactly (shape
  included) and updates the layer's ``r``; peft pads a smaller one with zeros.
- A DoRA layer the new adapter does not target gets a neutral magnitude, not peft's zeros (which zero the
  layer's output).

As in peft, the model's ``peft_config`` still describes the adapter first loaded (with ``r`` raised to
``target_rank`` by the preparation when ``config`` is passed), and only LoRA adapters can be hot-swapped.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from .config import LoraConfig
from .layers import FastLoraConv, FastLoraEmbedding
from .layers.param import FastLoraParamWrapper
from .model import _LORA_LAYERS, _pattern_key, _strip_base_layer, adapter_factors, named_modules_of

# Config fields that change the output beyond the tensors and scale, so two adapters must agree on them (peft's).
CONFIG_KEYS_TO_CHECK = {"LORA": ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)"
                         r"\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)$")
_PREFIXES = ("_orig_mod.", "base_model.model.", "base_model.")


def _parse(key: str) -> dict | None:
    """``{module, kind, adapter, param}`` of a LoRA tensor's key in the model's state dict, or None."""
    m = _FACTOR_KEY.match(key) or _EMBED_KEY.match(key)
    return None if m is None else {"param": None, **m.groupdict()}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def _is_embedding(layer: nn.Module) -> bool:
    return isinstance(layer, FastLoraEmbedding)


def _experts(layer: nn.Module) -> int:
    return int(getattr(layer, "num_experts", 1) or 1)


def _factor(layer: nn.Module, kind: str, adapter: str, param: str | None) -> torch.Tensor:
    holder = getattr(layer, kind)[adapter]
    return holder if param is None else getattr(holder, param)


def _rank_dim(tensor: torch.Tensor, kind: str) -> int:
    """Where an A-type factor (first) or a B-type factor (last; a convolution's (out, r, 1, …): second) holds
    its rank."""
    if kind.endswith("A"):
        return 0
    return 1 if tensor.dim() > 2 else tensor.dim() - 1


def _rank(tensor: torch.Tensor, kind: str, experts: int) -> int:
    """The rank of an A-type (rank first) or B-type (rank last; second for a convolution) factor;
    ``target_parameters`` factors hold ``r·experts`` there (A: experts × r rows, B: r × experts columns, rank
    index major)."""
    return tensor.shape[_rank_dim(tensor, kind)] // experts


def _pad_rank(tensor: torch.Tensor, kind: str, experts: int, target: int) -> torch.Tensor:
    """``tensor`` with its rank zero-padded to ``target``, in the factor's layout (a new tensor)."""
    r = _rank(tensor, kind, experts)
    if r > target:
        raise ValueError(f"cannot pad a rank-{r} factor to rank {target}")
    if kind.endswith("A"):  # (experts·r, in, …) as (experts, r, in·…)
        rest = tensor.shape[1:]
        view = tensor.reshape(experts, r, -1)
        out = view.new_zeros(experts, target, view.shape[-1])
        out[:, :r] = view
        return out.reshape(experts * target, *rest)
    if tensor.dim() > 2:  # a convolution's (out, r, 1, …)
        out = tensor.new_zeros(tensor.shape[0], target, *tensor.shape[2:])
        out[:, :r] = tensor
        return out
    view = tensor.reshape(tensor.shape[0], r, experts)  # (out, r·experts) as (out, r, experts)
    out = view.new_zeros(tensor.shape[0], target, experts)
    out[:, :r] = view
    return out.reshape(tensor.shape[0], target * experts)


def _refuse_grouped(name: str, layer: nn.Module) -> None:
    """Hot-swapping a grouped convolution's LoRA is refused (its B holds r/groups per group)."""
    if getattr(getattr(layer, "base_layer", None), "groups", 1) > 1 and isinstance(layer, FastLoraConv):
        raise ValueError(f"hot-swapping the LoRA adapter of the grouped convolution {name!r} (groups="
                         f"{layer.base_layer.groups}) is not supported by fastpeft; load the adapter with "
                         "load_adapter instead")


def _module_name(key_module: str) -> str:
    """A LoRA layer's name inside the base model (what target_modules and the patterns were matched against)."""
    for prefix in _PREFIXES:
        if key_module.startswith(prefix):
            key_module = key_module[len(prefix):]
    return key_module


def _pattern_name(layer_name: str, layer: nn.Module) -> str:
    """What ``rank_pattern``/``alpha_pattern`` were matched against when ``layer`` was created: the module's name
    in the base model, and for a ``target_parameters`` wrapper ``<module>.<parameter name>``."""
    name = _module_name(_strip_base_layer(layer_name))
    return f"{name}.{layer.parameter_name}" if isinstance(layer, FastLoraParamWrapper) else name


def _scale_for(config: Any, module: str) -> float:
    """``alpha/r`` (or ``alpha/√r``) of ``module`` under ``config``, its patterns matched as at injection."""
    rank_pattern = getattr(config, "rank_pattern", None) or {}
    alpha_pattern = getattr(config, "alpha_pattern", None) or {}
    rk, ak = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
    r = rank_pattern[rk] if rk is not None else config.r
    alpha = alpha_pattern[ak] if ak is not None else config.lora_alpha
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _config_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _peft_type_name(config: Any) -> str:
    value = getattr(config, "peft_type", "LORA")
    return str(getattr(value, "value", value))


def check_hotswap_configs_compatible(config0: Any, config1: Any) -> None:
    """Raise ``ValueError`` unless an adapter with ``config1`` may be hot-swapped into one loaded with
    ``config0`` (peft's check): both LoRA, and equal ``use_rslora``, ``lora_dropout``, ``alpha_pattern`` and
    ``use_dora``. fastpeft's or peft's configs."""
    type0, type1 = _peft_type_name(config0), _peft_type_name(config1)
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK)} but {type0} was passed.")
    d0, d1 = _config_dict(config0), _config_dict(config1)
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        v0, v1 = d0.get(key, missing), d1.get(key, missing)
        if v0 != v1:
            raise ValueError(f"Configs are incompatible: for {key}, {v0} != {v1}")


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: Any = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Make later :func:`hotswap_adapter` calls leave a compiled model's graph valid (peft's function).

    Call it after loading the first adapter and before ``torch.compile``. It fixes every LoRA layer's scale
    (later swaps fold a different scale into ``lora_B``; see the module docstring) and, with ``target_rank``,
    zero-pads every adapter's factors to that rank — the largest rank among the adapters to come (padding adds
    zero rows/columns: the output is unchanged; the compute grows with the rank). ``config``: a ``LoraConfig`` or
    a dict of them (``model.peft_config``) whose ``r`` and ``rank_pattern`` values are set to ``target_rank``,
    as peft does. ``check_compiled``: what to do when the model is already compiled ("error", "warn",
    "ignore"). Raises ``ValueError`` when the model has no fastpeft LoRA layer or a factor's rank exceeds
    ``target_rank``.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled should be one of 'error', 'warn', or 'ignore', got {check_compiled!r}")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. "
                          "This will likely result in re-compilation, hurting performance. Call the function "
                          "before compiling the model.", stacklevel=2)
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or target_rank < 1):
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    layers = list(named_modules_of(_unwrap(model), _LORA_LAYERS))
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    for name, layer in layers:
        _refuse_grouped(name, layer)
        if target_rank is not None:
            experts = _experts(layer)
            for adapter in list(layer.r):
                for kind, weight in zip(("A", "B"), adapter_factors(layer, adapter)):
                    if _rank(weight, kind, experts) > target_rank:
                        raise ValueError(f"Trying to pad the adapter {adapter!r} of {name!r} to the target rank "
                                         f"{target_rank}, but its rank is larger ({_rank(weight, kind, experts)}). "
                                         "This is not possible.")
                    with torch.no_grad():
                        weight.data = _pad_rank(weight.data, kind, experts, target_rank)
                layer.r[adapter] = target_rank
        layer._hotswap_fixed_scaling = dict(layer.scaling)
    if target_rank is None or not config:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        if lora_config.rank_pattern:
            for key in lora_config.rank_pattern:
                lora_config.rank_pattern[key] = target_rank


def _neutralize(layer: nn.Module, kind: str, adapter: str, param: str | None) -> None:
    """Make a factor the new adapter lacks add nothing: zeros (DoRA's magnitude: set after the factors, below)."""
    if kind != "lora_magnitude_vector":
        _factor(layer, kind, adapter, param).zero_()


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: Any, parameter_prefix: str = "lora_") -> None:
    """Swap adapter ``adapter_name``'s tensors for ``state_dict``'s, in place (peft's low-level function).

    ``state_dict``: keys as in the model's own state dict, adapter name included
    (``base_model.model.<path>.lora_A.<adapter_name>.weight``; what :func:`hotswap_adapter` builds from a
    saved adapter). ``config``: the new adapter's ``LoraConfig`` (its ranks and alphas give the new scales).
    ``parameter_prefix``: peft's argument; only ``"lora_"`` (LoRA) is accepted. Raises ``ValueError`` when
    the adapter is merged, unknown, or a key or shape does not fit (nothing is changed then), and
    ``RuntimeError`` for keys the model does not have, as peft.
    """
    if parameter_prefix != "lora_":
        raise ValueError(f"fastpeft hot-swaps LoRA adapters only (parameter_prefix 'lora_'), got {parameter_prefix!r}")
    inner = _unwrap(model)
    layers = dict(named_modules_of(inner, _LORA_LAYERS))
    if not any(adapter_name in layer.r for layer in layers.values()):
        known = sorted({a for layer in layers.values() for a in layer.r})
        raise ValueError(f"no adapter {adapter_name!r} to hot-swap; this model has {known}")
    if any(adapter_name in getattr(layer, "merged_adapters", ()) for layer in layers.values()):
        raise ValueError(f"Cannot hot-swap adapter {adapter_name!r} because it is currently merged into the base "
                         "weights. Please unmerge the adapter first by calling `model.unmerge_adapter()`.")
    state = inner.state_dict(keep_vars=True)
    new = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    unexpected = [k for k in new if k not in state]
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")

    # plan everything first: a swap that fails part-way would leave a mix of two adapters
    lora_keys = {k: p for k in state if (p := _parse(k)) is not None and p["adapter"] == adapter_name}
    others = [k for k in new if k not in lora_keys]
    from .save import _token_key_of

    # (a head tied to the embeddings holds their token rows under a second key, never saved: not owned)
    owned = {k for k in state if f".modules_to_save.{adapter_name}." in k
             or (k.endswith(f".trainable_tokens_delta.{adapter_name}") and _token_key_of(inner, k, adapter_name))}
    old_config = (getattr(inner, "peft_config", None) or {}).get(adapter_name)
    old_rows = getattr(old_config, "trainable_token_indices", None)
    if owned and old_rows != getattr(config, "trainable_token_indices", None):
        raise ValueError(f"the new adapter trains other token rows (trainable_token_indices="
                         f"{getattr(config, 'trainable_token_indices', None)!r}) than adapter {adapter_name!r} "
                         f"({old_rows!r}): the rows are part of the layers, so hot-swapping cannot change them; load "
                         "the adapter with load_adapter instead")
    lacking = sorted(owned - set(new))
    if lacking:
        raise ValueError(f"the new adapter lacks {len(lacking)} tensor(s) of adapter {adapter_name!r} outside its "
                         f"LoRA factors (modules_to_save / trainable tokens), e.g. {lacking[:3]}: hot-swapping "
                         "cannot make those neutral; load the adapter with load_adapter instead")
    for key in others:
        if state[key].shape != new[key].shape:
            raise ValueError(f"shape mismatch for {key!r}: the new adapter has {tuple(new[key].shape)}, the model "
                             f"{tuple(state[key].shape)}")
    plan = []  # (layer name, layer, kind, param, new tensor or None)
    touched: dict[str, tuple[nn.Module, float]] = {}
    for key, p in lora_keys.items():
        layer_name = p["module"].removeprefix("_orig_mod.")
        layer = layers.get(layer_name)
        if layer is None:
            raise ValueError(f"{key!r} does not belong to a fastpeft LoRA layer")
        _refuse_grouped(layer_name, layer)
        value = new.get(key)
        plan.append((layer_name, layer, p["kind"], p["param"], value))
        if value is not None:
            touched[layer_name] = (layer, _scale_for(config, _pattern_name(layer_name, layer)))
    for layer_name, layer, kind, param, value in plan:
        if kind == "lora_magnitude_vector" and value is None and layer_name in touched:
            raise ValueError(f"the new adapter has LoRA factors but no DoRA magnitude at {layer_name!r}")
        if value is None:
            continue
        if kind == "lora_magnitude_vector" or param == "bias":  # (copied as they are: no broadcasting)
            current = _factor(layer, kind, adapter_name, param)
            if value.shape != current.shape:
                raise ValueError(f"shape mismatch at {layer_name!r} ({kind}.{param}): the new adapter has "
                                 f"{tuple(value.shape)}, the model {tuple(current.shape)}")
            continue
        current = _factor(layer, kind, adapter_name, param)
        experts = _experts(layer)
        r_new, r_now = _rank(value, kind, experts), _rank(current, kind, experts)
        if r_new > r_now and adapter_name in getattr(layer, "_hotswap_fixed_scaling", {}):
            raise ValueError(f"the new adapter has rank {r_new} at {layer_name!r}, above the rank {r_now} the model "
                             "was prepared for: call prepare_model_for_compiled_hotswap with a target_rank of at "
                             f"least {r_new}")
        other_dims = [d for i, d in enumerate(value.shape) if i != _rank_dim(value, kind)]
        now_dims = [d for i, d in enumerate(current.shape) if i != _rank_dim(current, kind)]
        if other_dims != now_dims:
            raise ValueError(f"shape mismatch at {layer_name!r} ({kind}): the new adapter has {tuple(value.shape)}, "
                             f"the model {tuple(current.shape)}")

    with torch.no_grad():
        for _, layer, kind, param, value in plan:
            current = _factor(layer, kind, adapter_name, param)
            if value is None:
                _neutralize(layer, kind, adapter_name, param)
                continue
            value = value.to(device=current.device, dtype=current.dtype)
            experts = _experts(layer)
            if kind == "lora_magnitude_vector" or param == "bias" or value.shape == current.shape:
                current.copy_(value)
            elif adapter_name in getattr(layer, "_hotswap_fixed_scaling", {}):
                current.copy_(_pad_rank(value, kind, experts, _rank(current, kind, experts)))
            else:  # unprepared: take the new rank exactly (same Parameter object, new storage)
                current.data = value.clone()
                layer.r[adapter_name] = _rank(value, kind, experts)
        folded = set()  # storages of factors scaled already (a tied head's factors are its embeddings')
        for layer, scale in touched.values():
            if adapter_name not in getattr(layer, "_hotswap_fixed_scaling", {}):
                layer.scaling[adapter_name] = scale
            elif scale != layer.scaling[adapter_name]:
                # fold the new scale into B (and its bias) against the scale the layer computes with (its fixed
                # one; an adapter deleted and added again since the preparation has its own):
                # fixed·(ratio·B) = scale·B
                ratio = scale / layer.scaling[adapter_name]
                factors = adapter_factors(layer, adapter_name)
                storages = {t.untyped_storage().data_ptr() for t in factors}
                if storages & folded:  # tied to a layer folded already (ensure_weight_tying): its product is too
                    continue
                factors[1].mul_(ratio)
                folded |= storages
                bias = None if _is_embedding(layer) else layer.lora_B[adapter_name].bias
                if bias is not None:
                    bias.mul_(ratio)
        for _, layer, kind, _, value in plan:  # DoRA layers the new adapter does not target
            if kind == "lora_magnitude_vector" and value is None:
                magnitude = layer.lora_magnitude_vector[adapter_name].weight
                magnitude.copy_(layer.dora_weight_norm(adapter_name).to(magnitude.dtype))
        for key in others:
            state[key].copy_(new[key].to(device=state[key].device, dtype=state[key].dtype))


def hotswap_adapter(model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str,
                    torch_device: str | torch.device | None = None, **kwargs) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` by the adapter saved in ``model_name_or_path``
    (a folder or a Hub repo id), keeping its name and, on a compiled model, the compiled graph (peft's function).

    The adapters must target the same modules (the new one may target fewer: the others get zero factors) and
    agree on the fields :func:`check_hotswap_configs_compatible` checks; ranks and alphas may differ (on a
    compiled model, after :func:`prepare_model_for_compiled_hotswap`). ``torch_device``: where the new
    tensors are read to (default: the accelerator if any). ``kwargs``: peft's Hub keywords (``subfolder``,
    ``revision``, ``token``, ``cache_dir``, ...) and ``allow_pickle`` for an ``adapter_model.bin``.

    Example::

        model = fastpeft.PeftModel.from_pretrained(base, "adapter-0")
        model = torch.compile(model)
        fastpeft.hotswap_adapter(model, "adapter-1", adapter_name="default")
    """
    from .api import load_peft_weights
    from .hub import pop_hub_kwargs, resolve_adapter_path
    from .save import map_saved_keys

    inner = _unwrap(model)
    peft_config = getattr(inner, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config:
        have = list(peft_config) if isinstance(peft_config, dict) else []
        raise ValueError(f"no adapter {adapter_name!r} to hot-swap; this model has {have}")
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    hub = pop_hub_kwargs(kwargs)
    if kwargs:
        raise TypeError(f"hotswap_adapter got keyword(s) it does not take: {sorted(kwargs)}")
    path = resolve_adapter_path(model_name_or_path, **hub)
    config = LoraConfig.from_pretrained(path)
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    saved = load_peft_weights(path, device=torch_device, allow_pickle=allow_pickle)
    mapped = map_saved_keys(inner, saved, adapter_name)
    hotswap_adapter_from_state_dict(model, {target: value for target, (_, value) in mapped.items()},
                                    adapter_name, config)
