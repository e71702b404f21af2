"""The static compile audit (scripts/compile_audit.py --subset): every launched Triton kernel of
kernels/*.py compiles for sm_80 and sm_90 with no GPU, fits shared memory, and its 16-bit GEMMs use
tensor cores. Runs in a subprocess without TRITON_INTERPRET (the audit compiles for real targets)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "compile_audit.py"


def _launched_kernels() -> set[str]:
    """``module.function`` of every @triton.jit function in kernels/*.py referenced outside jit bodies
    (launched, autotuned, wrapped by a launcher); device helpers called only from kernels are excluded.
    Written independently of the script's own coverage check."""
    names = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        jit = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)
               and any("jit" in ast.unparse(d) for d in n.decorator_list)}
        inside = {id(x) for f in jit.values() for x in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in jit and id(node) not in inside:
                names.add(f"{path.stem}.{node.id}")
    return names


def _triton_tools() -> list[str]:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [t for t in ("ptxas", "cuobjdump") if not (bindir / t).exists()]


def _rows(md: str) -> list[list[str]]:
    """Rows of the 'All records' table."""
    body = md.split("## All records", 1)[1]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel")]


def test_compile_audit_subset(tmp_path: Path) -> None:
    missing = _triton_tools()
    if missing:
        pytest.fail(f"triton's bundled {', '.join(missing)} missing from triton/backends/nvidia/bin: the compile "
                    f"audit needs them (reinstall triton)")
    expected = _launched_kernels()
    assert len(expected) >= 10, expected  # the collector itself works
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The 16-bit main kernels must not spill on sm_90 (the full audit's tables under bench/results show none).
    no_spill = ["relational_kl._rkl*:16bit@90", "attention._attn*:16bit@90"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "--out", str(tmp_path), "--fail-on-spill",
                           *no_spill], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compile audit failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    import triton

    for arch in (80, 90):
        md = (tmp_path / f"compile-audit-sm{arch}-triton{triton.__version__}.md").read_text()
        assert f"sm_{arch}" in md and "python scripts/compile_audit.py" in md
        rows = _rows(md)
        listed = {r[0] for r in rows}
        assert expected <= listed, f"sm_{arch}: kernels missing from the table: {sorted(expected - listed)}"
        assert not any(r[3] == "ERROR" for r in rows)
        for kernel, spec, config, smem, regs, stack, spill, dot, mma, scen in rows:
            assert int(smem) <= {80: 166912, 90: 232448}[arch]
            assert int(regs) > 0 and int(spill) >= 0
            if re.search(r"\b(bf16|f16|tf32)\b", dot):  # 16-bit and TF32 GEMMs run on tensor cores
                assert mma in (("wgmma", "mma") if arch == 90 else ("mma",)), (kernel, spec, config, mma)
        # Every GEMM kernel family is covered in 16-bit, and its 16-bit records show tensor cores.
        for gemm in ("relational_kl._rkl_fwd_kernel", "relational_kl._rkl_bwd_kernel",
                     "relational_kl._rkl_bwd_dk_kernel", "attention._attn_fwd", "attention._attn_bwd_fused",
                     "attention._attn_bwd_dkdv", "attention._attn_bwd_dq"):
            sixteen = [r for r in rows if r[0] == gemm and re.search(r"\b(bf16|f16)\b", r[7])]
            assert sixteen, f"sm_{arch}: no 16-bit record of {gemm}"
            assert all(r[8] != "none (fma)" for r in sixteen)
