"""Shared fixtures: everything is built from a tiny config so the suite runs on 2 CPU cores."""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import tempfile

import pytest
import torch

# Tests never touch the network: the hub is unreachable in CI, and a test must not wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's kernel cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: kernels built while
# the suite ran held at AVX2 (as the README says to check) crashed a later run without the limit on
# the same machine ("corrupted double-linked list" in a compiled forward). Each limit gets its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY'].lower()}"))
# Under pytest-xdist each worker gets one thread: two workers with two OpenMP threads each
# oversubscribe 2 cores, and a tiny training step then runs tens of times slower. The environment
# variable too: training chooses its threads (training/machine.py) and reads OMP_NUM_THREADS first,
# and child processes inherit it.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)

import iterative_llm  # noqa: E402  (registers the Auto classes)
from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM  # noqa: E402


# What only a POSIX system can do (fork, process groups, SIGKILL sent to ourselves): skipped on Windows,
# where tests/test_any_desktop.py checks the same promises the way Windows keeps them.
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs fork, process groups or POSIX signals")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports this checkout: this one's, with the
    checkout first on PYTHONPATH and what PYTHONPATH already held kept after it (CI's run as on
    Windows puts a sitecustomize there that hides fcntl: .ci/run)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def third_party_env(**extra: str) -> dict[str, str]:
    """The environment for another project's command line (TRL's `trl sft`, `python -m lm_eval`) run
    on our folders: CI's run as on Windows is not theirs to pass. lm-eval's file locks (portalocker)
    import fcntl wherever os.name is not "nt", so hiding fcntl on Linux breaks them where Windows
    would not; and TRL's scripts print an emoji (U+2705) that neither ASCII nor Windows' cp1252 can
    encode, so on Windows they need PYTHONIOENCODING=utf-8 when their output goes to a pipe or file,
    as here (README, "Supported systems")."""
    hidden = os.path.join(".ci", "as_windows")
    path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                           if p and not p.rstrip(os.sep).endswith(hidden))
    return {**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8", **extra}


def locale_is_utf8() -> bool:
    """Whether Python's default text encoding here is UTF-8 (not under CI's run as on Windows)."""
    import locale

    return locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


def skip_unless_compile_works() -> None:
    """torch.compile needs a working backend (on CPU: a C++ compiler); without one, say so and skip."""
    try:
        torch.compile(lambda x: torch.tanh(x) * 2)(torch.ones(4))
    except Exception as err:  # the failure modes vary: no compiler, unsupported Python, missing headers
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        pytest.skip(f"torch.compile does not work in this environment ({type(err).__name__}: {first_line})")


def assert_close_in_bf16(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2) -> None:
    """`actual` equals `expected` within `ulps` units in the last place of bfloat16 at the tensors' scale.

    bfloat16 keeps 8 bits of mantissa (eps 2**-7). Two kernels that add the same products in another
    order (sdpa against eager, a padded batch against a packed one, AVX-512 against AVX2) round
    differently at every step, by up to half a unit of the intermediate values' own size, and those
    roundings carry through the network: the outputs then differ by about a unit at the scale of
    the outputs, not at the scale of 1.0 (measured: 0.0195 on logits up to 2.63 on an AVX2 CPU,
    0.95 units; 0 on AVX-512). A real fault (a leaked pad token, a wrong position) moves logits by
    tens of units."""
    scale = float(expected.detach().float().abs().max())
    tolerance = ulps * torch.finfo(torch.bfloat16).eps * max(scale, 1.0)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=0)


def tiny_config(**overrides) -> IterativeLLMConfig:
    """A 2-layer model with grouped-query attention. Output projections are NOT zero-initialised
    and weights are larger than the training default, so that every block changes the output and
    a broken cache, mask or position shows up in the logits instead of hiding behind zeros."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        zero_init_output_projections=False, initializer_range=0.1,
    )
    fields.update(overrides)
    return IterativeLLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> IterativeLLMForCausalLM:
    torch.manual_seed(seed)
    return IterativeLLMForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def model() -> IterativeLLMForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """A small made-up English-like corpus (the project ships no third-party text)."""
    import random

    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team"]
    verbs = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers"]
    objects = ["the red ball", "a green tree", "the river", "an open door", "the quiet town", "a bright star"]
    endings = [".", "!", "?", " today.", " again.", " at night."]
    lines = []
    for _ in range(600):
        words = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        lines.append(words[0].upper() + words[1:])
    return [" ".join(lines[i : i + 6]) for i in range(0, len(lines), 6)]


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from iterative_llm.tokenization import train_tokenizer

    return train_tokenizer(corpus, vocab_size=300)


def run_process_tree(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on timeout the whole tree is killed (torchrun's workers
    too, which a plain `run(timeout=...)` leaves behind) and the test fails saying so."""
    # Our commands write UTF-8 to a pipe whatever the locale (iterative_llm/console.py): read it so.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout:.0f} s; it was killed with all its "
                    f"processes. Its last output:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever the command left running
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
