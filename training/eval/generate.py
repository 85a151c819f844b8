"""`iterative-llm generate RUN_OR_MODEL "prompt"`: continue a prompt with a trained model.

RUN_OR_MODEL is a finished run folder (it is a model folder), a checkpoint folder inside a run
(`RUN/checkpoints/step_00000600`: the tokenizer is read from the run), or any model folder.

`--cache static` keeps keys and values in buffers of the final length instead of growing them
each step; `--compile` (which needs the static cache, and uses it unless told otherwise) also
compiles the decoding step with torch.compile: slow to start, then faster per token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from iterative_llm.command_line import CommandParser, parse_command_line, shell_word
from iterative_llm.console import make_output_safe
from iterative_llm.run_folder import run_of_checkpoint

from training.machine import default_device

# Sampling defaults, set here only: `iterative-llm generate`, the samples logged during training
# (evaluate.sample) and the exported folder's generation_config.json all sample this way.
TEMPERATURE = 0.8
TOP_K = 50


def find_model_folder(path: str | Path) -> tuple[Path, Path]:
    """(folder with the weights, folder with the tokenizer) for a run, checkpoint or model folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder (e.g. runs/tiny) or a model folder.")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        tokenizer_dir = path if (path / "tokenizer.json").is_file() else run_of_checkpoint(path)
        return path, tokenizer_dir
    from iterative_llm.run_folder import latest_checkpoint

    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        print(f"{path} has no final model yet; using its latest checkpoint {checkpoint}", file=sys.stderr)
        return checkpoint, path
    raise FileNotFoundError(
        f"{path} holds no model: no config.json with safetensors weights and no checkpoints. "
        f"Train one with `iterative-llm train --out {shell_word(path)}` first."
    )


@dataclass
class GenerateArguments:
    model: str = field(metadata={"positional": True, "metavar": "RUN_OR_MODEL",
                                 "help": "run folder, checkpoint folder or model folder"})
    prompt: str = field(default="", metadata={"positional": True, "nargs": "?", "metavar": "PROMPT",
                                              "help": "text to continue (empty: the start of a document)"})
    max_new_tokens: int = field(default=100, metadata={
        "help": "tokens to generate; a long prompt slides out of the model's context to make room for them"})
    temperature: float = field(default=TEMPERATURE, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=TOP_K, metadata={"help": "sample among the k most likely tokens"})
    num_samples: int = field(default=1, metadata={"help": "texts to write"})
    seed: int | None = field(default=None, metadata={"help": "seed for repeatable sampling"})
    cache: Literal["dynamic", "static"] | None = field(
        default=None,
        metadata={"help": "key/value cache: dynamic or static (none given: static with --compile, else dynamic)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decoding step (static cache)"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when available, else mps on a Mac, else cpu), cpu, cuda, cuda:1, mps, ..."})

    def __post_init__(self):
        # A ValueError here is a usage error on the command line (parse_command_line).
        if self.compile and self.cache == "dynamic":
            raise ValueError("--compile needs the static cache: drop --cache dynamic (or use --cache static)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a device: auto, cpu, cuda, cuda:1, mps, ...") from None
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError("--max_new_tokens and --num_samples must be at least 1")
        if self.num_samples > 1 and self.temperature <= 0:
            raise ValueError("--num_samples above 1 needs sampling: greedy decoding (--temperature 0) gives one text")


def build_parser() -> CommandParser:
    return CommandParser(GenerateArguments, prog="iterative-llm generate", description=__doc__)


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    (args,) = parse_command_line(build_parser(), argv)
    cache = args.cache or ("static" if args.compile else "dynamic")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import iterative_llm  # noqa: F401  (registers the model with the Auto classes)
    from iterative_llm.tokenization import check_tokenizer_matches_model, load_tokenizer

    hf_logging.disable_progress_bar()  # the weight-loading bar would mix with the generated text
    try:
        model_dir, tokenizer_dir = find_model_folder(args.model)
        tokenizer = load_tokenizer(tokenizer_dir)
        device = default_device() if args.device == "auto" else torch.device(args.device)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
        check_tokenizer_matches_model(tokenizer, model.config)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"iterative-llm generate: {err}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # Documents were trained with the boundary token first, so a prompt starts with it too.
    ids = [tokenizer.bos_token_id] + tokenizer.encode(args.prompt, add_special_tokens=False)
    greedy = args.temperature <= 0
    try:
        rows, note = continue_ids(
            model, ids, args.max_new_tokens, num_samples=args.num_samples, do_sample=not greedy,
            temperature=None if greedy else args.temperature, top_k=None if greedy else args.top_k,
            pad_token_id=tokenizer.pad_token_id, **cache_settings(cache, args.compile, model.device),
        )
    except Exception as err:  # torch.compile fails in many ways (no C++ compiler, unsupported op, ...)
        if not args.compile:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"iterative-llm generate: --compile failed ({type(err).__name__}: {reason}). Run without --compile.",
              file=sys.stderr)
        return 1
    if note:
        print(f"iterative-llm generate: note: {note}", file=sys.stderr)
    for i, row in enumerate(rows):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(row, skip_special_tokens=True))
    return 0


@torch.no_grad()
def continue_ids(model, ids: list[int], max_new_tokens: int, *, num_samples: int = 1, device=None,
                 **generate_kwargs) -> tuple[list[list[int]], str | None]:
    """`max_new_tokens` new token ids after `ids`, for each of `num_samples` samples, however long the prompt.

    The model sees at most `max_position_embeddings` tokens. When the prompt and the new tokens do not
    fit together, the window slides, as it did over documents in training: the model sees the last tokens
    of the prompt (and, past one context, of its own text). Fewer tokens come back only when the model
    ends the text (its end-of-text token). Returns (new ids per sample, a note saying what was cut or None).
    """
    context = model.config.max_position_embeddings
    generate_kwargs["device"] = device or model.device
    if len(ids) + max_new_tokens <= context:
        return _generate(model, ids, max_new_tokens, num_samples, generate_kwargs), None
    if max_new_tokens < context:  # one pass that sees the end of the prompt
        keep = context - max_new_tokens
        note = (f"the prompt is {len(ids)} tokens and {max_new_tokens} new tokens were asked for, more than the "
                f"model's context of {context} tokens: the model sees the last {keep} tokens of the prompt.")
        return _generate(model, ids[-keep:], max_new_tokens, num_samples, generate_kwargs), note
    # More new tokens than one context holds: generate in steps, each seeing the half context before it.
    history = context // 2
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, (list, tuple)) else [stop]) - {None}
    rows = []
    for _ in range(num_samples):
        new: list[int] = []
        while len(new) < max_new_tokens:
            window = (ids + new)[-history:] if len(ids) + len(new) > history else ids + new
            step = min(context - len(window), max_new_tokens - len(new))
            got = _generate(model, window, step, 1, generate_kwargs)[0]
            ended = next((i for i, token in enumerate(got) if token in stop), None)
            new += got if ended is None else got[: ended + 1]
            if ended is not None:
                break
        rows.append(new)
    note = (f"{max_new_tokens} new tokens are more than the model's context of {context} tokens: they were "
            f"generated in steps, each seeing the {history} tokens before it.")
    return rows, note


def _generate(model, ids: list[int], max_new_tokens: int, num_samples: int, generate_kwargs: dict) -> list[list[int]]:
    kwargs = dict(generate_kwargs)
    input_ids = torch.tensor([ids], device=kwargs.pop("device"))
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            num_return_sequences=num_samples, **kwargs)
    return output[:, len(ids):].tolist()


def cache_settings(cache: str, compile: bool, device: torch.device) -> dict:
    """generate() arguments for the cache choice. transformers compiles the decoding step by itself
    for a static cache on GPUs, and only there: it is asked to on other devices, and told not to
    when --compile was not given, so the flag alone decides."""
    if cache == "dynamic":
        return {}
    from transformers import CompileConfig

    if not compile:
        return {"cache_implementation": "static", "disable_compile": True}
    # CUDA graphs ("reduce-overhead") remove the per-kernel launch cost on GPUs; they do not exist on CPU.
    compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        compile_config._compile_all_devices = True  # transformers' switch for compiling off the GPU
    return {"cache_implementation": "static", "compile_config": compile_config}


if __name__ == "__main__":
    sys.exit(main())
