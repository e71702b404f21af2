"""``fastdistill selftest``: every op, on every backend that runs here, against float64.

The first command to run after installing fastdistill on a new machine (as ``python -m xformers.info``
is for xformers)::

    fastdistill selftest                 # every op on the GPU when there is one, else on the CPU
    fastdistill selftest --quick         # fewer and smaller cases (well under a minute on a GPU)
    fastdistill selftest --device cpu    # CPU tensors; Triton kernels run through the interpreter
    fastdistill selftest --ops relational_kl,fused_attention --json results.json

For every op registered with :mod:`fastdistill.dispatch`, every backend that can run on the chosen
device (:func:`fastdistill.dispatch.available_backends`) and every floating dtype the op takes
(float32, bfloat16, float16), it draws fresh random inputs of awkward sizes (not multiples of any
block size), runs the op forced onto that backend with its outputs poisoned, and compares the value
and the input gradients (under a random upstream gradient) with the op's reference computed in
float64 on upcast copies of the same inputs: :func:`fastdistill.testing.check_against_reference`, the
harness the test suite uses. It prints one row per (op, backend, dtype): of all the values and
gradients compared for that row, the one closest to its bound, with its relative error
``max|got - want| / max|want|``, its tolerance and their ratio (over 1 fails), then pass/fail and the
time. The exit status is 1 when any row fails.

``--device cpu`` sets ``TRITON_INTERPRET=1`` (when it is not set and triton is not imported yet), so
the Triton kernels are exercised on CPU tensors through Triton's interpreter, as in the CPU test
suite. Pass ``TRITON_INTERPRET=0`` explicitly to test only the C++ and reference backends on CPU.

Seeds: each run draws a fresh base seed (printed in the header and written to the JSON);
``--seed N`` (or ``FASTDISTILL_TEST_SEED=N``) replays a run's inputs exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = ["Row", "CASES", "missing_cases", "prepare_device", "run", "format_table", "main_args"]

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One (op, backend, dtype) line of the selftest."""

    op: str
    backend: str
    dtype: str
    device: str
    passed: bool
    max_rel_error: float  # relative error of the comparison closest to its bound (nan when none ran)
    tolerance: float  # that comparison's tolerance (values and gradients may have different bounds)
    seconds: float
    checks: int  # number of tensors compared (values and gradients)
    error: str | None = None  # why it failed (assertion or exception text), None when it passed


class _Failed(Exception):
    """A comparison of one case failed (the message says which and by how much)."""


def _relative_error(got: Any, want: Any, floor: float = 1e-6) -> float:
    """``max|got - want| / max(max|want|, floor)``, as :func:`fastdistill.testing.assert_close` bounds it."""
    import torch

    a = got.detach().to(torch.float64).cpu()
    e = want.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a[torch.isfinite(e)]).all():
        return math.inf
    return (a - e).abs().max().item() / max(e.abs().max().item(), floor)


def _flat(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):  # NamedTuples too
        return [t for o in out for t in _flat(o)]
    return []


def _grad_leaves(obj: Any) -> list:
    """Tensors requiring grad, in the order :func:`fastdistill.testing.check_against_reference` lists them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _grad_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _grad_leaves(o)]
    return []


class Case:
    """What one case builder gets: the device, dtype and backend under test, input helpers and
    :meth:`check`, which runs the shared harness and records the errors it measured."""

    def __init__(self, op: str, backend: str, dtype: Any, device: Any, quick: bool) -> None:
        from . import testing

        self.op, self.backend, self.dtype, self.device, self.quick = op, backend, dtype, device, quick
        self.gen = testing.generator("cpu")
        self.errors: list[tuple[float, float]] = []  # (relative error, tolerance) per compared tensor

    # -- inputs (drawn on the CPU from the run's seed sequence, then moved: same values on every device)
    def randn(self, *shape: int, grad: bool = False, scale: float = 1.0, dtype: Any = None) -> Any:
        from . import testing

        return testing.randn(*shape, dtype=dtype or self.dtype, device=self.device, gen=self.gen, scale=scale,
                             requires_grad=grad)

    def rand(self, *shape: int) -> Any:
        """Uniform [0, 1) float32 on the device."""
        import torch

        return torch.rand(*shape, generator=self.gen).to(self.device)

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> Any:
        import torch

        return torch.randint(low, high, shape, generator=self.gen).to(self.device)

    def tol(self, by_dtype: dict[str, float] | None = None) -> float:
        """``by_dtype[dtype name]`` when given (an op's calibrated bound), else ``testing.tolerance(dtype)``."""
        from . import testing

        name = str(self.dtype).replace("torch.", "")
        if by_dtype and name in by_dtype:
            return by_dtype[name]
        return testing.tolerance(self.dtype)

    def check(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
              reference: Callable[..., Any] | None = None, rtol: float | None = None,
              grad_rtol: float | None = None) -> None:
        """:func:`fastdistill.testing.check_against_reference` on this case's backend and dtype.

        ``reference`` defaults to ``fn`` itself: the harness runs it under the reference backend on
        float64 copies of the inputs. The float64 outputs and gradients are captured (a wrapper and
        tensor hooks) so that the relative errors can be reported, not only pass/fail.
        """
        from . import testing

        reference = fn if reference is None else reference
        rtol = self.tol() if rtol is None else rtol
        grad_rtol = rtol if grad_rtol is None else grad_rtol
        captured: dict[str, list] = {}

        def ref(*a: Any, **k: Any) -> Any:
            leaves = _grad_leaves((list(a), k))
            grads: list = [None] * len(leaves)
            for i, leaf in enumerate(leaves):
                leaf.register_hook(lambda g, i=i: grads.__setitem__(i, g))
            out = reference(*a, **k)
            captured["outs"], captured["grads"] = _flat(out), grads
            return out

        try:
            res = testing.check_against_reference(fn, ref, args, kwargs, dtype=self.dtype, backend=self.backend,
                                                  rtol=rtol, grad_rtol=grad_rtol)
        except AssertionError as exc:
            text = str(exc)
            m = re.search(r"relative ([0-9.eE+-]+)", text)
            is_grad = text.startswith("grad")
            self.errors.append((float(m.group(1)) if m else math.inf, grad_rtol if is_grad else rtol))
            raise _Failed(text) from None
        for o, r in zip(res.outputs, captured.get("outs", [])):
            if o.dtype.is_floating_point:
                self.errors.append((_relative_error(o, r), rtol))
            else:
                self.errors.append((0.0, rtol))  # integer outputs were compared for equality
        for g, w in zip(res.grads, captured.get("grads", [])):
            if g is not None and w is not None:
                self.errors.append((_relative_error(g, w), grad_rtol))


@dataclass
class Spec:
    """How to test one op: the dtypes it takes and a builder that calls :meth:`Case.check`."""

    build: Callable[[Case], None]
    dtypes: tuple[str, ...] = _DTYPE_NAMES
    note: str = ""  # what the case covers beyond the op's main function (documentation only)


# ----------------------------------------------------------------------------------------------
# Per-op cases. Inputs follow the op's tests (tests/test_<family>.py); the tolerances are those the
# tests calibrated where they differ from fastdistill.testing.TOLERANCES (the comments say why).

# relational KL family (tests/test_relational_kl.py, test_rdd.py, test_attention_kl.py): the KL is a
# difference of log-sum-exps, so fp32 errors scale with the logits, not with the (small) KL.
_KL_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
_RKL_GRAD = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
# RDD bf16 gradients: dl = p_S - p_T cancels; measured tail near 4% on 4x4-pixel maps (test_rdd.py).
_RDD_GRAD = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def _relational_kl(c: Case) -> None:
    from .ops.relational_kl import relational_kl, relational_kl_reference

    # (G, N, M, C_s, C_t, segment_size): C above a GPU channel tile (40 = 32 + 16 register sub-blocks), segments
    # smaller than a tile, several key tiles with online rescaling (M = 70), sizes of 1.
    shapes = [(2, 9, 30, 40, 20, 15)] if c.quick else [
        (2, 9, 30, 40, 20, 15), (None, 7, 17, 5, 9, None), (3, 5, 12, 3, 37, 4), (None, 20, 70, 16, 8, None),
        (2, 1, 4, 2, 3, 2)]
    for G, N, M, Cs, Ct, S in shapes:
        sh = (lambda n, ch: (n, ch)) if G is None else (lambda n, ch: (G, n, ch))
        args = [c.randn(*sh(N, Cs), grad=True), c.randn(*sh(M, Cs), grad=True), c.randn(*sh(N, Ct)),
                c.randn(*sh(M, Ct))]
        kw = dict(temperature=0.7, kd_temperature=1.3, segment_size=S, reduction="none" if S else "mean")
        # As the test: the bound widens when the KL is much smaller than the logits.
        d = [a.detach().double().cpu() for a in args]
        lmax = max((d[0] @ d[1].transpose(-1, -2)).abs().max().item(),
                   (d[2] @ d[3].transpose(-1, -2)).abs().max().item())
        kl_max = relational_kl_reference(*d, **kw).abs().max().item()
        rtol = max(c.tol(_KL_RTOL), 2e-6 * (1.0 + lmax / (0.7 * 1.3)) / max(kl_max, 1e-6))
        c.check(relational_kl, args, kw, rtol=rtol, grad_rtol=c.tol(_RKL_GRAD))


def _rdd_maps(c: Case, B: int, Cs: int, Ct: int, H: int, W: int) -> list:
    return [c.randn(B, Cs, H, W, grad=True), c.randn(B, Ct, H, W).relu()]  # teacher post-ReLU


def _fused_rdd_loss(c: Case) -> None:
    import fastdistill

    shapes = [(3, 5, 7, 2, 3)] if c.quick else [(3, 5, 7, 2, 3), (1, 4, 4, 3, 3), (4, 9, 6, 5, 1), (2, 40, 33, 3, 3)]
    for shape in shapes:
        c.check(fastdistill.fused_rdd_loss, _rdd_maps(c, *shape), dict(temperature=0.8), rtol=c.tol(_KL_RTOL),
                grad_rtol=c.tol(_RDD_GRAD))


def _memory_p2p_loss(c: Case) -> None:
    import torch

    import fastdistill

    for with_index in ([True] if c.quick else [True, False]):
        s, t = _rdd_maps(c, 2, 7, 7, 3, 2)
        bank = torch.nn.functional.normalize(c.randn(30, 7, dtype=torch.float32), dim=1).to(c.dtype)
        index = torch.round(torch.linspace(0, 29, 11)).long().to(c.device) if with_index else None

        def fn(s: Any, t: Any, bank: Any) -> Any:
            return fastdistill.memory_p2p_loss(s, t, bank, index=index, temperature=0.1, kd_temperature=1.5)

        c.check(fn, [s, t, bank], rtol=c.tol(_KL_RTOL), grad_rtol=c.tol(_RDD_GRAD))


def _rcfd_loss(c: Case) -> None:
    import fastdistill

    c.check(fastdistill.rcfd_loss, [c.randn(5, 13, grad=True), c.randn(5, 13)], dict(temperature=0.9),
            rtol=c.tol(_KL_RTOL), grad_rtol=c.tol(_RDD_GRAD))


def _attention_kl(c: Case) -> None:
    import fastdistill

    shapes = [(2, 3, 5, 7, 8, 8)] if c.quick else [(2, 3, 5, 7, 8, 8), (1, 2, 70, 20, 5, 3), (1, 2, 3, 77, 40, 16)]
    for B, H, Lq, Lk, Ds, Dt in shapes:
        args = [c.randn(B, H, Lq, Ds, grad=True), c.randn(B, H, Lk, Ds, grad=True), c.randn(B, H, Lq, Dt),
                c.randn(B, H, Lk, Dt)]
        c.check(fastdistill.attention_kl, args, dict(reduction="none"), rtol=c.tol(_KL_RTOL),
                grad_rtol=c.tol(_RKL_GRAD))


def _fused_attention(c: Case) -> None:
    import torch

    import fastdistill
    from . import _triton

    # (output rtol, gradient rtol) as tests/test_attention.py: P and dS are rounded to 16 bits before
    # their dots (as FlashAttention 2 does); fp32 dots on an NVIDIA GPU run TF32 (10-bit mantissa).
    if c.dtype == torch.float32:
        tf32 = c.backend == "triton" and not _triton.interpret_mode()
        rtol, grtol = (5e-3, 1e-2) if tf32 else (2e-5, 5e-5)
    elif c.dtype == torch.bfloat16:
        rtol, grtol = 2e-2, 4e-2
    else:
        rtol, grtol = 1e-2, 2e-2
    # (B, H, Lq, Lk, D, masked): Lk = 77 (CLIP text), head dims 40 (split 32+16) and 64, Lq of 1.
    shapes = [(1, 2, 17, 77, 40, False)] if c.quick else [
        (1, 2, 17, 77, 40, False), (2, 1, 19, 41, 64, True), (1, 1, 1, 9, 80, False), (1, 3, 33, 5, 16, True)]
    for B, H, Lq, Lk, D, masked in shapes:
        q, k, v = (c.randn(B, H, L, D, grad=True) for L in (Lq, Lk, Lk))
        kw: dict[str, Any] = {}
        if masked:  # an additive key mask as diffusers builds it (0 keeps, -10000 drops; key 0 always kept)
            keep = c.rand(B, 1, Lk) > 0.3
            keep[..., 0] = True
            kw["attn_mask"] = torch.zeros(B, 1, Lk, device=c.device).masked_fill(~keep, -10000.0)
        c.check(fastdistill.fused_attention, [q, k, v], kw, rtol=rtol, grad_rtol=grtol)


_ADV_SHAPES_QUICK = [(3, 2, 5, 7)]
_ADV_SHAPES = [(1, 3), (3, 2, 5, 7), (2, 3, 33, 33)]  # the last spans two kernel blocks per sample


def _gradient_penalty(c: Case) -> None:
    from .ops.adversarial import gan_interpolate, gradient_norm_penalty

    for shape in (_ADV_SHAPES_QUICK if c.quick else _ADV_SHAPES):
        c.check(gan_interpolate, [c.randn(*shape, grad=True), c.randn(*shape, grad=True), c.rand(shape[0])])
        c.check(gradient_norm_penalty, [c.randn(*shape, grad=True, scale=0.7)], {"weight": 10.0})


def _adversarial_losses(c: Case) -> None:
    import fastdistill

    for n_real, n_fake in ([(7, 3)] if c.quick else [(1, 1), (7, 3), (1300, 1300)]):  # 1300 > one block
        real, fake = c.randn(n_real, 1, grad=True, scale=4.0), c.randn(n_fake, 1, grad=True, scale=4.0)
        c.check(fastdistill.adversarial_losses, [real, fake])
        c.check(fastdistill.adversarial_losses, [None, fake])


def _boot_loss(c: Case) -> None:
    import torch

    import fastdistill

    # bf16 on triton: dy_s is written in bf16 and scaled by the upstream gradient: two roundings.
    grad_rtol = 2e-2 if (c.backend == "triton" and c.dtype == torch.bfloat16) else None
    cases = [("epsilon", (3, 2, 5, 7), True)] if c.quick else [
        (p, s, i % 2 == 1) for p in ("epsilon", "sample", "v_prediction")
        for i, s in enumerate([(1, 5), (3, 2, 5, 7), (2, 3, 33, 33)])]
    for prediction_type, shape, cfg in cases:
        B = shape[0]
        abar_t = c.rand(B) * 0.5 + 0.005
        abar_s = abar_t + 0.05 + c.rand(B) * 0.3
        kw: dict[str, Any] = dict(x_t=c.randn(*shape), alpha_t=abar_t.sqrt(), sigma_t=(1 - abar_t).sqrt(),
                                  alpha_s=abar_s.sqrt(), sigma_s=(1 - abar_s).sqrt(), weight=c.rand(B) + 0.5,
                                  prediction_type=prediction_type)
        if cfg:
            kw.update(teacher_output_uncond=c.randn(*shape), guidance_scale=4.5)
        c.check(fastdistill.boot_loss, [c.randn(*shape, grad=True), c.randn(*shape), c.randn(*shape)], kw,
                rtol=c.tol(), grad_rtol=grad_rtol)


_STEP_SHAPES = [(1, 7), (3, 2, 5, 7), (2, 3, 33, 33)]  # (2, 3, 33, 33): one sample spans two blocks


def _ddim_step(c: Case) -> None:
    import torch

    import fastdistill

    ac = torch.linspace(0.9999, 0.004, 100, dtype=torch.float64).float().to(c.device)
    preds = ["v_prediction"] if c.quick else ["epsilon", "sample", "v_prediction"]
    for prediction_type in preds:
        for shape in ([(3, 2, 5, 7)] if c.quick else _STEP_SHAPES):
            B = shape[0]
            t = c.randint(0, 100, (B,))
            p = t - c.randint(1, 30, (B,))  # some negative: the final alpha
            c.check(fastdistill.ddim_step, [c.randn(*shape, grad=True), c.randn(*shape, grad=True), t, p, ac],
                    {"prediction_type": prediction_type})


def _pd_target(c: Case) -> None:
    import torch

    import fastdistill

    # bf16: the harness rounds the random upstream gradient to bf16 for the op, and dz partly cancels.
    grad_rtol = 3e-2 if c.dtype == torch.bfloat16 else None
    for shape in ([(3, 2, 5, 7)] if c.quick else _STEP_SHAPES):
        B = shape[0]
        abar_t = c.rand(B) * 0.5 + 0.05
        abar_s = abar_t + 0.3
        args = [c.randn(*shape, grad=True), c.randn(*shape, grad=True), abar_t.sqrt(), (1 - abar_t).sqrt(),
                abar_s.sqrt(), (1 - abar_s).sqrt()]
        c.check(fastdistill.progressive_distillation_target, args, rtol=c.tol(), grad_rtol=grad_rtol)


def _pd_loss(c: Case) -> None:
    import fastdistill

    for shape in ([(3, 2, 5, 7)] if c.quick else _STEP_SHAPES):
        B = shape[0]
        abar = c.rand(B) * 0.9 + 0.05  # both branches of the max win for some samples
        c.check(fastdistill.pd_loss, [c.randn(*shape, grad=True), c.randn(*shape), c.randn(*shape), c.randn(*shape),
                                      abar.sqrt(), (1 - abar).sqrt()])


_MM_SHAPES = [(1, 1), (3, 7, 5), (2, 3, 17, 13)]  # D = 1, 35, 663


def _mm_grad_rtol(c: Case) -> float:
    """The fused losses write their gradient in the input dtype in the forward pass and backward scales
    it by the upstream gradient (a second rounding); the interpreter truncates fp32 -> bf16."""
    import torch

    return 2.5e-2 if (c.dtype == torch.bfloat16 and c.backend == "triton") else c.tol()


def _mm_schedule(c: Case, B: int) -> list:
    abar_s = c.rand(B) * 0.5 + 0.45
    abar_t = abar_s * (c.rand(B) * 0.8 + 0.1)
    return [abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()]


def _posterior_sample(c: Case) -> None:
    import fastdistill

    for mode in (["ancestral"] if c.quick else ["ancestral", "ddim"]):
        for shape in ([(3, 7, 5)] if c.quick else _MM_SHAPES):
            coefs = _mm_schedule(c, shape[0])
            seed = int(c.randint(0, 2**31 - 1, (1,)).item())

            def fn(z: Any, x: Any) -> Any:
                return fastdistill.posterior_sample(z, x, *coefs, mode=mode, seed=seed)

            c.check(fn, [c.randn(*shape, grad=True), c.randn(*shape, grad=True)])


def _moment_matching_loss(c: Case) -> None:
    import torch

    import fastdistill

    variants = ["cfg"] if c.quick else ["plain", "weighted", "cfg"]
    for variant in variants:
        for shape in ([(2, 3, 17, 13)] if c.quick else _MM_SHAPES):
            B = shape[0]
            xs, xa, xt, xu = c.randn(*shape, grad=True), c.randn(*shape, grad=True), c.randn(*shape), c.randn(*shape)
            w, g = c.rand(B) + 0.5, c.rand(B) * 4 + 1
            kw: dict[str, Any] = {}
            if variant != "plain":
                kw["weight"] = w
            if variant == "cfg":
                kw.update(x_teacher_uncond=xu, guidance_scale=g)
            # The surrogate is a mean of terms of both signs: compare it relative to the terms' scale,
            # 3 mean(|w x_s (x_a - x_t)|), added as a constant to both sides (as the test does).
            col = (B,) + (1,) * (len(shape) - 1)
            wd = kw.get("weight", torch.ones(B, device=c.device)).double().reshape(col)
            td = xu.double() + g.double().reshape(col) * (xt.double() - xu.double()) if variant == "cfg" \
                else xt.double()
            offset = 3 * (wd * xs.double() * (xa.double() - td)).abs().mean().item()

            def fn(xs: Any, xa: Any, xt: Any, kw: dict = kw, offset: float = offset) -> Any:
                return fastdistill.moment_matching_loss(xs, xa, xt, **kw) + offset

            c.check(fn, [xs, xa, xt], grad_rtol=_mm_grad_rtol(c))


def _auxiliary_denoiser_loss(c: Case) -> None:
    import fastdistill

    for teacher_weight in ([0.3] if c.quick else [0.0, 1.0, 0.3]):
        for shape in ([(2, 3, 17, 13)] if c.quick else _MM_SHAPES):
            w = c.rand(shape[0]) + 0.5

            def fn(xa: Any, xs: Any, xt: Any, tw: float = teacher_weight, w: Any = w) -> Any:
                return fastdistill.auxiliary_denoiser_loss(xa, xs, xt, teacher_weight=tw, weight=w)

            c.check(fn, [c.randn(*shape, grad=True), c.randn(*shape, grad=True), c.randn(*shape)],
                    grad_rtol=_mm_grad_rtol(c))


def _moment_statistics(c: Case) -> None:
    import fastdistill

    cases = [((0, 2, 3), False)] if c.quick else [((0, 2, 3), False), ((1, 2, 3), True), (None, False), ((-1,), True)]
    for dims, weighted in cases:
        x = (c.randn(3, 5, 7, 2, dtype=c.dtype) * 2 + 3).detach().requires_grad_()
        # the weight varies along every reduced dim (a weight constant within a reduction has zero gradient)
        w = (c.rand(3, 5, 1, 2) + 0.5).requires_grad_() if weighted else None

        def fn(x: Any, w: Any, dims: Any = dims, corr: int = 0 if weighted else 1) -> Any:
            return fastdistill.moment_statistics(x, dims=dims, weight=w, correction=corr, process_group=None)

        c.check(fn, [x, w])


def _tensor_list(c: Case, shapes: Iterable[tuple[int, ...]], *, dtype: Any = None, positive: bool = False,
                 grad: bool = False) -> list:
    out = []
    for s in shapes:
        t = c.randn(*s, dtype=dtype or c.dtype).detach()
        if positive:
            t = t.abs() + 0.05
        out.append(t.requires_grad_(grad))
    return out


def _mt_shapes(c: Case) -> list[tuple[int, ...]]:
    # empty, single-element, awkward, and (full run) one tensor across the 65536-element chunk boundary
    return [(0,), (1,), (3, 7), (17,), (2, 33, 5)] + ([] if c.quick else [(65536 + 37,), (130, 4)])


def _moment_dot(c: Case) -> None:
    import torch

    import fastdistill

    shapes = _mt_shapes(c)
    a = _tensor_list(c, shapes, grad=True)
    # b correlated with a (terms of one sign): a relative bound on the sum is then meaningful
    b = [(t.detach().float() * (c.rand(*t.shape) + 0.5)).to(c.dtype).requires_grad_() for t in a]
    # fp32 second moments against 16-bit gradients (as optimizers keep them); fp64 stays fp64 throughout
    v = _tensor_list(c, shapes, dtype=torch.float64 if c.dtype == torch.float64 else torch.float32,
                     positive=True, grad=True)

    def fn(a: Any, b: Any, v: Any) -> Any:
        return fastdistill.moment_dot(a, b, v, eps=1e-3)

    # the inputs are exact in fp32: the sum is compared at the accumulation's precision
    c.check(fn, [a, b, v], rtol=1e-5, grad_rtol=c.tol())
    if not c.quick:
        c.check(lambda a, b: fastdistill.moment_dot(a, b), [a, b], rtol=1e-5, grad_rtol=c.tol())


def _preconditioned_perturb_(c: Case) -> None:
    import torch

    import fastdistill

    shapes = _mt_shapes(c)
    p, g = _tensor_list(c, shapes), _tensor_list(c, shapes)
    v = _tensor_list(c, shapes, dtype=torch.float32, positive=True)

    def fn(p: Any, g: Any, v: Any) -> Any:  # in place on copies: the updated copies are the output
        out = [t.clone() for t in p]
        fastdistill.preconditioned_perturb_(out, g, v, step=0.37, eps=1e-4)
        return out

    c.check(fn, [p, g, v])


def _clip_parameters_(c: Case) -> None:
    import fastdistill

    p = _tensor_list(c, _mt_shapes(c))

    def fn(p: Any) -> Any:
        out = [t.clone() for t in p]
        fastdistill.clip_parameters_(out, 0.5)
        return out

    c.check(fn, [p])


def _route(c: Case, B: int, K: int) -> Any:
    import torch

    import fastdistill

    inner = torch.randperm(999, generator=c.gen)[: K - 1] + 1
    bounds = [0] + sorted(inner.tolist()) + [1000]
    return fastdistill.segment_route(c.randint(0, 1000, (B,)), bounds), bounds


def _segment_route(c: Case) -> None:
    import torch

    import fastdistill

    for B, K in ([(67, 5)] if c.quick else [(1, 1), (7, 3), (130, 5), (67, 17)]):
        _, bounds = _route(c, 1, K)
        t = c.randint(0, 1000, (B,))
        # timesteps exactly on a boundary and just below one belong to the right student
        edge = torch.tensor(bounds[:-1] + [b - 1 for b in bounds[1:]], device=c.device)
        m = min(B, edge.numel())
        t[:m] = edge[:m]

        def fn(t: Any, bounds: list = bounds) -> Any:
            return fastdistill.segment_route(t, bounds)

        c.check(fn, [t], rtol=0.0)


def _segment_permute(c: Case) -> None:
    import fastdistill

    for B in ([17] if c.quick else [1, 7, 33]):
        r, _ = _route(c, B, 3)
        args = [c.randn(B, 3, 5, grad=True), c.randn(B, 7, grad=True), c.randn(B, grad=True)]

        def gather(x: Any, y: Any, z: Any, r: Any = r) -> Any:
            return fastdistill.segment_gather(r, x, y, z)

        def scatter(x: Any, y: Any, r: Any = r) -> Any:
            return fastdistill.segment_scatter(r, x, y)

        c.check(gather, args)
        c.check(scatter, args[:2])


def _segment_mse(c: Case) -> None:
    import fastdistill

    cases = [("per_segment", 17, (3, 5, 7))] if c.quick else [
        (red, B, s) for red in ("per_segment", "mean") for B, s in [(1, (3,)), (17, (3, 5, 7)), (33, (4, 3))]]
    for reduction, B, shape in cases:
        # segment 3 of 4 is left empty on purpose: its loss is 0 and no sample gets its gradient
        r = fastdistill.segment_route(c.randint(0, 750, (B,)), [0, 250, 500, 750, 1000])
        weight = c.rand(B) + 0.5

        def fn(p: Any, q: Any, r: Any = r, w: Any = weight, red: str = reduction) -> Any:
            return fastdistill.segment_mse(p, q, r, reduction=red, weight=w, process_group=None)

        c.check(fn, [c.randn(B, *shape, grad=True), c.randn(B, *shape, grad=True)])


#: The selftest case of every public op, by dispatch name. A registered op without an entry here is
#: reported as a failure (and fails tests/test_selftest.py), so a new op cannot slip through.
CASES: dict[str, Spec] = {
    "relational_kl": Spec(_relational_kl),
    "fused_rdd_loss": Spec(_fused_rdd_loss),
    "memory_p2p_loss": Spec(_memory_p2p_loss),
    "rcfd_loss": Spec(_rcfd_loss),
    "attention_kl": Spec(_attention_kl),
    "fused_attention": Spec(_fused_attention),
    "gradient_penalty": Spec(_gradient_penalty, note="gan_interpolate and gradient_norm_penalty"),
    "adversarial_losses": Spec(_adversarial_losses),
    "boot_loss": Spec(_boot_loss),
    "ddim_step": Spec(_ddim_step),
    "progressive_distillation_target": Spec(_pd_target),
    "pd_loss": Spec(_pd_loss),
    "posterior_sample": Spec(_posterior_sample),
    "moment_matching_loss": Spec(_moment_matching_loss),
    "auxiliary_denoiser_loss": Spec(_auxiliary_denoiser_loss),
    "moment_statistics": Spec(_moment_statistics),
    "moment_dot": Spec(_moment_dot),
    "preconditioned_perturb_": Spec(_preconditioned_perturb_),
    "clip_parameters_": Spec(_clip_parameters_),
    "segment_route": Spec(_segment_route, dtypes=("int64",), note="integer timesteps; outputs compared exactly"),
    "segment_permute": Spec(_segment_permute, note="segment_gather and segment_scatter"),
    "segment_mse": Spec(_segment_mse),
}


# ----------------------------------------------------------------------------------------------
# Running


def prepare_device(device: str | None) -> str:
    """Resolve ``device`` (None: cuda when available) and, for ``cpu``, switch Triton's interpreter on.

    ``TRITON_INTERPRET`` is read when triton is first imported, so it is set here only when it is not
    set already and triton is not imported yet; the returned device is ``"cpu"`` or ``"cuda"``.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"selftest: device must be 'cpu' or 'cuda', got {device!r}")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def missing_cases() -> list[str]:
    """Registered ops that have no selftest case (should be empty)."""
    from . import dispatch, nn  # noqa: F401  (importing fastdistill.nn registers every op)

    return sorted(set(dispatch.registered_ops()) - set(CASES))


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def run(device: str, *, quick: bool = False, ops: Sequence[str] | None = None,
        on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run the selftest on ``device`` ("cpu"/"cuda"; see :func:`prepare_device`) and return its rows.

    ``ops`` restricts it to those op names (unknown names raise ValueError); ``on_row`` is called
    with each row as soon as it is finished (for live printing).
    """
    import torch

    from . import dispatch, nn  # noqa: F401

    registered = dispatch.registered_ops()
    names = sorted(registered)
    if ops is not None:
        unknown = sorted(set(ops) - set(registered))
        if unknown:
            raise ValueError(f"selftest: unknown op(s) {', '.join(unknown)}; registered: {', '.join(names)}")
        names = [n for n in names if n in set(ops)]
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("selftest: --device cuda but no CUDA GPU is visible")
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for name in names:
        spec = CASES.get(name)
        if spec is None:
            emit(Row(name, "-", "-", device, False, math.nan, math.nan, 0.0, 0,
                     "no selftest case for this op: add one to fastdistill.selftest.CASES"))
            continue
        backends = dispatch.available_backends(name, device)
        for backend in backends:
            for dtype_name in spec.dtypes:
                emit(_run_one(name, spec, backend, dtype_name, device, quick))
    return rows


def _run_one(name: str, spec: Spec, backend: str, dtype_name: str, device: str, quick: bool) -> Row:
    import torch

    case = Case(name, backend, _dtype(dtype_name), torch.device(device), quick)
    error = None
    t0 = time.perf_counter()
    try:
        spec.build(case)
    except _Failed as exc:
        error = str(exc)
    except Exception as exc:  # a crash is a failure of this row, not of the whole selftest
        error = f"{type(exc).__name__}: {exc}"
    if device == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as exc:  # an asynchronous CUDA error surfaces here
            error = error or f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    if case.errors:
        err, tol = max(case.errors, key=lambda e: _ratio(*e))
    else:
        err = tol = math.nan
    passed = error is None and bool(case.errors)
    if error is None and not case.errors:
        error = "the case compared nothing"
    return Row(name, backend, dtype_name, device, passed, err, tol, seconds, len(case.errors), error)


def _ratio(err: float, tol: float) -> float:
    """error / tolerance (how close a comparison came to failing; > 1 failed)."""
    if err != err:
        return math.nan
    if tol > 0:
        return err / tol
    return math.inf if err > 0 else 0.0


def _fmt(x: float) -> str:
    if x != x:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def format_row(row: Row) -> str:
    status = "ok" if row.passed else "FAIL"
    ratio = _ratio(row.max_rel_error, row.tolerance)
    ratio_s = "-" if ratio != ratio else ("inf" if ratio == math.inf else f"{ratio:.2f}")
    return (f"{row.op:<32} {row.backend:<10} {row.dtype:<9} {_fmt(row.max_rel_error):>9} {_fmt(row.tolerance):>9} "
            f"{ratio_s:>7} {status:<5} {row.seconds:>7.2f}s")


def header() -> str:
    """Column titles: rel err and tol are those of the row's comparison closest to its bound."""
    return (f"{'op':<32} {'backend':<10} {'dtype':<9} {'rel err':>9} {'tol':>9} {'err/tol':>7} {'':<5} "
            f"{'time':>8}\n" + "-" * 96)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as the text table ``fastdistill selftest`` prints (failures listed below it)."""
    lines = [header()] + [format_row(r) for r in rows]
    lines.append(summary(rows))
    for r in rows:
        if not r.passed:
            lines.append(f"FAIL {r.op} [{r.backend}, {r.dtype}]: {r.error}")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    failed = sum(not r.passed for r in rows)
    return f"{len(rows) - failed} passed, {failed} failed, {len(rows)} rows in {sum(r.seconds for r in rows):.1f}s"


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, for the JSON report."""
    import platform

    import torch

    import fastdistill
    from . import _extension, _triton

    env: dict[str, Any] = {
        "fastdistill": fastdistill.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "triton": _triton.version(), "triton_interpret": _triton.interpret_mode(), "device": device,
        "extension_loaded": _extension.is_loaded(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    return env


def main_args(args: Any) -> int:
    """Run ``fastdistill selftest`` for parsed arguments (see :func:`fastdistill.cli.main`)."""
    device = prepare_device(args.device)
    from . import testing

    if args.seed is not None:
        os.environ["FASTDISTILL_TEST_SEED"] = str(args.seed)
    seed = testing.start_test_seed()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    from . import _triton

    if device == "cpu":
        interp = (" (Triton kernels through the interpreter)" if _triton.interpret_mode()
                  else " (Triton kernels not tested: TRITON_INTERPRET is not 1)")
    else:
        interp = " (Triton kernels not tested: TRITON_INTERPRET=1 runs them on CPU only)" \
            if _triton.interpret_mode() else ""
    # `--json` without a path writes the JSON to stdout, so the table goes to stderr then.
    out = sys.stderr if args.json == "-" else sys.stdout
    out.write(f"fastdistill selftest on {device}{interp}{', quick' if args.quick else ''}; "
              f"seed {seed} (replay with --seed {seed})\n")
    out.write(header() + "\n")
    out.flush()

    def live(row: Row) -> None:
        out.write(format_row(row) + "\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        rows = run(device, quick=args.quick, ops=ops, on_row=live)
    except ValueError as exc:
        sys.stderr.write(f"fastdistill selftest: error: {exc}\n")
        return 2
    wall = time.perf_counter() - t0
    out.write(summary(rows) + f" (wall {wall:.1f}s)\n")
    for r in rows:
        if not r.passed:
            out.write(f"FAIL {r.op} [{r.backend}, {r.dtype}]: {r.error}\n")
    if args.json is not None:
        payload = {"environment": environment(device), "seed": seed, "quick": bool(args.quick),
                   "passed": sum(r.passed for r in rows), "failed": sum(not r.passed for r in rows),
                   "seconds": wall, "rows": [_json_row(r) for r in rows]}
        text = json.dumps(payload, indent=1)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                f.write(text + "\n")
            out.write(f"wrote {args.json}\n")
    return 0 if rows and all(r.passed for r in rows) else 1


def _json_row(r: Row) -> dict[str, Any]:
    d = asdict(r)
    d["error_over_tolerance"] = _ratio(r.max_rel_error, r.tolerance)
    for k in ("max_rel_error", "tolerance", "error_over_tolerance"):
        if d[k] != d[k] or d[k] in (math.inf, -math.inf):
            d[k] = None if d[k] != d[k] else str(d[k])
    return d
