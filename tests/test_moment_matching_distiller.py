"""MomentMatchingDistiller on tiny random-weight diffusers UNet2DModels, both variants."""

from __future__ import annotations

import copy

import pytest
import torch

import fastdistill
from fastdistill.nn import MomentMatchingDistiller

diffusers = pytest.importorskip("diffusers")


def _unet(seed: int = 0, num_class_embeds: int | None = None, dtype=torch.float32):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds)
    return model if dtype == torch.float32 else model.to(dtype)


def _scheduler(prediction_type: str = "epsilon"):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def _grads_of(module):
    return [p.grad for p in module.parameters()]


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_alternating_losses_finite_and_gradients_reach_only_their_network(prediction_type):
    teacher = _unet(0)
    student = copy.deepcopy(teacher)
    # An aux different from the teacher (a copy would make the surrogate's gradient exactly zero).
    mm = MomentMatchingDistiller(student, teacher, _unet(2), variant="alternating",
                                 scheduler=_scheduler(prediction_type), num_student_steps=4)
    assert mm.prediction_type == prediction_type
    assert torch.allclose(mm.alphas ** 2, _scheduler().alphas_cumprod.float())
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 8, 8, generator=gen)
    loss = mm.student_loss(x0, generator=gen)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads_of(mm.student))
    assert all(g is None for g in _grads_of(mm.aux)) and all(g is None for g in _grads_of(mm.teacher))
    assert torch.isfinite(mm.last_stats["moment_gap"])
    mm.student.zero_grad(set_to_none=True)
    aux = mm.aux_loss(x0, torch.tensor([999, 499, 249, 0]), generator=gen)
    assert torch.isfinite(aux) and aux > 0
    aux.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads_of(mm.aux))
    assert all(g is None for g in _grads_of(mm.student)) and all(g is None for g in _grads_of(mm.teacher))


def test_alternating_student_gradient_is_the_surrogates():
    """The student's x-prediction gets w (x_aux - x_teacher)/N: with aux == teacher the gradient is zero."""
    teacher = _unet(0)
    mm = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, aux=copy.deepcopy(teacher),
                                 scheduler=_scheduler(), num_student_steps=4)
    x0 = torch.randn(2, 3, 8, 8)
    mm.student_loss(x0, torch.tensor([999, 249])).backward()
    assert all(g is None or g.abs().max() == 0 for g in _grads_of(mm.student))


def test_classifier_free_guidance_and_conditioning_kwargs():
    teacher = _unet(0, num_class_embeds=5)
    mm = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, scheduler=_scheduler(), num_student_steps=2,
                                 guidance_scale=3.0)
    x0 = torch.randn(2, 3, 8, 8)
    labels, null = torch.tensor([1, 3]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="uncond="):
        mm.student_loss(x0, class_labels=labels)
    loss = mm.student_loss(x0, class_labels=labels, uncond={"class_labels": null})
    aux = mm.aux_loss(x0, class_labels=labels, uncond={"class_labels": null})
    assert torch.isfinite(loss) and torch.isfinite(aux)


@pytest.mark.parametrize("restore,prediction_type", [("copy", "epsilon"), ("inverse", "v_prediction")])
def test_parameter_variant_gradients_reach_only_the_student_and_teacher_is_restored(restore, prediction_type):
    teacher = _unet(0)
    before = _snapshot(teacher)
    mm = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, variant="parameter",
                                 scheduler=_scheduler(prediction_type), num_student_steps=4, restore=restore,
                                 perturb_step=1e-2)
    assert mm.aux is None
    x0 = torch.randn(4, 3, 8, 8)
    loss = mm.student_loss(x0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads_of(mm.student))
    assert all(g is None for g in _grads_of(mm.teacher))
    assert all(not p.requires_grad for p in mm.teacher.parameters())
    for p, q in zip(mm.teacher.parameters(), before):
        if restore == "copy":
            assert torch.equal(p, q)
        else:
            # one ulp at the larger of |theta| and |theta'| (first rms step: |Lambda g1| < 1)
            ulp = torch.finfo(torch.float32).eps * (q.abs() + mm.perturb_step)
            assert ((p - q).abs() <= ulp).all()
    assert mm.precond_state is not None and len(mm.precond_state) == len(list(teacher.parameters()))
    assert torch.isfinite(mm.last_stats["moment_estimate"]) and mm.last_stats["g1_norm_sq"] > 0
    with pytest.raises(RuntimeError, match="only for variant='alternating'"):
        mm.aux_loss(x0)


@pytest.mark.parametrize("preconditioner", ["identity", "rms"])
def test_parameter_surrogate_matches_finite_difference_of_its_definition(preconditioner):
    """d/dx2 [g1^T Lambda grad_theta l(x2, z_s)] by central differences of the exact F (float64, teacher
    gradients by autograd, F by moment_dot) against the surrogate's gradient (forward difference in theta)."""
    teacher = _unet(0, dtype=torch.float64)
    weighting = lambda a, s: 1.0 + a  # noqa: E731  (a non-uniform w(s))
    mm = MomentMatchingDistiller(_unet(1, dtype=torch.float64), teacher, variant="parameter",
                                 scheduler=_scheduler("v_prediction"), num_student_steps=4,
                                 preconditioner=preconditioner, perturb_step=1e-8, weighting=weighting)
    gen = torch.Generator().manual_seed(3)
    B = 2
    s = torch.tensor([249, 499])
    z_s = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64)
    x1 = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64)
    x2 = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g1 = mm.teacher_grad(x1, z_s, s)
    if preconditioner == "rms":
        mm.update_preconditioner(g1)
        g0 = mm.teacher_grad(torch.randn_like(x1), z_s, s)  # a second EMA step: v is not just g1^2
        precond = mm.update_preconditioner(g0)
    else:
        precond = mm.update_preconditioner(g1)
        assert precond is None
    surrogate = mm.parameter_surrogate(x2, z_s, s, g1, precond)
    (grad,) = torch.autograd.grad(surrogate, x2)

    def F(x):
        return fastdistill.moment_dot(g1, mm.teacher_grad(x, z_s, s), precond, eps=mm.precond_eps)

    u = torch.randn(x2.shape, generator=gen, dtype=torch.float64)
    h = 1e-3
    with torch.no_grad():
        fd = (F(x2 + h * u) - F(x2 - h * u)) / (2 * h)
        directional = (grad * u).sum()
        f_exact = F(x2.detach())
    assert abs(directional - fd) <= 1e-4 * abs(fd), (directional.item(), fd.item())
    # and the forward-pass estimate of F itself
    assert abs(mm.last_stats["moment_estimate"] - f_exact) <= 1e-4 * abs(f_exact)


def test_student_sampler_runs_k_steps():
    teacher = _unet(0)
    mm = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, scheduler=_scheduler(), num_student_steps=3)
    assert mm.student_timesteps().tolist() == [332, 665, 998]
    out = mm.sample(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_clip_sample_bounds_every_x_prediction():
    teacher = _unet(0)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    free = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, scheduler=sched, num_student_steps=2)
    clipped = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, scheduler=sched, num_student_steps=2,
                                      clip_sample=1.0)
    z, t = torch.randn(3, 3, 8, 8), torch.tensor([999, 500, 10])
    x_free = free.x_prediction(free.student, z, t)
    x_clip = clipped.x_prediction(clipped.student, z, t)
    assert x_free.abs().max() > 10  # alpha_T ~ 0: the unclamped x-prediction at T-1 is huge
    torch.testing.assert_close(x_clip, x_free.clamp(-1, 1))
    out = clipped.sample(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert out.abs().max() <= 1
    with pytest.raises(ValueError, match="clip_sample must be a number > 0"):
        MomentMatchingDistiller(copy.deepcopy(teacher), teacher, scheduler=sched, clip_sample=0.0)


def test_bad_arguments_are_clear_errors():
    teacher = _unet(0)
    student = copy.deepcopy(teacher)
    sched = _scheduler()
    with pytest.raises(ValueError, match="variant must be"):
        MomentMatchingDistiller(student, teacher, variant="both", scheduler=sched)
    with pytest.raises(ValueError, match="no auxiliary network"):
        MomentMatchingDistiller(student, teacher, teacher, variant="parameter", scheduler=sched)
    with pytest.raises(ValueError, match="exactly one of scheduler or alphas_cumprod"):
        MomentMatchingDistiller(student, teacher, scheduler=sched, alphas_cumprod=sched.alphas_cumprod)
    with pytest.raises(ValueError, match="perturb_step must be a finite number > 0"):
        MomentMatchingDistiller(student, teacher, variant="parameter", scheduler=sched, perturb_step=-1e-3)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        MomentMatchingDistiller(student, teacher, alphas_cumprod=sched.alphas_cumprod, prediction_type="flow")
    mm = MomentMatchingDistiller(student, teacher, alphas_cumprod=sched.alphas_cumprod, num_student_steps=2)
    with pytest.raises(ValueError, match="timesteps must be an integer tensor of shape"):
        mm.student_loss(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        mm.student_loss(torch.randn(2, 3, 8, 8), torch.tensor([1, 1000]))
    pm = MomentMatchingDistiller(copy.deepcopy(teacher), teacher, variant="parameter", scheduler=sched)
    with pytest.raises(ValueError, match="batch of at least 2"):
        pm.student_loss(torch.randn(1, 3, 8, 8))
