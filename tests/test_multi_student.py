"""MultiStudent: routed outputs and gradients equal the per-sample loop that calls the owning student on
each sample alone, for random-weight tiny diffusers UNets; scalar timesteps; diffusers sampling."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import testing
from fastdistill.nn import MultiStudent

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

BOUNDARIES = [0, 250, 600, 1000]

# The fused path vmaps attention. PyTorch has no batching rule for CPU flash attention and warns when vmap
# falls back to a loop over the students; MultiStudent routes SDPA to its math backend off CUDA, so the
# warning must never appear (an error here).
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")


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


# --------------------------------------------------------------------------------------------------
# defaults, the stacked-weight cache, batched attention, the error contract


def test_default_is_the_loop_and_auto_means_loop(students, monkeypatch):
    calls = []
    monkeypatch.setattr("fastdistill.nn.multi_student._stack_named", lambda *a: calls.append(1))
    x = torch.randn(4, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([1, 300, 700, 2])
    for kwargs in ({}, {"fused": "auto"}):
        model = MultiStudent(students, BOUNDARIES, **kwargs)
        assert model.fused in (False, "auto") and model.same_architecture
        with torch.no_grad():
            testing.assert_close(model(x, t).sample, per_sample_loop(students, x, t), rtol=1e-4)
    assert not calls, "the default / 'auto' took the fused path"


def _fresh_students():
    return [tiny_unet(seed) for seed in (11, 12, 13)]


def _count_stacks(monkeypatch) -> list:
    import fastdistill.nn.multi_student as ms

    calls: list = []
    original = ms._stack_named

    def counting(per, names):
        calls.append(len(names))
        return original(per, names)

    monkeypatch.setattr(ms, "_stack_named", counting)
    return calls


def test_fused_cache_no_restack_without_updates_and_exact_gradients(monkeypatch):
    studs = _fresh_students()
    fused = MultiStudent(studs, BOUNDARIES, fused=True)
    loop = MultiStudent(studs, BOUNDARIES, fused=False)
    calls = _count_stacks(monkeypatch)
    gen = testing.generator()
    batches = [(torch.randn(5, 3, 8, 8, generator=gen), torch.tensor([3, 900, 400, 20, 610])) for _ in range(2)]
    for x, t in batches:  # forward/backward passes through the same cached stack
        fused(x, t).sample.square().sum().backward()
    assert len(calls) == 2, f"expected one stack build (params + buffers), got {len(calls)} stack calls"
    got = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad(set_to_none=True)
    for x, t in batches:
        loop(x, t).sample.square().sum().backward()
    # one max-norm comparison over all parameters (some gradients are exactly 0 in theory, e.g. biases
    # followed by a group norm, and only round-off in practice)
    testing.assert_close(torch.cat([g.reshape(-1) for g in got]),
                         torch.cat([p.grad.reshape(-1) for p in loop.parameters()]), rtol=1e-4,
                         name="accumulated gradients")
    with torch.no_grad():  # a grad-mode build serves no-grad forwards too
        fused(*batches[0])
    assert len(calls) == 2


def test_fused_cache_invalidated_by_in_place_updates(monkeypatch):
    studs = _fresh_students()
    fused = MultiStudent(studs, BOUNDARIES, fused=True)
    loop = MultiStudent(studs, BOUNDARIES, fused=False)
    calls = _count_stacks(monkeypatch)
    x = torch.randn(4, 3, 8, 8, generator=testing.generator())
    t = torch.tensor([5, 300, 800, 260])
    before = fused(x, t).sample
    before.square().mean().backward()
    torch.optim.SGD(fused.parameters(), lr=0.5).step()  # in-place on every parameter: versions bump
    after = fused(x, t).sample
    assert len(calls) == 4, "the optimizer step did not invalidate the stacked weights"
    assert (after - before).abs().max() > 1e-3
    with torch.no_grad():
        testing.assert_close(after, loop(x, t).sample, rtol=1e-4, name="fused output after the step")
        studs[1].conv_in.weight.add_(0.25)  # a plain in-place update of one student's parameter
        testing.assert_close(fused(x, t).sample, loop(x, t).sample, rtol=1e-4, name="after add_")
        assert len(calls) == 6
        fused.load_state_dict(MultiStudent(_fresh_students()[::-1], BOUNDARIES).state_dict())
        testing.assert_close(fused(x, t).sample, loop(x, t).sample, rtol=1e-4, name="after load_state_dict")
        assert len(calls) == 8
        studs[2].conv_out.bias.data.mul_(3.0)  # bypasses the version counter: documented, clear by hand
        fused.clear_stack_cache()
        testing.assert_close(fused(x, t).sample, loop(x, t).sample, rtol=1e-4, name="after clear_stack_cache")
    # a no-grad build never serves a grad forward: gradients still reach the students
    fused.clear_stack_cache()
    with torch.no_grad():
        fused(x, t)
    fused.zero_grad(set_to_none=True)
    fused(x, t).sample.sum().backward()
    assert all(s.conv_in.weight.grad is not None for s in studs)


def test_fused_module_deepcopies_and_pickles_after_a_forward():
    fused = MultiStudent(_fresh_students(), BOUNDARIES, fused=True)
    x, t = torch.randn(3, 3, 8, 8, generator=testing.generator()), torch.tensor([1, 500, 900])
    out = fused(x, t).sample  # the cache now holds stacked tensors with a grad_fn
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone._stack_cache.params is None
        with torch.no_grad():
            testing.assert_close(clone(x, t).sample, out.detach(), rtol=1e-5)


def test_fused_attention_is_batched_not_a_per_student_loop():
    from torch.func import vmap

    from fastdistill.nn.multi_student import _batched_attention

    q = torch.randn(3, 2, 2, 5, 4, generator=testing.generator())

    def attend(q):
        return F.scaled_dot_product_attention(q, q, q)

    def fallback_warnings(ctx) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ctx:
                out = vmap(attend)(q)
        testing.assert_close(out, torch.stack([attend(q[k]) for k in range(3)]), rtol=1e-5)
        return sum("performance drop" in str(w.message) for w in caught)

    import contextlib
    assert fallback_warnings(contextlib.nullcontext()) >= 1  # this torch still lacks the CPU batching rule
    assert fallback_warnings(_batched_attention(torch.device("cpu"))) == 0
    # and the whole fused forward of an attention UNet runs without the fallback
    fused = MultiStudent(_fresh_students(), BOUNDARIES, fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fused(torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 900]))
    assert not [w for w in caught if "performance drop" in str(w.message)]


def test_error_contract_types_and_values(students):
    for kwargs in ({"fused": 1}, {"fused": None}, {"num_train_timesteps": 1000.0}, {"num_train_timesteps": "1000"},
                   {"capacity": 2.5}, {"capacity": True}, {"capacity_multiple": "8"}, {"touch_skipped": "yes"}):
        with pytest.raises(TypeError):
            MultiStudent(students, BOUNDARIES, **kwargs)
    with pytest.raises(TypeError, match="students\\[1\\] must be an nn.Module"):
        MultiStudent([students[0], "unet", students[2]], BOUNDARIES)
    for kwargs in ({"fused": "yes"}, {"num_train_timesteps": 0}, {"capacity": 0}, {"capacity_multiple": 0}):
        with pytest.raises(ValueError):
            MultiStudent(students, [0, 1, 2, 3] if "num_train_timesteps" in kwargs else BOUNDARIES, **kwargs)
    with pytest.raises(ValueError, match="at least one module"):
        MultiStudent([], [0, 1000])
    model = MultiStudent(students, BOUNDARIES)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        model([[1.0]], 5)
    with pytest.raises(ValueError, match="0-d"):
        model(torch.tensor(1.0), 5)
    with pytest.raises(TypeError, match="timestep must be a number or a tensor"):
        model(torch.randn(1, 3, 8, 8), "5")
