"""Tests for the data side: sources -> documents -> shards -> batches (training/data/sources.py,
prepare.py, shards.py and batches.py).

Every test builds its own small corpus in tmp_path; nothing needs the network.
"""

from __future__ import annotations

import gzip
import json
import pickle
import random
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from iterative_llm.tokenization import token_byte_lengths, tokenizer_fingerprint
from training.data import prepare as data# the prepare stage: its batching, its manifest name, its command line
from training.data.batches import RandomWindowBatches, iter_eval_batches
from training.data.prepare import prepare_shards
from training.data.shards import ShardedDataset
from training.data.sources import HubDatasetError, iter_documents

from tests.conftest import posix_only

# Hand-written documents that tend to break round trips, then plain generated ones so that the
# hash split has enough documents to put some in validation.
TRICKY = [
    "Hello, world!\n",
    "  leading and trailing spaces  \n\n",
    "tabs\tand\r\nwindows line endings\r\n",
    "unicode: café, naïve, Straße, 日本語, Ελληνικά, emoji 😀🎉👍🏽 and a combining e\u0301",
    "a document that mentions <|endoftext|> and <|pad|> in its text",
    "spaces before punctuation stay : a , b . c ? don 't",
    "line one\n\n\nline three   ",
]
WORDS = ("the cat dog sat on a mat and ran far away while birds sang over green hills "
         "under grey skies with seven small boats sailing to distant islands").split()


def _documents(n: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    generated = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))).capitalize() + "."
                 for _ in range(n - len(TRICKY))]
    return TRICKY + generated


DOCS = _documents()
VAL_FRACTION = 0.25


def _train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    try:
        from iterative_llm.tokenization import train_tokenizer
    except ImportError:
        pass
    else:
        return train_tokenizer(texts, vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer(DOCS * 3, 512)


@pytest.fixture(scope="module")
def other_tokenizer():
    return _train_tokenizer(DOCS * 3, 420)


def _write_txt_folder(folder, docs):
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    return folder


def _write_jsonl(path, docs, column="text", gz=False):
    lines = "".join(json.dumps({"id": i, column: doc}, ensure_ascii=False) + "\n" for i, doc in enumerate(docs))
    path.write_bytes(gzip.compress(lines.encode()) if gz else lines.encode())
    return path


def _write_parquet(path, docs, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same documents as each kind of local source."""
    root = tmp_path_factory.mktemp("sources")
    json_list = root / "docs.json"
    json_list.write_text(json.dumps([{"text": d} for d in DOCS], ensure_ascii=False), encoding="utf-8")
    json_lines = root / "lines.json"  # what `datasets` writes under a .json name
    json_lines.write_bytes(_write_jsonl(root / "lines.jsonl", DOCS).read_bytes())
    return {
        "txt folder": _write_txt_folder(root / "txt", DOCS),
        "json lines": json_lines,
        "jsonl": _write_jsonl(root / "docs.jsonl", DOCS),
        "jsonl.gz": _write_jsonl(root / "docs.jsonl.gz", DOCS, gz=True),
        "parquet": _write_parquet(root / "docs.parquet", DOCS),
        "json": json_list,
    }


@pytest.fixture(scope="module")
def prepared(sources, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare_shards(str(sources["jsonl"]), tokenizer, out, val_fraction=VAL_FRACTION,
                          shard_tokens=400, progress=False)


def _prepare(source, tokenizer, out, **kwargs):
    kwargs.setdefault("val_fraction", VAL_FRACTION)
    kwargs.setdefault("shard_tokens", 400)
    return prepare_shards(str(source), tokenizer, out, progress=False, **kwargs)


def _shard_bytes(dataset: ShardedDataset) -> dict:
    return {name: [(dataset.root / shard[key]).read_bytes()
                   for shard in dataset.manifest["splits"][name]["shards"] for key in ("file", "offsets")]
            for name in dataset.splits}


def _counts(dataset: ShardedDataset) -> dict:
    return {name: {k: v for k, v in entry.items()} for name, entry in dataset.manifest["splits"].items()}


def _decoded(split, tokenizer) -> list[str]:
    return [split.decode_document(i, tokenizer) for i in range(split.num_documents)]


# --- sources and shards ------------------------------------------------------------------------


def test_every_source_kind_gives_identical_shards(sources, tokenizer, tmp_path):
    results = {kind: _prepare(path, tokenizer, tmp_path / kind.replace(" ", "_")) for kind, path in sources.items()}
    reference = results["txt folder"]
    assert len(reference.manifest["splits"]["train"]["shards"]) > 1  # the 400-token shards roll over
    for kind, dataset in results.items():
        assert _shard_bytes(dataset) == _shard_bytes(reference), kind
        assert _counts(dataset) == _counts(reference), kind


def test_shards_decode_back_to_the_exact_documents(prepared, tokenizer):
    train, val = prepared.split("train"), prepared.split("val")
    assert train.num_documents + val.num_documents == len(DOCS)
    assert 0 < val.num_documents < len(DOCS) / 2
    train_docs, val_docs = _decoded(train, tokenizer), _decoded(val, tokenizer)
    # Each split keeps the source order, and together they hold every document exactly once.
    assert train_docs == [d for d in DOCS if d in set(train_docs)]
    assert val_docs == [d for d in DOCS if d in set(val_docs)]
    assert sorted(train_docs + val_docs) == sorted(DOCS)
    assert train.num_bytes + val.num_bytes == sum(len(d.encode()) for d in DOCS)
    # The stored stream is [boundary] + tokens per document; document(i) leaves the boundary out.
    boundary = prepared.boundary_token_id
    assert boundary == tokenizer.bos_token_id
    assert train.tokens[0] == boundary
    first = train.document(0)
    assert np.array_equal(train.read(1, 1 + len(first)), first)
    assert train.read(1 + len(first), 2 + len(first))[0] == boundary
    # A document's literal "<|endoftext|>" is text, not a boundary.
    mentions = [(split, i) for split, docs in ((train, train_docs), (val, val_docs))
                for i, d in enumerate(docs) if "<|endoftext|>" in d]
    assert len(mentions) == 1
    assert boundary not in mentions[0][0].document(mentions[0][1])
    assert prepared.dtype == np.uint16 and prepared.vocab_size == len(tokenizer)


def test_multi_shard_tokens_view_slices_across_shards(prepared):
    train = prepared.split("train")
    assert len(prepared.manifest["splits"]["train"]["shards"]) > 1
    everything = np.asarray(train.tokens)
    assert len(train.tokens) == train.num_tokens == len(everything)
    edge = prepared.manifest["splits"]["train"]["shards"][0]["num_tokens"]
    assert np.array_equal(train.tokens[edge - 3:edge + 3], everything[edge - 3:edge + 3])
    assert train.tokens[-1] == everything[-1]
    # A split travels to DataLoader workers by pickle without its memory maps.
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 10_000 and np.array_equal(copy.document(3), train.document(3))


def test_split_is_deterministic_and_independent_of_order(tokenizer, tmp_path):
    shuffled = DOCS[:]
    random.Random(1).shuffle(shuffled)
    a = _prepare(_write_jsonl(tmp_path / "a.jsonl", DOCS), tokenizer, tmp_path / "a")
    b = _prepare(_write_jsonl(tmp_path / "b.jsonl", shuffled), tokenizer, tmp_path / "b")
    again = _prepare(tmp_path / "a.jsonl", tokenizer, tmp_path / "again")
    for name in ("train", "val"):
        assert set(_decoded(a.split(name), tokenizer)) == set(_decoded(b.split(name), tokenizer))
    assert _shard_bytes(again) == _shard_bytes(a)


def test_val_source_makes_all_of_its_documents_validation(tokenizer, tmp_path):
    cut = int(len(DOCS) * 0.9)
    train_file = _write_jsonl(tmp_path / "train.jsonl", DOCS[:cut])
    val_file = _write_jsonl(tmp_path / "val.jsonl", DOCS[cut:])
    dataset = _prepare(train_file, tokenizer, tmp_path / "out", val_source=str(val_file))
    assert _decoded(dataset.split("train"), tokenizer) == DOCS[:cut]
    assert _decoded(dataset.split("val"), tokenizer) == DOCS[cut:]


def test_doc_separator_splits_a_text_file(tokenizer, tmp_path):
    separator = "\n<|endoftext|>\n"
    path = tmp_path / "stories.txt.gz"
    path.write_bytes(gzip.compress((separator.join(DOCS) + separator).encode()))
    assert list(iter_documents(str(path), doc_separator=separator)) == [d for d in DOCS if d.strip()]
    assert list(iter_documents(str(path))) == [separator.join(DOCS) + separator]
    assert list(iter_documents(str(path), doc_separator=separator, max_documents=3)) == DOCS[:3]


def test_max_documents_and_max_tokens_cap_what_is_read(sources, tokenizer, tmp_path):
    few = _prepare(sources["jsonl"], tokenizer, tmp_path / "few", max_documents=30)
    assert sum(few.split(s).num_documents for s in few.splits) == 30
    capped = _prepare(sources["jsonl"], tokenizer, tmp_path / "capped", max_tokens=1000)
    total = sum(capped.split(s).num_tokens for s in capped.splits)
    longest = max(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in DOCS)
    assert 1000 <= total < 1000 + longest  # stops after the document that reaches the cap


def test_python_docs_builtin_is_a_sizeable_english_corpus():
    documents = list(iter_documents(data.BUILTIN_PYTHON_DOCS))
    characters = sum(len(d) for d in documents)
    assert len(documents) > 300 and characters > 1_000_000, (len(documents), characters)
    words = " ".join(documents[:200]).split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code
    assert list(iter_documents(data.BUILTIN_PYTHON_DOCS, max_documents=5)) == documents[:5]


# --- re-runs -----------------------------------------------------------------------------------


def test_rerun_reuses_finished_shards_without_tokenising(sources, tokenizer, tmp_path, monkeypatch, capsys):
    first = _prepare(sources["jsonl"], tokenizer, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    calls = []
    monkeypatch.setattr(data, "_encode_batch", lambda *args: calls.append(args))
    second = prepare_shards(str(sources["jsonl"]), tokenizer, tmp_path, val_fraction=VAL_FRACTION,
                            shard_tokens=400, progress=True)
    assert calls == []
    assert "reusing" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    assert _shard_bytes(second) == _shard_bytes(first)


def test_interrupted_run_resumes_where_it_stopped(sources, tokenizer, tmp_path, monkeypatch):
    reference = _prepare(sources["jsonl"], tokenizer, tmp_path / "whole")
    monkeypatch.setattr(data, "_BATCH_DOCS", 4)  # many small batches, so the crash lands mid-way
    real_encode, encoded = data._encode_batch, []

    def crash_after_ten_batches(encoder, texts):
        if len(encoded) == 10:
            raise KeyboardInterrupt
        encoded.append(len(texts))
        return real_encode(encoder, texts)

    monkeypatch.setattr(data, "_encode_batch", crash_after_ten_batches)
    with pytest.raises(KeyboardInterrupt):
        _prepare(sources["jsonl"], tokenizer, tmp_path / "resumed")
    assert not json.loads((tmp_path / "resumed" / data.MANIFEST).read_text(encoding="utf-8"))["complete"]
    with pytest.raises(ValueError, match="unfinished"):
        ShardedDataset.open(tmp_path / "resumed")

    encoded.clear()
    monkeypatch.setattr(data, "_encode_batch", lambda encoder, texts: encoded.append(len(texts)) or
                        real_encode(encoder, texts))
    resumed = _prepare(sources["jsonl"], tokenizer, tmp_path / "resumed")
    assert 0 < sum(encoded) < len(DOCS)  # only what the checkpoint did not hold was tokenised again
    assert _shard_bytes(resumed) == _shard_bytes(reference)
    assert _counts(resumed) == _counts(reference)


def test_other_tokenizer_or_settings_in_the_same_out_dir_raise(sources, tokenizer, other_tokenizer, tmp_path):
    _prepare(sources["jsonl"], tokenizer, tmp_path)
    with pytest.raises(ValueError, match="different settings.*tokenizer_fingerprint.*another folder.*--data_cache.*--out.*or delete"):
        _prepare(sources["jsonl"], other_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        _prepare(sources["jsonl"], tokenizer, tmp_path, val_fraction=0.5)
    with pytest.raises(ValueError, match="another tokenizer"):
        ShardedDataset.open(tmp_path).check_tokenizer(other_tokenizer)


def test_tokenizer_fingerprint_survives_save_and_reload(prepared, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    prepared.check_tokenizer(reloaded)


def test_any_fast_tokenizer_works_and_large_vocabularies_use_uint32(tmp_path):
    # A word-level tokenizer with only an EOS token and more ids than uint16 holds.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(20)) for i in range(40)]
    dataset = _prepare(_write_jsonl(tmp_path / "words.jsonl", docs), tok, tmp_path / "out", val_fraction=0.3)
    assert dataset.dtype == np.uint32 and dataset.boundary_token_id == 0
    stored = {" ".join(f"w{t - 2}" for t in split.document(i))
              for split in map(dataset.split, dataset.splits) for i in range(split.num_documents)}
    assert stored == set(docs)


# --- batches -----------------------------------------------------------------------------------


def _is_window_of(rows: np.ndarray, stream: np.ndarray) -> bool:
    windows = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(stream, rows.shape[1])}
    return all(tuple(r) in windows for r in rows)


def test_random_windows_are_next_token_pairs_from_the_split(prepared):
    train = prepared.split("train")
    batch = next(RandomWindowBatches(train, 4, 16, seed=3))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    assert _is_window_of(rows, np.asarray(train.tokens).astype(np.int64))


def test_random_windows_are_deterministic_and_resume_from_the_step(prepared):
    train = prepared.split("train")
    a, b = RandomWindowBatches(train, 4, 16, seed=7), RandomWindowBatches(train, 4, 16, seed=7)
    first = [next(a) for _ in range(5)]
    assert all(torch.equal(x["input_ids"], next(b)["input_ids"]) for x in first)
    assert not torch.equal(next(RandomWindowBatches(train, 4, 16, seed=8))["input_ids"], first[0]["input_ids"])

    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(3)]
    resumed = RandomWindowBatches(train, 4, 16, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, next(resumed)["input_ids"]) for e in expected)
    with pytest.raises(ValueError, match="seed"):
        RandomWindowBatches(train, 4, 16, seed=9).load_state_dict(state)


def test_ranks_split_the_same_global_batch(prepared):
    train = prepared.split("train")
    single = RandomWindowBatches(train, 6, 16, seed=1, world_size=1)
    ranks = [RandomWindowBatches(train, 3, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = next(single)
        parts = [next(r) for r in ranks]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])


def test_position_ids_restart_at_every_boundary(prepared):
    train = prepared.split("train")
    batch = next(RandomWindowBatches(train, 8, 64, seed=0, document_positions=True))
    inputs, positions = batch["input_ids"], batch["position_ids"]
    assert positions.shape == inputs.shape and positions.dtype == torch.long
    is_boundary = inputs == prepared.boundary_token_id
    assert is_boundary.any()  # 64-token windows over short documents must cross some
    assert (positions[is_boundary] == 0).all()
    assert (positions[:, 0] == 0).all()
    steps = positions[:, 1:] - positions[:, :-1]
    assert torch.equal(steps == 1, ~is_boundary[:, 1:])


def test_eval_windows_cover_each_window_once_across_ranks(prepared):
    val = prepared.split("val")
    seq_len, windows = 8, (val.num_tokens - 1) // 8
    single = torch.cat([b["input_ids"] for b in iter_eval_batches(val, 3, seq_len)])
    assert len(single) == windows
    stream = np.asarray(val.tokens).astype(np.int64)
    assert np.array_equal(single.flatten().numpy(), stream[:windows * seq_len])  # in order, no overlap
    # Three ranks split the windows round robin, each running the same number of batches.
    per_rank = [[b["input_ids"] for b in iter_eval_batches(val, 2, seq_len, rank=r, world_size=3)] for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    shared = windows - windows % 3
    for r, batches in enumerate(per_rank):
        assert torch.equal(torch.cat(batches), single[r:shared:3])
    capped = list(iter_eval_batches(val, 100, seq_len, max_tokens=3 * seq_len))
    assert capped[0]["input_ids"].shape == (3, seq_len)


def test_token_byte_lengths_add_up_to_utf8_bytes(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (len(tokenizer),)
    assert lengths[tokenizer.bos_token_id] == 0
    text = "Zoë’s 🦄 ate 寿司 — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧 at 3 a.m.\n\ttabs too"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


# --- bad inputs --------------------------------------------------------------------------------


def test_missing_path_names_it(tokenizer, tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="corpus.txt"):
        list(iter_documents(str(missing)))
    with pytest.raises(FileNotFoundError, match="corpus.txt"):
        prepare_shards(str(missing), tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_sources_are_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n\n{"text": null}\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "README").write_text("not a data file", encoding="utf-8")
    for name in ("empty.txt", "blank.jsonl", "folder"):
        with pytest.raises(ValueError, match="no documents in"):
            list(iter_documents(str(tmp_path / name)))
    (tmp_path / "notes.md").write_text("# hi", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "notes.md")))


def test_missing_text_column_lists_the_columns(tmp_path):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", DOCS[:3], column="content")
    parquet = _write_parquet(tmp_path / "d.parquet", DOCS[:3], column="content")
    for path in (jsonl, parquet):
        with pytest.raises(ValueError, match=r"no column 'text'.*'id', 'content'.*--text_column"):
            list(iter_documents(str(path)))
        assert list(iter_documents(str(path), text_column="content")) == DOCS[:3]


def test_unreachable_hub_dataset_gives_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The library reads these at import, so the environment alone is too late in this process.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    started = time.monotonic()
    with pytest.raises(HubDatasetError, match=r"could not load dataset nobody/no-such-corpus:en from the "
                                           r"Hugging Face hub: .*network, or pass local files"):
        list(iter_documents("nobody/no-such-corpus:en"))
    assert time.monotonic() - started < 20


def test_too_short_split_is_rejected(prepared):
    val = prepared.split("val")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomWindowBatches(val, 2, val.num_tokens)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        iter_eval_batches(val, 2, val.num_tokens)


def test_a_few_books_hold_out_the_end_of_each(tokenizer, tmp_path, capsys):
    """A folder of three long .txt files: too few documents to split by document, so the end of
    each (at a paragraph break) is validation, and the rest of it training. Nothing is lost or doubled."""
    books = tmp_path / "books"
    books.mkdir()
    texts = {}
    for b in range(3):
        paragraphs = [f"Book {b}, chapter {i}. " + " ".join(DOCS[(b * 7 + i) % len(DOCS)].split()[:30])
                      for i in range(60)]
        texts[b] = "\n\n".join(paragraphs) + "\n"
        (books / f"book{b}.txt").write_text(texts[b], encoding="utf-8")
    dataset = _prepare(books, tokenizer, tmp_path / "out", val_fraction=0.02)
    assert "the last 2% of each document" in capsys.readouterr().err
    train, val = dataset.split("train"), dataset.split("val")
    assert train.num_documents == val.num_documents == 3
    for b in range(3):
        head, tail = train.decode_document(b, tokenizer), val.decode_document(b, tokenizer)
        assert head + tail == texts[b] and head.endswith("\n\n") and tail.startswith(f"Book {b}, chapter")
        assert 0.005 < len(tail) / len(texts[b]) < 0.05
    # The same settings reuse the shards (the fallback is not a different setting).
    again = _prepare(books, tokenizer, tmp_path / "out", val_fraction=0.02)
    assert _shard_bytes(again) == _shard_bytes(dataset)


def test_a_document_too_short_to_split_is_named(tokenizer, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("Hello.", encoding="utf-8")
    with pytest.raises(ValueError, match="validation split came out empty.*--val_data.*--doc_separator"):
        _prepare(path, tokenizer, tmp_path / "out", val_fraction=0.02)
    assert not (tmp_path / "out" / data.MANIFEST).exists()  # nothing half-made is left to trip over


def test_missing_or_corrupt_manifest_and_shards(prepared, sources, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardedDataset.open(tmp_path)
    (tmp_path / data.MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        ShardedDataset.open(tmp_path)
    with pytest.raises(ValueError, match="corrupt"):
        _prepare(sources["jsonl"], tokenizer, tmp_path)

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in prepared.root.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / prepared.manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="corrupt.*wrong size"):
        ShardedDataset.open(copy)
    tokens = np.frombuffer(shard.read_bytes(), dtype=np.uint16).copy()
    tokens[0] = 1  # the first document no longer starts with the boundary token
    shard.write_bytes(tokens.tobytes() + b"\0\0")
    with pytest.raises(ValueError, match="corrupt.*boundary"):
        ShardedDataset.open(copy).split("train").document(0)


def test_tokenizer_without_bos_or_eos_is_rejected(sources, tokenizer, tmp_path):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        _prepare(sources["jsonl"], bare, tmp_path)


def test_command_line_prepares_a_folder(sources, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    args = [str(sources["parquet"]), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"),
            "--val-fraction", str(VAL_FRACTION), "--shard-tokens", "400"]
    assert data.main(args) == 0
    assert ShardedDataset.open(tmp_path / "out").split("val").num_documents > 0


# ---------------------------------------------------------------- kill -9 at every write of `prepare`


def _prepare_killed_at(event: int, argv: list[str]) -> bool:
    """`iterative-llm prepare ARGV` in a forked child that kills itself (SIGKILL: no clean-up runs) just
    before its `event`-th write: a file opened for writing, a rename or a removal. True if it was killed,
    False if it finished with fewer writes. A fork starts at once, with everything already imported."""
    import builtins
    import contextlib
    import io
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        try:
            count = [0]
            real_open, real_replace, real_unlink = builtins.open, os.replace, os.unlink

            def tick():
                count[0] += 1
                if count[0] == event:
                    os.kill(os.getpid(), signal.SIGKILL)

            def writing_open(file, mode="r", *args, **kwargs):
                if any(flag in mode for flag in "wax+"):
                    tick()
                return real_open(file, mode, *args, **kwargs)

            def replace(*args, **kwargs):
                tick()
                return real_replace(*args, **kwargs)

            def unlink(*args, **kwargs):
                tick()
                return real_unlink(*args, **kwargs)

            builtins.open = io.open = writing_open
            os.replace, os.unlink = replace, unlink
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                data.main(argv)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _folder_bytes(folder) -> dict:
    """Every file of a shard folder (the tokenizer's, hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@posix_only
@pytest.mark.parametrize("kind", ["documents", "books"])
def test_prepare_killed_at_any_write_then_rerun_makes_the_same_folder(kind, tmp_path, capsys):
    """kill -9 before each write of `iterative-llm prepare` in turn (the tokenizer, every shard, every
    manifest), then the same command again: the folder is byte for byte the uninterrupted one's.
    "documents": many, split by document into several shards; "books": three, too few to split by
    document, so a first pass is thrown away for the held-out-tails pass (both are killed)."""
    source = tmp_path / "source"
    source.mkdir()
    if kind == "documents":
        for i, doc in enumerate(DOCS):
            (source / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    else:
        for b in range(3):
            (source / f"book{b}.txt").write_text("\n\n".join(f"Book {b}, chapter {i}. " + DOCS[(b * 7 + i) % len(DOCS)]
                                                             for i in range(20)) + "\n", encoding="utf-8")
    argv = lambda out: [str(source), str(out), "--vocab_size", "300", "--shard_tokens", "2000",  # noqa: E731
                        "--val_fraction", str(VAL_FRACTION)]
    assert data.main(argv(tmp_path / "straight")) == 0
    straight = _folder_bytes(tmp_path / "straight")
    shards = len([name for name in straight if name.endswith(".bin")])
    event = 0
    while True:
        event += 1
        out = tmp_path / f"killed{event}"
        if not _prepare_killed_at(event, argv(out)):
            break
        assert data.main(argv(out)) == 0, capsys.readouterr().err
        assert _folder_bytes(out) == straight, f"killed before write {event}"
    assert event > 4 * shards  # each shard alone is written in four steps, and each was a kill point


# ---------------------------------------------------------------- files that are not UTF-8


@pytest.fixture
def latin1_folder(tmp_path):
    """Twenty UTF-8 documents and one Latin-1 file (as old text files often are)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(DOCS[:20]):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (folder / "old.txt").write_bytes("Café crème, naïve façade, déjà vu. ".encode("latin-1") * 20)
    return folder


def test_a_file_that_is_not_utf8_stops_prepare_by_default_naming_it_and_the_option(latin1_folder, tmp_path, capsys):
    assert data.main([str(latin1_folder), str(tmp_path / "out"), "--vocab_size", "300"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{latin1_folder / 'old.txt'} is not UTF-8 text" in error and "--on_decode_error replace" in error


@pytest.mark.parametrize("choice", ["replace", "skip"])
def test_files_that_are_not_utf8_are_replaced_or_skipped_counted_and_said(choice, latin1_folder, tmp_path, capsys):
    out = tmp_path / choice
    size = (latin1_folder / "old.txt").stat().st_size
    args = [str(latin1_folder), str(out), "--vocab_size", "300", "--val_fraction", "0.2"]
    assert data.main([*args, "--on_decode_error", choice]) == 0
    error = capsys.readouterr().err
    assert f"note: 1 file not UTF-8 ({size:,} bytes), each " in error and str(latin1_folder / "old.txt") in error
    assert error.splitlines()[-1].startswith("train on it: ") and error.endswith(f"--on_decode_error {choice}\n")
    manifest = json.loads((out / data.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["on_decode_error"] == choice
    assert manifest["progress"]["source"]["not_utf8"] == {"files": 1, "bytes": size,
                                                          "first_files": [str(latin1_folder / "old.txt")]}
    dataset = ShardedDataset.open(out)
    tokenizer = AutoTokenizer.from_pretrained(out / data.TOKENIZER_DIR)
    texts = [split.decode_document(i, tokenizer) for split in (dataset.split("train"), dataset.split("val"))
             for i in range(split.num_documents)]
    assert len(texts) == (21 if choice == "replace" else 20)
    assert any(text.startswith("Caf\ufffd cr\ufffdme") for text in texts) == (choice == "replace")

    # Reuse: the same choice reuses the shards; another choice would change them, and is refused.
    assert data.main([*args, "--on_decode_error", choice]) == 0
    assert "reusing the finished shards" in capsys.readouterr().err
    other = "skip" if choice == "replace" else "replace"
    assert data.main([*args, "--on_decode_error", other]) == 2
    assert f"prepared with --on_decode_error {choice} (1 file not UTF-8). Pass --on_decode_error {choice}" in (
        capsys.readouterr().err)


def test_the_decode_choice_changes_nothing_for_utf8_text_so_its_shards_are_reused(sources, tokenizer, tmp_path):
    first = _prepare(sources["jsonl.gz"], tokenizer, tmp_path)
    again = prepare_shards(str(sources["jsonl.gz"]), tokenizer, tmp_path, val_fraction=VAL_FRACTION,
                           on_decode_error="skip", progress=False)
    assert _shard_bytes(again) == _shard_bytes(first)
    manifest = json.loads((tmp_path / data.MANIFEST).read_text(encoding="utf-8"))
    assert "not_utf8" not in manifest["progress"]["source"]


def test_train_takes_the_decode_choice_and_refuses_an_unknown_one(latin1_folder, tmp_path, capsys):
    import yaml

    from training.pretrain.config import parse_args
    from training.pretrain.trainer import main

    from tests.pretrain.test_pretrain import settings

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings(latin1_folder, tmp_path / "run", max_steps=1, eval_every=0)), encoding="utf-8")
    assert main(["--config", str(config)]) == 1
    assert f"{latin1_folder / 'old.txt'} is not UTF-8 text" in capsys.readouterr().err
    assert main(["--config", str(config), "--on_decode_error", "skip"]) == 0
    manifest = json.loads((tmp_path / "run" / "data" / data.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["progress"]["source"]["not_utf8"]["files"] == 1
    with pytest.raises(ValueError, match="`on_decode_error` must be one of 'stop', 'replace', 'skip', got 'ignore'"):
        parse_args(["--on_decode_error", "ignore"])
