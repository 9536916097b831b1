"""Several adapters in one model, for the methods that allow it here ((IA)³, standalone trainable tokens, LayerNorm
tuning): peft's ``add_adapter`` / ``set_adapter`` / ``delete_adapter`` / ``load_adapter`` and ``save_pretrained``
writing ``"default"`` to the folder and every other adapter to ``<folder>/<name>`` (peft's layout).

A tuner class here implements ``_apply_method(config, adapter_name)`` (adding an adapter to layers that may already
hold others) and ``_activate(layer, adapter_name, train)`` per layer; one adapter is active at a time.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..model import record_base_model_name
from .base import (
    MethodPeftModel,
    MethodTuner,
    load_into_own_adapter,
    modules_to_save_for,
    save_one_adapter,
    wrap_modules_to_save,
)
from .configs import MethodConfig, config_from_dict, read_config_dict


class MultiAdapterTuner(MethodTuner):
    """A :class:`MethodTuner` whose layers hold one entry per adapter; one adapter is active."""

    def _activate(self, layer: nn.Module, adapter_name: str, train: bool) -> None:
        """Make ``adapter_name`` the layer's active adapter (its weights train, the others' freeze), all frozen
        unless ``train``; a layer type with other needs overrides this."""
        layer.set_adapter(adapter_name)
        if not train:
            for pname in layer.adapter_param_names:
                getattr(layer, pname).requires_grad_(False)

    def _delete_from(self, layer: nn.Module, adapter_name: str) -> None:
        """Remove ``adapter_name`` from the layer (the layer's ``delete_adapter``)."""
        layer.delete_adapter(adapter_name)

    _autocast_adapter_dtype = True  # what _apply_method passes on (trainable tokens: rows in fp32 on a half base)

    def add_adapter(self, config: MethodConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Add ``adapter_name`` (frozen and inactive: the active adapter does not change, as in peft);
        ``autocast_adapter_dtype`` as for ``MultiAdapterPeftModel.add_adapter``."""
        self._autocast_adapter_dtype = autocast_adapter_dtype
        try:
            self._apply_method(config, adapter_name)
        finally:
            del self._autocast_adapter_dtype
        mts = modules_to_save_for(self.model, config)
        if mts:
            config.modules_to_save = mts
            wrap_modules_to_save(self.model, mts, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter, inference_mode=bool(self.peft_config[self.active_adapter]
                                                                  .inference_mode))

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapter) into every layer and return the plain model
        (``progressbar``: a tqdm bar over the layers)."""
        layers = list(self.adapter_layers())
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="Unloading and merging model")
        for key, layer in layers:
            if not layer.merged:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self.replace_module(key, layer.base_layer)
        for key, wrapper in list(self.modules_to_save_wrappers()):
            self.replace_module(key, wrapper._current())
        return self.model

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter: its weights train (unless ``inference_mode``), others freeze."""
        for _, layer in self.adapter_layers():
            self._activate(layer, adapter_name, not inference_mode)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(adapter_name, train=not inference_mode)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer (and its ``modules_to_save`` copies)."""
        for _, layer in list(self.adapter_layers()):
            self._delete_from(layer, adapter_name)
        for _, wrapper in self.modules_to_save_wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]


class MultiAdapterPeftModel(MethodPeftModel):
    """``PeftModel`` of a method that holds several adapters of its kind (peft's multi-adapter API)."""

    tuner_class: type[MultiAdapterTuner] = MultiAdapterTuner

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        MethodPeftModel.__init__(self, model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        self.base_model.set_adapter(adapter_name, inference_mode=bool(peft_config.inference_mode))

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add another adapter of the same method; it starts inactive and frozen (peft's ``add_adapter``).
        ``autocast_adapter_dtype`` (peft's): trainable-token rows in fp32 on an fp16/bf16 embedding (the default),
        else in its dtype (LayerNorm tuning's copies keep the layer's dtype either way, as in peft);
        ``low_cpu_mem_usage`` is accepted."""
        from . import _coerce_config

        config = copy.copy(_coerce_config(peft_config))
        ours = self.peft_config[self.base_model.active_adapter].peft_type
        if config.peft_type != ours:
            raise ValueError(f"Cannot combine adapters with different peft types. Found {ours} and "
                             f"{config.peft_type}.")
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"invalid adapter name {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        self.base_model.add_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        record_base_model_name(config, self.base_model.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge ``adapter_names`` (default: the active adapter) into the base layers and return the plain
        transformers model (peft's arguments)."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` active (one at a time): its weights train unless ``inference_mode=True``."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"set_adapter takes one adapter name (this method runs one adapter at a time), got "
                            f"{adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; when it was active, the first remaining adapter becomes active (as peft)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if len(self.peft_config) == 1:
            raise ValueError(f"cannot delete {adapter_name!r}, the model's only adapter")
        self.base_model.delete_adapter(adapter_name)
        if self.base_model.active_adapter == adapter_name:
            self.base_model.set_adapter(next(iter(self.peft_config)))

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, allow_pickle: bool = False, **kwargs):
        """Load a saved adapter (peft's or fastpeft's folder) under ``adapter_name``: a new name is added (not
        activated; trainable with ``is_trainable=True``), an existing one gets the saved weights. Without
        ``is_trainable`` the model is put in eval mode."""
        from torch.nn.modules.module import _IncompatibleKeys

        from ..hub import pop_hub_kwargs, resolve_adapter_path, warn_unused_kwargs
        from ..save import read_adapter_file

        model_id = resolve_adapter_path(model_id, **pop_hub_kwargs(kwargs))
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        config = kwargs.pop("config", None)
        warn_unused_kwargs(f"{type(self).__name__}.load_adapter", kwargs)
        if adapter_name in self.peft_config:
            return load_into_own_adapter(self, model_id, adapter_name, is_trainable, allow_pickle, key_mapping, ignore)
        config = config or config_from_dict(read_config_dict(model_id))
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        self._load_adapter_state(read_adapter_file(model_id, allow_pickle=allow_pickle, key_mapping=key_mapping),
                                 adapter_name, f"adapter file in {os.fspath(model_id)!r}", ignore)
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **kwargs) -> None:
        """Write each adapter (``selected_adapters``, default all) in peft's format: ``"default"`` into
        ``save_directory``, the others into ``save_directory/<name>``. Parameters in peft's order;
        ``save_embedding_layers`` and ``path_initial_model_for_weight_conversion`` are accepted and unused (fastpeft
        applies them to LoRA only)."""
        from ..hub import write_model_card
        from ..model import adapter_folders

        for name, out in adapter_folders(self, save_directory, selected_adapters):
            save_one_adapter(self, name, out, safe_serialization, is_main_process)
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            write_model_card(self, save_directory)

    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter_name``, under peft's saved names."""
        return super().adapter_state_dict(adapter_name)
