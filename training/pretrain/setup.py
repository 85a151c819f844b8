"""Set-up of a pretraining run: processes, the run folder, the plan and the data it needs, the model,
its optimizers and (with --resume) the state to continue from: `set_up` makes the `Run` the loop needs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, run_folder
from iterative_llm.tokenization import check_tokenizer_matches_model

from training.data.batches import RandomWindowBatches
from training.data.prepare import tokenizer_for
from training.data.shards import MANIFEST, ShardedDataset
from training.data.sources import iter_documents
from training.machine import choose_threads, cpu_description
from training.pretrain import ladder
from training.pretrain.budget import TimeBudget, format_seconds
from training.pretrain.checkpoint import STATE_FILE, latest_checkpoint, resume_checkpoint
from training.pretrain.config import TrainConfig, scalar_settings, write_run_config
from training.pretrain.guards import TrainingError, check_model_settings, check_resume_settings
from training.pretrain.optim import build_optimizers
from training.pretrain.plan import Device, Plan, choose_precision, fit_run, measure_encode_rate, tokenizer_chars
from training.pretrain.run_data import DATA_IN_USE, run_data_dir, prepare_shards_for_run, tokeniser_beside_for_run
from training.pretrain.run_state import Run
from training.pretrain.step import compile_model, compile_problem, micro_steps
from training.run_lock import hold
from training.versions import package_versions


# The process group of a data-parallel run is never freed in Python. Freeing it (when the DDP model
# that holds it goes) joins gloo's worker threads, and one of them may still be waiting for the GIL,
# which the freeing thread holds, to drop a tensor of the last collective: a deadlock, seen in about
# one run in ten under load (issue 11; stacks in ~ProcessGroupGloo and TensorImpl::decref_pyobject).
# So train() keeps the DDP model here, and main() ends such a process with os._exit once all is written.
_KEEP_UNTIL_EXIT: list = []


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
        data_dir=run_data_dir(config, out),
        beside=tokeniser_beside_for_run(config, plan, tokenizer, run_data_dir(config, out), out) if main_process else None,
    )


def _start_processes(config: TrainConfig, precision: str, out: Path):
    """(the accelerator of this launch's processes, a `say` that prints on the main process only), with
    torch's threads, TF32 on a CUDA card and every random generator seeded."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        # Several processes without GPUs (torchrun on a CPU machine): accelerate needs to be told
        # to use CPU data parallelism (gloo); otherwise each process trains alone.
        cpu=not torch.cuda.is_available() and several_processes(),
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
    data_dir = run_data_dir(config, out)
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
                prepare_shards_for_run(plan.config, tokenizer, data_dir, out, max_tokens=plan.tokens_to_prepare)
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


def _tokens_trained_in(checkpoint: Path) -> int:
    """The tokens a checkpoint had trained on; 0 when its state cannot be read (resume then skips it
    for an older one, and the data is extended as training goes if that reads more)."""
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


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

def several_processes() -> bool:
    """Launched by torchrun or `accelerate launch` as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
