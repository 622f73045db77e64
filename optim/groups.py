"""Which optimizer trains which parameter: a rule table over the model's parameter names.

The names are the contract in docs/ARCHITECTURE.md. V4 (report, "Training") trains the
embedding, the output head, every RMSNorm weight and the mHC static biases and gating factors
with AdamW, and every other matrix with Muon. Choices where the report is silent (ours):
- attention ``sink`` [H] and compressor ``ape`` [m, c]: AdamW. The sink is a vector; ``ape`` is a
  learned additive positional bias, an embedding-like table, not a linear map to orthogonalise.
- router ``gate.weight`` [E, D]: Muon. It is an ordinary linear map, the report's AdamW list
  does not name it (so "every other matrix" includes it), and Moonlight's open Muon setup sends
  every hidden 2-D weight, router included, to Muon. Its bias is a buffer updated by the
  aux-free balancing rule, never an optimizer parameter.
- ``wo_a`` (grouped output projection, stored [g * r, c]): Muon per group, i.e. as g matrices
  [r, c] (the group key ``row_blocks``). The layer is block-diagonal, so orthogonalising each
  block is orthogonalising the actual linear map; whole-matrix Muon would couple groups that
  never share an input. ``wo_a_blocks=1`` switches this off.

Rules are explicit (no catch-all), so a parameter the table does not know is an error naming
it: a new module must be placed on purpose.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Rule:
    kind: str       # "muon" | "adamw"
    pattern: str    # regular expression, searched in the full parameter name
    what: str       # what the rule covers, for error messages


RULES: tuple[Rule, ...] = (
    Rule("adamw", r"(^|\.)embed\.weight$", "token embedding"),
    Rule("adamw", r"(^|\.)head\.weight$", "output head"),
    Rule("adamw", r"norm\.weight$", "RMSNorm weight"),
    Rule("adamw", r"(^|\.)hc_\w+\.(base|scale)$", "mHC static bias / gating factor"),
    Rule("adamw", r"(^|\.)attn\.sink$", "attention sink logit"),
    Rule("adamw", r"(^|\.)compressor\.ape$", "compressor positional bias"),
    Rule("muon", r"(^|\.)(wq_a|wq_b|wkv|wo_a|wo_b|wgate|weights_proj|e_proj|h_proj|gate|w1|w2|w3)"
                 r"\.weight$", "linear weight (attention, compressor, indexer, router, "
                               "shared expert, MTP projection)"),
    Rule("muon", r"(^|\.)experts\.(w1|w2|w3)$", "routed expert stack [E, out, in]"),
    Rule("muon", r"(^|\.)hc_\w+\.fn$", "mHC dynamic projection"),
)

# The grouped output projection, orthogonalised per group (see the module docstring).
WO_A_PATTERN = r"(^|\.)attn\.wo_a\.weight$"
FORBIDDEN = ((r"(^|\.)gate\.bias$", "the router bias must be a buffer (aux-free balancing "
                                    "updates it by rule), not a parameter"),)


class GroupingError(ValueError):
    """Parameters the rule table cannot place; the message names every one."""


def _named_trainable(named_parameters: Iterable[tuple[str, torch.Tensor]]):
    """Trainable (requires_grad) parameters, each tensor once (tied weights keep the first name)."""
    seen: set[int] = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def assign_groups(named_parameters: Iterable[tuple[str, torch.Tensor]],
                  rules: Sequence[Rule] = RULES) -> dict[str, str]:
    """name -> "muon" | "adamw" for every trainable parameter; frozen ones are left out.

    Raises GroupingError naming every parameter that matches no rule, two rules, a forbidden
    name, or lands in Muon without being a matrix.
    """
    kinds: dict[str, str] = {}
    problems: list[str] = []
    for name, p in _named_trainable(named_parameters):
        forbidden = [why for pat, why in FORBIDDEN if re.search(pat, name)]
        if forbidden:
            problems.append(f"{name}: {forbidden[0]}")
            continue
        hits = [r for r in rules if re.search(r.pattern, name)]
        if not hits:
            problems.append(f"{name} {tuple(p.shape)}: matches no rule")
        elif len(hits) > 1:
            problems.append(f"{name}: matches {len(hits)} rules "
                            f"({'; '.join(f'{r.kind}: {r.what}' for r in hits)})")
        elif hits[0].kind == "muon" and p.ndim < 2:
            problems.append(f"{name} {tuple(p.shape)}: Muon rule '{hits[0].what}' needs a matrix")
        else:
            kinds[name] = hits[0].kind
    if problems:
        raise GroupingError("optim.groups: cannot place parameter(s):\n  " + "\n  ".join(problems)
                            + "\nAdd or fix a rule in optim/groups.py RULES.")
    return kinds


def _model_o_groups(model) -> int | None:
    for attr in ("cfg", "config"):
        cfg = getattr(model, attr, None)
        if cfg is not None and hasattr(cfg, "o_groups"):
            return int(cfg.o_groups)
    return None


def param_groups(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    muon_lr: float,
    adamw_lr: float,
    *,
    muon_hparams: Mapping | None = None,
    adamw_hparams: Mapping | None = None,
    wo_a_blocks: int | None = None,
    all_adamw: bool = False,
) -> list[dict]:
    """Param groups for ``HybridOptimizer``: "muon", "muon_wo_a" (per-group wo_a), "adamw".

    ``model`` is an nn.Module or an iterable of (name, parameter). ``wo_a_blocks`` is the number
    of output groups g of a 2-D ``wo_a`` (None: read ``o_groups`` from ``model.cfg``/``.config``).
    ``all_adamw`` puts every parameter in AdamW (ablation); the names are still checked.
    Empty groups are left out; each group lists its ``param_names``.
    """
    named = list(model.named_parameters() if isinstance(model, torch.nn.Module) else model)
    kinds = assign_groups(named)
    params = dict(_named_trainable(named))

    def is_grouped_wo_a(name: str) -> bool:
        return (not all_adamw and kinds[name] == "muon" and params[name].ndim == 2
                and re.search(WO_A_PATTERN, name) is not None)

    if any(map(is_grouped_wo_a, kinds)) and wo_a_blocks is None:
        wo_a_blocks = _model_o_groups(model) if isinstance(model, torch.nn.Module) else None
        if wo_a_blocks is None:
            raise GroupingError("optim.groups.param_groups: wo_a_blocks is required (the model "
                                "has no cfg.o_groups); pass the number of output groups, or 1 to "
                                "orthogonalise wo_a as one matrix")

    buckets: dict[str, list[str]] = {"muon": [], "muon_wo_a": [], "adamw": []}
    for name, kind in kinds.items():  # model order within each bucket
        if all_adamw:
            buckets["adamw"].append(name)
        elif is_grouped_wo_a(name) and wo_a_blocks != 1:
            buckets["muon_wo_a"].append(name)
        else:
            buckets[kind].append(name)

    groups = []
    for group_name, names in buckets.items():
        if not names:
            continue
        kind = "adamw" if group_name == "adamw" else "muon"
        group = {"name": group_name, "kind": kind, "params": [params[n] for n in names],
                 "param_names": list(names), "lr": muon_lr if kind == "muon" else adamw_lr}
        group.update((muon_hparams if kind == "muon" else adamw_hparams) or {})
        if group_name == "muon_wo_a":
            group["row_blocks"] = wo_a_blocks
        groups.append(group)
    return groups


INDEXER_SUFFIX = "/indexer"


def split_indexer_groups(groups: list[dict], indexer_ids: set[int]) -> list[dict]:
    """Every group split in two: the indexers' parameters (``indexer_ids``) in a group of their
    own named ``<group>/indexer``, so the indexer warm-up can give them a learning rate while
    every other group gets 0 (ZeRO and DeepSpeed's bf16 optimizer hand the optimizer flat group
    shards: a per-group lr is the only way to hold the main model exactly still)."""
    out = []
    for g in groups:
        names = g.get("param_names") or [""] * len(g["params"])
        for suffix, keep in (("", False), (INDEXER_SUFFIX, True)):
            picked = [(p, n) for p, n in zip(g["params"], names) if (id(p) in indexer_ids) == keep]
            if picked:
                out.append({**g, "name": g.get("name", "group") + suffix,
                            "params": [p for p, _ in picked], "param_names": [n for _, n in picked]})
    return out
