"""Relational Diffusion Distillation (RDD, Feng et al., arXiv 2410.07679) losses on feature maps.

* :func:`fused_rdd_loss`: the intra-sample pixel-to-pixel term (official ``Intra_sample_p2p_loss``;
  despite the name it is cross-sample: all ordered sample pairs, softmax over the key sample's pixels).
* :func:`memory_p2p_loss`: the memory term (official ``Memory_p2p_loss`` loss part) against bank rows,
  read through an index inside the kernel (no copy of the contrast set).
* :func:`rcfd_loss`: RCFD's classifier-logit KL as RDD's ``diffusion.py`` computes it.

The relational terms run on the shared relational-KL core (:mod:`fastdistill.ops.relational_kl`), so
the ``(B*P) x (B*P)`` and ``(B*P) x M`` similarity matrices are never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._validation import check_choice, check_positive, check_same_device, check_tensor
from ..distributed import gather_rows
from ._common import autocast_op, value_checks_enabled
from .relational_kl import l2_normalize, relational_kl_core

dispatch.register_op("fused_rdd_loss", ["triton"])
dispatch.register_op("memory_p2p_loss", ["triton"])
# Row-wise softmax KL on (B, K) logits: a few elementwise kernels that torch.compile fuses; no fast backend.
dispatch.register_op("rcfd_loss", [])


def _check_maps(op: str, student: object, teacher: object, *, same_channels: bool = False) -> None:
    check_tensor(op, "student", student, ndim=4)
    check_tensor(op, "teacher", teacher, ndim=4)
    check_same_device(op, student=student, teacher=teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{op}: student and teacher must have the same batch size B; got {student.shape[0]} "
                         f"and {teacher.shape[0]}")
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"{op}: student and teacher must have the same spatial size (H, W); got "
                         f"{tuple(student.shape[2:])} and {tuple(teacher.shape[2:])}")
    if same_channels and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{op}: student and teacher must have the same channel count C (project the student "
                         f"first); got {student.shape[1]} and {teacher.shape[1]}")
    if student.numel() == 0 or teacher.numel() == 0:
        raise ValueError(f"{op}: empty feature maps: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")


_EPS = 1e-12


# Triton custom ops of the fused pixel normalisation (bodies call the kernels/relational_kl.py launchers;
# the reference is plain PyTorch in :func:`pixels`, outside any custom op).

@torch.library.custom_op("fastdistill::pixel_normalize_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _pixnorm_fwd_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastdistill.kernels import relational_kl as K

    return K.pixel_normalize_fwd(x, _EPS)


@_pixnorm_fwd_op.register_fake
def _pixnorm_fwd_fake(x):
    B, C, H, W = x.shape
    return x.new_empty((B * H * W, C)), x.new_empty((B * H * W,), dtype=torch.float32)


@torch.library.custom_op("fastdistill::pixel_normalize_triton_bwd", mutates_args=(),
                         device_types=("cpu", "cuda"))
def _pixnorm_bwd_op(dy: torch.Tensor, y: torch.Tensor, rn: torch.Tensor, shape: list[int],
                    channels_last: bool) -> torch.Tensor:
    from fastdistill.kernels import relational_kl as K

    return K.pixel_normalize_bwd(dy, y, rn, shape, channels_last)


@_pixnorm_bwd_op.register_fake
def _pixnorm_bwd_fake(dy, y, rn, shape, channels_last):
    B, C, H, W = shape
    if channels_last:
        return y.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return y.new_empty((B, C, H, W))


def _pixnorm_setup(ctx, inputs, output):
    (x,) = inputs
    y, rn = output
    ctx.save_for_backward(y, rn)
    ctx.shape = list(x.shape)
    ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def _pixnorm_backward(ctx, dy, _drn):
    y, rn = ctx.saved_tensors
    return _pixnorm_bwd_op(dy, y, rn, ctx.shape, ctx.channels_last)


_pixnorm_fwd_op.register_autograd(_pixnorm_backward, setup_context=_pixnorm_setup)


def pixels(x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """(B, C, H, W) -> L2-normalised pixel rows (B*H*W, C), channels contiguous, in x's dtype.

    ``triton``: one fused kernel each way (any input strides). ``reference``: plain PyTorch (a permute
    copy, then the norm in fp32), differentiated by autograd. Both divide by ``max(||x||, 1e-12)``."""
    if backend == "triton":
        return _pixnorm_fwd_op(x)[0]
    B, C = x.shape[:2]
    return l2_normalize(x.permute(0, 2, 3, 1).reshape(B * x.shape[2] * x.shape[3], C))


@autocast_op("lower", "student", "teacher")
def fused_rdd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
                   pairs: str = "all", process_group=None) -> torch.Tensor:
    """RDD's pixel-to-pixel relational KL (official ``Intra_sample_p2p_loss`` without its ``factor``).

    Both maps are L2-normalised per pixel over channels. For every ordered sample pair ``(b, d)``
    (including ``b = d``) and query pixel ``i`` of ``b``:
    ``KL(softmax_j(<t_bi, t_dj> / tau) || softmax_j(<s_bi, s_dj> / tau))`` over the ``P = H*W`` pixels
    ``j`` of ``d``; the loss is the sum divided by ``B*B*P`` (``kl_div(..., "batchmean")`` over the
    ``B*B*P`` rows of the official einsum).

    Args:
        student: student features ``(B, C_s, H, W)`` (fp32/fp16/bf16, any layout). Receives the gradient
            (as query and as key).
        teacher: teacher features ``(B, C_t, H, W)``; ``C_t`` may differ from ``C_s``. No gradient.
        temperature: ``tau`` (> 0), the official ``temperature``.
        pairs: ``"all"`` (official; every ``(b, d)``) or ``"intra"`` (only ``b = d``, the official
            ``IntraImageMiniBatch``: sum / ``(B*P)``).
        process_group: ``None`` (default, as the official code): the pairs of this rank's batch only, no
            collective. ``fastdistill.distributed.WORLD`` (``"world"``) or a ProcessGroup: the maps are
            all-gathered over ranks (autograd-aware) and the global-batch loss (all pairs across ranks) is
            returned on every rank; every rank must call. See docs/distributed.md.

    Returns:
        fp32 scalar. Under ``torch.autocast`` both maps are cast to the autocast dtype first (as ``matmul``
        casts its operands; see :mod:`fastdistill.ops._common`).
    """
    op = "fused_rdd_loss"
    _check_maps(op, student, teacher)
    check_positive(op, "temperature", temperature)
    check_choice(op, "pairs", pairs, ("all", "intra"))
    student, teacher = gather_rows([student, teacher.detach()], process_group)
    backend = dispatch.select_backend(op, student, teacher)
    B, _, H, W = student.shape
    P = H * W
    s, t = pixels(student, backend), pixels(teacher, backend)
    scale = 1.0 / float(temperature)
    if pairs == "all":
        s4, t4 = s.view(1, 1, B * P, -1), t.view(1, 1, B * P, -1)
    else:
        s4, t4 = s.view(B, 1, P, -1), t.view(B, 1, P, -1)
    kl = relational_kl_core(s4, s4, t4, t4, scale_s=scale, scale_t=scale, segment_size=P, backend=backend,
                            unit_rows=True)  # pixels() rows have norm 1 (or 0)
    return kl.mean()


@autocast_op("lower", "student", "teacher", "bank")
def memory_p2p_loss(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, *,
                    index: torch.Tensor | None = None, temperature: float = 0.1, kd_temperature: float = 1.0,
                    check_index: bool | None = None, process_group=None) -> torch.Tensor:
    """RDD's memory pixel-to-pixel term (official ``Memory_p2p_loss`` after projection and enqueue).

    Student and teacher maps are L2-normalised per pixel; each pixel ``(b, i)`` is compared with the
    contrast rows ``r_m`` (``bank[index]``, or all of ``bank``):
    ``u_X = <x_bi, r_m> / temperature``, and the loss is
    ``kd_temperature**2 * sum_{b,i} KL(softmax_m(u_T / kd_temperature) || softmax_m(u_S / kd_temperature)) / (B*P)``
    (official: ``kl_div(..., "batchmean") * tau_kd**2 / P``).

    Args:
        student: projected student features ``(B, C, H, W)``. Receives the gradient.
        teacher: teacher features ``(B, C, H, W)``. No gradient.
        bank: memory rows ``(M, C)`` (already L2-normalised, as the official queue). No gradient; read
            in place.
        index: optional integer ``(K,)`` rows of ``bank`` forming the contrast set (official: 4096
            evenly spaced rows); read through the index inside the kernel, never copied. Values must lie
            in ``[0, M)``.
        temperature: ``contrast_temperature`` (> 0).
        kd_temperature: ``contrast_kd_temperature`` (> 0).
        check_index: verify that the index values lie in ``[0, M)`` (ValueError otherwise). ``None``
            (default): on for CPU tensors, off for CUDA tensors, where the check costs a host sync;
            ``True`` opts in there (so does ``FASTDISTILL_VALUE_CHECKS=1``, see
            :func:`fastdistill.ops._common.value_checks_enabled`), ``False`` skips it. An
            out-of-range index unchecked reads outside the bank.
        process_group: ``None`` (default, as the official code): the mean over this rank's pixels.
            ``fastdistill.distributed.WORLD`` or a ProcessGroup: student and teacher maps are all-gathered
            (autograd-aware) and the mean over the global batch's pixels is returned on every rank. The
            rows are independent (each pixel against the shared bank), so under DDP's gradient average both
            give the same gradient with equal per-rank batches; the group changes the value each rank
            reports and costs a gather. Every rank must call.

    Returns:
        fp32 scalar (without the official ``factor``). Under ``torch.autocast`` the maps and the bank are
        cast to the autocast dtype first (as ``matmul`` casts; see :mod:`fastdistill.ops._common`).
    """
    op = "memory_p2p_loss"
    _check_maps(op, student, teacher, same_channels=True)
    check_tensor(op, "bank", bank, ndim=2)
    check_same_device(op, student=student, teacher=teacher, bank=bank, index=index)
    if bank.shape[1] != student.shape[1]:
        raise ValueError(f"{op}: bank rows must have the features' channel count {student.shape[1]}; got bank "
                         f"{tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError(f"{op}: bank is empty")
    check_positive(op, "temperature", temperature)
    check_positive(op, "kd_temperature", kd_temperature)
    if index is not None:
        check_tensor(op, "index", index, ndim=1, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
        if index.numel() == 0:
            raise ValueError(f"{op}: index is empty")
        if value_checks_enabled(index.device, check_index):  # off on CUDA by default: a host sync
            lo, hi = torch.stack([index.min(), index.max()]).tolist()
            if lo < 0 or hi >= bank.shape[0]:
                raise ValueError(f"{op}: index values must lie in [0, {bank.shape[0]}); got range [{lo}, {hi}]")
        index = index.to(torch.int64).contiguous()
    student, teacher = gather_rows([student, teacher.detach()], process_group)
    backend = dispatch.select_backend(op, student, teacher, bank)
    s, t = pixels(student, backend), pixels(teacher, backend)
    bank4 = bank.detach().unsqueeze(0).unsqueeze(0)
    scale = 1.0 / (float(temperature) * float(kd_temperature))
    kl = relational_kl_core(s.unsqueeze(0).unsqueeze(0), bank4, t.unsqueeze(0).unsqueeze(0), bank4,
                            scale_s=scale, scale_t=scale, segment_size=index.shape[0] if index is not None
                            else bank.shape[0], backend=backend, k_index=index)
    return kl.mean() * float(kd_temperature) ** 2


@autocast_op("fp32", "student_logits", "teacher_logits")
def rcfd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 0.9
              ) -> torch.Tensor:
    """RCFD term as RDD's ``diffusion.py`` computes it: ``KL(softmax(z_T / tau) || softmax(z_S))``,
    batchmean (only the teacher is divided by ``tau``).

    Args:
        student_logits: ``(B, K)`` classifier features of the student sample. Receives the gradient.
        teacher_logits: ``(B, K)`` of the teacher target. No gradient.
        temperature: ``tau`` (> 0), RDD's ``--temperature`` (0.9 for DenseNet201).

    Returns:
        fp32 scalar. Computed in fp32 with plain PyTorch (a row softmax: memory-bound, fused by
        torch.compile); the ``reference`` backend is its only one.
    """
    op = "rcfd_loss"
    check_tensor(op, "student_logits", student_logits, ndim=2)
    check_tensor(op, "teacher_logits", teacher_logits, ndim=2)
    check_same_device(op, student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{op}: student_logits and teacher_logits must have the same shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.numel() == 0:
        raise ValueError(f"{op}: empty logits {tuple(student_logits.shape)}")
    check_positive(op, "temperature", temperature)
    dispatch.select_backend(op, student_logits, teacher_logits)
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_p_s = F.log_softmax(student_logits.to(dt), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dt) / float(temperature), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() / student_logits.shape[0]
