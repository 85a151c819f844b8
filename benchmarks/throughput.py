"""Training and generation speed: our model and training step against GPT-2 of the same size, in one run.

    python benchmarks/throughput.py                                        # CPU, tiny preset, about a minute
    python benchmarks/throughput.py --vocab-size 1024                      # the shakespeare recipe's vocabulary
    python benchmarks/throughput.py --preset gpt2-small --device cuda --compile   # GPU: bf16, compile
    python benchmarks/throughput.py --preset gpt2-small --device cuda --compile --batch-size 16 \
        --grad-accum 32 --activation-checkpointing                         # the same step on a 24 GB card

Two contestants, built at the same width, depth, heads, context and vocabulary:
- ours: IterativeLLMForCausalLM with the training step of training/pretrain/step.py (forward with labels and
  the chunked `skip_logits` loss unless `--plain-loss`, backward, gradient clipping, Muon + AdamW from `build_optimizers`, zero_grad);
- gpt2: transformers' GPT2LMHeadModel (as benchmarks/pretrain_recipe.py builds it) with the same
  step but a plain AdamW (`build_optimizers(optimizer="adamw")`, fused on GPU).

Both train on the same random-token batches, in the same order, at the same precision (`--dtype`:
bf16 autocast, the default on GPU, or fp32). A step is one optimizer step over `--grad-accum`
micro-batches of `--batch-size` x `--seq-len` tokens (by default the training preset's step). After
`--warmup` steps each (compilation happens there), `--rounds` rounds alternate ours and gpt2,
`--steps` steps each, so a machine that slows down or speeds up during the run affects both alike.
A round is timed as a whole: CUDA events with one `torch.cuda.synchronize` at its end (none inside
the loop; the loss stays on the device and is read after the round), `time.perf_counter` on CPU.
Figures are medians over rounds; the ratio is the median of the per-round ratios ours / gpt2.

MFU is the model FLOPs per token (training/eval/bits_per_byte.py `flops_per_token`: 6 N + 12 L H D T, attention
included) times tokens/s over the device's dense bf16 peak (`peak_flops`); "n/a" on CPU and for fp32.
The output head and loss are also timed alone (one micro-batch, forward + backward): our chunked
loss against the plain path through full logits, same weights and inputs.

Peak memory (CUDA only) is `torch.cuda.max_memory_allocated` during the model's own rounds, less the
weights and optimizer state the other model keeps on the device meanwhile.

Generation: a batch of random prompts, a fixed number of new tokens (greedy, no early stop), with the
KV cache: transformers' dynamic cache, and with `--compile` also the static cache with the decoding
step compiled (`cache_implementation="static"`; on CUDA transformers' auto-compile, CUDA graphs).

`--compile` compiles our model as training does (training/pretrain/step.py `compile_model`: each block and
the loss; the optimizer step, torch.optim.Muon + AdamW, stays eager); `--compile-baseline`
compiles GPT-2 too (whole, like for like). The table says which contestant ran how. Each phase prints
a line as it starts and ends, with the seconds since the start (`--quiet` prints only the table).

On a busy CPU, pass `--threads 1`: with more threads than free cores, threads wait on each other
at every operation, which costs the model with more, smaller operations (ours) more than GPT-2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402

from benchmarks.pretrain_recipe import gpt2_factory  # noqa: E402
from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM  # noqa: E402
from iterative_llm.console import make_output_safe  # noqa: E402
from training.eval.bits_per_byte import flops_per_token, peak_flops  # noqa: E402
from training.machine import choose_threads, cpu_description  # noqa: E402
from training.pretrain.optim import build_optimizers  # noqa: E402
from training.pretrain.step import compile_model as pretrain_compile  # noqa: E402
from training.pretrain.step import to_model_inputs, train_step  # noqa: E402

# Each training preset's step (training/presets/*.yaml): micro-batch rows, tokens per row, and the
# micro-batches accumulated per optimizer step (batch_tokens / rows / tokens). gpt2-medium has no
# training preset: gpt2-small's 0.5M-token step, in micro-batches of half the rows.
DEFAULT_SHAPES = {
    "tiny": (16, 256, 2), "gpt1": (64, 512, 8), "gpt2-small": (32, 1024, 16), "gpt2-medium": (16, 1024, 32),
}
ATTENTION_CHOICES = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager")


class Contestant:
    """One model, its optimisers and its training step, ready to be timed."""

    def __init__(self, name: str, model: torch.nn.Module, optimizers: list, *, compile_model: bool,
                 label: str, compile_mode: str = "default", loss_kwargs: dict | None = None):
        self.name, self.model, self.optimizers, self.label = name, model, optimizers, label
        self.loss_kwargs = loss_kwargs or {}
        if compile_model and compile_mode == "default":
            pretrain_compile(model)  # what training does: per block and the loss for ours, whole for GPT-2
        elif compile_model:
            model.compile(mode=compile_mode)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], device: torch.device, autocast,
                   loss_sum: torch.Tensor, grad_clip: float) -> None:
        """One optimizer step of training (training/pretrain/step.py `train_step`) over `micro_batches`.

        Nothing here waits for the device: the batches are copied asynchronously from pinned memory,
        the loss is summed on the device, and clipping never reads the norm back.
        """
        inputs = (to_model_inputs(batch, device) for batch in micro_batches)
        loss_sum += train_step(self.model, self.optimizers, inputs, accumulation=len(micro_batches),
                               grad_clip=grad_clip, loss_kwargs=self.loss_kwargs, autocast=autocast)

    def resident_bytes(self) -> int:
        """Bytes this model keeps on its device between steps: weights and optimizer state."""
        tensors = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.device.type != "cpu":
                        tensors[value.data_ptr()] = value.numel() * value.element_size()
        return sum(tensors.values())


def build_contestants(args, device: torch.device) -> tuple[Contestant, Contestant]:
    fields = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = IterativeLLMConfig.from_preset(args.preset, **fields)
    if args.seq_len > config.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than the {args.preset} preset's context "
                         f"({config.max_position_embeddings}).")
    torch.manual_seed(0)
    ours = IterativeLLMForCausalLM(config).to(device).train()
    torch.manual_seed(0)
    gpt2: GPT2LMHeadModel = gpt2_factory(None)(config).to(device).train()
    for model in (ours, gpt2):
        model.set_attn_implementation(args.attn)
    if args.activation_checkpointing:
        ours.activation_checkpointing_enable()
    precision = "bf16 autocast" if args.dtype == "bf16" else "fp32"
    ours_label = f"ours: Muon+AdamW, {precision}, {'compiled per block and loss' if args.compile else 'eager'}"
    if args.activation_checkpointing:
        ours_label += ", activation checkpointing"
    ours_label += ", plain loss from the logits" if args.plain_loss else ", chunked loss (skip_logits)"
    gpt2_label = f"gpt2: AdamW, {precision}, {'compiled model' if args.compile_baseline else 'eager'}"
    if args.grad_accum > 1:
        ours_label += f", {args.grad_accum} micro-batches per step"
        gpt2_label += f", {args.grad_accum} micro-batches per step"
    return (
        Contestant("ours", ours, build_optimizers(ours, optimizer="muon"), compile_model=args.compile,
                   label=ours_label, compile_mode=args.compile_mode,
                   loss_kwargs={} if args.plain_loss else {"skip_logits": True}),
        Contestant("gpt2", gpt2, build_optimizers(gpt2, optimizer="adamw"), compile_model=args.compile_baseline,
                   label=gpt2_label, compile_mode=args.compile_mode),
    )


def make_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, pin: bool) -> list[dict]:
    """Random-token batches (never zeros: they can run faster than real data), in host memory,
    pinned on CUDA so the copy to the device is asynchronous. Shaped as training's batches: T + 1
    tokens read, the next tokens as labels (training/pretrain/step.py `to_model_inputs` hands them over)."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        batches.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
    return batches


def autocast_for(device: torch.device, dtype: str):
    """A context factory: bf16 autocast (fp32 weights, bf16 matrix products), as training/pretrain/loop.py
    gets from accelerate, or nothing for fp32."""
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Timer:
    """Seconds of device work between start() and stop(): CUDA events, or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # earlier queued work stays out of the measurement
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1000.0
        return time.perf_counter() - self.begin


def measure_training(args, device, contestants, batches) -> dict:
    autocast = autocast_for(device, args.dtype)
    timer = Timer(device)
    tokens_per_step = args.grad_accum * args.batch_size * args.seq_len
    results = {c.name: {"tokens_per_s": [], "peak_bytes": [], "loss": None} for c in contestants}
    cursor = {c.name: 0 for c in contestants}  # both read the same batches in the same order

    def run(c: Contestant, steps: int, loss_sum: torch.Tensor) -> None:
        for _ in range(steps):
            micro = [batches[(cursor[c.name] + i) % len(batches)] for i in range(args.grad_accum)]
            c.train_step(micro, device, autocast, loss_sum, args.grad_clip)
            cursor[c.name] += args.grad_accum

    for c in contestants:
        start = time.perf_counter()
        run(c, args.warmup, torch.zeros((), device=device))
        say(args, f"warm-up {c.name}: {args.warmup} steps in {time.perf_counter() - start:.1f} s")
    for round_index in range(args.rounds):
        for c in (contestants if round_index % 2 == 0 else contestants[::-1]):
            loss_sum = torch.zeros((), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            timer.start()
            run(c, args.steps, loss_sum)
            seconds = timer.stop()
            results[c.name]["tokens_per_s"].append(args.steps * tokens_per_step / seconds)
            if device.type == "cuda":
                other = next(o for o in contestants if o is not c)
                results[c.name]["peak_bytes"].append(torch.cuda.max_memory_allocated(device) - other.resident_bytes())
            loss = loss_sum.item() / args.steps  # read after the timed region
            if not math.isfinite(loss):
                raise SystemExit(f"{c.name}: the training loss became {loss}; the timing would be meaningless.")
            results[c.name]["loss"] = loss
        say(args, "round {}: ".format(round_index + 1) + ", ".join(
            f"{c.name} {results[c.name]['tokens_per_s'][-1]:,.0f} tok/s" for c in contestants))
    return results


def measure_generation(args, device, contestants, static: bool) -> dict:
    """Greedy generation of exactly `--new-tokens` tokens for a batch of prompts, with the cache."""
    generator = torch.Generator().manual_seed(99)
    results = {}
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if static:
        # transformers compiles the decoding step by itself for a static cache on GPU (CUDA graphs,
        # "reduce-overhead"); on CPU it has to be asked, and CUDA graphs do not apply.
        compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
        if device.type != "cuda":
            compile_config._compile_all_devices = True
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    autocast = autocast_for(device, args.dtype)
    vocab = contestants[0].model.config.vocab_size
    prompts = torch.randint(2, vocab, (args.gen_batch, args.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompts)
    timer = Timer(device)
    for c in contestants:
        results[c.name] = []
    # Generation runs on an uncompiled copy of each trained model (as it would after loading the saved
    # folder): regions compiled for training would recompile at every new length, and under the static
    # cache they would sit inside transformers' own compiled decoding step (measured on an H200: 574
    # tokens/s that way against GPT-2's 2,602).
    models = {c.name: uncompiled_copy(c.model) for c in contestants}
    try:
        with torch.no_grad():
            for c in contestants:  # warm-up: first calls build caches and compile
                for _ in range(2 if static else 1):
                    with autocast():
                        models[c.name].generate(prompts, attention_mask=mask, **kwargs)
            for round_index in range(args.rounds):
                for c in (contestants if round_index % 2 == 0 else contestants[::-1]):
                    timer.start()
                    with autocast():
                        out = models[c.name].generate(prompts, attention_mask=mask, **kwargs)
                    seconds = timer.stop()
                    if out.shape[1] != args.prompt_len + args.new_tokens:
                        raise SystemExit(f"{c.name} generated {out.shape[1] - args.prompt_len} tokens, "
                                         f"not {args.new_tokens}")
                    results[c.name].append(args.gen_batch * args.new_tokens / seconds)
    finally:
        models.clear()
    return results


def uncompiled_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built anew: no compiled regions, in eval mode."""
    fresh = type(model)(model.config).to(next(model.parameters()).device)
    fresh.load_state_dict(model.state_dict())
    fresh.set_attn_implementation(model.config._attn_implementation)
    return fresh.eval()


def measure_loss_head(args, device, model) -> dict:
    """Forward + backward of the output head and loss alone, for one micro-batch of hidden states:
    the chunked `softcapped_linear_cross_entropy` (what pretraining runs) against the plain path
    (full logits, soft-cap, transformers' cross-entropy), in seconds, medians over rounds."""
    from iterative_llm.modeling_iterative_llm import softcapped_linear_cross_entropy

    config = model.config
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(args.batch_size, args.seq_len, config.hidden_size, generator=generator).to(device)
    hidden.requires_grad_(True)
    labels = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    weight = model.lm_head.weight
    cap = config.final_logit_softcapping
    autocast = autocast_for(device, args.dtype)

    def plain():
        logits = model.lm_head(hidden)
        if cap is not None:
            logits = cap * torch.tanh(logits.float() / cap)
        model.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size).backward()

    def chunked():
        softcapped_linear_cross_entropy(hidden, weight, labels, cap).backward()

    timer = Timer(device)
    times = {"chunked": [], "plain": []}
    for round_index in range(args.rounds + 1):
        for name, run in (("chunked", chunked), ("plain", plain)):
            timer.start()
            with autocast():
                run()
            seconds = timer.stop()
            if round_index > 0:  # the first round warms up
                times[name].append(seconds)
            hidden.grad = None
            weight.grad = None
    return {name: statistics.median(t) for name, t in times.items()}


def median_ratio(ours: list[float], gpt2: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, gpt2))


def say(args, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(DEFAULT_SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the training preset's micro-batch")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training preset's")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per model per round "
                        "(default: 1 on cpu, 3 on cuda)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the models; medians are reported")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per model first, where "
                        "compilation happens (default: 1, 3 with --compile or on cuda)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model and optimizer step; "
                        "adds static-cache compiled generation")
    parser.add_argument("--compile-baseline", action="store_true", help="torch.compile GPT-2 too")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
                        default="default", help="torch.compile mode for the models' forward and backward")
    parser.add_argument("--attn", choices=ATTENTION_CHOICES, default="sdpa", help="attention for both models")
    parser.add_argument("--activation-checkpointing", action="store_true", help="for our model")
    parser.add_argument("--plain-loss", action="store_true", help="our model computes its loss from the full "
                        "logits, as GPT-2 does, instead of pretraining's chunked `skip_logits` loss")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step, as "
                        "training/pretrain/setup.py accumulates up to batch_tokens (default: the training preset's)")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: as training chooses, OMP_NUM_THREADS or one per physical core)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    batch_size, seq_len, grad_accum = DEFAULT_SHAPES[args.preset]
    args.batch_size = args.batch_size or batch_size
    args.seq_len = args.seq_len or seq_len
    args.grad_accum = args.grad_accum or grad_accum
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.steps is None:
        args.steps = 3 if args.device == "cuda" else 1
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" or args.compile or args.compile_baseline else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    for name in ("steps", "rounds", "batch_size", "seq_len", "grad_accum", "gen_batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv=None) -> dict:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(choose_threads(args.threads)[0])  # as `iterative-llm train` would
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in fp32, both models alike
    contestants = build_contestants(args, device)
    ours, gpt2 = contestants
    vocab = ours.model.config.vocab_size
    batches = make_batches(max(8, args.grad_accum), args.batch_size, args.seq_len, vocab, pin=device.type == "cuda")
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = cpu_description()
    say(args, f"{args.preset} (vocab {vocab}) on {hardware}: ours {ours.model.num_parameters():,} parameters, "
              f"gpt2 {gpt2.model.num_parameters():,}")

    began = time.perf_counter()

    def phase(name: str) -> None:
        say(args, f"[{time.perf_counter() - began:5.0f} s] {name}")

    phase(f"training: {args.warmup} warm-up steps each (compilation happens here), then {args.rounds} rounds "
          f"of {args.steps} steps")
    train = measure_training(args, device, contestants, batches)
    phase("output head + loss alone, chunked vs plain")
    head = measure_loss_head(args, device, ours.model)
    generation = {}
    if not args.skip_generation:
        phase("generation with the dynamic cache")
        generation["dynamic cache"] = measure_generation(args, device, contestants, static=False)
        if args.compile:
            phase("generation with the static cache, decoding step compiled")
            generation["static cache + compile"] = measure_generation(args, device, contestants, static=True)
    phase("done")

    peak = peak_flops(device) if args.dtype == "bf16" else None
    figures = {"preset": args.preset, "vocab_size": vocab, "device": hardware, "dtype": args.dtype,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
               "rounds": args.rounds, "steps": args.steps,
               "compile": args.compile, "compile_baseline": args.compile_baseline, "models": {}}
    for c in contestants:
        tps = statistics.median(train[c.name]["tokens_per_s"])
        figures["models"][c.name] = {
            "label": c.label, "parameters": c.model.num_parameters(), "train_tokens_per_s": tps,
            "train_tokens_per_s_rounds": train[c.name]["tokens_per_s"], "final_loss": train[c.name]["loss"],
            "model_flops_per_s": flops_per_token(c.model.config, args.seq_len) * tps,
            "mfu": flops_per_token(c.model.config, args.seq_len) * tps / peak if peak else None,
            "peak_memory_gib": max(train[c.name]["peak_bytes"]) / 2**30 if train[c.name]["peak_bytes"] else None,
            "generate_tokens_per_s": {mode: statistics.median(r[c.name]) for mode, r in generation.items()},
        }
    figures["loss_head_seconds"] = head
    figures["train_ratio"] = median_ratio(train["ours"]["tokens_per_s"], train["gpt2"]["tokens_per_s"])
    figures["generate_ratio"] = {mode: median_ratio(r["ours"], r["gpt2"]) for mode, r in generation.items()}
    print_table(args, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


def print_table(args, figures: dict) -> None:
    ours, gpt2 = figures["models"]["ours"], figures["models"]["gpt2"]
    flops_ratio = (ours["model_flops_per_s"] / ours["train_tokens_per_s"]) / (
        gpt2["model_flops_per_s"] / gpt2["train_tokens_per_s"])

    def fmt(value, kind):
        if value is None:
            return "n/a"
        if kind == "flops":
            return f"{value / 1e12:.3f} T" if value >= 1e12 else f"{value / 1e9:.2f} G"
        return {"int": f"{value:,.0f}", "pct": f"{100 * value:.1f}%", "gib": f"{value:.2f}", "f": f"{value:.3f}"}[kind]

    rows = [
        ("parameters", fmt(ours["parameters"], "int"), fmt(gpt2["parameters"], "int"),
         ours["parameters"] / gpt2["parameters"]),
        ("train tokens/s", fmt(ours["train_tokens_per_s"], "int"), fmt(gpt2["train_tokens_per_s"], "int"),
         figures["train_ratio"]),
        # Ratios of FLOP/s and MFU follow the tokens/s ratio (median of per-round ratios) times the ratio
        # of FLOPs per token, so that every ratio in the table comes from the same rounds.
        ("train model FLOP/s", fmt(ours["model_flops_per_s"], "flops"), fmt(gpt2["model_flops_per_s"], "flops"),
         figures["train_ratio"] * flops_ratio),
        ("train MFU", fmt(ours["mfu"], "pct"), fmt(gpt2["mfu"], "pct"),
         figures["train_ratio"] * flops_ratio if ours["mfu"] is not None else None),
        ("train peak memory (GiB)", fmt(ours["peak_memory_gib"], "gib"), fmt(gpt2["peak_memory_gib"], "gib"),
         ours["peak_memory_gib"] / gpt2["peak_memory_gib"] if ours["peak_memory_gib"] else None),
        ("last round's mean loss", fmt(ours["final_loss"], "f"), fmt(gpt2["final_loss"], "f"), None),
    ]
    for mode, ratio in figures["generate_ratio"].items():
        rows.append((f"generate tokens/s, {mode}", fmt(ours["generate_tokens_per_s"][mode], "int"),
                     fmt(gpt2["generate_tokens_per_s"][mode], "int"), ratio))
    print()
    print(f"{figures['preset']} preset, vocab {figures['vocab_size']}, {figures['device']}, "
          f"train batch {figures['batch_size']} x {figures['seq_len']} tokens"
          + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
          + ("" if args.skip_generation else f", generation {args.gen_batch} prompts x {args.prompt_len} tokens "
             f"+ {args.new_tokens} new") + f"; medians of {figures['rounds']} interleaved rounds")
    print(f"  {ours['label']}")
    print(f"  {gpt2['label']}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'ours':>12}  {'gpt2':>12}  {'ratio ours/gpt2':>15}")
    for name, a, b, ratio in rows:
        print(f"{name:<{width}}  {a:>12}  {b:>12}  {'' if ratio is None else f'{ratio:.2f}':>15}")
    head = figures["loss_head_seconds"]
    print(f"our output head + loss, forward + backward of one micro-batch: chunked (skip_logits) "
          f"{1000 * head['chunked']:.1f} ms, plain logits {1000 * head['plain']:.1f} ms: "
          f"{head['plain'] / head['chunked']:.2f}x faster")
    print("model FLOP/s = training/eval/bits_per_byte.py flops_per_token (6 N + 12 L H D T) x tokens/s; MFU = that / the "
          "device's dense bf16 peak" + ("" if ours["mfu"] is not None else
                                        " (n/a: known only for bf16 on the GPUs in PEAK_BF16_FLOPS)"))


if __name__ == "__main__":
    main()
