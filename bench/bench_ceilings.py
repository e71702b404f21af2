"""The device's two ceilings, measured the way every floor in these benchmarks uses them.

Copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written.
Matmul rate: an 8192^3 bf16 product on GPU (512^3 fp32 on CPU), 2*m^3 FLOPs.
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
