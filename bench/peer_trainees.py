"""The two outside peers of bench/peers.py, each built from our ModelConfig and trained the
usual way for its project on one GPU: fp32 parameters, forward under bf16 autocast, backward,
global-norm clip 1.0, fused AdamW (the recipe of Hugging Face's Trainer with bf16=True, and of
torchtitan's mixed precision without sharding; bench/dense_gpt.py's dense peer trains the same).

* ``HFTrainee``: transformers' eager ``DeepseekV4ForCausalLM`` with the config model/hf.py maps
  ours to (``to_hf_config``), starting from our model's weights (``hf_state_dict``; HF has no
  MTP, so the MTP modules are left out), so that both route the same tokens the same way.
* ``TitanTrainee``: torchtitan's DeepSeek-V3 model (MLA in place of V4's attention, V3's MoE)
  at the size ``titan_config`` matches to ours: same dim, layers, heads, vocabulary, q LoRA rank,
  experts / top-k / expert width / shared experts, MTP depth and route scale; MLA head dims
  V3's shape (qk = nope + rope with nope = head_dim / 2, v = head_dim / 2, kv LoRA rank = q LoRA
  rank), which lands its active matmul parameters within a few % of ours (test). Not V4: no
  hash-routed layers (all learned, sigmoid scores, normalised top-k), full causal attention.
  Its MoE load balancing (the expert-bias update torchtitan runs as an optimizer pre-hook) runs
  before each optimizer step, as ours does after.

Each trainee: ``forward_backward(ids)`` (returns the detached loss), ``optimizer_step()``, and
``model`` / ``opt`` for the memory count.
"""
from __future__ import annotations

import abc
import warnings

import torch

from model.config import ModelConfig


class AutocastTrainee(abc.ABC):
    """fp32 parameters, bf16 autocast forward, clip 1.0, fused AdamW (on CUDA); a peer defines
    ``loss``."""

    autocast = True

    def __init__(self, model: torch.nn.Module, device, lr: float = 3e-4):
        self.device = torch.device(device)
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     betas=(0.9, 0.95), weight_decay=0.1, fused=self.device.type == "cuda")

    @abc.abstractmethod
    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The peer's training loss of one micro-batch ids [B, L]."""

    def forward_backward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(ids)
        loss.backward()
        return loss.detach()

    def before_step(self) -> None:
        pass

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.before_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- Hugging Face
class HFTrainee(AutocastTrainee):
    def __init__(self, cfg: ModelConfig, device, init_from: torch.nn.Module | None = None):
        import transformers

        from model.hf import hf_state_dict, to_hf_config

        with torch.device(device):
            model = transformers.DeepseekV4ForCausalLM(to_hf_config(cfg))
        if init_from is not None:   # the MTP modules are ours only
            sd = {k: v for k, v in hf_state_dict(init_from).items() if not k.startswith("mtp.")}
            model.load_state_dict(sd, strict=True)
        super().__init__(model, device)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss


# ----------------------------------------------------------------------------- torchtitan
def titan_compat() -> list[str]:
    """What torch lacks that torchtitan 0.3.0 imports at module level, set as placeholders; ->
    their names. torchtitan tracks torch nightly: on torch 2.11 (the GPU image) its MTP and FSDP
    modules import ``torch.distributed.fsdp.DataParallelMeshDims`` (a 2.12 FSDP API), which only
    its sharded (fully_shard on DTensor meshes) path uses; this bench never shards."""
    import torch.distributed.fsdp as fsdp

    done = []
    if not hasattr(fsdp, "DataParallelMeshDims"):
        class DataParallelMeshDims:   # never instantiated here
            def __init__(self, *a, **k):
                raise RuntimeError("placeholder of bench/peer_trainees.titan_compat: FSDP is not used")

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        done.append("torch.distributed.fsdp.DataParallelMeshDims")
    return done


def titan_config(cfg: ModelConfig, max_seq: int, attention: str = "flex"):
    """torchtitan's ``DeepSeekV3Model.Config`` matched to ``cfg`` (see the module docstring).
    ``attention``: "flex" (torchtitan's language-model default: compiled FlexAttention, causal
    BlockMask) or "sdpa" (its ScaledDotProductAttention, causal; flex has no CPU backward)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import (DeepSeekV3Model, _build_dsv3_layers, _build_mtp_layers,
                                               _EMBEDDING_INIT, _NORM_INIT, _output_linear_init)

    if attention not in ("flex", "sdpa"):
        raise ValueError(f"titan attention must be 'flex' or 'sdpa', got {attention!r}")
    half = cfg.head_dim // 2
    layers = _build_dsv3_layers(
        n_layers=cfg.n_layers, n_dense_layers=0, dim=cfg.dim, n_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=half,
        qk_rope_head_dim=cfg.rope_dim, v_head_dim=half, mscale=1.0, dense_hidden_dim=4 * cfg.dim,
        moe_hidden_dim=cfg.moe_inter_dim, num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts, router_top_k=cfg.n_activated_experts,
        router_score_func="sigmoid", router_route_norm=True, router_route_scale=cfg.route_scale,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=cfg.rope_dim, max_seq_len=max_seq, theta=cfg.rope_theta, scaling="none"))
    mtp = _build_mtp_layers(layers[-1], dim=cfg.dim, num_mtp_layers=cfg.mtp_depth)
    if attention == "sdpa":
        for layer in layers + mtp:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    V, D = cfg.vocab_size, cfg.dim
    return DeepSeekV3Model.Config(
        vocab_size=V, dim=D, layers=layers, mtp_layers=mtp,
        tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=D, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=D, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=D, out_features=V, param_init=_output_linear_init(D)))


class TitanTrainee(AutocastTrainee):
    def __init__(self, cfg: ModelConfig, device, max_seq: int, attention: str = "flex", autotune: bool = False):
        from torchtitan.models.deepseek_v3 import MTPLoss

        self.tcfg = titan_config(cfg, max_seq, attention)
        with torch.device(device):
            model = self.tcfg.build()
        model.init_states(buffer_device=torch.device(device))
        super().__init__(model, device)
        # its router asks autocast for an fp32 gate; CPU autocast refuses fp32 and then drops the
        # outer bf16 autocast too (dtype mismatch): on CPU (--tiny) it runs in fp32
        self.autocast = self.device.type == "cuda"
        if not self.autocast:
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        self.attention, self.mtp_loss = attention, MTPLoss(MTPLoss.Config()) if cfg.mtp_depth else None
        if attention == "flex" and not autotune:
            # torchtitan compiles FlexAttention with max_autotune + coordinate-descent tuning
            # (minutes per shape; its own advice is to autotune once, then pin kernel_options):
            # here Inductor's default flex kernel choice, for every instance in this process
            from torch.nn.attention.flex_attention import flex_attention
            from torchtitan.models.common.attention import FlexAttention

            FlexAttention._compiled_flex_attn = torch.compile(flex_attention)
        self._masks: dict[tuple, object] = {}

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks (main stack and MTP): torchtitan compiles these one by one."""
        return list(self.model.layers.values()) + list(self.model.mtp_layers or [])

    def _mask(self, B: int, L: int):
        """The causal BlockMask of one document per row (what torchtitan's document mask is for
        rows that each hold one document), built once per shape."""
        if self.attention != "flex":
            return None
        if (B, L) not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            causal = lambda b, h, q, kv: q >= kv
            block = self.tcfg.layers[0].attention.inner_attention.block_size
            self._masks[(B, L)] = create_block_mask(causal, B, None, L, L, device=self.device, BLOCK_SIZE=block)
        return self._masks[(B, L)]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

        B, L = ids.shape
        positions = torch.arange(L, device=ids.device).expand(B, L)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        out = self.model(ids, positions, self._mask(B, L))
        n = labels.numel() - B
        if self.mtp_loss is None:
            return cross_entropy_loss(out, labels) / n
        return self.mtp_loss(out, labels, positions=positions)[0] / n

    def before_step(self) -> None:
        """Auxiliary-loss-free balancing as torchtitan's optimizer pre-hook does it: each MoE's
        expert bias moves by coeff x sign(mean load - load), re-centred; the load counts reset."""
        with torch.no_grad():
            for block in self.blocks():
                moe = getattr(block, "moe", None)
                if moe is None or moe.load_balance_coeff is None:
                    continue
                load = moe.tokens_per_expert_E.float()
                delta = moe.load_balance_coeff * torch.sign(load.mean() - load)
                moe.expert_bias_E.add_(delta - delta.mean())
                moe.tokens_per_expert_E.zero_()

