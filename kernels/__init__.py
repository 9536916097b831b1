"""fastpeft.kernels — Triton kernels and thin launchers (installed from the repo's ``kernels/``).

Tensors in, tensors out: no ``nn.Module``, no autograd. See ``lora_linear.py``.
"""

if __name__ != "fastpeft.kernels":
    # Run from the repository root (``python -m ...``, ``python -c``), this folder shadows the unrelated
    # Hugging Face ``kernels`` package, which transformers probes on import. Present an empty module
    # without ``__file__`` or ``__version__``: transformers reads that as a namespace-package shadow,
    # i.e. "not installed", and ``from kernels import get_kernel`` fails with an ordinary ImportError.
    del globals()["__file__"]
    __all__ = []
else:
    from .configs import cuda_properties, interpreting
    from .dequant4bit import dequantize_4bit, dequantize_int4
    from .lora_gemv4bit import gemv4bit_configs, lora_gemv_4bit, lora_gemv_int4
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
        "cuda_properties",
        "dequantize_4bit",
        "dequantize_int4",
        "gemv4bit_configs",
        "lora_gemv_4bit",
        "lora_gemv_int4",
        "interpreting",
        "lora_down",
        "lora_gemm",
        "lora_linear_backward",
        "lora_linear_forward",
        "lora_reduce",
    ]
