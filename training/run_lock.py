"""One writer per folder: a run folder while `iterative-llm train` writes it, a shard folder while
`iterative-llm prepare` (or a run's preparation of its --data_cache) writes it.

    with hold(folder, "choose another --out"):   # or FolderInUse, naming the process that has it
        ...

The lock is the operating system's, through `filelock` (flock on Linux and macOS, LockFileEx on
Windows, on FOLDER/.iterative-llm.lock), so it belongs to the process: it goes when the process ends,
however it ends (a crash, Ctrl-C, kill -9, a closed window), and there is never a stale lock to clean
up. Where the file system has no such locks, filelock falls back to a lock file that records the
holder's process id, and a later holder on the same machine takes it over once that process is gone.

Who holds the folder (process id, host, start time, command) is written beside the lock, in
FOLDER/.iterative-llm.holder.json, only for the message a second writer gets; whether the folder is
taken is the lock's answer alone. It is a file of its own because Windows forbids reading the
locked byte of a lock file, and filelock truncates the lock file as it tries it. The holder removes
both files as it lets go, so a folder holds them only while it is being written (or after a kill,
harmlessly: the next holder takes them over).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# In any folder held, run or shard folder alike. This module imports nothing of the package, so that
# a process holding a lock (in the tests, say) starts in a moment.
LOCK_FILE = ".iterative-llm.lock"
HOLDER_FILE = ".iterative-llm.holder.json"


class FolderInUse(OSError):
    """Another process writes the folder; the message names it and says what to do."""


@contextmanager
def hold(folder: str | Path, advice: str) -> Iterator[Path]:
    """Hold `folder` (made if missing) against every other writer until the block ends.

    A second holder, in this process or another, gets FolderInUse with the first one's process id,
    command and start time, then `advice`. The lock files go at the end, and so does a folder this
    call made and nothing else wrote to, so that a start which fails at once leaves nothing behind.
    """
    import warnings

    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path, holder = folder / LOCK_FILE, folder / HOLDER_FILE
    with warnings.catch_warnings():
        # Where the OS lock is missing (a file system without flock), filelock says so with a warning
        # and uses its lock file with the holder's process id instead: that still keeps one writer.
        warnings.simplefilter("ignore", UserWarning)
        import filelock

        lock = filelock.FileLock(path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise FolderInUse(f"{folder} is being written by {_describe(holder)}. {advice}") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                      "command": _command()}), encoding="utf-8")
        yield path
    finally:
        _remove(holder)
        if isinstance(lock, filelock.UnixFileLock):
            # flock leaves its file behind; removed while still held, a process that opened it just then
            # finds its lock on a file no longer there, and filelock makes it try again. (On Windows an
            # open file cannot be removed: filelock removes it after letting go; a soft lock's file is
            # how it is held, and goes as it lets go.)
            path.unlink(missing_ok=True)
        lock.release()
        if made:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: the folder is in use


def _command() -> str:
    """The command as the user typed it: `iterative-llm train ...`, or `python -m training.pretrain ...`
    (whose sys.argv[0] is only the package's __main__.py)."""
    if not sys.argv:
        return "python"
    if Path(sys.argv[0]).name == "__main__.py" and getattr(sys, "orig_argv", None):
        words = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]
    else:
        words = [Path(sys.argv[0]).name, *sys.argv[1:]]
    return " ".join(words)[:300]


def _remove(path: Path) -> None:
    """Remove a file that another process may be reading at this moment (Windows refuses to remove
    an open file): a few tries over a second, then leave it; the next holder writes over it."""
    for attempt in range(20):
        try:
            path.unlink(missing_ok=True)
            return
        except PermissionError:
            time.sleep(0.05)


def _describe(holder: Path) -> str:
    """'process 1234 on HOST (COMMAND), started 2026-12-03 09:30:12 UTC' from the holder file."""
    try:
        details = json.loads(holder.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(details["started"]))
        return f"process {details['pid']} on {details['host']} ({details['command']}), started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (just starting)"  # it has the lock and has not written its details yet
