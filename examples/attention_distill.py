"""Attention-map distillation of a diffusers UNet with fastdistill's fused attention.

A student UNet2DConditionModel learns from a teacher with the usual output-matching loss plus
``AttentionDistillLoss`` on chosen attention layers (the teacher has twice the student's heads per
layer, so each student head is matched to a pair of teacher heads). Both models run
``FusedAttnProcessor`` (``fastdistill.fused_attention``) in their attention layers.

    python examples/attention_distill.py --tiny     # random tiny models, CPU, well under a minute
    python examples/attention_distill.py --steps 200 --device cuda --dtype bf16

Random weights stand in for a trained teacher (no Hub access needed); swap in
``UNet2DConditionModel.from_pretrained(...)`` for real runs. Prints one JSON line per logged step and a
final JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def build_unets(tiny: bool):
    from diffusers import UNet2DConditionModel

    common = dict(in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    size = 8 if tiny else 32
    torch.manual_seed(0)
    # attention_head_dim is the *number of heads* in UNet2DConditionModel (ecosystem.md 1.5).
    teacher = UNet2DConditionModel(sample_size=size, block_out_channels=(64, 128), attention_head_dim=(4, 8),
                                   **common)
    torch.manual_seed(1)
    student = UNet2DConditionModel(sample_size=size, block_out_channels=(64, 128), attention_head_dim=(2, 4),
                                   **common)
    return teacher, student, size


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models and few steps (CPU smoke run)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--attn-weight", type=float, default=1.0, help="weight of the attention KL term")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype of the forward passes (the fused kernels' fast path is bf16/fp16)")
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else (8 if args.tiny else 200)

    from fastdistill import dispatch
    from fastdistill.diffusers import enable_fused_attention
    from fastdistill.nn import AttentionDistillLoss

    dev = torch.device(args.device)
    teacher, student, size = build_unets(args.tiny)
    teacher.to(dev).eval().requires_grad_(False)
    student.to(dev).train()
    enable_fused_attention(teacher)
    enable_fused_attention(student)
    # Self-attention (attn1) of the down and up transformer blocks: the student's heads are paired
    # with the teacher's in consecutive groups of two (see AttentionDistillLoss).
    layers = [name[: -len(".processor")] for name in student.attn_processors if ".attn1." in name]
    attn_loss = AttentionDistillLoss(teacher, student, layers=layers)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    g = torch.Generator(device="cpu").manual_seed(0)
    history = []
    def train_step(step: int) -> None:
        x = torch.randn(args.batch, 4, size, size, generator=g).to(dev)
        text = torch.randn(args.batch, 7, 64, generator=g).to(dev)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                target = teacher(x, t, text).sample
            pred = student(x, t, text).sample
            l_out = F.mse_loss(pred.float(), target.float())
            l_attn = attn_loss()
        loss = l_out + args.attn_weight * l_attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step, "loss": loss.item(), "output_mse": l_out.item(), "attention_kl": l_attn.item()}
        history.append(rec)
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(json.dumps(rec), flush=True)

    t0 = time.perf_counter()
    with dispatch.record_backends() as backends:
        for step in range(steps):
            train_step(step)

    summary = {"steps": steps, "layers": len(layers), "seconds": round(time.perf_counter() - t0, 2),
               "first_attention_kl": history[0]["attention_kl"], "last_attention_kl": history[-1]["attention_kl"],
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "backends": sorted(f"{op}={b}" for op, b in backends)}
    print(json.dumps({"summary": summary}), flush=True)
    return summary


if __name__ == "__main__":
    main()
