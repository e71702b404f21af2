"""fastdistill: fused GPU kernels for distilling diffusion models.

Ops pick a backend per call (Triton, the compiled CUDA/C++ extension, or the plain-PyTorch
reference); see :mod:`fastdistill.dispatch`. ``fastdistill info`` reports what this install has.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # loads fastdistill._C, which defines torch.ops.fastdistill
from .dispatch import BackendUnavailableError, FallbackWarning, use_backend

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "FallbackWarning",
    "use_backend",
]

# Public ops, one block per op module (each block: the import, then ``__all__ +=``).
# --- relational (RDD, attention KL) ---
# --- moment matching ---
# --- routing (O2MKD) ---
# --- attention ---
from .ops.attention import fused_attention  # noqa: E402

__all__ += ["fused_attention"]
# --- diffusion steps, BOOT, Adv-KD ---
# --- distributed ---
from . import distributed  # noqa: E402
__all__ += ["distributed"]
