"""boot_loss against a float64 reference, the signal-space DDIM identity, and BootDistiller."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdistill
from fastdistill import testing
from fastdistill.nn import BootDistiller
from fastdistill.ops.boot import boot_delta, teacher_to_x
from fastdistill.testing import assert_close, randn
from fastdistill.testing import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDS = ["epsilon", "sample", "v_prediction"]
SHAPES = [(1, 5), (3, 2, 5, 7), (2, 3, 33, 33)]  # the last spans two kernel blocks per sample
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
BACKENDS = testing.backend_device_params("boot_loss")


def _scales(B: int, gen: torch.Generator, abar_t: torch.Tensor | None = None):
    """alpha/sigma at t and at an earlier s (abar_s > abar_t); abar_t down to 0.005 (alpha ~ 0.07)."""
    if abar_t is None:
        abar_t = torch.rand(B, generator=gen) * 0.5 + 0.005
    abar_s = abar_t + 0.05 + torch.rand(B, generator=gen) * 0.3
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()


@pytest.mark.parametrize("prediction_type", PREDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_boot_loss_values_and_grads_vs_float64(prediction_type, backend, device, dtype):
    gen = testing.generator()
    for i, shape in enumerate(SHAPES):
        B = shape[0]
        a_t, s_t, a_s, s_s = _scales(B, gen)
        cfg = i % 2 == 1  # CFG on for some shapes, off for others
        kwargs = dict(x_t=randn(*shape, gen=gen, dtype=dtype), alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s,
                      weight=torch.rand(B, generator=gen) + 0.5, prediction_type=prediction_type)
        if cfg:
            kwargs.update(teacher_output_uncond=randn(*shape, gen=gen, dtype=dtype), guidance_scale=4.5)
        args = [randn(*shape, gen=gen, dtype=dtype, requires_grad=True), randn(*shape, gen=gen, dtype=dtype),
                randn(*shape, gen=gen, dtype=dtype)]
        args, kwargs = testing.to_device(args, device), testing.to_device(kwargs, device)
        # bf16 on triton: the forward writes dy_s in bf16 and the backward scales it by the upstream
        # gradient, two roundings of 2^-8 each (exact for the usual upstream gradient of 1).
        grad_rtol = 2e-2 if (backend == "triton" and dtype == torch.bfloat16) else None
        res = check_against_reference(fastdistill.boot_loss, fastdistill.boot_loss, args, kwargs, dtype=dtype,
                                      backend=backend, grad_rtol=grad_rtol)
        assert res.outputs[0].dtype == torch.float32


def test_boot_loss_is_the_formula():
    """The op (reference and triton) against the formula written out by hand in float64."""
    gen = testing.generator()
    B = 3
    y_s, y_t, eps_hat, x_t = (randn(B, 4, 3, gen=gen, dtype=torch.float64) for _ in range(4))
    a_t, s_t, a_s, s_s = (v.double() for v in _scales(B, gen))
    w = torch.rand(B, generator=gen, dtype=torch.float64)
    f = (x_t - s_t[:, None, None] * eps_hat) / a_t[:, None, None]
    delta = 1 - (s_s * a_t) / (a_s * s_t)
    target = y_t + delta[:, None, None] * (f - y_t)
    want = (w / delta**2 * ((y_s - target) ** 2).mean((1, 2))).mean()
    kw = dict(x_t=x_t, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s, weight=w)
    with fastdistill.use_backend("reference"):
        assert_close(fastdistill.boot_loss(y_s, y_t, eps_hat, **kw), want, rtol=1e-12)
    dev = testing.triton_device()  # CPU under the interpreter, else the GPU
    with fastdistill.use_backend("triton"):
        got = fastdistill.boot_loss(y_s.float().to(dev), y_t.float().to(dev), eps_hat.float().to(dev),
                                    **{k: v.float().to(dev) for k, v in kw.items()})
    assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ddim_in_signal_space_identity(backend, device):
    """The teacher's DDIM step t -> s, written for y = (x - sigma eps)/alpha, is y_s = y_t + delta (f - y_t)."""
    gen = testing.generator()
    B, T = 6, 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2  # SD's scaled_linear
    ac = torch.cumprod(1 - betas, 0)
    t = torch.randint(1, T, (B,), generator=gen)
    t[0] = T - 1  # alpha_T ~ 0.068: the fp32 conversion matters
    s = (t - torch.randint(1, 200, (B,), generator=gen)).clamp(min=0)
    a_t, s_t, a_s, s_s = ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[s].sqrt(), (1 - ac[s]).sqrt()
    v = lambda c: c.view(B, 1, 1, 1)  # noqa: E731
    eps = randn(B, 3, 4, 4, gen=gen, dtype=torch.float64)
    y_t = randn(B, 3, 4, 4, gen=gen, dtype=torch.float64)
    f = randn(B, 3, 4, 4, gen=gen, dtype=torch.float64)  # the teacher's x-prediction at x_t
    x_t = v(a_t) * y_t + v(s_t) * eps
    with fastdistill.use_backend("reference"):
        x_s, _ = fastdistill.ddim_step(x_t, f, t, s, ac, prediction_type="sample")
    y_s = (x_s - v(s_s) * eps) / v(a_s)
    delta = boot_delta(a_t, s_t, a_s, s_s)
    assert_close(y_s, y_t + v(delta) * (f - y_t), rtol=1e-12, name="signal-space DDIM step")
    # And the loss of that exact DDIM result is 0, whatever the teacher parameterisation.
    eps_hat = (x_t - v(a_t) * f) / v(s_t)
    kw = dict(x_t=x_t.float(), alpha_t=a_t.float(), sigma_t=s_t.float(), alpha_s=a_s.float(), sigma_s=s_s.float())
    kw, y_s, y_t, eps_hat = testing.to_device((kw, y_s, y_t, eps_hat), device)
    with fastdistill.use_backend(backend):
        loss_eps = fastdistill.boot_loss(y_s.float(), y_t.float(), eps_hat.float(), prediction_type="epsilon", **kw)
        loss_far = fastdistill.boot_loss(y_t.float(), y_t.float(), eps_hat.float(), prediction_type="epsilon", **kw)
    assert loss_eps.item() < 1e-6 * loss_far.item(), (loss_eps.item(), loss_far.item())


def test_teacher_to_x_conversions():
    x_t, out = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    a, s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.91**0.5, dtype=torch.float64)
    x0 = teacher_to_x(out, x_t, a, s, "epsilon")
    assert_close(a * x0 + s * out, x_t, rtol=1e-12)  # x_t = alpha x0 + sigma eps
    x0v = teacher_to_x(out, x_t, a, s, "v_prediction")
    eps_v = s * x_t + a * out  # v = alpha eps - sigma x0
    assert_close(a * x0v + s * eps_v, x_t, rtol=1e-12)


def test_boot_loss_bad_inputs():
    y = torch.randn(2, 3)
    kw = dict(x_t=y, alpha_t=0.5, sigma_t=0.75**0.5, alpha_s=0.7, sigma_s=0.51**0.5)
    with pytest.raises(ValueError, match="delta.*is 0.*s == t"):
        fastdistill.boot_loss(y, y, y, **{**kw, "alpha_s": 0.5, "sigma_s": 0.75**0.5})
    with pytest.raises(ValueError, match="shapes must match.*teacher_output"):
        fastdistill.boot_loss(y, y, torch.randn(2, 4), **kw)
    with pytest.raises(ValueError, match="x_t is required"):
        fastdistill.boot_loss(y, y, y, **{**kw, "x_t": None})
    with pytest.raises(ValueError, match="guidance_scale is required"):
        fastdistill.boot_loss(y, y, y, teacher_output_uncond=y, **kw)
    with pytest.raises(ValueError, match="guidance_scale was given without"):
        fastdistill.boot_loss(y, y, y, guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="alpha_t must be > 0"):
        fastdistill.boot_loss(y, y, y, **{**kw, "alpha_t": 0.0})
    with pytest.raises(ValueError, match=r"weight must be a number, a 0-d tensor or have shape \(2,\)"):
        fastdistill.boot_loss(y, y, y, weight=torch.ones(5), **kw)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        fastdistill.boot_loss(y, y, y, prediction_type="x0", **kw)


# ----------------------------------------------------------------------------------------------
# BootDistiller
# ----------------------------------------------------------------------------------------------

T = 50


class TinyNet(nn.Module):
    """net(x, t, cond=None): a conv plus a per-timestep bias (stand-in for a UNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Embedding(T, 3)

    def forward(self, x, t, cond=None):
        h = self.conv(x) + self.emb(t)[:, :, None, None]
        return h + cond if cond is not None else h


def _alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-3, 0.2, T), 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_boot_distiller_loss_matches_manual_step_and_trains_student_only(backend, device):
    torch.manual_seed(testing.new_seed())
    student, teacher = TinyNet().to(device), TinyNet().to(device)
    ac = _alphas_cumprod()
    dist = BootDistiller(student, teacher, ac, step_size=3, boundary_weight=0.5, prediction_type="epsilon")
    noise = torch.randn(4, 3, 6, 6).to(device)
    t = torch.tensor([3, 10, 30, T - 1], device=device)
    with fastdistill.use_backend(backend):
        loss = dist.loss(noise, t)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # The same step by hand, in float64.
    a, s = ac.double().sqrt().to(device), (1 - ac.double()).sqrt().to(device)
    v = lambda c: c.view(-1, 1, 1, 1)  # noqa: E731
    sd, td, n = student.double(), teacher.double(), noise.double()
    with torch.no_grad():
        y_t = sd(n, t)
        x_t = v(a[t]) * y_t + v(s[t]) * n
        f = (x_t - v(s[t]) * td(x_t, t)) / v(a[t])
        y_s = sd(n, t - 3)
        delta = 1 - s[t - 3] * a[t] / (a[t - 3] * s[t])
        bs = ((((y_s - (y_t + v(delta) * (f - y_t))) ** 2).mean((1, 2, 3))) / delta**2).mean()
        e = torch.full((4,), T - 1, device=device)
        f_e = (n - v(s[e]) * td(n, e)) / v(a[e])
        bc = ((sd(n, e) - f_e) ** 2).mean()
    assert_close(loss, bs + 0.5 * bc, rtol=1e-5, name="BOOT step")
    assert_close(dist.last_terms["bootstrap"], bs, rtol=1e-5)


def test_boot_distiller_cfg_uses_both_teacher_calls_and_scheduler_config():
    from diffusers import DDIMScheduler

    torch.manual_seed(testing.new_seed())
    sched = DDIMScheduler(num_train_timesteps=T, prediction_type="v_prediction")
    calls = []

    class Teacher(TinyNet):
        def forward(self, x, t, cond=None):
            calls.append(cond is not None)
            return super().forward(x, t, cond)

    dist = BootDistiller(TinyNet(), Teacher(), sched, step_size=2, guidance_scale=3.0)
    assert dist.prediction_type == "v_prediction"
    noise = torch.randn(2, 3, 5, 5)
    cond = torch.randn(2, 3, 1, 1)
    loss = dist.loss(noise, cond=cond, uncond={})  # reference backend on CPU
    assert torch.isfinite(loss)
    assert calls == [True, False, True, False]  # (cond, uncond) at t, then at the boundary
    assert dist.sample(noise, cond=cond).shape == noise.shape


def test_boot_distiller_bad_arguments():
    ac = _alphas_cumprod()
    with pytest.raises(ValueError, match="step_size must be an int in"):
        BootDistiller(TinyNet(), TinyNet(), ac, step_size=0)
    with pytest.raises(ValueError, match="step_size must be an int in"):
        BootDistiller(TinyNet(), TinyNet(), ac, step_size=T)
    dist = BootDistiller(TinyNet(), TinyNet(), ac, step_size=5)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[5, 49\]"):
        dist.loss(torch.randn(2, 3, 4, 4), torch.tensor([4, 20]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[5, 49\]"):
        dist.loss(torch.randn(2, 3, 4, 4), torch.tensor([6, 50]))


@pytest.mark.slow
def test_boot_loss_compiles_fullgraph_with_fake_kernel_and_autograd():
    dev = testing.triton_device()  # CPU under the interpreter, else the GPU
    a_t, s_t, a_s, s_s = (torch.tensor(v, device=dev) for v in ([0.1, 0.5], [0.99, 0.75**0.5], [0.3, 0.7],
                                                                 [0.91**0.5, 0.51**0.5]))

    def f(ys, yt, fc, fu, xt):
        return fastdistill.boot_loss(ys, yt, fc, x_t=xt, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s,
                                     teacher_output_uncond=fu, guidance_scale=2.0)

    ys = torch.randn(2, 3, 4).to(dev).requires_grad_(True)
    rest = [torch.randn(2, 3, 4).to(dev) for _ in range(4)]
    torch._dynamo.reset()
    with fastdistill.use_backend("triton"):
        eager = f(ys, *rest)
        (g_eager,) = torch.autograd.grad(eager, ys)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(ys, *rest)
        (g_comp,) = torch.autograd.grad(compiled, ys)
    assert_close(compiled, eager, rtol=1e-6)
    assert_close(g_comp, g_eager, rtol=1e-6)
