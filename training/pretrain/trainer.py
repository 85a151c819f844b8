"""Pretraining: from raw text to a trained Hugging Face model folder.

    iterative-llm train --preset tiny                      # CPU, minutes
    accelerate launch -m training.pretrain --preset gpt2-small   # one or more GPUs
    torchrun --nproc_per_node 2 -m training.pretrain ...   # data parallel, CPU (gloo) or GPU

Reads top to bottom: `train` = `set_up` (training/pretrain/setup.py: processes -> run folder -> tokenizer
-> the plan fitted to the machine and the time (plan.py) -> the data it needs (training/data/prepare.py)
-> model -> optimizers -> resume) -> warm-up of the compiled model -> `train_loop` (loop.py: schedule, one
`train_step` (step.py), log, evaluate, checkpoint) -> `finish` (finish.py: final evaluation, export).

`--time_budget 2h` bounds the whole command (training/pretrain/budget.py): the plan sizes the data and the
model (`--preset auto`, training/pretrain/ladder.py) to it, and the schedule follows the clock, so that the
cool-down and the model folder come in time.

The recipe, each part a setting in training/pretrain/config.py and measured in benchmarks/pretrain_recipe.py:
- Muon for the hidden weight matrices, AdamW for embedding, head and vectors (Keller Jordan's
  modded-nanogpt records, 2024; nanochat), with plain AdamW + cosine available as the baseline.
- Warmup / stable / linear cool-down schedule (modded-nanogpt; Hägele et al. 2024) that follows the
  fraction of the budget done, so a wall-clock budget (`--max_time`) still ends with a cool-down.
- bf16 autocast on GPUs, optional torch.compile, gradient accumulation to a batch size in tokens,
  gradient clipping, optional document masking for packed sequences.

What stops a run early instead of letting it spend a GPU's hours is in training/pretrain/guards.py; the
compiled-gradient check runs in the warm-up (training/pretrain/step.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from iterative_llm.command_line import shell_word
from iterative_llm.console import make_output_safe

from training.pretrain.budget import TimeBudget, parse_duration, process_start_time
from training.pretrain.checkpoint import CheckpointError
from training.pretrain.config import TrainConfig, build_parser, parse_args  # noqa: F401  (build_parser: the stage's, for training.pretrain)
from training.pretrain.finish import end_processes, finish
from training.pretrain.guards import TrainingError
from training.pretrain.loop import train_loop
from training.pretrain.run_state import Run
from training.pretrain.setup import several_processes, set_up
from training.pretrain.step import uncompile_model, warm_up_compiled
from training.run_lock import FolderInUse, hold


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    started = process_start_time()  # a --time_budget counts from here: the user's stopwatch started then
    try:
        config = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"iterative-llm train: {err}", file=sys.stderr)
        return 2
    code = 1
    try:
        train(config, started=started)
        code = 0
    except (TrainingError, CheckpointError, FolderInUse, ValueError, FileNotFoundError) as err:
        print(f"iterative-llm train: {err}", file=sys.stderr)
    except BaseException:
        if not several_processes():
            raise
        import traceback

        traceback.print_exc()  # the launcher stops the other processes when this one fails
    finally:
        if several_processes():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # no interpreter teardown: see _KEEP_UNTIL_EXIT
    return code


def train(config: TrainConfig, model_factory=None, started: float | None = None) -> dict:
    """Run (or resume) one training run; returns the summary written to OUT/summary.json.

    `model_factory(model_config)`, if given, builds the model to train instead of
    IterativeLLMForCausalLM (benchmarks put a GPT-2 baseline through the same pipeline this way).
    `started` (time.monotonic) is when the command started, which a --time_budget counts from; now if None.
    """
    # One writer per run folder (training/run_lock.py). The processes of one launch write it together, so
    # only the first holds it (RANK: the global rank torchrun and `accelerate launch` set; unset alone).
    first_process = int(os.environ.get("RANK", "0")) == 0
    with hold(config.out, RUN_IN_USE) if first_process else contextlib.nullcontext():
        return _train(config, model_factory, started)


RUN_IN_USE = ("Two trainings in one folder write over each other's checkpoints and model: wait for that one to end "
              "(or stop it: Ctrl-C saves a checkpoint), then --resume; or choose another --out.")


def _train(config: TrainConfig, model_factory=None, started: float | None = None) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would each draw a bar inside the training bar
    budget = TimeBudget(parse_duration(config.time_budget) if config.time_budget else None, started=started)
    with budget.phase("prepare"):
        run = set_up(config, model_factory, budget)

    # On an accelerator, a thread tokenises the rest of the data from here on, beside the compile and
    # the steps (training/data/tokenise_beside.py); it ends with training, before the final evaluation and
    # the export.
    run.start_tokenising_beside()
    try:
        # torch.compile does its work on the first forward and backward (about 100 s for gpt2-small
        # compiled whole, on an H100): a forward and backward on the first batch, its gradients thrown
        # away, does it here, so that `max_time` is training time and its cool-down comes at its end.
        # The same step compares the compiled gradients with the eager ones, since a compiled graph that
        # trains on wrong gradients is invisible otherwise.
        if run.config.compile:
            _warm_up_or_train_eagerly(run)

        if budget.seconds is not None:
            run.time_the_evaluation()
        with budget.phase("train"):
            stopped_by = train_loop(run)
    finally:
        run.stop_tokenising_beside()
    if stopped_by is not None:
        run.say(f"Stopped by {stopped_by} at step {run.state['step']}. "
                f"Continue with: iterative-llm train --out {shell_word(run.out)} --resume")
        end_processes(run.accelerator)
        return {"stopped": True, **run.state}
    return finish(run)


def _warm_up_or_train_eagerly(run: "Run") -> None:
    """The compile's warm-up step; where torch.compile fails on this machine (a compiler it needs is
    missing, a backend that does not support an operation), the run goes on eagerly, saying so in one
    line, rather than ending in a traceback after the preparation's minutes. A compiled model whose
    gradients differ from eager ones still stops the run (TrainingError): that is no machine's lack."""
    start = time.perf_counter()
    run.say("compiling the model (a warm-up step whose gradients are thrown away; not counted as training time) ...")
    try:
        check = warm_up_compiled(run.model, run.step_inputs(0, run.state["step"]), run.loss_kwargs,
                                 run.config.compile_check)
    except TrainingError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        run.compile_fallback = f"torch.compile failed ({type(err).__name__}: {lines[0] if lines else ''})"
        uncompile_model(run.raw_model)
        run.config = dataclasses.replace(run.config, compile=False)
        run.model.zero_grad(set_to_none=True)
        run.say(f"--compile true: {run.compile_fallback}; training eagerly (as with --compile false)")
        return
    run.compile_seconds = time.perf_counter() - start
    run.say(f"compiled in {run.compile_seconds:.1f} s" + (f"; {check}" if check else ""))


if __name__ == "__main__":
    sys.exit(main())
