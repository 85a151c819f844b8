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
        (topology / "thread_siblings_list").write_text(text + "\n", encoding="utf-8")
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


def test_the_probe_runs_and_answers():
    assert machine._bf16_is_faster_here(torch.device("cpu"), size=32, repeats=2) in (True, False)


def test_cpu_description_names_the_cpu_its_kernels_and_threads():
    text = machine.cpu_description(threads=3)
    assert machine.cpu_name() in text
    assert torch.backends.cpu.get_cpu_capability() in text
    assert "bf16" in text and "3 torch threads" in text


# ---------------------------------------------------------------------- Windows and macOS (simulated)


@pytest.fixture
def fresh_cpu_name():
    machine._cpu_name_and_source.cache_clear()
    yield
    machine._cpu_name_and_source.cache_clear()


class _Sysctl:
    """subprocess.run as macOS's `sysctl -n NAME` answers it."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    def __call__(self, command, **kwargs):
        from types import SimpleNamespace

        assert command[:2] == ["sysctl", "-n"]
        return SimpleNamespace(stdout=self.values.get(command[2], "") + "\n", returncode=0)


def fake_winreg(name: str | None):
    """A winreg module whose CentralProcessor\\0 key holds `name` (None: the key cannot be opened)."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    @contextmanager
    def open_key(root, path):
        if name is None:
            raise FileNotFoundError(path)
        assert root == "HKLM" and path == r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
        yield "key"

    return SimpleNamespace(HKEY_LOCAL_MACHINE="HKLM", OpenKey=open_key,
                           QueryValueEx=lambda key, value: (name, 1) if value == "ProcessorNameString" else None)


def test_windows_names_the_cpu_from_the_registry_else_says_what_stands_in(monkeypatch, fresh_cpu_name):
    import sys

    monkeypatch.setattr(machine.platform, "system", lambda: "Windows")
    monkeypatch.setattr(machine.platform, "processor", lambda: "Intel64 Family 6 Model 158 Stepping 10, GenuineIntel")
    monkeypatch.setitem(sys.modules, "winreg", fake_winreg("AMD Ryzen 7 5800X 8-Core Processor "))
    assert machine.cpu_name() == "AMD Ryzen 7 5800X 8-Core Processor"
    assert "(from" not in machine.cpu_description(threads=1)
    machine._cpu_name_and_source.cache_clear()
    monkeypatch.setitem(sys.modules, "winreg", fake_winreg(None))
    assert machine.cpu_name().startswith("Intel64 Family 6")
    assert "(from platform.processor())" in machine.cpu_description(threads=1)


def test_a_mac_names_its_chip_and_counts_its_cores_with_sysctl(monkeypatch, fresh_cpu_name):
    monkeypatch.setattr(machine.platform, "system", lambda: "Darwin")
    monkeypatch.delattr(machine.os, "sched_getaffinity", raising=False)  # macOS has none
    monkeypatch.setattr(machine.subprocess, "run", _Sysctl({"machdep.cpu.brand_string": "Apple M2",
                                                            "hw.physicalcpu": "8"}))
    assert machine.cpu_name() == "Apple M2"
    assert machine.physical_cores() == 8
    assert "Apple M2 (" in machine.cpu_description(threads=1) and "8 physical cores" in machine.cpu_description(1)


def test_windows_counts_physical_cores_with_psutil_within_its_affinity(monkeypatch):
    import sys
    from types import SimpleNamespace

    import psutil

    monkeypatch.setattr(machine.platform, "system", lambda: "Windows")
    monkeypatch.delattr(machine.os, "sched_getaffinity", raising=False)  # Windows has none
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 16)  # 8 cores with two hardware threads each
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    allowed = list(range(16))
    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(cpu_affinity=lambda: allowed))
    assert machine.physical_cores() == 8
    assert "8 physical cores" in machine.cpu_description(threads=1)
    allowed[:] = [0, 1, 2]  # started with a 3-CPU affinity (start /affinity 7)
    assert machine.physical_cores() == 3
    # Without psutil: the logical CPUs, and the description says that is what they are.
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert machine.physical_cores() == 16
    assert "16 logical CPUs (no core count found)" in machine.cpu_description(threads=1)


@pytest.mark.parametrize("arch, measured", [("arm64", True),  # macOS on Apple silicon
                                            ("ARM64", True),  # Windows on Arm
                                            ("aarch64", True),  # Linux on Arm
                                            ("AMD64", False)])  # Windows on x86: read from the CPU
def test_arm_cpus_are_measured_and_x86_ones_read(monkeypatch, fresh_bf16_check, arch, measured):
    monkeypatch.setattr(machine.platform, "machine", lambda: arch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    probed = []
    monkeypatch.setattr(machine, "_bf16_is_faster_here", lambda device: probed.append(device.type) or True)
    assert machine.cpu_has_native_bf16() is measured
    assert probed == (["cpu"] if measured else [])


@pytest.fixture
def fresh_probe():
    machine._probe_once.cache_clear()
    yield
    machine._probe_once.cache_clear()


@pytest.mark.parametrize("macos_14, faster, dtype", [(False, True, torch.float32),  # no MPS bf16 before macOS 14
                                                     (True, False, torch.float32),  # an M1: emulated
                                                     (True, True, torch.bfloat16)])  # M2 and later
def test_an_apple_gpu_has_bf16_from_macos_14_where_it_measures_faster(monkeypatch, fresh_probe, macos_14, faster,
                                                                       dtype):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14 and major <= 14)
    probed = []
    monkeypatch.setattr(machine, "_bf16_is_faster_here",
                        lambda device, size: probed.append((device.type, size)) or faster)
    assert machine.fast_matmul_dtype("mps") == dtype
    # Before macOS 14 MPS refuses bf16 tensors: no probe. On a GPU the probe's matrices are large
    # enough that it times the product, not the kernel's launch.
    assert probed == ([("mps", machine.ACCELERATOR_PROBE_SIZE)] if macos_14 else [])


def test_the_default_device_is_cuda_then_an_apple_gpu_then_the_cpu(monkeypatch):
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert machine.default_device() == torch.device(expected)


def test_an_apple_gpu_gets_metals_share_of_the_memory_it_shares(monkeypatch):
    import sys

    import psutil
    from types import SimpleNamespace

    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * 1024**3, raising=False)
    memory, source = machine.mac_gpu_memory()
    assert memory == 21 * 1024**3 and "Metal's recommended working set" in source
    # A torch without the call: a stated share of the physical memory, not all of it.
    monkeypatch.delattr(torch.mps, "recommended_max_memory", raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * 1024**3))
    memory, source = machine.mac_gpu_memory()
    assert memory == 16 * 1024**3 and source.startswith("67% of the Mac's 24 GiB (psutil)")
    monkeypatch.setitem(sys.modules, "psutil", None)
    pages = {"SC_PAGE_SIZE": 16384, "SC_PHYS_PAGES": 3 * 1024**3 // 16384}
    monkeypatch.setattr(machine.os, "sysconf", lambda name: pages[name])
    memory, source = machine.mac_gpu_memory()
    assert memory == 2 * 1024**3 and "(os.sysconf)" in source


# ---------------------------------------------------------------------- when the process started


def test_the_start_time_is_read_from_proc_on_linux(tmp_path, monkeypatch):
    from training.pretrain import budget

    stat, uptime = tmp_path / "stat", tmp_path / "uptime"
    ticks = budget.os.sysconf("SC_CLK_TCK")
    # The command's name may hold spaces and brackets: fields are counted after its last ")".
    stat.write_text("4242 (python (x) y) S " + " ".join(["0"] * 18) + f" {100 * ticks} 0 0\n", encoding="utf-8")
    uptime.write_text("107.5 200.0\n", encoding="utf-8")
    monkeypatch.setattr(budget, "PROC_STAT", str(stat))
    monkeypatch.setattr(budget, "PROC_UPTIME", str(uptime))
    before = budget.time.monotonic()
    started = budget.process_start_time()
    assert before - 7.5 - 0.5 < started <= before - 7.5 + 0.5


def test_without_proc_the_start_time_comes_from_psutil_and_a_long_lived_process_counts_from_now(
        tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    import psutil

    from training.pretrain import budget

    monkeypatch.setattr(budget, "PROC_STAT", str(tmp_path / "no_proc" / "stat"))  # Windows, macOS
    started_at = [budget.time.time() - 5.0]
    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(create_time=lambda: started_at[0]))
    now = budget.time.monotonic()
    assert now - 5.5 < budget.process_start_time() < now - 4.5
    started_at[0] = budget.time.time() - 3600  # a test runner or a notebook: the budget counts from the call
    assert budget.process_start_time() >= now
    monkeypatch.setitem(sys.modules, "psutil", None)  # no psutil: the time of the call, as before
    assert budget.process_start_time() >= now
