"""Initialisation: what the default init guarantees at step 0 (the study: bench/init_study.py,
bench/results/init-study-cpu-2026-12-03.md)."""
from __future__ import annotations

import pytest
import torch

from bench.init_study import fp32_gradient_errors, learned_maxvio, param_group
from model.config import ModelConfig
from model.transformer import Transformer


def test_fp32_gradients_of_the_default_init_match_fp64():
    """The whole micro model's fp32 gradient at the default init against fp64 (same weights and
    tokens, routing replayed): every parameter outside the mHC coefficients within 1e-5
    (measured <= 1.4e-6). The mHC coefficients are resolved only coarsely in fp32 at init, and by
    construction, not by a bug: the embedding enters all n streams identically and the dynamic
    post/comb weights start at alpha = 0.01, so at the head the streams agree to ~2e-5 relative
    (micro); the head's collapse weights act on h = sum_j w_j x_j through a scale-invariant
    RMSNorm, so their gradient depends only on the streams' differences, which fp32 holds to a few
    hundred ulps (the fp32 forward alone puts them 0.6% off). Measured: head 2.5e-2, block sites
    5.8e-4 (both 7.6e-4 / 5e-5 with N(0, 0.02) embeddings, which collapse the routers)."""
    cfg = ModelConfig.from_preset("micro", vocab_size=1024, moe_impl="loop")   # loop: runs in fp64
    errs = fp32_gradient_errors(cfg)
    worst = {g: max((v, n) for n, v in errs.items() if param_group(n) == g) for g in ("head", "sites", "rest")}
    assert worst["rest"][0] <= 1e-5, worst
    assert worst["sites"][0] <= 2e-3, worst
    assert worst["head"][0] <= 0.1, worst



@pytest.mark.parametrize("o_lora_rank, init, balanced", [
    (1024, {}, True),                                                         # the default
    (1024, {"embed_init_std": 0.02, "scaled_output_init": False}, False),     # HF's uniform 0.02
    (8192, {"scaled_output_init": True}, True),                               # Flash's output width
])
def test_learned_routers_are_balanced_at_init(o_lora_rank, init, balanced):
    """A fresh model spreads random tokens over the experts in every learned-router layer (main
    and MTP), and the test sees the collapse of the init that had it.

    tiny with a wide attention output projection (wo_b fan-in 1024 as small's, 8192 as Flash's):
    at init the sublayer outputs are large next to an N(0, 0.02) embedding and mostly shared by
    all tokens (attention ~ an average of the values), so the normalised router input is nearly
    one direction and top-k picks the same experts for every token (MaxVio 1.3-2.8 of the maximum
    3 here; 8.0 of 9.67 in the small preset). The unit embedding fixes it at small's width
    (<= 0.72 here, 0.75 in small); at Flash's width it is not enough alone (the MTP block's input
    is normalised, so the embedding's scale never reaches it: 2.8), the branch outputs at
    init_std / sqrt(2 n_layers) are (<= 0.53). Numbers: bench/results/init-study-cpu-2026-12-03.md."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=1024, window=128, n_heads=8, head_dim=128,
                                  o_groups=1, o_lora_rank=o_lora_rank, **init)
    torch.manual_seed(0)
    model = Transformer(cfg)
    vio = learned_maxvio(model, torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)))
    assert len(vio) == cfg.n_layers - cfg.n_hash_layers + cfg.mtp_depth
    if balanced:
        assert max(vio.values()) < 1.0, vio
    else:
        assert max(vio.values()) > 1.5, vio
