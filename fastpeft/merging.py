"""Combining several adapters' tensors into one: the arithmetic behind ``LoraModel.add_weighted_adapter``.

Each rule takes same-shaped tensors ``t_i`` (one per adapter) and weights ``w_i`` and returns one tensor:

- ``"linear"``: ``Σ w_i t_i`` (task arithmetic);
- ``"magnitude_prune"``: each ``t_i`` keeps its ``int(density · numel)`` largest-magnitude entries, then
  ``Σ w_i t_i``;
- ``"ties"``: magnitude pruning as above, then per entry a sign is elected (``"total"``: the sign of
  ``Σ t_i``; ``"frequency"``: the sign more of the ``t_i`` have; ties go to +), and the entry is the mean of
  the ``w_i t_i`` whose ``t_i`` has that sign (0 where none has);
- ``"dare_linear"`` / ``"dare_ties"``: as ``"linear"`` / ``"ties"``, but the pruning keeps each entry with
  probability ``density`` (``torch.bernoulli``, torch's global generator, one draw per tensor in order)
  and divides the kept ones by ``density``.

``density >= 1`` prunes nothing (with a warning), a negative one is refused. These are the definitions of
peft's ``merge_utils`` (TIES-Merging, Yadav et al. 2023; DARE, Yu et al. 2023), so the results equal peft's.
"""

from __future__ import annotations

import warnings

import torch

RULES = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density · t.numel())`` largest-magnitude entries set to zero."""
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.topk(t.abs().flatten(), k).indices] = True
    return t * keep.view(t.shape)


def keep_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop-and-rescale: each entry survives with probability ``density`` and is divided by it."""
    survives = torch.bernoulli(torch.full_like(t, density))
    return t * survives / density


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry of ``stacked`` (adapters on dim 0): True where that adapter's sign is the elected one."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def combine(tensors: list[torch.Tensor], weights: list[float], rule: str, density: float | None = None,
            majority_sign_method: str = "total") -> torch.Tensor:
    """One tensor from ``tensors`` and their ``weights`` by ``rule`` (one of :data:`RULES`, see the module
    docstring). Computed in float32 at least; the result has that dtype."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; expected one of {RULES}")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    ts = [t.to(dtype) for t in tensors]
    if rule != "linear":
        if density is None:
            raise ValueError(f"combination rule {rule!r} needs a density (the fraction of entries kept, in [0, 1])")
        if density < 0:
            raise ValueError(f"Density should be >= 0, got {density}")
        if density < 1:
            prune = keep_largest if rule in ("magnitude_prune", "ties") else keep_random
            ts = [prune(t, density) for t in ts]
    stacked = torch.stack(ts)
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if rule not in ("ties", "dare_ties"):
        return weighted.sum(0)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    agree = elected_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def warn_no_pruning(density: float | None, rule: str) -> None:
    """peft's warning when a pruning rule is given a density that prunes nothing."""
    if rule != "linear" and density is not None and density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.",
                      stacklevel=3)
