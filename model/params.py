"""Parameter accounting: total and per-token active parameters.

Active = every parameter whose matmul a token pays for: all dense weights, the head, the shared
experts and n_activated_experts of the routed experts in each MoE layer. The input embedding
is a table lookup, not compute, and is not counted as active (this is the reading under which
our flash/pro counts land on DeepSeek's 13B/49B; counting it adds 0.5B/0.9B).
The MTP module is reported separately: DeepSeek's headline totals (284B Flash, 1.6T Pro)
exclude it, as V3's 671B did.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass
class ParamCount:
    total: int           # main model, MTP excluded
    active: int          # per token, main model, MTP excluded
    mtp: int             # MTP modules (total)
    embedding: int       # embedding + head
    routed_experts: int  # all routed expert weights of the main model

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_params(model: nn.Module) -> ParamCount:
    cfg = model.cfg
    total = mtp = emb = routed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if name in ("embed.weight", "head.weight"):
            emb += n
        if ".ffn.experts." in name:
            routed += n
    inactive = routed * (cfg.n_routed_experts - cfg.n_activated_experts) // cfg.n_routed_experts
    inactive += model.embed.weight.numel()
    return ParamCount(total=total, active=total - inactive, mtp=mtp, embedding=emb, routed_experts=routed)
