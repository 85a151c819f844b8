"""One check of the GPU path, offline, in a few minutes: does compiled training learn, how fast, how much memory.

    python benchmarks/gpu_check.py --data FOLDER_OF_TXT            # a GPU: about 6 minutes on an H100/H200
    python benchmarks/gpu_check.py --data FOLDER_OF_TXT --small    # CPU (the default there): small settings

FOLDER_OF_TXT is any folder of .txt files (a few books is plenty); the last file in sorted order is
held out as validation text, the rest is training text, and each run trains its own tokenizer on it.
Nothing is downloaded. What it prints, phase by phase, then as one table:

1. gradients: one step of the tiny model under bf16 autocast, compiled (the whole model with
   inductor, and per region as training compiles it) against eager, for both loss paths; the
   relative difference of all gradients must be small (a compiled graph once gave all-zero gradients
   on an H100 while every CPU test passed: issue 14).
2. learning: a short tiny run and a short gpt2-small run through `training.pretrain.train` with
   --compile true (the presets' settings otherwise); each must lower its training loss by a stated
   margin. gpt2-small's run gives our tokens/s and MFU (medians of its logged windows, compilation
   excluded), its validation figures and samples.
3. baseline: transformers' GPT2LMHeadModel of the same size (eager, AdamW), through the same
   pipeline, the same data and step: its tokens/s, and ours over it.
4. profile and memory: one compiled step of gpt2-small under torch.profiler (device time by kernel,
   top rows; the whole table is written to OUT/profile.txt), the eager step's speed for comparison,
   and the peak memory (`torch.cuda.max_memory_allocated`) of the 24 GB setting: micro-batches of 16,
   activation checkpointing, the same 0.5M-token step.
5. the session: `--preset auto --time_budget B` on the books (B = --budget: 8m on a GPU, 30s with
   --small), the README's first command shortened: its plan, seconds to the first step, tokens
   prepared before it and in all (on a GPU, the rest tokenised beside training), training tokens/s
   and the result. It must end within the budget plus 2%, take its first step within 60 s, and
   lower its training loss by 1 nat.

`--phases 1 5` runs only those phases (a GPU session with little device time: about 8 minutes).

Every figure comes from this one run on one device, so the ratios compare like with like. The
exit status is 0 only when the gradient and learning checks pass.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.pretrain_recipe import gpt2_factory  # noqa: E402
from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, run_folder  # noqa: E402
from iterative_llm.console import make_output_safe  # noqa: E402
from training.pretrain.config import build_config, load_preset  # noqa: E402
from training.eval.bits_per_byte import flops_per_token, peak_flops  # noqa: E402
from training.machine import cpu_description  # noqa: E402
from training.pretrain.optim import build_optimizers  # noqa: E402
from training.pretrain.trainer import train  # noqa: E402
from training.pretrain.step import compile_model, to_model_inputs, train_step  # noqa: E402

# Margins a run must lower its training loss by (first step to the mean of the last three logged
# windows), in nats, per setting below. A model that learns nothing stays near ln(vocabulary): 8.3
# for tiny, 10.8 for gpt2-small. Measured on an H100 in eager mode (issue 14): tiny 8.21 -> 4.42 in
# 40 steps, gpt2-small 11.68 -> 4.93 in 12 steps of 131k tokens.
GRADIENT_TOLERANCE = 0.05  # relative norm of (compiled - eager); bf16 rounding is a few 1e-3


def say(message: str) -> None:
    print(message, flush=True)


def text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file() and p.stat().st_size > 0)


def layout_data(files: list[Path], work: Path) -> tuple[Path, Path]:
    """Training files (symlinked) and one held-out validation file, the last in sorted order."""
    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files[:-1]):
        (train_dir / f"{i:04d}-{path.name}").symlink_to(path.resolve())
    size = sum(p.stat().st_size for p in files[:-1])
    say(f"data: {len(files) - 1} training files ({size / 1e6:.1f} MB), validation {files[-1].name} "
        f"({files[-1].stat().st_size / 1e6:.1f} MB)")
    return train_dir, files[-1]


# ---------------------------------------------------------------------------------------------- 1


def gradient_check(device: torch.device, fields: dict) -> list[dict]:
    """One step of a tiny model, compiled vs eager, under bf16 autocast, for both loss paths."""
    rows = []
    config = IterativeLLMConfig.from_preset("tiny", zero_init_output_projections=False, initializer_range=0.1, **fields)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (8, config.max_position_embeddings), generator=generator).to(device)

    def step(model, forward, skip_logits):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=batch, labels=batch, use_cache=False, skip_logits=skip_logits).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() if p.grad is not None else torch.zeros(p.numel(), device=device)
                           for p in model.parameters()])
        return loss.item(), grads

    for skip_logits in (True, False):
        for how in ("whole model", "per region (training)"):
            torch.compiler.reset()
            torch.manual_seed(0)
            model = IterativeLLMForCausalLM(config).to(device).train()
            eager_loss, eager = step(model, model, skip_logits)
            start = time.perf_counter()
            if how == "whole model":
                compiled_loss, compiled = step(model, torch.compile(model), skip_logits)
            else:
                compile_model(model)
                compiled_loss, compiled = step(model, model, skip_logits)
            relative = ((compiled - eager).norm() / eager.norm()).item()
            row = {"loss path": "chunked (skip_logits)" if skip_logits else "plain (logits)", "compiled": how,
                   "eager loss": eager_loss, "compiled loss": compiled_loss, "gradient difference": relative,
                   "compile s": time.perf_counter() - start,
                   "ok": math.isfinite(relative) and relative < GRADIENT_TOLERANCE and eager.norm().item() > 0}
            rows.append(row)
            say(f"  {row['loss path']:<22} {how:<22} loss {eager_loss:.4f} eager / {compiled_loss:.4f} compiled, "
                f"gradients differ by {relative:.2e} (relative norm) -> {'ok' if row['ok'] else 'FAIL'}")
    return rows


# ---------------------------------------------------------------------------------------------- 2, 3


def run_training(name: str, preset: str, train_dir: Path, val_file: Path, work: Path, overrides: dict,
                 model_factory=None) -> dict:
    """One run through training.pretrain.train; its figures from summary and metrics.jsonl."""
    out = work / name
    values = {**load_preset(preset), "out": str(out), "data": str(train_dir), "val_data": str(val_file),
              "max_tokens": None, "max_time": None, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0,
              "report_to": "none", "progress": False, "log_every": 5, "compile": True, "max_documents": None,
              **overrides}
    vocab = IterativeLLMConfig.from_preset(preset, **values.get("model", {})).vocab_size
    values["data_cache"] = str(work / f"data-vocab{vocab}")  # runs of one vocabulary share tokenizer and shards
    start = time.perf_counter()
    summary = train(build_config(values), model_factory=model_factory)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / run_folder.METRICS).read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    losses = [r["loss"] for r in train_rows]
    # The first logged window holds the first steps (cuBLAS/autotuning warm-up): speed from the others.
    speeds = [r["tokens_per_second"] for r in train_rows[1:]] or [r["tokens_per_second"] for r in train_rows]
    mfus = [r["mfu"] for r in train_rows[1:] if r.get("mfu") is not None]
    samples = [r["text"] for r in rows if r["kind"] == "sample"]
    figures = {
        "name": name, "steps": summary["steps"], "tokens": summary["tokens"],
        "first_loss": summary["first_loss"] if summary.get("first_loss") is not None else losses[0],
        "last_loss": statistics.mean(losses[-3:]), "val_loss": summary["final_val_loss"],
        "val_bpb": summary["final_val_bpb"], "tokens_per_second": statistics.median(speeds),
        "mfu": statistics.median(mfus) if mfus else None, "compile_seconds": summary.get("compile_seconds", 0.0),
        "training_seconds": summary["time"], "wall_seconds": wall, "parameters": summary["parameters"],
        "samples": samples,
    }
    return figures


# ---------------------------------------------------------------------------------------------- 4


def random_batches(count: int, batch_size: int, seq_len: int, vocab: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator)
        # Shaped as training's batches (next tokens as labels), handed to the model as training does.
        batches.append(to_model_inputs({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, device))
    return batches


def timed_steps(model, optimizers, batches, accumulation, steps, device) -> float:
    """Seconds per optimizer step (device events), after the caller's warm-up."""
    # bf16 autocast as training uses on a GPU; float32 on CPU, as training's precision "auto" does there.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        micro = (batches[(step * accumulation + i) % len(batches)] for i in range(accumulation))
        train_step(model, optimizers, micro, accumulation=accumulation, grad_clip=1.0,
                   loss_kwargs={"skip_logits": True}, autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def profile_and_memory(device: torch.device, shape: dict, out: Path) -> dict:
    """Our gpt2-small step: eager vs compiled speed, a profile of the compiled step, and the peak
    memory of the 24 GB setting (micro-batches of 16 with activation checkpointing)."""
    from torch.profiler import ProfilerActivity, profile

    figures = {}
    config = IterativeLLMConfig.from_preset("gpt2-small", **shape["model"])
    seq_len, batch_size, batch_tokens = shape["seq_len"], shape["batch_size"], shape["batch_tokens"]
    accumulation = max(1, batch_tokens // (batch_size * seq_len))
    torch.manual_seed(0)
    model = IterativeLLMForCausalLM(config).to(device).train()
    optimizers = build_optimizers(model, optimizer="muon")
    batches = random_batches(4, batch_size, seq_len, config.vocab_size, device)
    tokens_per_step = accumulation * batch_size * seq_len
    flops = flops_per_token(config, seq_len)
    peak = peak_flops(device)

    timed_steps(model, optimizers, batches, accumulation, 1, device)  # eager warm-up
    eager = timed_steps(model, optimizers, batches, accumulation, shape["timed_steps"], device)
    figures["eager_tokens_per_second"] = tokens_per_step / eager
    torch.compiler.reset()
    compile_model(model)
    start = time.perf_counter()
    timed_steps(model, optimizers, batches, accumulation, 2, device)  # compiles
    figures["compile_seconds"] = time.perf_counter() - start
    compiled = timed_steps(model, optimizers, batches, accumulation, shape["timed_steps"], device)
    figures["compiled_tokens_per_second"] = tokens_per_step / compiled
    for key in ("eager", "compiled"):
        tps = figures[f"{key}_tokens_per_second"]
        figures[f"{key}_mfu"] = flops * tps / peak if peak else None
    say(f"  our step, micro-batch {batch_size} x {seq_len}, {accumulation} micro-batches: eager "
        f"{figures['eager_tokens_per_second']:,.0f} tokens/s, compiled {figures['compiled_tokens_per_second']:,.0f} "
        f"(compiled in {figures['compile_seconds']:.1f} s)"
        + (f"; MFU {100 * figures['eager_mfu']:.1f}% -> {100 * figures['compiled_mfu']:.1f}%" if peak else ""))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed_steps(model, optimizers, batches, accumulation, 1, device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
    (out / "profile.txt").write_text(table, encoding="utf-8")
    figures["profile_top"] = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=70)
    say(figures["profile_top"])

    if device.type == "cuda":
        del batches
        small = shape["memory_batch_size"]
        model.activation_checkpointing_enable()
        batches = random_batches(4, small, seq_len, config.vocab_size, device)
        accumulation_small = max(1, batch_tokens // (small * seq_len))
        timed_steps(model, optimizers, batches, accumulation_small, 1, device)  # (re)compiles under checkpointing
        torch.cuda.reset_peak_memory_stats(device)
        seconds = timed_steps(model, optimizers, batches, accumulation_small, 1, device)
        figures["memory_setting"] = f"micro-batch {small} x {seq_len}, activation checkpointing, {accumulation_small} micro-batches"
        figures["memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        figures["memory_tokens_per_second"] = accumulation_small * small * seq_len / seconds
        say(f"  24 GB setting ({figures['memory_setting']}): peak {figures['memory_peak_gib']:.2f} GiB, "
            f"{figures['memory_tokens_per_second']:,.0f} tokens/s")
        model.activation_checkpointing_disable()
        torch.cuda.reset_peak_memory_stats(device)
        timed_steps(model, optimizers, random_batches(2, batch_size, seq_len, config.vocab_size, device),
                    accumulation, 1, device)
        figures["preset_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        say(f"  preset setting (micro-batch {batch_size} x {seq_len}): peak {figures['preset_peak_gib']:.2f} GiB")
    return figures


# ---------------------------------------------------------------------------------------------- 5


def budget_session(train_dir: Path, val_file: Path, work: Path, budget: str, overrides: dict) -> dict:
    """`--preset auto --time_budget B`, as a user types it (its own data folder, tokenizer and plan)."""
    from training.pretrain.budget import parse_duration

    out = work / "session"
    values = {**load_preset("auto"), "out": str(out), "data": str(train_dir), "val_data": str(val_file),
              "time_budget": budget, "report_to": "none", "progress": False, **overrides}
    start = time.perf_counter()
    summary = train(build_config(values))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / run_folder.METRICS).read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    speeds = [r["tokens_per_second"] for r in train_rows[1:]] or [r["tokens_per_second"] for r in train_rows]
    losses = [r["loss"] for r in train_rows]
    seconds = parse_duration(budget)
    figures = {
        "budget": budget, "wall_seconds": wall, "phases": summary["phases"], "plan": summary["plan"],
        "parameters": summary["parameters"], "steps": summary["steps"],
        "seconds_to_first_step": summary["seconds_to_first_step"],
        "tokens_prepared_before_first_step": summary["tokens_prepared_before_first_step"],
        "tokens_prepared": summary["tokens_prepared"], "tokens_trained": summary["tokens_trained"],
        "seconds_tokenising_beside_training": summary["seconds_tokenising_beside_training"],
        "tokens_per_second": statistics.median(speeds) if speeds else 0.0,
        "first_loss": summary["first_loss"] if summary.get("first_loss") is not None else losses[0],
        "last_loss": statistics.mean(losses[-3:]), "val_bpb": summary["final_val_bpb"],
    }
    figures["checks"] = {
        "within the budget plus 2%": wall <= 1.02 * seconds,
        "first step within 60 s": summary["seconds_to_first_step"] is not None and summary["seconds_to_first_step"] < 60,
        "training loss fell": figures["first_loss"] - figures["last_loss"] >= 1.0,
    }
    return figures


# ---------------------------------------------------------------------------------------------- main


def settings(small: bool) -> dict:
    """Run lengths and shapes: a GPU's (the presets' own shapes) or CPU-sized ones."""
    if not small:
        return {
            "gradients": {},
            "tiny": {"max_steps": 150, "eval_tokens": 262_144, "margin": 2.0},
            "gpt2-small": {"max_steps": 40, "eval_tokens": 1_048_576, "margin": 3.0},
            "baseline": {"max_steps": 8, "eval_tokens": 262_144, "compile": False, "optimizer": "adamw",
                         "stop_if_not_learning": False},
            "profile": {"model": {}, "seq_len": 1024, "batch_size": 32, "batch_tokens": 524_288, "timed_steps": 2,
                        "memory_batch_size": 16},
            "session": {"budget": "8m"},
        }
    shrink = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 1024}
    shape = {"seq_len": 128, "batch_size": 8, "batch_tokens": 2048}
    return {
        "gradients": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512,
                      "max_position_embeddings": 64},
        "tiny": {"max_steps": 30, "eval_tokens": 16_384, "seq_len": 128, "batch_tokens": 4096, "margin": 1.5,
                 "model": {"vocab_size": 1024, "num_hidden_layers": 2}},
        "gpt2-small": {"max_steps": 30, "eval_tokens": 16_384, "model": shrink, "lr_embed": 0.6, "lr_head": 0.01,
                       "margin": 1.5,
                       **shape},
        "baseline": {"max_steps": 4, "eval_tokens": 16_384, "model": shrink, "compile": False, "optimizer": "adamw",
                     "stop_if_not_learning": False, **shape},
        "profile": {"model": shrink, "timed_steps": 1, "memory_batch_size": 4, **shape},
        # The CPU's session: the plan tokenises in pauses there (the thread's path is tests/data/test_tokenise_beside.py's).
        "session": {"budget": "30s", "eval_every": 50, "eval_tokens": 16_384, "model": {"vocab_size": 1024}},
    }


def main(argv=None) -> int:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder of .txt files (the last, sorted, is the validation text)")
    parser.add_argument("--out", default=None, help="where runs and profile.txt go (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", default=None,
                        help="CPU-sized models and runs (the default without a GPU)")
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--phases", type=int, nargs="+", choices=range(1, 6), default=[1, 2, 3, 4, 5],
                        help="the phases to run (default: all)")
    parser.add_argument("--budget", default=None, help="phase 5's --time_budget (default: 8m on a GPU, 30s with --small)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small if args.small is not None else device.type != "cuda"
    data = Path(args.data)
    if not data.is_dir():
        parser.error(f"--data {data}: not a folder of .txt files")
    files = text_files(data)
    if len(files) < 2:
        parser.error(f"--data {data}: needs at least two non-empty .txt files (one is held out for validation), "
                     f"found {len(files)}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if work.exists() and any(work.iterdir()):
        parser.error(f"--out {work} is not empty: give a new folder (runs are never overwritten)")
    work.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64  # several models compile in one process
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = cpu_description()
    say(f"gpu_check on {hardware}, torch {torch.__version__}, {'small' if small else 'full'} settings, work folder {work}")
    plan = settings(small)
    began = time.perf_counter()
    report: dict = {"device": hardware, "torch": torch.__version__, "small": small}
    failures = []

    def phase(title: str) -> None:
        say(f"\n== {title} ({time.perf_counter() - began:.0f} s in)")

    train_dir, val_file = layout_data(files, work)

    if 1 in args.phases:
        phase("1. gradients: compiled vs eager, bf16 autocast, tiny model")
        report["gradients"] = gradient_check(device, plan["gradients"])
        failures += [f"gradients: {r['loss path']}, {r['compiled']}" for r in report["gradients"] if not r["ok"]]

    for name in ("tiny", "gpt2-small") if 2 in args.phases else ():
        phase(f"2. learning: {name}, compiled")
        torch.compiler.reset()
        settings_of_run = dict(plan[name])
        margin = settings_of_run.pop("margin")
        try:
            figures = run_training(name, name, train_dir, val_file, work, settings_of_run)
        except Exception as err:  # report and go on: the other phases still say something
            traceback.print_exc()
            failures.append(f"learning {name}: {type(err).__name__}: {err}")
            continue
        figures["margin"] = margin
        figures["learned"] = figures["first_loss"] - figures["last_loss"] >= figures["margin"]
        report[name] = figures
        say(f"  {figures['steps']} steps: training loss {figures['first_loss']:.3f} -> {figures['last_loss']:.3f} "
            f"(must fall by {figures['margin']}: {'ok' if figures['learned'] else 'FAIL'}), val loss "
            f"{figures['val_loss']:.3f}, {figures['val_bpb']:.4f} bits per byte; {figures['tokens_per_second']:,.0f} "
            f"tokens/s" + (f", MFU {100 * figures['mfu']:.1f}%" if figures["mfu"] else "")
            + f"; compiled in {figures['compile_seconds']:.1f} s, trained {figures['training_seconds']:.1f} s")
        for text in figures["samples"]:
            say(f"  sample: {text[:160]!r}")
        if not figures["learned"]:
            failures.append(f"learning {name}")

    if 3 in args.phases:
        phase("3. baseline: GPT2LMHeadModel, eager, AdamW, same data and step")
        torch.compiler.reset()
        try:
            baseline = run_training("gpt2-baseline", "gpt2-small", train_dir, val_file, work, plan["baseline"],
                                    model_factory=gpt2_factory(None))
            report["baseline"] = baseline
            say(f"  {baseline['steps']} steps: {baseline['tokens_per_second']:,.0f} tokens/s"
                + (f", MFU {100 * baseline['mfu']:.1f}%" if baseline["mfu"] else ""))
        except Exception as err:
            traceback.print_exc()
            failures.append(f"baseline: {type(err).__name__}: {err}")

    if 4 in args.phases:
        phase("4. profile and memory: our gpt2-small step")
        torch.compiler.reset()
        try:
            report["profile"] = profile_and_memory(device, plan["profile"], work)
        except Exception as err:
            traceback.print_exc()
            failures.append(f"profile/memory: {type(err).__name__}: {err}")

    if 5 in args.phases:
        overrides = dict(plan["session"])
        budget = args.budget or overrides["budget"]
        del overrides["budget"]
        phase(f"5. the session: --preset auto --time_budget {budget}")
        torch.compiler.reset()
        try:
            session = report["session"] = budget_session(train_dir, val_file, work, budget, overrides)
            say(f"  {session['plan']['model']}; first step after {session['seconds_to_first_step']:.1f} s; "
                f"{session['tokens_prepared_before_first_step']:,} tokens prepared before it, "
                f"{session['tokens_prepared']:,} in all for {session['tokens_trained']:,} trained"
                + (f" ({session['seconds_tokenising_beside_training']:.1f} s tokenising beside training)"
                   if session["seconds_tokenising_beside_training"] else "")
                + f"; {session['tokens_per_second']:,.0f} tokens/s; {session['wall_seconds']:.1f} s of "
                f"{budget}; val {session['val_bpb']:.4f} bits per byte")
            failures += [f"session: {name}" for name, ok in session["checks"].items() if not ok]
        except Exception as err:
            traceback.print_exc()
            failures.append(f"session: {type(err).__name__}: {err}")

    report["seconds"] = time.perf_counter() - began
    report["failures"] = failures
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def print_table(report: dict) -> None:
    say(f"\n== gpu_check summary: {report['device']}, torch {report['torch']}, {report['seconds']:.0f} s in all")
    for row in report.get("gradients", []):
        say(f"gradients {row['loss path']:<22} {row['compiled']:<22} relative difference {row['gradient difference']:.2e} "
            f"{'ok' if row['ok'] else 'FAIL'}")
    for name in ("tiny", "gpt2-small"):
        f = report.get(name)
        if f:
            say(f"learning  {name:<11} loss {f['first_loss']:.3f} -> {f['last_loss']:.3f} in {f['steps']} steps "
                f"(margin {f['margin']}) {'ok' if f['learned'] else 'FAIL'}; val {f['val_bpb']:.4f} bits per byte")
    ours, base = report.get("gpt2-small"), report.get("baseline")
    if ours and base:
        say(f"speed     ours {ours['tokens_per_second']:,.0f} tokens/s"
            + (f" (MFU {100 * ours['mfu']:.1f}%)" if ours["mfu"] else "")
            + f", GPT2LMHeadModel eager AdamW {base['tokens_per_second']:,.0f}"
            + (f" (MFU {100 * base['mfu']:.1f}%)" if base["mfu"] else "")
            + f": {ours['tokens_per_second'] / base['tokens_per_second']:.2f}x")
    prof = report.get("profile")
    if prof:
        say(f"step      eager {prof['eager_tokens_per_second']:,.0f} tokens/s, compiled "
            f"{prof['compiled_tokens_per_second']:,.0f}"
            + (f" (MFU {100 * prof['eager_mfu']:.1f}% -> {100 * prof['compiled_mfu']:.1f}%)" if prof.get("eager_mfu") else ""))
        if "memory_peak_gib" in prof:
            say(f"memory    {prof['memory_setting']}: peak {prof['memory_peak_gib']:.2f} GiB "
                f"({prof['memory_tokens_per_second']:,.0f} tokens/s); preset micro-batch: {prof['preset_peak_gib']:.2f} GiB")
    session = report.get("session")
    if session:
        say(f"session   --time_budget {session['budget']}: {session['wall_seconds']:.1f} s, first step "
            f"{session['seconds_to_first_step']:.1f} s, {session['tokens_per_second']:,.0f} tokens/s, "
            f"{session['tokens_prepared']:,} tokens prepared ({session['tokens_prepared_before_first_step']:,} before "
            f"the first step) for {session['tokens_trained']:,} trained; val {session['val_bpb']:.4f} bits per byte; "
            + ", ".join(f"{name} {'ok' if ok else 'FAIL'}" for name, ok in session["checks"].items()))
    say("result    " + ("all checks passed" if not report["failures"] else "FAILED: " + "; ".join(report["failures"])))


if __name__ == "__main__":
    sys.exit(main())
