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
        indexer recall); set on every forward so that no flag outlives its step."""
        blocks = list(model.layers) + [m.block for m in model.mtp]
        for b in blocks:
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
