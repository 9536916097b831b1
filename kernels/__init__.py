"""fastpeft.kernels — Triton kernels and thin launchers (installed from the repo's ``kernels/``).

Tensors in, tensors out: no ``nn.Module``, no autograd. See ``lora_linear.py``.
"""

from .configs import interpreting
from .lora_linear import (
    LAUNCHES,
    lora_down,
    lora_gemm,
    lora_linear_backward,
    lora_linear_forward,
    lora_reduce,
)

__all__ = [
    "LAUNCHES",
    "interpreting",
    "lora_down",
    "lora_gemm",
    "lora_linear_backward",
    "lora_linear_forward",
    "lora_reduce",
]
