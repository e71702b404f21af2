"""AttentionDistillLoss: records q/k through the fused processor and sums attention_kl over layers;
checked against the dense KL formula on q/k captured independently (forward pre-hooks), with
head pairing when head counts and dims differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from fastdistill import dispatch  # noqa: E402
from fastdistill.diffusers import FusedAttnProcessor  # noqa: E402
from fastdistill.nn.attention_distill import AttentionDistillLoss  # noqa: E402
from fastdistill.testing import assert_close, backend_device_params  # noqa: E402


def dense_kl(q_s, k_s, q_t, k_t, scale_s, scale_t):
    """Per-row KL(softmax(teacher) || softmax(student)) with both maps materialised, float64."""
    ls = (q_s.double() @ k_s.double().transpose(-1, -2)) * scale_s
    lt = (q_t.double() @ k_t.double().transpose(-1, -2)) * scale_t
    return (torch.softmax(lt, -1) * (torch.log_softmax(lt, -1) - torch.log_softmax(ls, -1))).sum(-1)


def capture_qk(model: nn.Module) -> tuple[dict, list]:
    """q/k of every Attention module, recomputed from its inputs by a pre-hook (independent of the
    processor's recorder)."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            def hook(mod, args, kwargs, name=name):
                h = args[0] if args else kwargs["hidden_states"]
                ehs = kwargs.get("encoder_hidden_states")
                ctx = h if ehs is None else ehs
                B = h.shape[0]
                q = mod.to_q(h).view(B, -1, mod.heads, mod.to_q.out_features // mod.heads).transpose(1, 2)
                k = mod.to_k(ctx).view(B, -1, mod.heads, mod.to_k.out_features // mod.heads).transpose(1, 2)
                store[name] = (q, k, mod.scale)
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return store, handles


def _unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32)


def test_unet_pair_matches_dense_formula_value_and_grad():
    teacher, student = _unet(0), _unet(1)
    teacher.requires_grad_(False)
    loss_fn = AttentionDistillLoss(teacher, student)
    assert len(loss_fn.pairs) == 8  # every Attention layer (self + cross) of this UNet
    assert list(loss_fn.parameters()) == []
    t_cap, th = capture_qk(teacher)
    s_cap, sh = capture_qk(student)
    x, ehs, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64), torch.tensor([5, 600])
    with torch.no_grad():
        teacher(x, t, ehs)
    student(x, t, ehs)
    loss = loss_fn()
    want = sum(dense_kl(*s_cap[p][:2], *t_cap[p][:2], s_cap[p][2], t_cap[p][2]).mean() for p in s_cap)
    assert_close(loss, want, rtol=1e-5)
    params = [p for n, p in student.named_parameters() if "attn" in n and "to_out" not in n and "to_v" not in n]
    got = torch.autograd.grad(loss, params, retain_graph=True)
    exp = torch.autograd.grad(want, params)
    for g, e in zip(got, exp):
        assert_close(g, e, rtol=1e-4, floor=1e-6)
    for h in th + sh:
        h.remove()
    # Records are consumed: a second call without new forwards is an error.
    with pytest.raises(RuntimeError, match="has not run since the last loss"):
        loss_fn()


class Toy(nn.Module):
    def __init__(self, heads: int, dim_head: int, attr: str = "attn") -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, Attention(query_dim=32, heads=heads, dim_head=dim_head))

    def forward(self, h):
        return getattr(self, self.attr)(h)


@pytest.mark.parametrize("ht,dt,hs,ds", [(4, 16, 2, 32), (2, 40, 4, 16), (2, 40, 2, 24)])
def test_head_pairing(ht, dt, hs, ds):
    torch.manual_seed(0)
    teacher, student = Toy(ht, dt), Toy(hs, ds)
    loss_fn = AttentionDistillLoss(teacher, student, layers="attn")
    t_cap, _ = capture_qk(teacher)
    s_cap, _ = capture_qk(student)
    h = torch.randn(2, 9, 32)
    teacher(h)
    student(h)
    loss = loss_fn()
    (qs, ks, ss), (qt, kt, st) = s_cap["attn"], t_cap["attn"]
    # Explicit pairs (documented rule): consecutive groups of the larger head count.
    pairs = []
    for i in range(max(ht, hs)):
        ti = i if ht >= hs else i // (hs // ht)
        si = i if hs >= ht else i // (ht // hs)
        pairs.append(dense_kl(qs[:, si], ks[:, si], qt[:, ti], kt[:, ti], ss, st))
    want = torch.stack(pairs).mean()
    assert_close(loss, want, rtol=1e-5)
    assert abs(ss - ds**-0.5) < 1e-12 and abs(st - dt**-0.5) < 1e-12  # each side's own scale


def test_layer_mapping_between_different_names_and_weights():
    torch.manual_seed(0)
    teacher, student = Toy(2, 16, attr="big"), Toy(2, 16, attr="small")
    loss_fn = AttentionDistillLoss(teacher, student, layers={"small.processor": "big"}, weights=[0.25],
                                   reduction="sum")
    t_cap, _ = capture_qk(teacher)
    s_cap, _ = capture_qk(student)
    h = torch.randn(1, 5, 32)
    teacher(h)
    student(h)
    want = 0.25 * dense_kl(*s_cap["small"][:2], *t_cap["big"][:2], s_cap["small"][2], t_cap["big"][2]).sum()
    assert_close(loss_fn(), want, rtol=1e-5)


# (backend, device) cases: triton on CPU (interpreter) and triton-cuda (gpu-marked; skipped without a GPU).
@pytest.mark.parametrize("backend,device", backend_device_params("fused_attention", include=["triton"]))
def test_triton_backend_end_to_end(backend, device):
    torch.manual_seed(0)
    teacher, student = Toy(2, 40).to(device), Toy(2, 16).to(device)
    loss_fn = AttentionDistillLoss(teacher, student)
    h = torch.randn(1, 13, 32).to(device)
    results = []
    for b in (backend, "reference"):
        with dispatch.use_backend(b), dispatch.record_backends() as seen:
            teacher(h)
            student(h)
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [student.attn.to_q.weight, student.attn.to_k.weight])
        assert ("fused_attention", b) in seen and ("attention_kl", b) in seen
        results.append((loss, grads))
    assert_close(results[0][0], results[1][0], rtol=1e-4)
    for g, e in zip(results[0][1], results[1][1]):
        assert_close(g, e, rtol=1e-4)


def test_processors_installed_and_removed():
    teacher, student = Toy(2, 16), Toy(2, 16)
    loss_fn = AttentionDistillLoss(teacher, student)
    assert isinstance(student.attn.processor, FusedAttnProcessor)
    assert isinstance(teacher.attn.processor, FusedAttnProcessor)
    loss_fn.remove()
    assert type(student.attn.processor) is AttnProcessor2_0 and type(teacher.attn.processor) is AttnProcessor2_0
    with pytest.raises(RuntimeError, match="remove\\(\\) was called"):
        loss_fn()


def test_bad_configuration_errors():
    teacher, student = Toy(3, 16), Toy(2, 16)
    with pytest.raises(ValueError, match="not an Attention module of the student"):
        AttentionDistillLoss(teacher, student, layers=["nope"])
    with pytest.raises(ValueError, match="same model"):
        AttentionDistillLoss(student, student)
    with pytest.raises(ValueError, match="reduction must be one of"):
        AttentionDistillLoss(Toy(2, 16), Toy(2, 16), reduction="none")
    with pytest.raises(ValueError, match="weights has 2 entries for 1 layers"):
        AttentionDistillLoss(Toy(2, 16), Toy(2, 16), weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="share no Attention layer path"):
        AttentionDistillLoss(Toy(2, 16, attr="a"), Toy(2, 16, attr="b"))
    with pytest.raises(TypeError, match="must be nn.Modules"):
        AttentionDistillLoss(teacher, "student")
    loss_fn = AttentionDistillLoss(teacher, student)
    teacher(torch.randn(1, 4, 32))
    student(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="cannot pair 3 teacher heads with 2 student heads"):
        loss_fn()
    t2, s2 = Toy(2, 16), Toy(2, 16)
    loss_fn = AttentionDistillLoss(t2, s2)
    t2(torch.randn(1, 4, 32))
    s2(torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match="token counts must match"):
        loss_fn()
    with pytest.raises(RuntimeError, match="teacher layer 'attn' has not run"):
        loss_fn()
