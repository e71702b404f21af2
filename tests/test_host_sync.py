"""No host syncs by default (issue 14, item 5).

Every public op (each op of ``dispatch.registered_ops()``) and module runs its forward and backward
with default arguments under :func:`no_host_sync`, a guard that makes the Python-level ways of reading
a tensor on the host raise (``Tensor.item/tolist/cpu/numpy``, ``bool()/int()/float()/index()`` of a
tensor, ``nonzero``/``unique``/``bincount``/``masked_select``/``argwhere``, boolean-mask indexing).

The tensors are CPU tensors, but the run takes the **CUDA decision path**: the value checks that stay
on for CPU tensors (they are free there) decide through
:func:`fastdistill.ops._common.checks_are_free`, which the ``as_on_cuda`` fixture forces to
the CUDA answer. Every backend that runs CPU tensors here is exercised (reference, cpp, and triton under
the interpreter, whose own host copies are allowed: they are the interpreter, not the op).

On a GPU the gpu-marked test does the same on CUDA tensors under
``torch.cuda.set_sync_debug_mode("error")``, which also catches syncs invisible to the CPU guard
(blocking host-to-device copies, C++ ``.item()`` inside kernels).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

import fastdistill
from fastdistill import dispatch, testing
from fastdistill.ops import _common as op_common


class HostSyncError(AssertionError):
    """A tensor value was read on the host while an op ran."""


_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                   "unique", "masked_select", "argwhere")
_TORCH_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "argwhere")
#: (module, function) of callers allowed to read tensors on the host: the seed draw from a CPU
#: generator reads host memory by construction (on CUDA inputs too).
ALLOWED_CALLERS = frozenset({("fastdistill.ops._common", "draw_seed")})


def _caller(depth: int = 2) -> tuple[str, str]:
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "?"), frame.f_code.co_name


def _allowed(module: str, function: str, allow: frozenset) -> bool:
    # The Triton interpreter copies CPU tensors to numpy and back: that is the interpreter (on a GPU
    # the kernel launches instead), not a sync of the op.
    return module.split(".")[0] == "triton" or (module, function) in allow


def _is_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


@contextlib.contextmanager
def no_host_sync(allow: frozenset = ALLOWED_CALLERS) -> Iterator[list[str]]:
    """Within the block, reading a tensor's values on the host raises :class:`HostSyncError`.

    Yields the list of allowed reads that happened (``"module.function: Tensor.item"``).
    """
    allowed_log: list[str] = []
    saved: list[tuple[object, str, bool, object]] = []

    def patch(owner: object, name: str, wrapper: Callable) -> None:
        own = name in vars(owner)
        saved.append((owner, name, own, vars(owner).get(name)))
        setattr(owner, name, wrapper)

    def guarded(what: str, original: Callable, condition: Callable | None = None) -> Callable:
        def wrapper(*args, **kwargs):
            if condition is None or condition(*args, **kwargs):
                module, function = _caller()
                if not _allowed(module, function, allow):
                    raise HostSyncError(f"host sync: {what} called from {module}.{function}")
                allowed_log.append(f"{module}.{function}: {what}")
            return original(*args, **kwargs)
        return wrapper

    try:
        for name in _TENSOR_METHODS:
            patch(torch.Tensor, name, guarded(f"Tensor.{name}", getattr(torch.Tensor, name)))
        for name in ("__getitem__", "__setitem__"):
            patch(torch.Tensor, name, guarded(f"Tensor.{name} with a boolean mask", getattr(torch.Tensor, name),
                                              lambda self, index, *rest: _is_mask(index)))
        for name in _TORCH_FUNCTIONS:
            patch(torch, name, guarded(f"torch.{name}", getattr(torch, name)))
        yield allowed_log
    finally:
        for owner, name, own, value in reversed(saved):
            if own:
                setattr(owner, name, value)
            else:
                delattr(owner, name)


@pytest.fixture
def as_on_cuda(monkeypatch):
    """The value-check decisions take the CUDA answer (checks off unless asked for) on CPU tensors."""
    monkeypatch.delenv(op_common.VALUE_CHECKS_ENV, raising=False)
    monkeypatch.setattr(op_common, "checks_are_free", lambda device: False)


def _leaf(*shape: int, device: str = "cpu", grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).requires_grad_(grad)


def _backward(out: object) -> None:
    leaves = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    assert leaves, "the case must produce a differentiable output"
    sum(t.float().sum() for t in leaves).backward()


# ----------------------------------------------------------------------------------------------
# One case per registered op: build inputs (outside the guard), then run forward + backward (inside).
# Each returns a zero-argument callable that runs under the guard.


def _case_relational_kl(dev):
    q_s, k_s = _leaf(2, 6, 8, device=dev), _leaf(2, 10, 8, device=dev)
    q_t, k_t = _leaf(2, 6, 4, device=dev, grad=False), _leaf(2, 10, 4, device=dev, grad=False)
    return lambda: _backward(fastdistill.relational_kl(q_s, k_s, q_t, k_t))


def _case_fused_rdd_loss(dev):
    s, t = _leaf(2, 8, 3, 3, device=dev), _leaf(2, 8, 3, 3, device=dev, grad=False)
    return lambda: _backward(fastdistill.fused_rdd_loss(s, t))


def _case_memory_p2p_loss(dev):
    s, t = _leaf(2, 8, 3, 3, device=dev), _leaf(2, 8, 3, 3, device=dev, grad=False)
    bank = torch.nn.functional.normalize(torch.randn(20, 8, device=dev), dim=1)
    index = torch.tensor([0, 3, 7, 19], device=dev)
    return lambda: _backward(fastdistill.memory_p2p_loss(s, t, bank, index=index))


def _case_rcfd_loss(dev):
    s, t = _leaf(4, 10, device=dev), _leaf(4, 10, device=dev, grad=False)
    return lambda: _backward(fastdistill.rcfd_loss(s, t))


def _case_attention_kl(dev):
    q_s, k_s = _leaf(1, 2, 5, 8, device=dev), _leaf(1, 2, 7, 8, device=dev)
    q_t, k_t = _leaf(1, 2, 5, 16, device=dev, grad=False), _leaf(1, 2, 7, 16, device=dev, grad=False)
    return lambda: _backward(fastdistill.attention_kl(q_s, k_s, q_t, k_t))


def _coefs(dev, B):
    a_t, a_s = torch.full((B,), 0.6, device=dev), torch.full((B,), 0.8, device=dev)
    return a_t, (1 - a_t ** 2).sqrt(), a_s, (1 - a_s ** 2).sqrt()


def _case_posterior_sample(dev):
    z, x = _leaf(3, 5, device=dev), _leaf(3, 5, device=dev)
    return lambda: _backward(fastdistill.posterior_sample(z, x, *_coefs(dev, 3)))


def _case_moment_matching_loss(dev):
    x, xa, xt = _leaf(3, 5, device=dev), _leaf(3, 5, device=dev, grad=False), _leaf(3, 5, device=dev, grad=False)
    return lambda: _backward(fastdistill.moment_matching_loss(x, xa, xt))


def _case_auxiliary_denoiser_loss(dev):
    xa, x, xt = _leaf(3, 5, device=dev), _leaf(3, 5, device=dev, grad=False), _leaf(3, 5, device=dev, grad=False)
    return lambda: _backward(fastdistill.auxiliary_denoiser_loss(xa, x, xt))


def _case_moment_statistics(dev):
    x = _leaf(2, 3, 4, device=dev)
    return lambda: _backward(tuple(fastdistill.moment_statistics(x, dims=(0, 2))))


def _case_moment_dot(dev):
    a, b = [_leaf(5, device=dev), _leaf(2, 3, device=dev)], [_leaf(5, device=dev), _leaf(2, 3, device=dev)]
    v = [torch.rand(5, device=dev), torch.rand(2, 3, device=dev)]
    return lambda: _backward(fastdistill.moment_dot(a, b, v))


def _case_preconditioned_perturb_(dev):
    p = [torch.randn(5, device=dev), torch.randn(2, 3, device=dev)]
    g = [torch.randn(5, device=dev), torch.randn(2, 3, device=dev)]
    v = [torch.rand(5, device=dev), torch.rand(2, 3, device=dev)]
    return lambda: fastdistill.preconditioned_perturb_(p, g, v, step=0.1)  # in place, no autograd


def _case_clip_parameters_(dev):
    p = [torch.randn(5, device=dev), torch.randn(2, 3, device=dev)]
    return lambda: fastdistill.clip_parameters_(p, 0.5)  # in place, no autograd


_BOUNDS = (0, 10, 20, 30)


def _case_segment_route(dev):
    t = torch.tensor([3, 25, 11, 0, 29, 14], device=dev)
    return lambda: fastdistill.segment_route(t, _BOUNDS)  # integer outputs: no backward


def _case_segment_permute(dev):
    t = torch.tensor([3, 25, 11, 0, 29, 14], device=dev)
    routing = fastdistill.segment_route(t, _BOUNDS)
    x = _leaf(6, 4, device=dev)

    def run():
        y = fastdistill.segment_gather(routing, x)
        _backward(fastdistill.segment_scatter(routing, y * 2))
    return run


def _case_segment_mse(dev):
    t = torch.tensor([3, 25, 11, 0, 29, 14], device=dev)
    routing = fastdistill.segment_route(t, _BOUNDS)
    pred, target = _leaf(6, 4, device=dev), _leaf(6, 4, device=dev, grad=False)
    return lambda: _backward(fastdistill.segment_mse(pred, target, routing))


def _case_fused_attention(dev):
    q, k, v = _leaf(1, 2, 5, 16, device=dev), _leaf(1, 2, 7, 16, device=dev), _leaf(1, 2, 7, 16, device=dev)
    return lambda: _backward(fastdistill.fused_attention(q, k, v))


def _case_ddim_step(dev):
    x, m = _leaf(3, 4, device=dev), _leaf(3, 4, device=dev)
    ac = torch.linspace(0.99, 0.1, 20, device=dev)
    t, p = torch.tensor([5, 10, 19], device=dev), torch.tensor([0, 5, -1], device=dev)
    return lambda: _backward(tuple(fastdistill.ddim_step(x, m, t, p, ac)))


def _case_progressive_distillation_target(dev):
    z, zt = _leaf(3, 4, device=dev), _leaf(3, 4, device=dev)
    a_t, s_t, a_s, s_s = _coefs(dev, 3)
    return lambda: _backward(tuple(fastdistill.progressive_distillation_target(z, zt, a_t, s_t, a_s, s_s)))


def _case_pd_loss(dev):
    xs = _leaf(3, 4, device=dev)
    xt, et, z = (_leaf(3, 4, device=dev, grad=False) for _ in range(3))
    a_t, s_t, _, _ = _coefs(dev, 3)
    return lambda: _backward(fastdistill.pd_loss(xs, xt, et, z, a_t, s_t))


def _case_gradient_penalty(dev):
    D = nn.Sequential(nn.Flatten(), nn.Linear(12, 1)).to(dev)
    real, fake = torch.randn(3, 3, 4, device=dev), torch.randn(3, 3, 4, device=dev)
    return lambda: _backward(fastdistill.gradient_penalty(D, real, fake))


def _case_adversarial_losses(dev):
    r, f = _leaf(4, 1, device=dev), _leaf(4, 1, device=dev)
    return lambda: _backward(tuple(fastdistill.adversarial_losses(r, f)))


def _case_boot_loss(dev):
    y_s = _leaf(3, 4, device=dev)
    y_t, f, x_t = (_leaf(3, 4, device=dev, grad=False) for _ in range(3))
    a_t, s_t, a_s, s_s = _coefs(dev, 3)
    return lambda: _backward(fastdistill.boot_loss(y_s, y_t, f, x_t=x_t, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s,
                                                   sigma_s=s_s))


OP_CASES: dict[str, Callable[[str], Callable[[], None]]] = {
    name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")
}


def test_every_registered_op_has_a_case():
    missing = sorted(set(dispatch.registered_ops()) - set(OP_CASES))
    assert not missing, f"ops without a host-sync case in tests/test_host_sync.py: {missing}"
    extra = sorted(set(OP_CASES) - set(dispatch.registered_ops()))
    assert not extra, f"cases for unknown ops: {extra}"


def _cases(device: str) -> list:
    params = []
    for op in sorted(dispatch.registered_ops()):
        for case in testing.backend_device_cases(op):
            if case.device == device:
                params.append(pytest.param(op, case.backend, id=f"{op}-{case.id}", marks=case.marks()))
    return params


@pytest.mark.parametrize("op,backend", _cases("cpu"))
def test_op_is_sync_free(op, backend, as_on_cuda):
    run = OP_CASES[op]("cpu")
    with dispatch.use_backend(backend), dispatch.record_backends() as seen, no_host_sync():
        run()
    assert (op, backend) in seen, seen  # the case ran the backend it is about


# ----------------------------------------------------------------------------------------------
# Modules


class _Denoiser(nn.Module):
    """A diffusers-style ``model(x, t)`` with a timestep embedding (x: (B, C, H, W))."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(1000, channels)

    def forward(self, x, t, **kwargs):
        return self.conv(x) + self.emb(t.reshape(-1).expand(x.shape[0]))[:, :, None, None].to(x.dtype)


def _module_rdd(dev):
    loss = fastdistill.nn.RDDLoss(8, 8, pixel_memory_size=64, pixel_contrast_size=16, sync_group=None).to(dev)
    s, t = _leaf(2, 8, 3, 3, device=dev), _leaf(2, 8, 3, 3, device=dev, grad=False)
    ls, lt = _leaf(2, 10, device=dev), _leaf(2, 10, device=dev, grad=False)
    return lambda: _backward(loss(s, t, ls, lt))


def _module_intra_sample(dev):
    loss = fastdistill.nn.IntraSampleP2PLoss().to(dev)
    s, t = _leaf(2, 8, 3, 3, device=dev), _leaf(2, 8, 3, 3, device=dev, grad=False)
    return lambda: _backward(loss(s, t))


def _module_memory_p2p(dev):
    loss = fastdistill.nn.MemoryP2PLoss(pixel_memory_size=64, pixel_contrast_size=16, s_channels=6, t_channels=8,
                                        sync_group=None).to(dev)
    s, t = _leaf(2, 6, 3, 3, device=dev), _leaf(2, 8, 3, 3, device=dev, grad=False)
    return lambda: _backward(loss(s, t))


def _alphas_cumprod(dev, T=100):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).to(dev)


def _module_moment_matching(variant):
    def build(dev):
        torch.manual_seed(0)
        mm = fastdistill.nn.MomentMatchingDistiller(_Denoiser().to(dev), _Denoiser().to(dev), variant=variant,
                                                    alphas_cumprod=_alphas_cumprod(dev), num_student_steps=4)
        x0 = torch.randn(4, 2, 4, 4, device=dev)
        t = torch.tensor([24, 49, 74, 99], device=dev)

        def run():
            _backward(mm.student_loss(x0))
            _backward(mm.student_loss(x0, t))
            if variant == "alternating":
                _backward(mm.aux_loss(x0))
            mm.sample(torch.randn(2, 2, 4, 4, device=dev))
        return run
    return build


def _module_boot(dev):
    torch.manual_seed(0)
    boot = fastdistill.nn.BootDistiller(_Denoiser().to(dev), _Denoiser().to(dev), _alphas_cumprod(dev), step_size=10)
    noise = torch.randn(3, 2, 4, 4, device=dev)
    t = torch.tensor([10, 50, 99], device=dev)

    def run():
        _backward(boot(noise))
        _backward(boot(noise, t))
    return run


def _module_adversarial(dev):
    student = nn.Conv2d(2, 2, 3, padding=1).to(dev)
    disc = nn.Sequential(nn.Flatten(), nn.Linear(32, 1)).to(dev)
    adv = fastdistill.nn.AdversarialDistiller(student, disc)
    x, real = torch.randn(3, 2, 4, 4, device=dev), torch.randn(3, 2, 4, 4, device=dev)

    def run():
        fake = adv(x)
        _backward(adv.discriminator_loss(real, fake))
        _backward(adv.generator_loss(fake))
        adv.clip_discriminator_()
    return run


def _module_multi_student(dev):
    students = [nn.Linear(4, 4).to(dev) for _ in range(3)]

    class Wrap(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x, t):
            return self.lin(x) * (1 + t[:, None].to(x.dtype) / 100)

    # The fixed-capacity fused path: the host-free configuration (the loop path needs the segment sizes
    # on the host to slice the batch; documented in nn/multi_student.py).
    ms = fastdistill.nn.MultiStudent([Wrap(s) for s in students], [0, 10, 20, 30], num_train_timesteps=30,
                                     fused=True, capacity=4)
    x, t = _leaf(6, 4, device=dev), torch.tensor([3, 25, 11, 0, 29, 14], device=dev)
    return lambda: _backward(ms(x, t))


def _module_attention_distill(dev):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    class Toy(nn.Module):
        def __init__(self, heads, dim_head):
            super().__init__()
            self.attn = Attention(query_dim=32, heads=heads, dim_head=dim_head)

        def forward(self, h):
            return self.attn(h)

    torch.manual_seed(0)
    teacher, student = Toy(4, 16).to(dev), Toy(2, 32).to(dev)
    loss_fn = fastdistill.nn.AttentionDistillLoss(teacher, student)
    h = torch.randn(1, 5, 32, device=dev)

    def run():
        with torch.no_grad():
            teacher(h)
        student(h)
        _backward(loss_fn())
    return run


MODULE_CASES = {
    "RDDLoss": _module_rdd,
    "IntraSampleP2PLoss": _module_intra_sample,
    "MemoryP2PLoss": _module_memory_p2p,
    "MomentMatchingDistiller-alternating": _module_moment_matching("alternating"),
    "MomentMatchingDistiller-parameter": _module_moment_matching("parameter"),
    "BootDistiller": _module_boot,
    "AdversarialDistiller": _module_adversarial,
    "MultiStudent": _module_multi_student,
    "AttentionDistillLoss": _module_attention_distill,
}


@pytest.mark.parametrize("name", sorted(MODULE_CASES))
def test_module_is_sync_free(name, as_on_cuda):
    run = MODULE_CASES[name]("cpu")
    with no_host_sync():
        run()


# ----------------------------------------------------------------------------------------------
# The opt-in checks: they run when asked for, and the guard sees them (so the tests above can fail).


def _ddim(t: list[int], validate=None):
    x = torch.randn(2, 3)
    return fastdistill.ddim_step(x, x, torch.tensor(t), torch.tensor([0, 0]), torch.linspace(0.9, 0.1, 10),
                                 validate=validate)


def test_guard_catches_a_sync():
    x = torch.randn(3)
    with no_host_sync():
        with pytest.raises(HostSyncError, match="Tensor.item"):
            x.sum().item()
        with pytest.raises(HostSyncError, match="__bool__"):
            bool((x > 0).any())
        with pytest.raises(HostSyncError, match="torch.nonzero"):
            torch.nonzero(x)
        with pytest.raises(HostSyncError, match="boolean mask"):
            x[x > 0]
    assert x.sum().item() == pytest.approx(float(x.sum()))  # restored after the block


@pytest.mark.parametrize("how", ["validate", "env"])
def test_opt_in_checks_sync_and_raise(how, as_on_cuda, monkeypatch):
    """With the CUDA answer nothing is checked by default (no sync); opting in runs the check, which
    reads on the host (the guard raises) and, unguarded, raises its ValueError on a bad timestep."""
    with no_host_sync():
        _ddim([5, 9])
    kw = {"validate": True} if how == "validate" else {}
    if how == "env":
        monkeypatch.setenv(op_common.VALUE_CHECKS_ENV, "1")
    with no_host_sync(), pytest.raises(HostSyncError):
        _ddim([5, 9], **kw)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        _ddim([5, 99], **kw)


def test_opt_in_index_and_value_checks(as_on_cuda):
    s, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    bank, bad = torch.randn(5, 4), torch.tensor([0, 7])
    with no_host_sync(), pytest.raises(HostSyncError):
        fastdistill.memory_p2p_loss(s, t, bank, index=bad, check_index=True)
    with pytest.raises(ValueError, match="index values must lie"):
        fastdistill.memory_p2p_loss(s, t, bank, index=bad, check_index=True)
    with no_host_sync(), pytest.raises(HostSyncError):
        fastdistill.boot_loss(s, s, s, x_t=s, alpha_t=0.5, sigma_t=0.5, alpha_s=0.6, sigma_s=0.4, validate=True)
    with pytest.raises(ValueError, match="sigma_t must be > 0"):
        fastdistill.pd_loss(s, s, s, s, 0.5, 0.0, validate=True)
    with pytest.raises(ValueError, match="s == t"):
        fastdistill.progressive_distillation_target(s, s, 0.6, 0.8, 0.6, 0.8, validate=True)


def test_cpu_keeps_its_checks(monkeypatch):
    """Without the forcing, CPU tensors are still checked by default (free there)."""
    monkeypatch.delenv(op_common.VALUE_CHECKS_ENV, raising=False)
    assert op_common.value_checks_enabled(torch.device("cpu"))
    assert not op_common.value_checks_enabled(torch.device("cuda"))
    assert op_common.value_checks_enabled(torch.device("cuda"), True)
    monkeypatch.setenv(op_common.VALUE_CHECKS_ENV, "0")
    assert not op_common.value_checks_enabled(torch.device("cpu"))
    assert op_common.value_checks_enabled(torch.device("cpu"), True)
    monkeypatch.setenv(op_common.VALUE_CHECKS_ENV, "1")
    assert op_common.value_checks_enabled(torch.device("cuda"))
    monkeypatch.delenv(op_common.VALUE_CHECKS_ENV)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        _ddim([5, 99])
    with pytest.raises(ValueError, match="index values must lie"):
        fastdistill.memory_p2p_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.randn(5, 4),
                                    index=torch.tensor([0, 7]))


def test_draw_seed_reproducible():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [op_common.draw_seed(g1) for _ in range(3)] == [op_common.draw_seed(g2) for _ in range(3)]
    torch.manual_seed(3)
    a = op_common.draw_seed(None)
    torch.manual_seed(3)
    assert op_common.draw_seed(None) == a


# ----------------------------------------------------------------------------------------------
# GPU: the same cases on CUDA tensors under torch's own sync detector.


@contextlib.contextmanager
def _sync_debug_error() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("op,backend", _cases("cuda"))
def test_op_is_sync_free_cuda(op, backend, monkeypatch):
    monkeypatch.delenv(op_common.VALUE_CHECKS_ENV, raising=False)
    run = OP_CASES[op]("cuda")
    with dispatch.use_backend(backend):
        run()  # warm-up outside the detector: kernel compiles and autotuning synchronise once
        torch.cuda.synchronize()
        with _sync_debug_error():
            run()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODULE_CASES))
def test_module_is_sync_free_cuda(name, monkeypatch):
    monkeypatch.delenv(op_common.VALUE_CHECKS_ENV, raising=False)
    run = MODULE_CASES[name]("cuda")
    run()  # warm-up outside the detector: one-time allocations, lazy CUDA init, kernel compiles
    torch.cuda.synchronize()
    with _sync_debug_error():
        run()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_generator_seed_without_sync():
    g1, g2 = torch.Generator("cuda").manual_seed(7), torch.Generator("cuda").manual_seed(7)
    with _sync_debug_error():
        s1 = [op_common.draw_seed(g1) for _ in range(3)]
        s2 = [op_common.draw_seed(g2) for _ in range(3)]
    assert s1 == s2 and len(set(s1)) == 3
