"""BitFit and Freeze: train a chosen subset of the base model's own parameters (fastpeft's own formats).

Neither method adds layers: the chosen parameters of ``base_model.model`` train in place and are saved under
their names (``base_model.model.<path>.bias`` …) with ``peft_type`` ``"BITFIT"`` / ``"FREEZE"``. Loading onto a fresh
base model copies them back. ``merge_and_unload`` returns the trained model itself; ``disable_adapter`` and
``unload`` are not available (the original values of the trained parameters are not kept).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .base import MethodPeftModel, MethodTuner, matches
from .configs import BitFitConfig, FreezeConfig

# Names of the ModuleLists that hold transformer blocks in common architectures.
BLOCK_LIST_NAMES = ("layers", "h", "layer", "block", "blocks")


class BitFitTuner(MethodTuner):
    """``base_model`` of a BitFit model: only the (chosen) bias parameters train."""

    supports_disable = False
    method_label = "BitFit"

    def _apply_method(self, config: BitFitConfig, adapter_name: str) -> None:
        self.trainable_names: list[str] = []
        self.added_bias_modules: list[str] = []
        for key in self.candidate_names():
            module = self.model.get_submodule(key)
            if config.target_modules is not None and not matches(config.target_modules, key):
                continue
            if matches(config.exclude_modules, key):
                continue
            bias = module._parameters.get("bias") if hasattr(module, "_parameters") else None
            if bias is None and config.add_bias and isinstance(module, nn.Linear):
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=module.weight.device,
                                                       dtype=module.weight.dtype))
                bias = module.bias
                self.added_bias_modules.append(key)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
                self.trainable_names.append(f"{key}.bias")
        if not self.trainable_names:
            hint = " (pass add_bias=True to give its linear layers zero-initialized biases)" if not config.add_bias \
                else ""
            raise ValueError(f"BitFit found no bias parameters to train in {type(self.model).__name__}"
                             f"{' among target_modules ' + str(config.target_modules) if config.target_modules else ''}"
                             f"{hint}")

    def _extra_saved_names(self, adapter_name: str) -> list[str]:
        return [f"base_model.model.{n}" for n in self.trainable_names]


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists of transformer blocks (``model.layers``, ``transformer.h``, T5's two ``block`` lists …)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in BLOCK_LIST_NAMES and len(module) > 0:
            if not any(name.startswith(o + ".") for o, _ in out):
                out.append((name, module))
    return out


class FreezeTuner(MethodTuner):
    """``base_model`` of a Freeze model: the last ``num_trainable_layers`` blocks and ``trainable_modules`` train."""

    supports_disable = False
    method_label = "Freeze tuning"

    def _apply_method(self, config: FreezeConfig, adapter_name: str) -> None:
        chosen: set[int] = set()  # ids of the chosen parameters (tied weights count once, under their first name)
        k = config.num_trainable_layers or 0
        if k:
            lists = block_lists(self.model)
            if not lists:
                raise ValueError(f"num_trainable_layers={k}: found no block list ({BLOCK_LIST_NAMES}) in "
                                 f"{type(self.model).__name__}; use trainable_modules instead")
            for name, blocks in lists:
                if k > len(blocks):
                    raise ValueError(f"num_trainable_layers={k} but {name} has only {len(blocks)} blocks")
                for i in range(len(blocks) - k, len(blocks)):
                    chosen.update(id(p) for p in blocks[i].parameters())
        if config.trainable_modules:
            pattern = config.trainable_modules
            found = False
            for key in self.candidate_names():
                hit = re.fullmatch(pattern, key) if isinstance(pattern, str) else matches(pattern, key)
                if hit:
                    found = True
                    chosen.update(id(p) for p in self.model.get_submodule(key).parameters())
            if not found:
                direct = [p for n, p in self.model.named_parameters()
                          if (re.fullmatch(pattern, n) if isinstance(pattern, str) else matches(pattern, n))]
                if not direct:
                    raise ValueError(f"trainable_modules {pattern!r} matches nothing in {type(self.model).__name__}")
                chosen.update(id(p) for p in direct)
        self.trainable_names = sorted(n for n, p in self.model.named_parameters() if id(p) in chosen)
        for p in self.model.parameters():
            if id(p) in chosen:
                p.requires_grad_(True)

    def _extra_saved_names(self, adapter_name: str) -> list[str]:
        return [f"base_model.model.{n}" for n in self.trainable_names]


class BitFitPeftModel(MethodPeftModel):
    """A transformers model where only biases (and ``modules_to_save``) train."""

    tuner_class = BitFitTuner


class FreezePeftModel(MethodPeftModel):
    """A transformers model where only the chosen layers (and ``modules_to_save``) train."""

    tuner_class = FreezeTuner
