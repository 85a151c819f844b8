"""Train a byte-level BPE tokenizer, wrap it as a transformers tokenizer, and give it a chat template.

Why these choices:
- Byte-level BPE (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.2):
  the base alphabet is the 256 byte values, so every string has an encoding and decodes back to
  itself exactly. There is no unknown token and no normalizer, so nothing is lost or rewritten.
- Before merges are learned, text is split into pieces with a regex in the style of GPT-2 and
  GPT-4 (tiktoken's cl100k_base): letters, numbers in groups of at most three, punctuation and
  whitespace never merge across piece boundaries. That keeps "dog", "dog." and " dog" from
  growing into a zoo of near-duplicate tokens, and gives digits a regular tokenization.
- The special tokens come first in the vocabulary, ids 0..5, so they are the same in every
  tokenizer the project trains whatever the corpus and vocabulary size.
- The chat template marks each assistant reply and its closing `<|end|>` with TRL's
  `{% generation %}` block, so `assistant_only_loss=True` trains the replies and teaches the
  model to end its turn, and nothing else.
- Encoding adds no special tokens: the data pipeline places `<|endoftext|>` between documents
  itself, and the chat template writes its own.

What the data pipeline needs to know of any fast tokenizer, ours or a hub one, lives here too:
the boundary token it stores before every document (`boundary_token_id`), the hash that tells
whether shards were made with it (`tokenizer_fingerprint`), the UTF-8 bytes per token id for bits
per byte (`token_byte_lengths`), and an encoder that reads special-token strings as plain text
(`plain_text_encoder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"  # document boundary; bos and eos during pretraining
PAD = "<|pad|>"  # padding only; always masked out of attention and loss
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"  # closes every chat message; the assistant learns to emit it to stop

# The order fixes the ids: the trainer puts special tokens first, in list order.
SPECIAL_TOKENS = [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]

# Fewer than this and there is not even one merge beyond the bytes and the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

# The pre-tokenization regex, one alternative per line; the first that matches at a position wins.
# Same splitting rules as GPT-4's cl100k_base (tiktoken), which refines GPT-2's: case-insensitive
# contractions, and digits grouped by at most three.
_SPLIT_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions stay one piece
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, with at most one leading space or symbol
        r"\p{N}{1,3}",  # numbers, three digits at a time
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # a run of punctuation, with the line breaks that follow it
        r"\s*[\r\n]+",  # line breaks, with the indentation before them
        r"\s+(?!\S)",  # spaces, except the last one, which goes to the next word
        r"\s+",  # any remaining whitespace
    ]
)

# One string, so it can be read, diffed, and saved as chat_template.jinja. The `-` in every tag
# trims the template's own layout; only the quoted strings reach the output. Rendering:
#   <|endoftext|><|system|>\n...<|end|>\n<|user|>\n...<|end|>\n<|assistant|>\n...<|end|>\n
CHAT_TEMPLATE = """\
{{- '<|endoftext|>' -}}
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception("Unknown chat role '" ~ message['role'] ~ "': use 'system', 'user' or 'assistant'.") -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception("Message content must be a string (role '" ~ message['role'] ~ "').") -}}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>\\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- message['content'] ~ '<|end|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- message['content'] ~ '<|end|>' -}}
    {%- endif -%}
    {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- endif -%}
"""


def _count_text(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    # Passes the texts through one at a time (the corpus is never held in memory) and counts the
    # characters, so an empty corpus can be reported after the trainer has consumed the stream.
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects strings, got an item of type {type(text).__name__}.")
        seen[0] += len(text)
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1024,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE vocabulary of at most `vocab_size` tokens from `texts`.

    `texts` may be any iterable of strings, a generator over a corpus too big for memory included:
    it is read once. Merges seen fewer than `min_frequency` times are not learned, so a small
    corpus can give fewer than `vocab_size` tokens. The tokenizer pads on the right, which is what
    training wants; set `tokenizer.padding_side = "left"` before batched generation.
    """
    if isinstance(texts, str):
        # A bare string is an iterable of characters: almost certainly not what was meant.
        raise TypeError("train_tokenizer expects an iterable of strings (e.g. a list of documents), not one string.")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: the minimum is {MIN_VOCAB_SIZE} (256 bytes, "
            f"{len(SPECIAL_TOKENS)} special tokens and at least one merge)."
        )

    bpe = Tokenizer(models.BPE(unk_token=None))  # bytes cover everything: no unknown token
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            # Maps each byte to a printable character (GPT-2's trick) so BPE works on bytes;
            # no prefix space, which would change the text, and the split above is already done.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact: the assistant mask is computed from them.
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=show_progress,
    )
    seen = [0]
    length = len(texts) if isinstance(texts, Sized) else None  # only used by the progress bar
    bpe.train_from_iterator(_count_text(texts, seen), trainer=trainer, length=length)
    if seen[0] == 0:
        raise ValueError(
            "There is no text to train the tokenizer on: the iterable given to train_tokenizer was empty "
            "or held only empty strings. Pass the training corpus, e.g. a list or generator of documents."
        )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT, END_OF_TURN],  # v5 name of additional_special_tokens
        model_max_length=model_max_length,
        padding_side="right",
        # The default clean-up deletes spaces before punctuation, which breaks the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (alone or inside a model folder)."""
    path = os.fspath(path)
    how = "Make one with iterative_llm.tokenization.train_tokenizer(...) and then tokenizer.save_pretrained(folder)."
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No tokenizer folder at {path!r}: the folder does not exist. {how}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"The folder {path!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json). {how}"
        )
    return AutoTokenizer.from_pretrained(path)


def check_tokenizer_matches_model(tokenizer: Any, config: Any) -> None:
    """Raise ValueError if the model described by `config` cannot be used with `tokenizer`.

    `config` needs `vocab_size`; `eos_token_id` and `pad_token_id` are compared only when set.
    """
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            f"the model cannot embed token ids {config.vocab_size} and above. Retrain the tokenizer with "
            f"vocab_size <= {config.vocab_size}, or build the model with vocab_size={len(tokenizer)}."
        )
    eos_id = getattr(config, "eos_token_id", None)
    # Generation configs allow a list of stop ids; the tokenizer's eos must be one of them.
    eos_ids = eos_id if isinstance(eos_id, (list, tuple)) else [eos_id]
    if eos_id is not None and tokenizer.eos_token_id not in eos_ids:
        raise ValueError(
            f"The tokenizer's eos_token_id is {tokenizer.eos_token_id} ({tokenizer.eos_token!r}) but the model "
            f"config's eos_token_id is {eos_id}. Use the tokenizer the model was trained with, or set "
            f"config.eos_token_id = tokenizer.eos_token_id."
        )
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is not None and tokenizer.pad_token_id != pad_id:
        raise ValueError(
            f"The tokenizer's pad_token_id is {tokenizer.pad_token_id} ({tokenizer.pad_token!r}) but the model "
            f"config's pad_token_id is {pad_id}. Use the tokenizer the model was trained with, or set "
            f"config.pad_token_id = tokenizer.pad_token_id."
        )


def has_chat_template(tokenizer: Any) -> bool:
    """True if `tokenizer` can render conversations with `apply_chat_template`."""
    return bool(getattr(tokenizer, "chat_template", None))


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte 0..255 is shown as one printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, ...)
    are moved to code points 256 and up, in byte order. Returns character -> byte.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (a token may hold only part of a character).

    A byte-level vocabulary stores each byte as one printable character, which is mapped back; a
    special token stands for its own text; any other vocabulary falls back to what the tokenizer decodes.
    """
    alphabet = byte_level_alphabet()
    special_ids = set(tokenizer.all_special_ids)
    decoder = str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
    byte_level = "ByteLevel" in decoder
    raws = []
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if token_id in special_ids:
            raws.append(piece.encode("utf-8"))
        elif byte_level and piece is not None and all(ch in alphabet for ch in piece):
            raws.append(bytes(alphabet[ch] for ch in piece))
        else:
            raws.append(tokenizer.decode([token_id]).encode("utf-8"))
    return raws


# ---------------------------------------------------------------------------------------------
# What the data pipeline needs to know of any fast tokenizer (ours or a hub one)
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


def plain_text_encoder(tokenizer):
    """A private copy of the Rust tokenizer that reads special-token strings as ordinary text."""
    encoder = Tokenizer.from_str(_backend(tokenizer).to_str())
    encoder.no_truncation()  # a tokenizer saved with truncation on would silently cut documents
    encoder.no_padding()
    encoder.encode_special_tokens = True
    return encoder


def token_byte_lengths(tokenizer) -> np.ndarray:
    """For each token id, how many UTF-8 bytes it stands for (0 for special tokens), int64.

    Summed over a text's tokens this gives the text's length in bytes, which turns a loss in nats
    per token into bits per byte, comparable across tokenizers. In a byte-level BPE every character
    of a token's string is one byte of the GPT-2 byte alphabet, so counting characters counts bytes,
    including tokens that hold only part of a multi-byte character. Other tokenizers get an
    estimate: SentencePiece "<0xNN>" pieces are one byte and "▁" is a space.
    """
    size = len(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    alphabet = byte_level_alphabet()
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
