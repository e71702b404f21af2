"""Moment Matching per-sample ops: posterior_sample, the two losses, moment_statistics."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.ops import moment_matching as mm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 7, 5), (2, 3, 17, 13)]  # D = 1, 35, 663 (not multiples of any block)

# Value and gradient against float64, with `backend` forced for the forward and backward passes.
_check = testing.check_against_reference



def _schedule(B: int, gen: torch.Generator):
    """Per-sample (alpha_t, sigma_t, alpha_s, sigma_s) of a variance-preserving process, s < t."""
    abar_s = torch.rand(B, generator=gen) * 0.5 + 0.45
    abar_t = abar_s * (torch.rand(B, generator=gen) * 0.8 + 0.1)
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()


def _grad_rtol(dtype, backend):
    """The fused losses write their gradient (in the input dtype) during the forward pass; backward scales
    it by the upstream gradient, a second rounding when that is not a power of two (the harness uses a
    random one). Two bf16 roundings reach 0.8%, and Triton's interpreter truncates fp32 -> bf16 instead
    of rounding (up to 2^-7 each): 2.5e-2 for bf16 on triton. Unit upstream: see the test below."""
    return 2.5e-2 if (dtype == torch.bfloat16 and backend == "triton") else testing.tolerance(dtype)


def _backends(op):
    return testing.backends_under_test(op)


def _params(op):
    """(backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU)."""
    return testing.backend_device_params(op)


# ----------------------------------------------------------------------------- posterior_sample

@pytest.mark.parametrize("backend,device", _params("posterior_sample"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ancestral", "ddim"])
@pytest.mark.parametrize("shape", SHAPES)
def test_posterior_sample_matches_reference(backend, device, dtype, mode, shape):
    gen = testing.generator()
    z = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    x = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    coefs = testing.to_device(_schedule(shape[0], gen), device)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

    def fn(z, x):
        return fastdistill.posterior_sample(z, x, *coefs, mode=mode, seed=seed)

    def ref(z, x):
        return mm.posterior_sample_reference(z, x, *coefs, mode=mode, seed=seed)

    _check(fn, ref, [z, x], dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend,device", _params("posterior_sample"))
def test_float64_inputs_are_computed_in_float64(backend, device):
    gen = testing.generator()
    z = testing.randn(3, 40, dtype=torch.float64, gen=gen, device=device)
    x = testing.randn(3, 40, dtype=torch.float64, gen=gen, device=device, requires_grad=True)
    xa, xt = (testing.randn(3, 40, dtype=torch.float64, gen=gen, device=device) for _ in range(2))
    coefs = testing.to_device(_schedule(3, gen), device)
    with fastdistill.use_backend(backend):
        ddim = fastdistill.posterior_sample(z, x, *coefs, mode="ddim")
        anc = fastdistill.posterior_sample(z, x, *coefs, seed=9)
        loss = fastdistill.moment_matching_loss(x, xa, xt) + fastdistill.auxiliary_denoiser_loss(x, xa, xt)
    assert ddim.dtype == anc.dtype == loss.dtype == torch.float64
    testing.assert_close(ddim, mm.posterior_sample_reference(z, x, *coefs, mode="ddim"), rtol=1e-12)
    # the noise is fp32 (a few ulps of the transcendental functions apart between backends)
    testing.assert_close(anc, mm.posterior_sample_reference(z, x, *coefs, seed=9), rtol=1e-6)
    want = mm.moment_matching_loss_reference(x, xa, xt, torch.ones(3, device=device)) + \
        mm.auxiliary_denoiser_loss_reference(x, xa, xt, 1.0, torch.ones(3, device=device))
    testing.assert_close(loss, want, rtol=1e-12)
    (got,) = torch.autograd.grad(loss * 0.3, x)
    (exp,) = torch.autograd.grad(want * 0.3, x)
    testing.assert_close(got, exp, rtol=1e-12)


def test_same_seed_same_noise_on_every_backend_and_generator_reproducible():
    gen = testing.generator()
    z = testing.randn(4, 3, 50, gen=gen)
    x = testing.randn(4, 3, 50, gen=gen)
    coefs = _schedule(4, gen)
    outs = {}
    for backend in _backends("posterior_sample"):
        with fastdistill.use_backend(backend):
            outs[backend] = fastdistill.posterior_sample(z, x, *coefs, seed=1234)
            other = fastdistill.posterior_sample(z, x, *coefs, seed=1235)
            g1 = torch.Generator().manual_seed(5)
            g2 = torch.Generator().manual_seed(5)
            a = fastdistill.posterior_sample(z, x, *coefs, generator=g1)
            b = fastdistill.posterior_sample(z, x, *coefs, generator=g2)
        assert torch.equal(a, b)
        assert not torch.allclose(outs[backend], other)
    first = next(iter(outs.values()))
    for out in outs.values():
        testing.assert_close(out, first, rtol=1e-5)


def test_posterior_noise_is_standard_normal_and_ancestral_coefficients_match_precision_form():
    n = 40000
    noise = mm.philox_randn(99, n)
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    assert abs((noise[1:] * noise[:-1]).mean().item()) < 0.03  # neighbouring counters independent
    # Precision form of q(z_s | z_t, x) (methods.md 2.2), float64.
    gen = testing.generator()
    at, st, as_, ss = (c.double() for c in _schedule(6, gen))
    a_ts = at / as_
    var_ts = st**2 - a_ts**2 * ss**2
    var = 1 / (1 / ss**2 + a_ts**2 / var_ts)
    z, x = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mu = var * (a_ts * z / var_ts + as_ * x / ss**2)
    c_z, c_x, std = mm.posterior_coefficients(at, st, as_, ss)
    testing.assert_close(c_z * z + c_x * x, mu, rtol=1e-12)
    testing.assert_close(std, var.sqrt(), rtol=1e-12)


@pytest.mark.parametrize("backend,device", _params("posterior_sample"))
def test_posterior_edge_cases(backend, device):
    gen = testing.generator()
    z = testing.randn(2, 33, gen=gen, device=device)
    x = testing.randn(2, 33, gen=gen, device=device)
    with fastdistill.use_backend(backend):
        # sigma_s = 0: the clean end of the trajectory, z_s = alpha_s x (no noise).
        clean = fastdistill.posterior_sample(z, x, 0.6, 0.8, 1.0, 0.0, seed=3)
        # DDIM in the rectified-flow parameterisation of the port: alpha = 1 - t, sigma = t.
        t, s = 0.7, 0.3
        ddim = fastdistill.posterior_sample(z, x, 1 - t, t, 1 - s, s, mode="ddim")
    testing.assert_close(clean, x, rtol=1e-6)
    testing.assert_close(ddim, (1 - s) * x + s * (z - (1 - t) * x) / t, rtol=1e-5)


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("backend,device", _params("moment_matching_loss"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "weighted", "cfg"])
@pytest.mark.parametrize("shape", SHAPES)
def test_moment_matching_loss_matches_reference(backend, device, dtype, variant, shape):
    gen = testing.generator()
    B = shape[0]
    xs = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    xa = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)  # must get no gradient
    xt = testing.randn(*shape, dtype=dtype, gen=gen, device=device)
    xu = testing.randn(*shape, dtype=dtype, gen=gen, device=device)
    w = (torch.rand(B, generator=gen) + 0.5).to(device)
    g = (torch.rand(B, generator=gen) * 4 + 1).to(device)
    kw = {}
    if variant != "plain":
        kw["weight"] = w
    if variant == "cfg":
        kw.update(x_teacher_uncond=xu, guidance_scale=g)

    # The surrogate is a mean of terms of both signs: compare its value relative to the terms' scale,
    # 3 mean(|w x_s (x_a - x_t)|), added as a constant (no gradient) to both sides.
    col = (B,) + (1,) * (len(shape) - 1)
    w_used = kw.get("weight", torch.ones(B, device=device)).double().reshape(col)
    t_used = xu.double() + g.double().reshape(col) * (xt.double() - xu.double()) if variant == "cfg" else xt.double()
    offset = 3 * (w_used * xs.double() * (xa.double() - t_used)).abs().mean().item()

    def fn(xs, xa, xt, xu):
        return fastdistill.moment_matching_loss(xs, xa, xt, **kw) + offset

    def ref(xs, xa, xt, xu):
        return mm.moment_matching_loss_reference(xs, xa, xt, kw.get("weight", torch.ones(B, device=device)),
                                                 xu if variant == "cfg" else None,
                                                 g if variant == "cfg" else None) + offset

    res = _check(fn, ref, [xs, xa, xt, xu], dtype=dtype, backend=backend, grad_rtol=_grad_rtol(dtype, backend))
    assert res.grads[1] is None or res.grads[1].abs().max() == 0


@pytest.mark.parametrize("backend,device", _params("moment_matching_loss"))
def test_moment_matching_loss_gradient_is_the_estimator(backend, device):
    gen = testing.generator()
    xs = testing.randn(3, 4, 5, gen=gen, device=device, requires_grad=True)
    xa, xt = testing.randn(3, 4, 5, gen=gen, device=device), testing.randn(3, 4, 5, gen=gen, device=device)
    w = torch.tensor([0.5, 1.0, 2.0], device=device)
    with fastdistill.use_backend(backend):
        loss = fastdistill.moment_matching_loss(xs, xa, xt, weight=w)
    (grad,) = torch.autograd.grad(loss, xs)
    testing.assert_close(grad, w[:, None, None] * (xa - xt) / xs.numel(), rtol=1e-6)


@pytest.mark.parametrize("backend,device", _params("moment_matching_loss"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_gradients_with_unit_upstream_are_rounded_once(backend, device, dtype):
    gen = testing.generator()
    xs = testing.randn(3, 7, 33, dtype=dtype, gen=gen, device=device, requires_grad=True)
    xa, xt, xu = (testing.randn(3, 7, 33, dtype=dtype, gen=gen, device=device) for _ in range(3))
    g = (torch.rand(3, generator=gen) * 4 + 1).to(device)
    with fastdistill.use_backend(backend):
        loss = fastdistill.moment_matching_loss(xs, xa, xt, x_teacher_uncond=xu, guidance_scale=g)
        aux = fastdistill.auxiliary_denoiser_loss(xs, xa, xt, teacher_weight=0.5)
    (grad,) = torch.autograd.grad(loss, xs)
    (grad_aux,) = torch.autograd.grad(aux, xs)
    t = xu.double() + g.double()[:, None, None] * (xt.double() - xu.double())
    testing.assert_close(grad, (xa.double() - t) / xs.numel(), rtol=testing.tolerance(dtype))
    want_aux = 2 * ((xs.double() - xa.double()) + 0.5 * (xs.double() - xt.double())) / xs.numel()
    testing.assert_close(grad_aux, want_aux, rtol=testing.tolerance(dtype))


@pytest.mark.parametrize("backend,device", _params("auxiliary_denoiser_loss"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher_weight", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_auxiliary_denoiser_loss_matches_reference(backend, device, dtype, teacher_weight, shape):
    gen = testing.generator()
    B = shape[0]
    xa = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    xs = testing.randn(*shape, dtype=dtype, gen=gen, device=device, requires_grad=True)
    xt = testing.randn(*shape, dtype=dtype, gen=gen, device=device)
    w = (torch.rand(B, generator=gen) + 0.5).to(device)

    def fn(xa, xs, xt):
        return fastdistill.auxiliary_denoiser_loss(xa, xs, xt, teacher_weight=teacher_weight, weight=w)

    def ref(xa, xs, xt):
        return mm.auxiliary_denoiser_loss_reference(xa, xs, xt, teacher_weight, w)

    res = _check(fn, ref, [xa, xs, xt], dtype=dtype, backend=backend, grad_rtol=_grad_rtol(dtype, backend))
    assert res.grads[1] is None or res.grads[1].abs().max() == 0


def test_auxiliary_loss_default_equals_two_plain_mses():
    gen = testing.generator()
    xa, xs, xt = (testing.randn(2, 3, 8, gen=gen) for _ in range(3))
    want = torch.nn.functional.mse_loss(xa, xs) + torch.nn.functional.mse_loss(xa, xt)
    for backend in _backends("auxiliary_denoiser_loss"):
        with fastdistill.use_backend(backend):
            testing.assert_close(fastdistill.auxiliary_denoiser_loss(xa, xs, xt), want, rtol=1e-6)


# ----------------------------------------------------------------------------- moment_statistics

DIMS = [(1, 2, 3), (0, 2, 3), None, (0, 2), (-1,)]


@pytest.mark.parametrize("backend,device", _params("moment_statistics"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("weighted", [False, True])
def test_moment_statistics_matches_reference(backend, device, dtype, dims, weighted):
    gen = testing.generator()
    x = (testing.randn(3, 5, 7, 2, gen=gen) * 2 + 3).to(device=device, dtype=dtype).requires_grad_()
    # varies along every reduced dim of DIMS (a weight constant within a reduction has a zero gradient)
    w = (torch.rand(3, 5, 1, 2, generator=gen) + 0.5).to(device).requires_grad_() if weighted else None
    corr = 0 if weighted else 1

    def fn(x, w):
        return fastdistill.moment_statistics(x, dims=dims, weight=w, correction=corr, process_group=None)

    def ref(x, w):
        red = mm._normalize_dims("t", dims, x.dim())
        return mm.moment_statistics_reference(x, red, w, corr)

    _check(fn, ref, [x, w], dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend,device", _params("moment_statistics"))
def test_moment_statistics_is_stable_for_large_means(backend, device):
    # E[x^2] - E[x]^2 loses every digit here in fp32 (x^2 ~ 1e8, var ~ 1e-2).
    gen = testing.generator()
    x = 1e4 + 0.1 * testing.randn(4, 3000, gen=gen, device=device)
    with fastdistill.use_backend(backend):
        mean, var = fastdistill.moment_statistics(x, dims=1, process_group=None)
    want = x.double().var(dim=1, correction=0)
    testing.assert_close(var, want, rtol=1e-3)
    testing.assert_close(mean, x.double().mean(1), rtol=1e-6)


@pytest.mark.parametrize("backend,device", _params("moment_statistics"))
def test_moment_statistics_keepdim_and_shapes(backend, device):
    x = torch.randn(2, 3, 4, 5).to(device)
    with fastdistill.use_backend(backend):
        m, v = fastdistill.moment_statistics(x, dims=(0, 2, 3), keepdim=True, process_group=None)
        m2, v2 = fastdistill.moment_statistics(x, dims=(1, 3))  # default group: local when not distributed
    assert m.shape == (1, 3, 1, 1) and v.shape == (1, 3, 1, 1)
    assert m2.shape == (2, 4) and v2.shape == (2, 4)
    testing.assert_close(v2, x.double().var(dim=(1, 3), correction=0), rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_are_clear_errors():
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x_pred has shape"):
        fastdistill.posterior_sample(z, torch.randn(2, 5), 0.5, 0.5, 0.9, 0.1)
    with pytest.raises(TypeError, match="x_pred must be a floating"):
        fastdistill.posterior_sample(z, torch.ones(2, 4, dtype=torch.int32), 0.5, 0.5, 0.9, 0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        fastdistill.posterior_sample(z, z, 0.5, 0.5, 0.9, 0.1, mode="euler")
    with pytest.raises(ValueError, match="alpha_t must be a scalar or have shape"):
        fastdistill.posterior_sample(z, z, torch.ones(3), 0.5, 0.9, 0.1)
    with pytest.raises(ValueError, match="seed must be in"):
        fastdistill.posterior_sample(z, z, 0.5, 0.5, 0.9, 0.1, seed=-1)
    with pytest.raises(ValueError, match="either seed or generator"):
        fastdistill.posterior_sample(z, z, 0.5, 0.5, 0.9, 0.1, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="same device"):
        fastdistill.posterior_sample(z, torch.randn(2, 4, device="meta"), 0.5, 0.5, 0.9, 0.1, mode="ddim")
    with pytest.raises(ValueError, match="x_teacher has shape"):
        fastdistill.moment_matching_loss(z, z, torch.randn(3, 4))
    with pytest.raises(ValueError, match="guidance_scale is required"):
        fastdistill.moment_matching_loss(z, z, z, x_teacher_uncond=z)
    with pytest.raises(ValueError, match="weight must be a scalar or have shape"):
        fastdistill.moment_matching_loss(z, z, z, weight=torch.ones(4))
    with pytest.raises(ValueError, match="teacher_weight must be finite and >= 0"):
        fastdistill.auxiliary_denoiser_loss(z, z, z, teacher_weight=-1.0)
    with pytest.raises(ValueError, match="dims entry 3 is out of range"):
        fastdistill.moment_statistics(z, dims=3)
    with pytest.raises(ValueError, match="weight of shape"):
        fastdistill.moment_statistics(z, dims=1, weight=torch.ones(3))
    with pytest.raises(ValueError, match="at least one dim"):
        fastdistill.moment_statistics(z, dims=())


def test_compiles_fullgraph_with_triton_ops():
    gen = testing.generator()
    # triton on CPU under the interpreter, else on the GPU (never a silent fall back to the reference)
    z, x, xa, xt = (testing.randn(2, 3, 8, gen=gen, device=testing.triton_device()) for _ in range(4))
    x.requires_grad_()

    def step(z, x, xa, xt):
        zs = fastdistill.posterior_sample(z, x, 0.6, 0.8, 0.9, 0.4, seed=11)
        loss = fastdistill.moment_matching_loss(x, xa, xt) + fastdistill.auxiliary_denoiser_loss(xa, x, zs)
        mean, var = fastdistill.moment_statistics(zs, dims=(0, 2), process_group=None)
        return loss + var.sum()

    backend = "triton"
    with fastdistill.use_backend(backend):
        want = step(z, x, xa, xt)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(z, x, xa, xt)
    testing.assert_close(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_on_gpu_matches_reference_and_cpu_noise(dtype):
    gen = testing.generator()
    shape = (3, 4, 33, 17)
    z = testing.randn(*shape, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    x = testing.randn(*shape, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    coefs = [c.cuda() for c in _schedule(3, gen)]
    _check(
        lambda z, x: fastdistill.posterior_sample(z, x, *coefs, seed=77),
        lambda z, x: mm.posterior_sample_reference(z, x, *coefs, seed=77), [z, x], dtype=dtype, backend="triton")
    gpu = fastdistill.posterior_sample(z.detach(), x.detach(), *coefs, seed=77)
    cpu = mm.posterior_sample_reference(z.detach().cpu(), x.detach().cpu(), *(c.cpu() for c in coefs), seed=77)
    testing.assert_close(gpu.cpu(), cpu, rtol=testing.tolerance(dtype))
    xa, xt = (testing.randn(*shape, dtype=dtype, gen=gen, device="cuda") for _ in range(2))
    _check(lambda x: fastdistill.moment_matching_loss(x, xa, xt),
                                    lambda x: mm.moment_matching_loss_reference(x, xa, xt,
                                                                                torch.ones(3, device="cuda")),
                                    [x], dtype=dtype, backend="triton")
    _check(
        lambda x: fastdistill.moment_statistics(x, dims=(0, 2, 3), process_group=None),
        lambda x: mm.moment_statistics_reference(x, (0, 2, 3)), [x], dtype=dtype, backend="triton")
