"""The time budget of one `iterative-llm train --time_budget 2h` command: one clock, start to model folder.

    parse_duration("90m")            5400.0: "2h", "90m", "45s", "1h30m" or plain seconds
    budget = TimeBudget(seconds)     the deadline, counted from the start of the process
    with budget.phase("prepare"):    each phase's seconds, for the plan and summary.json
    budget.training_seconds(spent)   the training time the deadline allows now (re-planned at every step)

The phases are prepare (tokenizer, shards, the throughput probes), train (steps, periodic
evaluations and checkpoints), final_eval (evaluation, samples, last checkpoint) and export. Training
is what gives: it ends when the time left is what the final evaluation and the export are expected
to take (`reserve_for_the_end`). The estimate of that reserve improves as the run measures its own
evaluations, and every step reads the clock again, so a phase that ran long (a slow tokeniser, an
evaluation that took longer than planned) moves the end of training, and with it the cool-down
of the learning rate, earlier: the schedule follows the fraction of the training time done.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

# Units a duration may be written in, in the order they may appear: "1h30m", "90m", "45s", "2h".
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
# What the model folder may take past the budget: the promise is the budget plus 2%.
OVERRUN_ALLOWED = 0.02
PHASES = ("prepare", "train", "final_eval", "export")
# Evaluation runs the forward pass only: about a third of a training step's work, counted as half.
EVAL_SPEED_OVER_TRAINING = 2.0


def parse_duration(value: str | float | int) -> float:
    """Seconds from "2h", "90m", "45s", "1h30m", "600" or a number; a ValueError naming the fix otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.match(text)
            if not text or match is None or not any(match.groups()):
                raise ValueError(f"--time_budget {value!r} is not a duration: write it as 2h, 90m, 45s, 1h30m "
                                 "or a number of seconds.") from None
            seconds = sum(float(amount) * unit for amount, unit in zip(match.groups(), _UNITS.values()) if amount)
    if seconds <= 0:
        raise ValueError(f"--time_budget must be longer than zero, got {value!r}.")
    return seconds


# A process older than this when it asks is not a command the user just started (a test runner, a
# notebook): its budget counts from the call.
FRESH_PROCESS_SECONDS = 600
# Linux's record of this process's start, and of the time since boot it is counted in.
PROC_STAT, PROC_UPTIME = "/proc/self/stat", "/proc/uptime"


def _process_age() -> float | None:
    """Seconds since this process started: from /proc on Linux, else (Windows, macOS) from psutil's
    creation time, a wall-clock time; None where neither can tell."""
    try:
        with open(PROC_STAT, encoding="utf-8") as f:
            # Field 22 is the start time in clock ticks since boot; the name (field 2) may hold spaces.
            fields = f.read().rsplit(")", 1)[1].split()
        started_since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        with open(PROC_UPTIME, encoding="utf-8") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_since_boot
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (os.sysconf is missing on Windows)
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        # Wall-clock against wall-clock: the age holds on the monotonic clock too, unless the
        # system clock was set in between (the age check in process_start_time catches the worst).
        return time.time() - psutil.Process().create_time()
    except (OSError, psutil.Error):
        return None


def process_start_time() -> float:
    """When this process started, on the time.monotonic() clock: the budget counts Python's start and
    the imports too, since the user's stopwatch does. The start is read from /proc on Linux and from
    psutil elsewhere; where neither can tell, or the process is older than FRESH_PROCESS_SECONDS (a
    long-lived one, such as a test runner), it is the time of the call."""
    now = time.monotonic()
    age = _process_age()
    return now - age if age is not None and 0 <= age < FRESH_PROCESS_SECONDS else now


def format_seconds(seconds: float) -> str:
    """90 -> "1 min 30 s", 7260 -> "2 h 1 min": as a plan reads."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class TimeBudget:
    """The deadline of one command (none when `seconds` is None: the phases are still timed), and
    what each of its phases took. `clock` is time.monotonic; tests pass a fake one to make a phase
    run long without waiting."""

    def __init__(self, seconds: float | None, *, started: float | None = None, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.started = clock() if started is None else started
        self.deadline = self.started + seconds if seconds is not None else float("inf")
        self.first_step_at: float | None = None  # seconds from the start to the end of the first step
        self.phase_seconds: dict[str, float] = {}
        self.phase_started: dict[str, float] = {}
        # What the final evaluation and the rest of the end (samples, last checkpoint, export, a
        # margin) are expected to take: the plan's figures from the probed speed (training/pretrain/plan.py
        # `end_reserve`, kept by `keep_for_the_end`), the evaluation's part replaced by each evaluation
        # measured during training.
        self.end_parts = {"evaluation": 0.0, "rest": 0.0}
        self.eval_tokens: int | None = None  # what the final evaluation reads
        self._evaluation_measured = False

    def keep_for_the_end(self, end_parts: dict | None, eval_tokens: int | None) -> None:
        """What the plan expects the end to take (training/pretrain/plan.py `end_reserve`; None without a plan
        for the time), and the tokens the final evaluation reads: set once, by the run, before training."""
        if end_parts:
            self.end_parts = dict(end_parts)  # the budget's own: evaluations measured replace a part
        self.eval_tokens = eval_tokens

    @property
    def end_reserve(self) -> float:
        return sum(self.end_parts.values())

    def measured_training_speed(self, tokens_per_second: float) -> None:
        """Training's speed as logged: until an evaluation has been timed, the final one is expected
        to take what the training speed says (a machine that got busier since the probe slows both)."""
        if self.eval_tokens and not self._evaluation_measured and tokens_per_second > 0:
            self.end_parts["evaluation"] = self.eval_tokens / (EVAL_SPEED_OVER_TRAINING * tokens_per_second)

    def measured_evaluation(self, seconds: float) -> None:
        self._evaluation_measured = True
        self.end_parts["evaluation"] = seconds

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.deadline - self.clock()

    @contextmanager
    def phase(self, name: str):
        start = self.phase_started[name] = self.clock()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + self.clock() - start

    def first_step_done(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = self.elapsed()

    def evaluation_fits(self) -> bool:
        """Whether an evaluation now (expected to take what the final one will) ends before the end's
        reserve: one that would not is skipped, since the final evaluation comes soon after anyway."""
        return self.left() - self.end_reserve >= self.end_parts["evaluation"]

    def training_seconds(self, spent: float) -> float:
        """The seconds of training steps the whole run may have: those already `spent`, plus the
        share of the time left before the end's reserve that steps will get. That share is what
        they have had so far in the training phase (the rest went to evaluations, checkpoints and
        logs, and will again). Read at every step, so anything that took longer than planned
        shortens training, and the cool-down comes earlier."""
        wall = self.clock() - self.phase_started.get("train", self.clock())
        share = min(1.0, spent / wall) if spent > 0 and wall > 0 else 1.0
        return spent + share * max(0.0, self.left() - self.end_reserve)

    def summary(self) -> dict:
        """summary.json's `phases`: the seconds of each phase, and of the whole command so far."""
        return {"budget": self.seconds, **{name: round(self.phase_seconds[name], 3) for name in PHASES
                                           if name in self.phase_seconds},
                "total": round(self.elapsed(), 3)}
