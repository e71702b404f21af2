"""Flash-style relational KL: per row and key segment,
``KL(softmax(scale_t * q_t k_t^T) || softmax(scale_s * q_s k_s^T))`` without the row x key matrix.

Layout the launchers take: every tensor is 4-D ``(G1, G2, rows, channels)`` with arbitrary strides
(a 3-D ``(G, N, C)`` input is a free ``unsqueeze(1)`` view; ``(B, H, L, D)`` attention tensors pass as
they are, whatever their memory layout). Keys are split into ``NSEG`` segments of ``S`` consecutive
keys; each (group, row, segment) is one softmax. Keys may be read through an index vector (the RDD
memory bank's fixed contrast subset), so the bank is never copied.

Forward (one program per group x row tile x segment): stream key tiles of the segment, build both
logit tiles (student and teacher, channel counts may differ, channels tiled by ``BLOCK_C`` so C=1920
fits), keep online-softmax state ``(m_s, l_s, m_t, l_t, A = sum e^{t-m_t} (t - s))`` and write
``KL = A / l_t - lse_t + lse_s`` plus the two log-sum-exps. Memory: O(rows x segments).

Symmetric forward (``_rkl_fwd_sym_kernel``, :func:`forward_path`): for the self-relation of rows with
norm <= 1 (so ``|logit| <= scale``) each unordered tile pair is visited once with one fixed exponent shift
(the logit bound) instead of the online maximum; the tile's row sums feed row a's softmax over
segment seg(b), its column sums row b's over seg(a), added into zeroed fp32 buffers with atomics.

Backward (:func:`relational_kl_bwd`; the path is :func:`backward_path`'s, see docs/rdd.md for the table
of GEMM FLOPs, atomics and memory): ``dKL/d(q_s.k_s) = scale_s (p_s - p_t) dKL``, recomputed from the
saved LSEs once per (row tile, key tile) pair by ``_rkl_bwd_kernel``. A program owns a row tile; its
student rows and fp32 gradient stay in registers (power-of-two channel sub-blocks ``D0 + D1``, up to
:data:`REGISTER_MAX_C` = 256 channels), and it walks the key tiles:

* ``ATOMIC_DK`` (the ``one-pass`` path): the key gradient ``dS^T q`` of each tile pair goes into a zeroed
  fp32 buffer with atomics (FlashAttention-2's scheme with the roles swapped);
* ``SYM`` (the self-relation ``q is k`` on both sides, RDD's pixel-to-pixel term): tiles align to the
  segments and the pair (a, b) also carries row b's softmax gradient over segment seg(a), from the
  same (symmetric) logits; ``UPPER`` (the ``symmetric`` path) visits ``b >= a`` only and adds the
  transposed product into the rows of b with atomics;
* neither (``rows``; and ``SYM`` without ``UPPER``): no atomics.

Under ``torch.use_deterministic_algorithms(True)`` no path uses atomics: the self-relation walks every
ordered pair, and a key gradient comes from the ``_rkl_bwd_dk_kernel`` (one program per key tile,
looping over all rows; the ``two-pass`` path). Student channel counts above ``REGISTER_MAX_C`` take the
chunked path of ``kernels/relational_kl_chunked.py`` (cuBLAS GEMMs over row chunks).

All accumulation is fp32. Offsets are int64. fp32 GEMMs follow ``torch.get_float32_matmul_precision()``
(read by the launchers on the host, passed as the ``PREC_S``/``PREC_T`` constexprs): ``"highest"`` (torch's
default) runs IEEE fp32 FMA dots, ``"high"``/``"medium"`` TF32 tensor cores; 16-bit GEMMs run on tensor
cores. GEMM operands go through ``kernels._common.to_dot``/``dot``: under the CPU interpreter they are
rounded exactly where the GPU rounds them (16-bit round-to-nearest-even at load and for ``p_s - p_t``;
TF32 truncation), so the interpreter computes the GPU's arithmetic up to accumulation order.

Tile configs: :func:`_configs` lists the GPU candidates per kernel, GEMM precision and channel count
(registered as ``"relational_kl.fwd"``/``".bwd"``/``".dk"`` for ``kernels._common.gpu_configs``; configs that
spill on sm_90 are left out); ``kernels._common.force_config`` overrides the autotuner (tests run every
config through the interpreter). Grids go through ``kernels._common.launch_grid`` (axis 0 only).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastdistill import _alloc
from fastdistill.kernels._common import (TL_DTYPE, TileConfig, dot, forced_config, fp32_precision, interpret,
                                         gemm_dtype, launch_grid, register_configs, split_channels,
                                         to_dot)


# Operand conventions of the device helpers: operands travel as small tuples, constexpr flags by keyword.
#   view  ``X = (ptr, base, stride_row, stride_col)``: the (rows, channels) matrix of one (g1, g2) group of a
#         4-D tensor, ``base`` the int64 offset of that group;
#   rows  ``R = (idx, mask)``: the int64 row indices of a tile (query rows, or key rows, possibly read through
#         the index vector) and which of them are valid;
#   side  ``(q, k, C)``: the query and key views of the student or the teacher and its channel count.
# ``RES_S`` / ``RES_T`` (the same name in all three kernels, set by the launch heuristics): all student /
# teacher channels fit one channel tile (C <= BLOCK_C), so the tile a program owns stays resident in registers.


@triton.jit
def _rows_tile(X, R, C, DOT: tl.constexpr, BLOCK_C: tl.constexpr, TRANS: tl.constexpr):
    """Channels 0..BLOCK_C of rows ``R`` of view ``X`` (C channels), cast to the GEMM dtype, zero outside:
    (rows, BLOCK_C), or (BLOCK_C, rows) when ``TRANS``. The resident tile of a program when all channels
    fit one tile."""
    ptr, base, s_row, s_col = X
    idx, mask = R
    cols = tl.arange(0, BLOCK_C)
    if TRANS:
        return to_dot(tl.load(ptr + base + idx[None, :] * s_row + cols[:, None].to(tl.int64) * s_col,
                              mask=mask[None, :] & (cols < C)[:, None], other=0.0), DOT)
    else:
        return to_dot(tl.load(ptr + base + idx[:, None] * s_row + cols[None, :].to(tl.int64) * s_col,
                              mask=mask[:, None] & (cols < C)[None, :], other=0.0), DOT)


@triton.jit
def _logits(side, R, K, a_res, b_res, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr,
            A_RES: tl.constexpr, B_RES: tl.constexpr):
    """Raw dot products ``q[R] . k[K]^T`` (fp32, rows of ``R`` x keys of ``K``) of ``side = (q, k, C)``,
    channels tiled by ``BLOCK_C``.

    ``A_RES`` / ``B_RES``: the row tile ``a_res`` (rows, BLOCK_C) / the transposed key tile ``b_res``
    (BLOCK_C, keys) is already loaded (only when all channels fit one tile): it stays resident across
    the loop of the caller instead of being re-read for every tile."""
    q, k, C = side
    q_ptr, q_base, q_row, q_col = q
    k_ptr, k_base, k_row, k_col = k
    rows, rmask = R
    krow, kmask = K
    acc = tl.zeros((rows.shape[0], krow.shape[0]), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cm = cols < C
        if A_RES:
            a = a_res
        else:
            a = to_dot(tl.load(q_ptr + q_base + rows[:, None] * q_row + cols[None, :].to(tl.int64) * q_col,
                               mask=rmask[:, None] & cm[None, :], other=0.0), DOT)
        if B_RES:
            b = b_res
        else:
            b = to_dot(tl.load(k_ptr + k_base + krow[None, :] * k_row + cols[:, None].to(tl.int64) * k_col,
                               mask=kmask[None, :] & cm[:, None], other=0.0), DOT)
        acc = dot(a, b, acc, PREC)
    return acc


@triton.jit
def _key_rows(IDX, j, kmask, HAS_IDX: tl.constexpr):
    if HAS_IDX:
        return tl.load(IDX + j, mask=kmask, other=0).to(tl.int64)
    else:
        return j


# Whether all student / teacher channels fit one channel tile (then tiles stay resident in loops).
_RES = triton.heuristics({"RES_S": lambda a: a["CS"] <= a["BLOCK_C"], "RES_T": lambda a: a["CT"] <= a["BLOCK_C"]})


@_RES
@triton.jit
def _rkl_fwd_kernel(
    QS, KS, QT, KT, IDX, KL, LSE_S, LSE_T,
    G2, N, S, NSEG, CS, CT,
    sqs_g1, sqs_g2, sqs_n, sqs_c,
    sks_g1, sks_g2, sks_m, sks_c,
    sqt_g1, sqt_g2, sqt_n, sqt_c,
    skt_g1, skt_g2, skt_m, skt_c,
    scale_s, scale_t,
    HAS_IDX: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, RES_S: tl.constexpr, RES_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_row_tiles = tl.cdiv(N, BLOCK_N)
    rt = pid % n_row_tiles
    rest = pid // n_row_tiles
    seg = rest % NSEG
    g = rest // NSEG
    g1 = g // G2
    g2 = g % G2

    rows = rt * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    R = (rows, rmask)
    qs_base = g1 * sqs_g1 + g2 * sqs_g2
    ks_base = g1 * sks_g1 + g2 * sks_g2
    qt_base = g1 * sqt_g1 + g2 * sqt_g2
    kt_base = g1 * skt_g1 + g2 * skt_g2
    stu = ((QS, qs_base, sqs_n, sqs_c), (KS, ks_base, sks_m, sks_c), CS)
    tea = ((QT, qt_base, sqt_n, sqt_c), (KT, kt_base, skt_m, skt_c), CT)

    # Query tiles that fit one channel tile stay resident for the whole key loop.
    qs_res = _rows_tile(stu[0], R, CS, DOT=DOT_S, BLOCK_C=BLOCK_C, TRANS=False) if RES_S else 0.0
    qt_res = _rows_tile(tea[0], R, CT, DOT=DOT_T, BLOCK_C=BLOCK_C, TRANS=False) if RES_T else 0.0
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, S, BLOCK_M):
        kk = k0 + tl.arange(0, BLOCK_M)
        kmask = kk < S
        j = seg * S + kk.to(tl.int64)
        K = (_key_rows(IDX, j, kmask, HAS_IDX=HAS_IDX), kmask)
        s = _logits(stu, R, K, qs_res, 0.0, DOT=DOT_S, PREC=PREC_S, BLOCK_C=BLOCK_C, A_RES=RES_S,
                    B_RES=False) * scale_s
        t = _logits(tea, R, K, qt_res, 0.0, DOT=DOT_T, PREC=PREC_T, BLOCK_C=BLOCK_C, A_RES=RES_T,
                    B_RES=False) * scale_t
        diff = tl.where(kmask[None, :], t - s, 0.0)  # before masking: no inf - inf
        s = tl.where(kmask[None, :], s, float("-inf"))
        t = tl.where(kmask[None, :], t, float("-inf"))
        # Every tile holds at least one valid key, so the new maxima are finite.
        m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
        alpha_t = tl.exp(m_t - m_t_new)
        p_t = tl.exp(t - m_t_new[:, None])
        l_t = l_t * alpha_t + tl.sum(p_t, axis=1)
        acc = acc * alpha_t + tl.sum(p_t * diff, axis=1)
        m_t = m_t_new
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), axis=1)
        m_s = m_s_new

    lse_t = m_t + tl.log(l_t)
    lse_s = m_s + tl.log(l_s)
    kl = acc / l_t - lse_t + lse_s
    out = (g * N + rows) * NSEG + seg
    tl.store(KL + out, kl, mask=rmask)
    tl.store(LSE_S + out, lse_s, mask=rmask)
    tl.store(LSE_T + out, lse_t, mask=rmask)


@_RES
@triton.jit
def _rkl_fwd_sym_kernel(
    QS, QT, L_S, L_T, ACC,
    G2, N, S, NSEG, CS, CT,
    sqs_g1, sqs_g2, sqs_n, sqs_c,
    sqt_g1, sqt_g2, sqt_n, sqt_c,
    scale_s, scale_t, shift_s, shift_t,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    RES_S: tl.constexpr, RES_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward of the self-relation (keys are the rows on both sides) over each unordered tile pair once.

    The logits are bounded (``|logit| <= shift``: L2-normalised rows), so every softmax shares one fixed
    shift instead of an online maximum, and the partial sums ``l_s = sum e^(s - shift_s)``,
    ``l_t = sum e^(t - shift_t)`` and ``A = sum e^(t - shift_t) (t - s)`` of a tile pair (a, b) serve both
    row a's softmax over segment seg(b) (sums along keys) and row b's over seg(a) (sums along rows, the
    transposed tile): one exponential per logit and side for two rows. They are added into the zeroed
    fp32 (G, N, NSEG) buffers with atomics; the launcher forms ``lse = shift + log l`` and the KL. Tiles
    align to the segments (``BLOCK_N == BLOCK_M``)."""
    pid = tl.program_id(0).to(tl.int64)
    tps = tl.cdiv(S, BLOCK_M)
    n_tiles = NSEG * tps
    a = pid % n_tiles
    g = pid // n_tiles
    g1 = g // G2
    g2 = g % G2
    seg_a = a // tps
    loc = (a % tps) * BLOCK_M + tl.arange(0, BLOCK_N).to(tl.int64)
    rows = seg_a * S + loc
    rmask = loc < S
    R = (rows, rmask)
    qs_base = g1 * sqs_g1 + g2 * sqs_g2
    qt_base = g1 * sqt_g1 + g2 * sqt_g2
    XS = (QS, qs_base, sqs_n, sqs_c)
    XT = (QT, qt_base, sqt_n, sqt_c)
    stu = (XS, XS, CS)
    tea = (XT, XT, CT)
    qs_res = _rows_tile(XS, R, CS, DOT=DOT_S, BLOCK_C=BLOCK_C, TRANS=False) if RES_S else 0.0
    qt_res = _rows_tile(XT, R, CT, DOT=DOT_T, BLOCK_C=BLOCK_C, TRANS=False) if RES_T else 0.0
    grow = g * N
    for b in range(a, n_tiles):
        seg_b = b // tps
        kk = (b % tps) * BLOCK_M + tl.arange(0, BLOCK_M)
        kmask = kk < S
        krow = seg_b * S + kk.to(tl.int64)
        K = (krow, kmask)
        s = _logits(stu, R, K, qs_res, 0.0, DOT=DOT_S, PREC=PREC_S, BLOCK_C=BLOCK_C, A_RES=RES_S,
                    B_RES=False) * scale_s
        t = _logits(tea, R, K, qt_res, 0.0, DOT=DOT_T, PREC=PREC_T, BLOCK_C=BLOCK_C, A_RES=RES_T,
                    B_RES=False) * scale_t
        valid = rmask[:, None] & kmask[None, :]
        e_s = tl.where(valid, tl.exp(s - shift_s), 0.0)
        e_t = tl.where(valid, tl.exp(t - shift_t), 0.0)
        d = e_t * (t - s)  # zero outside the valid pairs (e_t is)
        o = (grow + rows) * NSEG + seg_b  # rows a, segment seg(b)
        tl.atomic_add(L_S + o, tl.sum(e_s, axis=1), mask=rmask, sem="relaxed")
        tl.atomic_add(L_T + o, tl.sum(e_t, axis=1), mask=rmask, sem="relaxed")
        tl.atomic_add(ACC + o, tl.sum(d, axis=1), mask=rmask, sem="relaxed")
        if b != a:  # a diagonal tile already holds both orders of its pairs
            oc = (grow + krow) * NSEG + seg_a  # rows b, segment seg(a)
            tl.atomic_add(L_S + oc, tl.sum(e_s, axis=0), mask=kmask, sem="relaxed")
            tl.atomic_add(L_T + oc, tl.sum(e_t, axis=0), mask=kmask, sem="relaxed")
            tl.atomic_add(ACC + oc, tl.sum(d, axis=0), mask=kmask, sem="relaxed")


@triton.jit
def _pdiff(stu, tea, R, K, scale, lse, w, res_s, res_t, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
           PREC_S: tl.constexpr, PREC_T: tl.constexpr, BLOCK_C: tl.constexpr, RES_S: tl.constexpr,
           RES_T: tl.constexpr, RES_KEYS: tl.constexpr):
    """Recomputed ``(p_s - p_t) * w`` for one tile of rows ``R`` x keys ``K`` (zero outside the valid rows
    and keys); ``scale = (scale_s, scale_t)`` the logit scales, ``lse = (lse_s, lse_t)`` per row.

    ``res_s`` / ``res_t``: the resident tile of the student / teacher side when ``RES_S`` / ``RES_T``: the
    row tile, or with ``RES_KEYS`` (the dk kernel, whose program owns keys) the transposed key tile."""
    scale_s, scale_t = scale
    lse_s, lse_t = lse
    s = _logits(stu, R, K, res_s, res_s, DOT=DOT_S, PREC=PREC_S, BLOCK_C=BLOCK_C,
                A_RES=RES_S and not RES_KEYS, B_RES=RES_S and RES_KEYS) * scale_s
    t = _logits(tea, R, K, res_t, res_t, DOT=DOT_T, PREC=PREC_T, BLOCK_C=BLOCK_C,
                A_RES=RES_T and not RES_KEYS, B_RES=RES_T and RES_KEYS) * scale_t
    valid = R[1][:, None] & K[1][None, :]
    p_s = tl.exp(s - lse_s[:, None])
    p_t = tl.exp(t - lse_t[:, None])
    return tl.where(valid, (p_s - p_t) * w[:, None], 0.0)


@triton.jit
def _student_rows(X, R, CS, DOT: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, OFF: tl.constexpr):
    """Channels ``OFF .. OFF + D0`` (``OFF`` = 0) or ``D0 .. D0 + D1`` of rows ``R`` of view ``X``, cast to the
    GEMM dtype, zero outside the CS channels and the valid rows: one power-of-two sub-block."""
    ptr, base, s_row, s_col = X
    idx, mask = R
    if OFF:
        cols = D0 + tl.arange(0, D1)
    else:
        cols = tl.arange(0, D0)
    return to_dot(tl.load(ptr + base + idx[:, None] * s_row + cols[None, :].to(tl.int64) * s_col,
                          mask=mask[:, None] & (cols < CS)[None, :], other=0.0), DOT)


@triton.jit
def _add_rows(G, rows, rmask, CS, val, D0: tl.constexpr, D1: tl.constexpr, OFF: tl.constexpr,
              ATOMIC: tl.constexpr):
    """Write (or atomically add, ``ATOMIC``) the fp32 sub-block ``val`` into rows ``rows`` of the
    contiguous fp32 gradient ``G`` (``CS`` channels per row; ``rows`` already include the group offset)."""
    if OFF:
        cols = D0 + tl.arange(0, D1)
    else:
        cols = tl.arange(0, D0)
    ptrs = G + rows[:, None] * CS + cols[None, :]
    m2 = rmask[:, None] & (cols < CS)[None, :]
    if ATOMIC:  # relaxed: nothing in this launch reads the buffer; the kernel boundary orders later reads
        tl.atomic_add(ptrs, val, mask=m2, sem="relaxed")
    else:
        tl.store(ptrs, val, mask=m2)


@triton.heuristics({"RES_T": lambda a: a["CT"] <= a["BLOCK_C"]})
@triton.jit
def _rkl_bwd_kernel(
    QS, KS, QT, KT, IDX, LSE_S, LSE_T, DKL, WMAX, DQ, DK,
    G2, N, S, NSEG, CS, CT,
    sqs_g1, sqs_g2, sqs_n, sqs_c,
    sks_g1, sks_g2, sks_m, sks_c,
    sqt_g1, sqt_g2, sqt_n, sqt_c,
    skt_g1, skt_g2, skt_m, skt_c,
    scale_s, scale_t,
    HAS_IDX: tl.constexpr, SYM: tl.constexpr, UPPER: tl.constexpr, ATOMIC_DK: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    RES_T: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One-recompute backward. A program owns a tile of rows (its student rows and gradient stay in
    registers, channels split in the power-of-two sub-blocks ``D0 + D1 >= CS``) and walks key tiles;
    each (row tile, key tile) logit pair is recomputed once and gives:

    * the row-side gradient ``dS K`` (registers, written once at the end);
    * with ``ATOMIC_DK``: the key-side gradient ``dS^T Q`` added into the zeroed fp32 ``DK`` with atomics;
    * with ``SYM`` (q is k on both sides, N == M, no index: RDD's self-relation): tiles are aligned to
      segments (``BLOCK_N == BLOCK_M``); the tile pair (a, b) also carries the transposed softmax
      gradient ``dS_ba^T`` (row b's softmax over segment seg(a), from the same logits), so
      ``M = dS_ab + dS_ba^T`` and ``dX_a += M X_b``. ``UPPER`` visits only ``b >= a`` and adds
      ``dX_b += M^T X_a`` with atomics (every unordered pair once: 2 GEMM units); without ``UPPER`` every
      ordered pair (3 units, no atomics: deterministic).
    """
    pid = tl.program_id(0).to(tl.int64)
    tps = tl.cdiv(S, BLOCK_M)  # key tiles per segment
    n_key_tiles = NSEG * tps
    if SYM:
        n_own = n_key_tiles
    else:
        n_own = tl.cdiv(N, BLOCK_N)
    a = pid % n_own
    g = pid // n_own
    g1 = g // G2
    g2 = g % G2
    if SYM:
        seg_a = a // tps
        loc = (a % tps) * BLOCK_M + tl.arange(0, BLOCK_N).to(tl.int64)
        rows = seg_a * S + loc
        rmask = loc < S
    else:
        rows = a * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
    R = (rows, rmask)
    qs_base = g1 * sqs_g1 + g2 * sqs_g2
    ks_base = g1 * sks_g1 + g2 * sks_g2
    qt_base = g1 * sqt_g1 + g2 * sqt_g2
    kt_base = g1 * skt_g1 + g2 * skt_g2
    QSV = (QS, qs_base, sqs_n, sqs_c)
    KSV = (KS, ks_base, sks_m, sks_c)
    tea = ((QT, qt_base, sqt_n, sqt_c), (KT, kt_base, skt_m, skt_c), CT)
    # The upstream gradient is rescaled by its maximum so the dS operand of the second GEMMs stays in
    # fp16's normal range (mean reductions make it tiny); the scale is undone when writing.
    wmax = tl.load(WMAX)
    out_scale = wmax * scale_s
    grow = g * N  # row offset of this group in the (G, N, ...) buffers

    q0 = _student_rows(QSV, R, CS, DOT=DOT_S, D0=D0, D1=D1, OFF=False)
    acc0 = tl.zeros((BLOCK_N, D0), tl.float32)
    if D1 > 0:
        q1 = _student_rows(QSV, R, CS, DOT=DOT_S, D0=D0, D1=D1, OFF=True)
        acc1 = tl.zeros((BLOCK_N, D1), tl.float32)
    qt_res = _rows_tile(tea[0], R, CT, DOT=DOT_T, BLOCK_C=BLOCK_C, TRANS=False) if RES_T else 0.0
    if SYM:
        b_start = a if UPPER else 0
        diag = a
    else:
        b_start = 0
        diag = -1  # no diagonal: every key tile is another tile

    for b in range(b_start, n_key_tiles):
        seg_b = b // tps
        kk = (b % tps) * BLOCK_M + tl.arange(0, BLOCK_M)
        kmask = kk < S
        j = seg_b * S + kk.to(tl.int64)
        krow = _key_rows(IDX, j, kmask, HAS_IDX=HAS_IDX)
        K = (krow, kmask)
        k0 = _student_rows(KSV, K, CS, DOT=DOT_S, D0=D0, D1=D1, OFF=False)
        s = dot(q0, tl.trans(k0), None, PREC_S)
        if D1 > 0:
            k1 = _student_rows(KSV, K, CS, DOT=DOT_S, D0=D0, D1=D1, OFF=True)
            s = dot(q1, tl.trans(k1), s, PREC_S)
        s = s * scale_s
        t = _logits(tea, R, K, qt_res, 0.0, DOT=DOT_T, PREC=PREC_T, BLOCK_C=BLOCK_C, A_RES=RES_T,
                    B_RES=False) * scale_t
        o = (grow + rows) * NSEG + seg_b
        lse_s = tl.load(LSE_S + o, mask=rmask, other=0.0)
        lse_t = tl.load(LSE_T + o, mask=rmask, other=0.0)
        w = tl.load(DKL + o, mask=rmask, other=0.0) / wmax
        valid = rmask[:, None] & kmask[None, :]
        ds = (tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])) * w[:, None]
        if SYM:  # key row j's own softmax over segment seg_a holds the same logit (symmetric tiles)
            kc = (grow + krow) * NSEG + seg_a
            lse_sk = tl.load(LSE_S + kc, mask=kmask, other=0.0)
            lse_tk = tl.load(LSE_T + kc, mask=kmask, other=0.0)
            w_k = tl.load(DKL + kc, mask=kmask, other=0.0) / wmax
            ds += (tl.exp(s - lse_sk[None, :]) - tl.exp(t - lse_tk[None, :])) * w_k[None, :]
        ds = to_dot(tl.where(valid, ds, 0.0), DOT_S)
        acc0 = dot(ds, k0, acc0, PREC_S)
        if D1 > 0:
            acc1 = dot(ds, k1, acc1, PREC_S)
        if ATOMIC_DK or UPPER:
            if b != diag:  # a diagonal tile's M already holds both directions
                dst = tl.trans(ds)
                G = DQ if SYM else DK
                grow_k = grow if SYM else g * (NSEG * S)  # DK is (G, M, CS): M = NSEG * S keys per group
                _add_rows(G, grow_k + krow, kmask, CS, dot(dst, q0, None, PREC_S) * out_scale, D0=D0, D1=D1,
                          OFF=False, ATOMIC=True)
                if D1 > 0:
                    _add_rows(G, grow_k + krow, kmask, CS, dot(dst, q1, None, PREC_S) * out_scale, D0=D0,
                              D1=D1, OFF=True, ATOMIC=True)

    # With UPPER other programs add into these rows too (UPPER implies SYM: the launcher sets both).
    _add_rows(DQ, grow + rows, rmask, CS, acc0 * out_scale, D0=D0, D1=D1, OFF=False, ATOMIC=UPPER)
    if D1 > 0:
        _add_rows(DQ, grow + rows, rmask, CS, acc1 * out_scale, D0=D0, D1=D1, OFF=True, ATOMIC=UPPER)


@_RES
@triton.jit
def _rkl_bwd_dk_kernel(
    QS, KS, QT, KT, LSE_S, LSE_T, DKL, WMAX, DK,
    G2, N, M, S, NSEG, CS, CT,
    sqs_g1, sqs_g2, sqs_n, sqs_c,
    sks_g1, sks_g2, sks_m, sks_c,
    sqt_g1, sqt_g2, sqt_n, sqt_c,
    skt_g1, skt_g2, skt_m, skt_c,
    scale_s, scale_t,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, RES_S: tl.constexpr, RES_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_per_seg = tl.cdiv(S, BLOCK_M)
    kt_i = pid % tiles_per_seg
    rest = pid // tiles_per_seg
    seg = rest % NSEG
    g = rest // NSEG
    g1 = g // G2
    g2 = g % G2
    kk = kt_i * BLOCK_M + tl.arange(0, BLOCK_M)
    kmask = kk < S
    krow = seg * S + kk.to(tl.int64)
    K = (krow, kmask)
    qs_base = g1 * sqs_g1 + g2 * sqs_g2
    ks_base = g1 * sks_g1 + g2 * sks_g2
    qt_base = g1 * sqt_g1 + g2 * sqt_g2
    kt_base = g1 * skt_g1 + g2 * skt_g2
    stu = ((QS, qs_base, sqs_n, sqs_c), (KS, ks_base, sks_m, sks_c), CS)
    tea = ((QT, qt_base, sqt_n, sqt_c), (KT, kt_base, skt_m, skt_c), CT)
    wmax = tl.load(WMAX)
    dk_base = (g * M + krow) * CS  # DK is a contiguous fp32 (G, M, CS) buffer
    ccols = tl.arange(0, BLOCK_C)

    # This program's keys are fixed: resident (transposed) when they fit one channel tile (RES_S / RES_T).
    ks_res = _rows_tile(stu[1], K, CS, DOT=DOT_S, BLOCK_C=BLOCK_C, TRANS=True) if RES_S else 0.0
    kt_res = _rows_tile(tea[1], K, CT, DOT=DOT_T, BLOCK_C=BLOCK_C, TRANS=True) if RES_T else 0.0
    dk = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    if not RES_S:
        for c0 in range(0, CS, BLOCK_C):
            cm = (c0 + ccols) < CS
            tl.store(DK + dk_base[:, None] + (c0 + ccols)[None, :], tl.zeros((BLOCK_M, BLOCK_C), tl.float32),
                     mask=kmask[:, None] & cm[None, :])
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        R = (rows, rmask)
        o = (g * N + rows) * NSEG + seg
        lse = (tl.load(LSE_S + o, mask=rmask, other=0.0), tl.load(LSE_T + o, mask=rmask, other=0.0))
        w = tl.load(DKL + o, mask=rmask, other=0.0) / wmax
        ds = _pdiff(stu, tea, R, K, (scale_s, scale_t), lse, w, ks_res, kt_res, DOT_S=DOT_S, DOT_T=DOT_T,
                    PREC_S=PREC_S, PREC_T=PREC_T, BLOCK_C=BLOCK_C, RES_S=RES_S, RES_T=RES_T, RES_KEYS=True)
        dst = tl.trans(to_dot(ds, DOT_S))
        if RES_S:
            cm = ccols < CS
            qc = tl.load(QS + qs_base + rows[:, None] * sqs_n + ccols[None, :].to(tl.int64) * sqs_c,
                         mask=rmask[:, None] & cm[None, :], other=0.0)
            dk = dot(dst, to_dot(qc, DOT_S), dk, PREC_S)
        else:
            for c0 in range(0, CS, BLOCK_C):
                cols = c0 + ccols
                cm = cols < CS
                qc = tl.load(QS + qs_base + rows[:, None] * sqs_n + cols[None, :].to(tl.int64) * sqs_c,
                             mask=rmask[:, None] & cm[None, :], other=0.0)
                ptrs = DK + dk_base[:, None] + cols[None, :]
                m2 = kmask[:, None] & cm[None, :]
                part = tl.load(ptrs, mask=m2, other=0.0)
                part = dot(dst, to_dot(qc, DOT_S), part, PREC_S)
                tl.store(ptrs, part, mask=m2)
    if RES_S:
        cm = ccols < CS
        tl.store(DK + dk_base[:, None] + ccols[None, :], dk * (wmax * scale_s),
                 mask=kmask[:, None] & cm[None, :])
    else:
        for c0 in range(0, CS, BLOCK_C):
            cols = c0 + ccols
            m2 = kmask[:, None] & (cols < CS)[None, :]
            ptrs = DK + dk_base[:, None] + cols[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) * (wmax * scale_s), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launchers

_KERNEL_NAMES = {"fwd": "relational_kl.fwd", "fwd_sym": "relational_kl.fwd_sym", "bwd": "relational_kl.bwd",
                 "dk": "relational_kl.dk"}


def _interpret() -> bool:
    return interpret()


def _dot_dtype(a: torch.dtype, b: torch.dtype):
    """``(DOT, PREC)`` constexprs of one side: the GEMM dtype and, for fp32 GEMMs, the input precision
    that ``torch.get_float32_matmul_precision()`` asks for ("ieee" for "highest", else "tf32")."""
    d = gemm_dtype(a, b)
    return TL_DTYPE[d], (fp32_precision() if d == torch.float32 else None)


# Candidate tiles of the forward (also the square ones of the symmetric forward) and of the deterministic
# key-gradient kernel per GEMM precision class: ``(BLOCK_N, BLOCK_M, BLOCK_C, num_warps, num_stages)``
# and where the config may run: "R" when all channels fit one channel tile (C <= BLOCK_C: query/key tiles
# resident, RES_S / RES_T), "C" when they do not (channel loop; dk accumulates in an fp32 scratch), "RC"
# both. Chosen by compiling every kernel x candidate x variant for sm_90 without a GPU (ptxas -v on
# Triton's PTX, strides specialised as a launch specialises them): a config is listed for a variant only
# if it does not spill there. Spilling configs removed (spill bytes per thread, sm_90, bf16):
# fwd (64,64,64,4,2) 304 / 1896 (R / C), (128,128,64,8,2) 896 / 2496, (64,128,64,8,2) 308 / 1208,
# (64,32,64,4,3) C 840; dk (128,64,64,8,2) 516 / 1408 (R / C).
_CANDIDATES: dict[str, dict[str, list[tuple[tuple[int, int, int, int, int], str]]]] = {
    "16bit": {
        "fwd": [((128, 64, 64, 8, 2), "R"), ((64, 64, 64, 8, 2), "RC"), ((64, 128, 32, 8, 3), "RC"),
                ((128, 64, 32, 8, 3), "RC"), ((64, 64, 32, 8, 3), "RC"), ((128, 32, 32, 8, 3), "RC"),
                ((64, 32, 32, 4, 3), "RC"), ((64, 64, 32, 4, 3), "R")],
        "dk": [((64, 64, 64, 8, 2), "R"), ((64, 128, 32, 8, 3), "R"), ((128, 64, 32, 8, 3), "R"),
               ((64, 64, 32, 8, 3), "RC"), ((128, 32, 32, 8, 3), "RC"), ((64, 32, 32, 4, 3), "RC"),
               ((64, 64, 32, 4, 3), "R")],
    },
    # fp32 inputs on TF32 tensor cores ("high"/"medium"). Removed for spills (C): fwd (64,64,32,4,3) 760,
    # (64,32,32,4,3) 224, (128,32,32,8,3) 160; dk (64,64,32,4,3) 2720, (32,64,32,4,3) 1192.
    "tf32": {
        "fwd": [((64, 64, 32, 8, 3), "RC"), ((64, 64, 32, 8, 1), "RC"), ((64, 32, 32, 8, 2), "RC"),
                ((64, 32, 32, 8, 1), "RC"), ((32, 32, 32, 4, 1), "RC"), ((128, 32, 32, 8, 3), "R"),
                ((64, 64, 32, 4, 3), "R")],
        "dk": [((64, 64, 32, 8, 3), "RC"), ((128, 32, 32, 8, 3), "RC"), ((64, 64, 32, 8, 1), "RC"),
               ((64, 32, 32, 8, 2), "RC"), ((64, 32, 32, 8, 1), "RC"), ((32, 32, 32, 4, 1), "RC"),
               ((64, 64, 32, 4, 3), "R")],
    },
    # IEEE fp32 (torch's default "highest"): FMA dots, no tensor cores. Removed for spills (R / C):
    # fwd (128,128,64,8,2), (64,64,64,4,2);
    # dk (64,64,32,8,2) 456 / 120, (64,32,32,4,2) 540 / 232, (32,64,32,4,2) 80 / 288.
    "ieee": {
        "fwd": [((64, 64, 32, 8, 2), "RC"), ((64, 64, 32, 8, 1), "RC"), ((64, 32, 32, 8, 1), "RC"),
                ((64, 32, 32, 4, 2), "RC"), ((32, 32, 32, 4, 2), "RC"), ((32, 32, 32, 4, 1), "RC"),
                ((64, 32, 16, 4, 2), "RC")],
        "dk": [((64, 64, 32, 8, 1), "C"), ((64, 32, 32, 8, 1), "RC"), ((32, 32, 32, 8, 2), "RC"),
               ((64, 32, 32, 8, 2), "RC"), ((32, 32, 32, 4, 1), "RC"), ((32, 32, 32, 4, 2), "R"),
               ((64, 32, 16, 4, 2), "R")],
    },
}


# Candidate tiles of the one-recompute backward ``_rkl_bwd_kernel`` ("relational_kl.bwd") per GEMM
# precision class: ``(BLOCK_N, BLOCK_M, BLOCK_C, num_warps, num_stages)`` and the widest student channel
# block ``D0 + D1`` each may hold in registers (its row tile and fp32 gradient tile are resident; BLOCK_C
# tiles the teacher's channels). Configs with BLOCK_N == BLOCK_M serve the symmetric path too. Chosen by
# compiling every mode (SYM/UPPER/ATOMIC_DK) at D = 48, 64, 128, 256 for sm_90 (scripts/compile_audit.py).
# Removed for spills (bytes per thread): 16-bit (64,32,32,4,2) 32 B at D=48; TF32 (64,64,32,8,2) 36 B
# (symmetric, D=48); IEEE fp32 spills in every 32-row tile at D=48 (up to 932 B) and (32,32,16,4,1)
# 764 B at D=256, so IEEE (torch's "highest" precision, FMA dots) runs 16-row tiles.
_BWD_CANDIDATES: dict[str, list[tuple[tuple[int, int, int, int, int], int]]] = {
    "16bit": [((64, 64, 64, 8, 2), 64), ((64, 64, 32, 8, 2), 128), ((32, 32, 32, 4, 2), 128),
              ((32, 32, 32, 4, 1), 256), ((32, 64, 32, 8, 1), 256)],
    "tf32": [((64, 64, 32, 8, 1), 64), ((32, 64, 32, 8, 1), 64), ((32, 32, 32, 8, 1), 256),
             ((32, 32, 32, 4, 1), 256)],
    "ieee": [((16, 16, 32, 8, 1), 256), ((16, 16, 32, 4, 1), 256), ((16, 16, 16, 8, 1), 256)],
}


# Student channel counts above this take the chunked backward (kernels/relational_kl_chunked.py: cuBLAS
# GEMMs over row chunks and one fused elementwise kernel): a register-resident gradient tile wider than
# 256 fp32 columns does not fit next to the logit tiles. Tests lower it to force the chunked path.
REGISTER_MAX_C = 256


def _precision_class(dtype: torch.dtype, precision: str | None) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"relational_kl: no GEMM dtype {dtype}")
    precision = fp32_precision() if precision is None else precision
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"relational_kl: precision must be 'ieee' or 'tf32', got {precision!r}")
    return precision


def _configs(which: str, n: int, s: int, c: int, dtype: torch.dtype = torch.bfloat16,
             precision: str | None = None, cs: int | None = None, symmetric: bool = False) -> list[TileConfig]:
    """GPU candidate tiles of kernel ``which`` ("fwd", "fwd_sym", "bwd", "dk") for ``n`` rows, segments of ``s``
    keys, at most ``c`` channels per side and GEMM dtype ``dtype`` (fp32: ``precision`` "ieee"/"tf32",
    default: torch's current fp32 matmul precision). "bwd" also takes ``cs`` (the student's channel
    count: its register sub-blocks, default ``c``) and ``symmetric`` (the self-relation path: square
    tiles, BLOCK_N == BLOCK_M).

    A key tile never spans two segments, so BLOCK_M is capped at the segment length rounded up to a
    power of two (16 at least, the tl.dot minimum): RDD's P=16 segments run 16-key tiles, long segments
    use online rescaling across tiles. Row and channel tiles are capped the same way. On GPUs the
    autotuner picks among these, keyed by the problem sizes (and dtypes). Only configs that compile
    without register spills for this channel count are listed (see ``_CANDIDATES``/``_BWD_CANDIDATES``).
    """
    p2 = triton.next_power_of_2
    bm_cap = max(16, min(128, p2(max(1, s))))
    bn_cap = max(16, min(128, p2(max(1, n))))
    bc_cap = max(16, min(128, p2(max(1, c))))
    pclass = _precision_class(dtype, precision)
    out: list[TileConfig] = []
    if which == "bwd":
        d0, d1 = split_channels(c if cs is None else cs)
        for (bn, bm, bc, w, st), dmax in _BWD_CANDIDATES[pclass]:
            if d0 + d1 > dmax:
                continue
            if symmetric:  # rows are key tiles of the same segments: square tiles
                if bn != bm:
                    continue
                bn = bm = min(bm, bm_cap)
            else:
                bn, bm = min(bn, bn_cap), min(bm, bm_cap)
            cfg = TileConfig({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_C": min(bc, bc_cap)}, num_warps=w,
                             num_stages=st)
            if cfg not in out:
                out.append(cfg)
        return out
    for (bn, bm, bc, w, st), where in _CANDIDATES[pclass]["fwd" if which == "fwd_sym" else which]:
        if ("R" if c <= bc else "C") not in where:
            continue  # this config spills for this channel count (or was not checked there)
        if which == "fwd_sym":  # square tiles aligned to the segments
            if bn != bm:
                continue
            bn = bm = min(bm, bm_cap)
        cfg = TileConfig({"BLOCK_N": min(bn, bn_cap), "BLOCK_M": min(bm, bm_cap), "BLOCK_C": min(bc, bc_cap)},
                         num_warps=w, num_stages=st)
        if cfg not in out:
            out.append(cfg)
    return out


for _which, _name in _KERNEL_NAMES.items():
    register_configs(_name)(functools.partial(_configs, _which))


def _interpreter_config(which: str, n: int, s: int, c: int, symmetric: bool = False, **_) -> TileConfig:
    # The interpreter runs one config (no tuning): large channel tiles keep the numpy work per tile big.
    # tests/test_tile_configs.py runs every GPU config through the interpreter with force_config.
    p2 = triton.next_power_of_2
    bn, bm = max(16, min(64, p2(max(1, n)))), max(16, min(64, p2(max(1, s))))
    if symmetric or which == "fwd_sym":
        bn = bm
    return TileConfig({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_C": max(16, min(128, p2(max(1, c))))},
                      num_warps=4, num_stages=1)


_RAW = {"fwd": _rkl_fwd_kernel, "fwd_sym": _rkl_fwd_sym_kernel, "bwd": _rkl_bwd_kernel, "dk": _rkl_bwd_dk_kernel}
# Autotuning keys: the problem sizes, and for the backward its mode (a different loop structure).
_TUNE_KEYS = {"fwd": ["N", "S", "NSEG", "CS", "CT"], "fwd_sym": ["N", "S", "NSEG", "CS", "CT"],
              "dk": ["N", "S", "NSEG", "CS", "CT"],
              "bwd": ["N", "S", "NSEG", "CS", "CT", "SYM", "UPPER", "ATOMIC_DK"]}


@functools.lru_cache(maxsize=None)
def _tuned(which: str, configs: tuple[TileConfig, ...]):
    cfgs = [triton.Config(c.block_dict, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
    # The forward and the dk kernel rewrite all of their outputs (dk zeroes its scratch rows itself); the
    # backward and the symmetric forward add into their buffers with atomics, so the autotuner zeroes
    # them before each benchmarked run.
    reset = {"bwd": ["DQ", "DK"], "fwd_sym": ["L_S", "L_T", "ACC"]}.get(which)
    return triton.autotune(cfgs, key=_TUNE_KEYS[which], reset_to_zero=reset)(_RAW[which])


def _launch(which: str, grid_fn, problem: dict, args: tuple, kwargs: dict) -> None:
    """Launch kernel ``which``: the forced config (tests), else the interpreter's one config, else the
    autotuner over :func:`_configs`. ``grid_fn(blocks) -> (x, y, z)`` goes through ``launch_grid``."""
    name = _KERNEL_NAMES[which]
    cfg = forced_config(name)
    if cfg is None and _interpret():
        cfg = _interpreter_config(which, **problem)
    if cfg is not None:
        if (problem.get("symmetric") or which == "fwd_sym") and cfg["BLOCK_N"] != cfg["BLOCK_M"]:
            raise ValueError(f"{name}: the self-relation kernels need square tiles (BLOCK_N == BLOCK_M), got {cfg}")
        _RAW[which][grid_fn(cfg.block_dict)](*args, **kwargs, **cfg.block_dict, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
    else:
        _tuned(which, tuple(_configs(which, **problem)))[lambda meta: grid_fn(meta)](*args, **kwargs)


def _problem(N: int, S: int, CS: int, CT: int, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
             k_t: torch.Tensor) -> dict:
    """The :func:`_configs` keywords of a launch: fp32 configs when either side's GEMM is fp32."""
    dts = {gemm_dtype(q_s.dtype, k_s.dtype), gemm_dtype(q_t.dtype, k_t.dtype)}
    dtype = torch.float32 if torch.float32 in dts else dts.pop()
    return dict(n=N, s=S, c=max(CS, CT), dtype=dtype, precision=fp32_precision())


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


# The symmetric forward shifts every exponent by the logit bound instead of a running maximum: with
# |logit| <= shift, e^(logit - shift) >= e^(-2 shift) stays a normal fp32 for shift <= 40 (e^-80 > 2^-126).
SYM_FWD_MAX_SHIFT = 40.0


def forward_path(symmetric: bool, shift_s: float | None, shift_t: float | None,
                 deterministic: bool | None = None) -> str:
    """Which forward :func:`relational_kl_fwd` runs: ``"symmetric"`` (each unordered tile pair once, 1 GEMM
    unit; needs the self-relation, known logit bounds ``shift_s``/``shift_t`` <= :data:`SYM_FWD_MAX_SHIFT`,
    and atomics allowed) or ``"online"`` (every (row tile, key tile) pair, online softmax, 2 units)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if (symmetric and not deterministic and shift_s is not None and shift_t is not None
            and max(shift_s, shift_t) <= SYM_FWD_MAX_SHIFT):
        return "symmetric"
    return "online"


def relational_kl_fwd(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                      k_index: torch.Tensor | None, scale_s: float, scale_t: float, segment_size: int,
                      symmetric: bool = False, logit_bound: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-D inputs ``(G1, G2, N, C)`` / ``(G1, G2, M_or_bank, C)`` -> fp32 ``(G1, G2, N, NSEG)`` KL, lse_s, lse_t.

    ``symmetric``: ``q_s is k_s`` and ``q_t is k_t``; with ``logit_bound`` (a bound on ``|<q, k>|`` of both
    sides before scaling, 1 for L2-normalised rows) the forward may take :func:`forward_path`'s
    ``"symmetric"`` path."""
    G1, G2, N, CS = q_s.shape
    CT = q_t.shape[3]
    M = k_index.shape[0] if k_index is not None else k_s.shape[2]
    S = segment_size
    nseg = M // S
    dev = q_s.device
    out_shape = (G1, G2, N, nseg)
    if G1 * G2 * N * nseg == 0:
        return tuple(_alloc.empty(out_shape, dtype=torch.float32, device=dev) for _ in range(3))
    dot_s, prec_s = _dot_dtype(q_s.dtype, k_s.dtype)
    dot_t, prec_t = _dot_dtype(q_t.dtype, k_t.dtype)
    problem = _problem(N, S, CS, CT, q_s, k_s, q_t, k_t)
    shifts = (None, None) if logit_bound is None else (abs(scale_s) * logit_bound, abs(scale_t) * logit_bound)
    if symmetric and k_index is None and forward_path(True, *shifts) == "symmetric":
        # Sums of e^(logit - shift) per (row, segment), added by the programs of every tile pair.
        l_s, l_t, acc = (torch.zeros(out_shape, dtype=torch.float32, device=dev) for _ in range(3))
        _launch("fwd_sym",
                lambda b: launch_grid("relational_kl.fwd_sym", G1 * G2 * nseg * triton.cdiv(S, b["BLOCK_M"])),
                dict(problem, symmetric=True),
                (q_s, q_t, l_s, l_t, acc, G2, N, S, nseg, CS, CT, *_strides(q_s), *_strides(q_t),
                 float(scale_s), float(scale_t), *shifts),
                dict(DOT_S=dot_s, DOT_T=dot_t, PREC_S=prec_s, PREC_T=prec_t))
        lse_s = l_s.log_().add_(shifts[0])
        lse_t = l_t.log().add_(shifts[1])
        kl = acc.div_(l_t).sub_(lse_t).add_(lse_s)
        return kl, lse_s, lse_t
    kl, lse_s, lse_t = (_alloc.empty(out_shape, dtype=torch.float32, device=dev) for _ in range(3))
    idx = k_index if k_index is not None else q_s  # dummy pointer when unused
    _launch("fwd", lambda b: launch_grid("relational_kl.fwd", G1 * G2 * nseg * triton.cdiv(N, b["BLOCK_N"])),
            problem,
            (q_s, k_s, q_t, k_t, idx, kl, lse_s, lse_t,
             G2, N, S, nseg, CS, CT,
             *_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t),
             float(scale_s), float(scale_t)),
            dict(HAS_IDX=k_index is not None, DOT_S=dot_s, DOT_T=dot_t, PREC_S=prec_s, PREC_T=prec_t))
    return kl, lse_s, lse_t


BACKWARD_PATHS = ("symmetric", "symmetric-deterministic", "one-pass", "two-pass", "rows", "keys", "chunked")


def backward_path(cs: int, symmetric: bool, need_dq: bool, need_dk: bool,
                  deterministic: bool | None = None) -> str:
    """Which backward :func:`relational_kl_bwd` runs (GEMM units of ``2 N M C`` in brackets):

    * ``"chunked"``: student channels above :data:`REGISTER_MAX_C` (kernels/relational_kl_chunked.py;
      no atomics; 2 symmetric, 4 otherwise, 3 with only the row gradient);
    * ``"symmetric"``: the self-relation (q is k on both sides) with atomics, each unordered tile pair
      once (2); ``"symmetric-deterministic"``: every ordered pair, no atomics (3);
    * ``"one-pass"``: row and key gradients from one recompute, key gradient by atomics (4);
      ``"two-pass"``: the deterministic alternative, rows then keys, each recomputing the tiles (6);
    * ``"rows"``: only the row gradient (keys read through an index, the memory bank) (3);
      ``"keys"``: only the key gradient (3).

    ``deterministic`` defaults to ``torch.are_deterministic_algorithms_enabled()`` (read on the host).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if cs > REGISTER_MAX_C:
        return "chunked"
    if symmetric:
        return "symmetric-deterministic" if deterministic else "symmetric"
    if need_dq and need_dk:
        return "two-pass" if deterministic else "one-pass"
    return "rows" if need_dq else "keys"


def relational_kl_bwd(dkl: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                      k_t: torch.Tensor, k_index: torch.Tensor | None, lse_s: torch.Tensor, lse_t: torch.Tensor,
                      scale_s: float, scale_t: float, segment_size: int, need_dq: bool, need_dk: bool,
                      symmetric: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (fp32, contiguous ``(G1, G2, rows, CS)``) of ``sum(dkl * KL)`` w.r.t. q_s and k_s.

    ``symmetric``: ``q_s is k_s`` and ``q_t is k_t`` (no index): returns ``(dX, None)``, the whole gradient
    of that one tensor (both its query and its key role). The path is :func:`backward_path`'s."""
    G1, G2, N, CS = q_s.shape
    CT = q_t.shape[3]
    M = k_index.shape[0] if k_index is not None else k_s.shape[2]
    S = segment_size
    nseg = M // S
    dev = q_s.device
    if need_dk and k_index is not None:
        raise ValueError("relational_kl: no gradient flows to keys read through an index (the memory bank)")
    if symmetric and (k_index is not None or k_s.shape[2] != N):
        raise ValueError("relational_kl: the symmetric backward needs q_s is k_s and no key index")
    if k_index is None and k_s.shape[2] != nseg * S:  # the kernels address key rows as segment * S + key
        raise ValueError(f"relational_kl: segment_size {S} must divide the key count {k_s.shape[2]}")
    if not (need_dq or need_dk):
        return None, None
    path = backward_path(CS, symmetric, need_dq, need_dk)
    dkl = dkl.to(torch.float32).contiguous()
    if path == "chunked":
        from fastdistill.kernels.relational_kl_chunked import relational_kl_bwd_chunked

        return relational_kl_bwd_chunked(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, scale_s, scale_t,
                                         segment_size, need_dq or symmetric, need_dk and not symmetric, symmetric)
    wmax = dkl.abs().amax().reshape(1)
    wmax = torch.where(wmax > 0, wmax, torch.ones_like(wmax))
    dot_s, prec_s = _dot_dtype(q_s.dtype, k_s.dtype)
    dot_t, prec_t = _dot_dtype(q_t.dtype, k_t.dtype)
    problem = _problem(N, S, CS, CT, q_s, k_s, q_t, k_t)
    common = dict(DOT_S=dot_s, DOT_T=dot_t, PREC_S=prec_s, PREC_T=prec_t)
    strides = (*_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t))
    scales = (float(scale_s), float(scale_t))
    dq = dk = None
    if path != "keys":
        sym = path.startswith("symmetric")
        upper, atomic_dk = path == "symmetric", path == "one-pass"
        # Buffers that receive atomics start at zero; the others are fully written.
        dq = (torch.zeros if upper else _alloc.empty)((G1, G2, N, CS), dtype=torch.float32, device=dev)
        if atomic_dk:
            dk = torch.zeros((G1, G2, k_s.shape[2], CS), dtype=torch.float32, device=dev)
        d0, d1 = split_channels(CS)
        idx = k_index if k_index is not None else q_s  # dummy pointer when unused
        bwd_problem = dict(problem, cs=CS, symmetric=sym)

        def grid(b):
            own = nseg * triton.cdiv(S, b["BLOCK_M"]) if sym else triton.cdiv(N, b["BLOCK_N"])
            return launch_grid("relational_kl.bwd", G1 * G2 * own)

        _launch("bwd", grid, bwd_problem,
                (q_s, k_s, q_t, k_t, idx, lse_s, lse_t, dkl, wmax, dq, dk if dk is not None else dq,
                 G2, N, S, nseg, CS, CT, *strides, *scales),
                dict(HAS_IDX=k_index is not None, SYM=sym, UPPER=upper, ATOMIC_DK=atomic_dk, D0=d0, D1=d1,
                     **common))
    if path in ("two-pass", "keys"):
        Mk = k_s.shape[2]
        dk = _alloc.empty((G1, G2, Mk, CS), dtype=torch.float32, device=dev)
        _launch("dk", lambda b: launch_grid("relational_kl.dk", G1 * G2 * nseg * triton.cdiv(S, b["BLOCK_M"])),
                problem,
                (q_s, k_s, q_t, k_t, lse_s, lse_t, dkl, wmax, dk,
                 G2, N, Mk, S, nseg, CS, CT, *strides, *scales),
                common)
    return dq, dk


# ----------------------------------------------------------------------------------------------
# Per-pixel L2 normalisation of (B, C, H, W) maps into contiguous (B*H*W, C) rows (RDD's pre-pass):
# one kernel forward, one backward, instead of the permute copy, norm, clamp, divide and casts.

@triton.jit
def _pixnorm_fwd_kernel(X, Y, RN, R, C, P, W, sxb, sxc, sxh, sxw, eps,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = r < R
    b = r // P
    p = r % P
    xrow = b * sxb + (p // W) * sxh + (p % W) * sxw
    ss = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < C)[None, :]
        x = tl.load(X + xrow[:, None] + c[None, :].to(tl.int64) * sxc, mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    norm = tl.sqrt(ss)
    rn = 1.0 / tl.maximum(norm, eps)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < C)[None, :]
        x = tl.load(X + xrow[:, None] + c[None, :].to(tl.int64) * sxc, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + r[:, None] * C + c[None, :], (x * rn[:, None]).to(Y.dtype.element_ty), mask=m)
    # A clamped norm (||x|| <= eps) is stored negated: its backward has no projection term.
    tl.store(RN + r, tl.where(norm > eps, rn, -rn), mask=rmask)


@triton.jit
def _pixnorm_bwd_kernel(DY, Y, RN, DX, R, C, P, W, sdb, sdc, sdh, sdw,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = r < R
    b = r // P
    p = r % P
    drow = b * sdb + (p // W) * sdh + (p % W) * sdw
    rn = tl.load(RN + r, mask=rmask, other=1.0)
    proj = rn > 0
    rn = tl.abs(rn)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < C)[None, :]
        off = r[:, None] * C + c[None, :]
        dot += tl.sum(tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
                      * tl.load(DY + off, mask=m, other=0.0).to(tl.float32), axis=1)
    dot = tl.where(proj, dot, 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < C)[None, :]
        off = r[:, None] * C + c[None, :]
        y = tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        dx = (dy - y * dot[:, None]) * rn[:, None]
        tl.store(DX + drow[:, None] + c[None, :].to(tl.int64) * sdc, dx.to(DX.dtype.element_ty), mask=m)


def _pixnorm_blocks(C: int) -> tuple[int, int]:
    block_c = max(16, min(128, triton.next_power_of_2(C)))
    return max(1, 4096 // block_c), block_c


def pixel_normalize_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W), any strides -> (rows (B*H*W, C) contiguous in x.dtype, signed inverse norms fp32)."""
    B, C, H, W = x.shape
    R = B * H * W
    y = _alloc.empty((R, C), dtype=_store_dtype(x.dtype), device=x.device)
    rn = _alloc.empty((R,), dtype=torch.float32, device=x.device)
    BR, BC = _pixnorm_blocks(C)
    grid = launch_grid("relational_kl.pixnorm_fwd", triton.cdiv(R, BR))
    _pixnorm_fwd_kernel[grid](x, y, rn, R, C, H * W, W, *x.stride(), float(eps), BLOCK_R=BR, BLOCK_C=BC, num_warps=4)
    return y.to(x.dtype), rn


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Triton's CPU interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest): under
    the interpreter bf16 outputs are written in fp32 and rounded by torch, so tests see GPU rounding."""
    return torch.float32 if dtype == torch.bfloat16 and _interpret() else dtype


def pixel_normalize_bwd(dy: torch.Tensor, y: torch.Tensor, rn: torch.Tensor, shape: list[int],
                        channels_last: bool) -> torch.Tensor:
    """Gradient w.r.t. the (B, C, H, W) input (in y's dtype; channels_last when the input was)."""
    B, C, H, W = shape
    R = B * H * W
    dy = dy.contiguous()
    dt = _store_dtype(y.dtype)
    if channels_last:
        dx = _alloc.empty((B, H, W, C), dtype=dt, device=y.device).permute(0, 3, 1, 2)
    else:
        dx = _alloc.empty((B, C, H, W), dtype=dt, device=y.device)
    BR, BC = _pixnorm_blocks(C)
    grid = launch_grid("relational_kl.pixnorm_bwd", triton.cdiv(R, BR))
    _pixnorm_bwd_kernel[grid](dy, y, rn, dx, R, C, H * W, W, *dx.stride(), BLOCK_R=BR, BLOCK_C=BC, num_warps=4)
    return dx.to(y.dtype)
