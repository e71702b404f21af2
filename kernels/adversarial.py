"""Adv-KD (WGAN-GP style) pieces: interpolation with in-kernel random mixing, the gradient-norm
penalty with a fused first-order backward, and the softplus (logistic) GAN losses.

* ``gan_interp``: ``x_hat[b] = alpha_b real[b] + (1 - alpha_b) fake[b]``. ``alpha_b`` is drawn in the
  kernel (Philox, ``tl.rand(seed, b)``: every program of sample b draws the same value, so no
  per-sample tensor has to be generated and copied first; b is int64, whose Philox counter equals the
  int32 one for b < 2^32); the D-chunk 0 program of each sample
  stores it for the backward (``g_real = alpha g``, ``g_fake = (1 - alpha) g``).
* ``gp_penalty``: ``weight * mean_b (||g_b||_2 - 1)^2`` over the flattened per-sample gradient g.
  Two-pass deterministic reduction (partials, then one small program that also keeps the norms).
  Backward: ``dL/dg_b = grad * weight * 2 (||g_b|| - 1) g_b / (||g_b|| B)``, 0 where ``||g_b|| = 0``
  (as torch's norm backward). This first-order backward is all that is needed: autograd then carries
  dL/dg through the ``create_graph`` graph of the discriminator (the double backward).
* ``adversarial_losses``: ``L_D = mean softplus(-real) + mean softplus(fake)``,
  ``L_G = mean softplus(-fake)`` in one launch; logits are tiny, so one program loops over them.

All arithmetic in fp32. No validation or dispatch here: call :func:`fastdistill.gradient_penalty`
and :func:`fastdistill.adversarial_losses`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc

from ._common import (FINISH_BLOCK_B, FINISH_BLOCK_C, launch_grid, launch_rows, n_chunks, row_program, row_sums,
                      to_dtype)

LOSS_BLOCK = 1024


@triton.jit
def _interp_fwd_kernel(r_ptr, f_ptr, out_ptr, alpha_in_ptr, alpha_out_ptr, seed, D, pid0, NCHUNK,
                       USE_RNG: tl.constexpr, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    if USE_RNG:
        a = tl.rand(seed, b)  # uniform in [0, 1), same for every program of sample b
    else:
        a = tl.load(alpha_in_ptr + b).to(tl.float32)
    if pid_d == 0:
        tl.store(alpha_out_ptr + b, a)  # the mixing weights used, kept for the backward
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = a * r + (1.0 - a) * f
    tl.store(out_ptr + offs, to_dtype(x, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interp_bwd_kernel(g_ptr, alpha_ptr, gr_ptr, gf_ptr, D, pid0, NCHUNK, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    a = tl.load(alpha_ptr + b).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gr_ptr + offs, to_dtype(a * g, gr_ptr.dtype.element_ty), mask=mask)
    tl.store(gf_ptr + offs, to_dtype((1.0 - a) * g, gf_ptr.dtype.element_ty), mask=mask)


def interp_fwd(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None, seed: int,
               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """real, fake (B, D) contiguous. ``alpha`` (B,) fp32, or None to draw it from ``seed``."""
    B, D = real.shape
    out = _alloc.empty((B, D), dtype=out_dtype, device=real.device)
    alpha_out = _alloc.empty((B,), dtype=torch.float32, device=real.device)
    launch_rows(_interp_fwd_kernel, B, D, real, fake, out, alpha if alpha is not None else alpha_out, alpha_out,
                seed, D, USE_RNG=alpha is None)
    return out, alpha_out


def interp_bwd(g: torch.Tensor, alpha: torch.Tensor, r_dtype: torch.dtype, f_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = g.shape
    gr = _alloc.empty((B, D), dtype=r_dtype, device=g.device)
    gf = _alloc.empty((B, D), dtype=f_dtype, device=g.device)
    launch_rows(_interp_bwd_kernel, B, D, g, alpha, gr, gf, D)
    return gr, gf


@triton.jit
def _sumsq_partial_kernel(g_ptr, part_ptr, D, pid0, NCHUNK, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    g = tl.load(g_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + b * NCHUNK + pid_d, tl.sum(g * g, axis=0))


@triton.jit
def _gp_finish_kernel(part_ptr, norm_ptr, loss_ptr, B, NCHUNK, scale, BLOCK_B: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < B
        n = tl.sqrt_rn(row_sums(part_ptr, rb, mb, NCHUNK, BLOCK_B, BLOCK_C))
        tl.store(norm_ptr + rb, n, mask=mb)
        total += tl.where(mb, (n - 1.0) * (n - 1.0), 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * scale)


@triton.jit
def _gp_bwd_kernel(go_ptr, g_ptr, norm_ptr, out_ptr, D, scale, pid0, NCHUNK, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    n = tl.load(norm_ptr + b)
    # scale = 2 * weight / B; a zero norm has a zero subgradient (torch's norm backward does the same).
    c = tl.where(n > 0, tl.load(go_ptr).to(tl.float32) * scale * (n - 1.0) / tl.where(n > 0, n, 1.0), 0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_dtype(c * g, out_ptr.dtype.element_ty), mask=mask)


def gp_fwd(g: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g (B, D) contiguous. Returns (fp32 0-d weighted penalty, fp32 (B,) norms)."""
    B, D = g.shape
    nc = n_chunks(D)
    part = _alloc.empty((B, nc), dtype=torch.float32, device=g.device)
    norms = _alloc.empty((B,), dtype=torch.float32, device=g.device)
    loss = _alloc.empty((), dtype=torch.float32, device=g.device)
    launch_rows(_sumsq_partial_kernel, B, D, g, part, D)
    _gp_finish_kernel[launch_grid("_gp_finish_kernel", 1)](part, norms, loss, B, nc, weight / B, BLOCK_B=FINISH_BLOCK_B,
                                                           BLOCK_C=FINISH_BLOCK_C, num_warps=4)
    return loss, norms


def gp_bwd(go: torch.Tensor, g: torch.Tensor, norms: torch.Tensor, weight: float) -> torch.Tensor:
    B, D = g.shape
    out = _alloc.empty((B, D), dtype=g.dtype, device=g.device)
    launch_rows(_gp_bwd_kernel, B, D, go, g, norms, out, D, 2.0 * weight / B)
    return out


@triton.jit
def _softplus(x):
    """log(1 + e^x) without overflow, and with log1p accuracy for large |x|."""
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    # log1p(u) = log(v) * u / (v - 1) corrects the rounding of 1 + u (exact u when v rounds to 1).
    l1p = tl.where(v == 1.0, u, tl.log(v) * u / tl.where(v == 1.0, 1.0, v - 1.0))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _sigmoid(x):
    """1/(1 + e^-x) from e^-|x| (never overflows, exact tails)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _adv_fwd_kernel(r_ptr, f_ptr, out_ptr, NR, NF, HAS_REAL: tl.constexpr, BLOCK: tl.constexpr):
    acc_r = tl.zeros([BLOCK], tl.float32)
    if HAS_REAL:
        for i in range(0, NR, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            m = idx < NR
            r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
            acc_r += tl.where(m, _softplus(-r), 0.0)
    acc_fd = tl.zeros([BLOCK], tl.float32)
    acc_fg = tl.zeros([BLOCK], tl.float32)
    for i in range(0, NF, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < NF
        f = tl.load(f_ptr + idx, mask=m, other=0.0).to(tl.float32)
        acc_fd += tl.where(m, _softplus(f), 0.0)
        acc_fg += tl.where(m, _softplus(-f), 0.0)
    d_loss = tl.sum(acc_fd, axis=0) / NF
    if HAS_REAL:
        d_loss += tl.sum(acc_r, axis=0) / NR
    tl.store(out_ptr, d_loss)
    tl.store(out_ptr + 1, tl.sum(acc_fg, axis=0) / NF)


@triton.jit
def _adv_bwd_kernel(gout_ptr, r_ptr, f_ptr, gr_ptr, gf_ptr, NR, NF, HAS_REAL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    gd = tl.load(gout_ptr).to(tl.float32)
    gg = tl.load(gout_ptr + 1).to(tl.float32)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    if HAS_REAL:
        m = idx < NR
        r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
        # d softplus(-r)/dr = -sigmoid(-r)
        tl.store(gr_ptr + idx, to_dtype(-gd / NR * _sigmoid(-r), gr_ptr.dtype.element_ty), mask=m)
    m = idx < NF
    f = tl.load(f_ptr + idx, mask=m, other=0.0).to(tl.float32)
    gf = (gd * _sigmoid(f) - gg * _sigmoid(-f)) / NF
    tl.store(gf_ptr + idx, to_dtype(gf, gf_ptr.dtype.element_ty), mask=m)


def adv_fwd(real: torch.Tensor | None, fake: torch.Tensor) -> torch.Tensor:
    """Flat contiguous logits. Returns fp32 (2,) = [discriminator loss, generator loss]."""
    out = _alloc.empty((2,), dtype=torch.float32, device=fake.device)
    nr = real.numel() if real is not None else 1
    _adv_fwd_kernel[launch_grid("_adv_fwd_kernel", 1)](real if real is not None else fake, fake, out, nr, fake.numel(),
                          HAS_REAL=real is not None, BLOCK=LOSS_BLOCK, num_warps=4)
    return out


def adv_bwd(gout: torch.Tensor, real: torch.Tensor | None, fake: torch.Tensor
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    nr = real.numel() if real is not None else 0
    gr = _alloc.empty(real.shape, dtype=real.dtype, device=real.device) if real is not None else None
    gf = _alloc.empty(fake.shape, dtype=fake.dtype, device=fake.device)
    grid = launch_grid("_adv_bwd_kernel", triton.cdiv(max(nr, fake.numel()), LOSS_BLOCK))
    _adv_bwd_kernel[grid](gout, real if real is not None else fake, fake, gr if gr is not None else gf, gf,
                          max(nr, 1), fake.numel(), HAS_REAL=real is not None, BLOCK=LOSS_BLOCK, num_warps=4)
    return gr, gf
