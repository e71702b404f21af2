"""Train the teacher that ships with ``fastdistill demo`` (fastdistill/demo/assets/teacher_digits16.pt).

    python scripts/train_demo_teacher.py            # about 3 minutes on an idle 2-core CPU

The demo loads this file when no teacher is cached under ``--out`` and no ``--teacher-steps`` is given,
so its default run needs neither training time nor a download. Same code path as the in-demo training
(``fastdistill.demo.models.train_teacher``) with the default ``TeacherConfig``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fastdistill.demo.data import load_digits
from fastdistill.demo.models import SHIPPED_TEACHER, TeacherConfig, save_teacher, train_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=SHIPPED_TEACHER)
    args = p.parse_args()
    torch.set_num_threads(1)  # predictable on a shared machine
    cfg = TeacherConfig()
    images, _ = load_digits(cfg.image_size)
    t0 = time.time()

    def progress(step: int, loss: float) -> None:
        if step % 100 == 0 or step == cfg.train_steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}  {time.time() - t0:.0f}s", flush=True)

    model = train_teacher(cfg, images, torch.device("cpu"), progress=progress)
    save_teacher(args.out, cfg, model)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
