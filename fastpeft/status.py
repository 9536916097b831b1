"""``get_layer_status`` / ``get_model_status``: peft's overview of a model's adapters, for fastpeft models.

The same dataclasses and fields as peft's (``TunerLayerStatus``, ``TunerModelStatus``), built from fastpeft's
LoRA layers, the other methods' layers, trainable-token layers and modules_to_save wrappers: per layer whether
adapters are enabled, which are active, merged,
trainable (``"irregular"`` where a layer's parameters disagree), available, and on which devices; per
model the same summed up (``"irregular"`` where layers disagree), with the parameter counts.

Example::

    from fastpeft import get_model_status
    print(get_model_status(model))   # TunerModelStatus(base_model_type='LlamaForCausalLM', ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer's state (peft's fields)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The whole model's adapter state (peft's fields)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular] = None


def _agree(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _grads(per_adapter: dict[str, list]) -> dict[str, Union[bool, Irregular]]:
    return {n: _agree([p.requires_grad for p in ps]) for n, ps in per_adapter.items()}


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus | None:
    from .layers.switches import AdapterSwitches
    from .layers.tokens import TrainableTokensLayer
    from .methods.base import AdapterLayer
    from .model import ModulesToSaveWrapper

    module_type = f"fastpeft.{type(module).__name__}"
    if isinstance(module, AdapterSwitches):  # FastLoraLinear (4-bit too), FastLoraEmbedding, FastLoraConv, ...
        per_adapter = {n: list(module._adapter_parameters(n)) for n in module._adapter_names()}
        enabled, active, merged = not module.disable_adapters, list(module.active_adapters), module.merged_adapters
    elif isinstance(module, AdapterLayer):  # the other methods' layers (IA3, AdaLoRA, bottleneck, LN tuning, ...)
        # (tensors that never train, AdaLoRA's ranknum, are left out of requires_grad, as in peft)
        containers = [getattr(module, n) for n in module.adapter_param_names
                      if n not in getattr(module, "fixed_param_names", ())]
        per_adapter = {n: [p for c in containers if n in c
                           for p in ([c[n]] if isinstance(c[n], nn.Parameter) else c[n].parameters())]
                       for n in (list(containers[0]) if containers else [])}
        enabled, merged = not module.disable_adapters, module.merged_adapters
        active = [module.active_adapter] if module.active_adapter in per_adapter else []
    elif isinstance(module, TrainableTokensLayer):  # trainable rows (TrainableTokensConfig, trainable_token_indices)
        per_adapter = {n: [p] for n, p in module.trainable_tokens_delta.items()}
        module_type, enabled = "TrainableTokensLayer", not module.disable_adapters
        active, merged = list(module.active_adapters), module.merged_adapters
    elif isinstance(module, ModulesToSaveWrapper):
        per_adapter = {n: list(m.parameters()) for n, m in module.modules_to_save.items()}
        module_type, enabled, merged = "ModulesToSaveWrapper", not module._disable_adapters, []
        active = [module.active_adapter] if module.active_adapter in module.modules_to_save else []
    else:
        return None
    return TunerLayerStatus(name=name, module_type=module_type, enabled=enabled, active_adapters=active,
                            merged_adapters=list(merged), requires_grad=_grads(per_adapter),
                            available_adapters=sorted(per_adapter),
                            devices={n: sorted({p.device.type for p in ps}) for n, ps in per_adapter.items()})


def enabled_state(root: nn.Module) -> Union[bool, Irregular]:
    """Whether the adapter layers under ``root`` (LoRA and the other methods' layers, trainable-token layers,
    modules_to_save wrappers) are switched on: True, False, or ``"irregular"`` when they disagree (what
    ``get_model_status().enabled`` says, without the rest of the status); True when there are none."""
    from .layers.switches import AdapterSwitches
    from .layers.tokens import TrainableTokensLayer
    from .methods.base import AdapterLayer
    from .model import ModulesToSaveWrapper

    flags = set()
    for module in root.modules():
        if isinstance(module, ModulesToSaveWrapper):
            flags.add(not module._disable_adapters)
        elif isinstance(module, (AdapterSwitches, AdapterLayer, TrainableTokensLayer)):
            flags.add(not module.disable_adapters)
    if len(flags) > 1:
        return "irregular"
    return flags.pop() if flags else True


def _refuse_prompt_learning(model: nn.Module, what: str) -> None:
    """peft's TypeError for a prompt-learning model (virtual tokens: no adapter layers to report)."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise TypeError(f"{what}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not "
                        "supported.")


def _is_peft_model(model: nn.Module) -> bool:
    """A peft ``PeftModel`` (or a module carrying peft's tuner), not a fastpeft one."""
    return type(model).__module__.startswith("peft.") or \
        type(getattr(model, "base_model", None)).__module__.startswith("peft.")


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The state of every LoRA layer and modules_to_save wrapper of ``model`` (a fastpeft ``PeftModel`` or a
    module holding fastpeft layers), named as peft names them (relative to ``model.base_model``)."""
    from .model import PeftModel

    if _is_peft_model(model):  # a peft model (fastpeft.from_peft keeps it one): peft's own account of it
        import peft

        return peft.get_layer_status(model)
    _refuse_prompt_learning(model, "get_layer_status")
    root = model.base_model if isinstance(model, PeftModel) else model
    out = [s for name, module in root.named_modules() if (s := _layer_status(name, module)) is not None]
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """``model``'s adapter state summed over its layers (see the module docstring)."""
    from .model import PeftModel, count_parameters

    if _is_peft_model(model):  # a peft model (fastpeft.from_peft keeps it one): peft's own account of it
        import peft

        return peft.get_model_status(model)
    _refuse_prompt_learning(model, "get_model_status")
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        adapter_type = type(model.base_model).__name__
        if adapter_type.endswith("Tuner"):  # the other methods' tuners, by peft's names (IA3Model, AdaLoraModel, ...)
            adapter_type = adapter_type[: -len("Tuner")] + "Model"
        peft_types = {n: str(getattr(c, "peft_type", "LORA")) for n, c in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        from transformers import PreTrainedModel

        # peft's names: a transformers model by its class, any other module as "other"
        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_type, peft_types = "None", {}
        trainable, total = count_parameters(model)
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = {n for s in layers for n in s.merged_adapters}
    merged: Union[list[str], Irregular] = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list] = {}
    devices: dict[str, set] = {}
    for s in layers:
        for n, v in s.requires_grad.items():
            grads.setdefault(n, []).append(v)
        for n, v in s.devices.items():
            devices.setdefault(n, set()).update(v)
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged, requires_grad={n: _agree(v) for n, v in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={n: sorted(v) for n, v in devices.items()}, quantization_backend=None)
