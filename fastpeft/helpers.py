"""peft's ``peft.helpers`` for fastpeft models: ``rescale_adapter_scale`` (WiSE-FT-style scaling of every LoRA
adapter inside a block), ``check_if_peft_model``, and ``update_forward_signature`` / ``update_generate_signature``
/ ``update_signature`` (the base model's signature and docstring on the wrapper's ``forward`` / ``generate``, for
``help()`` and IDEs), ``disable_input_dtype_casting``. Same names, arguments and errors as peft's; they also
accept peft's own LoRA layers (a model converted with ``fastpeft.from_peft`` keeps some)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from copy import deepcopy
from functools import update_wrapper
from types import MethodType

from torch import nn


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """fastpeft's LoRA layers of ``model`` (linear, 4-bit, embedding, convolution, parameter wrappers), and peft's
    LoRA layers if peft is installed and the model holds some."""
    from .model import _LORA_LAYERS

    kinds: tuple[type, ...] = _LORA_LAYERS
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional
        pass
    else:
        kinds = (*kinds, LoraLayer)
    return [m for m in model.modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Inside the block every LoRA adapter's ``scaling`` is multiplied by ``multiplier``; the old values come back
    on exit, exception or not (peft's helper). With ``multiplier`` in [0, 1] this is WiSE-FT, the interpolation
    between the base and the fine-tuned model.

    Raises ``TypeError`` for a multiplier that is not a float or int and ``ValueError`` for a model without LoRA
    layers, as peft. Adapters merged into the base weights are not rescaled (their delta is in the weight; peft
    does the same): a warning says so, and unmerging inside the block would take out the rescaled delta, so
    unmerge before entering it.

    Example::

        with rescale_adapter_scale(model, 0.5):
            logits = model(**batch).logits
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    merged = [type(m).__name__ for m in layers if getattr(m, "merged_adapters", None)]
    if merged:
        warnings.warn(f"{len(merged)} LoRA layer(s) hold merged adapters, which rescale_adapter_scale does not "
                      "rescale (their delta is in the base weight); unmerge_adapter() first to rescale them, and do "
                      "not unmerge inside the block", stacklevel=3)
    original = {}
    for module in layers:
        original[module] = module.scaling
        module.scaling = {name: value * multiplier for name, value in module.scaling.items()}
    try:
        yield
    finally:
        for module, scaling in original.items():
            module.scaling = scaling


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """peft's helper: inside the block, adapter layers do not cast their input to the adapter weights' dtype (for
    hooks that manage dtypes themselves, e.g. diffusers' layerwise casting); restored on exit.

    fastpeft's fused layers never make that cast: the op reads ``x`` in its own dtype and accumulates in fp32
    with the adapter weights as they are, so for them the block changes nothing. peft's own tuner layers that
    a model holds (a partly converted model) get peft's ``cast_input_dtype_enabled`` switched off, as peft's
    helper does. ``active=False`` makes the block do nothing."""
    if not active:
        yield
        return
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional: without it only fastpeft's layers exist
        BaseTunerLayer = ()  # noqa: N806
    original = {m: m.cast_input_dtype_enabled for m in model.modules()
                if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled")}
    for module in original:
        module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, value in original.items():
            module.cast_input_dtype_enabled = value


def check_if_peft_model(model_name_or_path: str) -> bool:
    """True when ``model_name_or_path`` (a local folder or a Hub repo id) holds a peft/fastpeft adapter config
    (``adapter_config.json``), False otherwise, whatever went wrong while looking (peft's helper)."""
    from .api import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # noqa: BLE001 — peft's contract: any failure means "not a peft model"
        return False
    return True


def _only_passthrough(func) -> bool:
    """Whether ``func`` takes only ``*args`` / ``**kwargs`` (and fastpeft's ``adapter_names`` keyword)."""
    params = inspect.signature(func).parameters.values()
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return any(p.kind == p.VAR_KEYWORD for p in params) and all(p.name == "adapter_names" for p in named)


def _copy_signature(model: nn.Module, method: str) -> None:
    bound = getattr(model, method)
    func = deepcopy(bound.__func__)
    update_wrapper(func, getattr(type(model.get_base_model()), method),
                   assigned=("__doc__", "__name__", "__annotations__"))
    setattr(model, method, MethodType(func, model))


def update_forward_signature(model: nn.Module) -> None:
    """Give ``model.forward`` the base model's signature and docstring when it shows only ``*args, **kwargs``
    (peft's helper; fastpeft's task classes already show the base's)."""
    if _only_passthrough(model.forward):
        _copy_signature(model, "forward")


def update_generate_signature(model: nn.Module) -> None:
    """Give ``model.generate`` the base model's signature and docstring (peft's helper; fastpeft's ``generate``
    also takes ``adapter_names``, which it keeps accepting)."""
    if not hasattr(model, "generate") or not hasattr(type(model.get_base_model()), "generate"):
        return
    if _only_passthrough(model.generate):
        _copy_signature(model, "generate")


def update_signature(model: nn.Module, method: str = "all") -> None:
    """``update_forward_signature`` ("forward"), ``update_generate_signature`` ("generate") or both ("all")."""
    if method == "forward":
        update_forward_signature(model)
    elif method == "generate":
        update_generate_signature(model)
    elif method == "all":
        update_forward_signature(model)
        update_generate_signature(model)
    else:
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")


__all__ = ["check_if_peft_model", "disable_input_dtype_casting", "rescale_adapter_scale", "update_forward_signature",
           "update_generate_signature", "update_signature"]
