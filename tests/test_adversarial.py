"""Adv-KD ops (interpolation, gradient penalty, softplus losses) and AdversarialDistiller."""

from __future__ import annotations

import pytest
import torch
from torch import autograd, nn

import fastdistill
from fastdistill import testing
from fastdistill.nn import AdversarialDistiller
from fastdistill.ops.adversarial import gan_interpolate, gradient_norm_penalty
from fastdistill.testing import assert_close, randn
from fastdistill.testing import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 3), (3, 2, 5, 7), (2, 3, 33, 33)]  # the last spans two kernel blocks per sample
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
BACKENDS = testing.backend_device_params("gradient_penalty")
LOSS_BACKENDS = testing.backend_device_params("adversarial_losses")


def official_gradient_penalty(D, noise, real, fake, alpha):
    """Adv-KD's compute_gradient_penalty (kdgan_training.py) with the random alpha passed in."""
    alpha = alpha.view(-1, *([1] * (real.dim() - 1)))
    interpolates = (alpha * real + ((1 - alpha) * fake)).requires_grad_(True)
    d_interpolates = D(interpolates, noise)
    ones = torch.ones(real.shape[0], 1, dtype=real.dtype, device=real.device)
    gradients = autograd.grad(outputs=d_interpolates, inputs=interpolates, grad_outputs=ones, create_graph=True,
                              retain_graph=True, only_inputs=True)[0]
    gradients = gradients.view(gradients.size(0), -1)
    return ((gradients.norm(2, dim=1) - 1) ** 2).mean()


class CondD(nn.Module):
    """D(x, noise) -> (B, 1): image branch + conditioning branch (Adv-KD's shape of critic), with smooth
    activations so the double backward has curvature terms."""

    def __init__(self, c: int = 3, s: int = 8) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(c, 8, 4, 2, 1), nn.SiLU(), nn.Flatten())
        self.cond = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 * (s // 2) ** 2 + 4 * 16, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x, noise):
        return self.head(torch.cat([self.img(x), self.cond(noise)], dim=1))


# ----------------------------------------------------------------------------------------------
# Building blocks against float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpolation_with_given_alpha_vs_float64(backend, device, dtype):
    gen = testing.generator()
    for shape in SHAPES:
        args = [randn(*shape, gen=gen, dtype=dtype, device=device, requires_grad=True),
                randn(*shape, gen=gen, dtype=dtype, device=device, requires_grad=True),
                torch.rand(shape[0], generator=gen).to(device)]
        check_against_reference(gan_interpolate, gan_interpolate, args, dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_random_mixing(backend, device):
    real, fake = torch.randn(64, 3, 4, 4, device=device), torch.randn(64, 3, 4, 4, device=device)
    with fastdistill.use_backend(backend):
        torch.manual_seed(7)
        x1, a1 = gan_interpolate(real, fake)
        torch.manual_seed(7)
        x2, a2 = gan_interpolate(real, fake)
        x3, a3 = gan_interpolate(real, fake)
    assert torch.equal(x1, x2) and torch.equal(a1, a2), "not reproducible under torch.manual_seed"
    assert not torch.equal(a1, a3), "two draws gave the same weights"
    assert ((a1 >= 0) & (a1 < 1)).all() and a1.unique().numel() == 64
    assert 0.3 < a1.mean().item() < 0.7  # U(0, 1): mean 0.5, sd of the mean 0.036
    assert_close(x1, a1.view(-1, 1, 1, 1) * real + (1 - a1.view(-1, 1, 1, 1)) * fake, rtol=1e-6,
                 name="x_hat from the returned alpha")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_norm_penalty_vs_float64(backend, device, dtype):
    gen = testing.generator()
    for shape in SHAPES:
        g = randn(*shape, gen=gen, dtype=dtype, device=device, scale=0.7, requires_grad=True)
        check_against_reference(gradient_norm_penalty, gradient_norm_penalty, [g], {"weight": 10.0}, dtype=dtype,
                                backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_norm_penalty_zero_norm_has_zero_gradient(backend, device):
    g = torch.randn(3, 5, device=device)
    g[1] = 0
    g.requires_grad_(True)
    with fastdistill.use_backend(backend):
        loss = gradient_norm_penalty(g)
        (grad,) = torch.autograd.grad(loss, g)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()
    norms = g.detach().norm(dim=1)
    assert_close(loss, ((norms - 1) ** 2).mean(), rtol=1e-6)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_losses_vs_float64(backend, device, dtype):
    gen = testing.generator()
    for n_real, n_fake in [(1, 1), (7, 3), (1300, 1300)]:  # 1300 > one 1024-block
        real = randn(n_real, 1, gen=gen, dtype=dtype, device=device, scale=4.0, requires_grad=True)
        fake = randn(n_fake, 1, gen=gen, dtype=dtype, device=device, scale=4.0, requires_grad=True)
        check_against_reference(fastdistill.adversarial_losses, fastdistill.adversarial_losses, [real, fake],
                                dtype=dtype, backend=backend)
        check_against_reference(fastdistill.adversarial_losses, fastdistill.adversarial_losses, [None, fake],
                                dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_adversarial_losses_extreme_logits_are_finite_and_exact(backend, device):
    logits = torch.tensor([[-200.0], [-30.0], [0.0], [30.0], [200.0]], device=device, requires_grad=True)
    with fastdistill.use_backend(backend):
        d, g = fastdistill.adversarial_losses(logits, logits)
        grads = torch.autograd.grad(d + g, logits)[0]
    ref = nn.functional.softplus(-logits.double()).mean() * 2 + nn.functional.softplus(logits.double()).mean()
    assert_close(d + g, ref, rtol=1e-6)
    assert torch.isfinite(grads).all()


# ----------------------------------------------------------------------------------------------
# gradient_penalty against the official autograd formula
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_penalty_equals_official_formula_value_and_double_backward(backend, device):
    torch.manual_seed(testing.new_seed())
    D = CondD().to(device)
    B = 5
    real, fake, noise = (torch.randn(*s).to(device) for s in ((B, 3, 8, 8), (B, 3, 8, 8), (B, 3, 4, 4)))
    alpha = torch.rand(B).to(device)
    D.zero_grad()
    want = official_gradient_penalty(D, noise, real, fake, alpha)
    (10 * want).backward()
    want_grads = [p.grad.clone() if p.grad is not None else None for p in D.parameters()]
    D.zero_grad()
    with fastdistill.use_backend(backend):
        got = fastdistill.gradient_penalty(D, real, fake, noise, weight=10.0, alpha=alpha)
    got.backward()
    assert_close(got, 10 * want, rtol=1e-5, name="penalty")
    assert sum(w is not None for w in want_grads) >= len(want_grads) - 1  # only the last bias has none
    for i, (p, w) in enumerate(zip(D.parameters(), want_grads)):
        if w is None:
            assert p.grad is None or not p.grad.any(), f"D param {i}: gradient where the formula has none"
        else:
            assert_close(p.grad, w, rtol=1e-4, name=f"D param grad {i} (double backward)")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_penalty_flows_into_non_detached_samples(backend, device):
    torch.manual_seed(testing.new_seed())
    D = CondD().to(device)
    real = torch.randn(3, 3, 8, 8).to(device)
    fake = torch.randn(3, 3, 8, 8).to(device).requires_grad_(True)
    noise = torch.randn(3, 3, 4, 4).to(device)
    alpha = torch.rand(3).to(device)
    want = torch.autograd.grad(official_gradient_penalty(D, noise, real, fake, alpha), fake)[0]
    with fastdistill.use_backend(backend):
        got = torch.autograd.grad(fastdistill.gradient_penalty(D, real, fake, noise, weight=1.0, alpha=alpha), fake)[0]
    assert_close(got, want, rtol=1e-4, name="d GP / d fake")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compute_gradient_penalty_drop_in_signature(backend, device):
    torch.manual_seed(testing.new_seed())
    D = CondD().to(device)
    x, noise = torch.randn(4, 3, 8, 8).to(device), torch.randn(4, 3, 4, 4).to(device)
    # real == fake: the random alpha cannot matter, so the official value is exact.
    want = official_gradient_penalty(D, noise, x, x, torch.rand(4).to(device))
    with fastdistill.use_backend(backend):
        got = fastdistill.compute_gradient_penalty(D, noise, x, x, device)
    assert_close(got, want, rtol=1e-5)


def test_gradient_penalty_bad_inputs():
    D = CondD()
    real, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shapes must match.*fake"):
        fastdistill.gradient_penalty(D, real, torch.randn(2, 3, 8, 7), noise)
    with pytest.raises(ValueError, match="alpha must hold one weight per sample"):
        fastdistill.gradient_penalty(D, real, real, noise, alpha=torch.rand(3))
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        fastdistill.gradient_penalty(D, real, real, noise, weight=-1.0)
    with pytest.raises(TypeError, match="discriminator must be callable"):
        fastdistill.gradient_penalty("D", real, real, noise)
    with pytest.raises(ValueError, match="fake_logits is empty"):
        fastdistill.adversarial_losses(torch.randn(2, 1), torch.randn(0, 1))
    with pytest.raises(TypeError, match="real_logits must be a floating tensor"):
        fastdistill.adversarial_losses(torch.ones(2, 1, dtype=torch.long), torch.randn(2, 1))


# ----------------------------------------------------------------------------------------------
# AdversarialDistiller
# ----------------------------------------------------------------------------------------------


class TinyG(nn.Module):
    """student(inputs, step): 4x4 noise thumbnail -> 8x8 image (Adv-KD's interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 4, 2, 1)

    def forward(self, x, step):
        return torch.tanh(self.up(x))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adversarial_distiller_steps_match_official_losses(backend, device):
    torch.manual_seed(testing.new_seed())
    G, D = TinyG().to(device), CondD().to(device)
    dist = AdversarialDistiller(G, D, gp_weight=10.0, clip_value=0.1)
    inputs, real = torch.randn(4, 3, 4, 4).to(device), torch.randn(4, 3, 8, 8).to(device)
    fake = dist(inputs, 0)
    with fastdistill.use_backend(backend):
        d_loss = dist.discriminator_loss(real, fake, inputs, generator=torch.Generator().manual_seed(3))
        gp = fastdistill.gradient_penalty(D, real, fake.detach(), inputs, weight=10.0,
                                          generator=torch.Generator().manual_seed(3))
    sp = nn.functional.softplus
    adv = sp(-D(real, inputs)).mean() + sp(D(fake.detach(), inputs)).mean()
    assert_close(d_loss, adv + gp, rtol=1e-5, name="discriminator loss")
    assert_close(dist.last_terms["adversarial"], adv, rtol=1e-5)
    d_loss.backward()
    assert all(p.grad is None for p in G.parameters()), "the D loss must not reach the student"
    assert all(p.grad is not None for p in D.parameters())
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(10)
    # The clip kernel itself is tested with its op (tests/test_multi_tensor.py); here: the wiring.
    with fastdistill.use_backend("reference", ops=["clip_parameters_"]):
        dist.clip_discriminator_()
    assert max(p.abs().max().item() for p in D.parameters()) <= torch.tensor(0.1).item()  # fp32 bound
    D.zero_grad()
    with fastdistill.use_backend(backend):
        g_loss = dist.generator_loss(dist(inputs, 0), inputs)
    assert_close(g_loss, sp(-D(dist(inputs, 0), inputs)).mean(), rtol=1e-5, name="generator loss")
    g_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_adversarial_distiller_bad_arguments():
    with pytest.raises(ValueError, match="gp_weight must be >= 0"):
        AdversarialDistiller(TinyG(), CondD(), gp_weight=-1)
    with pytest.raises(ValueError, match="clip_value must be > 0 or None"):
        AdversarialDistiller(TinyG(), CondD(), clip_value=0)


@pytest.mark.slow
def test_adversarial_losses_compile_fullgraph_with_fake_kernel_and_autograd():
    def f(r, fk):
        d, g = fastdistill.adversarial_losses(r, fk)
        return d + 0.5 * g

    dev = testing.triton_device()  # CPU under the interpreter, else the GPU
    r, fk = (torch.randn(5, 1).to(dev).requires_grad_(True) for _ in range(2))
    torch._dynamo.reset()
    with fastdistill.use_backend("triton"):
        eager = f(r, fk)
        g_eager = torch.autograd.grad(eager, [r, fk])
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(r, fk)
        g_comp = torch.autograd.grad(compiled, [r, fk])
    assert_close(compiled, eager, rtol=1e-6)
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, rtol=1e-6)
