"""diffusers integration: the fused attention processor and helpers to install it on any model.

>>> from fastdistill.diffusers import enable_fused_attention, disable_fused_attention
>>> # n = enable_fused_attention(unet)   # UNet2DConditionModel, UNet2DModel, DDP/accelerate-wrapped
>>> # disable_fused_attention(unet)      # back to the processors it had

Importing this package does not import diffusers; the helpers import it when called.
"""

from .processor import (
    FusedAttnProcessor,
    Recorder,
    attention_modules,
    disable_fused_attention,
    enable_fused_attention,
    fused_processor_for,
    register_with_diffusers,
    unwrap_model,
)

__all__ = [
    "FusedAttnProcessor",
    "Recorder",
    "attention_modules",
    "disable_fused_attention",
    "enable_fused_attention",
    "fused_processor_for",
    "register_with_diffusers",
    "unwrap_model",
]
