"""Build script for fastdistill's compiled extension ``fastdistill._C``.

Metadata lives in ``pyproject.toml``; this file only describes the extension, because it needs
torch at build time (install with ``pip install --no-build-isolation``).

What gets built:

* C++ sources (``csrc/**/*.cpp``) always.
* CUDA sources (``csrc/**/*.cu``) whenever the installed torch is a CUDA build and a CUDA toolkit
  is found, even on a machine without a GPU (then ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``).

Environment switches:

* ``FASTDISTILL_BUILD_CUDA=0`` skips the CUDA sources; ``=1`` makes a missing toolkit an error.
* ``TORCH_CUDA_ARCH_LIST`` overrides the architectures.
* ``CUDA_HOME`` / ``CUDA_PATH`` point at the toolkit; otherwise ``/usr/local/cuda`` or the one
  beside ``nvcc`` on ``PATH`` is used.
* ``MAX_JOBS`` caps ninja's parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

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


def _extensions():
    import torch

    with_cuda, why = _want_cuda(torch)
    # cpp_extension reads CUDA_HOME when it is imported, so import it after _want_cuda set it.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
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
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        _log(f"building C++ kernels only: {why}")
        ext = CppExtension(
            name="fastdistill._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
