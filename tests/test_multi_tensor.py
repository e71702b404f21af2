"""moment_dot, preconditioned_perturb_ and clip_parameters_: the multi-tensor parameter ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdistill
from fastdistill import dispatch, testing
from fastdistill.ops import multi_tensor as mt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty, single-element, awkward, and one tensor that crosses the 65536-element chunk boundary.
SHAPES = [(0,), (1,), (3, 7), (17,), (2, 33, 5), (65536 + 37,), (1, 1, 1), (130, 4)]

# Value and gradient against float64, with `backend` forced for the forward and backward passes.
_check = testing.check_against_reference



def _list(shapes, dtype, gen, *, positive=False, requires_grad=False, device="cpu"):
    out = []
    for s in shapes:
        t = torch.randn(*s, generator=gen, dtype=torch.float32)
        if positive:
            t = t.abs() + 0.05
        out.append(t.to(device=device, dtype=dtype).requires_grad_(requires_grad))
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of x (normal numbers), as float64."""
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[x.dtype]
    xd = x.double().abs().clamp_min(torch.finfo(x.dtype).tiny)
    _, e = torch.frexp(xd)
    return torch.ldexp(torch.ones_like(xd), (e - 1 - bits))


def _ieee_perturb(params, grads, precond, step, eps):
    """theta - (g / (sqrt(v) + eps)) * step in numpy fp32 (each op correctly rounded), rounded once to
    the parameter dtype: what the kernels must produce bit for bit."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        u = g.float().cpu().numpy()
        if precond is not None:
            u = u / (np.sqrt(precond[i].float().cpu().numpy()) + np.float32(eps))
        r = p.float().cpu().numpy() - u * np.float32(step)
        out.append(torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)).reshape(p.shape).to(p.device, p.dtype))
    return out


@pytest.mark.parametrize("backend,device", testing.backend_device_params("moment_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_precond", [False, True])
def test_moment_dot_matches_float64_reference_value_and_grad(backend, device, dtype, with_precond):
    gen = testing.generator()
    a = _list(SHAPES, dtype, gen, requires_grad=True, device=device)
    # b correlated with a (terms of one sign): a relative tolerance on the sum is then meaningful.
    b = [(t.detach().float() * (torch.rand(t.shape, generator=gen).to(device) + 0.5)).to(dtype).requires_grad_()
         for t in a]
    v = _list(SHAPES, torch.float32, gen, positive=True, requires_grad=True, device=device) if with_precond else None

    def fn(a, b, v):
        return fastdistill.moment_dot(a, b, v, eps=1e-3)

    def ref(a, b, v):
        return mt.moment_dot_reference(a, b, v, eps=1e-3)

    # The sum of ~70k products: compare at the accumulation's precision (the inputs are exact in fp32).
    _check(fn, ref, [a, b, v], dtype=dtype, backend=backend, rtol=1e-5,
                                     grad_rtol=testing.tolerance(dtype))


@pytest.mark.parametrize("backend,device", testing.backend_device_params("moment_dot"))
def test_moment_dot_mixed_dtypes_and_many_tensors(backend, device):
    gen = testing.generator()
    n = 1200
    sizes = torch.randint(0, 40, (n,), generator=gen).tolist()
    dts = [DTYPES[i % 3] for i in range(n)]
    a = [torch.randn(s, generator=gen).to(device=device, dtype=d) for s, d in zip(sizes, dts)]
    b = [(t.float() * torch.rand(t.shape, generator=gen).to(device)).to(DTYPES[(i + 1) % 3]) for i, t in enumerate(a)]
    v = [(torch.rand(s, generator=gen) + 0.1).to(device) for s in sizes]  # fp32 state
    with fastdistill.use_backend(backend):
        got = fastdistill.moment_dot(a, b, v)
    want = mt.moment_dot_reference([t.double() for t in a], [t.double() for t in b], [t.double() for t in v])
    assert got.dtype == torch.float32
    testing.assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("moment_dot", include=["cpp", "cuda"]))
def test_moment_dot_is_deterministic_across_thread_counts(backend, device):
    # A property of the compiled kernels (fixed chunking, chunk-order sums); torch.sum in the reference
    # splits work by thread count.
    gen = testing.generator()
    a = _list([(65536 * 3 + 5,), (1000,)], torch.float32, gen, device=device)
    b = _list([(65536 * 3 + 5,), (1000,)], torch.float32, gen, device=device)
    threads = torch.get_num_threads()
    try:
        with fastdistill.use_backend(backend):
            first = fastdistill.moment_dot(a, b)
            torch.set_num_threads(1)
            second = fastdistill.moment_dot(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)


def test_moment_dot_empty_list_and_fp64():
    assert fastdistill.moment_dot([], []).item() == 0.0
    a = [torch.randn(5, dtype=torch.float64)]
    for backend in testing.backends_under_test("moment_dot"):
        with fastdistill.use_backend(backend):
            out = fastdistill.moment_dot(a, a)
        assert out.dtype == torch.float64
        testing.assert_close(out, (a[0] * a[0]).sum(), rtol=1e-12)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("preconditioned_perturb_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_precond", [False, True])
def test_perturb_matches_reference_bit_for_bit(backend, device, dtype, with_precond):
    gen = testing.generator()
    p = _list(SHAPES, dtype, gen, device=device)
    g = _list(SHAPES, dtype, gen, device=device)
    v = _list(SHAPES, torch.float32, gen, positive=True, device=device) if with_precond else None
    got = [t.clone() for t in p]
    with fastdistill.use_backend(backend):
        fastdistill.preconditioned_perturb_(got, g, v, step=0.37, eps=1e-4)
    if backend != "reference" or v is None:
        # The compiled kernels round like IEEE fp32 (numpy); so does the reference without a
        # preconditioner. (PyTorch's vectorised CPU sqrt is not always correctly rounded.)
        want = _ieee_perturb(p, g, v, 0.37, 1e-4)
        for i, (x, y) in enumerate(zip(got, want)):
            assert torch.equal(x, y), f"tensor {i} differs"
    # and against float64 math, at the parameter dtype's rounding
    for x, p0, g0, v0 in zip(got, p, g, v if v is not None else [None] * len(p)):
        u = g0.double() if v0 is None else g0.double() / (v0.double().sqrt() + 1e-4)
        testing.assert_close(x, p0.double() - 0.37 * u, rtol=testing.tolerance(dtype), floor=1.0)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("preconditioned_perturb_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_then_minus_step_restores_within_one_ulp(backend, device, dtype):
    gen = testing.generator()
    shapes = [(4096,), (33, 65), (1,)]
    p = _list(shapes, dtype, gen, device=device)
    g = _list(shapes, dtype, gen, device=device)
    v = _list(shapes, torch.float32, gen, positive=True, device=device)
    orig = [t.clone() for t in p]
    with fastdistill.use_backend(backend):
        fastdistill.preconditioned_perturb_(p, g, v, step=1e-3, eps=1e-8)
        moved = [t.clone() for t in p]
        fastdistill.preconditioned_perturb_(p, g, v, step=-1e-3, eps=1e-8)
    exact = total = 0
    for back, before, mid in zip(p, orig, moved):
        assert before.numel() < 100 or not torch.equal(mid, before)  # the step really moved the weights
        err = (back.double() - before.double()).abs()
        bound = torch.maximum(_ulp(before), _ulp(mid))
        assert (err <= bound).all(), f"restore error {err.max().item()} above one ulp"
        exact += int((err == 0).sum())
        total += err.numel()
    if dtype == torch.float32:
        assert exact / total > 0.95  # the documented behaviour: nearly every element is bit-exact


@pytest.mark.parametrize("backend,device", testing.backend_device_params("preconditioned_perturb_"))
def test_perturb_mixed_dtypes_many_tensors_and_leaf_params(backend, device):
    gen = testing.generator()
    n = 1100
    sizes = torch.randint(0, 30, (n,), generator=gen).tolist()
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=DTYPES[i % 3]))
              for i, s in enumerate(sizes)]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=DTYPES[(i + 2) % 3]) for i, s in enumerate(sizes)]
    state = [torch.rand(s, generator=gen).to(device) for s in sizes]
    want = _ieee_perturb([p.detach() for p in params], grads, state, 0.5, 1e-3)
    with fastdistill.use_backend(backend):
        fastdistill.preconditioned_perturb_(params, grads, state, step=0.5, eps=1e-3)
    for p, w in zip(params, want):
        if backend == "reference":
            testing.assert_close(p.detach(), w, rtol=testing.tolerance(p.dtype), floor=1.0)
        else:
            assert torch.equal(p.detach(), w)
    assert all(p.grad is None for p in params)


def test_read_only_lists_with_other_strides_are_handled():
    gen = testing.generator()
    p = [torch.randn(6, 5, generator=gen)]
    g = [torch.randn(5, 6, generator=gen).t()]  # non-contiguous view
    q = [g[0] * torch.rand(6, 5, generator=gen)]  # same signs as g
    want = [p[0].clone()]
    mt.preconditioned_perturb_reference_(want, g, None, step=2.0)
    for backend in testing.backends_under_test("preconditioned_perturb_"):
        got = [p[0].clone()]
        with fastdistill.use_backend(backend):
            fastdistill.preconditioned_perturb_(got, g, step=2.0)
            dot = fastdistill.moment_dot(g, q)
        assert torch.equal(got[0], want[0])
        testing.assert_close(dot, (g[0].double() * q[0].double()).sum(), rtol=1e-5)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("clip_parameters_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_parameters_matches_clamp(backend, device, dtype):
    gen = testing.generator()
    p = _list(SHAPES, dtype, gen, device=device)
    p[2].view(-1)[0] = float("nan")
    want = [t.clone().clamp_(-0.01, 0.01) for t in p]
    with fastdistill.use_backend(backend):
        fastdistill.clip_parameters_(p, 0.01)
    for x, y in zip(p, want):
        assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan()) and torch.equal(x[~x.isnan()], y[~y.isnan()])
    assert p[2].view(-1)[0].isnan()


def test_clip_parameters_accepts_a_module():
    model = torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(100)
    fastdistill.clip_parameters_(model, 0.05)
    bound = torch.tensor(0.05)  # the bound as fp32, like the parameters
    assert all(bool((q.abs() <= bound).all()) and q.abs().max() == bound for q in model.parameters())
    assert all(q.grad is None and q.requires_grad for q in model.parameters())


def test_default_backend_on_cpu_is_cpp():
    expected = "cpp" if "cpp" in testing.backends_under_test("moment_dot") else "reference"
    with dispatch.record_backends() as seen:
        fastdistill.moment_dot([torch.ones(3)], [torch.ones(3)])
        fastdistill.clip_parameters_([torch.ones(3)], 1.0)
    assert ("moment_dot", expected) in seen and ("clip_parameters_", expected) in seen


def test_bad_inputs_are_clear_errors():
    a = [torch.randn(3), torch.randn(4)]
    with pytest.raises(ValueError, match="grads_b has 1 tensors but grads_a has 2"):
        fastdistill.moment_dot(a, a[:1])
    with pytest.raises(ValueError, match=r"grads_b\[1\] has shape \(5,\)"):
        fastdistill.moment_dot(a, [torch.randn(3), torch.randn(5)])
    with pytest.raises(TypeError, match=r"grads_a\[0\] must be float32"):
        fastdistill.moment_dot([torch.ones(3, dtype=torch.int64)], [torch.ones(3)])
    with pytest.raises(TypeError, match="single tensor"):
        fastdistill.moment_dot(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        fastdistill.moment_dot(a, a, a, eps=-1.0)
    with pytest.raises(ValueError, match="CPU/CUDA mix"):
        fastdistill.moment_dot(a, [torch.randn(3), torch.randn(4, device="meta")])
    with pytest.raises(ValueError, match="precond has 1 tensors"):
        fastdistill.preconditioned_perturb_(a, a, a[:1], step=1.0)
    with pytest.raises(ValueError, match="step must be finite"):
        fastdistill.preconditioned_perturb_(a, a, step=float("nan"))
    with pytest.raises(TypeError, match="step must be a number"):
        fastdistill.preconditioned_perturb_(a, a, step=torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        fastdistill.preconditioned_perturb_(a, a, a, step=1.0, eps=-1e-8)
    with pytest.raises(ValueError, match="bound must be finite and >= 0"):
        fastdistill.clip_parameters_(a, -0.1)
    view = [torch.randn(4, 4)[:, :2]]
    if "cpp" in testing.backends_under_test("preconditioned_perturb_"):
        with pytest.raises(ValueError, match=r"params\[0\] must be non-overlapping and dense"):
            fastdistill.preconditioned_perturb_(view, [torch.randn(4, 2)], step=1.0)


def test_compiles_fullgraph():
    gen = testing.generator()
    p = _list([(5, 3), (7,)], torch.float32, gen)
    g = _list([(5, 3), (7,)], torch.float32, gen)
    v = _list([(5, 3), (7,)], torch.float32, gen, positive=True)

    def step(p, g, v):
        fastdistill.preconditioned_perturb_(p, g, v, step=0.1)
        return fastdistill.moment_dot(g, g, v)

    want_p = [t.clone() for t in p]
    want = step(want_p, g, v)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(p, g, v)
    testing.assert_close(got, want, rtol=1e-6)
    for x, y in zip(p, want_p):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- CUDA backend

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_reference(dtype):
    gen = testing.generator()
    shapes = SHAPES + [(65536 * 5 + 3,)]
    p = [t.cuda() for t in _list(shapes, dtype, gen)]
    g = [(t.float() * (torch.rand(t.shape, generator=gen) + 0.5)).to(dtype).cuda() for t in _list(shapes, dtype, gen)]
    g = [x.float().sign().to(dtype) * y.abs() for x, y in zip(p, g)]  # same signs as p: no cancellation
    v = [t.cuda() for t in _list(shapes, torch.float32, gen, positive=True)]
    # a misaligned view (storage offset 1) takes the scalar path
    base = torch.randn(1001, device="cuda").to(dtype)
    p.append(base[1:]); g.append(torch.randn(1000, device="cuda").to(dtype)); v.append(torch.rand(1000, device="cuda"))
    with fastdistill.use_backend("cuda"):
        got = fastdistill.moment_dot(p, g, v, eps=1e-3)
        again = fastdistill.moment_dot(p, g, v, eps=1e-3)
    assert torch.equal(got, again)
    testing.assert_close(got, mt.moment_dot_reference([t.double() for t in p], [t.double() for t in g],
                                                      [t.double() for t in v], eps=1e-3), rtol=1e-5)
    want = _ieee_perturb([t.cpu() for t in p], [t.cpu() for t in g], [t.cpu() for t in v], 0.3, 1e-3)
    with fastdistill.use_backend("cuda"):
        fastdistill.preconditioned_perturb_(p, g, v, step=0.3, eps=1e-3)
    for x, y in zip(p, want):
        assert torch.equal(x.cpu(), y)
    want = [t.clone().clamp_(-0.5, 0.5) for t in p]
    with fastdistill.use_backend("cuda"):
        fastdistill.clip_parameters_(p, 0.5)
    for x, y in zip(p, want):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_many_mixed_tensors_one_call():
    gen = torch.Generator().manual_seed(0)
    n = 3000
    sizes = torch.randint(0, 3000, (n,), generator=gen).tolist()
    a = [torch.randn(s, generator=gen).to(DTYPES[i % 3]).cuda() for i, s in enumerate(sizes)]
    b = [(t.float() * torch.rand(t.shape, device="cuda")).to(DTYPES[(i + 1) % 3]) for i, t in enumerate(a)]
    v = [torch.rand(s, generator=gen).cuda() for s in sizes]
    got = fastdistill.moment_dot(a, b, v)
    want = mt.moment_dot_reference([t.double() for t in a], [t.double() for t in b], [t.double() for t in v])
    testing.assert_close(got, want, rtol=1e-5)
    cpu = fastdistill.moment_dot([t.cpu() for t in a], [t.cpu() for t in b], [t.cpu() for t in v])
    testing.assert_close(got.cpu(), cpu, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_mix_with_cpu_is_an_error():
    with pytest.raises(ValueError, match="CPU/CUDA mix"):
        fastdistill.moment_dot([torch.ones(3, device="cuda")], [torch.ones(3)])
