"""One writer per folder: a run folder while `iterative-llm train` writes it, a shard folder while
`iterative-llm prepare` (or a run's preparation of its --data_cache) writes it.

    with hold(folder, "choose another --out"):   # or FolderInUse, naming the process that has it
        ...

The lock is the operating system's (`fcntl.flock` on FOLDER/.iterative-llm.lock), so it belongs to
the process: it goes when the process ends, however it ends (a crash, Ctrl-C, kill -9), and there is
never a stale lock to clean up. The file's content (process id, host, start time, command) is only
for the message a second writer gets; whether the folder is taken is the kernel's answer alone.
The holder removes the file as it lets go, so a folder holds one only while it is being written (or
after a kill, harmlessly: the next holder takes it over).
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

# In any folder held, run or shard folder alike. This module imports nothing of the package, so that
# a process holding a lock (in the tests, say) starts in a moment.
LOCK_FILE = ".iterative-llm.lock"


class FolderInUse(OSError):
    """Another process writes the folder; the message names it and says what to do."""


@contextmanager
def hold(folder: str | Path, advice: str) -> Iterator[Path]:
    """Hold `folder` (made if missing) against every other writer until the block ends.

    A second holder, in this process or another, gets FolderInUse with the first one's process id,
    command and start time, then `advice`. The lock file goes at the end, and so does a folder this
    call made and nothing else wrote to, so that a start which fails at once leaves nothing behind.
    """
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise FolderInUse(f"{folder} is being written by {holder}. {advice}") from None
        # A holder removes the file as it lets go (below): a file locked just then is no longer the
        # one at `path`, and holding it would exclude nobody.
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
        path.unlink(missing_ok=True)  # while still held: see the check after flock above
        if made:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: the folder is in use
        os.close(fd)  # lets go of the lock


def _describe(content: bytes) -> str:
    """'process 1234 on HOST (COMMAND), started 2026-12-03 09:30:12 UTC' from the lock file's content."""
    try:
        holder = json.loads(content)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}), started {started}"
    except (ValueError, KeyError, TypeError):
        return "another process (just starting)"  # it has the lock and has not written its details yet
