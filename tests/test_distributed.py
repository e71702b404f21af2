"""fastdistill.distributed and every cross-sample loss under DDP: 2 CPU ranks, gloo, file:// rendezvous.

The central check (../shared/ecosystem.md section 4.2): a DDP run on 2 ranks, each holding half the batch,
gives exactly the gradient of the single-process full-batch loss, and the common mistake (no-grad gather
with the local slot put back) gives 1/W of it and fails that same check, so the check can fail.

Each test group is one ``torch.multiprocessing.spawn`` of 2 ranks that runs several scenarios (spawning
costs ~3 s); a module-scoped fixture caches a group's per-rank results and the tests assert on them.
A scenario that raises records its traceback, and the test for it fails with that traceback (ops that have
not landed fail loudly, they are never skipped).
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastdistill
import fastdistill.nn  # noqa: F401  (not imported by `import fastdistill`)
from fastdistill import distributed as fdist
from fastdistill import testing

pytestmark = pytest.mark.distributed

WORLD = 2
# fp32 everywhere: the DDP and reference paths sum the same terms in a different order
RTOL, ATOL = 2e-4, 1e-6


# --------------------------------------------------------------------------------------------------
# spawn machinery


_SCRATCH: list[str] = []  # the spawn's output dir, set in each rank (scenarios signal through files there)


def _worker(rank: int, world: int, rdzv: str, group_name: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on a shared 2-core box
    _SCRATCH[:] = [out_dir]
    # A short timeout turns a would-be hang (one rank failing inside a collective) into an error.
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for name, fn in GROUPS[group_name]:
            try:
                results[name] = {"ok": True, "value": fn(rank, world)}
            except Exception:  # recorded and re-raised as a test failure in the parent
                results[name] = {"ok": False, "error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _spawn(tmp: Path, group_name: str) -> list[dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(WORLD, str(tmp / "rdzv"), group_name, str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _values(results: list[dict[str, Any]], name: str) -> list[Any]:
    """The scenario's value on every rank, or a test failure carrying the rank's traceback."""
    out = []
    for r, res in enumerate(results):
        entry = res.get(name)
        if entry is None:
            pytest.fail(f"scenario {name} did not run on rank {r}")
        if not entry["ok"]:
            pytest.fail(f"scenario {name} failed on rank {r}:\n{entry['error']}")
        out.append(entry["value"])
    return out


def _close(a: Any, b: Any, *, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                          rtol=rtol, atol=atol)


def _assert_close(a: Any, b: Any, what: str, *, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# helpers used inside the ranks


def _grads(model: nn.Module) -> list[float]:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).tolist()


def _nograd_gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def _nograd_gather_local_slot(t: torch.Tensor) -> torch.Tensor:
    """The common mistake (CLIP-style): no-grad all_gather, then put the local tensor (with grad) back."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def _full_inputs(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


LossOf = Callable[[torch.Tensor, list[torch.Tensor], Any], torch.Tensor]


def _ddp_vs_full_batch(rank: int, world: int, make_model: Callable[[], nn.Module], x_full: torch.Tensor,
                       extras_full: list[torch.Tensor], loss_of: LossOf,
                       sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Gradients of: the single-process full-batch loss (reference), the DDP run with the op's process
    group (default WORLD), and the DDP run with the no-grad-gather-plus-local-slot mistake.
    ``sizes``: per-rank batch sizes (default: equal split); uneven sizes skip the mistake run."""
    if sizes is None:
        sizes = (x_full.shape[0] // world,) * world
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])

    torch.manual_seed(1234)
    ref_model = make_model()
    ref_loss = loss_of(ref_model(x_full), extras_full, None)
    ref_loss.backward()

    torch.manual_seed(1234)
    ddp = DDP(make_model())
    loss = loss_of(ddp(x_full[sl]), [e[sl] for e in extras_full], fdist.WORLD)
    loss.backward()
    out = {"ref_loss": ref_loss.item(), "loss": loss.item(), "ref_grad": _grads(ref_model),
           "grad": _grads(ddp.module)}
    if len(set(sizes)) > 1:
        return out

    torch.manual_seed(1234)
    ddp_bad = DDP(make_model())
    feats = _nograd_gather_local_slot(ddp_bad(x_full[sl]))
    bad_loss = loss_of(feats, [_nograd_gather(e[sl]) for e in extras_full], None)
    bad_loss.backward()
    out.update(bad_loss=bad_loss.item(), bad_grad=_grads(ddp_bad.module))
    return out


# --------------------------------------------------------------------------------------------------
# group 1: the primitives


def _prim_queries(rank: int, world: int) -> dict[str, Any]:
    g_self = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
    out = {
        "is_active": fdist.is_active(),
        "is_active_none": fdist.is_active(None),
        "world_size": fdist.world_size(),
        "rank": fdist.rank(),
        "resolved_world": fdist.resolve_group(fdist.WORLD) is not None,
        "own_single_group_local": fdist.resolve_group(g_self[rank]) is None,
    }
    try:
        fdist.resolve_group(g_self[1 - rank])
        out["non_member"] = "no error"
    except ValueError as e:
        out["non_member"] = str(e)
    return out


def _gather_case(rank: int, world: int, legacy: bool) -> dict[str, Any]:
    calls = []
    import torch.distributed.nn.functional as dnf
    original = dnf.all_gather

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    dnf.all_gather = counting
    try:
        with fdist.force_legacy_gather(legacy):
            path = fdist.gather_path()
            x = (torch.arange(6.0).reshape(3, 2) + 10 * rank).requires_grad_()
            y = fdist.all_gather_with_grad(x)
            w = torch.arange(12.0).reshape(6, 2) + 1
            (y * w).sum().backward()
    finally:
        dnf.all_gather = original
    return {"path": path, "legacy_calls": len(calls), "y": y.tolist(), "grad": x.grad.tolist(),
            "type": type(y).__name__}


def _prim_gather_functional(rank: int, world: int) -> dict[str, Any]:
    return _gather_case(rank, world, legacy=False)


def _prim_gather_legacy(rank: int, world: int) -> dict[str, Any]:
    return _gather_case(rank, world, legacy=True)


def _prim_uneven(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for legacy in (False, True):
        with fdist.force_legacy_gather(legacy):
            try:
                fdist.all_gather_with_grad(torch.ones(2 + rank, 3, requires_grad=True))
                out[f"legacy={legacy}"] = "no error"
            except ValueError as e:
                out[f"legacy={legacy}"] = str(e)
    try:  # same batch, different trailing shape
        fdist.all_gather_with_grad(torch.ones(2, 3 + rank))
        out["trailing"] = "no error"
    except ValueError as e:
        out["trailing"] = str(e)
    # the group still works after the rejected calls (no rank is left inside a collective)
    out["after"] = fdist.all_gather_with_grad(torch.full((1,), float(rank))).tolist()
    return out


def _prim_all_reduce(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for legacy in (False, True):  # functional collective, and the c10d fallback
        with fdist.force_legacy_gather(legacy):
            x = (torch.arange(4.0) * (rank + 1)).requires_grad_()
            y = fdist.all_reduce_with_grad(x)
            (y * torch.arange(1.0, 5.0)).sum().backward()
        out[f"legacy={legacy}"] = {"y": y.tolist(), "grad": x.grad.tolist(), "x_after": x.tolist()}
    return out


_MOMENT_ROWS = (3, 5)  # uneven per-rank counts on purpose: moments do not need equal sizes


def _moment_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    full = torch.randn(sum(_MOMENT_ROWS), 4, generator=g, dtype=torch.float64) * 3 + 5
    start = sum(_MOMENT_ROWS[:rank])
    return full, full[start:start + _MOMENT_ROWS[rank]]


def _moment_loss(mean: torch.Tensor, m2: torch.Tensor, n: float) -> torch.Tensor:
    return (mean ** 2).sum() + (m2 / n).pow(2).sum()  # non-linear in both, so a local merge differs


def _prim_moments(rank: int, world: int) -> dict[str, Any]:
    full, local = _moment_data(rank)
    local = local.clone().requires_grad_()
    mean = local.mean(0)
    m2 = ((local - mean) ** 2).sum(0)
    n, gmean, gm2 = fdist.all_reduce_moments(local.shape[0], mean, m2)
    _moment_loss(gmean, gm2, float(n)).backward()
    # float32 inputs, tensor counts of shape (C,) broadcast against mean, and a rank with n == 0
    x32 = local.detach().float()
    if rank == 1:
        x32 = x32[:0]
    cnt = torch.full((4,), float(x32.shape[0]))
    mean32 = x32.mean(0) if x32.shape[0] else torch.zeros(4)
    m2_32 = ((x32 - mean32) ** 2).sum(0)
    n32, gmean32, gm2_32 = fdist.all_reduce_moments(cnt, mean32, m2_32)
    return {"n": n, "mean": gmean.tolist(), "m2": gm2.tolist(), "grad": local.grad.tolist(),
            "n32": n32.tolist(), "mean32": gmean32.tolist(), "m2_32": gm2_32.tolist(),
            "dtype32": str(gmean32.dtype)}


def _prim_compiled_gather(rank: int, world: int) -> dict[str, Any]:
    """all_gather_with_grad and all_reduce_with_grad inside torch.compile(fullgraph=True): functional
    collectives trace, and the size check (host-side) is skipped while tracing instead of breaking the graph."""
    def f(x: torch.Tensor) -> torch.Tensor:
        y = fdist.all_gather_with_grad(x)
        s = fdist.all_reduce_with_grad(x.sum(0))
        return (y.softmax(0) * y).sum() + (s ** 2).sum()

    x = _full_inputs(30 + rank, 3, 4).requires_grad_()
    out = torch.compile(f, fullgraph=True)(x)
    out.backward()
    compiled_grad = x.grad.clone()
    x.grad = None
    eager = f(x)
    eager.backward()
    return {"compiled": out.item(), "eager": eager.item(), "compiled_grad": compiled_grad.tolist(),
            "eager_grad": x.grad.tolist()}


# --------------------------------------------------------------------------------------------------
# group 2: every cross-sample loss, DDP gradients vs full-batch gradients

B, C, H, W_ = 3, 4, 2, 3  # per-rank batch 3 (global 6), P = 6 pixels: nothing a power of two


def _map_model() -> nn.Module:
    return nn.Conv2d(3, C, kernel_size=1)


def _vec_model() -> nn.Module:
    return nn.Linear(5, 2 * C)


def _loss_primitive_relational(rank: int, world: int) -> dict[str, Any]:
    """A dense relational KL written with the primitives alone (checks the harness and the primitives)."""
    def loss_of(feat, extras, group):
        feat, teacher = fdist.all_gather_with_grad(feat, group), fdist.all_gather_with_grad(extras[0], group)
        fs, ft = F.normalize(feat, dim=1), F.normalize(teacher, dim=1)
        log_ps, log_pt = (fs @ fs.T / 0.5).log_softmax(1), (ft @ ft.T / 0.5).log_softmax(1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")

    x = _full_inputs(21, WORLD * B, 5)
    teacher = _full_inputs(22, WORLD * B, 6)
    return _ddp_vs_full_batch(rank, world, _vec_model, x, [teacher], loss_of)


def _primitive_moments_loss(feat: torch.Tensor, extras: list[torch.Tensor], group: Any) -> torch.Tensor:
    """Per-channel batch moments merged with all_reduce_moments (SyncBatchNorm-style statistics)."""
    x = feat.transpose(0, 1).reshape(feat.shape[1], -1)
    mean = x.mean(1)
    n, mean, m2 = fdist.all_reduce_moments(x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(1), group)
    return ((mean - 0.3) ** 2).sum() + ((m2 / n - 1.0) ** 2).sum()


def _loss_primitive_moments(rank: int, world: int) -> dict[str, Any]:
    x = _full_inputs(23, WORLD * B, 3, H, W_)
    return _ddp_vs_full_batch(rank, world, _map_model, x, [], _primitive_moments_loss)


def _loss_relational_kl(rank: int, world: int) -> dict[str, Any]:
    def loss_of(feat, extras, group):
        t = extras[0]
        return fastdistill.relational_kl(feat[:, :C], feat[:, C:], t[:, :3], t[:, 3:], temperature=0.5,
                                         normalize=True, process_group=group)

    x = _full_inputs(1, WORLD * B, 5)
    teacher = _full_inputs(2, WORLD * B, 6)
    return _ddp_vs_full_batch(rank, world, _vec_model, x, [teacher], loss_of)


def _loss_fused_rdd(rank: int, world: int) -> dict[str, Any]:
    def loss_of(feat, extras, group):
        return fastdistill.fused_rdd_loss(feat, extras[0], temperature=0.5, pairs="all", process_group=group)

    x = _full_inputs(3, WORLD * B, 3, H, W_)
    teacher = _full_inputs(4, WORLD * B, 5, H, W_).relu()
    return _ddp_vs_full_batch(rank, world, _map_model, x, [teacher], loss_of)


def _loss_fused_rdd_bf16(rank: int, world: int) -> dict[str, Any]:
    """bf16 activations (as under autocast): the gathers carry bf16, the loss accumulates in fp32."""
    def loss_of(feat, extras, group):
        return fastdistill.fused_rdd_loss(feat.to(torch.bfloat16), extras[0].to(torch.bfloat16), temperature=0.5,
                                          pairs="all", process_group=group)

    x = _full_inputs(31, WORLD * B, 3, H, W_)
    teacher = _full_inputs(32, WORLD * B, 5, H, W_).relu()
    return _ddp_vs_full_batch(rank, world, _map_model, x, [teacher], loss_of)


def _loss_intra_sample_p2p(rank: int, world: int) -> dict[str, Any]:
    def loss_of(feat, extras, group):
        crit = fastdistill.nn.IntraSampleP2PLoss(temperature=0.5, process_group=group)
        return crit(feat, extras[0])

    x = _full_inputs(5, WORLD * B, 3, H, W_)
    teacher = _full_inputs(6, WORLD * B, C, H, W_).relu()
    return _ddp_vs_full_batch(rank, world, _map_model, x, [teacher], loss_of)


def _loss_synced_batch_norm(rank: int, world: int) -> dict[str, Any]:
    """MemoryP2PLoss's head batch norm: statistics merged over ranks, gradients through the merge."""
    from fastdistill.nn.rdd import _SyncBatchNorm

    def loss_of(feat, extras, group):
        bn = _SyncBatchNorm(feat.shape[1], affine=False, process_group=group).train()
        return fastdistill.fused_rdd_loss(bn(feat), extras[0], temperature=0.5, process_group=group)

    x = _full_inputs(33, WORLD * B, 3, H, W_)
    teacher = _full_inputs(34, WORLD * B, 5, H, W_).relu()
    return _ddp_vs_full_batch(rank, world, _map_model, x, [teacher], loss_of)


def _loss_memory_p2p_op(rank: int, world: int) -> dict[str, Any]:
    """The memory term's loss with a group: the mean over the global batch's pixels (same bank on all ranks)."""
    bank = F.normalize(_full_inputs(35, 10, C), dim=1)
    index = torch.tensor([0, 3, 4, 9, 7])

    def loss_of(feat, extras, group):
        return fastdistill.memory_p2p_loss(feat, extras[0], bank, index=index, temperature=0.5, process_group=group)

    x = _full_inputs(36, WORLD * B, 3, H, W_)
    teacher = _full_inputs(37, WORLD * B, C, H, W_).relu()
    return _ddp_vs_full_batch(rank, world, _map_model, x, [teacher], loss_of)


def _moments_of(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) from moment_statistics' result, whether a tuple or a named result."""
    if isinstance(out, tuple) and len(out) >= 2:
        return out[0], out[1]
    return out.mean, out.var


def _loss_moment_statistics(rank: int, world: int) -> dict[str, Any]:
    def loss_of(feat, extras, group):
        mean, var = _moments_of(fastdistill.moment_statistics(feat, dims=(0, 2, 3), process_group=group))
        return ((mean - 0.3) ** 2).sum() + ((var - 1.0) ** 2).sum()

    x = _full_inputs(7, WORLD * B, 3, H, W_)
    return _ddp_vs_full_batch(rank, world, _map_model, x, [], loss_of)


# timesteps of the global batch: segment 0 has 2 samples on rank 0 and 0 on rank 1, segment 2 the reverse,
# segment 1 has 1 and 2: per-segment counts differ across ranks, so local counts give a different loss.
_BOUNDARIES = [0, 300, 600, 1000]
_TIMESTEPS = [10, 250, 400, 450, 900, 320]


def _loss_segment_mse(rank: int, world: int) -> dict[str, Any]:
    boundaries = torch.tensor(_BOUNDARIES)

    def loss_of(feat, extras, group):
        target, t = extras
        routing = fastdistill.segment_route(t.long(), boundaries)
        out = fastdistill.segment_mse(feat, target, routing, reduction="per_segment", process_group=group)
        return out.sum()

    x = _full_inputs(8, WORLD * B, 3, H, W_)
    target = _full_inputs(9, WORLD * B, C, H, W_)
    t = torch.tensor(_TIMESTEPS, dtype=torch.float64)  # float so the no-grad gather helper can carry it
    return _ddp_vs_full_batch(rank, world, _map_model, x, [target, t], loss_of)


def _loss_segment_mse_uneven(rank: int, world: int) -> dict[str, Any]:
    """segment_mse all-reduces sums and counts (no gather): uneven per-rank batches are handled."""
    boundaries = torch.tensor(_BOUNDARIES)

    def loss_of(feat, extras, group):
        target, t = extras
        routing = fastdistill.segment_route(t.long(), boundaries)
        return fastdistill.segment_mse(feat, target, routing, reduction="per_segment", process_group=group).sum()

    x = _full_inputs(10, 6, 3, H, W_)
    target = _full_inputs(11, 6, C, H, W_)
    t = torch.tensor(_TIMESTEPS, dtype=torch.float64)
    return _ddp_vs_full_batch(rank, world, _map_model, x, [target, t], loss_of, sizes=(2, 4))


def _loss_primitive_moments_uneven(rank: int, world: int) -> dict[str, Any]:
    """all_reduce_moments merges uneven per-rank counts: the gradient check holds with batches 2 and 4."""
    return _ddp_vs_full_batch(rank, world, _map_model, _full_inputs(24, 6, 3, H, W_), [],
                              _primitive_moments_loss, sizes=(2, 4))


class _StudentWithMemoryLoss(nn.Module):
    def __init__(self, sync_group: Any) -> None:
        super().__init__()
        self.student = _map_model()
        # sync_group: the official collectives (queue gather, head batch norm); the loss stays per rank
        self.memory = fastdistill.nn.MemoryP2PLoss(pixel_memory_size=40, pixel_contrast_size=12,
                                                   s_channels=C, t_channels=C, factor=0.1, sync_group=sync_group)

    def forward(self, x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.memory(self.student(x), teacher)


def _memory_run(rank: int, world: int, mode: str, steps: int = 4) -> dict[str, Any]:
    """mode "single": one process, full batch; "student_ddp": DDP around the student only (the queue
    update under test does not depend on the projection head); "whole_ddp": one DDP around student and
    loss module, the natural way to also average the projection head's gradients."""
    torch.manual_seed(99)  # same seed on every rank, as the official RDD loop does
    model = _StudentWithMemoryLoss(None if mode == "single" else fdist.WORLD)
    # broadcast_buffers=False: DDP must not paper over diverging queues by copying rank 0's buffers
    if mode == "whole_ddp":
        net: nn.Module = DDP(model, broadcast_buffers=False)
    else:
        if mode == "student_ddp":
            model.student = DDP(model.student, broadcast_buffers=False)
        net = model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        x = _full_inputs(100 + step, WORLD * B, 3, H, W_)
        teacher = _full_inputs(200 + step, WORLD * B, C, H, W_).relu()
        if mode != "single":
            x, teacher = x[rank * B:(rank + 1) * B], teacher[rank * B:(rank + 1) * B]
        loss = net(x, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"queue": model.memory.teacher_pixel_queue.tolist(),
            "ptr": model.memory.pixel_queue_ptr.reshape(-1).tolist(), "losses": losses}


def _loss_memory_p2p(rank: int, world: int) -> dict[str, Any]:
    return {"ddp": _memory_run(rank, world, "student_ddp"), "single": _memory_run(rank, world, "single")}


def _loss_memory_p2p_whole_ddp(rank: int, world: int) -> dict[str, Any]:
    return _memory_run(rank, world, "whole_ddp")


# --------------------------------------------------------------------------------------------------
# group "defaults": every loss's default process_group is local (the official per-rank loss)


def _default_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's slice of one global batch: student maps (leaf), teacher maps, timesteps."""
    sl = slice(rank * B, (rank + 1) * B)
    feat = _full_inputs(41, WORLD * B, C, H, W_)[sl].clone().requires_grad_()
    teacher = _full_inputs(42, WORLD * B, C, H, W_).relu()[sl]
    return feat, teacher, torch.tensor(_TIMESTEPS)[sl]


def _moment_case(feat: torch.Tensor, kw: dict) -> torch.Tensor:
    mean, var = _moments_of(fastdistill.moment_statistics(feat, dims=(0, 2, 3), **kw))
    return ((mean - 0.3) ** 2).sum() + ((var - 1.0) ** 2).sum()


# name -> loss(feat, teacher, timesteps, kw); kw is {} (the default) or {"process_group": ...}
_DEFAULT_CASES: dict[str, Callable[..., torch.Tensor]] = {
    "relational_kl": lambda f, t, ts, kw: fastdistill.relational_kl(
        f.flatten(1), f.flatten(1), t.flatten(1), t.flatten(1), temperature=0.5, normalize=True, **kw),
    "fused_rdd_loss": lambda f, t, ts, kw: fastdistill.fused_rdd_loss(f, t, temperature=0.5, **kw),
    "memory_p2p_loss": lambda f, t, ts, kw: fastdistill.memory_p2p_loss(
        f, t, F.normalize(_full_inputs(43, 10, C), dim=1), temperature=0.5, **kw),
    "moment_statistics": lambda f, t, ts, kw: _moment_case(f, kw),
    "segment_mse": lambda f, t, ts, kw: fastdistill.segment_mse(
        f, t, fastdistill.segment_route(ts, _BOUNDARIES), **kw).sum(),
    "IntraSampleP2PLoss": lambda f, t, ts, kw: fastdistill.nn.IntraSampleP2PLoss(0.5, **kw)(f, t),
    "RDDLoss": lambda f, t, ts, kw: fastdistill.nn.RDDLoss(C, C, memory=False, **kw)(f, t),
}


def _memory_module(kw: dict) -> nn.Module:
    torch.manual_seed(8)  # same weights, queue and enqueue draws on every rank and for every variant
    return fastdistill.nn.MemoryP2PLoss(pixel_memory_size=40, pixel_contrast_size=12, s_channels=C, t_channels=C,
                                        **kw)


def _value_and_grad(case: Callable[..., torch.Tensor], rank: int, kw: dict) -> dict[str, Any]:
    feat, teacher, ts = _default_inputs(rank)
    loss = case(feat, teacher, ts, kw)
    loss.backward()
    return {"loss": loss.item(), "grad": feat.grad.reshape(-1).tolist()}


def _defaults_local(rank: int, world: int) -> dict[str, Any]:
    """Each loss with its default, with process_group=None and with WORLD, on this rank's slice."""
    out: dict[str, Any] = {"active": fdist.is_active(fdist.WORLD)}
    for name, case in _DEFAULT_CASES.items():
        out[name] = {label: _value_and_grad(case, rank, kw) for label, kw in
                     (("default", {}), ("none", {"process_group": None}), ("world", {"process_group": fdist.WORLD}))}
    # MemoryP2PLoss: the loss is per rank by default, the official queue gather still runs
    mem: dict[str, Any] = {}
    for label, kw in (("default", {}), ("none", {"process_group": None}), ("world", {"process_group": fdist.WORLD})):
        module = _memory_module(kw).train()
        mem[label] = _value_and_grad(lambda f, t, ts, _kw: module(f, t), rank, {})
        mem[label]["queue"] = module.teacher_pixel_queue.tolist()
    out["MemoryP2PLoss"] = mem
    return out


def _defaults_skip(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 never calls the losses; rank 0 calls every one with its default (and MemoryP2PLoss with
    sync_group=None), forward and backward. Rank 1 waits for rank 0's flag file, running no collective: if a
    default ran one, rank 0 would block in it and rank 1's wait would time out."""
    flag = Path(_SCRATCH[0]) / "skip_done"
    if rank == 0:
        ran = []
        for name, case in _DEFAULT_CASES.items():
            _value_and_grad(case, rank, {})
            ran.append(name)
        module = _memory_module({"sync_group": None}).train()
        _value_and_grad(lambda f, t, ts, _kw: module(f, t), rank, {})
        ran.append("MemoryP2PLoss(sync_group=None)")
        flag.write_text("done")
        return {"ran": ran}
    import time
    deadline = time.monotonic() + 30.0
    while not flag.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 did not finish the local losses within 30 s: a default ran a collective")
        time.sleep(0.05)
    return {"waited": True}


# --------------------------------------------------------------------------------------------------
# group 3: MultiStudent under DDP with a student that gets no samples on a rank


def _tiny_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8),
                       norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)


# rank 0 only feeds students 0 and 1, rank 1 only students 1 and 2
_MS_TIMESTEPS = [[10, 350, 20, 420], [700, 800, 320, 950]]


def _make_multi_student() -> nn.Module:
    torch.manual_seed(5)
    return fastdistill.nn.MultiStudent([_tiny_unet() for _ in range(3)], _BOUNDARIES, num_train_timesteps=1000)


def _multi_student_ddp(rank: int, world: int) -> dict[str, Any]:
    n = len(_MS_TIMESTEPS[0])
    x = _full_inputs(11, world * n, 3, 8, 8)
    target = _full_inputs(12, world * n, 3, 8, 8)
    t_full = torch.tensor(sum(_MS_TIMESTEPS, []))

    ref = _make_multi_student()
    F.mse_loss(ref(x, t_full).sample, target).backward()

    model = _make_multi_student()
    ddp = DDP(model)  # default find_unused_parameters=False: the idle student must still take part
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sl = slice(rank * n, (rank + 1) * n)
    t_local = torch.tensor(_MS_TIMESTEPS[rank])
    losses, first_grad = [], None
    for step in range(3):
        out = ddp(x[sl], t_local)
        loss = F.mse_loss(out.sample, target[sl])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first_grad = _grads(model)
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "grad": first_grad, "ref_grad": _grads(ref),
            "param_sum": params.sum().item(), "param_abs": params.abs().sum().item(),
            "params_head": params[:64].tolist()}


def _multi_student_fsdp(rank: int, world: int) -> dict[str, Any]:
    """FSDP2: ONE fully_shard around the MultiStudent (so an idle student's parameters still take part in
    every rank's all-gather / reduce-scatter), a frozen teacher sharded on its own."""
    from torch.distributed.fsdp import fully_shard

    n = len(_MS_TIMESTEPS[0])
    x = _full_inputs(13, world * n, 3, 8, 8)
    t_full = torch.tensor(sum(_MS_TIMESTEPS, []))
    sl = slice(rank * n, (rank + 1) * n)

    torch.manual_seed(6)
    teacher = _tiny_unet().eval().requires_grad_(False)
    ref = _make_multi_student()
    with torch.no_grad():
        ref_target = teacher(x, t_full).sample
    F.mse_loss(ref(x, t_full).sample, ref_target).backward()
    ref_grad = _grads(ref)

    fully_shard(teacher)  # frozen and sharded: parameters gathered for its forward only
    model = _make_multi_student()
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t_local = torch.tensor(_MS_TIMESTEPS[rank])
    losses, first_grad = [], None
    for step in range(3):
        with torch.no_grad():
            target = teacher(x[sl], t_local).sample
        loss = F.mse_loss(model(x[sl], t_local).sample, target)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # FSDP's reduce-scatter averages: the full gradient is the full-batch gradient
            first_grad = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()]).tolist()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grad": first_grad, "ref_grad": ref_grad}


GROUPS: dict[str, list[tuple[str, Callable[[int, int], Any]]]] = {
    "primitives": [
        ("queries", _prim_queries),
        ("gather_functional", _prim_gather_functional),
        ("gather_legacy", _prim_gather_legacy),
        ("uneven", _prim_uneven),
        ("all_reduce", _prim_all_reduce),
        ("moments", _prim_moments),
    ],
    "losses": [
        ("primitive_relational", _loss_primitive_relational),
        ("primitive_moments", _loss_primitive_moments),
        ("relational_kl", _loss_relational_kl),
        ("fused_rdd_loss", _loss_fused_rdd),
        ("fused_rdd_loss_bf16", _loss_fused_rdd_bf16),
        ("IntraSampleP2PLoss", _loss_intra_sample_p2p),
        ("synced_batch_norm", _loss_synced_batch_norm),
        ("moment_statistics", _loss_moment_statistics),
        ("segment_mse", _loss_segment_mse),
        ("memory_p2p_loss", _loss_memory_p2p_op),
        ("segment_mse_uneven", _loss_segment_mse_uneven),
        ("primitive_moments_uneven", _loss_primitive_moments_uneven),
        ("MemoryP2PLoss", _loss_memory_p2p),
        ("MemoryP2PLoss_whole_ddp", _loss_memory_p2p_whole_ddp),
    ],
    "compile": [("gather", _prim_compiled_gather)],
    "defaults": [("local", _defaults_local), ("skip", _defaults_skip)],
    "multi_student": [("ddp", _multi_student_ddp), ("fsdp", _multi_student_fsdp)],
}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict[str, Any]]]:
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(group: str) -> list[dict[str, Any]]:
        if group not in cache:
            cache[group] = _spawn(tmp_path_factory.mktemp(f"dist_{group}"), group)
        return cache[group]

    return get


# --------------------------------------------------------------------------------------------------
# tests: local behaviour (no process group in this process)


def test_local_without_process_group():
    assert not dist.is_initialized()
    assert fdist.resolve_group(fdist.WORLD) is None
    assert fdist.resolve_group(None) is None
    assert not fdist.is_active()
    assert fdist.world_size() == 1 and fdist.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert fdist.all_gather_with_grad(x) is x
    assert fdist.all_reduce_with_grad(x) is x
    mean, m2 = torch.randn(4), torch.rand(4)
    n, mean_out, m2_out = fdist.all_reduce_moments(5, mean, m2)
    assert n == 5 and mean_out is mean and m2_out is m2


def test_bad_arguments():
    with pytest.raises(ValueError, match="process_group"):
        fdist.resolve_group("everyone")
    with pytest.raises(ValueError, match="not initialised"):
        fdist.resolve_group(object())
    with pytest.raises(TypeError, match="tensor"):
        fdist.all_gather_with_grad([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 1 dim"):
        fdist.all_gather_with_grad(torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        fdist.all_reduce_moments(3, torch.zeros(4), torch.zeros(5))


# --------------------------------------------------------------------------------------------------
# tests: primitives on 2 ranks


def test_group_queries(spawned):
    for r, v in enumerate(_values(spawned("primitives"), "queries")):
        assert v["is_active"] and v["resolved_world"] and not v["is_active_none"]
        assert v["world_size"] == WORLD and v["rank"] == r
        assert v["own_single_group_local"]
        assert "not a member" in v["non_member"]


@pytest.mark.parametrize("path", ["functional", "legacy"])
def test_all_gather_with_grad(spawned, path):
    vals = _values(spawned("primitives"), f"gather_{path}")
    expected_y = [[float(2 * (i % 3) + j + 10 * (i // 3)) for j in range(2)] for i in range(6)]
    w = torch.arange(12.0).reshape(6, 2) + 1
    for r, v in enumerate(vals):
        assert v["path"] == path
        assert (v["legacy_calls"] > 0) == (path == "legacy")
        assert v["type"] == "Tensor"
        assert v["y"] == expected_y
        # both ranks' losses use rank r's slice: its gradient is the sum of the W identical upstreams
        assert v["grad"] == (WORLD * w[3 * r:3 * r + 3]).tolist()


def test_uneven_batches_rejected_without_hang(spawned):
    for v in _values(spawned("primitives"), "uneven"):
        for legacy in (False, True):
            msg = v[f"legacy={legacy}"]
            assert "rank 0: 2" in msg and "rank 1: 3" in msg, msg
        assert "differ across ranks" in v["trailing"]
        assert v["after"] == [0.0, 1.0]


@pytest.mark.slow
def test_collectives_under_torch_compile(spawned):
    for v in _values(spawned("compile"), "gather"):
        _assert_close(v["compiled"], v["eager"], "compiled gather loss", rtol=1e-5)
        _assert_close(v["compiled_grad"], v["eager_grad"], "compiled gather gradient", rtol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_all_reduce_with_grad(spawned, legacy):
    for both in _values(spawned("primitives"), "all_reduce"):
        v = both[f"legacy={legacy}"]
        assert v["y"] == [0.0, 3.0, 6.0, 9.0]
        assert v["grad"] == [2.0, 4.0, 6.0, 8.0]  # sum over both ranks of the upstream gradient
        assert v["x_after"] != v["y"]  # the input is not modified in place


def test_all_reduce_moments_matches_single_process(spawned):
    vals = _values(spawned("primitives"), "moments")
    full, _ = _moment_data(0)
    full = full.clone().requires_grad_()
    mean = full.mean(0)
    m2 = ((full - mean) ** 2).sum(0)
    _moment_loss(mean, m2, float(full.shape[0])).backward()
    start = 0
    for r, v in enumerate(vals):
        assert v["n"] == full.shape[0]
        _assert_close(v["mean"], mean.tolist(), "global mean", rtol=1e-12, atol=1e-12)
        _assert_close(v["m2"], m2.tolist(), "global M2", rtol=1e-12, atol=1e-12)
        rows = _MOMENT_ROWS[r]
        # every rank's loss is the global loss: rank r's rows receive W times the full-batch gradient
        _assert_close(v["grad"], (WORLD * full.grad[start:start + rows]).tolist(), "moment gradient",
                      rtol=1e-10, atol=1e-12)
        start += rows
        # float32 with a rank holding no samples: the global moments are rank 0's alone
        x0 = full.detach()[:_MOMENT_ROWS[0]].float()
        assert v["n32"] == [float(_MOMENT_ROWS[0])] * 4
        _assert_close(v["mean32"], x0.mean(0).tolist(), "mean with an empty rank", rtol=1e-5)
        _assert_close(v["m2_32"], ((x0 - x0.mean(0)) ** 2).sum(0).tolist(), "M2 with an empty rank", rtol=1e-5)
        assert v["dtype32"] == "torch.float32"


# --------------------------------------------------------------------------------------------------
# tests: every cross-sample loss under DDP


LOSSES = ["primitive_relational", "primitive_moments", "relational_kl", "fused_rdd_loss_bf16", "fused_rdd_loss",
          "IntraSampleP2PLoss", "synced_batch_norm", "moment_statistics", "segment_mse", "memory_p2p_loss"]


@pytest.mark.parametrize("loss", LOSSES)
def test_ddp_gradient_equals_full_batch_gradient(spawned, loss):
    vals = _values(spawned("losses"), loss)
    for r, v in enumerate(vals):
        if loss.endswith("_bf16"):  # the two runs round differently: max-norm tolerance of the dtype
            for key in ("loss", "grad"):
                testing.assert_close(torch.tensor(v[key]).reshape(-1), torch.tensor(v["ref_" + key]).reshape(-1),
                                     rtol=testing.tolerance(torch.bfloat16), name=f"{loss} rank {r} {key}")
            continue
        _assert_close(v["loss"], v["ref_loss"], f"{loss}: rank {r} loss vs the full-batch loss")
        _assert_close(v["grad"], v["ref_grad"], f"{loss}: rank {r} DDP gradient vs the full-batch gradient")
    # DDP all-reduced the gradients: identical on both ranks (not just close to the reference)
    assert vals[0]["grad"] == vals[1]["grad"]


@pytest.mark.parametrize("loss", LOSSES)
def test_nograd_gather_mistake_fails_the_same_check(spawned, loss):
    for v in _values(spawned("losses"), loss):
        rtol = testing.tolerance(torch.bfloat16) if loss.endswith("_bf16") else RTOL
        # the loss value is right ...
        _assert_close(v["bad_loss"], v["ref_loss"], f"{loss}: mistake loss value", rtol=rtol)
        # ... but the gradient is not: the same comparison as above must fail
        assert not _close(v["bad_grad"], v["ref_grad"]), f"{loss}: the mistake went undetected"
        # each rank back-propagates only through its own slot: DDP's mean gives exactly 1/W of the gradient
        _assert_close([WORLD * g for g in v["bad_grad"]], v["ref_grad"], f"{loss}: mistake = 1/W", rtol=rtol,
                      atol=rtol * max(abs(g) for g in v["ref_grad"]))


@pytest.mark.parametrize("loss", ["primitive_moments_uneven", "segment_mse_uneven"])
def test_uneven_batches_handled_by_reduction_based_losses(spawned, loss):
    """Losses built on all-reduces (moments, per-segment sums) accept different batch sizes per rank."""
    vals = _values(spawned("losses"), loss)
    for r, v in enumerate(vals):
        _assert_close(v["loss"], v["ref_loss"], f"{loss}: rank {r} loss vs the full-batch loss")
        _assert_close(v["grad"], v["ref_grad"], f"{loss}: rank {r} DDP gradient vs the full-batch gradient")


def test_memory_p2p_queues_identical_across_ranks(spawned):
    vals = _values(spawned("losses"), "MemoryP2PLoss")
    ddp0, ddp1 = vals[0]["ddp"], vals[1]["ddp"]
    assert ddp0["ptr"] == ddp1["ptr"]
    assert ddp0["queue"] == ddp1["queue"], "teacher pixel queues diverged across ranks"
    # the queues hold the GLOBAL batch's teacher pixels: the same as one process fed the full batch
    single = vals[0]["single"]
    assert ddp0["ptr"] == single["ptr"]
    _assert_close(ddp0["queue"], single["queue"], "queue vs the single-process full-batch queue")
    # 4 steps of 6 x 6 = 36 global teacher pixels each pass the 40-row queue several times (the ring wraps)
    assert all(torch.isfinite(torch.tensor(d["losses"])).all() for d in (ddp0, ddp1))


def test_memory_p2p_loss_module_inside_ddp(spawned):
    """One DDP around student + MemoryP2PLoss (its projection head has parameters to average), on CPU."""
    vals = _values(spawned("losses"), "MemoryP2PLoss_whole_ddp")
    assert vals[0]["queue"] == vals[1]["queue"] and vals[0]["ptr"] == vals[1]["ptr"]
    assert all(torch.isfinite(torch.tensor(v["losses"])).all() for v in vals)


# --------------------------------------------------------------------------------------------------
# tests: the default process_group is local under 2 ranks (the official per-rank objective)


@pytest.mark.parametrize("name", list(_DEFAULT_CASES))
def test_default_process_group_is_the_local_loss(spawned, name):
    vals = _values(spawned("defaults"), "local")
    assert all(v["active"] for v in vals), "the world group must be active in the ranks for this test to mean anything"
    for r, v in enumerate(vals):
        d = v[name]
        # the default is exactly the per-rank (process_group=None) loss and gradient ...
        assert d["default"] == d["none"], f"{name}: rank {r} default differs from process_group=None"
        # ... and equals the loss of this rank's slice computed in a process with no torch.distributed at all
        ref = _value_and_grad(_DEFAULT_CASES[name], r, {})
        _assert_close(d["default"]["loss"], ref["loss"], f"{name}: rank {r} default vs the local loss")
        _assert_close(d["default"]["grad"], ref["grad"], f"{name}: rank {r} default gradient vs the local one")
    # the global-batch objective is one argument away, and it is a different number (the test can fail)
    assert any(not _close(v[name]["world"]["loss"], v[name]["default"]["loss"]) for v in vals), name
    # with the group, every rank reports the one global-batch value
    assert vals[0][name]["world"]["loss"] == pytest.approx(vals[1][name]["world"]["loss"], rel=1e-6)


def test_memory_p2p_module_default_local_loss_official_queue_gather(spawned):
    vals = _values(spawned("defaults"), "local")
    for r, v in enumerate(vals):
        m = v["MemoryP2PLoss"]
        assert m["default"] == m["none"], f"rank {r}: MemoryP2PLoss default loss is not the per-rank loss"
    assert not _close(vals[0]["MemoryP2PLoss"]["default"]["loss"], vals[0]["MemoryP2PLoss"]["world"]["loss"])
    # the queue gather is the official behaviour and stays on by default: both ranks enqueue the global batch
    assert vals[0]["MemoryP2PLoss"]["default"]["queue"] == vals[1]["MemoryP2PLoss"]["default"]["queue"]


def test_rank_skipping_a_default_loss_does_not_hang_the_others(spawned):
    v0, v1 = _values(spawned("defaults"), "skip")
    assert v0["ran"] == list(_DEFAULT_CASES) + ["MemoryP2PLoss(sync_group=None)"]
    assert v1["waited"]


def test_multi_student_ddp_with_idle_student(spawned):
    vals = _values(spawned("multi_student"), "ddp")
    for r, v in enumerate(vals):
        assert len(v["losses"]) == 3 and all(torch.isfinite(torch.tensor(v["losses"])))
        # the zero-weight touch of the idle student changes nothing: full-batch gradient after DDP's mean
        _assert_close(v["grad"], v["ref_grad"], f"MultiStudent rank {r} DDP gradient vs full batch")
    assert vals[0]["params_head"] == vals[1]["params_head"]
    assert vals[0]["param_sum"] == vals[1]["param_sum"] and vals[0]["param_abs"] == vals[1]["param_abs"]


def test_multi_student_fsdp_with_idle_student_and_sharded_teacher(spawned):
    for r, v in enumerate(_values(spawned("multi_student"), "fsdp")):
        assert len(v["losses"]) == 3 and all(torch.isfinite(torch.tensor(v["losses"])))
        _assert_close(v["grad"], v["ref_grad"], f"MultiStudent rank {r} FSDP gradient vs full batch")
