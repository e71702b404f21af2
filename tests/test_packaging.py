"""Packaging: what the sdist ships, the project metadata, and the rebuild guard of ``fastdistill._C``.

The full round trip (sdist without torch -> wheel from the unpacked sdist -> clean venv -> import and
run a C++ op) is scripts/sdist_roundtrip.sh, run by .ci/run; these are its cheap static halves and
the guard, whose real import is exercised in a subprocess with a faked build record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdistill import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover  (3.10)
    tomllib = pytest.importorskip("tomli")

# Tracked files that the sdist leaves out on purpose (git's own config).
NOT_SHIPPED = (".gitignore",)


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory) -> set[str]:
    """The sdist's file list (setuptools' SOURCES.txt: MANIFEST.in applied to the defaults).

    Made with ``import torch`` failing, which also shows that the sdist side of setup.py needs no torch.
    """
    egg_base = tmp_path_factory.mktemp("egg")
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["torch"] = None  # `import torch` raises ImportError from here on
        sys.argv = ["setup.py", "-q", "egg_info", "--egg-base", {str(egg_base)!r}]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sources,) = [os.path.join(dp, f) for dp, _, fs in os.walk(egg_base) for f in fs if f == "SOURCES.txt"]
    with open(sources, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not os.path.isabs(line.strip())}


def _project_files() -> list[str]:
    """Files a commit of this tree holds: git's tracked and not-ignored files, or a walk without git."""
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        files = [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]
    else:  # an unpacked sdist: everything it holds, less what a build or a test run leaves behind
        files = []
        for dp, dns, fs in os.walk(ROOT):
            dns[:] = [d for d in dns if d not in {"__pycache__", "build", "dist", ".venv", ".pytest_cache",
                                                 ".benchmarks"} and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dp, f), ROOT) for f in fs
                      if not f.endswith((".so", ".pyc")) and f not in {"_build_info.py", "PKG-INFO", "setup.cfg"}]
    return sorted(p for p in files if not p.startswith(NOT_SHIPPED))


def test_sdist_ships_every_project_file(sdist_files):
    missing = [p for p in _project_files() if p not in sdist_files]
    assert not missing, f"MANIFEST.in leaves these files out of the sdist: {missing}"


def test_sdist_ships_what_the_build_and_the_tests_need(sdist_files):
    needed = {".ci/run", "LICENSE", "README.md", "pyproject.toml", "setup.py", "_build_backend.py", "MANIFEST.in",
              "conftest.py", "tests/conftest.py", "tests/_examples.py", "fastdistill/demo/assets/teacher_digits16.pt"}
    for sub, ext in (("csrc", (".h", ".cpp", ".cu")), ("kernels", (".py",))):
        found = [os.path.relpath(os.path.join(dp, f), ROOT) for dp, _, fs in os.walk(os.path.join(ROOT, sub))
                 for f in fs if f.endswith(ext)]
        assert found, f"no {ext} files under {sub}/"
        needed.update(found)
    assert any(p.endswith(".h") for p in needed)
    assert sorted(needed - sdist_files) == []


def test_sdist_ships_no_build_outputs(sdist_files):
    leaked = [p for p in sdist_files if p.endswith((".so", ".pyc", ".o")) or p == "fastdistill/_build_info.py"]
    assert leaked == []


def test_license_is_the_apache_2_text():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"Apache License\s+Version 2\.0, January 2004", text)
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150  # the whole text, not a stub


def test_pyproject_metadata():
    meta = _pyproject()
    project = meta["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639 forbids both
    assert "Programming Language :: Python :: 3" in project["classifiers"]
    assert project["keywords"]
    build = meta["build-system"]
    # The SPDX string needs setuptools>=77; torch must not be an sdist requirement.
    assert build["requires"] == ["setuptools>=77"]
    assert build["build-backend"] == "_build_backend" and build["backend-path"] == ["."]


def test_build_backend_adds_torch_for_wheels_only():
    sys.path.insert(0, ROOT)
    try:
        import _build_backend as backend
    finally:
        sys.path.remove(ROOT)
    assert "torch>=2.11" in backend.WHEEL_REQUIRES
    torch_dep = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_dep == ["torch>=2.11"], "keep _build_backend.WHEEL_REQUIRES in step with the torch dependency"
    for hook in ("build_sdist", "build_wheel", "build_editable", "prepare_metadata_for_build_wheel",
                 "get_requires_for_build_sdist"):
        assert callable(getattr(backend, hook))


def test_ci_installs_exactly_as_the_readme_says():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [line.strip() for line in f]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    install = readme[readme.index("## Install\n"):]
    block = re.search(r"```bash\n(.*?)```", install, re.S).group(1)
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert commands and any("setuptools>=77" in c for c in commands)  # the SPDX license needs setuptools>=77
    missing = [c for c in commands if c not in ci_lines]
    assert not missing, f".ci/run does not run the README's install lines {missing}"
    assert "bash scripts/sdist_roundtrip.sh" in ci_lines


# ----------------------------------------------------------------------------------- rebuild guard

def test_mismatch_compares_only_recorded_keys():
    running = {"torch_version": "2.14.1+cu130", "torch_cuda": "13.0", "cxx11_abi": True}
    assert _extension.mismatch(dict(running, with_cuda=True), running) is None
    assert _extension.mismatch({"torch_version": "2.14.1+cu130"}, running) is None
    what = _extension.mismatch(dict(running, torch_version="2.13.0+cu128", torch_cuda="12.8"), running)
    assert what == ("built against torch 2.13.0+cu128 (CUDA 12.8, C++11 ABI) but "
                    "torch 2.14.1+cu130 (CUDA 13.0, C++11 ABI) is running")
    assert "pre-C++11 ABI" in _extension.mismatch(dict(running, cxx11_abi=False), running)
    assert "CPU-only" in _extension.mismatch(dict(running, torch_cuda=None), running)


def test_build_record_matches_the_loaded_extension():
    """A build by setup.py records what it compiled against, next to _C, and it matches this torch."""
    assert _extension.is_loaded(), _extension.load_error()
    record = _extension.recorded_build()
    assert record is not None, ("fastdistill/_build_info.py is missing: _C was built by an older setup.py; "
                                f"rebuild: {_extension.rebuild_command()}")
    assert {k: record[k] for k in _extension.running_build()} == _extension.running_build()
    assert record["with_cuda"] is _extension.compiled_with_cuda()
    assert _extension.build_info()["torch_version"] == torch.__version__.split("+")[0]


_GUARD_PROBE = textwrap.dedent("""
    import json, sys, types, warnings

    fake = types.ModuleType("fastdistill._build_info")
    fake.BUILD = json.loads(sys.argv[1])
    sys.modules["fastdistill._build_info"] = fake  # what setup.py would have written

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import fastdistill
        from fastdistill import _extension, dispatch
        from fastdistill.cli import collect_info

        a, b = [torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)]
        with dispatch.record_backends() as seen:
            dot = fastdistill.moment_dot(a, b)
            routing = fastdistill.segment_route(torch.tensor([7, 1, 5, 2]), [0, 4, 8])
        forced = None
        try:
            with fastdistill.use_backend("cpp"):
                fastdistill.moment_dot(a, b)
        except fastdistill.BackendUnavailableError as exc:
            forced = str(exc)
    print(json.dumps({
        "loaded": _extension.is_loaded(),
        "C_imported": "fastdistill._C" in sys.modules,
        "load_error": _extension.load_error(),
        "info_error": collect_info()["extension"]["load_error"],
        "why_cpp": dispatch.why_unavailable("cpp", "cpu"),
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "backends": sorted(seen),
        "dot_error": abs(float(dot) - float(sum((x * y).sum() for x, y in zip(a, b)))),
        "order": routing.permutation.tolist(),
        "forced": forced,
    }))
""")


def _probe(record: dict, cwd) -> dict:
    # Run outside the source tree, so the probe imports the fastdistill the tests import (installed or editable).
    proc = subprocess.run([sys.executable, "-c", _GUARD_PROBE, json.dumps(record)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("differs", ["torch", "cxx11_abi"])
def test_guard_refuses_an_extension_built_for_another_torch(differs, tmp_path):
    running = _extension.running_build()
    if differs == "torch":
        built = dict(running, torch_version="2.13.0+cu128", torch_cuda="12.8", with_cuda=False)
    else:
        built = dict(running, cxx11_abi=not running["cxx11_abi"], with_cuda=False)
    out = _probe(built, tmp_path)
    assert out["loaded"] is False
    assert out["C_imported"] is False, "the mismatched shared object must not be loaded at all"
    # One warning, naming both torches and the rebuild command; no other warning on CPU.
    assert [w[0] for w in out["warnings"]] == ["ExtensionMismatchWarning"], out["warnings"]
    message = out["warnings"][0][1]
    assert f"torch {built['torch_version']}" in message and f"torch {running['torch_version']}" in message
    assert "pip install --no-build-isolation" in message
    if differs == "cxx11_abi":
        assert "pre-C++11 ABI" in message and re.search(r"\(.*[^-]C\+\+11 ABI\)", message)
    for text in (out["load_error"], out["info_error"], out["why_cpp"], out["forced"]):
        assert "built against" in text and "pip install --no-build-isolation" in text, text
    # The ops still run, on the reference.
    assert out["backends"] == [["moment_dot", "reference"], ["segment_route", "reference"]]
    assert out["dot_error"] < 1e-5
    assert out["order"] == [1, 3, 0, 2]


def test_guard_loads_an_extension_built_for_this_torch(tmp_path):
    """The same probe with a matching record: _C loads and the C++ kernels run (so the guard can fail)."""
    assert _extension.is_loaded(), _extension.load_error()
    out = _probe(dict(_extension.running_build(), with_cuda=_extension.compiled_with_cuda()), tmp_path)
    assert out["loaded"] is True and out["C_imported"] is True
    assert out["warnings"] == [] and out["load_error"] is None and out["forced"] is None
    assert out["backends"] == [["moment_dot", "cpp"], ["segment_route", "cpp"]]
    assert out["dot_error"] < 1e-5
    assert out["order"] == [1, 3, 0, 2]
