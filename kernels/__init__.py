"""Triton kernels for hybridlm, one module per fused op, each named after the PyTorch
reference it replaces (the reference lives in ``model/`` and is the contract):

* ``kernels.sparse_attention.sparse_attention_triton``  <- ``model.sparse_attention.sparse_attention``
* ``kernels.indexer_topk``                              <- ``model.indexer_topk`` scoring + top-k
  (bf16 | fp8 scores, chunked torch.topk | fused exact select); ``kernels.fp8`` (plain PyTorch)
  defines the fp8 bytes its quantiser reproduces, for it and for the reference ``model.indexer_fp8``
* ``kernels.indexer_loss``                              <- ``model.indexer`` sparse-loss gathers
  (``selected_indexer_scores`` forward + backward, ``attention_mass_on_selected``, ``kl_over_selected``)
* ``kernels.mhc``                                       <- ``model.hyper_connections`` coefficients + Sinkhorn
* ``kernels.moe_router`` / ``kernels.swiglu`` / ``kernels.moe_permute``  <- ``model.moe`` (``topk_routing``,
  ``swiglu_activation``, ``permute_tokens`` / ``unpermute_tokens``)
* ``kernels.rms_norm``                                  <- ``model.norms.rms_norm_reference``; with RoPE
  fused: ``model.rope.rms_norm_rope``
* ``kernels.rope``                                      <- ``model.rope.rope_rotate``
* ``kernels.compressor_pool``                           <- ``model.compressor.compressor_pool`` (gated pooling)
* ``kernels.checks``: value checks on tensors without a host sync (kernels and model use them)

The choice between a kernel and its reference is made in ``model.dispatch`` (``*_impl: auto |
triton | torch``), which imports these modules by name only when a kernel is wanted: nothing
here imports ``model/``, so ``model -> kernels`` is the only direction.
Importing this package never imports Triton; the kernel modules do, so a machine without
Triton still runs the model with the PyTorch references.
"""

# The options ``kernels.indexer_topk`` implements (here, Triton-free, so that model/config.py
# validates ``model.indexer_score_dtype`` / ``model.indexer_select`` against the same tuples)
INDEXER_SCORE_DTYPES = ("bf16", "fp8")
INDEXER_SELECTS = ("chunked", "unsorted", "fused")
