"""Every GPU tile config of the relational-KL and attention kernels, run through the interpreter.

The interpreter's own launches use one config per problem (sized for the numpy work); a GPU picks among
the configs ``kernels._common.gpu_configs`` lists. Each test here forces each of those configs with
``force_config`` and compares value and gradient with the float64 reference, on small shapes chosen so
that the config's tiles cross their boundaries. Under the interpreter the 16-bit GEMM operands are
rounded where the GPU rounds them (kernels/_common.py), so these are the GPU's numbers up to the order
of the fp32 accumulation.
"""

from __future__ import annotations

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.kernels import _common
from fastdistill.ops.relational_kl import relational_kl, relational_kl_reference

pytestmark = pytest.mark.skipif(not _common.interpret(), reason="forces GPU configs through the CPU interpreter "
                                "(TRITON_INTERPRET=1, set by conftest.py); on a GPU the gpu tests run them")

RKL_KERNELS = ("relational_kl.fwd", "relational_kl.dq", "relational_kl.dk")
# Tolerances as in tests/test_relational_kl.py (values: KL cancellation; see there).
RKL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
RKL_GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# Relational-KL problems (N rows, M keys, C_s, C_t, segment size) and what each covers for EVERY config:
RKL_CASES = {
    # 130 rows / 131 keys: past the largest row and key tile (128), so every config has a partial last
    # row tile and a partial last key tile. C_s = 72 > BLOCK_C (<= 64): the dq/dk global-scratch path
    # (not RES_S) and the non-resident forward path; C_t = 20 fits one tile (RES_T), so the teacher
    # takes the resident path while the student does not.
    "tiles": (130, 131, 72, 20, None),
    # One query row: a row tile with one valid row; two segments of 37 keys (a key tile never spans two).
    "one_row": (1, 74, 72, 72, 37),
    # 129 keys: the last key tile holds a single key for every BLOCK_M (32, 64, 128; a softmax over one
    # key alone is exactly 1, KL 0, so the single key is tested as a tile of one). C = 40 < BLOCK_C = 64:
    # both sides resident in configs with 64-channel tiles, chunked in those with 32.
    "one_key": (19, 129, 40, 40, None),
}


def _rkl_configs(N: int, M: int, Cs: int, Ct: int, S: int | None, dtype: torch.dtype, precision: str):
    """One forced (fwd, dq, dk) triple per index: every config of every kernel appears at least once."""
    seg = M if S is None else S
    problem = dict(n=N, s=seg, c=max(Cs, Ct), dtype=dtype, precision=precision)
    lists = [_common.gpu_configs(k, **problem) for k in RKL_KERNELS]
    n = max(len(x) for x in lists)
    return [tuple(x[i % len(x)] for x in lists) for i in range(n)]


def _rkl_params():
    out = []
    for case, shape in RKL_CASES.items():
        # fp16 only on the "tiles" case: it adds nothing the bf16 path lacks except fp16 rounding.
        # fp32 "tf32": torch.set_float32_matmul_precision("high"), the TF32 configs and TF32 operands.
        kinds = [(torch.float32, "ieee"), (torch.bfloat16, None)]
        if case == "tiles":
            kinds += [(torch.float16, None), (torch.float32, "tf32")]
        for dtype, prec in kinds:
            for i, cfgs in enumerate(_rkl_configs(*shape, dtype, prec or "ieee")):
                tag = prec or str(dtype)[6:]
                out.append(pytest.param(case, dtype, prec, cfgs, id=f"{case}-{tag}-{i}:{cfgs[0]}"))
    return out


# TF32 keeps 10 mantissa bits per operand: logits err ~1e-3 relative; KL values cancel (see
# tests/test_relational_kl.py), so value and gradient bounds are those of the 16-bit types.
TF32_RTOL = 1e-2
TF32_GRAD_RTOL = 2e-2


@pytest.mark.parametrize("case,dtype,prec,cfgs", _rkl_params())
def test_relational_kl_every_gpu_config(case, dtype, prec, cfgs):
    N, M, Cs, Ct, S = RKL_CASES[case]
    gen = testing.generator()
    q_s = testing.randn(N, Cs, dtype=dtype, gen=gen, requires_grad=True)
    k_s = testing.randn(M, Cs, dtype=dtype, gen=gen, requires_grad=True)
    q_t = testing.randn(N, Ct, dtype=dtype, gen=gen)
    k_t = testing.randn(M, Ct, dtype=dtype, gen=gen)
    kw = dict(temperature=0.7, kd_temperature=1.3, segment_size=S, normalize=True, reduction="none")
    rtol, grad_rtol = (TF32_RTOL, TF32_GRAD_RTOL) if prec == "tf32" else (RKL_RTOL[dtype], RKL_GRAD_RTOL[dtype])
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")
    try:
        with _common.force_config(RKL_KERNELS[0], cfgs[0]), _common.force_config(RKL_KERNELS[1], cfgs[1]), \
                _common.force_config(RKL_KERNELS[2], cfgs[2]):
            testing.check_against_reference(relational_kl, relational_kl_reference, [q_s, k_s, q_t, k_t], kw,
                                            dtype=dtype, backend="triton", rtol=rtol, grad_rtol=grad_rtol)
    finally:
        torch.set_float32_matmul_precision(old)


def test_forced_config_reaches_the_launcher():
    """The hook is not a no-op: a forced config with a BLOCK_C that the kernel cannot use is rejected by
    the launch (tl.dot needs K >= 16 and the channel tile is one), proving the launcher used it."""
    assert _common.forced_config("relational_kl.fwd") is None
    cfg = _common.TileConfig({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)
    with _common.force_config("relational_kl.fwd", cfg):
        assert _common.forced_config("relational_kl.fwd") == cfg
        seen = []
        from fastdistill.kernels import relational_kl as K
        orig = K._RAW["fwd"]

        class Spy:
            def __getitem__(self, grid):
                seen.append(grid)
                return lambda *a, **kw: (seen.append(kw["BLOCK_C"]), orig[grid](*a, **kw))
        K._RAW["fwd"] = Spy()
        try:
            gen = testing.generator()
            x = testing.randn(40, 20, gen=gen)
            with fastdistill.use_backend("triton"):
                relational_kl(x, x, x, x, reduction="none")
        finally:
            K._RAW["fwd"] = orig
    assert seen == [(3, 1, 1), 16]  # 40 rows in 16-row tiles, BLOCK_C as forced
    assert _common.forced_config("relational_kl.fwd") is None


def test_force_config_environment_variable(monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "relational_kl.dq=BLOCK_N:32,BLOCK_M:16,BLOCK_C:64,warps:8,stages:3;"
                                          "attention.fwd=BLOCK_M:64,BLOCK_N:32,num_warps:4,num_stages:2")
    assert _common.forced_config("relational_kl.dq") == _common.TileConfig(
        {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_C": 64}, num_warps=8, num_stages=3)
    assert _common.forced_config("attention.fwd")["BLOCK_N"] == 32
    assert _common.forced_config("relational_kl.fwd") is None
    with _common.force_config("attention.fwd", {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2}):
        assert _common.forced_config("attention.fwd").num_warps == 2  # the context manager wins
    monkeypatch.setenv(_common.FORCE_ENV, "attention.fwd=BLOCK_M=64")
    with pytest.raises(ValueError, match="NAME:VALUE"):
        _common.forced_config("attention.fwd")
    with pytest.raises(ValueError, match="unknown kernel"):
        _common.forced_config("attention.fwdd")
    with pytest.raises(ValueError, match="power of two"):
        _common.TileConfig({"BLOCK_M": 24})


# ----------------------------------------------------------------------------------------------
# Attention: one config per (head-dim class, dtype class); each forced onto small problems.

ATTN_RTOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 4e-2), torch.float16: (1e-2, 2e-2)}


def _attn_params():
    out = []
    # Head dims 40 (32+16 split), 80 (64+16) and 160 (128+32): the three config classes (<= 64, <= 128,
    # > 128), each with a second head-dim sub-block.
    for d in (40, 80, 160):
        for dtype in (torch.float32, torch.bfloat16):
            fwd = _common.gpu_configs("attention.fwd", head_dim=d, lq=4096, lk=4096, dtype=dtype)
            bwd = _common.gpu_configs("attention.bwd", head_dim=d, lq=4096, lk=4096, dtype=dtype)
            for i, (f, b) in enumerate(zip(fwd, bwd)):
                out.append(pytest.param(d, dtype, f, b, id=f"d{d}-{str(dtype)[6:]}-{i}"))
    return out


@pytest.mark.parametrize("d,dtype,fwd_cfg,bwd_cfg", _attn_params())
def test_attention_every_gpu_config(d, dtype, fwd_cfg, bwd_cfg):
    """The config a long sequence gets on a GPU, forced onto: Lq one past the forward's query tile and
    Lk past the key tiles (partial last tiles everywhere, several key tiles per query tile), with a
    float mask that blocks some keys; a single key; a single query row."""
    fq, fk = fwd_cfg["BLOCK_M"], fwd_cfg["BLOCK_N"]
    bq = max(bwd_cfg["KV_BLOCK_M"], bwd_cfg["Q_BLOCK_M"])
    bk = max(bwd_cfg["KV_BLOCK_N"], bwd_cfg["Q_BLOCK_N"])
    shapes = [(max(fq, bq) + 1, max(2 * fk, bk) + 3, True), (5, 1, False), (1, 37, False)]
    rtol, grtol = ATTN_RTOL[dtype]
    gen = testing.generator()
    for lq, lk, masked in shapes:
        # With a single key the softmax is exactly 1: dq = dk = 0 in exact arithmetic (the kernel leaves
        # rounding noise relative to dp, which a relative check cannot bound), so only dv is compared.
        qk_grad = lk > 1
        q = testing.randn(1, 2, lq, d, dtype=dtype, gen=gen, requires_grad=qk_grad)
        k = testing.randn(1, 2, lk, d, dtype=dtype, gen=gen, requires_grad=qk_grad)
        v = testing.randn(1, 2, lk, d, dtype=dtype, gen=gen, requires_grad=True)
        kw = {}
        if masked:
            m = torch.zeros(1, 1, lq, lk)
            m[..., ::7] = float("-inf")
            m[..., 1::7] = -2.0
            kw["attn_mask"] = m.to(dtype)
        with _common.force_config("attention.fwd", fwd_cfg), _common.force_config("attention.bwd", bwd_cfg):
            testing.check_against_reference(fastdistill.fused_attention, fastdistill.fused_attention, (q, k, v), kw,
                                            dtype=dtype, backend="triton", rtol=rtol, grad_rtol=grtol)


def test_gpu_configs_are_tile_configs():
    for k in RKL_KERNELS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for prec in ("ieee", "tf32"):
                cfgs = _common.gpu_configs(k, n=4096, s=4096, c=1280, dtype=dtype, precision=prec)
                assert cfgs and all(isinstance(c, _common.TileConfig) for c in cfgs)
                assert len(set(cfgs)) == len(cfgs)
    for k in ("attention.fwd", "attention.bwd"):
        for d in (40, 64, 80, 128, 160, 256):
            assert _common.gpu_configs(k, head_dim=d, lq=77, lk=4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown kernel"):
        _common.gpu_configs("relational_kl.bwd", n=1, s=1, c=1)
