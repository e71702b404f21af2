"""BOOT bootstrapping loss: forward and backward Triton kernels plus thin launchers.

Per sample b (delta_b = 1 - sigma_s alpha_t / (alpha_s sigma_t)), all in fp32::

    f      = f_u + w (f_c - f_u)                       (CFG combine, when f_u is given)
    f_x    = convert(f)  to x space:  eps: (x_t - sigma_t f)/alpha_t,  v: alpha_t x_t - sigma_t f
    target = y_t + delta (f_x - y_t)                   (the teacher's DDIM step in signal space)
    loss   = (1 / (B D)) sum_b  w_b / delta_b^2  sum_d (y_s - target)^2

The conversion to x space divides by alpha_t, which is small near t = T (SD: 0.068): doing it in
fp32 inside the kernel avoids both the precision loss of bf16 arithmetic and the temporaries.

Forward: one program per (D-chunk, sample) (folded into grid axis 0: any batch size) writes the
partial sum of squares; one small program reduces the (B, n_chunks) partials with the per-sample
weights (deterministic, no atomics).
The gradient d loss / d y_s = 2 w_b (y_s - target) / (delta_b^2 B D) needs no reduction result, so
when y_s requires grad the forward writes it too (one extra write instead of re-reading five inputs);
the backward only multiplies it by the upstream gradient. No validation or dispatch here: call :func:`fastdistill.boot_loss`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc

from ._common import (FINISH_BLOCK_B, FINISH_BLOCK_C, ROW_BLOCK, ROW_NUM_WARPS, launch_grid, launch_rows, n_chunks,
                      row_program, row_sums, to_dtype)


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
def _boot_partial_kernel(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, w_ptr,
                         part_ptr, grad_ptr, D, two_inv_n, pid0, NCHUNK, PRED: tl.constexpr,
                         HAS_UNCOND: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    d, delta = _boot_diff(ys_ptr, yt_ptr, f_ptr, fu_ptr, xt_ptr, gs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, b, offs,
                          mask, PRED, HAS_UNCOND)
    tl.store(part_ptr + b * NCHUNK + pid_d, tl.sum(d * d, axis=0))
    if WRITE_GRAD:
        # d loss / d y_s needs no reduction result: write it now, while the inputs are in registers,
        # instead of re-reading all five inputs in the backward (8 N instead of 11 N bytes in all).
        scale = two_inv_n * tl.load(w_ptr + b) / (delta * delta)
        tl.store(grad_ptr + offs, to_dtype(d * scale, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _boot_finish_kernel(part_ptr, w_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, loss_ptr, B, NCHUNK, inv_n,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < B
        sq = row_sums(part_ptr, rb, mb, NCHUNK, BLOCK_B, BLOCK_C)
        alpha_t = tl.load(at_ptr + rb, mask=mb, other=1.0)
        sigma_t = tl.load(st_ptr + rb, mask=mb, other=1.0)
        alpha_s = tl.load(as_ptr + rb, mask=mb, other=1.0)
        sigma_s = tl.load(ss_ptr + rb, mask=mb, other=0.0)
        delta = 1.0 - (sigma_s * alpha_t) / (alpha_s * sigma_t)
        w = tl.load(w_ptr + rb, mask=mb, other=0.0)
        total += tl.where(mb, w / (delta * delta) * sq, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * inv_n)


@triton.jit
def _scale_kernel(go_ptr, g_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """Backward: the gradient written by the forward times the upstream scalar gradient."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_dtype(g * tl.load(go_ptr).to(tl.float32), out_ptr.dtype.element_ty), mask=mask)


def boot_loss_fwd(ys: torch.Tensor, yt: torch.Tensor, f: torch.Tensor, fu: torch.Tensor | None,
                  xt: torch.Tensor | None, gs: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor,
                  ss: torch.Tensor, w: torch.Tensor, pred: int, need_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """All full-size tensors (B, D) contiguous; coefficients (B,) fp32.

    Returns the fp32 0-d loss and, when ``need_grad``, d loss / d y_s for an upstream gradient of 1
    (in y_s's dtype; an empty tensor otherwise).
    """
    B, D = ys.shape
    nc = n_chunks(D)
    part = _alloc.empty((B, nc), dtype=torch.float32, device=ys.device)
    loss = _alloc.empty((), dtype=torch.float32, device=ys.device)
    grad = _alloc.empty((B, D) if need_grad else (0,), dtype=ys.dtype, device=ys.device)
    launch_rows(_boot_partial_kernel, B, D, ys, yt, f, fu if fu is not None else f, xt if xt is not None else f,
                gs, at, st, as_, ss, w, part, grad if need_grad else part, D, 2.0 / (B * D),
                PRED=pred, HAS_UNCOND=fu is not None, WRITE_GRAD=need_grad)
    _boot_finish_kernel[launch_grid("_boot_finish_kernel", 1)](
        part, w, at, st, as_, ss, loss, B, nc, 1.0 / (B * D), BLOCK_B=FINISH_BLOCK_B, BLOCK_C=FINISH_BLOCK_C,
        num_warps=4)
    return loss, grad


def scale_grad(go: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad * go`` (go a 0-d tensor), computed in fp32."""
    out = _alloc.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    n = grad.numel()
    if n:
        _scale_kernel[launch_grid("boot._scale_kernel", triton.cdiv(n, ROW_BLOCK))](go, grad, out, n, BLOCK=ROW_BLOCK,
                                                                                  num_warps=ROW_NUM_WARPS)
    return out
