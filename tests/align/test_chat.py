"""`iterative-llm chat`: reads lines until Ctrl-D, streams each reply as it is generated, keeps the
conversation (rendered with the chat template), and leaves cleanly on Ctrl-C."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from iterative_llm.cli import main as cli_main
from tests.align.test_alignment_data import save_model_folder
from training.align.chat import ChatArguments, ChatSession, chat_loop, load_chat_model


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, tokenizer) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("chat") / "model", tokenizer)


@pytest.fixture(scope="module")
def loaded(chat_folder):
    return load_chat_model(ChatArguments(model_name_or_path=str(chat_folder), device="cpu"))


class _Interrupts:
    """A stdin whose reads raise KeyboardInterrupt, as Ctrl-C at the prompt does."""

    def readline(self, *args):
        raise KeyboardInterrupt

    def isatty(self):
        return False


def test_chat_command_answers_each_line_and_exits_on_eof(chat_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/reset\nwhat does the cat do?\n"))
    code = cli_main(["chat", str(chat_folder), "--max_new_tokens", "6", "--do_sample", "false"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("assistant> ") == 2 and "(new conversation)" in out and out.rstrip().endswith("bye")


def test_ctrl_c_at_the_prompt_exits_cleanly(chat_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _Interrupts())
    assert cli_main(["chat", str(chat_folder)]) == 0
    assert "bye" in capsys.readouterr().out


def test_the_conversation_is_kept_and_rendered_with_the_template(loaded):
    model, tokenizer = loaded
    args = ChatArguments(model_name_or_path="-", system_prompt="Be brief.", max_new_tokens=5, do_sample=False)
    session = ChatSession(model, tokenizer, args, out=io.StringIO())
    seen = []
    generate = model.generate

    def recording_generate(input_ids, **kwargs):
        seen.append(tokenizer.decode(input_ids[0]))
        return generate(input_ids=input_ids, **kwargs)

    model.generate = recording_generate
    try:
        first = session.reply("What does the cat do?")
        session.reply("And the dog?")
    finally:
        del model.generate
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    expected = tokenizer.apply_chat_template(session.messages[:4], add_generation_prompt=True, tokenize=False)
    assert seen[1] == expected and first in seen[1]  # the second turn sees the first question and answer
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def _scripted_generate(tokenizer, words, then=None):
    """A generate that streams `words` one token at a time, checking each is on screen before the next."""

    def generate(input_ids, streamer, **kwargs):
        streamer.put(input_ids)  # the prompt first, as transformers does
        shown = []
        for word in words:
            for token in tokenizer.encode(word, add_special_tokens=False):
                streamer.put(torch.tensor([token]))
            shown.append(streamer.out.getvalue())
        if then is not None:
            raise then
        streamer.end()
        new = torch.tensor([tokenizer.encode("".join(words), add_special_tokens=False)])
        generate.shown = shown
        return torch.cat([input_ids, new], dim=1)

    return generate


def test_replies_stream_token_by_token(loaded, monkeypatch):
    model, tokenizer = loaded
    out = io.StringIO()
    session = ChatSession(model, tokenizer, ChatArguments(model_name_or_path="-"), out=out)
    generate = _scripted_generate(tokenizer, ["The cat", " sees", " the river."])
    monkeypatch.setattr(model, "generate", generate)
    assert session.reply("hi") == "The cat sees the river."
    assert "The cat" in generate.shown[0] and "sees" not in generate.shown[0]  # on screen before the next word
    assert out.getvalue().endswith("The cat sees the river.\n")


def test_ctrl_c_during_a_reply_keeps_what_was_shown(loaded, monkeypatch):
    model, tokenizer = loaded
    out = io.StringIO()
    session = ChatSession(model, tokenizer, ChatArguments(model_name_or_path="-"), out=out)
    monkeypatch.setattr(model, "generate", _scripted_generate(tokenizer, ["The cat", " sees"], then=KeyboardInterrupt()))
    lines = iter(["hi", "/exit"])
    assert chat_loop(session, read=lambda prompt: next(lines), interactive=False) == 0
    assert session.messages[-1] == {"role": "assistant", "content": "The cat sees"}
    assert "[stopped]" in out.getvalue() and out.getvalue().rstrip().endswith("bye")


def test_old_turns_are_dropped_when_the_context_is_full(loaded, monkeypatch):
    model, tokenizer = loaded  # max_position_embeddings 256
    out = io.StringIO()
    session = ChatSession(model, tokenizer, ChatArguments(model_name_or_path="-", max_new_tokens=40), out=out)
    monkeypatch.setattr(model, "generate", _scripted_generate(tokenizer, ["ok"]))
    for _ in range(6):
        session.reply("the cat sees the river " * 6)  # about 60 tokens a turn
    assert "older turns dropped" in out.getvalue()
    ids = tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    assert len(ids) + 40 <= 256 and session.messages[-1]["role"] == "assistant"


def test_a_folder_without_chat_template_is_refused(chat_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(chat_folder, folder)
    (folder / "chat_template.jinja").unlink()
    assert cli_main(["chat", str(folder)]) == 2  # a message, not a traceback
    assert "has no chat template" in capsys.readouterr().err
