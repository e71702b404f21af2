"""Moment Matching (Salimans et al. 2024) per-sample ops: Triton kernels and thin launchers.

Every tensor is viewed as (B, D) rows (contiguous); per-sample scalars are fp32 (B,) tensors.
Programs are laid out as (D-chunk, sample), folded into grid axis 0 (``_common.launch_rows``: any batch
size), so each loads its sample's scalars once. Arithmetic is fp32
(fp64 for fp64 inputs); offsets are int64.

* posterior sample (ancestral / DDIM), noise from Philox (``tl.randn(seed, b * D + d)``), and its
  pass-through backward (``dz_s/dx = c_x``, ``dz_s/dz_t = c_z``);
* the student surrogate ``mean(w x_s (x_aux - x_teacher))`` (CFG combine fused) and the auxiliary
  denoiser loss ``mean(w (x_s - x_aux)^2) + gamma mean(w (x_t - x_aux)^2)``: one pass writes the
  per-block partial sums and, when asked, the gradient (deterministic: no atomics);
* moment statistics: per (kept index, reduction chunk) count/mean/M2 with an in-register two-pass
  over each tile merged by Chan's formula (never E[x^2] - E[x]^2), and the elementwise backward.

No validation or dispatch here: call the public ops in :mod:`fastdistill.ops.moment_matching`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc

from ._common import ROW_BLOCK, launch_grid, launch_rows, n_chunks, row_program, to_dtype

BLOCK = ROW_BLOCK
NUM_WARPS = 4  # this file's kernels carry fp64 variants: half the warps of the fp32-only row kernels
STATS_BLOCK = 1024


# ----------------------------------------------------------------------------- posterior sample

@triton.jit
def _posterior_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b, MODE: tl.constexpr, ACC: tl.constexpr):
    """(c_z, c_x, std) of z_s = c_z z_t + c_x x + std * noise for sample b (fp32; fp64 for fp64 inputs)."""
    alpha_t = tl.load(at_ptr + b).to(ACC)
    sigma_t = tl.load(st_ptr + b).to(ACC)
    alpha_s = tl.load(as_ptr + b).to(ACC)
    sigma_s = tl.load(ss_ptr + b).to(ACC)
    if MODE == 0:  # ancestral: the Gaussian posterior q(z_s | z_t, x)
        a_ts = alpha_t / alpha_s
        var_t = sigma_t * sigma_t
        var_s = sigma_s * sigma_s
        var_ts = tl.maximum(var_t - a_ts * a_ts * var_s, 0.0)
        c_z = a_ts * var_s / var_t
        c_x = alpha_s * var_ts / var_t
        std = tl.sqrt(var_s * var_ts / var_t)
    else:  # DDIM: z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t
        c_z = sigma_s / sigma_t
        c_x = alpha_s - alpha_t * c_z
        std = c_z * 0.0
    return c_z, c_x, std


@triton.jit
def _posterior_fwd_kernel(z_ptr, x_ptr, out_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, D, seed, pid0, NCHUNK,
                          MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, b = row_program(pid0, NCHUNK)
    d = pid * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    offs = b * D + d
    c_z, c_x, std = _posterior_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b, MODE, ACC)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = c_z * z + c_x * x
    if MODE == 0:
        out += std * tl.randn(seed, offs).to(ACC)
    tl.store(out_ptr + offs, to_dtype(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _posterior_bwd_kernel(g_ptr, gx_ptr, gz_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, D, pid0, NCHUNK,
                          MODE: tl.constexpr, NEED_X: tl.constexpr, NEED_Z: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid, b = row_program(pid0, NCHUNK)
    d = pid * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    offs = b * D + d
    c_z, c_x, std = _posterior_coefs(at_ptr, st_ptr, as_ptr, ss_ptr, b, MODE, ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NEED_X:
        tl.store(gx_ptr + offs, to_dtype(c_x * g, gx_ptr.dtype.element_ty), mask=mask)
    if NEED_Z:
        tl.store(gz_ptr + offs, to_dtype(c_z * g, gz_ptr.dtype.element_ty), mask=mask)


def posterior_fwd(z: torch.Tensor, x: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor,
                  ss: torch.Tensor, seed: int, mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    B = z.shape[0]
    D = z.numel() // max(B, 1)
    out = _alloc.empty(z.shape, dtype=out_dtype, device=z.device)
    if z.numel() == 0:
        return out
    wide = torch.float64 in (z.dtype, x.dtype)
    launch_rows(_posterior_fwd_kernel, B, D, z, x, out, at, st, as_, ss, D, seed, block=BLOCK, num_warps=NUM_WARPS,
                MODE=mode, ACC=tl.float64 if wide else tl.float32)
    return out


def posterior_bwd(g: torch.Tensor, at: torch.Tensor, st: torch.Tensor, as_: torch.Tensor, ss: torch.Tensor,
                  mode: int, x_dtype: torch.dtype | None, z_dtype: torch.dtype | None):
    B = g.shape[0]
    D = g.numel() // max(B, 1)
    gx = _alloc.empty(g.shape, dtype=x_dtype, device=g.device) if x_dtype is not None else None
    gz = _alloc.empty(g.shape, dtype=z_dtype, device=g.device) if z_dtype is not None else None
    if g.numel() == 0 or (gx is None and gz is None):
        return gx, gz
    launch_rows(_posterior_bwd_kernel, B, D, g, gx if gx is not None else g, gz if gz is not None else g,
                at, st, as_, ss, D, block=BLOCK, num_warps=NUM_WARPS, MODE=mode, NEED_X=gx is not None,
                NEED_Z=gz is not None, ACC=tl.float64 if g.dtype == torch.float64 else tl.float32)
    return gx, gz


# ----------------------------------------------------------------------------- the two MM losses

@triton.jit
def _mm_loss_kernel(p_ptr, a_ptr, t_ptr, u_ptr, w_ptr, g_ptr, grad_ptr, partial_ptr, D, gamma, grad_scale,
                    pid0, NCHUNK, MODE: tl.constexpr, HAS_UNCOND: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0 (student surrogate; p = x_student, a = x_aux, t = teacher):
           elem = w p (a - t'),  t' = u + g (t - u) with CFG;  grad = w (a - t') * grad_scale
       MODE 1 (auxiliary denoiser; p = x_aux, a = x_student, t = teacher):
           elem = w ((a - p)^2 + gamma (t - p)^2);  grad = 2 w ((p - a) + gamma (p - t)) * grad_scale"""
    pid, b = row_program(pid0, NCHUNK)
    d = pid * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    offs = b * D + d
    w = tl.load(w_ptr + b).to(ACC)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MODE == 0:
        if HAS_UNCOND:
            guidance = tl.load(g_ptr + b).to(ACC)
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
            t = u + guidance * (t - u)
        diff = a - t
        elem = w * p * diff
        g = w * diff
    else:
        da = p - a
        dt = p - t
        elem = w * (da * da + gamma * (dt * dt))
        g = 2.0 * w * (da + gamma * dt)
    elem = tl.where(mask, elem, 0.0)
    tl.store(partial_ptr + b * NCHUNK + pid, tl.sum(elem, axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, to_dtype(g * grad_scale, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, go_ptr, out_ptr, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out = src * go (go read from device memory: no host sync for the upstream gradient)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    go = tl.load(go_ptr).to(ACC)
    x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, to_dtype(x * go, out_ptr.dtype.element_ty), mask=mask)


def mm_loss_fwd(p: torch.Tensor, a: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor,
                guidance: torch.Tensor, gamma: float, mode: int, need_grad: bool):
    """Returns (loss, grad): loss a 0-d fp32 (fp64) tensor, grad d loss / d p (or an empty tensor)."""
    B = p.shape[0]
    D = p.numel() // max(B, 1)
    N = p.numel()
    wide = p.dtype == torch.float64
    acc_dtype = torch.float64 if wide else torch.float32
    nc = n_chunks(D, BLOCK)
    partial = _alloc.empty((B, nc), dtype=acc_dtype, device=p.device)
    grad = _alloc.empty(p.shape, dtype=p.dtype, device=p.device) if need_grad else p.new_empty((0,))
    if N == 0:
        return torch.full((), float("nan"), dtype=acc_dtype, device=p.device), grad
    inv_n = 1.0 / N
    launch_rows(_mm_loss_kernel, B, D, p, a, t, u if u is not None else t, w, guidance, grad if need_grad else p,
                partial, D, gamma, inv_n, block=BLOCK, num_warps=NUM_WARPS, MODE=mode, HAS_UNCOND=u is not None,
                WRITE_GRAD=need_grad, ACC=tl.float64 if wide else tl.float32)
    # (B, n_chunks) partials: a fixed-order sum in fp64, then the mean.
    loss = (partial.sum(dtype=torch.float64) * inv_n).to(acc_dtype)
    return loss, grad


def scale(src: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    out = _alloc.empty(src.shape, dtype=src.dtype, device=src.device)
    N = src.numel()
    if N == 0:
        return out
    acc = tl.float64 if torch.float64 in (src.dtype, go.dtype) else tl.float32
    _scale_kernel[launch_grid("moment_matching._scale_kernel", triton.cdiv(N, BLOCK))](
        src, go, out, N, ACC=acc, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# ----------------------------------------------------------------------------- moment statistics

@triton.jit
def _stats_kernel(x_ptr, w_ptr, n_ptr, mean_ptr, m2_ptr, O, K, I, ws_o, ws_k, ws_i, n_split, per_split,
                  HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """x viewed as (O, K, I) contiguous; reduce over (O, I) for each k. Program (k, s) covers the flat
    reduction indices [s * per_split, (s + 1) * per_split) of the O * I of index k and writes its
    (n, mean, M2): a tile's mean and M2 come from the tile in registers (two passes over registers, one
    read of memory), merged into the running triple with Chan's formula."""
    k = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    R = O.to(tl.int64) * I
    start = s * per_split
    stop = tl.minimum(start + per_split, R)
    n = tl.zeros((), dtype=ACC)
    mean = tl.zeros((), dtype=ACC)
    m2 = tl.zeros((), dtype=ACC)
    for base in range(start, stop, BLOCK):
        r = base + tl.arange(0, BLOCK).to(tl.int64)
        mask = r < stop
        o = r // I
        i = r - o * I
        x = tl.load(x_ptr + (o * K + k) * I + i, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            w = tl.load(w_ptr + o * ws_o + k * ws_k + i * ws_i, mask=mask, other=0.0).to(ACC)
        else:
            w = tl.where(mask, 1.0, 0.0).to(ACC)
        n_b = tl.sum(w, axis=0)
        mean_b = tl.sum(w * x, axis=0) / tl.maximum(n_b, 1e-30)
        dev = tl.where(mask, x - mean_b, 0.0)
        m2_b = tl.sum(w * dev * dev, axis=0)
        n_new = n + n_b
        delta = mean_b - mean
        frac = tl.where(n_new > 0, n_b / tl.maximum(n_new, 1e-30), 0.0)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * n * frac
        n = n_new
    idx = k * n_split + s
    tl.store(n_ptr + idx, n)
    tl.store(mean_ptr + idx, mean)
    tl.store(m2_ptr + idx, m2)


@triton.jit
def _stats_bwd_kernel(x_ptr, w_ptr, gx_ptr, gw_ptr, coef_mean_ptr, coef_m2_ptr, gn_ptr, mean_ptr, O, K, I,
                      ws_o, ws_k, ws_i, HAS_W: tl.constexpr, NEED_W: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    """dx = w (gmean / W + 2 gm2 (x - mean));  dw = gn + gmean (x - mean) / W + gm2 (x - mean)^2
    (coef_mean = gmean / W, coef_m2 = gm2 per k), elementwise over the (O, K, I) view."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    N = O.to(tl.int64) * K * I
    mask = offs < N
    o = offs // (K * I)
    rem = offs - o * (K * I)
    k = rem // I
    i = rem - k * I
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    cm = tl.load(coef_mean_ptr + k, mask=mask, other=0.0)
    c2 = tl.load(coef_m2_ptr + k, mask=mask, other=0.0)
    mu = tl.load(mean_ptr + k, mask=mask, other=0.0)
    dev = x - mu
    if HAS_W:
        w = tl.load(w_ptr + o * ws_o + k * ws_k + i * ws_i, mask=mask, other=0.0).to(ACC)
    else:
        w = tl.full(x.shape, 1.0, ACC)
    tl.store(gx_ptr + offs, to_dtype(w * (cm + 2.0 * c2 * dev), gx_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        gn = tl.load(gn_ptr + k, mask=mask, other=0.0)
        tl.store(gw_ptr + offs, to_dtype(gn + cm * dev + c2 * dev * dev, gw_ptr.dtype.element_ty), mask=mask)


def _w_strides(w: torch.Tensor | None):
    return (0, 0, 0) if w is None else tuple(w.stride())


def stats_fwd(x3: torch.Tensor, w3: torch.Tensor | None):
    """Per-k (n, mean, M2) of x3 (O, K, I) over (O, I); w3 an (O, K, I) strided view or None."""
    O, K, I = x3.shape
    wide = x3.dtype == torch.float64 or (w3 is not None and w3.dtype == torch.float64)
    acc_t = torch.float64 if wide else torch.float32
    R = O * I
    # Enough programs to fill a GPU when K is small (global moments), few when K is large.
    n_split = max(1, min(triton.cdiv(R, STATS_BLOCK * 4), triton.cdiv(1024, max(K, 1))))
    per_split = triton.cdiv(max(R, 1), n_split) if R else 0
    per_split = triton.cdiv(per_split, STATS_BLOCK) * STATS_BLOCK if per_split else 0
    n_split = triton.cdiv(R, per_split) if per_split else 1
    n = _alloc.empty((K, n_split), dtype=acc_t, device=x3.device)
    mean = _alloc.empty((K, n_split), dtype=acc_t, device=x3.device)
    m2 = _alloc.empty((K, n_split), dtype=acc_t, device=x3.device)
    if K == 0:
        return n.sum(1), mean.sum(1), m2.sum(1)
    ws = _w_strides(w3)
    # K (the kept indices) on axis 0, the <= 1024 reduction splits on axis 1: within CUDA's limits for any K.
    _stats_kernel[launch_grid("_stats_kernel", K, n_split)](
        x3, w3 if w3 is not None else x3, n, mean, m2, O, K, I, ws[0], ws[1], ws[2], n_split, per_split,
        HAS_W=w3 is not None, ACC=tl.float64 if wide else tl.float32, BLOCK=STATS_BLOCK, num_warps=NUM_WARPS)
    return chan_merge(n, mean, m2)


def chan_merge(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Merge (K, S) partial (count, mean, M2) triples along S (Chan et al.): deviations of partial
    means from the merged mean, never E[x^2] - E[x]^2."""
    n_tot = n.sum(1)
    safe = torch.where(n_tot > 0, n_tot, torch.ones_like(n_tot))
    mean_tot = (n * mean).sum(1) / safe
    dev = mean - mean_tot[:, None]
    m2_tot = m2.sum(1) + (n * dev * dev).sum(1)
    return n_tot, mean_tot, m2_tot


def stats_bwd(x3: torch.Tensor, w3: torch.Tensor | None, coef_mean: torch.Tensor, coef_m2: torch.Tensor,
              gn: torch.Tensor | None, mean: torch.Tensor, need_w: bool):
    O, K, I = x3.shape
    wide = x3.dtype == torch.float64 or (w3 is not None and w3.dtype == torch.float64)
    acc = tl.float64 if wide else tl.float32
    gx = _alloc.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    gw = _alloc.empty(x3.shape, dtype=w3.dtype, device=x3.device) if need_w else None
    N = x3.numel()
    if N == 0:
        return gx, gw
    ws = _w_strides(w3)
    _stats_bwd_kernel[launch_grid("_stats_bwd_kernel", triton.cdiv(N, BLOCK))](
        x3, w3 if w3 is not None else x3, gx, gw if gw is not None else gx, coef_mean, coef_m2,
        gn if gn is not None else coef_mean, mean, O, K, I, ws[0], ws[1], ws[2], HAS_W=w3 is not None,
        NEED_W=need_w, ACC=acc, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gx, gw
