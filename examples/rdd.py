"""Distil a diffusers UNet2DModel teacher into a smaller student with RDD's relational loss.

A diffusers-style training loop: a frozen teacher ``UNet2DModel`` runs under ``torch.no_grad``, a
narrower student (half the channels) is trained on noise prediction against the teacher's output plus
``fastdistill.fused_rdd_loss`` on the mid-block feature maps, captured from both models with forward
hooks. Student and teacher maps have different channel counts: the relational loss compares
pixel-to-pixel similarity distributions, never the features themselves, so no projection is needed.

    python examples/rdd.py --tiny            # CPU, well under a minute
    python examples/rdd.py --steps 200       # bigger UNets (use a GPU: the Triton kernels then run)

Prints one line per logged step and a final summary line
``final: rdd <first> -> <last>, mse <first> -> <last>, backend <name>``.
The teacher has random weights: this shows the mechanics, not a recipe for a good student.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import dispatch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny UNets, 16x16 images, 20 steps (CI-sized)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20 with --tiny, else 200)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default 4 with --tiny, else 16)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rdd-weight", type=float, default=10.0,
                   help="weight of fused_rdd_loss next to the MSE (RDD weighs it 1.0 next to its RCFD term; "
                        "here the toy MSE dominates, hence 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="fused_rdd_loss temperature (RDD: 1.0)")
    p.add_argument("--bf16", action="store_true", help="autocast the forward passes to bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_unet(channels: tuple[int, ...], tiny: bool) -> nn.Module:
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=channels,
                           norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=channels,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       attention_head_dim=32)


class FeatureHook:
    """Keeps the latest output of one submodule (diffusers block outputs may be tuples: take [0])."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output

    def pop(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("the hooked module did not run")
        return v


def synthetic_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random images in [-1, 1] (low-frequency noise, upsampled): structure for features to relate."""
    low = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    steps = args.steps if args.steps is not None else (20 if args.tiny else 200)
    batch = args.batch_size if args.batch_size is not None else (4 if args.tiny else 16)
    t_channels = (8, 16) if args.tiny else (64, 128, 128)
    s_channels = tuple(c // 2 for c in t_channels)

    teacher = make_unet(t_channels, args.tiny).to(device).eval().requires_grad_(False)
    student = make_unet(s_channels, args.tiny).to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    hook_t, hook_s = FeatureHook(teacher.mid_block), FeatureHook(student.mid_block)
    size = teacher.config.sample_size
    gen = torch.Generator().manual_seed(args.seed)
    data = synthetic_images(64 if args.tiny else 1024, size, gen)

    history: dict[str, list[float]] = {"rdd": [], "mse": []}
    t0 = time.perf_counter()
    with dispatch.record_backends() as ran:
        for step in range(steps):
            x0 = data[torch.randint(0, data.shape[0], (batch,), generator=gen)].to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
            zt = scheduler.add_noise(x0, noise, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                with torch.no_grad():
                    eps_t = teacher(zt, t).sample
                    feat_t = hook_t.pop()
                eps_s = student(zt, t).sample
                feat_s = hook_s.pop()
            mse = F.mse_loss(eps_s.float(), eps_t.float())
            rdd = fastdistill.fused_rdd_loss(feat_s, feat_t, temperature=args.temperature)
            loss = mse + args.rdd_weight * rdd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            history["rdd"].append(rdd.item())
            history["mse"].append(mse.item())
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                print(f"step {step:4d}  loss {loss.item():.5f}  rdd {rdd.item():.5f}  mse {mse.item():.5f}  "
                      f"features {tuple(feat_s.shape)} vs {tuple(feat_t.shape)}", flush=True)
    backend = next((b for op, b in ran if op == "fused_rdd_loss"), "?")
    k = max(1, steps // 5)  # compare averages of the first and last fifth (single steps are noisy)
    first = {name: sum(v[:k]) / k for name, v in history.items()}
    last = {name: sum(v[-k:]) / k for name, v in history.items()}
    print(f"final: rdd {first['rdd']:.5f} -> {last['rdd']:.5f}, mse {first['mse']:.5f} -> {last['mse']:.5f}, "
          f"backend {backend}, {time.perf_counter() - t0:.1f} s", flush=True)
    return {"rdd_first": first["rdd"], "rdd_last": last["rdd"], "mse_first": first["mse"], "mse_last": last["mse"]}


if __name__ == "__main__":
    main()
