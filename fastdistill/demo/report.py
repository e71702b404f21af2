"""The demo's outputs: sample grid, loss curves, report.md and report.json."""

from __future__ import annotations

import json
import math
from typing import Any

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(path: str, rows: dict[str, torch.Tensor], title: str) -> None:
    """One row of images per entry (teacher first), all from the same noise."""
    plt = _plt()
    n = max(r.shape[0] for r in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n + 1.6, 1.0 * len(rows) + 0.6), squeeze=False)
    for i, (name, imgs) in enumerate(rows.items()):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < imgs.shape[0]:
                ax.imshow(((imgs[j, 0].float().cpu() + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i][0].text(-0.6, 0.5, name, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_curves(path: str, curves: dict[str, list[dict[str, float]]]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (method, history) in zip(axes[0], curves.items()):
        keys = sorted({k for h in history for k in h})
        for k in keys:
            ys = [h.get(k, math.nan) for h in history]
            ax.plot(range(1, len(ys) + 1), ys, label=k, lw=1)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def write_reports(md_path: str, json_path: str, report: dict[str, Any]) -> None:
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    env = report["environment"]
    lines = [
        "# fastdistill demo report",
        "",
        f"Device: **{env['device_name']}**; torch {env['torch']}, triton {env['triton']}, "
        f"fastdistill {env['fastdistill']}. Data: {report['data']}.",
        f"Teacher: {report['teacher']['description']} ({report['teacher']['source']}), sampled with "
        f"{report['teacher']['sampling_steps']} DDIM steps.",
        "",
        "| method | steps done | student DDIM steps | fused backend(s) | step ms fused | step ms reference | "
        "speed-up | peak MiB fused | peak MiB reference | loss rel. diff | sample MSE vs teacher | "
        "feature dist. student-teacher | feature dist. student-data | teacher-data |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["methods"].items():
        c = m["fused_vs_reference"]
        q = m["quality"]
        lines.append(
            f"| {name} | {m['steps_done']}{' (interrupted)' if m['interrupted'] else ''} | "
            f"{m['student_sampling_steps']} | {', '.join(c['fused_backends']) or '-'} | {_fmt(c['step_ms_fused'])} | "
            f"{_fmt(c['step_ms_reference'])} | {_fmt(c['speedup'])}x | {_fmt(c['peak_mib_fused'])} | "
            f"{_fmt(c['peak_mib_reference'])} | {_fmt(c['loss_relative_difference'])} | "
            f"{_fmt(q['sample_mse_vs_teacher'])} | {_fmt(q['feature_distance_student_vs_teacher'])} | "
            f"{_fmt(q['feature_distance_student_vs_data'])} | {_fmt(q['feature_distance_teacher_vs_data'])} |")
    lines += [
        "",
        "*Fused* is fastdistill's automatic backend choice; *reference* is the same loop under "
        "`fastdistill.use_backend(\"reference\")` (plain PyTorch), timed in the same run on the same "
        "device from the same student state. On CPU the automatic choice is the C++ kernels where an op "
        "has them and the reference otherwise, so CPU speed-ups near 1x are expected: the Triton "
        "kernels run on GPUs.",
        f"Peak memory is {report['peak_memory_kind']}.",
        "The loss relative difference compares the first step's loss of the two paths from identical state.",
        "Feature distances are Fréchet distances in the 64-d feature space of a small digit classifier "
        "trained in the demo (lower is better; an Inception-free stand-in for FID).",
        "",
        "![samples](samples.png)",
        "",
        "![losses](losses.png)",
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
