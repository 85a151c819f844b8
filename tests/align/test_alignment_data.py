"""Alignment data: every accepted shape becomes the same conversation or preference pair, local files
and folders load, a held-out slice is kept apart, and bad input fails with a message that says why.

The helpers at the top also build the tiny model folders and data sets of test_sft, test_dpo and test_chat.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from training.align.common import resolve_device_defaults
from training.align.data import (
    DataArguments,
    load_preference_dataset,
    load_rows,
    load_sft_dataset,
    parse_transcript,
    to_conversation,
    to_messages_dataset,
    to_preference,
    to_preference_dataset,
)
from training.align.model_card import append_model_card_section
from training.align.model_folder import load_tokenizer_with_template

# ----------------------------------------------------------------------------------------------------
# Helpers shared with the other alignment tests

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers"]
OBJECTS = ["the red ball", "a green tree", "the river", "an open door", "the quiet town", "a bright star"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def qa_conversations(n: int = 60, seed: int = 0) -> list[dict]:
    """Short conversations in the `messages` shape: a system line, a question, an answer that follows from it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        rows.append({"messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": f"What does {subject} do?"},
            {"role": "assistant", "content": f"{subject.capitalize()} {verb} {obj}."},
        ]})
    return rows


def preference_pairs(n: int = 40, seed: int = 0) -> list[dict]:
    """Anthropic-HH-style transcripts: the chosen reply names a 'good' object, the rejected one a 'bad' object,
    same length, so an untrained model ranks them at random and DPO has something to learn."""
    rng = random.Random(seed)
    good, bad = OBJECTS[:3], OBJECTS[3:]
    rows = []
    for _ in range(n):
        subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
        prompt = f"\n\nHuman: What does {subject} do?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {subject} {verb} {rng.choice(good)}.",
                     "rejected": f"{prompt} {subject} {verb} {rng.choice(bad)}."})
    return rows


def save_model_folder(folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A tiny model and our tokenizer (with its chat template), saved as a Hugging Face model folder."""
    from tests.conftest import tiny_model

    fields = dict(vocab_size=len(tokenizer), max_position_embeddings=256)
    fields.update(overrides)
    tiny_model(seed, **fields).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Shapes

QUESTION, ANSWER = "Why is the sky blue?", "Sunlight scatters off the air, blue light the most."
EXPECTED = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]

SFT_SHAPES = {
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]},
    "prompt/completion strings": {"prompt": QUESTION, "completion": ANSWER},
    "prompt/completion messages": {"prompt": [EXPECTED[0]], "completion": [EXPECTED[1]]},
    "question/answer": {"question": QUESTION, "answer": ANSWER},
    "instruction/response": {"instruction": QUESTION, "context": "", "response": ANSWER},
    "### transcript": {"text": f"### Human: {QUESTION} ### Assistant: {ANSWER}"},
    "HH transcript": {"text": f"\n\nHuman: {QUESTION}\n\nAssistant: {ANSWER}"},
}


@pytest.mark.parametrize("shape", list(SFT_SHAPES))
def test_every_sft_shape_converts_to_the_same_conversation(shape):
    assert to_conversation(SFT_SHAPES[shape]) == EXPECTED


def test_transcripts_keep_every_turn_and_drop_a_trailing_question():
    text = "### Human: hi ### Assistant: hello ### Human: how are you? ### Assistant: fine. ### Human: and?"
    assert to_conversation({"text": text}) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine."},
    ]
    # An HH transcript may end with an empty "Assistant:"; a reply that quotes "Human:" mid-line stays whole.
    hh = "\n\nHuman: say it\n\nAssistant: He said Human: no.\n\nHuman: ok\n\nAssistant:"
    assert parse_transcript(hh)[-1] == {"role": "assistant", "content": ""}
    assert to_conversation({"text": hh}) == [
        {"role": "user", "content": "say it"}, {"role": "assistant", "content": "He said Human: no."}]
    # Instruction + context (Dolly) puts the context under the instruction.
    dolly = to_conversation({"instruction": "Summarise.", "context": "A long text.", "response": "Short."})
    assert dolly[0] == {"role": "user", "content": "Summarise.\n\nA long text."}


CHOSEN, REJECTED = "Because of Rayleigh scattering.", "No idea."
EXPECTED_PAIR = {
    "prompt": [{"role": "user", "content": QUESTION}],
    "chosen": [{"role": "assistant", "content": CHOSEN}],
    "rejected": [{"role": "assistant", "content": REJECTED}],
}
PREFERENCE_SHAPES = {
    "HH transcripts": {"chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: {CHOSEN}",
                       "rejected": f"\n\nHuman: {QUESTION}\n\nAssistant: {REJECTED}"},
    "prompt strings": {"prompt": QUESTION, "chosen": CHOSEN, "rejected": REJECTED},
    "HH prompt string": {"prompt": f"\n\nHuman: {QUESTION}\n\nAssistant:", "chosen": f" {CHOSEN}",
                         "rejected": f" {REJECTED}"},
    "question strings": {"question": QUESTION, "chosen": CHOSEN, "rejected": REJECTED},
    "TRL conversational": EXPECTED_PAIR,
    "two conversations": {"chosen": EXPECTED_PAIR["prompt"] + EXPECTED_PAIR["chosen"],
                          "rejected": EXPECTED_PAIR["prompt"] + EXPECTED_PAIR["rejected"]},
}


@pytest.mark.parametrize("shape", list(PREFERENCE_SHAPES))
def test_every_preference_shape_converts_to_the_same_pair(shape):
    assert to_preference(PREFERENCE_SHAPES[shape]) == EXPECTED_PAIR


def test_hh_pair_with_earlier_turns_shares_them_as_the_prompt():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A butterfly for Oregon?"
    pair = to_preference({"chosen": f"{history}\n\nAssistant: The western tiger swallowtail.",
                          "rejected": f"{history}\n\nAssistant: Monarchs live in Mexico."})
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"] == [{"role": "assistant", "content": "The western tiger swallowtail."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Monarchs live in Mexico."}]


def test_the_real_data_shapes_convert(tmp_path):
    """One row in each shape of ../shared/data (written here: tests never read the shared data)."""
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"text": f"### Human: {QUESTION} ### Assistant: {ANSWER}"}] * 3)
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": QUESTION, "answer": ANSWER}] * 3)
    for path in (dolly, gsm8k):
        assert list(to_messages_dataset(load_rows(str(path)))["messages"]) == [EXPECTED] * 3
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt", encoding="utf-8") as f:
        f.write(json.dumps(PREFERENCE_SHAPES["HH transcripts"]) + "\n")
    assert to_preference_dataset(load_rows(str(hh)))[0] == EXPECTED_PAIR


# ----------------------------------------------------------------------------------------------------
# Loading and held-out split


def test_local_files_and_folders_load_alike(tmp_path):
    import datasets

    rows = qa_conversations(30)
    jsonl = write_jsonl(tmp_path / "data.jsonl", rows)
    folder = tmp_path / "folder"
    write_jsonl(folder / "train.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in (jsonl, folder, tmp_path / "data.parquet", tmp_path / "saved"):
        train, heldout = load_sft_dataset(DataArguments(dataset_name=str(source), num_heldout=5), seed=0)
        assert (len(train), len(heldout)) == (25, 5)
        assert sorted(map(json.dumps, list(train["messages"]) + list(heldout["messages"]))) == sorted(
            json.dumps(r["messages"]) for r in rows)
    # The split is seeded: the same held-out rows every time, none of them in training.
    again = load_sft_dataset(DataArguments(dataset_name=str(jsonl), num_heldout=5), seed=0)[1]
    assert list(again["messages"]) == list(heldout["messages"])
    capped, _ = load_sft_dataset(DataArguments(dataset_name=str(jsonl), num_heldout=5, max_train_samples=7))
    assert len(capped) == 7


def test_preference_loading_drops_unusable_pairs(tmp_path):
    rows = preference_pairs(20) + [{"chosen": "\n\nHuman: same\n\nAssistant: same",
                                    "rejected": "\n\nHuman: same\n\nAssistant: same"}]
    train, heldout = load_preference_dataset(DataArguments(dataset_name=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                                                           num_heldout=4))
    assert (len(train), len(heldout)) == (16, 4)
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_fails_with_a_clear_message(tmp_path, tokenizer):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"title": "x", "body": "y"}])
    with pytest.raises(ValueError, match=r"columns \['body', 'title'\].*messages.*question \+ answer"):
        load_sft_dataset(DataArguments(dataset_name=str(wrong), num_heldout=0))
    with pytest.raises(ValueError, match="chosen \\+ rejected"):
        load_preference_dataset(DataArguments(dataset_name=str(wrong), num_heldout=0))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_sft_dataset(DataArguments(dataset_name=str(empty), num_heldout=0))

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "Just some pretraining text."}] * 3)
    with pytest.raises(ValueError, match="none of its 3 rows are usable"):
        load_sft_dataset(DataArguments(dataset_name=str(plain), num_heldout=0))

    small = write_jsonl(tmp_path / "small.jsonl", qa_conversations(3))
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        load_sft_dataset(DataArguments(dataset_name=str(small), num_heldout=3))

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sft_dataset(DataArguments(dataset_name=str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="not a local file or folder"):
        load_sft_dataset(DataArguments(dataset_name="nobody/no-such-dataset"))  # the hub is offline in tests
    with pytest.raises(ValueError, match="--dataset_name"):
        load_sft_dataset(DataArguments())

    no_template = tmp_path / "no_template"
    tokenizer.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer_with_template(str(no_template))


# ----------------------------------------------------------------------------------------------------
# Shared plumbing


def test_cpu_defaults_turn_off_bf16_and_checkpointing_unless_asked(monkeypatch):
    import torch

    from training.align.dpo import DPOConfig
    from training.align.sft import SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for config_class in (SFTConfig, DPOConfig):
        config = config_class(output_dir="out", report_to="none")
        assert (config.bf16, config.gradient_checkpointing) == (False, False)
        asked = config_class(output_dir="out", report_to="none", use_cpu=True, bf16=True, gradient_checkpointing=True)
        assert (asked.bf16, asked.gradient_checkpointing) == (True, True)
    assert SFTConfig(output_dir="out").packing and SFTConfig(output_dir="out").assistant_only_loss

    class Args:
        bf16, fp16, gradient_checkpointing, use_cpu, dataloader_pin_memory = None, False, None, False, True

    resolve_device_defaults(Args)
    assert (Args.bf16, Args.gradient_checkpointing) == (False, False)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_presets_and_defaults_give_no_deprecation_warning(stage, tmp_path, monkeypatch):
    """transformers 5.x renamed gradient_checkpointing to activation_checkpointing and warns (FutureWarning)
    whenever the old name is set: every SFT and DPO run printed it."""
    import warnings

    import torch

    from training.align import dpo

    from training.align import sft

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = {"sft": sft, "dpo": dpo}[stage]
    presets = sorted((Path(__file__).parents[2] / "training" / "presets").glob(f"{stage}-*.yaml"))
    assert len(presets) >= 2
    for arguments in [[]] + [["--config", str(preset)] for preset in presets]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, config, _ = module.build_parser().parse_args_and_config(args=[*arguments, "--output_dir", str(tmp_path)])
        assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)], arguments
        assert (config.activation_checkpointing, config.gradient_checkpointing) == (False, False)


def test_a_file_too_small_for_the_held_out_rows_gets_a_message_naming_num_heldout(tmp_path, capsys):
    """The sft-tiny preset holds out 100 rows: a 16-row file stopped with a traceback. Now one line says which
    option to change and to what, before the model is loaded, and no output folder is made."""
    from iterative_llm.cli import main as cli_main

    small = write_jsonl(tmp_path / "small.jsonl", qa_conversations(16))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(16))
    for stage, data in (("sft", small), ("dpo", pairs)):
        out = tmp_path / f"out-{stage}"
        preset = Path(__file__).parents[2] / "training" / "presets" / f"{stage}-tiny.yaml"
        code = cli_main([stage, "--config", str(preset), "--dataset_name", str(data),
                         "--model_name_or_path", str(tmp_path / "model-never-loaded"), "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and not out.exists()
        assert err.strip().splitlines()[-1] == (
            f"iterative-llm {stage}: --num_heldout 100 leaves nothing to train on: the dataset has only 16 usable "
            f"rows. Hold out fewer rows (--num_heldout 2, or --num_heldout 0 to skip the evaluation before and "
            f"after), or give more data."
        ), err


def test_mistyped_or_abbreviated_options_are_refused_with_a_usage_message(capsys):
    from iterative_llm.cli import main as cli_main

    for stage in ("sft", "dpo"):
        for typo in ("--num_heldot", "--num_held"):
            with pytest.raises(SystemExit) as exit_info:
                cli_main([stage, typo, "3"])
            assert exit_info.value.code == 2
            assert f"unrecognized arguments: {typo} 3" in capsys.readouterr().err


def test_model_card_sections_append(tmp_path):
    append_model_card_section(tmp_path, "Pretraining", {"steps": 10, "val loss": 3.14159})
    append_model_card_section(tmp_path, "SFT", {"data": "a|b", "figure": None})
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.index("## Pretraining") < card.index("## SFT")
    assert "| val loss | 3.142 |" in card and "| data | a\\|b |" in card and "| figure | - |" in card
