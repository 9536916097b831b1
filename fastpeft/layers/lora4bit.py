"""``FastLoraLinear4bit``: LoRA on a frozen 4-bit base (QLoRA), laid out exactly as peft's.

The base layer is the bitsandbytes ``Linear4bit`` itself when wrapping one (its ``Params4bit`` and
``quant_state`` are read as they are: no copy, no re-quantization), or fastpeft's own
``fastpeft.quant.Linear4bit`` (NF4/FP4 in bitsandbytes' bytes, or int4) otherwise. State-dict keys
are peft's (``base_layer.weight``, ``lora_A.<name>.weight``, ``lora_B.<name>.weight``). The forward of
the first active adapter is one fused op (``fastpeft.ops4bit.lora_linear_4bit``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..ops import autocast_dtype, to_autocast_dtype
from ..ops4bit import lora_linear_4bit, wide_compute_dtype
from ..quant import (
    Linear4bit,
    QuantState4bit,
    Weight4bit,
    dequantize_weight,
    is_linear4bit,
    quantize_4bit,
    quantize_linear,
    real_absmax,
)
from .lora import FastLoraLinear, WeightStamp
from .switches import warn_already_merged

# Relative errors of re-quantizations collected by requantization_summary() (a stack: nested blocks).
_REQUANT_ERRORS: list[list[float]] = []


@contextlib.contextmanager
def requantization_summary(what: str = "merging adapters into"):
    """Inside the block, 4-bit layers that re-quantize (merge/unmerge) collect their rounding error
    instead of warning each; one warning at the end names how many and the largest error (a model-wide
    ``merge_and_unload`` would otherwise warn once per layer)."""
    _REQUANT_ERRORS.append([])
    try:
        yield
    finally:
        errors = _REQUANT_ERRORS.pop()
        if errors:
            warnings.warn(f"{what} {len(errors)} 4-bit base layer(s) re-quantized their weights: the results "
                          f"differ from the exact fp32 weights by the 4-bit rounding (relative error up to "
                          f"{max(errors):.2e}). Use to_linear() on a layer for a full-precision merge.",
                          stacklevel=3)


class FastLoraLinear4bit(FastLoraLinear):
    """LoRA on a frozen 4-bit linear layer: ``y = base(x) + scale · B(A(dropout(x)))``, fused.

    Same arguments, adapters, merge/unmerge/disable API as ``FastLoraLinear`` (``fan_in_fan_out`` is
    always False). Adapters are fp32. Computes as the base layer does: in its ``compute_dtype`` when set
    (bitsandbytes' ``bnb_4bit_compute_dtype``, ``quantize_model(compute_dtype=…)``; autocast's dtype
    instead under autocast) with the output and the input's gradient in the input's dtype, so a zero
    adapter gives the base layer's output (to its final rounding); in the input's dtype (or autocast's) without
    one. An input wider than the compute dtype (fp32 x, bf16/fp16 compute dtype: a QLoRA model after
    ``prepare_model_for_kbit_training``, whose fp32 norms feed the projections) computes as peft's QLoRA layer:
    the base product as bitsandbytes' (x rounded to the compute dtype, kept in fp32), the LoRA branch on the
    exact fp32 x (``fastpeft.ops4bit.lora_linear_4bit``'s ``compute_dtype``), forward and backward — mixed-adapter
    batches (``adapter_names``) and aLoRA adapters too (``fastpeft.ops_mixed.lora_linear_mixed``'s
    ``compute_dtype``). Otherwise the fused 4-bit op, the mixed-adapter op and the decode GEMV run on the input
    cast to the compute dtype. Example::

        layer = FastLoraLinear4bit.from_linear(bnb_linear4bit, r=16, lora_alpha=32, lora_dropout=0.1)
        layer = FastLoraLinear4bit.from_linear(nn.Linear(4096, 4096), r=16, quant_type="nf4")  # quantizes
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, compress_statistics: bool = True, device=None, dtype=None, **lora_kwargs):
        nn.Module.__init__(self)
        base = Linear4bit(in_features, out_features, bias=bias, quant_type=quant_type, blocksize=blocksize,
                          compress_statistics=compress_statistics, device=device, dtype=dtype)
        adapter = lora_kwargs.pop("adapter_name", "default")
        lora_kwargs.pop("fan_in_fan_out", None)
        self._wrap(base, adapter, **lora_kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, fan_in_fan_out: bool | None = None,
                    init_lora_weights: bool | str = True, adapter_name: str = "default",
                    autocast_adapter_dtype: bool = True, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, use_dora: bool = False,
                    loftq_config: dict | None = None, lora_bias: bool = False,
                    use_alora: bool = False) -> FastLoraLinear4bit:
        """Wrap a bitsandbytes/fastpeft ``Linear4bit`` as it is, or quantize a plain ``nn.Linear`` first
        (fastpeft's quantizer; ``quant_type``/``blocksize``/``compress_statistics`` apply only then)."""
        if fan_in_fan_out:
            raise ValueError("a 4-bit base stores its weight as (out, in): fan_in_fan_out must be False")
        if not is_linear4bit(linear):
            if type(linear) is not nn.Linear:
                raise TypeError(f"FastLoraLinear4bit wraps a Linear4bit or an nn.Linear, got {type(linear).__name__}")
            linear = quantize_linear(linear, quant_type, blocksize, compress_statistics)
        return cls._wrapping(linear, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             use_rslora=use_rslora, init_lora_weights=init_lora_weights, use_dora=use_dora,
                             autocast_adapter_dtype=autocast_adapter_dtype, loftq_config=loftq_config,
                             lora_bias=lora_bias, use_alora=use_alora)

    def _adopt_base(self, base: nn.Module) -> None:
        """Shape fields from a 4-bit base (used when converting a peft layer)."""
        w4 = Weight4bit.from_module(base)
        self.in_features, self.out_features, self.fan_in_fan_out = w4.in_features, w4.out_features, False

    def _wrap(self, base: nn.Module, adapter_name: str, **adapter_kwargs) -> None:
        if not is_linear4bit(base):
            raise TypeError(f"FastLoraLinear4bit wraps a 4-bit Linear, got {type(base).__name__}")
        self._adopt_base(base)
        self.base_layer = base
        self._fastpeft_adapter_names = None
        self._fastpeft_alora_offsets = None
        for param in base.parameters():
            param.requires_grad_(False)
        self._init_adapter_state()
        self.update_layer(adapter_name, **adapter_kwargs)

    # ------------------------------------------------------------- weight
    def weight4bit(self) -> Weight4bit:
        """The base weight as a ``Weight4bit`` (the base's own tensors)."""
        return Weight4bit.from_module(self.base_layer)

    def base_weight_for_op(self) -> Weight4bit:
        """The 4-bit base as it is (its own tensors): the ops decode it per call (into the shared
        workspace on GPU) and again in backward, so no dense copy is kept for training."""
        return self.weight4bit()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight decoded to ``dtype`` (out, in)."""
        return self.weight4bit().dequantize(dtype)

    @torch.no_grad()
    def _requantize(self, w: torch.Tensor, what: str | None) -> None:
        """Write ``w`` (fp32, out × in) into the 4-bit base in its own format, warning about the rounding
        (not when ``what`` is None: an init that re-quantizes by design)."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.set_weight(w)
        else:  # bitsandbytes: fastpeft's quantizer gives bnb's bytes; the Params4bit keeps its identity
            qs = base.weight.quant_state
            # the Params4bit's format: a weight restored from bnb's CPU packing keeps single-level statistics
            # (see fastpeft.quant.restore_bnb_cpu_packing) but was built double-quantized or not
            nested = bool(getattr(base.weight, "compress_statistics", qs.nested))
            packed, st = quantize_4bit(w.to(qs.dtype), int(qs.blocksize), qs.quant_type, nested,
                                       base.weight.data.dtype)
            base.weight.data = packed
            base.weight.quant_state = st.to_bnb()
            if getattr(base, "quant_state", None) is not None:
                base.quant_state = base.weight.quant_state
        if what is None:
            return
        got = self.dequantized_weight()
        err = ((got - w).norm() / w.norm().clamp_min(1e-30)).item()
        if _REQUANT_ERRORS:  # inside requantization_summary(): one warning for the whole model
            _REQUANT_ERRORS[-1].append(err)
            return
        warnings.warn(f"{what} a 4-bit base re-quantizes its weight: the result differs from the exact "
                      f"fp32 weight by the 4-bit rounding (relative error {err:.2e} here). Use to_linear() for a "
                      "full-precision merged layer.", stacklevel=3)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add adapters into the 4-bit base: dequantize, merge (DoRA as in ``FastLoraLinear.merge``),
        re-quantize once (warns: costs a 4-bit rounding). A ``lora_B`` bias goes into the base bias as
        ``b + scale·b_B``, as ``FastLoraLinear.merge`` (peft's 4-bit layer adds ``b_B`` unscaled, which
        does not match its own forward)."""
        names = self._names_to_merge(adapter_names)
        warn_already_merged(self, names)  # peft's warnings
        todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            return
        self._refuse_alora_merge(todo)
        self._check_bias_mergeable(todo)
        w = self.dequantized_weight()
        w0 = self._unmerged_weight(w) if self.merged_adapters else w  # DoRA's norms: on the unmerged base
        bias = None if self.base_layer.bias is None else self.base_layer.bias.detach().float()
        for name in todo:
            w = self._merge_math(w, name, w0)
            self._check_merged(w, name, safe_merge)
            extra = self._scaled_lora_bias(name)
            if extra is not None:
                bias = bias + extra.detach().float()
                if safe_merge and not torch.isfinite(bias).all():
                    raise ValueError(f"NaNs or infs detected in the merged bias of adapter {name!r}; "
                                     "the adapter seems to be broken")
        self._requantize(w, "merging into")
        if bias is not None:
            self._write_bias(bias)
        self.merged_adapters.extend(todo)
        self.reset_dora_cache()

    def _unmerge_one(self, name: str) -> None:
        self._requantize(self._unmerge_math(self.dequantized_weight(), name), "unmerging from")
        self._write_bias(self._merged_bias(name, False, sign=-1.0))
        self._dora_merged_norms.pop(name, None)
        self.merged_adapters.remove(name)
        self.reset_dora_cache()

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A plain ``nn.Linear`` in ``dtype`` (bf16 by default): the decoded base plus the active unmerged
        adapters, merged in fp32 (no 4-bit rounding of the merge)."""
        w = self._pending_merge(self.dequantized_weight())
        bias = self._pending_bias()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias)
        return lin

    # ------------------------------------------------------------- data-dependent inits
    def _init_read_base(self, kind: str) -> torch.Tensor:
        """The 4-bit base decoded as peft decodes a bitsandbytes weight for OLoRA (to its original dtype),
        then upcast to fp32. LoftQ refuses a base that is already quantized."""
        if kind == "loftq":
            raise ValueError("init_lora_weights='loftq' quantizes a full-precision base itself; this base is "
                             "already 4-bit. For a 4-bit model, use fastpeft.replace_lora_weights_loftq(model) "
                             "with the original weights' safetensors (peft's replace_lora_weights_loftq)")
        try:
            w4 = self.weight4bit()
        except (ValueError, TypeError, AttributeError) as exc:
            raise TypeError(f"init_lora_weights={kind!r} decodes the 4-bit base, which cannot be read here: "
                            f"{exc}") from exc
        return w4.dequantize(w4.dtype).float()

    def _init_write_base(self, w: torch.Tensor) -> None:
        """Re-quantize the fp32 (out, in) residual into the base in its own format (quant type, blocksize,
        double quantization and original dtype kept), without the merge's rounding warning."""
        self._requantize(w, None)
        self.reset_dora_cache()

    # ------------------------------------------------------------- DoRA norm
    def _base_key(self) -> WeightStamp | None:
        """The 4-bit weight's identity for the ``‖W0_o‖²`` cache (``WeightStamp``): the packed parameter and its
        quantization statistics (absmax or int4 scales, int4 zero points), the quant_state object, the dtype it
        decodes to and the device."""
        w = self.base_layer.weight
        qs = getattr(w, "quant_state", None)
        try:
            stats = [t for t in (getattr(qs, "absmax", None), getattr(qs, "zeros", None))
                     if isinstance(t, torch.Tensor)]
            return WeightStamp([w, *stats], (id(qs), getattr(qs, "dtype", None), w.device))
        except (RuntimeError, NotImplementedError):
            return None

    def _base_row_reader(self):
        """Rows of W0 decoded a block at a time (``Weight4bit.row_slice``, a double-quantized absmax decoded once
        per call), each in the weight's original dtype as peft's dequantization gives it, then upcast."""
        w4 = self.weight4bit()
        absmax = None if w4.quant_type == "int4" else real_absmax(w4.state())

        def read(start: int, stop: int) -> torch.Tensor:
            return dequantize_weight(w4.row_slice(start, stop, absmax), w4.dtype).float()

        return w4.row_step(), read

    def unload_base(self) -> nn.Module:
        """The base layer to put back when the model is unloaded (merged adapters already in it)."""
        return self.base_layer

    # ------------------------------------------------------------- forward
    def _op_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the base computes in when its ``compute_dtype`` is set (autocast's under autocast, as
        ``fastpeft.quant.Linear4bit.forward``), None to compute in x's own dtype."""
        dtype = getattr(self.base_layer, "compute_dtype", None)
        if dtype is None or not x.is_floating_point():
            return None
        dtype = autocast_dtype(x) or dtype
        if dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16) \
                and not torch.compiler.is_compiling():
            warnings.warn(f"input to a 4-bit LoRA layer is {x.dtype} but its compute_dtype is float32 (transformers' "
                          "BitsAndBytesConfig default): the fused op runs in fp32, slower and with an fp32 copy of the"
                          " input kept for backward; set bnb_4bit_compute_dtype (or quantize_model's compute_dtype) "
                          f"to {x.dtype}", stacklevel=3)
        return dtype

    def _wide_dtype(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
        """The compute dtype when ``x`` carries more than it (autocast off): fp32 or float64 x over a bf16/fp16
        compute dtype, or fp16 x over bf16. The op then takes x in fp32 (as peft's LoRA branch casts x to its fp32
        adapters) and rounds it to the compute dtype for the base product only. None otherwise."""
        if dtype is None or autocast_dtype(x) is not None:
            return None
        if x.dtype == torch.float64 or (x.dtype == torch.float16 and dtype == torch.bfloat16):
            return dtype if dtype in (torch.bfloat16, torch.float16) else None  # (the op's own rule, for fp32 x)
        return wide_compute_dtype(x, dtype)

    def _fused_forward(self, x: torch.Tensor, name: str, with_bias: bool = True, dropout_p: float | None = None,
                       seed: torch.Tensor | None = None) -> torch.Tensor:
        """The 4-bit base plus adapter ``name`` in one fused op (``fastpeft.ops4bit.lora_linear_4bit``), on x
        cast to the base's compute dtype — or, for an fp32 x over a bf16/fp16 compute dtype, on x itself with the
        base product in the compute dtype and the LoRA branch in fp32 (peft's numerics); the output in x's dtype.
        ``with_bias``/``dropout_p``/``seed`` as in ``FastLoraLinear._fused_forward``."""
        dtype = self._op_dtype(x)
        wide = self._wide_dtype(x, dtype)
        xc = self._cast_input(x, dtype, wide)
        p = self._dropout_p(name) if dropout_p is None else dropout_p
        y = lora_linear_4bit(xc, self.weight4bit(), self._effective_bias(name) if with_bias else None,
                             self.lora_A[name].weight, self.lora_B[name].weight, scale=self.scaling[name],
                             dropout_p=p, training=self.training, seed=seed, compute_dtype=wide)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _op_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the 4-bit op takes it: cast to the dtype it computes in (see ``_op_dtype``), or as it is when
        wider than the compute dtype (see ``_wide_dtype``)."""
        dtype = self._op_dtype(x)
        if dtype is None:
            return to_autocast_dtype(x)
        return self._cast_input(x, dtype, self._wide_dtype(x, dtype))

    @staticmethod
    def _cast_input(x: torch.Tensor, dtype: torch.dtype | None, wide: torch.dtype | None) -> torch.Tensor:
        """``x`` for the 4-bit ops given ``_op_dtype`` (``dtype``) and ``_wide_dtype`` (``wide``): in fp32 when
        wider than the compute dtype (float64 / fp16 x: in fp32, as peft's LoRA branch), else cast to the compute
        dtype (as it is without one)."""
        if wide is not None:
            return x if x.dtype == torch.float32 else x.float()
        return x if dtype is None else x.to(dtype)

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W0ᵀ`` without bias, on the decoded weight (the rare unfused DoRA path)."""
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype))

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """``FastLoraLinear``'s mixed-adapter forward (aLoRA adapters' too) on x as ``_fused_forward`` takes it:
        cast to the base's compute dtype, or — wider than it (see ``_wide_dtype``) — in fp32 with the base product
        in the compute dtype and every adapter's rows on the exact x; output in x's dtype."""
        dtype = self._op_dtype(x)
        if dtype is None:
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        wide = self._wide_dtype(x, dtype)
        y = super()._mixed_batch_forward(self._cast_input(x, dtype, wide), *args, adapter_names=adapter_names,
                                         _compute_dtype=wide, **kwargs)
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return "fastpeft." + nn.Module.__repr__(self)


__all__ = ["FastLoraLinear4bit", "QuantState4bit"]
