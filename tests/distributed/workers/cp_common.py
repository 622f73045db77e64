"""What the two context-parallel equality workers share: the tolerance, the packed documents,
the command line and the relative error."""
from __future__ import annotations

import argparse

import torch

TOL = 1e-10
# packed documents per row: they cross rank boundaries and (at L = 96, P = 2/3/4) end exactly
# on some (32, 48, 64, 72); short ones hold no HCA block, the last row is one document
DOCS = ((0, 37, 61, 72), (0, 20, 32, 48, 50, 64), (0,))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def doc_ids(length: int) -> torch.Tensor:
    """[len(DOCS), length] document ids of the packed rows."""
    doc = torch.zeros(len(DOCS), length, dtype=torch.long)
    for b, starts in enumerate(DOCS):
        for d, s in enumerate(starts):
            doc[b, s:] = d
    return doc


def parser(checkpoint_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["sparse", "dense"], required=True)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--checkpoint", action="store_true", help=checkpoint_help)
    ap.add_argument("--ties", action="store_true", help="indexer queries zero: every score ties")
    ap.add_argument("--bounds", default="", help="piece starts and the end, e.g. 0,7,96 (uneven)")
    ap.add_argument("--layout", default="contiguous", help="parallel.cp_layout")
    return ap


def pieces(arg: str) -> list[tuple[int, int]] | None:
    """--bounds "0,7,96" -> [(0, 7), (7, 96)]; "" -> None (the layout's own pieces)."""
    cuts = [int(c) for c in arg.split(",")] if arg else None
    return list(zip(cuts[:-1], cuts[1:])) if cuts else None


def owned_entries(plan, ratio: int) -> torch.Tensor:
    """[B] entries of ``ratio`` this rank pools, per row (over its pieces)."""
    first = plan.entries[ratio].first
    return sum(first[p + 1] - first[p] for p in plan.mine)
