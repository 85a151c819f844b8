"""Model cards grow one section per stage: pretraining, then SFT, then DPO, each with its own figures.

Every stage that writes a model folder appends a section to `README.md` in that folder, so the card of
a chat model tells its whole history and every figure in it comes from the run that produced it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    """One table cell: floats to 4 significant digits, no line breaks or pipes to break the table."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def append_model_card_section(folder: str | os.PathLike, title: str, rows: dict[str, Any]) -> Path:
    """Append `## title` and a two-column table of `rows` to `folder/README.md`, creating it if absent.

    Returns the path of the card. Values that are None are written as "-".
    """
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"## {title}", "", "| | |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {'-' if value is None else _cell(value)} |" for key, value in rows.items()]
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old.strip():
        old = old.rstrip("\n") + "\n\n"  # one blank line between sections
    path.write_text(old + "\n".join(lines) + "\n", encoding="utf-8")
    return path
