"""One-to-many distillation (O2MKD): one teacher UNet2DModel into K students, each owning a timestep range.

A diffusers-style loop: noisy samples ``z_t`` at per-sample timesteps, a frozen teacher's noise
prediction as the target, and a ``fastdistill.nn.MultiStudent`` that routes every sample to the student
owning its timestep (one gather launch, the students, one scatter launch, one host copy of the
segment offsets per step). The loss is ``fastdistill.segment_mse(..., reduction="per_segment").sum()``,
so every student sees a unit-scale gradient however many samples it got. Timesteps come from
``fastdistill.stratified_timesteps`` (every student gets its share), or uniformly with ``--uniform``.
After training, the MultiStudent is the ``unet`` of a diffusers ``DDIMPipeline``: each sampling step
runs the student that owns it.

    python examples/o2mkd.py --tiny          # CPU, about a minute
    python examples/o2mkd.py --steps 300     # CIFAR-size UNets (use a GPU)

Prints one line per logged step and a final summary line
``final: o2mkd <first> -> <last>, students <K>, fused <bool>, backend <name>, sample_mse <value>``.
The teacher has random weights: this shows the mechanics, not a recipe for a good student.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import fastdistill
from fastdistill import dispatch
from fastdistill.nn import MultiStudent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny UNets, 8x8 images, 20 steps (CI-sized)")
    p.add_argument("--students", type=int, default=4, help="K, the number of students (uniform boundaries)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20 with --tiny, else 300)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default 8 with --tiny, else 128)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--uniform", action="store_true", help="uniform random timesteps instead of stratified ones")
    p.add_argument("--fused", choices=["auto", "true", "false"], default="false",
                   help="MultiStudent execution: horizontal fusion, per-student loop, or auto (= loop for now)")
    p.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps (default 4 with --tiny, else 50)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_unet(width: int, tiny: bool) -> nn.Module:
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(width, 2 * width), norm_num_groups=2, attention_head_dim=4,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    # google/ddpm-cifar10-32 layout; students at half the teacher's width.
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 2 * width, 2 * width), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def smooth_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random low-frequency images in [-1, 1] (a stand-in dataset that needs no download)."""
    coarse = torch.rand(n, 3, 3, 3, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = args.steps or (20 if args.tiny else 300)
    batch = args.batch_size or (8 if args.tiny else 128)
    sampling_steps = args.sampling_steps or (4 if args.tiny else 50)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    T = 1000
    K = args.students
    boundaries = [round(k * T / K) for k in range(K + 1)]

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

    teacher = make_unet(8 if args.tiny else 128, args.tiny).to(device).eval().requires_grad_(False)
    students = [make_unet(4 if args.tiny else 64, args.tiny).to(device) for _ in range(K)]
    fused = {"auto": "auto", "true": True, "false": False}[args.fused]
    model = MultiStudent(students, boundaries, num_train_timesteps=T, fused=fused).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=T)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    size = teacher.config.sample_size

    losses: list[float] = []
    t0 = time.time()
    with dispatch.record_backends() as used:
        for step in range(steps):
            x0 = smooth_images(batch, size, gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            if args.uniform:
                t = torch.randint(0, T, (batch,), generator=gen).to(device)
            else:
                t = fastdistill.stratified_timesteps(batch, boundaries, generator=gen).to(device)
            z_t = noise_scheduler.add_noise(x0, noise, t)
            with torch.no_grad():
                target = teacher(z_t, t).sample
            routing = fastdistill.segment_route(t, boundaries)
            pred = model(z_t, t).sample
            loss = fastdistill.segment_mse(pred, target, routing, reduction="per_segment").sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                print(f"step {step:4d}  loss {losses[-1]:.5f}  ({time.time() - t0:.1f}s)", flush=True)

    # Sampling: the MultiStudent is the pipeline's unet; each DDIM step runs the student owning it.
    model.eval()
    pipe_students = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=T))
    pipe_teacher = DDIMPipeline(unet=teacher, scheduler=DDIMScheduler(num_train_timesteps=T))
    for pipe in (pipe_students, pipe_teacher):
        pipe.set_progress_bar_config(disable=True)
    n = 4
    imgs_s = pipe_students(batch_size=n, num_inference_steps=sampling_steps, output_type="np",
                           generator=torch.Generator(device="cpu").manual_seed(args.seed)).images
    imgs_t = pipe_teacher(batch_size=n, num_inference_steps=sampling_steps, output_type="np",
                          generator=torch.Generator(device="cpu").manual_seed(args.seed)).images
    sample_mse = float(((imgs_s - imgs_t) ** 2).mean())

    fifth = max(1, steps // 5)
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    backend = dict(used).get("segment_mse", "none")
    use_fused = model._use_fused(device)
    print(f"final: o2mkd {first:.5f} -> {last:.5f}, students {K}, fused {use_fused}, backend {backend}, "
          f"sample_mse {sample_mse:.5f}")
    assert math.isfinite(last)
    return {"first": first, "last": last, "backend": backend, "sample_mse": sample_mse, "fused": use_fused}


if __name__ == "__main__":
    main()
