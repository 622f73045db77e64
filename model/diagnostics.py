"""Per-step model diagnostics, cheap enough for every logging step.

* MoE: per-layer expert loads, MaxVio = (max load - mean) / mean, router-bias spread.
* mHC: Amax gain of each site's residual mixing H_res and of the composite product across all
  sites (attention and MoE sites counted separately, in execution order). Forward gain = max
  absolute row sum, backward gain = max absolute column sum (mHC paper, sec. 5); we report the
  max over tokens. With our mixing x_new = comb^T x (see model/hyper_connections.py),
  H_res = comb^T.
* Attention: sink mass (mean probability on the sink) and the indexer loss per layer; CSA
  layers' indexer recall (the share of dense attention mass on compressed entries that the
  top-k holds, ``model.indexer.indexer_recall``), its chance level K / visible entries and its
  ceiling (the share of the best K entries).

Under the sequence-chunked step every chunk collects its own; ``merge_chunks`` combines them
into the whole sequence's values (loads summed, MaxVio from the summed loads, gains max over
tokens, sink mass averaged over tokens, indexer-loss shares summed): the same numbers as the
unchunked step's, up to summation order. The indexer recall is an estimate from sampled query
rows: each chunk samples its own rows and the chunks' estimates are averaged weighted by rows.
"""
from __future__ import annotations

import torch

from model.hyper_connections import amax_gain, composite_gain
from model.moe import max_violation


class DiagnosticsCollector:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.out: dict = {}
        self._combs: list[torch.Tensor] = []  # main-path comb matrices in execution order

    def arm(self, model) -> None:
        """Tell the attention layers whether this forward measures what only they can (the
        sink mass, the indexer recall); set on every forward so that no flag outlives its step."""
        blocks = list(model.layers) + [m.block for m in model.mtp]
        for b in blocks:
            b.attn.measure_sink = self.enabled
            if b.attn.indexer is not None:
                b.attn.measure_recall = self.enabled

    @torch.no_grad()
    def block(self, layer: int, block, aux: dict, composite: bool = True) -> None:
        """composite=False for MTP blocks: they are not on the main residual path."""
        if not self.enabled:
            return
        o = self.out
        moe = aux["moe"]
        load = moe["load"].detach().float()
        o[f"moe/load/{layer}"] = load.cpu()
        o[f"moe/maxvio/{layer}"] = float(max_violation(load))
        bias = getattr(block.ffn.gate, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.numel() > 0:
            o[f"moe/bias_spread/{layer}"] = float(bias.max() - bias.min())
        attn = aux["attn"]
        if attn.get("sink_mass") is not None:
            o[f"attn/sink_mass/{layer}"] = float(attn["sink_mass"])
        if attn.get("indexer_loss") is not None:
            o[f"attn/indexer_loss/{layer}"] = float(attn["indexer_loss"])
        if attn.get("indexer_recall") is not None:
            r = attn["indexer_recall"]
            o[f"attn/indexer_recall/{layer}"] = float(r["recall"])
            o[f"attn/indexer_recall_chance/{layer}"] = float(r["chance"])
            o[f"attn/indexer_recall_oracle/{layer}"] = float(r["oracle"])
        for site, comb in zip(("attn", "ffn"), aux["comb"]):
            if comb is None:
                continue
            fwd, bwd = amax_gain(comb)
            o[f"mhc/gain_fwd/{layer}.{site}"] = float(fwd)
            o[f"mhc/gain_bwd/{layer}.{site}"] = float(bwd)
            if composite:
                self._combs.append(comb.detach())

    def finish(self, model) -> dict:
        o = self.out
        if self._combs:
            fwd, bwd = composite_gain(self._combs)
            o["mhc/composite_gain_fwd"] = float(fwd)
            o["mhc/composite_gain_bwd"] = float(bwd)
        return _summaries(o)


def _summaries(o: dict) -> dict:
    """The cross-layer summaries, from the per-layer values."""
    vios = [v for k, v in o.items() if k.startswith("moe/maxvio/")]
    if vios:
        o["moe/maxvio_max"] = max(vios)
    recalls = [v for k, v in o.items() if k.startswith("attn/indexer_recall/")]
    if recalls:
        o["attn/indexer_recall_mean"] = sum(recalls) / len(recalls)
    sinks = [v for k, v in o.items() if k.startswith("attn/sink_mass/")]
    if sinks:
        o["attn/sink_mass_mean"] = sum(sinks) / len(sinks)
    return o


# how a chunk's value combines into the whole sequence's (key prefix -> rule); a key with no
# rule is refused, so that a new diagnostic says how it aggregates instead of showing one chunk
_MERGE = (
    ("moe/load/", "sum"),                   # token counts per expert
    ("moe/maxvio/", "from_load"),           # of the summed loads
    ("moe/bias_spread/", "same"),           # a parameter: equal in every chunk
    ("attn/sink_mass/", "row_mean"),        # mean over the chunk's own queries (no halo rows)
    ("attn/indexer_loss/", "sum"),          # each chunk's share of the sequence's mean
    ("attn/indexer_recall", "row_mean"),    # sampled-row estimates (recall, chance, oracle)
    ("mhc/", "max"),                        # gains: max over tokens (composite: per-token product)
    ("moe/maxvio_max", "summary"),
    ("attn/sink_mass_mean", "summary"),
)


def merge_chunks(parts: list[tuple[dict, int]]) -> dict:
    """The whole sequence's diagnostics from each chunk's (``diagnostics``, its rows)."""
    parts = [(d, n) for d, n in parts if d]
    keys = list(dict.fromkeys(k for d, _ in parts for k in d))
    out: dict = {}
    for key in keys:
        rule = next((r for prefix, r in _MERGE if key.startswith(prefix)), None)
        if rule is None:
            raise KeyError(f"diagnostics.merge_chunks: no rule for {key!r}: add it to _MERGE")
        vals = [(d[key], n) for d, n in parts if key in d]
        if rule == "sum":
            out[key] = sum(v for v, _ in vals)
        elif rule == "max":
            out[key] = max(v for v, _ in vals)
        elif rule == "same":
            out[key] = vals[-1][0]
        elif rule == "row_mean":   # over the chunks that have it (recall: chunks with a sample)
            out[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
    for key in keys:
        if key.startswith("moe/maxvio/"):
            out[key] = float(max_violation(out["moe/load/" + key[len("moe/maxvio/"):]]))
    return _summaries(out)
