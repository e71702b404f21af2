"""Every GPU tile config of the relational-KL and attention kernels, run through the interpreter.

The interpreter's own launches use one config per problem (sized for the numpy work); a GPU picks among
the configs ``kernels._common.gpu_configs`` lists. Each test here forces each of those configs with
``force_config`` and compares value and gradient with the float64 reference, on small shapes chosen so
that the config's tiles cross their boundaries. Under the interpreter the 16-bit GEMM operands are
rounded where the GPU rounds them (kernels/_common.py), so these are the GPU's numbers up to the order
of the fp32 accumulation.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastdistill
from fastdistill import testing
from fastdistill.kernels import _common
from fastdistill.ops.relational_kl import relational_kl, relational_kl_reference

pytestmark = pytest.mark.skipif(not _common.interpret(), reason="forces GPU configs through the CPU interpreter "
                                "(TRITON_INTERPRET=1, set by conftest.py); on a GPU the gpu tests run them")

RKL_KERNELS = ("relational_kl.fwd", "relational_kl.bwd", "relational_kl.dk", "relational_kl.fwd_sym")
# Tolerances as in tests/test_relational_kl.py (values: KL cancellation; see there).
RKL_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
RKL_GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# Relational-KL problems (N rows, M keys, C_s, C_t, segment size) and what each covers for EVERY config:
RKL_CASES = {
    # 130 rows / 131 keys: past the largest row and key tile (128), so every config has a partial last
    # row tile and a partial last key tile. C_s = 72 > BLOCK_C (<= 64): the dk kernel's global-scratch
    # path (not RES_S), the non-resident forward path and the backward's two register sub-blocks
    # (64 + 16); C_t = 20 fits one tile (RES_T), so the teacher takes the resident path.
    "tiles": (130, 131, 72, 20, None),
    # One query row: a row tile with one valid row; two segments of 37 keys (a key tile never spans two).
    "one_row": (1, 74, 72, 72, 37),
    # 129 keys: the last key tile holds a single key for every BLOCK_M (32, 64, 128; a softmax over one
    # key alone is exactly 1, KL 0, so the single key is tested as a tile of one). C = 40 < BLOCK_C = 64:
    # both sides resident in configs with 64-channel tiles, chunked in those with 32.
    "one_key": (19, 129, 40, 40, None),
}


def _rkl_configs(N: int, M: int, Cs: int, Ct: int, S: int | None, dtype: torch.dtype, precision: str,
                 symmetric: bool = False):
    """One forced (fwd, bwd, dk, fwd_sym) tuple per index: every config of every kernel appears at least once
    (fwd_sym only runs for the self-relation, with square tiles)."""
    seg = M if S is None else S
    problem = dict(n=N, s=seg, c=max(Cs, Ct), dtype=dtype, precision=precision)
    lists = [_common.gpu_configs(k, **problem, **(dict(cs=Cs, symmetric=symmetric) if k.endswith("bwd") else {}))
             for k in RKL_KERNELS]
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


def _run_rkl_case(N, M, Cs, Ct, S, dtype, prec, cfgs, *, deterministic=False, symmetric=False):
    gen = testing.generator()
    q_s = testing.randn(N, Cs, dtype=dtype, gen=gen, requires_grad=True)
    q_t = testing.randn(N, Ct, dtype=dtype, gen=gen)
    if symmetric:  # the self-relation: one tensor per side in both roles (the symmetric backward)
        fn = lambda q, t, **kw: relational_kl(q, q, t, t, **kw)  # noqa: E731
        ref = lambda q, t, **kw: relational_kl_reference(q, q, t, t, **kw)  # noqa: E731
        args = [q_s, q_t]
    else:
        k_s = testing.randn(M, Cs, dtype=dtype, gen=gen, requires_grad=True)
        k_t = testing.randn(M, Ct, dtype=dtype, gen=gen)
        fn, ref, args = relational_kl, relational_kl_reference, [q_s, k_s, q_t, k_t]
    kw = dict(temperature=0.7, kd_temperature=1.3, segment_size=S, normalize=True, reduction="none")
    rtol, grad_rtol = (TF32_RTOL, TF32_GRAD_RTOL) if prec == "tf32" else (RKL_RTOL[dtype], RKL_GRAD_RTOL[dtype])
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(testing.deterministic_algorithms(deterministic))
            for name, cfg in zip(RKL_KERNELS, cfgs):
                stack.enter_context(_common.force_config(name, cfg))
            testing.check_against_reference(fn, ref, args, kw, dtype=dtype, backend="triton", rtol=rtol,
                                            grad_rtol=grad_rtol)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("case,dtype,prec,cfgs", _rkl_params())
def test_relational_kl_every_gpu_config(case, dtype, prec, cfgs):
    """Default (fast) mode: forward and the one-pass backward (key gradient by atomics)."""
    _run_rkl_case(*RKL_CASES[case], dtype, prec, cfgs)


def _dk_params():
    # The dk kernel runs only in deterministic mode (the two-pass backward): each of its configs once.
    out = []
    for dtype, prec in ((torch.float32, "ieee"), (torch.bfloat16, None), (torch.float32, "tf32")):
        cfgs = _rkl_configs(*RKL_CASES["tiles"], dtype, prec or "ieee")
        seen = []
        for c in cfgs:
            if c[2] not in seen:
                seen.append(c[2])
                out.append(pytest.param(dtype, prec, c, id=f"{prec or str(dtype)[6:]}:{c[2]}"))
    return out


@pytest.mark.parametrize("dtype,prec,cfgs", _dk_params())
def test_relational_kl_two_pass_every_dk_config(dtype, prec, cfgs):
    _run_rkl_case(*RKL_CASES["tiles"], dtype, prec, cfgs, deterministic=True)


# The self-relation: 3 segments of 43 rows/keys (tiles aligned to segments, the last tile of each
# partial for every square tile size); C_s = 40 (32 + 16 sub-blocks), C_t = 72 (teacher channel loop).
SYM_CASE = (129, 129, 40, 72, 43)


def _sym_params():
    # Every config of each precision class once in the fast (atomic) mode; the deterministic mode (the
    # same kernel without the upper-triangle atomics) and fp16 once each per class.
    out = []
    for dtype, prec in ((torch.float32, "ieee"), (torch.bfloat16, None), (torch.float32, "tf32")):
        cfg_list = _rkl_configs(*SYM_CASE, dtype, prec or "ieee", symmetric=True)
        runs = [(dtype, False, c) for c in cfg_list] + [(dtype, True, cfg_list[0])]
        if dtype == torch.bfloat16:
            runs.append((torch.float16, False, cfg_list[-1]))
        for i, (dt, det, cfgs) in enumerate(runs):
            tag = f"{prec or str(dt)[6:]}-{'det' if det else 'atomic'}"
            out.append(pytest.param(dt, prec, det, cfgs, id=f"{tag}-{i}:{cfgs[1]}"))
    return out


@pytest.mark.parametrize("dtype,prec,deterministic,cfgs", _sym_params())
def test_relational_kl_symmetric_every_gpu_config(dtype, prec, deterministic, cfgs):
    _run_rkl_case(*SYM_CASE, dtype, prec, cfgs, deterministic=deterministic, symmetric=True)


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
    monkeypatch.setenv(_common.FORCE_ENV, "relational_kl.bwd=BLOCK_N:32,BLOCK_M:16,BLOCK_C:64,warps:8,stages:3;"
                                          "attention.fwd=BLOCK_M:64,BLOCK_N:32,num_warps:4,num_stages:2")
    assert _common.forced_config("relational_kl.bwd") == _common.TileConfig(
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
# Attention: every distinct (forward, fast backward, deterministic backward) config; each forced onto small
# problems, the backward through both paths.

ATTN_RTOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 4e-2), torch.float16: (1e-2, 2e-2)}
ATTN_KERNELS = ("attention.fwd", "attention.bwd", "attention.bwd_det")


def _attn_params():
    # The configs of every head dim the choice depends on, per dtype class (fp16 gets bf16's: both 2 bytes).
    # A head dim is tested only if one of its configs is new, and each backward path only if its config is
    # new: warps and stages do not change what the interpreter runs, block sizes do.
    out, seen = [], set()
    for dtype in (torch.float32, torch.bfloat16):
        for d in (40, 64, 80, 128, 160, 256):
            cfgs = tuple(_common.gpu_configs(k, head_dim=d, lq=4096, lk=4096, dtype=dtype) for k in ATTN_KERNELS)
            assert all(len(c) == 1 for c in cfgs)  # not autotuned: one config per problem
            cfgs = tuple(c[0] for c in cfgs)
            new = [(dtype, k, c.blocks) not in seen for k, c in zip(ATTN_KERNELS, cfgs)]
            seen.update((dtype, k, c.blocks) for k, c in zip(ATTN_KERNELS, cfgs))
            paths = ([False] if new[0] or new[1] else []) + ([True] if new[2] else [])
            if paths:
                tag = "-".join("x".join(str(v) for _, v in c.blocks) for c in cfgs)
                out.append(pytest.param(d, dtype, cfgs, paths, id=f"d{d}-{str(dtype)[6:]}-{tag}"))
    return out


@pytest.mark.parametrize("d,dtype,cfgs,paths", _attn_params())
def test_attention_every_gpu_config(d, dtype, cfgs, paths):
    """The configs a long sequence gets on a GPU, forced onto: Lq one past the largest query tile and Lk past
    the key tiles (partial last tiles everywhere, several key tiles adding into each dq row on the fast
    path), with a float mask that blocks some keys; a single key; a single query row. The backward runs
    the fast kernel (default) and/or the two-kernel one (torch.use_deterministic_algorithms(True))."""
    fwd_cfg, bwd_cfg, det_cfg = cfgs
    fq, fk = fwd_cfg["BLOCK_M"], fwd_cfg["BLOCK_N"]
    bq = max(bwd_cfg["KV_BLOCK_M"], det_cfg["KV_BLOCK_M"], det_cfg["Q_BLOCK_M"])
    bk = max(2 * bwd_cfg["KV_BLOCK_N"], det_cfg["KV_BLOCK_N"], det_cfg["Q_BLOCK_N"])
    shapes = [(max(fq, bq) + 1, max(2 * fk, bk) + 3, True), (5, 1, False), (1, 37, False)]
    rtol, grtol = ATTN_RTOL[dtype]
    gen = testing.generator()
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
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
        for deterministic in paths:
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            try:
                with _common.force_config("attention.fwd", fwd_cfg), _common.force_config("attention.bwd", bwd_cfg), \
                        _common.force_config("attention.bwd_det", det_cfg), _common.launch_grid.recording() as grids:
                    testing.check_against_reference(fastdistill.fused_attention, fastdistill.fused_attention,
                                                    (q, k, v), kw, dtype=dtype, backend="triton", rtol=rtol,
                                                    grad_rtol=grtol)
            finally:
                torch.use_deterministic_algorithms(old[0], warn_only=old[1])
            launched = dict(grids)
            assert ("attention.bwd_dq" in launched) == deterministic
            assert ("attention.bwd_fused" in launched) != deterministic
            if not deterministic:  # the forced key tile is the one launched: cdiv(Lk, KV_BLOCK_N) * B * H programs
                assert launched["attention.bwd_fused"][0] == -(-lk // bwd_cfg["KV_BLOCK_N"]) * 2


def test_gpu_configs_are_tile_configs():
    for k in RKL_KERNELS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for prec in ("ieee", "tf32"):
                extra = dict(cs=256) if k.endswith("bwd") else {}  # wider students run the chunked path
                cfgs = _common.gpu_configs(k, n=4096, s=4096, c=1280, dtype=dtype, precision=prec, **extra)
                assert cfgs and all(isinstance(c, _common.TileConfig) for c in cfgs)
                assert len(set(cfgs)) == len(cfgs)
                sym = _common.gpu_configs(k, n=4096, s=4096, c=1280, dtype=dtype, precision=prec, **extra,
                                          **(dict(symmetric=True) if extra else {}))
                assert sym and all(c["BLOCK_N"] == c["BLOCK_M"] for c in sym) if extra else sym
    for k in ATTN_KERNELS:
        for d in (40, 64, 80, 128, 160, 256):
            assert _common.gpu_configs(k, head_dim=d, lq=77, lk=4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown kernel"):
        _common.gpu_configs("relational_kl.dq", n=1, s=1, c=1)
