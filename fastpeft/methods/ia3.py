"""(IA)³ (Liu et al. 2022): learned vectors that rescale k, v and the MLP's down-projection input (peft's layout).

A targeted linear layer ``y = W x + b`` becomes ``y = l ⊙ (W x + b)`` (``ia3_l`` of shape (out, 1)), or, for a
``feedforward_modules`` target, ``y = W (l ⊙ x) + b`` (``ia3_l`` of shape (1, in)). Parameters are named
``<path>.ia3_l.<adapter>`` and saved as ``<path>.ia3_l``, exactly as peft.

Several adapters per model (peft's ``add_adapter`` / ``set_adapter`` / ``delete_adapter`` / ``load_adapter``; one active
at a time, saved as ``<folder>/<name>``): a layer holds one vector per adapter; whether it scales inputs or outputs
is fixed by the first adapter that targets it (as in peft; a later config saying otherwise gets a warning).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from .base import AdapterLayer, is_conv1d, linear_features
from .configs import IA3Config
from .multi import MultiAdapterPeftModel, MultiAdapterTuner

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING) for the model types fastpeft is tested on and kin.
IA3_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"],
    "bert": ["output.dense"], "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"],
    "gemma2": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


class IA3Linear(AdapterLayer):
    """An ``nn.Linear`` / ``Conv1D`` with an (IA)³ rescaling vector per adapter (``ia3_l``)."""

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool, init_weights: bool = True):
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, init_weights)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, init_weights: bool = True) -> None:
        """Add adapter ``adapter_name``'s vector: ones (the identity) with ``init_weights``, else random."""
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        weight = torch.randn(shape)  # drawn also when set to ones: the random stream advances as in peft
        if init_weights:
            weight.fill_(1.0)
        self.ia3_l[adapter_name] = nn.Parameter(weight.to(self.base_layer.weight.device))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s vector; merged, it comes out of the base first (the other merged adapters go
        back in after)."""
        if adapter_name in self.merged_adapters:
            others = [n for n in self.merged_adapters if n != adapter_name]
            self.unmerge()
            if others:
                self.merge(adapter_names=others)
        if adapter_name in self.ia3_l:
            del self.ia3_l[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._base_forward(x, *args, **kwargs)
        if base is not None:
            return base
        scale = self.ia3_l[self.active_adapter].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``ia3_l`` shaped to broadcast over the base weight (``nn.Linear``: (out, in); ``Conv1D``: (in, out))."""
        scale = self.ia3_l[adapter_name].detach()
        return scale.t() if self.fan_in_fan_out else scale

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        """Weight (and, for output scaling, bias) times the scaling, computed in the wider dtype as peft does."""
        w = self.base_layer.weight
        new_w = w * self._weight_scale(adapter_name)
        b = getattr(self.base_layer, "bias", None)
        new_b = None
        if b is not None and not self.is_feedforward:
            new_b = b * self.ia3_l[adapter_name].detach().reshape(b.shape)
        if safe_merge and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        w.copy_(new_w)
        if new_b is not None:
            b.copy_(new_b)

    def _unmerge_one(self, adapter_name: str) -> None:
        """Divide by the scaling again; like peft, 1e-8 is added to it against division by zero (a zero entry
        cannot be undone: those weights stay zero)."""
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=3)
        w = self.base_layer.weight
        w.copy_(w / (self._weight_scale(adapter_name) + 1e-8))
        b = getattr(self.base_layer, "bias", None)
        if b is not None and not self.is_feedforward:
            b.copy_(b / (self.ia3_l[adapter_name].detach().reshape(b.shape) + 1e-8))


class IA3Tuner(MultiAdapterTuner):
    """``base_model`` of an (IA)³ model: injects :class:`IA3Linear` into the targeted layers (a layer adapted
    already gets the new adapter's vector beside the others)."""

    def _apply_method(self, config: IA3Config, adapter_name: str) -> None:
        if config.target_modules is None:
            config.target_modules = self.model_type_default(IA3_TARGETS, "target_modules", "IA3",
                                                            "target_modules and feedforward_modules")
        if config.feedforward_modules is None:
            config.feedforward_modules = self.model_type_default(IA3_FEEDFORWARD, "feedforward_modules", "IA3",
                                                                 "feedforward_modules")
        for key, module in self.linear_targets(config, "IA3", layer_cls=IA3Linear):
            ff = config.feedforward_modules
            is_ff = bool(re.fullmatch(ff, key)) if isinstance(ff, str) else any(key.endswith(t) for t in ff)
            if isinstance(module, IA3Linear):
                if is_ff != module.is_feedforward:
                    warnings.warn(f"{key!r} already scales its {'inputs' if module.is_feedforward else 'outputs'} "
                                  f"for another adapter; adapter {adapter_name!r} does the same there (as in peft)",
                                  stacklevel=4)
                module.update_layer(adapter_name, config.init_ia3_weights)
                continue
            if is_conv1d(module) != config.fan_in_fan_out:
                warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} but {key!r} is {type(module).__name__}; "
                              f"using fan_in_fan_out={is_conv1d(module)}", stacklevel=4)
                config.fan_in_fan_out = is_conv1d(module)
            self.replace_module(key, IA3Linear(module, adapter_name, is_ff, config.init_ia3_weights))


class IA3PeftModel(MultiAdapterPeftModel):
    """A transformers model with (IA)³ vectors, peft's ``PeftModel`` layout and saved format."""

    tuner_class = IA3Tuner
