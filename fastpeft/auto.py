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
``PeftModel.from_pretrained`` (any method fastpeft implements, LoRA or not).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn


class _AutoPeftModel:
    _auto_class = "AutoModel"

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Any = None, allow_pickle: bool = False,
                        **kwargs) -> nn.Module:
        """Load the base model named by the adapter's config, then the adapter (see the module docstring)."""
        import transformers

        from .config import read_config_dict
        from .hub import pop_hub_kwargs, resolve_adapter_path
        from .model import PeftModel

        hub = pop_hub_kwargs(kwargs)
        # subfolder and revision name the adapter; token, cache_dir, ... serve the base model's download too
        kwargs.update({k: v for k, v in hub.items() if k not in ("subfolder", "revision")})
        path = resolve_adapter_path(pretrained_model_name_or_path, with_tokenizer=True, **hub)
        saved = read_config_dict(path)
        base_path = saved.get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; load the base model "
                             "yourself and use PeftModel.from_pretrained(base, path)")
        if saved.get("revision") is not None:  # the config's revision is the base model's, as in peft
            kwargs["revision"] = saved["revision"]
        base = getattr(transformers, cls._auto_class).from_pretrained(base_path, **kwargs)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            embeddings = base.get_input_embeddings()
            if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))
        return PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, allow_pickle=allow_pickle)


class AutoPeftModel(_AutoPeftModel):
    """Base (``transformers.AutoModel``) + adapter in one call, as peft's ``AutoPeftModel``."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    """Base (``transformers.AutoModelForCausalLM``) + adapter in one call, as peft's class of that name."""

    _auto_class = "AutoModelForCausalLM"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    """Base (``transformers.AutoModelForSeq2SeqLM``) + adapter in one call, as peft's class of that name."""

    _auto_class = "AutoModelForSeq2SeqLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    """Base (``transformers.AutoModelForSequenceClassification``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    """Base (``transformers.AutoModelForTokenClassification``) + adapter, as peft's class of that name."""

    _auto_class = "AutoModelForTokenClassification"
