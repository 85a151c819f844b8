"""Data and model-folder plumbing shared by `training/sft.py` and `training/dpo.py`.

The two scripts differ only in their trainer and their evaluation; everything else lives here once,
so the two cannot drift apart (STYLE.md): loading a dataset from the hub or local files, turning each
common shape into one conversation format, holding out a slice for evaluation, loading the starting
model with its chat template, and finishing the output folder.

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

import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Importing the package registers our model type with the Auto classes, before any folder is loaded.
from iterative_llm.tokenization import END_OF_TURN, check_tokenizer_matches_model

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


# ----------------------------------------------------------------------------------------------------
# Model folders: shared by both scripts


class InputError(ValueError):
    """A problem with what the user gave (data, model folder, options): reported in one line, no traceback."""


def parse_command_line(parser, argv: list[str] | None):
    """`parser.parse_args_and_config` (TrlParser), with a mistyped option or a bad value reported as a usage
    error, not a traceback."""
    try:
        *parsed, unknown = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    except ValueError as err:  # a value a config's __post_init__ refuses
        parser.error(str(err))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return parsed


def resolve_device_defaults(args) -> None:
    """TRL defaults to bf16 and gradient checkpointing, which fail or only cost time on a CPU.

    `bf16=None` becomes True only on a GPU that supports it; activation checkpointing left unset
    (`activation_checkpointing`, or its deprecated alias `gradient_checkpointing`) becomes False on a
    CPU and TRL's default (True) on a GPU. Setting the new name keeps transformers (5.x) from warning
    that the old one is deprecated. Explicit values are left alone. On a machine
    with no accelerator at all, `use_cpu` is set (so `torchrun` gives CPU data parallelism rather
    than independent copies of the run) and the data loader does not pin memory.
    """
    import torch

    gpu = torch.cuda.is_available() and not args.use_cpu
    if args.bf16 is None and not args.fp16:
        args.bf16 = bool(gpu and torch.cuda.is_bf16_supported())
    if getattr(args, "activation_checkpointing", None) is None and args.gradient_checkpointing is None:
        args.activation_checkpointing = args.gradient_checkpointing = gpu
    accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if not accelerator:
        args.use_cpu = True
    if not gpu:
        args.dataloader_pin_memory = False  # pinned memory only speeds up copies to a GPU


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant reply: the chat template's `<|end|>` (if the vocabulary has it), then eos."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[END_OF_TURN]] if END_OF_TURN in vocab else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_tokenizer_with_template(path: str, trust_remote_code: bool = False, revision: str | None = None,
                                 template_file: str | None = None):
    """The model folder's tokenizer, which must carry a chat template (SFT, DPO and chat all render with it).

    `template_file` (a .jinja file) replaces the folder's template, or supplies one it lacks.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if template_file:
        if not (os.path.isfile(template_file) and template_file.endswith((".jinja", ".j2"))):
            raise ValueError(f"--chat_template_path {template_file!r}: expected a .jinja file.")
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The model folder {path!r} has no chat template: SFT, DPO and chat render conversations with it. "
            f"Save the tokenizer with one (iterative_llm.tokenization.CHAT_TEMPLATE, written as chat_template.jinja "
            f"in the folder), or pass --chat_template_path FILE.jinja."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_starting_model(model_args, training_args):
    """(model, tokenizer) from `--model_name_or_path`, checked against each other; `max_length` capped
    at the model's context."""
    path = model_args.model_name_or_path
    if not path:
        raise ValueError("No model given: pass --model_name_or_path (a model folder, e.g. a pretraining run).")
    trust = training_args.trust_remote_code
    template_file = getattr(training_args, "chat_template_path", None)
    tokenizer = load_tokenizer_with_template(path, trust, model_args.model_revision, template_file)
    if template_file:
        training_args.chat_template_path = None  # applied above; TRL must not apply it again
    model = load_causal_lm(path, model_args, trust)
    check_tokenizer_matches_model(tokenizer, model.config)
    fit_max_length(training_args, model)
    return model, tokenizer


def load_causal_lm(path: str, model_args, trust_remote_code: bool = False):
    """The starting model, loaded the way TRL would load it from a path (float32 unless asked otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype or "float32"
    if dtype != "auto":
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=model_args.model_revision)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def fit_max_length(args, model) -> None:
    """Sequences longer than the model's context cannot run: cap `max_length` at `max_position_embeddings`."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and (args.max_length is None or args.max_length > limit):
        logger.warning("max_length %s is more than the model's context; using %d.", args.max_length, limit)
        args.max_length = limit


def peft_config_from(model_args):
    """TRL's LoRA config from the `--use_peft --lora_*` flags, with every linear layer as the default target
    (PEFT knows no default target modules for a new model type)."""
    from trl import get_peft_config

    if model_args.use_peft and not model_args.lora_target_modules and not model_args.lora_target_parameters:
        model_args = copy.copy(model_args)
        model_args.lora_target_modules = "all-linear"
    return get_peft_config(model_args)


def default_output_dir(args, model_path: str, stage: str) -> None:
    """Without --output_dir, write next to the starting folder: runs/NAME -> runs/NAME-sft."""
    if args.output_dir in (None, "", "trainer_output"):
        args.output_dir = f"{str(model_path).rstrip('/')}-{stage}"


def read_model_card(path: str) -> str:
    """The starting folder's model card, carried into the output folder below the new stage's section."""
    card = Path(path) / "README.md"
    return card.read_text(encoding="utf-8") if card.is_file() else ""


def save_chat_model(trainer, tokenizer, output_dir: str, base_card: str) -> None:
    """Write a plain Hugging Face model folder: weights (a LoRA adapter merged in; the adapter itself in
    `adapter/`), config and modeling files, tokenizer with chat template, and a generation config that
    stops at the end of the assistant's turn. The previous stages' model card is carried over."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        if trainer.accelerator.is_main_process:
            model.save_pretrained(os.path.join(output_dir, "adapter"))
            merged = model.merge_and_unload()
            _stop_at_end_of_turn(merged, tokenizer)
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    else:
        _stop_at_end_of_turn(model, tokenizer)
        trainer.save_model(output_dir)  # gathers sharded weights (FSDP, DeepSpeed); writes on the main process
    if trainer.accelerator.is_main_process:
        card = Path(output_dir) / "README.md"  # TRL's checkpoint saves write a card of their own: replace it
        if base_card:
            card.write_text(base_card, encoding="utf-8")
        else:
            card.unlink(missing_ok=True)


def _stop_at_end_of_turn(model, tokenizer) -> None:
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def write_summary(output_dir: str, stage: str, summary: dict[str, Any]) -> None:
    """`{stage}_summary.json` beside the weights: resolved arguments, metrics and versions of this run."""
    import platform

    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    summary = dict(summary)
    summary["versions"] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
    }
    Path(output_dir, f"{stage}_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
