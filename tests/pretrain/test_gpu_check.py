"""benchmarks/gpu_check.py, the one check a person with a GPU runs, also runs on CPU with small settings:
the same phases, the same pass/fail rules, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_unless_compile_works

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_passes_its_checks(tmp_path, corpus):
    skip_unless_compile_works()  # its first phase compiles (under CI's run as on Windows, inductor cannot)
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):  # a few "books": the last is held out for validation
        (books / f"book{i}.txt").write_text("\n\n".join(corpus[i::3] * 8), encoding="utf-8")
    figures = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--data", str(books), "--small", "--out", str(tmp_path / "work"),
         "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env, encoding="utf-8"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
    report = json.loads(figures.read_text(encoding="utf-8"))
    assert report["failures"] == []
    assert len(report["gradients"]) == 4 and all(row["ok"] for row in report["gradients"])
    for name in ("tiny", "gpt2-small"):
        assert report[name]["learned"] and report[name]["first_loss"] - report[name]["last_loss"] >= report[name]["margin"]
    assert report["baseline"]["tokens_per_second"] > 0 and report["profile"]["compiled_tokens_per_second"] > 0
    assert (tmp_path / "work" / "profile.txt").read_text(encoding="utf-8").strip()
    session = report["session"]  # the README's first command, shortened: within its budget, learning
    assert all(session["checks"].values()) and session["plan"]["depth"] >= 1
    assert 0 < session["tokens_prepared"] <= 1.5 * session["tokens_trained"] + 50_000  # (a small corpus repeats)


def test_gpu_check_refuses_a_folder_without_text_and_a_used_out_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--data", str(empty), "--small"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert result.returncode != 0 and "at least two non-empty .txt files" in result.stdout + result.stderr
    books = tmp_path / "books"
    books.mkdir()
    for i in range(2):
        (books / f"{i}.txt").write_text("Some text. " * 50, encoding="utf-8")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me", encoding="utf-8")
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--data", str(books), "--out", str(used)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert result.returncode == 2 and "not empty" in result.stderr and (used / "x").read_text(encoding="utf-8") == "keep me"
