"""attention_kl against the dense float64 attention-map KL, every backend and dtype."""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.ops.attention_kl import attention_kl, attention_kl_reference

# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
BACKENDS = testing.backend_device_params("attention_kl")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Measured with the interpreter's GPU rounding (kernels/_common.py), fresh seeds, 12 gradient / 6 value
# draws per dtype: worst gradient error bf16 3.4e-3, fp16 4.5e-4; values below 1e-6 (fp32 KL of rounded inputs).
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


# Value and gradient against float64, with `backend` forced for the forward and backward passes.
check = testing.check_against_reference


def _qk(B, H, Lq, Lk, Ds, Dt, dtype, gen, layout="bhld", device="cpu"):
    def make(L, D, grad):
        if layout == "blhd":  # diffusers' (B, L, H, D) viewed as (B, H, L, D): non-contiguous
            x = testing.randn(B, L, H, D, dtype=dtype, gen=gen, device=device, requires_grad=grad)
            return x, x.transpose(1, 2)
        x = testing.randn(B, H, L, D, dtype=dtype, gen=gen, device=device, requires_grad=grad)
        return x, x

    (qs_leaf, q_s), (ks_leaf, k_s) = make(Lq, Ds, True), make(Lk, Ds, True)
    (_, q_t), (_, k_t) = make(Lq, Dt, False), make(Lk, Dt, False)
    return qs_leaf, ks_leaf, q_s, k_s, q_t, k_t


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8, 8), (1, 2, 1, 77, 40, 16), (2, 1, 33, 1, 16, 24),
                                   (1, 2, 70, 20, 5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_matches_dense(backend, device, dtype, shape):
    B, H, Lq, Lk, Ds, Dt = shape
    _, _, q_s, k_s, q_t, k_t = _qk(B, H, Lq, Lk, Ds, Dt, dtype, testing.generator(), device=device)
    if Lk == 1:  # one key: both distributions are the point mass, KL and gradients are 0
        with fastdistill.use_backend(backend):
            loss = attention_kl(q_s, k_s, q_t, k_t)
        g = torch.autograd.grad(loss, [q_s, k_s])
        assert abs(loss.item()) < 1e-6 and max(x.abs().max().item() for x in g) < 1e-6
        return
    check(attention_kl, attention_kl_reference, [q_s, k_s, q_t, k_t], dict(reduction="none"), dtype=dtype,
          backend=backend, rtol=RTOL[dtype], grad_rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_diffusers_layout_and_scales(backend, device):
    """(B, L, H, D).transpose(1, 2) inputs are read in place; explicit scales; mean reduction."""
    qs_leaf, ks_leaf, _, _, q_t, k_t = _qk(2, 3, 9, 12, 6, 10, torch.float32, testing.generator(), "blhd", device)

    def fn(qs, ks, q_t, k_t):
        return attention_kl(qs.transpose(1, 2), ks.transpose(1, 2), q_t, k_t, scale_s=0.3, scale_t=0.7)

    def ref(qs, ks, q_t, k_t):
        return attention_kl_reference(qs.transpose(1, 2), ks.transpose(1, 2), q_t, k_t, scale_s=0.3, scale_t=0.7)

    assert not q_t.is_contiguous()
    check(fn, ref, [qs_leaf, ks_leaf, q_t, k_t], dtype=torch.float32, backend=backend, rtol=1e-4, grad_rtol=1e-4)


def test_shares_the_relational_kl_core():
    """attention_kl is relational_kl per (batch, head) with scales folded in: same numbers."""
    _, _, q_s, k_s, q_t, k_t = _qk(2, 2, 6, 9, 4, 4, torch.float32, testing.generator())
    got = attention_kl(q_s, k_s, q_t, k_t, reduction="none")
    want = fastdistill.relational_kl(q_s.flatten(0, 1), k_s.flatten(0, 1), q_t.flatten(0, 1), k_t.flatten(0, 1),
                                     temperature=2.0, reduction="none").view(2, 2, 6)
    testing.assert_close(got, want, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_reference():
    _, _, q_s, k_s, q_t, k_t = _qk(1, 2, 5, 6, 4, 8, torch.float32, testing.generator())
    with fastdistill.use_backend("reference"):
        f = torch.compile(attention_kl, fullgraph=True, backend="aot_eager")
        got = f(q_s, k_s, q_t, k_t)
        want = attention_kl(q_s, k_s, q_t, k_t)
        testing.assert_close(got, want, rtol=1e-6)
        for a, b in zip(torch.autograd.grad(got, [q_s, k_s]), torch.autograd.grad(want, [q_s, k_s])):
            testing.assert_close(a, b, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(k_s=torch.ones(1, 2, 5, 3)), "head dim"),
    (dict(k_t=torch.ones(1, 2, 5, 3)), "head dim"),
    (dict(q_s=torch.ones(2, 5, 4)), "q_s"),
    (dict(q_t=torch.ones(1, 3, 4, 4)), "q_s and q_t"),
    (dict(k_t=torch.ones(1, 2, 6, 4)), "k_s and k_t"),
    (dict(k_s=torch.ones(1, 3, 5, 4), k_t=torch.ones(1, 3, 5, 4)), r"\(B, H\)"),
    (dict(scale_s=0.0), "scale_s"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(q_s=torch.ones(1, 2, 4, 4, dtype=torch.int32)), "q_s"),
    (dict(k_t=torch.ones(1, 2, 5, 4, device="meta")), "same device"),
])
def test_bad_input(bad, match):
    args = dict(q_s=torch.ones(1, 2, 4, 4), k_s=torch.ones(1, 2, 5, 4), q_t=torch.ones(1, 2, 4, 4),
                k_t=torch.ones(1, 2, 5, 4))
    kw = {}
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError), match=match):
        attention_kl(args["q_s"], args["k_s"], args["q_t"], args["k_t"], **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4, 1024, 1024, 40, 64), (1, 2, 4096, 77, 64, 64), (2, 2, 300, 200, 160, 80)])
def test_gpu_triton_matches_float64(shape):
    B, H, Lq, Lk, Ds, Dt = shape
    _, _, q_s, k_s, q_t, k_t = _qk(B, H, Lq, Lk, Ds, Dt, torch.bfloat16, testing.generator())
    q_s, k_s = (x.detach().cuda().requires_grad_(True) for x in (q_s, k_s))
    q_t, k_t = q_t.cuda(), k_t.cuda()
    check(attention_kl, attention_kl_reference, [q_s, k_s, q_t, k_t], dict(reduction="none"),
          dtype=torch.bfloat16, backend="triton", rtol=2e-2, grad_rtol=5e-2)
