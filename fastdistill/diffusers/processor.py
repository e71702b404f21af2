"""``FusedAttnProcessor``: diffusers' ``AttnProcessor2_0`` with the attention call replaced by
:func:`fastdistill.fused_attention`, and helpers that install it on a whole model.

Everything around the attention product is the stock behaviour, step for step (diffusers 0.42
``AttnProcessor2_0.__call__``): spatial_norm, 4-D inputs, attention-mask preparation, group_norm,
norm_cross, norm_q/norm_k, output projection and dropout, residual_connection and
rescale_output_factor. q/k/v go to the kernel as the strided ``(B, H, L, D)`` views diffusers
makes (no copies).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..ops.attention import fused_attention

#: ``recorder(attn, query, key)``: called by the processor with the layer's ``Attention`` module and
#: its query and key, ``(B, heads, L, head_dim)`` (after norm_q/norm_k, before the product).
Recorder = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]

_PREV = "_fastdistill_prev_processor"


class FusedAttnProcessor:
    """Attention processor for ``diffusers.models.attention_processor.Attention`` modules.

    Args:
        recorder: optional ``recorder(attn, query, key)`` hook (see :data:`Recorder`), used by
            :class:`fastdistill.nn.AttentionDistillLoss` to capture q and k during a normal forward.

    Differences from ``AttnProcessor2_0``: the scale is ``attn.scale`` (equal to SDPA's default
    ``head_dim**-0.5`` whenever ``scale_qk=True``, the only case where diffusers picks
    ``AttnProcessor2_0``; with ``scale_qk=False`` it is 1.0 as in the legacy ``AttnProcessor``), and
    the softmax is always computed in fp32 (so ``upcast_softmax`` holds too). A boolean attention
    mask (True = keep, SDPA's convention) is turned into an additive one.
    """

    def __init__(self, recorder: Optional[Recorder] = None) -> None:
        self.recorder = recorder

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B*heads, 1|Lq, Lk) -> (B, heads, 1|Lq, Lk), as AttnProcessor2_0 hands it to SDPA.
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=torch.float32,
                                             device=attention_mask.device).masked_fill(~attention_mask,
                                                                                       float("-inf"))

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.recorder is not None:
            self.recorder(attn, query, key)

        hidden_states = fused_attention(query, key, value, scale=float(attn.scale),
                                        attn_mask=attention_mask.detach() if attention_mask is not None else None)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / FSDP / DeepSpeed ``.module`` wrappers (what
    accelerate's ``prepare`` returns) and ``torch.compile``'s ``_orig_mod``."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if type(model).__name__ in _WRAPPER_NAMES and isinstance(inner, nn.Module):
            model = inner
            continue
        return model


# Wrapper classes (matched by name, so nothing extra is imported) whose ``.module`` is the model.
_WRAPPER_NAMES = {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"}


def _replaceable(processor: object) -> bool:
    """Stock processors whose behaviour FusedAttnProcessor reproduces (others, such as IP-Adapter
    or LoRA processors, compute something else and are left alone)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``diffusers`` ``Attention`` module of ``model`` (unwrapped), by module path."""
    from diffusers.models.attention_processor import Attention

    root = unwrap_model(model)
    return {name: m for name, m in root.named_modules() if isinstance(m, Attention)}


def set_processors(model: nn.Module, processors: dict[str, Any]) -> None:
    """Install ``processors`` (module path -> processor) on ``model``'s Attention modules.

    Models with ``set_attn_processor`` (UNet2DConditionModel: diffusers' ``AttentionMixin``) get
    one dict through it, the other entries keeping their current processor; the rest
    (UNet2DModel, any ``nn.Module`` tree) are walked.
    """
    root = unwrap_model(model)
    current = getattr(root, "attn_processors", None) if hasattr(root, "set_attn_processor") else None
    if isinstance(current, dict) and current:
        table = dict(current)
        missing = []
        for path, proc in processors.items():
            key = f"{path}.processor"
            if key not in table:
                missing.append(path)
            table[key] = proc
        if not missing:
            root.set_attn_processor(table)
            return
    mods = dict(root.named_modules())
    for path, proc in processors.items():
        mods[path].set_processor(proc)


def enable_fused_attention(model: nn.Module, processor: Optional[FusedAttnProcessor] = None) -> int:
    """Switch every stock-processor ``Attention`` module of ``model`` to :class:`FusedAttnProcessor`.

    Works on ``UNet2DConditionModel`` (through ``set_attn_processor``), ``UNet2DModel`` (which has
    no ``set_attn_processor``: its Attention modules are walked), any module tree holding diffusers
    Attention modules, and models wrapped by DDP / accelerate / ``torch.compile``. The previous
    processors are remembered for :func:`disable_fused_attention`. Modules with non-stock
    processors (IP-Adapter, LoRA, custom) are left unchanged. Returns the number of modules that
    now use the fused processor.
    """
    processor = processor if processor is not None else FusedAttnProcessor()
    todo: dict[str, Any] = {}
    for path, m in attention_modules(model).items():
        if not _replaceable(m.processor):
            continue
        if not isinstance(m.processor, FusedAttnProcessor):
            object.__setattr__(m, _PREV, m.processor)
        todo[path] = processor
    if todo:
        set_processors(model, todo)
    return len(todo)


def disable_fused_attention(model: nn.Module) -> int:
    """Put back the processors :func:`enable_fused_attention` replaced (``AttnProcessor2_0`` for a
    fused module with no remembered predecessor). Returns the number of modules restored."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    todo: dict[str, Any] = {}
    for path, m in attention_modules(model).items():
        if isinstance(m.processor, FusedAttnProcessor):
            prev = m.__dict__.pop(_PREV, None)
            todo[path] = prev if prev is not None else AttnProcessor2_0()
    if todo:
        set_processors(model, todo)
    return len(todo)
