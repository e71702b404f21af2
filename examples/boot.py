"""Data-free distillation of a diffusion teacher into a one-step student with BOOT.

A diffusers-style training loop around ``fastdistill.nn.BootDistiller``. No data: each step draws
pure noise eps, and the student g(eps, t) (a diffusers ``UNet2DModel``) learns the signal
y_t = (x_t - sigma_t eps)/alpha_t of the teacher's DDIM trajectory from eps. Per step the distiller
runs the student at t without gradient, the frozen teacher at x_t = alpha_t y_t + sigma_t eps (twice
with --guidance-scale: conditional and unconditional), the student at s = t - step_size with
gradient, and the fused ``fastdistill.boot_loss`` (target y_t + delta (f - y_t), the teacher's eps
converted to x space in fp32), plus the boundary loss at the noise end. At the end it samples in ONE
step (``student(eps, 0)``) and compares with the teacher's own multi-step DDIM sample from the same
noise (stepped with ``fastdistill.ddim_step``).

The default teacher is the exact eps-predictor of a Gaussian image distribution (closed form, so
the example is cheap and its trajectories are meaningful); ``--teacher-unet ID_OR_PATH`` loads a
diffusers ``UNet2DModel`` eps-teacher instead (e.g. google/ddpm-cifar10-32, 32x32).

    python examples/boot.py --tiny           # CPU, well under a minute
    python examples/boot.py --steps 2000     # bigger student (use a GPU: the Triton kernels then run)

Prints one line per logged step and a final summary line
``final: boot <first> -> <last>, boundary <first> -> <last>, one-step vs teacher mse <v>, backend <name>``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fastdistill
from fastdistill import dispatch
from fastdistill.nn import BootDistiller


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny student, 8x8 images, 6 steps (CI-sized)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 6 with --tiny, else 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default 4 with --tiny, else 32)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--teacher-unet", default=None,
                   help="diffusers UNet2DModel (hub id or folder) as the eps-teacher; default: the analytic teacher")
    p.add_argument("--step-size", type=int, default=20, help="t - s in timesteps (BOOT's delta; 1000 // 50)")
    p.add_argument("--boundary-weight", type=float, default=1.0, help="weight of the boundary loss at t = T")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale for the teacher (the toy teacher's condition is a constant bias map)")
    p.add_argument("--teacher-steps", type=int, default=10, help="DDIM steps of the teacher's reference sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_student(size: int, tiny: bool) -> nn.Module:
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       attention_head_dim=32)


class GaussianTeacher(nn.Module):
    """The exact eps-prediction of data x0 ~ N(mean, std^2 I): E[eps | x_t] = sigma (x_t - alpha mean) /
    (alpha^2 std^2 + sigma^2). ``cond`` (optional) shifts the mean, a stand-in for text conditioning."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: torch.Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.float())
        self.register_buffer("mean", mean)
        self.std = std

    def forward(self, x, t, cond=None):
        abar = self.abar[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        mean = self.mean + cond if cond is not None else self.mean
        return sigma * (x - alpha * mean) / (abar * self.std**2 + sigma**2)


class UNetTeacher(nn.Module):
    """teacher(x, t, cond=None): a diffusers UNet2DModel's eps (unconditional: ``cond`` is ignored)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond=None):
        return self.unet(x, t).sample


def smooth_mean(size: int) -> torch.Tensor:
    """A smooth colour gradient in [-0.8, 0.8]: the mean image of the analytic teacher's data."""
    ramp = torch.linspace(-0.8, 0.8, size)
    return torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        -ramp.view(1, -1).expand(size, size)]).unsqueeze(0)


class Student(nn.Module):
    """student(eps, t, cond=None) -> signal prediction y_t. The toy student ignores ``cond`` (a real one
    would take the text embedding, like the teacher)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, noise, t, cond=None):
        return self.unet(noise, t).sample


@torch.no_grad()
def teacher_ddim_sample(teacher: nn.Module, scheduler, noise: torch.Tensor, steps: int, **cond) -> torch.Tensor:
    """The teacher's own DDIM sampler (eta = 0), stepping every sample with ``fastdistill.ddim_step``."""
    scheduler.set_timesteps(steps)
    jump = scheduler.config.num_train_timesteps // steps
    x = noise
    for t in scheduler.timesteps:
        tt = torch.full((noise.shape[0],), int(t), device=noise.device, dtype=torch.long)
        eps = teacher(x, tt, **cond)
        x, _ = fastdistill.ddim_step(x, eps, tt, tt - jump, scheduler)
    return x


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from diffusers import DDIMScheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    steps = args.steps if args.steps is not None else (6 if args.tiny else 2000)
    batch = args.batch_size if args.batch_size is not None else (4 if args.tiny else 32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    if args.teacher_unet is not None:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(args.teacher_unet).to(device)
        teacher, size = UNetTeacher(unet), unet.config.sample_size
    else:
        size = 8 if args.tiny else 32
        teacher = GaussianTeacher(scheduler.alphas_cumprod, smooth_mean(size), std=0.3).to(device)
    teacher = teacher.eval().requires_grad_(False)
    student = Student(make_student(size, args.tiny)).to(device).train()
    distiller = BootDistiller(student, teacher, scheduler, step_size=args.step_size,
                              boundary_weight=args.boundary_weight, guidance_scale=args.guidance_scale)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    # Under CFG the teacher is called with cond (conditional) and with uncond={} (unconditional).
    cond = {}
    if args.guidance_scale is not None:
        cond = {"cond": 0.1 * torch.randn(1, 3, 1, 1, generator=gen).to(device), "uncond": {}}

    history: dict[str, list[float]] = {"boot": [], "boundary": []}
    t0 = time.perf_counter()
    with dispatch.record_backends() as ran:
        for step in range(steps):
            noise = torch.randn(batch, 3, size, size, generator=gen).to(device)
            loss = distiller.loss(noise, **cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            history["boot"].append(distiller.last_terms["bootstrap"].item())
            history["boundary"].append(distiller.last_terms.get("boundary", torch.zeros(())).item())
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                print(f"step {step:4d}  loss {loss.item():.5f}  boot {history['boot'][-1]:.5f}  "
                      f"boundary {history['boundary'][-1]:.5f}", flush=True)

        noise = torch.randn(batch, 3, size, size, generator=gen).to(device)
        one_step = distiller.sample(noise)
        reference = teacher_ddim_sample(teacher, scheduler, noise, args.teacher_steps)
    gap = torch.mean((one_step.float() - reference.float()) ** 2).item()
    backend = next((b for op, b in ran if op == "boot_loss"), "?")
    k = max(1, steps // 5)  # compare averages of the first and last fifth (single steps are noisy)
    first = {name: sum(v[:k]) / k for name, v in history.items()}
    last = {name: sum(v[-k:]) / k for name, v in history.items()}
    print(f"final: boot {first['boot']:.5f} -> {last['boot']:.5f}, boundary {first['boundary']:.5f} -> "
          f"{last['boundary']:.5f}, one-step vs teacher mse {gap:.5f}, backend {backend}, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return {"boot_first": first["boot"], "boot_last": last["boot"], "boundary_first": first["boundary"],
            "boundary_last": last["boundary"], "one_step_vs_teacher_mse": gap}


if __name__ == "__main__":
    main()
