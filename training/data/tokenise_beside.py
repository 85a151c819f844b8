"""Tokenising beside training: on a GPU the CPU cores are idle while the card trains, so the token
shards are extended in a thread as the steps go on, and training takes up each new shard at a log
row. The card never waits for the tokenizer. (A run on a CPU, whose cores do the training, extends
its shards in short pauses instead: training/pretrain/run_state.py `Run.extend_the_data`.)

    beside = TokeniserBeside(prepare)        # prepare(max_tokens=, shard_tokens=, stop=, on_commit=)
    beside.start(max_tokens, shard_tokens)   # a thread tokenises the source up to max_tokens
    beside.take_newest()                     # the manifest of the newest committed shards, once; or None
    beside.stop()                            # ends at a document's end; what is committed stays

The thread runs the same `prepare_shards` as the preparation before the first step (with its
`stop` and `on_commit`), so the folder stays one that `prepare` reuses, resumes and extends. A shard
is written whole and fsynced before the manifest lists it, and a listed shard is never written
again, so the memory maps training reads from stay valid while the thread writes the next ones.
The tokenizer's batch encoding runs in Rust without Python's global lock (measured: the training
loop's thread keeps running while it encodes), so the thread costs training little but the cores
it encodes on.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable


class TokeniserBeside:
    """One background tokenising thread at a time, its newest committed manifest, and its failure,
    which `take_newest` and `stop` raise on the training thread (where it can stop the run)."""

    def __init__(self, prepare: Callable[..., object]):
        self._prepare = prepare
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._newest: dict | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # spent tokenising in the thread, all starts together
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, max_tokens: int, shard_tokens: int) -> None:
        """Tokenise the source up to `max_tokens` (as prepare_shards counts them), committing a shard
        every `shard_tokens` so that training gets the new text in pieces as it is made."""
        if self.running:
            raise RuntimeError("the tokenising thread is still running: take its shards or stop it first")
        self._raise_failure()
        self._stop.clear()
        self.starts += 1
        self._thread = threading.Thread(target=self._work, args=(max_tokens, shard_tokens),
                                        name="tokenise-beside-training", daemon=True)
        self._thread.start()

    def take_newest(self) -> dict | None:
        """The manifest as the newest commit left it, if there was one since the last call."""
        self._raise_failure()
        with self._lock:
            newest, self._newest = self._newest, None
        return newest

    def stop(self) -> None:
        """Ask the thread to end at its next document's end (within one batch of text), and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._raise_failure()

    def _work(self, max_tokens: int, shard_tokens: int) -> None:
        start = time.perf_counter()
        try:
            self._prepare(max_tokens=max_tokens, shard_tokens=shard_tokens, stop=self._stop,
                          on_commit=self._committed)
        except BaseException as err:  # raised on the training thread, at its next look
            self._error = err
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - start

    def _committed(self, manifest: dict) -> None:
        snapshot = copy.deepcopy(manifest)
        with self._lock:
            self._newest = snapshot

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise TokenisingFailed(f"tokenising beside training failed: {error}") from error


class TokenisingFailed(RuntimeError):
    """The background thread's error, raised where training can act on it."""
