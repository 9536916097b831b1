"""``replace_lora_weights_loftq``: LoftQ for a model whose base is already 4-bit (peft's function, fastpeft's code).

Each 4-bit LoRA layer's adapter gets ``A``, ``B`` = the rank-r SVD factors of ``W − deq(Q)``, ``W`` the
original full-precision weight read from the model's safetensors and ``Q`` the layer's 4-bit weight (NF4,
FP4 or int4, in fastpeft's or bitsandbytes' ``Linear4bit``; it is not changed). As in peft, ``A`` and ``B`` are
not divided by the LoRA scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn

from .layers.lora_init import residual_factors

_PREFIX = "base_model.model."
_SAFETENSORS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class _SafetensorsReader:
    """Tensors by name from a model folder's ``model.safetensors`` (or the file itself), or its shards through
    ``model.safetensors.index.json``; a name missing there is retried without the model's
    ``base_model_prefix`` (a checkpoint of the bare model), as peft does."""

    def __init__(self, model_path: str, base_model_prefix: str | None):
        path = os.fspath(model_path)
        if not path.endswith(_SAFETENSORS):
            path = os.path.join(path, _SAFETENSORS)
        self.base_model_prefix = base_model_prefix
        self.weight_map: dict[str, str] | None = None
        self.path = path
        if not os.path.isfile(path):
            folder = os.path.dirname(path)
            index = os.path.join(folder, _INDEX)
            if not os.path.isfile(index):
                raise FileNotFoundError(f"Could not find file for {path}, ensure that there is a (sharded) "
                                        "safetensors file of the model.")
            with open(index, encoding="utf-8") as f:
                self.weight_map = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}

    def _file(self, name: str) -> str | None:
        if self.weight_map is None:
            return self.path
        return self.weight_map.get(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name]
        if self.base_model_prefix and name.startswith(self.base_model_prefix + "."):
            candidates.append(name[len(self.base_model_prefix) + 1:])
        for candidate in candidates:
            file = self._file(candidate)
            if file is None:
                continue
            with safe_open(file, framework="pt", device="cpu") as f:
                if candidate in f.keys():
                    return f.get_tensor(candidate)
        raise KeyError(f"no tensor {name!r} in the model's safetensors ({self.path})")


def _resolve_model_path(peft_model: nn.Module, model_path: str | os.PathLike | None) -> str:
    if model_path is not None:
        return os.fspath(model_path)
    name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    if not name:
        raise ValueError("The provided model does not appear to be a transformers model or is a local model. In this "
                         "case, you must pass the model_path argument that points to the safetensors file.")
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not a Hub id, or not downloaded: say what to pass
        raise ValueError(f"the model's safetensors could not be found for {name!r} (not a local folder, and not in "
                         "the Hub cache); pass model_path, the folder or file of the original weights") from exc


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | os.PathLike | None = None,
                               adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """Replace the LoRA weights of a fastpeft model with a 4-bit base by LoftQ's, as peft's function of the same name.

    For each 4-bit LoRA layer (``FastLoraLinear4bit``, over fastpeft's or bitsandbytes' ``Linear4bit``) holding
    ``adapter_name``, the original weight ``W`` is read from the safetensors of ``model_path`` (a model folder,
    its ``model.safetensors``, or a sharded checkpoint's folder; by default the folder or Hub cache entry of
    the model's ``config._name_or_path``) and the adapter gets ``A``, ``B`` = the rank-r SVD factors of
    ``W − dequantize(Q)``, so that ``dequantize(Q) + B A`` is the best rank-r correction of the quantization
    error. The 4-bit weights themselves do not change.

    ``callback(model, module_name) -> bool`` runs after each layer (``module_name`` without the
    ``base_model.model.`` prefix); returning False rolls that layer back (a greedy check that the
    replacement helps, as in peft). Raises ``ValueError`` when the model has no 4-bit LoRA layer.

    Example::

        model = fastpeft.get_peft_model(quantize_model(AutoModelForCausalLM.from_pretrained(path)), config)
        fastpeft.replace_lora_weights_loftq(model, model_path=path)
    """
    from .layers.lora4bit import FastLoraLinear4bit

    reader = None
    any_match = False
    for name, module in peft_model.named_modules():
        if not isinstance(module, FastLoraLinear4bit):
            continue
        if not name.startswith(_PREFIX):
            raise TypeError("The passed model does not appear to be a valid PeftModel")
        any_match = True
        if adapter_name not in module.lora_A:
            continue
        if reader is None:
            prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None)
            reader = _SafetensorsReader(_resolve_model_path(peft_model, model_path), prefix)
        key = name[len(_PREFIX):]
        weight = reader.get_tensor(key + ".weight")
        w4 = module.weight4bit()
        if tuple(weight.shape) != (w4.out_features, w4.in_features):
            raise ValueError(f"{key}.weight in the safetensors has shape {tuple(weight.shape)}, the 4-bit layer "
                             f"({w4.out_features}, {w4.in_features}): not this model's weights")
        device = w4.packed.device
        residual = weight.to(device=device, dtype=torch.float32) - w4.dequantize(w4.dtype).float()
        A, B = residual_factors(residual, module.r[adapter_name])
        params = (module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight)
        before = [p.detach().clone() for p in params] if callback else None
        for p, value in zip(params, (A, B)):
            p.copy_(value)
        if callback and not callback(peft_model, key):
            for p, value in zip(params, before):
                p.copy_(value)
    if not any_match:
        raise ValueError("No 4-bit LoRA layer (FastLoraLinear4bit) found on the model: replace_lora_weights_loftq "
                         "needs a model whose base is quantized to 4 bits")
