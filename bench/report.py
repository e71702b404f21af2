"""Run every fastdistill benchmark on this machine's device and write the results.

    python bench/report.py                 # all benchmarks
    python bench/report.py -k rdd          # a subset (pytest -k expression)
    python bench/report.py --quick --out DIR --budget 240
                                           # the headline case of every op (the first case of each
                                           # benchmark, all its modes), written under DIR; stops
                                           # starting new cases after 240 s and still writes what ran

Writes, under bench/results/ (or --out):
    <device>-<date>.json   every case: provider, mode, median/p20/p80 ms, FLOPs, bytes, floor, peak memory,
                           plus the measured ceilings, the commit and the versions
    <device>-<date>.md     per case: each provider's time, its speed-up over eager and over torch.compile,
                           the fraction of the floor, and peak memory
    <device>-<date>.png    speed-up of fastdistill over eager and torch.compile per case

Numbers come only from this run on this device: commit the three files with the device name.
The ceilings (copy bandwidth, matmul rate, exp rate) are measured in the same run, whatever the selection.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# pytest plugin (this module is loaded into the benchmark run with `-p report` by main()): the
# --quick selection and the time budget. Both are off unless their environment variables are set.

_QUICK_ENV = "FASTDISTILL_BENCH_QUICK"  # "1": keep the headline case of each benchmark only
_DEADLINE_ENV = "FASTDISTILL_BENCH_DEADLINE"  # time.time() after which no new benchmark starts
_STATUS_ENV = "FASTDISTILL_BENCH_STATUS"  # where to write {"selected", "run", "stopped"} (JSON)
_STATE: dict = {"session": None, "selected": 0, "run": 0, "stopped": None}


def headline(items: list) -> list:
    """The headline case of every benchmark function: items of its first ``case`` parameter (all modes
    of that case); a benchmark without a ``case`` parameter keeps its first item only."""
    first: dict = {}
    keep = []
    for item in items:
        key = (str(getattr(item, "fspath", "")), getattr(item, "originalname", None) or item.name)
        spec = getattr(item, "callspec", None)
        params = spec.params if spec is not None else {}
        if "case" in params:
            first.setdefault(key, params["case"])
            if params["case"] == first[key]:
                keep.append(item)
        elif key not in first:
            first[key] = None
            keep.append(item)
    return keep


def pytest_collection_modifyitems(config, items) -> None:
    if os.environ.get(_QUICK_ENV) != "1":
        return
    keep = headline(items)
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_collection_finish(session) -> None:
    _STATE["session"] = session
    _STATE["selected"] = len(session.items)


def pytest_runtest_logfinish(nodeid, location) -> None:
    import time

    _STATE["run"] += 1
    deadline = os.environ.get(_DEADLINE_ENV)
    session = _STATE["session"]
    if deadline and session is not None and time.time() > float(deadline) and _STATE["run"] < _STATE["selected"]:
        _STATE["stopped"] = f"time budget reached after {_STATE['run']} of {_STATE['selected']} benchmarks"
        session.shouldstop = _STATE["stopped"]


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get(_STATUS_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"selected": _STATE["selected"], "run": _STATE["run"], "stopped": _STATE["stopped"]}, f)


# ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def markdown(payload: dict) -> str:
    rows = payload["results"]
    c = payload["ceilings"]
    lines = [
        f"# fastdistill benchmarks: {payload['device']}",
        "",
        f"commit `{payload['commit']}`, torch {payload['torch']}, triton {payload['triton']}, CUDA {payload['cuda']}.",
        f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
        f"matmul {c['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s (bf16 on GPU, fp32 on CPU)"
        + (f", exp {c['exp_per_s'] / 1e12:.2f} Texp/s (Triton exp2 chain on GPU, torch.exp on CPU)."
           if "exp_per_s" in c else " (no exp rate in this payload)."),
        "Floor = max(eager's minimal GEMM FLOPs / matmul rate, bytes / copy bandwidth, the kernels' "
        "exponentials / exp rate); \"bound\" names the term that binds. Times are medians (CUDA events on GPU).",
        "",
        "| op | case | mode | provider | ms | vs eager | vs torch.compile | % of floor | bound | peak (incremental) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r["ms"]
    for r in rows:
        ref = by_key[(r["op"], r["case"], r["mode"])]
        ms = r["ms"]
        ratio = lambda base: (f"{ref[base] / ms:.2f}x" if base in ref and ms == ms and ms > 0  # noqa: E731
                              and ref[base] == ref[base] else "-")
        frac = r["fraction_of_floor"]
        err = f" ({r['extra']['error'][:60]})" if r.get("extra", {}).get("error") else ""
        pct = f"{100 * frac:.1f}%" if frac == frac else "-"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']}{err} | {ms:.3f} | {ratio('eager')} | "
            f"{ratio('torch.compile')} | {pct} | {r.get('floor_term', '-')} | "
            f"{_fmt_bytes(r['peak_incremental_bytes'])} |")
    return "\n".join(lines) + "\n"


def chart(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key: dict[tuple, dict[str, float]] = {}
    for r in payload["results"]:
        by_key.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r["ms"]
    labels, vs_eager, vs_compile = [], [], []
    for (op, case, mode), t in by_key.items():
        if "fastdistill" not in t or not t["fastdistill"] == t["fastdistill"]:
            continue
        labels.append(f"{op}\n{case} {mode}")
        vs_eager.append(t.get("eager", math.nan) / t["fastdistill"])
        vs_compile.append(t.get("torch.compile", math.nan) / t["fastdistill"])
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], vs_eager, width=0.4, label="vs eager")
    ax.bar([i + 0.2 for i in x], vs_compile, width=0.4, label="vs torch.compile")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=6)
    ax.set_ylabel("speed-up of fastdistill (x)")
    ax.set_title(f"fastdistill on {payload['device']} ({payload['commit']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="BENCH_FILE",
                        help="benchmark files to run (default: every file in bench/)")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    parser.add_argument("--quick", action="store_true",
                        help="only the headline case of each benchmark (its first case, every mode of it)")
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=os.path.join(HERE, "results"),
                        help="folder for the .json/.md/.png results (default: bench/results)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no new benchmark after SECONDS; the results of those that ran are written")
    args = parser.parse_args(argv)

    import time

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.json")
        status_path = os.path.join(tmp, "status.json")
        targets = [os.path.abspath(p) for p in args.paths] or [HERE]
        cmd = [sys.executable, "-m", "pytest", *targets, "--benchmark", "-q", "-p", "no:cacheprovider", "-p", "report"]
        if args.k:
            cmd += ["-k", args.k]
        env = dict(os.environ, FASTDISTILL_BENCH_OUT=raw)
        env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")  # so `-p report` finds this file
        env[_STATUS_ENV] = status_path
        if args.quick:
            env[_QUICK_ENV] = "1"
        if args.budget is not None:
            env[_DEADLINE_ENV] = str(time.time() + args.budget)
        rc = subprocess.call(cmd, env=env, cwd=os.path.dirname(HERE))
        status = {}
        if os.path.exists(status_path):
            with open(status_path) as f:
                status = json.load(f)
        if not os.path.exists(raw):
            print("no benchmark results were recorded", file=sys.stderr)
            return rc or 1
        with open(raw) as f:
            payload = json.load(f)
    payload["selection"] = {"quick": bool(args.quick), "k": args.k, **status}
    if status.get("stopped"):
        print(f"bench/report.py: {status['stopped']}; writing the results of those that ran", file=sys.stderr)
        rc = 0 if rc in (0, 2) else rc  # pytest reports an interrupted session as 2

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{_slug(payload['device'])}-{_dt.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(payload))
    try:
        chart(payload, stem + ".png")
        wrote = f"{stem}.json, .md and .png"
    except ImportError as exc:  # matplotlib is optional (a bare GPU image may lack it)
        wrote = f"{stem}.json and .md (no chart: {exc})"
    print(f"wrote {wrote}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
