from .embedding import FastLoraEmbedding
from .lora import DoraMagnitude, FastLoraLinear
from .param import FastLoraParamWrapper

__all__ = ["DoraMagnitude", "FastLoraEmbedding", "FastLoraLinear", "FastLoraParamWrapper"]
from .lora4bit import FastLoraLinear4bit  # noqa: E402

__all__ += ["FastLoraLinear4bit"]
