"""``FastLoraConv``: LoRA on a frozen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, with peft's ``lora.ConvNd``
semantics and names.

Parameters are peft's: ``base_layer.weight`` (out, in/groups, *k), ``lora_A.<adapter>.weight`` (r, in, *k) — a
convolution with the base's kernel size, stride and padding — and ``lora_B.<adapter>.weight`` (out, r/groups,
1, …) — a 1×1 convolution with the base's groups (and a bias with ``lora_bias``), so state dicts and saved
adapters move between the two libraries unchanged. The output, for the active adapters ``a`` chained::

    base(x) + Σ_a lora_B_a(lora_A_a(dropout_a(x))) · scale_a

DoRA (``use_dora=True``) adds ``lora_magnitude_vector.<adapter>.weight`` (1, out, 1, …), peft's shape, and
gives ``b + k ⊙ (y − b + s·B A x)`` with ``k = m / ‖W0 + s·ΔW‖`` per output channel (the norm over every other
dimension, detached, as in peft and the DoRA paper §4.3); in training with dropout, ``y + (k − 1) ⊙ conv(D(x),
W0) + k·s·B A D(x)``. ``ΔW = B·A`` per kernel position, so ``merge()`` writes ``W0 + s·ΔW`` (DoRA:
``k ⊙ (W0 + s·ΔW)``) and the merged layer computes what the unmerged one did.

No fused kernel: the convolutions run in PyTorch (cuDNN on a GPU), as in peft, and dropout is ``nn.Dropout``.

Different from peft, on purpose:

- ``lora_A`` takes the base's ``dilation`` and ``padding_mode`` too (peft's leaves them at 1 and "zeros": its
  output then has the wrong size on a dilated base, and on a non-zero padding mode its unmerged output is not
  the merged one). On the convolutions peft handles the two agree.
- A base with ``groups > 1`` takes LoRA (rank divisible by the groups, as in peft), but neither merging (peft
  refuses it too: the delta of a full ``lora_A`` is not a grouped weight) nor DoRA (peft's computes a wrong
  shape there).
- ``init_lora_weights`` True, False and "gaussian" only, as peft's ``ConvNd`` (an init that reads the base
  weight raises, naming the layer).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..errors import PeftWarning
from ..reference import wide
from .lora import DoraMagnitude
from .parametrized import check_weight_writable, store_merged, store_unmerged
from .switches import AdapterSwitches, MergeMath, init_lora_state, warn_already_merged

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_plain_conv(module: nn.Module) -> bool:
    """True for a module ``FastLoraConv`` wraps: ``nn.Conv1d``/``Conv2d``/``Conv3d`` or a subclass (not the
    transposed convolutions, which peft does not adapt either)."""
    return isinstance(module, _CONV_TYPES)


def _torch_conv_class(base: nn.Module) -> type:
    for cls in _CONV_TYPES:
        if isinstance(base, cls):
            return cls
    raise TypeError(f"FastLoraConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base).__name__}")


class FastLoraConv(AdapterSwitches, MergeMath, nn.Module):
    """LoRA on a frozen convolution: ``base(x) + scale · lora_B(lora_A(dropout(x)))`` (peft's ``lora.Conv1d``,
    ``lora.Conv2d``, ``lora.Conv3d``); see the module for the formulas and where it differs from peft.

    Args mirror peft's ``LoraConfig``: ``r`` (rank, ≥ 1, a multiple of the base's ``groups``), ``lora_alpha``,
    ``lora_dropout`` (``nn.Dropout`` on the adapter's input), ``use_rslora`` (scale ``alpha/√r``),
    ``init_lora_weights`` (True: A kaiming-uniform(a=√5), B = 0; "gaussian": A ~ N(0, 1/r²), B = 0; False: both
    left at ``nn.Conv``'s init), ``use_dora``, ``lora_bias`` (a bias on ``lora_B``). Adapter weights are fp32 on
    a half-precision base unless ``autocast_adapter_dtype=False``. The output has the base's dtype.

    Example::

        layer = FastLoraConv(unet.conv_in, r=8, lora_alpha=8)      # or FastLoraConv.from_conv(...)
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    fan_in_fan_out = False  # peft's attribute

    def __init__(self, base_layer: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False, adapter_name: str = "default", autocast_adapter_dtype: bool = True,
                 **peft_kwargs):
        super().__init__()
        self._conv_class = _torch_conv_class(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._kernel_dim = base_layer.weight.dim()
        self._fastpeft_adapter_names = None
        for param in base_layer.parameters():
            param.requires_grad_(False)
        init_lora_state(self)
        self.update_layer(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                          lora_bias=lora_bias, autocast_adapter_dtype=autocast_adapter_dtype, **peft_kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Module, **kwargs) -> FastLoraConv:
        """Wrap an existing ``nn.Conv1d``/``Conv2d``/``Conv3d`` without copying its weight (the keyword
        arguments are the constructor's)."""
        return cls(conv, **kwargs)

    # ------------------------------------------------------------------ setup
    def _where(self, adapter_name: str) -> str:
        return f"({type(self.base_layer).__name__}, adapter {adapter_name!r})"

    def update_layer(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False,
                     autocast_adapter_dtype: bool = True, config=None, use_dora: bool = False,
                     lora_bias: bool = False, loftq_config=None, **peft_kwargs) -> None:
        """Add (or replace) adapter ``adapter_name``; without ``config`` it becomes the active one.

        With ``config`` (a LoraConfig) dropout, init, rsLoRA, DoRA and ``lora_bias`` come from it and the active
        adapters stay as they are (peft's semantics)."""
        if config is not None:
            lora_dropout, init_lora_weights = config.lora_dropout, config.init_lora_weights
            use_rslora, use_dora = config.use_rslora, bool(getattr(config, "use_dora", False))
            lora_bias = bool(getattr(config, "lora_bias", False))
        base = self.base_layer
        groups = base.groups
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        if r % groups:
            raise ValueError(f"Targeting a {type(base).__name__} with groups={groups} and rank {r}: the rank must "
                             "be divisible by the groups (as in peft); choose another rank for it (rank_pattern) or "
                             "do not target it")
        if not 0.0 <= float(lora_dropout) <= 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1], got {lora_dropout}")
        if init_lora_weights not in (True, False) and not (isinstance(init_lora_weights, str)
                                                           and init_lora_weights.lower() == "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} on the convolution {self._where(adapter_name)} "
                             "is not supported: convolutions take True, False or 'gaussian' (as peft's ConvNd); "
                             "leave the convolution out of target_modules or give it a separate adapter")
        if use_dora and lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if use_dora and groups > 1:
            raise ValueError(f"DoRA (use_dora=True) on the grouped convolution {self._where(adapter_name)} "
                             f"(groups={groups}) is not supported by fastpeft")
        if lora_bias and base.bias is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no "
                          "bias. This means that merging LoRA weights won't be possible.", PeftWarning, stacklevel=3)
        if groups > 1:
            warnings.warn(f"LoRA adapter added to the {type(base).__name__} with groups={groups}: merging it is not "
                          "supported.", stacklevel=3)
        cls = self._conv_class
        ones = (1,) * (self._kernel_dim - 2)
        # Built as peft builds them (on the CPU, A then B, the modules' own init first), so the same seed gives
        # the same factors; A also takes the base's dilation and padding mode (see the module).
        A = cls(self.in_features, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation,
                padding_mode=base.padding_mode, bias=False)
        B = cls(r, self.out_features, ones, ones, groups=groups, bias=bool(lora_bias))
        if init_lora_weights is not False:
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
            if B.bias is not None:
                nn.init.zeros_(B.bias)
        weight = base.weight
        dtype = weight.dtype
        if (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)) or not dtype.is_floating_point:
            dtype = torch.float32
        A.to(device=weight.device, dtype=dtype)
        B.to(device=weight.device, dtype=dtype)
        if adapter_name in self.merged_adapters:
            self._unmerge_one(adapter_name)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.use_dora[adapter_name] = bool(use_dora)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:
            norm = self._weight_norm(adapter_name, self.base_layer.weight.detach()).to(dtype)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(nn.Parameter(norm))
        self._activate_added(adapter_name, config)

    add_adapter = update_layer

    # ------------------------------------------------------------ adapters
    def _adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _adapter_parameters(self, name: str) -> list[torch.Tensor]:
        params = [*self.lora_A[name].parameters(), *self.lora_B[name].parameters()]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name].weight)
        return params

    def adapter_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in, *k), B (out, r/groups, 1, …)) of ``adapter_name``: the parameters themselves."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging it first if merged)."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.lora_A.keys())}")
        self._delete_adapter_state(adapter_name)

    # ------------------------------------------------------------ weights
    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to scale an output (batched or not) or a weight: (out, 1, …)."""
        return v.reshape(-1, *([1] * (self._kernel_dim - 2)))

    def _along_out(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to scale a weight (out, in/groups, *k): (out, 1, 1, …)."""
        return v.reshape(-1, *([1] * (self._kernel_dim - 1)))

    def _out_norm(self, w: torch.Tensor) -> torch.Tensor:
        """The norm of each output channel's slice of ``w`` (laid out as the base weight): (out,)."""
        return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())))

    def _refuse_grouped_merge(self) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(f"Merging is not supported for {type(self.base_layer).__name__} layers with "
                                      f"groups > 1 (here {self.base_layer.groups}), as in peft")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale · ΔW`` in fp32, shaped as the base weight: ``ΔW[o, i, κ] = Σ_r B[o, r] A[r, i, κ]``. A grouped
        base (groups > 1) raises: its LoRA delta is no grouped weight."""
        self._refuse_grouped_merge()
        A = wide(self.lora_A[adapter_name].weight)
        B = wide(self.lora_B[adapter_name].weight)
        r = A.shape[0]
        delta = B.reshape(-1, r) @ A.reshape(r, -1)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling[adapter_name]

    @torch.no_grad()
    def _weight_norm(self, adapter_name: str, w0: torch.Tensor) -> torch.Tensor:
        """``‖w0 + s·ΔW‖`` per output channel (fp32, shaped as a DoRA magnitude: (1, out, 1, …))."""
        norm = self._out_norm(wide(w0) + self.get_delta_weight(adapter_name))
        return norm.reshape(1, -1, *([1] * (self._kernel_dim - 2)))

    def dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """``‖W0 + s·ΔW‖`` per output channel of adapter ``adapter_name`` on the unmerged base weight (fp32, shaped
        as its magnitude: (1, out, 1, …)); the magnitude that makes the adapter a plain LoRA."""
        w = wide(self.base_layer.weight.detach())
        return self._weight_norm(adapter_name, self._unmerged_weight(w) if self.merged_adapters else w)

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ‖W0 + s·ΔW‖`` (fp32, the norm detached), per output channel, shaped (out, 1, …)."""
        magnitude = wide(self.lora_magnitude_vector[adapter_name].weight)
        return self._channel_view(magnitude / self.dora_weight_norm(adapter_name))

    # ------------------------------------------------------------ merging
    def _scaled_bias(self, name: str) -> torch.Tensor | None:
        bias = self.lora_B[name].bias
        return None if bias is None else wide(bias.detach()) * self.scaling[name]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the named) adapters into the base weight (in fp32, cast once); forward becomes the
        base alone. DoRA: ``W ← k ⊙ (W + s·ΔW)``, the norm kept for ``unmerge``. A ``lora_B`` bias goes into
        the base bias (a base without one raises RuntimeError, before anything is written). ``safe_merge``
        checks for NaN/inf before writing. A grouped base raises NotImplementedError, as in peft."""
        names = self._names_to_merge(adapter_names)
        warn_already_merged(self, names)  # peft's warnings
        todo = [n for n in names if n not in self.merged_adapters]
        if todo:
            self._refuse_grouped_merge()
            check_weight_writable(self.base_layer, "merge into it")  # (a parametrized weight, e.g. weight_norm)
        self._check_bias_mergeable(todo)
        bias = self.base_layer.bias
        for name in todo:
            weight = self.base_layer.weight  # (a parametrized one is recomputed: read it again after each write)
            w = wide(weight)
            w0 = self._unmerged_weight(w) if self.use_dora.get(name, False) and self.merged_adapters else None
            merged = self._merge_math(w, name, w0)
            extra = self._scaled_bias(name)
            new_bias = None if extra is None else wide(bias) + extra
            if safe_merge and (not torch.isfinite(merged.to(weight.dtype)).all()  # (as stored: fp16 may overflow)
                               or (new_bias is not None and not torch.isfinite(new_bias.to(bias.dtype)).all())):
                self._dora_merged_norms.pop(name, None)
                raise ValueError(f"NaNs or infs detected in the merged weight of adapter {name!r}; "
                                 "the adapter seems to be broken")
            store_merged(self, name, merged.to(weight.dtype))
            if new_bias is not None:
                bias.data.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        store_unmerged(self, name, lambda: self._unmerge_math(wide(weight), name).to(weight.dtype))
        extra = self._scaled_bias(name)
        if extra is not None:
            bias.data.copy_((wide(bias) - extra).to(bias.dtype))
        self._dora_merged_norms.pop(name, None)
        self.merged_adapters.remove(name)

    # ------------------------------------------------------------- forward
    def _base_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The base convolution without its bias (DoRA's dropout path), in ``x``'s dtype."""
        base = self.base_layer
        return base._conv_forward(x, base.weight.to(x.dtype), None)

    def _chain(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        """``y`` (the output so far, bias included) with adapter ``name`` applied, chained as peft chains its
        adapters: LoRA adds ``s·B A D(x)``; DoRA gives ``b + k ⊙ (y − b + s·B A x)`` at p = 0 or in eval, and
        ``y + (k − 1) ⊙ conv(D(x), W0) + k·s·B A D(x)`` in training with dropout."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        xc = x.to(A.weight.dtype)
        drop = self.lora_dropout[name]
        if not self.use_dora.get(name, False):
            return y + B(A(drop(xc))) * s
        k = self._dora_scale(name)
        bias = self.base_layer.bias
        if not self.training or not isinstance(drop, nn.Dropout):
            rest = wide(y) if bias is None else wide(y) - self._channel_view(wide(bias))
            out = k * (rest + s * wide(B(A(xc))))
            return out if bias is None else out + self._channel_view(wide(bias))
        xd = drop(xc)
        return y + (k - 1.0) * wide(self._base_conv(xd)) + k * s * wide(B(A(xd)))

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        """The base convolution plus every active adapter; ``adapter_names`` (one name per sample of the batch,
        ``"__base__"`` for none) runs a mixed-adapter batch as peft's argument does."""
        return self._plain_forward(x, args, kwargs, adapter_names)

    def _apply_adapters(self, x: torch.Tensor, y: torch.Tensor, active: list[str]) -> torch.Tensor:
        for name in active:
            y = self._chain(x, y, name)
        return y

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """One adapter per sample of ``x`` (``"__base__"`` = none), as peft's ``adapter_names``, in eval and in
        training: the base on every sample, each adapter's output added to its own samples."""
        names = self._mixed_names(x, adapter_names, self.lora_A, batched=x.dim() == self._kernel_dim)
        dora = sorted({n for n in names if self.use_dora.get(n, False)})
        if dora:  # as peft: mixed batches are LoRA-only
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapter(s) {dora}).")
        y = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return y
        present = [n for n in dict.fromkeys(names) if n in self.lora_A]
        if self.training and torch.is_grad_enabled():
            # Trainable adapters with no sample here run on zero samples: zero gradients rather than none (DDP).
            present += [n for n in self.lora_A if n not in present and not self.use_dora.get(n, False)
                        and self.lora_A[n].weight.requires_grad]
        if not present:
            return y
        out = y
        for name in present:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=x.device)
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            delta = B(A(drop(x.index_select(0, rows).to(A.weight.dtype)))) * self.scaling[name]
            # each sample's sum in the wider dtype, rounded once to the base's (the samples are disjoint)
            wide = torch.promote_types(out.dtype, delta.dtype)  # (under autocast the delta may be the narrower)
            out = out.to(wide).index_add(0, rows, delta.to(wide))
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        """Each adapter's rank, alpha and scaling (and rsLoRA/DoRA), as peft's repr lists them."""
        parts = [f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}, scaling={self.scaling[n]:g}"
                 + (", rslora" if self.use_rslora[n] else "") + (", dora" if self.use_dora.get(n) else "")
                 for n in self.lora_A]
        return "; ".join(parts)

    def __repr__(self) -> str:
        return "fastpeft." + super().__repr__()


__all__ = ["FastLoraConv", "is_plain_conv"]
