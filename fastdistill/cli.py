"""The ``fastdistill`` command (also ``python -m fastdistill``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from typing import Any, Sequence


def collect_info() -> dict[str, Any]:
    """Everything ``fastdistill info`` reports, as a dict."""
    import torch

    import fastdistill
    from fastdistill import _extension, _triton, dispatch

    info: dict[str, Any] = {
        "fastdistill": fastdistill.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton.version(),
        "triton_error": _triton.import_error(),
        "triton_interpret": _triton.interpret_mode(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / 2**30, 1),
                                 "multiprocessors": p.multi_processor_count})
    ext = {
        "loaded": _extension.is_loaded(),
        "location": _extension.location(),
        "load_error": _extension.load_error(),
        "build": _extension.build_info(),
        "ops": {},
    }
    for op in _extension.registered_ops():
        ext["ops"][op] = [k for k in ("CPU", "CUDA", "Meta") if _extension.has_kernel(op, k)]
    info["extension"] = ext
    info["backends"] = {
        dev: {b: (dispatch.why_unavailable(b, dev) or "ok") for b in dispatch.BACKENDS}
        for dev in ("cpu", "cuda")
    }
    info["ops"] = {}
    for name, spec in sorted(dispatch.registered_ops().items()):
        info["ops"][name] = {
            "backends": list(spec.backends),
            "runs_on_cpu": dispatch.available_backends(name, "cpu"),
            "runs_on_cuda": dispatch.available_backends(name, "cuda"),
        }
    return info


def _print_info(info: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"fastdistill {info['fastdistill']}  (python {info['python']}, {info['platform']})\n")
    w(f"torch       {info['torch']}  (CUDA build: {info['torch_cuda'] or 'no'})\n")
    triton = info["triton"] or f"not available ({info['triton_error']})"
    w(f"triton      {triton}{'  [TRITON_INTERPRET=1: kernels run on CPU]' if info['triton_interpret'] else ''}\n")
    if info["gpus"]:
        for g in info["gpus"]:
            w(f"gpu {g['index']}       {g['name']} (sm_{g['capability'].replace('.', '')}, "
              f"{g['memory_gib']} GiB, {g['multiprocessors']} SMs)\n")
    else:
        w("gpu         none visible\n")
    ext = info["extension"]
    if ext["loaded"]:
        build = ext["build"]
        cuda = (f"yes (CUDA {build.get('cuda_version', '?')})" if build.get("with_cuda")
                else "no (C++ CPU kernels only)")
        w(f"extension   fastdistill._C loaded from {ext['location']}\n")
        w(f"            built against torch {build.get('torch_version')}; CUDA kernels compiled: {cuda}\n")
        if ext["ops"]:
            w("            ops: " + ", ".join(f"{op}[{'/'.join(keys)}]" for op, keys in ext["ops"].items()) + "\n")
        else:
            w("            ops: none registered\n")
    else:
        w(f"extension   NOT loaded: {ext['load_error']}\n")
    w("backends    (what can run here)\n")
    if not info["gpus"]:
        w("            (no GPU visible: the cuda rows say what would run on a GPU with this build)\n")
    for dev, table in info["backends"].items():
        for backend, status in table.items():
            w(f"  {dev:<5} {backend:<10} {status}\n")
    if info["ops"]:
        w("ops         (backends in preference order; runnable on cpu / cuda here)\n")
        for name, op in info["ops"].items():
            w(f"  {name:<32} {','.join(op['backends']):<30} cpu: {','.join(op['runs_on_cpu'])}"
              f"   cuda: {','.join(op['runs_on_cuda']) or '-'}\n")


def _import_all_ops() -> None:
    """Import the modules that register ops, so ``info`` lists them all."""
    import importlib

    import fastdistill  # noqa: F401

    # Import errors are not swallowed: an op module that fails to import is a broken install.
    for mod in ("fastdistill.nn",):
        importlib.import_module(mod)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, GPU, compiled kernels and available backends")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_demo = sub.add_parser("demo", help="distil a small diffusion model end to end on embedded data and "
                                         "compare the fused path with the reference path")
    from .demo.runner import add_arguments as _demo_arguments

    _demo_arguments(p_demo)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo.models import DemoError
        from .demo.runner import run as run_demo

        missing = [m for m in ("diffusers", "sklearn", "matplotlib", "tqdm")
                   if importlib.util.find_spec(m) is None]
        if missing:
            sys.stderr.write(f"fastdistill demo: error: needs {', '.join(missing)}; install them with "
                             f"pip install 'fastdistill[demo]' (or the packages themselves)\n")
            return 1
        try:
            report = run_demo(args)
        except DemoError as exc:
            sys.stderr.write(f"fastdistill demo: error: {exc}\n")
            return 1
        sys.stdout.write(f"wrote {report['outputs']['report_md']} (and report.json, samples.png, losses.png)\n")
        return 0

    if args.command == "info":
        _import_all_ops()
        info = collect_info()
        if args.json:
            json.dump(info, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_info(info)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
