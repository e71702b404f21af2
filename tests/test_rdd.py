"""RDD: fused_rdd_loss / memory_p2p_loss / rcfd_loss against dense float64 formulas, and the drop-in
modules against a dense einsum re-implementation of the official classes (cantbebetter2/RDD
losses/losses.py), including queue contents bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdistill
from fastdistill import testing
from fastdistill.nn.rdd import IntraSampleP2PLoss, MemoryP2PLoss, RCFDLoss, RDDLoss
from fastdistill.ops.rdd import fused_rdd_loss, memory_p2p_loss, rcfd_loss

BACKENDS = testing.backends_under_test("fused_rdd_loss")
# (backend, device) cases: CPU ones, and the *-cuda ones (gpu-marked; skipped with the reason without a GPU).
CASES = testing.backend_device_params("fused_rdd_loss")
MEMORY_CASES = testing.backend_device_params("memory_p2p_loss")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# bf16 gradients: the logits' dot operands carry 8 mantissa bits, and dl = p_S - p_T cancels, so the
# max-norm relative error has a tail (median 0.7%, 1 in ~200 draws near 4% on 4x4-pixel maps). Re-measured
# with the interpreter's GPU rounding (kernels/_common.py), 10 fresh draws per dtype: gradients bf16 1.8e-2,
# fp16 1.5e-3; values bf16 1.6e-3, fp16 2e-4.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


# Value and gradient against float64, with `backend` forced for the forward and backward passes.
check = testing.check_against_reference


# ---------------------------------------------------------------------------------------------
# Dense re-implementations of the official formulas (einsum; materialise everything)

def official_is_p2p(feat_S, feat_T, temperature=1.0, pairs="all"):
    """``Intra_sample_p2p_loss.forward`` (factor 1) / ``IntraImageMiniBatch`` for pairs="intra"."""
    feat_T = feat_T.detach()

    def sim(f):
        B, C, H, W = f.shape
        f = F.normalize(f, p=2, dim=1)
        f0 = f.reshape(B, C, -1).transpose(1, 2)
        f1 = f.reshape(B, C, -1)
        if pairs == "all":
            m = torch.einsum("bic,dcj->bdij", f0, f1)
        else:
            m = torch.bmm(f0, f1)
        return m.reshape(-1, m.shape[-1])

    p_s = F.log_softmax(sim(feat_S) / temperature, dim=1)
    p_t = F.softmax(sim(feat_T) / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean")


def official_memory_term(s_feats, t_feats, contrast, tau_c=0.1, tau_kd=1.0):
    """The loss part of ``Memory_p2p_loss.forward`` given the contrast rows (s_feats already projected)."""
    t_feats = F.normalize(t_feats.detach(), p=2, dim=1)
    s_feats = F.normalize(s_feats, p=2, dim=1)
    B, C = s_feats.shape[:2]
    t = t_feats.reshape(B, C, -1).transpose(1, 2)
    s = s_feats.reshape(B, C, -1).transpose(1, 2)
    t_logits = torch.matmul(t, contrast.T) / tau_c
    s_logits = torch.matmul(s, contrast.T) / tau_c
    p_s = F.log_softmax(s_logits / tau_kd, dim=2)
    p_t = F.softmax(t_logits / tau_kd, dim=2)
    return F.kl_div(p_s, p_t, reduction="batchmean") * tau_kd ** 2 / p_s.shape[1]


class OfficialMemoryP2P(nn.Module):
    """``Memory_p2p_loss`` as in the official file, minus ``.cuda()``/dist (single process) and with a
    plain BatchNorm2d in place of SyncBatchNorm (identical math on one process)."""

    def __init__(self, pixel_memory_size=20000, pixel_contrast_size=4096, contrast_kd_temperature=1.0,
                 contrast_temperature=0.1, s_channels=1920, t_channels=1920, factor=0.1):
        super().__init__()
        self.contrast_kd_temperature = contrast_kd_temperature
        self.contrast_temperature = contrast_temperature
        self.project_head = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False),
                                          nn.BatchNorm2d(t_channels), nn.ReLU(True),
                                          nn.Conv2d(t_channels, t_channels, 1, bias=False))
        self.pixel_memory_size = pixel_memory_size
        self.pixel_update_freq = 128
        self.factor = factor
        self.register_buffer("teacher_pixel_queue", torch.randn(pixel_memory_size, t_channels))
        self.teacher_pixel_queue = F.normalize(self.teacher_pixel_queue, p=2, dim=1)
        self.register_buffer("pixel_queue_ptr", torch.zeros(1, dtype=torch.long))
        self.sampled_indices = torch.round(torch.linspace(0, pixel_memory_size - 1, pixel_contrast_size)).long()

    def _dequeue_and_enqueue(self, keys):
        pixel_queue = self.teacher_pixel_queue
        _, feat_dim, _, _ = keys.size()
        this_feat = keys.contiguous().view(feat_dim, -1)
        num_pixel = this_feat.shape[1]
        perm = torch.randperm(num_pixel)
        K = min(num_pixel, self.pixel_update_freq)
        feat = torch.transpose(this_feat[:, perm[:K]], 0, 1)
        ptr = int(self.pixel_queue_ptr[0])
        if ptr + K >= self.pixel_memory_size:
            pixel_queue[-K:, :] = F.normalize(feat, p=2, dim=1)
            self.pixel_queue_ptr[0] = 0
        else:
            pixel_queue[ptr:ptr + K, :] = F.normalize(feat, p=2, dim=1)
            self.pixel_queue_ptr[0] = (self.pixel_queue_ptr[0] + K) % self.pixel_memory_size

    def forward(self, s_feats, t_feats):
        t_feats = F.normalize(t_feats, p=2, dim=1)
        s_feats = self.project_head(s_feats)
        with torch.no_grad():
            self._dequeue_and_enqueue(t_feats.detach().clone())
        contrast = self.teacher_pixel_queue[self.sampled_indices, :]
        return official_memory_term(s_feats, t_feats, contrast, self.contrast_temperature,
                                    self.contrast_kd_temperature) * self.factor


def _maps(B, Cs, Ct, H, W, dtype, gen, channels_last=False, device="cpu"):
    s = testing.randn(B, Cs, H, W, dtype=dtype, gen=gen, device=device)
    t = testing.randn(B, Ct, H, W, dtype=dtype, gen=gen, device=device).relu()  # post-ReLU like DenseNet's final_norm
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s.requires_grad_(True), t


# ---------------------------------------------------------------------------------------------
# fused_rdd_loss

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 2, 3), (1, 4, 4, 3, 3), (4, 9, 6, 5, 1), (2, 3, 3, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fused_rdd_loss_matches_official(backend, device, dtype, shape):
    B, Cs, Ct, H, W = shape
    s, t = _maps(B, Cs, Ct, H, W, dtype, testing.generator(), device=device)
    if H * W == 1:  # a single pixel per sample: every softmax is over one key, KL is exactly 0
        with fastdistill.use_backend(backend):
            loss = fused_rdd_loss(s, t)
        (g,) = torch.autograd.grad(loss, [s])
        assert abs(loss.item()) < 1e-5 and g.abs().max().item() < 1e-4
        return
    check(fused_rdd_loss, official_is_p2p, [s, t], dict(temperature=0.8), dtype=dtype, backend=backend,
          rtol=RTOL[dtype], grad_rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend,device", CASES)
def test_fused_rdd_loss_intra_channels_last(backend, device):
    s, t = _maps(3, 6, 4, 3, 5, torch.float32, testing.generator(), channels_last=True, device=device)
    check(fused_rdd_loss, official_is_p2p, [s, t], dict(temperature=0.5, pairs="intra"), dtype=torch.float32,
          backend=backend, rtol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_fused_rdd_loss_cifar_shape_scaled_down(backend, device):
    """Official CIFAR shape (32, 1920, 4, 4), scaled to (6, 160, 4, 4): C above one channel tile."""
    s, t = _maps(6, 160, 160, 4, 4, torch.float32, testing.generator(), device=device)
    check(fused_rdd_loss, official_is_p2p, [s, t], dtype=torch.float32, backend=backend, rtol=1e-4,
          grad_rtol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_fused_rdd_loss_zero_pixel(backend, device):
    """An all-zero pixel: F.normalize clamps its norm at 1e-12 (a zero row, gradient dy / 1e-12)."""
    s, t = _maps(2, 5, 4, 2, 3, torch.float32, testing.generator(), device=device)
    s = s.detach().clone()
    s[1, :, 0, 2] = 0
    s.requires_grad_(True)
    check(fused_rdd_loss, official_is_p2p, [s, t], dtype=torch.float32, backend=backend, rtol=1e-4,
          grad_rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# memory_p2p_loss

@pytest.mark.parametrize("backend,device", MEMORY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [True, False])
def test_memory_p2p_loss_matches_official(backend, device, dtype, with_index):
    gen = testing.generator()
    s, t = _maps(2, 7, 7, 3, 2, dtype, gen, device=device)
    bank = F.normalize(testing.randn(30, 7, gen=gen, device=device), dim=1).to(dtype)
    index = torch.round(torch.linspace(0, 29, 11, device=device)).long() if with_index else None

    def ref(s, t, bank):
        contrast = bank[index] if index is not None else bank
        return official_memory_term(s, t, contrast, 0.1, 1.5)

    check(lambda s, t, bank: memory_p2p_loss(s, t, bank, index=index, temperature=0.1, kd_temperature=1.5),
          ref, [s, t, bank], dtype=dtype, backend=backend, rtol=RTOL[dtype], grad_rtol=GRAD_RTOL[dtype])


def test_memory_p2p_loss_fp32_bank_with_bf16_features():
    """Autocast-style mix: the fp32 bank meets bf16 features (GEMM in bf16, fp32 accumulation)."""
    gen = testing.generator()
    s, t = _maps(2, 5, 5, 2, 2, torch.bfloat16, gen)
    bank = F.normalize(testing.randn(20, 5, gen=gen), dim=1)
    for b in BACKENDS:
        with fastdistill.use_backend(b):
            got = memory_p2p_loss(s, t, bank)
        want = official_memory_term(s.double(), t.double(), bank.to(torch.bfloat16).double())
        testing.assert_close(got, want, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# rcfd_loss

@pytest.mark.parametrize("dtype", DTYPES)
def test_rcfd_loss_matches_official(dtype):
    gen = testing.generator()
    zs = testing.randn(5, 13, dtype=dtype, gen=gen, requires_grad=True)
    zt = testing.randn(5, 13, dtype=dtype, gen=gen)

    def ref(zs, zt, temperature):
        return F.kl_div(F.log_softmax(zs, dim=-1), F.softmax(zt.detach() / temperature, dim=-1),
                        reduction="batchmean")

    testing.check_against_reference(rcfd_loss, ref, [zs, zt], dict(temperature=0.9), dtype=dtype,
                                    rtol=RTOL[dtype], grad_rtol=GRAD_RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# Drop-in modules

@pytest.mark.parametrize("backend,device", CASES)
def test_intra_sample_module_matches_official(backend, device):
    s, t = _maps(3, 8, 5, 2, 2, torch.float32, testing.generator(), device=device)
    mod = IntraSampleP2PLoss(temperature=0.7, pooling=False, factor=0.3)
    check(lambda s, t: mod(s, t), lambda s, t: official_is_p2p(s, t, 0.7) * 0.3, [s, t], dtype=torch.float32,
          backend=backend, rtol=1e-4, grad_rtol=1e-4)


@pytest.mark.parametrize("layout", ["official", "pixel"])
def test_memory_module_matches_official_bit_for_bit_queue(layout):
    kw = dict(pixel_memory_size=40, pixel_contrast_size=9, contrast_kd_temperature=1.3,
              contrast_temperature=0.2, s_channels=6, t_channels=5, factor=0.1)
    torch.manual_seed(1234)
    off = OfficialMemoryP2P(**kw)
    torch.manual_seed(1234)
    ours = MemoryP2PLoss(**kw, queue_layout=layout)
    sd = off.state_dict()
    assert set(sd) == set(ours.state_dict())  # official checkpoints load (same names and shapes)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k  # same construction order: same weights and queue
    ours.load_state_dict(sd)
    gen = testing.generator()
    for step in range(4):  # 4 x 12 pixels into 40 rows: the 4th write wraps (last 12 rows, ptr 0)
        s = testing.randn(3, 6, 2, 2, gen=gen, requires_grad=True)
        t = testing.randn(3, 5, 2, 2, gen=gen).relu()
        if layout == "official":
            torch.manual_seed(step)
            want = off(s, t)
        else:
            want = None
        torch.manual_seed(step)
        got = ours(s, t)
        if want is not None:
            assert torch.equal(ours.teacher_pixel_queue, off.teacher_pixel_queue)
            assert torch.equal(ours.pixel_queue_ptr, off.pixel_queue_ptr)
            testing.assert_close(got, want, rtol=1e-5)
            gs = torch.autograd.grad(got, [s, *ours.project_head.parameters()])
            ws = torch.autograd.grad(want, [s, *off.project_head.parameters()])
            for a, b in zip(gs, ws):
                testing.assert_close(a, b, rtol=1e-4)
        else:
            # Pixel layout: the enqueued rows are true pixel vectors of the normalised teacher.
            tn = F.normalize(t, dim=1).permute(1, 0, 2, 3).reshape(5, -1)
            torch.manual_seed(step)
            perm = torch.randperm(tn.shape[1])[:12]
            rows = F.normalize(tn[:, perm].T, dim=1)
            ptr_before = (step * 12) % 40 if step * 12 + 12 < 40 else None
            if ptr_before is not None:
                assert torch.equal(ours.teacher_pixel_queue[ptr_before:ptr_before + 12], rows)
            else:
                assert torch.equal(ours.teacher_pixel_queue[-12:], rows)
    assert int(ours.pixel_queue_ptr) == 0  # 36 + 12 >= 40: wrapped to 0


def test_official_view_layout_differs_from_pixel_layout():
    keys = torch.arange(4 * 6 * 2 * 2, dtype=torch.float32).view(4, 6, 2, 2)
    official = keys.contiguous().view(6, -1)
    assert official[:, 0].tolist() == [0, 16, 32, 48, 64, 80]  # methods.md 1.4: strided mix
    assert keys.permute(1, 0, 2, 3).reshape(6, -1)[:, 0].tolist() == [0, 4, 8, 12, 16, 20]


def test_rcfd_and_rdd_modules_combine_terms():
    torch.manual_seed(0)
    gen = testing.generator()
    s, t = _maps(2, 4, 4, 2, 3, torch.float32, gen)
    zs, zt = testing.randn(2, 10, gen=gen), testing.randn(2, 10, gen=gen)
    rdd = RDDLoss(4, 4, pixel_memory_size=30, pixel_contrast_size=7, rcfd_weight=2.0)
    torch.manual_seed(5)
    total, terms = rdd(s, t, zs, zt, return_terms=True)
    assert set(terms) == {"rcfd", "is_p2p", "memory_p2p"}
    testing.assert_close(total, sum(terms.values()), rtol=1e-6)
    testing.assert_close(terms["rcfd"], 2.0 * RCFDLoss(0.9)(zs, zt), rtol=1e-6)
    testing.assert_close(terms["is_p2p"], official_is_p2p(s, t), rtol=1e-4)
    rdd2 = RDDLoss(4, 4, memory=False)
    assert set(rdd2(s, t, return_terms=True)[1]) == {"is_p2p"}
    total.backward()
    assert s.grad is not None and rdd.memory_p2p.project_head[0].weight.grad is not None


@pytest.mark.slow
def test_torch_compile_fullgraph_modules():
    gen = testing.generator()
    s, t = _maps(2, 4, 4, 2, 2, torch.float32, gen)
    is_mod = IntraSampleP2PLoss(0.5)
    with fastdistill.use_backend("reference"):
        f = torch.compile(lambda s, t: is_mod(s, t) + rcfd_loss(s.flatten(1), t.flatten(1)), fullgraph=True,
                          backend="aot_eager")
        got = f(s, t)
        want = is_mod(s, t) + rcfd_loss(s.flatten(1), t.flatten(1))
        testing.assert_close(got, want, rtol=1e-6)
        testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-6)
        mem = MemoryP2PLoss(pixel_memory_size=20, pixel_contrast_size=5, s_channels=4, t_channels=4)
        cm = torch.compile(mem, fullgraph=True, backend="aot_eager")
        loss = cm(s, t)
        loss.backward()
        assert torch.isfinite(loss) and int(mem.pixel_queue_ptr) == 8


def test_process_group_none_matches_default():
    s, t = _maps(2, 3, 3, 2, 2, torch.float32, testing.generator())
    assert torch.equal(fused_rdd_loss(s, t), fused_rdd_loss(s, t, process_group=None))


@pytest.mark.parametrize("call, match", [
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4)), "batch size"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 5)), "spatial size"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4), torch.ones(2, 3, 4)), "student"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), temperature=0), "temperature"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.ones(2, 3, 4, 4)), "student"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4, device="meta")), "same device"),
    (lambda: fused_rdd_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), pairs="x"), "pairs"),
    (lambda: memory_p2p_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 4, 4, 4), torch.ones(5, 3)), "channel"),
    (lambda: memory_p2p_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.ones(5, 4)), "bank"),
    (lambda: memory_p2p_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.ones(5, 3),
                             index=torch.tensor([0, 5])), "index"),
    (lambda: memory_p2p_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.ones(5, 3),
                             index=torch.tensor([0.0])), "index"),
    (lambda: memory_p2p_loss(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.ones(5, 3),
                             kd_temperature=-1), "kd_temperature"),
    (lambda: rcfd_loss(torch.ones(2, 3), torch.ones(2, 4)), "shape"),
    (lambda: rcfd_loss(torch.ones(2, 3), torch.ones(2, 3), temperature=0), "temperature"),
    (lambda: MemoryP2PLoss(queue_layout="nchw"), "queue_layout"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_autocast_bf16():
    """Under autocast the projection head yields bf16 features against the fp32 queue: the loss still
    runs forward and backward and stays close to the fp32 value."""
    torch.manual_seed(0)
    s, t = _maps(3, 6, 6, 3, 3, torch.float32, testing.generator())
    mod = RDDLoss(6, 6, pixel_memory_size=40, pixel_contrast_size=9)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    torch.manual_seed(1)
    want = mod(s, t)
    mod.load_state_dict(state)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(s, t)
    assert got.dtype == torch.float32
    testing.assert_close(got, want, rtol=5e-2)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 320, 16, 16), (8, 1920, 4, 4), (2, 64, 9, 13)])
def test_gpu_triton_matches_float64(shape):
    B, C, H, W = shape
    gen = testing.generator()
    s = testing.randn(B, C, H, W, dtype=torch.bfloat16, device="cuda", gen=gen, requires_grad=True)
    t = testing.randn(B, C, H, W, dtype=torch.bfloat16, device="cuda", gen=gen).relu()
    check(fused_rdd_loss, official_is_p2p, [s, t], dtype=torch.bfloat16, backend="triton", rtol=2e-2,
          grad_rtol=5e-2)
    bank = F.normalize(testing.randn(500, C, device="cuda", gen=gen), dim=1)
    index = torch.round(torch.linspace(0, 499, 128, device="cuda")).long()
    check(lambda s, t: memory_p2p_loss(s, t, bank, index=index), lambda s, t: official_memory_term(
        s, t, bank[index].double().to(torch.bfloat16).double()), [s, t], dtype=torch.bfloat16, backend="triton",
        rtol=2e-2, grad_rtol=5e-2)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the fused pixel normalisation is a Triton kernel")
def test_opcheck_pixel_normalize():
    from fastdistill.ops import rdd as mod

    x = testing.randn(2, 5, 3, 2, gen=testing.generator(), requires_grad=True)
    torch.library.opcheck(mod._pixnorm_fwd_op, (x,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y = mod.pixels(xc, "triton")
    (g,) = torch.autograd.grad(y, xc, torch.ones_like(y))
    assert g.is_contiguous(memory_format=torch.channels_last)
    ref = F.normalize(x.detach().permute(0, 2, 3, 1).reshape(-1, 5), dim=1)
    testing.assert_close(y, ref, rtol=1e-6)


def test_projection_head_batch_norm_is_batchnorm_without_a_group_and_keeps_syncbn_state():
    from fastdistill.nn.rdd import _SyncBatchNorm

    torch.manual_seed(0)
    ours, ref = _SyncBatchNorm(7), torch.nn.BatchNorm2d(7)
    assert set(ours.state_dict()) == set(torch.nn.SyncBatchNorm(7).state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 5, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        y, y_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x_ref, g)[0])
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
