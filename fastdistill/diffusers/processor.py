"""``FusedAttnProcessor``: diffusers' ``AttnProcessor2_0`` with the attention call replaced by
:func:`fastdistill.fused_attention`, and helpers that install it on a whole model.

Everything around the attention product is the stock behaviour, step for step (diffusers 0.42
``AttnProcessor2_0.__call__``): spatial_norm, 4-D inputs, attention-mask preparation, group_norm,
norm_cross, norm_q/norm_k, output projection and dropout, residual_connection and
rescale_output_factor. q/k/v go to the kernel as the strided ``(B, H, L, D)`` views diffusers
makes (no copies). The attention itself matches ``F.scaled_dot_product_attention`` as
``AttnProcessor2_0`` calls it: scale ``1/sqrt(head_dim)``, fully masked rows give 0, the mask gets
its gradient, and calls the fused kernel cannot take run SDPA itself (one
:class:`fastdistill.dispatch.FallbackWarning` per reason).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import FallbackWarning
from ..ops.attention import fused_attention, triton_fallback_reason

#: ``recorder(attn, query, key)``: called by the processor with the layer's ``Attention`` module and
#: its query and key, ``(B, heads, L, head_dim)`` (after norm_q/norm_k, before the product).
Recorder = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]

_PREV = "_fastdistill_prev_processor"


_SDPA_WARNED: set[str] = set()


def _warn_sdpa_once(reason: str) -> None:
    if reason in _SDPA_WARNED:
        return
    _SDPA_WARNED.add(reason)
    warnings.warn(f"FusedAttnProcessor: running torch.nn.functional.scaled_dot_product_attention (what "
                  f"AttnProcessor2_0 runs) instead of fastdistill's fused kernel for such calls: {reason}",
                  FallbackWarning, stacklevel=4)


class FusedAttnProcessor:
    """Attention processor for ``diffusers.models.attention_processor.Attention`` modules: diffusers'
    ``AttnProcessor2_0``, call for call, with the attention product computed by
    :func:`fastdistill.fused_attention`.

    Args:
        recorder: optional ``recorder(attn, query, key)`` hook (see :data:`Recorder`), used by
            :class:`fastdistill.nn.AttentionDistillLoss` to capture q and k during a normal forward.
        use_attn_scale: ``False`` (default): the scale is ``head_dim**-0.5``, what
            ``AttnProcessor2_0`` uses (it calls SDPA without ``scale``), whatever ``attn.scale`` and
            ``scale_qk`` say. ``True``: use ``attn.scale`` (1.0 under ``scale_qk=False``, or a value
            you set), as the legacy ``AttnProcessor`` does; :func:`enable_fused_attention` picks
            this for modules that ran ``AttnProcessor``.

    Semantics as in ``AttnProcessor2_0`` / SDPA: a boolean attention mask keeps ``True`` entries; a
    query row whose keys are all masked (all ``False``, or all ``-inf``) gives 0; a float mask that
    requires grad receives its gradient. Calls the fused Triton kernel cannot take (head dim above
    256, a mask that requires grad, float64) run ``F.scaled_dot_product_attention`` exactly as
    ``AttnProcessor2_0`` would, with a one-time :class:`~fastdistill.dispatch.FallbackWarning`
    naming the reason; under ``fastdistill.use_backend("reference")`` they run the reference.
    The fused path computes the softmax in fp32 for every input dtype.

    ``unet.set_default_attn_processor()`` works on models using this processor (it is registered
    with diffusers' ``CROSS_ATTENTION_PROCESSORS`` on first use) and, as on a stock model, installs
    the legacy ``AttnProcessor``; :func:`disable_fused_attention` restores the processors
    :func:`enable_fused_attention` replaced.
    """

    def __init__(self, recorder: Optional[Recorder] = None, *, use_attn_scale: bool = False) -> None:
        if recorder is not None and not callable(recorder):
            raise TypeError(f"FusedAttnProcessor: recorder must be callable or None, got {type(recorder).__name__}")
        if not isinstance(use_attn_scale, bool):
            raise TypeError(f"FusedAttnProcessor: use_attn_scale must be a bool, got {type(use_attn_scale).__name__}")
        self.recorder = recorder
        self.use_attn_scale = use_attn_scale
        register_with_diffusers()

    def __repr__(self) -> str:
        return f"FusedAttnProcessor(recorder={self.recorder!r}, use_attn_scale={self.use_attn_scale})"

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

        scale = float(attn.scale) if self.use_attn_scale else None  # None: 1/sqrt(head_dim), as SDPA
        reason = triton_fallback_reason(query, attention_mask)
        if reason is not None:
            _warn_sdpa_once(reason)
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False, scale=scale)
        else:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                # SDPA's convention (True keeps) as an additive mask; an all-False row gives 0.
                attention_mask = torch.zeros(attention_mask.shape, dtype=torch.float32,
                                             device=attention_mask.device).masked_fill(~attention_mask,
                                                                                       float("-inf"))
            hidden_states = fused_attention(query, key, value, scale=scale, attn_mask=attention_mask)

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


def fused_processor_for(stock: object, recorder: Optional[Recorder] = None) -> FusedAttnProcessor:
    """The :class:`FusedAttnProcessor` that computes what ``stock`` computes: ``use_attn_scale=True``
    for the legacy ``AttnProcessor`` (it multiplies by ``attn.scale``), the default (SDPA's
    ``1/sqrt(head_dim)``) for ``AttnProcessor2_0``; a FusedAttnProcessor keeps its scale rule."""
    from diffusers.models.attention_processor import AttnProcessor

    if isinstance(stock, FusedAttnProcessor):
        use = stock.use_attn_scale
    else:
        use = type(stock) is AttnProcessor
    return FusedAttnProcessor(recorder=recorder, use_attn_scale=use)


_REGISTERED = False


def register_with_diffusers() -> bool:
    """Add :class:`FusedAttnProcessor` to diffusers' ``CROSS_ATTENTION_PROCESSORS``, so that
    ``set_default_attn_processor()`` of UNets, VAEs, ControlNets, ... accepts models using it (they
    test ``proc.__class__ in CROSS_ATTENTION_PROCESSORS``; a subclass of ``AttnProcessor2_0`` would
    not pass that test). The tuple is replaced in ``diffusers.models.attention_processor`` (modules
    imported later pick up the new one) and in every loaded diffusers module that imported it.
    Idempotent; called by ``FusedAttnProcessor()``. Returns False when diffusers is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from diffusers.models import attention_processor as ap
    except ImportError:
        return False
    old = ap.CROSS_ATTENTION_PROCESSORS
    if FusedAttnProcessor not in old:
        new = tuple(old) + (FusedAttnProcessor,)
        for mod in list(sys.modules.values()):
            # __dict__, not getattr: diffusers' lazy modules import submodules on attribute access.
            namespace = getattr(mod, "__dict__", None)
            if (isinstance(namespace, dict) and str(namespace.get("__name__", "")).startswith("diffusers")
                    and namespace.get("CROSS_ATTENTION_PROCESSORS") is old):
                namespace["CROSS_ATTENTION_PROCESSORS"] = new
    _REGISTERED = True
    return True


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

    Without ``processor``, each module gets the fused processor computing what it computed before
    (:func:`fused_processor_for`: ``AttnProcessor2_0`` -> scale ``1/sqrt(head_dim)``, legacy
    ``AttnProcessor`` -> ``attn.scale``); a given ``processor`` is installed on every module as is.

    Afterwards diffusers' ``model.set_default_attn_processor()`` works as on a stock model (it
    installs the legacy ``AttnProcessor`` everywhere); to get back exactly the processors the model
    had, call :func:`disable_fused_attention` instead.
    """
    if processor is not None and not isinstance(processor, FusedAttnProcessor):
        raise TypeError(f"enable_fused_attention: processor must be a FusedAttnProcessor or None, got "
                        f"{type(processor).__name__}")
    register_with_diffusers()
    todo: dict[str, Any] = {}
    shared: dict[bool, FusedAttnProcessor] = {}
    for path, m in attention_modules(model).items():
        if not _replaceable(m.processor):
            continue
        if not isinstance(m.processor, FusedAttnProcessor):
            object.__setattr__(m, _PREV, m.processor)
        if processor is not None:
            todo[path] = processor
        elif isinstance(m.processor, FusedAttnProcessor):
            todo[path] = m.processor
        else:
            want = fused_processor_for(m.processor)
            todo[path] = shared.setdefault(want.use_attn_scale, want)
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
