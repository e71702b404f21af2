"""Routing ops of one-to-many distillation (O2MKD): segment_route, segment_gather / segment_scatter,
segment_mse and stratified_timesteps, on every backend that runs here (cpp, reference; cuda with -m gpu)
against integer / float64 references."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import _extension, testing
from fastdistill.ops import routing as R

ROUTE_BACKENDS = testing.backends_under_test(R.OP_ROUTE)
PERMUTE_BACKENDS = testing.backends_under_test(R.OP_PERMUTE)
MSE_BACKENDS = testing.backends_under_test(R.OP_MSE)
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
ROUTE_CASES = testing.backend_device_params(R.OP_ROUTE)
PERMUTE_CASES = testing.backend_device_params(R.OP_PERMUTE)
MSE_CASES = testing.backend_device_params(R.OP_MSE)
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# Value and gradient against float64, with `backend` forced for the forward and backward passes.
check = testing.check_against_reference


def test_cpp_backend_is_available_here():
    # The CPU kernels must be built: a missing extension would silently shrink every test to the reference.
    assert _extension.is_loaded(), _extension.load_error()
    assert "cpp" in ROUTE_BACKENDS and "cpp" in PERMUTE_BACKENDS and "cpp" in MSE_BACKENDS


def brute_force_route(timesteps: list, boundaries: list[int]):
    """Pure-Python ground truth: owner k of each t, stable sort by owner, offsets."""
    K = len(boundaries) - 1
    seg = []
    for t in timesteps:
        owner = next(k for k in range(K) if boundaries[k] <= t < boundaries[k + 1])
        seg.append(owner)
    perm = sorted(range(len(seg)), key=lambda b: (seg[b], b))
    inv = [0] * len(seg)
    for j, b in enumerate(perm):
        inv[b] = j
    offsets = [sum(1 for s in seg if s < k) for k in range(K + 1)]
    return seg, perm, inv, offsets


def random_boundaries(gen: torch.Generator, K: int, T: int) -> list[int]:
    inner = torch.randperm(T - 1, generator=gen)[: K - 1] + 1
    return [0] + sorted(inner.tolist()) + [T]


@pytest.mark.parametrize("backend,device", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("B,K", [(1, 1), (1, 4), (7, 3), (130, 5), (67, 17)])
def test_segment_route_matches_brute_force(backend, device, dtype, B, K):
    gen = testing.generator()
    T = 1000
    bnd = random_boundaries(gen, K, T)
    t = torch.randint(0, T, (B,), generator=gen)
    # Timesteps exactly on boundaries and just below them belong to the right student.
    edge = torch.tensor([b for b in bnd[:-1]] + [b - 1 for b in bnd[1:]])
    t[: min(B, edge.numel())] = edge[torch.randperm(edge.numel(), generator=gen)][: min(B, edge.numel())]
    if dtype.is_floating_point:
        t = t.to(dtype) + torch.rand(B, generator=gen, dtype=dtype) * 0.99 * (t < T - 1)
    else:
        t = t.to(dtype)
    t = t.to(device)
    seg, perm, inv, offsets = brute_force_route(t.tolist(), bnd)
    with fastdistill.use_backend(backend):
        r = fastdistill.segment_route(t, bnd, num_train_timesteps=T)
    assert all(x.dtype == torch.int64 for x in r)
    assert r.segment_ids.tolist() == seg
    assert r.permutation.tolist() == perm
    assert r.inverse.tolist() == inv
    assert offsets[K] == B
    assert r.offsets.tolist() == offsets
    assert r.host_offsets() == offsets
    assert r.counts().tolist() == [offsets[k + 1] - offsets[k] for k in range(K)]


@pytest.mark.parametrize("backend,device", ROUTE_CASES)
def test_segment_route_one_segment_and_empty_segments(backend, device):
    bnd = [0, 100, 500, 900, 1000]
    with fastdistill.use_backend(backend):
        r = fastdistill.segment_route(torch.tensor([120, 499, 100, 300], device=device), bnd)
        assert r.host_offsets() == [0, 0, 4, 4, 4]
        assert r.permutation.tolist() == [0, 1, 2, 3]  # stable: already in order
        r = fastdistill.segment_route(torch.tensor([950, 5, 999, 0], device=device), bnd)
        assert r.host_offsets() == [0, 2, 2, 2, 4]
        assert r.permutation.tolist() == [1, 3, 0, 2]
        r = fastdistill.segment_route(torch.zeros(0, dtype=torch.int64, device=device), bnd)
        assert r.host_offsets() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("backend,device", ROUTE_CASES)
def test_segment_route_bad_inputs(backend, device):
    t = torch.tensor([1, 2, 3], device=device)
    with fastdistill.use_backend(backend):
        with pytest.raises(ValueError, match="boundaries must be strictly increasing"):
            fastdistill.segment_route(t, [0, 500, 300, 1000])
        with pytest.raises(ValueError, match="boundaries must be strictly increasing"):
            fastdistill.segment_route(t, [0, 500, 500, 1000])
        with pytest.raises(ValueError, match="boundaries must start at 0"):
            fastdistill.segment_route(t, [1, 500, 1000])
        with pytest.raises(ValueError, match="boundaries must end at num_train_timesteps = 1000"):
            fastdistill.segment_route(t, [0, 500, 999], num_train_timesteps=1000)
        with pytest.raises(ValueError, match="boundaries must hold K\\+1 >= 2"):
            fastdistill.segment_route(t, [0])
        with pytest.raises(TypeError, match="boundaries must hold ints"):
            fastdistill.segment_route(t, [0, 0.5, 1])
        with pytest.raises(ValueError, match="boundaries must be a 1-D integer tensor"):
            fastdistill.segment_route(t, torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="at most 256"):
            fastdistill.segment_route(t, list(range(300)))
        for bad in ([0, 1000], [-1, 5], [5, 1000]):
            with pytest.raises(ValueError, match="timesteps lie outside"):
                fastdistill.segment_route(torch.tensor(bad, device=device), [0, 500, 1000])
        with pytest.raises(ValueError, match="timesteps lie outside"):
            fastdistill.segment_route(torch.tensor([1.0, float("nan")], device=device), [0, 500, 1000])
        with pytest.raises(ValueError, match="timesteps must have shape \\(B,\\)"):
            fastdistill.segment_route(torch.tensor(5, device=device), [0, 500, 1000])
        with pytest.raises(TypeError, match="timesteps must have dtype"):
            fastdistill.segment_route(torch.tensor([True], device=device), [0, 500, 1000])
        with pytest.raises(TypeError, match="timesteps must be a torch.Tensor"):
            fastdistill.segment_route([1, 2], [0, 500, 1000])


def _route(B: int, K: int, gen: torch.Generator, device: str = "cpu") -> R.Routing:
    t = torch.randint(0, 1000, (B,), generator=gen).to(device)
    return fastdistill.segment_route(t, random_boundaries(gen, K, 1000))


@pytest.mark.parametrize("backend,device", PERMUTE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B", [1, 7, 33])
def test_segment_gather_and_scatter_values_and_grads(backend, device, dtype, B):
    gen = testing.generator()
    r = _route(B, 3, gen, device)
    x = testing.randn(B, 3, 5, dtype=dtype, gen=gen, device=device, requires_grad=True)      # odd row bytes
    y = testing.randn(B, 7, dtype=dtype, gen=gen, device=device, requires_grad=True)
    z = testing.randn(B, dtype=dtype, gen=gen, device=device, requires_grad=True)             # 1-D rows
    labels = torch.randint(0, 10, (B,), generator=gen).to(device)              # an integer tensor rides along
    perm, inv = r.permutation, r.inverse

    def gathered(x, y, z):
        gx, nested = fastdistill.segment_gather(r, x, {"a": (y, None), "b": [z, labels], "scale": 0.5})
        assert nested["scale"] == 0.5 and nested["a"][1] is None
        assert torch.equal(nested["b"][1], labels[perm])
        return gx, nested["a"][0], nested["b"][0]

    def gathered_ref(x, y, z):
        return x[perm], y[perm], z[perm]

    check(gathered, gathered_ref, [x, y, z], dtype=dtype, backend=backend)

    def scattered(x, y):
        return fastdistill.segment_scatter(r, x, y)

    def scattered_ref(x, y):
        return x[inv], y[inv]

    check(scattered, scattered_ref, [x, y], dtype=dtype, backend=backend)
    with fastdistill.use_backend(backend):
        back = fastdistill.segment_scatter(r, fastdistill.segment_gather(r, x))
    assert torch.equal(back, x)


@pytest.mark.parametrize("backend,device", PERMUTE_CASES)
def test_segment_gather_non_contiguous_and_many_tensors(backend, device):
    gen = testing.generator()
    r = _route(17, 4, gen, device)
    base = torch.randn(5, 17, 3, generator=gen).to(device)
    xs = [base.transpose(0, 1)] + [torch.randn(17, i + 1, generator=gen).to(device) for i in range(30)]  # > one launch
    with fastdistill.use_backend(backend):
        out = fastdistill.segment_gather(r, *xs)
    assert len(out) == len(xs)
    for o, x in zip(out, xs):
        assert o.shape == x.shape and torch.equal(o, x[r.permutation])


def test_segment_gather_bad_inputs():
    r = fastdistill.segment_route(torch.tensor([1, 600, 2]), [0, 500, 1000])
    with pytest.raises(ValueError, match="batch-major with 3 rows"):
        fastdistill.segment_gather(r, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="batch-major with 3 rows"):
        fastdistill.segment_scatter(r, {"x": torch.zeros(())})
    with pytest.raises(TypeError, match="routing must be the Routing"):
        fastdistill.segment_gather((1, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="pass at least one tensor"):
        fastdistill.segment_gather(r)


def mse_reference(pred, target, seg, K, weight, reduction):
    B = pred.shape[0]
    per = ((pred.double() - target.double()) ** 2).reshape(B, -1).mean(1) * weight.double()
    sums = torch.stack([per[seg == k].sum() for k in range(K)])
    counts = torch.stack([(seg == k).sum() for k in range(K)]).double()
    if reduction == "per_segment":
        return sums / counts.clamp(min=1)
    return sums.sum() / B


@pytest.mark.parametrize("backend,device", MSE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["per_segment", "mean"])
@pytest.mark.parametrize("B,shape", [(1, (3,)), (17, (3, 5, 7)), (33, (4, 3))])
def test_segment_mse_values_and_grads(backend, device, dtype, reduction, B, shape):
    gen = testing.generator()
    K = 4
    # Leave segment 3 empty on purpose: its loss is 0 and no sample gets its gradient.
    t = torch.randint(0, 750, (B,), generator=gen).to(device)
    r = fastdistill.segment_route(t, [0, 250, 500, 750, 1000])
    pred = testing.randn(B, *shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    target = testing.randn(B, *shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    weight = (torch.rand(B, generator=gen) + 0.5).to(device)

    def fn(p, q):
        return fastdistill.segment_mse(p, q, r, reduction=reduction, weight=weight, process_group=None)

    def ref(p, q):
        return mse_reference(p, q, r.segment_ids, K, weight, reduction)

    res = check(fn, ref, [pred, target], dtype=dtype, backend=backend)
    expected_dtype = torch.float32
    assert res.outputs[0].dtype == expected_dtype
    if reduction == "per_segment":
        assert res.outputs[0][3].item() == 0.0


@pytest.mark.parametrize("backend,device", MSE_CASES)
def test_segment_mse_float64_and_scalar_weight(backend, device):
    gen = testing.generator()
    r = _route(9, 3, gen, device)
    p = testing.randn(9, 2, 3, dtype=torch.float64, gen=gen, device=device, requires_grad=True)
    q = testing.randn(9, 2, 3, dtype=torch.float64, gen=gen, device=device)
    res = check(
        lambda p: fastdistill.segment_mse(p, q, r, weight=2.0),
        lambda p: mse_reference(p, q, r.segment_ids, 3, torch.full((9,), 2.0, device=device), "per_segment"),
        [p], dtype=torch.float64, backend=backend)
    assert res.outputs[0].dtype == torch.float64


def test_segment_mse_per_segment_gradient_is_unit_scale():
    # Each student's gradient is normalised by its own count, whatever the imbalance.
    t = torch.tensor([10] * 9 + [900])
    r = fastdistill.segment_route(t, [0, 500, 1000])
    p = torch.ones(10, 4, requires_grad=True)
    fastdistill.segment_mse(p, torch.zeros(10, 4), r).sum().backward()
    assert torch.allclose(p.grad[:9].sum(0), p.grad[9])


def test_segment_mse_bad_inputs():
    r = fastdistill.segment_route(torch.tensor([1, 600, 2]), [0, 500, 1000])
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastdistill.segment_mse(x, x, r, reduction="sum")
    with pytest.raises(ValueError, match="same shape"):
        fastdistill.segment_mse(x, torch.zeros(3, 3), r)
    with pytest.raises(ValueError, match="batch-major with 3 rows"):
        fastdistill.segment_mse(torch.zeros(4, 2), torch.zeros(4, 2), r)
    with pytest.raises(TypeError, match="pred must be a floating tensor"):
        fastdistill.segment_mse(x.long(), x.long(), r)
    with pytest.raises(ValueError, match="weight must not require grad"):
        fastdistill.segment_mse(x, x, r, weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="weight must be a scalar or have shape \\(3,\\)"):
        fastdistill.segment_mse(x, x, r, weight=torch.ones(4))


def test_segment_mse_local_process_group_matches_none():
    # No torch.distributed here: the default WORLD group resolves to local computation.
    gen = testing.generator()
    r = _route(11, 3, gen)
    p, q = torch.randn(11, 5, generator=gen), torch.randn(11, 5, generator=gen)
    for red in ("per_segment", "mean"):
        a = fastdistill.segment_mse(p, q, r, reduction=red)
        b = fastdistill.segment_mse(p, q, r, reduction=red, process_group=None)
        assert torch.equal(a, b)


@pytest.mark.parametrize("B", [0, 1, 7, 128, 131])
@pytest.mark.parametrize("proportional", [True, False])
def test_stratified_timesteps(B, proportional):
    bnd = [0, 100, 400, 1000]
    gen = testing.generator()
    t = fastdistill.stratified_timesteps(B, bnd, generator=gen, proportional=proportional)
    assert t.shape == (B,) and t.dtype == torch.int64
    r = fastdistill.segment_route(t, bnd)
    counts = r.counts().tolist()
    share = [0.1, 0.3, 0.6] if proportional else [1 / 3] * 3
    for c, s in zip(counts, share):
        assert abs(c - s * B) < 1  # every segment gets its share (largest remainders)
    assert r.permutation.tolist() == list(range(B))  # segment order: routing is the identity


def test_stratified_timesteps_is_uniform_within_segments_and_seeded():
    bnd = [0, 10, 30]
    t = fastdistill.stratified_timesteps(30000, bnd, generator=torch.Generator().manual_seed(3))
    hist = torch.bincount(t, minlength=30).double()
    assert hist.min() > 800 and hist.max() < 1200  # ~1000 each: stratified uniform over [0, 30)
    a = fastdistill.stratified_timesteps(64, bnd, generator=torch.Generator().manual_seed(1))
    b = fastdistill.stratified_timesteps(64, bnd, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
        fastdistill.stratified_timesteps(-1, bnd)
    with pytest.raises(ValueError, match="boundaries must start at 0"):
        fastdistill.stratified_timesteps(4, [3, 10])


@pytest.mark.slow
def test_routing_ops_compile_fullgraph():
    gen = testing.generator()
    bnd = [0, 300, 700, 1000]

    def step(t, x, y):
        r = fastdistill.segment_route(t, bnd)
        gx, gy = fastdistill.segment_gather(r, x, y)
        loss = fastdistill.segment_mse(gx, gy, r, process_group=None).sum()
        return loss, fastdistill.segment_scatter(r, gx)

    t = torch.randint(0, 1000, (9,), generator=gen)
    x, y = torch.randn(9, 4, generator=gen), torch.randn(9, 4, generator=gen)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, back = compiled(t, x, y)
    ref_loss, _ = step(t, x, y)
    assert torch.allclose(loss, ref_loss) and torch.equal(back, x)


# ----------------------------------------------------------------------------------------------
# CUDA kernels (run with -m gpu on a GPU machine)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("B,K", [(1, 1), (5, 3), (1000, 4), (1025, 7), (5000, 256), (4097, 2)])
def test_cuda_segment_route_matches_reference(dtype, B, K):
    gen = testing.generator()
    T = 1000 if K < 256 else 10000
    bnd = random_boundaries(gen, K, T)
    t = torch.randint(0, T, (B,), generator=gen).to(dtype)
    ref = R.route_reference(t, torch.tensor(bnd))
    with fastdistill.use_backend("cuda"):
        r = fastdistill.segment_route(t.cuda(), bnd)
    for a, b in zip(r, ref):
        assert torch.equal(a.cpu(), b)
    bad = t.clone().cuda()
    bad[B // 2] = -1
    with fastdistill.use_backend("cuda"):
        r = fastdistill.segment_route(bad, bnd)
    with pytest.raises(ValueError, match="timesteps lie outside"):
        r.host_offsets()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_cuda_segment_permute(dtype):
    gen = testing.generator()
    r = _route(129, 5, gen)
    r = R.Routing(*(x.cuda() for x in r))
    xs = [torch.randint(0, 100, (129, *s), generator=gen).to(dtype).cuda() for s in [(3, 5), (1,), (4, 64, 64), ()]]
    xs.append(xs[0][:, 1:])  # a strided view
    with fastdistill.use_backend("cuda"):
        out = fastdistill.segment_gather(r, *xs)
        back = fastdistill.segment_scatter(r, *out)
    for o, b, x in zip(out, back, xs):
        assert torch.equal(o, x[r.permutation]) and torch.equal(b, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("reduction", ["per_segment", "mean"])
def test_cuda_segment_mse(dtype, reduction):
    gen = testing.generator()
    B = 130
    t = torch.randint(0, 750, (B,), generator=gen)
    r = fastdistill.segment_route(t.cuda(), [0, 250, 500, 750, 1000])
    pred = testing.randn(B, 4, 17, 17, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    target = testing.randn(B, 4, 17, 17, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    weight = (torch.rand(B, generator=gen) + 0.5).cuda()
    check(
        lambda p, q: fastdistill.segment_mse(p, q, r, reduction=reduction, weight=weight),
        lambda p, q: mse_reference(p, q, r.segment_ids, 4, weight, reduction),
        [pred, target], dtype=dtype, backend="cuda")
