"""The versions a run records beside what it wrote (versions.json, a shard manifest, an alignment
summary, the model card), so that every figure traces back to the software that made it.
One home for the list and the way versions are read: from the installed distributions."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

# What a pretraining run depends on; a stage records the part that matters to it.
PACKAGES = ("iterative-llm", "torch", "transformers", "tokenizers", "accelerate", "datasets", "trl", "peft")


def package_versions(names: tuple[str, ...] = PACKAGES, *, git: bool = True) -> dict[str, str | None]:
    """{"python": ..., each of `names`: its installed version or None, "git_revision": ...}."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if git:
        versions["git_revision"] = git_revision()
    return versions


def git_revision() -> str | None:
    """The project's git commit, when it runs from a checkout (None from a wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, encoding="utf-8")
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
