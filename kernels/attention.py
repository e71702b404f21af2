"""FlashAttention-2 style fused attention: forward and backward Triton kernels + launchers.

``out = softmax(scale * q k^T + bias) v`` per (batch, head), never materialising the Lq x Lk map:

* forward (:func:`_attn_fwd`): one program per (query tile, batch*head) keeps its Q tile, streams
  K/V tiles and keeps the online-softmax state (running max ``m``, normaliser ``l``, fp32
  accumulator). It stores O and the per-row log-sum-exp in base 2 (``lse2 = m + log2 l``), one
  fp32 per query row, for the backward.
* backward: :func:`_attn_bwd_preprocess` computes ``delta = rowsum(dO * O)``;
  :func:`_attn_bwd_dkdv` holds a K/V tile and walks the query tiles (recomputing P from the saved
  lse, no atomics); :func:`_attn_bwd_dq` holds a Q tile and walks the key tiles. Two loops instead
  of dq atomics keep the backward deterministic.

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
(as FA2 does). fp32 inputs use ``tl.dot``'s default precision, which is TF32 on NVIDIA tensor
cores (exact fp32 under the CPU interpreter).

No validation or dispatch here: call :func:`fastdistill.fused_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdistill import _alloc, _triton

LOG2E = 1.4426950408889634  # log2(e): the kernels work with exp2, the base-2 exponent


def split_head_dim(d: int) -> tuple[int, int]:
    """Power-of-two sub-blocks ``(D0, D1)`` covering head dim ``d`` (``D1 == 0``: one block).

    ``D0`` is the largest power of two <= d (at least 16); the remainder gets the smallest power
    of two >= it (at least 16, the smallest ``tl.dot`` operand). When that would not save work
    over one padded block (e.g. 24 -> 16+16 = 32), one block is used.
    """
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    if d0 == d:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(d - d0))
    if d1 >= d0:
        return 2 * d0, 0
    return d0, d1


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    # DOT_F32: Triton's CPU interpreter multiplies bf16 operands as their raw uint16 storage
    # (numpy has no bf16), so under the interpreter bf16 tiles are upcast first. Products of bf16
    # values are exact in fp32, so this matches the GPU's bf16 x bf16 -> fp32 tensor-core dot.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 bases: B*H*L*D may exceed 2^31 elements.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = Out + b * sob + h * soh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
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
        s = _mm(q0, k0, DOT_F32)
        if D1 > 0:
            k1 = tl.load(k_base + offs_n[None, :] * skn + offs_d1[:, None] * skd,
                         mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            s += _mm(q1, k1, DOT_F32)
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
        p_lo = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + _mm(p_lo, v0, DOT_F32)
        if D1 > 0:
            v1 = tl.load(v_base + offs_n[:, None] * svn + offs_d1[None, :] * svd,
                         mask=valid_n[:, None] & in_d1[None, :], other=0.0)
            acc1 = acc1 * alpha[:, None] + _mm(p_lo, v1, DOT_F32)
        m_i = m_new

    inv_l = 1.0 / l_i
    tl.store(o_base + offs_m[:, None] * som + offs_d0[None, :] * sod,
             (acc0 * inv_l[:, None]).to(Out.dtype.element_ty), mask=valid_m[:, None] & in_d0[None, :])
    if D1 > 0:
        tl.store(o_base + offs_m[:, None] * som + offs_d1[None, :] * sod,
                 (acc1 * inv_l[:, None]).to(Out.dtype.element_ty), mask=valid_m[:, None] & in_d1[None, :])
    # Lse is (B*H, Lq) contiguous fp32, base 2.
    tl.store(Lse + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.math.log2(l_i), mask=valid_m)


@triton.jit
def _attn_bwd_preprocess(
    Out, dO, Delta,
    sob, soh, som, sod,
    sdb, sdh, sdm, sdd,
    H, Lq, D: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    # One program per (key tile, batch*head): dV = P^T dO, dK = scale * dS^T Q, dS = P * (dP - delta).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    do_base = dO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * Lq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < Lk
    offs_mb = tl.arange(0, BLOCK_M)
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
        sT = _mm(k0, qT0, DOT_F32)
        if D1 > 0:
            qT1 = tl.load(q_base + offs_m[None, :] * sqm + offs_d1[:, None] * sqd,
                          mask=valid_m[None, :] & in_d1[:, None], other=0.0)
            sT += _mm(k1, qT1, DOT_F32)
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
        pT_lo = pT.to(do0.dtype)
        dv0 += _mm(pT_lo, do0, DOT_F32)
        dpT = _mm(v0, tl.trans(do0), DOT_F32)
        if D1 > 0:
            do1 = tl.load(do_base + offs_m[:, None] * sdm + offs_d1[None, :] * sdd,
                          mask=valid_m[:, None] & in_d1[None, :], other=0.0)
            dv1 += _mm(pT_lo, do1, DOT_F32)
            dpT += _mm(v1, tl.trans(do1), DOT_F32)
        dsT = (pT * (dpT - delta[None, :])).to(qT0.dtype)
        dk0 += _mm(dsT, tl.trans(qT0), DOT_F32)
        if D1 > 0:
            dk1 += _mm(dsT, tl.trans(qT1), DOT_F32)

    dk_base = dK + b * sgb + h * sgh
    dv_base = dV + b * sgb + h * sgh
    tl.store(dk_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, (dk0 * sm_scale).to(dK.dtype.element_ty),
             mask=kv_msk0)
    tl.store(dv_base + offs_n[:, None] * sgn + offs_d0[None, :] * sgd, dv0.to(dV.dtype.element_ty), mask=kv_msk0)
    if D1 > 0:
        tl.store(dk_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd,
                 (dk1 * sm_scale).to(dK.dtype.element_ty), mask=kv_msk1)
        tl.store(dv_base + offs_n[:, None] * sgn + offs_d1[None, :] * sgd, dv1.to(dV.dtype.element_ty),
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    # One program per (query tile, batch*head): dQ = scale * dS K.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    row_base = pid_bh.to(tl.int64) * Lq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < Lq
    offs_nb = tl.arange(0, BLOCK_N)
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
        s = _mm(q0, kT0, DOT_F32)
        dp = _mm(do0, vT0, DOT_F32)
        if D1 > 0:
            kT1 = tl.load(k_base + offs_n[None, :] * skn + offs_d1[:, None] * skd,
                          mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            vT1 = tl.load(v_base + offs_n[None, :] * svn + offs_d1[:, None] * svd,
                          mask=valid_n[None, :] & in_d1[:, None], other=0.0)
            s += _mm(q1, kT1, DOT_F32)
            dp += _mm(do1, vT1, DOT_F32)
        s = s * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * smm + offs_n[None, :] * smn,
                           mask=valid_m[:, None] & valid_n[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(valid_m[:, None] & valid_n[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 += _mm(ds, tl.trans(kT0), DOT_F32)
        if D1 > 0:
            dq1 += _mm(ds, tl.trans(kT1), DOT_F32)

    dq_base = dQ + b * sgb + h * sgh
    tl.store(dq_base + offs_m[:, None] * sgm + offs_d0[None, :] * sgd, (dq0 * sm_scale).to(dQ.dtype.element_ty),
             mask=q_msk0)
    if D1 > 0:
        tl.store(dq_base + offs_m[:, None] * sgm + offs_d1[None, :] * sgd, (dq1 * sm_scale).to(dQ.dtype.element_ty),
                 mask=q_msk1)


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
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, by padded head dim.

    Shared memory (checked by compiling for sm_90 and sm_80): 16-bit inputs stay under 100 KB; fp32
    tiles are twice as large, so fp32 uses half the query tile and two stages (<= 164 KB, A100's limit).
    """
    if d_pad <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif d_pad <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    if elem_bytes > 2:
        bm, stages = max(32, bm // 2), 2
    # Short sequences (cross-attention over 77 tokens, length 1): do not loop over empty tile rows.
    return _pow2_at_least_16(lq, bm), _pow2_at_least_16(lk, bn), warps, stages


def _bwd_config(d_pad: int, elem_bytes: int = 2) -> tuple[int, int, int, int, int, int]:
    """(dkdv BLOCK_M, dkdv BLOCK_N, dq BLOCK_M, dq BLOCK_N, num_warps, num_stages)."""
    if d_pad <= 64:
        return (32, 128, 128, 32, 4, 3) if elem_bytes <= 2 else (32, 64, 64, 32, 4, 2)
    if d_pad <= 128:
        return 32, 64, 64, 32, 4, 2
    return 16, 32, 32, 16, 8, 1


def _dot_f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and _triton.interpret_mode()


def _interp_cap(block: int, length: int) -> int:
    # Under the interpreter a block is numpy work over the whole tile; size it to the data.
    return _pow2_at_least_16(length, block) if _triton.interpret_mode() else block


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      scale: float, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse2)``: out in ``q``'s shape/layout (contiguous), lse2 fp32 (B, H, Lq), base 2.

    ``bias`` is None or a 4-D (B|1, H|1, Lq|1, Lk) tensor (broadcast dims read with stride 0).
    """
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    d0, d1 = split_head_dim(D)
    bm, bn, warps, stages = _fwd_config(d0 + d1, Lq, Lk, q.element_size())
    out = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H == 0:
        return out, lse
    mstr = _bias_strides(bias)
    grid = (triton.cdiv(Lq, bm), B * H)
    _attn_fwd[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        *bhld_strides(q, layout), *bhld_strides(k, layout), *bhld_strides(v, layout), *bhld_strides(out, layout),
        *mstr,
        H, Lq, Lk, D, scale * LOG2E,
        HAS_BIAS=bias is not None, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, DOT_F32=_dot_f32(q),
        num_warps=warps, num_stages=stages,
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
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v)`` given ``do`` (same layout as ``q``)."""
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    d0, d1 = split_head_dim(D)
    kv_bm, kv_bn, q_bm, q_bn, warps, stages = _bwd_config(d0 + d1, q.element_size())
    kv_bm, q_bm = _interp_cap(kv_bm, Lq), _interp_cap(q_bm, Lq)
    kv_bn, q_bn = _interp_cap(kv_bn, Lk), _interp_cap(q_bn, Lk)
    pre_bm = _pow2_at_least_16(Lq, 64)

    dq = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0:
        return dq, dk, dv
    delta = _alloc.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_bm), B * H)](
        out, do, delta, *bhld_strides(out, layout), *bhld_strides(do, layout), H, Lq, D,
        D0=d0, D1=d1, BLOCK_M=pre_bm,
    )
    mstr = _bias_strides(bias)
    bias_arg = bias if bias is not None else q
    common = (*bhld_strides(q, layout), *bhld_strides(k, layout), *bhld_strides(v, layout), *mstr,
              *bhld_strides(do, layout))
    _attn_bwd_dkdv[(triton.cdiv(Lk, kv_bn), B * H)](
        q, k, v, bias_arg, do, lse, delta, dk, dv, *common, *bhld_strides(dk, layout),
        H, Lq, Lk, D, scale * LOG2E, scale,
        HAS_BIAS=bias is not None, D0=d0, D1=d1, BLOCK_M=kv_bm, BLOCK_N=kv_bn, DOT_F32=_dot_f32(q), num_warps=warps, num_stages=stages,
    )
    _attn_bwd_dq[(triton.cdiv(Lq, q_bm), B * H)](
        q, k, v, bias_arg, do, lse, delta, dq, *common, *bhld_strides(dq, layout),
        H, Lq, Lk, D, scale * LOG2E, scale,
        HAS_BIAS=bias is not None, D0=d0, D1=d1, BLOCK_M=q_bm, BLOCK_N=q_bn, DOT_F32=_dot_f32(q), num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


__all__ = ["split_head_dim", "attention_forward", "attention_backward", "LOG2E"]
