"""fastpeft — fused LoRA fine-tuning for PyTorch, drop-in for nn.Linear and peft.

Example::

    from fastpeft import FastLoraLinear
    layer = FastLoraLinear.from_linear(model.q_proj, r=16, lora_alpha=32, lora_dropout=0.1)
"""

from .config import LoraConfig
from .convert import from_peft, to_peft
from .layers import FastLoraLinear, FastLoraLinear4bit
from .model import LoraModel, ModulesToSaveWrapper, PeftModel, get_peft_model
from .ops import backend_for, lora_linear
from .ops4bit import lora_linear_4bit
from .quant import (
    Linear4bit,
    Weight4bit,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_int4,
    dequantize_nf4,
    prepare_model_for_kbit_training,
    quantize_4bit,
    quantize_fp4,
    quantize_int4,
    quantize_linear,
    quantize_model,
    quantize_nf4,
)

__version__ = "0.1.0"
__all__ = [
    "FastLoraLinear",
    "FastLoraLinear4bit",
    "Linear4bit",
    "Weight4bit",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_int4",
    "dequantize_nf4",
    "lora_linear_4bit",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_int4",
    "quantize_linear",
    "quantize_model",
    "quantize_nf4",
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
