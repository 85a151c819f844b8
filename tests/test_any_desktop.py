"""Any desktop: what a Windows or Mac user meets, checked here on Linux by simulating what differs.

- Windows has no `fcntl`: the package imports and locks without it (a subprocess with
  `sys.modules["fcntl"] = None`, which is what Windows gives).
- Windows refuses to rename or delete a file that is open or memory-mapped: `windows_file_rules`
  makes this process's renames and deletions obey that rule (from /proc/self/fd and
  /proc/self/maps), and whole runs, resumes, extensions of the shards and the export go through it.
- The command line's "install the extras" advice only for a missing extra.
- Ctrl-C, Ctrl-Break and the closing of the console window stop a run with a checkpoint.
- `--compile true` where the compiler it needs is missing falls back to eager with one line.
- Paths with spaces and backslashes, on the command line and in saved settings.
(Machine facts and Apple's MPS are simulated in tests/test_platforms.py; text encodings in
tests/test_encoding.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from training.pretrain import plan as plan_module
from training.pretrain import run_state as run_module
from training.pretrain import setup as setup_stage
from training.pretrain.checkpoint import latest_checkpoint
from training.pretrain.config import build_config
from training.pretrain.trainer import main as train_main, train
from training.data.shards import ShardedDataset

from tests.conftest import child_env
from tests.pretrain.test_budget import budget_settings
from tests.pretrain.test_pretrain import settings, text_dir  # noqa: F401  (text_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- Windows' rule on open files


def _files_in_use() -> set[str]:
    """Every file this process has open (its descriptors) or memory-mapped, as real paths."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed while listed
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.add(parts[5].strip())
    return {path for path in paths if not path.endswith(" (deleted)")}


class WindowsFileRules:
    """os.rename/replace/unlink/remove and shutil.rmtree refuse, as Windows does (PermissionError,
    WinError 32), a path that is, or holds, a file this process has open or mapped, and os.replace
    a destination that is. `refused` lists what was refused."""

    def __init__(self, monkeypatch):
        self.refused: list[str] = []
        real = {name: getattr(os, name) for name in ("rename", "replace", "unlink", "remove")}
        real_rmtree = shutil.rmtree

        def check(*paths) -> None:
            in_use = _files_in_use()
            for path in paths:
                target = os.path.realpath(path)
                held = [p for p in in_use if p == target or p.startswith(target + os.sep)]
                if held:
                    self.refused.append(f"{path}: {held[0]}")
                    raise PermissionError(13, "The process cannot access the file because it is being used by "
                                              f"another process (simulated WinError 32: {held[0]} is open)", str(path))

        def moving(name):
            def move(src, dst, *args, **kwargs):
                if not kwargs.get("src_dir_fd") and not kwargs.get("dst_dir_fd"):
                    check(src, dst)
                return real[name](src, dst, *args, **kwargs)
            return move

        def deleting(name):
            def delete(path, *args, **kwargs):
                if kwargs.get("dir_fd") is None:  # rmtree's own calls: the tree was checked whole
                    check(path)
                return real[name](path, *args, **kwargs)
            return delete

        def rmtree(path, ignore_errors=False, *args, **kwargs):
            try:
                check(path)
            except PermissionError:
                if ignore_errors:
                    return  # Windows would leave the files in use (and we, the tree: close enough)
                raise
            return real_rmtree(path, ignore_errors, *args, **kwargs)

        for name in ("rename", "replace"):
            monkeypatch.setattr(os, name, moving(name))
        for name in ("unlink", "remove"):
            monkeypatch.setattr(os, name, deleting(name))
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        # Windows' lock (filelock's WindowsFileLock) holds its file open while held, and removes it
        # only after letting go; flock's file can be removed while held, Windows' cannot.
        import filelock

        monkeypatch.setattr(filelock, "FileLock", _WindowsLikeLock)


class _WindowsLikeLock:
    """What filelock's WindowsFileLock does with its file: open while held, removed (if it can be)
    once let go. Held against the other holders of this process, which is all these tests need."""

    held: set[str] = set()

    def __init__(self, path, timeout=0):
        self.path, self.fd = os.path.realpath(path), None

    def acquire(self) -> None:
        import filelock

        if self.path in self.held:
            raise filelock.Timeout(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        self.held.add(self.path)

    def release(self) -> None:
        os.close(self.fd)
        self.held.discard(self.path)
        try:
            os.unlink(self.path)
        except OSError:
            pass


@pytest.fixture
def windows_file_rules(monkeypatch) -> WindowsFileRules | None:
    """The simulated rule where /proc shows what is open (Linux); on Windows the real one holds, and
    elsewhere (macOS) nothing enforces it."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    return WindowsFileRules(monkeypatch)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the simulation reads /proc")
def test_the_simulated_rule_refuses_what_windows_refuses(tmp_path, windows_file_rules):
    import numpy as np

    mapped = tmp_path / "shard.bin"
    np.arange(10, dtype=np.uint16).tofile(mapped)
    tokens = np.memmap(mapped, dtype=np.uint16, mode="r")
    with pytest.raises(PermissionError, match="WinError 32"):
        os.replace(mapped, tmp_path / "moved.bin")
    with open(tmp_path / "open.txt", "w", encoding="utf-8") as f:
        with pytest.raises(PermissionError):
            shutil.rmtree(tmp_path)
        f.write("x")
    del tokens
    os.replace(mapped, tmp_path / "moved.bin")  # let go: allowed
    os.unlink(tmp_path / "open.txt")


def test_runs_resumes_and_exports_touch_no_file_in_use(tmp_path, text_dir, windows_file_rules, capsys):  # noqa: F811
    """Checkpoints pruned and set aside, the model folder written over on a resume's export, the
    tokenizer and shards staged and renamed, all while the run holds its shards mapped."""
    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=6, eval_every=3, checkpoint_every=2, keep_checkpoints=2)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]
    weights = latest_checkpoint(run) / "model.safetensors"  # damaged: set aside on resume
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train(build_config(settings(text_dir, run, max_steps=8, eval_every=3, checkpoint_every=2, keep_checkpoints=2,
                                resume=True)))
    assert windows_file_rules is None or windows_file_rules.refused == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step_00000006", "latest",
                                                                       "step_00000006", "step_00000008"]
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 8
    assert not list(run.glob(".iterative-llm.*")), "the lock files are gone with the run"


def test_the_data_grows_while_training_maps_it_without_touching_a_file_in_use(tmp_path, text_dir,  # noqa: F811
                                                                               windows_file_rules, monkeypatch):
    """A budgeted run whose shards are extended while it trains: in pauses (a CPU's way) and by the
    tokenising thread (an accelerator's), each with the shards it trains on mapped."""
    # The probe says 300 tokens/s, far under what this model trains at even on a loaded machine: a few
    # small documents are prepared first, and the data must grow while training maps it.
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 300.0)
    monkeypatch.setattr(plan_module, "BESIDE_FIRST_SECONDS", 1.0)
    monkeypatch.setattr(run_module, "BESIDE_FIRST_SECONDS", 1.0)
    for setting in (False, True):
        run = tmp_path / f"run-{setting}"
        summary = train(build_config(budget_settings(text_dir, run, 6.0, tokenise_beside_training=setting,
                                                     batch_size=2, seq_len=16, batch_tokens=32, log_every=2)))
        assert summary["tokens_prepared"] > summary["tokens_prepared_before_first_step"], "the data never grew"
        assert ShardedDataset.open(run / "data").split("train").num_tokens == summary["tokens_prepared"]
    assert windows_file_rules is None or windows_file_rules.refused == []


# ---------------------------------------------------------------------- stopping on Windows


def _at_step(monkeypatch, step: int, action) -> None:
    """Call `action()` while step `step` (1-based) reads its batch."""
    from training.data.batches import RandomWindowBatches

    original = RandomWindowBatches.batch_at

    def reading(self, index):
        if index == step - 1:
            monkeypatch.setattr(RandomWindowBatches, "batch_at", original)
            action()
        return original(self, index)

    monkeypatch.setattr(RandomWindowBatches, "batch_at", reading)


def test_ctrl_break_stops_a_run_with_a_checkpoint(tmp_path, text_dir, monkeypatch):  # noqa: F811
    """Windows' Ctrl-Break is SIGBREAK, a signal Linux lacks: SIGUSR1 stands in for it there."""
    from training.pretrain import stop_request

    if not hasattr(signal, "SIGBREAK"):
        monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert signal.SIGBREAK in stop_request.stop_signals()
    _at_step(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGBREAK))
    run = tmp_path / "run"
    result = train(build_config(settings(text_dir, run, max_steps=20, eval_every=0)))
    assert result["stopped"] and result["step"] == 3
    assert latest_checkpoint(run).name == "step_00000003"


def test_closing_the_console_window_waits_for_the_checkpoint(tmp_path, text_dir, monkeypatch, capsys):  # noqa: F811
    """Windows calls the console handler on a thread of its own, and ends the process when it returns:
    the handler must return only once the checkpoint is written. The handler registered is captured
    (SetConsoleCtrlHandler cannot run here) and called as Windows would, from another thread."""
    import threading

    from training.pretrain import stop_request

    handlers = []
    monkeypatch.setattr(stop_request, "set_console_handler", lambda handler: handlers.append(handler) or None)
    run = tmp_path / "run"
    answered = {}

    def close_the_window():
        def windows():
            answered["handled"] = handlers[-1](stop_request.CTRL_CLOSE_EVENT)
            answered["checkpoint when it returned"] = latest_checkpoint(run)

        thread = threading.Thread(target=windows)
        thread.start()
        answered["thread"] = thread

    _at_step(monkeypatch, 3, close_the_window)
    result = train(build_config(settings(text_dir, run, max_steps=20, eval_every=0)))
    answered["thread"].join(10)
    assert result["stopped"] and result["step"] == 3
    assert answered["handled"] is True
    assert answered["checkpoint when it returned"].name == "step_00000003"
    assert "Stopped by closing the console window at step 3" in capsys.readouterr().out
    # Ctrl-C and Ctrl-Break are left to Python's own handler (the signals above).
    assert handlers[-1](0) is False and handlers[-1](1) is False


# ---------------------------------------------------------------------- torch.compile without its compiler


def test_compile_names_the_compiler_a_machine_lacks(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    import torch.utils._triton as triton_check

    from training.pretrain.step import compile_problem

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    for platform_name, hint in (("win32", "Developer prompt"), ("darwin", "xcode-select --install"),
                                ("linux", "g++ or clang")):
        monkeypatch.setattr(sys, "platform", platform_name)
        assert "needs a C++ compiler" in compile_problem("cpu") and hint in compile_problem("cpu")
    monkeypatch.setattr(sys, "platform", "win32")
    assert "needs Triton" in compile_problem("cuda") and "triton-windows" in compile_problem("cuda")
    monkeypatch.setattr(triton_check, "has_triton", lambda: True)
    assert compile_problem("cuda") is None and compile_problem("mps") is None


def test_compile_true_without_a_compiler_trains_eagerly_with_one_line(tmp_path, text_dir, monkeypatch, capsys):  # noqa: F811
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    summary = train(build_config(settings(text_dir, tmp_path / "run", max_steps=3, eval_every=0, compile=True)))
    out = capsys.readouterr().out
    assert out.count("--compile true: torch.compile on the CPU needs a C++ compiler") == 1
    assert "training eagerly" in out and "Traceback" not in out
    assert summary["steps"] == 3 and summary["compile"] is False and "C++ compiler" in summary["compile_fallback"]


def test_a_compile_that_fails_in_the_warm_up_falls_back_to_eager(tmp_path, text_dir, monkeypatch, capsys):  # noqa: F811
    """The check before cannot know every failure: one in the warm-up itself (here a compiler backend
    that fails, as inductor does without its compiler) also goes on eagerly, and trains as an eager
    run does."""
    import functools

    import torch
    import torch._dynamo

    def failing_backend(graph, example_inputs):
        raise RuntimeError("cannot compile here (a compiler that is missing, say)")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    monkeypatch.setattr(setup_stage, "compile_problem", lambda device_type: None)
    torch._dynamo.reset()
    try:
        summary = train(build_config(settings(text_dir, tmp_path / "compiled", max_steps=3, eval_every=0,
                                              compile=True)))
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "--compile true: torch.compile failed (" in out and "training eagerly" in out
    monkeypatch.undo()
    eager = train(build_config(settings(text_dir, tmp_path / "eager", max_steps=3, eval_every=0)))
    assert summary["compile"] is False and summary["compile_fallback"].startswith("torch.compile failed")
    assert summary["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-5)


# ---------------------------------------------------------------------- paths with spaces and backslashes


def test_paths_with_spaces_and_backslashes_train_stop_and_resume(tmp_path, text_dir, monkeypatch, capsys):  # noqa: F811
    """A data folder and a run folder whose names have spaces and a backslash (a legal character in a
    Linux name, and what a Windows path is made of): saved in run_config.yaml, read back on --resume,
    and the command the stop suggests pastes back into a shell as one word."""
    import shlex

    books = tmp_path / "my books\\2026 (copy)"
    shutil.copytree(text_dir, books)
    run = tmp_path / "runs dir" / "run one\\a"
    _at_step(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(settings(books, run, max_steps=5, eval_every=0)), encoding="utf-8")
    assert train_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    suggested = out[out.index("Continue with: ") + len("Continue with: "):].splitlines()[0]
    words = shlex.split(suggested)
    assert words[:3] == ["iterative-llm", "train", "--out"] and words[3] == str(run) and words[4:] == ["--resume"]
    saved = yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["data"] == str(books) and saved["train"]["out"] == str(run)
    assert train_main(words[2:]) == 0  # the suggested command, as pasted
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 5


def test_a_mistyped_windows_path_is_no_such_folder_not_a_hub_dataset(tmp_path):
    from training.data.sources import iter_documents

    for typo in ("C:\\Users\\me\\bookz", "D:/books", "books\\mine", "\\\\server\\share\\books"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            next(iter_documents(typo))


def test_a_suggested_command_quotes_a_path_as_this_systems_shell_reads_it(monkeypatch):
    from iterative_llm.command_line import shell_word

    assert shell_word("runs/tiny") == "runs/tiny"
    assert shell_word("my runs/tiny") == "'my runs/tiny'"
    monkeypatch.setattr(sys, "platform", "win32")
    assert shell_word("C:\\Users\\me\\my runs\\tiny") == '"C:\\Users\\me\\my runs\\tiny"'
    assert shell_word("C:\\runs\\tiny") == "C:\\runs\\tiny"


# ---------------------------------------------------------------------- Windows has no fcntl


WITHOUT_FCNTL = 'import sys; sys.modules["fcntl"] = None  # what Windows gives\n'


def _python_without_fcntl(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_FCNTL + textwrap.dedent(code)], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=300)


def test_without_fcntl_every_stage_imports_and_a_folder_is_still_held_by_one_writer(tmp_path):
    result = _python_without_fcntl(f"""
        import importlib, os
        from iterative_llm.cli import STAGES
        for module, _ in STAGES.values():
            importlib.import_module(module)
        from training.run_lock import FolderInUse, hold
        with hold({str(tmp_path / "run")!r}, "advice"):
            try:
                with hold({str(tmp_path / "run")!r}, "advice"):
                    print("held twice")
            except FolderInUse as err:
                print("refused:", err)
        print("left:", os.listdir({str(tmp_path)!r}))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"refused: {tmp_path / 'run'} is being written by process " in result.stdout
    assert "left: []" in result.stdout


def test_the_install_advice_is_given_only_for_a_missing_extra(monkeypatch, capsys):
    import importlib

    from iterative_llm import cli

    real_import = importlib.import_module

    def missing(name):
        def import_module(module_name, *args):
            if module_name.startswith("training."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return real_import(module_name, *args)
        return import_module

    monkeypatch.setattr(importlib, "import_module", missing("trl"))
    assert cli.main(["sft", "--help"]) == 2
    assert "cannot import 'trl'. Install the train extras: pip install 'iterative-llm[train]'" in capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", missing("lm_eval"))
    assert cli.main(["eval", "--help"]) == 2
    assert "pip install 'iterative-llm[eval]'" in capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", missing("fcntl"))
    with pytest.raises(ModuleNotFoundError, match="fcntl"):  # no extra brings it: the traceback says what is wrong
        cli.main(["train", "--help"])
    assert "Install" not in capsys.readouterr().err


def test_the_extras_table_names_the_modules_of_every_optional_dependency():
    """Each package of the train and eval extras (pyproject.toml) has its modules in cli.EXTRA_MODULES."""
    import importlib.metadata
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

    from iterative_llm.cli import EXTRA_MODULES

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    modules_of = importlib.metadata.packages_distributions()  # module -> the distributions that install it
    for extra in ("train", "eval"):
        for requirement in extras[extra]:
            package = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0]
            if package == "iterative-llm":
                continue
            normalised = package.lower().replace("_", "-")
            modules = [m for m, dists in modules_of.items() if normalised in {d.lower().replace("_", "-") for d in dists}]
            assert any(EXTRA_MODULES.get(m) == extra for m in modules), (package, modules)
