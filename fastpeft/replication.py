"""``LoraConfig(layer_replication=...)``: repeat decoder layers with shared weights before adapting them
(peft's option; the idea of growing a model by stacking copies of its own layers, as LLaMA Pro does).

``[[0, 4], [2, 5]]`` turns layers ``0..4`` into ``0, 1, 2, 3, 2, 3, 4``: every entry of the new list is a copy of
an original layer whose parameters *are* the original's (no copy of any weight; buffers are copied, as peft
does), so the model grows by the adapters only, and each position gets its own LoRA adapters. Attention modules'
``layer_idx`` is renumbered so the KV cache holds one entry per position, and the config's
``num_hidden_layers`` (and ``layer_types``, where the config has one entry per layer) follows.

Differences from peft 0.21, on purpose:

- Merging (``merge_adapter``, ``merge_and_unload``) is refused on
  such a model: a copy's adapter merged into the shared weight would change every copy. peft means to refuse
  too, but its check reads ``peft_config.get("layer_replication")`` on the dict of adapters and never fires.
- The layer list is also found under ``.transformer`` (GPT-2, Falcon, BLOOM: ``transformer.h``), and
  ``layer_types`` is replicated with the layers (peft leaves it at the old length, which newer transformers
  models such as Qwen3 read per layer).
- A second adapter whose config asks for the same replication finds the model replicated and leaves it as it
  is; one asking for another replication is refused (peft would replicate the replicated list again).
"""

from __future__ import annotations

import copy

from torch import nn

_DONE = "_fastpeft_layer_replication"  # on the model: the map it was replicated with


def _find_layers(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the backbone whose config is updated, the module holding the layer list, the attribute's name)."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    for attr in ("transformer", "bert"):
        if isinstance(getattr(inner, attr, None), nn.Module):
            inner = getattr(inner, attr)
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return inner, owner, attr
    raise ValueError("Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon "
                     "compatible architectures (a ModuleList at [.model…].layers, .encoder.layer, or "
                     "[.transformer].h).")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are ``layer``'s own objects (nothing of the weights copied)."""
    return copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """Replace ``model``'s decoder layer list by the concatenated ranges ``[start, end)`` of ``layer_map``, the
    copies sharing the originals' parameters (peft's ``replicate_layers``). Called by ``get_peft_model`` for
    ``LoraConfig(layer_replication=...)``; a model already replicated with the same map is left as it is."""
    done = getattr(model, _DONE, None)
    if done is not None:
        if [list(p) for p in layer_map] != done:
            raise ValueError(f"this model's layers were already replicated with layer_replication={done}; an "
                             f"adapter asking for {layer_map} would need another model")
        return
    backbone, owner, attr = _find_layers(model)
    layers = getattr(owner, attr)
    for start, end in layer_map:
        if not 0 <= start < end <= len(layers):
            raise ValueError(f"layer_replication range [{start}, {end}] does not fit the model's {len(layers)} "
                             "layers")
    new_layers = []
    for start, end in layer_map:
        for i in range(start, end):
            copy_ = _shared_copy(layers[i])
            for module in copy_.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new_layers)
            new_layers.append(copy_)
    setattr(owner, attr, nn.ModuleList(new_layers))
    for config in {id(c): c for c in (getattr(backbone, "config", None), getattr(model, "config", None))
                   if c is not None}.values():
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(layers):
            config.layer_types = [types[i] for start, end in layer_map for i in range(start, end)]
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(new_layers)
    setattr(model, _DONE, [list(p) for p in layer_map])


def check_merge_allowed(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model``'s layers were replicated (its weights are shared between layers)."""
    if getattr(model, _DONE, None) is not None:
        raise ValueError("Cannot merge LORA layers when base model layers are replicated: the copies share their "
                         "weights, so one layer's adapter merged into them would change every copy")
