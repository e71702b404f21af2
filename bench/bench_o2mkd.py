"""O2MKD (issue 5): K timestep-segment students trained on batches with per-sample timesteps.

GPU cases (issue 5): K=4 students, each a CIFAR-10 DDPM UNet at half width (block_out_channels
64/128/128/128, ~9 M parameters), B=128, uniform timesteps, fwd+bwd of the per-segment MSE to a
teacher target. Providers:

* ``fastdistill``: ``MultiStudent(fused="auto")`` + ``segment_mse`` (``"auto"`` = the loop until a GPU benchmark shows fused winning);
* ``fastdistill-loop`` / ``fastdistill-fused``: both execution paths forced;
* ``eager``: the ``index_select``-per-student loop a user would write (``nonzero`` per student:
  K host syncs);
* ``all-students``: every student on the whole batch, then select per sample;
* routing alone (route + gather + scatter) against the eager ``bucketize + argsort + index_select``
  and ``torch.compile`` of it; the step's host syncs are counted with
  ``torch.cuda.set_sync_debug_mode`` and stored in ``extra``.

Sampling: 50 DDIM steps with the ``MultiStudent`` against one student of the same size.

FLOPs are not counted for the UNet cases (the floor is meaningless for a whole model); routing
moves 2 x (gather + scatter) x B x C x H x W x 4 bytes. On CPU every case runs at toy size so that
``pytest bench --benchmark`` works here; CPU numbers only show that the benchmark runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import harness

import fastdistill
from fastdistill.nn import MultiStudent

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

K = 4
T = 1000
BOUNDARIES = [0, 250, 500, 750, 1000]


def _student(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    if harness.on_gpu():
        # google/ddpm-cifar10-32 layout at half width.
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(64, 128, 128, 128), norm_num_groups=32,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=3,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _setup():
    dev = harness.device()
    students = [_student(s).to(dev) for s in range(K)]
    B = 128 if harness.on_gpu() else 8
    size = students[0].config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3, size, size, generator=gen).to(dev)
    target = torch.randn(B, 3, size, size, generator=gen).to(dev)
    t = torch.randint(0, T, (B,), generator=gen).to(dev)
    return students, x, target, t


def _eager_index_select_loop(students, x, target, t):
    """What a user writes: per student, nonzero -> index_select -> forward -> per-student mean."""
    loss = x.new_zeros(())
    for k, s in enumerate(students):
        idx = ((t >= BOUNDARIES[k]) & (t < BOUNDARIES[k + 1])).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        pred = s(x.index_select(0, idx), t.index_select(0, idx)).sample
        loss = loss + F.mse_loss(pred, target.index_select(0, idx))
    return loss


def _all_students_select(students, x, target, t):
    seg = torch.bucketize(t, torch.tensor(BOUNDARIES, device=t.device), right=True) - 1
    outs = torch.stack([s(x, t).sample for s in students])           # (K, B, ...)
    pred = outs[seg, torch.arange(x.shape[0], device=x.device)]
    per = ((pred - target) ** 2).flatten(1).mean(1)
    counts = torch.bincount(seg, minlength=K).clamp(min=1).to(per.dtype)
    return (torch.zeros(K, device=x.device).index_add(0, seg, per) / counts).sum()


def _multistudent_step(model, x, target, t):
    routing = fastdistill.segment_route(t, BOUNDARIES)
    pred = model(x, t).sample
    return fastdistill.segment_mse(pred, target, routing, process_group=None).sum()


def _count_syncs(fn) -> int | None:
    if not harness.on_gpu():
        return None
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_o2mkd_training_step():
    students, x, target, t = _setup()
    params = [p for s in students for p in s.parameters()]
    auto = MultiStudent(students, BOUNDARIES, fused="auto")
    loop = MultiStudent(students, BOUNDARIES, fused=False)
    fused = MultiStudent(students, BOUNDARIES, fused=True)
    providers = {
        "fastdistill": harness.fwd_bwd(lambda: _multistudent_step(auto, x, target, t), params),
        "fastdistill-loop": harness.fwd_bwd(lambda: _multistudent_step(loop, x, target, t), params),
        "fastdistill-fused": harness.fwd_bwd(lambda: _multistudent_step(fused, x, target, t), params),
        "eager": harness.fwd_bwd(lambda: _eager_index_select_loop(students, x, target, t), params),
        "all-students": harness.fwd_bwd(lambda: _all_students_select(students, x, target, t), params),
    }
    extra = {
        "host_syncs_fastdistill": _count_syncs(providers["fastdistill"]),
        "host_syncs_eager": _count_syncs(providers["eager"]),
        "fused_default": auto._use_fused(x.device),
    }
    harness.run_case("o2mkd_step", f"K={K} B={x.shape[0]} {tuple(x.shape[1:])}", providers, mode="fwd+bwd",
                     extra=extra)


def test_o2mkd_routing_overhead():
    _, x, _, t = _setup()
    bnd = torch.tensor(BOUNDARIES, device=x.device)

    def fastdistill_routing():
        r = fastdistill.segment_route(t, BOUNDARIES)
        gx, gt = fastdistill.segment_gather(r, x, t)
        return fastdistill.segment_scatter(r, gx), r.host_offsets()

    def eager_routing():
        seg = torch.bucketize(t, bnd, right=True) - 1
        perm = torch.argsort(seg, stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        gx, gt = x.index_select(0, perm), t.index_select(0, perm)
        counts = torch.bincount(seg, minlength=K).tolist()
        return gx.index_select(0, inv), counts

    nbytes = 2 * 2 * x.numel() * x.element_size()
    harness.run_case("o2mkd_routing", f"route+gather+scatter B={x.shape[0]}",
                     {"fastdistill": fastdistill_routing, "eager": eager_routing,
                      "torch.compile": harness.compiled(eager_routing)},
                     mode="fwd", bytes_moved=nbytes,
                     extra={"host_syncs_fastdistill": _count_syncs(fastdistill_routing)})


def test_o2mkd_segment_mse():
    _, x, target, t = _setup()
    pred = x.clone().requires_grad_(True)
    r = fastdistill.segment_route(t, BOUNDARIES)
    seg = r.segment_ids

    def eager():
        per = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        counts = torch.bincount(seg, minlength=K).clamp(min=1).float()
        return (torch.zeros(K, device=pred.device).index_add(0, seg, per) / counts).sum()

    harness.run_case("o2mkd_segment_mse", f"B={x.shape[0]} {tuple(x.shape[1:])}",
                     {"fastdistill": harness.fwd_bwd(lambda: fastdistill.segment_mse(pred, target, r).sum(), [pred]),
                      "eager": harness.fwd_bwd(eager, [pred]),
                      "torch.compile": harness.fwd_bwd(harness.compiled(eager), [pred])},
                     mode="fwd+bwd", bytes_moved=4 * x.numel() * x.element_size())


def test_o2mkd_sampling_loop():
    students, x, _, _ = _setup()
    model = MultiStudent(students, BOUNDARIES)
    steps = 50 if harness.on_gpu() else 4
    batch = x[:16] if harness.on_gpu() else x[:2]
    sched = DDIMScheduler(num_train_timesteps=T)
    sched.set_timesteps(steps)

    def sample(unet):
        def run():
            z = batch.clone()
            with torch.no_grad():
                for step_t in sched.timesteps:
                    z = sched.step(unet(z, step_t).sample, step_t, z).prev_sample
            return z
        return run

    harness.run_case("o2mkd_sampling", f"DDIM {steps} steps B={batch.shape[0]}",
                     {"fastdistill": sample(model), "eager": sample(students[0])}, mode="fwd",
                     rep_ms=300 if harness.on_gpu() else 50)
