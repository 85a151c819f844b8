"""Resumable checkpoints, written so that a crash or a kill never destroys the previous one.

A checkpoint is a folder `RUN/checkpoints/step_00001234/` holding a Hugging Face model folder
(config + safetensors weights, so `iterative-llm generate` can read it directly), the optimizer
states and RNG states (`training_state.pt`), and `trainer_state.json` (step, tokens, time, data
position). It is written under a temporary name and renamed into place in one `os.replace`, and
`RUN/checkpoints/latest` is switched to it only afterwards: at every instant, `latest` names a
complete checkpoint.

Reading one never runs code that came with it: people share run folders ("resume from my
checkpoint"), and a pickle can call anything. `training_state.pt` is read with
`torch.load(weights_only=True)`, which builds only tensors, numbers, strings and containers, plus
the numpy RNG state named in `_NUMPY_RNG_STATE` (as transformers' Trainer reads its RNG file);
every checkpoint iterative-llm has written holds nothing else. A file that names any other code is
refused (`UnsafeCheckpoint`). A damaged newest checkpoint is skipped for the one before it
(`resume_checkpoint`); nothing is ever deleted on the way.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from iterative_llm import run_folder
from iterative_llm.run_folder import STATE_FILE, checkpoint_root, latest_checkpoint  # noqa: F401  (a run folder's layout)

from training.pretrain.optim import load_optimizer_state_dicts, optimizer_state_dicts

TRAINING_STATE = "training_state.pt"
# Config fields that decide the shape of the weights: a checkpoint is only resumable with equal values.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "mlp_type", "qk_norm", "embedding_norm", "use_bias", "tie_word_embeddings",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


class DamagedCheckpoint(CheckpointError):
    """A file of the checkpoint is missing, truncated or garbage: an older checkpoint may serve."""


class UnsafeCheckpoint(CheckpointError):
    """`training_state.pt` names code that loading it would run: it was not written by us."""


# The numpy RNG state, np.random.get_state(), holds a uint32 array, which pickles through these.
_NUMPY_RNG_STATE = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                    getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there when the write failed (a full disk)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, model, optimizers, trainer_state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write a checkpoint for `trainer_state["step"]`; keep the newest `keep` (at least 1)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer_state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    previous = latest_checkpoint(run_dir)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save({"optimizers": optimizer_state_dicts(optimizers), "rng": rng_state()}, tmp / TRAINING_STATE)
        _atomic_write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=2))
        if final.exists():  # the same step saved twice (e.g. a stop right after a scheduled save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name)
    except Exception as err:
        kept = (f"The previous checkpoint {previous} is intact." if previous and previous != final else
                "The checkpoint this step already had is intact." if previous else "No earlier checkpoint exists.")
        failure = write_failure(err, root, f"checkpoint {final}", kept, resumable=previous is not None)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise failure from err

    # Prune the oldest complete checkpoints beyond `keep`.
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(err: Exception, folder: Path, what: str, kept: str, *, resumable: bool) -> CheckpointError | None:
    """The one-line error for a checkpoint or an export that could not be written: what was lost, what
    is intact (`kept`), and how to go on; None when `err` is no failure to write (a bug: raise it as it is).

    Call it before removing what was half written: a full disk is recognised by its errno, or, since
    torch.save and safetensors wrap that OSError in errors of their own (a RuntimeError "unexpected pos",
    a SafetensorError "... No space left on device (os error 28)"), by their message or by the disk
    itself having no room left in `folder`.
    """
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        os.strerror(errno.ENOSPC) in str(err))
    if not full:
        try:
            full = shutil.disk_usage(folder).free < _FULL_BELOW
        except OSError:
            pass
    if not (full or isinstance(err, OSError)):
        return None
    then = "run again with --resume" if resumable else "start the run again"
    if full:
        return CheckpointError(f"The disk is full: could not write {what}. {kept} Free some space (or point --out "
                               f"at another disk) and {then}.")
    return CheckpointError(f"Could not write {what}: {err}. {kept}")


# Free space below which a failed write is taken for a full disk (a write of a few MB just failed).
_FULL_BELOW = 1 << 20


def load_checkpoint(path: Path, model, optimizers) -> dict[str, Any]:
    """Load weights, optimizer and RNG states from `path` into `model` and `optimizers`.

    Returns the trainer state. Any unreadable file or shape mismatch is a CheckpointError naming
    the checkpoint and the way forward.
    """
    path = Path(path)
    try:
        saved_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        trainer_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedCheckpoint(f"Checkpoint {path} is corrupt or incomplete ({err}).") from err

    differences = [
        f"{name}: checkpoint {saved_config.get(name)!r}, now {getattr(model.config, name, None)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved_config.get(name) != getattr(model.config, name, None)
    ]
    if differences:
        raise CheckpointError(
            f"Checkpoint {path} belongs to a different model ({'; '.join(differences)}). Resume with the settings "
            f"the run was started with (see its {run_folder.RUN_CONFIG}), or start a new run with another --out."
        )

    training_state = read_training_state(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise DamagedCheckpoint(f"Checkpoint {path} is corrupt ({type(err).__name__}: {err}).") from err

    if model.config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.endswith("inv_freq")]
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}). Resume "
            f"with the settings the run was started with, or start a new run with another --out."
        )
    try:
        load_optimizer_state_dicts(optimizers, training_state["optimizers"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"Checkpoint {path}: {err}") from err
    set_rng_state(training_state["rng"])
    return trainer_state


def read_training_state(path: Path) -> dict[str, Any]:
    """The optimizer and RNG states of checkpoint `path`, read without running any code it names."""
    file = Path(path) / TRAINING_STATE
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_STATE):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: not ours to pass on
        code, problem = _code_named(file)
        if code:
            raise UnsafeCheckpoint(
                f"{file} would run code if it were loaded ({', '.join(code)}), so it was not: iterative-llm never "
                f"writes such a file. Do not resume from this run folder unless you know who changed it."
            ) from err
        raise DamagedCheckpoint(f"{file} is corrupt ({problem or 'its content does not read back'}).") from err
    except Exception as err:  # a truncated zip, a missing file, an empty one: torch raises many types
        raise DamagedCheckpoint(f"{file} is corrupt or missing ({_first_line(err)}).") from err
    if not (isinstance(state, dict) and isinstance(state.get("optimizers"), list) and isinstance(state.get("rng"), dict)):
        raise DamagedCheckpoint(f"{file} does not hold optimizer and RNG states.")
    return state


def _code_named(file: Path) -> tuple[list[str], str | None]:
    """(the functions and classes a torch.save file would call beyond the ones we allow, read without
    unpickling it; what is wrong with it when it is no torch.save file at all)."""
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in _NUMPY_RNG_STATE}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as err:  # garbage, not a zip: damaged rather than crafted
        return [], _first_line(err)
    return [name for name in names if name not in allowed], None


def _first_line(err: BaseException) -> str:
    """'ValueError: the first line of its message' (torch's run to a page)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def resume_checkpoint(run_dir: str | Path, model, optimizers, say=print, *,
                      set_aside: bool = True) -> tuple[Path, dict[str, Any]]:
    """Load the newest intact checkpoint of `run_dir` into `model` and `optimizers`; (its path, its
    trainer state).

    A damaged newer one (a file missing, truncated or garbage) is skipped with a note saying which and
    why. With `set_aside` (the one process of a launch that writes the run folder) it is renamed
    `damaged-step_...`, kept for a look but out of the way: the run will save that step again, and
    `keep_checkpoints` would count it as one of the checkpoints to keep. Nothing is deleted.
    Anything else stops the resume: a checkpoint of another model or optimizer setting (a settings
    mistake, which an older checkpoint shares) or one that would run code (someone changed the folder;
    going back quietly would hide that).
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"{checkpoint_root(run_dir)} holds no complete checkpoint to resume from.")
    older = sorted((p for p in checkpoint_root(run_dir).glob("step_*") if (p / STATE_FILE).is_file() and p < newest),
                   reverse=True)
    skipped = []
    for path in [newest, *older]:
        try:
            state = load_checkpoint(path, model, optimizers)
        except DamagedCheckpoint as err:
            skipped.append((path, err))
            continue
        for damaged, err in skipped:
            where = "It is left as it is."
            if set_aside:
                aside = damaged.with_name(f"damaged-{damaged.name}")
                if aside.exists():  # one from an earlier resume
                    aside = aside.with_name(f"{aside.name}-{int(time.time())}")
                os.replace(damaged, aside)
                where = f"It is kept as {aside}."
            say(f"skipped checkpoint {damaged}: {err} {where}")
        return path, state
    raise CheckpointError(
        f"No intact checkpoint in {checkpoint_root(run_dir)} (damaged: {', '.join(p.name for p, _ in skipped)}; "
        f"nothing was deleted). Start a new run with another --out."
    )
