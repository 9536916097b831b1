"""LayerNorm tuning (peft's ``LNTuningConfig``, ``peft_type="LN_TUNING"``; Zhao et al. 2023).

Each targeted layer (LayerNorm, RMSNorm, or any module named) keeps its original as the frozen ``base_layer`` and
gets a trainable copy per adapter, ``ln_tuning_layers[adapter]``, which runs instead of it while that adapter is
active. Parameter names ``<path>.ln_tuning_layers.<adapter>.weight``, saved as ``<path>.ln_tuning_layers.weight``,
exactly as peft. Merging swaps the trained copy in as the base layer (one adapter at a time).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import NoMatchingPeftModuleError
from .base import AdapterLayer, matches
from .configs import LNTuningConfig
from .multi import MultiAdapterPeftModel, MultiAdapterTuner

# peft's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING
LN_TUNING_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


class LNTuningLayer(AdapterLayer):
    """A module with a trainable copy of itself per adapter (``ln_tuning_layers``); the active copy runs."""

    adapter_param_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module, adapter_name: str):
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self.update_layer(adapter_name)
        self.active_adapter = adapter_name

    def update_layer(self, adapter_name: str) -> None:
        """Add ``adapter_name``: a copy of the (original) base layer."""
        original = self.ln_tuning_layers[self.merged_adapters[-1]] if self.merged else self.base_layer
        new = copy.deepcopy(original)
        new.requires_grad_(True)
        self.ln_tuning_layers[adapter_name] = new

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s copy (unmerging first if it is merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        if adapter_name in self.ln_tuning_layers:
            del self.ln_tuning_layers[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Swap the adapter's copy in as the base layer (peft's merge: one adapter; another merged one is unmerged
        first, with a warning)."""
        if adapter_names is None:
            adapter_names = [self.active_adapter]
        names = [n for n in adapter_names if n in self.ln_tuning_layers and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1:
            raise ValueError(f"Trying to merge {len(names)} adapters, but LN tuning does not allow merging more "
                             "than one adapter at a time")
        if self.merged:
            warnings.warn(f"Already merged with {set(self.merged_adapters)}. Unmerging first.", stacklevel=2)
            self.unmerge()
        name = names[0]
        if safe_merge and not all(torch.isfinite(p).all() for p in self.ln_tuning_layers[name].parameters()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Swap the original base layer back."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        name = self.merged_adapters.pop()
        self.base_layer, self.ln_tuning_layers[name] = self.ln_tuning_layers[name], self.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The active adapter's copy (the base layer when disabled, merged or the adapter is not held here)."""
        base = self._base_forward(x, *args, **kwargs)
        if base is not None:
            return base
        return self.ln_tuning_layers[self.active_adapter](x, *args, **kwargs)


class LNTuningTuner(MultiAdapterTuner):
    """``base_model`` of an LN-tuning model (peft's ``LNTuningModel`` layout)."""

    method_label = "LN tuning"

    def _apply_method(self, config: LNTuningConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in LN_TUNING_TARGETS:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            config.target_modules = list(LN_TUNING_TARGETS[model_type])
        found = excluded = False
        for key in self.candidate_names():
            if "ln_tuning_layers" in key.split("."):
                continue
            if not matches(config.target_modules, key):
                continue
            if matches(config.exclude_modules, key):
                excluded = True
                continue
            if any(key.startswith(k + ".") for k, _ in self.adapter_layers()):
                continue  # inside a layer already adapted
            found = True
            module = self.model.get_submodule(key)
            if isinstance(module, LNTuningLayer):
                module.update_layer(adapter_name)
            else:
                self.replace_module(key, LNTuningLayer(module, adapter_name))
        if not found:
            if excluded:
                raise NoMatchingPeftModuleError(
                    "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                    "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                    "configuration.")
            raise NoMatchingPeftModuleError(f"Target modules {config.target_modules} not found in the base model. "
                                            "Please check the target modules and try again.")



class LNTuningPeftModel(MultiAdapterPeftModel):
    """A transformers model whose normalization layers train as copies (peft's layout and saved format)."""

    tuner_class = LNTuningTuner
