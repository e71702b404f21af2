"""relational_kl: the flash-style core against the dense float64 formula, every backend and dtype."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.ops.relational_kl import relational_kl, relational_kl_reference

BACKENDS = testing.backends_under_test("relational_kl")
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
CASES = testing.backend_device_params("relational_kl")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 16-bit bounds re-measured with the interpreter doing the GPU's rounding (kernels/_common.py: operands
# rounded to nearest even at load and p_s - p_t rounded before the gradient GEMMs), fresh seeds, triton
# backend, 26 gradient / 14 value draws per dtype: worst relative gradient error bf16 6.1e-3 (normalize=True
# segments), fp16 6.4e-4; worst value error bf16 1.1e-3, fp16 4.2e-5. The bounds keep >= 3x over the tail.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# KL = sum p_T (l_T - l_S) - lse_T + lse_S cancels: the fp32 error scales with the logits (~1), not with a
# small KL, so values get a looser fp32 bound than testing.TOLERANCES (16-bit bounds are unchanged).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# Value and gradient against float64, with `backend` forced for the forward and backward passes.
check = testing.check_against_reference

# (G, N, M, C_s, C_t, segment_size): awkward sizes, 1s, C_s != C_t, a C above one channel tile (130),
# several key tiles per segment (M=70 > 64: online rescaling), segments smaller than a tile.
SHAPES = [
    (None, 1, 3, 2, 1, None),
    (2, 1, 4, 2, 3, 2),
    (None, 7, 17, 5, 9, None),
    (3, 5, 12, 3, 37, 4),
    (None, 20, 70, 16, 8, None),
    (2, 9, 30, 130, 20, 15),
]


def _inputs(G, N, M, Cs, Ct, dtype, gen, scale=1.0, device="cpu"):
    sh = (lambda n, c: (n, c)) if G is None else (lambda n, c: (G, n, c))
    q_s = testing.randn(*sh(N, Cs), dtype=dtype, gen=gen, scale=scale, device=device, requires_grad=True)
    k_s = testing.randn(*sh(M, Cs), dtype=dtype, gen=gen, scale=scale, device=device, requires_grad=True)
    q_t = testing.randn(*sh(N, Ct), dtype=dtype, gen=gen, scale=scale, device=device)
    k_t = testing.randn(*sh(M, Ct), dtype=dtype, gen=gen, scale=scale, device=device)
    return q_s, k_s, q_t, k_t


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s))
def test_matches_dense_formula(backend, device, dtype, shape):
    G, N, M, Cs, Ct, S = shape
    gen = testing.generator()
    args = _inputs(G, N, M, Cs, Ct, dtype, gen, device=device)
    reduction = "none" if S is not None else "mean"
    kw = dict(temperature=0.7, kd_temperature=1.3, segment_size=S, reduction=reduction)
    # The rounding error of KL = A/Z_T - lse_T + lse_S is about eps * |logits|: when the KL itself is much
    # smaller than the logits (few channels, near-identical distributions) the relative bound widens.
    d = [a.detach().double() for a in args]
    lmax = max((d[0] @ d[1].transpose(-1, -2)).abs().max().item(), (d[2] @ d[3].transpose(-1, -2)).abs().max().item())
    kl_max = relational_kl_reference(*d, **kw).abs().max().item()
    rtol = max(RTOL[dtype], 2e-6 * (1.0 + lmax / (0.7 * 1.3)) / max(kl_max, 1e-6))
    check(relational_kl, relational_kl_reference, args, kw, dtype=dtype,
          backend=backend, rtol=rtol, grad_rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_similarity_segments_normalized(backend, device, dtype):
    """q_s is k_s (RDD's pixel-to-pixel form): both gradient roles add up in one tensor."""
    gen = testing.generator()
    f_s = testing.randn(24, 11, dtype=dtype, gen=gen, device=device, requires_grad=True)
    f_t = testing.randn(24, 6, dtype=dtype, gen=gen, device=device)

    def fn(f_s, f_t):
        return relational_kl(f_s, f_s, f_t, f_t, temperature=0.5, segment_size=8, normalize=True,
                             reduction="sum")

    check(fn, lambda a, b: relational_kl_reference(
        a, a, b, b, temperature=0.5, segment_size=8, normalize=True, reduction="sum"),
        [f_s, f_t], dtype=dtype, backend=backend, rtol=RTOL[dtype], grad_rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend,device", CASES)
def test_sharp_softmax_is_stable(backend, device):
    """Unit-norm rows at tau=0.02 (logits up to 50) across several key tiles: no overflow."""
    gen = testing.generator()
    q_s, k_s, q_t, k_t = _inputs(None, 6, 90, 8, 8, torch.float32, gen, device=device)
    check(relational_kl, relational_kl_reference, [q_s, k_s, q_t, k_t],
                                     dict(temperature=0.02, normalize=True, reduction="none"),
                                     dtype=torch.float32, backend=backend, rtol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_inputs(backend, device):
    gen = testing.generator()
    q_s_leaf = testing.randn(9, 2, 7, gen=gen, device=device, requires_grad=True)  # as q_leaf[:, 0]: row stride 14
    k_s_leaf = testing.randn(7, 13, gen=gen, device=device, requires_grad=True)  # as k_leaf.t(): column-major
    q_t = testing.randn(5, 9, gen=gen, device=device).t()  # (9, 5), column-major
    k_t = testing.randn(5, 13, gen=gen, device=device).t()
    q_s, k_s = q_s_leaf[:, 0], k_s_leaf.t()

    def fn(q_leaf, k_leaf, q_t, k_t):
        return relational_kl(q_leaf[:, 0], k_leaf.t(), q_t, k_t, reduction="none")

    def ref(q_leaf, k_leaf, q_t, k_t):
        return relational_kl_reference(q_leaf[:, 0], k_leaf.t(), q_t, k_t, reduction="none")

    assert not q_s.is_contiguous() and not k_s.is_contiguous() and not q_t.is_contiguous()
    check(fn, ref, [q_s_leaf, k_s_leaf, q_t, k_t], dtype=torch.float32, backend=backend, rtol=1e-4)


def test_backends_agree_and_no_teacher_grad():
    gen = testing.generator()
    q_s, k_s, q_t, k_t = _inputs(2, 6, 10, 4, 5, torch.float32, gen)
    q_t.requires_grad_(True)
    outs = {}
    for b in BACKENDS:
        with fastdistill.use_backend(b):
            loss = relational_kl(q_s, k_s, q_t, k_t, segment_size=5)
        g = torch.autograd.grad(loss, [q_s, k_s, q_t], allow_unused=True)
        assert g[2] is None  # the teacher is a constant of the loss
        outs[b] = (loss.detach(), g[0], g[1])
    first = outs[BACKENDS[0]]
    for b in BACKENDS[1:]:
        for x, y in zip(first, outs[b]):
            testing.assert_close(x, y, rtol=1e-5)


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    gen = testing.generator()
    q, k, _, _ = _inputs(None, 5, 9, 4, 4, torch.float32, gen)
    for b in BACKENDS:
        with fastdistill.use_backend(b):
            same = relational_kl(q, k, q.detach(), k.detach(), reduction="none")
            diff = relational_kl(q, k, 2 * q.detach(), k.detach(), reduction="none")
        assert same.abs().max().item() < 1e-5
        assert (diff > 0).all()


def test_local_default_process_group_equals_none():
    gen = testing.generator()
    args = _inputs(None, 5, 8, 3, 3, torch.float32, gen)
    a = relational_kl(*args)
    b = relational_kl(*args, process_group=None)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_torch_compile_fullgraph_reference():
    gen = testing.generator()
    args = _inputs(2, 5, 8, 3, 4, torch.float32, gen)

    def f(q_s, k_s, q_t, k_t):
        return relational_kl(q_s, k_s, q_t, k_t, temperature=0.5, segment_size=4, normalize=True)

    with fastdistill.use_backend("reference"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(*args)
        gq = torch.autograd.grad(got, args[:2])
        want = f(*args)
        wq = torch.autograd.grad(want, args[:2])
    testing.assert_close(got, want, rtol=1e-6)
    for a, b in zip(gq, wq):
        testing.assert_close(a, b, rtol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="fastdistill::relational_kl_triton runs the Triton kernels")
def test_opcheck_custom_ops():
    from fastdistill.ops import relational_kl as mod

    gen = testing.generator()
    q_s, k_s, q_t, k_t = (t.unsqueeze(0).unsqueeze(0) for t in _inputs(None, 4, 6, 3, 3, torch.float32, gen))
    torch.library.opcheck(mod._triton_op, (q_s, k_s, q_t.detach(), k_t.detach(), None, 1.0, 0.5, 3, False, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # The self-relation: one tensor in both roles (the symmetric backward).
    x = testing.randn(1, 1, 6, 3, gen=gen, requires_grad=True)
    xt = testing.randn(1, 1, 6, 5, gen=gen)
    torch.library.opcheck(mod._triton_op, (x, x, xt, xt, None, 1.0, 0.5, 3, True, 2.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("bad, match", [
    (dict(q_s=torch.ones(3, 4, dtype=torch.int64)), "q_s"),
    (dict(q_s=torch.ones(2, 3, 4, 5)), "q_s"),
    (dict(k_s=torch.ones(6, 5)), "channel count"),
    (dict(q_t=torch.ones(4, 4)), "q_s and q_t"),
    (dict(k_t=torch.ones(5, 4)), "k_s and k_t"),
    (dict(temperature=0.0), "temperature"),
    (dict(kd_temperature=-1.0), "kd_temperature"),
    (dict(segment_size=4), "segment_size"),
    (dict(reduction="avg"), "reduction"),
    (dict(q_s=torch.ones(3, 4, device="meta")), "same device"),
])
def test_bad_input(bad, match):
    args = dict(q_s=torch.ones(3, 4), k_s=torch.ones(6, 4), q_t=torch.ones(3, 4), k_t=torch.ones(6, 4))
    kw = {}
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError), match=match):
        relational_kl(args["q_s"], args["k_s"], args["q_t"], args["k_t"], **kw)



@pytest.mark.parametrize("case", ["self", "segments", "index"])
def test_reference_core_row_chunks_autograd_and_memory(monkeypatch, case):
    """The reference core in many row chunks (a tiny ``_REF_CHUNK_ELEMS``) matches the dense float64
    formula in value and gradient (``q_s is k_s`` adds both contributions; keys read through an index
    get none), and autograd keeps no per-chunk logits for the backward: the chunks are checkpointed."""
    from fastdistill.ops import relational_kl as mod

    G, N, M, C = 2, 7, 12, 5
    monkeypatch.setattr(mod, "_REF_CHUNK_ELEMS", G * M)  # one row per chunk
    gen = testing.generator()
    rows = M if case == "self" else N
    q_s = testing.randn(G, 1, rows, C, gen=gen, requires_grad=True)
    k_s = q_s if case == "self" else testing.randn(G, 1, M, C, gen=gen, requires_grad=True)
    q_t = testing.randn(G, 1, rows, 3, gen=gen)
    k_t = q_t if case == "self" else testing.randn(G, 1, M, 3, gen=gen)
    index = torch.tensor([3, 0, 11, 3, 7, 1]) if case == "index" else None
    S = {"self": M, "segments": 4, "index": 2}[case]
    keys = index.numel() if index is not None else M
    saved: dict[int, int] = {}  # storage -> elements (a chunk's row slice of q_s is a view of q_s)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl = mod.relational_kl_core_reference(q_s, k_s, q_t, k_t, scale_s=0.7, scale_t=1.3, segment_size=S,
                                              k_index=index)
    assert kl.dtype == torch.float32 and kl.shape == (G, 1, rows, keys // S)
    # Only the chunk inputs are kept (q_s, k_s, q_t, k_t, and the index-selected keys): no logits.
    inputs = sum(t.numel() for t in {id(t): t for t in (q_s, k_s, q_t, k_t)}.values())
    if index is not None:
        inputs += G * keys * (C + 3) + index.numel()
    assert sum(saved.values()) <= inputs, (sum(saved.values()), inputs, "logits were saved for the backward")
    w = torch.rand(kl.shape, generator=gen)
    leaves = [q_s] if case != "segments" else [q_s, k_s]
    grads = torch.autograd.grad((kl * w).sum(), leaves)
    if case == "index":
        assert not k_s.requires_grad or k_s.grad is None

    qs64 = q_s.detach().double().requires_grad_()
    ks64 = qs64 if case == "self" else k_s.detach().double().requires_grad_()
    qt64 = q_t.double()
    kt64 = qt64 if case == "self" else k_t.double()
    if index is not None:
        ks64, kt64 = ks64[:, :, index], kt64[:, :, index]
    ls = (qs64 @ ks64.transpose(-1, -2) * 0.7).unflatten(-1, (-1, S))
    lt = (qt64 @ kt64.transpose(-1, -2) * 1.3).unflatten(-1, (-1, S))
    want = (lt.softmax(-1) * (lt.log_softmax(-1) - ls.log_softmax(-1))).sum(-1)
    wants = torch.autograd.grad((want * w.double()).sum(), [qs64] if case != "segments" else [qs64, ks64])
    testing.assert_close(kl, want, rtol=1e-4, name=f"value ({case})")
    for g, wg in zip(grads, wants):
        testing.assert_close(g, wg, rtol=1e-4, name=f"grad ({case})")
    if case == "index":  # the bank rows are constants: nothing flows back to k_s
        (g_none,) = torch.autograd.grad((kl * w).sum(), [k_s], allow_unused=True)
        assert g_none is None


# ----------------------------------------------------------------------------------------------
# Backward paths (kernels/relational_kl.py: backward_path) and deterministic mode

def test_backward_path_rule(monkeypatch):
    from fastdistill.kernels import relational_kl as K

    bp = K.backward_path
    assert bp(64, True, True, False, deterministic=False) == "symmetric"
    assert bp(64, True, True, False, deterministic=True) == "symmetric-deterministic"
    assert bp(64, False, True, True, deterministic=False) == "one-pass"
    assert bp(64, False, True, True, deterministic=True) == "two-pass"
    assert bp(64, False, True, False, deterministic=False) == "rows"
    assert bp(64, False, False, True, deterministic=True) == "keys"
    assert bp(K.REGISTER_MAX_C + 1, True, True, False, deterministic=False) == "chunked"
    assert bp(K.REGISTER_MAX_C, False, True, True, deterministic=True) == "two-pass"
    # The default follows torch's switch, read when the backward runs.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert bp(64, False, True, True) == "two-pass"


def _record_paths(monkeypatch):
    from fastdistill.kernels import relational_kl as K

    seen = []
    orig = K.backward_path

    def spy(*a, **kw):
        seen.append(orig(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(K, "backward_path", spy)
    return seen


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backward paths")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_each_op_takes_its_backward_path(monkeypatch, deterministic):
    """The self-relations take the symmetric path, keys with a gradient the one-pass (or two-pass) path,
    the memory bank the rows-only path; wider students the chunked path."""
    from fastdistill.kernels import relational_kl as K

    seen = _record_paths(monkeypatch)
    gen = testing.generator()
    s = testing.randn(2, 12, 3, 5, gen=gen, requires_grad=True)
    t = testing.randn(2, 7, 3, 5, gen=gen)
    x, y = testing.randn(20, 9, gen=gen, requires_grad=True), testing.randn(20, 4, gen=gen)
    k = testing.randn(20, 9, gen=gen, requires_grad=True)
    q4 = testing.randn(1, 2, 9, 16, gen=gen, requires_grad=True)
    bank = torch.nn.functional.normalize(testing.randn(30, 12, gen=gen), dim=1)
    with testing.deterministic_algorithms(deterministic), fastdistill.use_backend("triton"):
        fastdistill.fused_rdd_loss(s, t).backward()
        fastdistill.fused_rdd_loss(s, t, pairs="intra").backward()
        relational_kl(x, x, y, y, segment_size=5, normalize=True).backward()
        relational_kl(x, k, y, y).backward()
        fastdistill.attention_kl(q4, q4 * 1.0, q4.detach(), q4.detach()).backward()
        fastdistill.memory_p2p_loss(s, t[:, :7].detach().repeat(1, 2, 1, 1)[:, :12], bank,
                                    index=torch.arange(0, 30, 3)).backward()
        monkeypatch.setattr(K, "REGISTER_MAX_C", 8)
        relational_kl(x, x, y, y).backward()
    sym = "symmetric-deterministic" if deterministic else "symmetric"
    pair = "two-pass" if deterministic else "one-pass"
    assert seen == [sym, sym, sym, pair, pair, "rows", "chunked"]


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backward paths")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["fused_rdd_loss", "relational_kl", "attention_kl"])
def test_deterministic_mode_launches_no_atomics_and_agrees_with_fast(op, dtype, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) no launched kernel variant adds with atomics (the
    launches are recorded: this is what makes GPU runs bit-identical, and it can fail here); the fast path
    does use them and agrees with the deterministic one within the dtype's tolerance. The bit-identity of two
    runs is asserted too, but on CPU that is plumbing only: the interpreter runs programs one at a time, so
    atomics cannot race there (scripts/race_check.py, in scripts/gpu_check.sh, runs these twice on a GPU)."""
    from fastdistill.kernels import relational_kl as K

    launches = []
    orig_launch = K._launch

    def record(which, grid_fn, problem, args, kwargs):
        atomic = which == "fwd_sym" or kwargs.get("UPPER", False) or kwargs.get("ATOMIC_DK", False)
        launches.append((which, bool(atomic)))
        return orig_launch(which, grid_fn, problem, args, kwargs)

    monkeypatch.setattr(K, "_launch", record)
    gen = testing.generator()
    if op == "fused_rdd_loss":
        a = testing.randn(2, 12, 5, 7, dtype=dtype, gen=gen, requires_grad=True)
        b = testing.randn(2, 6, 5, 7, dtype=dtype, gen=gen)
        fn, leaves = (lambda: fastdistill.fused_rdd_loss(a, b, temperature=0.5)), [a]
    elif op == "relational_kl":
        a = testing.randn(3, 37, 20, dtype=dtype, gen=gen, requires_grad=True)
        k = testing.randn(3, 37, 20, dtype=dtype, gen=gen, requires_grad=True)
        b = testing.randn(3, 37, 9, dtype=dtype, gen=gen)
        fn, leaves = (lambda: relational_kl(a, k, b, b, segment_size=37, normalize=True)), [a, k]
    else:
        a = testing.randn(1, 2, 33, 40, dtype=dtype, gen=gen, requires_grad=True)
        k = testing.randn(1, 2, 45, 40, dtype=dtype, gen=gen, requires_grad=True)
        b, bk = testing.randn(1, 2, 33, 24, dtype=dtype, gen=gen), testing.randn(1, 2, 45, 24, dtype=dtype, gen=gen)
        fn, leaves = (lambda: fastdistill.attention_kl(a, k, b, bk)), [a, k]

    def grads():
        out = fn()
        return [out.detach()] + list(torch.autograd.grad(out, leaves))

    with fastdistill.use_backend("triton"):
        with testing.deterministic_algorithms(True):
            first, second = grads(), grads()
        det_launches, launches[:] = list(launches), []
        with testing.deterministic_algorithms(False):
            fast = grads()
    assert det_launches and not any(a for _, a in det_launches), f"atomic kernels in deterministic mode: {det_launches}"
    assert any(a for _, a in launches), f"the fast path launched no atomic kernel: {launches}"
    for x, y in zip(first, second):
        assert torch.equal(x, y), "deterministic mode: two runs differ"
    for x, y in zip(fast[1:], first[1:]):
        testing.assert_close(x, y, rtol=GRAD_RTOL[dtype], name=f"{op} fast vs deterministic ({dtype})")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton forward paths")
def test_symmetric_forward_rule_and_agreement(monkeypatch):
    """The self-relation's forward visits each unordered tile pair once (a fixed exponent shift, atomics)
    when the rows have norm <= 1 and the shift keeps every exponential a normal fp32; otherwise, and in
    deterministic mode, the online forward runs. Both give the same KL and log-sum-exps."""
    from fastdistill.kernels import relational_kl as K

    assert K.forward_path(True, 10.0, 3.0, deterministic=False) == "symmetric"
    assert K.forward_path(True, 10.0, 3.0, deterministic=True) == "online"
    assert K.forward_path(True, K.SYM_FWD_MAX_SHIFT + 1, 3.0, deterministic=False) == "online"  # tiny tau
    assert K.forward_path(True, None, None, deterministic=False) == "online"  # rows of unknown norm
    assert K.forward_path(False, 1.0, 1.0, deterministic=False) == "online"
    gen = testing.generator()
    x = torch.nn.functional.normalize(testing.randn(2, 1, 45, 24, gen=gen), dim=-1)
    y = torch.nn.functional.normalize(testing.randn(2, 1, 45, 10, gen=gen), dim=-1)
    for S in (15, 45):
        sym = K.relational_kl_fwd(x, x, y, y, None, 3.0, 2.0, S, True, 1.0)
        online = K.relational_kl_fwd(x, x, y, y, None, 3.0, 2.0, S)
        for a, b, name in zip(sym, online, ("kl", "lse_s", "lse_t")):
            testing.assert_close(a, b, rtol=1e-5, name=f"symmetric forward {name} (S={S})")
    # Which forward the ops take.
    seen = []
    orig = K.forward_path
    monkeypatch.setattr(K, "forward_path", lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1])
    s = testing.randn(2, 6, 3, 5, gen=gen, requires_grad=True)
    t = testing.randn(2, 7, 3, 5, gen=gen)
    with fastdistill.use_backend("triton"):
        fastdistill.fused_rdd_loss(s, t, temperature=0.5)
        fastdistill.fused_rdd_loss(s, t, temperature=0.01)  # 1/tau = 100: the shift would underflow
        x2, y2 = x[0, 0], y[0, 0]  # one tensor per side in both roles
        relational_kl(x2, x2, y2, y2, normalize=True)
    assert seen == ["symmetric", "online", "symmetric"]
