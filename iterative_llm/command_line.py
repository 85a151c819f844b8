"""The one way every `iterative-llm` command reads its command line.

A command declares its options as dataclass fields, each with its help beside it
(`metadata={"help": ...}`), and parses them with `CommandParser`, a `transformers.HfArgumentParser`.
That is the Hugging Face and TRL ecosystem's own style, so sft and dpo take TRL's hundreds of
options (and its `--config`) through TRL's parser of the same kind, and `parse_command_line` turns
a mistyped option or a bad value into one usage error with a hint, exit status 2, for every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
from typing import Any, Callable, Literal, Union, get_args, get_origin

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

# The words HfArgumentParser's string_to_bool reads as a boolean.
_BOOLEAN_WORDS = ("yes", "no", "true", "false", "t", "f", "y", "n", "1", "0")


def shell_word(value) -> str:
    """`value` (a path, say) as one word of a command the user may paste back into their shell: quoted
    where it has spaces or other special characters, the way this system's shell reads quotes
    (cmd.exe and PowerShell take double quotes; POSIX shells single ones), as it is otherwise."""
    text = str(value)
    if sys.platform == "win32":
        import subprocess

        return subprocess.list2cmdline([text])
    import shlex

    return shlex.quote(text)


def did_you_mean(name: str, choices: list[str]) -> str:
    """The hint `" Did you mean 'x'?"` naming the choice closest to `name`, or "" when none is close.

    Dashes and underscores count alike (`--max-step` is close to `--max_steps`); the first spelling
    of each name in `choices` is the one named, so a listed `--max_steps` wins over its alias."""
    def key(text: str) -> str:
        return text.lstrip("-").replace("-", "_")

    spelling: dict[str, str] = {}
    for choice in choices:
        spelling.setdefault(key(choice), choice)
    close = difflib.get_close_matches(key(name), list(spelling), n=1, cutoff=0.6)
    return f" Did you mean {spelling[close[0]]!r}?" if close else ""


def shown(value: Any) -> str:
    """A value as it would be typed on the command line (`none`, `true`, `[a, b]`), for `--help`."""
    if value is None:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _without_none(kind: Any) -> Any:
    """`int | None` -> int; any other type as it is."""
    if get_origin(kind) in (Union, types.UnionType):
        rest = [arg for arg in get_args(kind) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _allows_none(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind)


def metavar(kind: Any) -> str | None:
    """How `--help` names an option's value, from its type: N, X, TEXT, true|false, LIST.
    None for a choice (argparse then lists the choices)."""
    kind = _without_none(kind)
    if get_origin(kind) is Literal:
        return None
    origin = get_origin(kind) or kind
    names = {bool: "true|false", int: "N", float: "X", str: "TEXT", list: "LIST"}
    return names.get(origin, "VALUE")


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A value parser that also takes `none` (or `null`) for an option whose default is None, so
    `--seed none` means what `(default: none)` in --help says."""
    def parse(raw: str) -> Any:
        return None if raw.lower() in ("none", "null") else kind(raw)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


class HelpFormatter(argparse.HelpFormatter):
    """`--help` with every option's default as it would be typed (`(default: none)`), and a
    description laid out by hand (a module docstring) kept as it is; a one-line one is wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shows_default = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        shows_default = shows_default and not action.required and action.default is not argparse.SUPPRESS
        if shows_default and "%(default)" not in text:
            text += f" (default: {shown(action.default)})".replace("%", "%%")  # argparse %-formats help
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CommandParser(HfArgumentParser):
    """An HfArgumentParser for an `iterative-llm` command, built from its dataclasses.

    - Options are never abbreviated: `--max_step` is a typo, not `--max_steps`.
    - Each option is listed once, underscores first, with the dashed spelling beside it as an alias
      (HfArgumentParser adds `--max-new-tokens` for `max_new_tokens`), and its default.
    - A field with metadata `{"positional": True}` is a positional argument (HfArgumentParser has
      none); `nargs` and `metavar` in the metadata go to argparse as they are.
    - An option whose default is None also takes `none`; a True boolean's `--no_X` says what it is.
    """

    def __init__(self, dataclass_types: Any = (), **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    # HfArgumentParser calls this (a staticmethod there) through self for every dataclass field.
    def _parse_dataclass_field(self, parser: Any, field: dataclasses.Field) -> None:
        if field.metadata.get("positional"):
            self._add_positional(parser, field)
            return
        kind, first = field.type, len(parser._actions)
        HfArgumentParser._parse_dataclass_field(parser, field)
        option, *complement = parser._actions[first:]
        if option.metavar is None and option.choices is None:
            option.metavar = metavar(kind)
        if _allows_none(kind) and option.type in (int, float, str):
            option.type = _none_or(option.type)
        for action in complement:  # `--no_X`, which HfArgumentParser adds for a boolean that is True
            action.help, action.default = f"the same as --{field.name} false", argparse.SUPPRESS

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # A boolean option takes an optional value (`--compile false`), so argparse would take the word
        # after a bare `--compile` as that value: `generate RUN --compile "Once upon"` would fail. A word
        # that is not true/false/yes/no/... after one is left to the positionals instead.
        args = list(sys.argv[1:] if args is None else args)
        flags = {name for action in self._actions if action.type is string_to_bool and action.nargs == "?"
                 for name in action.option_strings}
        for i, token in enumerate(args[:-1]):
            if token == "--":
                break
            if token in flags and args[i + 1].lower() not in _BOOLEAN_WORDS:
                args[i] = token + "=true"
        return super().parse_known_args(args, namespace)

    @staticmethod
    def _add_positional(parser: Any, field: dataclasses.Field) -> None:
        kwargs = {k: v for k, v in field.metadata.items() if k != "positional"}
        kind = _without_none(field.type)
        kwargs["type"] = get_args(kind)[0] if get_origin(kind) is list else kind
        kwargs.setdefault("metavar", field.name.upper())
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        parser.add_argument(field.name, **kwargs)


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The options a parser lists in --help, in order: the names a hint may suggest."""
    return [name for action in parser._actions if action.help is not argparse.SUPPRESS
            for name in action.option_strings]


def unrecognized(parser: argparse.ArgumentParser, rest: list[str]) -> str:
    """The usage error for strings no option took, with a hint for the first one that looks like an option."""
    unknown = next((token for token in rest if token.startswith("-")), None)
    hint = did_you_mean(unknown.split("=")[0], option_names(parser)) if unknown else ""
    return f"unrecognized arguments: {' '.join(rest)}.{hint}"


def parse_command_line(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    parse: Callable[[list[str] | None], tuple] | None = None,
    extra_arguments: Callable[[list[str], argparse.Namespace], str] | None = None,
) -> list[Any]:
    """Parse `argv` with `parser` and return what was parsed, or stop with a usage error (exit 2).

    By default a CommandParser's dataclasses come back, built only once no string is left over, so
    a mistyped option is named before any value is judged. `extra_arguments(rest, namespace)` may
    explain left-over words that are not options (chat: "type it at the prompt"). A parser with its
    own layering passes `parse(argv)`, which returns what it parsed followed by the strings left
    over: TrlParser's `parse_args_and_config` for sft and dpo, presets and `--model.FIELD` for train.
    Left-over strings are an error with a "Did you mean" hint. A ValueError (a dataclass refusing a
    value in `__post_init__`) or an OSError (a `--config` file that cannot be read) becomes a
    one-line usage error, not a traceback.
    """
    try:
        if parse is None:
            # Intermixed: positionals may come after options (`generate RUN --compile "Once upon"`),
            # which plain argparse refuses once its first positionals are matched.
            namespace, rest = parser.parse_known_intermixed_args(argv)
            if rest and extra_arguments is not None and not any(token.startswith("-") for token in rest):
                parser.error(extra_arguments(rest, namespace))
            if rest:
                parser.error(unrecognized(parser, rest))
            return list(parser.parse_dict(vars(namespace)))
        *parsed, rest = parse(argv)
    except (ValueError, OSError) as err:
        parser.error(" ".join(str(err).strip().splitlines()))
    if rest:
        parser.error(unrecognized(parser, rest))
    return parsed
