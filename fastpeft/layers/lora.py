"""``FastLoraLinear``: a drop-in LoRA linear layer laid out exactly as peft's.

Parameters and buffers carry peft's names and shapes (``base_layer.weight``,
``lora_A.<adapter>.weight`` (r, in), ``lora_B.<adapter>.weight`` (out, r)), so
state dicts move between the two unchanged. The forward of the first active
adapter is one fused op (``fastpeft.ops.lora_linear``); further active
adapters, rare in training, are added with plain PyTorch.

DoRA (``use_dora=True``, peft's weight-decomposed LoRA) adds ``lora_magnitude_vector.<adapter>.weight``
(out,) and computes ``m / ‖W0 + s·B·A‖_row ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b`` (the norm detached, as in peft):
at p = 0 or in eval that is the same fused op (without its bias) and one row scaling. The row norms
come without the (out, in) matrix peft builds on every forward::

    ‖W0_o + s·B_o A‖² = ‖W0_o‖² + 2s·B_o·(W0 Aᵀ)_o + s²·B_o (A Aᵀ) B_oᵀ

``‖W0_o‖²`` is cached (W0 is frozen), ``W0 Aᵀ`` (out × r) reads W0 once, a bounded number of rows
at a time (4-bit bases decode those rows only), the rest is r-sized; all in fp32.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules import module as _module_hooks
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..alora import token_mask as alora_token_mask
from ..errors import PeftWarning
from ..ops import draw_seed, lora_linear, philox_dropout, to_autocast_dtype
from ..ops_mixed import BASE as _BASE_NAME
from ..ops_mixed import lora_linear_mixed, mixed_rows, stack_adapters
from ..reference import wide
from .lora_init import (
    BASE_MUTATING,
    check_loftq_config,
    init_kind,
    loftq_factors,
    mutates_base,
    olora_factors,
    pissa_factors,
)
from .parametrized import check_weight_writable, store_merged, store_unmerged
from .switches import AdapterSwitches, MergeMath, init_lora_state, warn_already_merged

# Rows of W0 upcast (or decoded) to fp32 at once for DoRA's weight norm: bounds that temporary at
# ~16 MiB instead of peft's full (out, in) fp32 matrix.
_NORM_CHUNK_ELEMS = 1 << 22

# Optimizer steps taken so far (any torch.optim optimizer, counted by a global post-step hook): part of the key of
# DoRA's cached norm, because some optimizers write the adapter weights without bumping autograd's version counter
# (the fused AdamW that transformers' Trainer uses by default), which the tensors' stamps alone would miss.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class WeightStamp:
    """What identifies tensors' current values for a cache (DoRA's cached ``‖W0_o‖²``), keeping none of them
    alive: per tensor the object (weakly: a new tensor on a freed one's ``id`` is another object), its storage
    (weakly, by ``StorageWeakRef``, which pins the storage's record: a new storage at a freed one's address is
    another storage), its data pointer and autograd's version counter (bumped by in-place writes, optimizers,
    ``load_state_dict``); plus plain ``extra`` values (dtype, device, …). A cached stamp ``==`` one taken now:
    the same tensors, unchanged. (An (id, address, version) key was fooled by a weight replaced twice between
    forwards: ``.data =`` keeps the version, and the allocator hands the freed address to the next weight.)
    Raises RuntimeError (inference tensors: no version counter) or NotImplementedError (no storage)."""

    __slots__ = ("_tensors", "_extra")

    def __init__(self, tensors, extra=()):
        self._tensors = [(weakref.ref(t), StorageWeakRef(t.untyped_storage()), t.data_ptr(), t._version)
                         for t in tensors]
        self._extra = tuple(extra)

    def __eq__(self, other) -> bool:
        if not isinstance(other, WeightStamp) or self._extra != other._extra \
                or len(self._tensors) != len(other._tensors):
            return False
        for (ref, storage, ptr, version), (ref2, storage2, ptr2, version2) in zip(self._tensors, other._tensors):
            t = ref()
            if t is None or t is not ref2() or storage.expired() or storage.cdata != storage2.cdata \
                    or (ptr, version) != (ptr2, version2):
                return False
        return True

    __hash__ = None

    def __reduce__(self):
        # A copied or pickled stamp (a deep-copied or saved layer's cache) matches nothing, so the copy recomputes
        # its cache; the weak references themselves cannot be copied (a copied StorageWeakRef would release the
        # storage's weak reference twice) nor pickled.
        return (WeightStamp, ((),))


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude vector of one adapter: ``weight`` of shape (out_features,), initialized to
    the row norms of ``W0 + scale·B·A``. Sits where peft keeps its ``DoraLinearLayer``
    (``lora_magnitude_vector[adapter]``), so the parameter is ``lora_magnitude_vector.<adapter>.weight``
    in both libraries."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class Conv1DBase(nn.Module):
    """A frozen base with GPT-2 ``Conv1D`` layout: weight (in, out), ``y = x W + b``.

    Used when ``FastLoraLinear(..., fan_in_fan_out=True)`` builds its own base.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1DBase) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None
    )


_TRAINABLE_BASE_WARNED = []


def _warn_trainable_base() -> None:
    if not _TRAINABLE_BASE_WARNED and not torch.compiler.is_compiling():
        _TRAINABLE_BASE_WARNED.append(True)
        warnings.warn("a LoRA layer's base weight requires grad: such layers run unfused (the base layer's forward "
                      "plus the adapters in plain PyTorch, as peft) so the base weight gets its gradient; freeze it "
                      "(requires_grad_(False)) for the fused kernels", stacklevel=4)


def _offloaded(base: nn.Module) -> bool:
    """Whether an accelerate hook offloads ``base``'s weight (CPU/disk offload: it waits on the meta device until the
    hook loads it for the forward). A hook that only aligns devices (a model split over GPUs, weights resident)
    leaves a dense weight that merges; the layer still runs the hooked forward (``FastLoraLinear._unfused``)."""
    hook = base.__dict__.get("_hf_hook")
    if hook is None:
        return False
    weight = base._parameters.get("weight")
    if weight is not None and weight.device.type == "meta":
        return True
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", None) or [hook])


def _has_own_forward(base: nn.Module) -> bool:
    """Whether ``base``'s output is not simply ``x Wᵀ + b`` with the weight it holds now: an ``nn.Linear``
    subclass with a forward of its own (bitsandbytes' 8-bit ``Linear8bitLt``, fp8 or other quantized linears:
    its weight holds codes), a weight that is a tensor subclass (torchao's quantized tensors), or a layer an
    accelerate hook offloads (``_offloaded``)."""
    if _offloaded(base):
        return True
    if _subclass_weight(getattr(base, "weight", None)):
        return True
    if type(base).__name__ in _PLAIN_LINEAR_SUBCLASSES and type(base).__module__.startswith("transformers."):
        return False
    return isinstance(base, nn.Linear) and type(base).forward is not nn.Linear.forward


_GLOBAL_HOOKS = (_module_hooks._global_forward_hooks, _module_hooks._global_forward_pre_hooks,
                 _module_hooks._global_backward_hooks, _module_hooks._global_backward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks of its own (forward/backward; global module hooks: see
    ``_GLOBAL_HOOKS``). Instance attributes only: this runs on every forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


# transformers' nn.Linear subclasses whose own forward computes exactly ``x Wᵀ + b`` (Falcon's: ``x @ W.T + b``):
# the fused op, merging and the weight-reading inits apply to them as to nn.Linear (peft merges them too)
_PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def _subclass_weight(weight) -> bool:
    """Whether ``weight`` is a tensor subclass that only its layer's own forward knows how to multiply by (torchao's
    quantized tensors, e.g. ``Int8Tensor`` after ``quantize_(model, Int8WeightOnlyConfig())``): anything but a plain
    tensor / parameter, other than a DTensor (FSDP2 and tensor parallelism hand plain tensors to the forward)."""
    if not isinstance(weight, torch.Tensor) or type(weight) in (torch.Tensor, nn.Parameter):
        return False
    return not any(cls.__name__ == "DTensor" for cls in type(weight).__mro__)


def _base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if _is_conv1d(base):
        w = base.weight
        return w.shape[0], w.shape[1], True
    raise TypeError(f"FastLoraLinear wraps nn.Linear or transformers' Conv1D, got {type(base).__name__}")


class FastLoraLinear(AdapterSwitches, MergeMath, nn.Module):
    """LoRA on a frozen linear layer: ``y = base(x) + scale · B(A(dropout(x))))``, fused.

    Args mirror peft's ``LoraConfig``: ``r`` (rank, ≥ 1), ``lora_alpha``,
    ``lora_dropout`` (probability in [0, 1]), ``use_rslora`` (scale
    ``alpha/√r`` instead of ``alpha/r``), ``fan_in_fan_out`` (base stores its
    weight as (in, out), as GPT-2's Conv1D), ``init_lora_weights`` (True:
    A kaiming-uniform(a=√5), B zeros; "gaussian": A ~ N(0, 1/r), B zeros;
    False: both keep nn.Linear's default init, so B ≠ 0; "pissa" / "pissa_niter_<K>" / "olora": A, B from
    the base weight's top-r singular triplets (full or fast SVD) or its QR factors, the base keeps the
    residual; "loftq" with ``loftq_config``: the base becomes its NF4 round trip, A and B the SVD of the
    quantization error; all as peft, see ``fastpeft.layers.lora_init``).
    Adapter weights are fp32 on a half-precision base unless
    ``autocast_adapter_dtype=False``. ``use_dora``: DoRA, as peft's (see the module docstring): a trainable
    magnitude per output feature, ``lora_magnitude_vector.<adapter>.weight``. ``lora_bias``: ``lora_B`` gets a
    bias ``b_B`` (peft's ``lora_bias=True``), added as ``scale·b_B`` (never dropped out), zero at init with
    ``init_lora_weights=True``; the fused op takes the effective bias ``b + scale·b_B``. Output dtype is the input's.

    Example::

        layer = FastLoraLinear(4096, 4096, r=16, lora_alpha=32, lora_dropout=0.1, dtype=torch.bfloat16)
        layer = FastLoraLinear.from_linear(model.q_proj, r=16, lora_alpha=32)  # wraps, no weight copy
    """

    # peft's BaseTunerLayer bookkeeping: which attributes hold per-adapter modules and values.
    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 fan_in_fan_out: bool = False, init_lora_weights: bool | str = True, use_dora: bool = False,
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True, device=None, dtype=None,
                 loftq_config: dict | None = None, lora_bias: bool = False):
        super().__init__()
        base_cls = Conv1DBase if fan_in_fan_out else nn.Linear
        base = base_cls(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._wrap(base, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                   autocast_adapter_dtype=autocast_adapter_dtype, loftq_config=loftq_config, lora_bias=lora_bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, fan_in_fan_out: bool | None = None,
                    init_lora_weights: bool | str = True, adapter_name: str = "default",
                    autocast_adapter_dtype: bool = True, use_dora: bool = False,
                    loftq_config: dict | None = None, lora_bias: bool = False,
                    use_alora: bool = False) -> FastLoraLinear:
        """Wrap an existing ``nn.Linear`` (or transformers ``Conv1D``) without copying its weight.

        ``fan_in_fan_out`` is detected from the module type when not given.
        """
        _, _, detected = _base_shape(linear)
        if fan_in_fan_out is not None and bool(fan_in_fan_out) != detected:
            raise ValueError(f"fan_in_fan_out={fan_in_fan_out} does not match the base layer "
                             f"{type(linear).__name__} (which needs fan_in_fan_out={detected})")
        return cls._wrapping(linear, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                             autocast_adapter_dtype=autocast_adapter_dtype, loftq_config=loftq_config,
                             lora_bias=lora_bias, use_alora=use_alora)

    @classmethod
    def _wrapping(cls, linear: nn.Module, adapter_name: str, **adapter_kwargs):
        """A new layer around ``linear`` as it is (``from_linear``'s end, shared with the 4-bit layer)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._wrap(linear, adapter_name, **adapter_kwargs)
        return self

    # ------------------------------------------------------------------ setup
    def _wrap(self, base: nn.Module, adapter_name: str, **adapter_kwargs) -> None:
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base)
        self.base_layer = base
        self._opaque_base = _has_own_forward(base)
        self._fastpeft_adapter_names = None  # instance attributes from the start: no new compile guard later
        self._fastpeft_alora_offsets = None
        # Only the adapters train by default (peft's bias="none"); a caller may unfreeze the bias.
        for param in base.parameters():
            param.requires_grad_(False)
        self._init_adapter_state()
        self.update_layer(adapter_name, **adapter_kwargs)

    def _init_adapter_state(self) -> None:
        """The per-adapter containers (peft's names), empty; no adapter active, none merged."""
        init_lora_state(self)
        self._w0_sq_cache: tuple | None = None  # (key of the base weight, ‖W0_o‖² fp32)
        # adapter → (keys of W0, A, B and the scale, ‖W0 + s·B·A‖ fp32): DoRA's whole norm, reused only with
        # autograd off (generation, eval loops), where nothing changes between forwards
        self._dora_norm_cache: dict[str, tuple] = {}

    def update_layer(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False,
                     autocast_adapter_dtype: bool = True, config=None, use_dora: bool = False,
                     loftq_config: dict | None = None, lora_bias: bool = False, tied_adapter: dict | None = None,
                     use_alora: bool = False, **peft_kwargs) -> None:
        """Add (or replace) adapter ``adapter_name`` and make it the active one (peft's name).

        ``use_dora``: a DoRA adapter, its magnitude initialized to the row norms of ``W0 + scale·B·A``
        (after the init of A and B). ``init_lora_weights``: see ``reset_lora_parameters``; ``loftq_config``
        (a ``LoftQConfig`` or its dict) goes with ``"loftq"``. ``lora_bias``: ``lora_B`` gets a bias (peft's
        option; not with DoRA nor with an init from the base weight; a base without bias warns, as in peft,
        that merging will be impossible).
        ``use_alora``: an aLoRA adapter (``LoraConfig(alora_invocation_tokens=...)``): it acts only on the tokens
        the model's ``alora_offsets`` activate (see ``fastpeft.alora``); not with DoRA, never merged.

        Called by peft's own model code (on a model converted with ``fastpeft.from_peft``), it takes
        peft's arguments: ``config`` (a LoraConfig) supplies dropout, init, rsLoRA and DoRA, the adapter
        then joins as peft's do (the active adapters stay active; the new one trains only if its config is
        not in inference mode and it is active), and further keywords (``target_name``, …) are accepted.

        ``tied_adapter`` (peft's argument, ``LoraConfig(ensure_weight_tying=True)``): ``{"lora_A": tensor,
        "lora_B": tensor}``, the transposed factors of the tied input embeddings' adapter; ``lora_A`` /
        ``lora_B`` become new parameters over that very memory (so an update of either side moves both), then
        are initialized as usual, in place, as peft does (with ``init_lora_weights=True`` the embeddings'
        ``lora_embedding_B`` thus ends up Kaiming-uniform and ``lora_embedding_A`` zero)."""
        if tied_adapter:
            if use_dora or lora_bias or mutates_base(init_lora_weights) or init_kind(init_lora_weights)[0] == "eva":
                raise ValueError("an adapter tied to the input embeddings' adapter (ensure_weight_tying=True) "
                                 "supports plain LoRA with init_lora_weights True/False/'gaussian' only (no DoRA, "
                                 f"lora_bias or init from the base weight); got init_lora_weights="
                                 f"{init_lora_weights!r}, use_dora={use_dora}, lora_bias={lora_bias}")
            tied_A, tied_B = tied_adapter["lora_A"], tied_adapter["lora_B"]
            if tuple(tied_A.shape) != (r, self.in_features) or tuple(tied_B.shape) != (self.out_features, r):
                raise ValueError(f"the tied adapter's factors {tuple(tied_A.shape)} / {tuple(tied_B.shape)} do not "
                                 f"fit this layer's lora_A ({r}, {self.in_features}) / lora_B ({self.out_features}, "
                                 f"{r}) (ensure_weight_tying needs the same r for the embeddings and the head: "
                                 "check rank_pattern)")
        if config is not None:
            lora_dropout, init_lora_weights = config.lora_dropout, config.init_lora_weights
            use_rslora, use_dora = config.use_rslora, bool(getattr(config, "use_dora", False))
            loftq_config = getattr(config, "loftq_config", None) or loftq_config
            lora_bias = bool(getattr(config, "lora_bias", False))
            use_alora = getattr(config, "alora_invocation_tokens", None) is not None
        if use_alora and use_dora:
            raise ValueError("aLoRA (alora_invocation_tokens) cannot be combined with DoRA (use_dora=True), as in peft")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        if not 0.0 <= float(lora_dropout) <= 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1], got {lora_dropout}")
        kind, _ = init_kind(init_lora_weights)  # raises on an unknown value, listing the supported ones
        if kind == "mica":
            if use_dora or use_alora or tied_adapter:
                raise ValueError("init_lora_weights='mica' (MiCA) is plain LoRA with a frozen lora_B: fastpeft does "
                                 "not combine it with DoRA, aLoRA or a tied adapter")
            self._refuse_opaque("init_lora_weights='mica'")
        if kind == "loftq":
            loftq_config = check_loftq_config(loftq_config)
        if use_dora:
            self._refuse_opaque("DoRA")
        if mutates_base(init_lora_weights):
            self._refuse_opaque(f"init_lora_weights={init_lora_weights!r}")
        lora_bias = bool(lora_bias)
        if lora_bias:
            if use_dora:  # peft's LoraConfig refuses the pair with this message
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
            if kind in BASE_MUTATING:
                raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or "
                                 f"False, got init_lora_weights={init_lora_weights} instead.")
            if getattr(self.base_layer, "bias", None) is None:
                warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type "
                              f"{type(self.base_layer).__name__} has no bias. This means that merging LoRA weights "
                              "won't be possible.", PeftWarning, stacklevel=2)
        weight = self.base_layer.weight
        dtype = weight.dtype
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
        device = weight.device
        hook = getattr(self.base_layer, "_hf_hook", None)
        if device.type == "meta" and hook is not None:  # offloaded by accelerate: where the hook computes
            device = torch.device(getattr(hook, "execution_device", None) or "cpu")
        # Created and initialized in fp32, then cast to a half dtype (autocast_adapter_dtype=False), as peft does:
        # the same seed gives peft's values (a bf16 draw is not an fp32 draw rounded).
        init_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        kw = dict(device=device, dtype=init_dtype)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)
        # (as peft's: nn.Linear(..., bias=lora_bias), so torch's generator is drawn from as in peft)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)
        if tied_adapter:  # the embeddings' memory itself (peft's tying), initialized below in place
            self.lora_A[adapter_name].weight = nn.Parameter(tied_A)
            self.lora_B[adapter_name].weight = nn.Parameter(tied_B)
            init_dtype = dtype = tied_A.dtype
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.frozen_peft_weight_names.pop(adapter_name, None)
        self.reset_lora_parameters(adapter_name, init_lora_weights, loftq_config)
        if kind == "mica":  # lora_B stays as the init set it: only A trains (peft's MiCALinearVariant)
            self.frozen_peft_weight_names[adapter_name] = ("lora_B",)
            self.lora_B[adapter_name].requires_grad_(False)
        if init_dtype != dtype:
            self.lora_A[adapter_name].to(dtype)
            self.lora_B[adapter_name].to(dtype)
        self.use_dora[adapter_name] = bool(use_dora)
        self.use_alora[adapter_name] = bool(use_alora)
        self._dora_merged_norms.pop(adapter_name, None)
        if use_dora:
            # With the same norm code the forward uses: B = 0 gives m / ‖W0‖ = 1 exactly (an identity at init).
            norm = self.dora_weight_norm(adapter_name)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(dtype))
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self._activate_added(adapter_name, config)

    add_adapter = update_layer

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True,
                              loftq_config: dict | None = None) -> None:
        """Initialize an adapter as peft does: True (A Kaiming-uniform, B and its bias zeros), "gaussian"
        (A ~ N(0, 1/r), B and its bias zeros), False (nn.Linear's defaults kept), or from the base weight,
        which is then rewritten (see ``fastpeft.layers.lora_init``): "pissa" / "pissa_niter_<K>" / "olora"
        (the base keeps the residual: the layer's function is unchanged) and "loftq" (``loftq_config``
        required; the base becomes its NF4 round trip). On a 4-bit base PiSSA and OLoRA decode the weight,
        and re-quantize the residual in the base's own format. On the meta device (``fastpeft train``'s
        skeleton check) they run on shapes alone."""
        kind, niter = init_kind(init_lora_weights)
        if kind is False:
            return
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if kind in BASE_MUTATING:
            if kind == "loftq":
                loftq_config = check_loftq_config(loftq_config)
            self._init_from_base(adapter_name, kind, niter, loftq_config)
            return
        if kind == "eva":  # as peft: A keeps nn.Linear's init until initialize_lora_eva_weights sets it
            nn.init.zeros_(B)
            return
        if kind == "orthogonal":
            self._orthogonal_init(adapter_name)
            return
        if kind == "mica":
            self._mica_init(adapter_name)
            return
        if kind == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
        if self.lora_B[adapter_name].bias is not None:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    @torch.no_grad()
    def _orthogonal_init(self, adapter_name: str) -> None:
        """peft's ``init_lora_weights="orthogonal"``: from one random orthogonal r × r matrix Q, A's rows lie in the
        span of Q's even-numbered rows and B's columns in that of its odd-numbered ones (each mixed by a Gaussian
        matrix, divided by 10), so B·A = 0 at the start while neither factor is zero. r must be even. The draws
        are peft's, in its order, on the CPU (the same seed gives peft's factors); ``lora_B``'s bias keeps
        nn.Linear's init, as in peft."""
        r = self.r[adapter_name]
        if r % 2 != 0:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        q, _ = torch.linalg.qr(torch.randn(r, r))
        first, second = q[0::2, :], q[1::2, :]
        A = torch.randn(self.in_features, r // 2).mm(first).T / 10.0
        B = torch.randn(r // 2, self.out_features).T.mm(second) / 10.0
        self._store_through_base_dtype(self.lora_A[adapter_name].weight, A)
        self._store_through_base_dtype(self.lora_B[adapter_name].weight, B)

    def _store_through_base_dtype(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """``param ← value`` rounded to a float base weight's dtype first, as peft stores these inits in the base's
        dtype before any upcast (the same seed then gives peft's values on a bf16/fp16 base too)."""
        dtype = self.base_layer.weight.dtype
        param.copy_(value.to(dtype) if dtype.is_floating_point else value)

    @torch.no_grad()
    def _mica_init(self, adapter_name: str) -> None:
        """peft's ``init_lora_weights="mica"`` (Minor Component Adaptation): ``lora_B`` = the r left singular vectors
        of the base weight with the smallest singular values (frozen: only A trains), ``lora_A`` = 0, so the layer
        starts as its base, which is not rewritten. r must not exceed min(out, in). A 4-bit base is decoded (peft
        refuses it); on the meta device nothing is computed (as peft)."""
        B = self.lora_B[adapter_name].weight
        if B.device.type == "meta":
            return
        r = self.r[adapter_name]
        w = self._init_read_base("mica")
        if r > min(w.shape):
            raise ValueError(f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with "
                             f"weight shape {tuple(w.shape)} (max usable r is {min(w.shape)}).")
        U = torch.linalg.svd(w, full_matrices=False)[0]
        self._store_through_base_dtype(B, U[:, -r:])
        self.lora_A[adapter_name].weight.zero_()

    def _pissa_init(self, adapter_name: str, niter: int | None = None) -> None:
        """PiSSA on adapter ``adapter_name`` (``niter``: the fast ``svd_lowrank`` variant)."""
        self._init_from_base(adapter_name, "pissa", niter, None)

    @torch.no_grad()
    def _init_from_base(self, adapter_name: str, kind: str, niter: int | None, loftq_config: dict | None) -> None:
        """PiSSA / OLoRA / LoftQ: A and B from the base weight (fp32, (out, in)), then the base rewritten:
        ``W − (s·B) A`` for PiSSA and OLoRA (peft's order of operations), the NF4 round trip for LoftQ."""
        r, scale = self.r[adapter_name], self.scaling[adapter_name]
        w = self._init_read_base(kind)
        if kind == "pissa":
            A, B = pissa_factors(w, r, scale, niter)
        elif kind == "olora":
            A, B = olora_factors(w, r)
        else:
            q, A, B = loftq_factors(w, r, loftq_config["loftq_bits"], loftq_config["loftq_iter"])
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if A.shape[0] < lora_A.weight.shape[0]:
            # r above the weight's rank (min(out, in)): only that many directions exist; the factors keep them (as
            # peft's, whose r — and scale — stay as configured)
            lora_A.weight = nn.Parameter(A.to(lora_A.weight), requires_grad=lora_A.weight.requires_grad)
            lora_B.weight = nn.Parameter(B.to(lora_B.weight), requires_grad=lora_B.weight.requires_grad)
            lora_A.out_features = lora_B.in_features = A.shape[0]
        else:
            lora_A.weight.copy_(A)
            lora_B.weight.copy_(B)
        self._init_write_base(q if kind == "loftq" else w - (scale * B) @ A)

    def _init_read_base(self, kind: str) -> torch.Tensor:
        """The base weight as an fp32 (out, in) matrix for a data-dependent init (peft accepts fp32/fp16/bf16)."""
        weight = self.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"init_lora_weights={kind!r} needs a float32/float16/bfloat16 base weight, got "
                            f"{weight.dtype} in {type(self.base_layer).__name__}: initialize before quantizing "
                            "(or use a fastpeft/bitsandbytes 4-bit base, which is decoded)")
        w = wide(weight)
        return w.t() if self.fan_in_fan_out else w

    def _init_write_base(self, w: torch.Tensor) -> None:
        """Store the fp32 (out, in) matrix ``w`` as the base weight, in its own dtype and layout."""
        weight = self.base_layer.weight
        weight.copy_((w.t() if self.fan_in_fan_out else w).to(weight.dtype))

    # ------------------------------------------------------------ adapters
    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def _adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _adapter_parameters(self, name: str) -> list[torch.Tensor]:
        """Adapter ``name``'s trainable tensors: A, B, B's bias (``lora_bias``) and (DoRA) the magnitude."""
        params = [self.lora_A[name].weight]
        if "lora_B" not in self.frozen_peft_weight_names.get(name, ()):  # (MiCA's B never trains)
            params.append(self.lora_B[name].weight)
            if self.lora_B[name].bias is not None:
                params.append(self.lora_B[name].bias)
        if name in self.lora_magnitude_vector:
            params += list(self.lora_magnitude_vector[name].parameters())
        return params

    def _get_available_adapters(self) -> set[str]:
        return set(self.lora_A.keys())

    def _all_available_adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # peft's LoRA-layer fields for features fastpeft does not have, always off (read by peft's model code
    # when a converted layer sits inside a peft model).
    _in_peft_model = False  # set by fastpeft.from_peft

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """peft's hook for LoRA variants that train part of their weights; fastpeft has none: nothing to do."""

    @property
    def lora_embedding_A(self) -> dict:
        """Always empty: fastpeft adapts linear layers only (peft's attribute, for code that inspects it)."""
        return {}

    @property
    def lora_embedding_B(self) -> dict:
        """Always empty: fastpeft adapts linear layers only (peft's attribute, for code that inspects it)."""
        return {}

    def _scaled_lora_bias(self, name: str) -> torch.Tensor | None:
        """``scale · b_B`` of adapter ``name`` (differentiable, B's dtype), None without ``lora_bias``."""
        bias = self.lora_B[name].bias
        return None if bias is None else bias * self.scaling[name]

    def _effective_bias(self, name: str) -> torch.Tensor | None:
        """The bias the fused op adds for adapter ``name``: the base's bias plus ``scale · b_B`` (fp32, built
        with autograd so the op's bias gradient reaches ``lora_B.bias``, and the base bias only if it requires
        grad); the base's bias alone without ``lora_bias``."""
        base = self.base_layer.bias
        extra = self._scaled_lora_bias(name)
        if extra is None:
            return base
        extra = wide(extra)
        return extra if base is None else wide(base) + extra

    @property
    def lora_variant(self) -> dict:
        """Always empty: DoRA is handled by this class itself (peft's attribute, for code that inspects it)."""
        return {}

    def get_base_weight(self) -> torch.Tensor:
        """The base layer's weight (peft's method)."""
        return self.base_layer.weight

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging it first if merged). Inside a peft model (``fastpeft.from_peft``) a
        name this layer does not hold is skipped, as peft's layers do (peft checks the name model-wide)."""
        if adapter_name not in self.lora_A:
            if self._in_peft_model:
                return
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.lora_A.keys())}")
        self._delete_adapter_state(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale · B A`` in fp32, laid out like the base weight ((in, out) with fan_in_fan_out)."""
        A = wide(self.lora_A[adapter_name].weight)
        B = wide(self.lora_B[adapter_name].weight)
        delta = (B @ A) * self.scaling[adapter_name]
        return delta.t() if self.fan_in_fan_out else delta

    def _along_out(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to scale a weight laid out as the base's."""
        return v.view(1, -1) if self.fan_in_fan_out else v.view(-1, 1)

    def _out_norm(self, w: torch.Tensor) -> torch.Tensor:
        """The norm of each output feature's row of ``w`` (laid out as the base weight): (out,)."""
        return torch.linalg.vector_norm(w, dim=0 if self.fan_in_fan_out else 1)

    def _refuse_alora_merge(self, names: list[str]) -> None:
        """Raise NotImplementedError (peft's) if one of ``names`` is an aLoRA adapter: it acts on some tokens only,
        which no weight can express."""
        alora = [n for n in names if self.use_alora.get(n, False)]
        if alora:
            raise NotImplementedError(f"aLoRA does not support merging (aLoRA adapter(s) {alora}).")

    def _merged_bias(self, name: str, safe_merge: bool, sign: float = 1.0) -> torch.Tensor | None:
        """The base bias with adapter ``name``'s ``scale · b_B`` added (``sign`` -1: taken out), in fp32, None
        when the adapter has no ``lora_B`` bias; NaN/inf raise under ``safe_merge``."""
        extra = self._scaled_lora_bias(name)
        if extra is None:
            return None
        new = wide(self.base_layer.bias.detach()) + sign * wide(extra.detach())
        if safe_merge and not torch.isfinite(new.to(self.base_layer.bias.dtype)).all():  # (as it will be stored)
            raise ValueError(f"NaNs or infs detected in the merged bias of adapter {name!r}; "
                             "the adapter seems to be broken")
        return new

    def _write_bias(self, new: torch.Tensor | None) -> None:
        """Store ``new`` (fp32) as the base bias in its own dtype (nothing when None)."""
        if new is not None:
            bias = self.base_layer.bias
            bias.data.copy_(new.to(bias.dtype))

    def _check_merged(self, w: torch.Tensor, name: str, safe_merge: bool, dtype: torch.dtype | None = None) -> None:
        """Under ``safe_merge``, raise if the merged weight ``w`` (fp32) holds NaN/inf once stored in ``dtype`` (a
        value beyond fp16's range overflows there, as peft's check in the base dtype catches)."""
        if safe_merge and not torch.isfinite(w if dtype is None else w.to(dtype)).all():
            self._dora_merged_norms.pop(name, None)
            raise ValueError(f"NaNs or infs detected in the merged weight of adapter {name!r}; "
                             "the adapter seems to be broken")

    def reset_dora_cache(self) -> None:
        """Forget the cached ``‖W0_o‖²`` of DoRA's weight norm, and the norms cached under ``torch.no_grad``.
        fastpeft resets them itself (merge, unmerge) and notices in-place changes and replacements of the base
        weight and of ``lora_A``/``lora_B``; call this only after writing into one of them through ``.data``
        (which autograd's version counter does not see)."""
        self._w0_sq_cache = None
        self.__dict__.setdefault("_dora_norm_cache", {}).clear()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the named) adapters into the base weight; forward becomes the base alone.

        DoRA adapters merge as in peft: ``W ← m / ‖W0 + ΔW‖_row ⊙ (W + ΔW)``, the norm kept for ``unmerge``.
        A ``lora_B`` bias (``lora_bias``) goes into the base bias: ``b ← b + scale·b_B`` (a base without bias
        raises RuntimeError, as in peft, here before anything is written).
        ``safe_merge`` checks the merged weight (and bias) for NaN/inf before writing it.
        """
        self._refuse_opaque("merge")
        names = self._names_to_merge(adapter_names)
        self._refuse_alora_merge(names)
        warn_already_merged(self, names)  # peft's warnings
        self._check_bias_mergeable([n for n in names if n not in self.merged_adapters])
        if any(n not in self.merged_adapters for n in names):  # (a parametrized weight: before anything is written)
            check_weight_writable(self.base_layer, "merge into it")
        for name in names:
            if name in self.merged_adapters:
                continue
            weight = self.base_layer.weight  # (a parametrized one is recomputed: read it again after each write)
            w = wide(weight)
            w0 = self._unmerged_weight(w) if self.use_dora.get(name, False) and self.merged_adapters else None
            merged = self._merge_math(w, name, w0)
            self._check_merged(merged, name, safe_merge, weight.dtype)
            new_bias = self._merged_bias(name, safe_merge)
            store_merged(self, name, merged.to(weight.dtype))
            self._write_bias(new_bias)
            self.merged_adapters.append(name)
        self.reset_dora_cache()

    def merge_through_tie(self, name: str) -> None:
        """Count adapter ``name`` as merged without writing: its delta is already in the base weight, which this
        layer shares with the input embeddings whose adapter it is tied to (``ensure_weight_tying``) and into
        which they merged it. ``unmerge`` then leaves the weight to them as well."""
        self.merged_adapters.append(name)
        self._merged_through_tie = {*getattr(self, "_merged_through_tie", ()), name}

    def _unmerge_one(self, name: str) -> None:
        through_tie = getattr(self, "_merged_through_tie", None)
        if through_tie and name in through_tie:
            through_tie.discard(name)
            self.merged_adapters.remove(name)
            return
        weight = self.base_layer.weight
        store_unmerged(self, name, lambda: self._unmerge_math(wide(weight), name).to(weight.dtype))
        self._write_bias(self._merged_bias(name, False, sign=-1.0))
        self._dora_merged_norms.pop(name, None)
        self.merged_adapters.remove(name)
        self.reset_dora_cache()

    def _pending_merge(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (the current base weight, fp32) with the active adapters that are not merged merged in, in fp32."""
        pending = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters
                   and not self._disable_adapters]
        self._refuse_alora_merge(pending)
        w0 = self._unmerged_weight(w) if self.merged_adapters else w
        for name in pending:
            w = self._merge_math(w, name, w0, record=False)
        return w

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (new tensors) holding the base weight with the active adapters merged (their
        ``lora_B`` biases too: the new layer gets a bias if one of them has one, even on a base without)."""
        self._refuse_opaque("to_linear")
        weight = self._pending_merge(wide(self.base_layer.weight))
        if self.fan_in_fan_out:
            weight = weight.t()
        bias = self._pending_bias()
        dtype = self.base_layer.weight.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        lin.weight.copy_(weight.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias)
        return lin

    def _pending_bias(self) -> torch.Tensor | None:
        """The base bias (fp32) plus ``scale · b_B`` of the active, unmerged adapters with a ``lora_B`` bias
        (``to_linear``'s bias); None when neither exists."""
        bias = self.base_layer.bias
        out = None if bias is None else wide(bias.detach())
        if self._disable_adapters:
            return out
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                extra = self._scaled_lora_bias(name)
                if extra is not None:
                    out = wide(extra.detach()) if out is None else out + wide(extra.detach())
        return out

    # ------------------------------------------------------------- DoRA norm
    def _base_key(self) -> WeightStamp | None:
        """Identifies the base weight's current values for the ``‖W0_o‖²`` cache (``WeightStamp``: the
        parameter, its storage, data pointer and version counter, dtype, device, shape); None where there is no
        version counter (inference tensors) or no storage: no caching."""
        w = self.base_layer.weight
        try:
            return WeightStamp([w], (w.dtype, w.device, tuple(w.shape)))
        except (RuntimeError, NotImplementedError):
            return None

    def _base_row_reader(self):
        """(row step, read): ``read(start, stop)`` gives rows ``[start, stop)`` of W0 as (out, in) fp32; a
        start must be a multiple of the step. Dense bases: a slice, upcast; an fp32 (out, in) weight is read
        as it is, in one block (a view: nothing to bound)."""
        weight = self.base_layer.weight

        def read(start: int, stop: int) -> torch.Tensor:
            rows = weight[:, start:stop].t() if self.fan_in_fan_out else weight[start:stop]
            return wide(rows)

        whole = weight.dtype in (torch.float32, torch.float64) and not self.fan_in_fan_out
        return (self.out_features if whole else 1), read

    @torch.no_grad()
    def _base_sq_and_proj(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖W0_o‖², W0 Aᵀ)`` in fp32, shapes (out,) and (out, r): W0 is read once, a bounded block of rows
        at a time (``_NORM_CHUNK_ELEMS``), never as a whole fp32 (out, in) copy. ``‖W0_o‖²`` is cached while
        the base weight is unchanged (not under torch.compile, where it is recomputed)."""
        key = None if torch.compiler.is_compiling() else self._base_key()
        cached = self._w0_sq_cache
        sq = cached[1] if key is not None and cached is not None and cached[0] == key else None
        step, read = self._base_row_reader()
        rows = max(step, _NORM_CHUNK_ELEMS // max(self.in_features, 1) // step * step)
        sqs, projs = [], []
        for start in range(0, self.out_features, rows):
            w = read(start, min(start + rows, self.out_features))
            projs.append(w @ A.t())
            if sq is None:  # (a reduction: no squared copy of the block)
                sqs.append(torch.linalg.vector_norm(w, dim=1).square())
        proj = projs[0] if len(projs) == 1 else torch.cat(projs)
        if sq is None:
            sq = sqs[0] if len(sqs) == 1 else torch.cat(sqs)
            if key is not None:
                self._w0_sq_cache = (key, sq)
        return sq, proj

    def _dora_norm_key(self, adapter_name: str) -> tuple | None:
        """What the whole DoRA norm of ``adapter_name`` depends on (W0, A, B as ``WeightStamp``s, the scale), or
        None — no reuse — with autograd on (training: A and B change every step), under torch.compile, or
        without version counters (inference tensors)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        base = self._base_key()
        if base is None:
            return None
        try:
            lora = WeightStamp([self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight],
                               (float(self.scaling[adapter_name]), _OPTIMIZER_STEPS[0]))
        except (RuntimeError, NotImplementedError):
            return None
        return base, lora

    def dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """``‖W0 + scale·B·A‖`` per output feature (fp32, shape (out,), no gradient) — what peft computes by
        forming the (out, in) matrix, here from ``‖W0_o‖² + 2s·Σ_r B_or (W0 Aᵀ)_or + s²·Σ_r (B (A Aᵀ))_or B_or``
        (cached ``‖W0_o‖²``; ``W0 Aᵀ`` through the base's row reader), clamped at 0 before the square root.
        Under ``torch.no_grad`` (generation, evaluation) the norm itself is kept and reused while W0, A, B
        and the scale are unchanged, so a DoRA layer then reads W0 once per forward (its GEMM), as a LoRA
        layer does, instead of twice. Autocast is off inside: these fp32 matmuls stay fp32."""
        if torch.compiler.is_compiling():  # (no Python-side cache inside a compiled graph)
            with torch.no_grad():
                return self._dora_weight_norm(adapter_name)
        key = self._dora_norm_key(adapter_name)
        cache = self.__dict__.setdefault("_dora_norm_cache", {})
        hit = cache.get(adapter_name)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            norm = self._dora_weight_norm(adapter_name)
        if key is not None:
            cache[adapter_name] = (key, norm)
        return norm

    def _dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        A = wide(self.lora_A[adapter_name].weight)
        B = wide(self.lora_B[adapter_name].weight)
        s = float(self.scaling[adapter_name])
        # torch.is_autocast_enabled (not torch.amp.is_autocast_available: Dynamo in torch 2.11 cannot trace it
        # under torch.compile); "meta" has no autocast to switch off (and is_autocast_enabled raises there)
        device = A.device.type
        on = device != "meta" and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if on else contextlib.nullcontext():
            sq, proj = self._base_sq_and_proj(A)
            cross = (B * proj).sum(1)
            quad = ((B @ (A @ A.t())) * B).sum(1)
        return (sq + (2.0 * s) * cross + (s * s) * quad).clamp_min(0.0).sqrt()

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """``m / ‖W0 + scale·B·A‖_row`` (fp32, (out,)): differentiable in the magnitude only (the norm is
        detached, as in peft and the DoRA paper §4.3)."""
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return wide(magnitude) / self.dora_weight_norm(adapter_name)

    # ------------------------------------------------------------- forward
    _fastpeft_adapter_names = None  # per-sequence adapters handed over by fastpeft.model.mixed_adapter_batch
    # A base whose own forward computes its output (an nn.Linear subclass that overrides forward, e.g.
    # bitsandbytes' 8-bit Linear8bitLt): the layer runs it and adds the adapters in plain PyTorch, as peft does,
    # since the fused ops would multiply by its stored weight (int8 codes, for Linear8bitLt) instead.
    _opaque_base = False

    _fastpeft_alora_offsets = None  # per-sequence aLoRA offsets handed over by fastpeft.model.mixed_adapter_batch

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None,
                alora_offsets: list[int | None] | None = None, **kwargs) -> torch.Tensor:
        """The base layer plus every active adapter; ``adapter_names`` (one name per row of the batch, ``"__base__"``
        for none) runs a mixed-adapter batch as peft's argument does. ``alora_offsets`` (one per row, peft's
        argument; usually handed over by the model) says how many of each row's last tokens aLoRA adapters act on.
        While the adapters are disabled the output is the base layer's (whatever ``adapter_names`` says, as in
        peft); adapters merged meanwhile are unmerged first, as peft's forward does."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is None:
            adapter_names = self._fastpeft_adapter_names
        if alora_offsets is None:
            alora_offsets = self._fastpeft_alora_offsets
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, alora_offsets=alora_offsets,
                                             **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expected input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        active = [n for n in self._active_adapters if n in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        unfused = self._unfused(active)
        keep = None  # the activated tokens, for aLoRA adapters run unfused (on an opaque base, or after the first)
        if (unfused or len(active) > 1) and any(self.use_alora.get(n, False) for n in active):
            keep = alora_token_mask(alora_offsets, tuple(x.shape[:-1]))
        if unfused:
            y = self.base_layer(x, *args, **kwargs)
            for name in active:
                y = self._chain_unfused(x, y, name, keep if self.use_alora.get(name, False) else None)
            return y
        first, *rest = active
        if self.use_alora.get(first, False):  # the activated tokens through the mixed-adapter op, the rest base only
            y = self._mixed_batch_forward(x, *args, adapter_names=[first] * x.shape[0], alora_offsets=alora_offsets,
                                          _only=True, **kwargs)
        elif self.use_dora.get(first, False):
            y = self._dora_forward(x, first)
        else:
            y = self._fused_forward(x, first)
        for name in rest:  # further active adapters (rare): added unfused, as peft does
            y = self._chain_unfused(x, y, name, keep if self.use_alora.get(name, False) else None)
        return y

    def _unfused(self, names) -> bool:
        """Whether this call runs peft's path — the base layer's own forward, then each adapter through its
        ``lora_dropout`` / ``lora_A`` / ``lora_B`` modules — instead of the fused op: on an opaque base (see
        ``_has_own_forward``), a base put under an accelerate hook after wrapping (offloaded: its weight waits on
        the meta device), a base weight that trains (the fused op computes no gradient for it; peft's path does),
        and while the base layer or one of the adapters' modules carries hooks (so they fire, as in peft)."""
        # (every forward asks: plain attribute reads, no nn.Module.__getattr__ on the common path)
        if self._opaque_base or any(_GLOBAL_HOOKS):
            return True
        modules = self._modules
        base = modules["base_layer"]
        if base.__dict__.get("_hf_hook") is not None or _hooked(base):
            return True
        weight = base._parameters["weight"] if "weight" in base._parameters else getattr(base, "weight", None)
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            _warn_trainable_base()
            return True
        lora_A, lora_B, drop = (modules[k]._modules for k in ("lora_A", "lora_B", "lora_dropout"))
        return any(_hooked(lora_A[n]) or _hooked(lora_B[n]) or _hooked(drop[n]) for n in names if n in lora_A)

    def _refuse_opaque(self, what: str) -> None:
        if not self._opaque_base and _offloaded(self.base_layer):  # (offloaded by accelerate after wrapping)
            raise TypeError(f"{what} needs the base weight as a dense matrix, but accelerate offloads the base layer "
                            "(its weight waits on the meta device until the hook loads it for the forward); merge "
                            "before offloading, or load the model without offloading for this")
        if self._opaque_base:
            raise TypeError(f"{what} needs the base weight as a dense matrix, but the base layer "
                            f"{type(self.base_layer).__name__} computes its own forward (e.g. bitsandbytes' 8-bit "
                            "layer, or a torchao-quantized weight: its weight holds codes); load the base in "
                            "bf16/fp16 (or bitsandbytes 4-bit, which fastpeft reads) for this")

    def _fused_forward(self, x: torch.Tensor, name: str, with_bias: bool = True, dropout_p: float | None = None,
                       seed: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer plus adapter ``name`` in one fused op (``fastpeft.ops.lora_linear``): with the
        base's bias (plus ``scale · b_B`` with ``lora_bias``) unless ``with_bias`` is False, with the adapter's
        dropout unless ``dropout_p`` is given."""
        p = self._dropout_p(name) if dropout_p is None else dropout_p
        return lora_linear(x, self.base_weight_for_op(), self._effective_bias(name) if with_bias else None,
                           self.lora_A[name].weight, self.lora_B[name].weight, scale=self.scaling[name],
                           dropout_p=p, training=self.training, fan_in_fan_out=self.fan_in_fan_out, seed=seed)

    def _op_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the fused op computes with it (cast to autocast's dtype under autocast)."""
        return to_autocast_dtype(x)

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """DoRA adapter ``name`` on the base layer, peft's formula with ``k = m / ‖W0 + s·B·A‖_row`` (detached norm):

        - p = 0 or eval: ``k ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b``, computed as ``y + (k − 1) ⊙ (y − b)`` on the fused
          op's ``y = x W0ᵀ + b + s·x Aᵀ Bᵀ``: one op call and a row scaling (exactly the base at k = 1, and
          the rounding of ``y − b`` in x's dtype is scaled by the small ``k − 1``); autograd keeps the op's
          own tensors plus ``y − b`` ((N, out), x's dtype) for the magnitude's gradient.
        - training with dropout p > 0: ``x W0ᵀ + b + (k − 1) ⊙ (D(x) W0ᵀ) + k·s·D(x) Aᵀ Bᵀ`` — peft's base
          term sees x while its correction sees D(x), so this needs D(x)·W0ᵀ as well as x·W0ᵀ: written as
          ``op(x; p, seed) + (k − 1) ⊙ op(D(x); p = 0)`` with D(x) materialized from the same seed (so both
          ops drop the same elements). Cost over the p = 0 path: one more (N × in × out) GEMM in forward
          and one in backward (dx through the second op), the rank-r terms twice, D(x) (N × in, x's dtype)
          and a second (N, r) ``xa`` kept for backward, and the Philox mask generated by plain PyTorch for
          D(x) (forward and backward) — peft's own formula runs the same two base GEMMs.
        """
        k = self._dora_scale(name)
        p = self._dropout_p(name) if self.training else 0.0
        if p == 0.0:
            y = self._fused_forward(x, name, dropout_p=0.0)
            bias = self.base_layer.bias
            t = y if bias is None else y - bias.to(y.dtype)
            return (y + t * (k - 1.0)).to(y.dtype)
        xc = self._op_input(x)
        seed = draw_seed(xc.device)
        y = self._fused_forward(x, name, dropout_p=p, seed=seed)  # x W0ᵀ + b + s·D(x) Aᵀ Bᵀ
        yd = self._fused_forward(philox_dropout(xc, p, seed), name, with_bias=False, dropout_p=0.0)
        return (y + yd * (k - 1.0)).to(y.dtype)

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W0ᵀ`` without bias, in plain PyTorch (the rare unfused DoRA path; W0 cast to x's dtype)."""
        weight = self.base_layer.weight
        w = weight.t() if self.fan_in_fan_out else weight
        return torch.nn.functional.linear(x, w.to(x.dtype))

    def _chain_unfused(self, x: torch.Tensor, y: torch.Tensor, name: str,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` (the layer's output so far, bias included) with a further active adapter applied, in plain
        PyTorch, chained as peft chains them: LoRA adds ``s·B A D(x)`` (an aLoRA adapter only on the tokens
        ``keep`` (``x.shape[:-1]``, bool) marks); DoRA (``k`` = m / ‖W0 + s·B·A‖_row) gives
        ``b + k ⊙ (y − b + s·B A x)`` at p = 0 or in eval, and ``y + (k − 1) ⊙ D(x) W0ᵀ + k·s·B A D(x)``
        in training with dropout (torch's dropout here, as peft)."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        xc = x.to(A.weight.dtype)
        drop = self.lora_dropout[name]
        if not self.use_dora.get(name, False):
            delta = B(A(drop(xc))) * s
            if keep is not None:
                delta = delta * keep.to(delta.device, non_blocking=True).unsqueeze(-1)
            return y + delta.to(y.dtype)
        k = self._dora_scale(name)
        bias = self.base_layer.bias
        if not self.training or not isinstance(drop, nn.Dropout):
            rest = wide(y) if bias is None else wide(y) - wide(bias)
            out = k * (rest + s * wide(B(A(xc))))
            return (out if bias is None else out + wide(bias)).to(y.dtype)
        xd = drop(xc)
        return (y + (k - 1.0) * wide(self._base_matmul(xd)) + k * s * wide(B(A(xd)))).to(y.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str],
                             alora_offsets: list[int | None] | None = None, _only: bool = False,
                             _compute_dtype: torch.dtype | None = None, **kwargs) -> torch.Tensor:
        """One adapter per sequence (``x.shape[0]`` names; ``"__base__"`` = no adapter), as peft's
        ``adapter_names``, in eval and in training: one fused op (``fastpeft.ops_mixed``), each adapter's
        gradient from its own rows. Names this layer does not hold raise, unless the model-level hook
        passed them (then, as in peft, they mean the base here). The rows of aLoRA adapters are adapted only on
        the tokens ``alora_offsets`` activates (the others get index -1: base only). ``_only``: the call is the
        plain forward of one active aLoRA adapter (no other adapter joins the op). ``_compute_dtype``: the 4-bit
        layer's wide-input compute dtype (``lora_linear_mixed``'s ``compute_dtype``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if x.dim() < 2 or len(names) != x.shape[0]:
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(names)} and {x.shape[0] if x.dim() else 0} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        dora = sorted({n for n in names if self.use_dora.get(n, False)})
        if dora:  # as peft: mixed batches are LoRA-only
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapter(s) {dora}).")
        if not getattr(adapter_names, "_fastpeft_model_checked", False) and not self._in_peft_model:
            unknown = sorted({n for n in names if n != _BASE_NAME and n not in self.lora_A})
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this layer has "
                                 f"{list(self.lora_A)} (and {_BASE_NAME!r} for the base layer alone)")
        if self._disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expected input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        if self._unfused(dict.fromkeys(names)):
            return self._mixed_batch_unfused(x, *args, names=names, alora_offsets=alora_offsets, **kwargs)
        weight = self.base_weight_for_op()
        present = [n for n in dict.fromkeys(names) if n in self.lora_A]
        with_rows = len(present)
        if self.training and torch.is_grad_enabled() and not _only:
            # Trainable adapters with no row in this batch join the op with zero rows: their gradients are
            # zeros rather than absent, so DistributedDataParallel finds every trainable parameter used. They drop
            # nothing (p = 0): whether a seed is drawn from torch's generator must not depend on grad mode
            # (reentrant checkpointing runs the forward without grad and recomputes it with grad).
            present += [n for n in self.lora_A if n not in present and self.lora_A[n].weight.requires_grad]
        if not present:
            return self.base_layer(x, *args, **kwargs)
        # The model-level names carry a cache: layers with the same adapters and input shape share the
        # index upload and the row sort (one per batch shape instead of one per layer).
        # (Under torch.compile the graph itself shares them: no cache.)
        cache = None if torch.compiler.is_compiling() else getattr(adapter_names, "rows_cache", None)
        alora = any(self.use_alora.get(n, False) for n in present)
        key = (tuple(present), x.device, tuple(x.shape[:-1]), tuple(alora_offsets or ()) if alora else None)
        rows = None if cache is None else cache.get(key)
        lora_bias = any(self.lora_B[n].bias is not None for n in present)
        index = self._row_index(x, names, present, alora_offsets) if rows is None or lora_bias else None
        if rows is None:
            rows = mixed_rows(index.to(x.device, non_blocking=True), x, len(present))
            if cache is not None:
                cache[key] = rows
        As, Bs = [self.lora_A[n].weight for n in present], [self.lora_B[n].weight for n in present]
        stacks = None
        # (inference tensors have no version counter: weights made under inference_mode are restacked)
        if cache is not None and not torch.is_grad_enabled() and not any(w.is_inference() for w in (*As, *Bs)):
            # Without gradients (generate), the stacked adapters are kept for the rest of the call: the
            # decode steps reuse them instead of restacking every adapter of every layer per token.
            skey = ("stacks", id(self), tuple(present), tuple(w._version for w in (*As, *Bs)))
            stacks = cache.get(skey)
            if stacks is None:
                stacks = cache[skey] = stack_adapters(As, Bs)
        y = lora_linear_mixed(x, weight, self.base_layer.bias, As, Bs, None, rows=rows, stacks=stacks,
                              scales=[self.scaling[n] for n in present],
                              dropout_ps=[self._dropout_p(n) if i < with_rows else 0.0 for i, n in enumerate(present)],
                              training=self.training,
                              fan_in_fan_out=self.fan_in_fan_out, compute_dtype=_compute_dtype)
        if lora_bias:
            y = self._add_row_lora_bias(y, index, present)
        for n in present:  # DoRA adapters are here only with zero rows (refused by name above): their magnitude
            # gets its zero gradient too, through an empty slice (adds exactly 0; no NaN from dy can reach it)
            if n in self.lora_magnitude_vector and torch.is_grad_enabled():
                y = y + self.lora_magnitude_vector[n].weight[:0].sum().to(y.dtype)
        return y

    def _row_index(self, x: torch.Tensor, names: list[str], present: list[str],
                   alora_offsets: list[int | None] | None) -> torch.Tensor:
        """The mixed op's adapter index (CPU int32): per sequence (``(B,)``) — ``present.index(name)``, -1 for the
        base — or, when ``present`` holds aLoRA adapters, per token (``x.shape[:-1]``), -1 on the tokens of aLoRA
        rows that ``alora_offsets`` does not activate (all of them when it is None)."""
        pos = {n: i for i, n in enumerate(present)}
        index = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int32)
        if not any(self.use_alora.get(n, False) for n in present):
            return index
        lead = tuple(x.shape[:-1])
        keep = alora_token_mask(alora_offsets, lead)
        gated = torch.tensor([self.use_alora.get(n, False) for n in names], dtype=torch.bool)
        index = index.view(-1, *([1] * (len(lead) - 1))).expand(lead)
        gated = gated.view(-1, *([1] * (len(lead) - 1))).expand(lead)
        return torch.where(gated & ~keep, torch.full_like(index, -1), index).contiguous()

    def _add_row_lora_bias(self, y: torch.Tensor, index: torch.Tensor, present: list[str]) -> torch.Tensor:
        """``y`` with each row's own adapter's ``scale · b_B`` added (``lora_bias``; ``index`` as ``_row_index``
        gives it, per sequence or per token; none where it is -1 and for adapters without a bias), in fp32 then
        cast back once. Every adapter in ``present`` takes part, so one without rows gets a zero gradient for its
        bias (as for its A and B)."""
        out = self.out_features
        ref = self.lora_A[present[0]].weight
        table = [self._scaled_lora_bias(n) for n in present]
        table = [torch.zeros(out, device=ref.device) if t is None else t.float() for t in table]
        table.append(torch.zeros(out, device=ref.device))  # rows with no adapter here (index -1: the last row)
        idx = index.to(device=y.device, non_blocking=True).long()
        rows = torch.stack(table).to(y.device)[idx]  # (*index.shape, out)
        rows = rows.view(*idx.shape, *([1] * (y.dim() - 1 - idx.dim())), out)
        return (y.float() + rows).to(y.dtype)

    def _mixed_batch_unfused(self, x: torch.Tensor, *args, names: list[str],
                             alora_offsets: list[int | None] | None = None, **kwargs) -> torch.Tensor:
        """A mixed-adapter batch on a base with its own forward: the base on every row, then each adapter on
        its own rows in plain PyTorch (peft's loop)."""
        y = self.base_layer(x, *args, **kwargs)
        keep = None
        if any(self.use_alora.get(n, False) for n in names if n in self.lora_A):
            keep = alora_token_mask(alora_offsets, tuple(x.shape[:-1]))
        for name in dict.fromkeys(names):
            if name not in self.lora_A:
                continue
            idx = [i for i, n in enumerate(names) if n == name]
            rows = torch.tensor(idx, device=x.device)
            sub = x.index_select(0, rows)
            sub_keep = keep[idx] if keep is not None and self.use_alora.get(name, False) else None
            y = y.index_add(0, rows, self._chain_unfused(sub, torch.zeros_like(y.index_select(0, rows)), name,
                                                         sub_keep))
        return y

    def base_weight_for_op(self) -> torch.Tensor:
        """The frozen base weight the fused ops read: this layer's own dense weight (the 4-bit layer
        returns its ``Weight4bit``, which the ops decode per call)."""
        self._refuse_opaque("the fused op")
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise TypeError(f"the base layer's weight is {weight.dtype}, not a float matrix fastpeft can multiply by "
                            f"({type(self.base_layer).__name__}); wrap a bf16/fp16/fp32 or 4-bit base")
        if weight.requires_grad and torch.is_grad_enabled():  # (under no_grad nothing would train it anyway)
            raise RuntimeError("FastLoraLinear keeps its base weight frozen, but base_layer.weight.requires_grad "
                               "is True; call base_layer.weight.requires_grad_(False)")
        return weight

    def _dropout_p(self, adapter_name: str) -> float:
        drop = self.lora_dropout[adapter_name]
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    def extra_repr(self) -> str:
        """Each adapter's rank, alpha and scaling (and rsLoRA/DoRA), as peft's repr lists them."""
        parts = [f"{n}: r={self.r[n]}, lora_alpha={self.lora_alpha[n]}, scaling={self.scaling[n]:g}"
                 + (", rslora" if self.use_rslora[n] else "") + (", dora" if self.use_dora.get(n) else "")
                 + (", alora" if self.use_alora.get(n) else "")
                 + (", lora_bias" if self.lora_B[n].bias is not None else "")
                 for n in self.lora_A]
        return f"in_features={self.in_features}, out_features={self.out_features}, " + "; ".join(parts)

    def __repr__(self) -> str:
        return "fastpeft." + super().__repr__()
