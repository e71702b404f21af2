"""Autocast like torch's own ops (issue 14, item 3; policy in fastdistill/ops/_common.py).

Every registered op runs the same call under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
fp32 inputs on each backend that runs CPU tensors here (``triton`` under the interpreter, ``cpp``,
``reference``): the outputs and the input gradients must have the same dtypes and the same values (to
the bf16 tolerance) on every backend. Plus: ``fused_attention`` matches SDPA under autocast (mixed
q/k/v dtypes too), the relational ops under autocast equal the same call on bf16-cast inputs, and no
op body (reference math, custom op forward or backward) sees the caller's autocast.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import dispatch, testing
from fastdistill.ops import _common
from fastdistill.ops import attention as attention_ops
from fastdistill.ops import relational_kl as rkl_ops

BF16 = torch.bfloat16
TOL = testing.tolerance(BF16)
#: Tolerances where both backends emit bf16 values: the GEMM ops' gradients come out of their backward
#: kernels in the (cast) inputs' bf16 and are rounded at different points by the two backends (1-3 bf16
#: ulps; the relational ops' pixel normalisation adds the cancelling ``dy - y <y, dy>``); tests/test_rdd.py
#: and tests/test_attention.py allow 2e-2 to 5e-2 there. fused_attention's output is bf16 itself.
GRAD_TOL = {op: 3 * TOL for op in ("relational_kl", "fused_rdd_loss", "memory_p2p_loss", "attention_kl",
                                   "fused_attention")}
OUT_TOL = {"fused_attention": 2 * TOL}


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _r(*shape: int, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    return testing.randn(*shape, scale=scale, requires_grad=grad)


def _coefs(B: int) -> tuple[torch.Tensor, ...]:
    a_t, a_s = torch.full((B,), 0.6), torch.full((B,), 0.8)
    return a_t, (1 - a_t ** 2).sqrt(), a_s, (1 - a_s ** 2).sqrt()


# ----------------------------------------------------------------------------------------------
# One case per registered op: (fn, inputs). ``fn(*inputs)`` runs the op; inputs that require grad
# get their gradients compared. In-place ops clone their inputs inside ``fn``.

Case = tuple[Callable[..., Any], list[torch.Tensor]]
_BOUNDS = (0, 10, 20, 30)


def _case_relational_kl() -> Case:
    ins = [_r(2, 6, 8, grad=True), _r(2, 10, 8, grad=True), _r(2, 6, 4), _r(2, 10, 4)]
    return (lambda a, b, c, d: fastdistill.relational_kl(a, b, c, d, temperature=0.5, segment_size=5)), ins


def _case_fused_rdd_loss() -> Case:
    return (lambda s, t: fastdistill.fused_rdd_loss(s, t, temperature=0.3)), [_r(2, 8, 3, 3, grad=True),
                                                                             _r(2, 5, 3, 3)]


def _case_memory_p2p_loss() -> Case:
    bank = F.normalize(_r(20, 8), dim=1)
    index = torch.tensor([0, 3, 7, 19, 11])
    return (lambda s, t, b: fastdistill.memory_p2p_loss(s, t, b, index=index)), [_r(2, 8, 3, 3, grad=True),
                                                                                 _r(2, 8, 3, 3), bank]


def _case_rcfd_loss() -> Case:
    return (lambda s, t: fastdistill.rcfd_loss(s, t)), [_r(4, 10, grad=True, scale=3), _r(4, 10, scale=3)]


def _case_attention_kl() -> Case:
    ins = [_r(1, 2, 5, 8, grad=True), _r(1, 2, 7, 8, grad=True), _r(1, 2, 5, 16), _r(1, 2, 7, 16)]
    return (lambda a, b, c, d: fastdistill.attention_kl(a, b, c, d)), ins


def _case_fused_attention() -> Case:
    ins = [_r(1, 2, 5, 16, grad=True), _r(1, 2, 7, 16, grad=True), _r(1, 2, 7, 16, grad=True)]
    mask = torch.zeros(1, 1, 5, 7)
    mask[..., 0, 2] = -1.5
    return (lambda q, k, v: fastdistill.fused_attention(q, k, v, attn_mask=mask)), ins


def _case_posterior_sample() -> Case:
    return (lambda z, x: fastdistill.posterior_sample(z, x, *_coefs(3), seed=7)), [_r(3, 5, grad=True),
                                                                                  _r(3, 5, grad=True)]


def _case_moment_matching_loss() -> Case:
    return (lambda x, xa, xt: fastdistill.moment_matching_loss(x, xa, xt)), [_r(3, 5, grad=True), _r(3, 5),
                                                                             _r(3, 5)]


def _case_auxiliary_denoiser_loss() -> Case:
    return (lambda xa, x, xt: fastdistill.auxiliary_denoiser_loss(xa, x, xt)), [_r(3, 5, grad=True), _r(3, 5),
                                                                                _r(3, 5)]


def _case_moment_statistics() -> Case:
    return (lambda x: tuple(fastdistill.moment_statistics(x, dims=(0, 2)))), [_r(2, 3, 4, grad=True)]


def _case_moment_dot() -> Case:
    ins = [_r(5, grad=True), _r(2, 3, grad=True), _r(5, grad=True), _r(2, 3, grad=True),
           torch.rand(5), torch.rand(2, 3)]
    return (lambda a0, a1, b0, b1, v0, v1: fastdistill.moment_dot([a0, a1], [b0, b1], [v0, v1])), ins


def _case_preconditioned_perturb_() -> Case:
    def run(p0, p1, g0, g1, v0, v1):
        p = [p0.clone(), p1.clone()]
        fastdistill.preconditioned_perturb_(p, [g0, g1], [v0, v1], step=0.1)
        return p
    return run, [_r(5), _r(2, 3), _r(5), _r(2, 3), torch.rand(5), torch.rand(2, 3)]


def _case_clip_parameters_() -> Case:
    def run(p0, p1):
        p = [p0.clone(), p1.clone()]
        fastdistill.clip_parameters_(p, 0.5)
        return p
    return run, [_r(5), _r(2, 3)]


def _case_segment_route() -> Case:
    return (lambda t: fastdistill.segment_route(t, _BOUNDS)), [torch.tensor([3, 25, 11, 0, 29, 14])]


def _case_segment_permute() -> Case:
    routing = fastdistill.segment_route(torch.tensor([3, 25, 11, 0, 29, 14]), _BOUNDS)

    def run(x):
        y = fastdistill.segment_gather(routing, x)
        return fastdistill.segment_scatter(routing, y * 2)
    return run, [_r(6, 4, grad=True)]


def _case_segment_mse() -> Case:
    routing = fastdistill.segment_route(torch.tensor([3, 25, 11, 0, 29, 14]), _BOUNDS)
    return (lambda p, t: fastdistill.segment_mse(p, t, routing)), [_r(6, 4, grad=True), _r(6, 4)]


def _case_ddim_step() -> Case:
    ac = torch.linspace(0.99, 0.1, 20)
    t, p = torch.tensor([5, 10, 19]), torch.tensor([0, 5, -1])
    return (lambda x, m: tuple(fastdistill.ddim_step(x, m, t, p, ac))), [_r(3, 4, grad=True), _r(3, 4, grad=True)]


def _case_progressive_distillation_target() -> Case:
    return ((lambda z, zt: tuple(fastdistill.progressive_distillation_target(z, zt, *_coefs(3)))),
            [_r(3, 4, grad=True), _r(3, 4, grad=True)])


def _case_pd_loss() -> Case:
    a_t, s_t, _, _ = _coefs(3)
    return ((lambda xs, xt, et, z: fastdistill.pd_loss(xs, xt, et, z, a_t, s_t)),
            [_r(3, 4, grad=True), _r(3, 4), _r(3, 4), _r(3, 4)])


def _case_gradient_penalty() -> Case:
    # The discriminator is the caller's code: it runs under the caller's autocast (its Linear in bf16),
    # the op's own math (interpolation, norm penalty) does not.
    torch.manual_seed(testing.new_seed())
    D = nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Tanh(), nn.Linear(1, 1))
    alpha = torch.rand(3)
    return ((lambda real, fake: fastdistill.gradient_penalty(D, real, fake, alpha=alpha)),
            [_r(3, 3, 4, grad=True), _r(3, 3, 4, grad=True)])


def _case_adversarial_losses() -> Case:
    return (lambda r, f: tuple(fastdistill.adversarial_losses(r, f))), [_r(4, 1, grad=True), _r(4, 1, grad=True)]


def _case_boot_loss() -> Case:
    a_t, s_t, a_s, s_s = _coefs(3)
    return ((lambda y_s, y_t, f, x_t: fastdistill.boot_loss(y_s, y_t, f, x_t=x_t, alpha_t=a_t, sigma_t=s_t,
                                                            alpha_s=a_s, sigma_s=s_s)),
            [_r(3, 4, grad=True), _r(3, 4), _r(3, 4), _r(3, 4)])


OP_CASES: dict[str, Callable[[], Case]] = {
    name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")
}


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if out is None:
        return []
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def _run(op: str, backend: str, case: Case, *, autocast: bool = True, grads_under_autocast: bool = False
         ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs and input gradients of the case on ``backend`` (fresh leaves, a fixed upstream gradient)."""
    fn, inputs = case
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    ctx = _autocast() if autocast else torch.autocast("cpu", enabled=False)
    with dispatch.use_backend(backend), dispatch.record_backends() as seen:
        with ctx:
            outs = _flat(fn(*leaves))
        assert (op, backend) in seen, f"{op} did not run on {backend}: {seen}"
        wrt = [x for x in leaves if x.requires_grad]
        diff = [o for o in outs if o.requires_grad]
        grads: list[torch.Tensor | None] = []
        if wrt:
            assert diff, f"{op}: inputs require grad but no output does"
            gen = torch.Generator().manual_seed(1234)
            upstream = [(torch.rand(o.shape, generator=gen) + 0.5).to(o.dtype) for o in diff]
            with (_autocast() if grads_under_autocast else torch.autocast("cpu", enabled=False)):
                grads = list(torch.autograd.grad(diff, wrt, upstream, allow_unused=True))
    return outs, grads


def _compare(what: str, got: list, want: list, rtol: float) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} tensors vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None or g is None:
            assert g is None and w is None or (g if w is None else w).abs().max().item() == 0, \
                f"{what}[{i}]: a gradient on one backend only"
            continue
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} vs the reference's {w.dtype}"
        if g.dtype.is_floating_point:
            testing.assert_close(g, w, rtol=rtol, name=f"{what}[{i}]")
        else:
            assert torch.equal(g, w), f"{what}[{i}]: integer values differ"


def test_every_registered_op_has_an_autocast_case():
    missing = sorted(set(dispatch.registered_ops()) - set(OP_CASES))
    assert not missing, f"ops without an autocast case in tests/test_autocast.py: {missing}"
    extra = sorted(set(OP_CASES) - set(dispatch.registered_ops()))
    assert not extra, f"autocast cases for unknown ops: {extra}"


def _backend_params() -> list:
    params = []
    for op in sorted(dispatch.registered_ops()):
        for case in testing.backend_device_cases(op):
            if case.device == "cpu" and case.backend != "reference":
                params.append(pytest.param(op, case.backend, id=f"{op}-{case.id}", marks=case.marks()))
    return params


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,backend", _backend_params())
def test_same_dtype_and_numbers_on_every_backend_under_autocast(op, backend, dtype):
    fn, inputs = OP_CASES[op]()
    if dtype != torch.float32:  # inputs already in the autocast dtype: nothing to cast, bodies still shielded
        inputs = [x.detach().to(dtype).requires_grad_(x.requires_grad) if x.is_floating_point() else x
                  for x in inputs]
    case = (fn, inputs)
    ref_outs, ref_grads = _run(op, "reference", case)
    outs, grads = _run(op, backend, case)
    _compare(f"{op} output ({backend} vs reference, autocast bf16)", outs, ref_outs, OUT_TOL.get(op, TOL))
    _compare(f"{op} grad ({backend} vs reference, autocast bf16)", grads, ref_grads, GRAD_TOL.get(op, TOL))


def test_ops_with_a_reference_only_run_under_autocast():
    """An op whose only backend is the reference still has its case run (the parametrised test above
    compares fast backends with it): under autocast it gives the dtypes it gives outside."""
    for op, spec in sorted(dispatch.registered_ops().items()):
        if spec.backends != ("reference",):
            continue
        case = OP_CASES[op]()
        outs, _ = _run(op, "reference", case)
        plain, _ = _run(op, "reference", case, autocast=False)
        assert [o.dtype for o in outs] == [o.dtype for o in plain], op


RELATIONAL = ("relational_kl", "fused_rdd_loss", "memory_p2p_loss", "attention_kl")


@pytest.mark.parametrize("op", RELATIONAL)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_relational_ops_under_autocast_equal_bf16_inputs(op, backend):
    """Like ``matmul``: under autocast the op equals the same call on bf16-cast GEMM operands outside
    autocast (fp32 loss, gradients in the inputs' fp32), on the reference (issue 14: it ran its GEMMs in
    bf16 output precision under the caller's autocast) and on Triton."""
    fn, inputs = OP_CASES[op]()
    outs, grads = _run(op, backend, (fn, inputs))
    cast = [x.detach().to(BF16).requires_grad_(x.requires_grad) for x in inputs]
    want, want_grads = _run(op, backend, (fn, cast), autocast=False)
    assert [o.dtype for o in outs] == [torch.float32] * len(outs)
    _compare(f"{op} output", outs, want, testing.tolerance(torch.float32))
    assert all(g.dtype == torch.float32 for g in grads)
    _compare(f"{op} grad", grads, [g.float() for g in want_grads], testing.tolerance(torch.float32))


def test_fused_rdd_loss_reference_backward_under_autocast_matches_triton():
    """Backward called inside the autocast block: the custom op's backward body is shielded too."""
    case = OP_CASES["fused_rdd_loss"]()
    ref = _run("fused_rdd_loss", "reference", case, grads_under_autocast=True)
    tri = _run("fused_rdd_loss", "triton", case, grads_under_autocast=True)
    _compare("grad", tri[1], ref[1], GRAD_TOL["fused_rdd_loss"])
    plain = _run("fused_rdd_loss", "reference", case)
    _compare("grad (backward outside autocast)", ref[1], plain[1], testing.tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_attention_matches_sdpa_under_autocast(backend, with_mask):
    q, k, v = _r(2, 3, 9, 16, grad=True), _r(2, 3, 11, 16, grad=True), _r(2, 3, 11, 16, grad=True)
    mask = _r(2, 1, 9, 11) if with_mask else None
    up = torch.rand(2, 3, 9, 16) + 0.5
    with dispatch.use_backend(backend), _autocast():
        out = fastdistill.fused_attention(q, k, v, attn_mask=mask)
    got = torch.autograd.grad(out, (q, k, v), up.to(out.dtype))
    with _autocast():
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    wanted = torch.autograd.grad(want, (q, k, v), up.to(want.dtype))
    assert out.dtype == want.dtype == BF16
    testing.assert_close(out, want, rtol=OUT_TOL["fused_attention"],
                         name=f"fused_attention vs SDPA ({backend}, autocast)")
    for name, g, w in zip("qkv", got, wanted):
        assert g.dtype == w.dtype == torch.float32, name
        testing.assert_close(g, w, rtol=GRAD_TOL["fused_attention"], name=f"d{name} vs SDPA ({backend}, autocast)")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_attention_mixed_dtypes_under_autocast(backend):
    q, k, v = _r(1, 2, 5, 8).to(BF16), _r(1, 2, 7, 8), _r(1, 2, 7, 8).half()
    with _autocast():
        want = F.scaled_dot_product_attention(q, k, v)
        with dispatch.use_backend(backend):
            out = fastdistill.fused_attention(q, k, v)
    assert out.dtype == want.dtype == BF16
    testing.assert_close(out, want, rtol=OUT_TOL["fused_attention"], name=f"mixed dtypes ({backend})")
    with pytest.raises(TypeError, match="share one dtype"):  # outside autocast: an error, as in SDPA
        fastdistill.fused_attention(q, k, v)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)


def test_fp64_inputs_are_not_cast():
    """Autocast casts only fp32/fp16/bf16 (as for ``matmul``): fp64 stays fp64 and equals the plain call."""
    fn, inputs = OP_CASES["relational_kl"]()
    inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    outs, grads = _run("relational_kl", "reference", (fn, inputs))
    plain, plain_grads = _run("relational_kl", "reference", (fn, inputs), autocast=False)
    _compare("fp64 output", outs, plain, testing.tolerance(torch.float64))
    _compare("fp64 grad", grads, plain_grads, testing.tolerance(torch.float64))
    with _autocast():
        q = _r(1, 1, 4, 8).double()
        assert fastdistill.fused_attention(q, q, q).dtype == torch.float64


def test_op_bodies_do_not_see_the_callers_autocast(monkeypatch):
    seen: list[tuple[str, bool]] = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            seen.append((name, torch.is_autocast_enabled("cpu")))
            return fn(*args, **kwargs)
        return wrapper

    def recording_chunk(fn):  # the reference's per-chunk math: in the forward, and recomputed in the backward
        def wrapper(*args, **kwargs):
            phase = "fwd" if torch._C._current_graph_task_id() == -1 else "bwd recompute"
            seen.append((f"relational_kl_reference {phase}", torch.is_autocast_enabled("cpu")))
            return fn(*args, **kwargs)
        return wrapper

    def recording_bmm_backward(fn):  # the reference's backward GEMMs, run by the engine under the caller's
        def wrapper(ctx, g):         # autocast: their fp32 operands must give fp32 (not bf16) products
            out = fn(ctx, g)
            seen.append(("relational_kl_reference bwd gemm", any(o is not None and o.dtype != torch.float32
                                                                  for o in out)))
            return out
        return wrapper

    monkeypatch.setattr(rkl_ops, "_ref_chunk_kl", recording_chunk(rkl_ops._ref_chunk_kl))
    monkeypatch.setattr(rkl_ops._ShieldedBmmNT, "backward",
                        staticmethod(recording_bmm_backward(rkl_ops._ShieldedBmmNT.backward)))
    monkeypatch.setattr(attention_ops, "attention_reference",
                        recording("attention_reference", attention_ops.attention_reference))
    s = _r(2, 4, 3, 3, grad=True)
    q = _r(1, 2, 5, 8, grad=True)
    with dispatch.use_backend("reference"), _autocast():
        assert torch.is_autocast_enabled("cpu")
        loss = fastdistill.fused_rdd_loss(s, _r(2, 4, 3, 3)) + fastdistill.attention_kl(q, q, q, q)
        loss.backward()  # inside the autocast block: the backward bodies are shielded too
        fastdistill.fused_attention(q, q, q).sum().backward()
        assert torch.is_autocast_enabled("cpu")  # the caller's state is restored
    names = {name for name, _ in seen}
    assert names == {"relational_kl_reference fwd", "relational_kl_reference bwd recompute",
                     "relational_kl_reference bwd gemm",
                     "attention_reference"}, names
    assert not any(enabled for _, enabled in seen), seen


#: The autocast policy of every public op function (fastdistill/ops/_common.py). ``gradient_penalty`` has
#: none of its own on purpose: the caller's discriminator runs under the caller's autocast; its own math
#: (``gan_interpolate``, ``gradient_norm_penalty``) is shielded.
POLICIES = {
    "relational_kl": "lower", "fused_rdd_loss": "lower", "memory_p2p_loss": "lower", "attention_kl": "lower",
    "fused_attention": "lower", "rcfd_loss": "fp32",
    **{name: "none" for name in (
        "ddim_step", "progressive_distillation_target", "pd_loss", "posterior_sample", "moment_matching_loss",
        "auxiliary_denoiser_loss", "moment_statistics", "boot_loss", "adversarial_losses", "moment_dot",
        "preconditioned_perturb_", "clip_parameters_", "segment_route", "segment_gather", "segment_scatter",
        "segment_mse")},
}


def test_every_public_op_declares_an_autocast_policy():
    from fastdistill.ops import adversarial

    funcs = {name: getattr(fastdistill, name) for name in POLICIES}
    funcs.update(gan_interpolate=adversarial.gan_interpolate, gradient_norm_penalty=adversarial.gradient_norm_penalty)
    want = {**POLICIES, "gan_interpolate": "none", "gradient_norm_penalty": "none"}
    for name, fn in funcs.items():
        policy = getattr(fn, "__autocast_policy__", None)
        assert policy is not None and policy[0] == want[name], (name, policy)
    assert not hasattr(fastdistill.gradient_penalty, "__autocast_policy__")


def test_tensors_autocast_does_not_know_pass_through():
    """Meta tensors (no autocast for them) reach the op's own validation unchanged."""
    assert _common.autocast_device_type(torch.ones(2, device="meta")) is None
    with _autocast(), pytest.raises(ValueError, match="same device"):
        fastdistill.relational_kl(torch.ones(3, 4, device="meta"), *(torch.ones(3, 4) for _ in range(3)))


def test_autocast_op_rejects_bad_declarations():
    with pytest.raises(ValueError, match="policy"):
        _common.autocast_op("bf16")
    with pytest.raises(ValueError, match="no parameter"):
        _common.autocast_op("lower", "y")(lambda x: x)
    with pytest.raises(ValueError, match="casts nothing"):
        _common.autocast_op("none", "x")


def test_autocast_ops_compile_fullgraph_inductor():
    """The cast-and-shield wrapper traces: a compiled step under autocast equals eager (dtypes, values)."""
    s, t = _r(2, 8, 3, 3, grad=True), _r(2, 8, 3, 3)
    q = _r(1, 2, 5, 16, grad=True)

    def step(s, t, q):
        with _autocast():
            return fastdistill.fused_rdd_loss(s, t), fastdistill.fused_attention(q, q, q)

    torch._dynamo.reset()
    eager = step(s, t, q)
    compiled = torch.compile(step, fullgraph=True)(s, t, q)
    assert [o.dtype for o in compiled] == [o.dtype for o in eager] == [torch.float32, BF16]
    # bf16 tolerance: inductor fuses the bf16 casts of the normalised pixels without emulating their
    # rounding (torch._inductor.config.emulate_precision_casts is off by default).
    testing.assert_close(compiled[0], eager[0], rtol=TOL, name="rdd loss")
    testing.assert_close(compiled[1], eager[1], rtol=OUT_TOL["fused_attention"], name="attention")
