"""4-bit weights: bitsandbytes' NF4/FP4 layout (double quantization included) and group-wise int4.

Formats (the bytes are bitsandbytes' own, so a weight moves between the two libraries as it is):

* **NF4 / FP4** (bitsandbytes 0.50): ``W`` (any shape, usually (out, in)) is flattened row-major and
  cut into blocks of ``blocksize`` ∈ {32, 64, …, 4096} elements (the last block may be short, and
  a block may straddle two rows). Block ``i`` stores ``absmax[i] = max|W_block|`` (fp32) and each
  element the 4-bit index of the nearest entry of a 16-entry table ``code`` to ``w / absmax[i]``
  (ties to the lower entry). Two codes a byte, element ``2j`` in the high nibble and ``2j+1`` in
  the low one; an odd element count pads one code for 0.0. ``packed`` has shape (⌈n/2⌉, 1),
  uint8 (or any ``quant_storage`` dtype viewed as bytes). ``dequant = (code[q] · absmax) → dtype``,
  one fp32 product.
* **Double quantization** (bnb's ``compress_statistics``): ``offset = mean(absmax)``, then
  ``absmax − offset`` is quantized 8-bit blockwise (blocks of 256) against bitsandbytes' signed
  dynamic map, giving uint8 codes, one fp32 ``nested_absmax`` per 256 blocks and the table
  ``nested_code``. Read back as ``nested_code[a8] · nested_absmax[i // 256] + offset`` — a
  product and a sum, two roundings (never an FMA).
* **int4** (fastpeft's): ``packed`` (out, in/2) uint8, per row, same nibble order;
  ``scales`` fp16 and ``zeros`` uint8 (integer zero points 0…15), shape (out, ⌈in/group⌉), groups of
  ``group_size`` along in_features. ``w = (q − zero) · scale`` in fp32, then cast. Quantized
  asymmetrically from each group's min/max (the range widened to include 0, so 0 is exact).

What lives here: the tables, ``quantize_4bit`` / ``dequantize_4bit`` (and the ``_nf4`` / ``_fp4``
spellings), ``quantize_int4`` / ``dequantize_int4`` in plain PyTorch (the CPU path and the test
oracle; ``fastpeft.kernels.dequantize_4bit`` is the Triton twin), ``Weight4bit`` — a view of a 4-bit
weight, built with no copy from a bitsandbytes ``Params4bit`` or from fastpeft's own ``Linear4bit``
— the ``Linear4bit`` module, ``quantize_linear`` / ``quantize_model`` and
``prepare_model_for_kbit_training``.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .ops import autocast_dtype

QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT4_GROUP_SIZES = (32, 64, 128)
NESTED_BLOCKSIZE = 256

# NF4: quantiles of N(0, 1) normalized to [-1, 1] (QLoRA, Dettmers et al. 2023) — bitsandbytes' values.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order, before dividing by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def code_table(quant_type: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16-entry fp32 table of ``"nf4"`` or ``"fp4"`` (bitsandbytes' ``get_4bit_type``), cached per device."""
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _TABLES:
        if quant_type == "nf4":
            t = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            t = torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0
        else:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-1, 1]) used for the nested absmax.

    Exponent ``e`` = 0…6 covers magnitudes 10^(e−6)·[0.1, 1] with 2^e evenly spaced midpoints per sign
    (Dettmers 2015, "8-bit approximations"), plus 0 and 1.
    """
    device = torch.device(device)
    key = ("dynamic", device)
    if key not in _TABLES:
        values: list[float] = []
        for e in range(7):
            edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            scaled = (10 ** (e - 6)) * mids
            values += scaled.tolist() + (-scaled).tolist()
        values += [0.0, 1.0]
        _TABLES[key] = torch.tensor(sorted(values), dtype=torch.float32).to(device)
    return _TABLES[key]


def _is_int(v) -> bool:
    """A Python/NumPy integer, not a bool (``64.0`` and ``True`` compare equal to ints but are not sizes)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_blocksize(blocksize: int) -> int:
    if not _is_int(blocksize):
        raise TypeError(f"blocksize must be an int, one of {BLOCKSIZES}, got {blocksize!r} "
                        f"({type(blocksize).__name__})")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


# dtypes a packed NF4/FP4 weight may be stored as (its bytes viewed as them, as bitsandbytes' quant_storage)
QUANT_STORAGES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                  torch.float32, torch.float64)


def _check_out_dtype(dtype, what: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what} decodes to a floating-point dtype (e.g. torch.float32 or torch.bfloat16), "
                        f"got {dtype!r}")


def _check_float(w: Tensor, what: str) -> None:
    if not isinstance(w, Tensor) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise TypeError(f"{what} takes a float32/float16/bfloat16 tensor, got {got}")


# --------------------------------------------------------------------------- blockwise absmax
def _block_absmax_scaled(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(absmax per block, flat / absmax clamped to [-1, 1]) the way bitsandbytes computes them:
    full blocks multiply by the fp32 reciprocal, the short tail block divides."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        am = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, (tail / am).clamp_(-1, 1)])
    return absmax, scaled


def _nearest_sorted(code: Tensor, v: Tensor) -> Tensor:
    """Index of the entry of the sorted ``code`` nearest to each ``v`` (ties to the lower index)."""
    right = torch.searchsorted(code, v.contiguous(), right=False).clamp_(1, code.numel() - 1)
    left = right - 1
    d_left = (v - code[left]).abs()
    d_right = (code[right] - v).abs()
    idx = torch.where(d_right < d_left, right, left)
    # values at or below the first entry map to it (searchsorted gives 0, clamped to 1 above)
    return torch.where(v <= code[0], torch.zeros_like(idx), idx)


def _quantize_blockwise8(a: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor, Tensor]:
    """8-bit blockwise quantization of a flat fp32 tensor with the dynamic map: (codes uint8, absmax fp32, code).

    As bitsandbytes' CPU quantizer: ``v = a · (1/absmax)`` clamped to [-1, 1], nearest code (ties low);
    an all-zero block stores absmax 0 and code index 0.
    """
    code = dynamic_code(a.device)
    n = a.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(a, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    v = (padded * (1.0 / absmax)[:, None]).clamp_(-1, 1).reshape(-1)[:n]
    q = _nearest_sorted(code, v)
    q = torch.where(absmax.repeat_interleave(blocksize)[:n] == 0, torch.zeros_like(q), q)
    return q.to(torch.uint8), absmax, code.clone()


def _quant_order(quant_type: str, device) -> tuple[Tensor, Tensor]:
    """(midpoints between sorted table entries, index of each sorted entry in the table)."""
    code = code_table(quant_type, device)
    vals, order = torch.sort(code, stable=True)
    return (vals[:-1] + vals[1:]) / 2, order


# --------------------------------------------------------------------------- state
def _stat_to(t: Optional[Tensor], device) -> Optional[Tensor]:
    """``t`` on ``device``; a meta tensor has no data to copy, so it becomes an uninitialized one there
    (``to_empty``'s rule, which a statistic follows when its module's parameters left meta)."""
    if t is None:
        return None
    if t.is_meta and torch.device(device).type != "meta":
        return torch.empty_like(t, device=device)
    return t.to(device)


@dataclass(eq=False)
class NestedState:
    """The second level of double quantization (bnb's ``quant_state.state2``): fp32 ``absmax`` per
    ``blocksize`` first-level blocks, the 256-entry ``code`` and the dtype the codes decode to."""

    absmax: Tensor
    code: Tensor
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass(eq=False)
class QuantState4bit:
    """Quantization state of one NF4/FP4 weight, with bitsandbytes' ``QuantState`` field names.

    ``absmax`` is fp32 (one per block) or, when ``state2`` is set (double quantization), uint8 codes
    decoded as ``state2.code[absmax] · state2.absmax[i // state2.blocksize] + offset``. ``shape`` and
    ``dtype`` are the original weight's.
    """

    absmax: Tensor
    shape: torch.Size
    code: Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: Optional[Tensor] = None
    state2: Optional[NestedState] = None

    @property
    def nested(self) -> bool:
        """True with double quantization."""
        return self.state2 is not None

    def to(self, device) -> QuantState4bit:
        """Move every tensor to ``device`` in place (as bnb's ``QuantState.to``); returns self. A statistic on the
        meta device (a model built on meta, then ``to_empty``) is allocated uninitialized there instead, as
        ``Module.to_empty`` does for parameters."""
        self.absmax, self.code = _stat_to(self.absmax, device), _stat_to(self.code, device)
        if self.state2 is not None:
            self.offset = _stat_to(self.offset, device)
            self.state2.absmax, self.state2.code = _stat_to(self.state2.absmax, device), _stat_to(self.state2.code,
                                                                                                   device)
        return self

    def to_bnb(self):
        """The same state as a ``bitsandbytes.functional.QuantState`` (tensors shared, not copied)."""
        from bitsandbytes.functional import QuantState

        state2 = None if self.state2 is None else QuantState(
            absmax=self.state2.absmax, code=self.state2.code, blocksize=self.state2.blocksize,
            dtype=self.state2.dtype)
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, qs) -> QuantState4bit:
        """Wrap a bitsandbytes ``QuantState`` (tensors shared, not copied)."""
        state2 = None
        if getattr(qs, "nested", False):
            s2 = qs.state2
            state2 = NestedState(s2.absmax, s2.code, int(s2.blocksize), s2.dtype or torch.float32)
        return cls(absmax=qs.absmax, shape=torch.Size(qs.shape), code=qs.code, blocksize=int(qs.blocksize),
                   quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset, state2=state2)


def quantize_4bit(w: Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[Tensor, QuantState4bit]:
    """Quantize ``w`` to NF4/FP4 in bitsandbytes' layout: ``(packed (⌈n/2⌉, 1), state)``.

    Byte for byte what ``bitsandbytes.functional.quantize_4bit`` returns for the same input (its
    CPU/PyTorch path), double quantization included. Pure PyTorch: runs on any device. Example::

        packed, state = quantize_4bit(linear.weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        w = dequantize_4bit(packed, state)
    """
    _check_float(w, "quantize_4bit")
    blocksize = _check_blocksize(blocksize)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if quant_storage not in QUANT_STORAGES:
        raise TypeError(f"quant_storage must be one of {QUANT_STORAGES}, got {quant_storage!r}")
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _block_absmax_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the padding nibble is the code of 0.0
    bounds, order = _quant_order(quant_type, w.device)
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)  # bucketize: ties to the lower entry
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        size = torch.empty(0, dtype=quant_storage).element_size()
        if packed.numel() % size:
            raise ValueError(f"{packed.numel()} packed bytes cannot be viewed as {quant_storage}")
        packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
    code = code_table(quant_type, w.device).clone()
    state = QuantState4bit(absmax=absmax, shape=torch.Size(w.shape), code=code, blocksize=blocksize,
                           quant_type=quant_type, dtype=w.dtype)
    if compress_statistics:
        offset = absmax.mean()
        a8, absmax2, code2 = _quantize_blockwise8(absmax - offset, NESTED_BLOCKSIZE)
        state.absmax, state.offset = a8, offset
        state.state2 = NestedState(absmax2, code2, NESTED_BLOCKSIZE, torch.float32)
    return packed, state


def quantize_nf4(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8) -> tuple[Tensor, QuantState4bit]:
    """``quantize_4bit(..., quant_type="nf4")``."""
    return quantize_4bit(w, blocksize, "nf4", compress_statistics, quant_storage)


def quantize_fp4(w: Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8) -> tuple[Tensor, QuantState4bit]:
    """``quantize_4bit(..., quant_type="fp4")``."""
    return quantize_4bit(w, blocksize, "fp4", compress_statistics, quant_storage)


def real_absmax(state) -> Tensor:
    """The fp32 absmax of every block (decoding double quantization); ``state`` is fastpeft's or bnb's."""
    absmax = state.absmax
    if not getattr(state, "nested", False):
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
        return absmax.reshape(-1)
    s2 = state.state2
    n = absmax.numel()
    if absmax.dtype != torch.uint8:
        raise TypeError(f"a double-quantized absmax holds uint8 codes, got {absmax.dtype}")
    nabs = s2.absmax.reshape(-1).float().repeat_interleave(int(s2.blocksize))[:n]
    vals = s2.code.float()[absmax.reshape(-1).long()] * nabs  # one fp32 product …
    offset = state.offset if isinstance(state.offset, Tensor) else torch.tensor(float(state.offset))
    return vals + offset.to(vals.device, torch.float32)  # … then one fp32 sum


def _as_bytes(packed: Tensor) -> Tensor:
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.contiguous().view(torch.uint8)


def _check_state(state) -> None:
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    _check_blocksize(int(state.blocksize))


def dequantize_4bit(packed: Tensor, state, dtype: torch.dtype | None = None) -> Tensor:
    """Decode NF4/FP4 bytes to a tensor of ``state.shape`` in ``dtype`` (default ``state.dtype``).

    ``state`` is fastpeft's ``QuantState4bit`` or a bitsandbytes ``QuantState``. Bit for bit equal to
    ``bitsandbytes.functional.dequantize_4bit`` when ``dtype`` is the state's. Example::

        w = dequantize_4bit(bnb_linear.weight.data, bnb_linear.weight.quant_state, torch.bfloat16)
    """
    _check_state(state)
    dtype = dtype or state.dtype
    _check_out_dtype(dtype, "dequantize_4bit")
    shape = tuple(state.shape)
    n = math.prod(shape)
    blocksize = int(state.blocksize)
    q = _as_bytes(packed)
    if q.numel() < (n + 1) // 2:
        raise ValueError(f"packed holds {q.numel()} bytes, a weight of shape {shape} needs {(n + 1) // 2}")
    absmax = real_absmax(state)
    if absmax.numel() < -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, {-(-n // blocksize)} blocks need one each")
    idx = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n].long()
    vals = state.code.float().to(q.device)[idx]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[full // blocksize]
    return out.to(dtype).reshape(shape)


def dequantize_nf4(packed: Tensor, state, dtype: torch.dtype | None = None) -> Tensor:
    """``dequantize_4bit`` for an NF4 state (raises on another type)."""
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 got a {state.quant_type} state")
    return dequantize_4bit(packed, state, dtype)


def dequantize_fp4(packed: Tensor, state, dtype: torch.dtype | None = None) -> Tensor:
    """``dequantize_4bit`` for an FP4 state (raises on another type)."""
    if state.quant_type != "fp4":
        raise ValueError(f"dequantize_fp4 got a {state.quant_type} state")
    return dequantize_4bit(packed, state, dtype)


# --------------------------------------------------------------------------- int4
def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if in_features % 2:
        raise ValueError(f"int4 packs two weights a byte along in_features, which must be even, got {in_features}")
    if not _is_int(group_size):
        raise TypeError(f"int4 group_size must be an int, one of {INT4_GROUP_SIZES}, got {group_size!r} "
                        f"({type(group_size).__name__})")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def quantize_int4(w: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4 of a 2-D ``w`` (out, in): ``(packed (out, in/2) uint8, scales fp16, zeros uint8)``.

    Per group of ``group_size`` along in (the last may be short): range [min, max] widened to include 0,
    ``scale = (max − min)/15`` (1 for an all-zero group) rounded to fp16, ``zero = clamp(round(−min/scale),
    0, 15)``, ``q = clamp(round(w/scale) + zero, 0, 15)``. Example::

        packed, scales, zeros = quantize_int4(linear.weight, group_size=64)
    """
    _check_float(w, "quantize_int4")
    if w.dim() != 2:
        raise ValueError(f"quantize_int4 takes a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    _check_int4_shape(out_f, in_f, group_size)
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    meta = w.is_meta  # a model built on the meta device: shapes only, no values to check
    if not meta and not torch.isfinite(w).all():
        raise ValueError("quantize_int4 takes finite weights; this one holds NaN or inf")
    groups = -(-in_f // group_size)
    wf = w.detach().float()
    padded = torch.nn.functional.pad(wf, (0, groups * group_size - in_f)).view(out_f, groups, group_size)
    # padding 0 lies inside the widened range [min(min, 0), max(max, 0)], so it changes nothing
    lo = padded.amin(dim=2).clamp(max=0)
    hi = padded.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15).to(torch.float16)
    if not meta and not torch.isfinite(scale).all():
        raise ValueError("int4 scales overflow fp16 (weights beyond ±491,000?)")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s32 = scale.float()
    zero = torch.round(-lo / s32).clamp_(0, 15)
    q = (torch.round(padded / s32[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(out_f, -1)[:, :in_f]
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed.contiguous(), scale, zero.to(torch.uint8)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int, in_features: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode fastpeft int4 to (out, in) in ``dtype``: ``w = (q − zero) · scale`` in fp32, then cast."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"int4 packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    _check_out_dtype(dtype, "dequantize_int4")
    out_f = packed.shape[0]
    in_f = 2 * packed.shape[1]
    if in_features is not None:
        if not _is_int(in_features):
            raise TypeError(f"in_features must be an int, got {in_features!r}")
        if in_features != in_f:
            raise ValueError(f"int4 packed of shape {tuple(packed.shape)} holds in_features = {in_f} "
                             f"(two a byte), got in_features={in_features}")
    _check_int4_shape(out_f, in_f, group_size)
    groups = -(-in_f // group_size)
    if tuple(scales.shape) != (out_f, groups) or tuple(zeros.shape) != (out_f, groups):
        raise ValueError(f"scales/zeros must be ({out_f}, {groups}), got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    q = torch.stack([packed >> 4, packed & 15], dim=2).reshape(out_f, -1)[:, :in_f].float()
    g = torch.arange(in_f, device=packed.device) // group_size
    return ((q - zeros.float()[:, g]) * scales.float()[:, g]).to(dtype)


# --------------------------------------------------------------------------- a view of a 4-bit weight
@dataclass(eq=False)
class Weight4bit:
    """A 4-bit weight of logical shape (out_features, in_features) as the kernels take it. No copies:
    the tensors are the owner's (a bitsandbytes ``Params4bit`` and its ``quant_state``, or a
    fastpeft ``Linear4bit``).

    ``quant_type`` "nf4"/"fp4": ``absmax`` fp32 or uint8 (nested, with ``nested_code``,
    ``nested_absmax``, ``nested_blocksize``, ``offset``), ``code`` 16 fp32, ``blocksize``.
    "int4": ``absmax`` holds the fp16 scales, ``zeros`` the zero points, ``blocksize`` the group size.
    Example::

        w4 = Weight4bit.from_module(bnb_linear)      # or a fastpeft Linear4bit
        w = w4.dequantize(torch.bfloat16)
    """

    packed: Tensor
    quant_type: str
    out_features: int
    in_features: int
    blocksize: int
    absmax: Tensor
    code: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    nested_absmax: Optional[Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: Optional[Tensor] = None
    zeros: Optional[Tensor] = None
    dtype: torch.dtype = torch.float32

    @property
    def nested(self) -> bool:
        """True with double quantization."""
        return self.nested_code is not None

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> Weight4bit:
        """Read a bitsandbytes ``Params4bit`` (or packed data + ``QuantState``) as it is: no copy.

        A weight bitsandbytes repacked for its CPU GEMM (``packing_format_for_cpu``) is refused; the
        owning module's ``Linear4bit`` is restored by ``Weight4bit.from_module``.
        """
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("this Params4bit has no quant_state: it is not quantized yet (move it to a device "
                             "or build it with bitsandbytes' quantize_4bit)")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("bitsandbytes repacked this weight for its CPU GEMM (packing_format_for_cpu); "
                             "read it through Weight4bit.from_module(linear4bit), which restores bnb's layout")
        if qs.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"unsupported bitsandbytes quant_type {qs.quant_type!r}")
        _check_blocksize(int(qs.blocksize))
        shape = tuple(qs.shape)
        if len(shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D, got quant_state.shape {shape}")
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        if data.dtype != torch.uint8:
            data = data.reshape(-1).view(torch.uint8)  # quant_storage other than uint8: same bytes
        w = cls(packed=data, quant_type=qs.quant_type, out_features=shape[0], in_features=shape[1],
                blocksize=int(qs.blocksize), absmax=qs.absmax, code=qs.code, dtype=qs.dtype or torch.float32)
        if getattr(qs, "nested", False):
            if qs.absmax.dtype != torch.uint8:
                raise ValueError(f"double-quantized absmax must be uint8 codes, got {qs.absmax.dtype}")
            w.nested_code, w.nested_absmax = qs.state2.code, qs.state2.absmax
            w.nested_blocksize = int(qs.state2.blocksize)
            off = qs.offset
            w.offset = off if isinstance(off, Tensor) else torch.tensor(float(off), device=qs.absmax.device)
        elif qs.absmax.dtype != torch.float32:
            w.absmax = qs.absmax.float()  # a foreign fp16/bf16 absmax: widened (exact), a small copy
        return w

    @classmethod
    def from_module(cls, module: nn.Module) -> Weight4bit:
        """The 4-bit weight of a bitsandbytes ``Linear4bit`` or a fastpeft ``Linear4bit`` (no copy).

        A bitsandbytes weight repacked for its CPU GEMM is first put back in bnb's standard layout, in
        place (``restore_bnb_cpu_packing``)."""
        if isinstance(module, Linear4bit):
            return module.weight4bit()
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            restore_bnb_cpu_packing(weight)
        return cls.from_bnb(weight)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight in ``dtype`` (default: the original dtype), in plain PyTorch."""
        dtype = dtype or self.dtype
        if self.quant_type == "int4":
            return dequantize_int4(self.packed, self.absmax, self.zeros, self.blocksize, self.in_features, dtype)
        return dequantize_4bit(self.packed, self.state(), dtype)

    def row_step(self) -> int:
        """The row granularity of ``row_slice``: NF4/FP4 blocks run over the flattened weight, so a slice
        must start on a block boundary (``start · in_features`` a multiple of ``blocksize``); int4 groups
        lie within a row (any row)."""
        if self.quant_type == "int4":
            return 1
        return self.blocksize // math.gcd(self.in_features, self.blocksize)

    def row_slice(self, start: int, stop: int, absmax: Tensor | None = None) -> Weight4bit:
        """Rows ``[start, stop)`` as a ``Weight4bit`` over views of this one's tensors (no copy of the codes),
        to decode a large weight a few rows at a time. ``start`` must be a multiple of ``row_step()``.
        A double-quantized NF4/FP4 weight is sliced through its decoded fp32 absmax: pass ``absmax`` =
        ``real_absmax(self.state())`` when slicing many times (computed here otherwise); the slice is then
        single-level with exactly the values the nested statistics decode to. Example::

            absmax = real_absmax(w4.state())
            rows = w4.row_slice(0, 256, absmax).dequantize(torch.float32)   # == w4.dequantize(fp32)[:256]
        """
        if not 0 <= start <= stop <= self.out_features or start % self.row_step():
            raise ValueError(f"row_slice({start}, {stop}) of a {self.out_features}-row weight: rows must be in "
                             f"range and start a multiple of row_step() = {self.row_step()}")
        rows = stop - start
        if self.quant_type == "int4":
            return Weight4bit(self.packed[start:stop], "int4", rows, self.in_features, self.blocksize,
                              self.absmax[start:stop], zeros=self.zeros[start:stop], dtype=self.dtype)
        if absmax is None:
            absmax = real_absmax(self.state())
        first, last = start * self.in_features, stop * self.in_features
        return Weight4bit(_as_bytes(self.packed)[first // 2 : (last + 1) // 2], self.quant_type, rows,
                          self.in_features, self.blocksize,
                          absmax.reshape(-1)[first // self.blocksize : -(-last // self.blocksize)],
                          code=self.code, dtype=self.dtype)

    def state(self) -> QuantState4bit:
        """An NF4/FP4 ``QuantState4bit`` over the same tensors."""
        state2 = None if not self.nested else NestedState(self.nested_absmax, self.nested_code, self.nested_blocksize)
        return QuantState4bit(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                              code=self.code, blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                              offset=self.offset, state2=state2)

    def nbytes(self) -> int:
        """Bytes held: the packed codes plus every statistic."""
        ts = (self.packed, self.absmax, self.code, self.nested_code, self.nested_absmax, self.offset, self.zeros)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


_BNB_CPU_BLOCK_N = 32  # rows per tile of bitsandbytes' CPU 4-bit layout (its default ``block_n``)


@torch.no_grad()
def restore_bnb_cpu_packing(weight) -> None:
    """Put a bitsandbytes ``Params4bit`` repacked for bnb's CPU GEMM back in bnb's standard layout, in place.

    bitsandbytes' eval-mode, no-grad CPU forward (on AVX512-bf16 machines) rewrites ``weight.data`` as
    (out, in/2) tiles of ``32`` rows and its ``quant_state`` as ``packing_format_for_cpu``: the absmax
    decoded (double quantization undone) and stored transposed, (in/blocksize, out), in bf16. That bf16
    absmax is what bnb computes with from then on, so it is restored as it is: widened to fp32 (exact)
    in row-major block order, single-level (``nested`` False, no second rounding of the statistics;
    bnb's own inverse re-quantizes them 8-bit, and leaves them transposed without double quantization).
    The codes are restored bit for bit; ``dtype`` and the storage dtype are the original ones.

    Tile layout undone here: for rows ``32t … 32t+31`` and columns ``2c, 2c+1`` the 32 bytes at
    ``data[32t : 32t+32, c]`` (flat order) hold element ``e = 2·row + column parity`` of the tile in
    the low nibble of byte ``e`` (``e`` < 32) or the high nibble of byte ``e − 32``.
    """
    qs = weight.quant_state
    out_f, in_f = (int(d) for d in qs.shape)
    blocksize = int(qs.blocksize)
    data = weight.data
    if data.dtype != torch.uint8:
        data = data.reshape(-1).view(torch.uint8)
    if out_f % _BNB_CPU_BLOCK_N or in_f % 2 or in_f % blocksize or data.numel() * 2 != out_f * in_f:
        raise ValueError(f"unexpected bitsandbytes CPU-packed weight: {data.numel()} bytes for shape "
                         f"({out_f}, {in_f}), blocksize {blocksize}")
    absmax = qs.absmax
    if tuple(absmax.shape) != (in_f // blocksize, out_f):
        raise ValueError(f"a CPU-packed absmax should be ({in_f // blocksize}, {out_f}) (in/blocksize, out), "
                         f"got {tuple(absmax.shape)}")
    tiles = data.reshape(-1, _BNB_CPU_BLOCK_N)  # one row per (row tile, column pair): 32 bytes, 64 nibbles
    elems = torch.cat([tiles & 15, tiles >> 4], dim=1)  # element e of the tile at index e
    codes = (elems.view(out_f // _BNB_CPU_BLOCK_N, in_f // 2, _BNB_CPU_BLOCK_N, 2)
             .permute(0, 2, 1, 3).reshape(-1))  # (out, in) row-major
    packed = (codes[0::2] << 4) | codes[1::2]
    shape = getattr(qs, "original_qshape", None) or (packed.numel(), 1)
    packed = packed.reshape(shape)
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None and storage != torch.uint8:
        packed = packed.view(storage)
    qs.absmax = absmax.t().float().reshape(-1).contiguous()
    qs.dtype = getattr(qs, "original_dtype", None) or qs.dtype
    qs.nested, qs.offset, qs.state2 = False, None, None
    qs.packing_format_for_cpu = False
    weight.data = packed  # the quant_state object (shared with the module) was updated in place


def dequantize_weight(w4: Weight4bit, dtype: torch.dtype) -> Tensor:
    """``w4`` as an (out, in) tensor in ``dtype``: the Triton kernel where ``fastpeft.ops.backend_for``
    picks Triton (CUDA), the PyTorch decoding elsewhere. Bit for bit the same either way."""
    from .ops import backend_for

    if backend_for(w4.packed) == "triton":
        return dequantize_kernel(w4, dtype)
    return w4.dequantize(dtype)


def dequantize_kernel(w4: Weight4bit, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``w4`` decoded by fastpeft's Triton kernel (``fastpeft.kernels.dequantize_4bit`` / ``_int4``),
    into ``out`` when given (a contiguous (out, in) tensor of ``dtype``, e.g. a reused workspace)."""
    from . import kernels

    if w4.quant_type == "int4":
        return kernels.dequantize_int4(w4.packed, w4.absmax, w4.zeros, w4.blocksize, w4.out_features,
                                       w4.in_features, dtype, out=out)
    nested = dict(nested_code=w4.nested_code, nested_absmax=w4.nested_absmax, nested_blocksize=w4.nested_blocksize,
                  nested_offset=w4.offset) if w4.nested else {}
    return kernels.dequantize_4bit(w4.packed, w4.absmax, w4.code.float(), w4.blocksize, w4.out_features,
                                   w4.in_features, dtype, out=out, **nested)


# --------------------------------------------------------------------------- fastpeft's 4-bit Linear
_BNB_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _pack_json(d: dict) -> Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: Tensor) -> dict:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight (NF4/FP4 in bitsandbytes' layout, or fastpeft int4).

    Needs no bitsandbytes: quantized by fastpeft, decoded by fastpeft's Triton kernel on CUDA and
    PyTorch elsewhere, computing in the input's dtype (as ``nn.Linear``). ``weight`` is the packed
    uint8 parameter, ``weight.quant_state`` (and ``self.quant_state``) its ``QuantState4bit``; the
    state dict uses bitsandbytes' keys (``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``)
    so ``bitsandbytes.nn.Linear4bit`` loads it, and this module loads bnb's. Example::

        q = Linear4bit.from_linear(nn.Linear(4096, 4096), quant_type="nf4", compress_statistics=True)
        y = q(x)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, compress_statistics: bool = True, compute_dtype: torch.dtype | None = None,
                 device=None, dtype=None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        self.compute_dtype = compute_dtype
        w = torch.zeros(out_features, in_features, device=device, dtype=dtype or torch.float32)
        self._set_weight(w)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear``'s weight (kept bias, new module). ``blocksize`` is the int4 group size
        for ``quant_type="int4"`` (32/64/128)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear takes an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        self.compute_dtype = compute_dtype
        self._set_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return self

    def _set_weight(self, w: Tensor) -> None:
        """(Re)quantize ``w`` (out, in) into this module's format."""
        if self.quant_type == "int4":
            packed, scales, zeros = quantize_int4(w, self.blocksize)
            state = Int4State(scales, zeros, self.blocksize, torch.Size(w.shape), w.dtype)
        else:
            packed, state = quantize_4bit(w, self.blocksize, self.quant_type, self.compress_statistics)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.weight.quant_state = state

    def weight4bit(self) -> Weight4bit:
        """The weight as a ``Weight4bit`` (the module's tensors, no copy)."""
        st = self.quant_state
        if self.quant_type == "int4":
            return Weight4bit(self.weight, "int4", self.out_features, self.in_features, st.group_size, st.scales,
                              zeros=st.zeros, dtype=st.dtype)
        return Weight4bit.from_bnb(self.weight.data, st)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight decoded to ``dtype`` (default: the original weight's dtype)."""
        return dequantize_weight(self.weight4bit(), dtype or self.quant_state.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b``, the weight dequantized to the compute dtype (autocast's, else ``compute_dtype``, else x's)."""
        dtype = autocast_dtype(x) or self.compute_dtype or x.dtype
        w = self.dequantize(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), w, b).to(x.dtype if self.compute_dtype else dtype)

    def __setstate__(self, state):
        # deepcopy/pickle rebuild the module from its __dict__, and a copied Parameter loses its Python
        # attributes: the copied weight gets the copied state back
        super().__setstate__(state)
        weight = self._parameters.get("weight")
        if weight is not None and getattr(self, "quant_state", None) is not None:
            weight.quant_state = self.quant_state

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.weight.device
        self.quant_state.to(device)  # quantization statistics follow the device, never a dtype cast
        self.weight.quant_state = self.quant_state
        return self

    @torch.no_grad()
    def set_weight(self, w: Tensor) -> None:
        """Replace the weight by ``w`` (out, in), quantized in this module's format (merge uses this)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected a ({self.out_features}, {self.in_features}) weight, got {tuple(w.shape)}")
        self._set_weight(w.to(self.quant_state.dtype))

    def to_bnb(self) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` holding the same bytes and state (NF4/FP4; tensors shared)."""
        import bitsandbytes as bnb

        if self.quant_type == "int4":
            raise ValueError("bitsandbytes has no fastpeft int4 format; only NF4/FP4 convert")
        st = self.quant_state
        lin = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                compute_dtype=self.compute_dtype, compress_statistics=st.nested,
                                quant_type=st.quant_type, device="meta")
        lin.weight = bnb.nn.Params4bit(self.weight.data, requires_grad=False, quant_state=st.to_bnb(),
                                       blocksize=st.blocksize, compress_statistics=st.nested,
                                       quant_type=st.quant_type, bnb_quantized=True, module=lin)
        lin.bias = None if self.bias is None else nn.Parameter(self.bias.data, requires_grad=False)
        return lin

    @classmethod
    def from_bnb(cls, lin: nn.Module) -> Linear4bit:
        """fastpeft's module over a ``bitsandbytes.nn.Linear4bit``'s bytes and state (no copy)."""
        w4 = Weight4bit.from_module(lin)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = w4.in_features, w4.out_features
        self.quant_type, self.blocksize, self.compress_statistics = w4.quant_type, w4.blocksize, w4.nested
        self.compute_dtype = getattr(lin, "compute_dtype", None)
        self.weight = nn.Parameter(w4.packed, requires_grad=False)
        self.quant_state = QuantState4bit.from_bnb(lin.weight.quant_state)
        self.weight.quant_state = self.quant_state
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.data, requires_grad=False)
        return self

    # state dict in bitsandbytes' keys
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        st, p = self.quant_state, prefix + "weight."
        if self.quant_type == "int4":
            destination[p + "scales"], destination[p + "zeros"] = st.scales, st.zeros
            destination[p + "quant_state.fastpeft__int4"] = _pack_json(
                {"group_size": st.group_size, "shape": list(st.shape), "dtype": _dtype_name(st.dtype)})
            return
        destination[p + "absmax"], destination[p + "quant_map"] = st.absmax, st.code
        meta = {"quant_type": st.quant_type, "blocksize": st.blocksize, "dtype": _dtype_name(st.dtype),
                "shape": list(st.shape)}
        if st.nested:
            destination[p + "nested_absmax"] = st.state2.absmax
            destination[p + "nested_quant_map"] = st.state2.code.clone()
            meta.update(nested_blocksize=st.state2.blocksize, nested_dtype=_dtype_name(st.state2.dtype),
                        nested_offset=float(st.offset))
        destination[p + "quant_state.bitsandbytes__" + st.quant_type] = _pack_json(meta)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loads bitsandbytes' or fastpeft's 4-bit keys: the checkpoint's format (quant_type, blocksize,
        double quantization) replaces this module's; its weight shape must be (out_features, in_features),
        else a size-mismatch error as ``nn.Linear``'s and nothing changes. An error while loading the
        rest (e.g. the bias) leaves the module's weight and format as they were."""
        p = prefix + "weight."
        packed_keys = [k for k in state_dict if k.startswith(p + "quant_state.")]
        if not packed_keys:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        meta = _unpack_json(state_dict[packed_keys[0]])
        kind = packed_keys[0].rsplit("__", 1)[-1]
        shape = torch.Size(meta["shape"])
        if shape != torch.Size((self.out_features, self.in_features)):
            error_msgs.append(f"size mismatch for {prefix}weight: copying a 4-bit weight of shape {shape} from "
                              f"checkpoint, the shape in current model is "
                              f"{torch.Size((self.out_features, self.in_features))}.")
            return
        dev = self.weight.device
        packed = state_dict.get(prefix + "weight")
        if packed is not None and local_metadata.get("assign_to_params_buffers", False):
            dev = packed.device  # load_state_dict(assign=True): the checkpoint's tensor becomes the weight
        if kind == "int4":
            state = Int4State(state_dict[p + "scales"].to(dev), state_dict[p + "zeros"].to(dev),
                              int(meta["group_size"]), shape, getattr(torch, meta["dtype"]))
        else:
            state = QuantState4bit(absmax=state_dict[p + "absmax"].to(dev), shape=shape,
                                   code=state_dict[p + "quant_map"].to(dev), blocksize=int(meta["blocksize"]),
                                   quant_type=meta["quant_type"], dtype=getattr(torch, meta["dtype"]))
            if p + "nested_absmax" in state_dict:
                state.offset = torch.tensor(float(meta["nested_offset"]), device=dev)
                state.state2 = NestedState(state_dict[p + "nested_absmax"].to(dev),
                                           state_dict[p + "nested_quant_map"].to(dev),
                                           int(meta["nested_blocksize"]), getattr(torch, meta["nested_dtype"]))
        used = set(packed_keys) | {p + k for k in (*_BNB_KEYS, "scales", "zeros")}
        for k in used:
            state_dict.pop(k, None)
        saved = (self.weight, self.quant_state, self.quant_type, self.blocksize, self.compress_statistics)
        self.quant_type = kind
        self.blocksize = state.group_size if kind == "int4" else state.blocksize
        self.compress_statistics = state.nested
        self.quant_state = state
        if packed is not None and packed.dtype != torch.uint8 and kind != "int4":
            # bitsandbytes' quant_storage (bf16 for FSDP-QLoRA, …): the same bytes, held here as uint8, so that no
            # dtype cast (.float(), prepare_model_for_kbit_training's upcast) can turn them into other bytes
            packed = state_dict[prefix + "weight"] = packed.detach().contiguous().reshape(-1).view(torch.uint8) \
                .reshape(-1, 1)
        if packed is not None:  # a fresh parameter receives the bytes: an error below puts the old one back
            self.weight = nn.Parameter(torch.empty_like(packed, device=dev), requires_grad=False)
        self.weight.quant_state = state
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > n_errors:
            self.weight, self.quant_state, self.quant_type, self.blocksize, self.compress_statistics = saved
        self.weight.quant_state = self.quant_state  # assign=True put a new Parameter in place

    def extra_repr(self) -> str:
        """Sizes, bias, 4-bit format and blocksize."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}")


@dataclass(eq=False)
class Int4State:
    """Statistics of a fastpeft int4 weight: fp16 ``scales`` and uint8 ``zeros`` (out, ⌈in/group⌉)."""

    scales: Tensor
    zeros: Tensor
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nested(self) -> bool:
        """Always False (no double quantization for int4)."""
        return False

    @property
    def absmax(self) -> Tensor:
        """The scales (so byte counters that read ``absmax`` see them)."""
        return self.scales

    @property
    def code(self) -> Tensor:
        """The zero points (as ``absmax``, for byte counters)."""
        return self.zeros

    def to(self, device) -> Int4State:
        """Move the statistics to ``device`` in place; returns self (meta statistics: as ``QuantState4bit.to``)."""
        self.scales, self.zeros = _stat_to(self.scales, device), _stat_to(self.zeros, device)
        return self


def is_linear4bit(module: nn.Module) -> bool:
    """True for fastpeft's ``Linear4bit`` and bitsandbytes' ``Linear4bit`` (and its NF4/FP4 subclasses)."""
    return isinstance(module, Linear4bit) or (
        type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module, "weight"))


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, compute_dtype: torch.dtype | None = None,
                    backend: str = "fastpeft") -> nn.Module:
    """A 4-bit copy of ``linear``: fastpeft's ``Linear4bit`` (``backend="fastpeft"``, no bitsandbytes needed;
    NF4/FP4 bytes equal bitsandbytes') or ``bitsandbytes.nn.Linear4bit`` quantized by bitsandbytes."""
    if backend == "fastpeft":
        return Linear4bit.from_linear(linear, quant_type, blocksize, compress_statistics, compute_dtype)
    if backend != "bitsandbytes":
        raise ValueError(f"backend must be 'fastpeft' or 'bitsandbytes', got {backend!r}")
    import bitsandbytes as bnb

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes quantizes nf4/fp4, not {quant_type!r}")
    dev = linear.weight.device
    lin = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                            quant_type=quant_type, device="meta")
    lin.weight = bnb.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False, quant_type=quant_type,
                                   compress_statistics=compress_statistics, blocksize=blocksize)
    if linear.bias is not None:
        lin.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    return lin.to(dev)  # bitsandbytes quantizes on .to()


def _is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (without importing transformers: a model of it means it is imported)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _conv1d_type():
    """transformers' GPT-2-style ``Conv1D`` (weight stored (in, out)), or None when transformers has not loaded it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _pattern_matches(name: str, pattern: str) -> bool:
    """transformers' rule for a ``modules_to_not_convert`` entry: ``pattern`` matches a module name as a regular
    expression from its start up to a module boundary (``"layers.1"`` matches ``"layers.1.mlp"``, not
    ``"layers.11.mlp"``), or as a plain suffix of it (``"wo"`` matches ``"block.0.layer.1.DenseReluDense.wo"``)."""
    if name.endswith(pattern):
        return True
    try:
        rx = re.compile(f"(?:{pattern})(?:(?<=\\.)|(?=\\.|$))")
    except re.error:  # not a regular expression: the name as written
        rx = re.compile(f"(?:{re.escape(pattern)})(?:(?<=\\.)|(?=\\.|$))")
    return rx.match(name) is not None


def _default_skips(model: nn.Module) -> list[str]:
    """The modules transformers' bitsandbytes loading keeps in full precision by itself: the output embeddings,
    both sides of every tied weight, the owner of the last parameter (e.g. ``score`` of ``*ForSequenceClassification``)
    and ``_keep_in_fp32_modules`` (T5's ``wo``). The tied/last rules apply to transformers models only (a plain
    ``nn.Module`` keeps its output embeddings and ``_keep_in_fp32_modules``, when it defines them)."""
    names: set[str] = set()
    if _is_transformers_model(model):
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        names |= {k for pair in tied.items() for k in pair if isinstance(k, str)}
        param_names = [n for n, _ in model.named_parameters()]
        if param_names:
            names.add(param_names[-1])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    names = {n.removesuffix(".weight") for n in names}
    names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sorted(names)


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or a ``Conv1D``'s weight transposed to (out, in) (as transformers
    quantizes it)."""
    if type(module) is nn.Linear:
        return module
    in_f, out_f = module.weight.shape
    lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                   compute_dtype: torch.dtype | None = None, backend: str = "fastpeft",
                   skip_modules: tuple[str, ...] = ("lm_head",), progressbar: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers' GPT-2-style ``Conv1D``, its weight transposed to (out, in))
    of ``model`` by a 4-bit one, in place (QLoRA's base model); returns ``model``.

    Kept in full precision, as transformers' bitsandbytes loading (``BitsAndBytesConfig(load_in_4bit=True)``)
    keeps them: the output embeddings, tied-weight modules, the module owning the model's last parameter (the
    ``score`` head of ``*ForSequenceClassification``, which peft's ``task_type="SEQ_CLS"`` then trains in full),
    the model's ``_keep_in_fp32_modules`` (T5's ``wo``), and the modules named in ``skip_modules`` — matched
    as transformers matches ``llm_int8_skip_modules``: a suffix of the name, or a regular expression from its
    start up to a ``.``. Unlike ``llm_int8_skip_modules``, ``skip_modules`` adds to the automatic list rather
    than replacing it. Nothing to quantize: a warning, and the model is not marked 4-bit.

    A transformers model is marked as transformers marks one it quantized: ``is_loaded_in_4bit``, a
    ``config.quantization_config`` (the ``BitsAndBytesConfig`` of these settings; ``blocksize`` travels in each
    weight's saved state) and an ``hf_quantizer``, so ``save_pretrained`` writes a checkpoint
    ``AutoModelForCausalLM.from_pretrained`` reloads with bitsandbytes, and ``model.dequantize()`` gives
    ``nn.Linear`` layers back (:func:`dequantize_model`). ``quant_type="int4"`` (fastpeft's format, which
    bitsandbytes and transformers cannot read) gets no ``quantization_config``, and ``save_pretrained`` refuses
    it with a warning that says what to do instead. ``progressbar`` shows a tqdm bar on a terminal (a large model
    takes minutes on CPU). Example::

        model = quantize_model(AutoModelForCausalLM.from_pretrained(path), compute_dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(model)
    """
    if backend not in ("fastpeft", "bitsandbytes"):
        raise ValueError(f"backend must be 'fastpeft' or 'bitsandbytes', got {backend!r}")
    user_skips = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules or ())
    defaults = _default_skips(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = _conv1d_type()
    candidates = [(name, module) for name, module in model.named_modules()
                  if name and module is not head
                  and (type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d)))]
    targets = [name for name, _ in candidates if not any(_pattern_matches(name, p) for p in defaults + user_skips)]
    from tqdm.auto import tqdm

    for name in tqdm(targets, desc=f"Quantizing to {quant_type}", unit="layer", leave=False,
                     disable=None if progressbar else True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        source = getattr(parent, child)
        new = quantize_linear(_as_linear(source), quant_type, blocksize, compress_statistics, compute_dtype, backend)
        new.source_cls = type(source)  # as transformers' 4-bit layers record it
        setattr(parent, child, new)
    if not targets:
        warnings.warn(f"quantize_model found no nn.Linear or Conv1D layer to quantize in {type(model).__name__} "
                      f"(skipped: {sorted(name for name, _ in candidates) or 'none'}); the model is unchanged",
                      stacklevel=2)
        return model
    try:
        model.is_loaded_in_4bit = True  # what peft and transformers look for
    except (AttributeError, TypeError):  # pragma: no cover - a read-only property on some models
        pass
    if _is_transformers_model(model):
        default_targets = [name for name, _ in candidates if not any(_pattern_matches(name, p) for p in defaults)]
        skip_list = None if default_targets == targets else sorted(set(defaults) | set(user_skips))
        _attach_hf_quantizer(model, quant_type, compress_statistics, compute_dtype, skip_list, backend)
    return model


def _attach_hf_quantizer(model: nn.Module, quant_type: str, compress_statistics: bool,
                         compute_dtype: torch.dtype | None, skip_list: list[str] | None, backend: str) -> None:
    """Give a transformers model the ``config.quantization_config`` and ``hf_quantizer`` that transformers gives a
    model it quantized with the same ``BitsAndBytesConfig`` (not overwriting ones already there)."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        return
    classes = _hf_quantizer_classes()
    if quant_type == "int4":
        model.hf_quantizer = classes["FastpeftInt4Quantizer"](classes["FastpeftInt4Config"](compute_dtype))
        return
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=compress_statistics, bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip_list)
    model.config.quantization_config = config
    model.hf_quantizer = classes["FastpeftBnb4BitQuantizer"](config, compileable=backend == "fastpeft")


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit layer of ``model`` (fastpeft's ``Linear4bit``, NF4/FP4/int4, or bitsandbytes'
    ``Linear4bit``) by an ``nn.Linear`` holding the decoded weight, in place; returns ``model`` (a 4-bit layer
    passed alone: its ``nn.Linear``). ``dtype``: the weights' dtype (default: each one's original dtype). As
    transformers' ``dequantize``: the new weight is a fresh ``Parameter`` (``requires_grad`` True), the bias
    the old one, a ``Conv1D`` comes back as ``nn.Linear``. A transformers model quantized by
    :func:`quantize_model` gets here through ``model.dequantize()``, which also drops its quantization config."""
    def convert(module: nn.Module) -> nn.Linear:
        w4 = Weight4bit.from_module(module)
        w = dequantize_weight(w4, w4.dtype)
        lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        lin.weight = nn.Parameter(w if dtype is None else w.to(dtype))
        if module.bias is not None:
            lin.bias = module.bias
        return lin

    if is_linear4bit(model):
        return convert(model)
    for name, module in list(model.named_modules()):
        if name and is_linear4bit(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, convert(module))
    return model


_HF_CLASSES: dict[str, type] = {}


def _hf_quantizer_classes() -> dict[str, type]:
    """fastpeft's transformers quantizer classes, built on first use (importing transformers only then)."""
    if _HF_CLASSES:
        return _HF_CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class FastpeftBnb4BitQuantizer(Bnb4BitHfQuantizer):
        """transformers' bitsandbytes 4-bit quantizer for a model :func:`quantize_model` quantized: serializable
        (the state dict is bitsandbytes'), trainable, and ``dequantize`` decodes fastpeft's and bnb's layers."""

        def __init__(self, quantization_config, compileable: bool = True):
            super().__init__(quantization_config, pre_quantized=False)
            self.compileable = compileable

        @property
        def is_compileable(self) -> bool:
            """fastpeft's own 4-bit layers compile; bitsandbytes' (``backend="bitsandbytes"``) do not."""
            return self.compileable

        def _dequantize(self, model, dtype=None):
            return dequantize_model(model, dtype)

    class FastpeftInt4Config(QuantizationConfigMixin):
        """Marks a model :func:`quantize_model` quantized to fastpeft's int4 (not a transformers format)."""

        def __init__(self, compute_dtype=None):
            self.quant_method = "fastpeft_int4"
            self.compute_dtype = compute_dtype

    class FastpeftInt4Quantizer(HfQuantizer):
        """Trainable and dequantizable, but not serializable: transformers cannot load fastpeft's int4."""

        requires_calibration = False

        def __init__(self, quantization_config):
            super().__init__(quantization_config, pre_quantized=False)

        def is_serializable(self, *args, **kwargs) -> bool:
            warnings.warn(INT4_SAVE_MESSAGE, stacklevel=3)
            return False

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True

        def _dequantize(self, model, dtype=None):
            return dequantize_model(model, dtype)

    for cls in (FastpeftBnb4BitQuantizer, FastpeftInt4Config, FastpeftInt4Quantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # pickled by name (module __getattr__ below)
        _HF_CLASSES[cls.__name__] = cls
    return _HF_CLASSES


INT4_SAVE_MESSAGE = (
    "fastpeft's int4 format is not a bitsandbytes format: transformers cannot load a save_pretrained checkpoint of "
    "it, so save_pretrained refuses it. Keep the weights with torch.save(model.state_dict()) (or safetensors) and "
    "load them into a model quantize_model(quant_type='int4') built, quantize to 'nf4'/'fp4' instead, or call "
    "model.dequantize() first to save full-precision weights.")


def __getattr__(name: str):
    """The transformers quantizer classes, built on first access (so unpickling a model finds them)."""
    if name in ("FastpeftBnb4BitQuantizer", "FastpeftInt4Config", "FastpeftInt4Quantizer"):
        return _hf_quantizer_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` for a model with 4-bit layers; returns ``model``.

    Freezes every parameter, casts fp16/bf16 parameters that are not 4-bit (norms, embeddings, the
    head) to fp32 (not on models quantized by GPTQ, AQLM, EETQ, HQQ or torchao, as peft), and — on a k-bit
    model only (transformers' ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``, set by :func:`quantize_model` too, or
    one of those methods), as peft — with ``use_gradient_checkpointing`` makes the input embeddings' output require
    grad (reentrant checkpointing needs a differentiable input) and turns checkpointing on.
    ``auto_clear_cache``: empty the CUDA allocator's cache after the casts (peft's argument).
    """
    gc_kwargs = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    other_method = method in ("gptq", "aqlm", "eetq", "hqq", "torchao") or getattr(model, "hqq_quantized", False)
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    for param in model.parameters():
        param.requires_grad_(False)
    if not other_method:
        packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}  # (bytes, whatever dtype)
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit" \
                    and id(param) not in packed:
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if use_gradient_checkpointing and (kbit or other_method):
        if gc_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model
