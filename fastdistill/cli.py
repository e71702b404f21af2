"""The ``fastdistill`` command (also ``python -m fastdistill``): ``info``, ``selftest`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
from typing import Any, Sequence

_DESCRIPTION = """fastdistill: fused kernels for diffusion distillation.

  fastdistill info        versions, GPU, compiled kernels and the backends that run here
  fastdistill selftest    every op on every backend here against float64 (run it after installing)
  fastdistill demo        a small distillation run end to end, fused path against the reference"""


def plain_text(text: str) -> str:
    """Docstring markup as plain text for ``--help``: ``x`` and :func:`x` become x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"::(\s*\n)", r":\1", text)  # a reST literal-block marker
    return text.replace("``", "")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions' line breaks and strips reST markup from every help text."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


def cuda_version_text(version: Any) -> str | None:
    """A CUDA version as ``major.minor``: the extension records CUDA_VERSION as an int (13000 -> "13.0")."""
    if version is None:
        return None
    if isinstance(version, str) and not version.isdigit():
        return version
    try:
        v = int(version)
    except (TypeError, ValueError):
        return str(version)
    if v < 1000:  # already a major version
        return str(v)
    return f"{v // 1000}.{(v % 1000) // 10}"


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
    build = _extension.build_info()
    ext = {
        "loaded": _extension.is_loaded(),
        "location": _extension.location(),
        "load_error": _extension.load_error(),
        "build": build,
        "cuda_version": cuda_version_text(build.get("cuda_version")) if build.get("with_cuda") else None,
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
        cuda = (f"yes (CUDA {ext.get('cuda_version') or '?'})" if build.get("with_cuda")
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


def _build_parser() -> argparse.ArgumentParser:
    import fastdistill

    parser = argparse.ArgumentParser(prog="fastdistill", description=_DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdistill {fastdistill.__version__}",
                        help="print the fastdistill version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,selftest,demo}")

    p_info = sub.add_parser("info", help="versions, GPU, compiled kernels and available backends",
                            description="Print the versions, the GPUs, what the compiled extension holds and "
                                        "which backend of each op can run here.", formatter_class=_HelpFormatter)
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    from . import selftest

    p_self = sub.add_parser("selftest", help="check every op on every backend here against float64",
                            description=selftest.__doc__, formatter_class=_HelpFormatter)
    p_self.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="device to test on (default: cuda when a GPU is visible, else cpu); cpu runs the "
                             "Triton kernels through the interpreter (sets TRITON_INTERPRET=1 unless it is set)")
    p_self.add_argument("--quick", action="store_true",
                        help="one small case per op and dtype (under a minute on a GPU, a few on a CPU)")
    p_self.add_argument("--ops", default=None, metavar="OP[,OP...]",
                        help="only these ops (comma-separated dispatch names, as fastdistill info lists them)")
    p_self.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the results as JSON to PATH (without PATH: JSON on stdout, the table "
                             "on stderr)")
    p_self.add_argument("--seed", type=int, default=None,
                        help="base seed of the random inputs (default: a fresh one, printed in the header)")

    p_demo = sub.add_parser("demo", help="distil a small diffusion model end to end on embedded data and "
                                         "compare the fused path with the reference path",
                            description="Distil a small diffusion model end to end on embedded data and compare "
                                        "the fused path with the reference path.", formatter_class=_HelpFormatter)
    from .demo.runner import add_arguments as _demo_arguments

    _demo_arguments(p_demo)
    _fill_missing_help(p_demo, {"--seed": "random seed of data, initialisation and sampling (default: 0)"})
    return parser


def _fill_missing_help(parser: argparse.ArgumentParser, fallback: dict[str, str]) -> None:
    """Give flags that were declared without a help text one (so every flag in --help is explained)."""
    for action in parser._actions:  # argparse keeps its actions here; there is no public accessor
        if action.help is None:
            for flag in action.option_strings:
                if flag in fallback:
                    action.help = fallback[flag]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the fastdistill command; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `fastdistill info | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)

    if args.command == "selftest":
        from .selftest import main_args

        return main_args(args)

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
