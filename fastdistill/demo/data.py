"""The demo's embedded data set: scikit-learn's 8x8 handwritten digits (shipped inside the
scikit-learn package, so no download), upsampled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, size, size) float32 in [-1, 1], and their labels (N,)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise RuntimeError("the demo needs scikit-learn for its embedded data set: "
                           "pip install 'fastdistill[demo]'") from exc
    digits = _load()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(digits.target).long()
