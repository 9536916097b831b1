"""The PEFT methods other than LoRA (prompt, prefix, P-tuning, BitFit, Freeze, adapters, IA3, AdaLoRA).

``fastpeft.get_peft_model`` and ``fastpeft.PeftModel.from_pretrained`` hand every non-LoRA
config to :func:`get_method_model` / :func:`from_pretrained` here.
"""

from __future__ import annotations

import os

from torch import nn


def get_method_model(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` for the PEFT method ``config`` describes."""
    raise TypeError(f"fastpeft.get_peft_model does not support {type(config).__name__} yet")


def from_pretrained(model: nn.Module, model_id: str | os.PathLike, peft_type: str, adapter_name: str = "default",
                    is_trainable: bool = False, **kwargs) -> nn.Module:
    """Load a saved non-LoRA adapter folder (``peft_type`` read from its ``adapter_config.json``)."""
    raise ValueError(f"this adapter config has peft_type {peft_type!r}; fastpeft cannot load it yet")
