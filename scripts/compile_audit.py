#!/usr/bin/env python
"""Static compile audit: compile every Triton kernel of fastdistill for sm_80 and sm_90 without a GPU.

How it works
------------
1. **Capture.** In a process where ``TRITON_INTERPRET`` is unset (the script re-executes itself without
   it), ``triton.runtime.jit.JITFunction.run`` and ``triton.runtime.autotuner.Autotuner.run`` are
   replaced by recorders. The real launchers in ``kernels/*.py`` are then called on small CPU tensors
   (the scenarios below: dtypes fp32/bf16/fp16, flags, head dims 40/64/80/128/160/256, Lk = 77
   cross-attention, channel counts that take each code path). Nothing is launched: each call records
   the kernel, its bound arguments and its launch options. An autotuned kernel records *every* config
   its autotuner would benchmark (after its own pruning); launchers that take their tile from
   ``kernels/_common.py``'s ``gpu_configs`` are run once per config under ``force_config``.
2. **Specialise.** Arguments are specialised with Triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``), exactly as a GPU launch would:
   pointer dtypes (``*bf16``), ``i32``/``i64``, ints equal to 1 become constexprs, and the
   ``tt.divisibility = 16`` attribute of pointers and ints divisible by 16 is kept (the scenarios use
   realistic sizes, so the alignment a real launch sees). On Triton versions without that private API
   a fallback builds the same signature by hand (no divisibility attributes).
3. **Compile** each unique record with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
   32))`` and read: shared memory (``metadata.shared``), registers, stack frame and spill bytes (the
   ``ptxas -v`` log), and the MMA kind: ``wgmma`` (``HGMMA`` in the SASS from the bundled
   ``cuobjdump``, or ``wgmma`` in the PTX), ``mma`` (``HMMA`` / ``mma.sync``) or ``none (fma)``.

Exit status is 1 on: a compile error, a scenario that fails, a launched kernel of ``kernels/*.py``
never captured, shared memory over the arch limit (sm_90 227 KB = 232448 B, sm_80 163 KB = 166912 B),
a kernel whose ``tt.dot`` takes 16-bit (or TF32) operands without tensor-core instructions, and, with
``--fail-on-spill``, spills in the named kernels. Tables go to
``bench/results/compile-audit-sm<arch>-triton<version>.md``.

Usage::

    python scripts/compile_audit.py                      # full audit, both archs
    python scripts/compile_audit.py --subset --out /tmp  # CI subset (one config per kernel and dtype family)
    python scripts/compile_audit.py --fail-on-spill 'relational_kl.*:16bit@90' 'attention.*:16bit@90'
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_REEXEC_FLAG = "FASTDISTILL_COMPILE_AUDIT_CHILD"


# ----------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class Record:
    """One unique (kernel, specialisation, config), with the compile inputs for each arch."""

    kernel: str  # "<module>.<function>", e.g. "relational_kl._rkl_fwd_kernel"
    fn: Any  # the JITFunction
    per_arch: dict[int, tuple[dict, dict, dict, Any]]  # arch -> (signature, constexprs, attrs, options)
    spec: str  # specialisation summary
    config: str  # tile config summary
    family: str  # "fp32", "tf32", "16bit", "fp64": the pointer dtypes (tf32: fp32 with TF32 GEMMs)
    scenarios: list[str]
    key: tuple


@dataclasses.dataclass
class Result:
    kernel: str
    arch: int
    spec: str
    config: str
    family: str
    scenarios: list[str]
    ok: bool
    error: str = ""
    shared: int = -1
    regs: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    mma: str = ""
    dot_dtypes: str = ""
    seconds: float = 0.0

    @property
    def spill(self) -> int:
        return max(self.spill_stores, 0) + max(self.spill_loads, 0)

    @property
    def needs_mma(self) -> bool:
        return any(d in ("bf16", "f16", "tf32") for d in self.dot_dtypes.split(",") if d)


_SHORT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp64": "fp64", "i1": "i1", "i8": "i8", "u8": "u8",
          "i32": "i32", "i64": "i64"}


def _const_repr(v: Any) -> str:
    name = type(v).__name__
    if name == "dtype":  # tl.dtype
        return str(v).replace("fp", "fp")
    if isinstance(v, bool):
        return str(int(v))
    if v is None:
        return "None"
    return str(v)


class Recorder:
    """Collects unique launch records from the patched ``JITFunction.run``."""

    def __init__(self, archs: list[int]):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.archs = archs
        self.backends = {a: make_backend(GPUTarget("cuda", a, 32)) for a in archs}
        self.records: dict[tuple, Record] = {}
        self.order: list[tuple] = []
        self.scenario = "?"
        self.launched: set[str] = set()
        self.config_keys: set[str] = set()  # constexpr names an autotuner config set (shown as "config")

    # -- specialisation ----------------------------------------------------------------------
    def _bind(self, fn, backend, args, kwargs):
        """(signature, constexprs, attrs, options) exactly as JITFunction.run would build them."""
        try:
            from triton.runtime.jit import create_function_from_signature

            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
            return signature, constexprs, attrs, options, bound
        except (ImportError, AttributeError, TypeError):
            return self._bind_fallback(fn, backend, args, kwargs)

    def _bind_fallback(self, fn, backend, args, kwargs):
        import inspect

        import torch

        sig = inspect.signature(fn.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        bound.apply_defaults()
        tdt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
               torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
        signature, constexprs = {}, {}
        for i, (p, name) in enumerate(zip(fn.params, sig.parameters)):
            v = bound.arguments[name]
            if p.is_constexpr:
                signature[name] = "constexpr"
                constexprs[(i,)] = v
            elif isinstance(v, torch.Tensor):
                signature[name] = "*" + tdt[v.dtype]
            elif isinstance(v, bool):
                signature[name] = "i1"
            elif isinstance(v, int):
                if v == 1:
                    signature[name] = "constexpr"
                    constexprs[(i,)] = 1
                else:
                    signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                signature[name] = "fp32"
            elif v is None:
                signature[name] = "constexpr"
                constexprs[(i,)] = None
            else:
                raise TypeError(f"compile_audit: cannot specialise argument {name}={v!r} of {fn.__name__}")
        options = backend.parse_options({k: v for k, v in kwargs.items() if k not in sig.parameters})
        return signature, constexprs, {}, options, bound.arguments

    # -- capture -------------------------------------------------------------------------------
    def add(self, fn, args, kwargs):
        kernel = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        self.launched.add(kernel)
        per_arch = {}
        for arch, be in self.backends.items():
            signature, constexprs, attrs, options, bound = self._bind(fn, be, args, kwargs)
            per_arch[arch] = (signature, constexprs, attrs, options)
        signature, constexprs, attrs, options, bound = self._bind(fn, self.backends[self.archs[0]], args, kwargs)
        names = list(signature)
        declared = {n: constexprs[(i,)] for i, n in enumerate(names) if (i,) in constexprs and fn.params[i].is_constexpr}
        ptrs = [t[1:] for t in signature.values() if t.startswith("*")]
        fam = "fp64" if "fp64" in ptrs else ("16bit" if any(p in ("bf16", "fp16") for p in ptrs) else "fp32")
        if fam == "fp32" and "tf32" in [v for v in declared.values() if isinstance(v, str)]:
            fam = "tf32"  # fp32 inputs, TF32 GEMMs (torch.get_float32_matmul_precision() != "highest")
        seen: list[str] = []
        for p in ptrs:
            if p not in seen:
                seen.append(p)
        cfg_names = [n for n in declared if n.startswith("BLOCK") or n in self.config_keys]
        spec_names = [n for n in declared if n not in cfg_names]
        spec = "ptr " + "/".join(seen)
        if spec_names:
            spec += "; " + " ".join(f"{n}={_const_repr(declared[n])}" for n in spec_names)
        ints1 = [n for i, n in enumerate(names) if (i,) in constexprs and not fn.params[i].is_constexpr]
        if ints1:
            spec += f"; =1: {','.join(ints1)}"
        config = " ".join(f"{n.replace('BLOCK_', 'B')}={declared[n]}" for n in cfg_names)
        config += f" w{options.num_warps} s{options.num_stages}"
        key = (kernel, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
               repr(sorted(attrs.items())), options.num_warps, options.num_stages, options.num_ctas)
        rec = self.records.get(key)
        if rec is None:
            rec = Record(kernel, fn, per_arch, spec, config.strip(), fam, [], key)
            self.records[key] = rec
            self.order.append(key)
        if self.scenario not in rec.scenarios:
            rec.scenarios.append(self.scenario)


@contextlib.contextmanager
def patched_triton(rec: Recorder):
    """Replace JITFunction.run / Autotuner.run by recorders (nothing is launched)."""
    from triton.runtime import autotuner, jit

    orig_jit, orig_tune = jit.JITFunction.run, autotuner.Autotuner.run

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        rec.add(self, args, kwargs)
        return None

    def tune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        except Exception:  # noqa: BLE001 -- older autotuners: no pruning hook
            configs = self.configs
        for cfg in configs:
            rec.config_keys.update(cfg.kwargs)
            if hasattr(cfg, "all_kwargs"):
                extra = cfg.all_kwargs()
            else:
                extra = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            self.fn.run(*args, **kwargs, **extra)
        self.nargs = None
        return None

    jit.JITFunction.run = jit_run
    autotuner.Autotuner.run = tune_run
    try:
        yield
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = orig_jit, orig_tune


# ----------------------------------------------------------------------------------------------
# Scenarios: the launchers of kernels/*.py on small CPU tensors


def _forced_configs(kernel_name: str, **problem) -> list[contextlib.AbstractContextManager]:
    """One context per GPU config of ``kernel_name`` when kernels/_common.py provides
    ``gpu_configs``/``force_config`` and accepts ``problem``; else the launcher's own pick."""
    try:
        from fastdistill.kernels import _common  # type: ignore[attr-defined]
    except ImportError:
        return [contextlib.nullcontext()]
    gpu_configs = getattr(_common, "gpu_configs", None)
    force_config = getattr(_common, "force_config", None)
    if gpu_configs is None or force_config is None:
        return [contextlib.nullcontext()]
    try:
        cfgs = list(gpu_configs(kernel_name, **problem))
    except (TypeError, KeyError, ValueError):
        return [contextlib.nullcontext()]
    return [force_config(kernel_name, c) for c in cfgs] or [contextlib.nullcontext()]


@contextlib.contextmanager
def _fp32_matmul_precision(value: str | None):
    """Run under ``torch.set_float32_matmul_precision(value)`` (the launchers' fp32 GEMM policy)."""
    import torch

    if value is None:
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _dtypes(subset: bool):
    """(torch dtype, name, fp32 matmul precision): fp32 as IEEE ("highest", torch's default) and as TF32."""
    import torch

    return [(torch.float32, "fp32", "highest"), (torch.float32, "tf32", "high"), (torch.bfloat16, "bf16", None),
            (torch.float16, "fp16", None)]


def _rkl_scenarios(subset: bool):
    import torch

    from fastdistill.kernels import relational_kl as K

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = []

    def pair(name, N, CS, CT, S, dt, bank_dt=None, n_idx=None, d4=None, prec=None):
        def run():
            if d4 is not None:  # attention-KL: (B, H, L, d) queries and keys, one segment of L keys
                B, H = d4
                q_s = torch.empty((B, H, N, CS), dtype=dt)
                q_t = torch.empty((B, H, N, CT), dtype=dt)
                k_s, k_t, idx = q_s, q_t, None
            elif n_idx is not None:  # RDD contrast: keys from an (M, C) bank through an index
                q_s = torch.empty((1, 1, N, CS), dtype=dt)
                q_t = torch.empty((1, 1, N, CT), dtype=dt)
                k_s = torch.empty((1, 1, 4096, CS), dtype=bank_dt or dt)
                k_t = torch.empty((1, 1, 4096, CT), dtype=bank_dt or dt)
                idx = torch.zeros((n_idx,), dtype=torch.int64)
            else:  # RDD pairwise relations: keys are the queries, segments of S pixels
                q_s = torch.empty((1, 1, N, CS), dtype=dt)
                q_t = torch.empty((1, 1, N, CT), dtype=dt)
                k_s, k_t, idx = q_s, q_t, None
            sym = d4 is None and idx is None  # RDD's self-relation: the symmetric backward
            with _fp32_matmul_precision(prec):
                # Both modes: fast (atomics: the symmetric forward for unit rows, the symmetric upper
                # triangle / one-pass backward) and deterministic (online forward; symmetric full loop /
                # two-pass backward with the dk kernel).
                old = torch.are_deterministic_algorithms_enabled()
                try:
                    for det in (False, True):
                        torch.use_deterministic_algorithms(det)
                        kl, ls, lt = K.relational_kl_fwd(q_s, k_s, q_t, k_t, idx, 0.5, 0.5, S, sym,
                                                         1.0 if sym else None)
                        K.relational_kl_bwd(torch.ones_like(kl), q_s, k_s, q_t, k_t, idx, ls, lt, 0.5, 0.5, S,
                                            True, idx is None and not sym, sym)
                finally:
                    torch.use_deterministic_algorithms(old)
        out.append((name, run))

    for dt, dn, prec in _dtypes(subset):
        pair(f"rdd pairs {dn} C=64/64 P=16", 1024, 64, 64, 16, dt, prec=prec)
        pair(f"attn-kl {dn} d=64 L=256", 256, 64, 64, 256, dt, d4=(1, 2), prec=prec)
        if subset and dn == "bf16" or not subset:  # the chunked backward's elementwise kernel
            pair(f"rdd pairs {dn} C=320/64 P=64 (chunked)", 256, 320, 64, 64, dt, prec=prec)
        if not subset:
            pair(f"attn-kl {dn} d=320 L=128 (chunked)", 128, 320, 320, 128, dt, d4=(1, 2), prec=prec)
            pair(f"rdd pairs {dn} C=320/1280 P=16", 1024, 320, 1280, 16, dt, prec=prec)  # chunked backward
            pair(f"rdd pairs {dn} C=256/64 P=256", 1024, 256, 64, 256, dt, prec=prec)  # widest register tile
            pair(f"rdd pairs {dn} C=40/1280 P=64", 1024, 40, 1280, 64, dt, prec=prec)  # 32+16 sub-blocks
            pair(f"attn-kl {dn} d=40 L=256", 256, 40, 40, 256, dt, d4=(1, 2), prec=prec)
            pair(f"rdd bank {dn} C=128 idx=1024", 256, 128, 128, 1024, dt, n_idx=1024, prec=prec)
    if not subset:
        pair("rdd bank bf16 feats/fp32 bank C=128", 256, 128, 128, 1024, bf16, bank_dt=f32, n_idx=1024)
        pair("rdd bank fp16 feats/fp32 bank C=128", 256, 128, 128, 1024, f16, bank_dt=f32, n_idx=1024)

    def pixnorm(dt, dn, C):
        def run():
            x = torch.empty((2, C, 16, 16), dtype=dt)
            y, rn = K.pixel_normalize_fwd(x, 1e-12)
            K.pixel_normalize_bwd(torch.empty_like(y), y, rn, [2, C, 16, 16], False)
            K.pixel_normalize_bwd(torch.empty_like(y), y, rn, [2, C, 16, 16], True)
        out.append((f"pixnorm {dn} C={C}", run))

    for dt, dn, prec in _dtypes(subset):
        if prec == "high":
            continue  # no GEMM
        for C in ((64,) if subset else (64, 1920)):
            pixnorm(dt, dn, C)
    return out


def _attention_scenarios(subset: bool):
    import torch

    from fastdistill.kernels import attention as A

    out = []

    def case(dt, dn, d, lq, lk, bias, layout="bhld", prec=None):
        def run():
            B, H = 1, 2
            shape_q = (B, H, lq, d) if layout == "bhld" else (B, lq, H, d)
            shape_k = (B, H, lk, d) if layout == "bhld" else (B, lk, H, d)
            q = torch.empty(shape_q, dtype=dt)
            k = torch.empty(shape_k, dtype=dt)
            v = torch.empty(shape_k, dtype=dt)
            m = torch.empty((B, 1, lq, lk), dtype=dt) if bias else None
            problem = dict(head_dim=d, lq=lq, lk=lk, dtype=dt)
            with _fp32_matmul_precision(prec):
                for ctx in _forced_configs("attention.fwd", **problem):
                    with ctx:
                        o, lse = A.attention_forward(q, k, v, m, d ** -0.5, layout)
                for ctx in _forced_configs("attention.bwd", **problem):  # the fast backward (default)
                    with ctx:
                        A.attention_backward(torch.empty_like(o), q, k, v, o, lse, m, d ** -0.5, layout)
                # The deterministic backward (_attn_bwd_dkdv + _attn_bwd_dq): chosen on the host by
                # torch.are_deterministic_algorithms_enabled().
                det, warn = torch.are_deterministic_algorithms_enabled(), \
                    torch.is_deterministic_algorithms_warn_only_enabled()
                torch.use_deterministic_algorithms(True)
                try:
                    for ctx in _forced_configs("attention.bwd_det", **problem):
                        with ctx:
                            A.attention_backward(torch.empty_like(o), q, k, v, o, lse, m, d ** -0.5, layout)
                finally:
                    torch.use_deterministic_algorithms(det, warn_only=warn)
        tag = f"attn {dn} d={d} Lq={lq} Lk={lk}" + (" mask" if bias else "") + ("" if layout == "bhld" else " blhd")
        out.append((tag, run))

    dims = (64, 160) if subset else (40, 64, 80, 128, 160, 256)
    for dt, dn, prec in _dtypes(subset):
        for d in dims:
            if subset:
                case(dt, dn, d, 256, 256, False, prec=prec)
                continue
            case(dt, dn, d, 256, 256, False, prec=prec)
            case(dt, dn, d, 256, 256, True, prec=prec)
            case(dt, dn, d, 256, 77, False, prec=prec)  # cross-attention over 77 text tokens
            case(dt, dn, d, 256, 77, True, prec=prec)
    if not subset:
        case(torch.bfloat16, "bf16", 40, 256, 77, False, layout="blhd")
        case(torch.bfloat16, "bf16", 64, 256, 256, False, layout="blhd")
    return out


def _elementwise_scenarios(subset: bool):
    import torch

    from fastdistill.kernels import adversarial as ADV
    from fastdistill.kernels import boot as BOOT
    from fastdistill.kernels import diffusion_steps as DS
    from fastdistill.kernels import moment_matching as MM

    f32 = torch.float32
    dts = [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
    if not subset:
        dts.append((torch.float64, "fp64"))
    out = []
    B, D = 4, 4096

    def coef():
        return [torch.empty((B,), dtype=f32) for _ in range(4)]

    for dt, dn in dts:
        def mm(dt=dt):
            z = torch.empty((B, D), dtype=dt)
            at, st, as_, ss = coef()
            for mode in (0, 1):
                MM.posterior_fwd(z, z, at, st, as_, ss, 1234, mode, dt)
                for nx, nz in ((True, True), (True, False), (False, True)):
                    MM.posterior_bwd(z, at, st, as_, ss, mode, dt if nx else None, dt if nz else None)
                for u in (None, z):
                    for ng in (True, False):
                        MM.mm_loss_fwd(z, z, z, u, torch.empty((B,), dtype=f32), torch.empty((B,), dtype=f32),
                                       0.5, mode, ng)
            MM.scale(z, torch.empty((), dtype=f32))
            x3 = torch.empty((8, 16, 64), dtype=dt)
            for w3 in (None, torch.empty((8, 16, 64), dtype=dt)):
                MM.stats_fwd(x3, w3)
                cm = torch.empty((16,), dtype=f32 if dt != torch.float64 else dt)
                for need_w in ((False, True) if w3 is not None else (False,)):
                    MM.stats_bwd(x3, w3, cm, cm, cm if need_w else None, cm, need_w)
        out.append((f"moment_matching {dn}", mm))

        def ds(dt=dt):
            x = torch.empty((B, D), dtype=dt)
            t = torch.zeros((B,), dtype=torch.int64)
            ac = torch.empty((1000,), dtype=f32)
            at, st, as_, ss = coef()
            for pred in (0, 1, 2):
                DS.ddim_step_fwd(x, x, t, t, ac, 1.0, pred, dt)
                for gp, gx in ((x, x), (x, None), (None, x)):
                    DS.ddim_step_bwd(gp, gx, t, t, ac, 1.0, pred, (B, D), dt, dt, x.device)
            DS.pd_target_fwd(x, x, at, st, as_, ss, dt)
            for gx, ge in ((x, x), (x, None), (None, x)):
                DS.pd_target_bwd(gx, ge, at, st, as_, ss, (B, D), dt, dt, x.device)
            loss, sel = DS.pd_loss_fwd(x, x, x, x, at, st)
            DS.pd_loss_bwd(torch.empty((), dtype=f32), x, x, x, x, at, st, sel)
        out.append((f"diffusion_steps {dn}", ds))

        def boot(dt=dt):
            y = torch.empty((B, D), dtype=dt)
            at, st, as_, ss = coef()
            w = torch.empty((B,), dtype=f32)
            for pred in (0, 1, 2):
                for fu in (None, y):
                    for ng in (True, False):
                        BOOT.boot_loss_fwd(y, y, y, fu, y, w, at, st, as_, ss, w, pred, ng)
            BOOT.scale_grad(torch.empty((), dtype=f32), y)
        out.append((f"boot {dn}", boot))

        def adv(dt=dt):
            r = torch.empty((B, D), dtype=dt)
            a = torch.empty((B,), dtype=f32)
            ADV.interp_fwd(r, r, a, 7, dt)
            ADV.interp_fwd(r, r, None, 7, dt)
            ADV.interp_bwd(r, a, dt, dt)
            loss, norms = ADV.gp_fwd(r, 10.0)
            ADV.gp_bwd(torch.empty((), dtype=f32), r, norms, 10.0)
            logits = torch.empty((64,), dtype=dt)
            for real in (logits, None):
                ADV.adv_fwd(real, logits)
                ADV.adv_bwd(torch.empty((2,), dtype=f32), real, logits)
        out.append((f"adversarial {dn}", adv))
    return out


def scenarios(subset: bool) -> list[tuple[str, Callable[[], None]]]:
    return _rkl_scenarios(subset) + _attention_scenarios(subset) + _elementwise_scenarios(subset)


def launched_kernels() -> dict[str, str]:
    """``module.function`` -> file of every ``@triton.jit`` function in kernels/*.py that is referenced
    outside ``@triton.jit`` bodies (launched, tuned or wrapped by a launcher), i.e. not a device helper."""
    import ast

    found = {}
    for path in sorted((REPO / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        jit_funcs = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    d = dec.func if isinstance(dec, ast.Call) else dec
                    if ast.unparse(d) in ("triton.jit", "jit", "tl.jit"):
                        jit_funcs[node.name] = node
        jit_nodes = set()
        for fn in jit_funcs.values():
            jit_nodes.update(id(n) for n in ast.walk(fn))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in jit_funcs and id(node) not in jit_nodes:
                found[f"{path.stem}.{node.id}"] = path.name
    return found


# ----------------------------------------------------------------------------------------------
# Compile and inspect

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_DOT_RE = re.compile(r"tt\.dot[^\n]*?:\s*tensor<[0-9x]+x(\w+)(?:,[^>]*)?>")
_RECORDS: list[Record] = []


def _tool(name: str) -> str | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if p.exists():
        return str(p)
    return shutil.which(name)


def check_tools() -> list[str]:
    """Missing tools (ptxas is needed to compile, cuobjdump to read the SASS)."""
    return [t for t in ("ptxas", "cuobjdump") if _tool(t) is None]


def _log_cache() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(base) / "fastdistill-compile-audit"


def _save(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass  # the cache is an optimisation only


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX (when the compile was cached and no log was captured)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o",
                            str(Path(d) / "k.o")], capture_output=True, text=True, check=True)
        return r.stdout + r.stderr


def _sass(cubin: bytes) -> str:
    tool = _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        r = subprocess.run([tool, "-sass", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuobjdump -sass failed: {r.stderr.strip()}")
        return r.stdout


def _dot_dtypes(ttir: str) -> str:
    kinds = []
    for line in ttir.splitlines():
        if "tt.dot" not in line or "tt.dot_scaled" in line:
            continue
        m = _DOT_RE.search(line)
        dt = m.group(1) if m else "?"
        if dt == "f32" and re.search(r"inputPrecision\s*=\s*(tf32|tf32x3)", line):
            dt = "tf32"
        if dt not in kinds:
            kinds.append(dt)
    return ",".join(kinds)


def compile_one(job: tuple[int, int]) -> Result:
    idx, arch = job
    rec = _RECORDS[idx]
    res = Result(rec.kernel, arch, rec.spec, rec.config, rec.family, rec.scenarios, ok=False)
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        try:
            from triton import knobs

            knobs.nvidia.dump_ptxas_log = True
        except (ImportError, AttributeError):
            knobs = None
        signature, constexprs, attrs, options = rec.per_arch[arch]
        src = ASTSource(fn=rec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        log = buf.getvalue()
        # A compile served from Triton's cache runs no ptxas: reuse the log saved with it, else rerun ptxas -v.
        log_path = _log_cache() / f"{getattr(ck, 'hash', None) or abs(hash(ck.asm['ptx']))}-sm{arch}.log"
        if "Used" in log:
            _save(log_path, log)
        elif log_path.exists():
            log = log_path.read_text()
        else:
            log = _ptxas_log(ck.asm["ptx"], arch)
            _save(log_path, log)
        vals = {k: int(m.group(1)) if (m := r.search(log)) else 0 for k, r in _PTXAS_RE.items()}
        res.regs, res.stack, res.spill_stores, res.spill_loads = (vals["regs"], vals["stack"], vals["spill_stores"],
                                                                  vals["spill_loads"])
        md = ck.metadata
        res.shared = int(md.shared if hasattr(md, "shared") else md["shared"])
        ptx = ck.asm["ptx"]
        sass = _sass(ck.asm["cubin"])
        if "HGMMA" in sass or "wgmma.mma_async" in ptx:
            res.mma = "wgmma"
        elif "HMMA" in sass or re.search(r"\bmma\.sync", ptx):
            res.mma = "mma"
        else:
            res.mma = "none (fma)"
        res.dot_dtypes = _dot_dtypes(ck.asm["ttir"])
        res.ok = True
    except Exception as exc:  # noqa: BLE001 -- every failure is reported in the table
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        res.error += "\n" + traceback.format_exc(limit=3)
    res.seconds = time.time() - t0
    return res


# ----------------------------------------------------------------------------------------------
# Report


def _spill_match(specs: list[str], r: Result) -> bool:
    """SPEC = kernel-glob[:family][@arch], e.g. 'relational_kl.*:16bit@90' or 'attention._attn_fwd'."""
    for s in specs:
        arch = None
        if "@" in s:
            s, a = s.rsplit("@", 1)
            arch = int(a.replace("sm_", "").replace("sm", ""))
        fam = None
        if ":" in s:
            s, fam = s.split(":", 1)
        if fnmatch.fnmatch(r.kernel, s) and (fam is None or fam == r.family) and (arch is None or arch == r.arch):
            return True
    return False


def problems(results: list[Result], fail_on_spill: list[str]) -> list[str]:
    out = []
    for r in results:
        where = f"{r.kernel} sm_{r.arch} [{r.spec}] [{r.config}]"
        if not r.ok:
            out.append(f"compile error: {where}: {r.error.splitlines()[0]}")
            continue
        lim = SMEM_LIMIT.get(r.arch)
        if lim is not None and r.shared > lim:
            out.append(f"shared memory {r.shared} B > {lim} B: {where}")
        if r.needs_mma and r.mma.startswith("none"):
            out.append(f"no tensor-core instructions in a {r.dot_dtypes} GEMM kernel: {where}")
        if fail_on_spill and r.spill > 0 and _spill_match(fail_on_spill, r):
            out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads: {where}")
    return out


def write_table(path: Path, arch: int, results: list[Result], header: dict, issues: list[str]) -> None:
    rs = [r for r in results if r.arch == arch]
    lines = [f"# Compile audit: sm_{arch}, triton {header['triton']}", ""]
    if header.get("partial"):
        lines += [f"**PARTIAL: {header['partial']} compiles done; the run is still going or was stopped.**", ""]
    lines += [
             f"- Produced by: `{header['command']}`",
             f"- Date: {header['date']}; triton {header['triton']}, torch {header['torch']}, "
             f"ptxas {header['ptxas']}; no GPU involved (static compile for `GPUTarget('cuda', {arch}, 32)`)",
             f"- Mode: {'subset (one config per kernel and dtype family)' if header['subset'] else 'full'}; "
             f"shared-memory limit {SMEM_LIMIT.get(arch, '?')} B",
             "- Specialisation as a GPU launch would bind it (Triton's binder): pointer dtypes, "
             "declared constexprs, ints equal to 1; `tt.divisibility=16` attributes kept.",
             "- spill = ptxas spill stores + spill loads (bytes per thread); stack = ptxas stack frame; "
             "MMA from the SASS (`cuobjdump -sass`: HGMMA = wgmma, HMMA = mma) and PTX.", ""]
    ok = [r for r in rs if r.ok]
    spilling = [r for r in ok if r.spill > 0]
    kernels = sorted({r.kernel for r in rs})
    lines += ["## Summary", "",
              f"- {len(rs)} compiled kernel records ({len(ok)} ok, {len(rs) - len(ok)} failed) over "
              f"{len(kernels)} kernels; max shared memory {max((r.shared for r in ok), default=0)} B",
              f"- records with spills: {len(spilling)}", ""]
    arch_issues = [i for i in issues if f" sm_{arch} " in i]
    lines += [f"- audit failures on sm_{arch}: {len(arch_issues)}"] + [f"  - {i}" for i in arch_issues] + [""]
    lines += ["| kernel | dtype | records | spilling | max spill B | max regs | MMA |", "|---|---|---|---|---|---|---|"]
    for k in kernels:
        for fam in ("fp32", "tf32", "16bit", "fp64"):
            g = [r for r in ok if r.kernel == k and r.family == fam]
            if not g:
                continue
            sp = [r for r in g if r.spill > 0]
            mm = "/".join(sorted({r.mma for r in g}))
            lines.append(f"| {k} | {fam} | {len(g)} | {len(sp)} | {max((r.spill for r in g), default=0)} | "
                         f"{max(r.regs for r in g)} | {mm} |")
    if spilling:
        lines += ["", "### Spilling configs", "",
                  "| kernel | dtype | specialisation | config | regs | stack B | spill st/ld B | scenario |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(spilling, key=lambda r: (r.kernel, r.family, -r.spill)):
            lines.append(f"| {r.kernel} | {r.family} | {r.spec} | {r.config} | {r.regs} | {r.stack} | "
                         f"{r.spill_stores}/{r.spill_loads} | {r.scenarios[0]} |")
    lines += ["", "## All records", "",
              "| kernel | specialisation | config | smem B | regs | stack B | spill B | dot | MMA | scenario |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rs, key=lambda r: (r.kernel, r.family, r.spec, r.config)):
        scen = r.scenarios[0] + (f" (+{len(r.scenarios) - 1})" if len(r.scenarios) > 1 else "")
        if r.ok:
            lines.append(f"| {r.kernel} | {r.spec} | {r.config} | {r.shared} | {r.regs} | {r.stack} | {r.spill} | "
                         f"{r.dot_dtypes or '-'} | {r.mma} | {scen} |")
        else:
            lines.append(f"| {r.kernel} | {r.spec} | {r.config} | ERROR | | | | | {r.error.splitlines()[0]} | {scen} |")
    path.write_text("\n".join(lines) + "\n")


def _ptxas_version() -> str:
    try:
        out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        return m.group(1) if m else "?"
    except Exception:  # noqa: BLE001
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--subset", action="store_true", help="one config per kernel and dtype family (CI)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="directory for the tables")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--fail-on-spill", nargs="*", default=[], metavar="SPEC",
                    help="fail on spills in kernels matching SPEC = glob[:fp32|tf32|16bit|fp64][@arch], "
                         "e.g. 'relational_kl.*:16bit@90'")
    ap.add_argument("--kernels", nargs="*", default=[], metavar="GLOB", help="only compile these kernels")
    ap.add_argument("--scenarios", nargs="*", default=[], metavar="GLOB",
                    help="only run these scenarios (names as in the table's scenario column)")
    ap.add_argument("--fresh-cache", action="store_true", help="compile into an empty Triton cache (timing)")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0") and not os.environ.get(_REEXEC_FLAG):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[_REEXEC_FLAG] = "1"
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])], env=env)
    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-audit-cache-")

    missing = check_tools()
    if missing:
        print(f"compile_audit: FAILED: {', '.join(missing)} not found (triton bundles them in "
              f"triton/backends/nvidia/bin; reinstall triton)", file=sys.stderr)
        return 2

    t_start = time.time()
    import torch
    import triton

    rec = Recorder(args.arch)
    failures: list[str] = []
    with patched_triton(rec):
        for name, fn in scenarios(args.subset):
            if args.scenarios and not any(fnmatch.fnmatch(name, g) for g in args.scenarios):
                continue
            rec.scenario = name
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                failures.append(f"scenario failed: {name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    expected = launched_kernels()
    for k, f in sorted(expected.items()):
        if k not in rec.launched and not args.scenarios:
            failures.append(f"kernel never captured: {k} (kernels/{f}): add a scenario to scripts/compile_audit.py")

    records = [rec.records[k] for k in rec.order]
    if args.kernels:
        records = [r for r in records if any(fnmatch.fnmatch(r.kernel, g) for g in args.kernels)]
    if args.subset:
        seen, keep = set(), []
        for r in records:
            if (r.kernel, r.family) not in seen:
                seen.add((r.kernel, r.family))
                keep.append(r)
        records = keep
    t_capture = time.time() - t_start
    print(f"compile_audit: captured {len(rec.records)} unique launches of {len(rec.launched)} kernels in "
          f"{t_capture:.1f}s; compiling {len(records)} x {len(args.arch)} arch(s) with {args.jobs} job(s)", flush=True)

    _RECORDS[:] = records
    jobs = [(i, a) for i in range(len(records)) for a in args.arch]
    results: list[Result] = []
    header = {"triton": triton.__version__, "torch": torch.__version__, "ptxas": _ptxas_version(),
              "date": datetime.date.today().isoformat(), "subset": args.subset,
              "command": "python scripts/compile_audit.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {a: args.out / f"compile-audit-sm{a}-triton{triton.__version__}.md" for a in args.arch}

    def progress(n: int) -> None:
        if n % 25 and n != len(jobs):
            return
        print(f"  {n}/{len(jobs)} compiled ({time.time() - t_start:.0f}s)", flush=True)
        if n % 100 == 0 and n != len(jobs):  # a long run leaves readable partial tables behind
            for a in args.arch:
                write_table(paths[a], a, results, {**header, "partial": f"{n}/{len(jobs)}"},
                            failures + problems(results, args.fail_on_spill))

    if args.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.jobs) as pool:
            for n, r in enumerate(pool.imap_unordered(compile_one, jobs, chunksize=1), 1):
                results.append(r)
                progress(n)
    else:
        for n, j in enumerate(jobs, 1):
            results.append(compile_one(j))
            progress(n)

    issues = failures + problems(results, args.fail_on_spill)
    for arch in args.arch:
        path = paths[arch]
        write_table(path, arch, results, header, issues)
        rs = [r for r in results if r.arch == arch and r.ok]
        print(f"sm_{arch}: {len(rs)} ok, {sum(r.spill > 0 for r in rs)} spilling, "
              f"max smem {max((r.shared for r in rs), default=0)} B -> {path}")
    for k in sorted({r.kernel for r in results}):
        for a in args.arch:
            sp = [r for r in results if r.kernel == k and r.arch == a and r.ok and r.spill > 0]
            if sp:
                fams = sorted({r.family for r in sp})
                print(f"  spills: {k} sm_{a}: {len(sp)} record(s) ({'/'.join(fams)}), max {max(r.spill for r in sp)} B")
    print(f"compile_audit: {len(results)} compiles in {time.time() - t_start:.1f}s")
    if issues:
        print(f"compile_audit: FAILED ({len(issues)} problem(s)):", file=sys.stderr)
        for i in issues:
            print(f"  - {i}", file=sys.stderr)
        for r in results:
            if not r.ok:
                print(f"--- {r.kernel} sm_{r.arch} [{r.spec}] [{r.config}]\n{r.error}", file=sys.stderr)
        return 1
    print("compile_audit: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
