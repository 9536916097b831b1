"""The base model's own state dict from a fastpeft model, under the base model's original keys (peft's
``get_base_model_state_dict`` / ``set_base_model_state_dict``).

Injecting adapters renames the base's tensors: ``q_proj.weight`` becomes ``q_proj.base_layer.weight``, a
``modules_to_save`` module's ``lm_head.weight`` becomes ``lm_head.original_module.weight``, trainable tokens put
``token_adapter.base_layer`` in front of the embedding's weight. These functions undo that for reading the base's
weights out (a checkpoint of the base, FSDP flows that load base weights after wrapping) and for writing them
back. The renaming is found by walking the module tree, so a name that happens to contain ``base_layer`` in the
original model is left alone: only the infixes fastpeft's own layers and wrappers add are dropped, and everything
else those layers hold (LoRA factors, DoRA magnitudes, ``modules_to_save`` copies, token rows, IA3 vectors,
bottleneck adapters, AdaLoRA triplets) is the adapters', not the base's.
"""

from __future__ import annotations

from torch import Tensor, nn


def _kinds() -> tuple[tuple[type, ...], dict[type, str]]:
    """(adapter layers, whose ``base_layer`` is the original module; {wrapper class: the child holding the
    original module})."""
    from .layers import FastLoraConv, FastLoraEmbedding, FastLoraLinear
    from .layers.param import FastLoraParamWrapper
    from .layers.tokens import TrainableTokensLayer, TrainableTokensWrapper
    from .methods.base import AdapterLayer
    from .model import ModulesToSaveWrapper

    layers = (FastLoraLinear, FastLoraEmbedding, FastLoraConv, FastLoraParamWrapper, TrainableTokensLayer, AdapterLayer)
    return layers, {ModulesToSaveWrapper: "original_module", TrainableTokensWrapper: "token_adapter"}


def _root(model: nn.Module) -> nn.Module:
    """The base model with the adapter layers inside (a ``PeftModel``'s, or a plain model with injected ones)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _original_key(root: nn.Module, key: str, kinds) -> str | None:
    """``key`` of ``root``'s state dict without the infixes fastpeft added, or None for an adapter's tensor."""
    layers, wrappers = kinds
    parts = key.split(".")
    kept: list[str] = []
    current: nn.Module | None = root
    for i, part in enumerate(parts):
        child = current._modules.get(part) if current is not None else None
        inner = next((name for cls, name in wrappers.items() if isinstance(current, cls)), None)
        if isinstance(current, layers) or inner is not None:
            if part != ("base_layer" if inner is None else inner) or child is None:
                return None  # the layer's or wrapper's own (adapter) tensors
            current = child
            continue
        if child is None:  # a parameter or buffer of an ordinary module
            kept.extend(parts[i:])
            break
        kept.append(part)
        current = child
    return ".".join(kept)


def get_base_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's tensors under its original keys (peft's function): what ``base.state_dict()`` gave
    before the adapters were injected, with the current values (a merged adapter is in them, as in peft).
    ``model``: a fastpeft ``PeftModel`` (any method; prompt learning leaves the base's keys as they were) or a
    plain model with adapters from ``inject_adapter_in_model``. Tensors are the model's own (not copies).

    Example::

        torch.save(fastpeft.get_base_model_state_dict(model), "base.pt")
    """
    root, kinds = _root(model), _kinds()
    out: dict[str, Tensor] = {}
    for key, value in root.state_dict().items():
        original = _original_key(root, key, kinds)
        if original is not None:
            out[original] = value
    return out


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load ``state_dict``, keyed as the original base model (as :func:`get_base_model_state_dict` returns it),
    into the base model's tensors of ``model`` (peft's function); adapter tensors are not touched. ``strict``:
    raise ``RuntimeError`` naming missing and unexpected keys (as ``nn.Module.load_state_dict``), before
    anything is loaded. Returns ``(missing_keys, unexpected_keys)`` as torch's ``_IncompatibleKeys``.
    """
    from torch.nn.modules.module import _IncompatibleKeys

    root, kinds = _root(model), _kinds()
    to_model: dict[str, str] = {}
    for key in root.state_dict():
        original = _original_key(root, key, kinds)
        if original is not None:
            to_model[original] = key
    unexpected = [k for k in state_dict if k not in to_model]
    missing = [k for k in to_model if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = []
        if missing:
            msgs.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    root.load_state_dict({to_model[k]: v for k, v in state_dict.items() if k in to_model}, strict=False)
    return _IncompatibleKeys(missing, unexpected)
