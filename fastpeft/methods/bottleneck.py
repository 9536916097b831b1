"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) — fastpeft's own ``peft_type="BOTTLENECK"``.

The adapter wraps a sublayer's output projection (attention's ``o_proj``/``c_proj``/``output.dense``/``o``, the
MLP's ``down_proj``/``c_proj``/``output.dense``/``wo``): ``h = proj(x)`` becomes
``h + scaling · up(act(down(dropout(h))))``, before the block's residual add. ``up`` starts at zero, so the
adapted model starts equal to the base. Houlsby places adapters after attention and after the MLP, Pfeiffer after
the MLP only. Parameters: ``<path>.adapter_down.<adapter>.weight`` / ``.bias`` and ``adapter_up`` likewise; saved
as ``base_model.model.<path>.adapter_down.weight`` … .
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, MethodPeftModel, MethodTuner, is_conv1d, linear_features, matches
from .configs import BottleneckConfig

# Output projections of attention / the MLP, by model type: dot-separated tails, or a regex (str).
ATTN_OUT = {
    "llama": ["self_attn.o_proj"], "mistral": ["self_attn.o_proj"], "qwen2": ["self_attn.o_proj"],
    "qwen3": ["self_attn.o_proj"], "gemma": ["self_attn.o_proj"], "gpt2": ["attn.c_proj"],
    "bert": ["attention.output.dense"], "roberta": ["attention.output.dense"], "t5": ["SelfAttention.o",
                                                                                       "EncDecAttention.o"],
}
FFN_OUT = {
    "llama": ["mlp.down_proj"], "mistral": ["mlp.down_proj"], "qwen2": ["mlp.down_proj"], "qwen3": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"], "gpt2": ["mlp.c_proj"], "bert": r".*\.layer\.\d+\.output\.dense",
    "roberta": r".*\.layer\.\d+\.output\.dense", "t5": ["DenseReluDense.wo"],
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLinear(AdapterLayer):
    """A linear layer followed by a residual bottleneck adapter."""

    adapter_param_names = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__(base_layer)
        _, out_features = linear_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        dev = base_layer.weight.device
        self.adapter_down = nn.ModuleDict({adapter_name: nn.Linear(out_features, config.bottleneck_size).to(dev)})
        self.adapter_up = nn.ModuleDict({adapter_name: nn.Linear(config.bottleneck_size, out_features).to(dev)})
        if config.init_weights:
            nn.init.zeros_(self.adapter_up[adapter_name].weight)
            nn.init.zeros_(self.adapter_up[adapter_name].bias)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        self.scaling = float(config.scaling)
        self.set_adapter(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if not self._on():
            return h
        down, up = self.adapter_down[self.active_adapter], self.adapter_up[self.active_adapter]
        z = up(self.act(down(self.dropout(h.to(down.weight.dtype)))))
        return h + (self.scaling * z).to(h.dtype)


class BottleneckTuner(MethodTuner):
    """``base_model`` of a bottleneck-adapter model."""

    def _apply_method(self, config: BottleneckConfig, adapter_name: str) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        groups = []
        if config.adapter_type == "houlsby":
            groups.append(("attn_modules", config.attn_modules if config.attn_modules is not None
                           else ATTN_OUT.get(model_type)))
        groups.append(("ffn_modules", config.ffn_modules if config.ffn_modules is not None
                       else FFN_OUT.get(model_type)))
        for field_name, targets in groups:
            if targets is None:
                raise ValueError(f"no default {field_name} for model type {model_type!r}; pass {field_name} (the "
                                 "output projections to put adapters after)")
            matched = []
            for key in self.candidate_names():
                if not matches(targets, key):
                    continue
                module = self.model.get_submodule(key)
                if isinstance(module, BottleneckLinear):
                    continue
                if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                    raise ValueError(f"{field_name} entry {key!r} is {type(module).__name__}, not a linear layer")
                self.replace_module(key, BottleneckLinear(module, adapter_name, config))
                matched.append(key)
            if not matched:
                raise ValueError(f"{field_name} {targets} not found in the model")


class BottleneckPeftModel(MethodPeftModel):
    """A transformers model with bottleneck adapters (fastpeft format, peft-style keys)."""

    tuner_class = BottleneckTuner
