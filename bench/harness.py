"""Benchmark harness: timing, peak memory, the device's floor, and one results table.

Every benchmark compares, in one run on one device, fastdistill against the eager PyTorch a
user would write, ``torch.compile`` of it, and a peer where one exists. For each case it records
the median time (fwd and/or fwd+bwd), the floor, the fraction of the floor reached and peak memory.

The floor has three terms, each a count over a rate measured in the same run on the same device
(:func:`ceilings`); the largest binds and is recorded (``floor_term``):

* GEMM FLOPs / the bf16 matmul rate (fp32 on CPU). The FLOPs are the *eager* formula's minimal count
  (the dense formula differentiated by autograd), never the kernel's own executed count: a kernel that
  recomputes does not lower its own bar (the executed counts are asserted in tests/test_flop_counts.py
  and stated in each benchmark's docstring);
* bytes / the copy bandwidth (read + write);
* exponentials / the exp rate: a small Triton kernel running a chain of ``exp2`` per loaded element
  (SFU-bound; on CPU ``torch.exp`` instead). The count is what the fused kernels execute (softmax
  recomputes included), as each benchmark's docstring derives it.

GPU work is timed with ``triton.testing.do_bench`` (CUDA events, median); pytest-benchmark's own
timer does not synchronise the GPU. On CPU a plain ``perf_counter`` loop is used (small sizes:
the CPU numbers only show that the benchmarks run).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

RESULTS: list["Result"] = []
# pytest-benchmark's fixture for the running test (set by bench/conftest.py): the first
# "fastdistill" provider of each test is also timed through it, so `--benchmark-only` and the
# plugin's own table and JSON work. Its callable synchronises the GPU, because the plugin's
# timer does not.
_PLUGIN_FIXTURE: list = [None, False]  # [fixture, already used in this test]


@functools.lru_cache(maxsize=None)
def device() -> torch.device:
    # Cached: torch.cuda.is_available() on a CUDA build without a driver costs milliseconds.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu() -> bool:
    return device().type == "cuda"


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> dict[str, float]:
    """Median / p20 / p80 milliseconds of ``fn()``."""
    if on_gpu():
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median": q[0], "p20": q[1], "p80": q[2]}
    fn()  # warm-up (compilation, caches)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median": statistics.median(times), "p20": pick(0.2), "p80": pick(0.8)}


def peak_memory_bytes(fn: Callable[[], Any]) -> dict[str, int | None]:
    """Peak device memory of one ``fn()`` call: incremental (over what was allocated before) and absolute."""
    if not on_gpu():
        return {"incremental": None, "absolute": None}
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"incremental": peak - base, "absolute": peak}


# The exp-rate kernel: a dependent chain of exp2 per element, EXP_ITERS deep; the values stay in [0.7, 1]
# (x -> 2^(-x/2)), so nothing overflows or flushes and the compiler cannot fold the chain away.
EXP_ITERS = 256


@functools.lru_cache(maxsize=None)
def _exp_chain_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_chain(X, Y, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0.0)
        for _ in range(ITERS):
            x = tl.exp2(x * -0.5)  # one MUFU ex2 (and one FMUL) per step
        tl.store(Y + offs, x, mask=m)

    return _exp_chain


def measure_exp_rate() -> float:
    """Exponentials per second: on a GPU the Triton exp2 chain over 2^24 fp32 elements (EXP_ITERS per
    element: SFU-bound, the loads and stores are ~1% of the time); on CPU ``torch.exp`` of 2^22 floats."""
    dev = device()
    if dev.type == "cuda":
        import triton

        n, block = 1 << 24, 1024
        x = torch.rand(n, device=dev)
        y = torch.empty_like(x)
        k = _exp_chain_kernel()
        grid = (triton.cdiv(n, block),)
        t = time_ms(lambda: k[grid](x, y, n, ITERS=EXP_ITERS, BLOCK=block, num_warps=4))["median"] / 1e3
        if not bool(torch.isfinite(y).all()):  # a broken kernel must not become a ceiling
            raise RuntimeError("exp-rate kernel produced non-finite values")
        return n * EXP_ITERS / t
    n = 1 << 22
    x = torch.rand(n)
    y = torch.empty_like(x)
    t = time_ms(lambda: torch.exp(x, out=y))["median"] / 1e3
    return n / t


@functools.lru_cache(maxsize=None)
def ceilings() -> dict[str, float]:
    """Measured copy bandwidth (bytes/s, read + write counted), bf16 matmul rate (FLOP/s; fp32 on CPU)
    and exp rate (exponentials/s, :func:`measure_exp_rate`), all in this process on :func:`device`."""
    dev = device()
    if dev.type == "cuda":
        n = 1 << 28  # 512 MiB of bf16 read + 512 MiB written: far beyond L2
        src = torch.empty(n, dtype=torch.bfloat16, device=dev).uniform_()
        dst = torch.empty_like(src)
        t = time_ms(lambda: dst.copy_(src))["median"] / 1e3
        bw = 2 * n * 2 / t
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        t = time_ms(lambda: a @ b)["median"] / 1e3
        rate = 2 * m**3 / t
        del src, dst, a, b
        torch.cuda.empty_cache()
    else:
        n = 1 << 24
        src = torch.rand(n)
        dst = torch.empty_like(src)
        t = time_ms(lambda: dst.copy_(src))["median"] / 1e3
        bw = 2 * n * 4 / t
        m = 512
        a, b = torch.randn(m, m), torch.randn(m, m)
        t = time_ms(lambda: a @ b)["median"] / 1e3
        rate = 2 * m**3 / t
    return {"copy_bytes_per_s": bw, "matmul_flop_per_s": rate, "exp_per_s": measure_exp_rate()}


FLOOR_TERMS = ("gemm", "bytes", "exp")


def floor_terms(*, flops: float = 0.0, bytes_moved: float = 0.0, exps: float = 0.0) -> dict[str, float]:
    """Milliseconds of each floor term: ``{"gemm": flops / matmul rate, "bytes": bytes / copy bandwidth,
    "exp": exps / exp rate}``."""
    c = ceilings()
    return {"gemm": 1e3 * flops / c["matmul_flop_per_s"], "bytes": 1e3 * bytes_moved / c["copy_bytes_per_s"],
            "exp": 1e3 * exps / c["exp_per_s"]}


def floor_ms(*, flops: float = 0.0, bytes_moved: float = 0.0, exps: float = 0.0) -> float:
    """The floor: the largest of :func:`floor_terms`."""
    return max(floor_terms(flops=flops, bytes_moved=bytes_moved, exps=exps).values())


def binding_term(*, flops: float = 0.0, bytes_moved: float = 0.0, exps: float = 0.0) -> str:
    """Which floor term binds (``"gemm"``, ``"bytes"`` or ``"exp"``)."""
    terms = floor_terms(flops=flops, bytes_moved=bytes_moved, exps=exps)
    return max(FLOOR_TERMS, key=lambda k: terms[k])


@dataclass
class Result:
    op: str
    case: str
    provider: str
    mode: str  # "fwd" or "fwd+bwd"
    ms: float
    p20: float
    p80: float
    flops: float  # the eager formula's minimal GEMM FLOPs (the floor's count)
    bytes_moved: float
    floor_ms: float
    fraction_of_floor: float
    peak_incremental_bytes: int | None
    peak_absolute_bytes: int | None
    device: str
    extra: dict[str, Any] = field(default_factory=dict)
    exps: float = 0.0
    floor_term: str = "gemm"  # which floor term binds: "gemm", "bytes" or "exp"


def run_case(op: str, case: str, providers: dict[str, Callable[[], Any]], *, mode: str,
             flops: float = 0.0, bytes_moved: float = 0.0, exps: float = 0.0, warmup_ms: float = 25,
             rep_ms: float = 100, extra: dict[str, Any] | None = None) -> list[Result]:
    """Time every provider on the same inputs and record the results (and return them).

    ``flops``: the eager formula's minimal GEMM FLOPs; ``bytes_moved``: bytes read + written once;
    ``exps``: the exponentials the fused kernels execute (see the module docstring for the floor).

    A provider that raises (say, torch.compile unsupported, or out of memory) is recorded with
    ``ms = nan`` and the error in ``extra`` rather than aborting the whole comparison.
    """
    fl = floor_ms(flops=flops, bytes_moved=bytes_moved, exps=exps)
    term = binding_term(flops=flops, bytes_moved=bytes_moved, exps=exps)
    out = []
    name = torch.cuda.get_device_name() if on_gpu() else "cpu"
    for provider, fn in providers.items():
        info = dict(extra or {})
        try:
            t = time_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
            mem = peak_memory_bytes(fn)
        except Exception as exc:  # recorded, not hidden: shows as nan with the reason
            info["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            t = {"median": math.nan, "p20": math.nan, "p80": math.nan}
            mem = {"incremental": None, "absolute": None}
            if on_gpu():
                torch.cuda.empty_cache()
        r = Result(op=op, case=case, provider=provider, mode=mode, ms=t["median"], p20=t["p20"], p80=t["p80"],
                   flops=flops, bytes_moved=bytes_moved, floor_ms=fl,
                   fraction_of_floor=(fl / t["median"]) if t["median"] == t["median"] and t["median"] > 0 else math.nan,
                   peak_incremental_bytes=mem["incremental"], peak_absolute_bytes=mem["absolute"],
                   device=name, extra=info, exps=exps, floor_term=term)
        out.append(r)
        RESULTS.append(r)
        fixture, used = _PLUGIN_FIXTURE
        if provider == "fastdistill" and fixture is not None and not used and "error" not in info:
            _PLUGIN_FIXTURE[1] = True
            fixture.extra_info.update({"case": case, "mode": mode, "median_ms_events": t["median"],
                                       "floor_ms": fl, "floor_term": term})

            def synced() -> None:
                fn()
                synchronize()

            fixture.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    return out


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A callable running forward and backward of the scalar ``fn()``, clearing input grads first."""
    def step() -> None:
        for t in inputs:
            t.grad = None
        fn().backward()
    return step


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of the eager baseline (what a user gets without fastdistill)."""
    return torch.compile(fn, dynamic=False)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except Exception:
        return "unknown"


def dump(path: str) -> None:
    """Write every recorded result, the ceilings and the environment to ``path`` (JSON)."""
    import triton

    payload = {
        "device": torch.cuda.get_device_name() if on_gpu() else "cpu",
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "ceilings": ceilings(),
        "results": [asdict(r) for r in RESULTS],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
