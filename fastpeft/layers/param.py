"""LoRA on an ``nn.Parameter`` of a module (peft's ``LoraConfig(target_parameters=[...])``, its ``ParamWrapper``).

The typical target is a stack of MoE expert weights held as one 3-D parameter (transformers 5.x:
``mlp.experts.gate_up_proj`` / ``down_proj``). ``FastLoraParamWrapper`` replaces the module that owns the
parameter and, while the module runs, gives it ``W + scale·ΔW`` in place of ``W`` (the parameter object itself
is never changed, except by ``merge``). Plain PyTorch, peft's layout, so adapters move both ways:

* a 2-D parameter ``(out, in)`` is adapted like ``nn.Linear``'s weight: ``lora_A`` is ``nn.Linear(in, r)``,
  ``lora_B`` is ``nn.Linear(r, out)``, ``ΔW = B A``;
* a 3-D parameter of ``E`` experts has ``lora_A`` ``nn.Linear(in, r·E)`` and ``lora_B`` ``nn.Linear(r·E, out)``
  (``r`` is the rank of each expert): expert ``e`` gets ``ΔW_e = B[:, :, e] A[e]`` with ``A`` read as
  ``(E, r, in)`` and ``B`` as ``(out, r, E)``. transformers stores most experts as ``(E, out, in)``; a module
  with ``is_transposed=True`` (GPT-OSS) stores ``(E, in, out)`` and gets ``ΔW_eᵀ``.

Several parameters of one module nest wrappers (the outer one wraps the inner one), as peft does, so the saved
keys are peft's (``<module>.lora_A.weight``, ``<module>.base_layer.lora_A.weight``, ...). As peft, there is no
dropout, ``fan_in_fan_out``, ``lora_bias``, DoRA or mixed adapter batch on these layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from .switches import AdapterSwitches

# init_lora_weights values implemented here (as peft's ``reset_lora_parameters``)
PARAM_INITS = (True, False, "gaussian")


class FastLoraParamWrapper(AdapterSwitches, nn.Module):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (peft's ``lora.ParamWrapper``; see the module).

    Args:
        base_layer: the module owning the parameter (or another ``FastLoraParamWrapper`` around it).
        parameter_name: the parameter's attribute name on the innermost module (``"gate_up_proj"``).
        adapter_name, r, lora_alpha, init_lora_weights, use_rslora: as ``FastLoraLinear``'s;
            ``init_lora_weights`` True, False or ``"gaussian"``.
        autocast_adapter_dtype: fp16/bf16 parameters get fp32 adapter weights (peft's default).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, adapter_name: str = "default", r: int = 8,
                 lora_alpha: float = 8, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 autocast_adapter_dtype: bool = True):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            self.num_experts, first, second = shape
            # (E, out, in) unless the module says it stores (E, in, out)
            self.transposed = bool(getattr(self.get_base_layer(), "is_transposed", False))
            self.in_features, self.out_features = (first, second) if self.transposed else (second, first)
        elif len(shape) == 2:
            self.num_experts, self.transposed = 1, False
            self.out_features, self.in_features = shape
        else:
            raise ValueError(f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only "
                             "2d and 3d are supported.")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self._active_adapters = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._fastpeft_adapter_names = None
        self.update_layer(adapter_name, r=r, lora_alpha=lora_alpha, init_lora_weights=init_lora_weights,
                          use_rslora=use_rslora, autocast_adapter_dtype=autocast_adapter_dtype)

    # ----------------------------------------------------------------- structure
    def get_base_layer(self) -> nn.Module:
        """The module that owns the parameter (through any nested wrappers)."""
        base = self.base_layer
        while isinstance(base, FastLoraParamWrapper):
            base = base.base_layer
        return base

    def get_param(self) -> nn.Parameter:
        """The adapted parameter itself (without the LoRA delta)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [*self.lora_A[name].parameters(), *self.lora_B[name].parameters()]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, init_lora_weights: bool | str = True,
                     use_rslora: bool = False, autocast_adapter_dtype: bool = True) -> None:
        """Add adapter ``adapter_name`` (rank ``r`` per expert), initialized as peft's."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if init_lora_weights not in PARAM_INITS:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported by fastpeft on "
                             f"target_parameters (supported: {PARAM_INITS}); use peft for this adapter")
        # the same modules, created in the same order as peft's, so a seeded init gives peft's numbers
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.use_dora[adapter_name] = False
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        # as peft: to the parameter's device and dtype, then (fp16/bf16, autocast_adapter_dtype) up to fp32, so a
        # seeded init holds peft's (half-rounded) values
        param = self.get_param()
        dtype = param.dtype if param.dtype.is_floating_point else None
        for holder in (self.lora_A, self.lora_B):
            holder[adapter_name].to(device=param.device, dtype=dtype)
            if dtype in (torch.float16, torch.bfloat16) and autocast_adapter_dtype:
                holder[adapter_name].float()
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from this layer (the wrapper stays, as in peft)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {self.parameter_name!r}; unmerge it first")
        for holder in (self.lora_A, self.lora_B):
            del holder[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora):
            table.pop(adapter_name, None)
        self._forget_active(adapter_name)

    # ----------------------------------------------------------------- the delta
    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as (E, r, in), B as (E, out, r)) of one adapter."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        A3 = A.reshape(self.num_experts, -1, A.shape[-1])
        return A3, B.reshape(B.shape[0], -1, self.num_experts).permute(2, 0, 1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale·ΔW`` laid out as the parameter (peft's method), in the parameter's dtype."""
        param = self.get_param()
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if self.num_experts == 1 and param.ndim == 2:
            delta = (B @ A) * self.scaling[adapter_name]
        else:
            A3, B3 = self._factors(adapter_name)
            delta = torch.bmm(B3, A3) * self.scaling[adapter_name]  # (E, out, in)
            if self.transposed:
                delta = delta.transpose(-2, -1)
        return delta.to(param.device, param.dtype)

    def _adapted(self, adapters: list[str]) -> torch.Tensor:
        param = self.get_param()
        if len(adapters) == 1 and param.ndim == 3:
            # one adapter on an expert stack: W + scale·lhs@rhs in one baddbmm, as peft
            A3, B3 = self._factors(adapters[0])
            lhs, rhs = (A3.transpose(-2, -1), B3.transpose(-2, -1)) if self.transposed else (B3, A3)
            return torch.baddbmm(param, lhs.to(param.dtype), rhs.to(param.dtype), alpha=self.scaling[adapters[0]])
        delta = None
        for name in adapters:
            d = self.get_delta_weight(name)
            delta = d if delta is None else delta + d
        return param + delta

    @contextlib.contextmanager
    def _swapped(self, value: torch.Tensor):
        """Inside the block the owning module's ``parameter_name`` reads ``value`` (a tensor in the graph): an
        instance attribute, found before ``nn.Module.__getattr__`` looks in ``_parameters``, so the parameter
        itself stays registered where it was (state dict, order, optimizer)."""
        module = self.get_base_layer()
        name = self.parameter_name
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__}.{name} is already swapped (a wrapper entered twice?)")
        module.__dict__[name] = value
        try:
            yield
        finally:
            module.__dict__.pop(name, None)

    # ----------------------------------------------------------------- forward / merge
    def forward(self, *args: Any, **kwargs: Any):
        """The owning module's forward, run with ``W + Σ scale·ΔW`` of the active adapters (unless merged or
        disabled)."""
        if kwargs.pop("adapter_names", None) is not None or self._fastpeft_adapter_names is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet.")
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        adapters = [a for a in self._active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return self.base_layer(*args, **kwargs)
        with self._swapped(self._adapted(adapters)):
            return self.base_layer(*args, **kwargs)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters (default: the active ones) to the parameter itself (peft's method)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        param = self.get_param()
        for name in names:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = param.data.clone() + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                param.data = merged
            else:
                param.data += delta
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        param = self.get_param()
        param.data -= self.get_delta_weight(name)
        self.merged_adapters.remove(name)

    def extra_repr(self) -> str:
        """The adapted parameter's name (peft's repr shows it too)."""
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}"
