"""The prepare stage: text -> tokenizer -> token shards, run once ahead of training.

    tokenizer_for(source, out)          the given tokenizer, the one already in OUT/tokenizer, or a new one
    prepare_shards(source, tok, out)    tokenise once into compact shards, split train/val by document
    iterative-llm prepare SOURCE OUT_DIR   both from the command line (also `python -m training.data.prepare`);
                                        `iterative-llm train --data SOURCE --data_cache OUT_DIR` then
                                        trains on them without preparing again

The shards are written in the format that training/data/shards.py describes and reads.

Notable choices:
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
- `max_tokens` (what a run under a time budget will train on) is how far to read, not what the data
  is: a folder prepared up to a cap is extended, from where it stopped, by a later call that asks for
  more (a resumed or longer run), and reused as it is by one that asks for less.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from iterative_llm.command_line import CommandParser, parse_command_line, shown
from iterative_llm.console import make_output_safe, progress_bar
from iterative_llm.tokenization import (
    boundary_token_id,
    load_tokenizer,
    plain_text_encoder,
    tokenizer_fingerprint,
    train_tokenizer,
)

from training.data.shards import FORMAT_VERSION, MANIFEST, SPLITS, ShardedDataset, read_manifest
from training.data.sources import BUILTIN_PYTHON_DOCS, ON_DECODE_ERROR, describe_source, iter_documents
from training.run_lock import hold
from training.versions import package_versions

# How much text goes to the tokenizer at once: enough for the Rust backend to keep every core busy,
# small enough that memory stays flat and the progress bar moves.
_BATCH_CHARS = 2_000_000
_BATCH_DOCS = 2048
# The tokenizer trained for a shard folder lives inside it, so that the folder alone (a run's data/,
# or a --data_cache shared between runs) is everything training needs.
TOKENIZER_DIR = "tokenizer"
# Characters a tokenizer is trained on: a sample is enough for BPE merges (the default of both
# `prepare` and `train`).
TOKENIZER_TRAIN_CHARS = 50_000_000


def tokenizer_for(
    source: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    vocab_size: int,
    text_column: str = "text",
    doc_separator: str | None = None,
    max_documents: int | None = None,
    train_chars: int = TOKENIZER_TRAIN_CHARS,
    on_decode_error: str = "stop",
    say=print,
):
    """The tokenizer of a shard folder: `tokenizer` (a folder) when given, else the one already trained
    for `out_dir`, else a byte-level BPE of `vocab_size` tokens trained on the first `train_chars`
    characters of `source` and saved in OUT_DIR/tokenizer."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    saved = Path(out_dir) / TOKENIZER_DIR
    if saved.is_dir():
        return load_tokenizer(saved)
    documents = iter(iter_documents(source, text_column=text_column, doc_separator=doc_separator,
                                    max_documents=max_documents, on_decode_error=on_decode_error))
    first = next(documents, None)  # a missing or empty source is named before any work is announced
    if first is None:
        raise ValueError(f"{source} holds no text to train a tokenizer on.")
    say(f"training a {vocab_size}-token byte-level BPE tokenizer on {source} ...")
    start = time.perf_counter()
    trained = train_tokenizer(_first_chars(itertools.chain([first], documents), train_chars), vocab_size=vocab_size)
    # Saved beside its place and renamed into it: a folder cut short by a kill would be loaded by the next run.
    staging = saved.with_name(f".{TOKENIZER_DIR}.tmp")  # one writer per shard folder (run_lock), so one name
    shutil.rmtree(staging, ignore_errors=True)
    trained.save_pretrained(staging)
    os.replace(staging, saved)
    say(f"tokenizer: {len(trained)} tokens in {time.perf_counter() - start:.1f} s, saved to {saved}")
    return trained


def _first_chars(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Whole documents until `max_chars` characters have gone by."""
    seen = 0
    for document in documents:
        yield document
        seen += len(document)
        if seen >= max_chars:
            return


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
    on_decode_error: str = "stop",
    progress: bool = True,
    stop: threading.Event | None = None,
    on_commit: Callable[[dict], None] | None = None,
) -> "ShardedDataset":
    """Tokenise `source` into train/val shards in `out_dir` and return them opened.

    Without `val_source`, a document goes to validation iff blake2b(text) < val_fraction; with it,
    every document of `val_source` is validation and every document of `source` is training.
    `max_documents` caps what is read from each source; `max_tokens` (boundary tokens included)
    what is read from `source`, validation included when split from it: a separate `val_source` is
    held-out text, read whole, so that runs that read different amounts are scored on the same text.
    `on_decode_error` says what a file that is not UTF-8 does (training/data/sources.py); the files that were
    decoded with U+FFFD or skipped are counted in the manifest, and said.
    A finished `out_dir` made with the same settings is reused; an interrupted one is resumed.

    For tokenising beside training (training/data/tokenise_beside.py): `stop`, once set, ends the reading
    of `source` at the next document's end as a cap would (the folder is finished, and a later call
    extends it from there); `on_commit(manifest)` is called each time shards are committed, with the
    manifest that lists them, so that training can read them while the rest is tokenised.
    """
    if val_source is None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    out = Path(out_dir)
    settings = _shard_settings(tokenizer, source, val_source, text_column, doc_separator, val_fraction, max_documents)
    # One stream per source: (manifest key, source, the split it goes to, or None to split by hash).
    streams = [("source", source, "train" if val_source is not None else None)]
    if val_source is not None:
        streams.append(("val_source", val_source, "val"))

    manifest = read_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        finished = _reused_or_resumed(out, manifest, settings, on_decode_error, max_tokens, progress, on_commit)
        if finished is not None:
            return finished
    else:
        manifest = _new_manifest(settings, on_decode_error, source, val_source, shard_tokens, streams)
    manifest["shard_tokens"] = shard_tokens  # may differ on a resume; a shard's size is its own
    out.mkdir(parents=True, exist_ok=True)
    _remove_unlisted_files(out, manifest)

    writing = _Tokenising(out, manifest, tokenizer, streams, text_column=text_column, doc_separator=doc_separator,
                          val_fraction=val_fraction, shard_tokens=shard_tokens, max_documents=max_documents,
                          max_tokens=max_tokens, on_decode_error=on_decode_error, progress=progress, stop=stop,
                          on_commit=on_commit)
    writing.run()
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
        writing.start_again()
        writing.run()
    return _finished(out, manifest, source, val_fraction, progress, on_commit, writing)


def _shard_settings(tokenizer, source, val_source, text_column, doc_separator, val_fraction, max_documents) -> dict:
    """What a shard folder was made with, compared on every later call (a folder made otherwise is refused)."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "boundary_token_id": boundary_token_id(tokenizer),
        "dtype": _storage_dtype(len(tokenizer)).name,
        "source": describe_source(source, text_column, doc_separator),
        "val_source": None if val_source is None else describe_source(val_source, text_column, doc_separator),
        "split_rule": "val_source" if val_source is not None else "blake2b-64(utf8(text)) < val_fraction",
        "val_fraction": None if val_source is not None else val_fraction,
        "max_documents": max_documents,
    }


def _reused_or_resumed(out: Path, manifest: dict, settings: dict, on_decode_error: str, max_tokens, progress: bool,
                       on_commit) -> "ShardedDataset | None":
    """A folder already there: the finished shards when they hold what is asked (reused as they are),
    else None, and the tokenising goes on from where it stopped (a resume, or an extension)."""
    _check_same_settings(out, manifest, settings)
    _check_same_decoding(out, manifest, on_decode_error)
    if manifest["complete"] and _extend_to(manifest, max_tokens):
        _say(progress, f"extending the shards in {out} (read up to {max_tokens or 'all'} tokens of the source)")
    if manifest["complete"]:
        dataset = ShardedDataset(out, manifest)
        _say(progress, f"reusing the finished shards in {out} ({dataset.summary()}); nothing to tokenise")
        _say_not_utf8(out, manifest)
        if on_commit is not None:
            on_commit(manifest)  # all there is, as committed
        return dataset
    done = {s: len(manifest["splits"][s]["shards"]) for s in SPLITS}
    _say(progress, f"resuming the unfinished shards in {out} (train: {done['train']}, val: {done['val']} shards done)")
    return None


def _new_manifest(settings: dict, on_decode_error: str, source: str, val_source: str | None, shard_tokens: int,
                  streams: list) -> dict:
    return {
        "format": "iterative-llm token shards",
        "format_version": FORMAT_VERSION,
        "complete": False,
        "dtype": settings["dtype"],
        "byte_order": "little",
        "vocab_size": settings["vocab_size"],
        "boundary_token_id": settings["boundary_token_id"],
        "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
        "settings": settings,
        "on_decode_error": on_decode_error,  # compared apart from settings: see _check_same_decoding
        "paths": {"source": source, "val_source": val_source},  # for people; not compared
        "shard_tokens": shard_tokens,
        "versions": package_versions(("numpy", "tokenizers"), git=False),
        "progress": {key: {"documents_read": 0, "tokens": 0, "done": False} for key, _, _ in streams},
        "splits": {s: {"num_tokens": 0, "num_documents": 0, "num_bytes": 0, "shards": []} for s in SPLITS},
    }


def _finished(out: Path, manifest: dict, source: str, val_fraction: float, progress: bool, on_commit,
              writing: "_Tokenising") -> "ShardedDataset":
    """The folder marked complete (or, with a split left empty, removed and named), opened."""
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
    if on_commit is not None:
        on_commit(manifest)
    _say_not_utf8(out, manifest)
    dataset = ShardedDataset(out, manifest)
    seconds = time.perf_counter() - writing.started
    _say(progress, f"wrote {out}: {dataset.summary()}; "
                   f"{writing.new_tokens / max(seconds, 1e-9):,.0f} tokens/s over {seconds:.1f} s")
    return dataset


class _Tokenising:
    """One call's tokenising of its streams into the shard folder `out`: each stream read from where the
    manifest says it stopped, documents encoded in batches and written to the shard of their split,
    shards committed (and the manifest with them) every `shard_tokens`."""

    def __init__(self, out: Path, manifest: dict, tokenizer, streams: list, *, text_column, doc_separator,
                 val_fraction, shard_tokens, max_documents, max_tokens, on_decode_error, progress, stop, on_commit):
        self.out, self.manifest, self.streams = out, manifest, streams
        self.text_column, self.doc_separator, self.val_fraction = text_column, doc_separator, val_fraction
        self.shard_tokens, self.max_documents, self.max_tokens = shard_tokens, max_documents, max_tokens
        self.on_decode_error, self.progress, self.stop, self.on_commit = on_decode_error, progress, stop, on_commit
        self.boundary, self.vocab_size = boundary_token_id(tokenizer), len(tokenizer)
        self.encoder = plain_text_encoder(tokenizer)
        self.started, self.new_tokens = time.perf_counter(), 0
        self.start_again()

    def start_again(self) -> None:
        """Writers on the manifest's splits as they now are (emptied, when the tails are held out instead)."""
        dtype = np.dtype(self.manifest["dtype"])
        self.writers = {s: _ShardWriter(self.out, s, dtype, self.manifest["splits"][s]) for s in SPLITS}

    def checkpoint(self) -> None:
        # Close every open shard, then record how far each source has been read: the manifest on
        # disk always describes a state in which each stream's first documents_read are all stored.
        for writer in self.writers.values():
            writer.commit()
        _write_json(self.out / MANIFEST, self.manifest)
        if self.on_commit is not None:
            self.on_commit(self.manifest)

    def run(self) -> None:
        try:
            for key, stream_source, forced_split in self.streams:
                self.stream(key, stream_source, forced_split)
        finally:
            for writer in self.writers.values():
                writer.discard()  # an interrupted shard is dropped; the last checkpoint stands

    def stream(self, key: str, stream_source: str, forced_split: str | None) -> None:
        """Read one source on from where it stopped, to its end, its cap or a stop."""
        state = self.manifest["progress"][key]
        cap = self.max_tokens if key == "source" else None
        if cap is not None and state["tokens"] >= cap:
            state.update(done=True, capped=True)
        if state["done"]:
            return
        not_utf8: list[dict] = []
        documents = iter_documents(stream_source, text_column=self.text_column, doc_separator=self.doc_separator,
                                   max_documents=self.max_documents, on_decode_error=self.on_decode_error,
                                   not_utf8=not_utf8)
        # Resuming: the first documents_read are already in committed shards.
        documents = itertools.islice(documents, state["documents_read"], None)
        pieces = _pieces(documents, forced_split, self.val_fraction, self.manifest.get("held_out_tails", False))
        bar = progress_bar(self.progress, f"tokenising {stream_source}", unit="tok", initial=state["tokens"],
                           unit_scale=True)
        # Under a cap, a batch holds about the text still wanted (4 characters a token), so that
        # a stream (a hub dataset) is not read far past it.
        wanted = None if cap is None else (lambda: 4 * (cap - state["tokens"]))
        for batch in _batched_texts(pieces, wanted):
            self.write_batch(batch, key, state, cap)
            if bar is not None:
                bar.update(state["tokens"] - bar.n)
                bar.set_postfix(docs=state["documents_read"], refresh=False)
            if state.get("capped"):  # at a document's end, never between its two parts
                break
        if bar is not None:
            bar.close()
        state["done"] = True
        self.record_not_utf8(state, not_utf8)
        self.checkpoint()

    def write_batch(self, batch: list[tuple], key: str, state: dict, cap: int | None) -> None:
        """Encode a batch of (text, split, whether the document ends here) and write each to its shard; a
        cap or a stop reached ends the batch at a document's end (state["capped"])."""
        encoded = _encode_batch(self.encoder, [text for text, _, _ in batch])
        for (text, split, document_ends), ids in zip(batch, encoded):
            document = np.empty(len(ids) + 1, dtype=np.int64)
            document[0] = self.boundary
            document[1:] = ids
            self.writers[split].add(document, len(text.encode("utf-8")), self.vocab_size)
            state["tokens"] += len(document)
            self.new_tokens += len(document)
            if not document_ends:
                continue  # the held-out tail of this document follows
            state["documents_read"] += 1
            if (cap is not None and state["tokens"] >= cap) or (
                    key == "source" and self.stop is not None and self.stop.is_set()):
                state["capped"] = True  # more is there: a later call may extend from here
                return
            if self.writers[split].open_tokens >= self.shard_tokens:
                self.checkpoint()

    def record_not_utf8(self, state: dict, not_utf8: list[dict]) -> None:
        # The stream is read from its start on a resume too, so `not_utf8` holds every such file
        # before the point reached; a --max_tokens cut counts only those before its last document.
        cut = state.get("capped", False) or (self.max_tokens is not None and state["tokens"] >= self.max_tokens)
        passed = [e for e in not_utf8 if not cut or e["after_documents"] < state["documents_read"]]
        if passed:
            state["not_utf8"] = {"files": len(passed), "bytes": sum(e["bytes"] for e in passed),
                                 "first_files": [e["file"] for e in passed[:5]]}


def _extend_to(manifest: dict, max_tokens: int | None) -> bool:
    """Reopen a finished manifest whose sources stopped at an earlier cap below `max_tokens` (None:
    no cap, read everything); True if there is more to read. The shards stay; tokenising resumes
    after the documents already read. Folders from before the `capped` flag recorded their cap in
    their settings."""
    old_cap = manifest["settings"].get("max_tokens")
    reopened = False
    for state in manifest["progress"].values():
        capped = state.get("capped", old_cap is not None and state["tokens"] >= old_cap)
        if capped and (max_tokens is None or state["tokens"] < max_tokens):
            state.update(done=False, capped=False)
            reopened = True
    if reopened:
        manifest["complete"] = False
    return reopened


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
            head, tail = split_tail(text, val_fraction)
            if tail.strip():
                yield head, "train", False
                yield tail, "val", True
            else:
                yield text, "train", True
        else:
            yield text, "val" if _in_validation(text.encode("utf-8"), val_fraction) else "train", True


def split_tail(text: str, fraction: float) -> tuple[str, str]:
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


def _batched_texts(pieces: Iterable[tuple], wanted_chars=None) -> Iterator[list[tuple]]:
    """Groups of (text, ...) items, for the tokenizer to encode at once; each group at most
    `wanted_chars()` characters (asked before each group) when given, and at least one item."""
    batch, chars = [], 0
    limit = _BATCH_CHARS if wanted_chars is None else max(1, min(_BATCH_CHARS, wanted_chars()))
    for item in pieces:
        batch.append(item)
        chars += len(item[0])
        if chars >= limit or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
            limit = _BATCH_CHARS if wanted_chars is None else max(1, min(_BATCH_CHARS, wanted_chars()))
    if batch:
        yield batch


def _encode_batch(encoder, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips the character offsets we never use; both run on all cores.
    encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


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


def _not_utf8_files(manifest: dict) -> int:
    return sum(state.get("not_utf8", {}).get("files", 0) for state in manifest["progress"].values())


def _check_same_decoding(out: Path, manifest: dict, on_decode_error: str) -> None:
    """Shards made with another --on_decode_error are reused only when it changed nothing: they are
    finished and every file was UTF-8. (Folders from before the option was read files as "stop".)"""
    made_with = manifest.get("on_decode_error", "stop")
    affected = _not_utf8_files(manifest)
    if made_with == on_decode_error or (manifest["complete"] and affected == 0):
        return
    found = f"{affected} file{'s' * (affected != 1)} not UTF-8" if manifest["complete"] else "unfinished"
    difference = f"on_decode_error: {made_with!r} there ({found}), {on_decode_error!r} now"
    raise ShardSettingsError(
        f"{out} holds shards prepared with --on_decode_error {made_with} ({found}). Pass --on_decode_error "
        f"{made_with} to use them, or prepare them in another folder (train: --data_cache, or another --out).",
        out, manifest, [difference],
    )


def _say_not_utf8(out: Path, manifest: dict) -> None:
    affected = [state["not_utf8"] for state in manifest["progress"].values() if "not_utf8" in state]
    if not affected:
        return
    files, size = sum(a["files"] for a in affected), sum(a["bytes"] for a in affected)
    done = "read with U+FFFD for its bad bytes" if manifest["on_decode_error"] == "replace" else "left out"
    print(f"note: {files} file{'s' * (files != 1)} not UTF-8 ({size:,} bytes), each {done} (--on_decode_error "
          f"{manifest['on_decode_error']}; the first: {affected[0]['first_files'][0]}); counted in {out / MANIFEST}",
          file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line: prepare a shard folder ahead of training
# ---------------------------------------------------------------------------------------------


@dataclass
class PrepareArguments:
    # The names `iterative-llm train` uses for the same settings.
    source: str = field(metadata={"positional": True, "metavar": "SOURCE", "help": (
        f"{BUILTIN_PYTHON_DOCS}, a file or folder, or a hub dataset NAME[:CONFIG][@SPLIT]")})
    out_dir: str = field(metadata={"positional": True, "metavar": "OUT_DIR", "help": "the shard folder to write"})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "a tokenizer folder (save_pretrained); none = OUT_DIR/tokenizer when there, else a byte-level BPE "
        "trained on SOURCE and saved there")})
    vocab_size: int | None = field(default=None, metadata={"help": (
        "tokens of a tokenizer trained here; none = the tiny preset's (gpt2-small: 50304)")})
    tokenizer_train_chars: int = field(default=TOKENIZER_TRAIN_CHARS, metadata={
        "help": "characters of SOURCE a tokenizer trained here learns from"})
    text_column: str = field(default="text", metadata={"help": "the column that holds the text (jsonl, parquet, hub)"})
    doc_separator: str | None = field(default=None, metadata={"help": "split .txt files into documents on this string"})
    val_data: str | None = field(default=None, metadata={"help": "a separate validation source"})
    val_fraction: float = field(default=0.02, metadata={
        "help": "the share of the documents held out for validation when --val_data is not given"})
    shard_tokens: int = field(default=50_000_000, metadata={"help": "tokens per shard file"})
    max_documents: int | None = field(default=None, metadata={"help": "read at most this many documents"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "read at most this many tokens of SOURCE (boundary tokens included; --val_data is read whole)"})
    on_decode_error: str = field(default="stop", metadata={"choices": ON_DECODE_ERROR, "help": (
        "a file that is not UTF-8: stop (and name it), replace (its bad bytes become U+FFFD) or skip (leave it out)")})


def build_parser() -> CommandParser:
    return CommandParser(PrepareArguments, prog="iterative-llm prepare",
                         description="Tokenise a text source into train/val shards (reused when already there).")


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    (args,) = parse_command_line(build_parser(), argv)
    from iterative_llm import IterativeLLMConfig

    try:
        with hold(args.out_dir, "Wait for it to end, or choose another OUT_DIR."):  # one writer per folder
            tokenizer = tokenizer_for(
                args.source, args.out_dir, tokenizer=args.tokenizer,
                vocab_size=args.vocab_size or IterativeLLMConfig.from_preset("tiny").vocab_size,
                text_column=args.text_column, doc_separator=args.doc_separator, max_documents=args.max_documents,
                train_chars=args.tokenizer_train_chars, on_decode_error=args.on_decode_error,
                say=lambda message: print(message, file=sys.stderr, flush=True),
            )
            dataset = prepare_shards(args.source, tokenizer, args.out_dir, text_column=args.text_column,
                                     doc_separator=args.doc_separator, val_source=args.val_data,
                                     val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                                     max_documents=args.max_documents, max_tokens=args.max_tokens,
                                     on_decode_error=args.on_decode_error)
    except (OSError, ValueError) as err:  # a missing source or tokenizer, an empty source, other settings, in use
        print(f"iterative-llm prepare: {err}", file=sys.stderr)
        return 2
    print(dataset)
    if args.max_tokens is None:  # train has no cap in tokens on its data (its --max_tokens is the budget)
        # The data settings train must repeat to find these shards its own (the manifest's settings).
        same = [f"--{name} {shown(getattr(args, name))}" for name in ("text_column", "doc_separator", "val_data",
                "val_fraction", "max_documents", "on_decode_error") if getattr(args, name) != _DEFAULTS[name]]
        command = ["iterative-llm train --data", args.source, "--data_cache", args.out_dir, *same]
        print("train on it: " + " ".join(command), file=sys.stderr)
    return 0


_DEFAULTS = {f.name: f.default for f in fields(PrepareArguments)}


if __name__ == "__main__":
    sys.exit(main())
