"""What the layer-injecting and parameter-selecting methods share (IA3, AdaLoRA, bottleneck, BitFit, Freeze).

The object layout is peft's: ``PeftModel.base_model`` is a tuner module whose ``.model`` is the transformers
model, so parameter names are ``base_model.model.<path>.<adapter param>.<adapter name>`` and saved keys drop the
adapter name: ``base_model.model.<path>.<adapter param>``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import NoMatchingPeftModuleError
from ..layers.switches import freeze_requires_grad, restore_requires_grad
from ..model import (
    ModulesToSaveWrapper,
    delegating_getattr,
    named_modules_of,
    parent_of,
    positional_as_keywords,
    record_base_model_name,
    wrap_matching_modules,
)
from ..model import PeftModel as _LoraPeftModel
from ..save import full_tensors, read_adapter_file, write_adapter_files
from .configs import SUPPORTED_TASK_TYPES, MethodConfig

CLASSIFIER_HEADS = ("classifier", "score")
# the parts a method adds around a module (never matched as targets or as modules_to_save)
_METHOD_INTERNALS = ("base_layer", "original_module", "modules_to_save")


# --------------------------------------------------------------------------- matching
def matches(targets: list[str] | str | None, key: str) -> bool:
    """peft's target rule: a regex string must ``fullmatch`` the name; a list entry must equal the name or a
    dot-separated tail of it."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def layer_index_ok(key: str, layers_to_transform: list[int] | int | None, layers_pattern: Any = None) -> bool:
    """Whether ``key`` sits in one of ``layers_to_transform`` (peft's rule: the number after ``layers_pattern``,
    or the first ``.<n>.`` in the name)."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    idx = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
        if match:
            break
    return match is not None and int(match.group(1)) in idx


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer (fastpeft's methods adapt nn.Linear and "
                    "transformers' Conv1D)")


# --------------------------------------------------------------------------- task types
def check_task_fit(model: nn.Module, config: MethodConfig, method: str) -> None:
    """Raise ``ValueError`` when ``config.task_type`` does not fit ``model`` (or the method)."""
    task = config.task_type
    mcfg = getattr(model, "config", None)
    is_enc_dec = bool(getattr(mcfg, "is_encoder_decoder", False))
    if config.is_prompt_learning and task not in SUPPORTED_TASK_TYPES:
        raise ValueError(f"{method} needs task_type, one of {SUPPORTED_TASK_TYPES} (it decides how the virtual "
                         f"tokens, attention mask and labels are built); got {task!r}")
    if config.is_prompt_learning and task == "QUESTION_ANS" and getattr(config, "peft_type", "") == "PREFIX_TUNING":
        raise ValueError("prefix tuning does not fit task_type='QUESTION_ANS' (peft's fails there too): use prompt "
                         "tuning or P-tuning")
    if task == "SEQ_2_SEQ_LM" and not is_enc_dec:
        raise ValueError(f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model; {type(model).__name__} is not "
                         "one (use task_type='CAUSAL_LM' for decoder-only models)")
    if task == "CAUSAL_LM":
        if is_enc_dec:
            raise ValueError(f"task_type='CAUSAL_LM' does not fit the encoder-decoder model {type(model).__name__}; "
                             "use task_type='SEQ_2_SEQ_LM'")
        head = None
        with contextlib.suppress(Exception):
            head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"task_type='CAUSAL_LM' needs a model with a language-model head; "
                             f"{type(model).__name__} has none")
    if task in ("SEQ_CLS", "TOKEN_CLS") and not head_names(model):
        raise ValueError(f"task_type={task!r} needs a classification head named one of {CLASSIFIER_HEADS}; "
                         f"{type(model).__name__} has none")


def head_names(model: nn.Module) -> list[str]:
    """The classifier heads (``classifier``/``score``) present in ``model``, by last name."""
    present = {n.split(".")[-1] for n, _ in model.named_modules() if n}
    return [h for h in CLASSIFIER_HEADS if h in present]


def modules_to_save_for(model: nn.Module, config: MethodConfig) -> list[str]:
    """``config.modules_to_save`` plus the classifier head's names for SEQ_CLS/TOKEN_CLS: both, present or not, as peft
    adds them (its saved config)."""
    names = list(getattr(config, "modules_to_save", None) or [])
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        names += CLASSIFIER_HEADS
    return list(dict.fromkeys(names))


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Wrap every module whose name is, or ends with, one of ``names`` in a ``ModulesToSaveWrapper``."""
    if not names:
        return []
    wrapped = wrap_matching_modules(model, names, adapter_name, _METHOD_INTERNALS)
    missing = [m for m in names
               if m not in CLASSIFIER_HEADS and not any(k == m or k.endswith("." + m) for k in wrapped)]
    if missing:
        raise ValueError(f"modules_to_save {missing} not found in the model")
    return wrapped


class SignedForward:
    """A ``forward`` that runs ``impl`` and reports ``signature_of``'s signature, so that transformers' Trainer keeps
    the dataset columns the wrapped model accepts (a ``*args, **kwargs`` signature would make it drop them all).
    ``owner``: the peft model whose forward this is; positional arguments are named as its task class names them
    in peft (see :func:`fastpeft.model.positional_as_keywords`)."""

    __slots__ = ("impl", "signature_of", "owner")

    def __init__(self, impl, signature_of, owner=None):
        self.impl = impl
        self.signature_of = signature_of
        self.owner = owner

    def __call__(self, *args, **kwargs):
        if self.owner is not None:  # (the owners are the non-LoRA models: no adapter_names)
            args, kwargs = positional_as_keywords(self.owner, args, kwargs)
            refuse_adapter_names(self.owner, kwargs)
        return self.impl(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.signature_of)


def refuse_adapter_names(model: nn.Module, kwargs: dict) -> None:
    """``adapter_names`` (one adapter per row) is LoRA's: a method model (prompt learning included) would pass it
    to the transformers model, which ignores it (every row adapted, "__base__" rows too) or, in ``generate``,
    fails with an unrelated message. Refused clearly instead (peft's AdaLoRA raises ``TypeError`` too)."""
    if kwargs.get("adapter_names") is not None:
        method = type(next(iter(model.peft_config.values()))).__name__
        raise TypeError(f"adapter_names (one adapter per sequence) works with LoRA adapters only; a model with "
                        f"{method} applies its adapter to every sequence")
    kwargs.pop("adapter_names", None)


# --------------------------------------------------------------------------- tuner layers
class AdapterLayer(nn.Module):
    """Base of fastpeft's method layers: a frozen ``base_layer`` plus per-adapter parameters.

    Subclasses list their per-adapter containers (``ParameterDict``/``ModuleDict`` keyed by adapter name) in
    ``adapter_param_names``; saved keys drop the adapter name.
    """

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.disable_adapters = False
        self.active_adapter = "default"
        self.merged_adapters: list[str] = []  # adapters folded into base_layer's weights, in merge order
        base_layer.requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Use ``adapter_name`` (its parameters train; others freeze)."""
        self.active_adapter = adapter_name
        for pname in self.adapter_param_names:
            container = getattr(self, pname)
            for name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    item.requires_grad_(name == adapter_name)
                else:
                    item.requires_grad_(name == adapter_name)

    def has_adapter(self, adapter_name: str) -> bool:
        """Whether this layer holds ``adapter_name``."""
        return adapter_name in getattr(self, self.adapter_param_names[0])

    @property
    def merged(self) -> bool:
        """Whether an adapter is folded into ``base_layer``'s weights."""
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (default: the active one) into ``base_layer``'s weights, as peft's layers do:
        already merged adapters are skipped with a warning; ``safe_merge`` checks the result for NaN/inf first."""
        if adapter_names is None:
            adapter_names = [self.active_adapter]
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        names = [n for n in adapter_names if n not in self.merged_adapters]
        if self.merged:
            if names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.", stacklevel=2)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        for name in names:
            if self.has_adapter(name):
                with torch.no_grad():
                    self._merge_one(name, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters back out of ``base_layer``'s weights (last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.has_adapter(name):
                with torch.no_grad():
                    self._unmerge_one(name)

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer; use unload()")

    def _unmerge_one(self, adapter_name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
        """The base layer's output when the adapter must not run (disabled — a merged adapter is unmerged first,
        as in peft — merged, or absent); ``None`` when the adapter runs."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self.has_adapter(self.active_adapter):
            return self.base_layer(x, *args, **kwargs)
        return None

    def _on(self) -> bool:
        return not self.disable_adapters and self.has_adapter(self.active_adapter)

    __getattr__ = delegating_getattr("base_layer")


# --------------------------------------------------------------------------- tuner model
class MethodTuner(nn.Module):
    """Holds the transformers model as ``.model`` (peft's tuner layout) with the method applied.

    Subclasses implement ``_apply(config, adapter_name)`` and, when they save something other than their layers'
    adapter parameters and ``modules_to_save``, ``_extra_saved_names(adapter_name)``.
    """

    def __init__(self, model: nn.Module, config: MethodConfig, adapter_name: str = "default"):
        super().__init__()
        check_task_fit(model, config, type(config).__name__)
        self.model = model
        self.peft_config: dict[str, MethodConfig] = {adapter_name: config}
        self.active_adapter = adapter_name
        for p in self.model.parameters():
            p.requires_grad_(False)
        mts = modules_to_save_for(model, config)
        self.modules_to_save_names = mts
        self._apply_method(config, adapter_name)
        if mts:
            config.modules_to_save = mts
        wrap_modules_to_save(self.model, mts, adapter_name)
        if config.inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    def _apply_method(self, config: MethodConfig, adapter_name: str) -> None:
        raise NotImplementedError

    def candidate_names(self) -> list[str]:
        """Module names of ``.model`` a method may adapt (not inside ``modules_to_save`` or method layers)."""
        out = []
        for key, _ in self.model.named_modules():
            if not key or any(p in _METHOD_INTERNALS for p in key.split(".")):
                continue
            if any(key == m or key.endswith("." + m) or key.startswith(m + ".") or f".{m}." in f".{key}."
                   for m in self.modules_to_save_names):
                continue
            out.append(key)
        return out

    def model_type_default(self, table: dict[str, Any], field_name: str, method: str, pass_what: str) -> list[str]:
        """``sorted(table[model_type])`` for ``.model``'s type: the default of a None ``field_name``; a
        ``ValueError`` (asking the user to pass ``pass_what``) for a model type the table lacks."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in table:
            raise ValueError(f"{field_name} is None and fastpeft has no {method} default for model type "
                             f"{model_type!r}; pass {pass_what}")
        return sorted(table[model_type])

    def linear_targets(self, config: MethodConfig, method: str, keep: Callable[[str], bool] | None = None,
                       layer_cls: type | None = None) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) for each candidate that ``config.target_modules`` names, ``config.exclude_modules`` does
        not and ``keep`` (if given) accepts, one at a time (the caller may replace each before the next); a targeted
        module that is not linear (nor a ``layer_cls`` layer, adapted already by another adapter) raises
        ``ValueError``, and so does finding none (after the last)."""
        found = False
        for key in self.candidate_names():
            if not matches(config.target_modules, key) or matches(config.exclude_modules, key):
                continue
            if keep is not None and not keep(key):
                continue
            module = self.model.get_submodule(key)
            if not (isinstance(module, nn.Linear) or is_conv1d(module)
                    or (layer_cls is not None and isinstance(module, layer_cls))):
                raise ValueError(f"Target module {key!r} ({type(module).__name__}) is not supported: fastpeft's "
                                 f"{method} adapts nn.Linear and transformers' Conv1D")
            found = True
            yield key, module
        if not found:
            raise NoMatchingPeftModuleError(f"Target modules {config.target_modules} not found in the base model. "
                                            "Please check the target modules and try again.")

    def replace_module(self, key: str, new: nn.Module) -> None:
        """Put ``new`` where ``key`` was in ``.model``."""
        parent, child = parent_of(self.model, key)
        setattr(parent, child, new)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge each layer into its base (where the method allows) and return the plain model; peft's arguments:
        ``safe_merge`` checks each merged weight for NaN/inf before writing it (a ValueError, nothing written to that
        layer), ``adapter_names`` the adapters to merge (default: the active one), ``progressbar`` a tqdm bar."""
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the plain model with the method's layers removed (not merged)."""
        return self._unload(merge=False)

    def _in_place_error(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} is not available for {self.method_label}: it trains the base model's own parameters in place "
            "and does not keep their original values, so the base model cannot be restored from this model (load "
            "the base model again for that); merge_and_unload() returns the trained model")

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: list[str] | None = None) -> nn.Module:
        if not self.supports_disable:
            if not merge:
                raise self._in_place_error("unload()")
            # the trained parameters are the model's own: nothing to merge; trained modules_to_save copies go in
            for key, wrapper in list(self.modules_to_save_wrappers()):
                self.replace_module(key, wrapper._current())
            return self.model
        layers = list(self.adapter_layers())
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key, layer in layers:
            if merge and not layer.merged:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self.replace_module(key, layer.base_layer)
        for key, wrapper in list(self.modules_to_save_wrappers()):
            self.replace_module(key, wrapper._current() if merge else wrapper.original_module)
        return self.model

    __getattr__ = delegating_getattr("model")

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(name, layer) for every method layer inside ``.model``."""
        return named_modules_of(self.model, AdapterLayer)

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return named_modules_of(self.model, ModulesToSaveWrapper)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weights of every method layer (peft's ``merge_adapter``); the layers stay
        in place, ``unmerge_adapter`` takes it out again."""
        for _, layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Take merged adapters back out of the base weights (peft's ``unmerge_adapter``)."""
        if not self.supports_disable:
            raise self._in_place_error("unmerge_adapter()")
        for _, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()

    def enable_adapter_layers(self) -> None:
        """Switch the method's layers back on; their weights' trainability comes back as it was before
        :meth:`disable_adapter_layers` (an adapter loaded for inference stays frozen)."""
        for _, layer in self.adapter_layers():
            layer.disable_adapters = False
        restore_requires_grad(self.__dict__.pop("_grad_flags_before_disable", ()))
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone; as in peft the method's weights are frozen meanwhile."""
        if not self.supports_disable:
            raise self._in_place_error("disable_adapter()")
        if "_grad_flags_before_disable" not in self.__dict__:
            self._grad_flags_before_disable = freeze_requires_grad(
                p for _, layer in self.adapter_layers() for pname in layer.adapter_param_names
                for p in getattr(layer, pname).parameters())
        for _, layer in self.adapter_layers():
            layer.disable_adapters = True
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.enable_adapters(False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch training on or off for the named adapters' layer weights and modules_to_save copies (peft's
        method); not for methods that train the base model's own parameters (BitFit, Freeze)."""
        if not self.supports_disable:
            raise NotImplementedError(f"set_requires_grad is not available for {self.method_label}: it trains the "
                                      "base model's own parameters, not adapter weights")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for _, layer in self.adapter_layers():
            for pname in layer.adapter_param_names:
                if pname == "ranknum":  # AdaLoRA's rank count: a constant, never trained (as in peft)
                    continue
                container = getattr(layer, pname)
                for name in names:
                    if name in container:
                        container[name].requires_grad_(requires_grad)
        for _, wrapper in self.modules_to_save_wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)
            wrapper.remember_requires_grad(names)

    supports_disable = True  # False: the method trains the base model's own parameters in place
    method_label = "this method"  # the method's name in error messages

    def _extra_saved_names(self, adapter_name: str) -> list[str]:
        """Full state-dict names (relative to this module's parent PeftModel) saved as they are."""
        return []


# --------------------------------------------------------------------------- the user-facing wrapper
class MethodPeftModel(_LoraPeftModel):
    """fastpeft's ``PeftModel`` for the non-LoRA layer methods (AdaLoRA, bottleneck, BitFit, Freeze; IA3 through
    ``MultiAdapterPeftModel``).

    Same API as :class:`fastpeft.PeftModel` (``print_trainable_parameters``, ``save_pretrained``,
    ``from_pretrained``, ``disable_adapter``, ``generate``); one adapter per model.
    """

    tuner_class: type[MethodTuner] = MethodTuner

    def __init__(self, model: nn.Module, peft_config: MethodConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        """peft's ``PeftModel`` parameters; ``autocast_adapter_dtype=False`` is implemented for LoRA only (raises),
        ``low_cpu_mem_usage=True`` is warned about (the weights are created as usual)."""
        from ..model import warn_low_cpu_mem_usage

        nn.Module.__init__(self)
        if not autocast_adapter_dtype:
            raise NotImplementedError(f"autocast_adapter_dtype=False is implemented for LoRA only, not for "
                                      f"{type(peft_config).__name__}")
        warn_low_cpu_mem_usage(low_cpu_mem_usage)
        self.base_model = self.tuner_class(model, peft_config, adapter_name)
        record_base_model_name(peft_config, model)

    @property
    def forward(self):
        """Runs the method's model; the signature is the wrapped transformers model's. As in peft, a task class
        (``task_type`` set: ``PeftModelForCausalLM``, ...) runs the method's tuner, where AdaLoRA adds its
        orthogonality penalty to ``loss``; a model without a task type runs the transformers model itself (peft's
        ``PeftModel.forward`` calls ``get_base_model()``), so its loss has no penalty."""
        from ..tasks import _TASK_CLASSES

        impl = self.base_model if isinstance(self, tuple(_TASK_CLASSES)) else self.base_model.model
        return SignedForward(impl, self.base_model.model.forward, self)

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped model, with the method applied (a ``generation_config`` assigned to this
        model is used, as peft's ``PeftModelForCausalLM.generate`` does; ``adapter_names`` is refused)."""
        from ..model import use_own_generation_config

        refuse_adapter_names(self, kwargs)
        use_own_generation_config(self, self.base_model.model)
        return self.base_model.model.generate(*args, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Not supported: fastpeft's non-LoRA methods hold one adapter per model."""
        raise NotImplementedError(f"{type(self).__name__} holds one adapter; build another model for a second one")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, allow_pickle: bool = False, **kwargs):
        """Load saved weights into the model's own adapter (how transformers' Trainer resumes from a
        checkpoint); without ``is_trainable`` the model is put in eval mode. fastpeft's non-LoRA methods
        hold one adapter per model: another name is refused. ``ignore_mismatched_sizes=True`` (peft's keyword)
        skips mis-shaped tensors with peft's warning."""
        from ..hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs

        if adapter_name != self.base_model.active_adapter:
            raise NotImplementedError(f"{type(self).__name__} holds one adapter ({self.base_model.active_adapter!r});"
                                      " load another one with from_pretrained on a fresh model")
        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        warn_unused_kwargs(f"{type(self).__name__}.load_adapter", kwargs)
        return load_into_own_adapter(self, model_id, adapter_name, is_trainable, allow_pickle, key_mapping, ignore)

    def _load_adapter_state(self, saved: dict[str, torch.Tensor], adapter_name: str, where: str,
                            ignore_mismatched_sizes: bool = False) -> None:
        """Copy saved tensors into the method's weights, strictly (see :func:`load_tuner_state`)."""
        load_tuner_state(self, saved, adapter_name, where, ignore_mismatched_sizes)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Only the model's own adapter name is accepted."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.base_model.active_adapter]:
            raise ValueError(f"unknown adapter(s) {names}; this model has {list(self.peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Not supported (use ``unload``-free: build the base model again)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete its only adapter")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the method into the base weights where it can be (IA3, AdaLoRA) and return the plain model
        (BitFit, Freeze: the model with its trained parameters, which are its own; bottleneck adapters cannot be
        merged). peft's arguments: ``safe_merge`` (NaN/inf check before writing), ``adapter_names``, ``progressbar``."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove the method's layers without merging and return the plain transformers model."""
        return self.base_model.unload()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weights, keeping the layers (IA3, AdaLoRA; peft's ``merge_adapter``)."""
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter` (peft's ``unmerge_adapter``)."""
        self.base_model.unmerge_adapter()

    # ----------------------------------------------------------------- save / load
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes, under peft-style saved names (adapter name dropped)."""
        return tuner_state_dict(self, adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's layout) into ``save_directory``
        (an adapter not named ``"default"`` into ``save_directory/<name>``, as peft; ``selected_adapters`` naming
        another adapter is refused). Parameters in peft's order; ``save_embedding_layers`` and
        ``path_initial_model_for_weight_conversion`` are accepted and unused (fastpeft applies them to LoRA only)."""
        from ..hub import write_model_card
        from ..model import adapter_folders

        # peft's layout: "default" in save_directory, another name in save_directory/<name>
        for name, out in adapter_folders(self, save_directory, selected_adapters):
            save_one_adapter(self, name, out, safe_serialization, is_main_process)
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            write_model_card(self, save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: MethodConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        allow_pickle: bool = False, **kwargs) -> MethodPeftModel:
        """Build the method on ``model`` from a saved folder (or Hub repo id, with peft's Hub keywords) and load
        its weights strictly, their keys rewritten by peft's ``key_mapping`` (None: the model's
        ``_checkpoint_conversion_mapping``, as peft). Parameters in peft's order; ``autocast_adapter_dtype``,
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted and change nothing here;
        ``ignore_mismatched_sizes=True`` (peft's keyword) skips mis-shaped tensors with peft's warning."""
        from ..hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs
        from .configs import MethodConfig as _Base

        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        config = _Base.from_pretrained(model_id) if config is None else config
        config.inference_mode = not is_trainable
        if key_mapping is None:  # as peft: the model's own checkpoint conversion, if it has one
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        peft_model = cls._for_loading(model, config, adapter_name)
        saved = read_adapter_file(model_id, allow_pickle=allow_pickle, key_mapping=key_mapping)
        peft_model._load_adapter_state(saved, adapter_name, f"adapter file in {os.fspath(model_id)!r}",
                                       kwargs.pop("ignore_mismatched_sizes", False))
        warn_unused_kwargs(f"{cls.__name__}.from_pretrained", kwargs)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    @classmethod
    def _for_loading(cls, model: nn.Module, config: MethodConfig, adapter_name: str) -> MethodPeftModel:
        return cls(model, config, adapter_name)


def _strip_adapter(key: str, adapter_name: str, param_names: set[str]) -> str | None:
    parts = key.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter_name and parts[i - 1] in param_names:
            return ".".join(parts[:i] + parts[i + 1:])
    return None


def tuner_state_dict(peft_model: MethodPeftModel, adapter_name: str, for_saving: bool = True
                     ) -> dict[str, torch.Tensor]:
    """Saved tensors of ``adapter_name``: method layer parameters, ``modules_to_save`` copies, extra names.

    With ``for_saving=False`` the values are the live tensors (views sharing storage), for loading into.
    """
    tuner: MethodTuner = peft_model.base_model
    state = peft_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    layer_prefixes = {f"base_model.model.{n}.": layer for n, layer in tuner.adapter_layers()}
    wrappers = [f"base_model.model.{n}" for n, _ in tuner.modules_to_save_wrappers()]
    for key, value in state.items():
        owner = next((p for p in layer_prefixes if key.startswith(p)), None)
        if owner is not None:
            stripped = _strip_adapter(key, adapter_name, set(layer_prefixes[owner].adapter_param_names))
            if stripped is not None and not stripped.endswith(".ranknum"):
                out[stripped] = value
            continue
        wrapper = next((w for w in wrappers if key.startswith(w + ".")), None)
        if wrapper is not None:
            prefix = f"{wrapper}.modules_to_save.{adapter_name}."
            if key.startswith(prefix):
                out[wrapper + "." + key[len(prefix):]] = value
    for key in tuner._extra_saved_names(adapter_name):
        out[key] = state[key]
    if for_saving:
        out = full_tensors(out)  # FSDP2: gathered (collective: every rank saves)
        if hasattr(tuner, "postprocess_saved"):
            return tuner.postprocess_saved(out, adapter_name)
    return out


def save_one_adapter(peft_model: nn.Module, adapter_name: str, save_directory: str | os.PathLike,
                     safe_serialization: bool = True, is_main_process: bool = True) -> None:
    """``save_pretrained`` of a one-adapter model: ``peft_model.adapter_state_dict(adapter_name)`` and that adapter's
    config written by :func:`write_adapter` (on the main process only)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    tensors = peft_model.adapter_state_dict(adapter_name)  # on every rank: FSDP2's gather is collective
    if not is_main_process:
        return
    from ..auto import auto_mapping_for

    config = peft_model.peft_config[adapter_name]
    write_adapter(save_directory, tensors, config, safe_serialization, auto_mapping_for(peft_model, config))


def write_adapter(save_directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: MethodConfig,
                  safe_serialization: bool = True, auto_mapping: dict[str, str] | None = None) -> None:
    """Write tensors + config as peft does (config saved with ``inference_mode=True``, peft's ``auto_mapping``
    when given)."""
    os.makedirs(save_directory, exist_ok=True)
    if not tensors:
        raise ValueError("nothing to save: the adapter has no tensors")
    write_adapter_files(save_directory, tensors, config, safe_serialization, auto_mapping)


def load_into_own_adapter(peft_model: nn.Module, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool,
                          allow_pickle: bool, key_mapping: dict[str, str] | None = None,
                          ignore_mismatched_sizes: bool = False):
    """``load_adapter`` onto a one-adapter model's own adapter: the file's tensors (keys rewritten by peft's
    ``key_mapping``) through the model's ``_load_adapter_state``, eval mode unless ``is_trainable``; returns the
    (strict, hence empty) load result."""
    from torch.nn.modules.module import _IncompatibleKeys

    saved = read_adapter_file(model_id, allow_pickle=allow_pickle, key_mapping=key_mapping)
    peft_model._load_adapter_state(saved, adapter_name, f"adapter file in {os.fspath(model_id)!r}",
                                   ignore_mismatched_sizes)
    if not is_trainable:
        peft_model.eval()
    return _IncompatibleKeys([], [])


def load_tuner_state(peft_model: MethodPeftModel, saved: dict[str, torch.Tensor], adapter_name: str,
                     where: str, ignore_mismatched_sizes: bool = False) -> None:
    """Copy saved tensors into the model, strictly: missing, unexpected or mis-shaped keys raise ``ValueError``
    (its message names ``where``, e.g. "adapter file in '…'"); with ``ignore_mismatched_sizes`` (peft's)
    mis-shaped tensors are left as they are, with peft's warning."""
    from ..save import warn_ignored_sizes

    expected = tuner_state_dict(peft_model, adapter_name, for_saving=False)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model expects, "
                         f"e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{where} has {len(unexpected)} key(s) this model does not have, e.g. "
                         f"{unexpected[:3]} (was it saved for another model or config?)")
    mismatched = [(key, tuple(value.shape), tuple(expected[key].shape)) for key, value in saved.items()
                  if expected[key].shape != value.shape]
    if mismatched and not ignore_mismatched_sizes:
        key, file_shape, model_shape = mismatched[0]
        raise ValueError(f"shape mismatch for {key!r}: file has {file_shape}, model expects {model_shape} "
                         "(peft's ignore_mismatched_sizes=True skips such tensors)")
    skipped = {key for key, _, _ in mismatched}
    saved = {key: value for key, value in saved.items() if key not in skipped}
    warn_ignored_sizes(peft_model, mismatched)
    # expected[] holds views of the live tensors (state_dict shares storage), so copy into them
    with torch.no_grad():
        for key, value in saved.items():
            expected[key].copy_(value.to(device=expected[key].device, dtype=expected[key].dtype))
