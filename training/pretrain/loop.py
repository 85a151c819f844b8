"""The training loop: optimizer steps until the budget is spent, with the log rows, evaluations,
samples and checkpoints between them, and the stop a user asks for (training/pretrain/stop_request.py)."""

from __future__ import annotations

import math
import time

import torch

from iterative_llm.console import progress_bar

from training.eval.bits_per_byte import flops_per_token, peak_flops
from training.pretrain.config import TrainConfig
from training.pretrain.guards import LearningCheck, check_loss_finite
from training.pretrain.optim import apply_lr, apply_muon_momentum, lr_multiplier, muon_momentum
from training.pretrain.run_state import Run
from training.pretrain.step import train_step
from training.pretrain.stop_request import StopRequest


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
