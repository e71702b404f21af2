"""Reading a prediction tensor out of what a diffusers-style model returns."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def model_output(out: Any, owner: str) -> Tensor:
    """Model outputs as a tensor: diffusers' ``UNet2DOutput`` (``.sample``), a tuple/list (its first
    element), or a tensor. ``owner`` names the caller in the ``TypeError`` raised for anything else."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"{owner}: model returned {type(out).__name__}; expected a tensor, a tuple or "
                    f"an object with .sample")
