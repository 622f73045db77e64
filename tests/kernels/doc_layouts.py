"""Packed-document layouts for the kernel tests: documents cut at given positions per row."""
import torch

from model.layout import CompressedLayout, DocLayout


def layout_from_cuts(B: int, L: int, cuts, ratio: int, device) -> tuple[DocLayout, CompressedLayout]:
    """cuts[b]: the positions where row b's next document starts -> (token layout, its compressed
    layout at ``ratio``)."""
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    for b, row in enumerate(cuts):
        for c in row:
            doc_ids[b, c:] += 1
    lay = DocLayout.from_doc_ids(doc_ids.to(device))
    return lay, CompressedLayout.build(lay, ratio)
