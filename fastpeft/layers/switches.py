"""What fastpeft's adapter layers (``FastLoraLinear``, ``FastLoraEmbedding``) share: the wrapped base, which
adapters are active, which train, switching them off, and whether one is merged — peft's ``BaseTunerLayer``
methods of those names.

A layer using ``AdapterSwitches`` keeps ``base_layer``, ``_active_adapters`` (a list), ``_disable_adapters`` (a
bool) and ``merged_adapters`` (a list), names its adapters and their trainable tensors through
``_adapter_names()`` and ``_adapter_parameters(name)``, and takes one merged adapter out with
``_unmerge_one(name)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..ops_mixed import BASE as _BASE_NAME
from ..reference import wide


def freeze_requires_grad(params) -> list[tuple[torch.Tensor, bool]]:
    """Freeze ``params`` (adapters switched off, as peft freezes them), returning each one's ``requires_grad`` as it
    was, for :func:`restore_requires_grad`."""
    saved = [(p, p.requires_grad) for p in params]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def restore_requires_grad(saved) -> None:
    """Give the parameters :func:`freeze_requires_grad` froze their ``requires_grad`` back."""
    for p, flag in saved:
        p.requires_grad_(flag)


class AdapterSwitches:
    """Adapter activation, trainability and on/off switching for a fastpeft adapter layer (see the module)."""

    def get_base_layer(self) -> nn.Module:
        """The wrapped base layer (peft's method)."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as peft's LoRA layers expose it; transformers' tying reads it)."""
        return self.base_layer.weight

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters, in activation order (peft's property)."""
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names when several are active (peft's property)."""
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (summed); only active adapters train, as in peft.

        Names this layer does not hold are kept in the active list and ignored by the forward (peft's
        behaviour, so one model-wide call works when adapters target different layers).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.__dict__.pop("_grad_flags_before_disable", None)  # (trainability is set anew: nothing to restore)
        for name in self._adapter_names():
            train = name in names and not inference_mode
            for param in self._adapter_parameters(name):
                param.requires_grad_(train)
        self._active_adapters = names

    def _activate_added(self, adapter_name: str, config) -> None:
        """After ``update_layer`` added ``adapter_name``: without a ``config`` it becomes the active adapter; with
        one (peft's semantics) the active adapters stay as they are (the new one if there were none), and a
        config in inference mode leaves it frozen."""
        if config is None:
            self.set_adapter(adapter_name)
        else:
            self.set_adapter(self._active_adapters or [adapter_name],
                             inference_mode=bool(getattr(config, "inference_mode", False)))

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch training on or off for the named adapters of this layer (peft's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = set(self._adapter_names())
        for name in names:
            if name in held:
                for param in self._adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    # ----------------------------------------------------------------- peft's LoraLayer scale methods
    def _initial_scale(self, name: str) -> float:
        """``lora_alpha / r`` (rsLoRA: ``/ √r``): the scale adapter ``name`` was created with."""
        r, alpha = self.r[name], self.lora_alpha[name]
        return alpha / math.sqrt(r) if self.use_rslora.get(name, False) else alpha / r

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set adapter ``adapter``'s scale to its initial scale times ``scale`` (peft's method; an adapter this layer
        does not hold is ignored)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scale(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scale of every active adapter this layer holds by ``scale`` (peft's method)."""
        if scale == 1:
            return
        held = set(self._adapter_names())
        for name in self._active_adapters:
            if name in held:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the current scale of every active adapter this layer holds by ``scale``; ``None`` resets it to the
        initial scale (peft's method)."""
        held = set(self._adapter_names())
        for name in self._active_adapters:
            if name in held:
                self.scaling[name] = self._initial_scale(name) if scale is None else self.scaling[name] / scale

    def _names_to_merge(self, adapter_names: Iterable[str] | None) -> list[str]:
        """The adapters a ``merge`` call is about, among those this layer holds: the active ones (an active name the
        layer lacks is skipped, as peft's layers do: the model-wide active list names adapters of other layers), or
        ``adapter_names``, whose unknown names raise here, before anything is written (inside a peft model,
        ``fastpeft.from_peft``, they are skipped as peft's model-wide calls expect)."""
        held = self._adapter_names()
        if adapter_names is None:
            return [n for n in self._active_adapters if n in held]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in held]
        if unknown and not getattr(self, "_in_peft_model", False):
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(held)}")
        return [n for n in names if n in held]

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are switched off (forward = base layer only)."""
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off (peft's method); disabling unmerges merged adapters and, as peft, freezes
        the adapter weights while off (no optimizer or trainable-parameter count sees them); switching back on
        restores each weight's trainability as it was (peft makes the active adapters trainable instead, even
        adapters loaded for inference)."""
        if not enabled and self.merged:
            self.unmerge()
        if not enabled and not self._disable_adapters:
            self._grad_flags_before_disable = freeze_requires_grad(
                p for name in self._adapter_names() for p in self._adapter_parameters(name))
        elif enabled and self._disable_adapters:
            restore_requires_grad(self.__dict__.pop("_grad_flags_before_disable", ()))
        self._disable_adapters = not enabled

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: run the base layer alone inside the block."""
        before = self._disable_adapters
        self.enable_adapters(False)
        try:
            yield self
        finally:
            self.enable_adapters(not before)

    def _forget_active(self, adapter_name: str) -> None:
        """After deleting ``adapter_name``: it leaves the active list; with none left, the first remaining
        adapter becomes active (peft's behaviour). An adapter that was not active here changes nothing: a layer
        whose active list is empty (the active adapters are elsewhere) must not start running another one."""
        if adapter_name not in self._active_adapters:
            return
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]
        names = self._adapter_names()
        if not self._active_adapters and names:
            self.set_adapter(names[0])

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        for name in reversed(list(self.merged_adapters)):
            self._unmerge_one(name)

    def _plain_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, adapter_names) -> torch.Tensor:
        """The forward of a layer computed in plain PyTorch: a mixed-adapter batch when ``adapter_names`` (or the
        names the model-level hook handed over) are given; else the base, plus ``_apply_adapters(x, y, active)``
        for the active adapters the layer holds (none while disabled or merged), in the base output's dtype.
        While disabled it is the base alone, adapters merged meanwhile unmerged first (peft's forward)."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is None:
            adapter_names = self._fastpeft_adapter_names
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return y
        held = set(self._adapter_names())
        active = [n for n in self._active_adapters if n in held]
        if not active:
            return y
        return self._apply_adapters(x, y, active).to(y.dtype)

    def _mixed_names(self, x: torch.Tensor, adapter_names, held, batched: bool) -> list[str]:
        """``adapter_names`` (peft's mixed-batch argument) checked against ``x`` as a list with one name per sample:
        the count (an encoder's input during beam search may take the unexpanded names), no merged adapter, and
        (unless the model-level hook checked them) no name the layer lacks (``held``: the names it has).
        ``batched``: whether ``x`` has a batch dimension at all."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if batched and len(names) != x.shape[0]:
            unexpanded = getattr(adapter_names, "unexpanded", None)
            if unexpanded is not None and len(unexpanded) == x.shape[0]:
                names = list(unexpanded)
        if not batched or len(names) != x.shape[0]:
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(names)} and {x.shape[0] if batched else 'an unbatched input'} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        if not getattr(adapter_names, "_fastpeft_model_checked", False):
            unknown = sorted({n for n in names if n != _BASE_NAME and n not in held})
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this layer has {list(held)} (and "
                                 f"{_BASE_NAME!r} for the base layer alone)")
        return names


class MergeMath:
    """Merging an adapter's delta into a weight and taking it out again, in fp32, and the per-adapter bookkeeping
    around it (``lora_bias``, deleting an adapter), for the layers with ``lora_A`` / ``lora_B`` modules (linear,
    convolution): LoRA adds ``ΔW``; DoRA, as peft, gives ``m / ‖W0 + ΔW‖ ⊙ (w + ΔW)`` per output
    feature, the norm taken on the base without merged adapters and kept for the unmerge. A layer supplies
    ``get_delta_weight(name)`` (``ΔW`` laid out as its base weight), ``_out_norm(w)`` (each output feature's norm,
    (out,)) and ``_along_out(v)`` (an (out,) vector shaped to scale such a weight)."""

    @property
    def lora_bias(self) -> dict[str, bool]:
        """Per adapter, whether its ``lora_B`` has a bias (peft's ``lora_bias`` dict, read from the modules)."""
        return {n: self.lora_B[n].bias is not None for n in self.lora_A}

    def _check_bias_mergeable(self, names: list[str]) -> None:
        """Raise (before anything is written) if one of ``names`` has a ``lora_B`` bias but the base has none
        to merge it into (peft's error; peft raises it after writing the merged weight)."""
        if getattr(self.base_layer, "bias", None) is None \
                and any(n in self.lora_B and self.lora_B[n].bias is not None for n in names):
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")

    def _merge_math(self, w: torch.Tensor, name: str, w0: torch.Tensor | None, record: bool = True) -> torch.Tensor:
        """``w`` (fp32, laid out as the base weight) with adapter ``name`` merged in; DoRA's norm is taken on
        ``w0`` (the base without merged adapters; ``w`` itself when None) and kept (``record``) for the unmerge."""
        delta = self.get_delta_weight(name)
        if not self.use_dora.get(name, False):
            return w + delta
        norm = self._out_norm((w if w0 is None else w0) + delta)
        if record:
            self._dora_merged_norms[name] = norm
        factor = wide(self.lora_magnitude_vector[name].weight.detach()).reshape(-1) / norm
        return self._along_out(factor) * (w + delta)

    def _unmerge_math(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """``w`` (fp32) with merged adapter ``name`` taken out again (DoRA: with the norm kept at merge)."""
        delta = self.get_delta_weight(name)
        if not self.use_dora.get(name, False):
            return w - delta
        # (the norm kept at merge stays where it was computed: the layer may have moved to another device since)
        norm = self._dora_merged_norms[name].to(w.device)
        factor = wide(self.lora_magnitude_vector[name].weight.detach()).reshape(-1) / norm
        return w / self._along_out(factor) - delta

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (the current base weight, fp32) with every merged adapter taken out, in fp32 (nothing written)."""
        for name in reversed(self.merged_adapters):
            if name in self.lora_A:
                w = self._unmerge_math(w, name)
        return w

    def _delete_adapter_state(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (which the layer holds): unmerged first if merged (when a DoRA adapter is
        merged every merged adapter comes out, since DoRA merges do not commute, and the others go back in after),
        its modules and per-adapter entries dropped, no longer active. The layer supplies ``_unmerge_one(name)``
        and ``merge(adapter_names=...)``."""
        remerge = []
        if adapter_name in self.merged_adapters:
            if any(self.use_dora.get(n, False) for n in self.merged_adapters):
                remerge = [n for n in self.merged_adapters if n != adapter_name]
                for name in reversed(list(self.merged_adapters)):
                    self._unmerge_one(name)
            else:
                self._unmerge_one(adapter_name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.use_alora,
                  self.frozen_peft_weight_names):
            d.pop(adapter_name, None)
        if remerge:
            self.merge(adapter_names=remerge)
        self._forget_active(adapter_name)


def init_lora_state(layer: nn.Module) -> None:
    """The per-adapter containers a LoRA layer with ``lora_A``/``lora_B`` modules keeps (peft's names), empty;
    no adapter active, none merged."""
    layer.lora_dropout = nn.ModuleDict()
    layer.lora_A = nn.ModuleDict()
    layer.lora_B = nn.ModuleDict()
    layer.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
    layer.r = {}
    layer.lora_alpha = {}
    layer.scaling = {}
    layer.use_rslora = {}
    layer.use_dora = {}
    layer.use_alora = {}  # aLoRA adapters (alora_invocation_tokens): linear layers only
    layer.frozen_peft_weight_names = {}  # adapter → its factors that never train (peft's name; MiCA: ("lora_B",))
    layer._active_adapters = []
    layer.merged_adapters = []
    layer._disable_adapters = False
    layer._dora_merged_norms = {}  # ‖W0 + ΔW‖ at merge time, for unmerge


def warn_already_merged(layer, names: list[str]) -> None:
    """peft's warnings when ``merge`` finds adapters merged already (``check_adapters_to_merge``'s texts): all of
    ``names`` merged, or some merged and others to add."""
    import warnings

    merged = list(layer.merged_adapters)
    if not merged:
        return
    rest = [n for n in names if n not in merged]
    if rest:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                      f"merging {','.join(rest)}.", stacklevel=3)
    else:
        warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
