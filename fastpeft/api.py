"""peft's remaining top-level functions, for fastpeft's methods: :func:`inject_adapter_in_model`,
:func:`load_peft_weights`, :func:`get_peft_config`, :func:`cast_mixed_precision_params`, and :class:`PeftType` with
:data:`PEFT_TYPE_TO_CONFIG_MAPPING`.

Example (adapter layers in a plain module, no ``PeftModel`` wrapper, as with peft)::

    from fastpeft import LoraConfig, inject_adapter_in_model, get_peft_model_state_dict, set_peft_model_state_dict
    model = inject_adapter_in_model(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), model)
    state = get_peft_model_state_dict(model)        # keys relative to the plain model, as peft's
    set_peft_model_state_dict(model, load_peft_weights("out"))   # weights saved from a model of the same layout
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .config import LoraConfig, PeftType


def _config_classes() -> dict[PeftType, type]:
    from .methods.configs import CONFIG_CLASSES

    out: dict[PeftType, type] = {PeftType.LORA: LoraConfig}
    for name, cls in CONFIG_CLASSES.items():
        out[PeftType(name)] = cls
    return out


PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type] = _config_classes()
"""peft's mapping of ``peft_type`` to the config class, for the types fastpeft builds (a ``"LORA"`` string looks
up as ``PeftType.LORA``)."""


def _peft_type(config: Any) -> str:
    value = getattr(config, "peft_type", None)
    return str(getattr(value, "value", value))


def get_peft_config(config_dict: dict[str, Any]):
    """peft's ``get_peft_config``: the config object that ``config_dict["peft_type"]`` names, built from the dict
    (what ``config.to_dict()`` or an ``adapter_config.json`` holds; peft fields fastpeft does not know are kept, as
    when reading ``adapter_config.json``). A missing or unsupported ``peft_type`` raises ``ValueError``."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"get_peft_config takes a dict, got {type(config_dict).__name__}")
    if "peft_type" not in config_dict:
        raise ValueError(f"config_dict has no 'peft_type' (keys: {sorted(config_dict)}); it names the method, "
                         f"one of {[t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING]}")
    peft_type = str(getattr(config_dict["peft_type"], "value", config_dict["peft_type"]))
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"peft_type {peft_type!r} is not one fastpeft builds; it builds "
                         f"{[t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING]}")
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_dict(dict(config_dict))


def _config_bases() -> tuple[type, ...]:
    from .methods.configs import MethodConfig

    return (LoraConfig, MethodConfig)


class _PeftConfigMeta(type):
    """``isinstance(config, PeftConfig)`` / ``issubclass(cls, PeftConfig)`` hold for every fastpeft config."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _config_bases())

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and (sub is cls or issubclass(sub, _config_bases()))


class PeftConfig(metaclass=_PeftConfigMeta):
    """peft's ``PeftConfig`` as users call it: ``PeftConfig.from_pretrained(adapter)`` reads any adapter's
    ``adapter_config.json`` into the config class its ``peft_type`` names, and ``isinstance(config, PeftConfig)``
    holds for every fastpeft config (``LoraConfig``, ``IA3Config``, ...). Not built directly (build a method's
    config); fastpeft's configs do not inherit from it."""

    def __init__(self, *args, **kwargs):
        raise TypeError("fastpeft.PeftConfig is not built directly: build the method's config (LoraConfig, "
                        "IA3Config, ...) or read one with PeftConfig.from_pretrained(adapter)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs):
        """The config in ``pretrained_model_name_or_path`` (a folder, an ``adapter_config.json`` or a Hub repo id,
        with peft's Hub keywords ``revision``, ``token``, ``cache_dir``, ...), as the class its ``peft_type`` names.
        As peft's: keywords naming ``PeftConfig`` fields (``task_type``, ``inference_mode``, ...) fill those the
        file lacks, other keywords are ignored with a warning."""
        from .config import config_data_for

        data = config_data_for(cls, pretrained_model_name_or_path, subfolder, kwargs)
        data.setdefault("peft_type", "LORA")
        return get_peft_config(data)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs) -> dict[str, Any]:
        """peft's: the JSON object in ``path_json_file`` (``runtime_config`` dropped with peft's warning)."""
        return LoraConfig.from_json_file(path_json_file, **kwargs)

    @classmethod
    def from_peft_type(cls, **kwargs):
        """peft's: the config ``kwargs["peft_type"]`` names, built from ``kwargs`` (``peft_type`` is required here:
        ``PeftConfig`` itself is never built)."""
        if "peft_type" not in kwargs:
            raise ValueError("PeftConfig.from_peft_type needs peft_type= (fastpeft builds the method's own config)")
        return get_peft_config(dict(kwargs))


def _modules_named_by(state_dict: dict[str, torch.Tensor], prefix: str) -> set[str]:
    """peft's reading of a state dict: the module names before ``.<prefix>`` in its keys."""
    return {k.rsplit("." + prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}


def inject_adapter_in_model(peft_config, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """peft's ``inject_adapter_in_model``: put adapter layers for ``peft_config`` into ``model`` in place and
    return ``model`` itself (no ``PeftModel`` wrapper).

    As peft: the base parameters are frozen and the adapter trainable (unless ``inference_mode``),
    ``modules_to_save`` are wrapped, and ``model.peft_config`` holds ``{adapter_name: config}`` (adapters injected
    by earlier calls kept), so ``get_peft_model_state_dict(model)`` and ``set_peft_model_state_dict(model, ...)``
    work on the plain model (keys relative to ``model``). Prompt-learning configs are refused, as in peft; several
    adapters in one plain model are LoRA only (fastpeft's other methods hold one adapter per model).

    ``state_dict``: adapt the modules its keys name (``<module>.lora_A.weight``, ...; only the keys are read)
    instead of the config's ``target_modules``, warning where the two disagree, as peft (LoRA only).
    ``low_cpu_mem_usage``: peft creates the adapter weights on the meta device to load them faster; fastpeft
    creates them as usual (the same weights once loaded) and says so in a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .config import from_peft_lora_config

    peft_config = from_peft_lora_config(peft_config)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError("`create_and_replace` does not support prompt learning, adaption prompt and shadow yet "
                         f"({type(peft_config).__name__}); use get_peft_model")
    from .model import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("model is a fastpeft PeftModel; use model.add_adapter(name, config) to add an adapter")
    existing = getattr(model, "peft_config", None)
    existing = dict(existing) if isinstance(existing, dict) else {}
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} is already injected in this model; pick another name")
    if existing:
        warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                      "adapters in the model. Make sure to know what you are doing!", stacklevel=2)
    if low_cpu_mem_usage:
        warnings.warn("low_cpu_mem_usage=True: fastpeft creates the adapter weights on the base layers' device "
                      "(peft creates them empty on the meta device); loading weights into them works the same",
                      stacklevel=2)
    if existing and (not isinstance(peft_config, LoraConfig)
                     or any(_peft_type(c) != "LORA" for c in existing.values())):
        raise NotImplementedError(f"this model already holds adapters {list(existing)}; fastpeft injects further "
                                  "adapters into a plain model for LoRA only (its other methods hold one adapter "
                                  "per model)")
    if isinstance(peft_config, LoraConfig):
        tuner = _inject_lora(peft_config, model, adapter_name, state_dict)
    else:
        from .methods import _coerce_config, _method_class

        config = _coerce_config(peft_config)
        model_class = _method_class(config)
        tuner_class = getattr(model_class, "tuner_class", None)
        if tuner_class is None:
            raise ValueError(f"`inject_adapter_in_model` does not support {_peft_type(config)} yet. "
                             "Please use `get_peft_model`.")
        if state_dict is not None:
            raise NotImplementedError(f"inject_adapter_in_model(state_dict=...) is implemented for LoRA only; for "
                                      f"{_peft_type(config)} leave state_dict out (the config's target_modules "
                                      "choose the layers)")
        import copy

        tuner = tuner_class(model, copy.copy(config), adapter_name)
        # kept (outside the module tree) for get_peft_model_state_dict / set_peft_model_state_dict on the model
        model._fastpeft_method_tuners = {adapter_name: tuner}
    model.peft_config = {**existing, **tuner.peft_config}
    return model


def _inject_lora(config: LoraConfig, model: nn.Module, adapter_name: str,
                 state_dict: dict[str, torch.Tensor] | None):
    from .model import LoraModel

    return LoraModel(model, config, adapter_name, state_dict=state_dict)


def lora_configs_for_state_dict(config: LoraConfig, model: nn.Module, state_dict: dict[str, torch.Tensor]
                                ) -> tuple[LoraConfig, LoraConfig]:
    """peft's injection by ``state_dict``: the config to inject with (targeting exactly the modules whose LoRA
    keys ``state_dict`` holds, relative to ``model``) and the config to store afterwards (the user's targeting
    fields; with ``ensure_weight_tying`` as peft rewrites them). Warns, as peft, where the config's targets and
    the state dict's disagree; raises if the state dict names no module of the model."""
    import copy

    from .model import LoraModel, _excluded, _is_inside_lora, _plan_weight_tying, _resolve_targets, _targeted

    named = _modules_named_by(state_dict, LoraModel.prefix)
    names = [n for n, _ in model.named_modules() if n and not _is_inside_lora(model, n)]
    wanted = [n for n in names if n.removeprefix("_orig_mod.") in named]
    targets = _resolve_targets(model, config)
    by_config = {n for n in names if _targeted(config, targets, n) and not _excluded(config, n)}
    if not wanted:
        raise ValueError(f"the state_dict names no module of this model (module names read from its keys, e.g. "
                         f"{sorted(named)[:3]}; keys are expected relative to the model, as "
                         "get_peft_model_state_dict of the injected model returns them)")
    only_config, only_state = sorted(by_config - set(wanted)), sorted(set(wanted) - by_config)
    if only_config or only_state:
        msg = ("While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and the "
               "provided state_dict. This is not necessarily an issue and can be ignored if this was the intent. ")
        if only_config:
            msg += f"The PEFT config contained these additional target modules: {only_config}. "
        if only_state:
            msg += f"The state_dict contained these additional target modules: {only_state}. "
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
    # inject exactly the named modules, then give the stored config the user's targeting fields back (with
    # ensure_weight_tying: as peft rewrites them, the input embeddings' name in and the tied head's out)
    if config.ensure_weight_tying:
        config = copy.deepcopy(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the injection below warns)
            _plan_weight_tying(model, config, list(config.modules_to_save or []))
    exact = copy.deepcopy(config)
    exact.target_modules = wanted
    exact.exclude_modules = None
    exact.layers_to_transform = None
    exact.layers_pattern = None
    return exact, config


def _infer_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return "cpu"


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None,
                      key_mapping: dict[str, str] | None = None, **hf_hub_download_kwargs) -> dict[str, torch.Tensor]:
    """peft's ``load_peft_weights``: the adapter state dict saved in ``model_id`` (a local folder or a Hub repo
    id, with peft's Hub keywords ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ...),
    under the saved key names (``base_model.model.<path>.lora_A.weight``, ...), on ``device`` (default: the
    accelerator if there is one, else ``"cpu"``, as peft). Pass it to :func:`fastpeft.set_peft_model_state_dict`.

    ``key_mapping`` (peft's): regex → replacement, applied to each key without its ``base_model.model.`` prefix
    (the first pattern that matches wins). As everywhere in fastpeft, ``adapter_model.bin`` (a pickle) is read only
    with ``allow_pickle=True`` (peft reads it with ``weights_only=True`` unasked); fastpeft then does the same.
    """
    from .hub import pop_hub_kwargs, resolve_adapter_path
    from .save import read_adapter_file

    allow_pickle = bool(hf_hub_download_kwargs.pop("allow_pickle", False))
    hub = pop_hub_kwargs(hf_hub_download_kwargs)
    hf_hub_download_kwargs.pop("user_agent", None)  # peft's download label: nothing to do with the weights
    if hf_hub_download_kwargs:
        raise TypeError(f"load_peft_weights got keyword(s) fastpeft does not take: {sorted(hf_hub_download_kwargs)} "
                        "(Hub keywords it takes: subfolder, revision, token, cache_dir, local_files_only, "
                        "force_download, proxies)")
    path = resolve_adapter_path(model_id, **hub)
    weights = read_adapter_file(path, allow_pickle=allow_pickle, key_mapping=key_mapping)
    device = _infer_device() if device is None else device
    if torch.device(device).type != "cpu":
        weights = {k: v.to(device) for k, v in weights.items()}
    return weights


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """peft's ``cast_mixed_precision_params``: every frozen parameter of ``model`` to ``dtype`` (``torch.float16``
    or ``torch.bfloat16`` for mixed-precision training) and every trainable one to ``torch.float32``, in place."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float16, torch.bfloat16, ...), got {dtype!r}")
    for param in model.parameters():
        param.data = param.to(dtype if not param.requires_grad else torch.float32)
