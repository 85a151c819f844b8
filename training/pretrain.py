"""Pretraining: from raw text to a trained Hugging Face model folder.

    iterative-llm train --preset tiny                      # CPU, minutes
    accelerate launch -m training.pretrain --preset gpt2-small   # one or more GPUs
    torchrun --nproc_per_node 2 -m training.pretrain ...   # data parallel, CPU (gloo) or GPU

Reads top to bottom: settings -> run folder -> tokenizer -> token shards -> model -> optimizers
-> (resume) -> the loop (schedule, accumulate, clip, step, log, evaluate, checkpoint) -> export.

The recipe, each part a setting in training/config.py and measured in benchmarks/pretrain_recipe.py:
- Muon for the hidden weight matrices, AdamW for embedding, head and vectors (Keller Jordan's
  modded-nanogpt records, 2024; nanochat), with plain AdamW + cosine available as the baseline.
- Warmup / stable / linear cool-down schedule (modded-nanogpt; Hägele et al. 2024) that follows the
  fraction of the budget done, so a wall-clock budget (`--max_time`) still ends with a cool-down.
- bf16 autocast on GPUs, optional torch.compile, gradient accumulation to a batch size in tokens,
  gradient clipping, optional document masking for packed sequences.

Guards that a GPU run needs and no CPU test can see (issue 14): with --compile, a warm-up step on the
first batch (its gradients thrown away) compiles the model before the clock starts and checks that
the compiled gradients are the eager ones; and a run whose loss has not fallen after its first
stretch stops with the likely causes instead of spending its whole budget.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, run_folder
from iterative_llm.tokenization import check_tokenizer_matches_model, load_tokenizer, token_byte_lengths, train_tokenizer

from .batches import RandomWindowBatches
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RESUME_MAY_CHANGE, TrainConfig, parse_args, to_dict
from .evaluate import evaluate, flops_per_token, peak_flops, sample
from .export import export_model_folder, package_versions
from .multiple_choice import hellaswag_in_run
from .optim import apply_lr, apply_muon_momentum, build_optimizers, lr_multiplier, muon_momentum
from .prepare import ShardSettingsError, prepare_shards
from .shards import MANIFEST, ShardedDataset
from .sources import iter_documents


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


# The process group of a data-parallel run is never freed in Python. Freeing it (when the DDP model
# that holds it goes) joins gloo's worker threads, and one of them may still be waiting for the GIL,
# which the freeing thread holds, to drop a tensor of the last collective: a deadlock, seen in about
# one run in ten under load (issue 11; stacks in ~ProcessGroupGloo and TensorImpl::decref_pyobject).
# So train() keeps the DDP model here, and main() ends such a process with os._exit once all is written.
_KEEP_UNTIL_EXIT: list = []


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"iterative-llm train: {err}", file=sys.stderr)
        return 2
    code = 1
    try:
        train(config)
        code = 0
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as err:
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


def train(config: TrainConfig, model_factory=None) -> dict:
    """Run (or resume) one training run; returns the summary written to OUT/summary.json.

    `model_factory(model_config)`, if given, builds the model to train instead of
    IterativeLLMForCausalLM (benchmarks put a GPT-2 baseline through the same pipeline this way).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes would each draw a bar inside the training bar

    # ------------------------------------------------------------------ settings and processes
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    out = Path(config.out)
    accelerator = Accelerator(
        # Several processes without GPUs (torchrun on a CPU machine): accelerate needs to be told
        # to use CPU data parallelism (gloo); otherwise each process trains alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(out),
    )
    main_process, rank, world_size = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = (lambda message: print(message, flush=True)) if main_process else (lambda message: None)
    device = accelerator.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in float32 (bf16 autocast covers the rest)
    set_seed(config.seed)

    # ------------------------------------------------------------------ the run folder
    resume_from = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise TrainingError(f"--resume: the run folder {out} has no checkpoint to resume from. Drop --resume to start it.")
    if not config.resume and latest_checkpoint(out) is not None:
        raise TrainingError(
            f"The run folder {out} already holds checkpoints. Pass --resume to continue that run, or choose "
            f"another --out (nothing was overwritten)."
        )
    _check_model_settings(config)  # before anything is written
    data_dir = Path(config.data_cache) if config.data_cache else out / run_folder.DATA
    # A start that fails before training leaves nothing behind: the folders it creates go again.
    created = [path for path in (out, data_dir) if not path.exists()]
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ tokenizer and token shards
    try:
        tokenizer = _tokenizer(config, data_dir, main_process, say)
        accelerator.wait_for_everyone()
        if not main_process:
            tokenizer = load_tokenizer(data_dir / "tokenizer") if not config.tokenizer else load_tokenizer(config.tokenizer)
        if main_process:
            _prepare_shards(config, tokenizer, data_dir, out)
        accelerator.wait_for_everyone()
    except BaseException:
        if main_process:
            _remove_created(created, say)
        raise
    dataset = ShardedDataset.open(data_dir)
    train_split, val_split = dataset.split("train"), dataset.split("val")
    say(f"data: {train_split.num_tokens:,} training tokens in {train_split.num_documents:,} documents, "
        f"{val_split.num_tokens:,} validation tokens ({data_dir})")

    # ------------------------------------------------------------------ the model
    model_fields = dict(config.model)
    model_fields.setdefault("vocab_size", _round_up(len(tokenizer), 64))  # multiples of 64 suit matmul kernels
    model_fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model_config = IterativeLLMConfig.from_preset(config.model_preset, **model_fields)
    check_tokenizer_matches_model(tokenizer, model_config)
    torch.manual_seed(config.seed)
    raw_model = (model_factory or IterativeLLMForCausalLM)(model_config).to(device)
    # Our model computes the loss chunk by chunk without keeping the (B, T, V) logits
    # (`skip_logits`); a baseline model from `model_factory` gets the plain call.
    loss_only = {"skip_logits": True} if isinstance(raw_model, IterativeLLMForCausalLM) else {}
    if config.activation_checkpointing:
        raw_model.activation_checkpointing_enable()
    raw_model.train()
    say(f"model: {config.model_preset} preset, {raw_model.num_parameters():,} parameters, precision {precision}")

    # ------------------------------------------------------------------ optimizers and schedule
    optimizers = build_optimizers(
        raw_model, optimizer=config.optimizer, lr_matrix=config.lr_matrix, lr_embed=config.lr_embed,
        lr_head=config.lr_head, lr_scalar=config.lr_scalar, adamw_lr=config.adamw_lr,
        weight_decay=config.weight_decay,
    )
    tokens_per_micro_step = config.batch_size * config.seq_len * world_size
    accumulation = max(1, round(config.batch_tokens / tokens_per_micro_step))
    tokens_per_step = accumulation * tokens_per_micro_step
    if tokens_per_step != config.batch_tokens:
        say(f"note: batch_tokens {config.batch_tokens} rounded to {tokens_per_step} "
            f"({accumulation} micro-steps of {config.batch_size} x {config.seq_len} tokens x {world_size} processes)")

    # ------------------------------------------------------------------ resume
    state = {"step": 0, "tokens": 0, "time": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, raw_model, optimizers)
        _check_resume_settings(state, config, tokens_per_step)
        say(f"resumed from {resume_from} (step {state['step']}, {state['tokens']:,} tokens)")
    if main_process:
        _write_run_files(out, config, model_config, tokenizer, resume_from is not None, state["step"])
    accelerator.wait_for_everyone()

    if config.compile:
        compile_model(raw_model)
    model = accelerator.prepare(raw_model)
    if world_size > 1:
        _KEEP_UNTIL_EXIT.append(model)  # its DDP reducer holds the process group
    # The global batch of a step is `accumulation x world_size` slices of `batch_size` rows, drawn
    # from one generator seeded by the step: micro-step m of process r reads slice m * world + r.
    # The same step therefore sees the same rows whatever the split into processes and micro-steps,
    # and resuming needs nothing but the step counter.
    micro_batches = [
        RandomWindowBatches(
            train_split, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
            rank=micro * world_size + rank, world_size=accumulation * world_size,
            document_positions=config.document_masking,
            pin_memory=config.dataloader_pin_memory and device.type == "cuda",
        )
        for micro in range(accumulation)
    ]
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer).astype("int64"))
    if config.report_to != "none":
        # TensorBoard writes to project_dir/<project name>: OUT/logs, as the README's table says.
        accelerator.init_trackers(run_folder.LOGS if config.report_to == "tensorboard" else "pretrain", config=_scalar_config(config))

    flops_token = flops_per_token(raw_model.config, config.seq_len)
    peak = peak_flops(device)
    metrics_file = out / run_folder.METRICS

    def log_row(row: dict) -> None:
        if main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval() -> dict:
        with eagerly(config.compile):
            result = evaluate(
                raw_model, val_split, byte_lengths, batch_size=config.batch_size, seq_len=config.seq_len,
                max_tokens=config.eval_tokens, device=device, autocast=accelerator.autocast, rank=rank,
                world_size=world_size, document_positions=config.document_masking,
            )
            result.update(hellaswag_in_run(config, raw_model, tokenizer, state["step"], final=progress_fraction() >= 1.0,
                                           autocast=accelerator.autocast, rank=rank, world_size=world_size))
        row = {"kind": "eval", "step": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3), **result}
        log_row(row)
        if config.report_to != "none":
            accelerator.log(result, step=state["step"])
        return result

    def run_samples() -> None:
        if not main_process:
            return
        with accelerator.autocast(), eagerly(config.compile):
            texts = sample(raw_model, tokenizer, config.sample_prompts, max_new_tokens=config.sample_tokens,
                           seed=config.seed, device=device)
        for prompt, text in zip(config.sample_prompts, texts):
            log_row({"kind": "sample", "step": state["step"], "prompt": prompt, "text": text})
            say(f"  sample | {text!r}")

    def progress_fraction() -> float:
        parts = []
        if config.max_steps:
            parts.append(state["step"] / config.max_steps)
        if config.max_tokens:
            parts.append(state["tokens"] / config.max_tokens)
        if config.max_time:
            parts.append(state["time"] / config.max_time)
        return min(1.0, max(parts))

    # Ctrl-C / SIGTERM ask the loop to checkpoint and stop at the end of the current step.
    stop_requested = {"signal": None}

    def request_stop(signum, frame):
        if stop_requested["signal"] is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        stop_requested["signal"] = signal.Signals(signum).name

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if _in_main_thread() else {}

    def checkpoint(reason: str) -> None:
        accelerator.wait_for_everyone()
        if main_process:
            path = save_checkpoint(out, raw_model, optimizers, {**state, "reason": reason,
                                   "tokens_per_step": tokens_per_step, "seed": config.seed}, keep=config.keep_checkpoints)
            say(f"checkpoint: {path} ({reason})")
        accelerator.wait_for_everyone()

    def step_inputs(micro: int, step: int) -> dict:
        batch = micro_batches[micro].batch_at(step)
        return to_model_inputs(batch, device)

    # ------------------------------------------------------------------ warm-up (compile) off the clock
    # torch.compile does its work on the first forward and backward (about 100 s for gpt2-small
    # compiled whole, on an H100): a forward and backward on the first batch, its gradients thrown
    # away, does it here, so that `max_time` is training time and its cool-down comes at its end.
    # The same step compares the compiled gradients with the eager ones, since a compiled graph that
    # trains on wrong gradients is invisible otherwise.
    compile_seconds = 0.0
    if config.compile:
        start = time.perf_counter()
        say("compiling the model (a warm-up step whose gradients are thrown away; not counted as training time) ...")
        check = warm_up_compiled(model, step_inputs(0, state["step"]), loss_only, config.compile_check)
        compile_seconds = time.perf_counter() - start
        say(f"compiled in {compile_seconds:.1f} s" + (f"; {check}" if check else ""))

    # ------------------------------------------------------------------ the loop
    bar = _progress_bar(config, main_process, state["step"], accumulation, world_size)
    loss_sum = torch.zeros((), device=device)  # summed on the device; read only when logged
    steps_since_log, time_since_log = 0, 0.0
    stopped_by = None
    learning = LearningCheck(config, start_step=state["step"]) if config.stop_if_not_learning else None
    clip = (lambda parameters, max_norm: accelerator.clip_grad_norm_(parameters, max_norm))
    try:
        while progress_fraction() < 1.0:
            step_start = time.perf_counter()
            multiplier = lr_multiplier(state["step"], config.warmup_steps, progress_fraction(),
                                       cooldown_fraction=config.cooldown_fraction, final_ratio=config.final_lr_ratio,
                                       shape=config.schedule)
            apply_lr(optimizers, multiplier)
            if config.optimizer == "muon":
                apply_muon_momentum(optimizers, muon_momentum(state["step"], warmup_steps=config.muon_momentum_warmup_steps))

            step_loss = train_step(
                model, optimizers, (step_inputs(micro, state["step"]) for micro in range(accumulation)),
                accumulation=accumulation, grad_clip=config.grad_clip, loss_kwargs=loss_only, clip=clip,
                # Gradients are averaged across processes only on the last micro-step.
                no_sync=(lambda: accelerator.no_sync(model)) if world_size > 1 else None,
            )
            loss_sum += step_loss
            if learning is not None and learning.first_loss is None:
                learning.first_loss = accelerator.reduce(step_loss, reduction="mean").item()  # one read, at step 1

            if device.type == "cuda" and (state["step"] + 1) % config.log_every == 0:
                torch.cuda.synchronize()  # so the step times below are real, not queued work
            elapsed = time.perf_counter() - step_start
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["time"] += elapsed
            steps_since_log += 1
            time_since_log += elapsed

            last_step = progress_fraction() >= 1.0
            due = lambda every: every > 0 and state["step"] % every == 0  # noqa: E731
            stop_now = stop_requested["signal"] is not None
            if due(config.log_every) or last_step or stop_now or due(config.checkpoint_every):
                mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log
                if not math.isfinite(mean_loss):
                    last = latest_checkpoint(out)
                    raise TrainingError(
                        f"The training loss became {mean_loss} at step {state['step']}. No checkpoint was written "
                        f"after it; the last good one is {last or '(none yet)'}. Lower the learning rates "
                        f"(--lr_matrix, --lr_embed, --adamw_lr), keep --grad_clip on, or use --precision fp32."
                    )
                tokens_per_second = steps_since_log * tokens_per_step / max(time_since_log, 1e-9)
                mfu = flops_token * tokens_per_second / (peak * world_size) if peak else None
                row = {"kind": "train", "step": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3),
                       "loss": mean_loss, "lr": multiplier, "tokens_per_second": tokens_per_second, "mfu": mfu}
                log_row(row)
                if config.report_to != "none":
                    accelerator.log({"train_loss": mean_loss, "lr_multiplier": multiplier,
                                     "tokens_per_second": tokens_per_second}, step=state["step"])
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                                    **({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {}))
                    _set_bar_total(bar, state["step"], progress_fraction())
                if learning is not None:
                    learning.check(state["step"], progress_fraction(), mean_loss)
                loss_sum.zero_()
                steps_since_log, time_since_log = 0, 0.0
            if bar is not None:
                bar.update(1)

            if due(config.eval_every) and not last_step:
                result = run_eval()
                say(f"step {state['step']}: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte")
            if due(config.sample_every) and not last_step:
                run_samples()
            if stop_now:
                stopped_by = stop_requested["signal"]
                checkpoint(f"stopped by {stopped_by}")
                break
            if due(config.checkpoint_every) and not last_step:
                checkpoint("scheduled")
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if stopped_by is not None:
        say(f"Stopped by {stopped_by} at step {state['step']}. Continue with: iterative-llm train --out {out} --resume")
        _finish(accelerator)
        return {"stopped": True, **state}

    # ------------------------------------------------------------------ final evaluation and export
    result = run_eval()
    say(f"final: step {state['step']}, {state['tokens']:,} tokens, {state['time']:.1f} s of training, "
        f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte")
    run_samples()
    checkpoint("end of training")
    summary = {
        "steps": state["step"], "tokens": state["tokens"], "time": round(state["time"], 3),
        "final_val_loss": result["val_loss"], "final_val_bpb": result["val_bpb"],
        "parameters": raw_model.num_parameters(), "preset": config.model_preset, "data": config.data,
        "train_tokens_available": train_split.num_tokens, "val_tokens": val_split.num_tokens,
        "processes": world_size, "precision": precision, "hardware": _hardware(device, world_size),
        "compile": config.compile, "compile_seconds": round(compile_seconds, 3),
        "first_loss": learning.first_loss if learning is not None else None,
    }
    if main_process:
        export_model_folder(out, raw_model, tokenizer, summary)
        say(f"model folder: {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    _finish(accelerator)
    return summary


def _finish(accelerator) -> None:
    """The end of a run, in order on every process: all meet, the trackers close, the process group goes
    (accelerate's end_training calls torch.distributed.destroy_process_group)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------------- one training step, compile, guards


def to_model_inputs(batch: dict, device: torch.device) -> dict:
    """A batch of `RandomWindowBatches` as the model's keyword arguments, on `device`.

    The batch's labels are already the next tokens: transformers' loss takes them as
    `shift_labels` (no second shift); `labels` only switches the loss on.

    Why the batches shift and the model does not (issue 12 weighed it, and kept it): a batch reads
    T + 1 tokens per row so that all T positions have a target, and the next tokens are its
    `labels` (evaluation scores them as they are). The Hugging Face way, labels = input_ids
    shifted inside the model, has no target for the last position: T - 1 targets per row, or
    T + 1 positions to keep T, and either changes every loss. `shift_labels` is transformers'
    own argument for targets shifted already, and its forward computes a loss only when `labels`
    is given; `labels=input_ids` is also what labels mean there, so the two agree.
    """
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs["shift_labels"] = inputs.pop("labels")
    inputs["labels"] = inputs["input_ids"]
    return inputs


def train_step(model, optimizers, micro_batches, *, accumulation: int, grad_clip: float, loss_kwargs: dict,
               clip=None, no_sync=None, autocast=None) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches (model inputs on the device); returns the
    step's mean loss as a device tensor (nothing here waits for the device).

    `no_sync()`, if given, is entered for every micro-batch but the last (data parallelism averages
    gradients once per step); `clip(parameters, max_norm)` defaults to torch's foreach clipping;
    `autocast()` wraps the forward pass where the model is not already wrapped (benchmarks).
    benchmarks/throughput.py and benchmarks/gpu_check.py time this same function.
    """
    step_loss = None
    for micro, inputs in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and micro < accumulation - 1 else nullcontext()
        with sync:
            with autocast() if autocast is not None else nullcontext():
                loss = model(**inputs, use_cache=False, **loss_kwargs).loss / accumulation
            loss.backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    if grad_clip > 0:
        parameters = [p for p in model.parameters() if p.grad is not None]
        if clip is not None:
            clip(parameters, grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    for optimizer in optimizers:
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return step_loss


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile the parts of `model` that do the work, in place ("regional" compilation).

    For our model: each decoder block, and the output head with its loss. The blocks share one
    compiled graph (same code, same shapes), so compiling takes about as long as for one block,
    not the whole stack (on this project's CPU: 13 s against 79 s for a 12-layer model compiled
    whole); what stays eager (embedding lookup, rotary tables, the mask, the final norm) is a handful
    of kernels. torchtitan compiles per block the same way, and compiles its loss apart. Another
    model (a GPT-2 baseline) is compiled whole.
    """
    if isinstance(model, IterativeLLMForCausalLM):
        for layer in model.model.layers:
            layer.compile()
        model.loss_from_hidden_states = torch.compile(model.loss_from_hidden_states)
        return model
    model.compile()
    return model


def eagerly(compiled: bool):
    """Run the compiled regions eagerly inside this context: evaluation and sampling see other shapes
    (and generation a new length at every token), each of which would compile again."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


def warm_up_compiled(model, inputs: dict, loss_kwargs: dict, check: bool) -> str | None:
    """Run one throwaway forward and backward (torch.compile does its work here) and leave no
    gradients behind. With `check`, also run it eagerly (`torch.compiler.set_stance("force_eager")`)
    and compare: compiled gradients that are not the eager ones stop the run before it starts.

    Returns a line saying how close they were, or None when not checked.
    """
    def gradients() -> tuple[float, list[torch.Tensor]]:
        loss = model(**inputs, use_cache=False, **loss_kwargs).loss
        loss.backward()
        grads = [p.grad.detach().float().flatten().clone() if p.grad is not None else None for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    compiled_loss, compiled = gradients()
    if not check or not hasattr(torch.compiler, "set_stance"):
        return None
    with eagerly(True):
        eager_loss, eager = gradients()
    pairs = [(c, e) for c, e in zip(compiled, eager) if e is not None]
    if any(c is None for c, _ in pairs):
        missing = sum(c is None for c, _ in pairs)
        raise TrainingError(
            f"The compiled model produced no gradient for {missing} parameters that have one when run eagerly. "
            f"Train with --compile false, and please report this with your torch version ({torch.__version__})."
        )
    reference = math.sqrt(sum(float(e.square().sum()) for _, e in pairs))
    difference = math.sqrt(sum(float((c - e).square().sum()) for c, e in pairs))
    relative = difference / max(reference, 1e-30)
    # Same numbers in another order of operations: under bf16 a few 1e-3 apart, never near 1 (a zero
    # gradient is exactly 1). 0.1 leaves room for rounding and none for a wrong graph.
    if not math.isfinite(relative) or relative > 0.1 or abs(compiled_loss - eager_loss) > 0.05 * max(abs(eager_loss), 1.0):
        raise TrainingError(
            f"torch.compile changed what the model computes: on the same batch the compiled loss is {compiled_loss:.4f} "
            f"and the eager loss {eager_loss:.4f}; the compiled gradients differ from the eager ones by {relative:.3f} "
            f"(relative norm; 0 = identical, 1 = e.g. all zero). Training would learn nothing or the wrong thing. "
            f"Train with --compile false (slower, correct), or try --precision fp32 to see whether bf16 is involved, "
            f"and please report it with your torch version ({torch.__version__}). "
            f"To skip this check: --compile_check false."
        )
    return f"compiled gradients match eager ones (relative difference {relative:.1e}, loss {compiled_loss:.4f} vs {eager_loss:.4f})"


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


# ---------------------------------------------------------------------- helpers of the steps above


def _tokenizer(config: TrainConfig, data_dir: Path, main_process: bool, say):
    """The given tokenizer, the one already trained for this data cache, or a new one."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    saved = data_dir / "tokenizer"
    if saved.is_dir():
        return load_tokenizer(saved)
    if not main_process:
        return None
    vocab_size = config.model.get("vocab_size") or IterativeLLMConfig.from_preset(config.model_preset).vocab_size
    say(f"training a {vocab_size}-token byte-level BPE tokenizer on {config.data} ...")
    start = time.perf_counter()
    tokenizer = train_tokenizer(_limited(iter_documents(
        config.data, text_column=config.text_column, doc_separator=config.doc_separator,
        max_documents=config.max_documents), config.tokenizer_train_chars), vocab_size=vocab_size)
    tokenizer.save_pretrained(saved)
    say(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s, saved to {saved}")
    return tokenizer


def _prepare_shards(config: TrainConfig, tokenizer, data_dir: Path, out: Path) -> None:
    try:
        prepare_shards(
            config.data, tokenizer, data_dir, text_column=config.text_column, doc_separator=config.doc_separator,
            val_source=config.val_data, val_fraction=config.val_fraction, max_documents=config.max_documents,
            progress=config.progress,
        )
    except ShardSettingsError as err:
        made_from = err.manifest.get("paths", {}).get("source")
        own_run = (out / run_folder.RUN_CONFIG).is_file() and not config.data_cache
        raise TrainingError(
            f"{data_dir} holds the token shards of another data source or other data settings "
            f"({'; '.join(err.differences)}); this run asks for --data {config.data}. "
            + (f"To continue the run in {out}, use `iterative-llm train --out {out} --resume` with no data options: "
               f"it reads the run's own settings from {run_folder.RUN_CONFIG}. " if own_run else "")
            + f"To train on {made_from}, pass --data {made_from} with the settings the shards were made with; to "
            f"train on {config.data}, choose another --out, or a --data_cache folder of its own. Nothing was changed."
        ) from err


def _check_model_settings(config: TrainConfig) -> None:
    """Model settings that cannot work, found before the run folder is made."""
    model_config = IterativeLLMConfig.from_preset(config.model_preset, **config.model)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len ({config.seq_len}) is longer than the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}): lower --seq_len or set --model.max_position_embeddings."
        )


def _remove_created(created: list[Path], say) -> None:
    """Remove the folders a failed start created, except token shards worth resuming."""
    import shutil

    for path in created:
        shards = [p for p in (path, path / run_folder.DATA) if (p / MANIFEST).is_file()]
        if shards:
            say(f"kept {shards[0]}: its token shards are resumed by the next start with the same data")
            continue
        shutil.rmtree(path, ignore_errors=True)


def _limited(documents, max_chars: int):
    seen = 0
    for document in documents:
        yield document
        seen += len(document)
        if seen >= max_chars:
            return


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _check_resume_settings(state: dict, config: TrainConfig, tokens_per_step: int) -> None:
    if state.get("tokens_per_step") not in (None, tokens_per_step) or state.get("seed") not in (None, config.seed):
        raise CheckpointError(
            f"The checkpoint was written with {state.get('tokens_per_step')} tokens per step and seed "
            f"{state.get('seed')}, but the settings now give {tokens_per_step} and {config.seed}: the data order "
            f"would not continue where it stopped. Resume with the run's own settings (see {run_folder.RUN_CONFIG})."
        )


def _write_run_files(out: Path, config, model_config, tokenizer, resumed: bool, step: int) -> None:
    """Resolved settings, versions and the tokenizer, so every figure traces back to its run."""
    run_config = out / run_folder.RUN_CONFIG
    if resumed and run_config.is_file():
        # The run keeps its own settings; a resume may only extend it or change its cadence
        # (RESUME_MAY_CHANGE), and each such change is recorded with the step it applies from.
        saved = yaml.safe_load(run_config.read_text())
        changes = {key: value for key, value in to_dict(config).items()
                   if key in RESUME_MAY_CHANGE and key not in ("out", "resume") and saved.get("train", {}).get(key) != value}
        saved.setdefault("train", {}).update(changes)
        saved.setdefault("resumed", []).append({"step": step, "changed": changes})
        run_config.write_text(yaml.safe_dump(saved, sort_keys=False))
    else:
        run_config.write_text(
            yaml.safe_dump({"train": to_dict(config), "model": model_config.to_diff_dict()}, sort_keys=False)
        )
    (out / run_folder.VERSIONS).write_text(json.dumps(package_versions(), indent=2))
    tokenizer.save_pretrained(out)
    metrics = out / run_folder.METRICS
    if resumed and metrics.is_file():
        # Rows logged after the checkpoint we resume from belong to the lost part of the run.
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif not resumed and metrics.exists():
        metrics.unlink()


def _scalar_config(config: TrainConfig) -> dict:
    flat = {}
    for key, value in to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"model.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            flat[key] = value
    return flat


def _progress_bar(config: TrainConfig, main_process: bool, initial: int, accumulation: int, world_size: int):
    """A bar over the steps the run will take. It starts after compilation, so its rate and ETA are
    the training's own; under a token or time budget its total is re-estimated at each log line."""
    if not (config.progress and main_process):
        return None
    from tqdm.auto import tqdm

    totals = [config.max_steps] if config.max_steps else []
    if config.max_tokens:
        totals.append(math.ceil(config.max_tokens / (accumulation * config.batch_size * config.seq_len * world_size)))
    total = min(totals) if totals else None  # a time budget alone: known after the first steps
    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _set_bar_total(bar, step: int, fraction: float) -> None:
    """Steps done over the fraction of the budget done: the step count the run will end at."""
    if fraction > 0:
        estimate = max(step, round(step / fraction))
        if bar.total != estimate:
            bar.total = estimate
            bar.refresh()


def _hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    return f"{world_size} x CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
