"""The device's three ceilings, measured the way every floor in these benchmarks uses them.

Copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written.
Matmul rate: an 8192^3 bf16 product on GPU (512^3 fp32 on CPU), 2*m^3 FLOPs.
Exp rate: on GPU a Triton kernel running ``harness.EXP_ITERS`` dependent ``exp2`` per loaded element
(SFU-bound); on CPU ``torch.exp`` over a large tensor.
"""

import torch

import harness


def test_copy_and_matmul_ceilings():
    c = harness.ceilings()
    assert c["copy_bytes_per_s"] > 0 and c["matmul_flop_per_s"] > 0
    dev = harness.device()
    n = (1 << 26) if harness.on_gpu() else (1 << 20)
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    harness.run_case("ceilings", f"copy fp32 n={n}", {"fastdistill": lambda: dst.copy_(src),
                                                       "eager": lambda: dst.copy_(src)},
                     mode="fwd", bytes_moved=2 * 4 * n)


def test_exp_ceiling():
    """The exp-rate measurement is a real rate, and an exp-only case is bound by the exp term."""
    c = harness.ceilings()
    assert c["exp_per_s"] > 0
    dev = harness.device()
    n = (1 << 24) if harness.on_gpu() else (1 << 20)
    x = torch.rand(n, device=dev)
    y = torch.empty_like(x)
    results = harness.run_case("ceilings", f"exp fp32 n={n}", {"fastdistill": lambda: torch.exp(x, out=y),
                                                                "eager": lambda: torch.exp(x, out=y)},
                               mode="fwd", bytes_moved=2 * 4 * n, exps=n)
    assert all(r.exps == n for r in results)
    terms = harness.floor_terms(bytes_moved=2 * 4 * n, exps=n)
    assert results[0].floor_ms == max(terms.values()) and results[0].floor_term == max(terms, key=terms.get)
