"""The V4 transformer: embedding -> n streams -> blocks (attention site, MoE site, each wrapped
in a hyper-connection) -> head mixer -> norm -> head, plus multi-token prediction (MTP).

Losses are returned separately (lm, mtp, balance, indexer) and summed into ``loss``:
    loss = lm + mtp_loss_weight * mtp + sum_layers balance + mean_CSA_layers indexer
The indexer loss only reaches indexer parameters (its inputs and target are detached), so adding
it to the total never changes the main model's gradient.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from model.attention import Attention
from model.chunk_layout import ChunkContext, LayerCarry
from model.config import ATTENTION_MODES, ModelConfig
from model.diagnostics import DiagnosticsCollector
from model.hyper_connections import HyperConnection, HyperHead
from model.layout import DocLayout
from model.loss import IGNORE_INDEX, LMHead
from model.moe import MoE
from model.norms import RMSNorm
from model.profile_ranges import component
from model.accounting import count_params


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars
    logits: torch.Tensor | None = None      # [B, L, V], only when asked for (return_logits)
    routing_indices: list[torch.Tensor] = field(default_factory=list)  # per layer [B, L, K]
    diagnostics: dict = field(default_factory=dict)
    carry: list[dict] | None = None   # chunked: per attention layer, the state handed on
    hidden: torch.Tensor | None = None  # [B, L, D] the head's input, only when asked for (return_hidden)


class Block(nn.Module):
    """One transformer block: attention site and MoE site, each inside a hyper-connection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_idx)
        # site index 2i / 2i+1: plain HC's static one-hot pre-weights rotate over sites
        self.hc_attn = HyperConnection(cfg, 2 * layer_idx)
        self.hc_ffn = HyperConnection(cfg, 2 * layer_idx + 1)

    def forward(self, x, input_ids, layout: DocLayout, routing_indices=None, carry: LayerCarry | None = None):
        # x: [B, L, n, D]; carry: this block's state from earlier chunks (chunked step)
        # component(...): profiler ranges (model/profile_ranges.py), no-ops unless profiling
        with component("mhc.pre"):
            h, attn_site = self.hc_attn.pre(x)
        with component(f"attn.{self.attn.kind}"):
            a_in = self.attn_norm(h)
            a, attn_aux = self.attn(a_in, layout) if carry is None else carry.attention(self.attn, a_in, layout)
        with component("mhc.post"):
            x = self.hc_attn.post(a, attn_site)
        with component("mhc.pre"):
            h, ffn_site = self.hc_ffn.pre(x)
        with component("moe"):
            f, moe_aux = self.ffn(self.ffn_norm(h), input_ids, routing_indices, carry and carry.moe_sequence)
        with component("mhc.post"):
            x = self.hc_ffn.post(f, ffn_site)
        return x, {"attn": attn_aux, "moe": moe_aux, "comb": (attn_site.comb, ffn_site.comb)}


class MTPModule(nn.Module):
    """Multi-token prediction depth k: combines the main model's streams at t with the embedding
    of token t+k and predicts token t+k+1 through one extra block. Embedding and head are
    shared with the main model (passed in at call time, not owned)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_idx)   # its attention: cfg.attention_ratios[layer_idx]
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_streams, next_embed, input_ids, layout, routing_indices=None, carry=None):
        # h_streams: [B, L, n, D]; next_embed: [B, L, D] embedding of token t+k
        x = self.e_proj(self.enorm(next_embed)).unsqueeze(2) + self.h_proj(self.hnorm(h_streams))
        x, aux = self.block(x, input_ids, layout, routing_indices, carry)
        with component("mhc.head"):
            h = self.hc_head(x)
        return x, self.norm(h), aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = LMHead(cfg.dim, cfg.vocab_size, cfg.loss_impl, cfg.loss_kernel_impl)
        self.mtp = nn.ModuleList([MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp_depth)])
        self.mtp_loss_weight = cfg.mtp_loss_weight  # the trainer lowers it at LR decay (0.3 -> 0.1)
        self.activation_checkpointing = False
        self.blocks_compiled = False   # compile_blocks: the blocks' insides have no profiler ranges
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=self.cfg.embed_init_std)  # why: ModelConfig.embed_init_std
        nn.init.normal_(self.head.weight, std=std)
        for mod in self.mtp:
            nn.init.normal_(mod.e_proj.weight, std=std)
            nn.init.normal_(mod.h_proj.weight, std=std)

    # ------------------------------------------------------------------ control
    def set_attention_mode(self, mode: str) -> None:
        """'dense' (CSA attends every visible compressed entry) or 'sparse' (indexer top-k): a
        run-time state of the attention layers (the trainer's plan sets it every step); ``cfg``
        stays the configured model (``cfg.attention_mode`` is the mode it is built in)."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be 'dense' or 'sparse', got {mode!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.mode = mode

    @property
    def attention_mode(self) -> str:
        """The CSA mode the attention layers run in now (``set_attention_mode``)."""
        return next((m.mode for m in self.modules() if isinstance(m, Attention)), self.cfg.attention_mode)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def router_load_buffers(self) -> list[torch.Tensor]:
        """Per-MoE token-count accumulators; all-reduce them (sum) across data-parallel ranks
        before calling update_router_biases()."""
        return [m.load_accum for m in self.moe_layers()]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i), once per optimizer step."""
        for m in self.moe_layers():
            m.update_bias()

    def blocks(self) -> list[Block]:
        """Every transformer block: the main stack's, then the MTP modules'."""
        return list(self.layers) + [m.block for m in self.mtp]

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None,
                       options: dict | None = None) -> None:
        """``model.compile=block``: torch.compile every block in place (parameter names and
        state dicts unchanged). Call it on the final model, after any copy or wrapping: a deep
        copy of a compiled module would still call the original's forward. Blocks of another
        layer kind (window / CSA / HCA, hash or learned routing) are separate graphs, so the
        recompile limit is raised to a few graphs per block (train / eval, batch shapes).
        ``mode`` / ``options``: torch.compile's (e.g. mode="reduce-overhead": Inductor's CUDA
        graphs, measured by bench/cuda_graphs.py; the trainer passes neither)."""
        import torch._dynamo

        from model.dispatch import import_kernel_modules

        import_kernel_modules()   # Dynamo cannot trace an import: the first call may be compiled
        blocks = self.blocks()
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 8 * len(blocks))
        for b in blocks:
            b.compile(backend=backend, mode=mode, options=options)
        self.blocks_compiled = True

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    def num_params(self) -> tuple[int, int]:
        c = count_params(self)
        return c.total, c.active

    # ------------------------------------------------------------------ forward
    def _checkpointed(self, fn, *args):
        """fn(*args); with activation checkpointing (training, grad on) only its inputs are kept
        and its activations are recomputed in backward. Used for every block, the MTP modules
        and the head's stream mix + norm; the losses (model/loss.py) keep only gradients.
        No RNG state is stashed: the model draws no random numbers (model/recompute.py says why)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        return fn(*args)

    def _run_block(self, block: Block, x, input_ids, layout, routing, carry=None):
        # a compiled block is one range (Inductor fuses across the ranges inside it)
        with component("block(compiled)") if self.blocks_compiled else nullcontext():
            return self._checkpointed(block, x, input_ids, layout, routing, carry)

    # the ranges of a checkpointed function (below) open inside it: its recomputation in
    # backward then carries the same names as its forward
    def _final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        with component("mhc.head"):
            h = self.hc_head(x)                                         # [B, L, n, D] -> [B, L, D]
        with component("lm_head"):
            return self.norm(h)

    def _mtp_step(self, mod: MTPModule, x, tokens, layout, routing, carry=None):
        # the embedding lookup inside: a checkpoint then keeps token ids, not [B, L, D]
        with component("mtp"):
            return mod(x, self.embed(tokens), tokens, layout, routing, carry)

    def _layout(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None) -> DocLayout:
        """The batch's DocLayout with every compressed ratio's layout built once (shared by the
        layers of that ratio)."""
        B, L = input_ids.shape
        layout = DocLayout.from_doc_ids(doc_ids) if doc_ids is not None else DocLayout.single(B, L, input_ids.device)
        return layout.with_compressed(self.cfg.attention_ratios)

    def _trunk(self, input_ids, layout: DocLayout, routing_indices=None, collect=None, carries=None):
        """Embedding and the main blocks: (streams [B, L, n, D], balance losses, indexer losses,
        routing indices, the state each attention layer hands on (chunked; else None)) of the
        main layers. ``carries``: per layer, its state from earlier chunks (chunked step)."""
        cfg = self.cfg
        B, L = input_ids.shape
        with component("embed"):
            emb = self.embed(input_ids)                                 # [B, L, D]
            x = emb.unsqueeze(2).expand(B, L, cfg.n_streams, cfg.dim).contiguous()  # [B, L, n, D]
        balance, idx_losses, used_routes, state_out = [], [], [], []
        for i, block in enumerate(self.layers):
            route = routing_indices[i] if routing_indices is not None else None
            x, aux = self._run_block(block, x, input_ids, layout, route, carries[i] if carries else None)
            balance.append(aux["moe"]["balance_loss"])
            if aux["attn"].get("indexer_loss") is not None:
                idx_losses.append(aux["attn"]["indexer_loss"])
            used_routes.append(aux["moe"]["indices"])
            state_out.append(aux["attn"].get("carry"))
            if collect is not None:
                collect.block(i, block, aux)
        return x, balance, idx_losses, used_routes, state_out

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D]: the final hidden state the LM head reads, without logits, MTP or losses.
        Evaluation at long L scores the few positions it needs from it (``train.eval``): full
        ``[B, L, V]`` logits would not fit at 1M tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        x = self._trunk(input_ids, self._layout(input_ids, doc_ids))[0]
        return self.norm(self.hc_head(x))

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        routing_indices: list[torch.Tensor] | None = None,
        diagnostics: bool = False,
        return_logits: bool | None = None,
        chunk: ChunkContext | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """``return_logits``: None = logits only when there are no labels (inference); with
        labels the losses never form [B, L, V] logits (model/loss.py) unless True is passed.
        ``chunk``: the inputs are one chunk of longer sequences (``model/chunked_step.py``):
        attention layers read the earlier chunks' state from it, losses are the chunk's share of
        the whole sequence's (logits of the chunk's rows only when ``return_logits=True``), and
        ``carry`` returns the state this chunk hands on. Context parallelism runs a rank's token
        range the same way (``model/context_parallel_model.py``).
        ``return_hidden``: also return the final hidden state (the LM head's input), for
        scoring chosen positions without [B, L, V] logits (``model.chunked_step.chunked_forward``)."""
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        n_moe = cfg.n_layers + cfg.mtp_depth
        if routing_indices is not None and len(routing_indices) not in (cfg.n_layers, n_moe):
            raise ValueError(
                f"routing_indices needs one entry per MoE layer ({cfg.n_layers}, or {n_moe} with MTP), "
                f"got {len(routing_indices)}"
            )
        if chunk is not None:
            layout = chunk.rows_layout
        else:
            layout = self._layout(input_ids, doc_ids)
        carries = [None] * n_moe if chunk is None else chunk.layers
        want_loss = labels is not None and (chunk is None or chunk.need_loss)
        collect = DiagnosticsCollector(enabled=diagnostics)
        collect.arm(self)
        x, balance, idx_losses, used_routes, state_out = self._trunk(input_ids, layout, routing_indices,
                                                                     collect, carries)
        h_main = x
        if return_logits is None:
            return_logits = labels is None and chunk is None
        # (a chunk's state pass needs no head)
        hidden = (self._checkpointed(self._final_hidden, x) if want_loss or return_logits or return_hidden
                  else None)                                            # [B, L, D]
        with component("lm_head"):
            logits = self.head(hidden) if return_logits else None       # [B, L, V]

        losses: dict[str, torch.Tensor] = {}
        total = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            if want_loss:
                with component("lm_head"):
                    lm = self._lm_loss(hidden, labels, chunk and chunk.lm_count)
                total = lm
                losses["lm"] = lm
            if cfg.mtp_depth > 0:
                mtp_losses = []
                x_mtp = h_main
                tok_in = labels  # depth k+1 reads token t+k+1 and predicts token t+k+2
                for k, mod in enumerate(self.mtp):
                    if chunk is None:
                        tgt, count = self._shift(tok_in, doc_ids).masked_fill(tok_in == IGNORE_INDEX, IGNORE_INDEX), None
                    else:   # shifted over the whole sequence: t + 1 may lie in the next chunk
                        tok_in, tgt, count = chunk.mtp[k]
                    safe_in = tok_in.clamp(min=0)
                    route = routing_indices[cfg.n_layers + k] if routing_indices is not None and len(routing_indices) == n_moe else None
                    x_mtp, h_k, aux = self._checkpointed(self._mtp_step, mod, x_mtp, safe_in, layout, route,
                                                         carries[cfg.n_layers + k])
                    balance.append(aux["moe"]["balance_loss"])
                    if aux["attn"].get("indexer_loss") is not None:
                        idx_losses.append(aux["attn"]["indexer_loss"])
                    used_routes.append(aux["moe"]["indices"])
                    state_out.append(aux["attn"].get("carry"))
                    collect.block(cfg.n_layers + k, mod.block, aux, composite=False)
                    if want_loss:
                        with component("mtp"), component("lm_head"):
                            mtp_losses.append(self._lm_loss(h_k, tgt, count))
                    tok_in = tgt
                if want_loss:
                    mtp = torch.stack(mtp_losses).mean()
                    losses["mtp"] = mtp
                    total = total + self.mtp_loss_weight * mtp
            if want_loss:
                bal = torch.stack([b.to(torch.promote_types(b.dtype, torch.float32)) for b in balance]).sum()
                losses["balance"] = bal
                total = total + bal
                if idx_losses:
                    il = torch.stack(idx_losses).mean()
                    losses["indexer"] = il
                    total = total + il
            losses = {k: v.detach() for k, v in losses.items()}
        diag = collect.finish(self) if diagnostics else {}
        return ModelOutput(loss=total, losses=losses, logits=logits,
                           routing_indices=used_routes, diagnostics=diag,
                           carry=state_out if chunk is not None else None,
                           hidden=hidden if return_hidden else None)

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Mean cross-entropy of the shared head over hidden [B, L, D] (main head and MTP);
        ``count``: divide by this many labelled tokens (a chunk's share of a longer sequence's mean)."""
        return self.head(hidden, labels, count)

    @staticmethod
    def mtp_targets(labels: torch.Tensor, doc_ids: torch.Tensor | None,
                    depth: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per MTP depth, over the WHOLE sequence: (the tokens it reads, its targets, labelled
        targets). A chunk or a context-parallel shard slices them: its last position's target
        lies in the next one (``model/chunked_step.py``, ``model/context_parallel_model.py``)."""
        out, tok = [], labels
        for _ in range(depth):
            tgt = Transformer._shift(tok, doc_ids).masked_fill(tok == IGNORE_INDEX, IGNORE_INDEX)
            out.append((tok, tgt, int((tgt != IGNORE_INDEX).sum())))
            tok = tgt
        return out

    @staticmethod
    def _shift(t: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """t[:, i] <- t[:, i+1]; the last position and positions whose next token lies in another
        document get IGNORE_INDEX (MTP never predicts across a document boundary)."""
        out = torch.cat([t[:, 1:], t.new_full((t.shape[0], 1), IGNORE_INDEX)], dim=1)
        if doc_ids is not None:
            cross = torch.zeros_like(out, dtype=torch.bool)
            cross[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
            out = out.masked_fill(cross, IGNORE_INDEX)
        return out


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The model without allocating memory (for flash/pro accounting)."""
    with torch.device("meta"):
        return Transformer(cfg)
