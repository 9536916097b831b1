from .lora import FastLoraLinear

__all__ = ["FastLoraLinear"]
from .lora4bit import FastLoraLinear4bit  # noqa: E402

__all__ += ["FastLoraLinear4bit"]
