"""Model level: ``get_peft_model``, ``PeftModel`` and the LoRA injection behind them.

The wrapper mirrors peft's object layout — ``PeftModel.base_model`` is a
``LoraModel`` whose ``.model`` is the transformers model — so parameter names
(``base_model.model.<path>.lora_A.<adapter>.weight``) and saved keys are
exactly peft's, and adapters move between the two libraries unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .alora import check_offsets as check_alora_offsets
from .alora import offsets_for_call as alora_offsets_for_call
from .config import DEFAULT_TARGET_MODULES, LoraConfig, PeftType, from_peft_lora_config
from .errors import NoMatchingPeftModuleError
from .layers.conv import FastLoraConv, is_plain_conv
from .layers.embedding import FastLoraEmbedding, refuse_embedding_dora
from .layers.lora import FastLoraLinear, _is_conv1d
from .layers.lora_init import init_kind, mutates_base
from .layers.param import FastLoraParamWrapper
from .layers.tokens import TrainableTokensWrapper, check_token_indices
from .merging import combine, warn_no_pruning
from .moe_v5 import convert_config as convert_moe_config

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
_MIN_TARGETS_TO_CONDENSE = 20  # peft's MIN_TARGET_MODULES_FOR_OPTIMIZATION
_SEQ_CLS_HEADS = ("score", "classifier")  # peft's SEQ_CLS_HEAD_NAMES, in its order: the head "all-linear" leaves out
_CLASSIFIER_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                     "QUESTION_ANS": ["qa_outputs"]}


def delegating_getattr(inner: str, *own: str):
    """A ``__getattr__`` for an ``nn.Module`` wrapper: a name ``nn.Module`` does not find is looked up on the
    submodule ``inner`` (``inner`` itself and the names in ``own`` raise ``AttributeError`` as usual)."""
    kept = (inner, *own)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in kept:
                raise
            return getattr(getattr(self, inner), name)

    return __getattr__


def deepcopy_keeping_shared_memory(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a model whose parameters may share memory — the adapters ``ensure_weight_tying`` ties
    (the head's ``lora_A``/``lora_B`` are views of the embeddings' ``lora_embedding_B``/``A``): ``nn.Parameter``'s
    own deepcopy clones each parameter alone, so the copy's head and embeddings would train apart. Parameters that
    share memory here share it in the copy too (peft's deepcopy of such a model raises instead)."""
    new = copy._reconstruct(self, memo, *self.__reduce_ex__(4))
    copies = dict(new.named_parameters(remove_duplicate=False))
    first: dict[tuple, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, p in self.named_parameters(remove_duplicate=False):
        if p.device.type == "meta" or p.numel() == 0:
            continue
        key = (p.device, p.untyped_storage().data_ptr())
        if key not in first:
            first[key] = (p, copies[name])
            continue
        p0, c0 = first[key]
        if p is p0 or copies[name].untyped_storage().data_ptr() == c0.untyped_storage().data_ptr():
            continue  # (the same Parameter, or already sharing in the copy)
        same_layout = (c0.storage_offset() == p0.storage_offset() and c0.stride() == p0.stride()
                       and c0.untyped_storage().nbytes() == p0.untyped_storage().nbytes())
        if not same_layout:
            warnings.warn(f"deepcopy: {name} shares memory with another parameter in the original but cannot be "
                          "tied the same way in the copy", stacklevel=3)
            continue
        view = torch.empty(0, dtype=p.dtype, device=c0.device).set_(c0.untyped_storage(), p.storage_offset(),
                                                                      p.size(), p.stride())
        owner, _, attr = name.rpartition(".")
        setattr(new.get_submodule(owner) if owner else new, attr, nn.Parameter(view, requires_grad=p.requires_grad))
    return new


def record_base_model_name(config: Any, model: nn.Module) -> None:
    """Set ``config.base_model_name_or_path`` to ``model``'s ``config._name_or_path`` when the config names none
    (what ``adapter_config.json`` records, as in peft)."""
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if config.base_model_name_or_path is None and name_or_path:
        config.base_model_name_or_path = name_or_path


# --------------------------------------------------------------------------- modules_to_save
# Modules whose further arguments are never per row: a mixed batch may go through them group by group.
_ROW_WISE_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full beside the adapters (peft's class of the same name and layout).

    ``original_module`` stays frozen; ``modules_to_save[adapter]`` is the trainable copy used while that
    adapter is active and adapters are enabled.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied_module: nn.Module | None = None):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self._fastpeft_adapter_names = None
        self.update(adapter_name, tied_module=tied_module)

    def update(self, adapter_name: str, tied_module: nn.Module | None = None) -> None:
        """Add a trainable copy of the original module for ``adapter_name``. ``tied_module`` (peft's argument,
        ``ensure_weight_tying``): the input embeddings' copy; this module's copy is then an ``nn.Linear`` without
        bias whose weight is that copy's weight (the same parameter: the head follows the embeddings)."""
        if tied_module is not None:
            out_features, in_features = tied_module.weight.shape
            copy_ = nn.Linear(in_features, out_features, bias=False,  # (draws from torch's generator as peft's)
                              device=tied_module.weight.device, dtype=tied_module.weight.dtype)
            copy_.weight = tied_module.weight
        else:
            copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)

    @property
    def active_adapter(self) -> str:
        """The adapter whose copy of the module runs (peft's property)."""
        return self._active_adapter

    def set_adapter(self, adapter_name: str | list[str], train: bool = True) -> None:
        """Use ``adapter_name``'s copy (the original module if this wrapper has none for it)."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) > 1:
                raise ValueError(f"modules_to_save cannot be active for several adapters: {adapter_name}")
            adapter_name = adapter_name[0] if adapter_name else ""
        for name, module in self.modules_to_save.items():
            module.requires_grad_(train and name == adapter_name)
        self._active_adapter = adapter_name
        self.remember_requires_grad(list(self.modules_to_save))  # while disabled: what enabling restores

    _fastpeft_grad_flags = None  # {(adapter, parameter name): requires_grad} while disabled

    def remember_requires_grad(self, adapter_names: list[str]) -> None:
        """While adapters are disabled: take the named adapters' copies' current ``requires_grad`` as what
        ``enable_adapters(True)`` restores (after ``set_adapter`` / ``set_requires_grad`` in a disabled block)."""
        if not self._disable_adapters:
            return
        flags = dict(self._fastpeft_grad_flags or {})
        for name in adapter_names:
            if name in self.modules_to_save:
                for pname, p in self.modules_to_save[name].named_parameters():
                    flags[(name, pname)] = p.requires_grad
        self._fastpeft_grad_flags = flags

    def enable_adapters(self, enabled: bool) -> None:
        """``False``: run the original module instead of the adapter's copy, every copy frozen (peft's
        ``requires_grad`` switch); ``True``: the copies train again as they did before (a copy frozen before,
        e.g. loaded for inference, stays frozen)."""
        if not enabled:
            if not self._disable_adapters:
                self._fastpeft_grad_flags = {(name, pname): p.requires_grad
                                             for name, module in self.modules_to_save.items()
                                             for pname, p in module.named_parameters()}
            for module in self.modules_to_save.values():
                module.requires_grad_(False)
        elif self._disable_adapters:
            flags = self._fastpeft_grad_flags or {}
            for name, module in self.modules_to_save.items():
                for pname, p in module.named_parameters():
                    if (name, pname) in flags:
                        p.requires_grad_(flags[(name, pname)])
            self._fastpeft_grad_flags = None
        self._disable_adapters = not enabled

    def _current(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    _fastpeft_adapter_names = None  # set by mixed_adapter_batch for the length of one call

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The active adapter's copy (or, with ``adapter_names``, each row through its own adapter's copy)."""
        if adapter_names is None:
            adapter_names = self._fastpeft_adapter_names
        if adapter_names is None or self._disable_adapters:
            return self._current()(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"mixed-adapter batches through modules_to_save split the first positional input by "
                            f"row; {type(self.original_module).__name__} was called without a positional tensor")
        return self._mixed_forward(adapter_names, *args, **kwargs)

    def _mixed_forward(self, adapter_names: list[str], x: torch.Tensor, *args, **kwargs):
        """One adapter per row of ``x`` (peft's mixed batch): each group of rows runs through its adapter's
        copy (the original module for ``"__base__"`` or an adapter this wrapper has no copy for); the output
        keeps the caller's row order, and each copy's gradient comes only from its own rows."""
        names = list(adapter_names)
        if len(names) != x.shape[0]:
            unexpanded = getattr(adapter_names, "unexpanded", None)  # an encoder's input during beam search
            if unexpanded is not None and len(unexpanded) == x.shape[0]:
                names = list(unexpanded)
            else:
                raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                                 f"{len(names)} and {x.shape[0]} respectively.")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)

        def module_for(name: str) -> nn.Module:
            return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

        # Trainable copies without a row in this batch run on zero rows: their gradients come out zero
        # instead of None, so DDP (find_unused_parameters=False) keeps training, as for the LoRA weights.
        idle = [name for name, module in self.modules_to_save.items() if name not in groups
                and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())]
        row_wise = not (args or kwargs) or isinstance(self.original_module, _ROW_WISE_MODULES)
        if len(groups) == 1 and not (idle and row_wise):
            return module_for(names[0])(x, *args, **kwargs)
        kind = type(self.original_module).__name__
        # Only x is split by row. Other arguments reach every group whole: per-row masks would mix rows up
        # and a KV cache would be written once per group. So: peft's module types (their other arguments
        # are not per row), or any module called with x alone (a norm, a head).
        if not row_wise:
            raise TypeError(f"mixed-adapter batches through modules_to_save split only the first input by row; "
                            f"{kind} also takes {', '.join([*(['positional arguments'] if args else []), *kwargs])},"
                            " which cannot be split (peft allows Linear, Embedding and Conv modules here)")
        outs, order = [], []
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            out = module_for(name)(x.index_select(0, idx), *args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != len(rows):
                raise TypeError(f"mixed-adapter batches through modules_to_save need a module mapping a batch of "
                                f"rows to as many rows of one tensor; {kind} returned {type(out).__name__}"
                                + (f" of shape {tuple(out.shape)} for {len(rows)} rows"
                                   if isinstance(out, torch.Tensor) else ""))
            outs.append(out)
            order.extend(rows)
        for name in idle:
            out = self.modules_to_save[name](x[:0], *args, **kwargs)
            if isinstance(out, torch.Tensor) and out.shape[1:] == outs[0].shape[1:]:
                outs.append(out.to(outs[0].dtype))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outs).index_select(0, inverse.to(x.device))

    def __getattr__(self, name: str):
        """A name the wrapper lacks is read from the module that runs now (as peft's wrapper): the active adapter's
        copy while adapters are enabled — ``model.lm_head.weight`` is the trained weight a fused loss reads — the
        original module otherwise."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in _MTS_OWN or "_modules" not in self.__dict__:
                raise
            return getattr(self._current(), name)


_MTS_OWN = ("original_module", "modules_to_save", "_active_adapter", "_disable_adapters")


# --------------------------------------------------------------------------- matching
def _supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or _is_linear4bit(module)


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module, "weight")


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, (FastLoraLinear, FastLoraEmbedding, FastLoraConv)) \
        or hasattr(module, "lora_A") and hasattr(module, "base_layer")


_MODULE_LORA_LAYERS = (FastLoraLinear, FastLoraEmbedding, FastLoraConv)  # the layers target_modules adapts
_LORA_LAYERS = (*_MODULE_LORA_LAYERS, FastLoraParamWrapper)


def adapters_of(layer: nn.Module) -> nn.Module:
    """The per-adapter container whose keys are the adapters a fastpeft LoRA layer holds: ``lora_A`` of a linear
    layer, ``lora_embedding_A`` of an embedding layer."""
    return layer.lora_embedding_A if isinstance(layer, FastLoraEmbedding) else layer.lora_A


def adapter_factors(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter of a fastpeft LoRA layer, laid out (r, in) and (out, r) (for an embedding: in =
    num_embeddings, out = embedding_dim): the parameters themselves."""
    if isinstance(layer, FastLoraEmbedding):
        return layer.adapter_factors(adapter_name)
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


def _pattern_key(pattern_keys: Iterable[str], key: str) -> str | None:
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _raise_no_match(model: nn.Module, config: LoraConfig, targets, names: list[str], modules_to_save) -> None:
    """peft's :class:`NoMatchingPeftModuleError` when an adapter adapts nothing: its wording for targets that
    matched nothing and for targets all excluded (``exclude_modules`` / ``modules_to_save``), with the layer
    selection options named, and the adaptable layer names of the model added."""
    put_aside = [k for k in names if _targeted(config, targets, k) and not _is_inside_lora(model, k)
                 and (_excluded(config, k) or _in_modules_to_save(modules_to_save, k))]
    if put_aside:
        msg = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
               "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
               "configuration. You may also have only targeted modules that are marked to be saved "
               f"(`modules_to_save`). Targeted but set aside: {put_aside[:8]}{' ...' if len(put_aside) > 8 else ''}.")
    else:
        msg = f"Target modules {targets} not found in the base model. Please check the target modules and try again."
    if getattr(config, "layers_to_transform", None) is not None:
        msg += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if getattr(config, "layers_pattern", None) is not None:
        msg += f" You also specified 'layers_pattern': {config.layers_pattern}."
    existing = sorted({n.split(".")[-1] for n in names if _supported_base(model.get_submodule(n))})
    raise NoMatchingPeftModuleError(f"{msg} Adaptable modules in this model: {existing}")


def _excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return True
    return False


def _targeted(config: LoraConfig, targets: list[str] | str, key: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # a module named in full is adapted whatever layers_to_transform says (as peft)
        return True
    return any(key.endswith(f".{t}") for t in targets) and _layer_index_ok(config, key)


def _in_modules_to_save(names: list[str], key: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in names)


def _resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            if config.target_parameters:  # as peft: the parameters alone are targeted
                return []
            raise ValueError(f"target_modules is None and fastpeft has no default for model type {model_type!r}; "
                             "pass target_modules (a list of names, a regex, or 'all-linear')")
        default = DEFAULT_TARGET_MODULES[model_type]
        return default if isinstance(default, str) else list(default)
    if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # any case, as peft
        head = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            with contextlib.suppress(Exception):
                head = get_out()
        names = set()
        for name, module in model.named_modules():
            # (layers another adapter already wraps count too: they are linear layers)
            if (_supported_base(module) or isinstance(module, FastLoraLinear)) and module is not head \
                    and not _is_inside_lora(model, name):
                names.add(name.split(".")[-1])
        if head is not None:
            for name, module in model.named_modules():
                if module is head:
                    names.discard(name.split(".")[-1])
        return sorted(names)
    return targets


def _all_linear_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The full names ``"all-linear"`` stands for in the saved config, as peft's ``_maybe_include_all_linear_layers``
    lists them: every linear layer (those inside ``modules_to_save`` and those ``exclude_modules`` leaves out
    included) but the output embeddings, or for a classification model without them its head (peft's
    ``SEQ_CLS`` rule; fastpeft also for ``TOKEN_CLS`` and ``QUESTION_ANS``, where peft crashes)."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        with contextlib.suppress(Exception):
            head = get_out()
    if head is None and config.task_type in _CLASSIFIER_HEADS:
        heads = _SEQ_CLS_HEADS if config.task_type in ("SEQ_CLS", "TOKEN_CLS") else ("qa_outputs",)
        head = next((getattr(model, h) for h in heads if getattr(model, h, None) is not None), None)
    return [name for name, module in model.named_modules()
            if name and (_supported_base(module) or isinstance(module, FastLoraLinear)) and module is not head
            and not _is_inside_lora(model, name)]


# module name parts that mark internals, never targets: the adapters' own, and torch's parametrizations (a
# weight_norm layer "0" holds "0.parametrizations.weight.0", which target_modules=["0"] must not reach)
_LORA_INTERNALS = ("base_layer", "lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
                   "original_module", "modules_to_save", "parametrizations")


def _is_inside_lora(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(p in _LORA_INTERNALS for p in parts)


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule ``name``."""
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def named_modules_of(model: nn.Module, kind: type | tuple[type, ...]) -> Iterator[tuple[str, Any]]:
    """(name, module) for every submodule of ``model`` that is a ``kind``."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def wrap_matching_modules(model: nn.Module, names: list[str], adapter_name: str,
                          skip_parts: tuple[str, ...], tied_module: nn.Module | None = None) -> list[str]:
    """Put every module of ``model`` whose name ends with one of ``names`` in a ``ModulesToSaveWrapper`` (one
    already wrapped gets a copy for ``adapter_name``), passing over names with a part in ``skip_parts``; returns the
    wrapped names. ``tied_module``: see ``ModulesToSaveWrapper.update``.

    As peft's ``_set_trainable``, the name is a bare suffix: "classifier" takes DistilBERT's ``pre_classifier`` too
    (trained and saved in full with the head). A LoRA layer matched only that way (``pre_classifier`` adapted by
    "all-linear") stays as it is, where peft raises a TypeError."""
    wrapped = []
    for key in [n for n, _ in model.named_modules() if n] if names else []:
        if any(p in skip_parts for p in key.split(".")) or not any(key.endswith(m) for m in names):
            continue
        module = model.get_submodule(key)
        if _is_lora_layer(module) and not any(key == m or key.endswith(f".{m}") for m in names):
            continue
        if _is_lora_layer(module) and adapter_name not in adapters_of(module):
            # another adapter's LoRA layer: its copy would hold that adapter's LoRA too (peft refuses)
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module)} ({key!r} holds "
                            f"LoRA adapters {sorted(adapters_of(module))})")
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name, tied_module=tied_module)
        else:
            parent, child = parent_of(model, key)
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name, tied_module=tied_module))
        wrapped.append(key)
    return wrapped


# --------------------------------------------------------------------------- the tuner
class LoraModel(nn.Module):
    """Holds the transformers model (``.model``) with fastpeft layers injected; peft's ``LoraModel`` layout."""

    prefix = "lora_"

    def __init__(self, model: nn.Module, peft_config: LoraConfig | dict[str, LoraConfig],
                 adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None, *, autocast_adapter_dtype: bool = True):
        """peft's parameters, in peft's order: ``peft_config`` (one config, or ``{name: config}``),
        ``adapter_name``, ``low_cpu_mem_usage`` (warned about: the weights are created as usual) and
        ``state_dict`` (peft's: an adapter state dict, relative to ``model``; the adapters go exactly where its
        LoRA keys say, as ``inject_adapter_in_model(..., state_dict=...)``)."""
        super().__init__()
        warn_low_cpu_mem_usage(low_cpu_mem_usage)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self._injected: list[str] = []  # adapted module names, in the order injections first reached them
        if state_dict is not None:
            if isinstance(peft_config, dict):
                raise ValueError("state_dict= takes one config, not a dict of them")
            from .api import lora_configs_for_state_dict

            exact, stored = lora_configs_for_state_dict(from_peft_lora_config(peft_config), model, state_dict)
            self.inject_adapter(exact, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            for field in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
                setattr(self.peft_config[adapter_name], field, copy.deepcopy(getattr(stored, field)))
            return
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, cfg in configs.items():
            self.inject_adapter(from_peft_lora_config(cfg), name, autocast_adapter_dtype=autocast_adapter_dtype)

    __getattr__ = delegating_getattr("model")
    __deepcopy__ = deepcopy_keeping_shared_memory

    def forward(self, *args, adapter_names: list[str] | None = None,
                alora_offsets: list[int | None] | None = None, **kwargs):
        """Run the wrapped model; ``adapter_names`` gives one adapter per sequence (peft's argument),
        ``alora_offsets`` the activated tokens of aLoRA adapters per sequence (``PeftModel`` computes them from
        ``input_ids``; here they are taken as given, and aLoRA adapters stay off without them)."""
        with mixed_adapter_batch(self.model, adapter_names, alora_offsets=alora_offsets):
            return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names as a list (peft's property)."""
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    # ----------------------------------------------------------------- injection
    def lora_layers(self) -> Iterator[tuple[str, FastLoraLinear | FastLoraEmbedding]]:
        """(name, layer) for every fastpeft LoRA layer in the model (linear, 4-bit and embedding layers)."""
        return named_modules_of(self.model, _LORA_LAYERS)

    def token_wrappers(self) -> Iterator[tuple[str, TrainableTokensWrapper]]:
        """(name, wrapper) for every ``trainable_token_indices`` wrapper in the model (tied heads included)."""
        return named_modules_of(self.model, TrainableTokensWrapper)

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """(name, wrapper) for every ``modules_to_save`` wrapper in the model."""
        return named_modules_of(self.model, ModulesToSaveWrapper)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names of the modules that carry LoRA layers (peft's attribute), in peft's order: as injections first
        reached them (layers that came another way, e.g. through ``from_peft``, follow in module order)."""
        present = [name for name, layer in self.lora_layers() if not isinstance(layer, FastLoraParamWrapper)]
        known = set(present)
        injected = [name for name in getattr(self, "_injected", []) if name in known]
        seen = set(injected)
        return injected + [name for name in present if name not in seen]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """``<module path>.<parameter name>`` of every parameter adapted through ``target_parameters`` (peft's
        attribute), in the order injections first reached them."""
        present = set()
        for key, layer in self.lora_layers():
            if isinstance(layer, FastLoraParamWrapper):
                present.add(f"{_strip_base_layer(key)}.{layer.parameter_name}")
        return [name for name in getattr(self, "_injected_params", []) if name in present]

    def inject_adapter(self, config: LoraConfig, adapter_name: str, activate: bool = True,
                       autocast_adapter_dtype: bool = True) -> None:
        """Wrap every module ``config`` targets with adapter ``adapter_name`` (frozen base, peft's init).
        ``autocast_adapter_dtype`` (peft's argument): adapter weights in fp32 on fp16/bf16 bases (the default);
        ``False`` keeps them in the base's dtype."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"fastpeft injects LoraConfig adapters, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete it first")
        if not adapter_name or "." in adapter_name or adapter_name == "__base__":
            raise ValueError(f"invalid adapter name {adapter_name!r}")
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            # peft's rule: the base biases are shared by all adapters, so only one adapter may train them
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to "
                             "'none' for all adapters.")
        config = copy.deepcopy(config)
        model = self.model
        # transformers 5's fused MoE experts: a config naming their v4 layers targets their parameters (peft's rewrite)
        convert_moe_config(config, model, lambda: _all_linear_names(model, config), lambda key: _excluded(config, key))
        if config.layer_replication:
            from .replication import replicate_layers

            replicate_layers(model, config.layer_replication)
        previous_active = [a for a in self.active_adapters if a in self.peft_config]
        first_adapter = not self.peft_config
        # Adding an adapter keeps the other adapters' trainability as it was (peft's add_adapter); the new one
        # trains only if it becomes the active adapter and its config is not in inference mode.
        before = {id(p): p.requires_grad for n, p in model.named_parameters()
                  if self.prefix in n or ".modules_to_save." in n or _TOKEN_DELTA in n}  # other adapters' weights
        targets = _resolve_targets(model, config)
        # as peft: both head names go into the config (and adapter_config.json), present in the model or not
        extra_save = _CLASSIFIER_HEADS.get(config.task_type or "", [])
        modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *extra_save]))
        if modules_to_save != (config.modules_to_save or []) and modules_to_save:
            config.modules_to_save = modules_to_save

        # ensure_weight_tying (peft's): may rewrite target_modules / modules_to_save, as peft does, before matching
        modules_to_save, modules_to_tie, targets_to_tie = _plan_weight_tying(model, config, modules_to_save)
        if targets_to_tie:
            targets = _resolve_targets(model, config)

        matched: list[str] = []
        names = [n for n, _ in model.named_modules() if n]
        # the layers tied to the input embeddings get an adapter tied to theirs, after all others (as peft)
        tie_keys = [key for key in names if targets_to_tie and not _is_inside_lora(model, key)
                    and any(key == t or key.endswith(f".{t}") for t in targets_to_tie)]
        keys = [key for key in names if not _is_inside_lora(model, key) and not _excluded(config, key)
                and not _in_modules_to_save(modules_to_save, key) and _targeted(config, targets, key)
                and key not in tie_keys]
        _check_weight_tying(model, config, keys, tie_keys, modules_to_tie)
        param_targets = _match_parameters(self, model, config, adapter_name, keys)  # checked before any wrapping
        token_plan = _plan_trainable_tokens(model, config, keys, modules_to_save)  # checked before wrapping
        if config.use_dora:  # refused before anything is wrapped
            for key in keys:
                if isinstance(model.get_submodule(key), (nn.Embedding, FastLoraEmbedding)):
                    refuse_embedding_dora(repr(key))
        use_alora = getattr(config, "alora_invocation_tokens", None) is not None
        if use_alora:  # peft: aLoRA is a variant of the Linear layers only; here before anything is wrapped
            _refuse_alora_targets(model, keys, config)
        lora_bias = bool(getattr(config, "lora_bias", False))
        if lora_bias:  # peft refuses it on embeddings too (while injecting); here before anything is wrapped
            for key in keys:
                module = model.get_submodule(key)
                if isinstance(module, (nn.Embedding, FastLoraEmbedding)):
                    raise ValueError(f"lora_bias=True is not supported for the embedding layer {key!r} "
                                     f"({type(module).__name__}), as in peft; drop it from target_modules or use "
                                     "an adapter without lora_bias for it")

        def layer_kwargs(key: str) -> dict[str, Any]:
            r_key = _pattern_key(config.rank_pattern, key)
            a_key = _pattern_key(config.alpha_pattern, key)
            kw = dict(r=config.rank_pattern[r_key] if r_key else config.r,
                      lora_alpha=config.alpha_pattern[a_key] if a_key else config.lora_alpha,
                      lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                      use_rslora=config.use_rslora, use_dora=bool(config.use_dora),
                      loftq_config=config.loftq_config or None, autocast_adapter_dtype=autocast_adapter_dtype)
            if lora_bias:
                kw["lora_bias"] = True
            if use_alora:
                kw["use_alora"] = True
            return kw

        for key in keys:
            module = model.get_submodule(key)
            kw = layer_kwargs(key)
            if isinstance(module, _MODULE_LORA_LAYERS):
                module.update_layer(adapter_name, **kw)
            elif isinstance(module, nn.Embedding):
                new = FastLoraEmbedding.from_embedding(module, adapter_name=adapter_name, **kw)
                parent, child = parent_of(model, key)
                setattr(parent, child, new)
            elif is_plain_conv(module):
                new = FastLoraConv.from_conv(module, adapter_name=adapter_name, **kw)
                parent, child = parent_of(model, key)
                setattr(parent, child, new)
            elif _is_linear4bit(module):
                new = _wrap_4bit(module, adapter_name, kw)
                parent, child = parent_of(model, key)
                setattr(parent, child, new)
            elif isinstance(module, nn.Linear) or _is_conv1d(module):
                is_conv = _is_conv1d(module)
                if config.fan_in_fan_out != is_conv:
                    warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module "
                                  f"{key!r} is {type(module).__name__}; using fan_in_fan_out={is_conv}.",
                                  stacklevel=3)
                new = FastLoraLinear.from_linear(module, adapter_name=adapter_name, **kw)
                parent, child = parent_of(model, key)
                setattr(parent, child, new)
            else:
                raise ValueError(f"Target module {key!r} ({type(module).__name__}) is not supported by fastpeft: "
                                 "it adapts torch.nn.Linear, transformers' Conv1D, bitsandbytes' Linear4bit, "
                                 "torch.nn.Embedding and torch.nn.Conv1d/Conv2d/Conv3d")
            matched.append(key)
            if key not in self._injected:
                self._injected.append(key)
        _wrap_parameters(model, config, adapter_name, param_targets, autocast_adapter_dtype)
        for key in tie_keys:  # ensure_weight_tying: lora_A / lora_B over the embeddings' lora_embedding_B / _A
            emb_A, emb_B = model.get_input_embeddings().adapter_factors(adapter_name)  # (r, V), (D, r)
            kw = dict(layer_kwargs(key), tied_adapter={"lora_A": emb_B.t(), "lora_B": emb_A.t()})
            module = model.get_submodule(key)
            if isinstance(module, FastLoraLinear):
                module.update_layer(adapter_name, **kw)
            else:
                parent, child = parent_of(model, key)
                setattr(parent, child, FastLoraLinear._wrapping(module, adapter_name, **kw))
            matched.append(key)
            if key not in self._injected:
                self._injected.append(key)
        self._injected_params = list(dict.fromkeys([*getattr(self, "_injected_params", []),
                                                    *(key for _, _, key in param_targets)]))
        if matched or param_targets:  # peft's warnings when one kind of target matched nothing
            if targets and not matched:
                warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.",
                              RuntimeWarning, stacklevel=3)
            elif config.target_parameters and not param_targets:
                warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was "
                              "matched.", RuntimeWarning, stacklevel=3)
        elif not targets:
            raise NoMatchingPeftModuleError(
                "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                f"these arguments (target_parameters={config.target_parameters}).")
        if not matched and not param_targets:
            _raise_no_match(model, config, targets, names, modules_to_save)
        # As peft, the saved config names what was adapted: the model type's default targets for None, the
        # adapted modules' full names for "all-linear", and fan_in_fan_out for Conv1D targets.
        if config.target_modules is None:  # (no default for the model type with target_parameters: [] as peft)
            config.target_modules = targets if isinstance(targets, str) else sorted(targets)
        elif isinstance(config.target_modules, str) \
                and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            config.target_modules = sorted({*matched, *_all_linear_names(model, config)})
        if isinstance(config.target_modules, (list, set)) and len(config.target_modules) >= _MIN_TARGETS_TO_CONDENSE:
            from .eva import _minimal_suffixes

            # peft condenses a long list to the name suffixes that pick out the same modules (its saved config)
            suffixes = tuple(f".{t}" for t in config.target_modules)
            others = ["", *(n for n in names if n not in config.target_modules and not n.endswith(suffixes))]
            condensed = _minimal_suffixes(list(config.target_modules), others)
            if len(condensed) < len(config.target_modules):
                config.target_modules = sorted(condensed)
        adapted = [model.get_submodule(k) for k in matched]
        if any(isinstance(m, FastLoraLinear) and _is_conv1d(m.base_layer) for m in adapted):
            config.fan_in_fan_out = True
        tied = [k for k, m in zip(matched, adapted) if _shares_input_embeddings(model, m) and k not in tie_keys]
        tied_inputs = [k for k, m in zip(matched, adapted) if not tie_keys
                       and isinstance(m, FastLoraEmbedding) and _output_embeddings_share(model, m)]
        if tied_inputs:
            warnings.warn(f"{tied_inputs} share their weight with the output embeddings (tie_word_embeddings=True); "
                          "the adapter on them changes the input side only, and merging it gives them their own "
                          "weight first (the head keeps its own; the config then says tie_word_embeddings=False)",
                          stacklevel=3)
        if tied:
            warnings.warn(f"{tied} share their weight with the input embeddings (tie_word_embeddings=True); the "
                          "adapter on them is their own, and merging it gives them their own weight first (the "
                          "embeddings keep theirs; the config then says tie_word_embeddings=False)", stacklevel=3)
        self.peft_config[adapter_name] = config
        wrap_matching_modules(model, modules_to_save, adapter_name, _LORA_INTERNALS)
        if modules_to_tie:  # ensure_weight_tying: the tied layers' copies share the input embeddings' copy
            embeddings = model.get_input_embeddings()
            if not isinstance(embeddings, ModulesToSaveWrapper) or adapter_name not in embeddings.modules_to_save:
                raise ValueError("ensure_weight_tying with modules_to_save: the input embeddings were not wrapped "
                                 f"for adapter {adapter_name!r}; cannot tie {sorted(modules_to_tie)} to them")
            wrap_matching_modules(model, sorted(modules_to_tie), adapter_name, _LORA_INTERNALS,
                                  tied_module=embeddings.modules_to_save[adapter_name])
        _wrap_trainable_tokens(model, adapter_name, token_plan, autocast_adapter_dtype)
        self._mark_only_adapters_as_trainable()
        if not previous_active and (activate or first_adapter):
            self.set_adapter(adapter_name)
        else:  # (none active after set_adapter([]): as peft, a new adapter leaves it so)
            self.set_adapter(previous_active)
        for param in model.parameters():
            if id(param) in before:
                param.requires_grad_(before[id(param)])
        if config.inference_mode:
            self._freeze_adapter(adapter_name)

    def _mark_only_adapters_as_trainable(self) -> None:
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name and _TOKEN_DELTA not in name:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            cfg = self.peft_config.get(adapter)
            if cfg is None or cfg.bias == "none":
                continue
            if cfg.bias == "all":
                # peft's rule: every bias, a modules_to_save wrapper's original module too unless one of the
                # active adapters has its own copy there (then the original is not in use)
                unused = {f"{n}.original_module." for n, w in self.modules_to_save_wrappers()
                          if any(a in w.modules_to_save for a in self.active_adapters)}
                for name, param in self.model.named_parameters():
                    if "bias" in name and not any(name.startswith(u) for u in unused):
                        param.requires_grad_(True)
            else:  # lora_only: the base biases of the layers this adapter adapts (what its file saves)
                for _, layer in self.lora_layers():
                    if adapter in adapters_of(layer) and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch training on or off for the named adapters' weights and modules_to_save copies (peft's
        method); which adapters are active does not change."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for _, layer in self.lora_layers():
            layer.set_requires_grad(names, requires_grad)
        for _, wrapper in self.modules_to_save_wrappers():
            for n in names:
                if n in wrapper.modules_to_save:
                    wrapper.modules_to_save[n].requires_grad_(requires_grad)
            wrapper.remember_requires_grad(names)
        for _, wrapper in self.token_wrappers():
            wrapper.set_requires_grad(names, requires_grad)

    def _freeze_adapter(self, adapter_name: str) -> None:
        for name, param in self.model.named_parameters():
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                param.requires_grad_(False)

    # ----------------------------------------------------------------- adapters
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter (or several, summed). As in peft, the active adapters become trainable and
        the others frozen, unless ``inference_mode=True`` (then the active ones are frozen too)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        for _, wrapper in self.modules_to_save_wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"adapters {held} each have a modules_to_save copy of the same module; only one "
                                 "of them can be active at a time (as in peft)")
        for _, wrapper in self.token_wrappers():
            held = [n for n in names if n in wrapper.adapters]
            if len(held) > 1:
                raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {len(held)}: "
                                 f"{held} (as in peft)")
        for _, layer in self.lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.",
                              stacklevel=2)
                layer.unmerge()
            # every name, held or not (peft's layers keep the model-wide list; the forward skips names a layer
            # lacks), so get_layer_status / get_model_status report what peft reports
            layer.set_adapter(names, inference_mode=inference_mode)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter([n for n in names if n in wrapper.modules_to_save][:1], train=not inference_mode)
        for _, wrapper in self.token_wrappers():
            wrapper.set_adapter(names, train=not inference_mode)
        if inference_mode:
            for n in names:
                self._freeze_adapter(n)
        self.active_adapter = names[0] if len(names) == 1 else names

    def enable_adapter_layers(self) -> None:
        """Re-enable every LoRA layer and modules_to_save wrapper after ``disable_adapter_layers``."""
        for _, layer in self.lora_layers():
            layer.enable_adapters(True)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.enable_adapters(True)
        for _, wrapper in self.token_wrappers():
            wrapper.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model only: every LoRA layer and modules_to_save wrapper is bypassed (nothing is deleted)."""
        for _, layer in self.lora_layers():
            layer.enable_adapters(False)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.enable_adapters(False)
        for _, wrapper in self.token_wrappers():
            wrapper.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (a merged one is refused, as in peft); if it was the only active one,
        the first remaining one in sorted order becomes active (peft's choice)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; this model has {list(self.peft_config)}")
        if any(adapter_name in getattr(layer, "merged_adapters", ()) for _, layer in self.lora_layers()):
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")  # peft's check and message
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        for _, layer in self.lora_layers():
            if adapter_name in adapters_of(layer):
                layer.delete_adapter(adapter_name)
        for _, wrapper in self.modules_to_save_wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        for _, wrapper in self.token_wrappers():
            wrapper.delete_adapter(adapter_name)
        if not was_active:  # as peft: an inactive adapter goes without touching activity or requires_grad
            return
        # as peft: the other active adapters stay, else the first remaining adapter in sorted order
        others = [a for a in self.active_adapters if a != adapter_name]
        remaining = others or sorted(self.peft_config)[:1]
        if remaining and not others:  # peft's warning (its layers each fall back to their own first adapter;
            # fastpeft activates this one model-wide)
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{remaining[0]}.", stacklevel=2)
        if remaining:
            self.set_adapter(remaining)

    # ----------------------------------------------------------------- weighted adapters
    # combination_type -> (how the factors are built, the merge rule of fastpeft.merging)
    _COMBINATIONS = {
        "svd": ("svd", "linear"), "ties_svd": ("svd", "ties"), "dare_linear_svd": ("svd", "dare_linear"),
        "dare_ties_svd": ("svd", "dare_ties"), "magnitude_prune_svd": ("svd", "magnitude_prune"),
        "linear": ("factors", "linear"), "ties": ("factors", "ties"), "dare_linear": ("factors", "dare_linear"),
        "dare_ties": ("factors", "dare_ties"), "magnitude_prune": ("factors", "magnitude_prune"),
        "cat": ("cat", None),
    }

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add adapter ``adapter_name`` combining the existing ``adapters`` with ``weights`` (peft's method,
        same arguments and results). The new adapter is not activated: ``set_adapter(adapter_name)`` uses it.

        ``combination_type`` (each adapter ``i`` has factors ``A_i``, ``B_i``, scale ``s_i``, weight ``w_i``):

        - ``"cat"``: exact, ``Σ w_i s_i B_i A_i``; rank = the sum of the ranks (the A's scaled and stacked).
        - ``"svd"``: exact up to the truncation: the best rank-``svd_rank`` factorization (SVD) of
          ``Σ w_i s_i B_i A_i``; rank ``svd_rank``, by default the largest rank of ``adapters``.
        - ``"linear"``: a rough approximation, ``A = Σ ±√|w_i s_i| A_i``, ``B = Σ √|w_i s_i| B_i`` (the sign
          of ``w_i s_i`` on A); all adapters must have the same rank, which the new one gets.
        - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"``, with the A's
          and the B's each merged by TIES (magnitude pruning to ``density``, sign election by
          ``majority_sign_method`` "total" or "frequency", mean of the agreeing entries), DARE (random
          pruning to ``density`` with rescaling, then a weighted sum or TIES), or magnitude pruning then a
          weighted sum; see ``fastpeft.merging``. The DARE variants draw their masks from torch's global
          generator: after the same ``torch.manual_seed`` they are peft's.
        - ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the same rules
          applied to the full updates ``s_i B_i A_i``, then factorized as ``"svd"``.

        With a single adapter the combination is always ``"linear"`` (as in peft). ``svd_clamp``: clamp the
        SVD factors to the ``svd_clamp`` quantile of their entries' values; ``svd_full_matrices`` and
        ``svd_driver`` are passed to ``torch.linalg.svd``. ``density`` (in [0, 1], required by the pruning
        types; ≥ 1 prunes nothing) is the fraction of entries kept.

        The new config is adapter ``adapters[0]``'s with ``r = lora_alpha =`` the new rank (scale 1),
        ``target_modules`` the union of the adapters' (regexes joined by ``|``), no ``rank_pattern`` /
        ``alpha_pattern``; its ``modules_to_save`` are fresh copies of the original modules, as in peft.
        An ``adapter_name`` that exists already leaves everything as it is (peft's behaviour; a warning says
        so). Adapters with different ``target_modules`` combine where they exist; ``modules_to_save`` of
        more than one of ``adapters`` on the same module is refused.

        ``lora_bias``: as in peft, only ``lora_A``/``lora_B`` weights are combined. The new adapter takes
        ``lora_bias`` from ``adapters[0]``'s config, and its ``lora_B.bias`` keeps its initialization (zeros
        with ``init_lora_weights=True``); the source adapters' biases are not carried over (a warning says so).

        Example::

            model.add_weighted_adapter(["math", "code"], [0.7, 0.3], "both", combination_type="cat")
            model.set_adapter("both")
        """
        if adapter_name in self.peft_config:
            warnings.warn(f"adapter {adapter_name!r} exists already; add_weighted_adapter leaves it as it is "
                          "(as peft does)", stacklevel=2)
            return
        combination_type, new_rank, target_modules = self._check_weighted_adapter(
            adapters, weights, combination_type, svd_rank, density, majority_sign_method)
        build, rule = self._COMBINATIONS[combination_type]
        if rule is not None:
            warn_no_pruning(density, rule)
        with_bias = [a for a in adapters if getattr(self.peft_config[a], "lora_bias", False)]
        if with_bias:
            new_has = bool(getattr(self.peft_config[adapters[0]], "lora_bias", False))
            fate = ("keeps its initialization" if new_has
                    else f"does not exist (it takes lora_bias=False from {adapters[0]!r})")
            warnings.warn(f"add_weighted_adapter combines lora_A/lora_B only (as peft): the lora_B biases of "
                          f"{with_bias} (lora_bias=True) are not carried into {adapter_name!r}, whose lora_B.bias "
                          f"{fate}", stacklevel=2)
        first = self.peft_config[adapters[0]]
        config = dataclasses.replace(first, r=new_rank, lora_alpha=new_rank, target_modules=target_modules,
                                     rank_pattern={}, alpha_pattern={}, extra=copy.deepcopy(first.extra))
        # The new weights are initialized as peft does (then overwritten), so torch's global generator is at
        # the same point as in peft when the DARE masks are drawn: one seed, peft's result. Not PiSSA, OLoRA
        # or LoftQ, which would rewrite the base weights under the other adapters.
        init = False if mutates_base(config.init_lora_weights) else config.init_lora_weights
        self.inject_adapter(dataclasses.replace(config, init_lora_weights=init), adapter_name, activate=False)
        self.peft_config[adapter_name].init_lora_weights = config.init_lora_weights
        self._freeze_adapter(adapter_name)
        try:
            with torch.no_grad():
                for key, layer in self.lora_layers():
                    if adapter_name not in adapters_of(layer):
                        continue
                    present = [(a, w) for a, w in zip(adapters, weights) if a in adapters_of(layer)]
                    if not present:  # e.g. a union of target_modules under adapters[0]'s layers_to_transform
                        raise ValueError(f"the new adapter's config (adapter {adapters[0]!r}'s with target_modules "
                                         f"{target_modules!r}) adapts {key!r}, but none of {list(adapters)} does")
                    if build == "cat":
                        A, B = self._cat_factors(layer, present)
                    elif build == "svd":
                        A, B = self._svd_factors(key, layer, present, rule, new_rank, density,
                                                 majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
                    else:
                        A, B = self._merged_factors(key, layer, present, rule, density, majority_sign_method)
                    new_A, new_B = adapter_factors(layer, adapter_name)
                    new_A.zero_()
                    new_B.zero_()
                    new_A[: A.shape[0]].copy_(A)  # a smaller rank than new_rank is padded with zeros
                    new_B[:, : B.shape[1]].copy_(B)
                    source = adapter_factors(layer, present[0][0])[0].dtype
                    if build != "svd" and new_A.dtype != source:
                        # as peft: a combination of the factors themselves keeps their dtype (half-precision
                        # adapters, autocast_adapter_dtype=False); an SVD's factors stay fp32
                        new_A.data, new_B.data = new_A.data.to(source), new_B.data.to(source)
        except BaseException:
            self._discard_adapter(adapter_name)
            raise

    def _check_weighted_adapter(self, adapters, weights, combination_type, svd_rank, density,
                                majority_sign_method) -> tuple[str, int, list[str] | str]:
        """Validate ``add_weighted_adapter``'s arguments (before anything changes): the combination type
        actually used, the new rank and the new target_modules."""
        if isinstance(adapters, str) or not list(adapters):
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        adapters = list(adapters)
        for adapter in adapters:
            if getattr(self.peft_config.get(adapter), "target_parameters", None):  # as peft
                raise ValueError("add_weighted_adapter does not support targeting nn.Parameter (problematic "
                                 f"adapter '{adapter}')")
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ValueError(f"Adapter {adapter} does not exist; this model has {list(self.peft_config)}")
        if len(list(weights)) != len(adapters):
            raise ValueError(f"weights must have one value per adapter: {len(adapters)} adapters, "
                             f"{len(list(weights))} weights")
        if combination_type not in self._COMBINATIONS:
            raise ValueError(f"Invalid combination_type: {combination_type!r}; expected one of "
                             f"{list(self._COMBINATIONS)}")
        for key, wrapper in self.modules_to_save_wrappers():
            held = [a for a in adapters if a in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save: "
                                 f"adapters {held} each have a copy of {key!r}")
        if len(adapters) == 1:
            combination_type = "linear"
        configs = [self.peft_config[a] for a in adapters]
        # the largest rank an adapter has anywhere (rank_pattern included)
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        build, rule = self._COMBINATIONS[combination_type]
        if build == "factors":
            if len(set(ranks)) != 1:
                raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                                 f"dare_ties, dare_linear or magnitude_prune; got ranks {dict(zip(adapters, ranks))}")
            new_rank = ranks[0]
        elif build == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = svd_rank or max(ranks)
        if rule not in (None, "linear"):
            if density is None:
                raise ValueError(f"combination_type {combination_type!r} needs density (the fraction of entries "
                                 "kept, in [0, 1])")
            if density < 0:
                raise ValueError(f"Density should be >= 0, got {density}")
        if rule in ("ties", "dare_ties") and majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
        targets = [c.target_modules for c in configs]
        if len({isinstance(t, str) for t in targets}) > 1:
            raise ValueError("all adapter configs should follow the same target modules type. Combining adapters "
                             "with `target_modules` type being a mix of list/set and string is not supported.")
        if isinstance(targets[0], str):
            new_targets: list[str] | str = "|".join(f"({t})" for t in targets)
        else:
            new_targets = sorted(set().union(*targets))
        return combination_type, new_rank, new_targets

    @staticmethod
    def _cat_factors(layer: FastLoraLinear, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters side by side: A's stacked (each times its weight and scale), B's concatenated."""
        As = [adapter_factors(layer, a)[0].float() * (w * layer.scaling[a]) for a, w in present]
        B = torch.cat([adapter_factors(layer, a)[1].float() for a, _ in present], dim=1)
        groups = layer.base_layer.groups if isinstance(layer, FastLoraConv) else 1
        if groups > 1:
            # a grouped convolution's lora_B sees rank channels group by group (its columns are each group's own):
            # A's rows are interleaved per group so that each group keeps its adapters' rows (peft concatenates
            # them whole, which mixes the groups)
            As = [A.reshape(groups, A.shape[0] // groups, *A.shape[1:]) for A in As]
            return torch.cat(As, dim=1).flatten(0, 1), B
        return torch.cat(As, dim=0), B

    @staticmethod
    def _svd_factors(key, layer, present, rule, new_rank, density, majority_sign_method, clamp, full_matrices,
                     driver) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``new_rank`` factors of the adapters' updates merged by ``rule``."""
        # get_delta_weight: scale·B·A in the base weight's layout (the layout the pruning masks are drawn in)
        delta = combine([layer.get_delta_weight(a) for a, _ in present], [w for _, w in present], rule,
                        density, majority_sign_method)
        if layer.fan_in_fan_out or isinstance(layer, FastLoraEmbedding):  # back to B·A's (out, in) layout
            delta = delta.t()
        conv_shape = tuple(delta.shape) if isinstance(layer, FastLoraConv) else None
        if conv_shape is not None:  # ΔW[o, i, κ] = Σ B[o, r] A[r, i, κ]: a matrix over (out, in·κ)
            delta = delta.flatten(1)
        if new_rank > min(delta.shape):
            raise ValueError(f"svd rank {new_rank} is larger than the {tuple(delta.shape)} update of {key!r} "
                             "allows; pass a smaller svd_rank")
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
        B = U[:, :new_rank] * S[:new_rank]
        A = Vh[:new_rank]
        if clamp is not None:
            hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
            B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
        if conv_shape is not None:
            A = A.reshape(new_rank, *conv_shape[1:])
            B = B.reshape(*B.shape, *([1] * (len(conv_shape) - 2)))
        return A, B

    @staticmethod
    def _merged_factors(key, layer, present, rule, density, majority_sign_method) -> tuple[torch.Tensor, torch.Tensor]:
        """The A's and the B's each merged by ``rule``, the weight times scale split as a square root over
        the two (its sign on A)."""
        shapes = {a: tuple(adapter_factors(layer, a)[0].shape) for a, _ in present}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"combination rule {rule!r} needs the same rank in every adapter, but {key!r} has "
                             f"ranks {({a: s[0] for a, s in shapes.items()})}")
        scaled = [w * layer.scaling[a] for a, w in present]
        root = [math.sqrt(abs(x)) for x in scaled]
        A = combine([adapter_factors(layer, a)[0] for a, _ in present],
                    [r if x >= 0 else -r for r, x in zip(root, scaled)], rule, density, majority_sign_method)
        B = combine([adapter_factors(layer, a)[1] for a, _ in present], root, rule, density, majority_sign_method)
        return A, B

    def _discard_adapter(self, adapter_name: str) -> None:
        """Remove an inactive adapter without touching the others' state (undoes a failed add); a layer it
        alone adapted gives its base layer back."""
        self.peft_config.pop(adapter_name, None)
        for key, layer in list(self.lora_layers()):
            if adapter_name not in adapters_of(layer):
                continue
            layer.delete_adapter(adapter_name)
            if not len(adapters_of(layer)):
                unload_base = getattr(layer, "unload_base", None)
                parent, child = parent_of(self.model, key)
                setattr(parent, child, unload_base() if callable(unload_base) else layer.base_layer)
        for _, wrapper in self.modules_to_save_wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the given adapters (default: the active ones) into the base weights, layer by layer (peft's method)."""
        from .replication import check_merge_allowed

        check_merge_allowed(self.model)
        self._refuse_unmergeable(adapter_names)
        with _requantization_summary():
            for key, layer in _embeddings_first(self.lora_layers()):
                wanted = layer.active_adapters if adapter_names is None else adapter_names  # [] merges nothing
                names = [n for n in wanted if n in adapters_of(layer)]
                self._merge_layer(key, layer, names, safe_merge, adapter_names)
        # (undone by unmerge_adapter: the layers share their weight again)
        self.__dict__.setdefault("_token_unties", []).extend(_untie_token_rows_before_merge(self.model, adapter_names))
        for _, wrapper in self.token_wrappers():  # a tied head writes the same rows into the shared weight
            wrapper.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _refuse_unmergeable(self, adapter_names: list[str] | None) -> None:
        """Before any layer merges: a layer whose base is no dense matrix (8-bit, torchao, offloaded by accelerate)
        refuses with its clear error, so that a refusal never leaves the model half merged."""
        for _, layer in self.lora_layers():
            refuse = getattr(layer, "_refuse_opaque", None)
            wanted = layer.active_adapters if adapter_names is None else adapter_names
            if refuse is not None and any(n in adapters_of(layer) and n not in getattr(layer, "merged_adapters", ())
                                          for n in wanted):
                refuse("merge")

    def _merge_layer(self, key: str, layer: nn.Module, names: list[str], safe_merge: bool,
                     adapter_names: list[str] | None) -> None:
        """Merge ``names`` into ``layer``. A pair tied by ``ensure_weight_tying`` (the head's adapters over the
        input embeddings' memory, one weight for both) merges once, through the embeddings, and stays tied: the
        two deltas are the same matrix (peft merges it twice into the shared weight)."""
        head_tied = _tied_to_embeddings(self.model, layer)
        if head_tied and names and set(names) <= head_tied:
            emb = _input_embeddings(self.model)[1]
            if all(n in emb.merged_adapters for n in names):
                for n in names:
                    if n not in layer.merged_adapters:
                        layer.merge_through_tie(n)
                return
        if isinstance(layer, FastLoraEmbedding) and names:
            head = _output_embeddings(self.model)
            tied = _tied_to_embeddings(self.model, head) if head is not None else set()
            if tied and set(names) <= tied and \
                    set(names) <= set(head.active_adapters if adapter_names is None else adapter_names):
                layer.merge(safe_merge=safe_merge, adapter_names=names)  # into the shared weight: the head follows
                return
        self._untie_before_merge(key, layer, names)
        layer.merge(safe_merge=safe_merge, adapter_names=names)

    def _untie_before_merge(self, key: str, layer: nn.Module, names: list[str]) -> None:
        """A layer whose base weight is the input embeddings' (``lm_head`` under ``tie_word_embeddings``): a merge
        writes into that weight and would change the embeddings too. The layer gets its own copy first and the
        model's config stops tying them, so the merged model computes what the adapter model did (peft merges
        into the shared weight, embeddings included, with a warning)."""
        if not names:
            return
        if isinstance(layer, FastLoraEmbedding):  # the input side of a tied pair: the head must stay as it was
            if not _output_embeddings_share(self.model, layer):
                return
            message = (f"{key} shared its weight with the output embeddings (a tied head); it has its own copy now, "
                       "so merging the adapter leaves the head as it was (config.tie_word_embeddings is now False)")
        elif _shares_input_embeddings(self.model, layer):
            message = (f"{key} shared its weight with the input embeddings; it has its own copy now, so merging the "
                       "adapter leaves the embeddings as they were (config.tie_word_embeddings is now False)")
        else:
            return
        base = layer.base_layer
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        _untie_config_if_untied(self.model)
        warnings.warn(message, stacklevel=3)

    def unmerge_adapter(self) -> None:
        """Undo every merge: the base weights are restored and the adapters run unmerged again (with nothing
        merged: peft's "Already unmerged" warning, once rather than once per layer)."""
        layers = list(self.lora_layers())
        if not any(layer.merged for _, layer in layers) and \
                not any(wrapper.token_adapter.merged_adapters for _, wrapper in self.token_wrappers()):
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
        for _, layer in layers:
            if layer.merged:
                layer.unmerge()
        for _, wrapper in self.token_wrappers():
            wrapper.unmerge()
        for layer, shared, configs in reversed(self.__dict__.pop("_token_unties", [])):  # tie them again
            layer.weight = shared
            for cfg in configs:
                cfg.tie_word_embeddings = True

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) into the base weights; the plain model back."""
        return self._unload(True, safe_merge, adapter_names, progressbar)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; the plain model back."""
        return self._unload(False)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None,
                progressbar: bool = False) -> nn.Module:
        if merge:
            from .replication import check_merge_allowed

            check_merge_allowed(self.model)
            self._refuse_unmergeable(adapter_names)
        layers = list(self.lora_layers())
        # nested parameter wrappers: the inner one (its name longer) first, so that each is replaced in place
        layers = [x for x in layers if not isinstance(x[1], FastLoraParamWrapper)] + \
            [x for x in reversed(layers) if isinstance(x[1], FastLoraParamWrapper)]
        it = layers
        if progressbar:
            from tqdm.auto import tqdm
            it = tqdm(layers, desc="Unloading " + ("and merging " if merge else "") + "model")
        with _requantization_summary():
            if merge:
                for key, layer in _embeddings_first(layers):
                    wanted = layer.active_adapters if adapter_names is None else adapter_names  # [] merges nothing
                    names = [n for n in wanted if n in adapters_of(layer)]
                    self._merge_layer(key, layer, names, safe_merge, adapter_names)  # even when disabled, as peft
            for key, layer in it:
                base = layer.base_layer
                merged_4bit = getattr(layer, "unload_base", None)
                if callable(merged_4bit):
                    base = merged_4bit()
                parent, child = parent_of(self.model, key)
                setattr(parent, child, base)
        for key, wrapper in list(self.modules_to_save_wrappers()):
            parent, child = parent_of(self.model, key)
            setattr(parent, child, wrapper._current() if merge or not wrapper._disable_adapters
                    else wrapper.original_module)
        if merge:
            _untie_token_rows_before_merge(self.model, adapter_names)
        for key, wrapper in list(self.token_wrappers()):  # as peft: even when disabled, merge writes the rows
            if merge:
                wrapper.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            parent, child = parent_of(self.model, key)
            setattr(parent, child, wrapper.original_module)
        if merge:  # a trained copy of a tied head (modules_to_save) no longer shares the embeddings' weight
            _untie_config_if_untied(self.model)
        return self.model


# --------------------------------------------------------------------------- ensure_weight_tying
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names: a tied layer "is part of the adapter"
_WRAPPER_PARTS = ("base_layer", "original_module", "token_adapter")  # wrappers' infixes before the wrapped layer


def _unwrapped_name(name: str) -> str:
    """``name`` without fastpeft's (and peft's) wrapper infixes: the layer's path as it was before wrapping."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _input_embeddings(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(name, module) of ``model``'s input embeddings (wrapper or not), or (None, None)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None, None
    if embeddings is None:
        return None, None
    return next((n for n, m in model.named_modules() if m is embeddings and n), None), embeddings


def _module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """The names (before wrapping) of the layers that hold the input embeddings' very weight (``lm_head`` under
    ``tie_word_embeddings``), as peft's ``_get_module_names_tied_with_embedding``: none when the model's config
    says ``tie_word_embeddings=False``."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return []
    emb_name, embeddings = _input_embeddings(model)
    if embeddings is None:
        return []
    weight = None
    for n, m in embeddings.named_modules():  # the wrapped embedding's own weight (not a modules_to_save copy)
        if "modules_to_save" not in n.split(".") and isinstance(m, nn.Embedding):
            weight = m.weight
            break
    if weight is None:
        return []
    names = set()
    for n, m in model.named_modules(remove_duplicate=False):
        if n and m._parameters.get("weight") is weight and "modules_to_save" not in n.split("."):
            names.add(_unwrapped_name(n))
    names.discard(_unwrapped_name(emb_name or ""))
    return sorted(names)


def _plan_weight_tying(model: nn.Module, config: LoraConfig,
                       modules_to_save: list[str]) -> tuple[list[str], set[str], set[str]]:
    """peft's ``_check_tied_modules`` for ``ensure_weight_tying=True``: ``(modules_to_save, modules to tie to the
    input embeddings' modules_to_save copy, layers to give a LoRA adapter tied to the input embeddings' one)``.
    As peft, ``config`` is rewritten: the input embeddings' name joins ``modules_to_save`` (or ``target_modules``:
    a list gains it, a regex becomes ``(?:regex|^name$)``) and the tied layers' names leave it; peft's warnings
    when nothing can be tied."""
    if not config.ensure_weight_tying:
        return modules_to_save, set(), set()
    # peft's name test, and also the input embeddings' full name: the name that the saved config holds after the
    # rewrite below, so that an adapter tied on a model whose embeddings are not called embed_tokens (GPT-2's
    # transformer.wte) is tied again when it is loaded (peft then loads the head untied, without its factors)
    emb_full = _unwrapped_name(_input_embeddings(model)[0] or "")

    def names_embedding(m: str) -> bool:
        return m.split(".")[-1] in _EMBEDDING_LAYER_NAMES or (bool(emb_full) and m == emb_full)

    in_save = any(names_embedding(m) for m in modules_to_save)
    raw = config.target_modules
    if isinstance(raw, str):
        in_targets = any(re.fullmatch(raw, e) for e in _EMBEDDING_LAYER_NAMES)
    else:
        in_targets = any(names_embedding(m) for m in (raw or []))
    tied = _module_names_tied_with_embedding(model)
    if not tied:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                      stacklevel=4)
        return modules_to_save, set(), set()
    if not (in_save or in_targets):
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules`", stacklevel=4)
        return modules_to_save, set(), set()
    emb_name = _unwrapped_name(_input_embeddings(model)[0] or "")

    def drop_tied(names: list[str]) -> list[str]:
        names = list(names)
        for key in tied:  # (peft: the first entry naming each tied layer leaves)
            for m in names:
                if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key):
                    names.remove(m)
                    break
        return names

    if in_save:
        save = drop_tied([*modules_to_save, *([emb_name] if emb_name not in modules_to_save else [])])
        config.modules_to_save = save
        return save, set(tied), set()
    if isinstance(raw, str):
        config.target_modules = rf"(?:{raw}|^{re.escape(emb_name)}$)"
    else:
        config.target_modules = sorted(drop_tied(sorted({*raw, emb_name})))
    return modules_to_save, set(), set(tied)


def _check_weight_tying(model: nn.Module, config: LoraConfig, keys: list[str], tie_keys: list[str],
                        modules_to_tie: set[str]) -> None:
    """Refuse, before anything is wrapped, what ``ensure_weight_tying`` cannot tie."""
    emb_name, _ = _input_embeddings(model)
    if tie_keys:
        if emb_name not in keys:
            raise ValueError(f"ensure_weight_tying=True: {tie_keys} share the input embeddings' weight, but the input "
                             f"embeddings ({emb_name!r}) get no LoRA adapter here (excluded, in modules_to_save or "
                             "left out by layers_to_transform?), so there is no adapter to tie them to")
        kind, _ = init_kind(config.init_lora_weights)
        if mutates_base(config.init_lora_weights) or kind == "eva":
            raise ValueError(f"ensure_weight_tying=True with LoRA on the tied layers {tie_keys} supports "
                             "init_lora_weights True, False or 'gaussian' only (the tied factors are the input "
                             f"embeddings' adapter), got {config.init_lora_weights!r}")
        for key in tie_keys:
            module = model.get_submodule(key)
            base = module.base_layer if isinstance(module, FastLoraLinear) else module
            if not isinstance(base, nn.Linear) or _is_conv1d(base) or _is_linear4bit(base):
                raise ValueError(f"ensure_weight_tying=True: {key!r} ({type(base).__name__}) shares the input "
                                 "embeddings' weight but only an nn.Linear can carry a LoRA adapter tied to theirs")
    for key, module in model.named_modules():
        if not modules_to_tie or not key or _is_inside_lora(model, key) \
                or not any(key == m or key.endswith(f".{m}") for m in modules_to_tie):
            continue
        base = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        if not isinstance(base, nn.Linear) or _is_conv1d(base) or _is_linear4bit(base):
            # (its tied copy would be an nn.Linear: T5's / BART's encoder and decoder embed_tokens then fail in
            # every forward, as in peft)
            raise ValueError(f"ensure_weight_tying=True: {key!r} ({type(base).__name__}) shares the input "
                             "embeddings' weight but only an nn.Linear can follow their modules_to_save copy (its copy "
                             "would be an nn.Linear over their weight); set ensure_weight_tying=False to give each "
                             "layer in modules_to_save its own copy")
    for key in keys:
        if any(key == m or key.endswith(f".{m}") for m in modules_to_tie):
            raise ValueError(f"ensure_weight_tying=True: {key!r} is in target_modules but also follows the input "
                             "embeddings' modules_to_save copy (it shares their weight); leave it out of "
                             "target_modules")


# --------------------------------------------------------------------------- trainable_token_indices
_TOKEN_DELTA = ".trainable_tokens_delta."


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _declared_tied_modules(model: nn.Module) -> set[str] | None:
    """The modules whose weight transformers 5 declares tied (the keys of the models' ``_tied_weights_keys`` dicts,
    submodels' included, as peft collects them); None where the model declares no such dict."""
    if not isinstance(getattr(model, "_tied_weights_keys", None), dict):
        return None
    names = set()
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, dict):
            names.update(f"{prefix}.{k}".lstrip(".").rsplit(".", 1)[0] for k in keys)
    return names


def _plan_trainable_tokens(model: nn.Module, config: LoraConfig, lora_keys: list[str],
                           modules_to_save: list[str]) -> list[tuple[str, list[int], str | None]]:
    """What ``config.trainable_token_indices`` wraps, as peft: ``(module name, ids, None)`` for each layer whose rows
    train and ``(head name, ids, embeddings name)`` for each head tied to the input embeddings that follows them.
    Everything is checked (targets found, layer types, ids in range, no clash with LoRA or modules_to_save) before
    anything is wrapped."""
    tti = config.trainable_token_indices
    if tti is None:
        return []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_name = next((n for n, m in model.named_modules() if m is embeddings and n), None) if embeddings is not None \
        else None
    wanted = dict(tti) if isinstance(tti, dict) else {emb_name or "embed_tokens": list(tti)}
    for key in wanted:
        if any(_name_matches(key, m) or m == key for m in modules_to_save):
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{key}", ...]` or `trainable_tokens={{\'{key}\': x}}` but '
                             "not both.")
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n and ".token_adapter" not in n
             and not _is_inside_lora(model, n)]
    resolved: dict[str, tuple[list[int], str]] = {}
    for key, ids in wanted.items():
        found = [n for n in names if _name_matches(n, key)]
        if not found:
            raise NoMatchingPeftModuleError(f"Target modules {{{key!r}}} not found in the base model "
                                            "(trainable_token_indices). Please check the target modules and try "
                                            "again.")
        for name in found:
            resolved[name] = (ids, key)
    # the heads tied to the input embeddings (computed before anything is wrapped)
    weights_tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    emb_weight = _frozen_weight(embeddings)
    tied_names = []
    if weights_tied and emb_weight is not None:
        declared = _declared_tied_modules(model)
        for n, m in model.named_modules():
            if not n or m is embeddings or ".token_adapter" in n:
                continue
            if isinstance(m, TrainableTokensWrapper) and m.is_tied:
                tied_names.append(n)
            elif isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is emb_weight \
                    and (declared is None or n in declared):
                # (T5's and Marian's encoder/decoder embed_tokens too: embeddings of their own over the shared
                # weight; as peft, the layers transformers declares tied, not the weight's holder, Marian's "shared")
                tied_names.append(n)
            elif _is_lora_layer(m) and getattr(getattr(m, "base_layer", None), "weight", None) is emb_weight:
                tied_names.append(n)
    # peft: several targets that are the tied pair with the same ids -> the head just follows the embeddings
    skip, mismatch = set(), False
    if len(resolved) > 1 and weights_tied:
        pair = [n for n in resolved if n == emb_name or n in tied_names]
        if len(pair) >= 2:
            mismatch = not all(resolved[n][0] == resolved[pair[0]][0] for n in pair[1:])
            if mismatch and config.ensure_weight_tying:  # peft's error
                info = ", ".join(f"{resolved[n][1]}: {resolved[n][0]}" for n in pair)
                raise ValueError("Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {info}. Please use the same indices for all tied "
                                 "layers or set ensure_weight_tying=False.")
            if not mismatch:
                skip = set(pair) & set(tied_names)
    if config.ensure_weight_tying and not weights_tied:  # peft's warning
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.", stacklevel=4)
    plan = []
    for name, (ids, _key) in resolved.items():
        if name in skip:
            continue
        module = model.get_submodule(name)
        if name in lora_keys or _is_lora_layer(module) or isinstance(module, (ModulesToSaveWrapper,)):
            kind = "lora.Embedding" if isinstance(module, nn.Embedding) or isinstance(module, FastLoraEmbedding) \
                else type(module).__name__
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {kind} ({name!r} is also "
                            "adapted by LoRA or modules_to_save)")
        base = module.original_module if isinstance(module, TrainableTokensWrapper) else module
        if isinstance(module, TrainableTokensWrapper) and module.is_tied:
            raise ValueError(f"{name!r} follows the input embeddings' trainable tokens (tied weights); give the "
                             "indices to the input embeddings instead")
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(base)}")
        if isinstance(base, nn.Linear) and base.bias is not None:
            raise ValueError(f"trainable_token_indices on {name!r}: an nn.Linear with a bias is not supported (peft's "
                             "token layer computes it without its bias)")
        check_token_indices(ids, base.weight.shape[0], repr(name))
        plan.append((name, list(ids), None))
    if weights_tied and not mismatch and emb_name is not None and any(n == emb_name for n, _, _ in plan):
        for n in tied_names:
            m = model.get_submodule(n)
            if _is_lora_layer(m) or n in lora_keys:
                raise ValueError(f"{n!r} shares its weight with the input embeddings (tie_word_embeddings=True) and is "
                                 "adapted by LoRA; trainable_token_indices on the embeddings cannot be tied to it. "
                                 "Leave it out of target_modules or untie the embeddings.")
            if isinstance(m, ModulesToSaveWrapper) or any(_name_matches(n, k) or n == k for k in modules_to_save):
                # (peft nests its modules_to_save wrapper inside the token wrapper: a head both fully trained and
                # following the embeddings' rows)
                raise ValueError(f"{n!r} shares its weight with the input embeddings (tie_word_embeddings=True) and is "
                                 "in modules_to_save (a trained copy of the whole layer); trainable_token_indices on "
                                 "the embeddings cannot be tied to it. Leave it out of modules_to_save or untie the "
                                 "embeddings.")
            plan.append((n, [], emb_name))
    return plan


def _wrap_trainable_tokens(model: nn.Module, adapter_name: str, plan: list[tuple[str, list[int], str | None]],
                           autocast_adapter_dtype: bool = True) -> None:
    """Carry out ``_plan_trainable_tokens``: wrap (or add ``adapter_name`` to the wrapper of) each layer, then tie the
    heads to the input embeddings' token layer. ``autocast_adapter_dtype``: rows of an fp16/bf16 layer in fp32."""
    for name, ids, tied_to in plan:
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensWrapper):
            module.update(adapter_name, ids, autocast_adapter_dtype=autocast_adapter_dtype)
            continue
        tied = model.get_submodule(tied_to).token_adapter if tied_to is not None else None
        parent, child = parent_of(model, name)
        setattr(parent, child, TrainableTokensWrapper(module, adapter_name, ids, tied_adapter=tied,
                                                      autocast_adapter_dtype=autocast_adapter_dtype))


# --------------------------------------------------------------------------- target_parameters
_PARAM_REFUSED = (("lora_dropout", "lora_dropout != 0"), ("fan_in_fan_out", "fan_in_fan_out"),
                  ("lora_bias", "lora_bias=True"), ("use_dora", "use_dora=True"))


def _strip_base_layer(name: str) -> str:
    """``name`` without its ``.base_layer`` parts (the path of the module as it was before wrapping)."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def _match_parameters(tuner: LoraModel, model: nn.Module, config: LoraConfig, adapter_name: str,
                      module_keys: list[str]) -> list[tuple[str, str, str]]:
    """(module path to wrap at, parameter name, ``<unwrapped path>.<parameter>``) for every parameter
    ``config.target_parameters`` names (peft's matching: the key itself or its dot-separated tail), in module
    order; raises, before anything is wrapped, on what peft refuses."""
    wanted = config.target_parameters
    if not wanted:
        return []
    for other_name, other in tuner.peft_config.items():  # peft's rule for several adapters
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != set(wanted):
            raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the "
                             f"same set of parameters, but got {sorted(set(wanted))} for the new adapter and "
                             f"{sorted(set(theirs))} for adapter '{other_name}'.")
    found = []
    for module_name, module in list(model.named_modules()):
        if isinstance(module, FastLoraParamWrapper):
            continue
        unwrapped = _strip_base_layer(module_name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{unwrapped}.{param_name}"
            if not (key in wanted or any(key.endswith(f".{t}") for t in wanted)):
                continue
            if module_name == "":
                raise ValueError("Targeting an nn.Parameter on the top-level module is not supported (parameter "
                                 f"'{param_name}'). ")
            holder = model.get_submodule(unwrapped)
            if isinstance(holder, _MODULE_LORA_LAYERS) or unwrapped in module_keys:
                raise ValueError(f"Trying to wrap an `nn.Parameter` of layer '{unwrapped}' of type "
                                 f"{type(module).__name__}, which is not a valid target. Make sure that this layer "
                                 "is not also targeted with `target_modules`. For some models, PEFT will do this "
                                 "automatically, try setting `target_modules=[]` to prevent it.")
            if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4", "Params4bit") \
                    or type(getattr(module, param_name)).__name__ == "Params4bit":
                raise ValueError(f"target_parameters: {key!r} is a 4-bit parameter; fastpeft adapts full-precision "
                                 "parameters only (use peft for this adapter)")
            found.append((module_name, param_name, key))
    if found:
        # peft resets fan_in_fan_out to False on the first nn.Linear of target_modules, before the parameters
        linear_first = any(isinstance(model.get_submodule(k), (nn.Linear, FastLoraLinear)) for k in module_keys)
        for field_name, what in _PARAM_REFUSED:
            if field_name == "fan_in_fan_out" and linear_first:
                continue
            if getattr(config, field_name, False):
                raise ValueError(f"lora.ParamWrapper does not work with {what}.")
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported by fastpeft with "
                             "target_parameters (supported: True, False, 'gaussian'); use peft for this adapter")
    return found


def _wrap_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, found: list[tuple[str, str, str]],
                     autocast_adapter_dtype: bool) -> None:
    """Wrap the parameters ``_match_parameters`` found, as peft nests them: a parameter already wrapped for another
    adapter gets the new adapter on its wrapper, a further parameter of the same module wraps the module's current
    wrapper."""
    for module_name, param_name, key in found:
        r_key = _pattern_key(config.rank_pattern, key)
        a_key = _pattern_key(config.alpha_pattern, key)
        kw = dict(r=config.rank_pattern[r_key] if r_key else config.r,
                  lora_alpha=config.alpha_pattern[a_key] if a_key else config.lora_alpha,
                  init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                  autocast_adapter_dtype=autocast_adapter_dtype)
        existing = model.get_submodule(_strip_base_layer(module_name))
        while isinstance(existing, FastLoraParamWrapper) and existing.parameter_name != param_name:
            existing = existing.base_layer
        if isinstance(existing, FastLoraParamWrapper):
            existing.update_layer(adapter_name, **kw)
            continue
        target = model.get_submodule(module_name)
        parent, child = parent_of(model, module_name)
        setattr(parent, child, FastLoraParamWrapper(target, param_name, adapter_name=adapter_name, **kw))


def _frozen_weight(module: nn.Module | None) -> torch.Tensor | None:
    """The weight ``module`` holds underneath fastpeft's wrappers: a ``modules_to_save`` / trainable-tokens
    wrapper's original module, a LoRA layer's base layer (what weight tying shares; reading ``.weight`` through a
    ``ModulesToSaveWrapper`` gives the active adapter's copy, as in peft)."""
    while module is not None:
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
            module = module.original_module
        elif "base_layer" in getattr(module, "_modules", {}):
            module = module._modules["base_layer"]
        else:
            return getattr(module, "weight", None)
    return None


def _shares_input_embeddings(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``layer``'s base weight is the very parameter of ``model``'s input embeddings (a tied head; never
    the input embeddings' own LoRA layer)."""
    if isinstance(layer, FastLoraEmbedding):
        return False
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return False
    shared = _frozen_weight(embeddings)
    return shared is not None and _frozen_weight(layer) is shared


def _embeddings_first(layers) -> list:
    """(name, layer) pairs with the LoRA embedding layers first (a tied head merges after its embeddings)."""
    layers = list(layers)
    return [x for x in layers if isinstance(x[1], FastLoraEmbedding)] + \
        [x for x in layers if not isinstance(x[1], FastLoraEmbedding)]


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _tied_to_embeddings(model: nn.Module, layer: nn.Module) -> set[str]:
    """The adapters of ``layer`` (a LoRA linear head sharing the input embeddings' weight) whose factors are the
    input embeddings' LoRA factors' memory (``ensure_weight_tying``); empty for any other layer."""
    if not isinstance(layer, FastLoraLinear) or not _shares_input_embeddings(model, layer):
        return set()
    emb = _input_embeddings(model)[1]
    if not isinstance(emb, FastLoraEmbedding):
        return set()
    return {n for n in layer.lora_A if n in emb.lora_embedding_A
            and _same_memory(layer.lora_A[n].weight, emb.lora_embedding_B[n])
            and _same_memory(layer.lora_B[n].weight, emb.lora_embedding_A[n])}


def _output_embeddings_share(model: nn.Module, layer: nn.Module) -> bool:
    """Whether ``model``'s output embeddings (its head, LoRA-wrapped or not) hold the very parameter that is
    ``layer``'s base weight (an input embedding under ``tie_word_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return False
    weight = _frozen_weight(head)
    return weight is not None and weight is _frozen_weight(layer)


def _untie_token_rows_before_merge(model: nn.Module, adapter_names: list[str] | None
                                   ) -> list[tuple[nn.Module, nn.Parameter, list]]:
    """Before ``trainable_token_indices`` rows are merged: a token layer with rows of its own whose weight another
    layer also computes with (a tied embeddings / head pair given different ids per half, peft's dict form, or a
    tied head left unwrapped) gets its own copy of the weight first, and the model's config stops tying them, so
    the merged model computes what the adapter model did (peft writes both row sets into the one shared weight,
    giving each layer the other's rows). The head side is untied first: the input embeddings keep their weight.
    A head tied to the embeddings' token layer (the same rows) stays tied. Returns what ``unmerge_adapter``
    needs to tie them again: ``(layer, its shared weight, the configs set to untied)`` for each layer untied."""
    undo: list[tuple[nn.Module, nn.Parameter, list]] = []
    wrappers = [(k, w) for k, w in named_modules_of(model, TrainableTokensWrapper) if not w.is_tied]
    embeddings = _input_embeddings(model)[1]
    wrappers.sort(key=lambda kw: kw[1] is embeddings)
    for key, wrapper in wrappers:
        layer = wrapper.token_adapter
        names = [n for n in (layer.active_adapters if adapter_names is None else adapter_names)
                 if n in layer.trainable_tokens_delta and n not in layer.merged_adapters]
        if not names:
            continue
        base, weight = layer.base_layer, layer.base_layer.weight
        followers = {id(w.token_adapter.base_layer) for _, w in named_modules_of(model, TrainableTokensWrapper)
                     if w.token_adapter.tied_adapter is layer}
        sharers = sorted({_unwrapped_name(n) for n, m in model.named_modules(remove_duplicate=False)
                          if m is not base and id(m) not in followers and m._parameters.get("weight") is weight
                          and not {"original_module", "modules_to_save"} & set(n.split("."))})
        if not sharers:
            continue
        base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        undo.append((base, weight, _untie_config_if_untied(model)))
        warnings.warn(f"{key} shared its weight with {sharers} (tie_word_embeddings=True) but has trainable tokens "
                      "of its own; it has its own copy now, so merging its tokens leaves them as they were "
                      "(config.tie_word_embeddings is now False; unmerge_adapter ties them again)", stacklevel=3)
    return undo


def _untie_config_if_untied(model: nn.Module) -> list:
    """``tie_word_embeddings=False`` in ``model``'s config when its output embeddings no longer share the input
    embeddings' weight (as peft's merge sets it), so that the saved config describes the weights. Returns the
    configs it changed."""
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if inputs is None or outputs is None or _frozen_weight(outputs) is _frozen_weight(inputs):
        return []
    config = getattr(model, "config", None)
    changed = []
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
            changed.append(cfg)
    return changed


def _requantization_summary():
    """One warning for all 4-bit layers a model-wide merge re-quantizes (see ``layers.lora4bit``)."""
    try:
        from .layers.lora4bit import requantization_summary
    except ImportError:  # pragma: no cover - depends on the 4-bit layer being present
        return contextlib.nullcontext()
    return requantization_summary()


def _refuse_alora_targets(model: nn.Module, keys: list[str], config: LoraConfig) -> None:
    """Raise ValueError if an aLoRA config targets something other than linear layers (embeddings, convolutions,
    ``target_parameters``), as peft refuses the variant there."""
    for key in keys:
        module = model.get_submodule(key)
        if isinstance(module, (nn.Embedding, FastLoraEmbedding, FastLoraConv)) or is_plain_conv(module):
            raise ValueError(f"aLoRA (alora_invocation_tokens) adapts linear layers only, as in peft; {key!r} is "
                             f"{type(module).__name__}: drop it from target_modules or use a plain LoRA adapter")
    if config.target_parameters:
        raise ValueError("aLoRA (alora_invocation_tokens) cannot be combined with target_parameters, as in peft")


def _wrap_4bit(module: nn.Module, adapter_name: str, kw: dict[str, Any]) -> nn.Module:
    try:
        from .layers.lora4bit import FastLoraLinear4bit
    except ImportError as exc:  # pragma: no cover - depends on the 4-bit layer being present
        raise ValueError(f"bitsandbytes Linear4bit targets need fastpeft's 4-bit layer: {exc}") from exc
    return FastLoraLinear4bit.from_linear(module, adapter_name=adapter_name, **kw)


class _CheckedAdapterNames(list):
    """adapter_names checked against the whole model: a layer lacking one of them uses its base for it.
    ``rows_cache`` holds the sorted rows the layers share (see ``FastLoraLinear._mixed_batch_forward``)."""

    _fastpeft_model_checked = True

    def __init__(self, names=()):
        super().__init__(names)
        self.rows_cache: dict = {}


def adapter_folders(model: nn.Module, save_directory: str | os.PathLike,
                    selected_adapters: list[str] | None) -> list[tuple[str, str]]:
    """``(adapter name, folder)`` for each adapter ``save_pretrained`` writes (``selected_adapters``, default all):
    peft's layout, ``"default"`` in ``save_directory`` and the others in ``save_directory/<name>``. Raises
    ValueError for a path that is a file or a name the model lacks."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"cannot save unknown adapter(s) {unknown}; this model has {list(model.peft_config)}")
    return [(name, os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name))
            for name in names]


def _checked_adapter_names(model: nn.Module, adapter_names: list[str], repeat: int) -> _CheckedAdapterNames:
    """``adapter_names`` checked against the whole model (peft's checks: a list of str naming adapters some layer
    holds, no DoRA adapter among them; none at all on a model with trainable tokens or ``target_parameters``), each
    repeated ``repeat`` times; ``.unexpanded`` holds them as given (an encoder's input during beam search)."""
    if not isinstance(adapter_names, (str, list, tuple)) and hasattr(adapter_names, "__len__") \
            and hasattr(adapter_names, "__iter__"):
        adapter_names = list(adapter_names)  # a numpy array of names, say (peft takes one too)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) \
            or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    adapter_names = [str(n) for n in adapter_names]  # (numpy's str_ as plain str)
    layers = [m for m in model.modules() if isinstance(m, _LORA_LAYERS)]
    if any(isinstance(m, TrainableTokensWrapper) for m in model.modules()):
        raise ValueError("fastpeft does not support mixed adapter batches (adapter_names) on a model with "
                         "trainable_token_indices; use peft for this")
    if any(isinstance(m, FastLoraParamWrapper) for m in layers):  # as peft
        raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet (this model has adapters "
                         "on target_parameters).")
    existing = sorted({n for layer in layers for n in adapters_of(layer)})
    unknown = sorted({n for n in adapter_names if n != "__base__"} - set(existing))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                         f"adapters {existing} (and '__base__' for the base model alone)")
    dora = sorted({n for layer in layers for n, on in layer.use_dora.items() if on and n in adapter_names})
    if dora:  # as peft: mixed batches are LoRA-only
        raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapter(s) {dora}).")
    names = _CheckedAdapterNames(n for n in adapter_names for _ in range(repeat))
    names.unexpanded = _CheckedAdapterNames(adapter_names)
    return names


@contextlib.contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: list[str] | None, expand: int = 1,
                        alora_offsets: list[int | None] | None = None):
    """Inside the block every fastpeft LoRA layer of ``model`` gets ``adapter_names`` (one adapter per
    sequence, ``"__base__"`` for none; peft's mixed-batch argument) and ``alora_offsets`` (one per sequence:
    how many of its last tokens aLoRA adapters act on, see ``fastpeft.alora``), either may be None.

    ``expand`` repeats each entry (beam search / several returned sequences in ``generate``); an
    encoder, if any, keeps the unexpanded names. Unknown names raise, listing the adapters that exist.

    modules_to_save wrappers run each group of rows through that adapter's copy. Under transformers'
    gradient checkpointing (``gradient_checkpointing_enable()``) the blocks replayed in backward see the
    same names and offsets; a ``torch.utils.checkpoint`` call of your own must run inside this block's scope,
    or call the layers with ``adapter_names`` / ``alora_offsets`` itself.
    """
    if adapter_names is None and alora_offsets is None:
        yield
        return
    repeat = max(1, int(expand))
    installs: list[tuple[str, Any, tuple]] = []  # (attribute, value, the kinds of module that take it)
    encoder_installs: list[tuple[str, Any, tuple]] = []
    if adapter_names is not None:
        names = _checked_adapter_names(model, adapter_names, repeat)
        installs.append(("_fastpeft_adapter_names", names, (*_LORA_LAYERS, ModulesToSaveWrapper)))
        encoder_installs.append(("_fastpeft_adapter_names", names.unexpanded, _LORA_LAYERS))
    if alora_offsets is not None:
        offsets = check_alora_offsets(alora_offsets)
        # (only linear layers hold aLoRA adapters)
        installs.append(("_fastpeft_alora_offsets", [o for o in offsets for _ in range(repeat)], (FastLoraLinear,)))
        encoder_installs.append(("_fastpeft_alora_offsets", offsets, (FastLoraLinear,)))

    def install(root: nn.Module, what=installs) -> list:
        return [_install_attribute(root, attr, value, kinds) for attr, value, kinds in what]

    handles = install(model)
    # transformers' gradient checkpointing replays each block in backward, after this block has removed the
    # hooks: wrap each block's checkpoint function so that the replay installs them again.
    swapped = []
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if module.__dict__.get("gradient_checkpointing") is True and callable(func):
            module._gradient_checkpointing_func = _replaying_checkpoint(func, module, install)
            swapped.append((module, func))
    get_encoder = getattr(model, "get_encoder", None)
    encoder = None
    if repeat > 1 and callable(get_encoder):
        with contextlib.suppress(Exception):
            encoder = get_encoder()
    if isinstance(encoder, nn.Module) and encoder is not model:
        handles += install(encoder, encoder_installs)
    try:
        yield
    finally:
        for handle in reversed(handles):  # the encoder's names were installed over the model's
            handle.remove()
        for module, func in swapped:
            module._gradient_checkpointing_func = func


class _AttributeHandle:
    """Undoes one ``_install_attribute`` (the modules get back the values they had before)."""

    def __init__(self, saved: list, attr: str):
        self.saved = saved
        self.attr = attr

    def remove(self) -> None:
        for module, previous in reversed(self.saved):
            setattr(module, self.attr, previous)


def _install_attribute(model: nn.Module, attr: str, value: Any, kinds: tuple) -> _AttributeHandle:
    """Hand ``value`` to every module of ``model`` that is one of ``kinds`` as ``attr`` (``_fastpeft_adapter_names``
    / ``_fastpeft_alora_offsets``): each such layer called without the matching argument uses it until the returned
    handle is removed. A plain attribute rather than a forward hook, so that ``torch.compile`` traces the call whole
    (``fullgraph=True``)."""
    saved = []
    for m in model.modules():
        if isinstance(m, kinds):
            saved.append((m, getattr(m, attr, None)))
            setattr(m, attr, value)
    return _AttributeHandle(saved, attr)


def _replaying_checkpoint(checkpoint_func, block: nn.Module, install):
    """``checkpoint_func`` whose function, run again in backward, sees the same per-sequence adapters and offsets
    (``install(block)`` hands them to the block's layers and returns the handles that take them back)."""

    def checkpoint(function, *args, **kwargs):
        def replay(*a, **k):
            handles = install(block)
            try:
                return function(*a, **k)
            finally:
                for handle in handles:
                    handle.remove()

        return checkpoint_func(replay, *args, **kwargs)

    return checkpoint


def _generate_setting(model: nn.Module, kwargs: dict, name: str) -> int:
    """``generate``'s integer setting ``name`` (``num_beams``, ``num_return_sequences``): the call's keyword, else the
    generation config's (the call's ``generation_config``, else the model's), 1 when unset."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return int(kwargs.get(name, getattr(cfg, name, 1)) or 1)


def _generate_expand(model: nn.Module, kwargs: dict) -> int:
    """How many rows ``generate`` makes of each input sequence (beams, or returned samples)."""
    beams = _generate_setting(model, kwargs, "num_beams")
    return beams if beams > 1 else _generate_setting(model, kwargs, "num_return_sequences")


def positional_as_keywords(peft_model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``forward``'s positional arguments as keywords, named as peft's task class of ``peft_model`` names its
    ``forward`` parameters (``PeftModelForCausalLM``: input_ids, attention_mask, inputs_embeds, labels, ...), so
    that they reach the wrapped model by name, as in peft. A plain ``PeftModel`` (peft's ``forward(*args,
    **kwargs)``) passes them on as they are. Too many positionals, or one also given by keyword, raise peft's
    ``TypeError``; a positional ``task_ids=None`` is dropped."""
    names = getattr(type(peft_model), "_peft_forward_params", None)
    if not args or names is None:
        return args, kwargs
    where = f"{type(peft_model).__name__}.forward()"
    if len(args) > len(names):
        raise TypeError(f"{where} takes from 1 to {len(names) + 1} positional arguments but {len(args) + 1} were "
                        "given")
    mapped = dict(zip(names, args))
    for name in mapped:
        if name in kwargs:
            raise TypeError(f"{where} got multiple values for argument '{name}'")
    if "task_ids" in mapped and mapped["task_ids"] is None:
        del mapped["task_ids"]
    return (), {**mapped, **kwargs}


class _ForwardProxy:
    """``PeftModel.forward``: runs the wrapped module (hooks included) and reports that module's signature."""

    __slots__ = ("module", "peft_model")

    def __init__(self, module: nn.Module, peft_model: nn.Module):
        self.module = module
        self.peft_model = peft_model

    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        model = self.peft_model
        args, kwargs = positional_as_keywords(model, args, kwargs)
        offsets = alora_offsets_for_call(model.peft_config, model.active_adapters, args, kwargs, adapter_names)
        with mixed_adapter_batch(self.module, adapter_names, alora_offsets=offsets):
            return self.module(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.module.forward)


def _class_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
    """``PeftModel.forward`` as seen on the class (transformers' ``find_labels`` reads ``labels`` here)."""
    return self.forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        labels=labels, **kwargs)


class _ForwardDescriptor:
    """``PeftModel.forward``: on an instance, a proxy calling the wrapped model with the wrapped model's signature
    (so transformers' Trainer keeps the dataset columns the model accepts, as for peft models); on the class, a
    plain function whose parameters name ``labels``."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return _class_forward
        return _ForwardProxy(obj.base_model.model, obj)


# --------------------------------------------------------------------------- the user-facing wrapper
def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of ``module``, counted as peft counts them: a packed 4-bit weight
    (bitsandbytes' ``Params4bit``, and fastpeft's own ``quant.Linear4bit`` bytes, which carry a ``quant_state``) as
    the number of 4-bit values it holds, a DeepSpeed-partitioned one by its ``ds_numel``."""
    trainable, total = 0, 0
    for param in module.parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):
            n = param.ds_numel
        if type(param).__name__ == "Params4bit":  # two 4-bit values per byte of whatever dtype stores them
            if hasattr(param, "element_size"):
                n *= 2 * param.element_size()
            else:
                storage = getattr(param, "quant_storage", None)
                n *= 2 * (torch.empty(0, dtype=storage).element_size() if storage is not None else 1)
        elif param.dtype == torch.uint8 and getattr(param, "quant_state", None) is not None:
            n *= 2  # fastpeft's packed NF4/FP4/int4 bytes: two 4-bit values each
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


class PeftModel(nn.Module):
    """A transformers model with fastpeft LoRA adapters, with peft's ``PeftModel`` API.

    Build one with :func:`get_peft_model` or :meth:`PeftModel.from_pretrained`. Attributes not found here
    (``config``, ``generate``'s helpers, ``gradient_checkpointing_enable``, …) come from the wrapped model.
    """

    def __new__(cls, *args, **kwargs):
        _let_transformers_trainer_see_fastpeft()
        config = from_peft_lora_config(args[1] if len(args) > 1 else kwargs.get("peft_config"))
        target = cls
        if config is not None and not isinstance(config, LoraConfig):
            # as peft's PeftModel(model, config) / PeftModelForCausalLM(model, config): any method's config
            from .tasks import is_dispatching_class, model_class_for

            if cls is PeftModel:  # peft's PeftModel(...) is no task class, whatever the task type
                from .methods import _coerce_config, _method_class

                target = _method_class(_coerce_config(config))
            elif is_dispatching_class(cls):  # PeftModelForCausalLM(model, IA3Config(...)), ...
                target = model_class_for(config, task=cls)
        return super().__new__(target)

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        super().__init__()
        warn_low_cpu_mem_usage(low_cpu_mem_usage)
        peft_config = from_peft_lora_config(peft_config)
        self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        record_base_model_name(self.base_model.peft_config[adapter_name], model)

    # help(PeftModel) / inspect.signature show the constructor's parameters, not __new__'s (*args, **kwargs)
    __new__.__signature__ = inspect.signature(__init__)

    __getattr__ = delegating_getattr("base_model")
    __deepcopy__ = deepcopy_keeping_shared_memory

    # ----------------------------------------------------------------- running
    forward = _ForwardDescriptor()
    # peft's task classes name their forward parameters (see fastpeft.tasks); peft's PeftModel takes *args
    _peft_forward_params: tuple[str, ...] | None = None

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """``generate`` of the wrapped model, with the active adapters applied — or, given
        ``adapter_names`` (one per input sequence, ``"__base__"`` for none), each sequence's own adapter.
        aLoRA adapters act from their invocation in the prompt onward (offsets found in ``input_ids``, or
        ``alora_offsets=`` given), on every generated token; beam search is refused with them, as in peft.
        A ``generation_config`` assigned to this model (``peft_model.generation_config = ...``) is handed to the
        base model first, as peft's ``PeftModelForCausalLM.generate`` does."""
        model = self.base_model.model
        use_own_generation_config(self, model)
        settings = kwargs
        if len(args) > 1 and "generation_config" not in kwargs:  # generate(inputs, generation_config, ...)
            settings = {**kwargs, "generation_config": args[1]}
        expand = _generate_expand(model, settings)
        offsets = alora_offsets_for_call(self.peft_config, self.active_adapters, args, kwargs, adapter_names)
        if offsets is not None and _generate_setting(model, settings, "num_beams") > 1:  # peft's refusal
            raise ValueError("Beam search not yet supported for aLoRA.")
        with mixed_adapter_batch(model, adapter_names, expand, alora_offsets=offsets):
            return model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (fastpeft layers inside)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Each adapter's config, by adapter name."""
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names when several are active."""
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names as a list."""
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        """The config of the (first) active adapter; with none active (``set_adapter([])``), the first adapter's
        (peft then reads the last adapter ``PeftModel.set_adapter`` named)."""
        active = self.active_adapters
        return self.peft_config[active[0]] if active else next(iter(self.peft_config.values()))

    @property
    def peft_type(self) -> PeftType:
        """The active adapter's method, a ``PeftType`` as in peft (equal to ``"LORA"``, ``"IA3"``, …)."""
        return PeftType(str(getattr(self.active_peft_config, "peft_type", "LORA")))

    @property
    def modules_to_save(self) -> set[str] | None:
        """The names of the modules trained in full beside the adapters (peft's attribute), or None."""
        names = {n for cfg in self.peft_config.values() for n in (getattr(cfg, "modules_to_save", None) or [])}
        return names or None

    # ----------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as peft counts them (4-bit weights as their element count)."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: … || all params: … || trainable%: …`` (peft's wording)."""
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's ``dtype`` (peft's property), or None when it has none."""
        return getattr(self.get_base_model(), "dtype", None)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch training on (default) or off for the named adapters' weights (and modules_to_save copies),
        whether or not they are active (peft's method). Not for prompt learning, as in peft."""
        if getattr(self.active_peft_config, "is_prompt_learning", False):
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{self.active_peft_config.peft_type}.")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        setter = getattr(type(self.base_model), "set_requires_grad", None)
        if setter is None:
            raise NotImplementedError(f"set_requires_grad is not implemented for {self.peft_type} in fastpeft")
        setter(self.base_model, names, requires_grad)

    def get_layer_status(self) -> list:
        """Each adapter layer's state (peft's method; see :func:`fastpeft.get_layer_status`)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The adapters' state summed over the model (peft's method; see :func:`fastpeft.get_model_status`)."""
        from .status import get_model_status

        return get_model_status(self)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write or update ``output_dir/README.md`` as ``save_pretrained`` does (peft's method): ``library_name:
        peft``, the base model, tags; a card already there keeps its text."""
        from .hub import write_model_card

        os.makedirs(output_dir, exist_ok=True)
        write_model_card(self, output_dir)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """peft's method: unless ``model`` is quantized, make its input embeddings' output require grad (through
        transformers' ``enable_input_require_grads``, else a forward hook), so that checkpointed blocks get a
        gradient with a frozen base. Returns ``model``."""
        if not any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit",
                                                             "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Inject another adapter; the active adapter does not change (as in peft). ``autocast_adapter_dtype``
        (peft's): its weights in fp32 on an fp16/bf16 base (the default), else in the base's dtype;
        ``low_cpu_mem_usage`` is accepted (the weights are created as usual)."""
        peft_config = from_peft_lora_config(peft_config)
        warn_prefix_name(adapter_name)
        existed = adapter_name in self.peft_config
        try:
            self.base_model.inject_adapter(peft_config, adapter_name, activate=False,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
        except Exception:
            if not existed and adapter_name in self.peft_config:  # a failed add leaves no half adapter behind
                self.base_model._discard_adapter(adapter_name)
            raise
        record_base_model_name(self.peft_config[adapter_name], self.get_base_model())

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list, summed) the active adapter(s): trainable, the others frozen,
        unless ``inference_mode=True`` (peft's semantics)."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from every layer."""
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model runs without any adapter (and with original modules_to_save).
        As peft, adapters are switched back on at the exit only if they were on at the entry (a nested block, or
        one entered after ``disable_adapter_layers()``, leaves them off); some on and some off at the entry warns
        with peft's text, and all are on after the exit."""
        from .status import enabled_state

        enabled = enabled_state(self.base_model)
        if enabled == "irregular":
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", stacklevel=3)
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if enabled is not False:
                self.base_model.enable_adapter_layers()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active adapters into the base weights and return the plain transformers model."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain transformers model."""
        return self.base_model.unload()

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **kwargs) -> None:
        """Write each adapter in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

        ``state_dict=`` (peft's keyword: a full state dict gathered by the caller, as transformers' Trainer
        passes under DeepSpeed ZeRO-3 / FSDP) is read instead of the module's own parameters.

        ``path_initial_model_for_weight_conversion``: the folder where this PiSSA/OLoRA adapter was saved
        right after its initialization, before training. The adapter is then written converted, as peft
        converts it, into a plain LoRA adapter of rank 2r for the original, unmodified base:
        ``A' = [A; A0]``, ``B' = [B, −B0]`` (so ``s·B'A' = s·(BA − B0A0)``, the training's change of the
        weight), with ``r`` and ``lora_alpha`` doubled (``lora_alpha·√2`` with rsLoRA: the same scale),
        ``rank_pattern``/``alpha_pattern`` values doubled and ``init_lora_weights`` True. As peft, the
        initial folder's ``adapter_config.json`` is rewritten with ``init_lora_weights`` True. Not with
        rsLoRA plus rank/alpha patterns (peft refuses too) nor DoRA (the magnitude depends on the base).

        ``save_embedding_layers`` (peft's keyword, default ``"auto"``): with ``embed_tokens``/``lm_head`` in
        ``target_modules`` the LoRA-wrapped embeddings' base weights are written too, as peft writes them.

        The ``"default"`` adapter goes to ``save_directory``, others to ``save_directory/<name>`` (peft's
        layout). Only the adapter weights (and ``modules_to_save``, and biases per ``bias``) are written, with
        peft's model card (``README.md``: ``library_name: peft``, the base model) in ``save_directory``.
        """
        from .hub import write_model_card
        from .save import save_adapter

        for name, out in adapter_folders(self, save_directory, selected_adapters):
            if path_initial_model_for_weight_conversion is not None:
                from .save import save_converted_adapter

                save_converted_adapter(self, name, out, path_initial_model_for_weight_conversion,
                                       safe_serialization=safe_serialization, write=is_main_process,
                                       state_dict=kwargs.get("state_dict"))
                continue
            # Every rank gathers (FSDP2-sharded weights need all ranks, as in peft); only the main one writes.
            save_adapter(self, name, out, safe_serialization=safe_serialization, write=is_main_process,
                         state_dict=kwargs.get("state_dict"),
                         save_embedding_layers=save_embedding_layers)
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            write_model_card(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                    safe_serialization: bool = True, selected_adapters: list[str] | None = None) -> Any:
        """Upload the adapter(s) to the Hub repo ``repo_id`` (created if missing), as peft's ``push_to_hub``:
        what :meth:`save_pretrained` writes (adapter files, model card with ``tags`` added), never the base
        model's weights. Everything after ``repo_id`` is keyword-only, in peft's order (transformers' signature);
        ``max_shard_size`` is accepted for that signature (an adapter is one file); ``safe_serialization`` and
        ``selected_adapters`` (fastpeft's) go to :meth:`save_pretrained`. Returns huggingface_hub's commit info."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                           revision=revision, create_pr=create_pr, safe_serialization=safe_serialization,
                           selected_adapters=selected_adapters, commit_description=commit_description, tags=tags)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        allow_pickle: bool = False, **kwargs) -> PeftModel:
        """Load a peft-format adapter onto ``model``: a local folder or a Hub repo id (peft's keywords
        ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``; see :mod:`fastpeft.hub`).
        Safetensors; pickles only with ``allow_pickle``. Non-LoRA adapters go to their method's model.
        Parameters in peft's order. ``autocast_adapter_dtype=False`` (LoRA): the adapter weights stay in the
        base's dtype (peft's argument). ``key_mapping`` (peft's): ``{regex: replacement}`` applied to the saved
        keys (without their ``base_model.model.`` prefix) before loading; None takes the model's
        ``_checkpoint_conversion_mapping`` if it has one, as peft (not for prompt learning).
        ``ignore_mismatched_sizes=True`` (peft's keyword): tensors whose shape differs from the model's (e.g. a
        ``config`` with another ``r``) are skipped with peft's warning instead of refused.
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted and change nothing here."""
        from .hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs

        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        config = from_peft_lora_config(config)
        if config is not None and not isinstance(config, LoraConfig):
            from . import methods

            peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
            return methods.from_pretrained(model, model_id, peft_type, adapter_name=adapter_name,
                                           is_trainable=is_trainable, config=config, key_mapping=key_mapping,
                                           allow_pickle=allow_pickle, **kwargs)
        if config is None:
            peft_type = _saved_peft_type(model_id)
            if peft_type != "LORA":
                from . import methods

                return methods.from_pretrained(model, model_id, peft_type, adapter_name=adapter_name,
                                               is_trainable=is_trainable, key_mapping=key_mapping,
                                               allow_pickle=allow_pickle, **kwargs)
        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        config = LoraConfig.from_pretrained(model_id) if config is None else copy.deepcopy(config)
        config.inference_mode = not is_trainable
        # The init runs as in training (the saved A and B then replace its adapter weights): for PiSSA it is
        # what turns the base into the residual W - scale·B0·A0 the adapter was trained on, as in peft.
        from .tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        # as peft: the task type's class (PeftModelForCausalLM, ...), else the class this was called on
        peft_model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type or "", cls)(
            model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        from .save import load_adapter_weights

        load_adapter_weights(peft_model, model_id, adapter_name, allow_pickle=allow_pickle, key_mapping=key_mapping,
                             ignore_mismatched_sizes=kwargs.pop("ignore_mismatched_sizes", False))
        warn_unused_kwargs("PeftModel.from_pretrained", kwargs)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, allow_pickle: bool = False, **kwargs):
        """Load a peft-format adapter under ``adapter_name``, as peft does: a new name is added (not
        activated; trainable with ``is_trainable=True``), an existing one gets the saved weights (how
        transformers' Trainer resumes from a checkpoint). Without ``is_trainable`` the model is put in
        eval mode. Returns the load result (no missing or unexpected keys: loading is strict). ``model_id``: a
        local folder or a Hub repo id, with peft's Hub keywords (see :meth:`from_pretrained`). Parameters in
        peft's order: ``autocast_adapter_dtype`` as for :meth:`add_adapter` (a new adapter); ``key_mapping``
        (peft's): ``{regex: replacement}`` applied to the saved keys (without their ``base_model.model.`` prefix);
        ``torch_device``, ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted and change nothing
        (the weights are copied into the adapter's own tensors, where they are); ``ignore_mismatched_sizes=True``
        (peft's keyword) skips mis-shaped tensors with peft's warning."""
        from torch.nn.modules.module import _IncompatibleKeys

        from .hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs
        from .save import load_adapter_weights

        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))

        if adapter_name not in self.peft_config:
            config = LoraConfig.from_pretrained(model_id)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
            if is_trainable:
                self.base_model.set_requires_grad(adapter_name, True)
        load_adapter_weights(self, model_id, adapter_name, allow_pickle=allow_pickle, key_mapping=key_mapping,
                             ignore_mismatched_sizes=kwargs.pop("ignore_mismatched_sizes", False))
        warn_unused_kwargs("PeftModel.load_adapter", kwargs)
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    def _load_adapter_state(self, saved: dict[str, torch.Tensor], adapter_name: str, where: str,
                            ignore_mismatched_sizes: bool = False) -> None:
        """Copy tensors under peft's saved names into adapter ``adapter_name``, strictly (errors name ``where``;
        mis-shaped tensors skipped with a warning under ``ignore_mismatched_sizes``; each method's model has its
        own: ``fastpeft.set_peft_model_state_dict`` calls it)."""
        from .save import load_adapter_state

        load_adapter_state(self, saved, adapter_name, where, ignore_mismatched_sizes)


def _let_transformers_trainer_see_fastpeft() -> None:
    """Make transformers' ``Trainer`` — and trainers built on it that ask accelerate, such as TRL's
    ``SFTTrainer`` — treat fastpeft models as they treat peft's.

    transformers' Trainer saves checkpoints and ``save_model`` through ``save_pretrained`` (adapter files),
    resumes with ``load_adapter`` and reads the wrapped model's signature only for instances of peft's
    ``PeftModel``: an ``isinstance`` against the name ``PeftModel`` in ``transformers.trainer`` and
    ``transformers.trainer_utils``. Anything else gets the whole state dict written as ``model.safetensors``
    (which fails outright for models with tied embeddings). With peft installed, the name is widened to
    the tuple (peft's class, fastpeft's ``PeftModel``), which ``isinstance`` accepts; peft's own models are
    recognized as before.

    TRL asks ``accelerate.utils.is_peft_model`` instead (``isinstance`` against peft's class, imported
    inside the function), and for a model it does not recognize it patches its fused LM head onto the
    wrapper itself, whose ``base_model`` is the ``LoraModel``, not the transformer backbone the head needs
    (the first training step fails), and it skips ``enable_input_require_grads`` under gradient
    checkpointing. With peft installed, accelerate's public ``is_peft_model`` is replaced by one that also
    accepts fastpeft models (see :func:`_widen_is_peft_model`).

    Called whenever a fastpeft model is created: modules already imported are widened at once, and an
    import hook widens them when they are imported later (transformers imports them lazily, e.g. at the
    first ``transformers.Trainer``). Without peft installed neither library recognizes either kind of model.
    """
    import sys

    for module_name, widen in _WIDENERS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            widen(module)
    if not any(isinstance(finder, _TrainerImportHook) for finder in sys.meta_path) \
            and not all(name in sys.modules for name in _WIDENERS):
        sys.meta_path.insert(0, _TrainerImportHook())


def _widen_peft_model_name(module) -> None:
    current = getattr(module, "PeftModel", None)
    if current is None:  # peft not installed: transformers did not import the name
        return
    classes = current if isinstance(current, tuple) else (current,)
    if PeftModel not in classes:
        module.PeftModel = (*classes, PeftModel)


def _widen_is_peft_model(module) -> None:
    """Replace ``accelerate.utils.is_peft_model`` (``module``) by a function that returns what it returned and,
    where peft is installed, also True for a fastpeft model (unwrapped from DDP / ``torch.compile`` /
    DeepSpeed by accelerate's ``extract_model_from_parallel`` as the original does).

    Modules that import the name after this (TRL's trainers are imported lazily, at the first
    ``trl.SFTTrainer``) get the widened function. Modules that imported it before hold the original by
    name: those outside accelerate are rebound once, here, so the import order of TRL and fastpeft does
    not matter. accelerate's own modules (its FSDP state-dict helpers, which call peft's state-dict
    functions on what they recognize) keep the original.
    """
    import importlib.util
    import sys
    import types

    original = getattr(module, "is_peft_model", None)
    if original is None or getattr(original, "_fastpeft_widened", False):
        return
    if importlib.util.find_spec("peft") is None:  # TRL imports peft's classes on its peft paths
        return

    def is_peft_model(model) -> bool:
        if original(model):
            return True
        from accelerate.utils import extract_model_from_parallel

        return isinstance(extract_model_from_parallel(model), PeftModel)

    is_peft_model.__doc__ = original.__doc__
    is_peft_model.__wrapped__ = original
    is_peft_model._fastpeft_widened = True
    module.is_peft_model = is_peft_model
    for name, other in list(sys.modules.items()):
        if not isinstance(other, types.ModuleType) or name == "accelerate" or name.startswith("accelerate."):
            continue
        if other.__dict__.get("is_peft_model") is original:
            other.is_peft_model = is_peft_model


_WIDENERS = {"transformers.trainer": _widen_peft_model_name, "transformers.trainer_utils": _widen_peft_model_name,
             "accelerate.utils": _widen_is_peft_model}


class _TrainerImportHook:
    """A ``sys.meta_path`` finder that lets the usual finders find the modules in ``_WIDENERS`` and wraps
    their loader so that the module's widener runs right after the module is executed."""

    def find_spec(self, name, path=None, target=None):
        import sys

        if name not in _WIDENERS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WideningLoader(spec.loader, _WIDENERS[name])
                return spec
        return None


class _WideningLoader:
    """Loader wrapper: the wrapped loader's module, then ``widen`` on it."""

    def __init__(self, loader, widen):
        self.loader = loader
        self.widen = widen

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.widen(module)

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self.loader, name)


def _saved_peft_type(model_id: str | os.PathLike) -> str:
    from .config import read_config_dict

    return str(read_config_dict(model_id).get("peft_type") or "LORA")


def _rename_base_model(config: Any, model: nn.Module) -> None:
    """peft's ``get_peft_model``: the config records the model it is applied to (its ``name_or_path``, None for a
    model without one), replacing any other name there, with peft's warning (a config taken from another adapter
    would otherwise send ``AutoPeftModel`` to the wrong base)."""
    old = getattr(config, "base_model_name_or_path", None)
    new = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config.base_model_name_or_path = new
    if old is not None and old != new:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old}' to '{new}'. Please "
                      "ensure that the correct base model is loaded when loading this checkpoint.", stacklevel=3)


def use_own_generation_config(peft_model: nn.Module, model: nn.Module) -> None:
    """peft's ``PeftModelForCausalLM.generate`` step: a ``generation_config`` assigned to the peft model itself (an
    attribute of the wrapper, which attribute reads would otherwise only delegate) becomes the base model's, so
    ``generate`` uses it. Causal LMs only, as peft (a seq2seq model keeps its own, whose decoder start it needs)."""
    if not any(getattr(c, "task_type", None) == "CAUSAL_LM" for c in peft_model.peft_config.values()):
        return
    own = peft_model.__dict__.get("generation_config")
    if own is not None and getattr(model, "generation_config", None) is not own:
        model.generation_config = own


def warn_prefix_name(adapter_name: str) -> None:
    """peft's warning for an adapter name contained in the LoRA parameter prefix ``lora_`` (``get_peft_model``,
    ``add_adapter``)."""
    prefix = LoraModel.prefix
    if adapter_name in prefix:
        warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix '{prefix}'. This may "
                      "lead to reinitialization of the adapter weights during loading.", stacklevel=3)


def warn_low_cpu_mem_usage(low_cpu_mem_usage: bool) -> None:
    """peft's ``low_cpu_mem_usage=True`` creates adapter weights empty on the meta device; fastpeft creates them
    as usual (on the base layers' device) and says so."""
    if low_cpu_mem_usage:
        warnings.warn("low_cpu_mem_usage=True: fastpeft creates the adapter weights on the base layers' device "
                      "(peft creates them empty on the meta device)", stacklevel=3)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with fastpeft LoRA layers as ``peft.get_peft_model`` does (peft's names, freezing, API).

    Example::

        from fastpeft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        model.print_trainable_parameters()

    peft's further keywords: ``revision`` (the base model's, recorded in the config; a different one already there
    is overwritten with a warning, as peft); ``autocast_adapter_dtype`` (LoRA adapters in fp32 on fp16/bf16 bases, the
    default; ``False`` keeps them in the base's dtype, as peft); ``mixed=True`` (peft's ``PeftMixedModel``) and
    ``autocast_adapter_dtype=False`` with a method other than LoRA are not implemented and raise;
    ``low_cpu_mem_usage=True`` warns that the adapter weights are created as usual.
    """
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True) (peft's PeftMixedModel, adapters of several methods "
                                  "in one model) is not implemented in fastpeft")
    warn_low_cpu_mem_usage(low_cpu_mem_usage)
    peft_config = from_peft_lora_config(peft_config)
    if isinstance(peft_config, LoraConfig):
        warn_prefix_name(adapter_name)
    _rename_base_model(peft_config, model)
    if revision is not None:
        if getattr(peft_config, "revision", None) is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}", stacklevel=2)
        peft_config.revision = revision
    if not isinstance(peft_config, LoraConfig):
        if not autocast_adapter_dtype:
            raise NotImplementedError(f"get_peft_model(autocast_adapter_dtype=False) is implemented for LoRA only, "
                                      f"not for {type(peft_config).__name__}")
        from .methods import get_method_model

        return get_method_model(model, peft_config, adapter_name)
    if isinstance(model, PeftModel):
        raise ValueError("model is already a fastpeft PeftModel; use model.add_adapter(name, config)")
    if type(model).__module__.startswith("peft."):
        raise ValueError("model is a peft PeftModel; convert it with fastpeft.from_peft(model) instead")
    from .tasks import with_task

    # peft's task class for the config's task_type (PeftModelForCausalLM, ...), else PeftModel
    return with_task(PeftModel, peft_config.task_type)(model, peft_config, adapter_name,
                                                        autocast_adapter_dtype=autocast_adapter_dtype)
