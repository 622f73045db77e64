"""The ``data`` config section, typed: the one place its keys and defaults are declared.

The Hydra schema (``train/config_schema.py``) uses this dataclass as the ``data`` node, and
``data.builder.build_data`` takes it (or a plain mapping of some of its keys, filled in from
these defaults; see data/builder.py for what each key means).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from data.tokenizer import EMBEDDED_GPT2


@dataclass
class DataSection:
    """Keys of data.builder.build_data (see data/builder.py for their meaning)."""
    kind: str = "embedded"             # embedded | embedded_long | files | hf
    paths: List[str] = field(default_factory=list)      # files: files or directories
    name: Optional[str] = None         # hf: dataset name or local dataset directory
    subset: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    text_field: str = "text"
    sample_by: str = "document"        # files (text): document | paragraph | line
    max_documents: Optional[int] = None
    tokenizer: str = EMBEDDED_GPT2     # gpt2-embedded | a Hugging Face tokenizer name or path
    eos_token: Optional[str] = None    # HF tokenizers: document separator (null: its eos)
    cache_dir: Optional[str] = None    # token cache; null: ~/.cache/hybridlm
    val_fraction: float = 0.01         # held-out fraction (whole documents/groups)
    val_batches: int = 8               # micro-batches per validation pass
    packing: str = "stream"            # stream (cut every seq_len) | documents (whole documents per row)
    passkey_rate: float = 0.0          # share of training tokens from synthetic passkey documents


def section_defaults() -> dict[str, Any]:
    """{key: default} of every key."""
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(DataSection)}
