"""fastpeft — fused LoRA fine-tuning for PyTorch, drop-in for nn.Linear and peft.

Example::

    from fastpeft import FastLoraLinear
    layer = FastLoraLinear.from_linear(model.q_proj, r=16, lora_alpha=32, lora_dropout=0.1)
"""

from .layers import FastLoraLinear
from .ops import backend_for, lora_linear

__version__ = "0.1.0"
__all__ = ["FastLoraLinear", "backend_for", "lora_linear", "__version__"]
