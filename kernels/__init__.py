"""Triton kernels for hybridlm, one module per fused op, each named after the PyTorch
reference it replaces (the reference lives in ``model/`` and is the contract):

* ``kernels.sparse_attention.sparse_attention_triton``  <- ``model.sparse_attention.sparse_attention``
* ``kernels.indexer_topk``                              <- ``model.indexer`` scoring + top-k
  (bf16 | fp8 scores, chunked torch.topk | fused exact select); ``kernels.indexer_fp8`` is the
  plain-PyTorch fp8 quantisation reference (no Triton import)
* ``kernels.mhc``                                       <- ``model.hyper_connections`` coefficients + Sinkhorn
* ``kernels.moe_router`` / ``kernels.swiglu`` / ``kernels.moe_permute``  <- ``model.moe`` (``topk_routing``,
  ``swiglu_activation``, ``permute_tokens`` / ``unpermute_tokens``)
* ``kernels.rms_norm``                                  <- ``model.norms.rms_norm_reference``
* ``kernels.rope``                                      <- ``model.rope.rope_rotate``
* ``kernels.dispatch``  picks the implementation (``attention.impl: auto | triton | torch``).

Importing this package never imports Triton; the kernel modules do, so a machine without
Triton still runs the model through ``kernels.dispatch`` with the PyTorch references.
"""
