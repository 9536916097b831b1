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
import warnings
from collections.abc import Iterable

import torch
from torch import nn


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
        for name in self._adapter_names():
            train = name in names and not inference_mode
            for param in self._adapter_parameters(name):
                param.requires_grad_(train)
        self._active_adapters = names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch training on or off for the named adapters of this layer (peft's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = set(self._adapter_names())
        for name in names:
            if name in held:
                for param in self._adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are switched off (forward = base layer only)."""
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off (peft's method); disabling unmerges merged adapters."""
        if not enabled and self.merged:
            self.unmerge()
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
