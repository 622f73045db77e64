"""Recompute-in-backward for cheap elementwise ops that compute in fp32 on low-precision inputs.

RMSNorm, the clamped SwiGLU and the router upcast bf16 activations to fp32 and autograd then
keeps fp32 temporaries per token for backward (several times the bf16 input). Wrapped in
``recompute_in_backward`` they keep only their (bf16) inputs and rerun the op in backward: the
same operations, so the same numbers bit for bit, for the price of one more elementwise pass.
fp32/fp64 inputs run plainly (no upcast copies to save; exactness tests are unchanged).
This is torch's non-reentrant activation checkpoint applied to one op; it nests inside the
per-block checkpointing of model/transformer.py. Neither stashes the RNG state
(``preserve_rng_state=False``): the model draws no random numbers (tests/model/test_recompute.py
holds it to that), and stashing reads the CUDA generator's seed on the host at every call, which
costs host time in a launch-bound step and is refused inside a CUDA-graph capture ("Cannot call
CUDAGeneratorImpl::current_seed during CUDA graph capture").
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


_HALF = (torch.bfloat16, torch.float16)


def recompute_in_backward(fn, x: torch.Tensor, *args):
    """fn(x, *args), keeping only the tensor arguments for backward (fn reruns there) when x is
    bf16/fp16; fp32/fp64 inputs have no upcast copies to save and run plainly."""
    if (x.dtype in _HALF and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in (x, *args))):
        return checkpoint(fn, x, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(x, *args)
