"""fastdistill: fused GPU kernels for distilling diffusion models.

Ops pick a backend per call (Triton, the compiled CUDA/C++ extension, or the plain-PyTorch
reference); see :mod:`fastdistill.dispatch`. ``fastdistill info`` reports what this install has.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # loads fastdistill._C, which defines torch.ops.fastdistill
from ._extension import ExtensionMismatchWarning
from .dispatch import BackendUnavailableError, FallbackWarning, use_backend

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "ExtensionMismatchWarning",
    "FallbackWarning",
    "use_backend",
]

# Public ops, one block per op module (each block: the import, then ``__all__ +=``).
# --- relational (RDD, attention KL) ---
from .ops.relational_kl import relational_kl  # noqa: E402
from .ops.rdd import fused_rdd_loss, memory_p2p_loss, rcfd_loss  # noqa: E402
from .ops.attention_kl import attention_kl  # noqa: E402

__all__ += ["relational_kl", "fused_rdd_loss", "memory_p2p_loss", "rcfd_loss", "attention_kl"]
# --- moment matching ---
from .ops.moment_matching import (auxiliary_denoiser_loss, moment_matching_loss, moment_statistics,  # noqa: E402
                                  posterior_sample)
from .ops.multi_tensor import clip_parameters_, moment_dot, preconditioned_perturb_  # noqa: E402

__all__ += ["posterior_sample", "moment_matching_loss", "auxiliary_denoiser_loss", "moment_statistics",
            "moment_dot", "preconditioned_perturb_", "clip_parameters_"]
# --- routing (O2MKD) ---
from .ops.routing import (Routing, segment_gather, segment_mse, segment_route, segment_scatter,  # noqa: E402
                          stratified_timesteps)

__all__ += ["Routing", "segment_route", "segment_gather", "segment_scatter", "segment_mse", "stratified_timesteps"]
# --- attention ---
from .ops.attention import fused_attention  # noqa: E402

__all__ += ["fused_attention"]
# --- diffusion steps, BOOT, Adv-KD ---
from .ops.adversarial import adversarial_losses, compute_gradient_penalty, gradient_penalty  # noqa: E402
from .ops.boot import boot_loss  # noqa: E402
from .ops.diffusion_steps import ddim_step, pd_loss, progressive_distillation_target  # noqa: E402

__all__ += ["ddim_step", "progressive_distillation_target", "pd_loss", "boot_loss", "gradient_penalty",
            "compute_gradient_penalty", "adversarial_losses"]
# --- distributed ---
from . import distributed  # noqa: E402
__all__ += ["distributed"]

# Drop-in modules (``fastdistill.nn.MultiStudent`` works after ``import fastdistill``).
from . import nn  # noqa: E402

__all__ += ["nn"]
