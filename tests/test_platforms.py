"""Apple GPUs (MPS), simulated: what the plan, the threads and the commands choose on a Mac. Nothing
is moved to MPS here (no Mac runs these tests): torch's answers about the machine are replaced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training import machine
from training.pretrain.plan import GIB, Device, choose_precision, choose_tokenise_beside, estimate_micro_batch

from tests.conftest import tiny_config


@pytest.fixture
def a_mac(monkeypatch):
    """A Mac with an Apple GPU on macOS 14, Metal recommending 16 GiB: `set(bf16_faster=...)` says what
    the bf16 probe measures (an M1 emulates bf16: no faster)."""
    machine._probe_once.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 14)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * GIB, raising=False)
    monkeypatch.setattr(machine, "cpu_name", lambda: "Apple M2")
    answer = {"bf16_faster": True}
    monkeypatch.setattr(machine, "_bf16_is_faster_here", lambda device, size: answer["bf16_faster"])
    yield answer
    machine._probe_once.cache_clear()


def test_a_mac_trains_in_bf16_only_where_its_gpu_computes_it_natively(a_mac):
    device = Device.this_machine()
    assert (device.kind, device.name, device.memory_bytes, device.bf16) == ("mps", "Apple M2 GPU (MPS)", 16 * GIB, True)
    assert choose_precision(device, "auto").value == "bf16"
    machine._probe_once.cache_clear()
    a_mac["bf16_faster"] = False  # an M1 on macOS 14: bf16 emulated
    device = Device.this_machine()
    precision = choose_precision(device, "auto")
    assert device.bf16 is False and precision.value == "fp32"
    assert "no native bfloat16" in precision.reason and "--precision fp16" in precision.reason


def test_a_macs_micro_batch_fits_what_metal_recommends_and_says_so(a_mac, monkeypatch):
    import psutil
    from types import SimpleNamespace

    # The whole 64 GiB of the Mac is what today's sysconf reads; Metal recommends 16 GiB of it.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * GIB))
    device = Device.this_machine()
    assert device.memory_bytes == 16 * GIB and "Metal's recommended working set" in device.memory_source
    batch, _ = estimate_micro_batch(device, tiny_config(), 100_000, seq_len=64, batch_tokens=2**20,
                                    precision="bf16", preset_batch=16)
    assert "of 16 GiB (Metal's recommended working set" in batch.reason


def test_on_a_mac_the_cpu_tokenises_beside_training_with_all_but_one_core(a_mac, monkeypatch):
    from training.pretrain.config import TrainConfig
    from training.pretrain.setup import set_up_threads

    device = Device.this_machine()
    assert choose_tokenise_beside(device, "auto").value is True  # the GPU trains; the CPU cores are free
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # leave the test process's threads alone
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("RAYON_NUM_THREADS", "")
    monkeypatch.delenv("RAYON_NUM_THREADS")
    said = []
    set_up_threads(TrainConfig(), "mps", said.append)
    # The tokenizer's pool leaves one core to the Python thread that drives the GPU; no CPU line,
    # since the CPU does not train.
    assert os.environ["RAYON_NUM_THREADS"] == "7" and len(threads) == 1 and said == []
    monkeypatch.delenv("RAYON_NUM_THREADS")
    set_up_threads(TrainConfig(), "cpu", said.append)  # a CPU run: its cores train, no tokenizer pool set
    assert "RAYON_NUM_THREADS" not in os.environ and said[0].startswith("CPU: ")


def test_a_run_on_a_mac_records_its_chip(monkeypatch):
    from training.eval.bits_per_byte import hardware

    monkeypatch.setattr("training.eval.bits_per_byte.cpu_name", lambda: "Apple M3 Max")
    assert hardware(torch.device("mps"), 1) == "1 x Apple M3 Max GPU (MPS)"


# ---------------------------------------------------------------------- generate, chat, eval


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer) -> Path:
    from tests.align.test_alignment_data import save_model_folder

    return save_model_folder(tmp_path_factory.mktemp("mac") / "model", tokenizer)


@pytest.fixture
def moved_to(a_mac, monkeypatch):
    """The devices models are moved to; the model stays on the CPU, where it can run here."""
    devices = []

    def to(self, *args, **kwargs):
        devices.extend(torch.device(a) for a in args if isinstance(a, (str, torch.device)))
        return self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return devices


def test_generate_chat_and_eval_run_on_the_apple_gpu_when_not_told(folder, moved_to, tmp_path, capsys):
    from iterative_llm.cli import main as cli_main
    from training.align.chat import ChatArguments, load_chat_model

    assert cli_main(["generate", str(folder), "The", "--max_new_tokens", "2", "--temperature", "0"]) == 0
    assert moved_to == [torch.device("mps")]
    model, _ = load_chat_model(ChatArguments(model_name_or_path=str(folder)))
    assert moved_to[-1] == torch.device("mps") and model.dtype == torch.bfloat16  # bf16: native on this Mac
    (tmp_path / "text.txt").write_text("The cat sat on the mat. " * 20, encoding="utf-8")
    moved_to.clear()
    assert cli_main(["eval", str(folder), "--text", str(tmp_path / "text.txt"), "--progress", "false"]) == 0
    assert moved_to == [torch.device("mps")]
    moved_to.clear()
    assert cli_main(["generate", str(folder), "The", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    assert moved_to == [torch.device("cpu")]  # an explicit device wins


def test_sft_and_dpo_train_in_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """TRL's own default is bf16 everywhere; ours is the plan's rule: an M2 (measured faster) and an
    Ampere card yes, an M1 or a T4 (emulated, slower) no, a CPU no."""
    import torch

    from training import machine
    from training.align.common import resolve_device_defaults

    class Args:
        bf16, fp16, gradient_checkpointing, use_cpu, dataloader_pin_memory = None, False, None, False, True

    def resolved(device: str, native: bool) -> bool:
        monkeypatch.setattr(machine, "default_device", lambda: torch.device(device))
        monkeypatch.setattr(machine, "fast_matmul_dtype",
                            lambda where: torch.bfloat16 if native and torch.device(where).type != "cpu" else torch.float32)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device == "mps")
        args = type("A", (Args,), {})
        resolve_device_defaults(args)
        return args.bf16

    assert resolved("mps", native=True) is True and resolved("mps", native=False) is False
    assert resolved("cuda", native=True) is True and resolved("cuda", native=False) is False
    assert resolved("cpu", native=True) is False
