"""V4 hybrid attention layer: one shared K=V head over a sliding window of raw tokens plus
compressed entries (HCA: all visible; CSA: the indexer's top-k, or all visible in dense mode),
with a learnable per-head sink, all in ONE softmax (``model.sparse_attention``).

    qr = q_norm(wq_a x)                         # shared query latent (also feeds the indexer)
    q  = RoPE(rms_norm_per_head(wq_b qr))       # [B, L, H, hd]
    kv = RoPE(kv_norm(wkv x))                   # [B, L, hd], K = V (value keeps its rope part)
    ckv = compressor(x)                         # [B, N, hd], ratio > 0 only
    o  = attend(q, kv, ckv, sink)               # scale hd^-0.5
    o  = RoPE^-1(o) at the query position       # makes each value's rope part relative
    out = wo_b(concat_g wo_a_g(o_g))            # grouped low-rank output projection

Layer kinds: ratio 0 (window only, theta rope_theta), ratio == csa_ratio (CSA: overlapped
compressor + indexer), other ratios (HCA). Compressed layers use the YaRN-scaled RoPE.
Parameter names follow docs/ARCHITECTURE.md and map one-to-one onto the official checkpoint
(HF: q_a_proj, q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj, o_b_proj, sinks).
``wo_a.weight`` is stored as [o_groups * o_lora_rank, n_heads * head_dim / o_groups]: group g
uses rows g*o_lora_rank .. (g+1)*o_lora_rank, as the official einsum and HF's grouped linear.

CompressedLayouts: the DocLayout's (``Transformer`` builds each ratio's once per forward), else
built here (cheap index math); in a chunk, the frame's.

CSA mode is the attribute ``mode`` ("dense" | "sparse", from cfg.attention_mode; change it with
``set_attention_mode``). The indexer runs in sparse mode (to select) and, in dense mode, only in
training (for its loss). Sparse mode selects with ``model.indexer.get_indexer_topk`` (no
gradient, no [B, L, N] matrix on CUDA; it also returns the selected entries' scores, which are
the loss's forward values) and computes the indexer loss on the selected set only
(``model.indexer.indexer_kl_loss_selected``); dense mode scores every visible entry, query
chunk by query chunk (``model.indexer.indexer_kl_loss_dense``).
``aux["indexer_loss"]`` is computed in training mode only (None in eval and on non-CSA layers);
``aux["topk_idx"]`` is the selection [B, L, K] in sparse CSA, else None.
``aux["indexer_recall"]``: {recall, chance, oracle} of ``model.indexer.indexer_recall`` when the model
set ``measure_recall`` for a diagnostics step (dense mode: of the top-k the indexer would pick),
else None. ``aux["sink_mass"]`` (mean probability on the sink) when ``measure_sink`` (a bare
layer: always; in the model: diagnostics steps), else None.
"""
from __future__ import annotations

import torch
from torch import nn

from model.compressor import Compressor
from model.grouped_linear import unrotate_grouped_linear
from model.config import ATTENTION_MODES, ModelConfig
from model.chunk_layout import AttentionCarry
from model.indexer import Indexer, get_indexer_topk, indexer_kl_loss_dense, indexer_kl_loss_selected, indexer_recall
from model.layout import CompressedLayout, DocLayout, queries_with_entries
from model.norms import RMSNorm
from model.profile_ranges import component
from model.rope import RoPE
from model.sparse_attention import get_sparse_attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, compress_ratio: int | None = None) -> None:
        """``compress_ratio`` defaults to the layer schedule's, ``cfg.attention_ratios[layer_idx]``
        (layers past the main stack are the MTP blocks')."""
        super().__init__()
        if layer_idx < 0:
            raise ValueError(f"Attention: layer_idx must be >= 0, got {layer_idx}")
        if compress_ratio is None:
            if layer_idx >= len(cfg.attention_ratios):
                raise ValueError(f"Attention: layer_idx {layer_idx} is past the {len(cfg.attention_ratios)} "
                                 f"attention layers (model.n_layers + model.mtp_depth)")
            compress_ratio = cfg.attention_ratios[layer_idx]
        if compress_ratio != 0 and compress_ratio < 2:
            raise ValueError(f"Attention: compress_ratio must be 0 or >= 2, got {compress_ratio}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.ratio = compress_ratio
        self.is_csa = compress_ratio != 0 and cfg.is_csa(compress_ratio)
        self.kind = "window" if compress_ratio == 0 else ("csa" if self.is_csa else "hca")
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.window = cfg.window
        self.o_groups, self.o_lora_rank = cfg.o_groups, cfg.o_lora_rank
        self.scale = cfg.head_dim ** -0.5
        self.eps = cfg.norm_eps
        self.mode = cfg.attention_mode  # CSA mode, switchable at run time (set_attention_mode)
        self.measure_recall = False     # set per forward by model.diagnostics (diagnostics steps)
        # the sink mass: by default (a bare layer); the model arms it for diagnostics steps only
        # (4 small kernels per layer and forward, on a step whose speed is its launches)
        self.measure_sink = True
        self.rope = RoPE.for_ratio(cfg, compress_ratio)

        H, hd = cfg.n_heads, cfg.head_dim
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(cfg.dim, hd, bias=False)
        self.kv_norm = RMSNorm(hd, cfg.norm_eps)
        self.wo_a = nn.Linear(H * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.compressor = (Compressor(cfg, compress_ratio, hd, overlap=self.is_csa, rope=self.rope)
                           if compress_ratio else None)
        self.indexer = Indexer(cfg, self.rope) if self.is_csa else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for lin in (self.wq_a, self.wq_b, self.wkv, self.wo_a):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo_b.weight, std=self.cfg.output_init_std)
        self.q_norm.weight.fill_(1.0)
        self.kv_norm.weight.fill_(1.0)
        self.sink.zero_()  # as HF's _init_weights
        if self.compressor is not None:
            self.compressor.reset_parameters()
        if self.indexer is not None:
            self.indexer.reset_parameters()

    def set_attention_mode(self, mode: str) -> None:
        """CSA mode: "dense" attends every visible compressed entry, "sparse" the top-k."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
        self.mode = mode

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, doc_start: torch.Tensor,
                ckv: torch.Tensor | None, c_end: torch.Tensor | None,
                topk_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one attention call (kernel dispatch point). -> o [B, L, H, hd], lse [B, L, H] fp32.
        cfg.attention_impl picks the Triton kernel or the reference (model/dispatch.py)."""
        fn = get_sparse_attention(self.cfg.attention_impl, q.device, q.dtype)
        return fn(q, kv, self.sink, doc_start, self.window, self.scale,
                  ckv, c_end, topk_idx, True)

    def _select(self, q_i: torch.Tensor, w_i: torch.Tensor, k_i: torch.Tensor, c_end: torch.Tensor,
                doc_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The indexer's top-k [B, L, K] (no gradient; kernel dispatch point) and the selected
        entries' scores [B, L, K] where the selection has them in the loss's precision (bf16
        scoring, torch.topk: its values; else None): the indexer loss's forward, already done."""
        topk_fn = get_indexer_topk(self.cfg.attention_impl, q_i.device, q_i.dtype,
                                   self.cfg.indexer_score_dtype, self.cfg.indexer_select)
        return topk_fn(q_i, w_i, k_i, c_end, doc_start, self.cfg.index_topk, return_scores=True)

    def _check_inputs(self, x: torch.Tensor, layout: DocLayout) -> None:
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"Attention: x must be [batch, length, dim={self.cfg.dim}], got {tuple(x.shape)}")
        B, L, _ = x.shape
        if tuple(layout.positions.shape) != (B, L) or tuple(layout.doc_start.shape) != (B, L):
            raise ValueError(f"Attention: layout shape {tuple(layout.positions.shape)} does not match "
                             f"x's [batch, length] = {(B, L)}")
        if L < 1 or L > self.cfg.max_seq_len:
            raise ValueError(f"Attention: sequence length {L} is not handled: it must be in "
                             f"[1, model.max_seq_len={self.cfg.max_seq_len}]")

    def forward(self, x: torch.Tensor, layout: DocLayout,
                carry: AttentionCarry | None = None) -> tuple[torch.Tensor, dict]:
        # x: [B, L, D]
        if carry is not None:   # one chunk of a longer sequence: work in its frame (halo + chunk)
            x = torch.cat([carry.halo.to(x.dtype), x], dim=1)
            layout = carry.frame.layout
        self._check_inputs(x, layout)
        B, L, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        pos, doc_start = layout.positions, layout.doc_start
        want_loss = self.training and (carry is None or carry.need_loss)

        qr = self.q_norm(self.wq_a(x))                                   # [B, L, q_lora_rank]
        # norm + RoPE in one kernel each way (model/rope.py: RoPE.apply_normed)
        q = self.rope.apply_normed(self.wq_b(qr).view(B, L, H, hd), pos, None, self.eps)   # [B, L, H, hd]
        kv = self.rope.apply_normed(self.wkv(x), pos, self.kv_norm.weight, self.kv_norm.eps)  # [B, L, hd]

        ckv = c_end = topk_idx = dense_idx = selected = ckv_new = k_new = None
        if self.compressor is not None:
            if carry is not None:
                entries = carry.frame.entries[self.ratio]
                cl = entries.new_layout                                  # the blocks pooled here
            else:
                cl = layout.compressed.get(self.ratio) or CompressedLayout.build(layout, self.ratio)
            with component("compressor"):
                ckv, c_end = self.compressor(x, cl), cl.c_end            # [B, N, hd], [B, N]
            if carry is not None:   # + the entries of earlier chunks (state)
                ckv_new, ckv, c_end = ckv, entries.merge(carry.state("ckv", ckv), ckv), entries.c_end
            # (a chunk's state pass also keeps the indexer keys: a later chunk's loss reads them)
            use_indexer = self.indexer is not None and (self.mode == "sparse" or want_loss
                                                        or (carry is not None and self.training))
            if use_indexer:
                with component("indexer"):
                    q_i, w_i, k_i = self.indexer.project(x, qr, pos, cl)  # [B,L,Hi,Di] [B,L,Hi] [B,N,Di]
                    if carry is not None:
                        k_new, k_i = k_i, entries.merge(carry.state("index_keys", k_i), k_i)
            if use_indexer and self.mode == "sparse":
                # select without gradient and without the [B, L, N] matrix; score (with
                # gradient) only the K selected entries, for the indexer loss
                with component("indexer"):
                    with torch.no_grad():
                        topk_idx, topk_scores = self._select(q_i, w_i, k_i, c_end, doc_start)   # [B, L, K]
                    if want_loss:
                        selected = self.indexer.selected_scores(q_i, w_i, k_i, topk_idx, topk_scores)
            elif use_indexer and want_loss:
                # dense mode: the loss scores every visible entry, in query chunks (no [B, L, N])
                dense_idx = (q_i, w_i, k_i)

        with component("core"):   # the one attention kernel (window + compressed entries + sink)
            o, lse = self._attend(q, kv, doc_start, ckv, c_end, topk_idx)  # [B, L, H, hd], [B, L, H]
        recall = None
        if self.measure_recall and (topk_idx is not None or dense_idx is not None):
            with torch.no_grad():   # dense mode: the top-k the indexer would select
                sel = topk_idx if topk_idx is not None else self._select(*dense_idx, c_end, doc_start)[0]
                h = carry.frame.halo if carry is not None else 0   # a chunk samples its own rows
                recall = indexer_recall(q[:, h:], ckv, lse[:, h:], self.scale, sel[:, h:], c_end - h,
                                        doc_start[:, h:] - h, lse_covers_all=topk_idx is None)

        indexer_loss = None
        # a chunk's halo queries are not its own: they see no entry in the loss
        kl_start = doc_start if carry is None else carry.frame.kl_doc_start
        with component("indexer"):   # its loss (the KL to the attention's mass on the entries)
            if selected is not None:
                indexer_loss = indexer_kl_loss_selected(q, ckv, lse, self.scale, selected, topk_idx, c_end,
                                                        kl_start, impl=self.cfg.attention_impl)
            elif dense_idx is not None:
                indexer_loss = indexer_kl_loss_dense(*dense_idx, q, ckv, lse, self.scale, c_end, kl_start)
        if indexer_loss is not None and carry is not None:
            # mean over this chunk's queries -> its share of the mean over the whole sequence
            n_here = queries_with_entries(c_end, kl_start).to(indexer_loss.dtype)
            indexer_loss = indexer_loss * n_here * carry.indexer_norm

        # RoPE^-1, then [B, L, H*hd] -> [B, L, g*r]: head group k through its rows of wo_a
        # (model/grouped_linear.py: no copy either way, the gradient's un-rotation in place)
        o = unrotate_grouped_linear(o, pos, self.rope, self.wo_a.weight, self.o_groups, impl=self.cfg.attention_impl)
        out = self.wo_b(o)                                               # [B, L, D]
        sink_mass = None
        if self.measure_sink:
            with torch.no_grad():   # over this chunk's own queries (a frame's halo rows belong to the previous)
                own = lse if carry is None else lse[:, carry.frame.halo:]
                sink_mass = torch.exp(self.sink.float()[None, None, :] - own.float()).mean()
        aux = {"indexer_loss": indexer_loss, "sink_mass": sink_mass, "topk_idx": topk_idx,
               "indexer_recall": recall}
        if carry is not None:
            f = carry.frame
            out = out[:, f.halo:]
            # the state this chunk hands on: its last rows of input (a copy: a view would keep
            # the whole frame's input alive for as long as the state is kept), the entries pooled here
            aux["carry"] = {"halo": x[:, L - f.halo_next:].clone() if f.halo_next else None,
                            "ckv": ckv_new, "index_keys": k_new}
        return out, aux

