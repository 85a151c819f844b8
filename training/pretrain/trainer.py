"""Pretraining: from raw text to a trained Hugging Face model folder.

    iterative-llm train --preset tiny                      # CPU, minutes
    accelerate launch -m training.pretrain --preset gpt2-small   # one or more GPUs
    torchrun --nproc_per_node 2 -m training.pretrain ...   # data parallel, CPU (gloo) or GPU

Reads top to bottom: `train` = `set_up` (processes -> run folder -> tokenizer -> the plan fitted to the
machine and the time (training/pretrain/plan.py) -> the data it needs (training/data/prepare.py) -> model ->
optimizers -> resume) -> warm-up of the compiled model -> `train_loop` (schedule, one `train_step`
(training/pretrain/step.py), log, evaluate, checkpoint) -> `finish` (final evaluation, export).

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
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, run_folder
from iterative_llm.command_line import shell_word
from iterative_llm.console import make_output_safe, progress_bar
from iterative_llm.tokenization import check_tokenizer_matches_model, token_byte_lengths

from training.pretrain import ladder
from training.data.batches import RandomWindowBatches
from training.pretrain.budget import TimeBudget, format_seconds, parse_duration, process_start_time
from training.pretrain.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, resume_checkpoint, save_checkpoint
# build_parser: every stage module has one (`iterative-llm train`'s lives in config.py).
from training.pretrain.config import (  # noqa: F401
    TrainConfig, build_parser, parse_args, scalar_settings, source_share_trained, token_caps, write_run_config,
)
from training.eval.bits_per_byte import evaluate, flops_per_token, hardware, peak_flops, sample
from training.pretrain.export import export_model_folder
from training.pretrain.guards import LearningCheck, TrainingError, check_loss_finite, check_model_settings, check_resume_settings
from training.machine import choose_threads, cpu_description
from training.eval.hellaswag import hellaswag_in_run
from training.pretrain.plan import (
    BESIDE_FIRST_SECONDS, BESIDE_SHARD_SECONDS, DATA_MARGIN, EXTEND_AHEAD, Device, Plan, choose_precision, fit_run,
    measure_encode_rate, tokenizer_chars,
)
from training.pretrain.optim import apply_lr, apply_muon_momentum, build_optimizers, lr_multiplier, muon_momentum
from training.data.prepare import ShardSettingsError, prepare_shards, tokenizer_for
from training.run_lock import FolderInUse, hold
from training.data.shards import MANIFEST, ShardedDataset
from training.data.sources import iter_documents
from training.pretrain.stop_request import StopRequest
from training.pretrain.step import (
    compile_model, compile_problem, eagerly, micro_steps, to_model_inputs, train_step, uncompile_model,
    warm_up_compiled,
)
from training.data.tokenise_beside import TokeniserBeside, TokenisingFailed
from training.versions import package_versions

# The process group of a data-parallel run is never freed in Python. Freeing it (when the DDP model
# that holds it goes) joins gloo's worker threads, and one of them may still be waiting for the GIL,
# which the freeing thread holds, to drop a tensor of the last collective: a deadlock, seen in about
# one run in ten under load (issue 11; stacks in ~ProcessGroupGloo and TensorImpl::decref_pyobject).
# So train() keeps the DDP model here, and main() ends such a process with os._exit once all is written.
_KEEP_UNTIL_EXIT: list = []


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
        if not _several_processes():
            raise
        import traceback

        traceback.print_exc()  # the launcher stops the other processes when this one fails
    finally:
        if _several_processes():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # no interpreter teardown: see _KEEP_UNTIL_EXIT
    return code


def _several_processes() -> bool:
    """Launched by torchrun or `accelerate launch` as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
DATA_IN_USE = ("It is preparing the token shards; start again when it is done (they are then reused), "
               "or choose another --data_cache.")


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
        _end_processes(run.accelerator)
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


# ---------------------------------------------------------------------- what a run holds


@dataclass
class Run:
    """One run's parts, made by `set_up`, and what the loop does with them besides the step itself."""

    config: TrainConfig
    accelerator: Any
    out: Path
    precision: str
    tokenizer: Any
    train_split: Any
    val_split: Any
    raw_model: torch.nn.Module  # as built: evaluated, sampled, checkpointed and exported
    model: torch.nn.Module  # the one trained: compiled in place, wrapped for data parallelism
    optimizers: list
    accumulation: int  # micro-steps per optimizer step, on each process
    tokens_per_step: int  # all processes together
    micro_batches: list  # one RandomWindowBatches per micro-step
    loss_kwargs: dict  # what the model's forward needs to return the loss alone
    state: dict  # step, tokens, time: what a checkpoint saves and a resume continues from
    say: Callable[[str], None]  # prints on the main process only
    budget: TimeBudget  # the command's clock: its deadline under --time_budget, and each phase's seconds
    plan: Plan  # what the run was fitted to, and why
    compile_seconds: float = 0.0
    compile_fallback: str | None = None  # why --compile true trained eagerly, if it did
    first_loss: float | None = None
    data_dir: Path | None = None  # where the shards are, to extend them when training needs more
    beside: TokeniserBeside | None = None  # the main process's tokenising thread, when the plan says so
    byte_lengths: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.main_process = self.accelerator.is_main_process
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.byte_lengths = torch.from_numpy(token_byte_lengths(self.tokenizer).astype("int64"))
        # A resumed run's earlier training is not this command's.
        self.time_at_start, self.tokens_at_start = self.state["time"], self.state["tokens"]
        self._source_exhausted = False
        self.tokens_prepared_first = self.train_split.num_tokens  # before the first step
        self._budget_done = 0.0  # the time budget's fraction done so far: it never goes back

    def progress(self) -> float:
        """The fraction of the budget done: the first of max_steps, max_tokens, max_time and the time
        budget to be reached. The time budget's part reads the clock: whatever has taken longer than
        planned since the start of training leaves less of it, and the cool-down comes earlier."""
        c, s = self.config, self.state
        parts = [s["step"] / c.max_steps if c.max_steps else 0.0, s["tokens"] / c.max_tokens if c.max_tokens else 0.0,
                 s["time"] / c.max_time if c.max_time else 0.0]
        if self.budget.seconds is not None:
            # Never backwards: a machine that got faster again would otherwise raise the learning
            # rate after its cool-down began, or bring back a run that had reached its end.
            spent = s["time"] - self.time_at_start
            self._budget_done = max(self._budget_done, spent / max(self.budget.training_seconds(spent), 1e-9))
            parts.append(self._budget_done)
        return min(1.0, max(parts))

    def step_inputs(self, micro: int, step: int) -> dict:
        return to_model_inputs(self.micro_batches[micro].batch_at(step), self.device)

    def log_row(self, row: dict) -> None:
        if self.main_process:
            with open(self.out / run_folder.METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(self) -> dict:
        c = self.config
        start = time.perf_counter()
        with eagerly(c.compile):
            result = self._validation_loss(c.eval_tokens)
            result.update(hellaswag_in_run(c, self.raw_model, self.tokenizer, self.state["step"],
                                           final=self.progress() >= 1.0, autocast=self.accelerator.autocast,
                                           rank=self.rank, world_size=self.world_size))
        self.log_row({"kind": "eval", "step": self.state["step"], "tokens": self.state["tokens"],
                      "time": round(self.state["time"], 3), **result})
        # An evaluation measured replaces the planned estimate of the final one (they read the same
        # tokens), so that training keeps the time the end really needs.
        self.budget.measured_evaluation(time.perf_counter() - start)
        if c.report_to != "none":
            self.accelerator.log(result, step=self.state["step"])
        return result

    def extend_the_data(self) -> None:
        """Under a time budget, at a log row: when the shards hold less than training will read in
        the next EXTEND_AHEAD seconds at the speed it has had (the probe said slower, or a resumed run
        got longer), they are extended from where they stopped (training/data/prepare.py) to what it will
        read in twice that, and training goes on over the longer split. A little at a time, since
        the steps left are only known as the run goes (evaluations, a busier machine), and tokenising
        costs the same in pieces; the pause is the clock's like any other.

        Tokenised beside training (an accelerator's run: training/data/tokenise_beside.py), there is no
        pause: training takes up here the shards the thread has committed since the last log row, and
        the thread is started again, for the rest of the run, when it has finished and the run wants
        more than it was asked for. A failure to read more data checkpoints the run, then stops it."""
        c, s = self.config, self.state
        spent = s["time"] - self.time_at_start
        if self.budget.seconds is None or self.data_dir is None or spent <= 0:
            return
        try:
            if self.plan.tokenises_beside:
                self._take_up_new_shards()  # on every process, at the same step
            if self._source_exhausted:
                return
            speed = (s["tokens"] - self.tokens_at_start) / spent
            rest = self.budget.training_seconds(spent) - spent
            limits = token_caps(c, self.tokens_per_step)
            share_kept = source_share_trained(c)
            if self.plan.tokenises_beside:
                soon = min([s["tokens"] + speed * min(rest, BESIDE_FIRST_SECONDS)] + limits)
                if self.main_process and not self.beside.running and soon > self.train_split.num_tokens:
                    wanted = min([s["tokens"] + DATA_MARGIN * speed * rest] + limits)
                    self._tokenise_beside_up_to(int(wanted / share_kept), speed)
                return  # the main process's thread tokenises; the others take up its shards above
            soon = min([s["tokens"] + speed * min(rest, EXTEND_AHEAD)] + limits)
            wanted = min([s["tokens"] + speed * min(rest, 2 * EXTEND_AHEAD)] + limits)
            short = soon > self.train_split.num_tokens
            if self.world_size > 1:
                from accelerate.utils import broadcast_object_list

                short = broadcast_object_list([short])[0]  # every process extends, or none
            if not short:
                return
            if self.main_process:
                with hold(self.data_dir, DATA_IN_USE):
                    _prepare_shards(c, self.tokenizer, self.data_dir, self.out, max_tokens=int(wanted / share_kept))
            self.accelerator.wait_for_everyone()
            longer = ShardedDataset.open(self.data_dir).split("train")
            self._source_exhausted = longer.num_tokens < 1.05 * self.train_split.num_tokens  # nothing more to read
            self.say(f"data: extended to {longer.num_tokens:,} training tokens (training reads {speed:,.0f} tokens/s; "
                     f"the rest of the run wants about {wanted:,.0f})")
            self._train_on(longer)
        except Exception as err:
            if self.world_size > 1:
                raise  # the launcher stops the other processes; the last scheduled checkpoint stands
            self.checkpoint("more data could not be read")
            raise TrainingError(f"{str(err).rstrip('.')}. Step {s['step']} is checkpointed: once that is fixed, "
                                f"continue with `iterative-llm train --out {shell_word(self.out)} --resume`.") from err

    def _take_up_new_shards(self) -> None:
        """The shards the tokenising thread has committed since the last call, on every process."""
        manifest = self.beside.take_newest() if self.beside is not None else None
        if self.world_size > 1:
            from accelerate.utils import broadcast_object_list

            manifest = broadcast_object_list([manifest])[0]
        if manifest is None:
            return
        longer = self._committed_train_split(manifest)
        if manifest["complete"]:
            # The thread has read what it was asked for (capped: the source holds more) or all there was.
            self._source_exhausted = not manifest["progress"]["source"].get("capped", False)
        if longer.num_tokens > self.train_split.num_tokens:
            self._train_on(longer)

    def _train_on(self, longer) -> None:
        self.train_split = longer
        for batches in self.micro_batches:
            batches.split = longer

    def start_tokenising_beside(self) -> None:
        """Before the first step, on the main process of a run that tokenises beside training: the
        thread starts on the rest of what the plan wants, as training starts."""
        if self.beside is None or self.plan.tokens_planned is None:
            return
        if self.plan.tokens_planned > self.plan.tokens_to_prepare:
            self._tokenise_beside_up_to(self.plan.tokens_planned, self.plan.tokens_per_second or 0.0)

    def _tokenise_beside_up_to(self, max_tokens: int, speed: float) -> None:
        """The thread on `max_tokens` of the source, a shard committed per BESIDE_SHARD_SECONDS of
        training at `speed` (tokens/s)."""
        shard_tokens = max(self.tokens_per_step, int(speed * BESIDE_SHARD_SECONDS))
        self.beside.start(max_tokens=max_tokens, shard_tokens=shard_tokens)
        self.say(f"data: tokenising beside training, up to {max_tokens:,} tokens of the source "
                 f"(training reads {speed:,.0f} tokens/s)")

    def _committed_train_split(self, manifest: dict):
        return ShardedDataset(self.data_dir, manifest, committed_only=True).split("train")

    def stop_tokenising_beside(self) -> None:
        """At the end of training (or a stop): the thread ends at a document's end, and its last shards
        count in the summary; the folder is left finished, and extendable by a later run. A failure
        the steps have not met yet is said, not raised: the training it would stop is done."""
        if self.beside is None or not self.beside.starts:
            return
        try:
            self.beside.stop()
            manifest = self.beside.take_newest()
        except TokenisingFailed as err:
            self.say(f"warning: {err}")
            return
        if manifest is not None:
            self.train_split = self._committed_train_split(manifest)
        self.say(f"data: tokenised beside training for {self.beside.seconds:.1f} s "
                 f"({self.train_split.num_tokens:,} training tokens in all)")

    def _validation_loss(self, max_tokens: int | None) -> dict:
        c = self.config
        return evaluate(self.raw_model, self.val_split, self.byte_lengths, batch_size=c.batch_size, seq_len=c.seq_len,
                        max_tokens=max_tokens, device=self.device, autocast=self.accelerator.autocast, rank=self.rank,
                        world_size=self.world_size, document_positions=c.document_masking)

    def time_the_evaluation(self) -> None:
        """Evaluate a slice of the validation split (two batches, untrained weights: the same work), so
        that the time kept for the final evaluation is measured on this machine, not estimated from
        the probe's training speed (forward-only evaluation is faster than training by a factor that
        varies with the model and the machine)."""
        c = self.config
        tokens = min(2 * c.batch_size * c.seq_len, self.budget.eval_tokens or self.val_split.num_tokens)
        start = time.perf_counter()
        with eagerly(c.compile):
            self._validation_loss(tokens)
        per_token = (time.perf_counter() - start) / tokens
        self.budget.measured_evaluation(per_token * (self.budget.eval_tokens or self.val_split.num_tokens))

    def samples(self) -> None:
        if not self.main_process:
            return
        c = self.config
        with self.accelerator.autocast(), eagerly(c.compile):
            texts = sample(self.raw_model, self.tokenizer, c.sample_prompts, max_new_tokens=c.sample_tokens,
                           seed=c.seed, device=self.device)
        for prompt, text in zip(c.sample_prompts, texts):
            self.log_row({"kind": "sample", "step": self.state["step"], "prompt": prompt, "text": text})
            self.say(f"  sample | {text!r}")

    def checkpoint(self, reason: str) -> None:
        self.accelerator.wait_for_everyone()
        if self.main_process:
            path = save_checkpoint(self.out, self.raw_model, self.optimizers,
                                   {**self.state, "reason": reason, "tokens_per_step": self.tokens_per_step,
                                    "seed": self.config.seed}, keep=self.config.keep_checkpoints)
            self.say(f"checkpoint: {path} ({reason})")
        self.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------- set-up


def set_up_threads(config: TrainConfig, device_type: str, say) -> None:
    """torch's CPU threads, and the tokenizer's beside training on an accelerator (CUDA or an Apple
    GPU alike: the card computes, the CPU cores wait for it)."""
    # torch's own default counts logical CPUs on some builds: two threads on the two hardware threads
    # of one core fight over its vector units. One per physical core, shared by this machine's processes.
    threads, why = choose_threads(config.threads, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    if device_type == "cpu":
        say(f"CPU: {cpu_description(threads)}; threads: {why}")
    elif config.tokenise_beside_training is not False and "RAYON_NUM_THREADS" not in os.environ:
        # The tokenizer's threads (Rust's rayon pool, made at its first use, after this) tokenise beside
        # training: they leave one core to the Python thread that drives the card.
        os.environ["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) - 1))


def set_up(config: TrainConfig, model_factory=None, budget: TimeBudget | None = None) -> Run:
    """Processes, the run folder, the plan and the data it needs, the model, its optimizers and (with
    --resume) the state to continue from: everything the loop needs, or an error before anything is trained."""
    budget = budget or TimeBudget(None)
    machine = Device.this_machine()
    precision = choose_precision(machine, config.precision).value  # the plan says why
    out = Path(config.out)
    accelerator, say = _start_processes(config, precision, out)
    main_process, world_size, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    resume_from = _checked_run_folder(config, out)
    # A resumed run's data must hold what it trained on before as well as what this command will.
    trained_before = _tokens_trained_in(resume_from) if resume_from is not None else 0
    plan, tokenizer, train_split, val_split = _planned_data(config, accelerator, out, say, machine, budget,
                                                            trained_before)
    config = plan.config  # nothing left on "auto"
    # The plan's figures for the end (under --time_budget) go to the run's clock here, on every process.
    budget.keep_for_the_end(plan.end_parts, min(config.eval_tokens or val_split.num_tokens, val_split.num_tokens))

    model_config, raw_model = _build_model(config, tokenizer, device, model_factory)
    optimizers = build_optimizers(
        raw_model, optimizer=config.optimizer, lr_matrix=config.lr_matrix, lr_embed=config.lr_embed,
        lr_head=config.lr_head, lr_scalar=config.lr_scalar, adamw_lr=config.adamw_lr,
        weight_decay=config.weight_decay,
    )
    say(f"model: {config.model_preset} preset, {raw_model.num_parameters():,} parameters, precision {precision}, "
        f"optimizers {' + '.join(type(o).__name__ for o in optimizers)}")
    accumulation = micro_steps(config.batch_tokens, config.batch_size, config.seq_len, world_size)
    tokens_per_step = accumulation * config.batch_size * config.seq_len * world_size
    if tokens_per_step != config.batch_tokens:
        say(f"note: batch_tokens {config.batch_tokens} rounded to {tokens_per_step} "
            f"({accumulation} micro-steps of {config.batch_size} x {config.seq_len} tokens x {world_size} processes)")

    state = {"step": 0, "tokens": 0, "time": 0.0}
    if resume_from is not None:
        resume_from, state = resume_checkpoint(out, raw_model, optimizers, say, set_aside=main_process)
        check_resume_settings(state, config, tokens_per_step)
        say(f"resumed from {resume_from} (step {state['step']}, {state['tokens']:,} tokens)")
    if main_process:
        _write_run_files(out, config, model_config, tokenizer, resume_from is not None, state["step"])
    accelerator.wait_for_everyone()

    config, compile_fallback = _compiled_where_it_can(config, raw_model, device.type, say)
    model = accelerator.prepare(raw_model)
    if world_size > 1:
        _KEEP_UNTIL_EXIT.append(model)  # its DDP reducer holds the process group
    if config.report_to != "none":
        # TensorBoard writes to project_dir/<project name>: OUT/logs, as the README's table says.
        accelerator.init_trackers(run_folder.LOGS if config.report_to == "tensorboard" else "pretrain",
                                  config=scalar_settings(config))
    return Run(
        config=config, accelerator=accelerator, out=out, precision=precision, tokenizer=tokenizer,
        train_split=train_split, val_split=val_split, raw_model=raw_model, model=model, optimizers=optimizers,
        accumulation=accumulation, tokens_per_step=tokens_per_step,
        micro_batches=_micro_batches(config, train_split, accumulation, accelerator),
        # Our model computes the loss chunk by chunk without keeping the (B, T, V) logits
        # (`skip_logits`); a baseline model from `model_factory` gets the plain call.
        loss_kwargs={"skip_logits": True} if isinstance(raw_model, IterativeLLMForCausalLM) else {},
        state=state, say=say, budget=budget, plan=plan, compile_fallback=compile_fallback,
        data_dir=_data_dir(config, out),
        beside=_tokeniser_beside(config, plan, tokenizer, _data_dir(config, out), out) if main_process else None,
    )


def _start_processes(config: TrainConfig, precision: str, out: Path):
    """(the accelerator of this launch's processes, a `say` that prints on the main process only), with
    torch's threads, TF32 on a CUDA card and every random generator seeded."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        # Several processes without GPUs (torchrun on a CPU machine): accelerate needs to be told
        # to use CPU data parallelism (gloo); otherwise each process trains alone.
        cpu=not torch.cuda.is_available() and _several_processes(),
        mixed_precision=precision if precision in ("bf16", "fp16") else "no",
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(out),
    )
    say = (lambda message: print(message, flush=True)) if accelerator.is_main_process else (lambda message: None)
    set_up_threads(config, accelerator.device.type, say)
    if accelerator.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in float32 (bf16 autocast covers the rest)
    set_seed(config.seed)
    return accelerator, say


def _checked_run_folder(config: TrainConfig, out: Path) -> Path | None:
    """The checkpoint a --resume continues from (None for a new run): a new run never writes over
    checkpoints, a resume needs one; the model settings are checked before anything is written."""
    resume_from = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise TrainingError(f"--resume: the run folder {out} has no checkpoint to resume from. Drop --resume to start it.")
    if not config.resume and latest_checkpoint(out) is not None:
        raise TrainingError(
            f"The run folder {out} already holds checkpoints. Pass --resume to continue that run, or choose "
            f"another --out (nothing was overwritten)."
        )
    if config.model_preset != "auto":
        check_model_settings(config)  # (--preset auto's size is the plan's, checked there)
    return resume_from


def _compiled_where_it_can(config: TrainConfig, raw_model, device_type: str, say) -> tuple[TrainConfig, str | None]:
    """With --compile true, the model compiled in place; where this machine lacks what torch.compile
    needs, the run trains eagerly and says why in one line: (the config as the run uses it, that why)."""
    if not config.compile:
        return config, None
    problem = compile_problem(device_type)
    if problem:
        say(f"--compile true: {problem}; training eagerly (as with --compile false)")
        return dataclasses.replace(config, compile=False), problem
    compile_model(raw_model)
    return config, None


def _micro_batches(config: TrainConfig, train_split, accumulation: int, accelerator) -> list:
    """One RandomWindowBatches per micro-step of this process.

    The global batch of a step is `accumulation x world_size` slices of `batch_size` rows, drawn from
    one generator seeded by the step: micro-step m of process r reads slice m * world + r. The same
    step therefore sees the same rows whatever the split into processes and micro-steps, and resuming
    needs nothing but the step counter."""
    world_size = accelerator.num_processes
    return [
        RandomWindowBatches(
            train_split, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
            rank=micro * world_size + accelerator.process_index, world_size=accumulation * world_size,
            document_positions=config.document_masking,
            pin_memory=config.dataloader_pin_memory and accelerator.device.type == "cuda",
        )
        for micro in range(accumulation)
    ]


def _planned_data(config: TrainConfig, accelerator, out: Path, say, machine: Device, budget: TimeBudget,
                  trained_before: int = 0):
    """The tokenizer, the plan (training/pretrain/plan.py: fitted to the machine, and under --time_budget the
    model size and the tokens to prepare), and the train and validation token shards (training/data/prepare.py
    makes them on the main process, tokenising what the plan asks for, and reuses or extends them
    after). A start that fails here removes the folders it made."""
    main_process = accelerator.is_main_process
    data_dir = _data_dir(config, out)
    created = [path for path in (out, data_dir) if not path.exists()]
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    def the_tokenizer():
        size_preset = ladder.BASE_PRESET if config.model_preset == "auto" else config.model_preset
        vocab_size = config.model.get("vocab_size") or IterativeLLMConfig.from_preset(size_preset).vocab_size
        return tokenizer_for(
            config.data, data_dir, tokenizer=config.tokenizer, vocab_size=vocab_size,
            text_column=config.text_column, doc_separator=config.doc_separator, max_documents=config.max_documents,
            train_chars=tokenizer_chars(budget.seconds, config.tokenizer_train_chars),
            on_decode_error=config.on_decode_error, say=say,
        )

    try:
        # A --data_cache is shared: one run prepares it at a time (the main process holds it).
        with hold(data_dir, DATA_IN_USE) if main_process else contextlib.nullcontext():
            if main_process:
                tokenizer = the_tokenizer()  # trained and saved in the data folder if it has none
            accelerator.wait_for_everyone()
            if not main_process:
                tokenizer = the_tokenizer()  # the main process's, saved by now
            plan = _the_plan(config, accelerator, machine, budget, tokenizer, say, trained_before)
            if main_process:
                _prepare_shards(plan.config, tokenizer, data_dir, out, max_tokens=plan.tokens_to_prepare)
        accelerator.wait_for_everyone()
    except BaseException:
        if main_process:
            _remove_created(created, say)
        raise
    dataset = ShardedDataset.open(data_dir)
    train_split, val_split = dataset.split("train"), dataset.split("val")
    say(f"data: {train_split.num_tokens:,} training tokens in {train_split.num_documents:,} documents, "
        f"{val_split.num_tokens:,} validation tokens ({data_dir})")
    return plan, tokenizer, train_split, val_split


def _tokeniser_beside(config: TrainConfig, plan: Plan, tokenizer, data_dir: Path, out: Path) -> TokeniserBeside | None:
    """The thread that tokenises the rest of the data while training runs, when the plan says so:
    the same preparation as before the first step, under the data folder's lock, without bars."""
    if not plan.tokenises_beside:
        return None

    def prepare(*, max_tokens: int, shard_tokens: int, stop, on_commit) -> None:
        with hold(data_dir, DATA_IN_USE):
            _prepare_shards(config, tokenizer, data_dir, out, max_tokens=max_tokens, progress=False,
                            shard_tokens=shard_tokens, stop=stop, on_commit=on_commit)

    return TokeniserBeside(prepare)


def _tokens_trained_in(checkpoint: Path) -> int:
    """The tokens a checkpoint had trained on; 0 when its state cannot be read (resume then skips it
    for an older one, and the data is extended as training goes if that reads more)."""
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _data_dir(config: TrainConfig, out: Path) -> Path:
    """The tokenizer and token shards' folder: --data_cache, else the run's own."""
    return Path(config.data_cache) if config.data_cache else out / run_folder.DATA


def _the_plan(config: TrainConfig, accelerator, machine: Device, budget: TimeBudget, tokenizer, say,
              trained_before: int) -> Plan:
    """The plan, made on the main process (its speed probes are timed there) and sent to the others,
    so that every process trains the same model with the same settings; printed before the data is
    tokenised. Without a budget or anything on "auto", it only records the device's decisions."""
    plan = None
    if accelerator.is_main_process:
        if budget.seconds is not None:
            say(f"--time_budget {format_seconds(budget.seconds)}: planning ({format_seconds(budget.elapsed())} "
                "gone on starting up and the tokenizer)")
        encode_rate = None
        if budget.seconds is not None:
            encode_rate = measure_encode_rate(tokenizer, iter_documents(
                config.data, text_column=config.text_column, doc_separator=config.doc_separator,
                max_documents=config.max_documents), chars=min(1_000_000, tokenizer_chars(budget.seconds, 10**9)))
        plan = fit_run(config, device=machine, torch_device=accelerator.device, budget=budget,
                       world_size=accelerator.num_processes, encode_rate=encode_rate, say=say,
                       trained_before=trained_before)
        say("plan:\n" + "\n".join(plan.lines(budget, machine, torch.get_num_threads())))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        plan = broadcast_object_list([plan])[0]
    return plan


def _prepare_shards(config: TrainConfig, tokenizer, data_dir: Path, out: Path, max_tokens: int | None = None,
                    progress: bool | None = None, **beside) -> None:
    """prepare_shards with the run's data settings (`beside`: a thread's shard_tokens, stop, on_commit)."""
    try:
        prepare_shards(
            config.data, tokenizer, data_dir, text_column=config.text_column, doc_separator=config.doc_separator,
            val_source=config.val_data, val_fraction=config.val_fraction, max_documents=config.max_documents,
            max_tokens=max_tokens, on_decode_error=config.on_decode_error,
            progress=config.progress if progress is None else progress, **beside,
        )
    except ShardSettingsError as err:
        made_from = err.manifest.get("paths", {}).get("source")
        own_run = (out / run_folder.RUN_CONFIG).is_file() and not config.data_cache
        raise TrainingError(
            f"{data_dir} holds the token shards of another data source or other data settings "
            f"({'; '.join(err.differences)}); this run asks for --data {config.data}. "
            + (f"To continue the run in {out}, use `iterative-llm train --out {shell_word(out)} --resume` with no data "
               f"options: "
               f"it reads the run's own settings from {run_folder.RUN_CONFIG}. " if own_run else "")
            + f"To train on {made_from}, pass --data {made_from} with the settings the shards were made with; to "
            f"train on {config.data}, choose another --out, or a --data_cache folder of its own. Nothing was changed."
        ) from err


def _build_model(config: TrainConfig, tokenizer, device, model_factory):
    """The model config (the preset, the `model:` overrides, the tokenizer's size and special ids)
    and the model on `device`, seeded."""
    model_fields = dict(config.model)
    model_fields.setdefault("vocab_size", _round_up(len(tokenizer), 64))  # multiples of 64 suit matmul kernels
    model_fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model_config = IterativeLLMConfig.from_preset(config.model_preset, **model_fields)
    check_tokenizer_matches_model(tokenizer, model_config)
    torch.manual_seed(config.seed)
    model = (model_factory or IterativeLLMForCausalLM)(model_config).to(device)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model_config, model


# ---------------------------------------------------------------------- the loop


def train_loop(run: Run) -> str | None:
    """Optimizer steps until the budget is spent; returns what stopped it first (after a checkpoint):
    the signal's name for Ctrl-C or SIGTERM, "closing the console window" ..., else None."""
    config, state, accelerator = run.config, run.state, run.accelerator
    # Ctrl-C, SIGTERM (and on Windows Ctrl-Break and closing the window) ask the loop to checkpoint
    # and stop at the end of the current step (training/pretrain/stop_request.py).
    with StopRequest() as stop_request:
        bar = _steps_bar(config, run.main_process, state["step"], run.accumulation, run.world_size)
        log = _TrainingLog(run, bar)
        clip = (lambda parameters, max_norm: accelerator.clip_grad_norm_(parameters, max_norm))
        try:
            while run.progress() < 1.0:
                step_start = time.perf_counter()
                multiplier = lr_multiplier(state["step"], config.warmup_steps, run.progress(),
                                           cooldown_fraction=config.cooldown_fraction,
                                           final_ratio=config.final_lr_ratio, shape=config.schedule)
                apply_lr(run.optimizers, multiplier)
                if config.optimizer == "muon":
                    apply_muon_momentum(run.optimizers, muon_momentum(
                        state["step"], warmup_steps=config.muon_momentum_warmup_steps))

                step_loss = train_step(
                    run.model, run.optimizers,
                    (run.step_inputs(micro, state["step"]) for micro in range(run.accumulation)),
                    accumulation=run.accumulation, grad_clip=config.grad_clip, loss_kwargs=run.loss_kwargs, clip=clip,
                    # Gradients are averaged across processes only on the last micro-step.
                    no_sync=(lambda: accelerator.no_sync(run.model)) if run.world_size > 1 else None,
                    scaler=accelerator.scaler,  # fp16 only: None otherwise
                )
                log.add(step_loss)
                if run.device.type in ("cuda", "mps") and (state["step"] + 1) % config.log_every == 0:
                    # So the step times below are real, not queued work: an Apple GPU queues as a CUDA card does.
                    (torch.cuda if run.device.type == "cuda" else torch.mps).synchronize()
                elapsed = time.perf_counter() - step_start
                run.budget.first_step_done()
                state["step"] += 1
                state["tokens"] += run.tokens_per_step
                state["time"] += elapsed
                log.seconds += elapsed

                last_step = run.progress() >= 1.0
                due = lambda every: every > 0 and state["step"] % every == 0  # noqa: E731
                stop_now = stop_request.reason is not None
                if due(config.log_every) or last_step or stop_now or due(config.checkpoint_every):
                    log.write(multiplier)
                    if not last_step:
                        run.extend_the_data()
                if bar is not None:
                    bar.update(1)

                if due(config.eval_every) and not last_step and run.budget.evaluation_fits():
                    result = run.evaluate()
                    run.say(f"step {state['step']}: val loss {result['val_loss']:.4f}, "
                            f"{result['val_bpb']:.4f} bits per byte")
                if due(config.sample_every) and not last_step:
                    run.samples()
                if stop_now:
                    run.checkpoint(f"stopped by {stop_request.reason}")
                    stop_request.saved()
                    return stop_request.reason
                if due(config.checkpoint_every) and not last_step:
                    run.checkpoint("scheduled")
        finally:
            if bar is not None:
                bar.close()
    return None


class _TrainingLog:
    """The training rows of metrics.jsonl (mean loss, speed) since the last one, and the checks made on them."""

    def __init__(self, run: Run, bar):
        self.run, self.bar = run, bar
        self.loss_sum = torch.zeros((), device=run.device)  # summed on the device; read only when logged
        self.steps, self.seconds = 0, 0.0
        self.learning = LearningCheck(run.config, start_step=run.state["step"]) if run.config.stop_if_not_learning else None
        self.flops_per_token = flops_per_token(run.raw_model.config, run.config.seq_len)
        self.peak_flops = peak_flops(run.device)

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += step_loss
        self.steps += 1
        if self.learning is not None and self.learning.first_loss is None:
            # One read of the device, at the first step: the loss the learning check compares with.
            self.learning.first_loss = self.run.first_loss = self.run.accelerator.reduce(step_loss, reduction="mean").item()

    def write(self, multiplier: float) -> None:
        run, state = self.run, self.run.state
        mean_loss = run.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps
        check_loss_finite(mean_loss, state["step"], run.out)
        tokens_per_second = self.steps * run.tokens_per_step / max(self.seconds, 1e-9)
        mfu = self.flops_per_token * tokens_per_second / (self.peak_flops * run.world_size) if self.peak_flops else None
        run.log_row({"kind": "train", "step": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3),
                     "loss": mean_loss, "lr": multiplier, "tokens_per_second": tokens_per_second, "mfu": mfu})
        spent = state["time"] - run.time_at_start
        if spent > 0:  # the mean speed of this command's training: a busy moment does not swing the plan
            run.budget.measured_training_speed((state["tokens"] - run.tokens_at_start) / spent)
        if run.config.report_to != "none":
            run.accelerator.log({"train_loss": mean_loss, "lr_multiplier": multiplier,
                                 "tokens_per_second": tokens_per_second}, step=state["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                                 **({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {}))
            _set_bar_total(self.bar, state["step"], run.progress())
        if self.learning is not None:
            self.learning.check(state["step"], run.progress(), mean_loss)
        self.loss_sum.zero_()
        self.steps, self.seconds = 0, 0.0


# ---------------------------------------------------------------------- the end


def finish(run: Run) -> dict:
    """The final evaluation and samples, a last checkpoint, and the model folder with its summary."""
    state, budget = run.state, run.budget
    with budget.phase("final_eval"):
        result = run.evaluate()
        run.say(f"final: step {state['step']}, {state['tokens']:,} tokens, {state['time']:.1f} s of training, "
                f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte")
        run.samples()
        run.checkpoint("end of training")
    config = run.config
    summary = {
        "steps": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3),
        "final_val_loss": result["val_loss"], "final_val_bpb": result["val_bpb"],
        "parameters": run.raw_model.num_parameters(), "preset": config.model_preset, "data": config.data,
        "train_tokens_available": run.train_split.num_tokens, "val_tokens": run.val_split.num_tokens,
        "processes": run.world_size, "precision": run.precision, "hardware": hardware(run.device, run.world_size),
        "compile": config.compile, "compile_seconds": round(run.compile_seconds, 3),
        "compile_fallback": run.compile_fallback,
        "first_loss": run.first_loss,
        # Data sized to the run: what was tokenised for training, and what training read of it.
        "tokens_prepared": run.train_split.num_tokens, "tokens_trained": state["tokens"],
        "tokens_prepared_before_first_step": run.tokens_prepared_first,
        "seconds_to_first_step": None if budget.first_step_at is None else round(budget.first_step_at, 3),
        # Tokenised in a thread while training ran (an accelerator's run), not on the clock's phases.
        "seconds_tokenising_beside_training": round(run.beside.seconds, 3) if run.beside is not None else None,
        "plan": {"precision": run.plan.precision.reason, "micro_batch": run.plan.micro_batch.value,
                 "micro_batch_why": run.plan.micro_batch.reason, "model": run.plan.model, "depth": run.plan.depth,
                 "tokens_per_second_probed": run.plan.tokens_per_second,
                 "tokenise_beside_training": None if run.plan.tokenise_beside is None else run.plan.tokenise_beside.value,
                 "ladder": [c.record() for c in run.plan.ladder] if run.plan.ladder else None},
    }
    if run.main_process:
        with budget.phase("export"):
            # The export's own seconds cannot be in the summary it writes: it is written again after.
            export_model_folder(run.out, run.raw_model, run.tokenizer, {**summary, "phases": budget.summary()})
        summary["phases"] = budget.summary()
        (run.out / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        run.say(f"model folder: {run.out} (load it with AutoModelForCausalLM.from_pretrained({str(run.out)!r}))"
                + (f"; the whole command took {format_seconds(budget.elapsed())} of its "
                   f"{format_seconds(budget.seconds)}" if budget.seconds is not None else ""))
    _end_processes(run.accelerator)
    return summary


def _end_processes(accelerator) -> None:
    """The end of a run, in order on every process: all meet, the trackers close, the process group goes
    (accelerate's end_training calls torch.distributed.destroy_process_group)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------------- helpers of the steps above


def _remove_created(created: list[Path], say) -> None:
    """Remove the folders a failed start created, except token shards worth resuming."""
    import shutil

    for path in created:
        shards = [p for p in (path, path / run_folder.DATA) if (p / MANIFEST).is_file()]
        if shards:
            say(f"kept {shards[0]}: its token shards are resumed by the next start with the same data")
            continue
        shutil.rmtree(path, ignore_errors=True)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _write_run_files(out: Path, config, model_config, tokenizer, resumed: bool, step: int) -> None:
    """Resolved settings, versions and the tokenizer, so every figure traces back to its run."""
    write_run_config(out, config, model_config, resumed, step)
    (out / run_folder.VERSIONS).write_text(json.dumps(package_versions(), indent=2), encoding="utf-8")
    tokenizer.save_pretrained(out)
    metrics = out / run_folder.METRICS
    if resumed and metrics.is_file():
        # Rows logged after the checkpoint we resume from belong to the lost part of the run.
        kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line and json.loads(line).get("step", 0) <= step]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    elif not resumed and metrics.exists():
        metrics.unlink()


def _steps_bar(config: TrainConfig, main_process: bool, initial: int, accumulation: int, world_size: int):
    """A bar over the steps the run will take. It starts after compilation, so its rate and ETA are
    the training's own; under a token or time budget its total is re-estimated at each log line."""
    totals = [config.max_steps] if config.max_steps else []
    if config.max_tokens:
        totals.append(math.ceil(config.max_tokens / (accumulation * config.batch_size * config.seq_len * world_size)))
    total = min(totals) if totals else None  # a time budget alone: known after the first steps
    return progress_bar(config.progress and main_process, "training", unit="step", initial=initial, total=total)


def _set_bar_total(bar, step: int, fraction: float) -> None:
    """Steps done over the fraction of the budget done: the step count the run will end at."""
    if fraction > 0:
        estimate = max(step, round(step / fraction))
        if bar.total != estimate:
            bar.total = estimate
            bar.refresh()


if __name__ == "__main__":
    sys.exit(main())
