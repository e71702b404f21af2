"""fused_attention against float64 attention: every UNet head dim, Lq != Lk, lengths 1 and 77,
masks, both layouts, forward and backward, on the Triton backend (interpreter on CPU) and the
reference backend."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fastdistill
from fastdistill import _triton, dispatch
from fastdistill.kernels._common import launch_grid
from fastdistill.kernels.attention import split_head_dim
from fastdistill.ops.attention import attention_reference
from fastdistill.testing import backend_device_params, backends_under_test, check_against_reference, randn

OP = "fused_attention"
BACKENDS = backends_under_test(OP)
TRITON = [b for b in BACKENDS if b == "triton"]
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
CASES = backend_device_params(OP)
TRITON_CASES = backend_device_params(OP, include=["triton"])
HEAD_DIMS = [40, 64, 80, 128, 160, 256]


def _tols(dtype: torch.dtype, backend: str) -> tuple[float, float]:
    """(output rtol, gradient rtol) relative to the largest reference value."""
    if dtype == torch.float32:
        # fp32 dots follow torch.get_float32_matmul_precision(): "highest" (the default) is IEEE fp32 on the
        # GPU and in the interpreter alike; "high"/"medium" run TF32 (10-bit mantissa), emulated by the
        # interpreter too (kernels/_common.py).
        if backend == "triton" and torch.get_float32_matmul_precision() != "highest":
            return 5e-3, 1e-2
        return 2e-5, 5e-5
    if dtype == torch.bfloat16:
        # P and dS are rounded to bf16 before their dots, as in FA2 (and, through kernels/_common.py, under
        # the interpreter too). Measured, fresh seeds: outputs 6.8e-3 (9 draws), gradients 8.0e-3 (21 draws).
        return 2e-2, 4e-2
    return 1e-2, 2e-2  # fp16; measured: outputs 3.3e-4, gradients 6.7e-4 (the same draws)


def _qkv(B, H, Lq, Lk, D, dtype, layout="bhld", grad=True, device="cpu"):
    def mk(L):
        shape = (B, H, L, D) if layout == "bhld" else (B, L, H, D)
        return randn(*shape, dtype=dtype, device=device, requires_grad=grad)
    return mk(Lq), mk(Lk), mk(Lk)


def _check(q, k, v, *, backend, dtype, **kw):
    rtol, grtol = _tols(dtype, backend)
    return check_against_reference(fastdistill.fused_attention, fastdistill.fused_attention, (q, k, v), kw,
                                   dtype=dtype, backend=backend, rtol=rtol, grad_rtol=grtol)


def test_split_head_dim_uses_pow2_subblocks_not_2x_padding():
    assert split_head_dim(40) == (32, 16)
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(160) == (128, 32)
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(256) == (256, 0)
    for d in range(8, 257, 8):
        d0, d1 = split_head_dim(d)
        assert d0 + d1 >= d and d0 & (d0 - 1) == 0 and (d1 == 0 or d1 & (d1 - 1) == 0)
        assert d0 + d1 <= max(16, triton_next_pow2(d))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_every_head_dim_fwd_bwd_fp32(backend, device, d):
    # Lq != Lk, neither a multiple of a block size; cross-attention-like Lk = 77.
    q, k, v = _qkv(1, 2, 33, 77, d, torch.float32, device=device)
    _check(q, k, v, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("d", [8, 24, 72, 200])
def test_other_multiples_of_8(backend, device, d):
    q, k, v = _qkv(1, 1, 17, 20, d, torch.float32, device=device)
    _check(q, k, v, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [40, 64])
def test_dtypes(backend, device, dtype, d):
    q, k, v = _qkv(2, 1, 19, 41, d, dtype, device=device)
    _check(q, k, v, backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [80, 160])
def test_half_split_head_dims(backend, device, dtype, d):
    q, k, v = _qkv(1, 2, 24, 77, d, dtype, device=device)
    _check(q, k, v, backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 77), (77, 1), (77, 77), (80, 3)])
def test_lengths(backend, device, lq, lk):
    q, k, v = _qkv(1, 2, lq, lk, 40, torch.float32, device=device)
    if lk == 1:
        # One key: the softmax is constant, dq == dk == 0 exactly in float64, while fp32 leaves rounding
        # noise p * (dP - delta) ~ 1e-7 * |dO||v| that a relative test against 0 cannot accept. Check
        # dq, dk against an absolute bound and the output and dv against the reference.
        q.requires_grad_(False)
        k.requires_grad_(False)
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        with dispatch.use_backend(backend):
            out = fastdistill.fused_attention(qq, kk, v.detach())
        dq, dk = torch.autograd.grad(out, (qq, kk), torch.randn_like(out))
        assert dq.abs().max().item() < 1e-4 and dk.abs().max().item() < 1e-4
    _check(q, k, v, backend=backend, dtype=torch.float32)


def _mask(shape, dtype=torch.float32, device="cpu"):
    # Additive mask as diffusers builds it: 0 keeps, -10000 drops (keep at least key 0 per row).
    keep = torch.rand(shape) > 0.3
    keep[..., 0] = True
    return (torch.zeros(shape, dtype=dtype).masked_fill(~keep, -10000.0) + 0.1 * randn(*shape)).to(device)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("mask_shape", ["b1k", "bhqk", "b1qk", "bh1k", "11qk"])
def test_masks(backend, device, mask_shape):
    B, H, Lq, Lk = 2, 2, 21, 77
    shape = {"b1k": (B, 1, Lk), "bhqk": (B, H, Lq, Lk), "b1qk": (B, 1, Lq, Lk), "bh1k": (B, H, 1, Lk),
             "11qk": (1, 1, Lq, Lk)}[mask_shape]
    q, k, v = _qkv(B, H, Lq, Lk, 64, torch.float32, device=device)
    _check(q, k, v, backend=backend, dtype=torch.float32, attn_mask=_mask(shape, device=device))


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_mask_half_and_expanded_stride0(backend, device):
    B, H, Lq, Lk = 2, 2, 16, 30
    q, k, v = _qkv(B, H, Lq, Lk, 40, torch.bfloat16, device=device)
    mask = _mask((B, 1, 1, Lk), torch.bfloat16, device).expand(B, H, Lq, Lk)  # stride-0 view, as SDPA users pass
    _check(q, k, v, backend=backend, dtype=torch.bfloat16, attn_mask=mask)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("d", [40, 80])
def test_blhd_layout(backend, device, d):
    q, k, v = _qkv(2, 2, 19, 77, d, torch.float32, layout="blhd", device=device)
    res = _check(q, k, v, backend=backend, dtype=torch.float32, layout="blhd",
                 attn_mask=_mask((2, 1, 77), device=device))
    assert res.outputs[0].shape == q.shape
    # Same numbers as the bhld call on the transposed views.
    with dispatch.use_backend(backend):
        other = fastdistill.fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_mask=_mask((2, 1, 77), device=device) * 0)
        plain = fastdistill.fused_attention(q, k, v, layout="blhd", attn_mask=_mask((2, 1, 77), device=device) * 0)
    torch.testing.assert_close(other.transpose(1, 2), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_strided_views_read_in_place(backend, device):
    # diffusers: to_q(x).view(B, L, H, D).transpose(1, 2) -- a non-contiguous bhld view.
    B, L, H, D = 2, 25, 2, 40
    x = randn(B, L, H * D, device=device, requires_grad=True)
    q = x.view(B, L, H, D).transpose(1, 2)
    kv = randn(B, 77, 2 * H * D, device=device)
    k = kv[..., : H * D].view(B, 77, H, D).transpose(1, 2)  # a slice: row stride 2*H*D
    v = kv[..., H * D:].view(B, 77, H, D).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, v, backend=backend, dtype=torch.float32, scale=0.3)


@pytest.mark.parametrize("backend,device", CASES)
def test_custom_scale_and_grad_output_not_ones(backend, device):
    q, k, v = _qkv(1, 1, 9, 13, 64, torch.float32, device=device)
    _check(q, k, v, backend=backend, dtype=torch.float32, scale=0.05)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_large_logits_stay_finite_triton(backend, device):
    q, k, v = _qkv(1, 1, 16, 40, 64, torch.float32, device=device)
    with torch.no_grad():
        q.mul_(30.0)  # scores ~ +-1e3: the online softmax must not overflow
    _check(q, k, v, backend=backend, dtype=torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_auto_dispatch_by_device(device):
    """Auto choice follows the tensors' device, not the host: CPU tensors run the reference (the op has no
    C++ kernel) even on a GPU machine; CUDA tensors run Triton."""
    if device == "cuda" and _triton.interpret_mode():
        pytest.skip("TRITON_INTERPRET=1 in this session: Triton cannot run CUDA tensors")
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, grad=False, device=device)
    with dispatch.record_backends() as seen:
        fastdistill.fused_attention(q, k, v)
    assert seen == {(OP, "reference" if device == "cpu" else "triton")}


def test_matches_sdpa():
    q, k, v = _qkv(2, 2, 10, 77, 40, torch.float32, grad=False)
    mask = _mask((2, 2, 10, 77))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for backend in BACKENDS:
        with dispatch.use_backend(backend):
            got = fastdistill.fused_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_opcheck(backend, device):
    from fastdistill.ops import attention as mod

    q, k, v = _qkv(1, 2, 5, 7, 40, torch.float32, device=device)
    mask = _mask((1, 1, 1, 7), device=device)
    torch.library.opcheck(mod._fwd_op, (q, k, v, mask, 0.2, "bhld"))
    torch.library.opcheck(mod._fwd_op, (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.2,
                                        "blhd"))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_torch_compile_fullgraph(backend, device):
    q, k, v = _qkv(1, 2, 9, 77, 40, torch.float32, device=device)
    mask = _mask((1, 1, 77), device=device)

    def f(q, k, v, mask):
        return (fastdistill.fused_attention(q, k, v, attn_mask=mask) * 2).sum()

    with dispatch.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True)
        got = compiled(q, k, v, mask)
        gq, gk, gv = torch.autograd.grad(got, (q, k, v))
        want = f(q, k, v, mask)
        wq, wk, wv = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in ((gq, wq), (gk, wk), (gv, wv)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# ----------------------------------------------------------------------------------------------

def test_mismatched_head_dims():
    q = torch.randn(1, 2, 5, 40)
    k = torch.randn(1, 2, 7, 64)
    with pytest.raises(ValueError, match="head dims differ: q has head dim 40 but k has 64"):
        fastdistill.fused_attention(q, k, k)


def test_wrong_ndim():
    with pytest.raises(ValueError, match="q must have 4 dims"):
        fastdistill.fused_attention(torch.randn(2, 5, 40), torch.randn(1, 2, 5, 40), torch.randn(1, 2, 5, 40))
    with pytest.raises(ValueError, match="v must have 4 dims"):
        fastdistill.fused_attention(torch.randn(1, 2, 5, 40), torch.randn(1, 2, 5, 40), torch.randn(2, 5, 40))


@pytest.mark.parametrize("shape", [(2, 1, 6), (2, 7), (2, 3, 5, 7), (2, 2, 4, 6), (3, 1, 1, 7), (1, 2, 1, 5, 7)])
def test_mask_of_wrong_shape(shape):
    q = torch.randn(2, 2, 5, 16)
    k = torch.randn(2, 2, 7, 16)
    with pytest.raises(ValueError, match=r"attn_mask must have shape .*\(B, 1, Lk\) = \(2, 1, 7\)"):
        fastdistill.fused_attention(q, k, k, attn_mask=torch.zeros(shape))


def test_bad_mask_dtype():
    q = torch.randn(1, 1, 5, 16)
    with pytest.raises(TypeError, match="attn_mask must be an additive floating mask"):
        fastdistill.fused_attention(q, q, q, attn_mask=torch.ones(1, 1, 5, dtype=torch.bool))


def test_other_bad_inputs():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        fastdistill.fused_attention(q, q, q, layout="bld")
    with pytest.raises(TypeError, match="share one dtype"):
        fastdistill.fused_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fastdistill.fused_attention(q, q, torch.randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="same batch and head counts"):
        fastdistill.fused_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="head dim must be >= 1"):
        empty = torch.randn(1, 1, 2, 0)
        fastdistill.fused_attention(empty, empty, empty)
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        fastdistill.fused_attention(q.long(), q, q)
    with pytest.raises(TypeError, match="scale must be a float"):
        fastdistill.fused_attention(q, q, q, scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite"):
        fastdistill.fused_attention(q, q, q, scale=math.inf)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_rejects_float64_with_advice(backend, device):
    q = torch.randn(1, 1, 3, 16, dtype=torch.float64, device=device)
    with dispatch.use_backend(backend), pytest.raises(TypeError, match="use_backend\\('reference'\\)"):
        fastdistill.fused_attention(q, q, q)


def test_reference_is_plain_softmax_attention():
    q, k, v = _qkv(1, 2, 3, 4, 8, torch.float64, grad=False)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(attention_reference(q, k, v), torch.softmax(s, -1) @ v)


# ----------------------------------------------------------------------------------------------
# GPU (skipped without one): real UNet shapes, FlashAttention's relative test -- our bf16/fp16 error
# against an fp32 reference is at most 2x (output) / 3x (gradients) the error of PyTorch attention
# computed in the same low precision, plus a small floor.
# ----------------------------------------------------------------------------------------------

def _lowp_torch_attention(q, k, v):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 1024, 1024, 80), (2, 8, 4096, 77, 40), (2, 8, 256, 256, 160),
                                   (1, 10, 1024, 1024, 64), (2, 1, 256, 256, 256), (1, 2, 333, 1, 128)])
def test_gpu_unet_shapes_fa_style(shape, dtype):
    b, h, lq, lk, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).cuda() for n in (lq, lk, lk))
    do = torch.randn(b, h, lq, d, generator=gen).cuda()

    def run(fn, dt):
        qq, kk, vv = (t.to(dt).requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        grads = torch.autograd.grad(out, (qq, kk, vv), do.to(dt))
        return [out.float()] + [g.float() for g in grads]

    with dispatch.use_backend("triton"):
        ours = run(fastdistill.fused_attention, dtype)
    ref = run(_lowp_torch_attention, torch.float32)
    pt = run(_lowp_torch_attention, dtype)
    for i, (o, r, p) in enumerate(zip(ours, ref, pt)):
        factor = 2.0 if i == 0 else 3.0
        floor = 2 * (r + 0.3 - 0.3 - r).abs().max().item() + 1e-4
        err, err_pt = (o - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= factor * err_pt + floor, (i, err, err_pt)


@pytest.mark.gpu
def test_gpu_fp32_is_tf32_accurate():
    q, k, v = (torch.randn(2, 4, 300, 80, device="cuda", requires_grad=True) for _ in range(3))
    _check(q, k, v, backend="triton", dtype=torch.float32)


_AOT_SCRIPT = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdistill.kernels import attention as ka

PTRS = {"Q", "K", "V", "Out", "dO", "dK", "dV", "dQ", "dQacc", "Lse", "Delta", "Bias"}
F32_PTRS = {"Lse", "Delta", "Bias", "dQacc"}

def signature(fn, dtype, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in PTRS:
            sig[n] = "*fp32" if n in F32_PTRS else "*" + dtype
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig

for arch, dtype, d in [(90, "bf16", 80), (90, "bf16", 64), (80, "fp32", 256)]:
    esize = 4 if dtype == "fp32" else 2
    d0, d1 = ka.split_head_dim(d)
    bm, bn, w, st = ka._fwd_config(d0 + d1, 4096, 4096, esize)
    kbm, kbn, qbm, qbn, bw, bst = ka._bwd_config(d0 + d1, esize)
    fbm, fbn, fw, fst = ka._bwd_fast_config(d0 + d1, esize)
    common = dict(HAS_BIAS=True, D=d, D0=d0, D1=d1, DOT=tl.float32 if dtype == "fp32" else tl.bfloat16,
                  PREC="tf32" if dtype == "fp32" else None)
    jobs = [(ka._attn_fwd, dict(common, BLOCK_M=bm, BLOCK_N=bn), w, st),
            (ka._attn_bwd_preprocess, dict(D=d, D0=d0, D1=d1, BLOCK_M=64), 4, 1),
            (ka._attn_bwd_dkdv, dict(common, BLOCK_M=kbm, BLOCK_N=kbn), bw, bst),
            (ka._attn_bwd_dq, dict(common, BLOCK_M=qbm, BLOCK_N=qbn), bw, bst),
            (ka._attn_bwd_fused, dict(common, BLOCK_M=fbm, BLOCK_N=fbn), fw, fst)]
    for fn, consts, warps, stages in jobs:
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        limit = 232448 if arch == 90 else 166912
        assert k.metadata.shared <= limit, (fn.__name__, arch, dtype, k.metadata.shared)
        print("ok", arch, dtype, d, fn.__name__, k.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_without_one():
    """The CPU suite runs the kernels through the interpreter, which does not enforce GPU rules
    (tl.dot shapes, layouts, shared memory). Compile them ahead of time for sm_90 / sm_80 in a
    subprocess without TRITON_INTERPRET (no GPU needed) to catch those here."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu-marked tests compile and run the kernels for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTDISTILL_TEST_INTERPRET"] = "0"
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing: cannot compile for a GPU here")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 15, proc.stdout


# ----------------------------------------------------------------------------------------------
# SDPA semantics: fully masked rows, mask gradients, head dims beyond the kernel (issue 15 item 5).
# ----------------------------------------------------------------------------------------------

def _sdpa(q, k, v, *, attn_mask=None, scale=None):
    """The independent reference: torch's SDPA (float64 on the upcast copies the harness makes)."""
    mask = attn_mask.unsqueeze(1) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _fully_masked(shape, rows):
    """An additive mask (-inf drops) with the given query rows (index tuples over all but the last
    dim) fully masked and some other keys dropped."""
    keep = torch.rand(shape) > 0.4
    keep[..., 0] = True
    mask = torch.zeros(shape).masked_fill(~keep, float("-inf"))
    for r in rows:
        mask[r] = float("-inf")
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bhqk", "b1k-whole-sample"])
def test_fully_masked_rows_give_zero_and_zero_grad_like_sdpa(backend, kind):
    B, H, Lq, Lk, D = 2, 2, 7, 11, 16
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32)
    if kind == "bhqk":
        mask = _fully_masked((B, H, Lq, Lk), [(0, 1, 3), (1, 0, 0), (1, 1, 6)])
        dead_q = [(0, 1, 3), (1, 0, 0), (1, 1, 6)]
    else:  # diffusers' (B, 1, Lk) key mask with every key of sample 1 dropped
        mask = _fully_masked((B, 1, Lk), [(1, 0)])
        dead_q = [(1, h, i) for h in range(H) for i in range(Lq)]
    with dispatch.use_backend(backend):
        out = fastdistill.fused_attention(q, k, v, attn_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.rand_like(out) + 0.5)
    assert torch.isfinite(out).all(), f"{backend}: NaN/inf in the output of a fully masked row"
    for g, name in zip(grads, "qkv"):
        assert torch.isfinite(g).all(), f"{backend}: non-finite d{name}"
    for b, h, i in dead_q:
        assert out[b, h, i].abs().max().item() == 0.0 and grads[0][b, h, i].abs().max().item() == 0.0
    if kind == "b1k-whole-sample":  # no query attends to sample 1's keys: their gradients are 0
        assert grads[1][1].abs().max().item() == 0.0 and grads[2][1].abs().max().item() == 0.0
    # Values and gradients against float64 SDPA.
    _check_sdpa(q, k, v, backend=backend, attn_mask=mask)


def _check_sdpa(q, k, v, *, backend, **kw):
    rtol, grtol = _tols(torch.float32, backend)
    return check_against_reference(fastdistill.fused_attention, _sdpa, (q, k, v), kw, dtype=torch.float32,
                                   backend=backend, rtol=rtol, grad_rtol=grtol)


def test_reference_masked_rows_float64_and_half():
    # The reference's own dtypes (fp64 math, fp32 math for bf16): zero rows, no NaN.
    for dtype in (torch.float64, torch.bfloat16):
        q = torch.randn(1, 1, 3, 8, dtype=dtype)
        mask = torch.zeros(1, 1, 3, 3)
        mask[0, 0, 1] = float("-inf")
        out = attention_reference(q, q, q, attn_mask=mask)
        assert torch.isfinite(out.float()).all() and out[0, 0, 1].abs().max().item() == 0.0


@pytest.mark.parametrize("mask_shape", [(2, 1, 9), (2, 2, 5, 9), (1, 1, 5, 9), (2, 1, 1, 9)])
def test_mask_that_requires_grad_gets_its_gradient(mask_shape):
    # Reference path (and automatic dispatch on CPU): the mask gradient equals float64 SDPA's,
    # including the sum over broadcast dims.
    q, k, v = _qkv(2, 2, 5, 9, 16, torch.float32)
    mask = (randn(*mask_shape) * 2).requires_grad_(True)
    for backend in ("reference", None):
        res = check_against_reference(fastdistill.fused_attention, _sdpa, (q, k, v), {"attn_mask": mask},
                                      dtype=torch.float32, backend=backend, rtol=2e-5, grad_rtol=5e-5)
        assert res.grads[-1] is not None and res.grads[-1].abs().max().item() > 0


@pytest.mark.parametrize("backend", TRITON)
def test_forced_triton_refuses_mask_grad_and_big_head_dim(backend):
    q, k, v = _qkv(1, 1, 4, 6, 16, torch.float32)
    mask = torch.zeros(1, 1, 6, requires_grad=True)
    with dispatch.use_backend(backend), pytest.raises(dispatch.BackendUnavailableError,
                                                      match="computes no mask gradient"):
        fastdistill.fused_attention(q, k, v, attn_mask=mask)
    with dispatch.use_backend(backend), torch.no_grad():  # no grad needed: the kernel takes the mask
        fastdistill.fused_attention(q, k, v, attn_mask=mask)
    big = torch.randn(1, 1, 3, 264)
    with dispatch.use_backend(backend), pytest.raises(dispatch.BackendUnavailableError, match="head dim 264 > 256"):
        fastdistill.fused_attention(big, big, big)


@pytest.mark.parametrize("d", [264, 320])
def test_head_dims_above_the_kernel_run_the_reference(d):
    q, k, v = _qkv(1, 2, 5, 7, d, torch.float32)
    _check_sdpa(q, k, v, backend="reference")
    _check_sdpa(q, k, v, backend=None)  # automatic dispatch on CPU


def test_auto_dispatch_falls_back_with_one_warning(monkeypatch):
    """Where automatic dispatch would pick Triton (CUDA), calls the kernel cannot take run the
    reference with one FallbackWarning per reason, recorded as reference. Simulated on CPU."""
    import warnings

    from fastdistill.ops import attention as mod

    monkeypatch.setattr(mod, "_triton_would_run", lambda device: True)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    q, k, v = _qkv(1, 1, 4, 6, 272, torch.float32)
    mask = torch.zeros(1, 1, 6, requires_grad=True)
    q16 = torch.randn(1, 1, 4, 16)
    with warnings.catch_warnings(record=True) as caught, dispatch.record_backends() as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            fastdistill.fused_attention(q, k, v)
            fastdistill.fused_attention(q16, torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16), attn_mask=mask)
    msgs = [str(w.message) for w in caught if issubclass(w.category, dispatch.FallbackWarning)]
    assert len(msgs) == 2, msgs
    assert any("head dim 272 > 256" in m for m in msgs) and any("no mask gradient" in m for m in msgs)
    assert seen == {(OP, "reference")}
    assert mod.triton_fallback_reason(q16, None) is None
    assert "head dim 272" in mod.triton_fallback_reason(q)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("d", [3, 13, 100])
def test_triton_takes_head_dims_that_are_not_multiples_of_8(backend, d):
    # The kernel masks the columns past D, so no head dim up to 256 needs a fallback.
    q, k, v = _qkv(1, 1, 9, 12, d, torch.float32)
    _check(q, k, v, backend=backend, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The two backward paths (issue 16): by default the fast one (kernels.attention._attn_bwd_fused: one
# recompute per tile pair, 5 GEMMs, dq through fp32 atomics); under torch.use_deterministic_algorithms(True)
# the two kernels without atomics (_attn_bwd_dkdv + _attn_bwd_dq: 7 GEMMs, bit-identical runs).
# The other tests of this file run the fast path (the default).
# ----------------------------------------------------------------------------------------------

PATHS = ["fast", "deterministic"]
# Launch-grid names of each path's backward kernels (besides the shared delta preprocess).
PATH_KERNELS = {"fast": {"attention.bwd_fused"}, "deterministic": {"attention.bwd_dkdv", "attention.bwd_dq"}}


@contextlib.contextmanager
def _path(path):
    """Select a backward path the way users do. warn_only: the GPU reference's cuBLAS calls would raise
    under strict determinism without CUBLAS_WORKSPACE_CONFIG; the kernels read only whether it is on."""
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(path == "deterministic", warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _bwd_kernels(grids):
    return {name for name, _ in grids if name.startswith("attention.bwd") and name != "attention.bwd_preprocess"}


# (dtype, head dim, Lq, Lk, mask shape): tails everywhere (the interpreter's tiles are 32-64 rows, capped to
# the data), several key tiles adding into one dq row, both head-dim sub-blocks, masks.
PATH_CASES = {
    "fp32-d40-1x77": (torch.float32, 40, 1, 77, None),  # one query row, a partial second key tile
    "bf16-d80-33x77-bhqk": (torch.bfloat16, 80, 33, 77, (1, 2, 33, 77)),  # 64+16 split, dense mask
    "fp16-d160-17x70-b1k": (torch.float16, 160, 17, 70, (1, 1, 70)),  # 128+32 split, diffusers' key mask
    "fp32-d64-77x33-bh1k": (torch.float32, 64, 77, 33, (1, 2, 1, 33)),  # Lq > Lk: 3 query tiles per key tile
    "bf16-d40-19x1": (torch.bfloat16, 40, 19, 1, None),  # a single key
}


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("case", list(PATH_CASES))
@pytest.mark.parametrize("path", PATHS)
def test_backward_paths_against_float64(backend, device, path, case):
    dtype, d, lq, lk, mask_shape = PATH_CASES[case]
    q, k, v = _qkv(1, 2, lq, lk, d, dtype, device=device)
    if lk == 1:  # softmax over one key is 1: dq = dk = 0 exactly; see test_lengths (only dv is compared)
        q.requires_grad_(False)
        k.requires_grad_(False)
    kw = {} if mask_shape is None else {"attn_mask": _mask(mask_shape, dtype, device)}
    with _path(path), launch_grid.recording() as grids:
        _check(q, k, v, backend=backend, dtype=dtype, **kw)
    assert _bwd_kernels(grids) == PATH_KERNELS[path]


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_backward_paths_fully_masked_rows(backend, device, path):
    # lse = +inf for a row whose keys are all -inf: p = 0, so zero (finite) dq rows (on the fast path: zero
    # adds from each of the 2 key tiles), and keys that no live query sees get zero dk/dv.
    B, H, Lq, Lk, D = 2, 2, 7, 70, 40
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, device=device)
    mask = _fully_masked((B, 1, Lk), [(1, 0)]).to(device)  # every key of sample 1 dropped
    dmask = _fully_masked((B, H, Lq, Lk), [(0, 1, 3), (0, 0, 6)]).to(device)
    with _path(path), dispatch.use_backend(backend):
        out = fastdistill.fused_attention(q, k, v, attn_mask=mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.rand_like(out) + 0.5)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert dq[1].abs().max().item() == 0 and dk[1].abs().max().item() == 0 and dv[1].abs().max().item() == 0
    with _path(path):
        res = _check_sdpa(q, k, v, backend=backend, attn_mask=dmask)
    assert res.grads[0][0, 1, 3].abs().max().item() == 0 and res.grads[0][0, 0, 6].abs().max().item() == 0


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_backward_repeats(backend, device, path):
    """Two runs of the backward on the same inputs. Deterministic path: bit-identical everywhere. Fast path:
    dq's fp32 atomic adds land in whatever order the GPU runs the key tiles, so on a GPU dq may differ in its
    last bits (dk and dv are reduced in registers in a fixed order: identical). The interpreter runs the
    programs one at a time, so races are invisible on CPU and the fast path repeats exactly there; the GPU
    run of this test (scripts/gpu_check.sh runs the gpu-marked cases) is the real race check."""
    # 150 keys: 3 key tiles (interpreter tiles of 64) add into every dq row.
    q, k, v = _qkv(1, 2, 40, 150, 40, torch.bfloat16, device=device)
    mask = _mask((1, 1, 150), torch.bfloat16, device)
    do = randn(1, 2, 40, 40, dtype=torch.bfloat16, device=device)

    def grads():
        with _path(path), dispatch.use_backend(backend):
            out = fastdistill.fused_attention(q, k, v, attn_mask=mask)
            return torch.autograd.grad(out, (q, k, v), do)

    first, second = grads(), grads()
    racy = path == "fast" and device != "cpu"
    for i, (a, b) in enumerate(zip(first, second)):
        if racy and i == 0:
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * a.abs().max().item())
        else:
            assert torch.equal(a, b), f"{path}: grad {i} differs between two runs"


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_gpu_backward_repeats_on_real_shapes(path):
    """Race check on a GPU shape with many key tiles adding into each dq row (atomics contend)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(2, 8, 1024, 64, generator=gen).cuda().bfloat16() for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def grads():
        with _path(path), dispatch.use_backend("triton"):
            return torch.autograd.grad(fastdistill.fused_attention(q, k, v), (q, k, v), do)

    runs = [grads() for _ in range(3)]
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            if path == "fast" and i == 0:  # dq: atomics, ulp-level differences allowed
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * a.abs().max().item())
            else:
                assert torch.equal(a, b), f"{path}: grad {i} differs between runs"
