"""Train a tiny diffusers UNet student with RDD's relational losses on several processes (DDP).

Every rank holds its own per-rank batch. By default the relational loss (``fastdistill.fused_rdd_loss``)
is computed on each rank's local batch, as the official RDD code does; ``--process-group world`` switches
it to the GLOBAL batch through autograd-aware all-gathers, so DDP's gradient average is exactly the
full-batch gradient (docs/distributed.md). The memory term ``fastdistill.nn.MemoryP2PLoss`` keeps the
official all-gather of teacher pixels into its queue either way.

Launch (2 processes; CPU ranks use gloo, GPU ranks use nccl):

    torchrun --nproc-per-node 2 examples/ddp_rdd.py --tiny              # CPU or GPUs
    torchrun --nproc-per-node 2 examples/ddp_rdd.py --tiny --accelerate # DDP wrapping by accelerate
    torchrun --nproc-per-node 2 examples/ddp_rdd.py --tiny --process-group world  # global-batch loss
    accelerate launch --multi_gpu --num_processes 2 examples/ddp_rdd.py --accelerate
    python examples/ddp_rdd.py --tiny                                    # one process

(``accelerate launch --cpu`` starts several CPU processes only through mpirun, otherwise it runs the script
once; the example then warns on stderr. Use torchrun for several CPU processes.)
Each rank prints one line per step: ``rank R/W step S loss ... (rdd ..., memory ..., mse ...)``; with
``--process-group world`` the ``rdd`` value is the global-batch loss and identical on every rank, otherwise
every value is per-rank.
The teacher is a frozen random-weight UNet of the same architecture: this shows the mechanics, not a
recipe for a good student.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastdistill
import fastdistill.nn  # noqa: F401  (not imported by `import fastdistill`)
from fastdistill import distributed as fdist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 16x16 images, 3 steps (CI-sized)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3 with --tiny, else 20)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default 2 with --tiny, else 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cpu", action="store_true", help="run on CPU (gloo) even when GPUs are visible")
    p.add_argument("--accelerate", action="store_true",
                   help="let accelerate.Accelerator set up the process group and wrap the model in DDP")
    p.add_argument("--process-group", choices=("local", "world"), default="local",
                   help="relational loss over each rank's batch (local, as the official code) or the global "
                        "batch (world: autograd-aware all-gather; every rank must call)")
    p.add_argument("--rdd-weight", type=float, default=1.0)
    p.add_argument("--memory-weight", type=float, default=1.0, help="on top of MemoryP2PLoss's factor=0.1")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_unet(tiny: bool) -> nn.Module:
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                           attention_head_dim=8)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       attention_head_dim=32)


class FeatureTap:
    """Keeps the output of one submodule (the relational losses read the mid-block feature map)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


class StudentWithRDD(nn.Module):
    """Student UNet plus the memory term's projection head, as ONE module, so that a single DDP wrapper
    averages the gradients of both; the forward returns the losses (computed inside DDP's forward)."""

    def __init__(self, student: nn.Module, channels: int, process_group: object = None) -> None:
        super().__init__()
        self.student = student
        self.process_group = process_group
        self.tap = FeatureTap(student.mid_block)
        # queue and contrast sizes scaled down from the official 20000 / 4096 for a tiny model
        self.memory = fastdistill.nn.MemoryP2PLoss(pixel_memory_size=512, pixel_contrast_size=128,
                                                   s_channels=channels, t_channels=channels)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, teacher_out: torch.Tensor,
                teacher_feat: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = self.student(noisy, timesteps).sample
        feat = self.tap.value
        return {
            "mse": F.mse_loss(pred.float(), teacher_out.float()),
            # all ordered sample pairs of this rank's batch (process_group=None, official) or of the
            # GLOBAL batch (process_group=WORLD)
            "rdd": fastdistill.fused_rdd_loss(feat, teacher_feat, temperature=1.0, pairs="all",
                                              process_group=self.process_group),
            # gathers every rank's teacher pixels into the queue (official; sync_group defaults to WORLD),
            # so all ranks' queues stay identical; the loss itself is per rank
            "memory": self.memory(feat, teacher_feat),
        }


def _parent_cmdline() -> list[str]:
    """The launching process's command line (Linux /proc), or [] where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def expected_processes(environ: dict[str, str] | None = None,
                       parent_cmdline: list[str] | None = None) -> tuple[int, str] | None:
    """(process count the launch asked for, where that came from), when it can be told: the WORLD_SIZE or
    ACCELERATE_NUM_PROCESSES environment variable, or ``--num_processes N`` on the command line of a parent
    ``accelerate launch`` (which passes no count to a script it runs once)."""
    env = os.environ if environ is None else environ
    for var in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        value = env.get(var, "").strip()
        if value.isdigit():
            return int(value), f"{var}={value}"
    cmd = _parent_cmdline() if parent_cmdline is None else parent_cmdline
    if any("accelerate" in part for part in cmd[:3]):
        for i, arg in enumerate(cmd):
            for flag in ("--num_processes", "--num-processes"):
                value = None
                if arg == flag and i + 1 < len(cmd):
                    value = cmd[i + 1]
                elif arg.startswith(flag + "="):
                    value = arg.split("=", 1)[1]
                if value is not None and value.strip().isdigit():
                    return int(value), f"accelerate launch {flag} {value}"
    return None


def single_process_warning(world: int, accelerate_flag: bool, environ: dict[str, str] | None = None,
                           parent_cmdline: list[str] | None = None) -> str | None:
    """The warning to print when the run has ONE process although several were expected, else None."""
    if world > 1:
        return None
    expected = expected_processes(environ, parent_cmdline)
    if expected is not None and expected[0] > 1:
        reason = f"{expected[0]} processes were requested ({expected[1]})"
    elif accelerate_flag:
        reason = "--accelerate was given (a multi-process launch was expected)"
    else:
        return None
    return (f"ddp_rdd: WARNING: training on ONE process (world 1) although {reason}. "
            "`accelerate launch --cpu --num_processes N` starts several CPU processes only through mpirun; "
            "without it accelerate runs the script once. Fix: on CPU use "
            "`torchrun --nproc-per-node N examples/ddp_rdd.py --tiny --accelerate`; on GPUs "
            "`accelerate launch --multi_gpu --num_processes N examples/ddp_rdd.py --accelerate`. "
            "See docs/distributed.md, section 'Launching'.")


def setup_distributed(args: argparse.Namespace):
    """(rank, world, device, accelerator or None); torchrun / accelerate set RANK, WORLD_SIZE, ..."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not use_cuda)
        return accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return rank, world, device, None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    batch = args.batch_size if args.batch_size is not None else (2 if args.tiny else 8)
    if not torch.cuda.is_available() or args.cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    rank, world, device, accelerator = setup_distributed(args)

    from diffusers import DDPMScheduler

    # Same seed on every rank: identical initial weights (DDP also broadcasts them) and identical random
    # choices in the memory queue update, as in the official RDD loop. Data differ per rank (below).
    torch.manual_seed(args.seed)
    teacher = make_unet(args.tiny).to(device).eval().requires_grad_(False)
    teacher_tap = FeatureTap(teacher.mid_block)
    group = fdist.WORLD if args.process_group == "world" else None
    model = StudentWithRDD(make_unet(args.tiny), channels=teacher.config.block_out_channels[-1],
                           process_group=group).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data_gen = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)  # this rank's shard of the data

    size = teacher.config.sample_size
    if rank == 0:
        print(f"ddp_rdd: world {world}, per-rank batch {batch} (global {batch * world}), device {device.type}, "
              f"process group active: {fdist.is_active()}, relational loss: {args.process_group}", flush=True)
        warning = single_process_warning(world, args.accelerate)
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)
    for step in range(steps):
        t0 = time.perf_counter()
        x0 = torch.rand(batch, 3, size, size, generator=data_gen).mul(2).sub(1).to(device)
        noise = torch.randn(batch, 3, size, size, generator=data_gen).to(device)
        timesteps = torch.randint(0, 1000, (batch,), generator=data_gen).to(device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        with torch.no_grad():
            teacher_out = teacher(noisy, timesteps).sample
            teacher_feat = teacher_tap.value
        losses = model(noisy, timesteps, teacher_out, teacher_feat)
        loss = losses["mse"] + args.rdd_weight * losses["rdd"] + args.memory_weight * losses["memory"]
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        # one write per line: the ranks share the launcher's stdout, and print() writes the newline separately
        sys.stdout.write(f"rank {rank}/{world} step {step} loss {loss.item():.6f} (rdd {losses['rdd'].item():.6f}, "
                         f"memory {losses['memory'].item():.6f}, mse {losses['mse'].item():.6f}) "
                         f"{time.perf_counter() - t0:.2f}s\n")
        sys.stdout.flush()
    if dist.is_initialized():
        dist.barrier()
        if accelerator is None:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
