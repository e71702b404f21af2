"""kernels/relational_kl_chunked.py: the chunked (cuBLAS GEMMs + one Triton elementwise kernel) backward of
the relational-KL core against a float64 autograd reference, lse from the real forward."""

from __future__ import annotations

import pytest
import torch

from fastdistill import testing
from fastdistill.kernels import relational_kl as K
from fastdistill.kernels import relational_kl_chunked as C

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max|err| / max|ref| over each gradient. Measured (interpreter, 40 seeds x every case of CASES per dtype):
# fp32 worst 8.6e-6 (symmetric_chunks; logits recomputed by a GEMM whose accumulation order differs from the
# forward's lse: ~eps x |logits|), bf16 4.7e-3, fp16 5.3e-4 (dS rounded once to the GEMM dtype; logits
# exact products of the 16-bit operands, fp32 accumulation). Bounds keep >= 3x over the worst.
RTOL = {torch.float32: 3e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}

SCALE_S, SCALE_T = 0.8, 1.3


def _dense_kl(qs, ks, qt, kt, S):
    """fp64 KL (G, N, NSEG) of (G, rows, C) tensors: the formula, materialised."""
    s = (qs @ ks.transpose(-1, -2)) * SCALE_S
    t = (qt @ kt.transpose(-1, -2)) * SCALE_T
    G, N, M = s.shape
    s, t = s.view(G, N, M // S, S), t.view(G, N, M // S, S)
    return (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)


def _ref_grads(dkl, q_s, k_s, q_t, k_t, k_index, S, symmetric):
    """fp64 autograd gradients of sum(dkl * KL) w.r.t. q_s and k_s (symmetric: w.r.t. the one tensor)."""
    G1, G2 = q_s.shape[:2]
    f = lambda x: x.detach().double().reshape(G1 * G2, x.shape[2], x.shape[3])  # noqa: E731
    qs = f(q_s).requires_grad_()
    ks = qs if symmetric else f(k_s)
    if k_index is not None:
        ks = ks.index_select(1, k_index)
    elif not symmetric:
        ks.requires_grad_()
    qt = f(q_t)
    kt = qt if symmetric else f(k_t)
    if k_index is not None:
        kt = kt.index_select(1, k_index)
    kl = _dense_kl(qs, ks, qt, kt, S)
    (kl * dkl.double().reshape(kl.shape)).sum().backward()
    dq = qs.grad.reshape(q_s.shape)
    dk = ks.grad.reshape(k_s.shape) if (not symmetric and k_index is None) else None
    return dq, dk


def _inputs(G1, G2, N, Mb, CS, CT, dtype, gen, strided=False):
    def make(n, c):
        if strided:  # (G1, n, G2, c) storage seen as (G1, G2, n, c): no unit row/group strides
            return testing.randn(G1, n, G2, c, dtype=dtype, gen=gen).transpose(1, 2)
        return testing.randn(G1, G2, n, c, dtype=dtype, gen=gen)
    return make(N, CS), make(Mb, CS), make(N, CT), make(Mb, CT)


def _budget_rows(monkeypatch, elems):
    """Chunks cut by the slab budget alone (the symmetric chunk floor off)."""
    monkeypatch.setattr(C, "CHUNK_ELEMS_CPU", elems)
    monkeypatch.setattr(C, "SYM_MIN_CHUNKS", 1)
    monkeypatch.setattr(C, "SYM_MIN_ROWS", 1)


def _run(case, dtype, gen, monkeypatch):
    """Build a case, run the forward (for lse) and the chunked backward; returns (got, ref, (q_s, k_s))."""
    G1, G2, N, Mb, CS, CT, S, idx_len, mode, chunk_rows = case
    symmetric = mode == "sym"
    q_s, k_s, q_t, k_t = _inputs(G1, G2, N, Mb, CS, CT, dtype, gen, strided=mode == "strided")
    if symmetric:
        k_s, k_t = q_s, q_t
    k_index = torch.randperm(Mb, generator=gen)[:idx_len] if idx_len else None
    M = idx_len or Mb
    _, lse_s, lse_t = K.relational_kl_fwd(q_s, k_s, q_t, k_t, k_index, SCALE_S, SCALE_T, S)
    dkl = testing.randn(G1, G2, N, M // S, gen=gen) / (G1 * G2 * N)  # a mean's scale: small, mixed signs
    if chunk_rows:  # the budget in elements: chunk_rows rows of one group (symmetric: of the full width)
        _budget_rows(monkeypatch, chunk_rows * M)
    need_dk = k_index is None and not symmetric
    got = C.relational_kl_bwd_chunked(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, SCALE_S, SCALE_T, S,
                                      True, need_dk, symmetric)
    ref = _ref_grads(dkl, q_s, k_s, q_t, k_t, k_index, S, symmetric)
    return got, ref, (q_s, k_s)


# (G1, G2, N, M_or_bank, CS, CT, S, k_index length, mode, rows per chunk (None: module budget)).
CASES = {
    # dq and dk; 4 chunks of 4 rows (13 = 3 x 4 + 1), 3 segments, CS != CT.
    "dq_dk_chunks_segments": (1, 2, 13, 12, 40, 24, 4, None, "plain", 4),
    # one segment over all keys, a single chunk; strided inputs (no unit row strides).
    "dq_dk_strided_one_segment": (2, 1, 9, 11, 17, 33, 11, None, "strided", None),
    # group batches: 3 groups, budget of 2 groups x N rows -> batches [0, 2), [2, 3).
    "dq_dk_group_batches": (3, 1, 6, 8, 12, 20, 2, None, "plain", 12),
    # memory bank: 12 of 20 keys through k_index (dq only), 2 segments, 3 chunks of 5 rows (11 rows).
    "bank_index": (1, 1, 11, 20, 24, 16, 6, 12, "plain", 5),
    # symmetric self-relation: 14 rows, 7-key segments, chunks of 4 rows (4, 4, 4, 2).
    "symmetric_chunks": (2, 1, 14, 14, 20, 12, 7, None, "sym", 4),
    # symmetric, one chunk, segments of 5 over 15 rows.
    "symmetric_one_chunk": (1, 1, 15, 15, 9, 30, 5, None, "sym", None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_fp64_autograd(name, dtype, monkeypatch):
    gen = testing.generator()
    (dq, dk), (rdq, rdk), (q_s, k_s) = _run(CASES[name], dtype, gen, monkeypatch)
    assert dq.dtype == torch.float32 and dq.is_contiguous() and dq.shape == q_s.shape
    for got, ref, what in ((dq, rdq, "dq"), (dk, rdk, "dk")):
        if ref is None:
            assert got is None, what
            continue
        assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == ref.shape, what
        assert torch.isfinite(got).all(), what
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]:g}"


def test_mixed_dtypes_follow_the_gemm_dtype_rule(monkeypatch):
    """bf16 queries against an fp32 bank (student GEMM in bf16: the bank rounded to bf16, as autocast's matmul
    would), fp16 teacher queries against bf16 keys (teacher GEMM in fp32): against fp64 on the operands
    rounded to each side's GEMM dtype."""
    gen = testing.generator()
    G1, G2, N, Mb, CS, CT, S = 1, 1, 10, 18, 24, 12, 4
    q_s = testing.randn(G1, G2, N, CS, dtype=torch.bfloat16, gen=gen)
    k_s = testing.randn(G1, G2, Mb, CS, gen=gen)
    q_t = testing.randn(G1, G2, N, CT, dtype=torch.float16, gen=gen)
    k_t = testing.randn(G1, G2, Mb, CT, dtype=torch.bfloat16, gen=gen)
    k_index = torch.randperm(Mb, generator=gen)[:12]
    _, lse_s, lse_t = K.relational_kl_fwd(q_s, k_s, q_t, k_t, k_index, SCALE_S, SCALE_T, S)
    dkl = testing.randn(G1, G2, N, 12 // S, gen=gen) / N
    _budget_rows(monkeypatch, 4 * 12)
    dq, dk = C.relational_kl_bwd_chunked(dkl, q_s, k_s, q_t, k_t, k_index, lse_s, lse_t, SCALE_S, SCALE_T, S,
                                         True, False, False)
    assert dk is None
    rdq, _ = _ref_grads(dkl, q_s, k_s.to(torch.bfloat16), q_t, k_t, k_index, S, False)
    err = (dq.double() - rdq).abs().max() / rdq.abs().max()
    assert err <= RTOL[torch.bfloat16], f"dq: relative error {err:.3g}"


def test_symmetric_equals_dq_plus_dk_of_two_tensors(monkeypatch):
    """The symmetric path's one gradient is the non-symmetric path's dq + dk on q = k (same values)."""
    gen = testing.generator()
    G1, G2, N, Cs, Ct, S = 1, 2, 13, 16, 10, 13
    x = testing.randn(G1, G2, N, Cs, gen=gen)
    y = testing.randn(G1, G2, N, Ct, gen=gen)
    _, lse_s, lse_t = K.relational_kl_fwd(x, x, y, y, None, SCALE_S, SCALE_T, S)
    dkl = testing.randn(G1, G2, N, 1, gen=gen)
    _budget_rows(monkeypatch, 3 * N)
    dx, none = C.relational_kl_bwd_chunked(dkl, x, x, y, y, None, lse_s, lse_t, SCALE_S, SCALE_T, S, True, True, True)
    assert none is None
    dq, dk = C.relational_kl_bwd_chunked(dkl, x, x.clone(), y, y.clone(), None, lse_s, lse_t, SCALE_S, SCALE_T, S,
                                         True, True, False)
    # The paths recompute the same logits with different accumulation orders (s_ji from row i's GEMM):
    # ~eps x |logits| relative in p. Measured worst (5 seeds) 5.4e-6 of max|dq| + max|dk|.
    err = (dx - dq - dk).abs().max() / (dq.abs().max() + dk.abs().max())
    assert err <= 2e-5, f"symmetric vs dq + dk: {err:.3g}"


@pytest.mark.parametrize("mode", ["plain", "sym"])
def test_two_runs_bit_identical(mode, monkeypatch):
    """No atomics, chunks accumulated in a fixed order: the same inputs give the same bits (4 chunks)."""
    gen = testing.generator()
    G1, G2, N, M, CS, CT, S = 1, 1, 11, 11, 20, 8, 11
    q_s, k_s, q_t, k_t = _inputs(G1, G2, N, M, CS, CT, torch.bfloat16, gen)
    if mode == "sym":
        k_s, k_t = q_s, q_t
    _, lse_s, lse_t = K.relational_kl_fwd(q_s, k_s, q_t, k_t, None, SCALE_S, SCALE_T, S)
    dkl = testing.randn(G1, G2, N, 1, gen=gen)
    _budget_rows(monkeypatch, 3 * M)
    args = (dkl, q_s, k_s, q_t, k_t, None, lse_s, lse_t, SCALE_S, SCALE_T, S, True, mode != "sym", mode == "sym")
    r1, r2 = C.relational_kl_bwd_chunked(*args), C.relational_kl_bwd_chunked(*args)
    for x, y in zip(r1, r2):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


def _count(monkeypatch):
    flops = []
    mm = C._mm

    def counting(a, b):
        flops.append(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
        return mm(a, b)
    monkeypatch.setattr(C, "_mm", counting)
    return flops


@pytest.mark.parametrize("mode,R", [("plain", 4), ("dq_only", 4), ("sym", 4), ("sym", 2)])
def test_gemm_flops(mode, R, monkeypatch):
    """GEMM FLOPs in units of 2 N M C: 4 (dq + dk), 3 (dq only), symmetric 2 + R/N (s, t and M X[J] over the
    upper block triangle, (1 + R/N) / 2 of the square each; M^T X[I] over the strict part, (1 - R/N) / 2)."""
    N = M = 16
    CS = CT = 16
    gen = testing.generator()
    x = testing.randn(1, 1, N, CS, gen=gen)
    y = testing.randn(1, 1, N, CT, gen=gen)
    k_s, k_t = (x, y) if mode == "sym" else (testing.randn(1, 1, M, CS, gen=gen), testing.randn(1, 1, M, CT, gen=gen))
    lse = torch.zeros(1, 1, N, 1)
    dkl = torch.ones(1, 1, N, 1)
    _budget_rows(monkeypatch, R * M)
    flops = _count(monkeypatch)
    C.relational_kl_bwd_chunked(dkl, x, k_s, y, k_t, None, lse, lse, 1.0, 1.0, M, True, mode == "plain",
                                mode == "sym")
    units = sum(flops) / (2 * N * M * CS)
    expect = {"plain": 4.0, "dq_only": 3.0, "sym": 2 + R / N}[mode]
    assert units == pytest.approx(expect)


def test_symmetric_chunk_floor():
    """Without a budget limit the symmetric path still cuts SYM_MIN_CHUNKS chunks for large N."""
    N = 8 * C.SYM_MIN_ROWS + 3
    max_rows = max(C.SYM_MIN_ROWS, -(-N // C.SYM_MIN_CHUNKS))
    R, gb = C._plan(1, N, N, 1 << 40, max_rows)
    assert gb == 1 and -(-N // R) >= C.SYM_MIN_CHUNKS


def test_gemm_dtype_rule():
    """One rule (kernels._common.gemm_dtype) for the fused kernels and the chunked path."""
    from fastdistill.kernels._common import gemm_dtype

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    assert gemm_dtype(bf16, bf16) == bf16 and gemm_dtype(f32, bf16) == bf16 and gemm_dtype(f16, f32) == f16
    assert gemm_dtype(f16, bf16) == f32 and gemm_dtype(f64, f64) == f32 and gemm_dtype(f64, bf16) == f32


def test_index_has_no_key_gradient_and_symmetric_checks():
    x = torch.randn(1, 1, 4, 8)
    lse = torch.zeros(1, 1, 4, 1)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="index"):
        C.relational_kl_bwd_chunked(lse, x, x, x, x, idx, lse, lse, 1.0, 1.0, 4, True, True, False)
    with pytest.raises(ValueError, match="symmetric"):
        C.relational_kl_bwd_chunked(lse, x, x, x, x, idx, lse, lse, 1.0, 1.0, 4, True, False, True)
    none = C.relational_kl_bwd_chunked(lse, x, x, x, x, None, lse, lse, 1.0, 1.0, 4, False, False, False)
    assert none == (None, None)
