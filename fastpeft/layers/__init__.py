from .embedding import FastLoraEmbedding
from .lora import DoraMagnitude, FastLoraLinear

__all__ = ["DoraMagnitude", "FastLoraEmbedding", "FastLoraLinear"]
from .lora4bit import FastLoraLinear4bit  # noqa: E402

__all__ += ["FastLoraLinear4bit"]
