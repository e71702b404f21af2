"""MultiStudent: routed outputs and gradients equal the per-sample loop that calls the owning student on
each sample alone, for random-weight tiny diffusers UNets; scalar timesteps; diffusers sampling."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.nn import MultiStudent

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

BOUNDARIES = [0, 250, 600, 1000]

# The fused path vmaps attention; PyTorch has no batching rule for CPU flash attention and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def tiny_unet(seed: int, width: int = 4) -> UNet2DModel:
    # ecosystem.md 2.1 (diffusers' own test config), one layer per block and 8x8 images for speed.
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width), norm_num_groups=2, attention_head_dim=3,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def tiny_cond_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(4, 8), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


@pytest.fixture(scope="module")
def students():
    return [tiny_unet(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def cond_students():
    return [tiny_cond_unet(seed) for seed in (4, 5, 6)]


def owner(t: int) -> int:
    return next(k for k in range(len(BOUNDARIES) - 1) if BOUNDARIES[k] <= t < BOUNDARIES[k + 1])


def per_sample_loop(students, sample, timesteps, **kwargs):
    outs = []
    for b in range(sample.shape[0]):
        extra = {k: v[b:b + 1] for k, v in kwargs.items()}
        outs.append(students[owner(int(timesteps[b]))](sample[b:b + 1], timesteps[b:b + 1], **extra).sample)
    return torch.cat(outs)


def grads_of(out: torch.Tensor, upstream: torch.Tensor, leaves):
    return torch.autograd.grad(out, leaves, upstream, allow_unused=True)


def compare_with_loop(model, students, sample, t, rtol=1e-4, **kwargs):
    x = sample.clone().requires_grad_(True)
    x_ref = sample.clone().requires_grad_(True)
    got = model(x, t, **kwargs).sample
    want = per_sample_loop(students, x_ref, t, **kwargs)
    testing.assert_close(got, want, rtol=rtol, name="routed output")
    upstream = torch.randn(got.shape, generator=testing.generator())
    leaves = [x] + [p for s in students for p in (s.conv_in.weight, s.conv_out.bias)]
    leaves_ref = [x_ref] + leaves[1:]
    g = grads_of(got, upstream, leaves)
    w = grads_of(want, upstream, leaves_ref)
    for i, (a, b) in enumerate(zip(g, w)):
        if b is None:
            assert a is None or a.abs().max() == 0, f"grad {i}: student without samples got a gradient"
            continue
        testing.assert_close(a, b, rtol=rtol, name=f"grad {i}")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("timesteps", [
    [999, 0, 250, 249, 600, 599],  # every boundary and the value just below it
    [5, 700, 10],                  # student 1 empty
    [300, 310, 599],               # one segment only
    [42],                          # batch of one
])
def test_routed_unet2d_matches_per_sample_loop(students, fused, timesteps):
    model = MultiStudent(students, BOUNDARIES, fused=fused)
    t = torch.tensor(timesteps)
    sample = torch.randn(len(timesteps), 3, 8, 8, generator=testing.generator())
    compare_with_loop(model, students, sample, t)


@pytest.mark.parametrize("fused", [False, True])
def test_routed_unet2d_condition_matches_per_sample_loop(cond_students, fused):
    model = MultiStudent(cond_students, BOUNDARIES, fused=fused)
    gen = testing.generator()
    t = torch.tensor([900, 3, 400, 260, 10])
    sample = torch.randn(5, 4, 8, 8, generator=gen)
    ehs = torch.randn(5, 3, 8, generator=gen)
    compare_with_loop(model, cond_students, sample, t, encoder_hidden_states=ehs)


def test_return_types_match_the_students(students, cond_students):
    model = MultiStudent(students, BOUNDARIES, fused=False)
    x = torch.randn(3, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([1, 500, 900])
    with torch.no_grad():
        out = model(x, t)
        tup = model(x, t, return_dict=False)
    assert type(out) is type(students[0](x[:1], t[:1]))
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)
    cond = MultiStudent(cond_students, BOUNDARIES)
    ehs = torch.randn(3, 3, 8, generator=testing.generator())
    with torch.no_grad():
        a = cond(torch.randn(3, 4, 8, 8), t, ehs, return_dict=False)  # encoder_hidden_states positional
    assert isinstance(a, tuple) and a[0].shape == (3, 4, 8, 8)


def test_scalar_timestep_goes_to_one_student(students):
    model = MultiStudent(students, BOUNDARIES)
    x = torch.randn(2, 3, 8, 8, generator=testing.generator())
    with torch.no_grad():
        for t in (0, 249, 250, 999, torch.tensor(600), torch.tensor([601])):
            want = students[owner(int(t))](x, t).sample
            assert torch.equal(model(x, t).sample, want)
        # a per-sample tensor whose samples all share one owner also runs that student alone
        assert torch.equal(model(x, torch.tensor([700, 800])).sample, students[2](x, torch.tensor([700, 800])).sample)


def test_bad_boundaries_and_timesteps(students):
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiStudent(students, [0, 600, 250, 1000])
    with pytest.raises(ValueError, match="start at 0"):
        MultiStudent(students, [10, 250, 600, 1000])
    with pytest.raises(ValueError, match="end at num_train_timesteps = 1000"):
        MultiStudent(students, [0, 250, 600, 900])
    with pytest.raises(ValueError, match="end at num_train_timesteps = 500"):
        MultiStudent(students, BOUNDARIES, num_train_timesteps=500)
    with pytest.raises(ValueError, match="3 students need 4 boundaries"):
        MultiStudent(students, [0, 500, 1000])
    with pytest.raises(ValueError, match="fused must be True, False or 'auto'"):
        MultiStudent(students, BOUNDARIES, fused="yes")
    with pytest.raises(ValueError, match="fused=True needs students of one architecture"):
        MultiStudent([students[0], students[1], tiny_unet(7, width=6)], BOUNDARIES, fused=True)
    model = MultiStudent(students, BOUNDARIES)
    x = torch.randn(2, 3, 8, 8)
    for bad in (torch.tensor([5, 1000]), torch.tensor([-1, 5])):
        with pytest.raises(ValueError, match="timesteps lie outside"):
            model(x, bad)
    with pytest.raises(ValueError, match="outside \\[0, num_train_timesteps = 1000\\)"):
        model(x, 1000)
    with pytest.raises(ValueError, match="timestep must be a scalar or have shape \\(2,\\)"):
        model(x, torch.tensor([1, 2, 3]))


def test_fused_capacity(students):
    x = torch.randn(4, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([1, 2, 3, 700])
    fixed = MultiStudent(students, BOUNDARIES, fused=True, capacity=3)
    loop = MultiStudent(students, BOUNDARIES, fused=False)
    with torch.no_grad():
        testing.assert_close(fixed(x, t).sample, loop(x, t).sample, rtol=1e-4)
    small = MultiStudent(students, BOUNDARIES, fused=True, capacity=2)
    with pytest.raises(ValueError, match="more than capacity=2"):
        small(x, t)


def test_skipped_students_touched_for_ddp(students):
    x = torch.randn(2, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([1, 2])  # students 1 and 2 get nothing
    for s in students:
        s.zero_grad(set_to_none=True)
    touched = MultiStudent(students, BOUNDARIES, fused=False, touch_skipped=True)
    plain = MultiStudent(students, BOUNDARIES, fused=False, touch_skipped=False)
    out = touched(x, t).sample
    with torch.no_grad():
        assert torch.equal(out, plain(x, t).sample)  # the touch does not change values
    out.sum().backward()
    for s in students[1:]:
        grads = [p.grad for p in s.parameters()]
        assert all(g is not None and g.abs().max() == 0 for g in grads)
    for s in students:
        s.zero_grad(set_to_none=True)
    plain(x, t).sample.sum().backward()
    assert all(p.grad is None for s in students[1:] for p in s.parameters())
    for s in students:
        s.zero_grad(set_to_none=True)


def test_ddim_pipeline_with_multistudent_unet(students):
    model = MultiStudent(students, BOUNDARIES)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3)

    # The same loop by hand with the owning student at every step gives the same images.
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(3)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(students[owner(int(t))](x, t).sample, t, x, eta=0.0).prev_sample
    want = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - want).max() < 1e-5


def test_per_sample_sampling_step_uses_routing(students):
    # A per-sample-timestep sampler (e.g. LCM-style with mixed t) routes each sample to its owner.
    model = MultiStudent(students, BOUNDARIES, fused=False)
    x = torch.randn(3, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([980, 20, 400])
    with torch.no_grad():
        got = model(x, t).sample
        want = per_sample_loop(students, x, t)
    testing.assert_close(got, want, rtol=1e-4)
    with fastdistill.use_backend("reference"):
        with torch.no_grad():
            testing.assert_close(model(x, t).sample, want, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_multistudent_matches_loop(fused):
    students = [tiny_unet(s).cuda() for s in (1, 2, 3)]
    model = MultiStudent(students, BOUNDARIES, fused=fused)
    t = torch.tensor([999, 0, 250, 249, 600, 599, 5, 5]).cuda()
    sample = torch.randn(8, 3, 8, 8, device="cuda")
    compare_with_loop(model, students, sample, t, rtol=1e-3)


@pytest.mark.gpu
def test_cuda_fused_fixed_capacity_step_has_no_host_sync():
    students = [tiny_unet(s).cuda() for s in (1, 2, 3)]
    model = MultiStudent(students, BOUNDARIES, fused=True, capacity=4)
    t = torch.tensor([999, 0, 250, 249, 600, 599, 5, 5]).cuda()
    x = torch.randn(8, 3, 8, 8, device="cuda")
    want = per_sample_loop(students, x, t)
    model(x, t)  # warm-up (allocations, cached boundaries)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(x, t).sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    testing.assert_close(out, want, rtol=1e-3)
