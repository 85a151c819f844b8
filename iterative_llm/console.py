"""Standard streams every command can print to, whatever the machine's locale.

What the commands print holds characters outside any 8-bit code page: arrows and box lines in
`explain`, curly quotes in samples, and whatever text a model generates (CJK, Greek, emoji).
Python encodes sys.stdout with the locale's encoding: on Windows, output sent to a file or a pipe
is encoded in the ANSI code page (cp1252 and the like), and on a POSIX machine with LC_ALL=C it is
ASCII. Printing one such character there raises UnicodeEncodeError and the command dies halfway
(`iterative-llm explain ... > walk.txt`).

`make_output_safe()`, called first thing by every command's `main`, fixes that once per process:

- a file or a pipe gets UTF-8. Nothing reads those bytes as the terminal's code page; the reader is
  an editor, another program, or a log, and UTF-8 is what they expect and what Python 3.15 writes
  by default (PEP 686). stdout keeps surrogateescape, stderr backslashreplace, as in UTF-8 mode.
- an interactive console keeps its own encoding, with errors="replace": the terminal shows text in
  that encoding, so UTF-8 bytes would appear as garbage there. Replacement turns each character
  the console cannot show into one "?", so the columns of tables and pictures stay in line
  (backslashreplace would widen each one to six or ten characters). A Windows console is not in
  this case at all: Python writes to it through the wide-character API, in UTF-8 (PEP 528).
- stdin read from a file or a pipe (`chat` reads its turns there when not interactive) is decoded
  as UTF-8, with errors="replace" so a stray byte becomes U+FFFD rather than a crash or a lone
  surrogate the tokenizer would refuse.

A stream whose encoding is already a Unicode one is left alone, and so is one the user chose with
PYTHONIOENCODING: only its errors change from strict to replace, so printing never fails.
"""

from __future__ import annotations

import codecs
import os
import sys

# Encodings that hold every character: nothing to change.
_UNICODE = {"utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"}


def _holds_everything(encoding: str | None) -> bool:
    try:
        return codecs.lookup(encoding or "ascii").name in _UNICODE
    except LookupError:
        return False


def _interactive(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed or detached
        return False


def _safe(stream, *, output_errors: str):
    """The settings that let `stream` take any text, or None when it already does."""
    if stream is None or not hasattr(stream, "reconfigure") or getattr(stream, "closed", True):
        return None  # no console (pythonw), or replaced by a test's or a library's own object
    if _holds_everything(stream.encoding):
        return None
    if os.environ.get("PYTHONIOENCODING", "").split(":", 1)[0]:
        # The user named an encoding: keep it, and only never let a character stop the command.
        return {"errors": "replace"} if stream.errors == "strict" else None
    if _interactive(stream):
        return {"errors": "replace"}
    return {"encoding": "utf-8", "errors": output_errors}


def make_output_safe() -> None:
    """Make sys.stdout, sys.stderr and sys.stdin take any text (see the module's docstring).

    Safe to call more than once, and before or after something was printed (reconfigure flushes
    what was written in the old encoding first)."""
    for name, errors in (("stdout", "surrogateescape"), ("stderr", "backslashreplace"), ("stdin", "replace")):
        stream = getattr(sys, name)
        settings = _safe(stream, output_errors=errors)
        if settings is None:
            continue
        try:
            stream.reconfigure(**settings)
        except (OSError, ValueError):
            # stdin already read from cannot change its encoding; it then stays as Python opened it.
            pass


def progress_bar(enabled: bool, description: str, *, unit: str, initial: int = 0, **options):
    """A tqdm bar on stderr, or None when not `enabled` (or without tqdm, which comes with the training
    extras): every bar the commands draw (tokens prepared, training steps, tokens and endings scored)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc=description, unit=unit, initial=initial, dynamic_ncols=True, **options)
