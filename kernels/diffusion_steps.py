"""Per-sample diffusion arithmetic: vectorised DDIM step, progressive-distillation target and the
truncated-SNR PD loss. Forward and backward Triton kernels plus thin launchers.

Layout: every tensor is viewed as (B, D) contiguous (D = prod of the non-batch dims). Elementwise
kernels run one program per (D-chunk, sample), folded into grid axis 0 (``_common.launch_rows``: any
batch size, no 65,535 limit); each program reads its sample's coefficients once (scalar loads), so
there are no broadcast temporaries. Sample indices and offsets are int64 (B*D may pass 2^31).

Precision: inputs of any float dtype are loaded and converted to fp32; every coefficient and
every conversion (notably x = (x_t - sigma*eps)/alpha, where alpha is small near t = T) is done in
fp32, and the result is rounded once to the output dtype.

Reductions (pd_loss) are two-pass and deterministic: one program per (D-chunk, sample) writes a
partial sum, then one small program reduces the (B, n_chunks) partials to the scalar (no atomics).

No validation or dispatch here: call the public ops in :mod:`fastdistill.ops.diffusion_steps`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc

from ._common import (FINISH_BLOCK_B, FINISH_BLOCK_C, launch_grid, launch_rows, n_chunks, row_program, row_sums,
                      to_dtype)

# prediction types are passed as the constexpr PRED: 0 epsilon, 1 sample, 2 v_prediction


# ----------------------------------------------------------------------------------------------
# DDIM step with per-sample timesteps (eta = 0), equal to diffusers' DDIMScheduler.step.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ddim_coefs(ac_ptr, t_ptr, p_ptr, b, final_ac):
    """sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), sqrt(1 - abar_prev) in fp32.

    A negative previous timestep means "past the end of the schedule" (diffusers' final_alpha_cumprod).
    """
    t = tl.load(t_ptr + b)
    p = tl.load(p_ptr + b)
    a_t = tl.load(ac_ptr + t).to(tl.float32)
    a_p = tl.load(ac_ptr + tl.maximum(p, 0)).to(tl.float32)
    a_p = tl.where(p >= 0, a_p, final_ac)
    return tl.sqrt_rn(a_t), tl.sqrt_rn(1.0 - a_t), tl.sqrt_rn(a_p), tl.sqrt_rn(1.0 - a_p)


@triton.jit
def _ddim_fwd_kernel(x_ptr, m_ptr, prev_ptr, x0_ptr, ac_ptr, t_ptr, p_ptr, final_ac, D, pid0, NCHUNK,
                     PRED: tl.constexpr, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha, sigma, alpha_p, sigma_p = _ddim_coefs(ac_ptr, t_ptr, p_ptr, b, final_ac)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Same formulas (and order) as diffusers' DDIMScheduler.step, with eta = 0.
    if PRED == 0:  # epsilon
        x0 = (x - sigma * m) / alpha
        eps = m
    elif PRED == 1:  # sample
        x0 = m
        eps = (x - alpha * x0) / sigma
    else:  # v_prediction
        x0 = alpha * x - sigma * m
        eps = alpha * m + sigma * x
    prev = alpha_p * x0 + sigma_p * eps
    tl.store(prev_ptr + offs, to_dtype(prev, prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, to_dtype(x0, x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ddim_bwd_kernel(gprev_ptr, gx0_ptr, gx_ptr, gm_ptr, ac_ptr, t_ptr, p_ptr, final_ac, D, pid0, NCHUNK,
                     PRED: tl.constexpr, HAS_GPREV: tl.constexpr, HAS_GX0: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha, sigma, alpha_p, sigma_p = _ddim_coefs(ac_ptr, t_ptr, p_ptr, b, final_ac)
    # Adjoint of prev = alpha_p*x0 + sigma_p*eps: total cotangents of x0 and eps.
    g_x0 = tl.zeros([BLOCK], tl.float32)
    g_eps = tl.zeros([BLOCK], tl.float32)
    if HAS_GPREV:
        gp = tl.load(gprev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_x0 += alpha_p * gp
        g_eps += sigma_p * gp
    if HAS_GX0:
        g_x0 += tl.load(gx0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:  # x0 = (x - sigma*m)/alpha, eps = m
        gx = g_x0 / alpha
        gm = g_eps - (sigma / alpha) * g_x0
    elif PRED == 1:  # x0 = m, eps = (x - alpha*m)/sigma
        gx = g_eps / sigma
        gm = g_x0 - (alpha / sigma) * g_eps
    else:  # x0 = alpha*x - sigma*m, eps = alpha*m + sigma*x
        gx = alpha * g_x0 + sigma * g_eps
        gm = alpha * g_eps - sigma * g_x0
    tl.store(gx_ptr + offs, to_dtype(gx, gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gm_ptr + offs, to_dtype(gm, gm_ptr.dtype.element_ty), mask=mask)


def ddim_step_fwd(x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, p: torch.Tensor, ac: torch.Tensor,
                  final_ac: float, pred: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x, m: (B, D) contiguous; t, p: (B,) int64; ac: (T,) fp32. Returns (prev, x0) in out_dtype."""
    B, D = x.shape
    prev = _alloc.empty((B, D), dtype=out_dtype, device=x.device)
    x0 = _alloc.empty((B, D), dtype=out_dtype, device=x.device)
    if B * D:
        launch_rows(_ddim_fwd_kernel, B, D, x, m, prev, x0, ac, t, p, float(final_ac), D, PRED=pred)
    return prev, x0


def ddim_step_bwd(g_prev: torch.Tensor | None, g_x0: torch.Tensor | None, t: torch.Tensor, p: torch.Tensor,
                  ac: torch.Tensor, final_ac: float, pred: int, shape: tuple[int, int],
                  x_dtype: torch.dtype, m_dtype: torch.dtype, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = shape
    gx = _alloc.empty((B, D), dtype=x_dtype, device=device)
    gm = _alloc.empty((B, D), dtype=m_dtype, device=device)
    if B * D:
        dummy = gx  # never read when the matching HAS_* flag is off
        launch_rows(_ddim_bwd_kernel, B, D,
                    g_prev if g_prev is not None else dummy, g_x0 if g_x0 is not None else dummy, gx, gm,
                    ac, t, p, float(final_ac), D, PRED=pred, HAS_GPREV=g_prev is not None,
                    HAS_GX0=g_x0 is not None)
    return gx, gm


# ----------------------------------------------------------------------------------------------
# Progressive-distillation target (x~, eps~) from the teacher's two-step result.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pd_target_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b):
    alpha_t = tl.load(at_ptr + b)
    sigma_t = tl.load(st_ptr + b)
    alpha_s = tl.load(as_ptr + b)
    sigma_s = tl.load(ss_ptr + b)
    frac = sigma_s / sigma_t
    den = alpha_s - frac * alpha_t
    return alpha_t, sigma_t, frac, den


@triton.jit
def _pd_target_fwd_kernel(zt_ptr, zs_ptr, xo_ptr, eo_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, D, pid0, NCHUNK,
                          BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha_t, sigma_t, frac, den = _pd_target_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b)
    zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zs = tl.load(zs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Official order (RDD diffusion.py): x~ = (z_s - frac z_t)/(alpha_s - frac alpha_t).
    x = (zs - frac * zt) / den
    e = (zt - alpha_t * x) / sigma_t
    tl.store(xo_ptr + offs, to_dtype(x, xo_ptr.dtype.element_ty), mask=mask)
    tl.store(eo_ptr + offs, to_dtype(e, eo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pd_target_bwd_kernel(gx_ptr, ge_ptr, gzt_ptr, gzs_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, D, pid0, NCHUNK,
                          HAS_GX: tl.constexpr, HAS_GE: tl.constexpr, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha_t, sigma_t, frac, den = _pd_target_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b)
    gx = tl.zeros([BLOCK], tl.float32)
    ge = tl.zeros([BLOCK], tl.float32)
    if HAS_GX:
        gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GE:
        ge = tl.load(ge_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # eps~ = (z_t - alpha_t x~)/sigma_t: fold its cotangent into x~'s, then x~'s into z_s and z_t.
    gx_tot = gx - (alpha_t / sigma_t) * ge
    gzs = gx_tot / den
    gzt = ge / sigma_t - (frac / den) * gx_tot
    tl.store(gzt_ptr + offs, to_dtype(gzt, gzt_ptr.dtype.element_ty), mask=mask)
    tl.store(gzs_ptr + offs, to_dtype(gzs, gzs_ptr.dtype.element_ty), mask=mask)


def pd_target_fwd(zt: torch.Tensor, zs: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor,
                  ss: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = zt.shape
    x = _alloc.empty((B, D), dtype=out_dtype, device=zt.device)
    e = _alloc.empty((B, D), dtype=out_dtype, device=zt.device)
    if B * D:
        launch_rows(_pd_target_fwd_kernel, B, D, zt, zs, x, e, at, st, as_, ss, D)
    return x, e


def pd_target_bwd(gx: torch.Tensor | None, ge: torch.Tensor | None, at: torch.Tensor, st: torch.Tensor,
                  as_: torch.Tensor, ss: torch.Tensor, shape: tuple[int, int], zt_dtype: torch.dtype,
                  zs_dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = shape
    gzt = _alloc.empty((B, D), dtype=zt_dtype, device=device)
    gzs = _alloc.empty((B, D), dtype=zs_dtype, device=device)
    if B * D:
        dummy = gzt
        launch_rows(_pd_target_bwd_kernel, B, D,
                    gx if gx is not None else dummy, ge if ge is not None else dummy, gzt, gzs, at, st, as_, ss, D,
                    HAS_GX=gx is not None, HAS_GE=ge is not None)
    return gzt, gzs


# ----------------------------------------------------------------------------------------------
# PD loss: mean_b max(MSE_b(x_S, x~), MSE_b(eps_S, eps~)), eps_S = (z_t - alpha_t x_S)/sigma_t.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pd_loss_partial_kernel(xs_ptr, xt_ptr, et_ptr, zt_ptr, a_ptr, s_ptr, px_ptr, pe_ptr, D, pid0,
                            NCHUNK, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha = tl.load(a_ptr + b)
    sigma = tl.load(s_ptr + b)
    xs = tl.load(xs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    et = tl.load(et_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = xs - xt
    de = (zt - alpha * xs) / sigma - et
    dx = tl.where(mask, dx, 0.0)
    de = tl.where(mask, de, 0.0)
    tl.store(px_ptr + b * NCHUNK + pid_d, tl.sum(dx * dx, axis=0))
    tl.store(pe_ptr + b * NCHUNK + pid_d, tl.sum(de * de, axis=0))


@triton.jit
def _pd_loss_finish_kernel(px_ptr, pe_ptr, loss_ptr, sel_ptr, B, NCHUNK, inv_d, inv_b,
                           BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < B
        mse_x = row_sums(px_ptr, rb, mb, NCHUNK, BLOCK_B, BLOCK_C) * inv_d
        mse_e = row_sums(pe_ptr, rb, mb, NCHUNK, BLOCK_B, BLOCK_C) * inv_d
        # sel = 1 where the eps branch is the max (ties go to the x branch).
        sel = mse_e > mse_x
        tl.store(sel_ptr + rb, sel.to(tl.float32), mask=mb)
        total += tl.where(mb, tl.maximum(mse_x, mse_e), 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * inv_b)


@triton.jit
def _pd_loss_bwd_kernel(go_ptr, xs_ptr, xt_ptr, et_ptr, zt_ptr, a_ptr, s_ptr, sel_ptr, gxs_ptr, D, scale,
                        pid0, NCHUNK, BLOCK: tl.constexpr):
    pid_d, b = row_program(pid0, NCHUNK)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    offs = b * D + cols
    alpha = tl.load(a_ptr + b)
    sigma = tl.load(s_ptr + b)
    use_eps = tl.load(sel_ptr + b) > 0.5
    go = tl.load(go_ptr).to(tl.float32) * scale  # scale = 2 / (B D)
    xs = tl.load(xs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if use_eps:
        et = tl.load(et_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # d/dx_S of (eps_S - eps~)^2 with eps_S = (z_t - alpha x_S)/sigma: chain factor -alpha/sigma.
        g = ((zt - alpha * xs) / sigma - et) * (-alpha / sigma)
    else:
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = xs - xt
    tl.store(gxs_ptr + offs, to_dtype(g * go, gxs_ptr.dtype.element_ty), mask=mask)


def pd_loss_fwd(xs: torch.Tensor, xt: torch.Tensor, et: torch.Tensor, zt: torch.Tensor, a: torch.Tensor,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the fp32 scalar loss and the per-sample branch selector (B,) fp32 (1 = eps branch)."""
    B, D = xs.shape
    nc = n_chunks(D)
    px = _alloc.empty((B, nc), dtype=torch.float32, device=xs.device)
    pe = _alloc.empty((B, nc), dtype=torch.float32, device=xs.device)
    loss = _alloc.empty((), dtype=torch.float32, device=xs.device)
    sel = _alloc.empty((B,), dtype=torch.float32, device=xs.device)
    launch_rows(_pd_loss_partial_kernel, B, D, xs, xt, et, zt, a, s, px, pe, D)
    _pd_loss_finish_kernel[launch_grid("_pd_loss_finish_kernel", 1)](
        px, pe, loss, sel, B, nc, 1.0 / D, 1.0 / B, BLOCK_B=FINISH_BLOCK_B, BLOCK_C=FINISH_BLOCK_C, num_warps=4)
    return loss, sel


def pd_loss_bwd(go: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, et: torch.Tensor, zt: torch.Tensor,
                a: torch.Tensor, s: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    B, D = xs.shape
    gxs = _alloc.empty((B, D), dtype=xs.dtype, device=xs.device)
    launch_rows(_pd_loss_bwd_kernel, B, D, go, xs, xt, et, zt, a, s, sel, gxs, D, 2.0 / (B * D))
    return gxs
