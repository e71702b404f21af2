"""Executed GEMM FLOPs of every fused-kernel path, counted, not derived from a formula (issue 16).

A fused kernel that does twice the arithmetic of the eager formula cannot be much faster than it, so the
count is a test. :func:`fastdistill.testing.count_gemm_flops` adds ``2*m*k*n`` for every ``tl.dot`` the
Triton interpreter executes and for every torch GEMM dispatched (the chunked path's cuBLAS calls inside the
custom ops included); forward and backward are counted separately, on tile-aligned shapes (every size a
multiple of every block, so no masked tile inflates the count), and divided by one full GEMM: ``2*N*M*C``
(relational KL, ``C_s = C_t = C``) or ``2*Lq*Lk*D`` per (batch, head) (attention).

Expected units per path (forward + backward = total; the bound is issue 16's acceptance limit; "eager" is
the dense PyTorch formula differentiated by autograd, the minimal count the benchmarks' floor uses):

====================================== ====================================== ===== ===== ===== ===== =====
op                                     path (``backward_path``)               fwd   bwd   total bound eager
====================================== ====================================== ===== ===== ===== ===== =====
fused_rdd_loss ("all", "intra"),       symmetric forward + backward (fast)    1     2     3     <= 4  4
relational_kl(x, x, y, y,              symmetric-deterministic (online fwd)   2     3     5     <= 5
normalize=True)
relational_kl(x, x, y, y) (rows of     online forward, symmetric backward     2     2     4     <= 4  4
unknown norm)
attention_kl, relational_kl(q, k, ..)  one-pass (fast: atomics)               2     4     6     <= 6  4
                                       two-pass (deterministic)               2     6     8     8
memory_p2p_loss (bank, bank + index)   rows (both modes)                      2     3     5     5     3
fused_attention (q.k, p.v)             fast (dq atomics)                      2     5     7     <= 7  6
                                       deterministic (dK/dV + dQ kernels)     2     7     9     9
chunked (student C > REGISTER_MAX_C)   symmetric / non-symmetric / rows       1/2/2 2/4/3 3/6/5 4/6/5
====================================== ====================================== ===== ===== ===== ===== =====

"deterministic" = under ``torch.use_deterministic_algorithms(True)`` (no atomics, bit-identical runs); the
chunked backward has no atomics in either mode. The symmetric forward (``forward_path``: each unordered tile
pair once, one fixed exponent shift instead of an online maximum, atomics) needs rows of norm <= 1 (the ops
that normalise: fused_rdd_loss, relational_kl(normalize=True)); it runs in fast mode only. The self-relation paths visit each unordered pair of a ``T x T``
tile grid once, so the diagonal tiles cost extra at finite ``T`` (units = a + b/T): those cases are counted at
``T`` and ``2T`` tiles and the large-input count ``a = 2 u(2T) - u(T)`` is asserted (``b`` is in the failure
message). Before issue 16 the kernels executed 2 + 6 = 8 (fused_rdd_loss, attention_kl), 2 + 3 = 5
(memory_p2p_loss) and 2 + 7 = 9 (fused_attention); the counter reproduced exactly those numbers.

The interpreter runs one program at a time: the count is exact and says nothing about races between
programs' atomics (scripts/race_check.py runs the atomic paths twice on a GPU and compares).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import _triton, testing
from fastdistill.ops.attention import attention_reference
from fastdistill.ops.attention_kl import attention_kl_reference
from fastdistill.ops.relational_kl import relational_kl, relational_kl_reference
from fastdistill.testing import GemmFlops, count_gemm_flops

needs_interpreter = pytest.mark.skipif(
    not (_triton.interpret_mode() and _triton.available()),
    reason="tl.dot is counted through Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py)")

# Sizes are powers of two: the interpreter's tiles (capped to the data) then cover every size exactly, and
# the self-relation cases force BLOCK-sized row and key tiles (_tiles) so that T is known.
C = 32  # channels / head dim: one channel tile (the register path)
C_CHUNKED = 64  # with REGISTER_MAX_C lowered to 16: the chunked path
BLOCK = 16  # rows and keys per tile of the self-relation cases (forced), so T = rows / 16

# (fwd, bwd) units per path, the table above.
PATHS = {
    "symmetric": (1, 2), "symmetric-deterministic": (2, 3), "symmetric-online-forward": (2, 2),
    "one-pass": (2, 4), "two-pass": (2, 6),
    "rows": (2, 3),
    "attention": (2, 5), "attention-deterministic": (2, 7),
    "chunked-symmetric": (1, 2), "chunked-symmetric-deterministic": (2, 2), "chunked": (2, 4),
    "chunked-rows": (2, 3),
}
# Issue 16's acceptance bounds on the total, per op and mode.
BOUNDS = {
    ("relational-self", False): 4, ("relational-self", True): 5,
    ("relational", False): 6, ("relational", True): 8,
    ("memory", False): 5, ("memory", True): 5,
    ("attention", False): 7, ("attention", True): 9,
    ("chunked-self", False): 4, ("chunked-self", True): 4,
    ("chunked", False): 6, ("chunked", True): 6,
    ("chunked-memory", False): 5, ("chunked-memory", True): 5,
}


def _randn(*shape, grad=False):
    return testing.randn(*shape, gen=testing.generator(), requires_grad=grad)


_deterministic = testing.deterministic_algorithms


def _count(fn, leaves, unit, backend: str = "triton") -> tuple[float, float]:
    """(forward, backward) GEMM units of the scalar ``fn()`` on ``backend``; fails when a GEMM went uncounted."""
    for t in leaves:
        t.grad = None
    with fastdistill.use_backend(backend):
        with count_gemm_flops() as fwd:
            loss = fn()
        with count_gemm_flops() as bwd:
            loss.backward()
    for name, c in (("forward", fwd), ("backward", bwd)):
        assert not c.uncounted, f"{name}: ops that may multiply matrices uncounted: {c.uncounted}"
    assert all(t.grad is not None for t in leaves), "a gradient was not computed"
    return fwd.total / unit, bwd.total / unit


@contextlib.contextmanager
def _tiles(c: int):
    """Rows and keys tiled by BLOCK in every relational kernel (so T is known), channels by min(c, 32)."""
    from fastdistill.kernels import _common

    cfg = {"BLOCK_N": BLOCK, "BLOCK_M": BLOCK, "BLOCK_C": min(c, 32), "warps": 4, "stages": 1}
    with contextlib.ExitStack() as stack:
        for name in _common.KERNELS:
            if name.startswith("relational_kl."):
                stack.enter_context(_common.force_config(name, cfg))
        yield


def _chunked(monkeypatch):
    from fastdistill.kernels import relational_kl as K

    if not hasattr(K, "REGISTER_MAX_C"):
        pytest.fail("fastdistill.kernels.relational_kl.REGISTER_MAX_C (the chunked path's threshold) is missing")
    monkeypatch.setattr(K, "REGISTER_MAX_C", 16)
    # Symmetric row chunks of BLOCK rows at every size (the chunk count grows with N, as at real sizes), so
    # the chunked self-relation also costs a + b/T and the T / 2T extrapolation gives its large-input count.
    from fastdistill.kernels import relational_kl_chunked as KC

    monkeypatch.setattr(KC, "SYM_MIN_ROWS", BLOCK)
    monkeypatch.setattr(KC, "SYM_MIN_CHUNKS", 1 << 30)


# ----------------------------------------------------------------------------------------------
# The cases: name -> (kind, builder). A builder takes a size factor f (1 or 2: T or 2T tiles along the
# self-relation) and the channel count, and returns (loss fn, leaves, unit).

def _rdd(pairs):
    def build(f, c):
        B, H, W = 2, 4, 4 * f
        s, t = _randn(B, c, H, W, grad=True), _randn(B, c, H, W)
        N = B * H * W
        unit = 2 * N * N * c if pairs == "all" else 2 * B * (H * W) ** 2 * c
        return (lambda: fastdistill.fused_rdd_loss(s, t, pairs=pairs)), [s], unit
    return build


def _rel_self(normalize):
    def build(f, c):
        N = 32 * f
        x, y = _randn(N, c, grad=True), _randn(N, c)
        return (lambda: relational_kl(x, x, y, y, temperature=0.5, normalize=normalize)), [x], 2 * N * N * c
    return build


def _rel_qk(f, c):
    N = M = 32
    q, k, qt, kt = _randn(N, c, grad=True), _randn(M, c, grad=True), _randn(N, c), _randn(M, c)
    return (lambda: relational_kl(q, k, qt, kt, temperature=0.5)), [q, k], 2 * N * M * c


def _attn_kl(f, c):
    B, H, L = 1, 2, 32
    q, k = _randn(B, H, L, c, grad=True), _randn(B, H, L, c, grad=True)
    qt, kt = _randn(B, H, L, c), _randn(B, H, L, c)
    return (lambda: fastdistill.attention_kl(q, k, qt, kt)), [q, k], 2 * B * H * L * L * c


def _memory(indexed):
    def build(f, c):
        B, H, W, R, K = 2, 4, 4, 64, 32
        s, t = _randn(B, c, H, W, grad=True), _randn(B, c, H, W)
        bank = F.normalize(_randn(R, c), dim=1)
        idx = torch.arange(0, R, R // K) if indexed else None
        M = K if indexed else R
        return ((lambda: fastdistill.memory_p2p_loss(s, t, bank, index=idx)), [s], 2 * B * H * W * M * c)
    return build


def _attention(f, c):
    B, H, L = 1, 2, 32
    q, k, v = (_randn(B, H, L, c, grad=True) for _ in range(3))
    return (lambda: fastdistill.fused_attention(q, k, v).float().sum()), [q, k, v], 2 * B * H * L * L * c


SELF = {"fused_rdd_loss-all": _rdd("all"), "fused_rdd_loss-intra": _rdd("intra"),
        "relational_kl-self-normalized": _rel_self(True), "relational_kl-self": _rel_self(False)}
# Rows of unknown norm: no bound on the logits, so the forward keeps its online maximum.
ONLINE_FORWARD = {"relational_kl-self"}
OTHER = {"attention_kl": ("relational", _attn_kl), "relational_kl-qk": ("relational", _rel_qk),
         "memory_p2p_loss-index": ("memory", _memory(True)), "memory_p2p_loss-bank": ("memory", _memory(False)),
         "fused_attention": ("attention", _attention)}
MODES = [pytest.param(False, id="fast"), pytest.param(True, id="deterministic")]


def _check(case: str, path: str, bound: float, got: tuple[float, float], note: str = "") -> None:
    want = PATHS[path]
    msg = (f"{case} ({path}): executed {got[0]:g} + {got[1]:g} = {sum(got):g} GEMM units, expected "
           f"{want[0]} + {want[1]} = {sum(want)} (bound {bound}){note}")
    assert got == pytest.approx(want, abs=1e-9), msg
    assert sum(got) <= bound, msg


def _self_relation(build, c, deterministic):
    """Units at T and 2T tiles, and the large-input count a = 2 u(2T) - u(T) (units = a + b/T)."""
    with _tiles(c), _deterministic(deterministic):
        u1 = _count(*build(1, c))
        u2 = _count(*build(2, c))
    a = tuple(2 * y - x for x, y in zip(u1, u2))
    note = f"; measured {u1} at T tiles, {u2} at 2T (diagonal overhead b = {tuple(2 * (x - y) for x, y in zip(u1, u2))})"
    return a, note


@needs_interpreter
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", list(SELF))
def test_self_relation_counts(case, deterministic):
    got, note = _self_relation(SELF[case], C, deterministic)
    if deterministic:
        path = "symmetric-deterministic"
    else:
        path = "symmetric-online-forward" if case in ONLINE_FORWARD else "symmetric"
    _check(case, path, BOUNDS[("relational-self", deterministic)], got, note)


@needs_interpreter
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", list(OTHER))
def test_counts(case, deterministic):
    kind, build = OTHER[case]
    with _deterministic(deterministic):
        got = _count(*build(1, C))
    path = {"relational": "two-pass" if deterministic else "one-pass", "memory": "rows",
            "attention": "attention-deterministic" if deterministic else "attention"}[kind]
    _check(case, path, BOUNDS[(kind, deterministic)], got)


@needs_interpreter
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("case", ["fused_rdd_loss-all", "attention_kl", "relational_kl-qk", "memory_p2p_loss-index"])
def test_chunked_counts(case, deterministic, monkeypatch):
    """Student channels above REGISTER_MAX_C (lowered to 16 here, C = 64): row chunks, torch GEMMs (counted
    through the custom op's body) and one fused elementwise kernel; no atomics in the backward, so only the
    self-relation's forward (symmetric in fast mode) differs between the modes."""
    _chunked(monkeypatch)
    if case in SELF:
        got, note = _self_relation(SELF[case], C_CHUNKED, deterministic)
        path = "chunked-symmetric-deterministic" if deterministic else "chunked-symmetric"  # the forward's mode
        _check(case, path, BOUNDS[("chunked-self", deterministic)], got, note)
        return
    kind, build = OTHER[case]
    with _tiles(C_CHUNKED), _deterministic(deterministic):
        got = _count(*build(1, C_CHUNKED))
    path, bound = ("chunked-rows", "chunked-memory") if kind == "memory" else ("chunked", "chunked")
    _check(case, path, BOUNDS[(bound, deterministic)], got)


# ----------------------------------------------------------------------------------------------
# The eager baseline: the dense formulas differentiated by autograd (the floor's minimal count)

def _eager_cases():
    N, c = 32, C
    x, y = _randn(N, c, grad=True), _randn(N, c)
    q, k, v = (_randn(1, 2, N, c, grad=True) for _ in range(3))
    qt, kt = _randn(1, 2, N, c), _randn(1, 2, N, c)
    bank = F.normalize(_randn(N, c), dim=1)
    unit_rel, unit_attn = 2 * N * N * c, 2 * 2 * N * N * c
    return {
        "fused_rdd_loss": ((lambda: relational_kl_reference(x, x, y, y)), [x], unit_rel, (2, 2)),
        "attention_kl": ((lambda: attention_kl_reference(q, k, qt, kt)), [q, k], unit_attn, (2, 2)),
        "memory_p2p_loss": ((lambda: relational_kl_reference(x, bank, y, bank)), [x], unit_rel, (2, 1)),
        "fused_attention": ((lambda: attention_reference(q, k, v).sum()), [q, k, v], unit_attn, (2, 4)),
    }


@pytest.mark.parametrize("case", ["fused_rdd_loss", "attention_kl", "memory_p2p_loss", "fused_attention"])
def test_eager_counts(case):
    """The eager column: 4, 4, 3, 6 units (SDPA's math path for attention: 2 forward + 4 backward)."""
    fn, leaves, unit, want = _eager_cases()[case]
    got = _count(fn, leaves, unit, backend="reference")
    assert got == pytest.approx(want), f"{case}: eager formula executed {got}, expected {want}"
    assert sum(got) == {"fused_rdd_loss": 4, "attention_kl": 4, "memory_p2p_loss": 3, "fused_attention": 6}[case]


# ----------------------------------------------------------------------------------------------
# The counter itself

def test_counter_torch_gemms_forward_backward():
    a, b = _randn(5, 7, grad=True), _randn(7, 3, grad=True)
    x, w = _randn(2, 4, 5, 6, grad=True), _randn(4, 6, 3)
    bias = _randn(3)
    with count_gemm_flops() as fwd:
        y = (a @ b).sum() + torch.addmm(bias, a, b).sum() + torch.bmm(x[0], w).sum()
        y = y + torch.baddbmm(bias, x[1], w).sum() + torch.matmul(x, w).sum() + F.linear(a, b.T).sum()
    mm = 2 * 5 * 7 * 3
    bmm = 2 * 4 * 5 * 6 * 3
    assert fwd.torch == mm + mm + bmm + bmm + 2 * bmm + mm, fwd
    assert fwd.triton == 0 and fwd.total == fwd.torch and not fwd.uncounted
    with count_gemm_flops() as bwd:
        y.backward()
    # a and b need grads (3 products of theirs: 2 GEMMs each); x needs grads (4 batched products: 1 each).
    assert bwd.torch == 3 * 2 * mm + 4 * bmm, bwd
    with count_gemm_flops() as none:
        _ = a.detach() + 1
    assert none.total == 0


@torch.library.custom_op("fastdistill_test::gemm_in_body", mutates_args=(), device_types=("cpu", "cuda"))
def _gemm_in_body(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b).relu()  # a chunked path's cuBLAS GEMM inside a custom op


@_gemm_in_body.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


def test_counter_sees_gemms_inside_custom_ops_and_nests():
    a, b = _randn(8, 16), _randn(16, 4)
    with count_gemm_flops() as outer:
        with count_gemm_flops() as inner:
            _gemm_in_body(a, b)
        torch.mm(a, b)
    assert inner.torch == 2 * 8 * 16 * 4 and inner.by_op == {"aten.mm": 2 * 8 * 16 * 4}, inner
    assert outer.torch == 2 * inner.torch and outer.calls == {"aten.mm": 2}, outer
    assert not outer.uncounted


def test_counter_reports_what_it_cannot_size():
    q = _randn(1, 2, 8, 16)
    with count_gemm_flops() as c:
        F.scaled_dot_product_attention(q, q, q)
    assert c.uncounted and all("scaled_dot_product" in u or "attention" in u for u in c.uncounted), c


@needs_interpreter
def test_counter_counts_executed_tl_dots():
    import triton
    import triton.language as tl

    @triton.jit
    def _mm_tile(A, B, Out, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, REPS: tl.constexpr):
        pid = tl.program_id(0)
        rm, rk, rn = tl.arange(0, BM), tl.arange(0, BK), tl.arange(0, BN)
        a = tl.load(A + pid * BM * BK + rm[:, None] * BK + rk[None, :])
        b = tl.load(B + rk[:, None] * BN + rn[None, :])
        acc = tl.zeros((BM, BN), tl.float32)
        for _ in range(REPS):  # a loop: every executed dot counts, not every dot in the source
            acc = tl.dot(a, b, acc, input_precision="ieee")
        tl.store(Out + pid * BM * BN + rm[:, None] * BN + rn[None, :], acc)

    P, BM, BK, BN, REPS = 3, 16, 32, 16, 2
    a, b = _randn(P * BM, BK), _randn(BK, BN)
    out = torch.empty(P * BM, BN)
    with count_gemm_flops() as c:
        _mm_tile[(P,)](a, b, out, BM=BM, BK=BK, BN=BN, REPS=REPS)
    assert c.triton == P * REPS * 2 * BM * BK * BN and c.calls == {"tl.dot": P * REPS}, c
    assert torch.allclose(out, REPS * (a.view(P, BM, BK) @ b).reshape(P * BM, BN), atol=1e-4)
    with count_gemm_flops() as after:  # the patch is removed and reinstalled cleanly
        pass
    assert after.total == 0 and isinstance(after, GemmFlops)
