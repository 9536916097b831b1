"""``AutoPeftModelFor…``: peft's one-call loaders — the base model named in ``adapter_config.json``, then the
adapter on it.

Example::

    from fastpeft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("runs/chat", dtype=torch.bfloat16)

The adapter is a local folder or a Hub repo id. The base is read with the matching transformers ``AutoModel…``
class from the config's ``base_model_name_or_path`` (further keyword arguments go to it: ``dtype``,
``device_map``, ``quantization_config``, …; ``revision`` and ``subfolder`` name the adapter's, while ``token``,
``cache_dir`` and ``local_files_only`` serve both downloads; the base is read at the config's own ``revision``,
if it records one, as peft does). If the adapter folder holds a tokenizer whose
vocabulary is larger than the base's embeddings, the embeddings are resized first, as peft does. Then
``PeftModel.from_pretrained`` (any method fastpeft implements, LoRA or not), which returns peft's task class for
the adapter's ``task_type`` (``PeftModelForCausalLM``, …; see :mod:`fastpeft.tasks`). As peft, a loader whose task
does not match the adapter's ``task_type`` is refused (``AutoPeftModelForCausalLM`` for a SEQ_CLS adapter, or
``AutoPeftModel`` for any adapter with a task type).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")  # peft 0.21's default


def auto_mapping_for(model: nn.Module, config: Any) -> dict[str, str] | None:
    """peft's ``auto_mapping`` for an adapter saved from ``model`` (a ``PeftModel`` of any method): the base
    model's class and module when the config has no task type (what ``AutoPeftModel`` imports), else None."""
    if getattr(config, "task_type", None) is not None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}


class _AutoPeftModel:
    _auto_class = "AutoModel"
    _task_class: str | None = None  # the name of the task class (fastpeft.tasks) this loader returns

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Any = None, revision: str | None = None,
                        import_allowlist: list[str] | None = None, allow_pickle: bool = False,
                        **kwargs) -> nn.Module:
        """Load the base model named by the adapter's config, then the adapter (see the module docstring).
        Parameters in peft's order. An adapter saved without a task type names its base model's class in
        ``auto_mapping`` (peft's field, which fastpeft writes too): that class is imported (its library must be
        in ``import_allowlist``, peft's default ``DEFAULT_IMPORT_ALLOWLIST``) and used instead of the loader's."""
        import importlib

        import transformers

        from .config import read_config_dict
        from .hub import pop_hub_kwargs, resolve_adapter_path
        from .model import PeftModel

        if revision is not None:
            kwargs["revision"] = revision
        hub = pop_hub_kwargs(kwargs)
        # subfolder and revision name the adapter; token, cache_dir, ... serve the base model's download too
        kwargs.update({k: v for k, v in hub.items() if k not in ("subfolder", "revision")})
        path = resolve_adapter_path(pretrained_model_name_or_path, with_tokenizer=True, **hub)
        saved = read_config_dict(path)
        _check_task_type(cls, saved.get("task_type"))
        base_path = saved.get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; load the base model "
                             "yourself and use PeftModel.from_pretrained(base, path)")
        if saved.get("revision") is not None:  # the config's revision is the base model's, as in peft
            kwargs["revision"] = saved["revision"]
        base_class = getattr(transformers, cls._auto_class)
        auto_mapping = saved.get("auto_mapping")
        if saved.get("task_type") is None and isinstance(auto_mapping, dict) and auto_mapping.get("base_model_class"):
            library = auto_mapping.get("parent_library") or "transformers"
            allow = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else import_allowlist
            if not any(library == a or library.startswith(f"{a}.") for a in allow):
                raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import "
                                 "allowlist. If you are sure that importing this library is safe, specify "
                                 f"`import_allowlist=['{library}']` in `from_pretrained()`.")
            base_class = getattr(importlib.import_module(library), auto_mapping["base_model_class"])
        base = base_class.from_pretrained(base_path, **kwargs)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            embeddings = base.get_input_embeddings()
            if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))
        return PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, allow_pickle=allow_pickle)


def _check_task_type(cls: type, task_type: str | None) -> None:
    """peft's checks: ``AutoPeftModel`` refuses an adapter with a task type, and ``AutoPeftModelFor<X>`` one whose
    task type belongs to another class (the error names both)."""
    from .tasks import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    if task_type is None:
        return
    if cls._auto_class == "AutoModel" and cls._task_class is None:
        raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                         f"type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`); this adapter has "
                         f"task_type={task_type!r}")
    expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
    if expected is not None and cls._task_class != expected.__name__:
        raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                         f"{cls._task_class} make sure that you are loading the correct model for your task type.")


class AutoPeftModel(_AutoPeftModel):
    """Base (``transformers.AutoModel``) + adapter in one call, as peft's ``AutoPeftModel``."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    """Base (``transformers.AutoModelForCausalLM``) + adapter in one call, as peft's class of that name."""

    _auto_class = "AutoModelForCausalLM"
    _task_class = "PeftModelForCausalLM"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    """Base (``transformers.AutoModelForSeq2SeqLM``) + adapter in one call, as peft's class of that name."""

    _auto_class = "AutoModelForSeq2SeqLM"
    _task_class = "PeftModelForSeq2SeqLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    """Base (``transformers.AutoModelForSequenceClassification``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModelForSequenceClassification"
    _task_class = "PeftModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    """Base (``transformers.AutoModelForTokenClassification``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModelForTokenClassification"
    _task_class = "PeftModelForTokenClassification"


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    """Base (``transformers.AutoModelForQuestionAnswering``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModelForQuestionAnswering"
    _task_class = "PeftModelForQuestionAnswering"


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    """Base (``transformers.AutoModel``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModel"
    _task_class = "PeftModelForFeatureExtraction"
