"""What stops a run early, with a message that says why and what to do, instead of letting it spend
its budget: settings that cannot work, a resume that would not continue the same run, a loss that
is not a number, and a run that is not learning (issue 14: a GPU run trained for its whole budget on
zero gradients, and nothing said so). The compiled-gradient check lives with the compiled step
(training/pretrain/step.py `warm_up_compiled`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from iterative_llm import IterativeLLMConfig, run_folder

from training.pretrain.checkpoint import CheckpointError, latest_checkpoint

if TYPE_CHECKING:
    from training.pretrain.config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


def check_model_settings(config: TrainConfig) -> None:
    """Model settings that cannot work, found before the run folder is made."""
    model_config = IterativeLLMConfig.from_preset(config.model_preset, **config.model)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len ({config.seq_len}) is longer than the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}): lower --seq_len or set --model.max_position_embeddings."
        )


def check_resume_settings(state: dict, config: TrainConfig, tokens_per_step: int) -> None:
    """A checkpoint continues its run only with the same tokens per step and seed: the data order."""
    if state.get("tokens_per_step") not in (None, tokens_per_step) or state.get("seed") not in (None, config.seed):
        raise CheckpointError(
            f"The checkpoint was written with {state.get('tokens_per_step')} tokens per step and seed "
            f"{state.get('seed')}, but the settings now give {tokens_per_step} and {config.seed}: the data order "
            f"would not continue where it stopped. Resume with the run's own settings (see {run_folder.RUN_CONFIG})."
        )


def check_loss_finite(mean_loss: float, step: int, out: Path) -> None:
    """A loss of inf or nan: stop before the next checkpoint would save the broken weights."""
    if math.isfinite(mean_loss):
        return
    last = latest_checkpoint(out)
    raise TrainingError(
        f"The training loss became {mean_loss} at step {step}. No checkpoint was written "
        f"after it; the last good one is {last or '(none yet)'}. Lower the learning rates "
        f"(--lr_matrix, --lr_embed, --adamw_lr), keep --grad_clip on, or use --precision fp32."
    )


class LearningCheck:
    """Stops a run whose training loss has not fallen after its first stretch.

    A run that learns nothing (zero gradients from a broken compiled graph, learning rates of zero,
    a precision problem) looks busy: steps tick and tokens/s are fine. After the first stretch, at
    least `MIN_STEPS` steps and 2% of the budget, its loss must be clearly below the first step's:
    by at least 1% (a healthy run has fallen by a large part of it: 8.3 -> 4.4 nats in 40 steps of the
    tiny preset on an H100; 11.7 -> 4.9 in 12 of gpt2-small). Checked once, for a run that starts at
    step 0 (a resumed run starts with a loss already low).
    """

    MIN_STEPS = 20
    MIN_FRACTION = 0.02
    MIN_DROP = 0.01

    def __init__(self, config: TrainConfig, start_step: int):
        self.config = config
        self.first_loss: float | None = None
        self.done = start_step > 0

    def check(self, step: int, fraction: float, recent_loss: float) -> None:
        if self.done or self.first_loss is None or step < self.MIN_STEPS or fraction < self.MIN_FRACTION:
            return
        self.done = True
        if recent_loss < self.first_loss * (1.0 - self.MIN_DROP):
            return
        c = self.config
        raise TrainingError(
            f"The model is not learning: after {step} steps the training loss is {recent_loss:.4f}, and it was "
            f"{self.first_loss:.4f} at the first step. Stopped instead of spending the rest of the budget. Likely causes:\n"
            f"  - torch.compile (--compile {str(c.compile).lower()}): run the same command with --compile false; if that "
            f"learns, the compiled graph is at fault (benchmarks/gpu_check.py compares compiled and eager gradients).\n"
            f"  - precision (--precision {c.precision}): try --precision fp32.\n"
            f"  - learning rates: --lr_matrix {c.lr_matrix}, --lr_embed {c.lr_embed}, --lr_head {c.lr_head}, "
            f"--lr_scalar {c.lr_scalar} (Muon + AdamW) or --adamw_lr {c.adamw_lr} (--optimizer adamw), and "
            f"--warmup_steps {c.warmup_steps}: none may be zero or tiny.\n"
            f"To turn this check off: --stop_if_not_learning false."
        )
