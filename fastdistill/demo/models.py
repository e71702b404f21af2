"""The demo's teacher: a small diffusers ``UNet2DModel`` trained in-process on the digits, cached.

The cache file (``teacher.pt`` under ``--out``) holds the config, the weights and a format tag;
a second run loads it instead of training. A file that cannot be read, or was written for another
config, is an error that says what to do (delete it or pass ``--retrain-teacher``), never a
silent retrain.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

CACHE_FORMAT = "fastdistill-demo-teacher/1"
# Trained by scripts/train_demo_teacher.py with the default TeacherConfig; loaded when --out has no cache.
SHIPPED_TEACHER = os.path.join(os.path.dirname(__file__), "assets", "teacher_digits16.pt")


class DemoError(RuntimeError):
    """A problem the user can fix (bad cache file, unwritable output folder, ...)."""


@dataclass(frozen=True)
class TeacherConfig:
    image_size: int = 16
    channels: tuple[int, int] = (32, 64)
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def build_unet(cfg: TeacherConfig):
    """A UNet2DModel with one attention level (head dim 32): small enough for CPU."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=1, out_channels=1,
        block_out_channels=cfg.channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=8,
    )


def build_scheduler(cfg: TeacherConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False, set_alpha_to_one=True)


def train_teacher(cfg: TeacherConfig, data: torch.Tensor, device: torch.device,
                  progress: Callable[[int, float], None] | None = None) -> torch.nn.Module:
    """Plain epsilon-prediction DDPM training for ``cfg.train_steps`` steps."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg).to(device)
    sched = build_scheduler(cfg)
    acp = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.train_steps >= 20:
        lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.train_steps,
                                                       pct_start=0.1)
    else:  # OneCycle needs a few steps per phase; very short runs (tests) use a constant rate
        lr_sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    model.train()
    for step in range(cfg.train_steps):
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
        x0 = data[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a * x0 + s * noise, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval().requires_grad_(False)
    return model


def save_teacher(path: str, cfg: TeacherConfig, model: torch.nn.Module) -> None:
    tmp = path + ".tmp"
    torch.save({"format": CACHE_FORMAT, "config": asdict(cfg),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    os.replace(tmp, path)  # never leave a half-written cache behind


def load_teacher(path: str, cfg: TeacherConfig, device: torch.device) -> torch.nn.Module:
    """Load a cached teacher; raise :class:`DemoError` if the file is corrupt or for another config."""
    hint = f"delete {path} or run with --retrain-teacher"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DemoError(f"the cached teacher {path} cannot be read ({type(exc).__name__}: {exc}); {hint}") from exc
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        raise DemoError(f"{path} is not a fastdistill demo teacher ({CACHE_FORMAT}); {hint}")
    stored = blob.get("config", {})
    wanted = asdict(cfg)
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    if stored != wanted:
        diff = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        raise DemoError(f"{path} was trained with another config (stored, wanted: {diff}); {hint}")
    model = build_unet(cfg)
    try:
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:
        raise DemoError(f"{path} holds weights that do not fit the demo's UNet ({exc}); {hint}") from exc
    return model.to(device).eval().requires_grad_(False)


def student_from(teacher: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the teacher (distillation students start from the teacher)."""
    student = copy.deepcopy(teacher)
    return student.train().requires_grad_(True)


@torch.no_grad()
def ddim_sample(model: torch.nn.Module | Callable, noise: torch.Tensor, cfg: TeacherConfig, steps: int,
                *, prediction: str = "epsilon") -> torch.Tensor:
    """Deterministic DDIM (eta=0) from ``noise`` with ``steps`` steps using diffusers' scheduler.

    ``prediction`` is what ``model`` outputs: "epsilon" or "sample" (x0).
    """
    sched = build_scheduler(cfg)
    if prediction != cfg.prediction_type:
        sched = type(sched).from_config(sched.config, prediction_type=prediction)
    sched.set_timesteps(steps)
    x = noise
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model(x, tt)
        out = out.sample if hasattr(out, "sample") else out
        x = sched.step(out, int(t), x).prev_sample
    return x.clamp(-1, 1)
