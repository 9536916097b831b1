from .conv import FastLoraConv
from .embedding import FastLoraEmbedding
from .lora import DoraMagnitude, FastLoraLinear
from .param import FastLoraParamWrapper
from .tokens import TrainableTokensLayer, TrainableTokensWrapper

__all__ = ["DoraMagnitude", "FastLoraConv", "FastLoraEmbedding", "FastLoraLinear", "FastLoraParamWrapper",
           "TrainableTokensLayer", "TrainableTokensWrapper"]
from .lora4bit import FastLoraLinear4bit  # noqa: E402

__all__ += ["FastLoraLinear4bit"]
