"""The `iterative-llm` commands as a user meets them: one spelling of every option in every command
(underscores, with the dashed spelling as an alias), usage errors instead of tracebacks, and `generate`
giving the number of tokens asked for however long the prompt."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from iterative_llm.cli import STAGES
from iterative_llm.cli import main as cli_main
from tests.align.test_alignment_data import save_model_folder


def _help(stage: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([stage, "--help"])
    return out.getvalue()


def _option_lines(help_text: str) -> list[list[str]]:
    """The long options of each line of an argparse help that lists an option (its left column)."""
    lines = []
    for line in help_text.splitlines():
        match = re.match(r"^\s+(-.*?)(\s{2,}|$)", line)
        if match:
            lines.append(re.findall(r"--[A-Za-z][\w.-]*", match.group(1)))
    return [names for names in lines if names]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_option_of_every_command_takes_underscores_and_dashes(stage):
    options = [name for names in _option_lines(_help(stage)) for name in names]
    assert options, f"no options found in `iterative-llm {stage} --help`"
    spelled = set(options)
    if stage == "train":
        # train's --help lists each option once (tests/pretrain/test_pretrain.py checks that); its parser
        # takes the dashed alias unlisted.
        from training.pretrain.config import TrainConfig, _build_parser, to_dict

        spelled |= set(_build_parser(to_dict(TrainConfig()), "tiny")._option_string_actions)
    missing = sorted(
        {name.replace("_", "-") for name in options if "_" in name} - spelled
        | {"--" + name[2:].replace("-", "_") for name in options if "-" in name[2:]} - spelled
    )
    assert not missing, f"`iterative-llm {stage}` lacks these spellings: {missing}"
    for names in _option_lines(_help(stage)):
        two_word = [name for name in names if "_" in name or "-" in name[2:]]
        if two_word:  # the canonical (first) spelling uses underscores, as train, sft, dpo and TRL do
            assert "_" in two_word[0], f"`iterative-llm {stage}` lists {two_word[0]} before its underscore spelling"


# ----------------------------------------------------------------------------------------------------
# one way to read a command line (iterative_llm/command_line.py)

# stage -> (a command line with one mistyped option, the option meant). Required arguments are given,
# so that the mistyped option is what the command objects to.
TYPOS = {
    "prepare": (["SOURCE", "OUT", "--tokenizer", "TOK", "--shard_token", "5"], "--shard_tokens"),
    "train": (["--max_step", "5"], "--max_steps"),
    "generate": (["RUN", "--max-new-token", "5"], "--max_new_tokens"),
    "sft": (["--num_heldot", "3"], "--num_heldout"),
    "dpo": (["--learning_rat", "1e-6"], "--learning_rate"),
    "chat": (["MODEL", "--temprature", "0"], "--temperature"),
    "eval": (["MODEL", "--hellaswg", "hub"], "--hellaswag"),
    "explain": (["MODEL", "a sentence", "--top-kk", "3"], "--top_k"),
    "compare": (["RUN", "--outt", "c.png"], "--out"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_command_answers_a_mistyped_option_with_a_hint(stage, capsys):
    arguments, meant = TYPOS[stage]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([stage, *arguments])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip().splitlines()[-1].endswith(
        f"error: unrecognized arguments: {' '.join(arguments[-2:])}. Did you mean {meant!r}?"), err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["generate", "RUN", "--max_new_tokens", "0"], "--max_new_tokens and --num_samples must be at least 1"),
        (["generate", "RUN", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["eval", "MODEL", "--text", "t.txt", "--batch-size", "0"], "--batch_size must be at least 1, got 0"),
        (["train", "--sample_prompts", "[a, b"], "--sample_prompts '[a, b' is not a value"),
        (["chat", "MODEL", "--do_sample=maybe"], "Truthy value expected: got maybe"),
        (["sft", "--config", "no-such-file.yaml"], "No such file or directory: 'no-such-file.yaml'"),
    ],
    ids=["generate-refused", "generate-not-a-number", "eval", "train-yaml", "chat-bool", "sft-config"],
)
def test_a_bad_value_is_a_one_line_usage_error(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(arguments)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_command_lists_each_option_once(stage):
    # the left column of each option's line (a description's "- `--text`: ..." is not one)
    columns = re.findall(r"^ +(--?[A-Za-z][\w.-]*.*?)(?: {2,}|$)", _help(stage), re.M)
    listed = [name for column in columns for name in re.findall(r"--[A-Za-z][\w.-]*", column)]
    assert "--help" in listed
    assert sorted({name for name in listed if listed.count(name) > 1}) == []


@pytest.mark.parametrize("stage", sorted(set(STAGES) - {"sft", "dpo"}))
def test_every_option_shows_its_default(stage):
    """Every option the user may leave out says what it then is: `(default: none)`, `(default: true)`;
    sft and dpo show TRL's help as TRL writes it."""
    entries = re.findall(r"^  (-[-\w.]+)(.*(?:\n {4,}.*)*)", _help(stage), re.M)
    silent = {option for option, text in entries if "(default" not in text}
    # -h; the `--no_X` spelling of `--X false`; an option that must be given; train's --config file
    assert silent <= {"-h", "--config", "--tokenizer"} | {option for option in silent if option.startswith("--no_")}
    assert "(default: None)" not in _help(stage)  # shown as typed: none


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_command_reads_its_options_with_the_one_parser(stage):
    import importlib

    from trl import TrlParser

    from iterative_llm.command_line import CommandParser

    parser = importlib.import_module(STAGES[stage][0]).build_parser()
    # sft and dpo keep TRL's parser, an HfArgumentParser like CommandParser, for TRL's options and --config.
    assert isinstance(parser, TrlParser if stage in ("sft", "dpo") else CommandParser)
    assert parser.allow_abbrev is False


@pytest.fixture(scope="module")
def small_context_folder(tmp_path_factory, tokenizer) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("gen") / "model", tokenizer, max_position_embeddings=64)


def _generate(folder: Path, prompt: str, *options: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["generate", str(folder), prompt, "--temperature", "0", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_takes_both_spellings_of_its_options(small_context_folder, capsys):
    runs = [_generate(small_context_folder, "The cat", option, "6", capsys=capsys)
            for option in ("--max_new_tokens", "--max-new-tokens")]
    assert runs[0][0] == 0 and runs[0] == runs[1]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", str(small_context_folder), "The cat", "--max_new", "6"])  # abbreviations are refused
    assert exit_info.value.code == 2 and "unrecognized arguments: --max_new" in capsys.readouterr().err


def test_arguments_may_come_after_options(small_context_folder, capsys):
    """`generate RUN --max_new_tokens 6 "The cat"`: the prompt after an option is still the prompt."""
    expected = _generate(small_context_folder, "The cat", "--max_new_tokens", "6", capsys=capsys)
    code = cli_main(["generate", "--temperature", "0", str(small_context_folder), "--max_new_tokens", "6", "The cat"])
    assert expected[0] == code == 0 and capsys.readouterr().out == expected[1]


def test_generate_slides_a_long_prompt_and_says_so(small_context_folder, tokenizer, capsys):
    prompt = "The cat sees the river. " * 4
    n_prompt = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # with the boundary token
    assert 40 < n_prompt < 64, n_prompt
    code, out, err = _generate(small_context_folder, prompt, "--max_new_tokens", "30", capsys=capsys)
    assert code == 0 and out.startswith(prompt)
    assert (f"the prompt is {n_prompt} tokens and 30 new tokens were asked for, more than the model's context of "
            f"64 tokens: the model sees the last 34 tokens of the prompt") in err
    # A prompt and reply that fit say nothing.
    assert _generate(small_context_folder, "The cat", "--max_new_tokens", "5", capsys=capsys)[2] == ""


class _RecordingModel:
    """Wraps a model's generate to record what each call was given."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kwargs):
        self.calls.append((input_ids.shape[1], kwargs["max_new_tokens"]))
        return self.model.generate(input_ids, **kwargs)


@pytest.mark.parametrize("prompt_tokens, new_tokens", [(50, 30), (10, 150), (60, 100)])
def test_continue_ids_gives_every_token_asked_for_within_the_context(model, prompt_tokens, new_tokens):
    from training.eval.generate import continue_ids

    context = model.config.max_position_embeddings  # 64
    recorder = _RecordingModel(model)
    ids = torch.randint(6, model.config.vocab_size, (prompt_tokens,)).tolist()
    torch.manual_seed(0)
    rows, note = continue_ids(recorder, ids, new_tokens, num_samples=2, do_sample=True, pad_token_id=1,
                              suppress_tokens=[0])  # no end-of-text, so nothing stops early
    assert [len(row) for row in rows] == [new_tokens, new_tokens]
    assert note is not None and str(context) in note
    assert all(seen + asked <= context for seen, asked in recorder.calls), recorder.calls
    # Greedy decoding of what fits in one pass matches a plain generate call on the prompt's end.
    if new_tokens < context:
        (greedy,), _ = continue_ids(model, ids, new_tokens, do_sample=False, pad_token_id=1, suppress_tokens=[0])
        keep = torch.tensor([ids[-(context - new_tokens):]])
        plain = model.generate(keep, attention_mask=torch.ones_like(keep), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=1, suppress_tokens=[0])
        assert greedy == plain[0, keep.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------------
# chat


def test_chat_help_shows_the_model_folder_as_its_argument():
    text = _help("chat")
    assert text.startswith("usage: iterative-llm chat MODEL [options]")
    assert "MODEL" in text.split("options:")[0] and "you>" in text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["FOLDER", "hi"], "unexpected argument 'hi': chat takes the model folder only, and reads your messages at "
                           "its `you>` prompt"),
        ([], "no model given: name the chat model folder"),
        (["FOLDER", "--max_new_token", "5"], "unrecognized arguments: --max_new_token 5"),
        (["FOLDER", "--model_name_or_path", "elsewhere"], "two models given"),
    ],
    ids=["a message", "no model", "a typo", "two models"],
)
def test_chat_usage_mistakes_get_a_usage_message(tmp_path, capsys, arguments, message):
    arguments = [str(tmp_path) if a == "FOLDER" else a for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["chat", *arguments])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: iterative-llm chat MODEL" in err and message in err


def test_chat_names_a_missing_folder(tmp_path, capsys):
    assert cli_main(["chat", str(tmp_path / "no-such-run")]) == 2
    assert f"no folder {str(tmp_path / 'no-such-run')!r}" in capsys.readouterr().err


def test_a_bare_boolean_option_leaves_the_next_word_to_the_arguments(tmp_path, capsys):
    """`--trust_remote_code` may take a value (`--trust_remote_code false`), but a folder after it is the folder."""
    missing = str(tmp_path / "no-such-run")
    assert cli_main(["chat", "--trust_remote_code", missing]) == 2
    assert f"no folder {missing!r}" in capsys.readouterr().err
    assert cli_main(["chat", "--do_sample", "false", missing]) == 2
    assert f"no folder {missing!r}" in capsys.readouterr().err
