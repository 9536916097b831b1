"""Autotuning configurations, one named function per kernel.

GPU lists cover Hopper (sm90) and Ampere (sm80) with the shapes the Triton
matmul tutorial found good on both; ``keep()`` drops configs that cannot fit
a tiny problem. Under ``TRITON_INTERPRET=1`` each kernel gets one small config
(odd test shapes still span several tiles, so masking is exercised) because
the interpreter is slow and has no timer worth tuning on.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' host-side grid arithmetic (``triton.cdiv`` costs ~1.5 µs a call in Triton
    3.9, where it is a constexpr function; this is plain integer arithmetic)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (0 for 0), host side: ``triton.next_power_of_2`` without its per-call
    cost."""
    if not isinstance(n, int):  # (a traced size, e.g. under torch.jit.trace)
        return triton.next_power_of_2(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device``, cached per device (read on every launch)."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_mode() -> str:
    """How a launch without a forced config picks one, from ``FASTPEFT_AUTOTUNE``:

    - ``"tune"`` (``1``, the default): the autotuner times every config left after the shape's pruning;
    - ``"first"`` (``0``): the first pruned config that fits the device, untimed — for correctness runs,
      where every timed config is one more compile;
    - ``"warm"`` (``warm``): compile every pruned config the autotuner would time (no launch), then launch
      as ``"first"``. Processes run this way in parallel fill Triton's on-disk cache, so a later timed run
      (``"tune"``) compiles nothing: ``fastpeft bench --compile-only``, used by ``bench/gpu_run.sh``.
    """
    value = os.environ.get("FASTPEFT_AUTOTUNE", "1").strip().lower()
    if value == "0":
        return "first"
    if value == "warm":
        return "warm"
    if value not in ("", "1"):
        raise ValueError(f"FASTPEFT_AUTOTUNE must be 1, 0 or warm, got {value!r}")
    return "tune"


def autotuning() -> bool:
    """True when launches time every pruned config (``FASTPEFT_AUTOTUNE=1``, the default); see
    ``autotune_mode``."""
    return autotune_mode() == "tune"


def _cfg(bm, bn, bk, group, stages, warps, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, **extra},
                         num_stages=stages, num_warps=warps)


def gemm_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Main GEMM (y = x W0ᵀ + lora, and dx = dy W0 + lora): tiles over (M, N), loop over K."""
    if interpreting() if interpret is None else interpret:
        return [_cfg(32, 32, 32, 4, 1, 4)]
    # Kept by ptxas -v spill counts (triton 3.6): 128×256×64 and 256×128×64, the tutorial's best,
    # spill 904 / 272 bytes on sm90 even without dropout; 64×256×32 (344 B) and 16×128×128
    # (5.3 KB) spill on sm80. 128×128×32 moved to 8 warps (4 warps: 10 KB with a masked epilogue).
    return [
        _cfg(128, 128, 64, 8, 4, 8),
        _cfg(128, 128, 64, 8, 3, 8),
        _cfg(128, 128, 32, 8, 4, 8),
        _cfg(128, 64, 32, 8, 4, 4),
        _cfg(64, 128, 32, 8, 4, 4),
        _cfg(64, 64, 64, 8, 4, 4),
        # small M (decode, N ≤ 32 tokens): a thin row tile, wide K steps.
        _cfg(16, 64, 128, 1, 4, 4),
        _cfg(32, 64, 128, 1, 4, 4),
        _cfg(16, 64, 64, 1, 4, 4),
    ]


def down_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Skinny projection (xa = D(x) Aᵀ, dS = dy B): tiles over rows, loop over K."""
    if interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bk, s, w in [(64, 128, 3, 4), (128, 64, 3, 4), (128, 128, 3, 8), (64, 64, 4, 4),
                             (32, 128, 4, 4), (16, 256, 4, 4), (256, 64, 3, 8), DOWN_WIDE_RANK]
    ]


# (BLOCK_M, BLOCK_K, stages, warps) of the down pass's small-footprint config, kept only for BLOCK_R ≥ 128
# (r > 64). Compiled for sm90 (triton 3.6, bench/aot_compile.py), the other configs need 216–458 KB of shared
# memory there: the (BLOCK_K, BLOCK_R) fp32 tile of A dominates. Few tokens (M ≤ 32: only 32×128 and 16×256
# remain after keep_for_rows) with fp32 activations, or bf16 ones with dropout, had no config under the
# H200's 227 KB, so every launch raised OutOfResources. BLOCK_M = 32 sits in both row regimes.
DOWN_WIDE_RANK = (32, 64, 2, 4)


def _is_down_wide_rank(cfg: triton.Config) -> bool:
    return (cfg.kwargs.get("BLOCK_M"), cfg.kwargs.get("BLOCK_K"), cfg.num_stages, cfg.num_warps) == DOWN_WIDE_RANK


def keep_for_down(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune prune of the down pass: ``keep_for_rows``, plus the small-footprint config when the
    rank block is wide (BLOCK_R ≥ 128), where it may be the only one that fits in shared memory."""
    block_r = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 0))
    if block_r < 128:
        configs = [c for c in configs if not _is_down_wide_rank(c)] or configs
    return keep_for_rows(configs, named_args, **kwargs)


def reduce_configs(interpret: bool | None = None) -> list[triton.Config]:
    """Reduction over rows (dA = dSᵀ D(x), dB = xaᵀ dy): tiles over columns, split over rows."""
    if interpreting() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4)]
    # Chosen by ptxas -v (sm90, triton 3.6) for no register spills with dropout + the in-place dx
    # update at r ≤ 16 (≤ 64 bytes at r = 64); 64×128 / 128×64 at 4 warps spilled ~1 KB.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
        for bm, bk, s, w in [(32, 32, 3, 4), (32, 64, 3, 8), (64, 32, 3, 8), (64, 64, 3, 8),
                             (32, 128, 3, 8), (128, 32, 3, 8)]
    ]


def keep_for_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune prune: thin row tiles only for few tokens (decode), wide ones otherwise.

    Cuts tuning time (each config is a compile) without losing the configs a shape can use.
    """
    m = named_args["M_KEY"]
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    large = [c for c in configs if c.kwargs["BLOCK_M"] >= 32]
    chosen = small if m <= 32 else large
    return chosen or configs


# Rows handled by one program of the reduction kernel are a multiple of this;
# every reduce config's BLOCK_M divides it.
REDUCE_ROW_UNIT = 256
