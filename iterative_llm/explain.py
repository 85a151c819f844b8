"""`iterative-llm explain MODEL "a sentence"`: walk one sentence through the model, step by step.

The flow, one step each, with the real numbers of this sentence and this model:

    sentence -> tokens (byte pieces) -> token ids -> embeddings -> rotary positions
    -> query/key/value per head -> rotated queries and keys -> scores, scaled, masked, softmax
    -> weighted values -> the residual stream through the blocks -> next-token probabilities

Every number comes from the model's own modules (embed_tokens, embed_norm, rotary_emb, the
block's input_layernorm, q_proj/k_proj/v_proj, q_norm/k_norm, apply_rotary, lm_head), and two
of them are checked against the model's own forward pass: the attention weights against
`output_attentions` (eager attention) and the probabilities against softmax(logits).
Each step names the lines of the modeling file that do it; the line numbers are read from the
source at run time (`inspect`), so they follow the file when it changes.

Outputs: the steps printed to the terminal, and in `--out` (default `explain_out/`) PNG pictures
(attention heatmaps for every layer and head, the chosen head's scores step by step, the
residual stream, the next-token probabilities) and `report.html`, which puts it all in order.

The work is split by job, one module each: `explain_tokens` (tokens and their bytes),
`explain_code` (where the modeling file does each step), `explain_trace` (the computation),
`explain_steps` (the steps in words), `explain_pictures`, `explain_report` (the HTML page), and
this module: loading a model folder and the command line.

matplotlib is needed for the pictures only; the numbers are computed with torch alone.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from .command_line import CommandParser, parse_command_line
from .console import make_output_safe
from .explain_code import code_range
from .explain_pictures import write_pictures
from .explain_report import write_report
from .explain_steps import Step, describe
from .explain_tokens import Token, tokenize, tokens_of
from .explain_trace import ExplainError, Explanation, explain

# The names tests and other modules import from here.
__all__ = [
    "ExplainError", "Explanation", "Step", "Token", "build_parser", "code_range", "describe", "explain", "load",
    "main", "run", "tokenize", "tokens_of", "write_pictures", "write_report",
]


def load(path: str):
    """(model, tokenizer) from a model or run folder, the model with eager attention, in float32."""
    from transformers import AutoModelForCausalLM

    from . import IterativeLLMForCausalLM  # noqa: F401  (registers the Auto classes)
    from .tokenization import load_tokenizer

    if not os.path.isdir(path):
        raise ExplainError(f"no model folder at {path!r}: give a run folder (runs/NAME) or a saved model folder.")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ExplainError(f"{path!r} holds no config.json: it is not a saved model folder (is training finished?).")
    try:
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as err:
        raise ExplainError(f"cannot read {config_path}: {err}") from None
    if model_type != "iterative_llm":
        raise ExplainError(
            f"{path!r} holds a {model_type!r} model; explain walks through iterative-llm models only "
            f"(it calls the model's own modules one by one)."
        )
    try:
        # On the CPU in float32 on every machine, CUDA or Mac alike: explain runs one forward pass of
        # one short text and reads every intermediate into NumPy for its figures and pictures, so an
        # accelerator would save nothing, and float32 on the CPU gives the same figures everywhere.
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    except Exception as err:  # noqa: BLE001  (any load failure becomes one clear line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExplainError(f"cannot load the model in {path!r} with eager attention: {first}") from None
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise ExplainError(f"the model in {path!r} does not support eager attention, which explain needs to see the weights.")
    if type(model).__name__ != "IterativeLLMForCausalLM" or not hasattr(model, "model"):
        raise ExplainError(f"{path!r} loaded as {type(model).__name__}, not an iterative-llm causal LM.")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ExplainError(str(err).splitlines()[0]) from None
    return model.eval(), tokenizer


def run(model, tokenizer, text: str, *, layer: int = 0, head: int = 0, top_k: int = 10,
        out_dir: str | None = "explain_out", model_path: str = "", stream=None) -> tuple[Explanation, list[Step]]:
    """Explain `text`, print the steps to `stream`, and write pictures and report to `out_dir` (if given)."""
    ex = explain(model, tokenizer, text, layer=layer, head=head, top_k=top_k)
    steps = describe(ex)
    if stream is not None:
        for number, step in enumerate(steps, 1):
            print(f"\n=== Step {number}. {step.title} ===", file=stream)
            for ref in step.code:
                print(f"    code: {ref}", file=stream)
            print(step.text, file=stream)
    if out_dir is not None:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            raise ExplainError(f"cannot create the output folder {out_dir!r}: {err.strerror}") from None
        write_pictures(ex, steps, out_dir)
        report = write_report(ex, steps, out_dir, model_path)
        if stream is not None:
            print(f"\nPictures and report written to {out_dir}/ ; open {report} in a browser.", file=stream)
    return ex, steps


@dataclass
class ExplainArguments:
    model: str = field(metadata={"positional": True, "metavar": "MODEL",
                                 "help": "a run folder (runs/NAME) or a saved model folder with its tokenizer"})
    sentence: str = field(metadata={"positional": True, "metavar": "SENTENCE",
                                    "help": "the text to walk through the model"})
    layer: int = field(default=0, metadata={"help": "layer whose attention is shown step by step"})
    head: int = field(default=0, metadata={"help": "attention head shown step by step"})
    top_k: int = field(default=10, metadata={"help": "how many next-token candidates to list"})
    out: str = field(default="explain_out", metadata={"help": "folder for the pictures and report.html"})


def build_parser() -> CommandParser:
    return CommandParser(
        ExplainArguments,
        prog="iterative-llm explain",
        description="Walk a sentence through the model step by step, with the real numbers and pictures.",
    )


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    (args,) = parse_command_line(build_parser(), argv)
    try:
        model, tokenizer = load(args.model)
        run(model, tokenizer, args.sentence, layer=args.layer, head=args.head, top_k=args.top_k,
            out_dir=args.out, model_path=args.model, stream=sys.stdout)
    except ExplainError as err:
        print(f"iterative-llm explain: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
