"""Adversarial distillation (Adv-KD) of a diffusion teacher into a one-forward generator.

The loop of Adv-KD's ``kdgan_training.py`` around ``fastdistill.nn.AdversarialDistiller``:

1. offline teacher data (Adv-KD's dataset): for each noise map the teacher's multi-step DDIM sample,
   stepped with ``fastdistill.ddim_step``; the student's input is the noise resized to a 4x4 thumbnail;
2. discriminator step: ``mean softplus(-D(real, n)) + mean softplus(D(fake, n)) + 10 * GP``
   (``fastdistill.gradient_penalty``: per-sample interpolation with in-kernel random mixing, fused
   penalty, double backward through D by autograd), Adam step, then weight clipping of D to
   [-0.1, 0.1] (``clip_discriminator_``: one multi-tensor launch);
3. generator step: ``mean softplus(-D(G(n), n))``.

Optimisers as in Adv-KD: Adam, lr 1e-4, betas (0.5, 0.999). The default teacher is the exact
eps-predictor of a Gaussian image distribution (closed form and cheap); ``--teacher-unet ID_OR_PATH``
loads a diffusers ``UNet2DModel`` eps-teacher instead (e.g. google/ddpm-cifar10-32).

    python examples/adv_kd.py --tiny          # CPU, well under a minute
    python examples/adv_kd.py --steps 3000    # longer (use a GPU: the Triton kernels then run)

Prints one line per logged step and a final summary line
``final: d_loss <first> -> <last>, g_loss <first> -> <last>, mse to teacher <first> -> <last>, backend <name>``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import dispatch
from fastdistill.nn import AdversarialDistiller


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="8x8 images, 64 teacher samples, 8 steps (CI-sized)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 8 with --tiny, else 3000)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default 8 with --tiny, else 64)")
    p.add_argument("--samples", type=int, default=None, help="teacher samples (default 64 with --tiny, else 4096)")
    p.add_argument("--teacher-steps", type=int, default=10, help="DDIM steps of the teacher's sampler")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gp-weight", type=float, default=10.0, help="lambda_gp (Adv-KD: 10)")
    p.add_argument("--clip", type=float, default=0.1, help="D weight clipping bound (Adv-KD: 0.1)")
    p.add_argument("--teacher-unet", default=None,
                   help="diffusers UNet2DModel (hub id or folder) as the eps-teacher; default: the analytic teacher")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class GaussianTeacher(nn.Module):
    """The exact eps-prediction of data x0 ~ N(mean, std^2 I): sigma (x_t - alpha mean)/(alpha^2 std^2 + sigma^2)."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: torch.Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.float())
        self.register_buffer("mean", mean)
        self.std = std

    def forward(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x - alpha * self.mean) / (abar * self.std**2 + sigma**2)


def smooth_mean(size: int) -> torch.Tensor:
    ramp = torch.linspace(-0.8, 0.8, size)
    return torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        -ramp.view(1, -1).expand(size, size)]).unsqueeze(0)


class Generator(nn.Module):
    """student(inputs, step): 4x4 noise thumbnail -> image (Adv-KD's interface; one stage here)."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        layers, s, c = [nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2)], 4, width
        while s < size:
            layers += [nn.ConvTranspose2d(c, width, 4, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
            s *= 2
        layers += [nn.Conv2d(width, 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, inputs, step=0):
        return self.net(inputs)


class Discriminator(nn.Module):
    """Adv-KD's conditional critic D(x, noise4x4): an image branch down to 4x4 and a conditioning
    branch on the noise thumbnail, concatenated into a linear head (BatchNorm left out: it couples the
    samples that the gradient penalty treats as independent)."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        layers, s, c = [], size, 3
        while s > 4:
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2)]
            c, s = width, s // 2
        self.img = nn.Sequential(*layers, nn.Flatten())
        self.cond = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c * 16 + 16 * 16, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def forward(self, x, noise):
        return self.head(torch.cat([self.img(x), self.cond(noise)], dim=1))


@torch.no_grad()
def teacher_dataset(teacher: nn.Module, scheduler, n: int, size: int, steps: int, batch: int,
                    gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(4x4 noise thumbnails, teacher samples): the teacher's DDIM sampler from each noise map."""
    scheduler.set_timesteps(steps)
    jump = scheduler.config.num_train_timesteps // steps
    thumbs, samples = [], []
    for i in range(0, n, batch):
        noise = torch.randn(min(batch, n - i), 3, size, size, generator=gen).to(device)
        x = noise
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            eps = teacher(x, tt)
            eps = eps.sample if hasattr(eps, "sample") else eps
            x, _ = fastdistill.ddim_step(x, eps, tt, tt - jump, scheduler)
        thumbs.append(F.interpolate(noise, size=(4, 4), mode="area"))  # Adv-KD: the noise resized to 4x4
        samples.append(x.clamp(-1, 1))
    return torch.cat(thumbs), torch.cat(samples)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from diffusers import DDIMScheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    steps = args.steps if args.steps is not None else (8 if args.tiny else 3000)
    batch = args.batch_size if args.batch_size is not None else (8 if args.tiny else 64)
    n = args.samples if args.samples is not None else (64 if args.tiny else 4096)
    width = 16 if args.tiny else 64
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    if args.teacher_unet is not None:
        from diffusers import UNet2DModel

        teacher = UNet2DModel.from_pretrained(args.teacher_unet).to(device)
        size = teacher.config.sample_size
    else:
        size = 8 if args.tiny else 32
        teacher = GaussianTeacher(scheduler.alphas_cumprod, smooth_mean(size), std=0.3).to(device)
    teacher.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    inputs_all, targets_all = teacher_dataset(teacher, scheduler, n, size, args.teacher_steps, 256, gen, device)

    G, D = Generator(size, width).to(device), Discriminator(size, width).to(device)
    distiller = AdversarialDistiller(G, D, gp_weight=args.gp_weight, clip_value=args.clip)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))

    history: dict[str, list[float]] = {"d": [], "g": [], "mse": []}
    t0 = time.perf_counter()
    with dispatch.record_backends() as ran:
        for step in range(steps):
            idx = torch.randint(0, n, (batch,), generator=gen).to(device)
            inputs, real = inputs_all[idx], targets_all[idx]
            # Discriminator step (the fake samples are detached inside discriminator_loss).
            fake = distiller(inputs, 0)
            d_loss = distiller.discriminator_loss(real, fake, inputs)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            distiller.clip_discriminator_()
            # Generator step.
            fake = distiller(inputs, 0)
            g_loss = distiller.generator_loss(fake, inputs)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            mse = F.mse_loss(fake.detach(), real).item()
            history["d"].append(d_loss.item())
            history["g"].append(g_loss.item())
            history["mse"].append(mse)
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                gp = distiller.last_terms.get("gradient_penalty", torch.zeros(())).item()
                print(f"step {step:5d}  d_loss {d_loss.item():.4f} (gp {gp:.4f})  g_loss {g_loss.item():.4f}  "
                      f"mse to teacher {mse:.4f}", flush=True)
    backend = next((b for op, b in ran if op == "gradient_penalty"), "?")
    k = max(1, steps // 5)  # compare averages of the first and last fifth (single steps are noisy)
    first = {name: sum(v[:k]) / k for name, v in history.items()}
    last = {name: sum(v[-k:]) / k for name, v in history.items()}
    print(f"final: d_loss {first['d']:.4f} -> {last['d']:.4f}, g_loss {first['g']:.4f} -> {last['g']:.4f}, "
          f"mse to teacher {first['mse']:.4f} -> {last['mse']:.4f}, backend {backend}, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return {"d_first": first["d"], "d_last": last["d"], "g_first": first["g"], "g_last": last["g"],
            "mse_first": first["mse"], "mse_last": last["mse"]}


if __name__ == "__main__":
    main()
