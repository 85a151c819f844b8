"""Reading token shards: the folder that `prepare` writes, opened as train/val streams of tokens.

    ShardedDataset.open(out)            read them back (memory-mapped)
    dataset.split("train")              a TokenSplit: one stream of tokens across its shards

Every document is stored as `[boundary] + tokens`, the boundary being the tokenizer's BOS (or EOS)
token, GPT-2's `<|endoftext|>`.

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

import json
import os
from pathlib import Path

import numpy as np

from iterative_llm.tokenization import tokenizer_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def read_manifest(out: Path) -> dict:
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

    def __init__(self, root: str | os.PathLike, manifest: dict, *, committed_only: bool = False):
        """`committed_only`: the shards a manifest lists while their preparation still goes on (each
        listed shard is written whole before it is listed); otherwise the folder must be finished."""
        self.root = Path(root)
        self.manifest = manifest
        if not manifest.get("complete") and not committed_only:
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
        return cls(out_dir, read_manifest(Path(out_dir)))

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
