"""`iterative-llm compare RUN RUN...`: several training runs side by side, to iterate on one change.

For each run folder (the format `iterative-llm train` writes: metrics.jsonl, run_config.yaml,
summary.json) it reads the evaluation rows and draws one picture with two panels, validation
bits per byte against training tokens and against training time, and prints a table: one row
per config field whose value differs between the runs (fields that agree are left out), then
each run's final validation loss, bits per byte, tokens and time.

The workflow it serves: change one thing, train, compare.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

from . import run_folder
from .command_line import CommandParser, parse_command_line
from .console import make_output_safe

MISSING = "—"  # a field one run has and another does not
# Fields that name or steer the run folder itself, not what is trained: always different, never news.
BOOKKEEPING = {"train.out", "train.resume", "out", "resume"}


class CompareError(Exception):
    """A problem with a run folder: reported as one line that names the folder."""


@dataclass
class Run:
    path: str
    name: str
    evals: list[dict]  # the metrics.jsonl rows of kind "eval", in order
    config: dict  # run_config.yaml, nested keys joined with dots
    summary: dict = field(default_factory=dict)
    last_tokens: int | None = None  # the most tokens and time any row of metrics.jsonl records
    last_time: float | None = None

    def final(self, key: str):
        """A final figure: summary.json's if it has it, else the last evaluation row's."""
        if self.summary.get(f"final_{key}") is not None:
            return self.summary[f"final_{key}"]
        return self.evals[-1].get(key)

    @property
    def tokens(self):
        return self.summary.get("tokens", self.last_tokens)

    @property
    def time(self):
        return self.summary.get("time", self.last_time)


# ---------------------------------------------------------------------------------------------
# Reading run folders
# ---------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_metrics(path: str) -> tuple[list[dict], int | None, float | None]:
    """(eval rows, the most tokens and time any row records) from metrics.jsonl.

    A half-written last line (a run still training, or killed mid-write) is skipped; a bad line
    anywhere else is an error.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise CompareError(f"{path}, line {number}, is not JSON: {line[:60]!r}") from None
        if isinstance(row, dict):
            rows.append(row)
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_bpb") is not None]
    last_tokens = max((r["tokens"] for r in rows if isinstance(r.get("tokens"), (int, float))), default=None)
    last_time = max((r["time"] for r in rows if isinstance(r.get("time"), (int, float))), default=None)
    return evals, last_tokens, last_time


def read_run(path: str) -> Run:
    """A run folder's evaluation rows, config and summary; a clear error if there is nothing to plot."""
    if not os.path.isdir(path):
        raise CompareError(f"{path!r} is not a folder: give run folders, e.g. runs/NAME.")
    metrics = os.path.join(path, run_folder.METRICS)
    if not os.path.isfile(metrics):
        raise CompareError(
            f"{path!r} has no {run_folder.METRICS}: it is not a run folder written by `iterative-llm train`, "
            f"or the run has not logged anything yet."
        )
    evals, last_tokens, last_time = read_metrics(metrics)
    if not evals:
        raise CompareError(
            f"{path!r} has no evaluation rows (kind \"eval\" with val_bpb) in {run_folder.METRICS}: the run stopped "
            f"before its first evaluation, so there is no validation loss to compare."
        )
    for row in evals:
        for key in ("tokens", "time"):
            if not isinstance(row.get(key), (int, float)):
                raise CompareError(f"{metrics}: an eval row (step {row.get('step')}) has no number for {key!r}.")

    config = {}
    config_path = os.path.join(path, run_folder.RUN_CONFIG)
    if os.path.isfile(config_path):
        import yaml

        try:
            with open(config_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise CompareError(f"{config_path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise CompareError(f"{config_path} does not hold a mapping of config fields.")
        config = _flatten(loaded)
    else:
        print(f"note: {path!r} has no {run_folder.RUN_CONFIG}; its config is left out of the table.", file=sys.stderr)

    summary = {}
    summary_path = os.path.join(path, run_folder.SUMMARY)
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        except ValueError:
            print(f"note: {summary_path} is not valid JSON; final figures come from {run_folder.METRICS}.", file=sys.stderr)
        if not isinstance(summary, dict):
            summary = {}
    return Run(path, "", evals, config, summary, last_tokens, last_time)


def _names(paths: list[str]) -> list[str]:
    """Short names for the legend and table: the folder names, or the paths if those repeat."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.normpath(p) for p in paths]
    if len(set(names)) < len(names):  # the same folder given twice
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def format_tokens(n) -> str:
    if n is None:
        return MISSING
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:g}"


def time_unit(longest: float) -> tuple[str, float]:
    """(unit name, seconds per unit) that suits a duration, so that runs are shown in one unit."""
    if longest >= 2 * 3600:
        return "h", 3600.0
    if longest >= 120:
        return "min", 60.0
    return "s", 1.0


def format_time(seconds, unit: tuple[str, float] | None = None) -> str:
    if seconds is None:
        return MISSING
    name, scale = unit or time_unit(seconds)
    value = seconds / scale
    return f"{value:.0f} {name}" if scale == 1.0 else f"{value:.2f} {name}" if value < 10 else f"{value:.1f} {name}"


def _value(v) -> str:
    if v is MISSING:
        return MISSING
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def differing_fields(runs: list[Run]) -> list[str]:
    """Config fields whose values are not the same in every run, in the order they first appear.

    Runs without a run_config.yaml are left out of the comparison (their column shows "—"), and so
    are the fields that only name the run folder (`out`, `resume`).
    """
    known = [run for run in runs if run.config]
    keys = [k for k in dict.fromkeys(k for run in known for k in run.config) if k not in BOOKKEEPING]

    def values(key):
        return {json.dumps(run.config.get(key, MISSING), sort_keys=True, default=str) for run in known}

    return [k for k in keys if len(values(k)) > 1]


def table(runs: list[Run]) -> str:
    """The differing config fields, then each run's final figures, as aligned text columns."""
    fields = differing_fields(runs)
    unit = time_unit(max((r.time for r in runs if r.time is not None), default=0.0))
    rows = [[f, *(_value(r.config.get(f, MISSING)) for r in runs)] for f in fields]
    finals = [
        ["final val loss", *(_number(r.final("val_loss"), 4) for r in runs)],
        ["final val bpb", *(_number(r.final("val_bpb"), 4) for r in runs)],
        ["tokens", *(format_tokens(r.tokens) for r in runs)],
        ["time", *(format_time(r.time, unit) for r in runs)],
    ]
    header = ["", *(r.name for r in runs)]
    everything = [header, *rows, *finals]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(header)]
    if fields:
        out.append("config fields that differ:")
        out += [line(r) for r in rows]
    elif len(runs) > 1:
        out.append("config fields that differ: none (the runs' configs are the same)")
    out.append("-" * len(line(header)))
    out += [line(r) for r in finals]
    return "\n".join(out)


def _number(v, digits: int) -> str:
    if v is None:
        return MISSING
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


def plot(runs: list[Run], path: str) -> str:
    """One PNG, two panels: validation bits per byte against tokens and against training time."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    unit, scale = time_unit(max(max(r["time"] for r in run.evals) for run in runs))
    unit = {"h": "hours", "min": "minutes", "s": "seconds"}[unit]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    by_tokens, by_time = fig.subplots(1, 2, sharey=True)
    for run in runs:
        tokens = [r["tokens"] for r in run.evals]
        times = [r["time"] / scale for r in run.evals]
        bpb = [r["val_bpb"] for r in run.evals]
        marker = "o" if len(bpb) <= 40 else None
        (line,) = by_tokens.plot(tokens, bpb, marker=marker, markersize=3.5, label=run.name)
        by_time.plot(times, bpb, marker=marker, markersize=3.5, color=line.get_color(), label=run.name)
    by_tokens.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_tokens(x)))
    by_tokens.set_xlabel("training tokens")
    by_tokens.set_ylabel("validation bits per byte (lower is better)")
    by_tokens.set_title("against tokens seen")
    by_time.set_xlabel(f"training time ({unit}, evaluation excluded)")
    by_time.set_title("against training time")
    by_time.tick_params(labelleft=True)
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
    by_tokens.legend(fontsize=9)
    names = ", ".join(r.name for r in runs)
    fig.suptitle(f"Validation bits per byte: {names if len(names) <= 100 else names[:99] + '…'}", fontsize=12)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@dataclass
class CompareArguments:
    runs: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "RUN",
                                      "help": "run folders (runs/NAME) written by `iterative-llm train`"})
    out: str = field(default="compare.png", metadata={"help": "where to write the picture"})


def build_parser() -> CommandParser:
    return CommandParser(
        CompareArguments,
        prog="iterative-llm compare",
        description="Plot several training runs' validation bits per byte and tabulate how their configs differ.",
    )


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    (args,) = parse_command_line(build_parser(), argv)
    try:
        runs = [read_run(p) for p in args.runs]
        for run, name in zip(runs, _names(args.runs)):
            run.name = name
        print(table(runs))
        try:
            path = plot(runs, args.out)
        except OSError as err:
            raise CompareError(f"cannot write the picture to {args.out!r}: {err.strerror or err}") from None
        print(f"\npicture: {path}")
    except CompareError as err:
        print(f"iterative-llm compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
