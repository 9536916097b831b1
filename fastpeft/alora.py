"""Activated LoRA (aLoRA): an adapter that acts only from an invocation sequence onward (peft's
``LoraConfig(alora_invocation_tokens=[...])``).

An aLoRA adapter leaves every token before the last occurrence of its invocation token ids to the base model, so
a causal LM can reuse the base model's KV cache for the prompt and switch the adapter on for the rest (Greenewald
et al. 2025, "Activated LoRA: Fine-tuned LLMs for Intrinsics"). The model says, per sequence, how many of its last
tokens the adapter acts on: ``alora_offsets[i]`` (peft's name and meaning), counted back from the end of the
sequence, from the start of the invocation; ``None`` (invocation not found) means none. ``PeftModel.forward`` and
``generate`` compute the offsets from ``input_ids`` as peft does (or take ``alora_offsets=`` given by the caller);
during ``generate`` the offsets of the prompt stay in force, so each new token (one per decode step) is adapted.

In the layers the offsets become a per-token adapter index for fastpeft's mixed-adapter op (``fastpeft.ops_mixed``:
``-1`` = base only), so an aLoRA forward and backward are one fused op as for plain LoRA; each adapter's gradient
comes only from its activated tokens. Linear layers only (peft's rule), not with DoRA, never merged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch


def is_alora(config: Any) -> bool:
    """Whether ``config`` (a LoraConfig, or another method's config) makes an aLoRA adapter."""
    return getattr(config, "alora_invocation_tokens", None) is not None


def find_invocation(input_ids: torch.Tensor, invocation: Sequence[int]) -> list[Optional[int]]:
    """For each row of ``input_ids`` (B, T): ``T − start`` where ``start`` is the position of the last occurrence of
    ``invocation``, or None when the row lacks it (peft's ``alora_offsets`` for one adapter)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens) to find the aLoRA invocation, got "
                         f"{tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    n = len(invocation)
    if n == 0 or length < n:
        return [None] * batch
    inv = torch.as_tensor(list(invocation), dtype=input_ids.dtype, device=input_ids.device)
    hits = (input_ids.unfold(1, n, 1) == inv).all(-1)  # (B, T - n + 1): an occurrence starts here
    starts = torch.arange(hits.shape[1], device=input_ids.device)
    last = torch.where(hits, starts, torch.full_like(starts, -1)).amax(dim=1).tolist()  # one host read per batch
    return [None if s < 0 else length - s for s in last]


def alora_relevant(peft_config: Mapping[str, Any], active_adapters: Sequence[str],
                   adapter_names: Optional[Sequence[str]] = None) -> bool:
    """Whether a call with these active adapters (or these per-sequence ``adapter_names``) involves an aLoRA adapter."""
    names = [n for n in adapter_names if n != "__base__"] if adapter_names is not None else list(active_adapters)
    return any(is_alora(peft_config.get(n)) for n in names)


def compute_offsets(peft_config: Mapping[str, Any], active_adapters: Sequence[str], input_ids: torch.Tensor,
                    adapter_names: Optional[Sequence[str]] = None) -> list[Optional[int]]:
    """peft's ``alora_offsets`` for a batch: per row, the offset of that row's adapter (``adapter_names[i]``, or
    the first active aLoRA adapter) from :func:`find_invocation`; None for rows without an aLoRA adapter or
    without its invocation."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    batch = input_ids.shape[0]
    if adapter_names is not None and len(adapter_names) != batch:
        raise ValueError(f"Length of `adapter_names` ({len(adapter_names)}) should be the same as the batch size "
                         f"({batch}).")
    default = next((n for n in active_adapters if is_alora(peft_config.get(n))), None)
    rows = list(adapter_names) if adapter_names is not None else [default] * batch
    offsets: list[Optional[int]] = [None] * batch
    for name in dict.fromkeys(rows):
        config = peft_config.get(name) if name is not None else None
        if not is_alora(config):
            continue
        idx = [i for i, n in enumerate(rows) if n == name]
        found = find_invocation(input_ids[idx], config.alora_invocation_tokens)
        for i, o in zip(idx, found):
            offsets[i] = o
    return offsets


def offsets_for_call(peft_config: Mapping[str, Any], active_adapters: Sequence[str], args: tuple,
                     kwargs: dict, adapter_names: Optional[Sequence[str]] = None) -> Optional[list[Optional[int]]]:
    """The offsets a ``forward``/``generate`` call runs with: ``kwargs["alora_offsets"]`` (popped) when the caller
    gave them, else computed from its ``input_ids`` (keyword or first positional argument) when an aLoRA adapter
    takes part; None when none does. With only ``inputs_embeds`` the aLoRA adapters stay off, with peft's warning."""
    given = kwargs.pop("alora_offsets", None)
    if not alora_relevant(peft_config, active_adapters, adapter_names):
        return given
    if given is not None:
        return list(given)
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        input_ids = kwargs.get("inputs")  # generate's name
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None:
        warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this "
                      "forward pass.", stacklevel=3)
        return None
    return compute_offsets(peft_config, active_adapters, input_ids, adapter_names)


def check_offsets(offsets: Any) -> list[Optional[int]]:
    """``alora_offsets`` as a list of ints (≥ 0) or None, one per sequence; anything else raises."""
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.tolist()
    if not isinstance(offsets, (list, tuple)):
        raise TypeError(f"alora_offsets must be a list with one int (or None) per sequence, got {offsets!r}")
    out = []
    for o in offsets:
        if o is not None and (isinstance(o, bool) or not isinstance(o, int) or o < 0):
            raise ValueError(f"alora_offsets must hold ints >= 0 (or None), got {offsets!r}")
        out.append(o)
    return out


def token_mask(offsets: Optional[Sequence[Optional[int]]], lead: tuple[int, ...]) -> torch.Tensor:
    """The tokens an aLoRA adapter acts on, a CPU bool tensor of shape ``lead`` (``x.shape[:-1]``: (B,) or (B, T)),
    as peft: row i's last ``min(offsets[i], T)`` tokens (a 2-D input is one token per row); none where
    ``offsets[i]`` is None or 0, and none anywhere when ``offsets`` is None."""
    if len(lead) not in (1, 2):
        raise ValueError(f"aLoRA adapters take inputs of shape (batch, features) or (batch, tokens, features), got "
                         f"one with leading shape {lead}")
    if offsets is None:
        return torch.zeros(lead, dtype=torch.bool)
    batch = lead[0]
    if len(offsets) != batch:
        raise ValueError(f"alora_offsets has {len(offsets)} entries for a batch of {batch} sequences")
    length = lead[1] if len(lead) == 2 else 1
    n = torch.tensor([0 if o is None else min(int(o), length) for o in offsets], dtype=torch.long)
    mask = torch.arange(length).unsqueeze(0) >= (length - n).unsqueeze(1)  # (B, T)
    return mask if len(lead) == 2 else mask[:, 0]


__all__ = ["alora_relevant", "check_offsets", "compute_offsets", "find_invocation", "is_alora", "offsets_for_call",
           "token_mask"]
