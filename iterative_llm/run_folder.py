"""The run folder that `iterative-llm train --out OUT` writes, named once for every module that reads or
writes it (training.pretrain, .checkpoint, .config, .export, .generate; compare here).

    OUT/
      run_config.yaml   the resolved settings (train + model), and what each resume changed
      versions.json     package versions and git revision of the run
      metrics.jsonl     one JSON row per event: kind "train", "eval" or "sample"
      checkpoints/      step_00001234/, one model folder with its optimizer state per checkpoint
      data/             tokenizer and token shards (another folder with --data_cache)
      logs/             TensorBoard events (--report_to tensorboard)
      summary.json      the run's final figures, written with the model folder at the end
      loss_curve.png    the model card's picture
      config.json, model.safetensors, tokenizer files, README.md (the model card): a model folder
      .iterative-llm.lock  there while a process writes the folder (training/run_lock.py); a shard folder's too

It lives in iterative_llm/ rather than training/ because compare (here) reads run folders, and
imports go one way only: training imports iterative_llm, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

RUN_CONFIG = "run_config.yaml"
VERSIONS = "versions.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOSS_CURVE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
DATA = "data"
LOGS = "logs"
# In each checkpoint (training/pretrain/checkpoint.py writes them): its step, tokens and time, written
# last, so a checkpoint is complete when this file is there.
STATE_FILE = "trainer_state.json"


def run_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run folder that holds `checkpoint` (OUT/checkpoints/step_00001234 -> OUT)."""
    return Path(checkpoint).parent.parent


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (the `latest` pointer's, else the last step's).
    Here, with the run folder's layout, since training resumes from it and generate reads it."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None
