"""Per-sample diffusion steps, progressive distillation, BOOT and Adv-KD: fastdistill vs eager vs
torch.compile of the eager code a user would write.

Cases: on GPU the issue's shapes, pixel-space (64, 3, 256, 256) and SD latents (16, 4, 64, 64);
on CPU a tiny (2, 3, 16, 16) so that ``pytest bench --benchmark`` runs anywhere (CPU numbers only
show that the benchmarks run; there the fastdistill provider is the reference path).

Dtypes: diffusion/BOOT glue in bf16 (the networks' dtype) with fp32 arithmetic, Adv-KD in fp32 (the
official runs are fp32). The eager baselines do the same fp32 arithmetic (they upcast).

Bytes (the floor is bytes / measured copy bandwidth; N = elements of one full-size tensor, e = its
element size). These are the bytes the fused kernels must move, so "% of floor" is the fraction of
HBM bandwidth reached:
* ddim_step fwd: read x_t, model_output; write prev_sample, x0: 4 N e.
* progressive_distillation_target fwd: read z_t, z_target; write x~, eps~: 4 N e.
* pd_loss fwd+bwd: fwd reads x_S, x~, eps~, z_t (4 N e); bwd reads x_S + eps~ + z_t (eps branch,
  the larger) and writes dx_S (4 N e): 8 N e.
* boot_loss fwd+bwd (eps teacher, CFG): fwd reads y_s, y_t, f_c, f_u, x_t and writes dy_s (the gradient
  needs no reduction result, so the forward writes it: 6 N e); bwd scales it by the upstream
  gradient (2 N e): 8 N e. (Recomputing in the backward instead would move 11 N e.)
* gradient penalty fwd+bwd: fwd reads g (N e); bwd reads g, writes dg (2 N e): 3 N e.
* interpolation fwd (in-kernel random alpha): read real, fake; write x_hat: 3 N e.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdistill
import harness
from fastdistill.ops.adversarial import gan_interpolate, gradient_norm_penalty

if harness.on_gpu():
    CASES = {"pixel (64,3,256,256)": (64, 3, 256, 256), "SD latent (16,4,64,64)": (16, 4, 64, 64)}
else:
    CASES = {"tiny (2,3,16,16)": (2, 3, 16, 16)}
GLUE_DTYPE = torch.bfloat16 if harness.on_gpu() else torch.float32


def _coefs(B: int, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    abar_t = (torch.rand(B, generator=g) * 0.5 + 0.005).to(dev)
    abar_s = abar_t + 0.1
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()


def _v(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.view(-1, *([1] * (like.dim() - 1)))


def _providers(fused, eager, inputs=None):
    if inputs is not None:
        fused, eager_step = harness.fwd_bwd(fused, inputs), harness.fwd_bwd(eager, inputs)
        comp = harness.compiled(eager)
        return {"fastdistill": fused, "eager": eager_step, "torch.compile": harness.fwd_bwd(comp, inputs)}
    return {"fastdistill": fused, "eager": eager, "torch.compile": harness.compiled(eager)}


@pytest.mark.parametrize("case", list(CASES))
def test_ddim_step(case):
    shape = CASES[case]
    dev, B = harness.device(), shape[0]
    x = torch.randn(shape, device=dev, dtype=GLUE_DTYPE)
    m = torch.randn(shape, device=dev, dtype=GLUE_DTYPE)
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0).to(dev)
    t = torch.randint(20, 1000, (B,), device=dev)
    p = t - 20

    def eager():
        a_t, a_p = ac[t], ac[p]
        alpha, sigma = _v(a_t.sqrt(), x), _v((1 - a_t).sqrt(), x)
        x0 = (x.float() - sigma * m.float()) / alpha
        prev = _v(a_p.sqrt(), x) * x0 + _v((1 - a_p).sqrt(), x) * m.float()
        return prev.to(x.dtype), x0.to(x.dtype)

    harness.run_case("ddim_step", case, _providers(lambda: fastdistill.ddim_step(x, m, t, p, ac), eager),
                     mode="fwd", bytes_moved=4 * x.numel() * x.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_progressive_distillation_target(case):
    shape = CASES[case]
    dev = harness.device()
    zt = torch.randn(shape, device=dev, dtype=GLUE_DTYPE)
    zs = torch.randn(shape, device=dev, dtype=GLUE_DTYPE)
    a_t, s_t, a_s, s_s = _coefs(shape[0], dev)

    def eager():
        frac = _v(s_s / s_t, zt)
        x = (zs.float() - frac * zt.float()) / (_v(a_s, zt) - frac * _v(a_t, zt))
        e = (zt.float() - _v(a_t, zt) * x) / _v(s_t, zt)
        return x.to(zt.dtype), e.to(zt.dtype)

    fused = lambda: fastdistill.progressive_distillation_target(zt, zs, a_t, s_t, a_s, s_s)  # noqa: E731
    harness.run_case("pd_target", case, _providers(fused, eager), mode="fwd",
                     bytes_moved=4 * zt.numel() * zt.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_pd_loss(case):
    shape = CASES[case]
    dev, B = harness.device(), shape[0]
    xs = torch.randn(shape, device=dev, dtype=GLUE_DTYPE, requires_grad=True)
    xt, et, zt = (torch.randn(shape, device=dev, dtype=GLUE_DTYPE) for _ in range(3))
    a_t, s_t, _, _ = _coefs(B, dev)

    def eager():
        x = xs.float()
        eps = (zt.float() - _v(a_t, x) * x) / _v(s_t, x)
        mse_x = (x - xt.float()).pow(2).reshape(B, -1).mean(1)
        mse_e = (eps - et.float()).pow(2).reshape(B, -1).mean(1)
        return torch.maximum(mse_x, mse_e).mean()

    fused = lambda: fastdistill.pd_loss(xs, xt, et, zt, a_t, s_t)  # noqa: E731
    harness.run_case("pd_loss", case, _providers(fused, eager, [xs]), mode="fwd+bwd",
                     bytes_moved=8 * xs.numel() * xs.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_boot_loss(case):
    shape = CASES[case]
    dev, B = harness.device(), shape[0]
    ys = torch.randn(shape, device=dev, dtype=GLUE_DTYPE, requires_grad=True)
    yt, fc, fu, xt = (torch.randn(shape, device=dev, dtype=GLUE_DTYPE) for _ in range(4))
    a_t, s_t, a_s, s_s = _coefs(B, dev)
    w = torch.ones(B, device=dev)
    gs = 7.5

    def eager():
        f = fu.float() + gs * (fc.float() - fu.float())
        fx = (xt.float() - _v(s_t, f) * f) / _v(a_t, f)
        delta = 1 - (s_s * a_t) / (a_s * s_t)
        target = yt.float() + _v(delta, f) * (fx - yt.float())
        per = (ys.float() - target).pow(2).reshape(B, -1).mean(1) * w / delta**2
        return per.mean()

    def fused():
        return fastdistill.boot_loss(ys, yt, fc, x_t=xt, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s, weight=w,
                                     teacher_output_uncond=fu, guidance_scale=gs)

    harness.run_case("boot_loss", case, _providers(fused, eager, [ys]), mode="fwd+bwd",
                     bytes_moved=8 * ys.numel() * ys.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_penalty_norm(case):
    """The penalty on a given gradient map g (the part fastdistill fuses; D's double backward is not timed)."""
    shape = CASES[case]
    dev, B = harness.device(), shape[0]
    g = torch.randn(shape, device=dev, requires_grad=True)

    def eager():
        return 10.0 * ((g.view(B, -1).norm(2, dim=1) - 1) ** 2).mean()

    harness.run_case("gp_penalty", case, _providers(lambda: gradient_norm_penalty(g, 10.0), eager, [g]),
                     mode="fwd+bwd", bytes_moved=3 * g.numel() * g.element_size())


@pytest.mark.parametrize("case", list(CASES))
def test_gan_interpolation(case):
    shape = CASES[case]
    dev, B = harness.device(), shape[0]
    real, fake = torch.randn(shape, device=dev), torch.randn(shape, device=dev)

    def eager():  # the official code draws alpha on the host (numpy) and copies it over
        alpha = torch.rand(B, 1, 1, 1).to(dev)
        return alpha * real + (1 - alpha) * fake

    harness.run_case("gan_interp", case, _providers(lambda: gan_interpolate(real, fake)[0], eager), mode="fwd",
                     bytes_moved=3 * real.numel() * real.element_size())


def test_adversarial_losses():
    dev = harness.device()
    real = torch.randn(64, 1, device=dev, requires_grad=True)
    fake = torch.randn(64, 1, device=dev, requires_grad=True)

    def fused():
        d, g = fastdistill.adversarial_losses(real, fake)
        return d + g

    def eager():
        return F.softplus(-real).mean() + F.softplus(fake).mean() + F.softplus(-fake).mean()

    harness.run_case("adversarial_losses", "logits (64,1)", _providers(fused, eager, [real, fake]), mode="fwd+bwd",
                     bytes_moved=4 * 2 * 64 * 4)
