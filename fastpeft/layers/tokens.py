"""Trainable tokens (peft's ``LoraConfig(trainable_token_indices=...)``): only some rows of an embedding train.

Layout, names and numbers are peft's (``peft.utils.other.TrainableTokensWrapper`` around
``peft.tuners.trainable_tokens.TrainableTokensLayer``): the embedding ``E`` becomes a ``TrainableTokensWrapper``
whose ``token_adapter`` holds

- ``base_layer``: the frozen embedding (or, for a tied output head, the ``nn.Linear`` sharing its weight);
- ``trainable_tokens_delta[adapter]``: a trainable ``(len(indices), dim)`` parameter. Despite the name it holds the
  *new values* of the rows (initialized to a copy of the original rows), not a difference;
- ``trainable_tokens_original[adapter]``: the original rows (a buffer kept out of the state dict, for unmerging);
- ``token_indices[adapter]``: the row indices (a plain dict).

The forward computes ``W = E.weight.index_copy(0, indices, delta)`` and then ``F.embedding`` (or ``F.linear`` for a
head) with ``W``, so gradients flow only into ``delta`` (rows listed twice are refused). A head tied to the
embeddings wraps its ``Linear`` in a layer *tied* to the embeddings' layer: it shares the embeddings' delta,
originals and indices (so the head follows), and is never saved on its own.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .parametrized import is_parametrized_weight, restore_weight, snapshot_weight, write_weight
from .switches import freeze_requires_grad, restore_requires_grad

_UPCAST_DTYPES = (torch.float16, torch.bfloat16)  # held in fp32 with autocast_adapter_dtype (peft's rule)


class TrainableTokensOriginals(nn.Module):
    """A name -> tensor mapping of non-persistent buffers (peft's ``BufferDict`` as the token layer uses it: the
    tensors move with the module but are not in its state dict)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def keys(self):
        """The adapter names."""
        return self._buffers.keys()


def check_token_indices(indices, num_rows: int, where: str) -> list[int]:
    """``indices`` as a list of ints, each in ``[0, num_rows)`` and listed once; ``ValueError`` otherwise
    (``where`` names the layer in the message)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in indices):
        raise TypeError(f"trainable_token_indices for {where} must be a list of ints, got {indices!r}")
    if not indices:  # (peft accepts an empty list and then fails in the forward: index_copy_ on a float index)
        raise ValueError(f"trainable_token_indices for {where} are empty: name at least one token row to train "
                         "(e.g. the ids of the tokens you added to the tokenizer)")
    bad = [i for i in indices if not 0 <= i < num_rows]
    if bad:
        raise ValueError(f"trainable_token_indices for {where} are out of range: {bad} (the layer has {num_rows} "
                         f"rows: indices 0..{num_rows - 1})")
    if len(set(indices)) != len(indices):
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"trainable_token_indices for {where} list {dup} more than once (each row can be trained "
                         "once)")
    return list(indices)


class TrainableTokensLayer(nn.Module):
    """peft's ``TrainableTokensLayer``: trains the rows ``token_indices[adapter]`` of ``base_layer.weight``.

    Args:
        base_layer: an ``nn.Embedding``, or an ``nn.Linear`` without bias (a head tied to the embeddings).
        tied_adapter: the embeddings' layer this one follows (shares its delta, originals and indices).
    """

    def __init__(self, base_layer: nn.Module, tied_adapter: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            if base_layer.bias is not None:
                raise ValueError("trainable_token_indices on an nn.Linear with a bias is not supported (peft's "
                                 "token layer computes the head without its bias)")
        elif not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"trainable_token_indices cannot be applied to modules of type {type(base_layer)}")
        self.base_layer = base_layer
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []  # a list: kept out of modules()
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = TrainableTokensOriginals()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        """The layer this one follows (weight tying), or None."""
        return self._tied_adapter[0] if self._tied_adapter else None

    @property
    def merged(self) -> bool:
        """Whether some adapter's rows are written into the base weight."""
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer."""
        return self.base_layer

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True,
                     autocast_adapter_dtype: bool = True) -> None:
        """Add ``adapter_name`` training rows ``token_indices`` (a tied layer follows its embeddings: no-op).
        ``init_weights=False`` draws the rows from N(0, 1) (peft's option) instead of copying the originals.
        ``autocast_adapter_dtype`` (peft's, the default): on an fp16/bf16 layer the rows (and the originals kept
        for unmerging) are held in fp32, so that an fp16 ``GradScaler`` can unscale their gradients; the forward
        still computes in the layer's dtype."""
        if self.tied_adapter is not None:
            return
        weight = self.base_layer.weight
        indices = check_token_indices(token_indices, weight.shape[0], repr(adapter_name))
        self.token_indices[adapter_name] = indices
        originals = weight.detach()[indices]
        values = originals if init_weights else torch.randn((len(indices), weight.shape[1]), dtype=weight.dtype,
                                                            device=weight.device)
        dtype = torch.float32 if autocast_adapter_dtype and weight.dtype in _UPCAST_DTYPES else weight.dtype
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.to(dtype, copy=True), requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals.to(dtype, copy=True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` (its rows; a tied layer only forgets it as active)."""
        if self.tied_adapter is None and adapter_name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter_name]
            del self.trainable_tokens_original[adapter_name]
            del self.token_indices[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in "
                                 "undefined merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def get_merged_weights(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with the rows of ``adapter_names`` replaced by their trained values (a tensor)."""
        W = self.base_layer.weight
        for name in adapter_names:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=W.device)
            W = W.index_copy(0, index, self.trainable_tokens_delta[name].to(W))
        return W

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the trained rows into the base weight (peft's merge: the originals are kept for ``unmerge``)."""
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.trainable_tokens_delta and n not in self.merged_adapters]
        if not names:
            return
        self._check_overlapping_tokens(names)
        merged = self.base_layer.weight.data
        for name in names:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=merged.device)
            merged = merged.index_copy(0, index, self.trainable_tokens_delta[name].detach().to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        if is_parametrized_weight(self.base_layer):  # (weight_norm & co: an in-place write would be lost)
            saved = snapshot_weight(self.base_layer) if not self.merged_adapters else None
            write_weight(self.base_layer, merged, "merge trainable tokens into it")
            if saved is not None:
                self.__dict__["_parametrized_originals"] = saved
        else:
            self.base_layer.weight.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the original rows back."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        saved = self.__dict__.pop("_parametrized_originals", None)
        if saved is not None and is_parametrized_weight(self.base_layer):  # (the weight before the first merge)
            restore_weight(self.base_layer, saved)
            self.merged_adapters.clear()
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer with the active adapter's rows (the base layer alone when disabled or none active)."""
        active = [n for n in self.active_adapters if n in self.trainable_tokens_delta]
        if self.disable_adapters or not active:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"the trainable-tokens layer takes the input alone, got further arguments "
                            f"{len(args)} positional, {sorted(kwargs)}")
        self._check_overlapping_tokens(active)
        W = self.get_merged_weights(active)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, W, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings, as peft
            if isinstance(scale, torch.Tensor):
                out = out * scale.to(out.dtype)
            elif scale is not None:
                out = out * scale
            return out
        return F.linear(x, W)


class TrainableTokensWrapper(nn.Module):
    """peft's ``TrainableTokensWrapper`` (same layout: ``<module>.token_adapter.base_layer`` /
    ``<module>.token_adapter.trainable_tokens_delta``): put in place of the embedding (or tied head) whose rows
    train. ``.weight`` is the weight with the active adapter's rows in place, other attributes are the wrapped
    layer's.

    Args:
        module: the layer to wrap (``nn.Embedding``; ``nn.Linear`` without bias).
        adapter_name: the first adapter.
        token_indices: its rows.
        tied_adapter: the embeddings' ``TrainableTokensLayer`` when ``module`` is a head tied to them.
        init_weights, autocast_adapter_dtype: see ``TrainableTokensLayer.update_layer``.
    """

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: TrainableTokensLayer | None = None, init_weights: bool = True,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_adapter)
        self.update(adapter_name, token_indices, init_weights, autocast_adapter_dtype)
        self.token_adapter.active_adapters = [adapter_name]

    @property
    def original_module(self) -> nn.Module:
        """The wrapped layer (peft's attribute; a property, so not a second state-dict entry)."""
        return self.token_adapter.base_layer

    @property
    def is_tied(self) -> bool:
        """Whether this wrapper follows the embeddings' token layer (then it saves nothing of its own)."""
        return self.token_adapter.tied_adapter is not None

    @property
    def adapters(self) -> list[str]:
        """The adapters with rows on this layer."""
        return list(self.token_adapter.trainable_tokens_delta.keys())

    @property
    def active_adapter(self) -> list[str]:
        """The active adapter (a list of at most one name)."""
        return list(self.token_adapter.active_adapters)

    def update(self, adapter_name: str, token_indices: list[int], init_weights: bool = True,
               autocast_adapter_dtype: bool = True) -> None:
        """Add ``adapter_name`` with rows ``token_indices``."""
        if adapter_name not in self.token_adapter.trainable_tokens_delta:
            self.token_adapter.update_layer(adapter_name, token_indices, init_weights, autocast_adapter_dtype)

    def set_adapter(self, names: list[str], train: bool = True) -> None:
        """Make the one adapter of ``names`` held here active (trainable unless ``train=False``); several raise."""
        held = [n for n in names if n in self.token_adapter.trainable_tokens_delta]
        if len(held) > 1:
            raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {len(held)}: {held}")
        if self.token_adapter.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=3)
            self.token_adapter.unmerge()
        self.__dict__.pop("_grad_flags_before_disable", None)  # (trainability is set anew: nothing to restore)
        if not self.is_tied:
            for name, param in self.token_adapter.trainable_tokens_delta.items():
                param.requires_grad_(train and name in held)
        self.token_adapter.active_adapters = held

    def set_requires_grad(self, names: list[str], requires_grad: bool = True) -> None:
        """Switch training of the named adapters' rows (peft's ``set_requires_grad``)."""
        for name, param in self.token_adapter.trainable_tokens_delta.items():
            if name in names:
                param.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """``False``: the wrapped layer alone runs (a merged layer is unmerged on its next call, as peft), and the
        rows are frozen meanwhile, as peft freezes switched-off adapters; ``True`` gives them their
        ``requires_grad`` back as it was."""
        layer = self.token_adapter
        if not enabled and not layer.disable_adapters and not self.is_tied:
            self.__dict__["_grad_flags_before_disable"] = freeze_requires_grad(layer.trainable_tokens_delta.values())
        elif enabled and layer.disable_adapters:
            restore_requires_grad(self.__dict__.pop("_grad_flags_before_disable", []))
        layer.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s rows."""
        self.token_adapter.delete_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the rows of ``adapter_names`` (default: the active adapter) into the wrapped layer's weight."""
        self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        """Undo ``merge``."""
        if self.token_adapter.merged:
            self.token_adapter.unmerge()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped layer with the active adapter's rows."""
        return self.token_adapter(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "token_adapter":
                raise
        adapter = nn.Module.__getattr__(self, "token_adapter")
        if name == "weight":  # as peft: the weight the layer computes with (a tensor, not a Parameter)
            active = [n for n in adapter.active_adapters if n in adapter.trainable_tokens_delta]
            if adapter.disable_adapters or adapter.merged or not active:
                return adapter.base_layer.weight
            return adapter.get_merged_weights(active)
        return getattr(adapter.base_layer, name)
