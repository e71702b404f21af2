"""Shared Triton helpers for every kernel module (``fastdistill.kernels._common``).

Importable on a machine without a GPU. Contents:

* :func:`interpret` -- whether kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  read once when this module is imported, like triton itself does).
* GPU arithmetic under the interpreter: the ``@triton.jit`` helpers :func:`to_dot` (cast a GEMM operand
  to its GEMM dtype) and :func:`dot` (``tl.dot`` with fp32 accumulation). On a GPU they are exactly
  ``x.to(DOT)`` and ``tl.dot(a, b, acc, input_precision=PREC)``. Under the interpreter they compute what
  the GPU computes, up to the order of the fp32 accumulation:

  - fp32 -> bf16 rounds to nearest even (the interpreter itself truncates), fp32 -> fp16 rounds to
    nearest even (numpy does; also subnormals), bf16 -> fp16 goes through fp32 (exact) instead of the
    interpreter's raw reinterpretation of the bf16 bits;
  - 16-bit operands are then multiplied as fp32 values (the interpreter multiplies bf16 tiles as their
    raw uint16 storage; products of 16-bit values are exact in fp32, as on tensor cores);
  - ``PREC == "tf32"``: both fp32 operands are cut to TF32 (10-bit mantissa) before the fp32 product.
    Triton hands fp32 registers to the TF32 ``mma``/``wgmma`` without a ``cvt.rna.tf32.f32`` (checked in
    the PTX for sm_80 and sm_90), so the tensor core reads the top 19 bits: truncation toward zero,
    which the emulation reproduces (its error, 2^-10 relative per operand, bounds the rounding variant's
    2^-11 too). ``PREC == "ieee"``: exact fp32 products.

* :func:`fp32_precision` -- the fp32 GEMM policy for a launch: ``"ieee"`` when
  ``torch.get_float32_matmul_precision() == "highest"``, else ``"tf32"`` (``"high"``/``"medium"``:
  TF32 tensor cores). Read on the host, no device sync; kernels take it as a constexpr.

* Tile configs: :class:`TileConfig`, :func:`gpu_configs`, and the test hook :func:`force_config` /
  :func:`forced_config` / the ``FASTDISTILL_FORCE_CONFIG`` environment variable.

  Kernel names (``kernel`` arguments):

  ===================== ================================================ ============================
  name                  kernel(s)                                        block names
  ===================== ================================================ ============================
  ``relational_kl.fwd`` ``kernels.relational_kl._rkl_fwd_kernel``        BLOCK_N, BLOCK_M, BLOCK_C
  ``relational_kl.fwd_sym`` ``_rkl_fwd_sym_kernel`` (self-relation)     BLOCK_N == BLOCK_M, BLOCK_C
  ``relational_kl.bwd`` ``kernels.relational_kl._rkl_bwd_kernel``        BLOCK_N, BLOCK_M, BLOCK_C
                        (one recompute per tile; every mode but ``dk``)
  ``relational_kl.dk``  ``kernels.relational_kl._rkl_bwd_dk_kernel``     BLOCK_N, BLOCK_M, BLOCK_C
                        (key gradient of the deterministic two-pass path)
  ``attention.fwd``     ``kernels.attention._attn_fwd``                  BLOCK_M, BLOCK_N
  ``attention.bwd``     ``kernels.attention._attn_bwd_fused`` (default)  KV_BLOCK_M, KV_BLOCK_N
  ``attention.bwd_det`` ``kernels.attention._attn_bwd_dkdv`` + ``_dq``   KV_BLOCK_M, KV_BLOCK_N,
                        (deterministic mode)                             Q_BLOCK_M, Q_BLOCK_N
  ===================== ================================================ ============================

  ``gpu_configs(kernel, **problem)`` lists the configs the GPU launcher (or its autotuner) considers for
  a problem; problem keywords per kernel: relational KL ``n`` (rows), ``s`` (segment length), ``c``
  (largest channel count), ``dtype`` (the GEMM dtype: torch.float32/bfloat16/float16), ``precision``
  ("ieee"/"tf32", fp32 only); attention ``d`` (head dim), ``lq``, ``lk``, ``dtype``.

  A forced config replaces the launcher's choice (on the GPU too: the autotuner is bypassed), with
  ``force_config(kernel, config)`` (a context manager) or the environment variable::

      FASTDISTILL_FORCE_CONFIG="relational_kl.fwd=BLOCK_N:64,BLOCK_M:32,BLOCK_C:32,warps:4,stages:2;attention.fwd=BLOCK_M:64,BLOCK_N:32,warps:4,stages:2"

  (``;`` between kernels, ``,`` between ``name:value`` fields; ``warps``/``stages`` may be spelt
  ``num_warps``/``num_stages``; every other field is a block size). The context manager wins over the
  variable. Block sizes must be powers of two of at least 16 (the ``tl.dot`` minimum).

* :func:`launch_grid` -- builds a launch grid and checks CUDA's limits (axis 0 < 2^31, axes 1 and 2
  <= 65,535). Every launcher computes its grid through it; ``launch_grid.record`` (a list, or None)
  collects the grids for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from fastdistill import _triton

__all__ = [
    "interpret", "INTERPRET", "fp32_precision", "to_dot", "dot", "gemm_dtype", "split_channels",
    "TileConfig", "KERNELS", "gpu_configs", "force_config", "forced_config", "FORCE_ENV",
    "launch_grid", "MAX_GRID_X", "MAX_GRID_YZ", "TL_DTYPE",
]


def interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _triton.interpret_mode()


# Read by the jit helpers below at trace time (the interpreter is chosen at import, as triton does).
INTERPRET = tl.constexpr(interpret())

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


def fp32_precision() -> str:
    """``input_precision`` of fp32 GEMMs under torch's current policy: ``"ieee"`` for
    ``torch.get_float32_matmul_precision() == "highest"``, ``"tf32"`` for ``"high"``/``"medium"``."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ----------------------------------------------------------------------------------------------
# GEMM operands with the GPU's rounding

@triton.jit
def _round_bf16(x):
    # fp32 -> nearest bf16 value (ties to even), kept in fp32. Inf stays inf; overflow rounds to inf.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_tf32(x):
    # fp32 -> TF32 as the tensor core reads it (top 19 bits: 10-bit mantissa, low 13 bits dropped), kept
    # in fp32. Triton passes fp32 registers to the TF32 mma/wgmma unconverted (no cvt.rna.tf32 in the
    # PTX it emits for sm_80/sm_90, triton 3.8), so this is truncation toward zero, not rounding.
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def to_dot(x, DOT: tl.constexpr):
    """``x.to(DOT)`` for a GEMM operand: on a GPU exactly that; under the interpreter the value the GPU
    gets (round to nearest even), returned as fp32 for 16-bit ``DOT`` (see the module docstring)."""
    if INTERPRET:
        x32 = x.to(tl.float32)  # exact from bf16/fp16/fp32 (fp64: rounds to nearest, as the GPU)
        if DOT == tl.bfloat16:
            if x.dtype == tl.bfloat16:
                return x32
            else:
                return tl.where(x32 != x32, x32, _round_bf16(x32))  # NaN stays NaN (bit trick wraps)
        elif DOT == tl.float16:
            if x.dtype == tl.float16:
                return x32
            else:
                return x32.to(tl.float16).to(tl.float32)  # numpy's fp32 -> fp16 rounds to nearest even
        else:
            return x.to(DOT)
    else:
        return x.to(DOT)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """``tl.dot(a, b, acc, input_precision=PREC)`` (fp32 accumulator ``acc``, or None for a fresh one).

    Operands come from :func:`to_dot` or from a load of the GEMM dtype. Under the interpreter both are
    multiplied as fp32 values, rounded to TF32 first when ``PREC == "tf32"``."""
    if INTERPRET:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if PREC == "tf32":
            a32 = _round_tf32(a32)
            b32 = _round_tf32(b32)
        return tl.dot(a32, b32, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


def gemm_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both operands of one GEMM are cast to, given the dtypes of its two inputs.

    Equal dtypes: that dtype (fp64: fp32, the accumulators are fp32). fp32 with one 16-bit type (say, an
    fp32 memory bank against bf16 features under autocast): the 16-bit type, as autocast's matmul would.
    fp16 with bf16: fp32.
    """
    if torch.float64 in (a, b):
        return torch.float32
    if a == b:
        return a
    if {a, b} == {torch.float16, torch.bfloat16}:
        return torch.float32
    return a if a != torch.float32 else b


def split_channels(d: int) -> tuple[int, int]:
    """Power-of-two sub-blocks ``(D0, D1)`` covering ``d`` channels (``D1 == 0``: one block), for a
    register-resident row tile whose width is not a power of two (head dims 40/80/160, RDD's 320).

    ``D0`` is the largest power of two <= d (at least 16); the remainder gets the smallest power
    of two >= it (at least 16, the smallest ``tl.dot`` operand). When that would not save work
    over one padded block (e.g. 24 -> 16+16 = 32), one block is used: 40 = 32+16, 80 = 64+16,
    160 = 128+32, 320 = 256+64, 64 = 64.
    """
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    if d0 == d:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(d - d0))
    if d1 >= d0:
        return 2 * d0, 0
    return d0, d1


# ----------------------------------------------------------------------------------------------
# Tile configs

KERNELS = ("relational_kl.fwd", "relational_kl.fwd_sym", "relational_kl.bwd", "relational_kl.dk", "attention.fwd",
           "attention.bwd", "attention.bwd_det")
FORCE_ENV = "FASTDISTILL_FORCE_CONFIG"
_META = {"warps": "num_warps", "num_warps": "num_warps", "stages": "num_stages", "num_stages": "num_stages"}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch config: block sizes (``blocks``: a mapping or ``(name, value)`` pairs, stored sorted
    as pairs so the config is hashable), ``num_warps`` and ``num_stages``."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        items = self.blocks.items() if isinstance(self.blocks, Mapping) else self.blocks
        try:
            pairs = tuple(sorted((str(k), int(v)) for k, v in items))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"TileConfig.blocks must map block names to ints, got {self.blocks!r}") from exc
        for name, v in pairs:
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig: {name}={v} is not a power of two >= 16")
        if int(self.num_warps) not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig: num_warps={self.num_warps} is not 1, 2, 4, 8 or 16")
        if int(self.num_stages) < 1:
            raise ValueError(f"TileConfig: num_stages={self.num_stages} must be >= 1")
        object.__setattr__(self, "blocks", pairs)
        object.__setattr__(self, "num_warps", int(self.num_warps))
        object.__setattr__(self, "num_stages", int(self.num_stages))

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    @property
    def block_dict(self) -> dict[str, int]:
        return dict(self.blocks)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> TileConfig:
        """From ``{"blocks": {...}, "num_warps": w, "num_stages": s}`` or a flat mapping
        ``{"BLOCK_M": 64, ..., "num_warps": w, "num_stages": s}`` (``warps``/``stages`` accepted)."""
        if isinstance(fields, TileConfig):
            return fields
        if not isinstance(fields, Mapping):
            raise TypeError(f"a tile config must be a TileConfig or a mapping, got {type(fields).__name__}")
        if "blocks" in fields:
            return cls(fields["blocks"], fields.get("num_warps", 4), fields.get("num_stages", 2))
        meta = {"num_warps": 4, "num_stages": 2}
        blocks = {}
        for k, v in fields.items():
            if k in _META:
                meta[_META[k]] = v
            else:
                blocks[k] = v
        return cls(blocks, **meta)

    def __str__(self) -> str:
        return ",".join([f"{k}:{v}" for k, v in self.blocks] + [f"warps:{self.num_warps}",
                                                                 f"stages:{self.num_stages}"])


def _check_kernel(kernel: str) -> None:
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str, got {type(kernel).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")


_FORCED: dict[str, TileConfig] = {}


@contextlib.contextmanager
def force_config(kernel: str, config: TileConfig | Mapping[str, Any]) -> Iterator[TileConfig]:
    """Within the block, launches of ``kernel`` use ``config`` instead of the launcher's choice."""
    _check_kernel(kernel)
    cfg = TileConfig.from_fields(config)
    old = _FORCED.get(kernel)
    _FORCED[kernel] = cfg
    try:
        yield cfg
    finally:
        if old is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = old


def _parse_env(text: str) -> dict[str, TileConfig]:
    out = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, body = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{FORCE_ENV}: expected 'kernel=FIELD:VALUE,...', got {part!r}")
        _check_kernel(name)
        fields = {}
        for f in body.split(","):
            k, sep, v = f.partition(":")
            if not sep:
                raise ValueError(f"{FORCE_ENV}: expected NAME:VALUE in {part!r}, got {f!r}")
            fields[k.strip()] = int(v)
        out[name] = TileConfig.from_fields(fields)
    return out


def forced_config(kernel: str) -> TileConfig | None:
    """The config forced for ``kernel`` (context manager first, then ``FASTDISTILL_FORCE_CONFIG``), or None."""
    _check_kernel(kernel)
    if kernel in _FORCED:
        return _FORCED[kernel]
    text = os.environ.get(FORCE_ENV, "")
    if text.strip():
        return _parse_env(text).get(kernel)
    return None


_CONFIG_FNS: dict[str, Any] = {}
_MODULES = {"relational_kl": "fastdistill.kernels.relational_kl", "attention": "fastdistill.kernels.attention"}


def register_configs(kernel: str):
    """Decorator for a kernel module's ``(**problem) -> list[TileConfig]`` GPU config function."""
    _check_kernel(kernel)

    def deco(fn):
        _CONFIG_FNS[kernel] = fn
        return fn
    return deco


def gpu_configs(kernel: str, **problem: Any) -> list[TileConfig]:
    """The configs a GPU launch of ``kernel`` considers for ``problem`` (keywords: module docstring).
    Works without a GPU and under the interpreter (which runs one of them, or a forced one)."""
    _check_kernel(kernel)
    if kernel not in _CONFIG_FNS:
        import importlib

        importlib.import_module(_MODULES[kernel.split(".")[0]])
    return list(_CONFIG_FNS[kernel](**problem))


# ----------------------------------------------------------------------------------------------
# Launch grids

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


class _LaunchGrid:
    """``launch_grid(name, x, y=1, z=1) -> (x, y, z)`` with CUDA's limits asserted.

    ``launch_grid.record`` is None, or a list that collects ``(name, (x, y, z))`` per call
    (tests set it to check every launcher's grid)."""

    def __init__(self) -> None:
        self.record: list[tuple[str, tuple[int, int, int]]] | None = None

    def __call__(self, name: str, x: int, y: int = 1, z: int = 1) -> tuple[int, int, int]:
        grid = (int(x), int(y), int(z))
        if self.record is not None:
            self.record.append((name, grid))
        if not 0 <= grid[0] <= MAX_GRID_X or not all(0 <= g <= MAX_GRID_YZ for g in grid[1:]):
            raise ValueError(f"{name}: launch grid {grid} exceeds CUDA's limits "
                             f"(x <= {MAX_GRID_X}, y, z <= {MAX_GRID_YZ})")
        return grid

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, tuple[int, int, int]]]]:
        """Collect the grids launched within the block."""
        old, self.record = self.record, []
        try:
            yield self.record
        finally:
            self.record = old


launch_grid = _LaunchGrid()


# ==============================================================================================
# Elementwise helpers (per-sample row kernels: diffusion_steps, boot, adversarial, moment_matching)
# ==============================================================================================
#
# The per-sample kernels view every tensor as (B, D) contiguous rows and run one program per
# (D-chunk, sample). CUDA allows 2^31 - 1 programs on grid axis 0 but only 65,535 on axes 1 and 2,
# so the (chunk, sample) pair is folded into axis 0, sample-major (the chunks of one sample are
# adjacent programs): a launch never puts anything on axes 1/2, and any batch size works. Grids
# past MAX_GRID_X programs are split into several launches that pass the first program's index
# (``pid0``). Kernels decode their (chunk, sample) with :func:`row_program` in int64. Every grid
# goes through :data:`launch_grid` (named after the kernel function).
#
# Stores: Triton's CPU interpreter converts fp32 -> bf16 by truncation, and fp64/fp16 -> bf16 through
# an integer cast (garbage); the GPU rounds to nearest even. :func:`to_dtype` is ``x.to(dtype)`` on
# the GPU and the GPU's rounding under the interpreter, so the CPU suite sees the GPU's stored values.

ROW_BLOCK = 2048  # elements per program of the row kernels: 8 KiB of fp32 per operand in flight
ROW_NUM_WARPS = 8
FINISH_BLOCK_B = 32  # (rows, chunks) tile of the one-program reductions over (B, n_chunks) partials
FINISH_BLOCK_C = 64


def n_chunks(d: int, block: int = ROW_BLOCK) -> int:
    """Number of ``block``-element chunks of a row of ``d`` elements (at least 1)."""
    return triton.cdiv(max(d, 1), block)


def row_grids(b: int, d: int, block: int = ROW_BLOCK) -> list[tuple[int, int]]:
    """The launches of a per-sample row kernel over ``b`` rows of ``d`` elements.

    A list of ``(pid0, programs)``: each launch runs ``programs`` programs on axis 0 starting at folded
    program index ``pid0`` (program ``p`` handles chunk ``p % n_chunks(d)`` of sample ``p // n_chunks(d)``).
    One launch unless ``b * n_chunks(d)`` exceeds ``MAX_GRID_X`` (read at call time: tests lower it).
    """
    total = b * n_chunks(d, block)
    step = MAX_GRID_X
    return [(p0, min(step, total - p0)) for p0 in range(0, total, step)]


def launch_rows(kernel, b: int, d: int, *args, block: int = ROW_BLOCK, num_warps: int = ROW_NUM_WARPS,
                **constexprs) -> None:
    """Launch a row kernel over ``b`` rows of ``d`` elements.

    The kernel's trailing runtime arguments must be ``pid0, NCHUNK`` (see :func:`row_program`) and its
    block size the constexpr ``BLOCK``; ``args`` are the arguments before them.
    """
    nc = n_chunks(d, block)
    name = getattr(kernel, "__name__", "row_kernel")
    for p0, programs in row_grids(b, d, block):
        kernel[launch_grid(name, programs)](*args, p0, nc, BLOCK=block, num_warps=num_warps, **constexprs)


@triton.jit
def row_program(pid0, NCHUNK):
    """(chunk, sample) of this program of a :func:`launch_rows` launch, both int64."""
    pid = tl.program_id(0).to(tl.int64) + pid0
    b = pid // NCHUNK
    return pid - b * NCHUNK, b


@triton.jit
def row_sums(p_ptr, rb, mb, NCHUNK, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum over the chunk axis of a (B, NCHUNK) fp32 partial buffer, for the rows ``rb`` (mask ``mb``)."""
    acc = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, NCHUNK, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        m = mb[:, None] & (rc[None, :] < NCHUNK)
        v = tl.load(p_ptr + rb[:, None].to(tl.int64) * NCHUNK + rc[None, :], mask=m, other=0.0)
        acc += tl.sum(v, axis=1)
    return acc


@triton.jit
def _bf16_rne(x):
    """fp32 x -> bf16, nearest even, built from the bits (the interpreter's own fp32 -> bf16 conversion
    truncates and flushes subnormals). NaN gives the canonical NaN, as the GPU's cvt.rn.bf16.f32."""
    bits = _round_bf16(x).to(tl.uint32, bitcast=True) >> 16
    bits = tl.where(x != x, 0x7FC0, bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp64_to_fp32_odd(x):
    """fp64 -> fp32 rounded to odd (truncate, set the last bit when inexact): rounding that once more to
    bf16 gives the correctly rounded bf16 of x (no double-rounding error), as the GPU computes it."""
    f = x.to(tl.float32)
    back = f.to(tl.float64)
    inexact = back != x
    u = f.to(tl.uint32, bitcast=True)
    u = tl.where(inexact & (tl.abs(back) > tl.abs(x)), u - 1, u)  # step toward zero: truncation
    u = tl.where(inexact, u | 1, u)
    return tl.where(x != x, f, u.to(tl.float32, bitcast=True))


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounded to nearest even, as the GPU converts; use it for every stored value.

    On the GPU (compiled code) this is exactly ``x.to(DTYPE)``. Under the interpreter, conversions to
    bf16 are done here (the interpreter truncates fp32, flushes bf16 subnormals and mangles fp64/fp16
    sources); fp64 goes through fp32 rounded to odd, so it is rounded once, as on the GPU (the PTX triton
    3.8 emits: ``cvt.rn.bf16.f64`` on sm_90; fp32 rounded to odd, then ``cvt.rn.bf16.f32`` on sm_80)."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            if x.dtype == tl.float64:
                y = _bf16_rne(_fp64_to_fp32_odd(x))
            elif x.dtype == tl.bfloat16:
                y = x
            else:
                y = _bf16_rne(x.to(tl.float32))  # fp16 -> fp32 is exact
        else:
            y = x.to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y
