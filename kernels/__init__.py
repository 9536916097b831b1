"""fastpeft.kernels — Triton kernels and thin launchers (installed from the repo's ``kernels/``).

Tensors in, tensors out: no ``nn.Module``, no autograd. See ``lora_linear.py``.
"""

if __name__ != "fastpeft.kernels":
    # Run from the repository root, this folder shadows the unrelated Hugging Face ``kernels``
    # package that transformers and bitsandbytes try to import; fail as "not installed" instead.
    raise ImportError(f"{__file__} is fastpeft's kernel folder (import it as fastpeft.kernels), "
                      "not the Hugging Face `kernels` package")

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
