"""ModelConfig: every hyperparameter of a V4-style model, validated at construction.

Presets live as Hydra YAML in ``conf/model/<name>.yaml`` (the single source of truth);
``ModelConfig.from_preset("tiny")`` loads one outside Hydra, and ``ModelConfig.from_dict``
turns a Hydra ``cfg.model`` node into a config (unknown keys are an error).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels import INDEXER_SCORE_DTYPES, INDEXER_SELECTS

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"

HYPER_CONNECTION_KINDS = ("mhc", "hc", "residual")
ATTENTION_MODES = ("dense", "sparse")
KERNEL_IMPLS = ("auto", "triton", "torch")
MOE_IMPLS = ("auto", "grouped", "loop")
LOSS_IMPLS = ("chunked", "reference")
COMPILE_MODES = ("none", "block")


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field."""


def load_flat_yaml(fh) -> dict[str, Any]:
    """The subset of YAML the model presets use: one ``key: value`` per line, values in JSON
    syntax (numbers, true/false/null, [lists]) or bare strings, ``#`` comments."""
    import json

    d: dict[str, Any] = {}
    for line in fh.read().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, val = line.partition(":")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"model preset: cannot parse {line!r} without PyYAML (pip install pyyaml)")
        val = val.strip()
        try:
            d[key.strip()] = json.loads(val)
        except ValueError:
            d[key.strip()] = val
    return d


@dataclass
class ModelConfig:
    name: str = "custom"
    # --- sizes
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    max_seq_len: int = 1048576
    norm_eps: float = 1e-6
    init_std: float = 0.02        # every weight matrix N(0, init_std) (as HF's initializer_range)
    # The embedding is N(0, embed_init_std) instead: at init the sublayer outputs (attention ~ an
    # average of values, nearly the same for every token) swamp an N(0, 0.02) embedding, so the
    # normalised router input is mostly one shared direction and the learned routers send every
    # token to the same experts from step 0 (small preset: MaxVio 8.0 of 9.67). Unit scale keeps
    # the token identity dominant (0.75); 0.1 / 0.3 still collapse (8.0 / 6.2). It costs fp32
    # resolution of the mHC coefficient gradients at init (head 2.5e-2 from fp64, was 7.6e-4: the
    # streams start identical and differ only by alpha-sized terms) and nothing in early training
    # (val loss equal after 20 steps). bench/results/init-study-cpu-2026-12-03.md. V4's init is
    # unpublished; HF's is 0.02.
    embed_init_std: float = 1.0
    # True: the residual branches' output projections (attention wo_b, every expert's w2) start
    # at N(0, init_std / sqrt(2 n_layers)) (GPT-2 / Megatron's output_layer_init_method). Off by
    # default: the unit embedding suffices at small's width; at Flash's (wo_b fan-in 8192, expert
    # width 2048) the branch outputs are 5-13x small's and the routers start imbalanced again
    # (a 4-layer Flash-width stack: MaxVio 1.19 of 7, with this 0.53) but the first steps learn
    # slower (val loss +0.19 after 20 steps of tiny). Consider it for Flash/Pro-width runs.
    scaled_output_init: bool = False
    # --- attention (one shared K=V head, MQA)
    n_heads: int = 64
    head_dim: int = 512
    rope_dim: int = 64            # RoPE on the last rope_dim channels of q and kv
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window: int = 128             # sliding window: query t sees keys t-window+1 .. t
    # compress ratio per layer: 0 = window only, csa_ratio = CSA (overlap + indexer),
    # any other positive ratio = HCA (dense over all visible compressed entries).
    compress_ratios: list[int] = field(default_factory=list)
    csa_ratio: int = 4
    attention_mode: str = "sparse"  # "dense": CSA attends all visible entries (curriculum phase 1)
    # fused-op implementation (attention.impl): auto = Triton on CUDA, PyTorch reference
    # elsewhere; triton = Triton or an error; torch = always the reference (model/dispatch.py)
    attention_impl: str = "auto"
    mhc_impl: str = "auto"
    # routed experts: grouped = torch._grouped_mm over all experts (no per-expert launches),
    # loop = one SwiGLU per expert (the reference); auto = grouped where supported (model/moe.py)
    moe_impl: str = "auto"
    # the MoE's elementwise ops as Triton kernels (router top-k, clamped SwiGLU, permute /
    # combine; model/dispatch.py): auto = the kernels on CUDA (they won on the H200, 1.12x fwd+bwd
    # at 4 x 4K: model/dispatch.py), the reference elsewhere; triton = the kernels or an error;
    # torch = the reference
    moe_kernel_impl: str = "auto"
    # LM-head + cross-entropy (main and MTP): chunked = token chunks, no [L, V] logits
    # (model/loss.py); reference = full fp32 logits + F.cross_entropy
    loss_impl: str = "chunked"
    # the chunked loss's per-chunk softmax, loss and d loss / d logits (kernels/cross_entropy.py,
    # 2 passes over the fp32 logits instead of ~9): auto = the kernel on CUDA (H200: the head's
    # fwd+bwd 1.85x, model/dispatch.py), the reference elsewhere; triton = the kernel or an error
    loss_kernel_impl: str = "auto"
    # torch.compile: none = eager; block = each transformer block (main and MTP) compiled in
    # place by Transformer.compile_blocks (the trainer calls it), our Triton kernels opaque
    # calls inside (kernels/opaque.py)
    compile: str = "none"
    # --- lightning indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # indexer selection on CUDA (kernels/indexer_topk.py): score precision bf16 (the model dtype)
    # or fp8 (e4m3 q per token-head, k per entry, fp32 scales; as V4 runs its indexer); the
    # top-k: chunked (torch.topk per chunk, slots sorted by score), unsorted (the same set without
    # sorting the K slots) or fused (exact in-house select over L2-sized chunks, ties to the lower
    # index). fp8 without fp8 tensor cores: logged, PyTorch fp8 reference.
    # unsorted is the default: on CUDA torch.topk gathers the winners with one kernel whatever
    # `sorted` says and sorted=True only adds a sort of the K winners (H200, small at 4 x 4K:
    # radixSortKVInPlace, 14 of topk's 33 ms a step); no consumer reads the slot order (sparse
    # attention, indexer loss, recall, context parallel: tests/model/test_selection_order.py and
    # tests/kernels/test_selection_order_kernels.py). chunked keeps score-ordered slots for inspection.
    indexer_score_dtype: str = "bf16"
    indexer_select: str = "unsorted"
    # --- RoPE: theta on window-only layers; YaRN-scaled theta on compressed layers
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_pos: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # --- MoE (every layer)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    n_hash_layers: int = 3
    hash_seed: int = 0
    swiglu_limit: float = 10.0
    # Aux-loss-free balancing: each step every learned router's bias moves each expert by exactly
    # +-bias_update_speed (V4: 0.001, with a 2000-step lr warm-up). The router weight moves by
    # up to 0.18 * dim * lr logits a step under Muon whatever its gradient's size, so at full lr
    # from the first steps it can outrun the bias: tiny at lr 8e-3 (lr x dim = small's at 1e-3),
    # 2-step warm-up, the experts' mean scores spread by ~0.01 a step vs the bias's 0.002 and
    # the last layers collapse, with a 30-step warm-up too (bench/results/router-drift-cpu-
    # 2026-12-03.md; 0.01 keeps up): experiment=small_gpu / long_gpu set 0.01.
    # train/router_balance.py warns when a layer stays collapsed.
    bias_update_speed: float = 0.001
    # sequence-wise balance loss weight (V4); its gradient is ~2-4% of the LM loss's on the
    # router at init (tiny), so it is no brake on a drifting router under Muon
    balance_loss_alpha: float = 1e-4
    # --- hyper-connections
    hyper_connections: str = "mhc"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    hc_init_alpha: float = 0.01   # gating factors alpha (paper); fn init scale is ours
    # --- multi-token prediction
    mtp_depth: int = 1
    mtp_compress_ratio: int = 0   # the MTP block is window-only in V4
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            self.compress_ratios = [0] * self.n_layers
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{fld}: {msg}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank",
                  "o_groups", "o_lora_rank", "window", "index_n_heads", "index_head_dim",
                  "n_routed_experts", "n_activated_experts", "moe_inter_dim", "hc_mult"):
            need(int(getattr(self, f)) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        for f in ("init_std", "embed_init_std"):
            need(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}")
        need(len(self.compress_ratios) == self.n_layers, "compress_ratios",
             f"needs one entry per layer ({self.n_layers}), got {len(self.compress_ratios)}")
        for i, r in enumerate(self.compress_ratios):
            need(r >= 0 and (r == 0 or r >= 2), "compress_ratios",
                 f"ratio {r} at layer {i} not allowed: use 0 (window only) or an integer >= 2")
        need(self.csa_ratio >= 2, "csa_ratio", f"must be >= 2, got {self.csa_ratio}")
        need(self.index_topk >= 1, "index_topk", f"top-k must be >= 1, got {self.index_topk}")
        need(self.indexer_score_dtype in INDEXER_SCORE_DTYPES, "indexer_score_dtype",
             f"must be one of {INDEXER_SCORE_DTYPES}, got {self.indexer_score_dtype!r}")
        need(self.indexer_select in INDEXER_SELECTS, "indexer_select",
             f"must be one of {INDEXER_SELECTS}, got {self.indexer_select!r}")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})")
        need(0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, "rope_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_dim}")
        need(0 < self.rope_dim <= self.index_head_dim, "rope_dim",
             f"must be <= index_head_dim ({self.index_head_dim}), got {self.rope_dim}")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"top-k ({self.n_activated_experts}) exceeds n_routed_experts ({self.n_routed_experts})")
        need(0 <= self.n_hash_layers <= self.n_layers, "n_hash_layers",
             f"must be in [0, n_layers={self.n_layers}], got {self.n_hash_layers}")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.hyper_connections in HYPER_CONNECTION_KINDS, "hyper_connections",
             f"must be one of {HYPER_CONNECTION_KINDS}, got {self.hyper_connections!r}")
        need(self.attention_mode in ATTENTION_MODES, "attention_mode",
             f"must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        need(self.mtp_depth >= 0, "mtp_depth", "must be >= 0")
        for f in ("attention_impl", "mhc_impl", "moe_kernel_impl", "loss_kernel_impl"):
            need(getattr(self, f) in KERNEL_IMPLS, f,
                 f"must be one of {KERNEL_IMPLS}, got {getattr(self, f)!r}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl",
             f"must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        need(self.loss_impl in LOSS_IMPLS, "loss_impl",
             f"must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        need(self.compile in COMPILE_MODES, "compile",
             f"must be one of {COMPILE_MODES}, got {self.compile!r}")
        need(self.hc_sinkhorn_iters >= 1, "hc_sinkhorn_iters", "must be >= 1")

    # ------------------------------------------------------------------ derived
    @property
    def output_init_std(self) -> float:
        """Init std of the residual branches' output projections (``scaled_output_init``)."""
        return self.init_std / math.sqrt(2 * self.n_layers) if self.scaled_output_init else self.init_std

    @property
    def n_streams(self) -> int:
        """Residual streams carried between blocks (1 for a plain residual)."""
        return 1 if self.hyper_connections == "residual" else self.hc_mult

    def is_csa(self, ratio: int) -> bool:
        return ratio == self.csa_ratio

    @property
    def attention_ratios(self) -> list[int]:
        """The layer schedule: the compress ratio of every attention layer, the main stack's
        (0 window-only, ``csa_ratio`` CSA, else HCA) followed by the MTP blocks'."""
        return list(self.compress_ratios) + [self.mtp_compress_ratio] * self.mtp_depth

    @property
    def max_compress_ratio(self) -> int:
        return max(self.compress_ratios + [1])

    def layer_kind(self, layer: int) -> str:
        r = self.compress_ratios[layer]
        return "window" if r == 0 else ("csa" if self.is_csa(r) else "hca")

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            avail = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"model: unknown preset {name!r}; available presets: {avail}")
        try:
            from yaml import safe_load  # PyYAML ships with hydra/omegaconf
        except ImportError:   # a bare torch image (the GPU benches): presets are flat files
            safe_load = load_flat_yaml
        with open(path) as fh:
            d = safe_load(fh) or {}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
