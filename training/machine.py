"""What this machine is, and what it is fast at: the facts a run is fitted to.

- `cpu_name`, `physical_cores`: the processor, and the cores this process may run on (a core with
  two hardware threads counted once).
- `choose_threads`: torch's thread count for a run: the user's option, else `OMP_NUM_THREADS`,
  else one thread per physical core (split between the processes on this machine).
- `cpu_has_native_bf16` and `fast_matmul_dtype`: whether bfloat16 matrix products are fast here.
  On x86 that takes AVX-512 BF16 or AMX; on an AVX2-only CPU (AMD Zen 2/3, Intel Core before the
  AVX-512 parts) PyTorch emulates them and they run 10 to 20 times slower than float32
  (benchmarks/results/muon_vs_torch.md), so Muon's Newton-Schulz runs in float32 there.
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
    "cpu_description",
]


@functools.cache
def cpu_name() -> str:
    """The processor's model name ("AMD EPYC 7763 64-Core Processor"), or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5, encoding="utf-8").stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """How many physical cores this process may run on.

    A core with two hardware threads (SMT, hyper-threading) is one core here: two threads of one
    core share its vector units, and PyTorch's matrix kernels fill them, so a second torch thread on
    the same core adds little and costs synchronisation. On Linux the cores are counted from the
    CPUs this process may use (its affinity, so a container's or taskset's limit counts) grouped by
    their `thread_siblings_list`; elsewhere from `sysctl hw.physicalcpu` (macOS) or os.cpu_count().
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = []
    if allowed and sysfs.is_dir():
        cores = set()
        for cpu in allowed:
            try:
                cores.add((sysfs / f"cpu{cpu}/topology/thread_siblings_list").read_text(encoding="utf-8").strip())
            except OSError:
                cores.add(f"cpu{cpu}")  # no topology: count the CPU as a core of its own
        return max(1, len(cores))
    if platform.system() == "Darwin":
        try:
            return max(1, int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True,
                                             text=True, timeout=5, encoding="utf-8").stdout))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return max(1, len(allowed) or os.cpu_count() or 1)


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
    answer does not hinge on timing noise. It takes a few milliseconds."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):  # the first one warms the kernel up and is dropped
            start = time.perf_counter()
            (a @ a).sum().item()  # .item() waits for an asynchronous device
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) < best(torch.float32)


def fast_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The precision matrix products on `device` are fast in: bfloat16 where it is native, else float32.

    CUDA: bf16 from Ampere on (`torch.cuda.is_bf16_supported` without emulation); a T4 or V100
    emulates it. MPS (Apple GPUs) and CPUs other than x86: measured. x86 CPUs: `cpu_has_native_bf16`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = cpu_has_native_bf16()
    else:
        native = _probe_once(device.type)
    return torch.bfloat16 if native else torch.float32


@functools.cache
def _probe_once(device_type: str) -> bool:
    return _bf16_is_faster_here(torch.device(device_type))


def cpu_description(threads: int | None = None) -> str:
    """One line for a figure's record: model name, PyTorch's kernel level, bf16, threads."""
    threads = torch.get_num_threads() if threads is None else threads
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return (f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {bf16}; "
            f"{physical_cores()} physical cores, {threads} torch thread{'s' if threads != 1 else ''})")
