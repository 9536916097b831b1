from .lora import FastLoraLinear

__all__ = ["FastLoraLinear"]
