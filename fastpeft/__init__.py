"""fastpeft — fused LoRA fine-tuning for PyTorch, drop-in for nn.Linear and peft.

Example::

    from fastpeft import FastLoraLinear
    layer = FastLoraLinear.from_linear(model.q_proj, r=16, lora_alpha=32, lora_dropout=0.1)
"""

from .config import LoraConfig
from .convert import from_peft, to_peft
from .layers import FastLoraLinear
from .model import LoraModel, ModulesToSaveWrapper, PeftModel, get_peft_model
from .ops import backend_for, lora_linear

__version__ = "0.1.0"
__all__ = [
    "FastLoraLinear",
    "LoraConfig",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "__version__",
    "backend_for",
    "from_peft",
    "get_peft_model",
    "lora_linear",
    "to_peft",
]

# --------------------------------------------------------------------------- other PEFT methods (fastpeft.methods)
from .methods import (  # noqa: E402
    AdaLoraConfig,
    BitFitConfig,
    BottleneckConfig,
    FreezeConfig,
    IA3Config,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    build_config,
)

__all__ += [
    "AdaLoraConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "FreezeConfig",
    "IA3Config",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "build_config",
]
