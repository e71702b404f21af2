"""Triton kernels of fastdistill, installed as ``fastdistill.kernels``.

One module per op; each holds the ``@triton.jit`` kernels and thin launchers that take and return
tensors. They do no input validation and no dispatch: call them through the public ops in
``fastdistill`` (or ``fastdistill.ops``), which check inputs and pick the backend.
Importing this package imports triton.
"""
