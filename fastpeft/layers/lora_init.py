"""The LoRA initializations that read the base weight (PiSSA, OLoRA, LoftQ), as plain functions.

Each takes the base weight as an fp32 (out, in) matrix ``W`` and returns fp32 factors ``A`` (r, in) and
``B`` (out, r), with peft 0.21's formulas (fastpeft's own code):

- PiSSA (Meng et al. 2024): ``W = U S Vᵀ``; ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` (``s`` the LoRA
  scale); the base keeps ``W − (s·B) A``. ``pissa_niter_K`` takes the top-r triplets from
  ``torch.svd_lowrank(W, q=r, niter=K)`` instead of a full SVD: random (torch's generator), much faster.
- OLoRA (Büyükakyüz 2024): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``; the base keeps ``W − (s·B) A``.
- LoftQ (Li et al. 2023): ``W ≈ Q + B A`` with ``Q`` = NF4(W − B A) (bitsandbytes' NF4, blocksize 64, no
  double quantization, in fastpeft's quantizer, which gives bitsandbytes' bytes) and ``B A`` the rank-r
  SVD of ``W − Q``, alternated ``num_iter`` times. As in peft, ``A``/``B`` are not divided by the scale:
  ``Q + s·B A`` approximates ``W`` best with ``s = 1`` (``lora_alpha = r``).
"""

from __future__ import annotations

import re

import torch

# The values of ``init_lora_weights`` fastpeft implements ("pissa_niter_<K>" stands for the pattern).
INIT_CHOICES = (True, False, "gaussian", "orthogonal", "mica", "pissa", "pissa_niter_<K>", "olora", "loftq", "eva")
# Inits that rewrite the base weight (the adapter then only fits the base it was initialized on).
BASE_MUTATING = ("pissa", "olora", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
LOFTQ_BITS = (4,)


def init_kind(value) -> tuple[bool | str, int | None]:
    """``(kind, niter)`` for a valid ``init_lora_weights`` value: ``kind`` is True, False, "gaussian", "pissa",
    "olora", "loftq" or "eva" (data-driven, see ``fastpeft.eva``: at creation B is zero and A keeps
    nn.Linear's init, as in peft, until ``initialize_lora_eva_weights`` sets A), ``niter`` the iteration count
    of ``"pissa_niter_<K>"`` (None otherwise). Raises ``ValueError`` naming the supported values for anything else."""
    if value is True or value is False:
        return value, None
    if isinstance(value, str):
        if value in ("pissa", "loftq", "eva", "orthogonal"):
            return value, None
        if value.lower() == "gaussian":  # peft compares this one case-insensitively too
            return "gaussian", None
        if value.lower() == "mica":  # (case-insensitively, as peft)
            return "mica", None
        if value.lower() == "olora":  # peft compares this one case-insensitively
            return "olora", None
        m = _PISSA_NITER.fullmatch(value)
        if m:
            return "pissa", int(m.group(1))
    raise ValueError(f"init_lora_weights={value!r} is not supported by fastpeft; choose one of {INIT_CHOICES} "
                     "(<K>: the number of subspace iterations of torch.svd_lowrank, e.g. 'pissa_niter_16')")


def mutates_base(value) -> bool:
    """True for the inits that rewrite the base weight (PiSSA, its fast variant, OLoRA, LoftQ)."""
    try:
        return init_kind(value)[0] in BASE_MUTATING
    except ValueError:
        return False


def check_loftq_config(loftq_config) -> dict:
    """``loftq_config`` as the dict peft stores (``{"loftq_bits": 4, "loftq_iter": 1}``), checked: a
    ``LoftQConfig`` (fastpeft's or peft's) or a dict; bits other than 4 and iterations < 1 raise."""
    if loftq_config is None or (isinstance(loftq_config, dict) and not loftq_config):
        raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq' "
                         "(e.g. LoraConfig(init_lora_weights='loftq', loftq_config=LoftQConfig(loftq_bits=4)))")
    cfg = loftq_config if isinstance(loftq_config, dict) else dict(vars(loftq_config))
    unknown = sorted(set(cfg) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"unknown loftq_config field(s) {unknown}; LoftQConfig has loftq_bits and loftq_iter")
    bits, iters = cfg.get("loftq_bits", 4), cfg.get("loftq_iter", 1)
    if bits not in LOFTQ_BITS or isinstance(bits, bool):
        raise ValueError(f"loftq_bits={bits!r} is not supported by fastpeft: LoftQ quantizes to NF4 "
                         f"(loftq_bits=4); peft's 8-bit variant needs bitsandbytes' Int8Params")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq_iter must be an integer ≥ 1 (alternating iterations), got {iters!r}")
    return {"loftq_bits": bits, "loftq_iter": iters}


@torch.no_grad()
def pissa_factors(w: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` (fp32, (r, in) and (out, r)) of the fp32 (out, in) weight ``w``: full SVD, or
    ``torch.svd_lowrank(w, q=r, niter=niter)`` when ``niter`` is given (draws from torch's generator)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.t()
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root[None, :]


@torch.no_grad()
def olora_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B)``: the first ``r`` rows of ``R`` and columns of ``Q`` of ``w = Q R`` (reduced QR)."""
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


@torch.no_grad()
def residual_factors(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (√S_r V_rᵀ, U_r √S_r)``: the best rank-r factorization of ``residual`` (LoftQ's step)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized to NF4 as peft's LoftQ quantizes (bitsandbytes' ``Params4bit`` defaults: blocksize 64,
    no double quantization) and decoded, in fp32."""
    from ..quant import dequantize_nf4, quantize_nf4

    packed, state = quantize_nf4(w, blocksize=64, compress_statistics=False)
    return dequantize_nf4(packed, state, torch.float32)


@torch.no_grad()
def loftq_factors(w: torch.Tensor, r: int, num_bits: int = 4,
                  num_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ on the fp32 (out, in) weight ``w``: ``(Q, A, B)``, ``Q`` the dequantized NF4 weight (fp32) that
    replaces the base, ``A``/``B`` the rank-r SVD factors of ``w − Q``; ``num_iter`` alternations (each
    re-quantizes ``w − B A``), as peft's ``loftq_init``."""
    check_loftq_config({"loftq_bits": num_bits, "loftq_iter": num_iter})
    target = w
    for i in range(num_iter):
        q = nf4_round_trip(target)
        A, B = residual_factors(w - q, r)
        if i + 1 < num_iter:
            target = w - B @ A
    return q, A, B
