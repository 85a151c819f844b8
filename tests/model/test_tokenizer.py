"""The tokenizer contracts the rest of the project relies on: fixed special-token ids, a vocabulary
no larger than asked for, an exact round trip for any text, a save/load that changes nothing, and a
chat template whose assistant mask covers exactly the replies and their `<|end|>`."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from iterative_llm.tokenization import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END_OF_TURN,
    ENDOFTEXT,
    MIN_VOCAB_SIZE,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    byte_level_alphabet,
    check_tokenizer_matches_model,
    has_chat_template,
    load_tokenizer,
    token_bytes,
    train_tokenizer,
)

VOCAB_SIZE = 512

SUBJECTS = "the cat|a dog|my sister|our teacher|the old farmer|a small robot|the river|every student|she".split("|")
VERBS = "walks|jumps|reads|sings|builds|watches|finds|carries|paints|remembers|follows|opens".split("|")
OBJECTS = "a red box|the long road|three green apples|an empty house|the morning paper|a quiet song".split("|")
PLACES = "near the bridge|in the garden|after dinner|before sunrise|under the table|at the station".split("|")
EXTRAS = ["", "", " It's late.", " Don't wait!", " Why not?", " (see page {n})", ' "Really," {name} said.']
SYLLABLES = "ka|lo|mi|ren|ta|vi|sor|el|dun|bra|qui|zet".split("|")  # made-up names add rarer merges

# Text the tokenizer never saw: scripts, emoji sequences, combining marks and odd whitespace.
TRICKY = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "tab\tseparated\tcolumns",
    "windows line\r\nbreaks\r\n",
    "\n\nblank lines\n\n\n",
    "family emoji 👩‍👩‍👧 and flags 🇫🇷",
    "日本語のテキストと中文",
    "combining: e\u0301 vs \u00e9, a\u0308\u0301",
    "zero\u200bwidth and nbsp\u00a0here",
    "Ünïcödé with ASCII {braces} <tags> & 1234567890",
    "def f(x):\n    return x ** 2  # indented code\n",
    "<|notatoken|> <| end |>",
]


def synthetic_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """English-like sentences from a tiny grammar: varied enough to learn a few hundred merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        extra = rng.choice(EXTRAS).format(n=rng.randint(1, 999), name=name)
        sentence = sentence[0].upper() + sentence[1:] + "." + extra
        lines.append(sentence + rng.choice(["", "\n", "\n\n"]))
    return lines


CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Where is the cat?"},
    {"role": "assistant", "content": "Near the bridge."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "In the garden, 42 m away!"},
]

EXPECTED_RENDERING = (
    "<|endoftext|>"
    "<|system|>\nYou are brief.<|end|>\n"
    "<|user|>\nWhere is the cat?<|end|>\n"
    "<|assistant|>\nNear the bridge.<|end|>\n"
    "<|user|>\nAnd the dog?<|end|>\n"
    "<|assistant|>\nIn the garden, 42 m away!<|end|>\n"
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, VOCAB_SIZE)


# --- training ---------------------------------------------------------------------------------


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4, 5]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ENDOFTEXT, ENDOFTEXT, PAD)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert tok.extra_special_tokens == [SYSTEM, USER, ASSISTANT, END_OF_TURN]
    # A special token inside text is one token, not split into bytes.
    assert tok.encode(f"hi{END_OF_TURN}", add_special_tokens=False)[-1] == 5


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, VOCAB_SIZE])
def test_vocab_size_is_respected(corpus, vocab_size):
    tok = train_tokenizer(corpus, vocab_size)
    assert len(tok) <= vocab_size
    # 400 lines are enough text to fill the vocabulary, or nearly.
    assert len(tok) >= vocab_size - 8


def test_merges_make_text_shorter_than_bytes(tok, corpus):
    text = "".join(corpus[:50])
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2


def test_streams_from_a_generator(corpus, tok):
    # A generator is read once, like a corpus streamed from disk, and gives the same tokenizer.
    streamed = train_tokenizer((line for line in corpus), VOCAB_SIZE)
    assert streamed.get_vocab() == tok.get_vocab()


def test_settings_for_training(tok):
    assert tok.padding_side == "right"
    assert tok.model_max_length == 1024
    assert train_tokenizer(["some text some text"], 300, model_max_length=64).model_max_length == 64
    # Encoding adds nothing: the data pipeline and the chat template place <|endoftext|> themselves.
    assert ENDOFTEXT not in tok.decode(tok("The cat walks.")["input_ids"])
    batch = tok(["The cat", "The cat walks near the bridge."], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


# --- exact round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY + synthetic_corpus(5, seed=1), ids=repr)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # Plain text never turns into special tokens, even when it looks like one.
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)


def test_round_trip_of_whole_corpus(tok, corpus):
    text = "".join(corpus)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_byte_alphabet_is_the_one_the_tokenizer_uses():
    alphabet = byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))


@pytest.mark.parametrize("text", TRICKY, ids=repr)
def test_token_bytes_add_up_to_the_texts_bytes(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(token_bytes(tok, ids)) == text.encode("utf-8")
    # A special token stands for its own text.
    assert token_bytes(tok, [tok.convert_tokens_to_ids(END_OF_TURN)]) == [END_OF_TURN.encode("utf-8")]


# --- save and reload --------------------------------------------------------------------------


def test_save_and_reload_change_nothing(tok, corpus, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE

    for reloaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert reloaded.get_vocab() == tok.get_vocab()
        for text in TRICKY + corpus[:20]:
            ids = tok.encode(text, add_special_tokens=False)
            assert reloaded.encode(text, add_special_tokens=False) == ids
            assert reloaded.decode(ids) == text
        assert reloaded.chat_template == CHAT_TEMPLATE
        assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDERING
        assert reloaded.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4, 5]
        assert (reloaded.eos_token, reloaded.pad_token, reloaded.padding_side) == (ENDOFTEXT, PAD, "right")
        assert reloaded.model_max_length == tok.model_max_length


FRESH_PROCESS = """
import json, sys
sys.modules["iterative_llm"] = None  # the package is never imported here
from transformers import AutoTokenizer
texts, results = json.loads(sys.argv[2]), []
for folder in json.loads(sys.argv[1]):
    tok = AutoTokenizer.from_pretrained(folder)  # no trust_remote_code, as with GPT-2's folder
    results.append({"class": type(tok).__name__, "ids": [tok.encode(t, add_special_tokens=False) for t in texts],
                    "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in texts],
                    "chat": tok.apply_chat_template(json.loads(sys.argv[3]), tokenize=False),
                    "special": tok.convert_tokens_to_ids(json.loads(sys.argv[4]))})
print()  # a prompt, if any, ends without a newline
print(json.dumps(results))
"""


def _load_in_a_fresh_process(*folders) -> tuple[list[dict], str]:
    """Load each folder's tokenizer with AutoTokenizer in a process that never imported iterative_llm, with no
    terminal (stdin closed). Returns (what each encoded, everything else the process wrote)."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(list(map(str, folders))), json.dumps(TRICKY), json.dumps(CONVERSATION),
         json.dumps(SPECIAL_TOKENS)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr
    *others, last = result.stdout.strip().splitlines()
    return json.loads(last), "\n".join(others) + result.stderr


def test_a_saved_tokenizer_loads_like_any_other_in_a_fresh_process(tok, tmp_path):
    """A plain fast tokenizer: the standard class, loaded by AutoTokenizer with no remote code, alone and inside
    a model folder, encoding, decoding and rendering exactly as the trained one."""
    import json

    from tests.conftest import tiny_model

    tok.save_pretrained(tmp_path / "tokenizer")
    tiny_model(vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    folders = (tmp_path / "tokenizer", tmp_path / "model")
    for folder, loaded in zip(folders, _load_in_a_fresh_process(*folders)[0], strict=True):
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert saved["tokenizer_class"] == "TokenizersBackend" and "auto_map" not in saved
        assert loaded == {
            "class": "TokenizersBackend",
            "ids": [tok.encode(text, add_special_tokens=False) for text in TRICKY],
            "decoded": TRICKY,
            "chat": EXPECTED_RENDERING,
            "special": [0, 1, 2, 3, 4, 5],
        }


@pytest.mark.xfail(strict=True, reason=(
    "transformers 5.24's AutoTokenizer loads the folder's config.json with AutoConfig before it reads "
    "tokenizer_config.json, and our config.json maps AutoConfig to the copied configuration file (auto_map), "
    "so it asks whether to run that code. tokenizer_config.json already names the standard class; the fix is "
    "in how the model folder's config is saved, or in transformers."))
def test_a_model_folder_tokenizer_loads_without_asking_about_custom_code(tok, tmp_path):
    from tests.conftest import tiny_model

    tiny_model(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, output = _load_in_a_fresh_process(tmp_path)
    assert "custom code" not in output


# --- chat template ----------------------------------------------------------------------------


def test_chat_template_renders_expected_string(tok):
    assert has_chat_template(tok)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDERING


def test_generation_prompt_opens_an_assistant_turn(tok):
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_RENDERING[: EXPECTED_RENDERING.index("<|assistant|>")] + "<|assistant|>\n"
    assert prompt.endswith("Where is the cat?<|end|>\n<|assistant|>\n")
    # The prompt's tokens are a prefix of the full conversation's, which TRL's prompt-completion
    # datasets rely on to find where the completion starts.
    prompt_ids = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=False)
    full_ids = tok.apply_chat_template(CONVERSATION[:3], return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids


def test_assistant_mask_covers_replies_and_their_end(tok):
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    # Group the masked tokens into contiguous spans and decode each one.
    spans, current = [], []
    for token_id, masked in zip(ids, mask):
        if masked:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tok.decode(span) for span in spans] == ["Near the bridge.<|end|>", "In the garden, 42 m away!<|end|>"]
    assert all(span[-1] == tok.convert_tokens_to_ids(END_OF_TURN) for span in spans)
    # Everything else (headers, system and user turns) is unmasked and decodes to the rest.
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == EXPECTED_RENDERING.replace("Near the bridge.<|end|>", "").replace(
        "In the garden, 42 m away!<|end|>", ""
    )


def test_trl_accepts_the_template_for_assistant_only_loss(tok):
    chat_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_utils.has_generation_markers(tok.chat_template)
    assert chat_utils.is_chat_template_stop_token_trained(tok)
    assert chat_utils.get_training_chat_template(tok) is None  # nothing for TRL to patch


def test_unknown_role_is_refused(tok):
    with pytest.raises(TemplateError, match="Unknown chat role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    with pytest.raises(TemplateError, match=r"Message content must be a string \(role 'assistant'\)"):
        tok.apply_chat_template([{"role": "assistant", "content": None}], tokenize=False)


# --- clear errors -----------------------------------------------------------------------------


def test_vocab_size_too_small(corpus):
    with pytest.raises(ValueError, match=rf"vocab_size=262 is too small: the minimum is {MIN_VOCAB_SIZE}"):
        train_tokenizer(corpus, 262)
    assert MIN_VOCAB_SIZE == 263


@pytest.mark.parametrize("texts", [[], ["", ""], iter([])], ids=["empty list", "empty strings", "empty generator"])
def test_empty_corpus(texts):
    with pytest.raises(ValueError, match="no text to train the tokenizer on.*Pass the training corpus"):
        train_tokenizer(texts, 300)


def test_a_single_string_is_not_a_corpus():
    with pytest.raises(TypeError, match="iterable of strings"):
        train_tokenizer("one long document", 300)


def test_tokenizer_larger_than_model_vocab(tok):
    config = SimpleNamespace(vocab_size=len(tok) - 1)
    with pytest.raises(ValueError, match=rf"{len(tok)} tokens but the model's vocab_size is {len(tok) - 1}.*Retrain"):
        check_tokenizer_matches_model(tok, config)


def test_special_token_ids_must_agree_with_model(tok):
    check_tokenizer_matches_model(tok, SimpleNamespace(vocab_size=len(tok)))  # ids not set: nothing to compare
    check_tokenizer_matches_model(tok, SimpleNamespace(vocab_size=1024, eos_token_id=0, pad_token_id=1))
    check_tokenizer_matches_model(tok, SimpleNamespace(vocab_size=1024, eos_token_id=[5, 0], pad_token_id=None))
    with pytest.raises(ValueError, match="eos_token_id is 0 .* config's eos_token_id is 7"):
        check_tokenizer_matches_model(tok, SimpleNamespace(vocab_size=1024, eos_token_id=7))
    with pytest.raises(ValueError, match="pad_token_id is 1 .* config's pad_token_id is 0"):
        check_tokenizer_matches_model(tok, SimpleNamespace(vocab_size=1024, eos_token_id=0, pad_token_id=0))


def test_load_from_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files.*train_tokenizer.*save_pretrained"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_has_chat_template_is_false_without_one():
    assert not has_chat_template(SimpleNamespace(chat_template=None))
    assert not has_chat_template(object())
