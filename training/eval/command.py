"""`iterative-llm eval`: put any causal language model next to GPT-2 on the field's yardsticks.

    iterative-llm eval runs/mine --hellaswag hub --text my_val.txt
    iterative-llm eval runs/a runs/b gpt2 --hellaswag hellaswag_val.jsonl --limit 1000 --json results.json

Each MODEL is a run folder, a model folder, or a Hugging Face hub id. The command prints one table,
a column per model:
  - `--hellaswag`: HellaSwag acc and acc_norm, zero-shot, scored as lm-eval-harness scores it
    (training/eval/hellaswag.py), with published figures of GPT-2-sized models beside them;
  - `--text`: bits per byte on any text (files, folders or a hub dataset, as `train --data` takes
    them), each model with its own tokenizer, so models with different vocabularies compare.

The same folders also work in lm-eval-harness itself (pip install 'iterative-llm[eval]'):
    lm_eval --model hf --model_args pretrained=runs/mine,trust_remote_code=True --tasks hellaswag
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from iterative_llm.command_line import CommandParser, parse_command_line
from iterative_llm.console import make_output_safe

from training.data.sources import iter_documents
from training.eval.hellaswag import HELLASWAG_REFERENCES, HellaSwagError, load_items, model_max_length, score_hellaswag
from training.machine import default_device


class EvalInputError(ValueError):
    """A model, file or option cannot be used; the message says which and how to fix it."""


@dataclass
class EvalArguments:
    models: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "MODEL",
                                        "help": "run folder, model folder or hub id (one or more)"})
    hellaswag: str | None = field(default=None, metadata={
        "metavar": "PATH|hub",
        "help": "a JSONL file of HellaSwag records, or `hub` for the validation split of Rowan/hellaswag"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N HellaSwag items"})
    text: str | None = field(default=None, metadata={
        "metavar": "SOURCE",
        "help": "text for bits per byte: files, folders, or a hub dataset (NAME[:CONFIG][@SPLIT])"})
    text_column: str = field(default="text", metadata={"help": "column holding the text (jsonl, parquet, hub)"})
    doc_separator: str | None = field(default=None, metadata={"help": "split .txt files into documents on this string"})
    max_documents: int | None = field(default=None, metadata={"help": "read at most this many documents"})
    window: int | None = field(default=None, metadata={"help": "tokens per scoring window (none: the model's context)"})
    stride: int | None = field(default=None, metadata={
        "help": "tokens between windows of a long document (none: window / 2)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when available, else mps on a Mac, else cpu), cpu, cuda, cuda:1, mps, ..."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "the dtype the models are loaded in"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow hub models that ship their own code (our folders do not need it)"})
    json: str | None = field(default=None, metadata={"metavar": "OUT",
                                                     "help": "also write the figures to this JSON file"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        # A ValueError here is a usage error on the command line (parse_command_line).
        if not (self.hellaswag or self.text):
            raise ValueError("nothing to evaluate: give --hellaswag PATH|hub and/or --text SOURCE")
        for name in ("limit", "max_documents", "window", "stride", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")


def build_parser() -> CommandParser:
    return CommandParser(EvalArguments, prog="iterative-llm eval", description=__doc__)


def load_model(name: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a run folder, model folder or hub id, with messages that say what is wrong."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import iterative_llm  # noqa: F401  (registers our model with the Auto classes)

    from training.eval.generate import find_model_folder

    path = Path(name).expanduser()
    if path.exists():
        try:
            model_dir, tokenizer_dir = find_model_folder(path)
        except FileNotFoundError as err:
            raise EvalInputError(str(err)) from None
        if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise EvalInputError(
                f"{name} has no tokenizer (no tokenizer.json or tokenizer_config.json beside the weights): the model's "
                f"text cannot be encoded. Save it there with tokenizer.save_pretrained({str(model_dir)!r})."
            )
        source = str(model_dir)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".json", ".txt", ".jsonl")):
        raise EvalInputError(f"{name} does not exist: give a run folder, a model folder or a hub id such as gpt2.")
    else:
        source, tokenizer_dir = name, name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = ("the folder" if path.exists() else
                 "the Hugging Face hub (there is no local folder of that name; is the hub reachable?)")
        raise EvalInputError(f"could not load {name} from {where}: {err}") from None
    if len(tokenizer) > model.config.vocab_size:
        raise EvalInputError(f"{name}: its tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}: "
                             f"they do not belong together.")
    return model.to(device).eval(), tokenizer


def evaluate_models(args: EvalArguments) -> dict:
    """Every model on every requested yardstick; returns the figures that --json writes."""
    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    items = load_items(args.hellaswag, limit=args.limit) if args.hellaswag else None
    documents = None
    if args.text:
        try:
            documents = list(iter_documents(args.text, text_column=args.text_column, doc_separator=args.doc_separator,
                                            max_documents=args.max_documents))
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise EvalInputError(f"--text {args.text}: {err}") from None
    results: dict = {"models": {}, "settings": {
        "hellaswag": args.hellaswag, "hellaswag_items": len(items) if items else None, "text": args.text,
        "device": str(device), "dtype": args.dtype}}
    for name in args.models:
        model, tokenizer = load_model(name, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code)
        figures: dict = {"parameters": model.num_parameters()}
        context = model_max_length(model)
        if items:
            scores = score_hellaswag(model, tokenizer, items, max_length=context, batch_size=args.batch_size,
                                     progress=args.progress, desc=f"hellaswag {name}")
            figures.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"],
                           hellaswag_items=scores["items"])
        if documents:
            from training.eval.bits_per_byte import text_bits_per_byte

            window = min(args.window or context, context)
            try:
                text = text_bits_per_byte(model, tokenizer, documents, window=window, stride=args.stride,
                                          batch_size=args.batch_size, progress=args.progress)
            except ValueError as err:
                raise EvalInputError(f"--text with {name}: {err}") from None
            figures.update(text_bits_per_byte=text["bits_per_byte"], text_loss=text["loss"], text_bytes=text["bytes"],
                           text_tokens=text["tokens"], text_documents=text["documents"], text_window=window,
                           text_stride=args.stride or max(1, window // 2))
        results["models"][name] = figures
        del model
    results["hellaswag_references"] = [
        {"model": model, "acc_norm": value, "source": source} for model, value, source in HELLASWAG_REFERENCES]
    return results


# (label, key in a model's figures, format) for the printed table, in order
ROWS = [
    ("parameters", "parameters", lambda v: f"{v:,}"),
    ("HellaSwag acc_norm", "hellaswag_acc_norm", lambda v: f"{100 * v:.2f}%"),
    ("HellaSwag acc", "hellaswag_acc", lambda v: f"{100 * v:.2f}%"),
    ("HellaSwag items", "hellaswag_items", lambda v: f"{v:,}"),
    ("text bits per byte", "text_bits_per_byte", lambda v: f"{v:.4f}"),
    ("text loss (nats/token)", "text_loss", lambda v: f"{v:.4f}"),
    ("text bytes", "text_bytes", lambda v: f"{v:,}"),
    ("text tokens", "text_tokens", lambda v: f"{v:,}"),
]


def format_table(results: dict) -> str:
    """One table, a column per model, then the HellaSwag reference figures with their sources."""
    models = results["models"]
    rows = [("", *models)]
    for label, key, fmt in ROWS:
        if any(key in figures for figures in models.values()):
            rows.append((label, *(fmt(f[key]) if key in f else "-" for f in models.values())))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    if any("hellaswag_acc_norm" in f for f in models.values()):
        lines += ["", "HellaSwag acc_norm of models of GPT-2's size, zero-shot (only the first row is scored as here):"]
        lines += [f"  {100 * value:5.1f}%  {model}: {source}" for model, value, source in HELLASWAG_REFERENCES]
        lines += [f"  {25.0:5.1f}%  chance (four endings)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    (args,) = parse_command_line(build_parser(), argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would mix with the scoring bars
    try:
        results = evaluate_models(args)
    except (EvalInputError, HellaSwagError) as err:
        print(f"iterative-llm eval: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
