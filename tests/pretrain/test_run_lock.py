"""One writer per folder (training/run_lock.py): a second `train` or `prepare` on a folder another
process writes is refused with that process named; a kill -9 leaves nothing stale behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from training.data import prepare
from training.pretrain.checkpoint import latest_checkpoint
from training.run_lock import LOCK_FILE, FolderInUse, hold

from tests.conftest import child_env, process_alive
from tests.pretrain.test_pretrain import settings, text_dir  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from training.run_lock import hold
    with hold(sys.argv[1], "advice"):
        print("held", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a folder; yields (start(folder) -> process)."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ROOT)], stdout=subprocess.PIPE,
                                   text=True, encoding="utf-8")
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def kill_9(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL; TerminateProcess on Windows
    process.wait()
    assert not process_alive(process.pid)


def test_a_second_writer_is_refused_with_the_first_named_and_a_kill_leaves_no_stale_lock(tmp_path, holder):
    folder = tmp_path / "shards"
    first = holder(folder)
    with pytest.raises(FolderInUse, match=rf"{folder} is being written by process {first.pid} on .* started 20\d\d-.* UTC"):
        with hold(folder, "advice"):
            pass
    kill_9(first)
    assert (folder / LOCK_FILE).is_file()  # left by the kill, and no obstacle:
    with hold(folder, "advice") as lock:  # at once: the kernel let go of the lock with the process
        assert lock == folder / LOCK_FILE
        with pytest.raises(FolderInUse, match=rf"process {os.getpid()} "):  # one holder in a process, too
            with hold(folder, "advice"):
                pass
    with hold(folder, "advice"):  # let go at the end of the block
        pass
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_that_made_its_folder_leaves_none_when_nothing_was_written(tmp_path):
    with hold(tmp_path / "fresh", "advice"):
        pass
    assert not (tmp_path / "fresh").exists()
    with hold(tmp_path / "used", "advice"):
        (tmp_path / "used" / "file").write_text("kept", encoding="utf-8")
    assert (tmp_path / "used" / "file").is_file()


def test_prepare_refuses_a_folder_another_process_writes(tmp_path, holder, text_dir, capsys):  # noqa: F811
    out = tmp_path / "shards"
    first = holder(out)
    assert prepare.main([str(text_dir), str(out), "--vocab_size", "320"]) == 2
    error = capsys.readouterr().err
    assert f"{out} is being written by process {first.pid}" in error and "choose another OUT_DIR" in error
    assert not (out / "manifest.json").exists()
    kill_9(first)
    assert prepare.main([str(text_dir), str(out), "--vocab_size", "320"]) == 0


def test_a_data_cache_being_prepared_is_not_prepared_twice(tmp_path, holder, text_dir, capsys):  # noqa: F811
    from training.pretrain.trainer import main

    cache = tmp_path / "cache"
    first = holder(cache)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings(text_dir, tmp_path / "run", max_steps=1, eval_every=0,
                                              data_cache=str(cache))), encoding="utf-8")
    assert main(["--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"{cache} is being written by process {first.pid}" in error and "preparing the token shards" in error
    assert not (tmp_path / "run").exists()  # the failed start left nothing
    kill_9(first)
    assert main(["--config", str(config)]) == 0


def test_a_second_training_into_a_run_folder_is_refused_until_the_first_is_killed(tmp_path, text_dir, capsys):  # noqa: F811
    """The issue's case: a run going, and `train --out RUN --resume` started beside it."""
    from training.pretrain.trainer import main

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings(text_dir, run, max_steps=100_000, eval_every=0, checkpoint_every=2,
                                              log_every=100)), encoding="utf-8")
    env = child_env(OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "training.pretrain", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run) is None:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first training wrote no checkpoint in 120 s"
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["--out", str(run), "--resume", "--max_steps", "4"]) == 1
        error = capsys.readouterr().err
        assert f"{run} is being written by process {first.pid}" in error and "-m training.pretrain --config" in error
        assert "choose another --out" in error
        kill_9(first)
    finally:
        first.kill()
        first.wait()
    step = int(latest_checkpoint(run).name.split("_")[1])
    assert main(["--out", str(run), "--resume", "--max_steps", str(step + 1)]) == 0
