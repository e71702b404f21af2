"""FlashAttention-2 style fused attention: forward and backward Triton kernels + launchers.

``out = softmax(scale * q k^T + bias) v`` per (batch, head), never materialising the Lq x Lk map:

* forward (:func:`_attn_fwd`): one program per (query tile, batch*head) keeps its Q tile, streams
  K/V tiles and keeps the online-softmax state (running max ``m``, normaliser ``l``, fp32
  accumulator). It stores O and the per-row log-sum-exp in base 2 (``lse2 = m + log2 l``), one
  fp32 per query row, for the backward.
* backward: :func:`_attn_bwd_preprocess` computes ``delta = rowsum(dO * O)``, then one of two paths,
  chosen on the host by ``torch.are_deterministic_algorithms_enabled()`` (in :func:`attention_backward`).
  GEMM work in units of one ``Lq x Lk x D`` GEMM (``2*Lq*Lk*D`` FLOPs per batch*head):

  - fast (default), :func:`_attn_bwd_fused`: a program holds a K/V tile and walks the query tiles,
    recomputing P once per tile pair from the saved lse; 5 GEMMs per pair (S, dV, dP, dK in registers;
    ``dS K`` added with fp32 ``atomic_add`` into a zeroed (B, H, Lq, D) buffer, cast to the input dtype
    afterwards on the device). Backward 5 units, forward + backward 7 (FlashAttention-2's count). The
    order of the dq adds varies between runs on a GPU (dq not bit-reproducible; dK, dV are).
  - deterministic (``torch.use_deterministic_algorithms(True)``): :func:`_attn_bwd_dkdv` holds a K/V
    tile and walks the query tiles (S, dV, dP, dK: 4 GEMMs); :func:`_attn_bwd_dq` holds a Q tile and
    walks the key tiles (S, dP, dQ: 3). No atomics, bit-identical runs; backward 7 units, total 9.

Head dims (any multiple of 8 up to 256, not only powers of two): ``tl.arange`` and ``tl.dot`` need
power-of-two tiles of at least 16, so the head dim is split into at most two power-of-two
sub-blocks ``D0 + D1`` (:func:`split_head_dim`: 40 = 32+16, 80 = 64+16, 160 = 128+32, 64 = 64),
each with its own dot products and accumulators; the few columns past the real head dim are masked
loads (zeros), never copies. That costs 48/40 = 1.2x the matmul work for d=40, 80/80 + 16/80 =
1.2x for 80 and 1.0x for 160's 128+32, instead of 1.6x for padding to the next power of two.

The head dim ``D`` is a compile-time constant, so when it is a power of two the column masks fold
away and loads stay unpredicated along the contiguous dim.

Layouts: every tensor is addressed through its (batch, head, row, dim) strides, so "bhld" and
"blhd" inputs, and broadcast masks (stride 0), are read in place. Lengths Lq and Lk are arbitrary
(tails masked). The additive mask is read per tile; its gradient is not computed.

Precision: dots accumulate in fp32; P and dS are rounded to the input dtype before the second dot
(as FA2 does; the fast path's dq sums the fp32 ``dS K`` tiles in fp32 and rounds once, at the cast).
fp32 dots follow ``torch.get_float32_matmul_precision()`` (read by the launcher on the
host, passed as the ``PREC`` constexpr): ``"highest"`` runs IEEE fp32, ``"high"``/``"medium"`` TF32 tensor
cores. GEMM operands go through ``kernels._common.to_dot``/``dot``, so under the CPU interpreter the
kernels round exactly where the GPU rounds (16-bit round-to-nearest-even, TF32 operand truncation).

Grids are one-dimensional ((batch*head) x tiles on axis 0: CUDA caps axes 1 and 2 at 65,535, and
AnimateDiff's temporal attention has B*H = 65,536) and computed through ``kernels._common.launch_grid``.
Row indices are int64, so row x stride products within a slice may pass 2^31 (a dense (B, H, L, L) mask
with L >= 46,341). A query row whose keys are all masked (-inf) gives output 0 (as SDPA) and lse +inf,
so its backward recomputes p = 0: zero, finite gradients.

Tile configs: :func:`fwd_configs` / :func:`bwd_configs` (fast backward) / :func:`bwd_det_configs`
(deterministic pair), registered as ``"attention.fwd"`` / ``"attention.bwd"`` / ``"attention.bwd_det"`` for
``kernels._common.gpu_configs``; ``force_config`` overrides them.

No validation or dispatch here: call :func:`fastdistill.fused_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc
from fastdistill.kernels._common import (TL_DTYPE, TileConfig, dot, forced_config, fp32_precision, interpret,
                                         launch_grid, register_configs, split_channels, to_dot, to_dtype)

LOG2E = 1.4426950408889634  # log2(e): the kernels work with exp2, the base-2 exponent


# Head dims split in power-of-two sub-blocks D0 + D1 (40 = 32+16, 80 = 64+16, 160 = 128+32): the rule the
# relational-KL kernels use for their register tiles too.
split_head_dim = split_channels


@triton.jit
def _attn_fwd(
    Q, K, V, Bias, Out, Lse,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    smb, smh, smm, smn,
    H, Lq, Lk, D: tl.constexpr, qk_scale,
    HAS_BIAS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    # One grid axis: (batch*head) x query tiles, query tiles fastest (CUDA caps axes 1 and 2 at 65,535).
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    pid_bh = pid // n_m
    # int64 bases: B*H*L*D may exceed 2^31 elements.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = Out + b * sob + h * soh

    # int64 rows: a row index times a row stride can pass 2^31 within one (batch, head) slice
    # (a dense (B, H, L, L) mask with L >= 46,341; "blhd" layouts with large H*D).
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d0 = tl.arange(0, D0)
    valid_m = offs_m < Lq
    in_d0 = offs_d0 < D

    q0 = tl.load(q_base + offs_m[:, None] * sqm + offs_d0[None, :] * sqd,
                 mask=valid_m[:, None] & in_d0[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        in_d1 = offs_d1 < D
        q1 = tl.load(q_base + offs_m[:, None] * sqm + offs_d1[None, :] * sqd,
                     mask=valid_m[:, None] & in_d1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_BIAS:
        bias_base = Bias + b * smb + h * smh

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_nb
        valid_n = offs_n < Lk
        k0 = tl.load(k_base + offs_n[None, :] * skn + offs_d0[:, None] * skd,
                     mask=valid_n[None, :] & in_d0[:, None], other=0.0)
        s = dot(q0, k0, None, PREC)
        if D1 > 0:
            k1 = tl.load(k_base + offs_n[None, :] * skn + offs_d1[:, None] * skd,
                         mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            s += dot(q1, k1, None, PREC)
        s = s * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * smm + offs_n[None, :] * smn,
                           mask=valid_m[:, None] & valid_n[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all -inf (user mask): shift by 0, not -inf, to avoid inf-inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(v_base + offs_n[:, None] * svn + offs_d0[None, :] * svd,
                     mask=valid_n[:, None] & in_d0[None, :], other=0.0)
        p_lo = to_dot(p, DOT)
        acc0 = acc0 * alpha[:, None] + dot(p_lo, v0, None, PREC)
        if D1 > 0:
            v1 = tl.load(v_base + offs_n[:, None] * svn + offs_d1[None, :] * svd,
                         mask=valid_n[:, None] & in_d1[None, :], other=0.0)
            acc1 = acc1 * alpha[:, None] + dot(p_lo, v1, None, PREC)
        m_i = m_new

    # A row whose keys are all masked (-inf bias) has l_i == 0: its output is 0, as SDPA gives, and its
    # lse is +inf, so the backward's recomputed p = exp2(s - lse) is 0 (zero, finite gradients).
    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    inv_l = tl.where(live, 1.0 / l_safe, 0.0)
    tl.store(o_base + offs_m[:, None] * som + offs_d0[None, :] * sod,
             to_dtype(acc0 * inv_l[:, None], Out.dtype.element_ty), mask=valid_m[:, None] & in_d0[None, :])
    if D1 > 0:
        tl.store(o_base + offs_m[:, None] * som + offs_d1[None, :] * sod,
                 to_dtype(acc1 * inv_l[:, None], Out.dtype.element_ty), mask=valid_m[:, None] & in_d1[None, :])
    # Lse is (B*H, Lq) contiguous fp32, base 2.
    lse2 = tl.where(live, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * Lq + offs_m, lse2, mask=valid_m)


@triton.jit
def _attn_bwd_preprocess(
    Out, dO, Delta,
    sob, soh, som, sod,
    sdb, sdh, sdm, sdd,
    H, Lq, D: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
):
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    pid_bh = pid // n_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < Lq
    offs_d0 = tl.arange(0, D0)
    msk = valid_m[:, None] & (offs_d0[None, :] < D)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d0[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d0[None, :] * sdd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        msk1 = valid_m[:, None] & (offs_d1[None, :] < D)
        o1 = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d1[None, :] * sod, mask=msk1, other=0.0)
        do1 = tl.load(dO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d1[None, :] * sdd, mask=msk1,
                      other=0.0)
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=valid_m)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Bias, dO, Lse, Delta, dK, dV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdb, sdh, sdm, sdd,
    sgb, sgh, sgn, sgd,
    H, Lq, Lk, D: tl.constexpr, qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    # One program per (key tile, batch*head): dV = P^T dO, dK = scale * dS^T Q, dS = P * (dP - delta).
    n_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    pid_bh = pid // n_n
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    do_base = dO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * Lq

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < Lk
    offs_mb = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d0 = tl.arange(0, D0)
    in_d0 = offs_d0 < D
    kv_msk0 = valid_n[:, None] & in_d0[None, :]
    k0 = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d0[None, :] * skd, mask=kv_msk0, other=0.0)
    v0 = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d0[None, :] * svd, mask=kv_msk0, other=0.0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        in_d1 = offs_d1 < D
        kv_msk1 = valid_n[:, None] & in_d1[None, :]
        k1 = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d1[None, :] * skd, mask=kv_msk1,
                     other=0.0)
        v1 = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d1[None, :] * svd, mask=kv_msk1,
                     other=0.0)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if HAS_BIAS:
        bias_base = Bias + b * smb + h * smh

    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + offs_mb
        valid_m = offs_m < Lq
        qT0 = tl.load(q_base + offs_m[None, :] * sqm + offs_d0[:, None] * sqd,
                      mask=valid_m[None, :] & in_d0[:, None], other=0.0)
        sT = dot(k0, qT0, None, PREC)
        if D1 > 0:
            qT1 = tl.load(q_base + offs_m[None, :] * sqm + offs_d1[:, None] * sqd,
                          mask=valid_m[None, :] & in_d1[:, None], other=0.0)
            sT += dot(k1, qT1, None, PREC)
        sT = sT * qk_scale
        if HAS_BIAS:
            biasT = tl.load(bias_base + offs_m[None, :] * smm + offs_n[:, None] * smn,
                            mask=valid_m[None, :] & valid_n[:, None], other=0.0)
            sT += biasT.to(tl.float32) * 1.4426950408889634
        lse = tl.load(Lse + row_base + offs_m, mask=valid_m, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=valid_m, other=0.0)
        pT = tl.math.exp2(sT - lse[None, :])
        pT = tl.where(valid_m[None, :] & valid_n[:, None], pT, 0.0)
        do0 = tl.load(do_base + offs_m[:, None] * sdm + offs_d0[None, :] * sdd,
                      mask=valid_m[:, None] & in_d0[None, :], other=0.0)
        pT_lo = to_dot(pT, DOT)
        dv0 += dot(pT_lo, do0, None, PREC)
        dpT = dot(v0, tl.trans(do0), None, PREC)
        if D1 > 0:
            do1 = tl.load(do_base + offs_m[:, None] * sdm + offs_d1[None, :] * sdd,
                          mask=valid_m[:, None] & in_d1[None, :], other=0.0)
            dv1 += dot(pT_lo, do1, None, PREC)
            dpT += dot(v1, tl.trans(do1), None, PREC)
        dsT = to_dot(pT * (dpT - delta[None, :]), DOT)
        dk0 += dot(dsT, tl.trans(qT0), None, PREC)
        if D1 > 0:
            dk1 += dot(dsT, tl.trans(qT1), None, PREC)

    dk_base = dK + b * sgb + h * sgh
    dv_base = dV + b * sgb + h * sgh
    tl.store(dk_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, to_dtype(dk0 * sm_scale, dK.dtype.element_ty),
             mask=kv_msk0)
    tl.store(dv_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, to_dtype(dv0, dV.dtype.element_ty), mask=kv_msk0)
    if D1 > 0:
        tl.store(dk_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd,
                 to_dtype(dk1 * sm_scale, dK.dtype.element_ty), mask=kv_msk1)
        tl.store(dv_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd, to_dtype(dv1, dV.dtype.element_ty),
                 mask=kv_msk1)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Bias, dO, Lse, Delta, dQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdb, sdh, sdm, sdd,
    sgb, sgh, sgm, sgd,
    H, Lq, Lk, D: tl.constexpr, qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    # One program per (query tile, batch*head): dQ = scale * dS K.
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    pid_bh = pid // n_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    row_base = pid_bh.to(tl.int64) * Lq

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < Lq
    offs_nb = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d0 = tl.arange(0, D0)
    in_d0 = offs_d0 < D
    q_msk0 = valid_m[:, None] & in_d0[None, :]
    q0 = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d0[None, :] * sqd, mask=q_msk0, other=0.0)
    do0 = tl.load(dO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d0[None, :] * sdd, mask=q_msk0, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        in_d1 = offs_d1 < D
        q_msk1 = valid_m[:, None] & in_d1[None, :]
        q1 = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d1[None, :] * sqd, mask=q_msk1,
                     other=0.0)
        do1 = tl.load(dO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d1[None, :] * sdd, mask=q_msk1,
                      other=0.0)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse = tl.load(Lse + row_base + offs_m, mask=valid_m, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=valid_m, other=0.0)
    if HAS_BIAS:
        bias_base = Bias + b * smb + h * smh

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_nb
        valid_n = offs_n < Lk
        kT0 = tl.load(k_base + offs_n[None, :] * skn + offs_d0[:, None] * skd,
                      mask=valid_n[None, :] & in_d0[:, None], other=0.0)
        vT0 = tl.load(v_base + offs_n[None, :] * svn + offs_d0[:, None] * svd,
                      mask=valid_n[None, :] & in_d0[:, None], other=0.0)
        s = dot(q0, kT0, None, PREC)
        dp = dot(do0, vT0, None, PREC)
        if D1 > 0:
            kT1 = tl.load(k_base + offs_n[None, :] * skn + offs_d1[:, None] * skd,
                          mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            vT1 = tl.load(v_base + offs_n[None, :] * svn + offs_d1[:, None] * svd,
                          mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            s += dot(q1, kT1, None, PREC)
            dp += dot(do1, vT1, None, PREC)
        s = s * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * smm + offs_n[None, :] * smn,
                           mask=valid_m[:, None] & valid_n[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(valid_m[:, None] & valid_n[None, :], p, 0.0)
        ds = to_dot(p * (dp - delta[:, None]), DOT)
        dq0 += dot(ds, tl.trans(kT0), None, PREC)
        if D1 > 0:
            dq1 += dot(ds, tl.trans(kT1), None, PREC)

    dq_base = dQ + b * sgb + h * sgh
    tl.store(dq_base + offs_m[:, None] * sgm + offs_d0[None, :] * sgd, to_dtype(dq0 * sm_scale, dQ.dtype.element_ty),
             mask=q_msk0)
    if D1 > 0:
        tl.store(dq_base + offs_m[:, None] * sgm + offs_d1[None, :] * sgd,
                 to_dtype(dq1 * sm_scale, dQ.dtype.element_ty),
                 mask=q_msk1)


@triton.jit
def _attn_bwd_fused(
    Q, K, V, Bias, dO, Lse, Delta, dK, dV, dQacc,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdb, sdh, sdm, sdd,
    sgb, sgh, sgn, sgd,
    sab, sah, sam, sad,
    H, Lq, Lk, D: tl.constexpr, qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    # The fast backward (FA2): one program per (key tile, batch*head) walks the query tiles and, per tile
    # pair, recomputes S once and runs 5 GEMMs: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and
    # dQ_tile = dS K. dK/dV stay in registers; dQ_tile (already times sm_scale) is added with fp32 atomics
    # into dQacc, a zeroed (B, H, Lq, D) buffer shared by the key tiles. The order of those adds varies
    # between runs (not bit-reproducible): deterministic mode uses _attn_bwd_dkdv + _attn_bwd_dq instead.
    n_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    pid_bh = pid // n_n
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    do_base = dO + b * sdb + h * sdh
    dqa_base = dQacc + b * sab + h * sah
    row_base = pid_bh.to(tl.int64) * Lq

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < Lk
    offs_mb = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d0 = tl.arange(0, D0)
    in_d0 = offs_d0 < D
    kv_msk0 = valid_n[:, None] & in_d0[None, :]
    k0 = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d0[None, :] * skd, mask=kv_msk0, other=0.0)
    v0 = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d0[None, :] * svd, mask=kv_msk0, other=0.0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        in_d1 = offs_d1 < D
        kv_msk1 = valid_n[:, None] & in_d1[None, :]
        k1 = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d1[None, :] * skd, mask=kv_msk1,
                     other=0.0)
        v1 = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d1[None, :] * svd, mask=kv_msk1,
                     other=0.0)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if HAS_BIAS:
        bias_base = Bias + b * smb + h * smh

    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + offs_mb
        valid_m = offs_m < Lq
        qT0 = tl.load(q_base + offs_m[None, :] * sqm + offs_d0[:, None] * sqd,
                      mask=valid_m[None, :] & in_d0[:, None], other=0.0)
        sT = dot(k0, qT0, None, PREC)
        if D1 > 0:
            qT1 = tl.load(q_base + offs_m[None, :] * sqm + offs_d1[:, None] * sqd,
                          mask=valid_m[None, :] & in_d1[:, None], other=0.0)
            sT += dot(k1, qT1, None, PREC)
        sT = sT * qk_scale
        if HAS_BIAS:
            biasT = tl.load(bias_base + offs_m[None, :] * smm + offs_n[:, None] * smn,
                            mask=valid_m[None, :] & valid_n[:, None], other=0.0)
            sT += biasT.to(tl.float32) * 1.4426950408889634
        lse = tl.load(Lse + row_base + offs_m, mask=valid_m, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=valid_m, other=0.0)
        # Fully masked rows have lse = +inf: p = exp2(s - inf) = 0, so they add nothing anywhere.
        pT = tl.math.exp2(sT - lse[None, :])
        pT = tl.where(valid_m[None, :] & valid_n[:, None], pT, 0.0)
        do0 = tl.load(do_base + offs_m[:, None] * sdm + offs_d0[None, :] * sdd,
                      mask=valid_m[:, None] & in_d0[None, :], other=0.0)
        pT_lo = to_dot(pT, DOT)
        dv0 += dot(pT_lo, do0, None, PREC)
        dpT = dot(v0, tl.trans(do0), None, PREC)
        if D1 > 0:
            do1 = tl.load(do_base + offs_m[:, None] * sdm + offs_d1[None, :] * sdd,
                          mask=valid_m[:, None] & in_d1[None, :], other=0.0)
            dv1 += dot(pT_lo, do1, None, PREC)
            dpT += dot(v1, tl.trans(do1), None, PREC)
        dsT = to_dot(pT * (dpT - delta[None, :]), DOT)
        dk0 += dot(dsT, tl.trans(qT0), None, PREC)
        ds = tl.trans(dsT)
        # Relaxed atomics: the adds only need to be atomic, not ordered (the launcher reads dQacc after
        # the kernel). Rows past Lq and columns past D are masked off.
        dq0 = dot(ds, k0, None, PREC)
        tl.atomic_add(dqa_base + offs_m[:, None] * sam + offs_d0[None, :] * sad, dq0 * sm_scale,
                      mask=valid_m[:, None] & in_d0[None, :], sem="relaxed")
        if D1 > 0:
            dk1 += dot(dsT, tl.trans(qT1), None, PREC)
            dq1 = dot(ds, k1, None, PREC)
            tl.atomic_add(dqa_base + offs_m[:, None] * sam + offs_d1[None, :] * sad, dq1 * sm_scale,
                          mask=valid_m[:, None] & in_d1[None, :], sem="relaxed")

    dk_base = dK + b * sgb + h * sgh
    dv_base = dV + b * sgb + h * sgh
    # to_dtype: round to nearest even under the interpreter too (its own fp32 -> bf16 cast truncates).
    g_ty = dK.dtype.element_ty
    tl.store(dk_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, to_dtype(dk0 * sm_scale, g_ty), mask=kv_msk0)
    tl.store(dv_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, to_dtype(dv0, g_ty), mask=kv_msk0)
    if D1 > 0:
        tl.store(dk_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd, to_dtype(dk1 * sm_scale, g_ty),
                 mask=kv_msk1)
        tl.store(dv_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd, to_dtype(dv1, g_ty), mask=kv_msk1)


# ----------------------------------------------------------------------------------------------
# Launchers. Tensors arrive validated; ``layout`` says how (batch, head, row, dim) map to dims.
# ----------------------------------------------------------------------------------------------

def bhld_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a 4-D tensor in ``layout`` ("bhld" or "blhd")."""
    s = t.stride()
    return (s[0], s[1], s[2], s[3]) if layout == "bhld" else (s[0], s[2], s[1], s[3])


def dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a 4-D tensor in ``layout``."""
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "bhld" else (b, y, x, d)


def _pow2_at_least_16(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _fwd_config(d_pad: int, lq: int, lk: int, elem_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, by padded head dim ``D0 + D1``.

    16-bit inputs, chosen by compiling the masked forward (the heaviest: a float mask with an unaligned
    row stride, Lk = 77) for sm_90: no spills (ptxas, bytes per thread). The previous (128, 64, 4 warps,
    3 stages) spilled 5,308 B at d=40 and 324 B at d=64, and (128, 64, 8, 3) 1,664 B at d=128; 128-row
    query tiles with 8 warps keep one 64-row wgmma tile per warpgroup. fp32 tiles are twice as large:
    fp32 uses half the query tile and two stages (shared memory <= 164 KB, A100's limit).
    """
    if d_pad <= 64:
        bm, bn, warps, stages = 128, 32, 8, 3  # sm_90 regs: 123 (d=40), 235 (d=64)
    elif d_pad <= 96:
        bm, bn, warps, stages = 128, 64, 8, 3  # 223 (d=80, d=96)
    elif d_pad <= 128:
        bm, bn, warps, stages = 128, 32, 8, 3  # 247 (d=128)
    else:
        bm, bn, warps, stages = 64, 32, 8, 2  # 138 (d=160), 226 (d=256)
    if elem_bytes > 2:
        bm, stages = max(32, bm // 2), 2
    # Short sequences (cross-attention over 77 tokens, length 1): do not loop over empty tile rows.
    return _pow2_at_least_16(lq, bm), _pow2_at_least_16(lk, bn), warps, stages


def _bwd_fast_config(d_pad: int, elem_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the fast backward :func:`_attn_bwd_fused` (BLOCK_N keys
    per program, BLOCK_M query rows per step), by padded head dim ``D0 + D1``.

    Chosen with scripts/compile_audit.py for sm_90 (with and without a mask, Lk = 77 and 256, d = 40, 64, 80,
    96, 128, 160, 256): no spills in 16-bit (ptxas registers per thread in the comments, masked); fp32 at
    most 36 B (TF32 at d=80, IEEE at d=256; the two-kernel path spills up to 48 KB in IEEE fp32). The atomic
    dq tile is the extra pressure over the two-kernel path: with 4 warps 64x64 tiles spill (232-1184 B at
    d = 80-160), with 8 they do not."""
    if elem_bytes > 2:
        # IEEE fp32 runs its dots on FMA units (no tensor cores): 16-row query steps. (32, 64) spilled
        # 1-2 KB at d=40 and 4 KB at d=128; (16, 64) 1.4-3 KB at d=96.
        if d_pad <= 64 or 96 < d_pad <= 128:
            return 16, 64, 8, 1
        return 16, 32, 8, 1  # d=80 TF32 / d=256 IEEE: 8-36 B of spill; (16, 16) none, at twice the dq atomics
    # sm_90 registers (masked). On sm_80 these spill at most 36 B (d=80, d=256), where (64, 64) spilled
    # 256-3548 B at d = 40-96 (mma.sync keeps more live registers than wgmma).
    if d_pad <= 80:
        return 32, 64, 8, 2  # 210 (d=40), 128 (d=64), 244 (d=80)
    if d_pad <= 96:
        return 16, 64, 8, 2  # 152 (d=96); (32, 64) spilled 308 B on sm_80
    if d_pad <= 128:
        return 64, 64, 8, 2  # 238 (d=128)
    if d_pad <= 160:
        return 16, 64, 8, 2  # 214 (d=160); (32, 64) spilled 448 B, (64, 64) takes 164 KB of shared memory
    return 16, 32, 8, 1  # 255 (d=256); (16, 64) spilled 908 B


def _bwd_config(d_pad: int, elem_bytes: int = 2) -> tuple[int, int, int, int, int, int]:
    """Deterministic backward: (dkdv BLOCK_M, dkdv BLOCK_N, dq BLOCK_M, dq BLOCK_N, num_warps, num_stages).

    16-bit: no spills on sm_90 for the masked backward at Lk = 77 (the previous configs spilled 224/248 B
    at d=64, 88 B at d=128 and 212/20 B at d=160)."""
    if elem_bytes > 2:
        if d_pad <= 64:
            return 32, 64, 64, 32, 4, 2
        if d_pad <= 128:
            return 32, 64, 64, 32, 4, 2
        return 16, 32, 32, 16, 8, 1
    # d=40 (32+16) takes the d<=96 tiles: (32, 128, 128, 32, 4 warps, 3 stages) spilled 216-304 B in dkdv
    # and 308 B in the masked dq on sm_90 (scripts/compile_audit.py).
    if d_pad <= 96:
        return 32, 64, 64, 32, 4, 2  # 168 / 189 (d=64), 221 / 227 (d=80), 242 / 183 (d=96)
    if d_pad <= 128:
        return 32, 64, 64, 32, 8, 2  # 178 / 166 (d=128)
    if d_pad <= 160:
        return 32, 64, 64, 32, 8, 1  # 248 / 207 (d=160)
    return 16, 32, 32, 16, 8, 1  # 174 / 255 (d=256)


def _elem_bytes(dtype: torch.dtype) -> int:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"attention: no kernel for {dtype}")
    return torch.empty((), dtype=dtype).element_size()


@register_configs("attention.fwd")
def fwd_configs(head_dim: int, lq: int, lk: int, dtype: torch.dtype = torch.bfloat16) -> list[TileConfig]:
    """The forward's GPU config for a problem (one: the forward is not autotuned)."""
    d0, d1 = split_head_dim(head_dim)
    bm, bn, warps, stages = _fwd_config(d0 + d1, lq, lk, _elem_bytes(dtype))
    return [TileConfig({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)]


@register_configs("attention.bwd")
def bwd_configs(head_dim: int, lq: int, lk: int, dtype: torch.dtype = torch.bfloat16) -> list[TileConfig]:
    """The fast backward's GPU config (:func:`_attn_bwd_fused`; one: not autotuned)."""
    d0, d1 = split_head_dim(head_dim)
    bm, bn, warps, stages = _bwd_fast_config(d0 + d1, _elem_bytes(dtype))
    return [TileConfig({"KV_BLOCK_M": bm, "KV_BLOCK_N": bn}, num_warps=warps, num_stages=stages)]


@register_configs("attention.bwd_det")
def bwd_det_configs(head_dim: int, lq: int, lk: int, dtype: torch.dtype = torch.bfloat16) -> list[TileConfig]:
    """The deterministic backward's GPU config (dK/dV and dQ kernels; one: not autotuned)."""
    d0, d1 = split_head_dim(head_dim)
    kv_bm, kv_bn, q_bm, q_bn, warps, stages = _bwd_config(d0 + d1, _elem_bytes(dtype))
    return [TileConfig({"KV_BLOCK_M": kv_bm, "KV_BLOCK_N": kv_bn, "Q_BLOCK_M": q_bm, "Q_BLOCK_N": q_bn},
                       num_warps=warps, num_stages=stages)]


def _config(kernel: str, head_dim: int, lq: int, lk: int, dtype: torch.dtype) -> TileConfig:
    """The forced config, else the GPU config (under the interpreter with tiles capped to the data:
    a block is numpy work over the whole tile there)."""
    cfg = forced_config(kernel)
    if cfg is not None:
        return cfg
    fn = {"attention.fwd": fwd_configs, "attention.bwd": bwd_configs, "attention.bwd_det": bwd_det_configs}[kernel]
    cfg = fn(head_dim, lq, lk, dtype)[0]
    if interpret():
        caps = {"BLOCK_M": lq, "BLOCK_N": lk, "KV_BLOCK_M": lq, "KV_BLOCK_N": lk, "Q_BLOCK_M": lq, "Q_BLOCK_N": lk}
        cfg = TileConfig({k: _pow2_at_least_16(caps[k], v) for k, v in cfg.blocks}, cfg.num_warps, cfg.num_stages)
    return cfg


def _dot_args(t: torch.Tensor) -> dict:
    """``DOT`` (the GEMM operand dtype) and ``PREC`` (fp32: torch's fp32 matmul precision policy)."""
    return dict(DOT=TL_DTYPE[t.dtype], PREC=fp32_precision() if t.dtype == torch.float32 else None)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      scale: float, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse2)``: out in ``q``'s shape/layout (contiguous), lse2 fp32 (B, H, Lq), base 2.

    ``bias`` is None or a 4-D (B|1, H|1, Lq|1, Lk) tensor (broadcast dims read with stride 0). A query row
    whose keys are all masked gets output 0 and lse2 = +inf.
    """
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    d0, d1 = split_head_dim(D)
    cfg = _config("attention.fwd", D, Lq, Lk, q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H == 0 or Lq == 0:
        return out, lse
    mstr = _bias_strides(bias)
    grid = launch_grid("attention.fwd", triton.cdiv(Lq, bm) * B * H)
    _attn_fwd[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        *bhld_strides(q, layout), *bhld_strides(k, layout), *bhld_strides(v, layout), *bhld_strides(out, layout),
        *mstr,
        H, Lq, Lk, D, scale * LOG2E,
        HAS_BIAS=bias is not None, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, **_dot_args(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    if bias is None:
        return (0, 0, 0, 0)
    # Broadcast dims of size 1 are read with stride 0 (no expand copy needed).
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))  # type: ignore[return-value]


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, bias: torch.Tensor | None, scale: float,
                       layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v)`` given ``do`` (same layout as ``q``).

    Default: the fast backward (:func:`_attn_bwd_fused`, 5 GEMMs per tile pair, dq through fp32 atomics;
    not bit-reproducible). Under ``torch.use_deterministic_algorithms(True)`` (read here, on the host):
    :func:`_attn_bwd_dkdv` + :func:`_attn_bwd_dq` (7 GEMMs per tile pair, no atomics, bit-identical runs).
    """
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    d0, d1 = split_head_dim(D)
    deterministic = torch.are_deterministic_algorithms_enabled()
    pre_bm = _pow2_at_least_16(Lq, 64)

    dk = _alloc.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc.empty(v.shape, dtype=v.dtype, device=v.device)
    if deterministic:
        dq = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        # fp32 accumulator of the atomic adds, in q's shape (contiguous, as dq): zeroed, since every key
        # tile adds into it (and with Lk == 0 nothing does: dq = 0).
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if B * H == 0:
        return dq.to(q.dtype), dk, dv
    delta = _alloc.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if Lq > 0:
        _attn_bwd_preprocess[launch_grid("attention.bwd_preprocess", triton.cdiv(Lq, pre_bm) * B * H)](
            out, do, delta, *bhld_strides(out, layout), *bhld_strides(do, layout), H, Lq, D,
            D0=d0, D1=d1, BLOCK_M=pre_bm,
        )
    mstr = _bias_strides(bias)
    bias_arg = bias if bias is not None else q
    common = (*bhld_strides(q, layout), *bhld_strides(k, layout), *bhld_strides(v, layout), *mstr,
              *bhld_strides(do, layout))
    if not deterministic:
        cfg = _config("attention.bwd", D, Lq, Lk, q.dtype)
        bm, bn = cfg["KV_BLOCK_M"], cfg["KV_BLOCK_N"]
        if Lk > 0:
            _attn_bwd_fused[launch_grid("attention.bwd_fused", triton.cdiv(Lk, bn) * B * H)](
                q, k, v, bias_arg, do, lse, delta, dk, dv, dq, *common, *bhld_strides(dk, layout),
                *bhld_strides(dq, layout), H, Lq, Lk, D, scale * LOG2E, scale,
                HAS_BIAS=bias is not None, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, **_dot_args(q),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        # fp32: the accumulator is dq; 16-bit: one cast on the device (round to nearest even, no sync).
        return dq.to(q.dtype), dk, dv

    cfg = _config("attention.bwd_det", D, Lq, Lk, q.dtype)
    kv_bm, kv_bn, q_bm, q_bn = cfg["KV_BLOCK_M"], cfg["KV_BLOCK_N"], cfg["Q_BLOCK_M"], cfg["Q_BLOCK_N"]
    meta = dict(HAS_BIAS=bias is not None, D0=d0, D1=d1, **_dot_args(q), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    if Lk > 0:
        _attn_bwd_dkdv[launch_grid("attention.bwd_dkdv", triton.cdiv(Lk, kv_bn) * B * H)](
            q, k, v, bias_arg, do, lse, delta, dk, dv, *common, *bhld_strides(dk, layout),
            H, Lq, Lk, D, scale * LOG2E, scale, BLOCK_M=kv_bm, BLOCK_N=kv_bn, **meta,
        )
    if Lq > 0:
        _attn_bwd_dq[launch_grid("attention.bwd_dq", triton.cdiv(Lq, q_bm) * B * H)](
            q, k, v, bias_arg, do, lse, delta, dq, *common, *bhld_strides(dq, layout),
            H, Lq, Lk, D, scale * LOG2E, scale, BLOCK_M=q_bm, BLOCK_N=q_bn, **meta,
        )
    return dq, dk, dv


__all__ = ["split_head_dim", "attention_forward", "attention_backward", "LOG2E", "fwd_configs", "bwd_configs",
           "bwd_det_configs"]
