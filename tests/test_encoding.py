"""Any desktop: files are UTF-8 and the commands print whatever the locale's encoding.

On Windows Python reads and writes text in the ANSI code page (cp1252) unless told otherwise, and
encodes output sent to a file or a pipe in it too. These tests make the same trap on Linux, and a
stricter one: under PYTHONUTF8=0 PYTHONCOERCECLOCALE=0 LC_ALL=C Python's default text encoding is
ASCII. PYTHONWARNDEFAULTENCODING=1 (PEP 597) makes every open() without an encoding warn, and the
child processes turn the warnings raised from this project's own modules into errors, so a file
opened without encoding="utf-8" fails the test even where its text happens to be ASCII.
Command-line arguments stay ASCII: the C locale could not decode any other.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iterative_llm import console
from iterative_llm.console import make_output_safe

from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]

# Accents, curly quotes, CJK and Greek: cp1252 holds the first two only, ASCII none.
WORDS = "Café “quoted” 東京 λόγος"

# Runs `iterative-llm` with its arguments after checking that the locale really is ASCII (else the
# test would prove nothing), with EncodingWarnings from our own modules as errors.
CHILD = r"""
import codecs, locale, sys, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    encoding = codecs.lookup(locale.getpreferredencoding(False)).name
assert encoding == "ascii", f"the locale's encoding is {encoding}, not ascii: the simulation did not take"
warnings.filterwarnings("error", category=EncodingWarning, module=r"(iterative_llm|training|benchmarks)(\.|$)")
from iterative_llm.cli import main
for command in sys.argv[1:]:
    code = main(command.split("\x1f"))
    if code:
        sys.exit(code)
"""


def run_in_ascii_locale(*commands: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Each command (a list of ASCII arguments) in turn in one child process with an ASCII locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", PYTHONWARNDEFAULTENCODING="1",
               PYTHONPATH=str(ROOT))
    packed = ["\x1f".join(command) for command in commands]
    return subprocess.run([sys.executable, "-c", CHILD, *packed], cwd=cwd, env=env, timeout=180, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved model folder as tests/model/test_explain.py makes it; its tokenizer has a chat template."""
    folder = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- what the commands print ------------------------------------------------------------------------


class _Terminal(io.BytesIO):
    def isatty(self) -> bool:
        return True


def _stream(raw: io.BytesIO, encoding: str, errors: str = "strict") -> io.TextIOWrapper:
    return io.TextIOWrapper(raw, encoding=encoding, errors=errors)


def test_a_file_or_pipe_gets_utf8_and_a_terminal_keeps_its_encoding_without_failing(monkeypatch):
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    to_file, to_terminal, from_pipe = io.BytesIO(), _Terminal(), io.BytesIO(WORDS.encode("utf-8") + b"\n")
    monkeypatch.setattr(sys, "stdout", _stream(to_file, "cp1252"))
    monkeypatch.setattr(sys, "stderr", _stream(to_terminal, "ascii", "backslashreplace"))
    monkeypatch.setattr(sys, "stdin", _stream(from_pipe, "cp1252"))
    make_output_safe()
    make_output_safe()  # a second call (cli.main, then the stage's main) changes nothing more
    print("→ ─", WORDS)
    print("→ │", WORDS, file=sys.stderr)
    read = sys.stdin.readline()
    sys.stdout.flush()
    sys.stderr.flush()
    assert to_file.getvalue().decode("utf-8") == f"→ ─ {WORDS}\n"
    # One "?" per character the terminal cannot show, so columns stay in line.
    assert to_terminal.getvalue().decode("ascii") == "? ? Caf? ?quoted? ?? ?????\n"
    assert read == WORDS + "\n"


def test_a_unicode_stream_and_an_encoding_the_user_chose_are_kept(monkeypatch):
    already = _stream(io.BytesIO(), "utf-8")
    monkeypatch.setattr(sys, "stdout", already)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a real stream: left alone
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    make_output_safe()
    assert (sys.stdout.encoding, sys.stdout.errors) == ("utf-8", "strict")

    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    chosen = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", _stream(chosen, "cp1252"))
    make_output_safe()
    print(WORDS, end="")
    sys.stdout.flush()
    assert chosen.getvalue() == "Café “quoted” ?? ?????".encode("cp1252")
    assert console._holds_everything("UTF8") and not console._holds_everything("latin-1")


def test_explain_printed_to_a_file_under_an_ascii_locale_is_utf8(model_dir, tmp_path):
    """`iterative-llm explain ... > walk.txt` on Windows died at the first character outside cp1252."""
    walk = tmp_path / "walk.txt"
    with open(walk, "wb") as out:
        result = run_in_ascii_locale(["explain", str(model_dir), "The cat sees the dog", "--out", "pictures"],
                                     cwd=tmp_path, stdout=out, stderr=subprocess.PIPE)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    printed = walk.read_bytes().decode("utf-8")  # strict: any other encoding fails here
    # The steps' own characters: dots of products, angles, roots, sums, the bars of the next-token chart.
    assert "=== Step 1." in printed and all(c in printed for c in "·θ√Σ▏")
    report = (tmp_path / "pictures" / "report.html").read_bytes().decode("utf-8")
    assert "θ_j" in report


def test_chat_reads_utf8_from_a_pipe_and_answers_under_an_ascii_locale(model_dir, tmp_path):
    """A conversation piped in: the C locale once decoded it with lone surrogates the tokenizer refused."""
    result = run_in_ascii_locale(["chat", str(model_dir), "--max_new_tokens", "4", "--do_sample", "false"],
                                 cwd=tmp_path, input=f"{WORDS}\n".encode("utf-8"), capture_output=True)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    assert "assistant> " in result.stdout.decode("utf-8")


# --- files ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_non_ascii_settings_data_and_samples_trains_resumes_and_exports(tmp_path, corpus):
    """Under the ASCII locale: a preset whose sample prompt is not ASCII is read (YAML), a book with
    such text is trained on intact, the model card and run_config.yaml are written as UTF-8, and
    the resume reads run_config.yaml back."""
    books = tmp_path / "books"
    books.mkdir()
    book = "\n\n".join(f"{WORDS}: {corpus[i]}" for i in range(40))
    (books / "book.txt").write_bytes(book.encode("utf-8"))
    preset = tmp_path / "preset.yaml"
    settings = dict(
        data="books", out="run", val_fraction=0.1, model_preset="tiny",
        model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 320},
        seq_len=32, batch_size=4, batch_tokens=128, max_steps=2, eval_every=0, eval_tokens=256, log_every=1,
        checkpoint_every=0, sample_every=0, sample_tokens=3, sample_prompts=[WORDS], report_to="none",
        progress=False,
    )
    # As a person would save it: the characters themselves, in UTF-8.
    preset.write_bytes(yaml.safe_dump(settings, allow_unicode=True).encode("utf-8"))

    result = run_in_ascii_locale(["train", "--config", "preset.yaml"],
                                 ["train", "--out", "run", "--resume", "--max_steps", "3"],
                                 cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    assert WORDS in result.stdout.decode("utf-8")  # the plan and the samples, printed to a pipe

    run = tmp_path / "run"
    saved = yaml.safe_load((run / "run_config.yaml").read_bytes().decode("utf-8"))
    assert saved["train"]["sample_prompts"] == [WORDS] and saved["resumed"][0]["changed"] == {"max_steps": 3}
    assert json.loads((run / "summary.json").read_bytes().decode("utf-8"))["steps"] == 3
    card = (run / "README.md").read_bytes().decode("utf-8")
    assert WORDS in card  # the samples section

    from transformers import AutoTokenizer

    from training.data.shards import ShardedDataset

    tokenizer = AutoTokenizer.from_pretrained(run)
    data = ShardedDataset.open(run / "data")
    # One document, its last tenth held out at a paragraph break: together they are the book, intact.
    documents = [split.decode_document(i, tokenizer)
                 for split in (data.split("train"), data.split("val")) for i in range(split.num_documents)]
    assert "\n\n".join(document.strip() for document in documents) == book
