"""fastpeft — fused LoRA fine-tuning for PyTorch, drop-in for nn.Linear and peft.

Example::

    from fastpeft import FastLoraLinear
    layer = FastLoraLinear.from_linear(model.q_proj, r=16, lora_alpha=32, lora_dropout=0.1)
"""


def _kernels_from_source_tree() -> None:
    """``setup.py`` installs the repository's ``kernels/`` as ``fastpeft.kernels``. Used straight from a
    checkout (``PYTHONPATH=.``, no install), that mapping is missing: load the folder under that name."""
    import importlib.util
    import os
    import sys

    if "fastpeft.kernels" in sys.modules:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    # This checkout's own kernels (beside this package, with lora_linear.py: not Hugging Face's ``kernels``).
    ours = os.path.isfile(init) and os.path.isfile(os.path.join(folder, "lora_linear.py"))
    found = importlib.util.find_spec("fastpeft.kernels")
    # An editable install of *another* checkout maps fastpeft.kernels to that checkout's folder: with this
    # package taken from PYTHONPATH (a git worktree, say), its kernels must come from the same tree.
    if found is not None and not (ours and found.origin and os.path.realpath(found.origin) != os.path.realpath(init)):
        return
    if not ours:
        return
    spec = importlib.util.spec_from_file_location("fastpeft.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastpeft.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastpeft.kernels"]
        raise


_kernels_from_source_tree()

# The imports below come after the kernels are importable (E402 is ignored for this file).
from .api import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PeftConfig,
    PeftType,
    cast_mixed_precision_params,
    get_peft_config,
    inject_adapter_in_model,
    load_peft_weights,
)
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .base_state import get_base_model_state_dict, set_base_model_state_dict
from .config import EvaConfig, LoftQConfig, LoraConfig, TaskType
from .conversion import convert_to_lora, save_as_lora
from .convert import from_peft, to_peft
from .errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from .layers import FastLoraConv, FastLoraEmbedding, FastLoraLinear, FastLoraLinear4bit
from .loftq import replace_lora_weights_loftq
from .model import LoraModel, ModulesToSaveWrapper, PeftModel, get_peft_model
from .ops import backend_for, lora_linear
from .ops4bit import lora_linear_4bit
from .quant import (
    Linear4bit,
    Weight4bit,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_int4,
    dequantize_model,
    dequantize_nf4,
    prepare_model_for_kbit_training,
    quantize_4bit,
    quantize_fp4,
    quantize_int4,
    quantize_linear,
    quantize_model,
    quantize_nf4,
)
from .save import get_peft_model_state_dict, set_peft_model_state_dict
from .status import get_layer_status, get_model_status
from .tasks import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__version__ = "0.1.0"
__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftConfig",
    "PeftType",
    "cast_mixed_precision_params",
    "get_peft_config",
    "inject_adapter_in_model",
    "load_peft_weights",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "FastLoraConv",
    "FastLoraEmbedding",
    "FastLoraLinear",
    "FastLoraLinear4bit",
    "Linear4bit",
    "Weight4bit",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_int4",
    "dequantize_model",
    "dequantize_nf4",
    "lora_linear_4bit",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_int4",
    "quantize_linear",
    "quantize_model",
    "quantize_nf4",
    "EvaConfig",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "__version__",
    "backend_for",
    "from_peft",
    "convert_to_lora",
    "save_as_lora",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "get_peft_model",
    "get_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "set_peft_model_state_dict",
    "TaskType",
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
    LNTuningConfig,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TrainableTokensConfig,
    build_config,
)

__all__ += [
    "AdaLoraConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "FreezeConfig",
    "IA3Config",
    "LNTuningConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TrainableTokensConfig",
    "build_config",
]
