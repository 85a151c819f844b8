"""Tokenising beside training (an accelerator's run, where the CPU is otherwise idle): a thread
extends the shards while the steps go on, training takes up each committed shard, and the folder it
leaves is the one `prepare` would have made. Tested on the CPU with the choice forced on
(--tokenise_beside_training true), and the plan's choice on simulated devices."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from training.pretrain import plan as plan_module
from training.data import prepare as prepare_module
from training.pretrain import loop as loop_module
from training.pretrain import run_state as run_module
from training.pretrain.budget import TimeBudget
from training.pretrain.checkpoint import STATE_FILE, latest_checkpoint
from training.pretrain.config import build_config
from training.pretrain.plan import Device, choose_tokenise_beside, fit_run
from training.data.prepare import prepare_shards
from training.pretrain.guards import TrainingError
from training.pretrain.trainer import train
from training.data.shards import ShardedDataset
from training.data.tokenise_beside import TokeniserBeside, TokenisingFailed

from tests.pretrain.test_budget import CARDS, big_text_dir, budget_settings  # noqa: F401  (big_text_dir is a fixture)
from tests.pretrain.test_pretrain import settings


def test_the_plan_tokenises_beside_training_on_a_gpu_and_an_explicit_choice_wins():
    for card in CARDS.values():
        assert choose_tokenise_beside(card, "auto").value is True
    assert choose_tokenise_beside(Device("mps", "Apple GPU", 16 * 2**30, True), "auto").value is True
    assert choose_tokenise_beside(Device("cpu", "CPU", None, False), "auto").value is False
    assert choose_tokenise_beside(CARDS["H100 (80 GB)"], False).value is False
    assert choose_tokenise_beside(Device("cpu", "CPU", None, False), True).value is True


def test_on_a_gpu_the_first_step_waits_only_for_the_first_minutes_data(monkeypatch):
    """A simulated H100 at 1M training tokens/s and a tokenizer at 3M tokens/s, 30 minutes: before
    the first step only the first minute's data is tokenised, and training gets the time the rest
    would have taken; on a CPU (the same speeds) everything's half is tokenised first."""
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 1e6)
    config = build_config(dict(data="unused", out="unused", model_preset="tiny", time_budget="30m", batch_size=32,
                               max_steps=None, max_tokens=None,
                               report_to="none"))
    plans = {}
    for name, device in (("gpu", CARDS["H100 (80 GB)"]), ("cpu", Device("cpu", "CPU", None, False))):
        budget = TimeBudget(1800)
        plans[name] = fit_run(config, device=device, torch_device="cpu", budget=budget, world_size=1,
                              encode_rate=3e6, say=lambda message: None)
    gpu, cpu = plans["gpu"], plans["cpu"]
    share_kept = 1 - config.val_fraction
    assert gpu.tokenise_beside.value and not cpu.tokenise_beside.value
    assert gpu.tokens_to_prepare == pytest.approx(1.1 * 1e6 * 60 / share_kept, rel=0.01)
    assert gpu.tokens_planned == pytest.approx(1.1 * 1e6 * gpu.training_seconds / share_kept, rel=0.01)
    # Tokenising 1.1 x 1M tokens/s of training at 3M/s would take over a quarter of the time first.
    assert gpu.training_seconds > 1.3 * cpu.training_seconds
    assert cpu.tokens_to_prepare == pytest.approx(0.5 * cpu.tokens_planned, rel=0.01)


def _prepare(source, tokenizer, folder, **kwargs):
    return prepare_shards(str(source), tokenizer, folder, val_fraction=0.1, progress=False, **kwargs)


def test_shards_tokenised_in_a_thread_are_read_while_it_runs_and_end_as_one_preparation(
        tmp_path, big_text_dir, tokenizer):
    folder = tmp_path / "shards"
    first = _prepare(big_text_dir, tokenizer, folder, max_tokens=60_000)
    first_files = {s["file"]: (folder / s["file"]).read_bytes() for s in first.manifest["splits"]["train"]["shards"]}
    # The thread waits after each commit until the test has read what it committed: lockstep, not timing.
    committed, go_on = threading.Semaphore(0), threading.Semaphore(0)

    def prepare(*, max_tokens, shard_tokens, stop, on_commit):
        def commit(manifest):
            on_commit(manifest)
            committed.release()
            go_on.acquire()

        _prepare(big_text_dir, tokenizer, folder, max_tokens=max_tokens, shard_tokens=shard_tokens, stop=stop,
                 on_commit=commit)

    beside = TokeniserBeside(prepare)
    beside.start(max_tokens=250_000, shard_tokens=15_000)
    sizes = []
    for _ in range(3):
        assert committed.acquire(timeout=60)
        manifest = beside.take_newest()
        assert beside.running and manifest is not None and beside.take_newest() is None  # taken once
        split = ShardedDataset(folder, manifest, committed_only=True).split("train")
        tokens = split.read(0, split.num_tokens)  # every listed shard readable, whole
        assert (tokens < len(tokenizer)).all() and tokens[0] == split.boundary_token_id  # shards checked as read
        sizes.append(split.num_tokens)
        go_on.release()
    assert first.split("train").num_tokens < sizes[0] < sizes[1] < sizes[2]
    stopper = threading.Thread(target=beside.stop)
    stopper.start()
    while stopper.is_alive():  # the commits the thread makes on its way out
        if committed.acquire(timeout=0.05):
            go_on.release()
    assert not beside.running
    # Stopped at a document's end: a finished folder that a later preparation extends from there.
    stopped = ShardedDataset.open(folder)
    assert stopped.manifest["progress"]["source"]["capped"] and stopped.split("train").num_tokens < 250_000
    for name, data in first_files.items():  # nothing written twice
        assert (folder / name).read_bytes() == data
    everything = _prepare(big_text_dir, tokenizer, folder)
    fresh = _prepare(big_text_dir, tokenizer, tmp_path / "fresh")
    for name in ("train", "val"):
        a, b = everything.split(name), fresh.split(name)
        assert (a.num_tokens, a.num_documents) == (b.num_tokens, b.num_documents)
        assert (a.read(0, a.num_tokens) == b.read(0, b.num_tokens)).all()


def _slow_in_the_thread(monkeypatch, seconds: float, fail: Exception | None = None) -> dict:
    """The tokenizer takes `seconds` a batch (or raises `fail`) when called off the main thread;
    returns what the steps did meanwhile: the training steps counted while each batch was encoded."""
    record = {"steps": 0, "steps_during_batches": []}
    encode, step = prepare_module._encode_batch, loop_module.train_step

    def encode_slowly(encoder, texts):
        if threading.current_thread() is threading.main_thread():
            return encode(encoder, texts)
        if fail is not None:
            raise fail
        before = record["steps"]
        threading.Event().wait(seconds)
        record["steps_during_batches"].append(record["steps"] - before)
        return encode(encoder, texts)

    def counted_step(*args, **kwargs):
        record["steps"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_encode_batch", encode_slowly)
    monkeypatch.setattr(prepare_module, "_BATCH_CHARS", 20_000)  # many batches, each a few documents
    monkeypatch.setattr(loop_module, "train_step", counted_step)
    return record


def _beside_settings(text_dir: Path, out: Path, seconds: float, **overrides) -> dict:
    return budget_settings(text_dir, out, seconds, tokenise_beside_training=True, batch_size=2, seq_len=16,
                           batch_tokens=32, **overrides)


def _first_seconds(monkeypatch, seconds: float) -> None:
    monkeypatch.setattr(plan_module, "BESIDE_FIRST_SECONDS", seconds)
    monkeypatch.setattr(run_module, "BESIDE_FIRST_SECONDS", seconds)


def test_a_run_trains_while_a_thread_tokenises_the_rest(tmp_path, big_text_dir, monkeypatch, capsys):
    # The probe says 2,000 tokens/s: the first 2 s of training are tokenised first, the rest beside.
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 2000.0)
    _first_seconds(monkeypatch, 2.0)
    record = _slow_in_the_thread(monkeypatch, 0.3)
    taken_up = []
    train_on = run_module.Run._train_on
    monkeypatch.setattr(run_module.Run, "_train_on",
                        lambda self, longer: (taken_up.append(longer.num_tokens), train_on(self, longer))[1])
    run, seconds = tmp_path / "run", 10.0
    summary = train(build_config(_beside_settings(big_text_dir, run, seconds, max_documents=60)))
    out = capsys.readouterr().out
    assert "tokenise " in out and "beside training" in out and summary["plan"]["tokenise_beside_training"] is True
    # The steps went on while the thread encoded (with the old pause, none could).
    assert record["steps_during_batches"] and max(record["steps_during_batches"]) > 0
    assert summary["seconds_tokenising_beside_training"] > 0.3
    # Training took up the new shards as they came, and the summary counts what was tokenised.
    assert taken_up and taken_up == sorted(taken_up)
    assert summary["tokens_prepared_before_first_step"] < taken_up[0] <= summary["tokens_prepared"]
    assert summary["phases"]["total"] <= seconds * 1.02, summary["phases"]
    dataset = ShardedDataset.open(run / "data")  # left finished: reusable, extendable
    assert dataset.split("train").num_tokens == summary["tokens_prepared"]


def test_a_thread_that_fails_stops_the_run_with_a_checkpoint(tmp_path, big_text_dir, monkeypatch):
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 2000.0)
    _first_seconds(monkeypatch, 2.0)
    _slow_in_the_thread(monkeypatch, 0.0, fail=OSError(28, "No space left on device"))
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as raised:
        train(build_config(_beside_settings(big_text_dir, run, 10.0)))
    message = str(raised.value)  # what `iterative-llm train` prints, on one line
    assert "\n" not in message and "tokenising beside training failed" in message and "No space left" in message
    assert f"--out {run} --resume" in message
    saved = latest_checkpoint(run)
    assert saved is not None, "the steps trained before the failure were not saved"
    assert json.loads((saved / STATE_FILE).read_text(encoding="utf-8"))["step"] > 0


def test_the_thread_reports_its_failure_where_training_can_act(tmp_path):
    def broken(**kwargs):
        raise ValueError("data/shards: not a shard folder")

    beside = TokeniserBeside(broken)
    beside.start(max_tokens=10, shard_tokens=10)
    beside._thread.join()
    with pytest.raises(TokenisingFailed, match="not a shard folder"):
        beside.take_newest()
    beside.start(max_tokens=10, shard_tokens=10)  # said once; it may start again
    with pytest.raises(TokenisingFailed):
        beside.stop()
