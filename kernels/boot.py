"""BOOT bootstrapping loss: forward and backward Triton kernels plus thin launchers.

Per sample b (delta_b = 1 - sigma_s alpha_t / (alpha_s sigma_t)), all in fp32::

    f      = f_u + w (f_c - f_u)                       (CFG combine, when f_u is given)
    f_x    = convert(f)  to x space:  eps: (x_t - sigma_t f)/alpha_t,  v: alpha_t x_t - sigma_t f
    target = y_t + delta (f_x - y_t)                   (the teacher's DDIM step in signal space)
    loss   = (1 / (B D)) sum_b  w_b / delta_b^2  sum_d (y_s - target)^2

The conversion to x space divides by alpha_t, which is small near t = T (SD: 0.068): doing it in
fp32 inside the kernel avoids both the precision loss of bf16 arithmetic and the temporaries.

Forward: one program per (D-chunk, sample) writes the partial sum of squares; one small program
reduces the (B, n_chunks) partials with the per-sample weights (deterministic, no atomics).
Backward: d loss / d y_s = g * 2 w_b (y_s - target) / (delta_b^2 B D), target recomputed (nothing
full-size is saved). No validation or dispatch here: call :func:`fastdistill.boot_loss`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc

from .diffusion_steps import BLOCK, FINISH_BLOCK_B, FINISH_BLOCK_C, NUM_WARPS, _row_sums, n_chunks


@triton.jit
def _delta(at_ptr, st_ptr, as_ptr, ss_ptr, b):
    alpha_t = tl.load(at_ptr + b)
    sigma_t = tl.load(st_ptr + b)
    alpha_s = tl.load(as_ptr + b)
    sigma_s = tl.load(ss_ptr + b)
    return alpha_t, sigma_t, 1.0 - (sigma_s * alpha_t) / (alpha_s * sigma_t)


@triton.jit
def _boot_diff(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, b, offs, mask,
               PRED: tl.constexpr, HAS_UNCOND: tl.constexpr):
    """(y_s - target) for one block of one sample, and that sample's delta."""
    alpha_t, sigma_t, delta = _delta(at_ptr, st_ptr, as_ptr, ss_ptr, b)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        w = tl.load(gs_ptr + b)
        fu = tl.load(fu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f = fu + w * (f - fu)
    if PRED == 0:  # epsilon
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        fx = (xt - sigma_t * f) / alpha_t
    elif PRED == 1:  # sample
        fx = f
    else:  # v_prediction
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        fx = alpha_t * xt - sigma_t * f
    ys = tl.load(ys_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    yt = tl.load(yt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    target = yt + delta * (fx - yt)
    return tl.where(mask, ys - target, 0.0), delta


@triton.jit
def _boot_partial_kernel(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr,
                         part_ptr, D, NCHUNK, PRED: tl.constexpr, HAS_UNCOND: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b.to(tl.int64) * D + cols
    d, _ = _boot_diff(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, b, offs,
                      mask, PRED, HAS_UNCOND)
    tl.store(part_ptr + b.to(tl.int64) * NCHUNK + pid_d, tl.sum(d * d, axis=0))


@triton.jit
def _boot_finish_kernel(part_ptr, w_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, loss_ptr, B, NCHUNK, inv_n,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < B
        sq = _row_sums(part_ptr, rb, mb, NCHUNK, BLOCK_B, BLOCK_C)
        alpha_t = tl.load(at_ptr + rb, mask=mb, other=1.0)
        sigma_t = tl.load(st_ptr + rb, mask=mb, other=1.0)
        alpha_s = tl.load(as_ptr + rb, mask=mb, other=1.0)
        sigma_s = tl.load(ss_ptr + rb, mask=mb, other=0.0)
        delta = 1.0 - (sigma_s * alpha_t) / (alpha_s * sigma_t)
        w = tl.load(w_ptr + rb, mask=mb, other=0.0)
        total += tl.where(mb, w / (delta * delta) * sq, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * inv_n)


@triton.jit
def _boot_bwd_kernel(go_ptr, ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, w_ptr,
                     gys_ptr, D, two_inv_n, PRED: tl.constexpr, HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b.to(tl.int64) * D + cols
    d, delta = _boot_diff(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, b, offs,
                          mask, PRED, HAS_UNCOND)
    scale = tl.load(go_ptr).to(tl.float32) * two_inv_n * tl.load(w_ptr + b) / (delta * delta)
    tl.store(gys_ptr + offs, (d * scale).to(gys_ptr.dtype.element_ty), mask=mask)


def boot_loss_fwd(ys: torch.Tensor, yt: torch.Tensor, f: torch.Tensor, fu: torch.Tensor | None,
                  xt: torch.Tensor | None, gs: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor,
                  ss: torch.Tensor, w: torch.Tensor, pred: int) -> torch.Tensor:
    """All full-size tensors (B, D) contiguous; coefficients (B,) fp32. Returns the fp32 0-d loss."""
    B, D = ys.shape
    nc = n_chunks(D)
    part = _alloc.empty((B, nc), dtype=torch.float32, device=ys.device)
    loss = _alloc.empty((), dtype=torch.float32, device=ys.device)
    _boot_partial_kernel[(nc, B)](ys, yt, f, fu if fu is not None else f, xt if xt is not None else f, gs,
                                  at, st, as_, ss, part, D, nc, PRED=pred, HAS_UNCOND=fu is not None,
                                  BLOCK=BLOCK, num_warps=NUM_WARPS)
    _boot_finish_kernel[(1,)](part, w, at, st, as_, ss, loss, B, nc, 1.0 / (B * D), BLOCK_B=FINISH_BLOCK_B,
                              BLOCK_C=FINISH_BLOCK_C, num_warps=4)
    return loss


def boot_loss_bwd(go: torch.Tensor, ys: torch.Tensor, yt: torch.Tensor, f: torch.Tensor, fu: torch.Tensor | None,
                  xt: torch.Tensor | None, gs: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor,
                  ss: torch.Tensor, w: torch.Tensor, pred: int) -> torch.Tensor:
    B, D = ys.shape
    gys = _alloc.empty((B, D), dtype=ys.dtype, device=ys.device)
    _boot_bwd_kernel[(n_chunks(D), B)](go, ys, yt, f, fu if fu is not None else f, xt if xt is not None else f, gs,
                                       at, st, as_, ss, w, gys, D, 2.0 / (B * D), PRED=pred,
                                       HAS_UNCOND=fu is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gys
