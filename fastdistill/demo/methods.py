"""The distillation methods the demo runs, each written the way a user's training loop would call
fastdistill's public ops and modules.

Every method has the same small interface, which the runner drives:

* ``__init__(teacher, cfg, data, device, seed)``: build the student (a copy of the teacher) and its optimiser;
* ``batch(i)``: the i-th training batch (deterministic in ``seed`` and ``i``, so the fused and the reference
  path see the same data);
* ``step(batch) -> dict[str, float]``: one optimiser step; ``"loss"`` is the total;
* ``sample(noise) -> images`` with ``sampling_steps`` student evaluations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import fastdistill
from fastdistill import nn as fdnn

from .models import TeacherConfig, build_scheduler, ddim_sample, student_from


def _alpha_sigma(acp: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = acp[t]
    return a.sqrt(), (1 - a).sqrt()


class DistillMethod:
    """Shared plumbing: data batches, the student, the optimiser, the teacher's schedule."""

    name = ""
    sampling_steps = 8
    batch_size = 32
    lr = 1e-4

    def __init__(self, teacher: nn.Module, cfg: TeacherConfig, data: torch.Tensor, device: torch.device,
                 seed: int = 0) -> None:
        self.teacher, self.cfg, self.data, self.device, self.seed = teacher, cfg, data, device, seed
        torch.manual_seed(seed)  # same initial state for the fused and the reference run
        self.scheduler = build_scheduler(cfg)
        self.acp = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.student = student_from(teacher)
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=0.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def _gen(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + i)

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        gen = self._gen(i)
        idx = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=gen)
        x0 = self.data[idx].to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        return {"x0": x0, "noise": noise, "u": torch.rand(self.batch_size, generator=gen).to(self.device)}

    def _optimize(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} must define step()")

    @torch.no_grad()
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        self.student.eval()
        try:
            return ddim_sample(self.student, noise, self.cfg, self.sampling_steps)
        finally:
            self.student.train()


class _FeatureHook:
    """Keeps the output of one module from the last forward (the RDD official code hooks UNet blocks)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


class RDD(DistillMethod):
    """Progressive distillation (the student takes one DDIM step where the teacher takes two) plus RDD's
    pixel-to-pixel relational term on the mid-block features, as the official RDD loop does."""

    name = "rdd"
    sampling_steps = 8
    relational_weight = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.student_features = _FeatureHook(self.student.mid_block)
        self.teacher_features = _FeatureHook(self.teacher.mid_block)
        self.stride = self.cfg.num_train_timesteps // self.sampling_steps

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        b = super().batch(i)
        # Student timesteps on its own DDIM grid (t = k * stride, k >= 1): the teacher steps t -> mid -> s.
        k = 1 + (b.pop("u") * (self.sampling_steps - 1)).long().clamp_(max=self.sampling_steps - 2)
        b["t"] = k * self.stride
        return b

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        mid, s = t - self.stride // 2, t - self.stride
        alpha_t, sigma_t = _alpha_sigma(self.acp, t)
        alpha_s, sigma_s = _alpha_sigma(self.acp, s)
        z_t = alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            eps = self.teacher(z_t, t).sample
            z_mid, _ = fastdistill.ddim_step(z_t, eps, t, mid, self.acp)
            teacher_feat = self.teacher_features.value
            eps_mid = self.teacher(z_mid, mid).sample
            z_s, _ = fastdistill.ddim_step(z_mid, eps_mid, mid, s, self.acp)
            x_target, eps_target = fastdistill.progressive_distillation_target(
                z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
        eps_student = self.student(z_t, t).sample
        x_student = (z_t - sigma_t.view(-1, 1, 1, 1) * eps_student) / alpha_t.view(-1, 1, 1, 1)
        pd = fastdistill.pd_loss(x_student, x_target, eps_target, z_t, alpha_t, sigma_t)
        rel = fastdistill.fused_rdd_loss(self.student_features.value, teacher_feat)
        loss = pd + self.relational_weight * rel
        self._optimize(loss)
        return {"loss": loss.item(), "pd": pd.item(), "relational": rel.item()}


class O2MKD(DistillMethod):
    """One-to-many distillation: two students, each owning half of the timesteps, trained together as
    one routed model to match the teacher's noise prediction with per-segment-normalised MSE."""

    name = "o2mkd"
    sampling_steps = 16
    boundaries = (0, 500, 1000)

    def __init__(self, teacher: nn.Module, cfg: TeacherConfig, data: torch.Tensor, device: torch.device,
                 seed: int = 0) -> None:
        self.multi = fdnn.MultiStudent([student_from(teacher) for _ in range(len(self.boundaries) - 1)],
                                       list(self.boundaries), num_train_timesteps=cfg.num_train_timesteps)
        super().__init__(teacher, cfg, data, device, seed)
        self.student = self.multi

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.multi.parameters())

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        b = super().batch(i)
        b["t"] = fastdistill.stratified_timesteps(self.batch_size, list(self.boundaries),
                                                  generator=self._gen(10_000 + i)).to(self.device)
        b.pop("u")
        return b

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        alpha_t, sigma_t = _alpha_sigma(self.acp, t)
        z_t = alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            target = self.teacher(z_t, t).sample
        routing = fastdistill.segment_route(t, torch.tensor(self.boundaries, device=t.device))
        pred = self.multi(z_t, t).sample
        loss = fastdistill.segment_mse(pred, target, routing, reduction="mean")
        self._optimize(loss)
        return {"loss": loss.item()}


class MomentMatching(DistillMethod):
    """Moment matching, alternating variant: an auxiliary denoiser (started from the teacher) tracks the
    student's samples, and the student moves its conditional mean toward the teacher's
    (``MomentMatchingDistiller``). The student samples ancestrally with 8 steps."""

    name = "moment-matching"
    sampling_steps = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distiller = fdnn.MomentMatchingDistiller(self.student, self.teacher, variant="alternating",
                                                      scheduler=self.scheduler,
                                                      num_student_steps=self.sampling_steps, clip_sample=1.0)
        self.distiller.aux.requires_grad_(True).train()
        self.opt_aux = torch.optim.AdamW(self.distiller.aux.parameters(), lr=self.lr, weight_decay=0.0)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        gen = torch.Generator(device=self.device).manual_seed(int(batch["seed"]))
        aux = self.distiller.aux_loss(batch["x0"], generator=gen)
        self.opt_aux.zero_grad(set_to_none=True)
        aux.backward()
        self.opt_aux.step()
        loss = self.distiller.student_loss(batch["x0"], generator=gen)
        self._optimize(loss)
        return {"loss": loss.item(), "aux": aux.item(),
                "moment_gap": float(self.distiller.last_stats["moment_gap"])}

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        b = super().batch(i)
        b["seed"] = torch.tensor(self.seed * 65_537 + i)
        return b

    @torch.no_grad()
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        self.student.eval()
        try:
            gen = torch.Generator(device=noise.device).manual_seed(self.seed + 11)
            return self.distiller.sample(noise, generator=gen).clamp(-1, 1)
        finally:
            self.student.train()


class Boot(DistillMethod):
    """BOOT: data-free; the student learns to map noise straight to the teacher's DDIM trajectory
    (``BootDistiller``), and samples in one step. No training images are used.

    The demo teacher's cosine schedule has alpha ~ 0 at t = 999, where the teacher's x-prediction from
    pure noise is unbounded; the trajectory is therefore distilled from t = 900 (alpha ~ 0.16), with the
    boundary condition x_900 = noise, by giving the distiller the schedule up to t = 900.
    """

    name = "boot"
    sampling_steps = 1
    lr = 5e-4
    top_timestep = 900

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schedule = self.scheduler.alphas_cumprod[: self.top_timestep + 1]
        self.distiller = fdnn.BootDistiller(self.student, self.teacher, schedule,
                                            prediction_type=self.cfg.prediction_type,
                                            step_size=self.top_timestep // 16)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        dt, T = self.distiller.step_size, self.distiller.num_timesteps
        t = dt + (batch["u"] * (T - dt)).long().clamp_(max=T - dt - 1)
        loss = self.distiller.loss(batch["noise"], t)
        self._optimize(loss)
        return {"loss": loss.item(), **{k: v.item() for k, v in self.distiller.last_terms.items()}}

    @torch.no_grad()
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        self.student.eval()
        try:
            return self.distiller.sample(noise).clamp(-1, 1)
        finally:
            self.student.train()


class _NoiseConditionedCritic(nn.Module):
    """A small conditional critic D(x, noise) in the spirit of Adv-KD's: image and noise side by side."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.LazyLinear(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, noise], dim=1)).squeeze(1)


class AdvKD(DistillMethod):
    """Adv-KD: a one-step student trained against a noise-conditioned critic on offline teacher
    trajectories (noise -> the teacher's DDIM sample), with the WGAN-GP penalty and weight clipping of
    the official loop (``AdversarialDistiller``). The demo adds an L2 term to the teacher's sample so that
    a short CPU run already moves the student."""

    name = "adv-kd"
    sampling_steps = 1
    pool_size = 256
    teacher_steps = 16
    l2_weight = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gen = torch.Generator().manual_seed(self.seed + 7)
        shape = (self.pool_size, 1, self.cfg.image_size, self.cfg.image_size)
        self.pool_noise = torch.randn(shape, generator=gen).to(self.device)
        # Offline teacher trajectories, as Adv-KD generates them before training.
        self.pool_images = ddim_sample(self.teacher, self.pool_noise, self.cfg, self.teacher_steps)
        critic = _NoiseConditionedCritic().to(self.device)
        critic(self.pool_images[:1], self.pool_noise[:1])  # materialise the lazy layer
        self.distiller = fdnn.AdversarialDistiller(self.student, critic, gp_weight=10.0, clip_value=0.1)
        self.opt_d = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.t_end = self.cfg.num_train_timesteps - 1

    def _generate(self, noise: torch.Tensor) -> torch.Tensor:
        t = torch.full((noise.shape[0],), self.t_end, dtype=torch.long, device=noise.device)
        return self.student(noise, t).sample

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.pool_size, (self.batch_size,), generator=self._gen(i)).to(self.device)
        return {"noise": self.pool_noise[idx], "real": self.pool_images[idx],
                "gp_seed": torch.tensor(self.seed * 7919 + i)}

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        noise, real = batch["noise"], batch["real"]
        fake = self._generate(noise)
        gen = torch.Generator(device=noise.device).manual_seed(int(batch["gp_seed"]))
        d_loss = self.distiller.discriminator_loss(real, fake, noise, generator=gen)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        self.distiller.clip_discriminator_()
        self.distiller.discriminator.requires_grad_(False)
        try:
            g_adv = self.distiller.generator_loss(fake, noise)
        finally:
            self.distiller.discriminator.requires_grad_(True)
        l2 = torch.nn.functional.mse_loss(fake, real)
        g_loss = g_adv + self.l2_weight * l2
        self._optimize(g_loss)
        return {"loss": g_loss.item(), "discriminator": d_loss.item(), "adversarial": g_adv.item(),
                "l2": l2.item()}

    @torch.no_grad()
    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        self.student.eval()
        try:
            return self._generate(noise).clamp(-1, 1)
        finally:
            self.student.train()


METHODS: dict[str, type[DistillMethod]] = {
    "rdd": RDD,
    "moment-matching": MomentMatching,
    "o2mkd": O2MKD,
    "boot": Boot,
    "adv-kd": AdvKD,
}
