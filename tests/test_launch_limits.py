"""CUDA launch limits that the interpreter never enforces, and interpreter stores that round as the GPU.

CUDA allows 2^31 - 1 programs on grid axis 0 and 65,535 on axes 1 and 2; the interpreter runs any
grid. Every Triton launcher in the project is called here, under the interpreter, on problems past
65,535 along the batch (B = 70,000 samples, B*H = 70,000 attention heads) and on an attention mask
whose row offsets pass 2^31. The launches are intercepted: the grid each launcher computes is
recorded and the kernel is NOT run (so these cost shape arithmetic only: huge operands are meta
tensors, per-sample ones have D = 3). ``test_every_kernel_is_launched_here`` keeps the list
complete: a new kernel (a ``@triton.jit`` function reading ``tl.program_id``) must be added below.

The folded (chunk, sample) grid of the per-sample kernels is also run for real, with the axis-0
limit lowered so that a small problem needs several launches (``_common.MAX_GRID_X``).

Sessions: launches are recorded through Triton's interpreter. In a GPU session (no interpreter) those
tests are skipped with a reason and ``test_launch_recording_in_an_interpreter_session`` runs them in a
subprocess with ``FASTDISTILL_TEST_INTERPRET=1``; the folded-grid and rounding tests run on the
device Triton runs in the session (CPU tensors under the interpreter, else CUDA tensors).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from typing import Callable, Iterator

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interp

import fastdistill
import fastdistill.kernels as kernels_pkg
from fastdistill import _triton, testing
from fastdistill.kernels import _common
from fastdistill.ops import adversarial as adv_ops
from fastdistill.ops import diffusion_steps as ds_ops
from fastdistill.ops import moment_matching as mm_ops

AXIS0_MAX = 2**31 - 1
AXIS12_MAX = 65535
BIG = 70_000  # > 65,535: the batch / batch*heads of every case below
INTERPRETED = _triton.interpret_mode()
DEVICE = testing.triton_device()  # where the folded-grid and rounding tests run Triton
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="records launches through Triton's interpreter; in this session "
                            "test_launch_recording_in_an_interpreter_session runs it in a subprocess")


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Record ``(kernel name, grid)`` of every Triton launch instead of running it."""
    records: list[tuple[str, tuple[int, ...]]] = []
    original = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        if callable(grid):  # grid(meta): the bound arguments and the launch's constexprs
            params = inspect.signature(self.fn).parameters
            meta = inspect.signature(self.fn).bind_partial(
                *args, **{k: v for k, v in kwargs.items() if k in params}).arguments
            meta.update(kwargs)
            grid = grid(meta)
        grid = tuple(int(g) for g in grid)
        records.append((self.fn.__name__, grid + (1,) * (3 - len(grid))))
        return None

    interp.InterpretedFunction.run = run
    try:
        yield records
    finally:
        interp.InterpretedFunction.run = original


def _rows(*shape, requires_grad=False, device="cpu"):
    return torch.randn(*shape, device=device, requires_grad=requires_grad)


def _coef(lo: float, hi: float) -> torch.Tensor:
    return torch.linspace(lo, hi, BIG)


# Each case calls public ops (or, for huge operands, the kernel launchers on meta tensors) and
# returns nothing: the launches are what is checked. Forward and backward where there is one.

def _ddim_step():
    x, m = _rows(BIG, 3, requires_grad=True), _rows(BIG, 3, requires_grad=True)
    t = torch.randint(1, 100, (BIG,))
    out = fastdistill.ddim_step(x, m, t, t - 1, torch.linspace(0.9999, 0.004, 100))
    (out.prev_sample.sum() + out.pred_original_sample.sum()).backward()


def _pd_target():
    zt, zs = _rows(BIG, 3, requires_grad=True), _rows(BIG, 3, requires_grad=True)
    out = fastdistill.progressive_distillation_target(zt, zs, _coef(0.2, 0.9), _coef(0.9, 0.4), _coef(0.5, 0.99),
                                                      _coef(0.8, 0.1))
    sum(o.sum() for o in out).backward()


def _pd_loss():
    xs = _rows(BIG, 3, requires_grad=True)
    fastdistill.pd_loss(xs, _rows(BIG, 3), _rows(BIG, 3), _rows(BIG, 3), _coef(0.2, 0.9), _coef(0.9, 0.4)).backward()


def _boot():
    ys = _rows(BIG, 3, requires_grad=True)
    fastdistill.boot_loss(ys, _rows(BIG, 3), _rows(BIG, 3), x_t=_rows(BIG, 3), alpha_t=_coef(0.2, 0.8),
                          sigma_t=_coef(0.98, 0.6), alpha_s=_coef(0.5, 0.95), sigma_s=_coef(0.87, 0.3),
                          teacher_output_uncond=_rows(BIG, 3), guidance_scale=3.0).backward()


def _gradient_penalty():
    real, fake = _rows(BIG, 3, requires_grad=True), _rows(BIG, 3, requires_grad=True)
    x_hat, _ = adv_ops.gan_interpolate(real, fake)
    x_hat.sum().backward()
    g = _rows(BIG, 3, requires_grad=True)
    adv_ops.gradient_norm_penalty(g, 10.0).backward()


def _adversarial():
    real, fake = _rows(BIG, 1, requires_grad=True), _rows(BIG, 1, requires_grad=True)
    out = fastdistill.adversarial_losses(real, fake)
    (out[0] + out[1]).backward()


def _moment_matching():
    z, x = _rows(BIG, 3, requires_grad=True), _rows(BIG, 3, requires_grad=True)
    fastdistill.posterior_sample(z, x, _coef(0.2, 0.8), _coef(0.98, 0.6), _coef(0.5, 0.95), _coef(0.87, 0.3),
                                 seed=3).sum().backward()
    xs = _rows(BIG, 3, requires_grad=True)
    fastdistill.moment_matching_loss(xs, _rows(BIG, 3), _rows(BIG, 3), x_teacher_uncond=_rows(BIG, 3),
                                     guidance_scale=2.0).backward()
    xa = _rows(BIG, 3, requires_grad=True)
    fastdistill.auxiliary_denoiser_loss(xa, _rows(BIG, 3), _rows(BIG, 3), teacher_weight=0.5).backward()
    for dims in (0, 1):  # K = 3 reduced over 70,000 rows, and K = 70,000 indices
        x = _rows(BIG, 3, requires_grad=True)
        st = fastdistill.moment_statistics(x, dims=dims)
        (st.mean.sum() + st.var.sum()).backward()


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _attention(B, H, L, D, mask: bool):
    from fastdistill.kernels import attention as ka

    q, k, v = _meta(B, H, L, D), _meta(B, H, L, D), _meta(B, H, L, D)
    bias = _meta(1, 1, L, L) if mask else None
    out, lse = ka.attention_forward(q, k, v, bias, 0.125, "bhld")
    with _modes() as modes:  # the fast backward (dq by atomics) and the deterministic two-kernel one
        for det in modes:
            torch.use_deterministic_algorithms(det)
            ka.attention_backward(_meta(B, H, L, D), q, k, v, out, lse, bias, 0.125, "bhld")


@contextlib.contextmanager
def _modes():
    """Yields both values of torch's deterministic switch (for a loop that sets it); restores it after."""
    old = torch.are_deterministic_algorithms_enabled()
    try:
        yield (False, True)
    finally:
        torch.use_deterministic_algorithms(old)


def _attention_heads():
    _attention(700, 100, 16, 64, mask=False)  # B*H = 70,000 (AnimateDiff temporal attention has 65,536)


def _attention_long_mask():
    # A dense (1, 1, L, L) mask with L = 46,341: L * row stride = 2,147,488,281 > 2^31 (meta: no allocation).
    _attention(1, 2, 46_341, 64, mask=True)


def _relational_kl():
    from fastdistill.kernels import relational_kl as kr

    f32 = torch.float32
    qs, ks = _meta(BIG, 1, 16, 8, dtype=f32), _meta(BIG, 1, 16, 8, dtype=f32)
    qt, kt = _meta(BIG, 1, 16, 12, dtype=f32), _meta(BIG, 1, 16, 12, dtype=f32)
    kl, lse_s, lse_t = kr.relational_kl_fwd(qs, ks, qt, kt, None, 1.0, 1.0, 16)
    kr.relational_kl_fwd(qs, qs, qt, qt, None, 1.0, 1.0, 16, True, 1.0)  # the symmetric forward
    dkl = _meta(BIG, 1, 16, 1, dtype=f32)
    wide = _meta(BIG, 1, 16, kr.REGISTER_MAX_C + 8, dtype=f32)  # the chunked backward
    with _modes() as modes:
        for det in modes:  # one-pass / two-pass, symmetric (atomics / deterministic), chunked
            torch.use_deterministic_algorithms(det)
            kr.relational_kl_bwd(dkl, qs, ks, qt, kt, None, lse_s, lse_t, 1.0, 1.0, 16, True, True)
            kr.relational_kl_bwd(dkl, qs, qs, qt, qt, None, lse_s, lse_t, 1.0, 1.0, 16, True, False, True)
            kr.relational_kl_bwd(dkl, wide, wide, qt, qt, None, lse_s, lse_t, 1.0, 1.0, 16, True, False, True)
            kr.relational_kl_bwd(dkl, wide, wide.clone(), qt, kt, None, lse_s, lse_t, 1.0, 1.0, 16, True, True)
    y, rn = kr.pixel_normalize_fwd(_meta(BIG, 8, 2, 2, dtype=f32), 1e-6)
    kr.pixel_normalize_bwd(_meta(BIG * 4, 8, dtype=f32), y, rn, [BIG, 8, 2, 2], torch.float32)


CASES: dict[str, Callable[[], None]] = {
    "ddim_step": _ddim_step, "pd_target": _pd_target, "pd_loss": _pd_loss, "boot": _boot,
    "gradient_penalty": _gradient_penalty, "adversarial": _adversarial, "moment_matching": _moment_matching,
    "attention_heads": _attention_heads, "attention_long_mask": _attention_long_mask,
    "relational_kl": _relational_kl,
}


def _run_case(name: str) -> list[tuple[str, tuple[int, ...]]]:
    with recorded_launches() as launches, fastdistill.use_backend("triton"):
        CASES[name]()
    return launches


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_grids_stay_within_cuda_limits(case):
    launches = _run_case(case)
    assert launches, f"{case}: no Triton launch was recorded"
    for kernel, grid in launches:
        assert len(grid) == 3 and all(g >= 1 for g in grid), f"{case}: {kernel} grid {grid}"
        assert grid[0] <= AXIS0_MAX, f"{case}: {kernel} has {grid[0]} programs on axis 0 (max {AXIS0_MAX})"
        for axis, g in enumerate(grid[1:], 1):
            assert g <= AXIS12_MAX, f"{case}: {kernel} has {g} programs on axis {axis} (max {AXIS12_MAX})"


ROW_KERNELS = {  # per-sample row kernels: one program per (chunk, sample) of the (70,000, 3) rows
    "ddim_step": {"_ddim_fwd_kernel", "_ddim_bwd_kernel"},
    "pd_target": {"_pd_target_fwd_kernel", "_pd_target_bwd_kernel"},
    "pd_loss": {"_pd_loss_partial_kernel", "_pd_loss_bwd_kernel"},
    "boot": {"_boot_partial_kernel"},
    "gradient_penalty": {"_interp_fwd_kernel", "_interp_bwd_kernel", "_sumsq_partial_kernel", "_gp_bwd_kernel"},
    "moment_matching": {"_posterior_fwd_kernel", "_posterior_bwd_kernel", "_mm_loss_kernel"},
}


@needs_interpreter
@pytest.mark.parametrize("case", list(ROW_KERNELS))
def test_row_kernels_cover_every_sample_on_axis_0(case):
    launches = _run_case(case)
    seen = {k for k, _ in launches}
    assert ROW_KERNELS[case] <= seen, f"{case}: expected launches of {ROW_KERNELS[case] - seen}"
    for kernel, grid in launches:
        if kernel in ROW_KERNELS[case]:
            assert grid == (BIG, 1, 1), f"{case}: {kernel} grid {grid}, expected ({BIG}, 1, 1) (one chunk a sample)"


def _launched_kernels() -> set[str]:
    """Every @triton.jit function of fastdistill.kernels that reads tl.program_id (helpers excluded)."""
    names = set()
    for mod in pkgutil.iter_modules(kernels_pkg.__path__):
        if mod.name == "_common":  # shared device helpers (row_program reads program_id for its caller)
            continue
        m = importlib.import_module(f"fastdistill.kernels.{mod.name}")
        for obj in vars(m).values():
            if isinstance(obj, interp.InterpretedFunction) and obj.fn.__module__ == m.__name__:
                src = inspect.getsource(obj.fn)
                if "program_id" in src or "row_program(" in src:
                    names.add(obj.fn.__name__)
    return names


@needs_interpreter
def test_every_kernel_is_launched_here():
    seen = {k for case in CASES for k, _ in _run_case(case)}
    missing = _launched_kernels() - seen
    assert not missing, f"kernels never launched by test_launch_limits.py (add a case): {sorted(missing)}"


@pytest.mark.skipif(INTERPRETED, reason="this session runs the launch-recording tests itself")
def test_launch_recording_in_an_interpreter_session():
    """GPU session: the launch-recording tests above, run under the interpreter in a subprocess."""
    env = dict(os.environ, FASTDISTILL_TEST_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
           "-k", "grids_stay or cover_every_sample or every_kernel_is_launched"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# The folded grid computes the right answer, also when it is split into several launches.
# ---------------------------------------------------------------------------------------------

def test_row_grids_split_past_the_axis_0_limit(monkeypatch):
    monkeypatch.setattr(_common, "MAX_GRID_X", 4)
    nc = _common.n_chunks(5000)
    assert nc == 3
    launches = _common.row_grids(3, 5000)
    assert launches == [(0, 4), (4, 4), (8, 1)]
    monkeypatch.setattr(_common, "MAX_GRID_X", AXIS0_MAX)
    assert _common.row_grids(BIG, 3) == [(0, BIG)]
    assert _common.row_grids(0, 3) == []


@pytest.mark.parametrize("limit", [AXIS0_MAX, 4])
def test_folded_grid_matches_the_reference(monkeypatch, limit):
    """ddim_step (values and grads) and pd_loss on B = 7 samples of D = 2500 (two chunks each): 14
    programs in one launch, or (limit 4) four launches with pid0 = 0, 4, 8, 12 (the last one of 2)."""
    monkeypatch.setattr(_common, "MAX_GRID_X", limit)
    gen = testing.generator()
    B, D = 7, 2500
    x = testing.randn(B, D, gen=gen, device=DEVICE, requires_grad=True)
    m = testing.randn(B, D, gen=gen, device=DEVICE, requires_grad=True)
    ac = torch.linspace(0.9999, 0.004, 100, device=DEVICE)
    t = torch.randint(1, 100, (B,), generator=gen).to(DEVICE)
    with _common.launch_grid.recording() as grids, fastdistill.use_backend("triton"):
        prev, x0 = fastdistill.ddim_step(x, m, t, t - 1, ac)
        (prev * 1.5 + x0).sum().backward()
    fwd = [g for name, g in grids if name == "_ddim_fwd_kernel"]
    assert fwd == ([(14, 1, 1)] if limit == AXIS0_MAX else [(4, 1, 1)] * 3 + [(2, 1, 1)]), fwd
    xr, mr = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = ds_ops.ddim_step_reference(xr, mr, t, t - 1, ac.double())
    (ref.prev_sample * 1.5 + ref.pred_original_sample).sum().backward()
    testing.assert_close(prev, ref.prev_sample, rtol=1e-5, name="prev_sample")
    testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, name="pred_original_sample")
    testing.assert_close(x.grad, xr.grad, rtol=1e-5, name="grad x_t")
    testing.assert_close(m.grad, mr.grad, rtol=1e-5, name="grad model_output")

    xs = testing.randn(B, D, gen=gen, device=DEVICE, requires_grad=True)
    xt, et, zt = (testing.randn(B, D, gen=gen, device=DEVICE) for _ in range(3))
    a, s = torch.linspace(0.3, 0.9, B, device=DEVICE), torch.linspace(0.95, 0.4, B, device=DEVICE)
    with fastdistill.use_backend("triton"):
        loss = fastdistill.pd_loss(xs, xt, et, zt, a, s)
        loss.backward()
    xsr = xs.detach().double().requires_grad_()
    ref_loss = ds_ops.pd_loss_reference(xsr, xt.double(), et.double(), zt.double(), a.double(), s.double())
    ref_loss.backward()
    testing.assert_close(loss, ref_loss, rtol=1e-5, name="pd_loss")
    testing.assert_close(xs.grad, xsr.grad, rtol=1e-5, name="grad x_student")


def test_posterior_noise_does_not_depend_on_the_split(monkeypatch):
    """The in-kernel Philox noise is indexed by the global element offset: same values in 1 or 5 launches."""
    z, x = torch.randn(5, 3000, device=DEVICE), torch.randn(5, 3000, device=DEVICE)
    coefs = tuple(torch.full((5,), v, device=DEVICE) for v in (0.6, 0.8, 0.9, 0.43))
    with fastdistill.use_backend("triton"):
        one = fastdistill.posterior_sample(z, x, *coefs, seed=11)
        monkeypatch.setattr(_common, "MAX_GRID_X", 2)
        split = fastdistill.posterior_sample(z, x, *coefs, seed=11)
    assert torch.equal(one, split)
    ref = mm_ops.posterior_sample_reference(z, x, *coefs, seed=11)
    testing.assert_close(one, ref, rtol=1e-5, name="posterior_sample")


# ---------------------------------------------------------------------------------------------
# Stores round to nearest even, as the GPU does, also under the interpreter (which alone truncates).
# ---------------------------------------------------------------------------------------------

@triton.jit
def _store_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, _common.to_dtype(x, y_ptr.dtype.element_ty), mask=mask)


def _rounding_inputs(dtype: torch.dtype) -> torch.Tensor:
    g = testing.generator()
    x = torch.randn(4000, generator=g, dtype=torch.float64) * torch.logspace(-40, 38, 4000, dtype=torch.float64)
    # exact bf16 ties (odd and even last bit), values past bf16's largest finite, specials
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.3895313892515355e38,
                         3.39e38, float("inf"), float("-inf"), 0.0, -0.0, 1e-42, -1e-42], dtype=torch.float64)
    return torch.cat([x, ties]).to(dtype)


def _nearest16(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly rounded bf16/fp16 of x (nearest, ties to even), independent of torch's conversion, which
    rounds fp64 through fp32 (double rounding: 1 + 2^-8 + 2^-40 -> bf16 1.0, the GPU gives 1 + 2^-7).
    Among torch's result and its two neighbours, the nearest to x in fp64 (exact differences)."""
    x64 = x.double()
    b = x64.to(dtype)
    bits = b.view(torch.int16).to(torch.int32)
    cands = torch.stack([(bits + k).clamp(-32768, 32767).to(torch.int16).view(dtype) for k in (-1, 0, 1)])
    dist = (cands.double() - x64).abs().nan_to_num(float("inf"))
    best = dist.min(0).values
    is_best = dist == best
    even = (cands.view(torch.int16) & 1) == 0
    pick = torch.where(is_best.sum(0) > 1, (is_best & even).int().argmax(0), is_best.int().argmax(0))
    out = cands.gather(0, pick[None]).squeeze(0)
    return torch.where(torch.isfinite(x64) & (x64.abs() < 0.99 * torch.finfo(dtype).max), out, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy: -> fp16 inf
@pytest.mark.parametrize("src", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16, torch.float32])
def test_to_dtype_rounds_like_the_gpu(src, dst):
    """The GPU converts with one correct rounding (cvt.rn; fp64 -> bf16: cvt.rn.bf16.f64 on sm_90, fp32
    rounded to odd then cvt.rn.bf16.f32 on sm_80, read in the PTX triton 3.8 emits)."""
    x = _rounding_inputs(src)
    if src == torch.float64:  # double-rounding cases: fp32 RNE lands on a bf16 / fp16 tie
        x = torch.cat([x, torch.tensor([1 + 2.0**-8 + 2.0**-40, -(1 + 3 * 2.0**-8 - 2.0**-40), 1 + 2.0**-11 + 2.0**-40],
                                       dtype=src)])
    y = torch.empty(x.shape, dtype=dst, device=DEVICE)
    _store_kernel[(1,)](x.to(DEVICE), y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    y = y.cpu()
    expected = _nearest16(x, dst) if dst != torch.float32 else x.to(dst)
    same = (y == expected) | (torch.isnan(y) & torch.isnan(expected))
    bad = ~same
    assert bool(same.all()), (f"{src} -> {dst}: {int(bad.sum())} values differ, e.g. {x[bad][:4].tolist()} -> "
                              f"{y[bad][:4].tolist()} (nearest: {expected[bad][:4].tolist()})")
    if src == torch.float64 and dst == torch.bfloat16:
        assert y[-3].item() == 1 + 2.0**-7 and y[-2].item() == -(1 + 2 * 2.0**-8)
    if src == torch.float64 and dst == torch.float16:
        assert y[-1].item() == 1 + 2.0**-10


def test_to_dtype_keeps_nan_payloads_nan():
    """NaNs whose payload sits in the low 16 bits (truncation makes them inf) or fills the mantissa
    (the rounding carry overflows) stay NaN in bf16."""
    x = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7FC00000, 0x3F800000], dtype=torch.int32).view(torch.float32)
    y = torch.empty(5, dtype=torch.bfloat16, device=DEVICE)
    _store_kernel[(1,)](x.to(DEVICE), y, 5, BLOCK=8)
    y = y.cpu()
    assert bool(torch.isnan(y[:4]).all()) and y[4].item() == 1.0, y


def test_bf16_kernel_outputs_are_rounded_to_nearest():
    """ddim_step in bf16: the kernel computes in fp32 and rounds once; the result equals torch's
    round-to-nearest of the same fp32 arithmetic (the interpreter's own conversion would truncate)."""
    gen = testing.generator()
    x = testing.randn(3, 1000, gen=gen, device=DEVICE).bfloat16()
    m = testing.randn(3, 1000, gen=gen, device=DEVICE).bfloat16()
    ac = torch.linspace(0.9999, 0.004, 100, device=DEVICE)
    t = torch.tensor([97, 50, 3], device=DEVICE)
    with fastdistill.use_backend("triton"):
        prev, x0 = fastdistill.ddim_step(x, m, t, t - 1, ac, prediction_type="sample")
    # prediction "sample": x0 = m exactly; prev = alpha_p m + sigma_p (x - alpha m)/sigma in fp32.
    assert torch.equal(x0, m)
    ref = ds_ops.ddim_step_reference(x.float(), m.float(), t, t - 1, ac, prediction_type="sample")
    close = (prev.float() - ref.prev_sample.bfloat16().float()).abs() <= 2.0**-7 * ref.prev_sample.abs()
    assert bool(close.all())
    exact = prev == ref.prev_sample.bfloat16()
    # Rounded to nearest, the results are those of torch's fp32 path except where fp32 operation order
    # differs in the last fp32 bit right at a bf16 tie (rare); truncation would miss about half of them.
    assert exact.float().mean() > 0.99, f"only {exact.float().mean():.3f} of bf16 outputs equal torch's rounding"
