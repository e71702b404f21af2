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


METHODS: dict[str, type[DistillMethod]] = {
    "rdd": RDD,
    "o2mkd": O2MKD,
}
