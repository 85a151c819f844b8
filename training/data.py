"""Sources -> token shards -> batches: the data side of pretraining.

    iter_documents(source)              text documents from a built-in corpus, local files or the HF hub
    prepare_shards(source, tok, out)    tokenise once into compact shards, split train/val by document
    ShardedDataset.open(out)            read them back (memory-mapped)
    RandomWindowBatches(split, B, T)    random training windows, resumable from the step counter
    iter_eval_batches(split, B, T)      fixed, non-overlapping windows for validation
    token_byte_lengths(tok)             UTF-8 bytes per token id, for bits per byte

Notable choices:
- Every document is stored as `[boundary] + tokens`, the boundary being the tokenizer's BOS (or EOS)
  token, GPT-2's `<|endoftext|>`. Windows are cut anywhere in this stream, as in nanoGPT; with
  `document_positions=True` the batches also carry position ids that restart at each boundary, for
  document-masked attention.
- Text is tokenised as plain text: a document that contains the string "<|endoftext|>" or a chat
  role marker gets ordinary tokens for it, never the control token (tiktoken's `encode_ordinary`).
- The train/validation split is by document and depends only on each document's text (a blake2b
  hash below `val_fraction`), so it is the same whatever the source format or order, and repeated
  documents never leak across it. A source of only a few documents (a folder of books), which a
  split by document would leave with no validation text or a whole book of it, instead holds out
  the last `val_fraction` of every document, cut at a paragraph break; this is said when it happens.
- The shard folder is resumable: shards are written atomically, the manifest is rewritten after
  every shard as a consistent checkpoint, and a re-run with the same settings reuses the finished
  work instead of tokenising again.

Shard format (FORMAT_VERSION 1), all in `out_dir`:
    manifest.json              settings, tokenizer fingerprint, dtype, per-split shard lists and counts
    {split}-{k:05d}.bin        raw little-endian uint16 tokens (uint32 when the vocab exceeds 65,536)
    {split}-{k:05d}.offsets.npy  int64, num_documents + 1 entries: where each document's boundary
                               token sits in the shard, then the shard length
A document never straddles two shards. Whenever one split's shard reaches `shard_tokens`, the
open shards of both splits are closed together, so that the manifest can record one point in the
source before which everything is stored: validation gets as many shards as train, each smaller.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")

# File kinds we read, keyed by suffix (after an optional ".gz").
_FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that are not documentation: test suites, the IDLE app, and
# whatever third-party packages were installed beside it.
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
# How much text goes to the tokenizer at once: enough for the Rust backend to keep every core busy,
# small enough that memory stays flat and the progress bar moves.
_BATCH_CHARS = 2_000_000
_BATCH_DOCS = 2048


# ---------------------------------------------------------------------------------------------
# Sources -> documents
# ---------------------------------------------------------------------------------------------


def iter_documents(
    source: str,
    *,
    text_column: str = "text",
    split: str = "train",
    doc_separator: str | None = None,
    max_documents: int | None = None,
) -> Iterator[str]:
    """Yield the non-empty text documents of `source`, in a deterministic order.

    `source` is one of:
      - "builtin:python-docs": the documentation shipped with this Python (no network, no
        third-party text): the pydoc topics, then the docstrings of each standard-library module;
      - a local .txt / .jsonl / .json / .parquet file, each optionally gzipped, or a folder of them
        (walked recursively in sorted order). A .txt file is one document, or several when
        `doc_separator` is given; the other kinds give one document per record, from `text_column`;
      - otherwise a Hugging Face hub dataset "NAME", "NAME:CONFIG", optionally "...@SPLIT" to
        override `split`, streamed with `datasets`.
    Documents that are empty or only whitespace are skipped.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"--max_documents must be at least 1, got {max_documents}")
    count = 0
    for text in _raw_documents(source, text_column, split, doc_separator):
        if not text.strip():
            continue
        yield text
        count += 1
        if max_documents is not None and count >= max_documents:
            return
    if count == 0:
        raise ValueError(f"no documents in {source}: every file or record in it is empty")


def _raw_documents(source: str, text_column: str, split: str, doc_separator: str | None) -> Iterator[str]:
    if source == BUILTIN_PYTHON_DOCS:
        yield from _python_docs()
        return
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in corpus {source!r}; the only one is {BUILTIN_PYTHON_DOCS!r}")
    path = Path(source).expanduser()
    if path.exists():
        for file in _local_files(path):
            yield from _file_documents(file, text_column, doc_separator)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source}")
    else:
        yield from _hub_documents(source, text_column, split)


def _python_docs() -> Iterator[str]:
    # pydoc's topics are the language reference sections `help()` shows; some minimal Python
    # builds leave pydoc_data out, and the docstrings alone are still a corpus.
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk_sorted(root, lambda p: p.suffix == ".py", skip_dirs=_STDLIB_SKIP):
        try:
            # Parsed, never imported: importing runs module code and needs optional C extensions.
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # e.g. lib2to3 test data written in Python 2
        docstrings = list(_docstrings(tree))
        if docstrings:
            yield "\n\n".join(docstrings)


_STATEMENT_LISTS = {"body", "orelse", "finalbody", "handlers", "cases"}


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        text = ast.get_docstring(node)
        if text:
            yield text
    # Definitions sit only in statement lists (bodies, else/finally blocks, except handlers), so
    # the walk skips expressions, most of the tree, and runs five times faster than ast.walk.
    for field in node._fields:  # in the order the parts appear in the source
        if field in _STATEMENT_LISTS:
            for child in getattr(node, field):
                yield from _docstrings(child)


def _walk_sorted(root: Path, keep, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Files under `root` for which keep(path) holds, sorted by their path relative to root.

    Sorting the whole list (not per folder, as os.walk would) makes the order depend only on the
    names, so the same tree gives the same documents on any machine. Hidden entries are skipped.
    """
    skip = set(skip_dirs)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".") and keep(Path(folder, f))]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _file_kind(path: Path) -> tuple[str | None, bool]:
    """("txt" | "jsonl" | "json" | "parquet" | None, gzipped) from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    return _FILE_KINDS.get(os.path.splitext(name)[1]), gzipped


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if _file_kind(path)[0] is None:
            raise ValueError(f"{path}: unsupported file type; use {_supported_types()}")
        return [path]
    files = _walk_sorted(path, lambda p: _file_kind(p)[0] is not None)
    if not files:
        raise ValueError(f"no documents in {path}: the folder holds no {_supported_types()} files")
    return files


def _supported_types() -> str:
    return ", ".join(_FILE_KINDS) + " (each optionally .gz)"


def _looks_like_path(source: str) -> bool:
    # Hub names are "name" or "owner/name", plus ":config"; anything else that does not exist
    # locally is a mistyped path, which deserves "no such file" rather than a network error.
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or _file_kind(Path(source))[0] is not None
    )


def _file_documents(path: Path, text_column: str, doc_separator: str | None) -> Iterator[str]:
    kind, gzipped = _file_kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, gzipped, text_column)
        return
    try:
        # newline="" keeps "\r\n" as written, so documents round-trip byte for byte.
        with (gzip.open(path, "rt", encoding="utf-8", newline="") if gzipped
              else open(path, encoding="utf-8", newline="")) as f:
            if kind == "txt":
                text = f.read()
                yield from (text.split(doc_separator) if doc_separator else [text])
            elif kind == "jsonl":
                yield from _jsonl_documents(f, path, text_column)
            else:
                yield from _json_documents(f.read(), path, text_column)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from err


def _jsonl_documents(lines: Iterable[str], path: Path, text_column: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err}); .jsonl needs one per line") from err
        yield _record_text(record, text_column, f"{path}:{number}")


def _json_documents(text: str, path: Path, text_column: str) -> Iterator[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        # Many ".json" files are JSON Lines in disguise (that is what `datasets` writes).
        yield from _jsonl_documents(io.StringIO(text), path, text_column)
        return
    if isinstance(data, dict):  # a single record (or JSON Lines with one line)
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records or JSON Lines, found a {type(data).__name__}")
    for number, record in enumerate(data):
        yield _record_text(record, text_column, f"{path}[{number}]")


def _record_text(record: Any, text_column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found a {type(record).__name__}")
    if text_column not in record:
        raise ValueError(
            f"{where}: no column {text_column!r}; the columns are {list(record)}. "
            "Pass --text_column with the one that holds the text."
        )
    value = record[text_column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: column {text_column!r} holds {type(value).__name__}, not text. "
            "Pass --text_column with the one that holds the text."
        )
    return value


def _parquet_documents(path: Path, gzipped: bool, text_column: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading .parquet needs pyarrow: pip install 'iterative-llm[train]'") from err
    # Parquet needs random access, which a gzip stream does not give: decompress into memory.
    parquet = pq.ParquetFile(pa.BufferReader(gzip.decompress(path.read_bytes())) if gzipped else path)
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise ValueError(
            f"{path}: no column {text_column!r}; the columns are {schema.names}. "
            "Pass --text_column with the one that holds the text."
        )
    column_type = schema.field(text_column).type
    is_string_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or is_string_view(column_type)):
        raise ValueError(
            f"{path}: column {text_column!r} holds {column_type}, not text. "
            "Pass --text_column with the one that holds the text."
        )
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_column]):
        for value in batch.column(0).to_pylist():
            yield value or ""


def _parse_hub_name(source: str, split: str) -> tuple[str, str | None, str]:
    # "@" cannot occur in a hub repository name, so "NAME:CONFIG@SPLIT" is unambiguous; it lets a
    # val_source name the hub split it wants ("roneneldan/TinyStories@validation").
    source, at, split_override = source.partition("@")
    name, _, config = source.partition(":")
    return name, config or None, split_override if at else split


def _hub_documents(source: str, text_column: str, split: str) -> Iterator[str]:
    name, config, split = _parse_hub_name(source, split)
    try:
        import datasets
    except ImportError as err:
        raise ImportError("hub datasets need `datasets`: pip install 'iterative-llm[train]'") from err
    try:
        # Streaming reads records as they arrive: no full download, no Arrow cache on disk.
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as err:  # the hub raises many kinds (connection, not found, bad split, auth)
        raise RuntimeError(
            f"could not load dataset {source} from the Hugging Face hub: {err}. "
            "Check the name and your network, or pass local files (no local file or folder of "
            "that name exists either)."
        ) from err
    if first is None:
        return
    where = f"hub dataset {source} (split {split})"
    yield _record_text(first, text_column, where)
    for record in rows:
        yield _record_text(record, text_column, where)


def _describe_source(source: str, text_column: str, doc_separator: str | None) -> dict:
    """What identifies a source's content, compared on re-runs to decide whether shards can be reused.

    Local files are identified by their relative names and sizes rather than their absolute path,
    so a data folder can move (or be mounted elsewhere) without invalidating its shards.
    """
    if source == BUILTIN_PYTHON_DOCS:
        return {"kind": "builtin", "name": source, "python": sys.version.split()[0]}
    path = Path(source).expanduser()
    if path.exists():
        files = _local_files(path)
        root = path if path.is_dir() else path.parent
        listing = "".join(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n" for f in files)
        identity = {
            "kind": "files",
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16],
        }
    elif _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source}")
    else:
        name, config, split = _parse_hub_name(source, "train")
        identity = {"kind": "hub", "name": name, "config": config, "split": split}
    identity["text_column"] = text_column
    identity["doc_separator"] = doc_separator
    return identity


# ---------------------------------------------------------------------------------------------
# Tokenizer helpers
# ---------------------------------------------------------------------------------------------


def boundary_token_id(tokenizer) -> int:
    """The token stored in front of every document: BOS if the tokenizer has one, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token, so documents cannot be separated. "
        "Give it one, e.g. tokenizer.bos_token = '<|endoftext|>' (the token must be in the vocabulary)."
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the parts of the tokenizer's JSON that decide which ids a text gets.

    Post-processor, decoder, padding and truncation are left out: shards are encoded without them,
    and transformers rewrites some of them when it reloads a saved tokenizer.
    """
    state = json.loads(_backend(tokenizer).to_str())
    relevant = {key: state.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    blob = json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"expected a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
    return backend


def _plain_text_encoder(tokenizer):
    """A private copy of the Rust tokenizer that reads special-token strings as ordinary text."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(_backend(tokenizer).to_str())
    encoder.no_truncation()  # a tokenizer saved with truncation on would silently cut documents
    encoder.no_padding()
    encoder.encode_special_tokens = True
    return encoder


def _encode_batch(encoder, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips the character offsets we never use; both run on all cores.
    encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def token_byte_lengths(tokenizer) -> np.ndarray:
    """For each token id, how many UTF-8 bytes it stands for (0 for special tokens), int64.

    Summed over a text's tokens this gives the text's length in bytes, which turns a loss in nats
    per token into bits per byte, comparable across tokenizers. In a byte-level BPE every character
    of a token's string is one byte of the GPT-2 byte alphabet, so counting characters counts bytes,
    including tokens that hold only part of a multi-byte character. Other tokenizers get an
    estimate: SentencePiece "<0xNN>" pieces are one byte and "▁" is a space.
    """
    from tokenizers import pre_tokenizers

    size = len(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = _uses_component(json.loads(_backend(tokenizer).to_str()).get("decoder"), "ByteLevel")
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if token_id in added:  # added tokens match raw text, not byte-alphabet strings
            lengths[token_id] = len(piece.encode("utf-8"))
        elif byte_level and all(ch in alphabet for ch in piece):
            lengths[token_id] = len(piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def _uses_component(node: Any, type_name: str) -> bool:
    """Whether a tokenizer JSON component (possibly a Sequence of them) includes `type_name`."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_uses_component(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_uses_component(v, type_name) for v in node)
    return False


# ---------------------------------------------------------------------------------------------
# Documents -> shards
# ---------------------------------------------------------------------------------------------


def prepare_shards(
    source: str,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_column: str = "text",
    doc_separator: str | None = None,
    val_source: str | None = None,
    val_fraction: float = 0.02,
    shard_tokens: int = 50_000_000,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> "ShardedDataset":
    """Tokenise `source` into train/val shards in `out_dir` and return them opened.

    Without `val_source`, a document goes to validation iff blake2b(text) < val_fraction; with it,
    every document of `val_source` is validation and every document of `source` is training.
    `max_documents` and `max_tokens` (boundary tokens included) cap what is read from each source.
    A finished `out_dir` made with the same settings is reused; an interrupted one is resumed.
    """
    if val_source is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    out = Path(out_dir)
    boundary = boundary_token_id(tokenizer)
    vocab_size = len(tokenizer)
    dtype = _storage_dtype(vocab_size)
    settings = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "boundary_token_id": boundary,
        "dtype": dtype.name,
        "source": _describe_source(source, text_column, doc_separator),
        "val_source": None if val_source is None else _describe_source(val_source, text_column, doc_separator),
        "split_rule": "val_source" if val_source is not None else "blake2b-64(utf8(text)) < val_fraction",
        "val_fraction": None if val_source is not None else val_fraction,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
    }
    # One stream per source: (manifest key, source, the split it goes to, or None to split by hash).
    streams = [("source", source, "train" if val_source is not None else None)]
    if val_source is not None:
        streams.append(("val_source", val_source, "val"))

    manifest = _read_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        _check_same_settings(out, manifest, settings)
        if manifest["complete"]:
            dataset = ShardedDataset(out, manifest)
            _say(progress, f"reusing the finished shards in {out} ({dataset.summary()}); nothing to tokenise")
            return dataset
        done = {s: len(manifest["splits"][s]["shards"]) for s in SPLITS}
        _say(progress, f"resuming the unfinished shards in {out} (train: {done['train']}, val: {done['val']} shards done)")
    else:
        manifest = {
            "format": "iterative-llm token shards",
            "format_version": FORMAT_VERSION,
            "complete": False,
            "dtype": dtype.name,
            "byte_order": "little",
            "vocab_size": vocab_size,
            "boundary_token_id": boundary,
            "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
            "settings": settings,
            "paths": {"source": source, "val_source": val_source},  # for people; not compared
            "shard_tokens": shard_tokens,
            "versions": _versions(),
            "progress": {key: {"documents_read": 0, "tokens": 0, "done": False} for key, _, _ in streams},
            "splits": {s: {"num_tokens": 0, "num_documents": 0, "num_bytes": 0, "shards": []} for s in SPLITS},
        }
    manifest["shard_tokens"] = shard_tokens  # may differ on a resume; a shard's size is its own
    out.mkdir(parents=True, exist_ok=True)
    _remove_unlisted_files(out, manifest)

    writers = {s: _ShardWriter(out, s, dtype, manifest["splits"][s]) for s in SPLITS}

    def checkpoint() -> None:
        # Close every open shard, then record how far each source has been read: the manifest on
        # disk always describes a state in which each stream's first documents_read are all stored.
        for writer in writers.values():
            writer.commit()
        _write_json(out / MANIFEST, manifest)

    encoder = _plain_text_encoder(tokenizer)
    started = time.perf_counter()
    new_tokens = 0

    def tokenise() -> None:
        nonlocal new_tokens
        tails = manifest.get("held_out_tails", False)
        try:
            for key, stream_source, forced_split in streams:
                state = manifest["progress"][key]
                if max_tokens is not None and state["tokens"] >= max_tokens:
                    state["done"] = True
                if state["done"]:
                    continue
                documents = iter_documents(stream_source, text_column=text_column,
                                           doc_separator=doc_separator, max_documents=max_documents)
                # Resuming: the first documents_read are already in committed shards.
                documents = itertools.islice(documents, state["documents_read"], None)
                pieces = _pieces(documents, forced_split, val_fraction, tails)
                bar = _progress_bar(progress, f"tokenising {stream_source}", state["tokens"])
                for batch in _batched_texts(pieces):
                    encoded = _encode_batch(encoder, [text for text, _, _ in batch])
                    for (text, split, document_ends), ids in zip(batch, encoded):
                        document = np.empty(len(ids) + 1, dtype=np.int64)
                        document[0] = boundary
                        document[1:] = ids
                        writers[split].add(document, len(text.encode("utf-8")), vocab_size)
                        state["tokens"] += len(document)
                        new_tokens += len(document)
                        if not document_ends:
                            continue  # the held-out tail of this document follows
                        state["documents_read"] += 1
                        if max_tokens is not None and state["tokens"] >= max_tokens:
                            break
                        if writers[split].open_tokens >= shard_tokens:
                            checkpoint()
                    if bar is not None:
                        bar.update(state["tokens"] - bar.n)
                        bar.set_postfix(docs=state["documents_read"], refresh=False)
                    if max_tokens is not None and state["tokens"] >= max_tokens:
                        break
                if bar is not None:
                    bar.close()
                state["done"] = True
                checkpoint()
        finally:
            for writer in writers.values():
                writer.discard()  # an interrupted shard is dropped; the last checkpoint stands

    tokenise()
    documents = manifest["progress"]["source"]["documents_read"]
    val_tokens, all_tokens = (manifest["splits"]["val"]["num_tokens"],
                              sum(manifest["splits"][s]["num_tokens"] for s in SPLITS))
    if val_source is None and not manifest.get("held_out_tails") and (
            documents * val_fraction < 1 or val_tokens < all_tokens * val_fraction / 4):
        # A few large documents (a folder of books) cannot be split by document: validation would
        # get nothing, or a whole book. Hold out the end of every document instead.
        note = (f"{source} holds {documents} document{'s' * (documents != 1)}, too few to hold out "
                f"{val_fraction:.0%} of the text as whole documents, so the last {val_fraction:.0%} of each "
                "document (cut at a paragraph or line break) is the validation split")
        print(f"note: {note}", file=sys.stderr, flush=True)
        _remove_outputs(out, manifest)
        manifest["held_out_tails"] = note
        manifest["progress"] = {key: {"documents_read": 0, "tokens": 0, "done": False} for key, _, _ in streams}
        manifest["splits"] = {s: {"num_tokens": 0, "num_documents": 0, "num_bytes": 0, "shards": []} for s in SPLITS}
        writers = {s: _ShardWriter(out, s, dtype, manifest["splits"][s]) for s in SPLITS}
        tokenise()

    empty = [s for s in SPLITS if manifest["splits"][s]["num_documents"] == 0]
    if empty:
        total = sum(manifest["splits"][s]["num_documents"] for s in SPLITS)
        _remove_outputs(out, manifest)
        if "val" in empty:
            raise ValueError(
                f"the validation split came out empty: none of the {total} documents of {source} "
                f"hashed below --val_fraction {val_fraction}. The split is by whole document, so give "
                "it more documents: pass --val_data with held-out text, a --doc_separator that cuts "
                "the text into many documents, or more files or records."
            )
        raise ValueError(f"the train split came out empty: all {total} documents went to validation; "
                         "lower --val_fraction or add documents")
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    dataset = ShardedDataset(out, manifest)
    seconds = time.perf_counter() - started
    _say(progress, f"wrote {out}: {dataset.summary()}; "
                   f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s over {seconds:.1f} s")
    return dataset


def _storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _in_validation(text_utf8: bytes, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text_utf8, digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def _pieces(documents: Iterable[str], forced_split: str | None, val_fraction: float,
            tails: bool) -> Iterator[tuple[str, str, bool]]:
    """(text, split, whether the document ends here) for each document, or for its two parts when
    the end of every document is held out for validation (`tails`)."""
    for text in documents:
        if forced_split is not None:
            yield text, forced_split, True
        elif tails:
            head, tail = _split_tail(text, val_fraction)
            if tail.strip():
                yield head, "train", False
                yield tail, "val", True
            else:
                yield text, "train", True
        else:
            yield text, "val" if _in_validation(text.encode("utf-8"), val_fraction) else "train", True


def _split_tail(text: str, fraction: float) -> tuple[str, str]:
    """`text` cut about `fraction` of its length before the end: at a paragraph break near that
    point if there is one, else a line break, else a space, else exactly there."""
    cut = round(len(text) * (1 - fraction))
    window = max(1, round(len(text) * fraction / 2))
    for separator in ("\n\n", "\n", " "):
        before = text.rfind(separator, max(1, cut - window), cut)
        after = text.find(separator, cut, min(len(text), cut + window))
        found = [at for at in (before, after) if at > 0]
        if found:
            at = min(found, key=lambda at: abs(at - cut)) + len(separator)
            return text[:at], text[at:]
    return text[:cut], text[cut:]


def _batched_texts(pieces: Iterable[tuple]) -> Iterator[list[tuple]]:
    """Groups of (text, ...) items, for the tokenizer to encode at once."""
    batch, chars = [], 0
    for item in pieces:
        batch.append(item)
        chars += len(item[0])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends documents to one split's open shard; commit() turns it into a finished shard."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, entry: dict):
        self.out, self.split, self.dtype, self.entry = out, split, dtype, entry
        self._file = None

    @property
    def open_tokens(self) -> int:
        return self._offsets[-1] if self._file is not None else 0

    def add(self, document: np.ndarray, num_bytes: int, vocab_size: int) -> None:
        if int(document.max()) >= vocab_size:  # would wrap around silently in uint16
            raise ValueError(f"token id {int(document.max())} is outside the vocabulary of {vocab_size}")
        if self._file is None:
            self._name = f"{self.split}-{len(self.entry['shards']):05d}"
            self._tmp = self.out / f"{self._name}.bin.tmp"
            self._file = open(self._tmp, "wb")
            self._offsets, self._bytes = [0], 0
        self._file.write(document.astype(self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + len(document))
        self._bytes += num_bytes

    def commit(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        offsets = np.asarray(self._offsets, dtype=np.int64)
        offsets_tmp = self.out / f"{self._name}.offsets.npy.tmp"
        with open(offsets_tmp, "wb") as f:
            np.save(f, offsets)
        os.replace(offsets_tmp, self.out / f"{self._name}.offsets.npy")
        os.replace(self._tmp, self.out / f"{self._name}.bin")
        shard = {
            "file": f"{self._name}.bin",
            "offsets": f"{self._name}.offsets.npy",
            "num_tokens": int(offsets[-1]),
            "num_documents": len(offsets) - 1,
            "num_bytes": self._bytes,
        }
        self.entry["shards"].append(shard)
        for key in ("num_tokens", "num_documents", "num_bytes"):
            self.entry[key] += shard[key]

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


_SHARD_FILE = re.compile(r"(train|val)-\d{5}\.(bin|offsets\.npy)(\.tmp)?$")


def _remove_unlisted_files(out: Path, manifest: dict) -> None:
    """Delete shard files a crash left behind that the manifest does not list."""
    listed = {name for s in SPLITS for shard in manifest["splits"][s]["shards"]
              for name in (shard["file"], shard["offsets"])}
    for path in out.iterdir():
        if (_SHARD_FILE.match(path.name) and path.name not in listed) or path.name == MANIFEST + ".tmp":
            path.unlink()


def _remove_outputs(out: Path, manifest: dict) -> None:
    for s in SPLITS:
        for shard in manifest["splits"][s]["shards"]:
            (out / shard["file"]).unlink(missing_ok=True)
            (out / shard["offsets"]).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


class ShardSettingsError(ValueError):
    """A shard folder holds shards made from another source or with other settings."""

    def __init__(self, message: str, out: Path, manifest: dict, differences: list[str]):
        super().__init__(message)
        self.out, self.manifest, self.differences = out, manifest, differences


def _check_same_settings(out: Path, manifest: dict, settings: dict) -> None:
    old = manifest.get("settings", {})
    differences = [f"{key}: {old.get(key)!r} there, {settings[key]!r} now"
                   for key in settings if old.get(key) != settings[key]]
    if differences:
        raise ShardSettingsError(
            f"{out} already holds shards prepared with different settings ("
            + "; ".join(differences)
            + f"). Prepare them in another folder (train: --data_cache, or another --out), or delete {out} "
            "to prepare it again.",
            out, manifest, differences,
        )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {out}: prepare the shards first (prepare_shards)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        for key in ("complete", "dtype", "vocab_size", "boundary_token_id", "settings", "splits"):
            if key not in manifest:
                raise ValueError(f"no {key!r} field")
    except (ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is corrupt or not a shard manifest ({err}); "
                         f"delete {out} and prepare the shards again") from err
    return manifest


def _versions() -> dict:
    import tokenizers

    return {"python": sys.version.split()[0], "numpy": np.__version__, "tokenizers": tokenizers.__version__}


def _progress_bar(enabled: bool, description: str, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc=description, unit="tok", unit_scale=True, initial=initial, dynamic_ncols=True)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------


class TokenSplit:
    """One split of a ShardedDataset: its shards read as a single stream of tokens.

    Shards are memory-mapped on first use and checked then (offsets, ids inside the vocabulary, a
    boundary token at every document start), so opening a large dataset reads none of its tokens.
    """

    def __init__(self, root: Path, name: str, entry: dict, dtype: np.dtype, vocab_size: int, boundary: int):
        self.name, self.dtype, self.vocab_size, self.boundary_token_id = name, dtype, vocab_size, boundary
        self._root, self._shards = root, entry["shards"]
        counts = [s["num_tokens"] for s in self._shards]
        self._token_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._doc_starts = np.concatenate([[0], np.cumsum([s["num_documents"] for s in self._shards], dtype=np.int64)])
        self.num_tokens = int(self._token_starts[-1])
        self.num_documents = int(self._doc_starts[-1])
        self.num_bytes = int(entry.get("num_bytes", 0))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return (f"TokenSplit({self.name!r}, {self.num_documents:,} documents, {self.num_tokens:,} tokens, "
                f"{len(self._shards)} shards)")

    def __getstate__(self) -> dict:
        # Pickle (e.g. to a DataLoader worker) without the memory maps; they reopen on first use.
        return {**self.__dict__, "_cache": {}}

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens memmap, document offsets) of shard k, opened and validated once."""
        if k not in self._cache:
            info = self._shards[k]
            path = self._root / info["file"]
            tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(info["num_tokens"],))
            try:
                offsets = np.load(self._root / info["offsets"])
            except (OSError, ValueError) as err:
                raise ValueError(f"shard {path} is corrupt: its offsets do not load ({err}). "
                                 f"Delete {self._root} and prepare it again.") from err
            problem = self._problem(tokens, offsets, info["num_documents"])
            if problem:
                raise ValueError(f"shard {path} is corrupt: {problem}. Delete {self._root} and prepare it again.")
            self._cache[k] = (tokens, offsets)
        return self._cache[k]

    def _problem(self, tokens: np.ndarray, offsets: np.ndarray, num_documents: int) -> str | None:
        if len(offsets) != num_documents + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            return "its offsets do not match the manifest"
        if np.any(np.diff(offsets) < 1):
            return "its offsets are not increasing"
        largest = int(tokens.max())  # one pass over the shard, once
        if largest >= self.vocab_size:
            return f"it holds token id {largest}, outside the vocabulary of {self.vocab_size}"
        if np.any(tokens[offsets[:-1]] != self.boundary_token_id):
            return "a document does not start with the boundary token"
        return None

    @property
    def tokens(self):
        """All tokens: the memmap itself for one shard, else a view that slices across shards."""
        return self._shard(0)[0] if len(self._shards) == 1 else _ConcatenatedTokens(self)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, crossing shard edges as needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) are outside this split of {self.num_tokens}")
        k = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self._token_starts[k + 1]))
            base = int(self._token_starts[k])
            parts.append(self._shard(k)[0][start - base:end - base])
            start, k = end, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i, without its boundary token."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} is outside this split of {self.num_documents}")
        i %= self.num_documents
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        tokens, offsets = self._shard(k)
        j = i - int(self._doc_starts[k])
        return np.array(tokens[offsets[j] + 1:offsets[j + 1]])

    def decode_document(self, i: int, tokenizer) -> str:
        # No clean-up of "spaces before punctuation": the text must come back exactly as it went in.
        return tokenizer.decode(self.document(i).tolist(), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)


class _ConcatenatedTokens:
    """Read-only, array-like view of a multi-shard split: len(), integer and slice indexing."""

    def __init__(self, split: TokenSplit):
        self._split = split
        self.dtype = split.dtype
        self.shape = (split.num_tokens,)

    def __len__(self) -> int:
        return self._split.num_tokens

    def __getitem__(self, index):
        n = self._split.num_tokens
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step < 0:
                raise IndexError("reversed slices of a multi-shard split are not supported")
            return self._split.read(start, max(start, stop))[::step]
        index = int(index)
        if index < 0:
            index += n
        return self._split.read(index, index + 1)[0]

    def __array__(self, dtype=None, copy=None):
        array = self._split.read(0, self._split.num_tokens)
        return array if dtype is None else array.astype(dtype)


class ShardedDataset:
    """A shard folder written by prepare_shards: `split("train")`, `split("val")` and its metadata."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        if not manifest.get("complete"):
            raise ValueError(f"{self.root} holds an unfinished preparation: run prepare_shards again "
                             "with the same settings to finish it")
        self.vocab_size = int(manifest["vocab_size"])
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.boundary_token_id = int(manifest["boundary_token_id"])
        self.tokenizer_fingerprint = manifest["tokenizer_fingerprint"]
        # Cheap checks now (every file there, with the size the manifest says); content on first use.
        for name, entry in manifest["splits"].items():
            for shard in entry["shards"]:
                for key, size in (("file", shard["num_tokens"] * self.dtype.itemsize), ("offsets", None)):
                    path = self.root / shard[key]
                    if not path.is_file() or (size is not None and path.stat().st_size != size):
                        raise ValueError(f"{self.root} is corrupt: {shard[key]} is missing or has the "
                                         f"wrong size. Delete {self.root} and prepare it again.")
        self._splits = {name: TokenSplit(self.root, name, entry, self.dtype, self.vocab_size,
                                         self.boundary_token_id)
                        for name, entry in manifest["splits"].items()}

    @classmethod
    def open(cls, out_dir: str | os.PathLike) -> "ShardedDataset":
        return cls(out_dir, _read_manifest(Path(out_dir)))

    def split(self, name: str) -> TokenSplit:
        if name not in self._splits:
            raise KeyError(f"no split {name!r} in {self.root}; there are {list(self._splits)}")
        return self._splits[name]

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless `tokenizer` encodes text exactly as the one these shards were made with."""
        found = tokenizer_fingerprint(tokenizer)
        if found != self.tokenizer_fingerprint or len(tokenizer) != self.vocab_size:
            raise ValueError(f"{self.root} was tokenised with another tokenizer (fingerprint "
                             f"{self.tokenizer_fingerprint}, vocab {self.vocab_size}; this one: {found}, "
                             f"vocab {len(tokenizer)}). Prepare the data again with this tokenizer.")

    def summary(self) -> str:
        return "; ".join(f"{s.name}: {s.num_documents:,} documents, {s.num_tokens:,} tokens, "
                         f"{len(s._shards)} shards" for s in self._splits.values())

    def __repr__(self) -> str:
        return f"ShardedDataset({str(self.root)!r}: {self.summary()})"


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class RandomWindowBatches:
    """Endless training batches of random windows, the same for any number of processes.

    Step s draws the window starts of the *global* batch (world_size * batch_size rows) from a
    numpy Generator seeded with (seed, s); rank r keeps rows [r*B, (r+1)*B). So a batch depends only
    on the step, the state to resume is just the step counter, and 2 processes of B rows see
    exactly the rows that 1 process of 2B rows would.

    Each batch is {"input_ids", "labels"} of shape (B, T), labels being the next tokens, plus
    "position_ids" (B, T) restarting at 0 at every boundary token when document_positions is set.
    """

    def __init__(self, split: TokenSplit, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, document_positions: bool = False, pin_memory: bool = False):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        _check_long_enough(split, seq_len)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.document_positions = document_positions
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.step = 0

    def __iter__(self) -> "RandomWindowBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        # The last window may end at the split's last token: starts in [0, num_tokens - T - 1].
        starts = rng.integers(0, self.split.num_tokens - self.seq_len, size=self.world_size * self.batch_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([self.split.read(int(s), int(s) + self.seq_len + 1) for s in mine])
        return _make_batch(rows, self.split.boundary_token_id, self.document_positions, self.pin_memory)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"this state was saved with seed {state['seed']}, but these batches use "
                             f"seed {self.seed}: resuming would change the data order")
        self.step = int(state["step"])


def iter_eval_batches(split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int | None = None,
                      rank: int = 0, world_size: int = 1, *,
                      document_positions: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed validation batches: window w covers tokens [w*T, w*T + T] (inputs and their labels).

    The windows do not overlap in what they predict, so every token after the first is scored
    once. Window w belongs to rank w % world_size, so together the ranks cover each window exactly
    once. The window count is rounded down to a multiple of world_size so every rank runs the same
    number of batches: a wrapped (DDP/FSDP) model may synchronise inside forward, and a rank with
    one batch more would wait forever. `max_tokens` caps the predicted tokens.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    _check_long_enough(split, seq_len)
    windows = (split.num_tokens - 1) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows < world_size:
        raise ValueError(f"the {split.name} split holds {windows} windows of {seq_len} tokens, fewer than "
                         f"the {world_size} processes: use a shorter seq_len or more validation data")
    windows -= windows % world_size
    mine = range(rank, windows, world_size)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for first in range(0, len(mine), batch_size):
            rows = np.stack([split.read(w * seq_len, w * seq_len + seq_len + 1)
                             for w in mine[first:first + batch_size]])
            yield _make_batch(rows, split.boundary_token_id, document_positions, pin_memory=False)

    return batches()


def _check_long_enough(split: TokenSplit, seq_len: int) -> None:
    if split.num_tokens < seq_len + 1:
        raise ValueError(f"the {split.name} split has {split.num_tokens} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}: use a shorter seq_len or more data")


def _make_batch(rows: np.ndarray, boundary: int, document_positions: bool, pin_memory: bool) -> dict[str, torch.Tensor]:
    """(B, T+1) token windows -> input_ids, labels (and position_ids), int64 tensors of (B, T)."""
    rows = rows.astype(np.int64)
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
             "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))}
    if document_positions:
        inputs = rows[:, :-1]
        index = np.arange(inputs.shape[1], dtype=np.int64)
        # Position = distance to the latest boundary at or before it (or to the window start).
        last_boundary = np.maximum.accumulate(np.where(inputs == boundary, index, 0), axis=1)
        batch["position_ids"] = torch.from_numpy(index - last_boundary)
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------------------------
# Command line: prepare a shard folder ahead of training
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", allow_abbrev=False, description=(
        "Tokenise a text source into train/val shards (reused when already there)."))
    parser.add_argument("source", help=f"{BUILTIN_PYTHON_DOCS}, a file or folder, or a hub dataset NAME[:CONFIG][@SPLIT]")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    # The names `iterative-llm train` uses, with underscores; the dashed spellings are aliases.
    parser.add_argument("--tokenizer", required=True, help="a folder saved with save_pretrained")
    parser.add_argument("--text_column", "--text-column", default="text")
    parser.add_argument("--doc_separator", "--doc-separator", default=None)
    parser.add_argument("--val_data", "--val-data", default=None, help="a separate validation source")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=0.02)
    parser.add_argument("--shard_tokens", "--shard-tokens", type=int, default=50_000_000)
    parser.add_argument("--max_documents", "--max-documents", type=int, default=None)
    parser.add_argument("--max_tokens", "--max-tokens", type=int, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = prepare_shards(args.source, tokenizer, args.out_dir, text_column=args.text_column,
                             doc_separator=args.doc_separator, val_source=args.val_data,
                             val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                             max_documents=args.max_documents, max_tokens=args.max_tokens)
    print(dataset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
