"""What this machine is, and what it is fast at: the facts a run is fitted to.

- `cpu_name`, `physical_cores`: the processor, and the cores this process may run on (a core with
  two hardware threads counted once). Linux reads /proc and /sys, Windows the registry and psutil,
  macOS sysctl; where none answers, each says what it fell back to (`cpu_description` prints it).
- `choose_threads`: torch's thread count for a run: the user's option, else `OMP_NUM_THREADS`,
  else one thread per physical core (split between the processes on this machine).
- `cpu_has_native_bf16` and `fast_matmul_dtype`: whether bfloat16 matrix products are fast here.
  On x86 that takes AVX-512 BF16 or AMX; on an AVX2-only CPU (AMD Zen 2/3, Intel Core before the
  AVX-512 parts) PyTorch emulates them and they run 10 to 20 times slower than float32
  (benchmarks/results/muon_vs_torch.md), so Muon's Newton-Schulz runs in float32 there.
- `default_device`: where a command that is not told runs: CUDA, else an Apple GPU (MPS), else the CPU.
- `mac_gpu_memory`: what an Apple GPU may use of the memory it shares with the rest of the Mac.
- `cpu_description`: all of that in one line, printed and recorded beside every CPU figure.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

__all__ = [
    "cpu_name",
    "physical_cores",
    "choose_threads",
    "cpu_has_native_bf16",
    "fast_matmul_dtype",
    "default_device",
    "mac_gpu_memory",
    "cpu_description",
]


def _sysctl(name: str) -> str:
    """A macOS sysctl value as text ("" when it cannot be read)."""
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, encoding="utf-8",
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _windows_cpu_name() -> str:
    """The name Windows shows for the first processor, from the registry ("" when it cannot be read).
    platform.processor() there gives only the family ("Intel64 Family 6 Model 158 Stepping 10, GenuineIntel")."""
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
            return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
    except (ImportError, OSError):
        return ""


@functools.cache
def _cpu_name_and_source() -> tuple[str, str | None]:
    """(the processor's name, None) where the system's own record names it; (what stands in for it,
    where that came from) where it does not."""
    system = platform.system()
    if system == "Windows":
        name = _windows_cpu_name()
    elif system == "Darwin":
        name = _sysctl("machdep.cpu.brand_string")  # "Apple M2", "Intel(R) Core(TM) i7-9750H ..."
    else:
        name = ""
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
                if line.lower().startswith(("model name", "hardware")) and ":" in line:
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    if name:
        return name, None
    if platform.processor():
        return platform.processor(), "platform.processor()"
    return platform.machine() or "unknown CPU", "platform.machine(): no CPU name found"


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC 7763 64-Core Processor", "Apple M2"): /proc/cpuinfo on
    Linux, the registry on Windows, sysctl on macOS; else platform.processor() or the architecture
    (`cpu_description` then says so)."""
    return _cpu_name_and_source()[0]


SYSFS_CPUS = Path("/sys/devices/system/cpu")  # Linux: each CPU's topology


def _core_count(sysfs: Path) -> tuple[int, str]:
    """(cores, what was counted): "physical cores", or "logical CPUs" where no system told the cores."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # Windows and macOS have no sched_getaffinity
        allowed = []
    if allowed and sysfs.is_dir():
        cores = set()
        for cpu in allowed:
            try:
                cores.add((sysfs / f"cpu{cpu}/topology/thread_siblings_list").read_text(encoding="utf-8").strip())
            except OSError:
                cores.add(f"cpu{cpu}")  # no topology: count the CPU as a core of its own
        return max(1, len(cores)), "physical cores"
    if platform.system() == "Darwin":
        try:
            return max(1, int(_sysctl("hw.physicalcpu"))), "physical cores"
        except ValueError:
            pass
    try:  # Windows, and any system above that did not answer
        import psutil

        physical = psutil.cpu_count(logical=False)
        if physical:
            try:  # the logical CPUs this process may use (Windows' affinity), when fewer than the cores
                physical = min(physical, len(psutil.Process().cpu_affinity()))
            except (AttributeError, OSError, psutil.Error):  # macOS has no cpu_affinity
                pass
            return max(1, physical), "physical cores"
    except ImportError:
        pass
    return max(1, len(allowed) or os.cpu_count() or 1), "logical CPUs (no core count found)"


def physical_cores(sysfs: Path = SYSFS_CPUS) -> int:
    """How many physical cores this process may run on.

    A core with two hardware threads (SMT, hyper-threading) is one core here: two threads of one
    core share its vector units, and PyTorch's matrix kernels fill them, so a second torch thread on
    the same core adds little and costs synchronisation. On Linux the cores are counted from the
    CPUs this process may use (its affinity, so a container's or taskset's limit counts) grouped by
    their `thread_siblings_list`; on macOS from `sysctl hw.physicalcpu` (Apple silicon: performance
    and efficiency cores together); on Windows (and where those fail) from psutil's physical core
    count, no more than the logical CPUs the process's affinity allows. Without any of them,
    os.cpu_count()'s logical CPUs, which count each hardware thread (`cpu_description` says so).
    """
    return _core_count(sysfs)[0]


def choose_threads(option: int | None = None, local_processes: int = 1) -> tuple[int, str]:
    """torch's intra-op thread count for a run on the CPU, and why: (threads, reason).

    An explicit `option` wins, then `OMP_NUM_THREADS` (which torch itself reads), then one thread
    per physical core, shared between the `local_processes` of a multi-process run on this machine.
    """
    if option is not None:
        if option < 1:
            raise ValueError(f"`threads` must be at least 1, got {option}.")
        return option, "--threads"
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env:
        try:
            return max(1, int(from_env)), "OMP_NUM_THREADS"
        except ValueError:
            pass  # torch warns about such a value and uses its own default; so do we
    cores = physical_cores()
    threads = max(1, cores // max(1, local_processes))
    per = f" / {local_processes} processes" if local_processes > 1 else ""
    return threads, f"one per physical core ({cores} cores{per})"


# ---------------------------------------------------------------------- bfloat16


# oneDNN runs bf16 matrix products natively from these ISA levels up; ONEDNN_MAX_CPU_ISA below them
# (AVX2, AVX512_CORE, AVX512_CORE_VNNI) makes it emulate them, as on a CPU without the instructions.
_ONEDNN_BF16_LEVELS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (fast) rather than by emulation.

    x86: AVX-512 BF16 or AMX, and neither `ATEN_CPU_CAPABILITY` nor `ONEDNN_MAX_CPU_ISA` holds the
    kernels below them (a machine limited so behaves as an AVX2 one, as the test suite's AVX2 run
    does). Other CPUs (Arm: some have BF16 instructions, some not) are measured: bf16 must multiply
    faster than float32 (`_bf16_is_faster_here`).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return _bf16_is_faster_here(torch.device("cpu"))
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False  # AVX2 or less (or held there by ATEN_CPU_CAPABILITY)
    onednn_limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if onednn_limit and not any(level in onednn_limit for level in _ONEDNN_BF16_LEVELS):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _bf16_is_faster_here(device: torch.device, size: int = 256, repeats: int = 5) -> bool:
    """A measured probe: the best of `repeats` products of two size x size matrices, bf16 against float32.

    Where bf16 is emulated it is several times slower, where native about twice as fast, so the
    answer does not hinge on timing noise; bf16 must win by BF16_MARGIN, so that a tie (an emulation
    about as fast as float32) answers float32 every time rather than by chance. It takes a few
    milliseconds on a CPU."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):  # the first one warms the kernel up and is dropped
            start = time.perf_counter()
            (a @ a).sum().item()  # .item() waits for an asynchronous device
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) < BF16_MARGIN * best(torch.float32)


# bf16 counts as fast where its product takes less than this share of float32's.
BF16_MARGIN = 0.9
# The probe's matrix size on an accelerator: a GPU multiplies two 256 x 256 matrices in less time
# than it takes to launch the kernel and read the answer back, so at the CPU's size the probe
# would time the launch. 2048 x 2048 is about 17 GFLOP: milliseconds on an Apple GPU.
ACCELERATOR_PROBE_SIZE = 2048


def fast_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The precision matrix products on `device` are fast in: bfloat16 where it is native, else float32.

    CUDA: bf16 from Ampere on (`torch.cuda.is_bf16_supported` without emulation); a T4 or V100
    emulates it. MPS (Apple GPUs): macOS 14 or newer (MPS has no bfloat16 before; asking for it
    fails), and then measured: an M1's GPU has no bf16 arithmetic, which Metal emulates. Other
    accelerators and CPUs other than x86: measured. x86 CPUs: `cpu_has_native_bf16`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = cpu_has_native_bf16()
    elif device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        native = False
    else:
        native = _probe_once(device.type)
    return torch.bfloat16 if native else torch.float32


@functools.cache
def _probe_once(device_type: str) -> bool:
    return _bf16_is_faster_here(torch.device(device_type), size=ACCELERATOR_PROBE_SIZE)


# ---------------------------------------------------------------------- devices


def default_device() -> torch.device:
    """Where a command runs when it is not told: the first CUDA card, else the Mac's GPU (MPS), else
    the CPU. The one home of that order for training's plan, generate, chat and eval."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# The share of a Mac's memory its GPU is planned to have where torch cannot ask Metal: the GPU
# shares the memory with macOS and every open app, and Metal's own recommended limit
# (recommendedMaxWorkingSetSize) is about two thirds to three quarters of it.
MAC_GPU_SHARE = 2 / 3


def physical_memory() -> tuple[int, str]:
    """(bytes of memory in this machine, where that was read): psutil, else os.sysconf (no psutil)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total), "psutil"
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "os.sysconf"


def mac_gpu_memory() -> tuple[int, str]:
    """(bytes an Apple GPU may use, how that was found). The GPU has no memory of its own: it
    shares the Mac's with the system and the apps. Metal's recommended working set, where this
    torch can ask (torch.mps.recommended_max_memory), else MAC_GPU_SHARE of the physical memory."""
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    if recommended is not None:
        try:
            return int(recommended()), "Metal's recommended working set of the memory the GPU shares with the Mac"
        except RuntimeError:  # no Metal device answered: fall back to the share below
            pass
    total, source = physical_memory()
    return int(total * MAC_GPU_SHARE), (f"{MAC_GPU_SHARE:.0%} of the Mac's {total / 1024**3:.0f} GiB ({source}), "
                                        "which the GPU shares with the system: this torch cannot ask Metal")


def cpu_description(threads: int | None = None) -> str:
    """One line for a figure's record: model name, PyTorch's kernel level, bf16, cores, threads;
    where the name or the cores were not found, what stands in for them."""
    threads = torch.get_num_threads() if threads is None else threads
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    name, name_source = _cpu_name_and_source()
    if name_source:
        name = f"{name} (from {name_source})"
    cores, counted = _core_count(SYSFS_CPUS)
    return (f"{name} ({torch.backends.cpu.get_cpu_capability()}, {bf16}; "
            f"{cores} {counted}, {threads} torch thread{'s' if threads != 1 else ''})")
