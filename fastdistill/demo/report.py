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


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends; NaNs are skipped)."""
    half = window // 2
    out = []
    for i in range(len(ys)):
        vals = [y for y in ys[max(0, i - half): i + half + 1] if math.isfinite(y)]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def save_loss_curves(path: str, curves: dict[str, list[dict[str, float]]]) -> list[tuple[str, str]]:
    """One row per method, one panel per loss term (the total ``loss`` first), linear y axes, so
    that no term hides under another or is flattened by a shared scale. Noisy curves get a
    moving average on top of the raw values. Returns the ``(method, term)`` of every panel drawn."""
    plt = _plt()
    terms = {m: (["loss"] if any("loss" in h for h in hist) else [])
             + sorted({k for h in hist for k in h} - {"loss"}) for m, hist in curves.items()}
    nrows = max(1, len(curves))
    ncols = max([1] + [len(t) for t in terms.values()])
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.1 * nrows + 0.3), squeeze=False)
    panels: list[tuple[str, str]] = []
    for r, (method, history) in enumerate(curves.items()):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(terms[method]):
                ax.axis("off")
                continue
            k = terms[method][c]
            ys = [h.get(k, math.nan) for h in history]
            xs = list(range(1, len(ys) + 1))
            ax.plot(xs, ys, lw=0.8, color="C0" if k == "loss" else "C1", alpha=0.55 if len(ys) >= 10 else 1.0)
            if len(ys) >= 10:
                ax.plot(xs, _moving_average(ys, max(3, len(ys) // 10) | 1), lw=1.6,
                        color="C0" if k == "loss" else "C1", label="moving average")
            ax.set_yscale("linear")
            ax.set_title(f"{method}: {'total loss' if k == 'loss' else k}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.yaxis.get_offset_text().set_fontsize(7)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step", fontsize=8)
            panels.append((method, k))
        if not terms[method]:
            axes[r][0].axis("on")
            axes[r][0].set_title(f"{method}: no steps done", fontsize=9)
    if any(len(h) >= 10 for h in curves.values()):
        fig.suptitle("thin: every step; thick: moving average", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return panels


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _speedup_cell(c: dict[str, Any]) -> str:
    if c.get("same_backends") or c.get("speedup") is None:
        return "none: both ran the reference" if all(b.endswith("=reference") for b in c["fused_backends"]) \
            else "none: same backends"
    return f"{_fmt(c['speedup'])}x"


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
            f"{_fmt(c['step_ms_reference'])} | {_speedup_cell(c)} | {_fmt(c['peak_mib_fused'])} | "
            f"{_fmt(c['peak_mib_reference'])} | {_fmt(c['loss_relative_difference'])} | "
            f"{_fmt(q['sample_mse_vs_teacher'])} | {_fmt(q['feature_distance_student_vs_teacher'])} | "
            f"{_fmt(q['feature_distance_student_vs_data'])} | {_fmt(q['feature_distance_teacher_vs_data'])} |")
    lines += [
        "",
        "*Fused* is fastdistill's automatic backend choice; *reference* is the same loop under "
        "`fastdistill.use_backend(\"reference\")` (plain PyTorch), timed in the same run on the same "
        "device from the same student state. A speed-up is given only where the two paths ran different "
        "backends; where the automatic choice was the reference for every op (on CPU: every op without "
        "C++ kernels, since the Triton kernels run on GPUs), both paths ran the same code and their "
        "step times differ by noise only.",
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
