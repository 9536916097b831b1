"""Merging into a base layer whose weight is computed by a ``torch.nn.utils.parametrize`` parametrization (e.g.
``torch.nn.utils.parametrizations.weight_norm``: wav2vec2's ``pos_conv_embed.conv``).

There ``base.weight`` is recomputed from ``parametrizations.weight.original*`` on every access, so a merge that
writes into it in place (``weight.data.copy_``, as peft does) is lost and the merged model is the bare base. The
merged weight is stored through the parametrization instead (``base.weight = merged`` calls its
``right_inverse``; for weight_norm it sets ``g`` and ``v``); the parametrized weight is checked to give the merged
weight back (else the originals are restored and the merge refused). The originals are kept per merged adapter, so
that unmerging restores them exactly.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def is_parametrized_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed by a parametrization."""
    return parametrize.is_parametrized(module, "weight")


def _originals(module: nn.Module) -> list[torch.Tensor]:
    plist = module.parametrizations["weight"]
    return [p for _, p in sorted(plist.named_parameters(recurse=False))]


def check_weight_writable(module: nn.Module, what: str) -> None:
    """Raise (nothing written yet) if ``module``'s weight is parametrized by a parametrization without
    ``right_inverse``: no weight can then be stored through it."""
    if not is_parametrized_weight(module):
        return
    missing = [type(p).__name__ for p in module.parametrizations["weight"] if not hasattr(p, "right_inverse")]
    if missing:
        raise ValueError(f"cannot {what}: the base layer's weight is computed by the parametrization(s) {missing}, "
                         "which cannot store a merged weight (no right_inverse); nothing was merged. Remove the "
                         "parametrization first (torch.nn.utils.parametrize.remove_parametrizations), or keep the "
                         "adapter unmerged")


def snapshot_weight(module: nn.Module) -> list[torch.Tensor] | None:
    """Copies of the tensors a parametrized weight is computed from (None for a plain weight)."""
    if not is_parametrized_weight(module):
        return None
    return [p.detach().clone() for p in _originals(module)]


@torch.no_grad()
def restore_weight(module: nn.Module, snapshot: list[torch.Tensor]) -> None:
    """Put back what ``snapshot_weight`` copied: the weight is again exactly what it was."""
    for p, saved in zip(_originals(module), snapshot):
        p.copy_(saved)


@torch.no_grad()
def write_weight(module: nn.Module, new: torch.Tensor, what: str) -> None:
    """Store ``new`` (the weight's dtype and shape) as ``module.weight``: in place for a plain weight, through the
    parametrization's ``right_inverse`` for a parametrized one (checked: it must give ``new`` back up to rounding,
    else the weight is restored and ValueError raised)."""
    if not is_parametrized_weight(module):
        module.weight.data.copy_(new)
        return
    check_weight_writable(module, what)
    saved = snapshot_weight(module)
    try:
        module.weight = new
        got = module.weight.float()
    except Exception as e:
        restore_weight(module, saved)
        raise ValueError(f"cannot {what}: the base layer's parametrized weight cannot store the merged weight "
                         f"({type(e).__name__}: {e}); nothing was merged into it") from e
    eps = torch.finfo(new.dtype).eps if new.dtype.is_floating_point else 0.0
    scale = max(1.0, float(new.float().abs().max())) if new.numel() else 1.0
    if not torch.isfinite(got).all() or (got - new.float()).abs().max() > 64 * eps * scale:
        restore_weight(module, saved)
        raise ValueError(f"cannot {what}: the base layer's parametrization does not give the merged weight back "
                         "(its right_inverse is not exact for it); nothing was merged into it")


def store_merged(layer: nn.Module, name: str, new: torch.Tensor) -> None:
    """A LoRA layer's merge of adapter ``name``: ``new`` becomes ``layer.base_layer``'s weight (see
    ``write_weight``); for a parametrized weight the originals before it are kept for ``store_unmerged``."""
    base = layer.base_layer
    saved = snapshot_weight(base)
    write_weight(base, new, f"merge adapter {name!r}")
    if saved is not None:
        layer.__dict__.setdefault("_parametrized_originals", {})[name] = saved


def store_unmerged(layer: nn.Module, name: str, compute) -> None:
    """A LoRA layer's unmerge of adapter ``name`` (still in ``layer.merged_adapters``): ``compute()`` (the weight
    without it) becomes the base weight; a parametrized weight whose last merge was ``name`` gets its originals
    back exactly instead."""
    base = layer.base_layer
    saved = (layer.__dict__.get("_parametrized_originals") or {}).pop(name, None)
    if saved is not None and is_parametrized_weight(base) and layer.merged_adapters[-1:] == [name]:
        restore_weight(base, saved)
        return
    write_weight(base, compute(), f"unmerge adapter {name!r}")
