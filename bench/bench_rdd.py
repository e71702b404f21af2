"""RDD relational losses and attention_kl: fastdistill vs the eager dense formula (the official
einsum code) and ``torch.compile`` of it, forward+backward, in one run.

Cases (GPU, bf16, as issue 3 / issue 6 list them):
(a) IS_P2P, official CIFAR shape: B=32, C=1920, P=4x4=16 (launch-bound; few kernels);
(b) IS_P2P, B=8, C=640, P=32x32=1024;
(c) IS_P2P, B=8, C=320, P=64x64=4096 (the eager formula materialises B^2 P^2 = 1.07 G logits per map);
(d) memory term: B*P = 8*64*64 = 32768 pixel rows against a 4096-row contrast subset of a 20000-row
    bank, C=1920 (fastdistill reads the subset through the index; eager copies ``bank[idx]``);
(e) attention_kl, SD1.5 self-attention: B=4, 8 heads, L=4096, d=40 (dense eager materialises both maps).
On CPU the same cases at tiny sizes (fp32) so that ``pytest bench --benchmark`` runs here; there the
fastdistill provider is the reference backend and the numbers only show that it runs.

Executed GEMM FLOPs, in units of one full ``N x M x C`` GEMM (``2NMC``; asserted by
tests/test_flop_counts.py, which counts every ``tl.dot`` and torch GEMM the kernels run):

=============================== ========================== ===================== ===================== =====
op                              fast path (default)        deterministic         chunked (C_s > 256)   eager
=============================== ========================== ===================== ===================== =====
IS_P2P (fused_rdd_loss)         1 + 2 = 3 (symmetric)      2 + 3 = 5             1 + 2 = 3             4
memory (memory_p2p_loss)        2 + 3 = 5 (rows)           2 + 3 = 5             2 + 3 = 5             3
attention_kl                    2 + 4 = 6 (one-pass)       2 + 6 = 8 (two-pass)  2 + 4 = 6             4
=============================== ========================== ===================== ===================== =====

(forward + backward; "deterministic" = under ``torch.use_deterministic_algorithms(True)``; the symmetric
paths' counts are for many tiles: each unordered tile pair once, the diagonal tiles cost ``1/T`` more;
the symmetric forward needs 1/temperature <= 40, else the forward is 2.)

The floor (bench/harness.py) = max(GEMM FLOPs / matmul rate, bytes / copy bandwidth, exps / exp rate):

* GEMM FLOPs: the *eager* column (the dense formula differentiated by autograd), so the fraction of the
  floor does not reward a kernel for its own recomputation: IS_P2P 4 units = ``8 N^2 C`` (N = M = B*P),
  memory 3 units = ``6 N K C`` (N = B*P, K = 4096), attention_kl 4 units = ``8 B H L^2 d``.
* exponentials: eager's minimal count, as for the FLOPs (a kernel's own recomputed exponentials do not
  raise its bar): one per (row, key) element and side for the two softmaxes, 2 per element; eager's
  backward reuses the saved probabilities. (The fused kernels execute up to 4 per element: 2 forward, 2 in
  the backward's recompute; the symmetric paths half of each.)
* bytes: the two feature maps read once and the student gradient written once (memory: plus the contrast
  rows; attention_kl: the four inputs read, the two gradients written).
Peak memory is incremental (over what the inputs already hold).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdistill
import harness

if harness.on_gpu():
    DTYPE = torch.bfloat16
    IS_CASES = {"(a) CIFAR B32 C1920 P16": (32, 1920, 4, 4), "(b) B8 C640 P1024": (8, 640, 32, 32),
                "(c) B8 C320 P4096": (8, 320, 64, 64)}
    MEM_CASES = {"(d) rows32768 K4096 C1920": (8, 1920, 64, 64, 20000, 4096)}
    ATTN_CASES = {"(e) SD1.5 B4 h8 L4096 d40": (4, 8, 4096, 40)}
else:
    DTYPE = torch.float32
    IS_CASES = {"tiny B4 C32 P16": (4, 32, 4, 4), "tiny B2 C16 P64": (2, 16, 8, 8)}
    MEM_CASES = {"tiny rows128 K64 C32": (2, 32, 8, 8, 200, 64)}
    ATTN_CASES = {"tiny B1 h2 L128 d40": (1, 2, 128, 40)}


def eager_is_p2p(feat_S: torch.Tensor, feat_T: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The official ``Intra_sample_p2p_loss`` formula (without its discarded extra matmul)."""
    def sim(f):
        B, C = f.shape[:2]
        f = F.normalize(f, p=2, dim=1)
        m = torch.einsum("bic,dcj->bdij", f.reshape(B, C, -1).transpose(1, 2), f.reshape(B, C, -1))
        return m.reshape(-1, m.shape[-1])

    p_s = F.log_softmax(sim(feat_S) / temperature, dim=1)
    p_t = F.softmax(sim(feat_T.detach()) / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean")


def eager_memory(s_feats, t_feats, bank, idx, tau_c=0.1, tau_kd=1.0):
    """The loss part of the official ``Memory_p2p_loss.forward`` (contrast rows copied by indexing)."""
    contrast = bank[idx]
    t = F.normalize(t_feats.detach(), p=2, dim=1)
    s = F.normalize(s_feats, p=2, dim=1)
    B, C = s.shape[:2]
    t_logits = torch.matmul(t.reshape(B, C, -1).transpose(1, 2), contrast.T) / tau_c
    s_logits = torch.matmul(s.reshape(B, C, -1).transpose(1, 2), contrast.T) / tau_c
    p_s = F.log_softmax(s_logits / tau_kd, dim=2)
    p_t = F.softmax(t_logits / tau_kd, dim=2)
    return F.kl_div(p_s, p_t, reduction="batchmean") * tau_kd ** 2 / p_s.shape[1]


def eager_attention_kl(q_s, k_s, q_t, k_t):
    """Dense attention-map KL: both (B, H, L, L) maps materialised, softmax in fp32."""
    ls = (q_s @ k_s.transpose(-1, -2)).float() * q_s.shape[-1] ** -0.5
    lt = (q_t @ k_t.transpose(-1, -2)).float() * q_t.shape[-1] ** -0.5
    return F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="sum") / (
        ls.shape[0] * ls.shape[1] * ls.shape[2])


def _providers(fast, eager, args, grads):
    compiled = harness.compiled(eager)
    return {
        "fastdistill": harness.fwd_bwd(lambda: fast(*args), grads),
        "eager": harness.fwd_bwd(lambda: eager(*args), grads),
        "torch.compile": harness.fwd_bwd(lambda: compiled(*args), grads),
    }


@pytest.mark.parametrize("case", list(IS_CASES))
def test_fused_rdd_loss(case):
    B, C, H, W = IS_CASES[case]
    dev = harness.device()
    s = torch.randn(B, C, H, W, device=dev, dtype=DTYPE, requires_grad=True)
    t = torch.randn(B, C, H, W, device=dev, dtype=DTYPE).relu()
    N = B * H * W
    e = s.element_size()
    harness.run_case("fused_rdd_loss", case, _providers(fastdistill.fused_rdd_loss, eager_is_p2p, (s, t), [s]),
                     mode="fwd+bwd", flops=8.0 * N * N * C, bytes_moved=3.0 * e * N * C, exps=2.0 * N * N,
                     extra={"dtype": str(DTYPE), "B": B, "C": C, "P": H * W, "gemm_units_executed": 4,
                            "gemm_units_eager": 4})


@pytest.mark.parametrize("case", list(MEM_CASES))
def test_memory_p2p_loss(case):
    B, C, H, W, bank_rows, K = MEM_CASES[case]
    dev = harness.device()
    s = torch.randn(B, C, H, W, device=dev, dtype=DTYPE, requires_grad=True)
    t = torch.randn(B, C, H, W, device=dev, dtype=DTYPE).relu()
    bank = F.normalize(torch.randn(bank_rows, C, device=dev), dim=1).to(DTYPE)
    idx = torch.round(torch.linspace(0, bank_rows - 1, K, device=dev)).long()

    def fast(s, t, bank, idx):
        return fastdistill.memory_p2p_loss(s, t, bank, index=idx, check_index=False)

    N = B * H * W
    e = s.element_size()
    harness.run_case("memory_p2p_loss", case, _providers(fast, eager_memory, (s, t, bank, idx), [s]),
                     mode="fwd+bwd", flops=6.0 * N * K * C, bytes_moved=e * (3.0 * N * C + K * C),
                     exps=2.0 * N * K, extra={"dtype": str(DTYPE), "rows": N, "contrast": K, "C": C,
                                              "gemm_units_executed": 5, "gemm_units_eager": 3})


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_kl(case):
    B, Hh, L, d = ATTN_CASES[case]
    dev = harness.device()
    q_s, k_s = (torch.randn(B, Hh, L, d, device=dev, dtype=DTYPE, requires_grad=True) for _ in range(2))
    q_t, k_t = (torch.randn(B, Hh, L, d, device=dev, dtype=DTYPE) for _ in range(2))
    e = q_s.element_size()
    harness.run_case("attention_kl", case,
                     _providers(fastdistill.attention_kl, eager_attention_kl, (q_s, k_s, q_t, k_t), [q_s, k_s]),
                     mode="fwd+bwd", flops=8.0 * B * Hh * L * L * d, bytes_moved=6.0 * e * B * Hh * L * d,
                     exps=2.0 * B * Hh * L * L, extra={"dtype": str(DTYPE), "B": B, "H": Hh, "L": L, "d": d,
                                                       "gemm_units_executed": 6, "gemm_units_eager": 4})
