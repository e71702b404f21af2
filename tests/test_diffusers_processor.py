"""FusedAttnProcessor reproduces AttnProcessor2_0 (outputs and gradients) on Attention modules of
every flavour and on tiny UNet2DModel / UNet2DConditionModel; enable/disable on bare and wrapped
models."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

import fastdistill  # noqa: E402
from fastdistill import dispatch  # noqa: E402
from fastdistill.diffusers import (  # noqa: E402
    FusedAttnProcessor,
    attention_modules,
    disable_fused_attention,
    enable_fused_attention,
    unwrap_model,
)
from fastdistill.testing import assert_close, backends_under_test  # noqa: E402

BACKENDS = backends_under_test("fused_attention")
FAST = [b for b in BACKENDS if b != "reference"] or ["reference"]


def _unet2d() -> UNet2DModel:
    # ecosystem.md 2.1 "UNet2DModel hd32" at sample 16: attention L=64 (2 heads x 32) and mid L=4.
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       attention_head_dim=32, norm_num_groups=8)


def _unet_cond() -> UNet2DConditionModel:
    # ecosystem.md 2.1 "SD-like hd32" at sample 8: self L=64 (2 x 32), cross 64 x 7, mid 4 x 32.
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32)


def _grads(model: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for i, t in enumerate(inputs):
        out[f"input{i}"] = t.grad.clone()
    return out


def _run(model, fwd, inputs, backend):
    for t in inputs:
        t.grad = None
    model.zero_grad(set_to_none=True)
    with dispatch.use_backend(backend):
        y = fwd(model)
        w = torch.linspace(0.5, 1.5, y.numel()).view_as(y)  # a non-uniform upstream gradient
        (y * w).sum().backward()
    return y.detach(), _grads(model, inputs)


def _compare(stock, fused, rtol=2e-4):
    y0, g0 = stock
    y1, g1 = fused
    assert_close(y1, y0, rtol=rtol, name="output")
    assert g0.keys() == g1.keys()
    for name in g0:
        assert_close(g1[name], g0[name], rtol=rtol * 5, name=f"grad {name}", floor=1e-3)


@pytest.mark.parametrize("backend", FAST)
def test_unet2d_model_fused_equals_stock(backend):
    torch.manual_seed(0)
    unet = _unet2d()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t = torch.tensor([10, 500])

    def fwd(m):
        return m(x, t).sample

    stock = _run(unet, fwd, [x], backend)
    assert not hasattr(UNet2DModel, "set_attn_processor")
    n = enable_fused_attention(unet)
    assert n == len(attention_modules(unet)) == 4  # 1 down, 2 up, 1 mid
    assert all(isinstance(m.processor, FusedAttnProcessor) for m in attention_modules(unet).values())
    with dispatch.record_backends() as seen:
        fused = _run(unet, fwd, [x], backend)
    assert ("fused_attention", backend) in seen
    _compare(stock, fused)
    assert disable_fused_attention(unet) == 4
    assert all(type(m.processor) is AttnProcessor2_0 for m in attention_modules(unet).values())


@pytest.mark.parametrize("backend", FAST)
def test_unet2d_condition_model_fused_equals_stock_with_mask(backend):
    torch.manual_seed(0)
    unet = _unet_cond()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ehs = torch.randn(2, 7, 64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # becomes an additive (B, 1, 7) bias

    def fwd(m):
        return m(x, torch.tensor([3, 700]), ehs, encoder_attention_mask=mask).sample

    stock = _run(unet, fwd, [x, ehs], backend)
    n = enable_fused_attention(unet)
    assert n == len(unet.attn_processors) == 8  # (1 down + 2 up + 1 mid) x (self, cross)
    assert all(isinstance(p, FusedAttnProcessor) for p in unet.attn_processors.values())
    fused = _run(unet, fwd, [x, ehs], backend)
    _compare(stock, fused)
    disable_fused_attention(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    again = _run(unet, fwd, [x, ehs], backend)
    _compare(stock, again, rtol=1e-6)


def _attn_cases():
    yield "plain-3d", dict(query_dim=64, heads=2, dim_head=32), (2, 9, 64), None, None
    yield "cross+norm_cross", dict(query_dim=64, cross_attention_dim=24, heads=2, dim_head=40,
                                   cross_attention_norm="layer_norm"), (2, 9, 64), (2, 77, 24), None
    yield "group_norm-4d+residual+rescale", dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=4,
                                                 residual_connection=True, rescale_output_factor=2.0,
                                                 bias=True), (2, 32, 3, 5), None, None
    yield "spatial_norm-4d", dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4), (1, 32, 4, 4), None, None
    yield "qk_norm", dict(query_dim=64, heads=2, dim_head=32, qk_norm="layer_norm"), (2, 5, 64), None, None
    yield "mask-b1k", dict(query_dim=64, cross_attention_dim=16, heads=2, dim_head=32), (2, 5, 64), (2, 77, 16), \
        "b1k"
    yield "mask-bqk", dict(query_dim=64, heads=2, dim_head=32), (2, 6, 64), None, "bqk"
    yield "mask-bool", dict(query_dim=64, heads=2, dim_head=32), (2, 6, 64), None, "bool"
    yield "legacy-scale_qk-off", dict(query_dim=64, heads=2, dim_head=32, scale_qk=False), (1, 5, 64), None, None


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", list(_attn_cases()), ids=lambda c: c[0])
def test_attention_module_flavours(backend, case):
    name, kwargs, hshape, eshape, mask_kind = case
    torch.manual_seed(1)
    attn = Attention(**kwargs)
    h = torch.randn(*hshape, requires_grad=True)
    ehs = torch.randn(*eshape, requires_grad=True) if eshape else None
    lk = eshape[1] if eshape else (hshape[1] if len(hshape) == 3 else hshape[2] * hshape[3])
    lq = hshape[1] if len(hshape) == 3 else hshape[2] * hshape[3]
    mask = None
    if mask_kind == "b1k":
        mask = torch.where(torch.rand(hshape[0], 1, lk) > 0.3, 0.0, -10000.0)
    elif mask_kind == "bqk":
        mask = torch.randn(hshape[0], lq, lk)
    elif mask_kind == "bool":
        mask = torch.rand(hshape[0], 1, lk) > 0.3
        mask[..., 0] = True
    temb = torch.randn(hshape[0], 4, 2, 2) if "spatial_norm_dim" in kwargs else None
    inputs = [h] + ([ehs] if ehs is not None else [])

    def fwd(m):
        kw = {"temb": temb} if temb is not None else {}
        return m(h, encoder_hidden_states=ehs, attention_mask=mask, **kw)

    # The stock default for this module (AttnProcessor for scale_qk=False, else AttnProcessor2_0).
    stock_proc = attn.processor
    assert type(stock_proc) is (AttnProcessor if not kwargs.get("scale_qk", True) else AttnProcessor2_0)
    stock = _run(attn, fwd, inputs, backend)
    attn.set_processor(FusedAttnProcessor())
    fused = _run(attn, fwd, inputs, backend)
    _compare(stock, fused)


def test_recorder_sees_bhld_query_and_key():
    attn = Attention(query_dim=64, cross_attention_dim=16, heads=2, dim_head=32)
    seen = []
    attn.set_processor(FusedAttnProcessor(recorder=lambda a, q, k: seen.append((a, q.shape, k.shape))))
    attn(torch.randn(3, 5, 64), encoder_hidden_states=torch.randn(3, 77, 16))
    assert seen == [(attn, torch.Size([3, 2, 5, 32]), torch.Size([3, 2, 77, 32]))]


def test_only_stock_processors_are_replaced_and_restored():
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    unet = _unet_cond()
    keys = list(unet.attn_processors)
    custom = AttnAddedKVProcessor()
    legacy = AttnProcessor()
    procs = dict(unet.attn_processors)
    procs[keys[0]] = custom
    procs[keys[1]] = legacy
    unet.set_attn_processor(procs)
    assert enable_fused_attention(unet) == len(keys) - 1
    assert unet.attn_processors[keys[0]] is custom
    assert enable_fused_attention(unet) == len(keys) - 1  # idempotent
    assert disable_fused_attention(unet) == len(keys) - 1
    assert unet.attn_processors[keys[1]] is legacy  # the previous processor, not a fresh default
    assert type(unet.attn_processors[keys[2]]) is AttnProcessor2_0


def test_wrapped_models():
    torch.manual_seed(0)
    unet = _unet2d()
    dp = torch.nn.DataParallel(unet)  # on CPU: a plain .module wrapper
    assert unwrap_model(dp) is unet
    assert enable_fused_attention(dp) == 4
    assert all(isinstance(m.processor, FusedAttnProcessor) for m in attention_modules(unet).values())
    assert disable_fused_attention(dp) == 4

    class DistributedDataParallel(torch.nn.Module):  # name-matched wrapper (FSDP/DeepSpeed-style)
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = torch.compile(DistributedDataParallel(unet))
    assert unwrap_model(compiled) is unet
    assert enable_fused_attention(compiled) == 4


def test_ddp_wrapped_single_process():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    created = False
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    try:
        torch.manual_seed(0)
        unet = _unet2d()
        ddp = torch.nn.parallel.DistributedDataParallel(unet)
        assert enable_fused_attention(ddp) == 4
        x = torch.randn(1, 3, 16, 16)
        with dispatch.use_backend(FAST[0]), torch.no_grad():
            y = ddp(x, 1).sample
        disable_fused_attention(ddp)
        with torch.no_grad():
            want = unet(x, 1).sample
        assert_close(y, want, rtol=2e-4)
    finally:
        if created:
            dist.destroy_process_group()


def test_accelerate_prepared_model():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    unet = _unet2d()
    prepared = accelerate.Accelerator(cpu=True).prepare(copy.deepcopy(unet))
    assert enable_fused_attention(prepared) == 4
    assert all(isinstance(m.processor, FusedAttnProcessor) for m in attention_modules(prepared).values())


def test_bad_mask_from_diffusers_is_a_clear_error():
    attn = Attention(query_dim=64, heads=2, dim_head=32)
    attn.set_processor(FusedAttnProcessor())
    h = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        # diffusers pads a mask whose length differs from Lk by Lk more columns: wrong length.
        attn(h, attention_mask=torch.zeros(2, 1, 3))


def test_public_exports():
    assert fastdistill.fused_attention is not None
