"""One writer per folder: a run folder while `iterative-llm train` writes it, a shard folder while
`iterative-llm prepare` (or a run's preparation of its --data_cache) writes it.

    with hold(folder, "choose another --out"):   # or FolderInUse, naming the process that has it
        ...

The lock is the operating system's (`fcntl.flock` on FOLDER/.iterative-llm.lock), so it belongs to
the process: it goes when the process ends, however it ends (a crash, Ctrl-C, kill -9), and there is
never a stale lock to clean up. The file's content (process id, host, start time, command) is only
for the message a second writer gets; whether the folder is taken is the kernel's answer alone.
The file itself stays after the run: removing it while another process waits on it would let two
processes each lock a different file of the same name.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iterative_llm import run_folder


class FolderInUse(OSError):
    """Another process writes the folder; the message names it and says what to do."""


@contextmanager
def hold(folder: str | Path, advice: str) -> Iterator[Path]:
    """Hold `folder` (made if missing) against every other writer until the block ends.

    A second holder, in this process or another, gets FolderInUse with the first one's process id,
    command and start time, then `advice`. A folder this call made and nothing else wrote to is
    removed again at the end, so that a start which fails at once leaves nothing behind.
    """
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / run_folder.LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise FolderInUse(f"{folder} is being written by {holder}. {advice}") from None
        # A holder that made the folder removes the file as it lets go (above); a file locked just
        # then is no longer the one at `path`, and locking it would exclude nobody.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        started = time.time()
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                                 "command": command}).encode())
        yield path
    finally:
        if made and [p.name for p in folder.iterdir()] == [run_folder.LOCK]:
            path.unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                pass  # something was written there meanwhile
        os.close(fd)  # lets go of the lock


def _describe(content: bytes) -> str:
    """'process 1234 on HOST (COMMAND), started 2026-12-03 09:30:12 UTC' from the lock file's content."""
    try:
        holder = json.loads(content)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}), started {started}"
    except (ValueError, KeyError, TypeError):
        return "another process (just starting)"  # it has the lock and has not written its details yet
