"""Run the race-sensitive backward passes twice and compare (the GPU check's ``race`` stage).

    python scripts/race_check.py --device cuda [--json OUT.json]   # on the GPU machine
    python scripts/race_check.py --device cpu  [--json OUT.json]   # plumbing only (Triton interpreter)

The fast backward paths add gradient tiles into fp32 buffers with atomics, in whatever order the
programs happen to run: two runs may differ in the last bits (expected: small, not necessarily zero),
and both must match the float64 reference. Under ``torch.use_deterministic_algorithms(True)`` the
kernels take the paths without atomics, which must be bit-identical across runs (a difference fails).

Cases (fp32 inputs, so that a reordered fp32 sum is visible rather than hidden by a 16-bit cast):

* ``fused_rdd_loss`` forward and backward (self-relation: the symmetric forward adds its partial softmax
  sums with atomics, which reach the gradients through the saved log-sum-exps; the symmetric backward adds
  the key-side tiles with atomics);
* ``attention_kl`` backward (the one-pass path: the key gradient by atomics);
* ``fused_attention`` backward (dq through fp32 atomics).

On CPU the Triton interpreter runs one program at a time, so atomics never race there: the CPU mode only
checks the plumbing (tiny shapes; every comparison still runs). Exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CASES = ("fused_rdd_loss", "attention_kl", "fused_attention")
# Relative max-norm error of either run against the float64 reference (fp32 inputs, fp32 "highest" GEMMs).
REF_RTOL = 1e-4


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the real check; cpu: plumbing through the Triton interpreter (tiny shapes)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row as JSON here")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    return p.parse_args(argv)


def _shapes(device: str) -> dict:
    if device == "cuda":  # many programs per gradient row: contention for the atomics
        return {"fused_rdd_loss": (4, 64, 32, 32), "attention_kl": (2, 4, 1024, 64),
                "fused_attention": (2, 4, 1024, 64)}
    return {"fused_rdd_loss": (2, 16, 4, 8), "attention_kl": (1, 2, 32, 16), "fused_attention": (1, 2, 32, 16)}


def _inputs(case: str, shape: tuple, device: str, gen):
    import torch

    def r(*s, grad=False):
        return torch.randn(*s, generator=gen).to(device).requires_grad_(grad)

    if case == "fused_rdd_loss":
        B, C, H, W = shape
        return [r(B, C, H, W, grad=True), r(B, C, H, W)]
    B, Hh, L, D = shape
    if case == "attention_kl":
        return [r(B, Hh, L, D, grad=True), r(B, Hh, L, D, grad=True), r(B, Hh, L, D), r(B, Hh, L, D)]
    return [r(B, Hh, L, D, grad=True) for _ in range(3)]


def _loss(case: str, args):
    import fastdistill

    if case == "fused_rdd_loss":
        return fastdistill.fused_rdd_loss(*args, temperature=0.5)
    if case == "attention_kl":
        return fastdistill.attention_kl(*args)
    out = fastdistill.fused_attention(*args)
    # A fixed, non-uniform upstream gradient (a plain sum would give dO = 1 everywhere).
    w = (torch_arange_like(out) % 7 - 3.0) / 3.0
    return (out * w).sum()


def torch_arange_like(t):
    import torch

    return torch.arange(t.numel(), device=t.device, dtype=t.dtype).reshape(t.shape)


def grads(case: str, args, backend: str) -> list:
    """Gradients of the case's scalar loss w.r.t. its differentiable inputs, on ``backend``."""
    import torch

    import fastdistill

    leaves = [a for a in args if a.requires_grad]
    with fastdistill.use_backend(backend):
        loss = _loss(case, args)
        return [g.detach().clone() for g in torch.autograd.grad(loss, leaves)]


def compare(runs: list, ref: list, deterministic: bool) -> dict:
    """One report row from two runs' gradients and the float64 reference: max |run1 - run2|, bit identity,
    the worst relative error against the reference, and whether the row passes (deterministic: bit-identical
    runs; always: both runs within REF_RTOL of the reference)."""
    import torch

    a, b = runs
    diff = max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))
    identical = all(torch.equal(x, y) for x, y in zip(a, b))
    err = 0.0
    for run in runs:
        for g, r in zip(run, ref):
            scale = max(r.abs().max().item(), 1e-30)
            err = max(err, (g.double() - r.double().to(g.device)).abs().max().item() / scale)
    finite = all(bool(torch.isfinite(g).all()) for run in runs for g in run)
    ok = finite and err <= REF_RTOL and (identical or not deterministic)
    why = []
    if not finite:
        why.append("non-finite gradient")
    if err > REF_RTOL:
        why.append(f"reference error {err:.2e} > {REF_RTOL:.0e}")
    if deterministic and not identical:
        why.append(f"deterministic runs differ (max abs {diff:.3e})")
    return {"max_abs_diff": diff, "bit_identical": identical, "ref_rel_err": err, "ok": ok,
            "why": "; ".join(why)}


def deterministic_algorithms(on: bool):
    from fastdistill.testing import deterministic_algorithms as switch

    return switch(on)


def run(device: str, cases=CASES) -> list[dict]:
    import torch

    shapes = _shapes(device)
    rows = []
    for case in cases:
        gen = torch.Generator().manual_seed(1234)
        args = _inputs(case, shapes[case], device, gen)
        ref_args = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
        ref = grads(case, ref_args, "reference")
        for deterministic in (False, True):
            t0 = time.perf_counter()
            with deterministic_algorithms(deterministic):
                runs = [grads(case, args, "triton") for _ in range(2)]
            if device == "cuda":
                torch.cuda.synchronize()
            row = {"case": case, "mode": "deterministic" if deterministic else "fast",
                   "shape": list(shapes[case]), "device": device, "seconds": round(time.perf_counter() - t0, 3)}
            row.update(compare(runs, ref, deterministic))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: Triton kernels on CPU tensors
    else:
        # cuBLAS GEMMs (the chunked path) raise under deterministic algorithms without a fixed workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("race_check: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"race_check: unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    rows = run(args.device, cases)
    note = ("" if args.device == "cuda" else
            " (CPU interpreter: programs run one at a time, so atomics cannot race here; plumbing only)")
    print(f"race_check on {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}{note}")
    print(f"{'case':<17}{'mode':<15}{'max |run1-run2|':>16}{'identical':>11}{'vs fp64':>10}  result")
    for r in rows:
        print(f"{r['case']:<17}{r['mode']:<15}{r['max_abs_diff']:>16.3e}{str(r['bit_identical']):>11}"
              f"{r['ref_rel_err']:>10.2e}  {'ok' if r['ok'] else 'FAIL: ' + r['why']}")
    failed = [r for r in rows if not r["ok"]]
    print(f"race_check: {len(rows) - len(failed)} ok, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
