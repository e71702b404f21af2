"""Offline quality metrics for the demo: sample error against the teacher, and a Fréchet distance
in the feature space of a small digit classifier trained in the demo (no downloaded Inception)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitFeatures(nn.Module):
    """A tiny CNN classifier; its 64-d penultimate activations are the feature space."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(self.num_features), nn.SiLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_extractor(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 150,
                            seed: int = 0) -> DigitFeatures:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitFeatures()
    net(images[:2])  # materialise the lazy layer
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (128,), generator=gen)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64 (as FID computes it)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(ca @ cb)
    tr_sqrt = eig.sqrt().real.sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)


@torch.no_grad()
def sample_metrics(teacher_samples: torch.Tensor, student_samples: torch.Tensor,
                   extractor: DigitFeatures, real: torch.Tensor) -> dict[str, float]:
    """Student-vs-teacher error on shared noise and feature distances (lower is better)."""
    t, s = teacher_samples.float().cpu(), student_samples.float().cpu()
    ft, fs, fr = extractor.features(t), extractor.features(s), extractor.features(real.float().cpu())
    return {
        "sample_mse_vs_teacher": float(F.mse_loss(s, t)),
        "feature_distance_student_vs_teacher": frechet_distance(fs, ft),
        "feature_distance_teacher_vs_data": frechet_distance(ft, fr),
        "feature_distance_student_vs_data": frechet_distance(fs, fr),
    }
