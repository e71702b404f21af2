"""Every public op and nn module under ``torch.compile(fullgraph=True)`` with the DEFAULT backend
(inductor), forward and backward, against eager, on small CPU tensors.

The other compile tests use ``backend="aot_eager"``, which never lowers a graph and hid three failures
(posterior_sample's unrolled Philox rounds took inductor over 500 s; gradient_penalty's
``autograd.grad``; MultiStudent's host-read routing offsets). Default dispatch on CPU: the reference
and C++ backends (Triton runs only in its interpreter there, which inductor cannot trace; the Triton
paths are opaque custom ops with fake kernels, covered by the aot_eager tests of each op).

Several ops share one compiled function (one inductor compile per case keeps the file within a few
minutes on two cores). Each case declares the dispatch ops it covers; the eager run records the ops
that really ran (``dispatch.record_backends``) and :func:`test_every_registered_op_has_a_compile_case`
fails when a registered op has no case.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import fastdistill
from fastdistill import dispatch
from fastdistill.ops.adversarial import gan_interpolate, gradient_norm_penalty

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-4, 1e-5
#: The ops each case covers (checked against what its eager run dispatched).
CASE_OPS: dict[str, set[str]] = {
    "relational_and_attention": {"relational_kl", "fused_rdd_loss", "memory_p2p_loss", "rcfd_loss", "attention_kl",
                                 "fused_attention"},
    "moment_matching": {"posterior_sample", "moment_matching_loss", "auxiliary_denoiser_loss", "moment_statistics",
                        "moment_dot", "preconditioned_perturb_", "clip_parameters_"},
    "routing_and_steps": {"segment_route", "segment_permute", "segment_mse", "ddim_step",
                          "progressive_distillation_target", "pd_loss", "boot_loss", "adversarial_losses",
                          "gradient_penalty"},
}
COMPILE_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_compile_seconds():
    """Prints each case's eager-vs-compiled wall time (compile included) at the end (``pytest -s``)."""
    yield
    print("\ninductor compile+run seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in COMPILE_SECONDS.items()))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, gen: torch.Generator, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _objective(out: Any) -> torch.Tensor:
    """A fixed random projection of every floating output (so permutations and scales are checked)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, x in enumerate(_leaves(out)):
        if x.is_floating_point() and x.requires_grad:
            w = torch.randn(x.shape, generator=_gen(100 + i), dtype=torch.float64)
            total = total + (x.double() * w).sum()
    return total


def _close(got: Any, want: Any, what: str) -> None:
    g, w = _leaves(got), _leaves(want)
    assert len(g) == len(w), f"{what}: {len(g)} outputs compiled, {len(w)} eager"
    for i, (a, b) in enumerate(zip(g, w)):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}[{i}]: {m}")
        else:
            assert torch.equal(a, b), f"{what}[{i}]: integer output differs"


def compare(name: str, fn: Callable[..., Any], make_inputs: Callable[[], tuple], wrt: Callable[[tuple], Sequence],
            *, fullgraph: bool = True) -> set[str]:
    """Run ``fn`` eagerly and compiled (default backend) on fresh copies of the inputs; compare the
    outputs, the gradients of :func:`_objective` w.r.t. ``wrt(inputs)`` and the inputs themselves
    (in-place ops). Returns the dispatch ops the eager run selected."""
    torch._dynamo.reset()
    eager_in = make_inputs()
    with dispatch.record_backends() as seen:
        want = fn(*eager_in)
    want_grads = _grads(want, wrt(eager_in))
    comp_in = make_inputs()
    start = time.perf_counter()
    got = torch.compile(fn, fullgraph=fullgraph)(*comp_in)
    got_grads = _grads(got, wrt(comp_in))
    COMPILE_SECONDS[name] = time.perf_counter() - start
    _close(got, want, f"{name} outputs")
    _close(got_grads, want_grads, f"{name} grads")
    _close(comp_in, eager_in, f"{name} inputs after the call")
    return {op for op, _ in seen}


def _grads(out: Any, wrt: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    wrt = list(wrt)
    if not wrt:
        return []
    grads = torch.autograd.grad(_objective(out), wrt, allow_unused=True)
    return [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, wrt)]


# ---------------------------------------------------------------------------------------------- ops

def _relational_inputs() -> tuple:
    g = _gen(1)
    q_s, k_s = _randn(2, 5, 6, gen=g, grad=True), _randn(2, 8, 6, gen=g, grad=True)
    q_t, k_t = _randn(2, 5, 4, gen=g), _randn(2, 8, 4, gen=g)
    fs, ft = _randn(2, 4, 3, 3, gen=g, grad=True), _randn(2, 4, 3, 3, gen=g)
    bank = torch.nn.functional.normalize(_randn(10, 4, gen=g), dim=1)
    logits_s, logits_t = _randn(3, 7, gen=g, grad=True), _randn(3, 7, gen=g)
    qa, ka, va = (_randn(1, 2, 5, 8, gen=g, grad=True) for _ in range(3))
    mask = torch.randn(1, 1, 5, 5, generator=g)
    mask[..., 0, 4] = float("-inf")
    return q_s, k_s, q_t, k_t, fs, ft, bank, logits_s, logits_t, qa, ka, va, mask


def _relational(q_s, k_s, q_t, k_t, fs, ft, bank, logits_s, logits_t, qa, ka, va, mask):
    index = torch.tensor([0, 3, 4, 9])
    h_s, h_t = q_s.unsqueeze(1), q_t.unsqueeze(1)
    return (fastdistill.relational_kl(q_s, k_s, q_t, k_t, temperature=0.5, segment_size=4, normalize=True),
            fastdistill.fused_rdd_loss(fs, ft, temperature=0.7),
            fastdistill.memory_p2p_loss(fs, ft, bank, index=index, check_index=False),
            fastdistill.rcfd_loss(logits_s, logits_t),
            fastdistill.attention_kl(h_s, k_s.unsqueeze(1), h_t, k_t.unsqueeze(1)),
            fastdistill.fused_attention(qa, ka, va, attn_mask=mask))


def _mm_inputs() -> tuple:
    g = _gen(2)
    z, x = _randn(2, 3, 5, gen=g, grad=True), _randn(2, 3, 5, gen=g, grad=True)
    xa, xt, xu = _randn(2, 3, 5, gen=g, grad=True), _randn(2, 3, 5, gen=g), _randn(2, 3, 5, gen=g)
    w = torch.rand(2, 3, 1, generator=g).requires_grad_(True)
    params = [_randn(4, 3, gen=g), _randn(5, gen=g)]
    grads = [_randn(4, 3, gen=g), _randn(5, gen=g)]
    precond = [torch.rand(4, 3, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1]
    return z, x, xa, xt, xu, w, params, grads, precond


def _mm(z, x, xa, xt, xu, w, params, grads, precond):
    zs = fastdistill.posterior_sample(z, x, 0.6, 0.8, 0.9, 0.4, seed=11)
    zd = fastdistill.posterior_sample(z, x, 0.6, 0.8, 0.9, 0.4, mode="ddim")
    mm = fastdistill.moment_matching_loss(x, xa, xt, weight=torch.tensor([1.0, 0.5]), x_teacher_uncond=xu,
                                          guidance_scale=2.0)
    aux = fastdistill.auxiliary_denoiser_loss(xa, x, xt, teacher_weight=0.5)
    stats = fastdistill.moment_statistics(zs * w, dims=(0, 2), weight=w, correction=1)
    with torch.no_grad():
        fastdistill.preconditioned_perturb_(params, grads, precond, step=0.1)
        fastdistill.clip_parameters_(params, 0.5)
    dot = fastdistill.moment_dot(grads, params, precond)
    return zs, zd, mm, aux, stats.mean, stats.var, dot


def _steps_inputs() -> tuple:
    g = _gen(3)
    ts = torch.tensor([5, 999, 300, 0, 700, 301, 42])
    px, py = _randn(7, 4, gen=g, grad=True), _randn(7, 2, 2, gen=g, grad=True)
    xs, ms = _randn(3, 2, 4, gen=g), _randn(3, 2, 4, gen=g, grad=True)
    ys, yt, fc, fu, xt = _randn(2, 3, 4, gen=g, grad=True), *(_randn(2, 3, 4, gen=g) for _ in range(4))
    real, fake = _randn(4, 1, gen=g, grad=True), _randn(4, 1, gen=g, grad=True)
    ir, ifk = _randn(3, 2, 2, gen=g), _randn(3, 2, 2, gen=g, grad=True)
    return ts, px, py, xs, ms, ys, yt, fc, fu, xt, real, fake, ir, ifk


_AC = torch.linspace(0.999, 0.05, 20, dtype=torch.float64).float()


def _steps(ts, px, py, xs, ms, ys, yt, fc, fu, xt, real, fake, ir, ifk):
    r = fastdistill.segment_route(ts, [0, 300, 700, 1000])
    gx, gy = fastdistill.segment_gather(r, px, {"y": py})
    gy = gy["y"]
    seg = fastdistill.segment_mse(gx, fastdistill.segment_scatter(r, gx).detach() * 0.5, r)
    back = fastdistill.segment_scatter(r, gy)
    prev, x0 = fastdistill.ddim_step(xs, ms, torch.tensor([19, 10, 5]), torch.tensor([15, 4, -1]), _AC,
                                     prediction_type="v_prediction")
    x_t, e_t = fastdistill.progressive_distillation_target(xs, prev, 0.3, 0.95, 0.5, 0.86)
    pd = fastdistill.pd_loss(x0, x_t.detach(), e_t.detach(), xs, 0.3, 0.95)
    boot = fastdistill.boot_loss(ys, yt, fc, x_t=xt, alpha_t=0.6, sigma_t=0.8, alpha_s=0.7, sigma_s=0.71,
                                 teacher_output_uncond=fu, guidance_scale=2.0)
    adv = fastdistill.adversarial_losses(real, fake)
    x_hat, _ = gan_interpolate(ir, ifk, torch.tensor([0.2, 0.5, 0.9]))
    gp = gradient_norm_penalty(x_hat * 3.0, 10.0)
    return r.segment_ids, r.permutation, seg, back, prev, x0, pd, boot, adv.discriminator, adv.generator, gp


@pytest.mark.parametrize("case", sorted(CASE_OPS))
def test_ops_compile_fullgraph_inductor_match_eager(case):
    fn, make, wrt = {
        "relational_and_attention": (_relational, _relational_inputs,
                                     lambda a: [a[0], a[1], a[4], a[7], a[9], a[10], a[11]]),
        "moment_matching": (_mm, _mm_inputs, lambda a: a[:3] + a[5:6]),
        "routing_and_steps": (_steps, _steps_inputs, lambda a: [a[1], a[2], a[4], a[5], a[10], a[11], a[13]]),
    }[case]
    ran = compare(case, fn, make, wrt)
    assert ran >= CASE_OPS[case], f"{case}: declared ops that did not run: {sorted(CASE_OPS[case] - ran)}"


def test_every_registered_op_has_a_compile_case():
    covered = set().union(*CASE_OPS.values())
    missing = sorted(set(dispatch.registered_ops()) - covered)
    assert not missing, f"registered ops without an inductor compile case in tests/test_inductor.py: {missing}"


def test_posterior_sample_noise_is_an_opaque_op_and_compiles_fast():
    """The Philox noise is one extern call for inductor (its ten rounds used to take > 500 s to lower),
    and compiled values equal eager ones bit for bit."""
    g = _gen(4)
    z, x = _randn(3, 50, gen=g), _randn(3, 50, gen=g)

    def f(z, x):
        return fastdistill.posterior_sample(z, x, 0.6, 0.8, 0.9, 0.4, seed=123)

    torch._dynamo.reset()
    start = time.perf_counter()
    got = torch.compile(f, fullgraph=True)(z, x)
    COMPILE_SECONDS["posterior_sample"] = elapsed = time.perf_counter() - start
    assert torch.equal(got, f(z, x))
    assert elapsed < 60, f"posterior_sample took {elapsed:.0f} s to compile"
    torch.library.opcheck(torch.ops.fastdistill.philox_randn.default, (5, 37, torch.device("cpu")))
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=capture)(z, x)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.fastdistill.philox_randn.default in targets
    assert torch.bitwise_xor not in targets and "__xor__" not in map(str, targets)


# ------------------------------------------------------------------------------------------ modules

class _TinyDenoiser(nn.Module):
    """``(x, t) -> x'``: a conv and a timestep embedding (a diffusers-UNet calling convention)."""

    def __init__(self, seed: int, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(1, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().reshape(-1)[:, None].expand(x.shape[0], 1) / 1000
        return torch.tanh(self.conv(x)) + self.emb(t)[:, :, None, None]


def _module_case(name: str, module: nn.Module, call: Callable[[nn.Module, tuple], Any],
                 make_inputs: Callable[[], tuple], *, fullgraph: bool = True, random: bool = False) -> None:
    """Eager vs compiled on two deep copies of ``module`` (buffers such as queues and BN statistics are
    compared after the call); gradients w.r.t. the floating inputs that require grad and every parameter."""
    eager_m, comp_m = copy.deepcopy(module), copy.deepcopy(module)

    def run(m: nn.Module, compiled: bool):
        inputs = make_inputs()
        fn = (lambda *a: call(m, a))
        if compiled:
            fn = torch.compile(fn, fullgraph=fullgraph)
        if random:
            torch.manual_seed(7)
        out = fn(*inputs)
        leaves = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
        return out, _grads(out, leaves + [p for p in m.parameters() if p.requires_grad]), list(m.buffers())

    torch._dynamo.reset()
    want = run(eager_m, False)
    start = time.perf_counter()
    with torch._inductor.config.patch(fallback_random=True):  # torch's RNG stream, as eager
        got = run(comp_m, True)
    COMPILE_SECONDS[name] = time.perf_counter() - start
    for part, a, b in zip(("outputs", "grads", "buffers"), got, want):
        _close(a, b, f"{name} {part}")


def test_rdd_modules_compile_fullgraph_inductor():
    from fastdistill.nn import RDDLoss

    def make():
        g = _gen(5)
        return _randn(2, 4, 3, 3, gen=g, grad=True), _randn(2, 4, 3, 3, gen=g), _randn(2, 6, gen=g, grad=True), \
            _randn(2, 6, gen=g)

    torch.manual_seed(0)
    loss = RDDLoss(4, 4, pixel_memory_size=30, pixel_contrast_size=8, sync_group=None)
    _module_case("RDDLoss", loss, lambda m, a: m(*a, return_terms=True), make, random=True)


def test_attention_distill_loss_compiles_fullgraph_inductor():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    from fastdistill.nn import AttentionDistillLoss

    class Net(nn.Module):
        def __init__(self, seed: int, heads: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.attn = Attention(query_dim=8, heads=heads, dim_head=4)

        def forward(self, x):
            return self.attn(x)

    teacher, student = Net(0, 4).requires_grad_(False), Net(1, 2)
    loss = AttentionDistillLoss(teacher, student)

    class Step(nn.Module):  # owns both models so that the copies stay paired with their loss
        def __init__(self):
            super().__init__()
            self.teacher, self.student, self.loss = teacher, student, loss

        def forward(self, x):
            with torch.no_grad():
                self.teacher(x)
            y = self.student(x)
            return self.loss(), y

    _module_case("AttentionDistillLoss", Step(), lambda m, a: m(*a), lambda: (_randn(2, 5, 8, gen=_gen(6)),))


def test_multi_student_fixed_capacity_compiles_fullgraph_inductor():
    from fastdistill.nn import MultiStudent

    model = MultiStudent([_TinyDenoiser(k) for k in range(3)], [0, 250, 600, 1000], fused=True, capacity=4)

    def make():
        return _randn(5, 3, 4, 4, gen=_gen(7), grad=True), torch.tensor([900, 3, 400, 260, 10])

    _module_case("MultiStudent", model, lambda m, a: m(*a), make)


def test_boot_distiller_loss_compiles_fullgraph_inductor():
    from fastdistill.nn import BootDistiller

    ac = torch.linspace(0.999, 0.02, 100, dtype=torch.float64)
    boot = BootDistiller(_TinyDenoiser(0), _TinyDenoiser(1), ac, step_size=5, guidance_scale=1.5)

    def make():
        return _randn(2, 3, 4, 4, gen=_gen(8)), torch.tensor([50, 99])

    _module_case("BootDistiller", boot, lambda m, a: m.loss(*a, uncond={}), make)


def test_adversarial_distiller_compiles_inductor():
    """generator_loss with fullgraph=True; discriminator_loss (with the gradient penalty, whose
    ``autograd.grad`` is a documented ``torch.compiler.disable`` boundary) in a compiled step with
    fullgraph=False: values and gradients (double backward into D) match eager."""
    from fastdistill.nn import AdversarialDistiller

    class D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 + 4, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x, c):
            return self.net(torch.cat([x.flatten(1), c], 1))

    adv = AdversarialDistiller(_TinyDenoiser(0), D(), gp_weight=10.0)

    def make():
        g = _gen(9)
        return _randn(3, 3, 4, 4, gen=g), _randn(3, 3, 4, 4, gen=g, grad=True), _randn(3, 4, gen=g)

    _module_case("AdversarialDistiller.generator_loss", adv, lambda m, a: m.generator_loss(a[1], a[2]), make)
    _module_case("AdversarialDistiller.discriminator_loss", adv, lambda m, a: m.discriminator_loss(*a), make,
                 fullgraph=False, random=True)


def test_moment_matching_distiller_losses_compile_fullgraph_inductor():
    from fastdistill.nn import MomentMatchingDistiller

    """sampler="ddim" as is; the ancestral sampler draws its Philox seed from torch's RNG with ``.item()``,
    which fullgraph traces with ``torch._dynamo.config.capture_scalar_outputs = True`` (docs/moment_matching.md)."""
    def distiller(sampler: str) -> MomentMatchingDistiller:
        return MomentMatchingDistiller(_TinyDenoiser(0), _TinyDenoiser(1), _TinyDenoiser(2), num_student_steps=4,
                                       alphas_cumprod=torch.linspace(0.999, 0.02, 100, dtype=torch.float64),
                                       sampler=sampler)

    def make():
        return _randn(2, 3, 4, 4, gen=_gen(10)), torch.tensor([24, 99])

    _module_case("MomentMatchingDistiller.student_loss", distiller("ddim"), lambda m, a: m.student_loss(*a), make,
                 random=True)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        _module_case("MomentMatchingDistiller.aux_loss", distiller("ancestral"), lambda m, a: m.aux_loss(*a), make,
                     random=True)
