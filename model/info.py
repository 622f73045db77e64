"""`python -m model.info PRESET [--context N]`: layer schedule, parameters and KV-cache size.

The numbers are model/accounting.py's (parameters, KV-cache bytes per token).
"""
from __future__ import annotations

import argparse

from model.config import ModelConfig
from model.accounting import count_params, kv_bytes_per_token
from model.transformer import build_on_meta

def schedule_string(cfg: ModelConfig) -> str:
    kinds = []
    for i in range(cfg.n_layers):
        k = cfg.layer_kind(i)
        tag = {"window": "W", "csa": f"C{cfg.compress_ratios[i]}", "hca": f"H{cfg.compress_ratios[i]}"}[k]
        if i < cfg.n_hash_layers:
            tag += "#"
        kinds.append(tag)
    return " ".join(kinds)


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.info", description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="tiny | small | flash | pro (conf/model/*.yaml)")
    ap.add_argument("--context", type=int, default=1 << 20, help="context length for KV amortisation")
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_preset(args.preset)
    c = count_params(build_on_meta(cfg))
    ours, base = kv_bytes_per_token(cfg, args.context)
    print(f"preset {cfg.name}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads x {cfg.head_dim}, "
          f"hyper-connections {cfg.hyper_connections} (n={cfg.n_streams})")
    print("schedule (W window-only, C CSA, H HCA, ratio; # hash-routed MoE):")
    print("  " + schedule_string(cfg) + f"  + MTP x{cfg.mtp_depth} ({'W' if cfg.mtp_compress_ratio == 0 else cfg.mtp_compress_ratio})")
    print(f"experts: {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, top-{cfg.n_activated_experts}")
    print(f"parameters: total {human(c.total)} ({c.total:,}), active/token {human(c.active)} ({c.active:,}); "
          f"MTP {human(c.mtp)}; embedding+head {human(c.embedding)}")
    print(f"KV cache @ {args.context:,} tokens: {ours:,.0f} B/token vs dense MQA {base:,.0f} B/token "
          f"({100 * ours / base:.1f}%)")


if __name__ == "__main__":
    main()
