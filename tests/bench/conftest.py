"""The bench tests run our Triton kernels too (bench/mhc.py, bench/throughput.py): on a machine
without a GPU, in Triton's interpreter, as tests/kernels does. Set before any kernel module is
imported (triton.jit reads it when it decorates), so a bench test file run alone behaves as it
does in the whole suite."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
