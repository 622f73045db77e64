"""Kernel tests run Triton's interpreter on machines without a GPU. The variable must be set
before any kernel module is imported (triton.jit reads it when it decorates)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
