"""The data of `training/align/sft.py` and `training/align/dpo.py`: conversations and preference pairs in any common shape.

Loading a dataset from the hub or local files, turning each common shape into one conversation format,
and holding out a slice for evaluation live here once, so the two scripts cannot drift apart. Model
folders are `training/align/model_folder.py`'s job, the scripts' shared steps `training/align/common.py`'s.

Every SFT shape becomes `{"messages": [{"role", "content"}, ...]}`:

    messages / conversations   a list of {"role", "content"} (or ShareGPT {"from", "value"}) turns
    prompt + completion        strings, or lists of messages (TRL's prompt-completion format)
    question + answer          GSM8K and other QA sets
    instruction + response     Dolly / Alpaca (an optional context/input is appended to the instruction)
    text                       a transcript: "### Human: ... ### Assistant: ..." or "\\n\\nHuman: ...\\n\\nAssistant: ..."

Every preference shape becomes TRL's conversational preference format, `{"prompt": [messages],
"chosen": [messages], "rejected": [messages]}`:

    chosen + rejected          two transcripts (Anthropic HH) or two message lists sharing a prompt
    prompt + chosen + rejected strings or message lists ("question" or "instruction" may name the prompt)
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Names other datasets give the speakers, mapped to the chat template's three roles.
ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

SFT_SHAPES = (
    "messages: a list of {role, content} turns",
    "prompt + completion",
    "question + answer",
    "instruction + response",
    'text: "### Human: ... ### Assistant: ..." or "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts',
)
PREFERENCE_SHAPES = (
    "chosen + rejected: two transcripts or two message lists that share the prompt (Anthropic HH)",
    "prompt + chosen + rejected: strings or message lists",
)


@dataclass
class DataArguments:
    """Where the conversations or preference pairs come from, and how many are kept back for evaluation."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A hub dataset name, a local file (.jsonl, .json, .jsonl.gz, .parquet, .csv) or a local "
                  "folder (data files, or a `save_to_disk` dataset)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "The split to train on (held-out rows come from it)."})
    num_heldout: int = field(
        default=200,
        metadata={"help": "Rows held out of training for the evaluation before and after (0: no evaluation)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (after the held-out split)."}
    )


# ----------------------------------------------------------------------------------------------------
# Loading


def load_rows(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a hub name, a local data file, or a local folder."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, name)
        return _pick_split(datasets.load_dataset(str(path), name=config), split, name)
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".gz", ".parquet", ".csv")):
        raise FileNotFoundError(f"Dataset {name!r}: no such file or folder.")
    try:
        return _pick_split(datasets.load_dataset(name, name=config), split, name)
    except OSError as err:  # not found, offline, unreachable
        raise FileNotFoundError(
            f"Could not load dataset {name!r}: it is not a local file or folder, and loading it from the Hugging Face "
            f"hub failed ({type(err).__name__}: {err}). Pass a local .jsonl/.parquet file or folder, or check the "
            f"name and your connection."
        ) from err


def _load_file(path: Path):
    import datasets

    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        builder = "json"
    elif suffixes.endswith(".parquet"):
        builder = "parquet"
    elif suffixes.endswith(".csv"):
        builder = "csv"
    else:
        raise ValueError(f"Dataset file {str(path)!r}: unknown format; use .jsonl, .json(.gz), .parquet or .csv.")
    if path.stat().st_size == 0:
        raise ValueError(f"Dataset file {str(path)!r} is empty.")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _pick_split(loaded, split: str, name: str):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; it has: {', '.join(loaded)}.")
    return loaded[split]


def split_heldout(dataset, num_heldout: int, seed: int = 0):
    """(train, heldout): a seeded random `num_heldout` rows kept out of training; heldout is None for 0."""
    if num_heldout < 0:
        raise ValueError(f"--num_heldout must be 0 or more, got {num_heldout}.")
    if num_heldout == 0:
        return dataset, None
    if num_heldout >= len(dataset):
        suggestion = f"--num_heldout {max(1, round(len(dataset) / 10))}" if len(dataset) >= 2 else ""
        raise ValueError(
            f"--num_heldout {num_heldout} leaves nothing to train on: the dataset has only {len(dataset)} usable "
            f"rows. Hold out fewer rows ({suggestion + ', ' if suggestion else ''}or --num_heldout 0 to skip the "
            f"evaluation before and after), or give more data."
        )
    parts = dataset.train_test_split(test_size=num_heldout, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _cap(dataset, limit: int | None):
    return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))


def load_sft_dataset(args: DataArguments, seed: int = 0):
    """(train, heldout) datasets with a single `messages` column, from any shape in `SFT_SHAPES`."""
    rows = _require_rows(args)
    dataset = to_messages_dataset(rows, source=args.dataset_name)
    train, heldout = split_heldout(dataset, args.num_heldout, seed)
    return _cap(train, args.max_train_samples), heldout


def load_preference_dataset(args: DataArguments, seed: int = 0):
    """(train, heldout) datasets with `prompt`, `chosen`, `rejected` message lists, from `PREFERENCE_SHAPES`."""
    rows = _require_rows(args)
    dataset = to_preference_dataset(rows, source=args.dataset_name)
    train, heldout = split_heldout(dataset, args.num_heldout, seed)
    return _cap(train, args.max_train_samples), heldout


def _require_rows(args: DataArguments):
    if not args.dataset_name:
        raise ValueError("No dataset given: pass --dataset_name (a hub name, a local file or a local folder).")
    rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
    if len(rows) == 0:
        raise ValueError(f"Dataset {args.dataset_name!r} is empty: there is nothing to train on.")
    return rows


# ----------------------------------------------------------------------------------------------------
# Conversion: SFT


def detect_sft_shape(columns) -> str:
    """The name of the shape the columns hold, or a ValueError that lists the shapes we accept."""
    columns = set(columns)
    for shape, needed in (
        ("messages", {"messages"}),
        ("conversations", {"conversations"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("question_answer", {"question", "answer"}),
        ("instruction_response", {"instruction", "response"}),
        ("instruction_output", {"instruction", "output"}),
        ("text", {"text"}),
    ):
        if needed <= columns:
            return shape
    raise ValueError(
        f"The dataset has columns {sorted(columns)}, none of the conversation shapes SFT accepts: "
        + "; ".join(SFT_SHAPES) + "."
    )


def to_conversation(example: dict[str, Any], shape: str | None = None) -> list[dict[str, str]]:
    """One example, in any SFT shape, as a list of {"role", "content"} messages ending with a reply.

    Raises ValueError when the example holds no assistant reply to learn from.
    """
    shape = shape or detect_sft_shape(example)
    if shape in ("messages", "conversations"):
        messages = normalize_messages(example[shape])
    elif shape == "prompt_completion":
        messages = _as_messages(example["prompt"], "user") + _as_messages(example["completion"], "assistant")
    elif shape == "question_answer":
        messages = [_message("user", example["question"]), _message("assistant", example["answer"])]
    elif shape in ("instruction_response", "instruction_output"):
        instruction = _text(example["instruction"])
        context = _text(example.get("context") or example.get("input") or "")
        if context:
            instruction = f"{instruction}\n\n{context}"
        reply = example["response" if shape == "instruction_response" else "output"]
        messages = [_message("user", instruction), _message("assistant", reply)]
    elif shape == "text":
        messages = parse_transcript(example["text"])
    else:
        raise ValueError(f"Unknown SFT shape {shape!r}.")
    # A trailing question, or a trailing empty reply (HH transcripts end with "Assistant:" at times), has no target.
    while messages and (messages[-1]["role"] != "assistant" or not messages[-1]["content"]):
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant reply")
    return messages


def to_messages_dataset(dataset, source: str = "dataset"):
    """Convert a `datasets.Dataset` of any SFT shape to one `messages` column; unusable rows are dropped."""
    shape = detect_sft_shape(dataset.column_names)

    def convert(example):
        try:
            return {"messages": to_conversation(example, shape), "_ok": True}
        except (ValueError, TypeError, KeyError):
            return {"messages": [], "_ok": False}

    converted = dataset.map(convert, remove_columns=dataset.column_names, desc=f"Converting {shape} rows")
    return _keep_usable(converted, source, what="conversations with an assistant reply")


def normalize_messages(messages) -> list[dict[str, str]]:
    """{"role"/"from", "content"/"value"} turns to plain {"role", "content"} with our three role names."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of turns, got {type(messages).__name__}")
    out = []
    for turn in messages:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        out.append(_message(role, content))
    return out


def _message(role: Any, content: Any) -> dict[str, str]:
    name = ROLE_ALIASES.get(str(role).strip().lower())
    if name is None:
        raise ValueError(f"unknown role {role!r}")
    return {"role": name, "content": _text(content)}


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value.strip()


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A string is one message in `role`; a transcript string or a list of messages keeps its own roles."""
    if isinstance(value, list):
        return normalize_messages(value)
    if role == "user" and _transcript_style(value) is not None:
        return parse_transcript(value)
    return [_message(role, value)]


# "### Human: ... ### Assistant: ..." (Dolly / OpenAssistant-style exports) and Anthropic HH
# "\n\nHuman: ...\n\nAssistant: ...". The HH markers only count at the start or after a blank line,
# so a reply that mentions "Human:" mid-sentence stays one message.
_HASH_MARKER = re.compile(r"###\s*(Human|User|Assistant|System)\s*:", re.IGNORECASE)
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant|System):", re.IGNORECASE)


def _transcript_style(text: str) -> re.Pattern | None:
    if _HASH_MARKER.search(text):
        return _HASH_MARKER
    if _HH_MARKER.search(text):
        return _HH_MARKER
    return None


def parse_transcript(text: str) -> list[dict[str, str]]:
    """ "### Human: hi ### Assistant: hello" or "\\n\\nHuman: hi\\n\\nAssistant: hello" -> messages.

    The last message may be an empty assistant turn (a transcript that ends with "Assistant:").
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a transcript string, got {type(text).__name__}")
    marker = _transcript_style(text)
    if marker is None:
        raise ValueError('no "Human:"/"Assistant:" speaker markers in the text')
    pieces = marker.split(text)  # [before, role1, content1, role2, content2, ...]
    if pieces[0].strip():
        raise ValueError("text before the first speaker marker")
    return [_message(role, content) for role, content in zip(pieces[1::2], pieces[2::2])]


# ----------------------------------------------------------------------------------------------------
# Conversion: preference pairs


def detect_preference_shape(columns) -> str:
    columns = set(columns)
    if {"chosen", "rejected"} <= columns:
        for prompt_column in ("prompt", "question", "instruction"):
            if prompt_column in columns:
                return prompt_column
        return "shared_prefix"
    raise ValueError(
        f"The dataset has columns {sorted(columns)}, none of the preference shapes DPO accepts: "
        + "; ".join(PREFERENCE_SHAPES) + "."
    )


def to_preference(example: dict[str, Any], shape: str | None = None) -> dict[str, list[dict[str, str]]]:
    """One example as {"prompt", "chosen", "rejected"} message lists; ValueError if it is unusable.

    Two full conversations (HH transcripts, or message lists) are split where they part: the turns they
    share are the prompt, which ends with the user's turn; what follows in each is the continuation.
    """
    shape = shape or detect_preference_shape(example)
    if shape == "shared_prefix":
        chosen = _as_conversation(example["chosen"])
        rejected = _as_conversation(example["rejected"])
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # Back off to the last user turn: the continuations start with the assistant speaking.
        while shared > 0 and chosen[shared - 1]["role"] != "user":
            shared -= 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _as_messages(example[shape], "user")
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt = prompt[:-1]  # "...\n\nAssistant:" at the end of an HH-style prompt
        chosen = _as_messages(example["chosen"], "assistant")
        rejected = _as_messages(example["rejected"], "assistant")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt does not end with a user turn")
    for name, continuation in (("chosen", chosen), ("rejected", rejected)):
        if not continuation or continuation[0]["role"] != "assistant" or not continuation[0]["content"]:
            raise ValueError(f"the {name} continuation does not start with an assistant reply")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _as_conversation(value: Any) -> list[dict[str, str]]:
    if isinstance(value, list):
        return normalize_messages(value)
    messages = parse_transcript(value)
    while messages and not messages[-1]["content"]:
        messages.pop()
    return messages


def to_preference_dataset(dataset, source: str = "dataset"):
    """Convert a `datasets.Dataset` of any preference shape; pairs without a usable prompt are dropped."""
    shape = detect_preference_shape(dataset.column_names)

    def convert(example):
        try:
            return {**to_preference(example, shape), "_ok": True}
        except (ValueError, TypeError, KeyError):
            return {"prompt": [], "chosen": [], "rejected": [], "_ok": False}

    converted = dataset.map(convert, remove_columns=dataset.column_names, desc="Converting preference pairs")
    return _keep_usable(converted, source, what="pairs with a user prompt and two different assistant replies")


def _keep_usable(converted, source: str, what: str):
    total = len(converted)
    kept = converted.filter(lambda example: example["_ok"]).remove_columns("_ok")
    if len(kept) == 0:
        raise ValueError(f"Dataset {source!r}: none of its {total} rows are usable {what}.")
    if len(kept) < total:
        logger.warning("Dataset %r: dropped %d of %d rows that are not usable %s.", source, total - len(kept), total, what)
    return kept
