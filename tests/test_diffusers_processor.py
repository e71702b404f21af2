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
    fused_processor_for,
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
    # What enable_fused_attention installs: attn.scale for the legacy AttnProcessor, else SDPA's scale.
    attn.set_processor(fused_processor_for(stock_proc))
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


# ----------------------------------------------------------------------------------------------
# AttnProcessor2_0, call for call (issue 15 item 5): masked rows, scale, head-dim fallback, mask
# gradients, set_default_attn_processor, and a UNet2DConditionModel side by side.
# ----------------------------------------------------------------------------------------------

def _side_by_side(attn, fwd, inputs, backend, proc, stock_proc=None, rtol=2e-4):
    """Run ``attn`` with ``stock_proc`` (AttnProcessor2_0) and with ``proc``; compare outputs and
    gradients. Returns (stock, fused) results."""
    attn.set_processor(stock_proc if stock_proc is not None else AttnProcessor2_0())
    stock = _run(attn, fwd, inputs, backend)
    attn.set_processor(proc)
    fused = _run(attn, fwd, inputs, backend)
    _compare(stock, fused, rtol=rtol)
    return stock, fused


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_fully_masked_rows_give_zero_like_attnprocessor2_0(backend, kind):
    torch.manual_seed(2)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    h = torch.randn(3, 5, 32, requires_grad=True)
    ehs = torch.randn(3, 6, 16, requires_grad=True)
    keep = torch.rand(3, 5, 6) > 0.4
    keep[..., 0] = True
    keep[0, 2] = False  # one query row of sample 0 sees no key
    keep[2] = False  # sample 2 sees no key at all
    mask = keep if kind == "bool" else torch.zeros(3, 5, 6).masked_fill(~keep, float("-inf"))

    def fwd(m):
        return m(h, encoder_hidden_states=ehs, attention_mask=mask)

    stock, fused = _side_by_side(attn, fwd, [h, ehs], backend, FusedAttnProcessor())
    y, grads = fused
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    # A row that attends to nothing gives to_out's bias only (attention output 0), as with SDPA.
    bias = attn.to_out[0].bias.detach()
    assert_close(y[2], bias.expand(5, -1), rtol=1e-6, name="fully masked sample")
    assert_close(y[0, 2], bias, rtol=1e-6, name="fully masked row")
    assert grads["input1"][2].abs().max().item() == 0.0  # nothing flows into keys nobody attends to


@pytest.mark.parametrize("backend", FAST)
def test_scale_is_attnprocessor2_0s_not_attn_scale(backend):
    torch.manual_seed(3)
    h = torch.randn(2, 7, 64, requires_grad=True)

    def fwd(m):
        return m(h)

    # scale_qk=False: attn.scale == 1.0, but AttnProcessor2_0 (forced on the module) uses 1/sqrt(32).
    attn = Attention(query_dim=64, heads=2, dim_head=32, scale_qk=False)
    assert attn.scale == 1.0
    stock, _ = _side_by_side(attn, fwd, [h], backend, FusedAttnProcessor())
    # ...and with use_attn_scale=True it is the legacy AttnProcessor's 1.0.
    _, legacy = _side_by_side(attn, fwd, [h], backend, FusedAttnProcessor(use_attn_scale=True),
                              stock_proc=AttnProcessor())
    assert (legacy[0] - stock[0]).abs().max().item() > 1e-2  # the two scales really differ here
    # A changed attn.scale on a scale_qk=True module: AttnProcessor2_0 ignores it, so do we.
    attn = Attention(query_dim=64, heads=2, dim_head=32)
    attn.scale = 0.7
    _side_by_side(attn, fwd, [h], backend, FusedAttnProcessor())
    _side_by_side(attn, fwd, [h], backend, FusedAttnProcessor(use_attn_scale=True), stock_proc=AttnProcessor())


def test_enable_keeps_each_modules_scale_rule():
    attn_legacy = Attention(query_dim=16, heads=1, dim_head=16, scale_qk=False)
    attn_sdpa = Attention(query_dim=16, heads=1, dim_head=16)
    tree = torch.nn.ModuleList([attn_legacy, attn_sdpa])
    assert type(attn_legacy.processor) is AttnProcessor
    assert enable_fused_attention(tree) == 2
    assert attn_legacy.processor.use_attn_scale is True and attn_sdpa.processor.use_attn_scale is False
    with pytest.raises(TypeError, match="use_attn_scale must be a bool"):
        FusedAttnProcessor(use_attn_scale=1)
    with pytest.raises(TypeError, match="processor must be a FusedAttnProcessor"):
        enable_fused_attention(tree, AttnProcessor2_0())


@pytest.mark.parametrize("backend", FAST)
def test_head_dim_above_kernel_limit_runs_sdpa_with_one_warning(backend, monkeypatch):
    import warnings

    from fastdistill.diffusers import processor as proc_mod

    monkeypatch.setattr(proc_mod, "_SDPA_WARNED", set())
    torch.manual_seed(4)
    attn = Attention(query_dim=32, heads=1, dim_head=264)
    h = torch.randn(2, 5, 32, requires_grad=True)

    def fwd(m):
        return m(h)

    with warnings.catch_warnings(record=True) as caught, dispatch.record_backends() as seen:
        warnings.simplefilter("always")
        _side_by_side(attn, fwd, [h], backend, FusedAttnProcessor())
        fwd(attn)  # a second call: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, dispatch.FallbackWarning)]
    if backend == "triton":
        assert len(msgs) == 1 and "head dim 264 > 256" in msgs[0] and "scaled_dot_product_attention" in msgs[0]
        assert ("fused_attention", "triton") not in seen
    else:  # the reference takes any head dim: no fallback, no warning
        assert msgs == [] and ("fused_attention", "reference") in seen


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mask_shape", [(2, 1, 6), (2, 5, 6)])
def test_float_mask_that_requires_grad_gets_its_gradient(backend, mask_shape, monkeypatch):
    """Never a silent detach: the mask's gradient equals float64 AttnProcessor2_0's (SDPA's)."""
    import warnings

    from fastdistill.diffusers import processor as proc_mod

    monkeypatch.setattr(proc_mod, "_SDPA_WARNED", set())
    torch.manual_seed(5)
    attn = Attention(query_dim=32, cross_attention_dim=8, heads=2, dim_head=16)
    h, ehs = torch.randn(2, 5, 32), torch.randn(2, 6, 8)
    mask = torch.randn(*mask_shape, requires_grad=True)
    attn.set_processor(FusedAttnProcessor())
    with dispatch.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = attn(h, encoder_hidden_states=ehs, attention_mask=mask)
    w = torch.linspace(0.5, 1.5, y.numel()).view_as(y)
    (got,) = torch.autograd.grad((y * w).sum(), mask)
    ref = copy.deepcopy(attn).double()
    ref.set_processor(AttnProcessor2_0())
    m64 = mask.detach().double().requires_grad_(True)
    y64 = ref(h.double(), encoder_hidden_states=ehs.double(), attention_mask=m64)
    (want,) = torch.autograd.grad((y64 * w.double()).sum(), m64)
    assert_close(y, y64, rtol=2e-5, name="output")
    assert_close(got, want, rtol=1e-4, name="mask gradient")
    assert got.abs().max().item() > 0
    fallback = [str(x.message) for x in caught if issubclass(x.category, dispatch.FallbackWarning)]
    assert (len(fallback) == 1 and "no mask gradient" in fallback[0]) if backend == "triton" else not fallback


def test_set_default_attn_processor_after_enable():
    torch.manual_seed(0)
    unet = _unet_cond()
    stock = copy.deepcopy(unet)
    assert enable_fused_attention(unet) == 8
    unet.set_default_attn_processor()  # raised ValueError before FusedAttnProcessor was registered
    stock.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 64)
    with torch.no_grad():
        assert_close(unet(x, 5, ehs).sample, stock(x, 5, ehs).sample, rtol=1e-6)
    # Other diffusers models take the same check (e.g. AutoencoderKL, imported after registration).
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=2)
    assert enable_fused_attention(vae) == 2
    vae.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in vae.attn_processors.values())


def _unet_all_features() -> UNet2DConditionModel:
    """AttnDown/AttnUp blocks whose Attention has group_norm and residual_connection (their
    rescale_output_factor is set to 1.5: the blocks' output_scale_factor is not exposed by
    UNet2DConditionModel's config) and cross-attention transformer blocks (attn1 self, attn2 cross,
    one head of 32 so the interpreter stays fast). The mid block has no attention, so one
    self-attention mask (16 tokens at 4x4) fits every masked layer."""
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
                                mid_block_type="UNetMidBlock2D",
                                up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=(8, 4), norm_num_groups=8)
    for m in attention_modules(unet).values():
        if m.group_norm is not None:
            m.rescale_output_factor = 1.5
    return unet


@pytest.mark.parametrize("backend", FAST)
def test_unet2d_condition_side_by_side_every_feature(backend):
    """Bool encoder_attention_mask (one sample with every text token dropped) and a float
    self-attention mask, as UNet2DConditionModel turns them into additive biases; values and the
    gradients of every parameter and input."""
    torch.manual_seed(6)
    stock = _unet_all_features()
    mods = attention_modules(stock)
    assert sum(m.is_cross_attention for m in mods.values()) == 3
    assert sum(m.group_norm is not None and m.residual_connection and m.rescale_output_factor == 1.5
               for m in mods.values()) == 3
    fused = copy.deepcopy(stock)
    assert enable_fused_attention(fused) == len(mods) == 9
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    ehs = torch.randn(2, 5, 16, requires_grad=True)
    enc = torch.tensor([[True, True, False, True, False], [False] * 5])
    self_mask = (torch.rand(2, 16) > 0.2).float()  # self-attention of the 4x4 cross-attention blocks
    self_mask[:, 0] = 1.0

    def fwd(m):
        return m(x, torch.tensor([3, 700]), ehs, attention_mask=self_mask, encoder_attention_mask=enc).sample

    want = _run(stock, fwd, [x, ehs], backend)
    with dispatch.record_backends() as seen:
        got = _run(fused, fwd, [x, ehs], backend)
    assert ("fused_attention", backend) in seen
    _compare(want, got)
