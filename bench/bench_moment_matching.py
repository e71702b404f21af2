"""Moment Matching: the multi-tensor parameter ops and the per-sample ops, fastdistill vs the eager
PyTorch a user would write (a ``torch._foreach_*`` chain for the parameter ops) and ``torch.compile`` of it.

Cases on GPU:
(a) the parameter list of a Stable-Diffusion-size ``UNet2DConditionModel`` (diffusers' default config,
    about 860M parameters, ~690 tensors; shapes taken from a model built on the meta device, tensors
    random on the GPU): bf16 parameters and gradients, fp32 second moments ``v``.
(b) per-sample ops at (64, 3, 512, 512), bf16 inputs (the networks' dtype), fp32 arithmetic.
On CPU: 300 small parameter tensors and (2, 3, 16, 16), so that ``pytest bench --benchmark`` runs
anywhere (the CPU numbers only show that the benchmarks run; there the per-sample ops run their
reference and the parameter ops the C++ kernels).

Bytes each kernel must move (the floor is bytes / measured copy bandwidth; P = parameter count,
N = elements of one (B, C, H, W) tensor, e = 2 bytes for bf16):
* moment_dot(g_a, g_b, v): read g_a, g_b (bf16) and v (fp32): 8 P.
* preconditioned_perturb_(theta, g, v): read theta, g, v, write theta: 10 P.
* clip_parameters_ (bound 0.01 on weights ~ N(0, 0.02): most elements change): read + write theta: 4 P.
* posterior_sample fwd: read z_t, x; write z_s (noise drawn in-kernel): 3 N e.
* moment_matching_loss fwd+bwd: fwd reads x_student, x_aux, x_teacher (+ x_uncond with CFG) and writes
  the gradient (the forward pass computes it); bwd scales it by the upstream gradient (read + write):
  6 N e (7 N e with CFG). A single fused pass would be 4 N e (5 with CFG), but the upstream gradient is
  only known in backward; this is the least a two-pass autograd op can move without a host sync.
* auxiliary_denoiser_loss fwd+bwd: likewise 6 N e.
* moment_statistics fwd (per channel, dims (0, 2, 3)): read x: N e.
"""

from __future__ import annotations

import pytest
import torch

import fastdistill
import harness

EPS = 1e-8


def _param_shapes() -> list[tuple[int, ...]]:
    if not harness.on_gpu():
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(1, 3000, (300,), generator=g).tolist()
        return [(s,) for s in sizes] + [(1,), (0,)]
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()  # diffusers' defaults are the SD 1.x UNet (~860M parameters)
    return [tuple(p.shape) for p in unet.parameters()]


_LISTS: dict[str, list[torch.Tensor]] = {}


def _lists():
    if not _LISTS:
        dev = harness.device()
        dt = torch.bfloat16 if harness.on_gpu() else torch.float32
        shapes = _param_shapes()
        _LISTS["theta"] = [(torch.randn(s, device=dev) * 0.02).to(dt) for s in shapes]
        _LISTS["g_a"] = [torch.randn(s, device=dev).to(dt) for s in shapes]
        _LISTS["g_b"] = [torch.randn(s, device=dev).to(dt) for s in shapes]
        _LISTS["v"] = [torch.rand(s, device=dev) + 1e-3 for s in shapes]
    return _LISTS


def _case_name(lists) -> str:
    n = sum(t.numel() for t in lists["theta"])
    count = f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)
    return f"{len(lists['theta'])} tensors, {count} params"


def _param_bytes(lists, per_elem: float) -> float:
    return per_elem * sum(t.numel() for t in lists["theta"])


def test_moment_dot():
    L = _lists()
    a, b, v = L["g_a"], L["g_b"], L["v"]

    def eager():
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, EPS)
        q = torch._foreach_div(torch._foreach_mul([t.float() for t in a], [t.float() for t in b]), d)
        return torch.stack([t.sum() for t in q]).sum()

    e = a[0].element_size()
    harness.run_case("moment_dot", _case_name(L),
                     {"fastdistill": lambda: fastdistill.moment_dot(a, b, v, eps=EPS), "eager": eager,
                      "torch.compile": harness.compiled(eager)},
                     mode="fwd", bytes_moved=_param_bytes(L, 2 * e + 4))


def test_preconditioned_perturb():
    L = _lists()
    theta, g, v = L["theta"], L["g_a"], L["v"]
    step = 1e-3

    def eager():
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, EPS)
        u = torch._foreach_div([t.float() for t in g], d)
        torch._foreach_mul_(u, step)
        torch._foreach_sub_(theta, u)

    # Every timed call moves the weights once more; they stay finite and the work per call is the same.
    harness.run_case("preconditioned_perturb_", _case_name(L),
                     {"fastdistill": lambda: fastdistill.preconditioned_perturb_(theta, g, v, step=step, eps=EPS),
                      "eager": eager, "torch.compile": harness.compiled(eager)},
                     mode="fwd", bytes_moved=_param_bytes(L, 3 * theta[0].element_size() + 4))


def test_clip_parameters():
    L = _lists()
    theta = L["theta"]

    def eager():
        torch._foreach_clamp_min_(theta, -0.01)
        torch._foreach_clamp_max_(theta, 0.01)

    def fused():
        fastdistill.clip_parameters_(theta, 0.01)

    harness.run_case("clip_parameters_", _case_name(L),
                     {"fastdistill": fused, "eager": eager, "torch.compile": harness.compiled(eager)},
                     mode="fwd", bytes_moved=_param_bytes(L, 2 * theta[0].element_size()))


# ----------------------------------------------------------------------------- per-sample ops

SHAPE = (64, 3, 512, 512) if harness.on_gpu() else (2, 3, 16, 16)
CASE = f"({', '.join(map(str, SHAPE))})"
DTYPE = torch.bfloat16 if harness.on_gpu() else torch.float32


def _t(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(SHAPE, device=harness.device(), dtype=DTYPE, requires_grad=requires_grad)


def _coefs():
    B, dev = SHAPE[0], harness.device()
    abar_s = torch.rand(B, device=dev) * 0.5 + 0.45
    abar_t = abar_s * 0.5
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()


def _col(c: torch.Tensor) -> torch.Tensor:
    return c.view(-1, 1, 1, 1)


def _fwd_bwd_providers(fused, eager, inputs):
    return {"fastdistill": harness.fwd_bwd(fused, inputs), "eager": harness.fwd_bwd(eager, inputs),
            "torch.compile": harness.fwd_bwd(harness.compiled(eager), inputs)}


def test_posterior_sample():
    z, x = _t(), _t()
    at, st, as_, ss = _coefs()

    def eager():
        a_ts = at / as_
        var_ts = st**2 - a_ts**2 * ss**2
        c_z, c_x, std = a_ts * ss**2 / st**2, as_ * var_ts / st**2, (ss**2 * var_ts / st**2).sqrt()
        noise = torch.randn_like(z, dtype=torch.float32)
        return (_col(c_z) * z.float() + _col(c_x) * x.float() + _col(std) * noise).to(z.dtype)

    harness.run_case("posterior_sample", CASE,
                     {"fastdistill": lambda: fastdistill.posterior_sample(z, x, at, st, as_, ss, seed=1),
                      "eager": eager, "torch.compile": harness.compiled(eager)},
                     mode="fwd", bytes_moved=3 * z.numel() * z.element_size())


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_moment_matching_loss(cfg):
    xs = _t(requires_grad=True)
    xa, xt, xu = _t(), _t(), _t()
    w = torch.rand(SHAPE[0], device=harness.device()) + 0.5
    g = 3.0

    def eager():
        t = xu.float() + g * (xt.float() - xu.float()) if cfg else xt.float()
        return (_col(w) * xs.float() * (xa.float() - t)).mean()

    def fused():
        if cfg:
            return fastdistill.moment_matching_loss(xs, xa, xt, weight=w, x_teacher_uncond=xu, guidance_scale=g)
        return fastdistill.moment_matching_loss(xs, xa, xt, weight=w)

    harness.run_case("moment_matching_loss", f"{CASE} {'cfg' if cfg else 'plain'}",
                     _fwd_bwd_providers(fused, eager, [xs]), mode="fwd+bwd",
                     bytes_moved=(7 if cfg else 6) * xs.numel() * xs.element_size())


def test_auxiliary_denoiser_loss():
    xa = _t(requires_grad=True)
    xs, xt = _t(), _t()

    def eager():
        a = xa.float()
        return (xs.float() - a).pow(2).mean() + (xt.float() - a).pow(2).mean()

    harness.run_case("auxiliary_denoiser_loss", CASE,
                     _fwd_bwd_providers(lambda: fastdistill.auxiliary_denoiser_loss(xa, xs, xt), eager, [xa]),
                     mode="fwd+bwd", bytes_moved=6 * xa.numel() * xa.element_size())


def test_moment_statistics_per_channel():
    x = _t()

    def eager():
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        return mean, var

    harness.run_case("moment_statistics", f"{CASE} per channel",
                     {"fastdistill": lambda: fastdistill.moment_statistics(x, dims=(0, 2, 3), process_group=None),
                      "eager": eager, "torch.compile": harness.compiled(eager)},
                     mode="fwd", bytes_moved=x.numel() * x.element_size())
