"""`iterative-llm compare`: fake run folders in the format `iterative-llm train` writes."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from iterative_llm import cli
from iterative_llm.compare import format_time, format_tokens, main, read_run, table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, *, lr=0.01, width=128, rate=0.1, steps=20, tokens_per_second=5000.0,
             summary=True, evals=True):
    """A run folder: train rows every step, eval rows every 4 steps, a sample row, the config and a summary."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        tokens = step * 16384
        time = tokens / tokens_per_second
        lines.append({"kind": "train", "step": step, "tokens": tokens, "time": time, "loss": 5 * math.exp(-rate * step),
                      "lr": lr, "tokens_per_second": tokens_per_second, "mfu": None})
        if evals and step % 4 == 0:
            bpb = 1.0 + 2.0 * math.exp(-rate * step)
            lines.append({"kind": "eval", "step": step, "tokens": tokens, "time": time,
                          "val_loss": 0.9 * bpb, "val_bpb": bpb})
    lines.append({"kind": "sample", "step": steps, "prompt": "The", "text": "The cat"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    # As training/pretrain/setup.py writes it: the resolved training settings, and the model config's fields.
    config = {"train": {"out": f"runs/{name}", "resume": False, "seed": 1337, "model_preset": "tiny",
                        "lr_matrix": lr, "warmup_steps": 10, "sample_prompts": ["The", "def "]},
              "model": {"hidden_size": width, "num_hidden_layers": 4}}
    (run / "run_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if summary:
        final = 1.0 + 2.0 * math.exp(-rate * steps)
        (run / "summary.json").write_text(json.dumps({
            "steps": steps, "tokens": steps * 16384, "time": steps * 16384 / tokens_per_second,
            "final_val_loss": 0.9 * final, "final_val_bpb": final, "parameters": 1_800_000, "preset": "tiny",
        }), encoding="utf-8")
    return run


def test_compare_draws_one_picture_and_prints_both_runs(tmp_path, capsys):
    base = make_run(tmp_path / "runs", "base")
    faster = make_run(tmp_path / "runs", "lr3e-2", lr=0.03, rate=0.15, steps=40, tokens_per_second=4000.0)
    out = tmp_path / "pictures" / "compare.png"

    assert main([str(base), str(faster), "--out", str(out)]) == 0

    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    height, width = imread(out).shape[:2]
    assert width > 2 * height * 0.9  # two panels side by side

    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header == ["base", "lr3e-2"]
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[1:] if line.strip()}
    assert rows["train.lr_matrix"] == ["0.01", "0.03"]
    assert "train.seed" not in rows and "train.model_preset" not in rows  # the same in both runs
    assert "train.out" not in rows  # differs in every run: it is the run's folder
    # Final figures come from each run's summary.json.
    b, f = 1 + 2 * math.exp(-0.1 * 20), 1 + 2 * math.exp(-0.15 * 40)
    lines = {line[:16].strip(): line[16:].split() for line in printed.splitlines()}
    assert lines["final val bpb"] == [f"{b:.4f}", f"{f:.4f}"]
    assert lines["final val loss"] == [f"{0.9 * b:.4f}", f"{0.9 * f:.4f}"]
    assert lines["tokens"] == [format_tokens(20 * 16384), format_tokens(40 * 16384)]
    assert lines["time"] == ["1.09", "min", "2.73", "min"]


def test_table_shows_only_the_fields_that_differ(tmp_path):
    a = read_run(str(make_run(tmp_path, "a", width=128)))
    b = read_run(str(make_run(tmp_path, "b", width=256)))
    a.name, b.name = "a", "b"
    text = table([a, b])
    assert "model.hidden_size" in text
    for same in ("model_preset", "seed", "lr_matrix", "warmup_steps", "sample_prompts", "model.num_hidden_layers",
                 "train.out"):
        assert same not in text
    same = read_run(str(make_run(tmp_path, "c", width=128)))
    same.name = "c"
    assert "none (the runs' configs are the same)" in table([a, same])


def test_a_run_without_run_config_is_left_out_of_the_config_comparison(tmp_path, capsys):
    a = read_run(str(make_run(tmp_path, "a", lr=0.01)))
    folder = make_run(tmp_path, "b", lr=0.02)
    (folder / "run_config.yaml").unlink()
    b = read_run(str(folder))
    c = read_run(str(make_run(tmp_path, "c", lr=0.03)))
    assert "no run_config.yaml" in capsys.readouterr().err
    a.name, b.name, c.name = "a", "b", "c"
    rows = {line.split()[0]: line.split()[1:] for line in table([a, b, c]).splitlines()[1:]}
    assert rows["train.lr_matrix"] == ["0.01", "—", "0.03"]
    assert "train.model_preset" not in rows and "model.hidden_size" not in rows


def test_without_summary_the_last_eval_row_gives_the_final_figures(tmp_path):
    run = read_run(str(make_run(tmp_path, "r", summary=False, steps=18)))
    last = 1 + 2 * math.exp(-0.1 * 16)  # the last evaluation is at step 16
    assert run.final("val_bpb") == pytest.approx(last)
    assert run.tokens == 18 * 16384  # the last row of any kind
    assert run.time == pytest.approx(18 * 16384 / 5000.0)


def test_a_half_written_last_line_is_skipped(tmp_path):
    folder = make_run(tmp_path, "r")
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "eval", "step": 24, "tok')
    assert len(read_run(str(folder)).evals) == 5


def test_time_is_shown_in_one_unit_for_all_runs():
    assert format_time(66.0) == "66 s"
    assert format_time(66.0, ("min", 60.0)) == "1.10 min"
    assert format_time(3 * 3600.0) == "3.00 h"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: root / "missing", "is not a folder"),
        (lambda root: (root / "no_metrics").mkdir() or root / "no_metrics", "has no metrics.jsonl"),
        (lambda root: make_run(root, "no_evals", evals=False), "has no evaluation rows"),
    ],
    ids=["missing-folder", "no-metrics", "no-eval-rows"],
)
def test_bad_run_folders_get_one_clear_line_naming_the_folder(tmp_path, capsys, setup, message):
    good = make_run(tmp_path, "good")
    bad = setup(tmp_path)
    assert main([str(good), str(bad), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err and bad.name in err
    assert "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_the_cli_dispatches_compare(tmp_path, capsys):
    run = make_run(tmp_path, "only")
    assert cli.main(["compare", str(run), "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "only" in capsys.readouterr().out
