"""Data pipeline: corpus -> tokenizer -> token cache -> packed windows -> loaders.

Entry point: ``build_data(cfg, seq_len, micro_batch, seed, rank, world_size)`` (``data.builder``).
"""
from data.builder import DataBundle, build_data
from data.loader import TokenLoader, ValLoader
from data.packing import TokenStream, doc_ids_from_inputs
from data.tokenizer import EMBEDDED_GPT2, Tokenizer, load_tokenizer

__all__ = [
    "DataBundle", "build_data", "TokenLoader", "ValLoader", "TokenStream",
    "doc_ids_from_inputs", "Tokenizer", "load_tokenizer", "EMBEDDED_GPT2",
]
