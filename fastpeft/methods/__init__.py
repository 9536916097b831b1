"""The PEFT methods other than LoRA (prompt, prefix, P-tuning, BitFit, Freeze, adapters, IA3, AdaLoRA, standalone
trainable tokens, LayerNorm tuning).

``fastpeft.get_peft_model`` and ``fastpeft.PeftModel.from_pretrained`` hand every non-LoRA config to
:func:`get_method_model` / :func:`from_pretrained` here. Each method runs in plain PyTorch, behind peft's API,
and saves ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's format where peft has the method.

Example::

    from fastpeft import get_peft_model
    from fastpeft.methods import build_config
    model = get_peft_model(model, build_config("prefix", num_virtual_tokens=20, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

Training loops: for AdaLoRA call ``model.update_and_allocate(global_step)`` after ``optimizer.step()`` and
before ``optimizer.zero_grad()`` (see :func:`step_hook`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .configs import (
    AdaLoraConfig,
    BitFitConfig,
    BottleneckConfig,
    FreezeConfig,
    IA3Config,
    LNTuningConfig,
    MethodConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TrainableTokensConfig,
    config_from_dict,
)
from .prompt import PrefixEncoder, PromptEmbedding, PromptEncoder

__all__ = [
    "AdaLoraConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "FreezeConfig",
    "IA3Config",
    "LNTuningConfig",
    "METHODS",
    "MethodConfig",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TrainableTokensConfig",
    "build_config",
    "from_pretrained",
    "get_method_model",
    "step_hook",
]

# method name (as `fastpeft train --method` spells it) -> config class
METHODS: dict[str, type[MethodConfig]] = {
    "prompt": PromptTuningConfig,
    "ptuning": PromptEncoderConfig,
    "prefix": PrefixTuningConfig,
    "bitfit": BitFitConfig,
    "freeze": FreezeConfig,
    "adapter": BottleneckConfig,
    "ia3": IA3Config,
    "adalora": AdaLoraConfig,
    "trainable_tokens": TrainableTokensConfig,
    "ln_tuning": LNTuningConfig,
}

# short option names accepted by build_config, per method
_ALIASES: dict[str, dict[str, str]] = {
    "prompt": {"init_text": "prompt_tuning_init_text", "init": "prompt_tuning_init"},
    "ptuning": {"encoder_type": "encoder_reparameterization_type", "hidden_size": "encoder_hidden_size"},
    "prefix": {"projection": "prefix_projection", "hidden_size": "encoder_hidden_size"},
    "adapter": {"r": "bottleneck_size", "dropout": "adapter_dropout"},
    "freeze": {"num_layers": "num_trainable_layers", "target_modules": "trainable_modules"},
    "adalora": {"r": "init_r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
    "ia3": {},
    "bitfit": {},
    "trainable_tokens": {},
    "ln_tuning": {},
}


def _model_class(config: MethodConfig):
    """The method's model class as the task class of ``config.task_type`` (see :mod:`fastpeft.tasks`)."""
    from ..tasks import with_task

    return with_task(_method_class(config), config.task_type)


def _method_class(config: MethodConfig):
    peft_type = config.peft_type
    if config.is_prompt_learning:
        from .prompt import PromptLearningPeftModel

        return PromptLearningPeftModel
    if peft_type == "IA3":
        from .ia3 import IA3PeftModel

        return IA3PeftModel
    if peft_type == "BITFIT":
        from .select import BitFitPeftModel

        return BitFitPeftModel
    if peft_type == "FREEZE":
        from .select import FreezePeftModel

        return FreezePeftModel
    if peft_type == "BOTTLENECK":
        from .bottleneck import BottleneckPeftModel

        return BottleneckPeftModel
    if peft_type == "ADALORA":
        from .adalora import AdaLoraPeftModel

        return AdaLoraPeftModel
    if peft_type == "TRAINABLE_TOKENS":
        from .trainable_tokens import TrainableTokensPeftModel

        return TrainableTokensPeftModel
    if peft_type == "LN_TUNING":
        from .ln_tuning import LNTuningPeftModel

        return LNTuningPeftModel
    raise TypeError(f"fastpeft has no model for peft_type {peft_type!r}")


def _coerce_config(config: Any) -> MethodConfig:
    if isinstance(config, MethodConfig):
        return config
    module = type(config).__module__
    if module.startswith("peft.") and hasattr(config, "to_dict"):  # a peft config object: read its fields
        data = {k: getattr(v, "value", v) for k, v in config.to_dict().items()}
        data.pop("runtime_config", None)
        return config_from_dict(data)
    raise TypeError(f"fastpeft.get_peft_model does not support {type(config).__name__}; pass fastpeft.LoraConfig or "
                    f"one of fastpeft.methods' configs ({', '.join(c.__name__ for c in METHODS.values())})")


def get_method_model(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` for the PEFT method ``config`` describes (called by ``fastpeft.get_peft_model``).

    ``config`` is one of this package's configs (or the peft config of the same name, read field by field).
    Raises ``ValueError`` for a config that does not fit the model or its task type.
    """
    import copy

    config = copy.copy(_coerce_config(config))
    if type(model).__module__.startswith("peft."):
        raise ValueError("model is already a peft PeftModel; pass the plain transformers model")
    from ..model import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("model is already a fastpeft PeftModel; pass the plain transformers model")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"invalid adapter name {adapter_name!r}")
    return _model_class(config)(model, config, adapter_name)


def from_pretrained(model: nn.Module, model_id: str | os.PathLike, peft_type: str, adapter_name: str = "default",
                    is_trainable: bool = False, **kwargs) -> nn.Module:
    """Load a saved non-LoRA adapter folder (``peft_type`` read from its ``adapter_config.json``) onto ``model``.

    Folders written by peft load as well as fastpeft's own. Keyword arguments: ``config`` (use this config instead
    of the saved one), ``allow_pickle`` (accept ``adapter_model.bin``, read with ``weights_only=True``).
    """
    from .configs import CONFIG_CLASSES, read_config_dict

    if peft_type not in CONFIG_CLASSES:
        raise ValueError(f"this adapter config has peft_type {peft_type!r}; fastpeft cannot load it (it loads LORA "
                         f"and {sorted(CONFIG_CLASSES)})")
    config = kwargs.pop("config", None)
    if config is None:
        config = config_from_dict(read_config_dict(model_id))
    return _model_class(config).from_pretrained(model, model_id, adapter_name=adapter_name,
                                                is_trainable=is_trainable, config=config, **kwargs)


def build_config(method: str, **options) -> MethodConfig:
    """The config for ``method`` (``prefix|prompt|ptuning|bitfit|freeze|adapter|ia3|adalora|trainable_tokens|
    ln_tuning``) from CLI options.

    Options are the config's own field names (``num_virtual_tokens``, ``target_modules``, ``task_type``, …) plus a
    few short spellings: ``r`` (bottleneck size for ``adapter``, ``init_r`` for ``adalora``), ``alpha``,
    ``dropout``, ``num_layers`` (Freeze's last k blocks), ``hidden_size``, ``projection``, ``init_text``. Options
    that are None are dropped (so a CLI can pass its defaults through). Unknown options raise ``ValueError``.

    Example::

        build_config("prefix", num_virtual_tokens=20, projection=True, task_type="CAUSAL_LM")
        build_config("adalora", r=12, target_r=4, total_step=1000, target_modules=["q_proj", "v_proj"])
    """
    import dataclasses

    key = method.lower().replace("-", "_")
    key = {"prompt_tuning": "prompt", "p_tuning": "ptuning", "prefix_tuning": "prefix", "bottleneck": "adapter",
           "p_tuning_v2": "prefix"}.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)} (or 'lora')")
    cls = METHODS[key]
    aliases = _ALIASES.get(key, {})
    fields = {f.name for f in dataclasses.fields(cls)} - {"extra", "peft_type"}
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        real = aliases.get(name, name)
        if real not in fields:
            raise ValueError(f"option {name!r} does not apply to method {key!r}; its options are "
                             f"{sorted(fields | set(aliases))}")
        kwargs[real] = value
    return cls(**kwargs)


def step_hook(model: nn.Module) -> Callable[[int], None] | None:
    """The per-step callback a training loop must call after ``optimizer.step()`` (before ``zero_grad()``), or None.

    For AdaLoRA this is ``model.update_and_allocate``; other methods need none. Example::

        hook = fastpeft.methods.step_hook(model)
        for step, batch in enumerate(loader):
            model(**batch).loss.backward(); optimizer.step()
            if hook is not None:
                hook(step)
            optimizer.zero_grad()
    """
    fn = getattr(model, "update_and_allocate", None)
    return fn if callable(fn) and getattr(model, "needs_step_hook", False) else None
