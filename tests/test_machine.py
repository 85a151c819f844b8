"""Tests for training/machine.py: cores, threads and whether bfloat16 is fast on this machine."""

from __future__ import annotations

import pytest
import torch

from training import machine


@pytest.fixture
def fresh_bf16_check():
    machine.cpu_has_native_bf16.cache_clear()
    yield
    machine.cpu_has_native_bf16.cache_clear()


def fake_topology(tmp_path, siblings: dict[int, str]):
    for cpu, text in siblings.items():
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    return tmp_path


def test_physical_cores_count_a_core_with_two_hardware_threads_once(tmp_path, monkeypatch):
    # 4 logical CPUs, 2 cores with 2 hardware threads each (Linux numbers the siblings 0,2 and 1,3).
    sysfs = fake_topology(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert machine.physical_cores(sysfs) == 2
    # Only the CPUs this process may run on count (taskset, a container's cpuset).
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    assert machine.physical_cores(sysfs) == 1
    # No SMT: every CPU its own core.
    sysfs = fake_topology(tmp_path / "plain", {0: "0", 1: "1"})
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert machine.physical_cores(sysfs) == 2


def test_threads_default_to_physical_cores_and_the_user_wins(monkeypatch):
    monkeypatch.setattr(machine, "physical_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert machine.choose_threads() == (8, "one per physical core (8 cores)")
    assert machine.choose_threads(local_processes=2)[0] == 4  # two processes on one machine share the cores
    assert machine.choose_threads(local_processes=16)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.choose_threads() == (3, "OMP_NUM_THREADS")
    assert machine.choose_threads(option=5) == (5, "--threads")  # the option beats the environment
    with pytest.raises(ValueError, match="threads"):
        machine.choose_threads(option=0)


@pytest.mark.parametrize(
    "capability, bf16_instructions, onednn_limit, native",
    [
        ("AVX2", False, None, False),  # an AVX2 desktop (AMD Zen 2/3, Intel Core before AVX-512)
        ("AVX2", True, None, False),  # an AVX-512 BF16 CPU held at AVX2 by ATEN_CPU_CAPABILITY
        ("AVX512", False, None, False),  # AVX-512 without BF16 (Skylake-X): bf16 emulated
        ("AVX512", True, None, True),  # AVX-512 BF16 (Zen 4, Cooper Lake) or AMX (Sapphire Rapids)
        ("AVX512", True, "AVX2", False),  # oneDNN held below its bf16 kernels
        ("AVX512", True, "AVX512_CORE_AMX", True),
    ],
)
def test_native_bf16_is_read_from_the_cpu_and_its_limits(
    monkeypatch, fresh_bf16_check, capability, bf16_instructions, onednn_limit, native
):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    if onednn_limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_limit)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert machine.cpu_has_native_bf16() is native
    assert machine.fast_matmul_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_other_cpus_are_measured(monkeypatch, fresh_bf16_check):
    monkeypatch.setattr(machine.platform, "machine", lambda: "arm64")
    measured = []
    monkeypatch.setattr(machine, "_bf16_is_faster_here", lambda device: measured.append(device.type) or True)
    assert machine.cpu_has_native_bf16() is True and measured == ["cpu"]


def test_the_probe_runs_and_answers():
    assert machine._bf16_is_faster_here(torch.device("cpu"), size=32, repeats=2) in (True, False)


def test_cpu_description_names_the_cpu_its_kernels_and_threads():
    text = machine.cpu_description(threads=3)
    assert machine.cpu_name() in text
    assert torch.backends.cpu.get_cpu_capability() in text
    assert "bf16" in text and "3 torch threads" in text
