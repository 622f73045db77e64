"""Our Triton kernels as opaque calls under torch.compile.

Dynamo traces into a user-defined Triton launch and Inductor then re-analyses the kernel source
(which tensors it mutates, its constexpr arguments); on ``_sparse_attn_fwd`` that failed
(InductorError: constexpr LOAD_DELTA not passed, in identify_mutated_tensors) and broke
``torch.compile`` of a whole block. Each public kernel entry (an autograd.Function apply plus
its launches) is therefore run eagerly by Dynamo: the compiled graph stops before it and resumes
after it, and the kernel's forward and backward are exactly what eager mode runs. The cost is one
graph split per call site; the elementwise chains between the kernels still fuse.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def opaque_to_compile(fn: F) -> F:
    """``fn`` runs eagerly (not traced) inside torch.compile'd code; unchanged in eager mode."""
    return torch.compiler.disable(fn, recursive=True)
