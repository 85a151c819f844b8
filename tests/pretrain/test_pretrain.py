"""Pretraining end to end on a tiny model and test-made text: train, resume, export, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterative_llm.tokenization import token_byte_lengths
from training.pretrain import checkpoint as checkpoint_module
from training.data.batches import RandomWindowBatches
from training.pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from training.pretrain.config import build_config, parse_args
from training.eval.bits_per_byte import evaluate, flops_per_token
from training.pretrain.trainer import TrainingError, train
from training.data.shards import ShardedDataset

from tests.conftest import child_env, posix_only, process_alive, run_process_tree, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, corpus) -> Path:
    """Forty small documents as .txt files."""
    folder = tmp_path_factory.mktemp("text")
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(corpus[i % len(corpus):] [:3]) + f" Document {i}.", encoding="utf-8")
    return folder


def settings(text_dir: Path, out: Path, **overrides) -> dict:
    """A few-second run: a 2-layer, 32-wide model on 32-token windows."""
    values = dict(
        out=str(out), data=str(text_dir), val_fraction=0.1, model_preset="tiny",
        model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 320},
        seq_len=32, batch_size=4, batch_tokens=128, max_steps=8, max_time=None, eval_every=4,
        eval_tokens=512, log_every=1, checkpoint_every=0, sample_every=0, sample_tokens=4,
        sample_prompts=["The cat"], report_to="none", progress=False, lr_embed=0.05, lr_head=0.01,
        muon_momentum_warmup_steps=4,
    )
    values.update(overrides)
    return values


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


def test_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path, text_dir):
    run = tmp_path / "run"
    summary = train(build_config(settings(text_dir, run, max_steps=30, eval_every=0, lr_matrix=0.05)))
    curve = losses(run)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < curve[0] - 0.5
    assert summary["final_val_bpb"] > 0 and (run / "summary.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    # The loss trained on is the next-token loss that evaluation measures: scored on training
    # windows, the final model's evaluation loss is close to the last training losses (a label
    # shifted one place too far, say, would leave them far apart).
    on_train = evaluate(model, ShardedDataset.open(run / "data").split("train"), torch.from_numpy(
        token_byte_lengths(tokenizer).astype("int64")), batch_size=4, seq_len=32, max_tokens=4096,
        device=torch.device("cpu"))
    assert abs(on_train["val_loss"] - sum(curve[-5:]) / 5) < 0.3
    ids = tokenizer("The cat", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    card = (run / "README.md").read_text(encoding="utf-8")
    assert f"{summary['final_val_bpb']:.4f}" in card and "{" not in card.split("---", 2)[2].replace("{%", "")
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads((run / "versions.json").read_text(encoding="utf-8"))
    assert recorded["torch"] == torch.__version__.split("+")[0] or recorded["torch"].startswith(torch.__version__[:4])


def test_generate_command_reads_a_run_folder(tmp_path, text_dir, capsys):
    from training.eval.generate import main as generate_main

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=4, eval_every=0)))
    capsys.readouterr()
    assert generate_main([str(run), "The cat", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The cat")
    assert generate_main([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_after_a_stop_matches_the_uninterrupted_run(tmp_path, text_dir, monkeypatch):
    straight = tmp_path / "straight"
    train(build_config(settings(text_dir, straight)))

    # Send ourselves SIGINT while step 4 (index 3) reads its batch: the loop finishes that step,
    # writes a checkpoint and stops, as it does for Ctrl-C.
    original = RandomWindowBatches.batch_at

    def interrupting(self, step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, step)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(RandomWindowBatches, "batch_at", interrupting)
    result = train(build_config(settings(text_dir, interrupted)))
    assert result["stopped"] and result["step"] == 4
    assert latest_checkpoint(interrupted).name == "step_00000004"
    monkeypatch.setattr(RandomWindowBatches, "batch_at", original)

    train(build_config(settings(text_dir, interrupted, resume=True)))
    assert losses(interrupted) == losses(straight)


def test_prepare_makes_the_tokenizer_and_shards_that_train_then_uses_as_they_are(tmp_path, text_dir, capsys):
    """`iterative-llm prepare SOURCE OUT` runs the whole data stage (text -> tokenizer -> shards) on
    its own, and says how to train on it; that command trains without tokenising anything again."""
    import yaml

    from training.data import prepare

    shards = tmp_path / "shards"
    assert prepare.main([str(text_dir), str(shards), "--vocab_size", "320", "--val_fraction", "0.1"]) == 0
    told = capsys.readouterr().err
    assert "training a 320-token byte-level BPE tokenizer" in told and (shards / "tokenizer").is_dir()
    command = told.split("train on it: iterative-llm train ")[1].split()
    assert command == ["--data", str(text_dir), "--data_cache", str(shards), "--val_fraction", "0.1"]
    written = {path.name: path.stat().st_mtime_ns for path in shards.rglob("*") if path.is_file()}

    # The command as told, on top of a small model's settings (in a --config file).
    small = settings(text_dir, tmp_path / "run", max_steps=2, eval_every=0)
    del small["data"], small["val_fraction"]
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small), encoding="utf-8")
    summary = train(parse_args([*command, "--config", str(tmp_path / "small.yaml")]))
    said = capsys.readouterr().out
    assert summary["steps"] == 2 and "tokenizer" not in said.split("data:")[0]
    assert {path.name: path.stat().st_mtime_ns for path in shards.rglob("*") if path.is_file()} == written


def test_batch_tokens_become_gradient_accumulation(tmp_path, text_dir):
    """Two micro-steps of 2 rows give the same losses as one step of 4 rows: the same tokens."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    train(build_config(settings(text_dir, one, max_steps=3, eval_every=0, batch_size=4)))
    train(build_config(settings(text_dir, two, max_steps=3, eval_every=0, batch_size=2, data_cache=str(one / "data"))))
    torch.testing.assert_close(torch.tensor(losses(one)), torch.tensor(losses(two)), rtol=1e-4, atol=1e-4)


def test_a_run_takes_its_threads_and_muon_precision_from_the_machine(tmp_path, text_dir, monkeypatch, capsys):
    from training import machine

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)  # as on an AVX2 CPU
    before = torch.get_num_threads()
    try:
        summary = train(build_config(settings(text_dir, tmp_path / "run", max_steps=2, eval_every=0, threads=2)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    said = capsys.readouterr().out
    assert "optimizers Float32Muon + AdamW" in said  # Newton-Schulz in float32, not emulated bf16
    assert f"CPU: {machine.cpu_name()}" in said and "threads: --threads" in said
    assert machine.cpu_name() in summary["hardware"] and "no native bf16" in summary["hardware"]


@posix_only
@pytest.mark.slow
def test_two_data_parallel_processes_match_one_process(tmp_path, text_dir):
    """torchrun --nproc_per_node 2 (gloo, CPU) with 2 rows each == 1 process with 4 rows."""
    single = tmp_path / "single"
    # Gentle learning rates: the comparison is of the arithmetic, and large steps on a 37k-parameter
    # model amplify the last-bit differences of a two-process gradient average from step to step.
    gentle = dict(max_steps=4, eval_every=0, lr_matrix=0.005, lr_embed=0.01, lr_head=0.002, lr_scalar=0.01)
    train(build_config(settings(text_dir, single, **gentle)))
    config = tmp_path / "ddp.yaml"
    import yaml

    config.write_text(yaml.safe_dump(settings(text_dir, tmp_path / "ddp", batch_size=2, data_cache=str(single / "data"),
                                              **gentle)), encoding="utf-8")
    env = child_env(OMP_NUM_THREADS="1")
    # Well inside CI's limit; on a timeout the launcher and both workers are killed, none outlives the test.
    result = run_process_tree(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "training.pretrain", "--config", str(config)],
        timeout=240, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text(encoding="utf-8"))["processes"] == 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")), torch.tensor(losses(single)), rtol=1e-4, atol=1e-4)


@posix_only
def test_a_command_past_its_timeout_is_killed_with_all_its_processes(tmp_path):
    """What the data-parallel test relies on: a hung torchrun takes its workers down with it."""
    pid_file = tmp_path / "child.pid"
    parent = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(600)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)")
    with pytest.raises(pytest.fail.Exception, match=r"did not finish within 3 s; it was killed with all its processes"):
        run_process_tree([sys.executable, "-c", parent], timeout=3)
    child = int(pid_file.read_text(encoding="utf-8"))
    for _ in range(50):  # SIGKILL is delivered at once; the process table may lag a moment
        if not process_alive(child):
            break
        time.sleep(0.1)
    assert not process_alive(child)


# ---------------------------------------------------------------- checkpoints under failure


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    optimizers = [torch.optim.AdamW(model.parameters())]
    save_checkpoint(tmp_path, model, optimizers, {"step": 1, "tokens": 0, "time": 0.0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")  # not an OSError: no clean-up runs, as with a kill

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, optimizers, {"step": 2, "tokens": 0, "time": 0.0})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), tiny_model(), [torch.optim.AdamW(model.parameters())])["step"] == 1


KILL_LOOP = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from tests.conftest import tiny_model
    from training.pretrain.checkpoint import save_checkpoint
    model = tiny_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=2048)
    optimizers = [torch.optim.AdamW(model.parameters())]
    model(torch.ones(1, 2, dtype=torch.long)).logits.sum().backward(); optimizers[0].step()
    step = 0
    while True:
        step += 1
        save_checkpoint(sys.argv[1], model, optimizers, {"step": step, "tokens": 0, "time": 0.0}, keep=2)
        print(step, flush=True)
    """
)


@posix_only
@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_latest_checkpoint(tmp_path):
    import random

    rng = random.Random(0)
    for attempt in range(3):
        folder = tmp_path / f"run{attempt}"
        process = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(folder), str(ROOT)], stdout=subprocess.PIPE, text=True, encoding="utf-8")
        assert process.stdout.readline().strip() == "1"  # one checkpoint is complete
        time.sleep(rng.uniform(0.05, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = latest_checkpoint(folder)
        model = tiny_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=2048)
        state = load_checkpoint(latest, model, [torch.optim.AdamW(model.parameters())])
        assert state["step"] >= 1


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    model = tiny_model()
    optimizers = [torch.optim.AdamW(model.parameters())]
    save_checkpoint(tmp_path, model, optimizers, {"step": 1, "tokens": 0, "time": 0.0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk is full.*step_00000001 is intact.*--resume"):
        save_checkpoint(tmp_path, model, optimizers, {"step": 2, "tokens": 0, "time": 0.0})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_a_full_disk_is_recognised_through_the_errors_torch_and_safetensors_wrap_it_in(tmp_path, monkeypatch):
    """On a real full disk torch.save raises a RuntimeError ("unexpected pos") and safetensors a
    SafetensorError, not the OSError: the disk itself, or the message, says it is full."""
    import shutil
    from collections import namedtuple

    model = tiny_model()
    optimizers = [torch.optim.AdamW(model.parameters())]
    save_checkpoint(tmp_path, model, optimizers, {"step": 1, "tokens": 0, "time": 0.0})
    usage = namedtuple("usage", "total used free")

    def torch_on_a_full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3176960 vs 3176848")

    class SafetensorError(Exception):
        pass

    def safetensors_on_a_full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    with pytest.raises(CheckpointError, match=r"disk is full.*step_00000002. The previous checkpoint .*step_00000001 is"):
        save_checkpoint(tmp_path, model, optimizers, {"step": 2, "tokens": 0, "time": 0.0})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room to spare: not a full disk, a bug
        save_checkpoint(tmp_path, model, optimizers, {"step": 2, "tokens": 0, "time": 0.0})
    monkeypatch.setattr(model, "save_pretrained", safetensors_on_a_full_disk)
    with pytest.raises(CheckpointError, match=r"disk is full"):
        save_checkpoint(tmp_path, model, optimizers, {"step": 2, "tokens": 0, "time": 0.0})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_full_disk_during_the_export_keeps_the_model_folder_and_the_checkpoint(tmp_path, text_dir, monkeypatch, capsys):
    from iterative_llm import IterativeLLMForCausalLM
    from training.pretrain.trainer import main

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0)))
    exported = {name: (run / name).read_bytes() for name in ("model.safetensors", "config.json", "README.md")}
    original = IterativeLLMForCausalLM.save_pretrained

    def full(self, folder, *args, **kwargs):
        if "checkpoints" in Path(folder).parts:  # checkpoints still fit; the model folder does not
            return original(self, folder, *args, **kwargs)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IterativeLLMForCausalLM, "save_pretrained", full)
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--max_steps", "3"]) == 1
    checkpoint = run / "checkpoints" / "step_00000003"
    assert (f"The disk is full: could not write the model folder {run}. The run's checkpoint {checkpoint} is intact"
            in capsys.readouterr().err)
    assert {name: (run / name).read_bytes() for name in exported} == exported  # the previous export, whole
    assert not list(run.glob(".export-*"))
    monkeypatch.undo()
    assert main(["--out", str(run), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 3
    assert (run / "model.safetensors").read_bytes() != exported["model.safetensors"]


def test_corrupt_and_mismatched_checkpoints_are_named(tmp_path, text_dir):
    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0)))
    with pytest.raises(CheckpointError, match=r"different model \(hidden_size: checkpoint 32, now 48"):
        train(build_config(settings(text_dir, run, resume=True, max_steps=4,
                                    model={**settings(text_dir, run)["model"], "hidden_size": 48})))
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"No intact checkpoint .*damaged: step_00000002; nothing was deleted"):
        train(build_config(settings(text_dir, run, resume=True, max_steps=4)))
    assert weights.is_file()


class RunsCode:
    """What a crafted training_state.pt holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, text_dir, capsys):
    from training.pretrain.trainer import main

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0)))
    marker = tmp_path / "MARKER"
    crafted = latest_checkpoint(run) / "training_state.pt"
    torch.save({"optimizers": [RunsCode(marker)], "rng": {}}, crafted)
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--max_steps", "3"]) == 1
    assert not marker.exists()
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(crafted) in error and "would run code" in error and "system" in error


def test_checkpoints_of_every_earlier_version_still_load(tmp_path):
    """Checkpoints have always held the numpy RNG state (an ndarray) and, before torch.optim.Muon, our
    Muon's groups with an "ns_dtype" (a torch.dtype): both load without unpickling code."""
    from training.pretrain.optim import build_optimizers

    model = tiny_model()
    optimizers = build_optimizers(model)
    model(torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    path = save_checkpoint(tmp_path, model, optimizers, {"step": 1, "tokens": 0, "time": 0.0})
    state = torch.load(path / "training_state.pt", weights_only=False)  # our own file: a test may trust it
    assert type(state["rng"]["numpy"][1]).__module__ == "numpy"
    muon = state["optimizers"][0]
    muon["param_groups"] = [{k: g[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "ns_steps", "name",
                                               "initial_lr", "params")} | {"ns_dtype": torch.float32}
                            for g in muon["param_groups"]]
    torch.save(state, path / "training_state.pt")
    fresh = tiny_model(seed=1)
    fresh_optimizers = build_optimizers(fresh)
    assert load_checkpoint(path, fresh, fresh_optimizers)["step"] == 1
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert "ns_dtype" not in fresh_optimizers[0].param_groups[0]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, text_dir, capsys):
    from training.pretrain.trainer import main

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=4, eval_every=0, checkpoint_every=2)))
    damaged = latest_checkpoint(run)
    assert damaged.name == "step_00000004"
    (damaged / "training_state.pt").write_bytes(os.urandom(2048))
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--max_steps", "5"]) == 0
    out = capsys.readouterr().out
    aside = run / "checkpoints" / "damaged-step_00000004"
    assert f"skipped checkpoint {damaged}: {damaged / 'training_state.pt'} is corrupt" in out
    assert f"It is kept as {aside}." in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} (step 2" in out
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 5
    # Set aside, it is neither written over when the run saves step 4 again, nor counted as one to keep.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step_00000004", "latest", "step_00000004", "step_00000005"]
    assert len((aside / "training_state.pt").read_bytes()) == 2048


def test_resume_never_deletes_a_damaged_checkpoint(tmp_path, capsys):
    from training.pretrain.checkpoint import resume_checkpoint

    model = tiny_model()
    optimizers = [torch.optim.AdamW(model.parameters())]
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizers, {"step": step, "tokens": 0, "time": 0.0}, keep=3)
    root = tmp_path / "checkpoints"
    (root / "step_00000003" / "training_state.pt").write_bytes(b"")
    (root / "step_00000002" / "trainer_state.json").write_text("{not json", encoding="utf-8")
    path, state = resume_checkpoint(tmp_path, tiny_model(), [torch.optim.AdamW(model.parameters())], set_aside=False)
    assert (path.name, state["step"]) == ("step_00000001", 1)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [f"skipped checkpoint {root / 'step_00000003'}",
                                                    f"skipped checkpoint {root / 'step_00000002'}"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    resume_checkpoint(tmp_path, tiny_model(), [torch.optim.AdamW(model.parameters())])  # set aside: renamed
    assert sorted(p.name for p in root.iterdir()) == [
        "damaged-step_00000002", "damaged-step_00000003", "latest", "step_00000001"]
    assert (root / "damaged-step_00000003" / "training_state.pt").read_bytes() == b""


def test_nan_loss_stops_with_a_clear_message(tmp_path, text_dir, monkeypatch):
    from iterative_llm import IterativeLLMForCausalLM

    forward = IterativeLLMForCausalLM.forward

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training and output.loss is not None:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(IterativeLLMForCausalLM, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 1.*Lower the learning rates"):
        train(build_config(settings(text_dir, tmp_path / "run")))


# ---------------------------------------------------------------- bad settings and data


def test_an_existing_run_is_never_overwritten(tmp_path, text_dir):
    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0)))
    with pytest.raises(TrainingError, match="already holds checkpoints. Pass --resume"):
        train(build_config(settings(text_dir, run, max_steps=2)))
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        train(build_config(settings(text_dir, tmp_path / "fresh", resume=True)))


def test_missing_and_empty_data_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(build_config(settings(tmp_path / "nowhere", tmp_path / "run")))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no"):
        train(build_config(settings(empty, tmp_path / "run2")))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, text_dir, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    values = settings(text_dir, tmp_path / "run", tokenizer=str(tmp_path / "tok"))
    values["model"] = {**values["model"], "vocab_size": len(tokenizer) - 20}
    with pytest.raises(ValueError, match=f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size"):
        train(build_config(values))


def test_command_line_parsing_and_its_errors(capsys):
    config = parse_args(["--preset", "tiny", "--max_steps", "7", "--max-time", "none", "--model.hidden_size", "64",
                         "--sample_prompts", "[a, b]", "--report_to", "none", "--resume"])
    assert (config.max_steps, config.max_time, config.model["hidden_size"], config.report_to, config.resume) == (
        7, None, 64, "none", True)
    assert config.data == "builtin:python-docs"  # from the preset
    with pytest.raises(ValueError, match="Unknown training preset 'huge'. Available presets: auto, gpt1, gpt2-small, tiny"):
        parse_args(["--preset", "huge"])
    with pytest.raises(ValueError, match="Unknown training field 'learning_rate'"):
        build_config({"learning_rate": 1.0})
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])


def test_the_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from iterative_llm.cli import main as cli_main

    assert cli_main(["train", "--preset", "huge"]) == 2
    assert "Unknown training preset" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--report_to", "none"]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


def test_flops_per_token_matches_a_hand_count():
    config = tiny_config()  # 2 layers, C=64, H=4 heads of 16, K=2 kv heads, I=128, V=128, relu2
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 128 * 64  # q, k, v, o, up, down
    matmul_params = 2 * per_layer + 64 * 128  # + head
    assert flops_per_token(config, seq_len=32) == 6 * matmul_params + 12 * 2 * 4 * 16 * 32


# ---------------------------------------------------------------- as a new user meets it: resume, typos, help


def stop_at(monkeypatch, step: int) -> None:
    """Send SIGINT while step `step` (1-based) reads its batch, as Ctrl-C would."""
    original = RandomWindowBatches.batch_at

    def interrupting(self, index):
        if index == step - 1:
            monkeypatch.setattr(RandomWindowBatches, "batch_at", original)
            signal.raise_signal(signal.SIGINT)
        return original(self, index)

    monkeypatch.setattr(RandomWindowBatches, "batch_at", interrupting)


def test_resume_continues_with_the_runs_own_settings(tmp_path, text_dir, monkeypatch, capsys):
    import yaml

    from training.pretrain.trainer import main

    run = tmp_path / "run"
    values = settings(text_dir, run, max_steps=6, eval_every=0)
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    stop_at(monkeypatch, 3)
    assert main(["--config", str(config_file)]) == 0
    assert latest_checkpoint(run).name == "step_00000003"
    saved = (run / "run_config.yaml").read_text(encoding="utf-8")

    # The README's command: only --out and --resume. The preset would say 250 steps of builtin data.
    assert parse_args(["--out", str(run), "--resume"]).max_steps == 6
    assert main(["--out", str(run), "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 6 and summary["data"] == str(text_dir)
    assert yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8"))["train"] == yaml.safe_load(saved)["train"]

    # A longer budget may be given; it is recorded with the step it applies from.
    assert parse_args(["--out", str(run), "--resume", "--max_steps", "9", "--log_every", "3"]).max_steps == 9
    # Options that would change the data order or the model are refused, each named.
    with pytest.raises(ValueError, match=r"would change its data order or its model: --seed 1 \(the run has 1337\); "
                                         r"--model.hidden_size 48 \(the run has 32\)"):
        parse_args(["--out", str(run), "--resume", "--seed", "1", "--model.hidden_size", "48"])
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--batch_size", "2"]) == 2
    assert "--batch_size 2 (the run has 4)" in capsys.readouterr().err


def test_a_resume_that_extends_the_run_records_it(tmp_path, text_dir):
    import yaml

    from training.pretrain.trainer import main

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=3, eval_every=0)))
    assert main(["--out", str(run), "--resume", "--max_steps", "5"]) == 0
    saved = yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["max_steps"] == 5 and saved["train"]["seed"] == 1337
    assert saved["resumed"] == [{"step": 3, "changed": {"max_steps": 5}}]
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == 5


def test_shards_of_other_data_are_never_advised_away(tmp_path, text_dir, corpus):
    first = tmp_path / "first"
    train(build_config(settings(text_dir, first, max_steps=1, eval_every=0)))
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(corpus), encoding="utf-8")
    with pytest.raises(TrainingError) as caught:
        train(build_config(settings(other, tmp_path / "second", max_steps=1, data_cache=str(first / "data"))))
    message = str(caught.value)
    assert "delete" not in message.lower()
    assert f"pass --data {text_dir}" in message and "a --data_cache folder of its own" in message


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    from training.pretrain.trainer import main

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    for data in (tmp_path / "missing.txt", empty):
        run = tmp_path / f"run-{data.stem}"
        assert main(["--data", str(data), "--out", str(run), "--report_to", "none", "--progress", "false"]) == 1
        assert not run.exists()
    assert "missing.txt" in capsys.readouterr().err
    # A folder that was there before stays, and nothing is added to it.
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["--data", str(empty), "--out", str(kept), "--report_to", "none", "--progress", "false"]) == 1
    assert kept.is_dir() and not any(kept.iterdir())


def test_unknown_names_are_errors_with_a_hint(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Unknown model field 'num_hidden_layer'.*Did you mean 'num_hidden_layers'"):
        parse_args(["--model.num_hidden_layer", "2"])
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("model:\n  hiden_size: 64\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"Unknown model field 'hiden_size' in {config_file}.*Did you mean 'hidden_size'"):
        parse_args(["--config", str(config_file)])
    with pytest.raises(ValueError, match="Unknown model field 'num_hidden_layer'"):
        build_config({"model": {"num_hidden_layer": 2}})
    with pytest.raises(SystemExit):
        parse_args(["--max_step", "5"])  # no abbreviations
    assert "unrecognized arguments: --max_step 5. Did you mean '--max_steps'?" in capsys.readouterr().err
    assert parse_args(["--model.num_hidden_layers", "2", "--max-steps", "5"]).max_steps == 5


def help_text(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_help_describes_each_option_once_with_the_default_that_applies(capsys):
    import dataclasses
    import re

    from training.pretrain.config import SECTIONS, TrainConfig, load_preset

    def entries(text: str) -> dict[str, str]:
        """option -> its help, one entry per listed option."""
        found = re.findall(r"^  (-[-\w.]+)(.*(?:\n {4,}.*)*)", text, re.M)
        assert len({option for option, _ in found}) == len(found), "an option is listed twice"
        return {option: " ".join(rest.split()) for option, rest in found}

    text = help_text(capsys)
    listed = entries(text)
    for f in dataclasses.fields(TrainConfig):
        option = "--model.FIELD" if f.name == "model" else f"--{f.name}"
        squeezed = lambda text: re.sub(r"[\s-]", "", text)  # noqa: E731  (argparse wraps at hyphens too)
        assert squeezed(f.metadata["help"]) in squeezed(listed.pop(option)), option
        assert listed.get(f"--{f.name}".replace("_", "-")) is None  # the dashed alias works but is not listed
    assert set(listed) == {"-h", "--preset", "--config"}
    assert all(help.count("(default") == 1 for option, help in entries(text).items() if option not in ("-h", "--config"))
    for title, _ in SECTIONS:
        assert f"\n{title}:\n" in text
    tiny, gpt2 = load_preset("tiny"), load_preset("gpt2-small")
    assert entries(text)["--max_steps"].endswith(f"(default: {tiny['max_steps']})")
    assert entries(help_text(capsys, "--preset", "gpt2-small"))["--data"].endswith(f"(default: {gpt2['data']})")


def test_tensorboard_logs_go_where_the_readme_says(tmp_path, text_dir):
    import re

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0, report_to="tensorboard")))
    assert list((run / "logs").glob("events.out.tfevents.*")) and not (run / "pretrain").exists()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("writes one folder:", 1)[1].split("\n\n", 2)[1]
    listed = [name for row in table.splitlines()[2:] for name in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert "logs/" in listed
    for name in listed:
        assert (run / name.rstrip("/")).exists(), f"README lists {name}, which the run folder lacks"


def test_one_way_of_sampling_and_of_stopping(tmp_path, text_dir, monkeypatch):
    """The exported folder's generation_config, `iterative-llm generate` and the samples logged in training
    sample alike (temperature 0.8, top-k 50), and the folder stops at end-of-text and at `<|end|>`."""
    import training.eval.generate
    from training.eval.bits_per_byte import sample

    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=2, eval_every=0)))
    saved = json.loads((run / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert (saved["temperature"], saved["top_k"], saved["do_sample"]) == (0.8, 50, True)
    assert saved["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    options = training.eval.generate.build_parser().parse_args([str(run)])
    assert (options.temperature, options.top_k) == (0.8, 50)

    asked = {}

    def continue_ids(model, ids, max_new_tokens, **kwargs):
        asked.update(kwargs)
        return [[]], None

    monkeypatch.setattr(training.eval.generate, "continue_ids", continue_ids)
    sample(AutoModelForCausalLM.from_pretrained(run), tokenizer, ["The cat"], max_new_tokens=2)
    assert (asked["temperature"], asked["top_k"], asked["do_sample"]) == (0.8, 50, True)
