"""Data pipeline: corpus -> tokenizer -> token cache -> packed windows -> loaders.

Entry point: ``build_data(cfg, seq_len, micro_batch, seed, rank, world_size)`` (``data.builder``).
"""
# Names are imported on first use (PEP 562): the config schema imports this package's typed
# section (``config``) before anything heavy, so that a mistyped key fails at once.
import importlib

_EXPORTS = {
    **dict.fromkeys(('DataBundle', 'build_data'), "data.builder"),
    **dict.fromkeys(('TokenLoader', 'ValLoader'), "data.loader"),
    **dict.fromkeys(('TokenStream', 'doc_ids_from_inputs'), "data.packing"),
    **dict.fromkeys(('EMBEDDED_GPT2', 'Tokenizer', 'load_tokenizer'), "data.tokenizer"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
