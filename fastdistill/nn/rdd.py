"""Drop-in modules for Relational Diffusion Distillation (official code: cantbebetter2/RDD,
``losses/losses.py`` and ``diffusion.py``), running on fastdistill's fused relational-KL kernels.

Constructor arguments, forward inputs, buffer and parameter names match the official classes, so an
official checkpoint of ``Memory_p2p_loss`` loads into :class:`MemoryP2PLoss` with ``load_state_dict``.
Differences: no hard ``.cuda()`` calls (CPU works), no teacher gradient, the losses come back in fp32,
and every cross-rank collective is optional. Defaults follow the official code under DDP: the relational
losses are per rank (``process_group=None``), while :class:`MemoryP2PLoss` keeps its official collectives
(``sync_group=WORLD``: the queue's all-gather of teacher pixels and the head's SyncBatchNorm); all are local
when torch.distributed is not initialised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import WORLD, gather_rows
from ..ops._common import host_to_device
from ..ops.rdd import fused_rdd_loss, memory_p2p_loss, rcfd_loss

__all__ = ["IntraSampleP2PLoss", "MemoryP2PLoss", "RCFDLoss", "RDDLoss"]


class IntraSampleP2PLoss(nn.Module):
    """Official ``Intra_sample_p2p_loss``: ``factor * fused_rdd_loss(feat_S, feat_T, temperature)``.

    Args:
        temperature: similarity temperature ``tau`` (official: 1.0).
        pooling: accepted and stored for signature compatibility; the official class never uses it.
        factor: loss weight (official: 1.0).
        pairs: ``"all"`` (official: every ordered sample pair) or ``"intra"`` (``b = d`` only).
        process_group: ``None`` (default, as the official class): the loss over this rank's batch, no
            collective. ``fastdistill.distributed.WORLD`` or a ProcessGroup: the loss over the global batch
            (see :func:`fastdistill.fused_rdd_loss` and docs/distributed.md).

    Forward: ``(feat_S (B, C_s, H, W), feat_T (B, C_t, H, W), type="fast") -> fp32 scalar``
    (``type`` is ignored, as officially).
    """

    def __init__(self, temperature: float = 1.0, pooling: bool = False, factor: float = 1.0, *,
                 pairs: str = "all", process_group=None) -> None:
        super().__init__()
        self.temperature = temperature
        self.pooling = pooling
        self.factor = factor
        self.pairs = pairs
        self.process_group = process_group

    def forward(self, feat_S: torch.Tensor, feat_T: torch.Tensor, type: str = "fast") -> torch.Tensor:  # noqa: A002
        """The pixel-to-pixel relational loss times ``factor`` (``type``: the official signature's)."""
        return fused_rdd_loss(feat_S, feat_T, temperature=self.temperature, pairs=self.pairs,
                              process_group=self.process_group) * self.factor


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with cross-rank statistics, like ``nn.SyncBatchNorm`` (same parameters and buffers, so
    official checkpoints load), but on any device: in training with an active process group the batch
    moments are merged over ranks with :func:`fastdistill.distributed.all_reduce_moments` (autograd-aware,
    Chan's merge). ``nn.SyncBatchNorm`` itself has no CPU kernel and DDP refuses it in a CPU model (gloo);
    without a group (``process_group=None``, or no initialised torch.distributed) this is plain ``BatchNorm``."""

    def __init__(self, num_features: int, *args: Any, process_group: Any = WORLD, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """Batch norm; in training with an active group, over the statistics of all ranks."""
        from ..distributed import all_reduce_moments, resolve_group

        group = resolve_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        count = torch.full((), float(input.numel() // input.shape[1]), device=input.device)  # a fill: no H2D copy
        mean = x.mean(dims)
        m2 = (x - mean.view(shape)).square().sum(dims)
        total, mean, m2 = all_reduce_moments(count, mean, m2, group)
        var = m2 / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (self.momentum if self.momentum is not None
                            else 1.0 / float(self.num_batches_tracked))
                # Unbiased variance for the running estimate, as (Sync)BatchNorm keeps it.
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((m2 / (total - 1).clamp(min=1)).detach().to(self.running_var.dtype),
                                       momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


class MemoryP2PLoss(nn.Module):
    """Official ``Memory_p2p_loss``: projection head on the student, a FIFO queue of teacher pixel
    embeddings, and the memory pixel-to-pixel KL against a fixed evenly spaced contrast subset.

    Each forward: normalise the teacher map, project and normalise the student map, enqueue ``K =
    min(B_glob * P, 128)`` random teacher pixels (gathered over ``sync_group``, all ranks by default; CPU ``torch.randperm`` as
    officially, so queues stay identical across equally seeded ranks), then return
    ``factor * memory_p2p_loss(student, teacher, queue, index=sampled_indices)``. The contrast rows
    are read from the queue through the index inside the kernel (no 31 MB copy per step).

    Args:
        pixel_memory_size: queue rows (official 20000).
        region_memory_size, region_contrast_size: accepted for signature compatibility (unused officially).
        pixel_contrast_size: contrast rows, ``round(linspace(0, size - 1, n))`` (official 4096).
        contrast_kd_temperature: ``tau_kd`` (official 1.0); the loss is multiplied by ``tau_kd**2``.
        contrast_temperature: ``tau_c`` (official 0.1).
        s_channels, t_channels: projection head ``s_channels -> t_channels``; queue width ``t_channels``.
        factor: loss weight (official 0.1).
        queue_layout: ``"official"`` stores the columns of ``keys.contiguous().view(C, -1)`` of the NCHW
            teacher batch, bit for bit as the official code (that view reinterprets memory, so a stored
            "pixel" mixes channels and samples of several pixels); ``"pixel"`` stores true per-pixel
            channel vectors (``keys.permute(1, 0, 2, 3).reshape(C, -1)``). Loss math is identical.
        process_group: group of the loss (:func:`fastdistill.memory_p2p_loss`): ``None`` (default, as the
            official class) averages over this rank's pixels; ``WORLD`` or a ProcessGroup over the global
            batch's pixels.
        sync_group: group of the official class's own collectives: the all-gather of teacher pixels for
            the enqueue (official ``concat_all_gather``) and the projection head's batch statistics
            (official ``nn.SyncBatchNorm``). ``WORLD`` (default, as officially: all ranks when
            torch.distributed is initialised, so every rank must call the forward) or a ProcessGroup;
            ``None``: local queue update and local batch statistics, no collective at all.

    State dict: ``project_head.{0,1,3}.*``, ``teacher_pixel_queue`` (M, t_channels) and
    ``pixel_queue_ptr`` (1,), as officially. ``project_head.1`` is a batch norm with cross-rank statistics
    (SyncBatchNorm's parameters and buffers; it works on CPU/gloo too).
    """

    def __init__(self, pixel_memory_size: int = 20000, region_memory_size: int = 2000,
                 region_contrast_size: int = 1024, pixel_contrast_size: int = 4096,
                 contrast_kd_temperature: float = 1.0, contrast_temperature: float = 0.1,
                 s_channels: int = 1920, t_channels: int = 1920, factor: float = 0.1, *,
                 queue_layout: str = "official", process_group=None, sync_group=WORLD) -> None:
        super().__init__()
        if queue_layout not in ("official", "pixel"):
            raise ValueError(f"MemoryP2PLoss: queue_layout must be 'official' or 'pixel', got {queue_layout!r}")
        for name, v in (("pixel_memory_size", pixel_memory_size), ("pixel_contrast_size", pixel_contrast_size),
                        ("s_channels", s_channels), ("t_channels", t_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MemoryP2PLoss: {name} must be a positive int, got {v!r}")
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.dim = t_channels
        # Same construction order as the official class, so a seeded build draws the same weights and queue.
        self.project_head = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            _SyncBatchNorm(t_channels, process_group=sync_group),
            nn.ReLU(True),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
        )
        self.pixel_memory_size = pixel_memory_size
        self.pixel_update_freq = 128
        self.pixel_contrast_size = pixel_contrast_size
        self.factor = factor
        self.queue_layout = queue_layout
        self.process_group = process_group
        self.sync_group = sync_group
        self.register_buffer("teacher_pixel_queue",
                             F.normalize(torch.randn(pixel_memory_size, t_channels), p=2, dim=1))
        self.register_buffer("pixel_queue_ptr", torch.zeros(1, dtype=torch.long))
        idx = torch.round(torch.linspace(0, pixel_memory_size - 1, pixel_contrast_size)).long()
        # Not in the state dict (the official attribute is a plain tensor), but follows .to(device).
        self.register_buffer("sampled_indices", idx, persistent=False)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Official ``_dequeue_and_enqueue`` without host syncs: the ring write uses tensor ops."""
        queue = self.teacher_pixel_queue
        keys = gather_rows([keys], self.sync_group)[0]  # official concat_all_gather (over sync_group)
        _, C, _, _ = keys.shape
        if self.queue_layout == "official":
            this_feat = keys.contiguous().view(C, -1)
        else:
            this_feat = keys.permute(1, 0, 2, 3).reshape(C, -1)
        num_pixel = this_feat.shape[1]
        perm = torch.randperm(num_pixel)  # CPU default generator, as officially
        K = min(num_pixel, self.pixel_update_freq, self.pixel_memory_size)
        feat = this_feat[:, host_to_device(perm[:K], this_feat.device)].transpose(0, 1)  # no host sync
        feat = F.normalize(feat, p=2, dim=1).to(queue.dtype)
        ptr = self.pixel_queue_ptr
        wrap = ptr + K >= self.pixel_memory_size
        start = torch.where(wrap, torch.full_like(ptr, self.pixel_memory_size - K), ptr)
        pos = start + torch.arange(K, device=ptr.device)
        queue.index_copy_(0, pos.to(queue.device), feat)
        ptr.copy_(torch.where(wrap, torch.zeros_like(ptr), (ptr + K) % self.pixel_memory_size))

    def forward(self, s_feats: torch.Tensor, t_feats: torch.Tensor) -> torch.Tensor:
        """``(s_feats (B, s_channels, H, W), t_feats (B, t_channels, H, W)) -> fp32 scalar``; updates the queue."""
        if t_feats.dim() != 4 or t_feats.shape[1] != self.dim:
            raise ValueError(f"MemoryP2PLoss: t_feats must be (B, {self.dim}, H, W); got {tuple(t_feats.shape)}")
        s_proj = self.project_head(s_feats)
        t_norm = F.normalize(t_feats.detach(), p=2, dim=1)
        self._dequeue_and_enqueue(t_norm.clone())
        loss = memory_p2p_loss(s_proj, t_norm, self.teacher_pixel_queue, index=self.sampled_indices,
                               temperature=self.contrast_temperature,
                               kd_temperature=self.contrast_kd_temperature, check_index=False,
                               process_group=self.process_group)
        return loss * self.factor


class RCFDLoss(nn.Module):
    """RCFD term of RDD (``diffusion.py``): ``KL(softmax(z_T / temperature) || softmax(z_S))``, batchmean.

    Forward: ``(student_logits (B, K), teacher_logits (B, K)) -> fp32 scalar``.
    """

    def __init__(self, temperature: float = 0.9) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``rcfd_loss(student_logits, teacher_logits, temperature)``."""
        return rcfd_loss(student_logits, teacher_logits, temperature=self.temperature)


class RDDLoss(nn.Module):
    """RDD's full feature objective as the official README command trains it:
    ``rcfd_weight * RCFD + is_weight * IS_P2P + memory_weight * M_P2P``.

    The official run (``--feature --loss_type mp2p --temperature 0.9``) corresponds to the defaults:
    RCFD at tau 0.9, IS_P2P with tau 1.0 and factor 1.0, M_P2P with factor 0.1.

    Args:
        s_channels, t_channels: feature channels of the student and teacher maps (memory projection head).
        rcfd_temperature: RCFD teacher temperature.
        is_temperature, is_factor, pairs: :class:`IntraSampleP2PLoss` arguments.
        memory: include the memory term (needs ``s_channels -> t_channels`` projection and a queue).
        pixel_memory_size, pixel_contrast_size, contrast_kd_temperature, contrast_temperature,
        memory_factor, queue_layout: :class:`MemoryP2PLoss` arguments (``memory_factor`` is its ``factor``).
        rcfd_weight, is_weight, memory_weight: extra weights on the three terms (default 1).
        process_group: the loss group of both relational terms (``None`` default: per rank, as officially;
            ``WORLD`` or a ProcessGroup: the global-batch objective).
        sync_group: :class:`MemoryP2PLoss`'s ``sync_group`` (default ``WORLD``: the official queue gather
            and SyncBatchNorm statistics over all ranks; ``None``: no collective at all).

    Forward: ``(student_features, teacher_features, student_logits=None, teacher_logits=None,
    return_terms=False)``; the RCFD term is added when both logits are given. With
    ``return_terms=True`` returns ``(total, {"rcfd": ..., "is_p2p": ..., "memory_p2p": ...})``.
    """

    def __init__(self, s_channels: int = 1920, t_channels: int = 1920, *, rcfd_temperature: float = 0.9,
                 is_temperature: float = 1.0, is_factor: float = 1.0, pairs: str = "all", memory: bool = True,
                 pixel_memory_size: int = 20000, pixel_contrast_size: int = 4096,
                 contrast_kd_temperature: float = 1.0, contrast_temperature: float = 0.1,
                 memory_factor: float = 0.1, queue_layout: str = "official", rcfd_weight: float = 1.0,
                 is_weight: float = 1.0, memory_weight: float = 1.0, process_group=None,
                 sync_group=WORLD) -> None:
        super().__init__()
        self.rcfd = RCFDLoss(rcfd_temperature)
        self.is_p2p = IntraSampleP2PLoss(is_temperature, factor=is_factor, pairs=pairs, process_group=process_group)
        self.memory_p2p = MemoryP2PLoss(pixel_memory_size=pixel_memory_size, pixel_contrast_size=pixel_contrast_size,
                                        contrast_kd_temperature=contrast_kd_temperature,
                                        contrast_temperature=contrast_temperature, s_channels=s_channels,
                                        t_channels=t_channels, factor=memory_factor, queue_layout=queue_layout,
                                        process_group=process_group, sync_group=sync_group) if memory else None
        self.rcfd_weight, self.is_weight, self.memory_weight = rcfd_weight, is_weight, memory_weight

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                student_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                return_terms: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the RCFD (when logits are given), intra-sample and memory terms; with
        ``return_terms``, also each weighted term by name."""
        terms: dict[str, torch.Tensor] = {}
        if (student_logits is None) != (teacher_logits is None):
            raise ValueError("RDDLoss: pass both student_logits and teacher_logits, or neither")
        if student_logits is not None:
            terms["rcfd"] = self.rcfd(student_logits, teacher_logits) * self.rcfd_weight
        terms["is_p2p"] = self.is_p2p(student_features, teacher_features) * self.is_weight
        if self.memory_p2p is not None:
            terms["memory_p2p"] = self.memory_p2p(student_features, teacher_features) * self.memory_weight
        total = sum(terms.values())
        return (total, terms) if return_terms else total
