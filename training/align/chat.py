"""Talk to a chat model in the terminal: `iterative-llm chat runs/NAME-sft`, then type at the `you>` prompt.

Each turn renders the whole conversation with the model's chat template, streams the reply token by
token as it is generated, and adds it to the conversation. Commands: `/reset` starts a new
conversation, `/exit` (or Ctrl-D) leaves; Ctrl-C during a reply stops that reply, Ctrl-C at the
prompt leaves. When the conversation outgrows the model's context, the oldest turns are dropped.
Lines can also be piped in (`echo "hi" | iterative-llm chat runs/NAME-sft`): each is answered in turn.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch
from transformers import TextStreamer

from iterative_llm.command_line import CommandParser, parse_command_line
from iterative_llm.console import make_output_safe

from training.align.model_folder import end_of_turn_ids, load_tokenizer_with_template
from training.machine import default_device, fast_matmul_dtype


@dataclass
class ChatArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "the chat model folder; the same as giving it as MODEL, the first argument"}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "a system message that opens the conversation"})
    max_new_tokens: int = field(default=256, metadata={"help": "the longest reply, in tokens"})
    do_sample: bool = field(default=True, metadata={"help": "sample replies (--do_sample false: greedy)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: keep the likeliest tokens up to this mass"})
    repetition_penalty: float = field(default=1.1, metadata={"help": "penalty on tokens already in the conversation"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    device: str | None = field(default=None, metadata={
        "help": "cpu, cuda, mps, ... (none: cuda when there is one, else mps on a Mac, else cpu)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the modeling code shipped in the folder"})


class _ReplyStreamer(TextStreamer):
    """Writes the decoded reply to `out` as it is generated, and keeps the reply's token ids."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.reply_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt
            self.reply_ids.extend(value.reshape(-1).tolist())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class ChatSession:
    """A conversation with a model: `reply(text)` streams and returns the assistant's answer."""

    def __init__(self, model, tokenizer, args: ChatArguments, out: TextIO | None = None):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.out = sys.stdout if out is None else out
        self.stop_ids = end_of_turn_ids(tokenizer)
        # A reply may take at most half the model's context, so some of the conversation always fits.
        self.limit = getattr(model.config, "max_position_embeddings", None)
        self.max_new_tokens = args.max_new_tokens if self.limit is None else min(args.max_new_tokens, self.limit // 2)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system_prompt}] if self.args.system_prompt else []

    def _prompt_ids(self) -> torch.Tensor:
        """The conversation rendered for the next reply, dropping the oldest turns until it fits the context."""
        while True:
            ids = self.tokenizer.apply_chat_template(
                self.messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            if self.limit is None or len(ids) + self.max_new_tokens <= self.limit:
                return torch.tensor([ids], device=self.model.device)
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:  # only the new message is left: keep its end
                return torch.tensor([ids[-(self.limit - self.max_new_tokens) :]], device=self.model.device)
            del self.messages[first : first + 2]  # the oldest exchange
            self.out.write("(older turns dropped to fit the model's context)\n")

    @torch.no_grad()
    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        input_ids = self._prompt_ids()
        sampling = dict(temperature=self.args.temperature, top_p=self.args.top_p) if self.args.do_sample else {}
        streamer = _ReplyStreamer(self.tokenizer, self.out)
        try:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=self.args.do_sample,
                repetition_penalty=self.args.repetition_penalty,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **sampling,
            )
            new_tokens = output[0, input_ids.shape[1] :]
        except KeyboardInterrupt:
            # Ctrl-C stops this reply; what was shown so far is kept as the answer.
            self.out.write(" [stopped]\n")
            new_tokens = streamer.reply_ids
        answer = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, interactive: bool = True) -> int:
    """Read lines until Ctrl-D, Ctrl-C or /exit, answering each. Returns the exit status (0)."""
    out = session.out
    if interactive:
        out.write("Chatting with the model. /reset starts over, /exit or Ctrl-D leaves.\n")
    while True:
        try:
            line = read("you> " if interactive else "").strip()
        except EOFError:
            out.write("\nbye\n")
            return 0
        except KeyboardInterrupt:
            out.write("\ninterrupted, bye\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            out.write("bye\n")
            return 0
        if line == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        out.write("assistant> ")
        out.flush()
        session.reply(line)


def load_chat_model(args: ChatArguments):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer_with_template(args.model_name_or_path, args.trust_remote_code)
    device = torch.device(args.device) if args.device else default_device()
    # bf16 halves the weights' memory where the accelerator computes it natively; elsewhere (a CPU, a
    # card or Mac that only emulates it) float32, which is faster there.
    native = device.type != "cpu" and fast_matmul_dtype(device) == torch.bfloat16
    dtype = torch.bfloat16 if native else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=dtype, trust_remote_code=args.trust_remote_code
    ).to(device).eval()
    return model, tokenizer


USAGE = "iterative-llm chat MODEL [options]   (then type at the `you>` prompt; Ctrl-D or /exit leaves)"


@dataclass
class ChatModelArgument:
    """The model folder as the first argument (`iterative-llm chat runs/tiny-sft`); kept out of
    ChatArguments, which also has --model_name_or_path, the name sft and dpo use."""

    model: str | None = field(default=None, metadata={
        "positional": True, "nargs": "?", "metavar": "MODEL",
        "help": "a chat model folder (written by `iterative-llm sft` or `dpo`), or a hub model name"})


def build_parser() -> CommandParser:
    return CommandParser((ChatModelArgument, ChatArguments), prog="iterative-llm chat", usage=USAGE,
                         description="Talk to a chat model in the terminal.")


def _not_a_message(rest: list[str], namespace) -> str:
    model = namespace.model or "MODEL"
    return (f"unexpected argument {rest[0]!r}: chat takes the model folder only, and reads your messages at its "
            f"`you>` prompt. Run `iterative-llm chat {model}` and type {rest[0]!r} there, or pipe it in: "
            f"echo {rest[0]!r} | iterative-llm chat {model}")


def parse_args(argv: list[str] | None = None) -> ChatArguments:
    """The chat options, with the model folder given as MODEL or --model_name_or_path; usage errors exit."""
    parser = build_parser()
    extra, args = parse_command_line(parser, argv, extra_arguments=_not_a_message)
    if extra.model and args.model_name_or_path and extra.model != args.model_name_or_path:
        parser.error(f"two models given: {extra.model!r} and --model_name_or_path {args.model_name_or_path!r}; give one.")
    args.model_name_or_path = extra.model or args.model_name_or_path
    if not args.model_name_or_path:
        parser.error("no model given: name the chat model folder, e.g. `iterative-llm chat runs/tiny-sft`.")
    return args


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if _looks_local(args.model_name_or_path) and not os.path.isdir(os.path.expanduser(args.model_name_or_path)):
        print(f"iterative-llm chat: no folder {args.model_name_or_path!r}. Give a chat model folder, e.g. "
              f"runs/tiny-sft (written by `iterative-llm sft`).", file=sys.stderr)
        return 2
    hf_logging.disable_progress_bar()  # the weight-loading bar would mix with the conversation
    try:
        model, tokenizer = load_chat_model(args)
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as err:  # no such folder, not a model, no chat template, ...
        print(f"iterative-llm chat: {_load_error(args.model_name_or_path, err)}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return chat_loop(session, interactive=interactive)


def _looks_local(model: str) -> bool:
    """A path rather than a hub name: `./x`, `/x`, `~/x`, or `runs/x` when `runs/` is a folder here."""
    parent = os.path.dirname(model.rstrip("/"))
    return model.startswith((".", "/", "~")) or (parent != "" and os.path.isdir(parent))


def _load_error(model: str, err: Exception) -> str:
    if os.path.exists(os.path.expanduser(model)):
        return str(err)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{model!r} is not a folder here, and loading it from the Hugging Face hub failed ({first_line}). "
            f"Give a chat model folder, e.g. runs/tiny-sft (written by `iterative-llm sft`).")


if __name__ == "__main__":
    raise SystemExit(main())
