"""One run's parts (`Run`, made by training/pretrain/setup.py), and what the loop does with them
besides the step itself: the schedule's progress, evaluations, samples, checkpoints, and the data's
growth while training (in pauses on a CPU, taken up from the tokenising thread on an accelerator)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from iterative_llm import run_folder
from iterative_llm.command_line import shell_word
from iterative_llm.tokenization import token_byte_lengths

from training.data.shards import ShardedDataset
from training.data.tokenise_beside import TokeniserBeside, TokenisingFailed
from training.eval.bits_per_byte import evaluate, sample
from training.eval.hellaswag import hellaswag_in_run
from training.pretrain.budget import TimeBudget
from training.pretrain.checkpoint import save_checkpoint
from training.pretrain.config import TrainConfig, source_share_trained, token_caps
from training.pretrain.guards import TrainingError
from training.pretrain.plan import BESIDE_FIRST_SECONDS, BESIDE_SHARD_SECONDS, DATA_MARGIN, EXTEND_AHEAD, Plan
from training.pretrain.run_data import DATA_IN_USE, prepare_shards_for_run
from training.pretrain.step import eagerly, to_model_inputs
from training.run_lock import hold


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
                    prepare_shards_for_run(c, self.tokenizer, self.data_dir, self.out, max_tokens=int(wanted / share_kept))
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
