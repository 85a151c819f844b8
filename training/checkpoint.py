"""Resumable checkpoints, written so that a crash or a kill never destroys the previous one.

A checkpoint is a folder `RUN/checkpoints/step_00001234/` holding a Hugging Face model folder
(config + safetensors weights, so `iterative-llm generate` can read it directly), the optimizer
states and RNG states (`training_state.pt`), and `trainer_state.json` (step, tokens, time, data
position). It is written under a temporary name and renamed into place in one `os.replace`, and
`RUN/checkpoints/latest` is switched to it only afterwards: at every instant, `latest` names a
complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from iterative_llm import run_folder

from .optim import load_optimizer_state_dicts, optimizer_state_dicts

STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
# Config fields that decide the shape of the weights: a checkpoint is only resumable with equal values.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "mlp_type", "qk_norm", "embedding_norm", "use_bias", "tie_word_embeddings",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / run_folder.CHECKPOINTS


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"The previous checkpoint {previous} is intact." if previous else "No earlier checkpoint exists."
        if err.errno == errno.ENOSPC:
            raise CheckpointError(
                f"The disk is full: could not write checkpoint {final}. {kept} Free some space (or point --out "
                f"at another disk) and run again with --resume."
            ) from err
        raise CheckpointError(f"Could not write checkpoint {final}: {err}. {kept}") from err

    # Prune the oldest complete checkpoints beyond `keep`.
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model, optimizers) -> dict[str, Any]:
    """Load weights, optimizer and RNG states from `path` into `model` and `optimizers`.

    Returns the trainer state. Any unreadable file or shape mismatch is a CheckpointError naming
    the checkpoint and the way forward.
    """
    path = Path(path)
    fallback = "Delete that folder to resume from the previous checkpoint, or start a new run with another --out."
    try:
        saved_config = json.loads((path / "config.json").read_text())
        trainer_state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Checkpoint {path} is corrupt or incomplete ({err}). {fallback}") from err

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

    try:
        weights = load_file(str(path / "model.safetensors"))
        training_state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=False)
    except Exception as err:  # safetensors and pickle raise many types for a damaged file
        raise CheckpointError(f"Checkpoint {path} is corrupt ({type(err).__name__}: {err}). {fallback}") from err

    if model.config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.endswith("inv_freq")]
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}). {fallback}"
        )
    try:
        load_optimizer_state_dicts(optimizers, training_state["optimizers"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"Checkpoint {path}: {err}") from err
    set_rng_state(training_state["rng"])
    return trainer_state
