"""ddim_step, progressive_distillation_target and pd_loss against float64 references and diffusers."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.ops.diffusion_steps import ddim_step_reference
from fastdistill.testing import assert_close, randn
from fastdistill.testing import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDS = ["epsilon", "sample", "v_prediction"]
# (B, ...) shapes: size-1 batch, odd sizes, and one sample spanning two kernel blocks (D = 3267 > 2048).
SHAPES = [(1, 7), (3, 2, 5, 7), (2, 3, 33, 33)]


def _ddim_scheduler(prediction_type: str, dtype: torch.dtype = torch.float32):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(50)
    if dtype == torch.float64:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    return sched


def _timesteps(sched, B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ts = sched.timesteps
    idx = torch.randint(0, len(ts), (B,), generator=gen)
    idx[-1] = len(ts) - 1  # t = 0: prev is negative -> final_alpha_cumprod
    if B > 1:
        idx[0] = 0  # t = 980: alpha small, the fp32 conversion matters
    t = ts[idx].long()
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    return t, t - step


# The triton backend takes fp32/bf16/fp16 (fp64 is rejected: test_float64_on_triton_is_a_clear_error).
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
_DIFFUSERS_CASES = [(c, d) for c in testing.backend_device_cases("ddim_step") for d in (torch.float32, torch.float64)
                    if not (c.backend == "triton" and d == torch.float64)]
_DIFFUSERS_CASES = [c.param(d, id=f"dtype{i}") for i, (c, d) in enumerate(_DIFFUSERS_CASES)]  # the old ids


@pytest.mark.parametrize("prediction_type", PREDS)
@pytest.mark.parametrize("backend,device,dtype", _DIFFUSERS_CASES)
def test_ddim_step_equals_diffusers_step_per_sample(prediction_type, backend, device, dtype):
    sched = _ddim_scheduler(prediction_type, dtype)
    gen = testing.generator()
    B = 5
    x = randn(B, 3, 8, 8, gen=gen, dtype=dtype, device=device)
    m = randn(B, 3, 8, 8, gen=gen, dtype=dtype, device=device)
    t, p = testing.to_device(_timesteps(sched, B, gen), device)
    with fastdistill.use_backend(backend):
        prev, x0 = fastdistill.ddim_step(x, m, t, p, sched, prediction_type=prediction_type)
    for b in range(B):
        out = sched.step(m[b:b + 1], int(t[b]), x[b:b + 1], eta=0.0)
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        assert_close(prev[b:b + 1], out.prev_sample, rtol=rtol, name=f"prev_sample[{b}] t={int(t[b])}")
        assert_close(x0[b:b + 1], out.pred_original_sample, rtol=rtol, name=f"pred_original_sample[{b}]")


@pytest.mark.parametrize("prediction_type", PREDS)
@pytest.mark.parametrize("backend,device", testing.backend_device_params("ddim_step"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_values_and_grads_vs_float64(prediction_type, backend, device, dtype):
    gen = testing.generator()
    ac = torch.linspace(0.9999, 0.004, 100, dtype=torch.float64).float()
    for shape in SHAPES:
        B = shape[0]
        x = randn(*shape, gen=gen, dtype=dtype, requires_grad=True)
        m = randn(*shape, gen=gen, dtype=dtype, requires_grad=True)
        t = torch.randint(0, 100, (B,), generator=gen)
        p = t - torch.randint(1, 30, (B,), generator=gen)  # some negative: final alpha
        args = testing.to_device([x, m, t, p, ac], device)
        check_against_reference(fastdistill.ddim_step, fastdistill.ddim_step, args,
                                {"prediction_type": prediction_type}, dtype=dtype, backend=backend)


def test_ddim_step_reference_is_the_formula():
    """The reference itself, against diffusers' formulas written out in float64 for one sample."""
    ac = torch.tensor([0.99, 0.5, 0.05], dtype=torch.float64)
    x, m = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    prev, x0 = ddim_step_reference(x, m, torch.tensor([2]), torch.tensor([0]), ac, "epsilon", 1.0)
    a_t, a_p = ac[2], ac[0]
    want_x0 = (x - (1 - a_t).sqrt() * m) / a_t.sqrt()
    assert_close(x0, want_x0, rtol=1e-12)
    assert_close(prev, a_p.sqrt() * want_x0 + (1 - a_p).sqrt() * m, rtol=1e-12)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("progressive_distillation_target"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_pd_target_values_and_grads_vs_float64(backend, device, dtype):
    gen = testing.generator()
    for shape in SHAPES:
        B = shape[0]
        abar_t = torch.rand(B, generator=gen) * 0.5 + 0.05
        abar_s = abar_t + 0.3
        args = [randn(*shape, gen=gen, dtype=dtype, requires_grad=True),
                randn(*shape, gen=gen, dtype=dtype, requires_grad=True),
                abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()]
        op = fastdistill.progressive_distillation_target
        # Two outputs: the harness rounds each random upstream gradient to bf16 for the op (not for the
        # float64 reference), and dz = dx~/den - (alpha_t/sigma_t) deps~/den partly cancels, which can
        # lift that input rounding (2^-8) past 1% of the result on either backend.
        grad_rtol = 3e-2 if dtype == torch.bfloat16 else None
        check_against_reference(op, op, testing.to_device(args, device), dtype=dtype, backend=backend,
                                grad_rtol=grad_rtol)


@pytest.mark.parametrize("backend,device", testing.backend_device_params("progressive_distillation_target"))
def test_pd_target_one_student_step_lands_on_teacher_result(backend, device):
    """z_s = alpha_s x~ + sigma_s eps~ (a DDIM step of the student from z_t) equals the teacher's z_s."""
    gen = testing.generator()
    B = 4
    z_t, z_s = randn(B, 3, 5, 5, gen=gen), randn(B, 3, 5, 5, gen=gen)
    abar_t = torch.rand(B, generator=gen) * 0.4 + 0.05
    abar_s = abar_t + 0.2 + torch.rand(B, generator=gen) * 0.3
    a_t, s_t, a_s, s_s = abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()
    z_t, z_s, a_t, s_t, a_s, s_s = testing.to_device((z_t, z_s, a_t, s_t, a_s, s_s), device)
    with fastdistill.use_backend(backend):
        x, e = fastdistill.progressive_distillation_target(z_t, z_s, a_t, s_t, a_s, s_s)
    v = lambda c: c.view(B, 1, 1, 1)  # noqa: E731
    assert_close(v(a_t) * x + v(s_t) * e, z_t, rtol=1e-5, name="z_t reconstruction")
    assert_close(v(a_s) * x + v(s_s) * e, z_s, rtol=1e-5, name="student DDIM step")


@pytest.mark.parametrize("backend,device", testing.backend_device_params("pd_loss"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_pd_loss_values_and_grads_vs_float64(backend, device, dtype):
    gen = testing.generator()
    for shape in SHAPES:
        B = shape[0]
        abar = torch.rand(B, generator=gen) * 0.9 + 0.05  # both branches win for some samples
        args = [randn(*shape, gen=gen, dtype=dtype, requires_grad=True), randn(*shape, gen=gen, dtype=dtype),
                randn(*shape, gen=gen, dtype=dtype), randn(*shape, gen=gen, dtype=dtype), abar.sqrt(),
                (1 - abar).sqrt()]
        res = check_against_reference(fastdistill.pd_loss, fastdistill.pd_loss, testing.to_device(args, device),
                                      dtype=dtype, backend=backend)
        assert res.outputs[0].dtype == torch.float32


@pytest.mark.parametrize("backend,device", testing.backend_device_params("pd_loss"))
def test_pd_loss_routes_gradient_by_per_sample_max(backend, device):
    """Sample 0: x-branch is the max (eps term exact); sample 1: eps-branch (x term exact)."""
    gen = testing.generator()
    a = torch.tensor([0.6, 0.8], device=device)
    s = (1 - a * a).sqrt()
    xs = randn(2, 9, gen=gen, device=device, requires_grad=True)
    zt = randn(2, 9, gen=gen, device=device)
    eps_s = (zt - a[:, None] * xs.detach()) / s[:, None]
    xt = torch.stack([xs[0].detach() + 1.0, xs[1].detach()])
    et = torch.stack([eps_s[0], eps_s[1] + 1.0])
    with fastdistill.use_backend(backend):
        loss = fastdistill.pd_loss(xs, xt, et, zt, a, s)
        (g,) = torch.autograd.grad(loss, xs)
    assert_close(loss, torch.tensor(1.0), rtol=1e-5)
    assert_close(g[0], torch.full((9,), -2.0 / 18), rtol=1e-5, name="x branch")
    # d/dx_S of (eps_S - eps~)^2 / (B D) with eps_S - eps~ = -1 and d eps_S / d x_S = -alpha/sigma.
    assert_close(g[1], torch.full((9,), 2.0 / 18 * (a[1] / s[1]).item()), rtol=1e-5, name="eps branch")


def test_pd_loss_gives_no_gradient_to_targets():
    # triton on CPU under the interpreter, else on the GPU
    x, xt, et, zt = (randn(2, 5, device=testing.triton_device(), requires_grad=True) for _ in range(4))
    with fastdistill.use_backend("triton"):
        loss = fastdistill.pd_loss(x, xt, et, zt, 0.5, 0.8)
    grads = torch.autograd.grad(loss, [x, xt, et, zt], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


def test_bad_inputs_are_clear_errors():
    ac = torch.linspace(0.99, 0.01, 10)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="shapes must match.*model_output"):
        fastdistill.ddim_step(x, torch.randn(2, 4), 3, 2, ac)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        fastdistill.ddim_step(x, x, torch.tensor([3, 10]), torch.tensor([1, 1]), ac)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        fastdistill.ddim_step(x, x, torch.tensor([-1, 3]), torch.tensor([1, 1]), ac)
    with pytest.raises(ValueError, match="prev_timesteps must be < 10"):
        fastdistill.ddim_step(x, x, 3, 12, ac)
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        fastdistill.ddim_step(x, x, torch.tensor([1.0, 2.0]), 0, ac)
    with pytest.raises(ValueError, match=r"timesteps must be an int, a 0-d tensor or have shape \(2,\)"):
        fastdistill.ddim_step(x, x, torch.tensor([1, 2, 3]), 0, ac)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        fastdistill.ddim_step(x, x, 3, 2, ac, prediction_type="flow")
    with pytest.raises(ValueError, match="s == t"):
        fastdistill.progressive_distillation_target(x, x, 0.6, 0.8, torch.tensor([0.6, 0.7]),
                                                    torch.tensor([0.8, (1 - 0.49) ** 0.5]))
    with pytest.raises(ValueError, match="shapes must match.*z_target"):
        fastdistill.progressive_distillation_target(x, torch.randn(3, 3), 0.6, 0.8, 0.7, 0.6)
    with pytest.raises(ValueError, match=r"alpha_t must be a number, a 0-d tensor or have shape \(2,\)"):
        fastdistill.pd_loss(x, x, x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="sigma_t must be > 0"):
        fastdistill.pd_loss(x, x, x, x, 1.0, 0.0)
    with pytest.raises(ValueError, match="shapes must match.*eps_target"):
        fastdistill.pd_loss(x, x, torch.randn(2, 2), x, 0.5, 0.5)


def test_float64_on_triton_is_a_clear_error():
    x = torch.randn(2, 3, dtype=torch.float64, device=testing.triton_device())
    with fastdistill.use_backend("triton"), pytest.raises(TypeError, match="does not take float64"):
        fastdistill.pd_loss(x, x, x, x, 0.5, 0.5)


@pytest.mark.slow
def test_compiles_fullgraph_with_fake_kernels_and_autograd():
    dev = testing.triton_device()  # CPU under the interpreter, else the GPU
    ac = torch.linspace(0.99, 0.02, 20, device=dev)

    def f(x, m, t, p):
        prev, x0 = fastdistill.ddim_step(x, m, t, p, ac, prediction_type="v_prediction")
        xt, et = fastdistill.progressive_distillation_target(x, prev.detach(), 0.3, 0.95, 0.5, 0.86)
        return fastdistill.pd_loss(x0, xt, et, x, 0.3, 0.95)

    x, m = torch.randn(3, 2, 4).to(dev), torch.randn(3, 2, 4).to(dev).requires_grad_(True)
    t, p = torch.tensor([19, 10, 5], device=dev), torch.tensor([15, 4, -1], device=dev)
    torch._dynamo.reset()
    with fastdistill.use_backend("triton"):
        eager = f(x, m, t, p)
        (g_eager,) = torch.autograd.grad(eager, m)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, m, t, p)
        (g_comp,) = torch.autograd.grad(compiled, m)
    assert_close(compiled, eager, rtol=1e-6)
    assert_close(g_comp, g_eager, rtol=1e-6)
