"""Turning a trained adapter into a plain LoRA adapter (peft's ``convert_to_lora`` / ``save_as_lora``).

Every layer of the adapter is reduced to the change it makes to its base weight, ``ΔW``, and ``ΔW`` is cut to its
leading singular directions: ``ΔW ≈ U_k S_k V_kᵀ`` gives ``lora_B = U_k S_k`` and ``lora_A = V_kᵀ``, with
``lora_alpha = r`` (scale 1). ``rank`` is either that ``k`` for every layer (an ``int``) or, as a ``float`` in
(0, 1], the share of ``ΔW``'s energy (squared singular values) each layer keeps, which sets each layer's own rank
(written to ``rank_pattern`` / ``alpha_pattern``). The result is an ordinary LoRA adapter in peft's format: it runs
on fastpeft's fused kernels, joins mixed-adapter batches (``adapter_names``), and loads in peft or any other LoRA
consumer.

What converts (``ΔW`` of each, in float32):

- LoRA (linear, 4-bit, embedding, convolution layers): ``scale · B A``; a rank above the adapter's own changes
  nothing (the extra directions are zero). DoRA: the whole change the merged weight makes,
  ``m / ‖W0 + ΔW‖ ⊙ (W0 + ΔW) − W0`` (peft converts only ``scale · B A``, dropping the magnitudes); it is of full
  rank in general, so the conversion is an approximation.
- AdaLoRA: ``B (A ⊙ E) · scaling / ranknum``, of rank at most the adapter's: exact at that rank (peft refuses).
- (IA)³: ``W0 · (l − 1)`` along the scaled features, of full rank in general (peft refuses). With output scaling
  on a base with a bias, the bias's change ``b (l − 1)`` becomes the converted adapter's ``lora_B`` bias
  (``lora_bias=True``), so a full-rank conversion is exact.

Refused (``TypeError``, naming the layer types, before anything is computed): layers whose effect no weight delta
expresses — bottleneck adapters, prompt/prefix methods (no layers), LN tuning, trainable tokens, ``target_parameters``
wrappers, BitFit and Freeze (their trained tensors are the weights themselves) — and grouped convolutions.
``ValueError``: a LoRA adapter with a trained bias (``bias`` ≠ ``"none"``, ``lora_bias``; as peft) or an aLoRA
adapter (it acts on some tokens only).

The modules in ``modules_to_save`` come along as they are (their trained copies, under peft's saved names).

Example::

    from fastpeft import PeftModel, save_as_lora

    model = PeftModel.from_pretrained(base, "my-adalora-adapter")
    save_as_lora("my-adapter-as-lora", model, rank=16)     # or rank=0.95: keep 95% of each layer's energy
    lora = PeftModel.from_pretrained(fresh_base, "my-adapter-as-lora")   # fused LoRA from here on
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig

_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- per layer
def _kinds() -> dict[type, str]:
    from .layers.conv import FastLoraConv
    from .layers.embedding import FastLoraEmbedding
    from .layers.lora import FastLoraLinear
    from .methods.adalora import SVDLinear
    from .methods.ia3 import IA3Linear

    return {FastLoraLinear: "lora", FastLoraEmbedding: "embedding", FastLoraConv: "conv", SVDLinear: "adalora",
            IA3Linear: "ia3"}


def _kind_of(module: nn.Module) -> str | None:
    for cls, kind in _kinds().items():
        if isinstance(module, cls):
            return kind
    return None


def _unconvertible(module: nn.Module) -> bool:
    """An adapter layer of a kind no weight delta expresses (or a grouped convolution)."""
    from .layers.conv import FastLoraConv
    from .layers.param import FastLoraParamWrapper
    from .layers.tokens import TrainableTokensLayer
    from .methods.base import AdapterLayer

    if isinstance(module, FastLoraConv):
        return module.base_layer.groups > 1
    if _kind_of(module) is not None:
        return False
    return isinstance(module, (AdapterLayer, FastLoraParamWrapper, TrainableTokensLayer))


def _holds(module: nn.Module, kind: str, adapter_name: str) -> bool:
    if kind == "embedding":
        return adapter_name in module.lora_embedding_A
    if kind == "ia3":
        return adapter_name in module.ia3_l
    return adapter_name in module.lora_A


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The layer's base weight in float32 as it is without merged adapters (4-bit bases dequantized)."""
    from .layers.lora4bit import FastLoraLinear4bit

    if isinstance(module, FastLoraLinear4bit):
        w = module.dequantized_weight(torch.float32)
    else:
        weight = getattr(module.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or type(weight.data) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"the base of {type(module).__name__} holds its weight as "
                            f"{type(weight).__name__}, which cannot be read as a matrix: DoRA cannot be converted "
                            "on it")
        w = weight.detach().float()
    return module._unmerged_weight(w) if module.merged_adapters else w


def _lora_delta(module: nn.Module, name: str, where: str) -> torch.Tensor:
    """LoRA / DoRA: the change to the base weight, laid out as the base weight."""
    if module.use_alora.get(name, False):
        raise ValueError(f"{where}: adapter {name!r} is an aLoRA adapter (it acts only on the tokens after its "
                         "invocation), which no weight delta expresses: it cannot be converted to LoRA")
    if module.lora_B[name].bias is not None:
        raise ValueError(f"{where}: adapter {name!r} has a trained lora_B bias (lora_bias=True), which is not "
                         "supported right now (as in peft)")
    if not module.use_dora.get(name, False):
        return module.get_delta_weight(name).float()
    w0 = _base_weight(module)
    return module._merge_math(w0, name, None, record=False) - w0


def layer_delta(module: nn.Module, kind: str, name: str, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ΔW, Δb)`` of adapter ``name`` on ``module`` in float32: ``ΔW`` as an (out, in) matrix for linear layers,
    (num_embeddings, embedding_dim) for embeddings, (out, in·∏kernel) for convolutions; ``Δb`` the bias change
    ((IA)³'s output scaling of a base bias) or None."""
    with torch.no_grad():
        if kind == "lora":
            delta = _lora_delta(module, name, where)
            return (delta.t() if module.fan_in_fan_out else delta), None
        if kind == "embedding":
            return module.get_delta_weight(name).float(), None
        if kind == "conv":
            delta = _lora_delta(module, name, where)
            return delta.reshape(delta.shape[0], -1), None
        if kind == "adalora":
            delta = module.delta_weight(name).float()
            return (delta.t() if module.fan_in_fan_out else delta), None
        # (IA)³: W · l along the input (feed-forward) or output features, and the output-scaled bias
        w = module.base_layer.weight.detach().float()
        w = w.t() if module.fan_in_fan_out else w  # (out, in)
        scale = module.ia3_l[name].detach().float().reshape(-1)
        if module.is_feedforward:
            return w * (scale - 1).view(1, -1), None
        bias = getattr(module.base_layer, "bias", None)
        db = None if bias is None else bias.detach().float() * (scale - 1)
        return w * (scale - 1).view(-1, 1), db


def _energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The fewest leading singular values whose squares reach ``threshold`` of the total (at least 1)."""
    energy = torch.cumsum(S.double() ** 2, dim=0)
    if energy[-1] <= 0:
        return 1
    return min(int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1, S.numel())


def factorize(delta: torch.Tensor, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(A, B, k)`` with ``B A`` the best rank-``k`` approximation of ``delta`` (out, in): ``B = U_k S_k``,
    ``A = V_kᵀ``; ``k`` is ``rank`` (an int) or the energy-threshold rank (a float)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = rank if isinstance(rank, int) else _energy_rank(S, rank)
    if k > S.numel():
        raise ValueError(f"The chosen rank {k} is larger than the weight shape ({S.numel()}), please choose a "
                         "lower rank.")
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous(), k


# --------------------------------------------------------------------------- model
def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int (the rank) or a float in (0, 1] (an energy threshold), got {rank!r}")
    if isinstance(rank, float) and not (0 < rank <= 1):
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got "
                         f"{rank}.")
    if isinstance(rank, int) and rank <= 0:
        raise ValueError(f"rank must be a positive integer (or a float threshold in (0, 1]), got {rank}")


def _modules_to_save_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The trained copies of ``modules_to_save`` for ``adapter_name``, under peft's saved names."""
    from .model import ModulesToSaveWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname, param in module.modules_to_save[adapter_name].named_parameters():
                out[f"{name}.{pname}"] = param.detach().clone()
    return out


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: dict[str, Any] | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A LoRA adapter equal (up to ``rank``) to adapter ``adapter_name`` of ``model`` (peft's ``convert_to_lora``).

    Args:
        model: a fastpeft model (``get_peft_model`` / ``PeftModel.from_pretrained``, or a module with adapters
            injected) holding a LoRA/DoRA, AdaLoRA or (IA)³ adapter; see :mod:`fastpeft.conversion`.
        rank: the rank of every converted layer (``int``), or a ``float`` in (0, 1]: each layer keeps the fewest
            singular directions holding that share of its ``ΔW``'s squared singular values (its rank goes to
            ``rank_pattern``).
        adapter_name: the adapter to convert (one at a time).
        progressbar: show a progress bar over the layers.
        compile_kwargs: if given, the per-layer factorization runs through ``torch.compile(**compile_kwargs)``.

    Returns:
        ``(config, state_dict)``: a :class:`fastpeft.LoraConfig` (``lora_alpha = r``, the task type and
        ``modules_to_save`` of the original, the converted layers' full names as ``target_modules``) and the
        tensors under peft's saved names (``save_as_lora`` writes both).

    Raises:
        TypeError: the model holds adapter layers that cannot be converted, or none that can.
        ValueError: a bad rank (not positive, a threshold outside (0, 1], above a layer's size), an unknown
            adapter, a LoRA adapter with a trained bias, or an aLoRA adapter.

    Example::

        config, tensors = convert_to_lora(model, rank=0.9)
        print(config.rank_pattern)      # each layer's rank
    """
    from tqdm.auto import tqdm

    _check_rank(rank)
    layers = [(n, m) for n, m in model.named_modules() if _kind_of(m) is not None or _unconvertible(m)]
    bad = sorted({type(m).__name__ + (" (groups > 1)" if _kind_of(m) == "conv" else "")
                  for _, m in layers if _unconvertible(m)})
    if bad:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(bad)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")
    layers = [(n, m, _kind_of(m)) for n, m in layers]
    layers = [(n, m, k) for n, m, k in layers if _holds(m, k, adapter_name)]
    configs = getattr(model, "peft_config", {}) or {}
    if not layers:
        raise ValueError(f"No layer holds an adapter named {adapter_name!r}"
                         + (f"; this model has {list(configs)}" if configs else ""))
    peft_config = configs.get(adapter_name)
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", "")))
    if peft_type == "LORA":
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need "
                      "for that (except to lower its rank, or to turn DoRA into plain LoRA).", stacklevel=2)
    bias = getattr(peft_config, "bias", "none")
    if bias != "none":
        raise ValueError(f"The adapter's config sets bias={bias}, this is not supported right now.")

    factor: Callable = torch.compile(factorize, **compile_kwargs) if compile_kwargs is not None else factorize
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for name, module, kind in tqdm(layers, desc="Converting to LoRA", disable=not progressbar):
        delta, db = layer_delta(module, kind, adapter_name, repr(name))
        out_dim = delta.shape[1] if kind == "embedding" else delta.shape[0]
        A, B, k = factor(delta.t() if kind == "embedding" else delta, rank)
        dtype = _adapter_dtype(module, kind, adapter_name)
        A, B = A.to(dtype), B.to(dtype)
        if kind == "embedding":  # lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r)
            tensors[f"{name}.lora_embedding_A"], tensors[f"{name}.lora_embedding_B"] = A, B
        else:
            if kind == "conv":
                base = module.base_layer
                A = A.reshape(k, *base.weight.shape[1:])
                B = B.reshape(out_dim, k, *([1] * (base.weight.dim() - 2)))
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
        if db is not None:
            bias_deltas[name] = db.to(dtype)
        fan_in_fan_out |= bool(getattr(module, "fan_in_fan_out", False))
        ranks[name.removeprefix(_PREFIX)] = k
    if bias_deltas:  # (IA)³'s scaled base biases: a lora_B bias on every converted layer (zero where none)
        for name, _, _ in layers:
            out_features = tensors[f"{name}.lora_B.weight"].shape[0]
            tensors[f"{name}.lora_B.bias"] = bias_deltas.get(
                name, torch.zeros(out_features, dtype=tensors[f"{name}.lora_B.weight"].dtype))
    tensors.update(_modules_to_save_tensors(model, adapter_name))

    r = rank if isinstance(rank, int) else max(ranks.values())
    pattern = {k: v for k, v in ranks.items() if v != r}
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
        fan_in_fan_out=fan_in_fan_out, lora_bias=bool(bias_deltas),
        task_type=getattr(peft_config, "task_type", None),
        modules_to_save=list(getattr(peft_config, "modules_to_save", None) or []) or None,
        base_model_name_or_path=getattr(peft_config, "base_model_name_or_path", None),
        revision=getattr(peft_config, "revision", None))
    return config, tensors


def _adapter_dtype(module: nn.Module, kind: str, name: str) -> torch.dtype:
    """The dtype of the adapter being converted (its A factor, or (IA)³'s vector); float32 for others."""
    if kind == "embedding":
        return module.lora_embedding_A[name].dtype
    if kind == "ia3":
        return module.ia3_l[name].dtype
    if kind == "adalora":
        return module.lora_A[name].dtype
    return module.lora_A[name].weight.dtype


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default",
                 progressbar: bool = False, compile_kwargs: dict[str, Any] | None = None) -> None:
    """Convert adapter ``adapter_name`` of ``model`` to LoRA (:func:`convert_to_lora`) and write it to ``path`` as
    peft's files (``adapter_config.json``, ``adapter_model.safetensors``), loadable by
    ``PeftModel.from_pretrained`` in fastpeft and in peft.

    Example::

        save_as_lora("adapter-r8", model, rank=8)
    """
    from .save import write_adapter_files

    config, tensors = convert_to_lora(model, rank, adapter_name=adapter_name, progressbar=progressbar,
                                      compile_kwargs=compile_kwargs)
    Path(path).mkdir(parents=True, exist_ok=True)
    write_adapter_files(path, tensors, config, safe_serialization=True)


__all__ = ["convert_to_lora", "save_as_lora"]
