"""Chunked backward of the relational-KL core for large channel counts (C = 320, 640, 1920).

Same math and layout as :mod:`fastdistill.kernels.relational_kl` (4-D ``(G1, G2, rows, C)`` inputs, any
strides; keys in ``NSEG`` segments of ``S`` consecutive keys; optional ``k_index`` reading the memory bank;
fp32 ``lse_s``/``lse_t`` ``(G1, G2, N, NSEG)`` saved by the forward). The gradient of ``sum(dkl * KL)``
w.r.t. the raw student logit ``<q_s[i], k_s[j]>`` is ``dS_ij = scale_s dkl[i, seg(j)] (p_s_ij - p_t_ij)``,
``p_x_ij = exp(scale_x <q_x[i], k_x[j]> - lse_x[i, seg(j)])``; then ``dq = dS k_s`` and ``dk = dS^T q_s``.

Where the fused kernels keep a gradient row tile in registers only up to one channel tile, and beyond it
read-modify-write an fp32 scratch per key tile, this path puts every GEMM on cuBLAS (``torch.bmm``) and
does the softmax algebra in ONE fused Triton elementwise kernel (:func:`_rkl_chunk_ds_kernel`):

* rows are processed in chunks of ``R`` rows (and groups in batches of ``gb``), so that one fp32 slab of
  ``gb x R x W`` elements (``W`` = the chunk's key count) stays within :data:`CHUNK_ELEMS_CUDA` /
  :data:`CHUNK_ELEMS_CPU` elements (read at call time; tests lower them);
* per chunk: ``s = q_s[I] k_s^T`` and ``t = q_t[I] k_t^T`` (fp32 output), the kernel turns the two slabs
  plus ``lse``/``dkl`` into ``dS`` in the student GEMM dtype, then ``dq[I] = dS k_s`` and
  ``dk += dS^T q_s[I]`` (fp32 output, fp32 accumulation across chunks).

GEMM dtypes: per side the rule of ``kernels._common.gemm_dtype`` (equal dtypes: that dtype, fp64 ->
fp32; fp32 with a 16-bit type: the 16-bit type; fp16 with bf16: fp32). 16-bit GEMMs on CUDA run
``torch.bmm(a, b, out_dtype=torch.float32)`` (tensor cores, fp32 accumulation and output, no rounding of
the logits to 16 bits) where torch has it, else on the fp32 upcast of the operands (exact: 16-bit values are
exact in fp32 and TF32). fp32 GEMMs are plain ``torch.bmm``, so they follow
``torch.get_float32_matmul_precision()`` like the fused kernels. On CPU (the interpreter's device) 16-bit
operands are upcast to fp32 once: exact products, fp32 accumulation, as a tensor core computes. ``dS`` is
rounded to the GEMM dtype by ``kernels._common.to_dot`` (nearest even, the GPU's rounding, also under the
interpreter), after the rescale by ``wmax = max|dkl|`` that the fused kernels use so that fp16 ``dS`` stays
in the normal range; ``wmax * scale_s`` is applied to the fp32 gradients at the end (no host read).

``symmetric=True`` is RDD's self-relation (``q_s is k_s``, ``q_t is k_t``, N == M, no index): the logits
are symmetric, so only the upper block triangle is visited: chunk ``I = [r0, r1)`` against keys
``J = [r0, N)``; the kernel writes ``M_ij = dS_ij + dS_ji`` (``dS_ji`` uses row ``j``'s lse/dkl at segment
``seg(i)``: a 2-D gather of the small ``(N, NSEG)`` tables) and the full gradient of the one tensor is
``dX[I] += M X[J]`` and ``dX[r1:] += M[:, r1-r0:]^T X[I]`` (the diagonal block once). The symmetric path
uses at least :data:`SYM_MIN_CHUNKS` chunks (of at least :data:`SYM_MIN_ROWS` rows): a single chunk would
visit the whole square.

Costs, per group, with ``C`` the channel count of the GEMM's side, in units of one ``2 N M C`` GEMM:

================================== =================================== ========================================
path                               GEMM FLOPs                          slab traffic per visited (row, key)
================================== =================================== ========================================
dq and dk (attention-KL, RDD       4 (s, t recompute; dq; dk)          22 B 16-bit / 28 B fp32: s, t written
without the symmetry)                                                  fp32 by cuBLAS (8) and read by the kernel
                                                                       (8), dS written (2 / 4) and read by the
                                                                       two products (4 / 8)
dq only (memory bank, k_index)     3                                   20 B / 24 B (dS read once)
symmetric (RDD self-relation)      2 + R/N: s, t and M X[J] over the   22 B / 28 B per visited pair,
                                   upper block triangle ((1 + R/N)/2   (1 + R/N) N^2 / 2 pairs visited
                                   of the square each), M^T X[I] over
                                   its strict part ((1 - R/N)/2);
                                   2.125 at 8 chunks, -> 2
================================== =================================== ========================================

Besides the slabs: the lse/dkl gathers (``(N, NSEG)`` fp32 tables, L1/L2-resident per tile; the symmetric
kernel reads the row and the column entries); per chunk the GEMMs re-read the keys (``M x (CS + CT)``
16-bit/fp32) and the dk accumulation reads and writes ``M x CS`` fp32 (``12 B`` per element: product
written, read, added), i.e. ``~C / R`` of the slab traffic; the operands are flattened / cast / gathered
once (``O((N + M) C)`` bytes; ``k_index`` gathers the bank's rows once with ``index_select``). Memory: two
fp32 slabs ``s``, ``t`` plus ``dS`` (``gb x R x W`` each, so at most ``CHUNK_ELEMS x (8 + 4)`` bytes:
192 MiB on CUDA), the fp32 gradients and the prepared operands; never the full ``N x M`` matrix.

Deterministic: no atomics anywhere; every output row is written by one GEMM per chunk and chunks are
accumulated in a fixed order, so two runs with the same inputs are bit-identical. Under
``torch.use_deterministic_algorithms(True)`` on CUDA, torch requires ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
(or ``:16:8``) for every cuBLAS GEMM, these included, exactly as for the eager formula; without it torch
raises a RuntimeError that names the variable. No host sync: chunk bounds depend on shapes only,
``wmax`` stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc
from fastdistill.kernels._common import TL_DTYPE, gemm_dtype, interpret, launch_grid, to_dot

__all__ = ["relational_kl_bwd_chunked", "CHUNK_ELEMS_CUDA", "CHUNK_ELEMS_CPU", "SYM_MIN_CHUNKS", "SYM_MIN_ROWS"]

# Elements of one fp32 logit slab (group batch x row chunk x keys). CUDA: 2^24 = 64 MiB per fp32 slab,
# s + t + dS <= 192 MiB, row chunks of >= 1024 rows up to 16K keys (cuBLAS-sized GEMMs). CPU: the
# interpreter's test device, kept small.
CHUNK_ELEMS_CUDA = 1 << 24
CHUNK_ELEMS_CPU = 1 << 18
# Symmetric path: at least this many row chunks (the upper block triangle is (1 + 1/chunks) / 2 of the
# square), unless that would cut chunks below SYM_MIN_ROWS rows (small N: one launch beats the saving).
SYM_MIN_CHUNKS = 8
SYM_MIN_ROWS = 256

# Tile of the elementwise kernel: 4K elements per program, consecutive keys along the fast axis.
_BLOCK_R = 16
_BLOCK_W = 256
_NUM_WARPS = 8

# aten::bmm.dtype (fp32 output from 16-bit operands on cuBLAS) exists in recent torch only.
_HAS_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def _is16(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _prep(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A GEMM operand in its GEMM dtype; off CUDA 16-bit operands are upcast to fp32 once (exact)."""
    x = x.to(dtype)
    if x.device.type != "cuda" and _is16(dtype):
        x = x.float()
    return x


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` with fp32 output and fp32 accumulation. Every GEMM of this module goes through
    here (tests wrap it to count FLOPs)."""
    if _is16(a.dtype):
        if a.is_cuda and _HAS_BMM_OUT_DTYPE:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a.float(), b.float())  # exact upcast: same products, fp32 accumulation
    return torch.bmm(a, b)


# The chunk offsets change every launch: not specialised (no recompile per divisibility class of r0).
@triton.jit(do_not_specialize=["r0", "c0", "g0"])
def _rkl_chunk_ds_kernel(
    SS, ST, LSE_S, LSE_T, DKL, WMAX, DS,
    R, W, r0, c0, N, S, NSEG, g0, n_rb, n_wb,
    scale_s, scale_t,
    SYM: tl.constexpr, DOT_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One (group, row block, key block) tile of the chunk's contiguous ``(gb, R, W)`` slabs of raw logits
    ``SS`` (student) and ``ST`` (teacher): rows are global rows ``r0 + i``, keys global keys ``c0 + j`` of
    group ``g0 + g``. Writes ``dS / (scale_s wmax)`` rounded to the student GEMM dtype (SYM: plus the
    transposed term, rows and keys swapping roles in the lse/dkl tables)."""
    pid = tl.program_id(0).to(tl.int64)
    wb = pid % n_wb
    rest = pid // n_wb
    rb = rest % n_rb
    gl = rest // n_rb
    il = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    jl = wb * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    m2 = (il < R)[:, None] & (jl < W)[None, :]
    off = (gl * R + il)[:, None] * W + jl[None, :]
    s = tl.load(SS + off, mask=m2, other=0.0) * scale_s
    t = tl.load(ST + off, mask=m2, other=0.0) * scale_t
    g = g0 + gl
    i = r0 + il
    c = c0 + jl
    wmax = tl.load(WMAX)
    o = (g * N + i)[:, None] * NSEG + (c // S)[None, :]  # row i's entry at key c's segment
    ds = (tl.exp(s - tl.load(LSE_S + o, mask=m2, other=0.0)) - tl.exp(t - tl.load(LSE_T + o, mask=m2, other=0.0))) \
        * (tl.load(DKL + o, mask=m2, other=0.0) / wmax)
    if SYM:
        # The same logits seen from row c: s_ci = s_ic, softmax of row c over the segment holding i.
        oc = (g * N + c)[None, :] * NSEG + (i // S)[:, None]
        ds += (tl.exp(s - tl.load(LSE_S + oc, mask=m2, other=0.0))
               - tl.exp(t - tl.load(LSE_T + oc, mask=m2, other=0.0))) * (tl.load(DKL + oc, mask=m2, other=0.0) / wmax)
    # to_dot: the GPU's round-to-nearest-even to the GEMM dtype (fp32 values of it under the interpreter,
    # where the dS buffer is fp32).
    tl.store(DS + off, to_dot(ds, DOT_S), mask=m2)


def _ds(s: torch.Tensor, t: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, dkl: torch.Tensor,
        wmax: torch.Tensor, g0: int, r0: int, c0: int, N: int, S: int, nseg: int, scale_s: float, scale_t: float,
        dt_s: torch.dtype, sym: bool) -> torch.Tensor:
    """Launch :func:`_rkl_chunk_ds_kernel` on contiguous fp32 ``(gb, R, W)`` slabs; returns ``dS`` (the
    student GEMM dtype; fp32 holding those values under the interpreter)."""
    gb, R, W = s.shape
    out_dt = torch.float32 if interpret() else dt_s
    ds = _alloc.empty((gb, R, W), dtype=out_dt, device=s.device)
    n_rb, n_wb = triton.cdiv(R, _BLOCK_R), triton.cdiv(W, _BLOCK_W)
    grid = launch_grid("relational_kl_chunked.ds", gb * n_rb * n_wb)
    _rkl_chunk_ds_kernel[grid](s, t, lse_s, lse_t, dkl, wmax, ds, R, W, r0, c0, N, S, nseg, g0, n_rb, n_wb,
                               float(scale_s), float(scale_t), SYM=sym, DOT_S=TL_DTYPE[dt_s],
                               BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS)
    return ds


def _budget(device: torch.device) -> int:
    return CHUNK_ELEMS_CUDA if device.type == "cuda" else CHUNK_ELEMS_CPU


def _plan(G: int, N: int, W: int, budget: int, max_rows: int | None = None) -> tuple[int, int]:
    """``(R, gb)``: rows per chunk and groups per batch so that ``gb x R x W <= budget`` (at least 1 each)."""
    R = max(1, min(N, budget // max(1, W)))
    if max_rows is not None:
        R = min(R, max_rows)
    gb = max(1, min(G, budget // max(1, R * W)))
    return R, gb


def relational_kl_bwd_chunked(dkl: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                              k_t: torch.Tensor, k_index: torch.Tensor | None, lse_s: torch.Tensor,
                              lse_t: torch.Tensor, scale_s: float, scale_t: float, segment_size: int,
                              need_dq: bool, need_dk: bool, symmetric: bool = False
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (fp32, contiguous ``(G1, G2, rows, CS)``; None when not needed) of ``sum(dkl * KL)`` w.r.t.
    ``q_s`` and ``k_s``: the contract of ``kernels.relational_kl.relational_kl_bwd``, computed by row chunks
    with cuBLAS GEMMs (module docstring).

    ``symmetric``: ``q_s is k_s`` and ``q_t is k_t`` (same rows, N == M, no ``k_index``); returns
    ``(dX, None)``, ``dX`` the full gradient w.r.t. that one tensor (query and key contributions), computed
    when ``need_dq or need_dk``.
    """
    G1, G2, N, CS = q_s.shape
    CT = q_t.shape[3]
    G = G1 * G2
    dev = q_s.device
    S = int(segment_size)
    if symmetric:
        if k_index is not None or k_s.shape != q_s.shape or k_t.shape != q_t.shape:
            raise ValueError("relational_kl_bwd_chunked: symmetric needs q_s is k_s and q_t is k_t, no k_index")
        need = need_dq or need_dk
        need_dq, need_dk = need, False
    elif need_dk and k_index is not None:
        raise ValueError("relational_kl: no gradient flows to keys read through an index (the memory bank)")
    Mk = k_s.shape[2]
    M = k_index.shape[0] if k_index is not None else Mk
    nseg = M // S if S > 0 else 0
    if not (need_dq or need_dk):
        return None, None
    if N == 0 or M == 0 or G == 0:
        dq = torch.zeros((G1, G2, N, CS), dtype=torch.float32, device=dev) if need_dq else None
        dk = torch.zeros((G1, G2, Mk, CS), dtype=torch.float32, device=dev) if need_dk else None
        return dq, dk

    dkl = dkl.to(torch.float32).contiguous()
    lse_s = lse_s.to(torch.float32).contiguous()
    lse_t = lse_t.to(torch.float32).contiguous()
    wmax = dkl.abs().amax().reshape(1)
    wmax = torch.where(wmax > 0, wmax, torch.ones_like(wmax))
    dt_s = gemm_dtype(q_s.dtype, k_s.dtype)
    dt_t = gemm_dtype(q_t.dtype, k_t.dtype)
    qs = _prep(q_s.reshape(G, N, CS), dt_s)
    qt = _prep(q_t.reshape(G, N, CT), dt_t)
    budget = _budget(dev)
    common = dict(N=N, S=S, nseg=nseg, scale_s=scale_s, scale_t=scale_t, dt_s=dt_s)

    if symmetric:
        # Enough chunks that the upper block triangle is a real saving, chunks big enough for cuBLAS.
        max_rows = max(SYM_MIN_ROWS, triton.cdiv(N, SYM_MIN_CHUNKS))
        R, gb = _plan(G, N, N, budget, max_rows)
        dx = _alloc.empty((G, N, CS), dtype=torch.float32, device=dev)
        for g0 in range(0, G, gb):
            gs = slice(g0, min(G, g0 + gb))
            for r0 in range(0, N, R):
                r1 = min(N, r0 + R)
                xi, xj = qs[gs, r0:r1], qs[gs, r0:]
                s = _mm(xi, xj.transpose(1, 2))
                t = _mm(qt[gs, r0:r1], qt[gs, r0:].transpose(1, 2))
                m = _ds(s, t, lse_s, lse_t, dkl, wmax, g0, r0, r0, sym=True, **common)
                del s, t
                a = _mm(m, xj)
                # Chunk 0 writes every row once (its own rows, then all later rows); later chunks add.
                if r0 == 0:
                    dx[gs, r0:r1] = a
                else:
                    dx[gs, r0:r1] += a
                if r1 < N:
                    b = _mm(m[:, :, r1 - r0:].transpose(1, 2), xi)
                    if r0 == 0:
                        dx[gs, r1:] = b
                    else:
                        dx[gs, r1:] += b
        dx.mul_(wmax * scale_s)
        return dx.view(G1, G2, N, CS), None

    ks = k_s.reshape(G, Mk, CS)
    kt = k_t.reshape(G, Mk, CT)
    if k_index is not None:  # the bank's rows gathered once: O(M x C) bytes, not once per chunk
        ks, kt = ks.index_select(1, k_index), kt.index_select(1, k_index)
    ks, kt = _prep(ks, dt_s), _prep(kt, dt_t)
    R, gb = _plan(G, N, M, budget)
    dq = _alloc.empty((G, N, CS), dtype=torch.float32, device=dev) if need_dq else None
    dk = _alloc.empty((G, M, CS), dtype=torch.float32, device=dev) if need_dk else None
    for g0 in range(0, G, gb):
        gs = slice(g0, min(G, g0 + gb))
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            s = _mm(qs[gs, r0:r1], ks[gs].transpose(1, 2))
            t = _mm(qt[gs, r0:r1], kt[gs].transpose(1, 2))
            ds = _ds(s, t, lse_s, lse_t, dkl, wmax, g0, r0, 0, sym=False, **common)
            del s, t
            if need_dq:
                dq[gs, r0:r1] = _mm(ds, ks[gs])
            if need_dk:
                p = _mm(ds.transpose(1, 2), qs[gs, r0:r1])
                if r0 == 0:
                    dk[gs] = p
                else:
                    dk[gs] += p
    factor = wmax * scale_s
    if need_dq:
        dq = dq.mul_(factor).view(G1, G2, N, CS)
    if need_dk:
        dk = dk.mul_(factor).view(G1, G2, M, CS)
    return dq, dk
