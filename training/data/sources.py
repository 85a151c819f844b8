"""Sources -> documents: the text a model is trained on, as a stream of strings.

    iter_documents(source)              text documents from a built-in corpus, local files or the HF hub
    describe_source(source, ...)        what identifies a source's content (prepare compares it on re-runs)

A source is "builtin:python-docs" (the documentation shipped with this Python), a local .txt /
.jsonl / .json / .parquet file (each optionally gzipped) or a folder of them, or a Hugging Face hub
dataset. The order of the documents is deterministic, so the same source gives the same stream on
any machine.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
# What a local file that is not UTF-8 does: stop the run naming it (the default: a wrong encoding is
# usually a mistake worth seeing), be read with U+FFFD for its undecodable bytes, or be left out.
ON_DECODE_ERROR = ("stop", "replace", "skip")

# File kinds we read, keyed by suffix (after an optional ".gz").
_FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that are not documentation: test suites, the IDLE app, and
# whatever third-party packages were installed beside it.
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def iter_documents(
    source: str,
    *,
    text_column: str = "text",
    split: str = "train",
    doc_separator: str | None = None,
    max_documents: int | None = None,
    on_decode_error: str = "stop",
    not_utf8: list[dict] | None = None,
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

    A local file that is not UTF-8 stops the stream with an error naming it, unless `on_decode_error`
    (one of ON_DECODE_ERROR) is "replace" or "skip"; each such file is then appended to `not_utf8` as
    {"file", "bytes" (its size), "after_documents" (how many documents came before it)}.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"--max_documents must be at least 1, got {max_documents}")
    if on_decode_error not in ON_DECODE_ERROR:
        raise ValueError(f"--on_decode_error must be one of {', '.join(ON_DECODE_ERROR)}, got {on_decode_error!r}")
    found = [] if not_utf8 is None else not_utf8
    count = 0
    for text in _raw_documents(source, text_column, split, doc_separator, on_decode_error, found):
        for entry in found:
            entry.setdefault("after_documents", count)
        if not text.strip():
            continue
        yield text
        count += 1
        if max_documents is not None and count >= max_documents:
            return
    for entry in found:
        entry.setdefault("after_documents", count)
    if count == 0:
        raise ValueError(f"no documents in {source}: every file or record in it is empty")


def _raw_documents(source: str, text_column: str, split: str, doc_separator: str | None, on_decode_error: str,
                   not_utf8: list[dict]) -> Iterator[str]:
    if source == BUILTIN_PYTHON_DOCS:
        yield from _python_docs()
        return
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in corpus {source!r}; the only one is {BUILTIN_PYTHON_DOCS!r}")
    path = Path(source).expanduser()
    if path.exists():
        for file in _local_files(path):
            yield from _file_documents(file, text_column, doc_separator, on_decode_error, not_utf8)
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


# A Windows path, whatever this system is: a drive ("C:\\", "C:/") or a UNC share ("\\\\server").
_WINDOWS_PATH = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


def _looks_like_path(source: str) -> bool:
    # Hub names are "name" or "owner/name", plus ":config"; anything else that does not exist
    # locally is a mistyped path, which deserves "no such file" rather than a network error. A
    # backslash or a drive letter never occurs in a hub name ("C:/books" would otherwise read as
    # dataset "C", config "/books").
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or _WINDOWS_PATH.match(source) is not None
        or _file_kind(Path(source))[0] is not None
    )


def _file_documents(path: Path, text_column: str, doc_separator: str | None, on_decode_error: str = "stop",
                    not_utf8: list[dict] | None = None) -> Iterator[str]:
    kind, gzipped = _file_kind(path)
    if kind == "parquet":  # Arrow strings are UTF-8 already
        yield from _parquet_documents(path, gzipped, text_column)
        return
    errors = "strict"
    # The whole file is checked before any of it is read: a .jsonl could otherwise give documents
    # before its first bad byte, and a skipped file must give none.
    if on_decode_error != "stop" and not _is_utf8(path, gzipped):
        if not_utf8 is not None:
            not_utf8.append({"file": str(path), "bytes": path.stat().st_size})
        if on_decode_error == "skip":
            return
        errors = "replace"
    try:
        # newline="" keeps "\r\n" as written, so documents round-trip byte for byte.
        with (gzip.open(path, "rt", encoding="utf-8", errors=errors, newline="") if gzipped
              else open(path, encoding="utf-8", errors=errors, newline="")) as f:
            if kind == "txt":
                text = f.read()
                yield from (text.split(doc_separator) if doc_separator else [text])
            elif kind == "jsonl":
                yield from _jsonl_documents(f, path, text_column)
            else:
                yield from _json_documents(f.read(), path, text_column)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}). To read such files, pass --on_decode_error replace "
                         "(their undecodable bytes become U+FFFD) or skip (they are left out).") from err


def _is_utf8(path: Path, gzipped: bool) -> bool:
    """Whether the whole file decodes as UTF-8, read in pieces (a file may be larger than memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        try:
            while piece := f.read(1 << 22):
                decoder.decode(piece)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def jsonl_records(lines: Iterable[str], path: Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a JSON Lines file; `error` (a ValueError)
    naming the file and line where one is not JSON. Every JSONL reader of the package reads this way."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path} line {number}: not JSON ({err.msg}). Give one JSON object per line.") from None


def _jsonl_documents(lines: Iterable[str], path: Path, text_column: str) -> Iterator[str]:
    for number, record in jsonl_records(lines, path):
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


class HubDatasetError(ValueError):
    """A hub dataset that cannot be read (offline, a wrong name or split, no access): bad input, said in one line."""


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
    from huggingface_hub.utils import logging as hub_logging

    hub_verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retries print a warning per request: the error below says it once
    try:
        # Streaming reads records as they arrive: no full download, no Arrow cache on disk.
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as err:  # the hub raises many kinds (connection, not found, bad split, auth)
        raise HubDatasetError(
            f"could not load dataset {source} from the Hugging Face hub: {err}. "
            "Check the name and your network, or pass local files (no local file or folder of "
            "that name exists either)."
        ) from None  # the hub's own traceback says nothing the message does not
    finally:
        hub_logging.set_verbosity(hub_verbosity)
    if first is None:
        return
    where = f"hub dataset {source} (split {split})"
    yield _record_text(first, text_column, where)
    for record in rows:
        yield _record_text(record, text_column, where)


def describe_source(source: str, text_column: str, doc_separator: str | None) -> dict:
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
