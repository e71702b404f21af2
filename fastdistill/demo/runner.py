"""``fastdistill demo``: train (or load) a small teacher on the embedded digits, distil students with
fastdistill's public modules, compare the fused path with the reference path in the same run, and
write samples, loss curves and a report to ``--out``."""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import time
from typing import Any

import torch

from .. import _triton, dispatch
from . import methods as methods_mod
from .data import load_digits
from .metrics import sample_metrics, train_feature_extractor
from .models import (SHIPPED_TEACHER, DemoError, TeacherConfig, ddim_sample, load_teacher, save_teacher,
                     train_teacher)
from .report import save_grid, save_loss_curves, write_reports

TEACHER_SAMPLING_STEPS = 16
TIMING_STEPS = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rdd", choices=list(methods_mod.METHODS) + ["all"],
                   help="distillation method (default: rdd)")
    p.add_argument("--steps", type=int, default=None,
                   help="distillation steps per method (default: 60 on CPU, 300 on GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--out", default="fastdistill-demo", help="output folder (also holds the teacher cache)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="train the teacher in this run for this many steps (cached under --out); "
                        "default: use the teacher shipped with fastdistill (600 steps)")
    p.add_argument("--retrain-teacher", action="store_true", help="ignore and overwrite the cached teacher")
    p.add_argument("--num-samples", type=int, default=12, help="images per row of the sample grid")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for data order, noise and initialisation (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _prepare_out(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise DemoError(f"cannot write to --out {path}: {exc.strerror or exc}") from exc
    return path


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _peak_mib(device: torch.device, fn) -> float | None:
    """Peak CUDA memory of ``fn()`` over the baseline, in MiB. None on CPU: the process's peak RSS
    cannot be attributed to one of two paths run in the same process."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare_paths(method_cls, teacher, cfg, data, device, seed: int) -> dict[str, Any]:
    """Time the fused and the reference path from the same state, in this run, on this device.

    Both runs start from identical state; their timed steps alternate (fused, reference, reference,
    fused, ...) so that load on a shared machine hits both alike.
    """
    paths = ("fused", "reference")
    runs = {p: method_cls(teacher, cfg, data, device, seed=seed) for p in paths}
    first_losses: dict[str, float] = {}
    times: dict[str, list[float]] = {p: [] for p in paths}
    peaks: dict[str, float | None] = {p: None for p in paths}
    used_by: dict[str, set[tuple[str, str]]] = {p: set() for p in paths}

    def run_step(path: str, i: int) -> float:
        ctx = dispatch.use_backend("reference") if path == "reference" else _NoCtx()
        with ctx, dispatch.record_backends() as used:
            loss = runs[path].step(runs[path].batch(i))["loss"]
        used_by[path].update(used)
        return loss

    for p in paths:  # the first step is also the warm-up
        first_losses[p] = run_step(p, 0)
        _sync(device)
    for i in range(TIMING_STEPS):
        for p in (paths if i % 2 == 0 else paths[::-1]):
            def timed(p: str = p, i: int = i) -> None:
                t0 = time.perf_counter()
                run_step(p, i + 1)
                _sync(device)
                times[p].append(time.perf_counter() - t0)

            peak = _peak_mib(device, timed)
            if peak is not None:
                peaks[p] = max(peaks[p] or 0.0, peak)
    out: dict[str, Any] = {}
    for p in paths:
        out[f"step_ms_{p}"] = 1e3 * sorted(times[p])[len(times[p]) // 2]
        out[f"peak_mib_{p}"] = peaks[p]
    out["fused_backends"] = sorted({f"{op}={b}" for op, b in used_by["fused"]})
    out["reference_backends"] = sorted({f"{op}={b}" for op, b in used_by["reference"]})
    f, r = first_losses["fused"], first_losses["reference"]
    out["loss_fused"], out["loss_reference"] = f, r
    out["loss_relative_difference"] = abs(f - r) / max(abs(r), 1e-12)
    # A ratio of two runs of the same code is noise, not a result: report it only when they differ.
    out["same_backends"] = out["fused_backends"] == out["reference_backends"]
    if out["same_backends"]:
        out["speedup"] = None
    else:
        out["speedup"] = out["step_ms_reference"] / out["step_ms_fused"] if out["step_ms_fused"] > 0 else math.nan
    return out


class _NoCtx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns the report dict (also written to ``--out``)."""
    out = _prepare_out(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was requested but no CUDA GPU is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = args.steps if args.steps is not None else (300 if device.type == "cuda" else 60)
    if steps < 1:
        raise DemoError(f"--steps must be >= 1, got {steps}")
    names = list(methods_mod.METHODS) if args.method == "all" else [args.method]
    show = not args.no_progress
    torch.manual_seed(args.seed)

    images, labels = load_digits()
    cfg = TeacherConfig() if args.teacher_steps is None else TeacherConfig(train_steps=args.teacher_steps)
    cache = os.path.join(out, "teacher.pt")
    if os.path.exists(cache) and not args.retrain_teacher:
        teacher = load_teacher(cache, cfg, device)
        source = f"loaded from cache {cache}"
    elif args.teacher_steps is None and not args.retrain_teacher and os.path.exists(SHIPPED_TEACHER):
        teacher = load_teacher(SHIPPED_TEACHER, cfg, device)
        source = (f"shipped with fastdistill (trained for {cfg.train_steps} steps by "
                  "scripts/train_demo_teacher.py)")
    else:
        bar = _progress(cfg.train_steps, "teacher", show)

        def tick(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        teacher = train_teacher(cfg, images, device, progress=tick)
        bar.close()
        save_teacher(cache, cfg, teacher)
        source = f"trained in this run for {cfg.train_steps} steps, cached at {cache}"

    extractor = train_feature_extractor(images, labels, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.num_samples, 1, cfg.image_size, cfg.image_size, generator=gen).to(device)
    teacher_samples = ddim_sample(teacher, noise, cfg, TEACHER_SAMPLING_STEPS)
    # Enough samples for a stable feature distance; the grid shows the first few.
    eval_noise = torch.randn(256, 1, cfg.image_size, cfg.image_size, generator=gen).to(device)
    teacher_eval = ddim_sample(teacher, eval_noise, cfg, TEACHER_SAMPLING_STEPS)

    report: dict[str, Any] = {
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "triton": _triton.version(),
            "fastdistill": __import__("fastdistill").__version__,
        },
        "data": f"scikit-learn digits, {images.shape[0]} images upsampled to {cfg.image_size}x{cfg.image_size}",
        "teacher": {"description": f"diffusers UNet2DModel, {sum(p.numel() for p in teacher.parameters())} "
                                   f"parameters", "source": source, "sampling_steps": TEACHER_SAMPLING_STEPS},
        "peak_memory_kind": ("the CUDA allocator's peak over the pre-step baseline" if device.type == "cuda"
                             else "not measured on CPU (one process runs both paths, so its peak RSS "
                                  "cannot be attributed to either)"),
        "methods": {},
    }
    rows = {"teacher": teacher_samples}
    curves: dict[str, list[dict[str, float]]] = {}
    for name in names:
        cls = methods_mod.METHODS[name]
        comparison = compare_paths(cls, teacher, cfg, images, device, args.seed)
        run_ = cls(teacher, cfg, images, device, seed=args.seed)
        history: list[dict[str, float]] = []
        interrupted = False
        bar = _progress(steps, name, show)
        try:
            for i in range(steps):
                losses = run_.step(run_.batch(i))
                history.append(losses)
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
        except KeyboardInterrupt:
            interrupted = True  # keep what is done and still write every output
        finally:
            bar.close()
        student_samples = run_.sample(noise)
        student_eval = run_.sample(eval_noise)
        rows[f"{name} student"] = student_samples
        curves[name] = history
        quality = sample_metrics(teacher_eval, student_eval, extractor, images[:512])
        report["methods"][name] = {
            "steps_done": len(history), "interrupted": interrupted,
            "student_sampling_steps": run_.sampling_steps,
            "final_loss": history[-1]["loss"] if history else math.nan,
            "fused_vs_reference": comparison, "quality": quality,
        }
        if interrupted:
            break

    save_grid(os.path.join(out, "samples.png"), rows,
              f"same noise: teacher ({TEACHER_SAMPLING_STEPS} DDIM steps) vs students")
    save_loss_curves(os.path.join(out, "losses.png"), curves)
    report["outputs"] = {name: os.path.join(out, f) for name, f in
                         (("report_md", "report.md"), ("report_json", "report.json"),
                          ("samples_png", "samples.png"), ("losses_png", "losses.png"))}
    write_reports(report["outputs"]["report_md"], report["outputs"]["report_json"], report)
    return report
