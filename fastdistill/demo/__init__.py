"""``fastdistill demo``: distil a small diffusion model end to end, offline, and report what the
fused kernels buy. See :func:`fastdistill.demo.runner.run` and docs/demo.md."""
