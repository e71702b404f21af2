"""Build script for fastdistill's compiled extension ``fastdistill._C``.

Metadata lives in ``pyproject.toml``; this file only describes the extension, because it needs
torch at build time (install with ``pip install --no-build-isolation``).

What gets built:

* C++ sources (``csrc/**/*.cpp``) always.
* CUDA sources (``csrc/**/*.cu``) whenever the installed torch is a CUDA build and a CUDA toolkit
  is found, even on a machine without a GPU (then ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``).
* ``fastdistill/_build_info.py``, next to the extension: the torch version, CUDA version and C++ ABI
  it was compiled against. ``fastdistill._extension`` reads it before loading ``_C`` and refuses a
  mismatched extension (see there). It is generated, not in git and not in the sdist.

Commands that need no extension (``sdist``, ``egg_info``, ``dist_info``, ...) do not import torch,
so the sdist builds on a machine without torch. Only ``build``/``build_ext``/``bdist_wheel``/
``editable_wheel``/``install``/``develop`` configure the extension.

Environment switches:

* ``FASTDISTILL_SKIP_EXTENSION=1`` never imports torch and builds no extension (a pure-Python
  install: the Triton and reference backends only).
* ``FASTDISTILL_BUILD_CUDA=0`` skips the CUDA sources; ``=1`` makes a missing toolkit an error.
* ``TORCH_CUDA_ARCH_LIST`` overrides the architectures.
* ``CUDA_HOME`` / ``CUDA_PATH`` point at the toolkit; otherwise ``/usr/local/cuda`` or the one
  beside ``nvcc`` on ``PATH`` is used.
* ``MAX_JOBS`` caps ninja's parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[fastdistill build] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.isdir(path):
            return path
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of pip's ``nvidia-*`` wheels (cusparse.h, cublas_v2.h, ...).

    A CUDA build of torch includes them from ATen/cuda headers; a system toolkit may not ship
    them all, so they go on the include path after the toolkit's own.
    """
    roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
    found: list[str] = []
    for root in sorted(roots):
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def _want_cuda(torch_mod) -> tuple[bool, str]:
    flag = os.environ.get("FASTDISTILL_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "FASTDISTILL_BUILD_CUDA=0"
    if torch_mod.version.cuda is None:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError("FASTDISTILL_BUILD_CUDA=1 but the installed torch is not a CUDA build")
        return False, f"torch {torch_mod.__version__} is not a CUDA build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError("FASTDISTILL_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    os.environ["CUDA_HOME"] = cuda_home
    return True, cuda_home


# setup.py commands that build (or install) the extension; any other command line (sdist, egg_info,
# dist_info, clean, --version, ...) leaves torch alone.
_BUILD_COMMANDS = frozenset({"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "bdist_dumb", "bdist_rpm",
                             "editable_wheel", "install", "install_lib", "develop"})
_TRUE = ("1", "true", "yes", "on")


def _skip_reason(argv: list[str]) -> str | None:
    """Why this run of setup.py configures no extension, or None when it builds one."""
    if os.environ.get("FASTDISTILL_SKIP_EXTENSION", "").strip().lower() in _TRUE:
        return "FASTDISTILL_SKIP_EXTENSION=1"
    if not _BUILD_COMMANDS.intersection(argv[1:]):
        return "no build command (" + (" ".join(a for a in argv[1:] if not a.startswith("-")) or "none") + ")"
    return None


def build_record(torch_mod, with_cuda: bool) -> dict:
    """What ``fastdistill/_build_info.py`` records: the facts a loaded ``_C`` must agree with."""
    return {
        "torch_version": torch_mod.__version__,
        "torch_cuda": torch_mod.version.cuda,
        "cxx11_abi": bool(torch_mod._C._GLIBCXX_USE_CXX11_ABI),
        "with_cuda": bool(with_cuda),
    }


def _render_record(record: dict) -> str:
    return ('"""What fastdistill._C was compiled against: written by setup.py when it built the extension.\n\n'
            "Generated file (not in git, not in the sdist); fastdistill._extension compares it with the\n"
            'running torch before loading the extension."""\n\n'
            f"BUILD = {record!r}\n")


def _read_record(path: str) -> dict | None:
    """The ``BUILD`` dict of a record written by :func:`_write_record`, or None (missing or damaged)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["BUILD"]:
            try:
                record = ast.literal_eval(node.value)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def _write_record(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_render_record(record))


def _build_ext_class(base, record: dict):
    """``build_ext`` that writes the build record next to ``_C`` and rebuilds when torch changed."""
    tag = "torch-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in record["torch_version"])

    class build_ext(base):  # noqa: N801  (distutils command name)
        def finalize_options(self) -> None:
            super().finalize_options()
            # What the _C now in build_lib was compiled against (build_py does not touch this one).
            self.record_stamp = os.path.join(self.build_temp, "fastdistill_C_build_info.py")
            # Object files of another torch never link into this build: one temp folder per torch.
            self.build_temp = os.path.join(self.build_temp, tag)

        def run(self) -> None:
            if _read_record(self.record_stamp) != record:
                # A _C in build_lib compiled against another torch (or with other options) is not
                # "up to date", however new its timestamp.
                self.force = True
            super().run()
            _write_record(self.record_stamp, record)
            _write_record(os.path.join(self.build_lib, "fastdistill", "_build_info.py"), record)
            if self.inplace:  # --inplace / editable installs: the record goes beside the copied _C
                package_dir = self.get_finalized_command("build_py").get_package_dir("fastdistill")
                _write_record(os.path.join(ROOT, package_dir, "_build_info.py"), record)

    return build_ext


def _extensions():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            "fastdistill compiles its extension fastdistill._C against the installed torch, and torch is not "
            f"importable here ({exc}). Install torch first, then build without isolation: "
            "pip install torch && pip install --no-build-isolation <this directory or sdist>. "
            "FASTDISTILL_SKIP_EXTENSION=1 builds without the extension (Triton and reference backends only)."
        ) from exc

    with_cuda, why = _want_cuda(torch)
    # cpp_extension reads CUDA_HOME when it is imported, so import it after _want_cuda set it.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # Headers as dependencies: a changed header rebuilds _C (setuptools compares only sources otherwise).
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    # No -std flag: cpp_extension adds the standard the installed torch needs (C++17 up to 2.13, C++20 from 2.14).
    cxx_flags = ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                archs = sorted({f"{p.major}.{p.minor}" for p in map(torch.cuda.get_device_properties,
                                                                   range(torch.cuda.device_count()))})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        _log(f"building C++ and CUDA kernels (CUDA_HOME={why}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        define_macros.append(("FASTDISTILL_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        # Toolkit headers first, pip's nvidia-* headers after them (they fill in what the toolkit lacks).
        include_dirs += [os.path.join(os.environ["CUDA_HOME"], "include")] + _pip_cuda_include_dirs()
        ext = CUDAExtension(
            name="fastdistill._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            depends=headers,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        _log(f"building C++ kernels only: {why}")
        ext = CppExtension(
            name="fastdistill._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            depends=headers,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": _build_ext_class(base, build_record(torch, with_cuda))}


_SKIP = _skip_reason(sys.argv)
if _SKIP is None:
    ext_modules, cmdclass = _extensions()
else:
    _log(f"not configuring the extension: {_SKIP}")
    ext_modules, cmdclass = [], {}

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
