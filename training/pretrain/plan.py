"""The run fitted to the machine: device, precision, micro-batch, memory, each decision with its reason.

    machine = Device.this_machine()                   what this process trains on (CUDA, MPS or CPU)
    choose_precision(machine, "auto")                 bf16 where native, fp16 + loss scaling on older
                                                      CUDA cards, fp32 on CPU and older Macs; an explicit
                                                      choice wins
    estimate_micro_batch(machine, model_config, ...)  the largest micro-batch the memory should hold
    largest_micro_batch_that_runs(try_step, start)    that estimate checked on the device, halved on
                                                      out-of-memory (accelerate's find_executable_batch_size)
    probe_tokens_per_second(model_config, ...)        a few real training steps on random tokens

Every decision is a `Decision(value, reason)`, so that the plan a run prints says what it chose and
why. Decisions take a `Device`, not torch's global state, so that tests can ask what an 8 GB card
without bf16 would get (tests/pretrain/test_budget.py and tests/test_platforms.py, and the README's table of
common cards).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from training.pretrain.budget import EVAL_SPEED_OVER_TRAINING

GIB = 1024**3
# Bytes of state per parameter while training: fp32 weights (4), their gradients (4), and the
# optimizers' state, at most AdamW's two moments (8); Muon keeps one momentum buffer (4).
STATE_BYTES_PER_PARAMETER = 16
# Activations kept for the backward pass, per token and layer, in units of the hidden size. A GPT
# block with fused attention keeps about 17 (34 bytes x hidden in 16-bit: Korthikanti et al. 2022,
# "Reducing activation recomputation", without the attention scores flash/SDPA does not store);
# ours measured 25: gpt2-small at 32 x 1024 in bf16 peaked at 15.99 GiB on an H200
# (benchmarks/results/gpu_check_h200.md), 1.9 GiB of it weights and optimizer state.
ACTIVATION_VALUES_PER_TOKEN_AND_LAYER = 25
# The share of a card's memory the plan fills: the rest is the CUDA context, the allocator's
# fragmentation and the evaluation's buffers.
USABLE_MEMORY = 0.8
# The largest micro-batch the plan tries, in sequences: beyond it a step gains nothing on any card.
MAX_MICRO_BATCH = 256


@dataclass(frozen=True)
class Device:
    """What a run trains on: kind ("cuda", "mps", "cpu"), a name, the accelerator's memory in bytes
    (None on a CPU: host memory is not what limits a CPU run), whether bf16 arithmetic is native, and
    where the memory figure came from when it is not the card's own (an Apple GPU's share of the Mac's)."""

    kind: str
    name: str
    memory_bytes: int | None
    bf16: bool
    memory_source: str = ""

    @classmethod
    def this_machine(cls) -> "Device":
        from training.machine import cpu_has_native_bf16, cpu_name, default_device, fast_matmul_dtype, mac_gpu_memory

        kind = default_device().type
        if kind == "cuda":
            props = torch.cuda.get_device_properties(0)
            # Native bf16 only (Ampere on): torch's plain is_bf16_supported() also says yes where it is
            # emulated (a T4, a V100), where fp16 with loss scaling is the fast choice.
            native = fast_matmul_dtype(torch.device("cuda")) == torch.bfloat16
            return cls("cuda", props.name, props.total_memory, native)
        if kind == "mps":
            # An Apple GPU shares the Mac's memory with the system and the apps: the plan fills what
            # Metal recommends, not the whole memory. bf16: macOS 14 or newer, and measured faster
            # than float32 (an M1 emulates it).
            memory, source = mac_gpu_memory()
            native = fast_matmul_dtype(torch.device("mps")) == torch.bfloat16
            return cls("mps", f"{cpu_name()} GPU (MPS)", memory, native, memory_source=source)
        return cls("cpu", cpu_name(), None, cpu_has_native_bf16())

    def describe(self) -> str:
        memory = f", {self.memory_bytes / GIB:.0f} GiB" if self.memory_bytes else ""
        return f"{self.name}{memory}"


@dataclass(frozen=True)
class Decision:
    value: Any
    reason: str


def choose_precision(device: Device, asked: str) -> Decision:
    """bf16 where the device computes it natively, fp16 with loss scaling on a CUDA card without bf16
    (GTX 10xx, RTX 20xx, T4, V100), fp32 on a CPU and on an Apple GPU without native bf16; `asked`
    other than "auto" is taken as it is."""
    if asked != "auto":
        if asked == "bf16" and device.kind == "cuda" and not device.bf16:
            raise ValueError(f"--precision bf16: {device.name} has no bfloat16 arithmetic. "
                             "Use --precision fp16 (loss-scaled) or auto.")
        return Decision(asked, "as asked (--precision)")
    if device.kind == "cpu":
        return Decision("fp32", "a CPU trains in float32 (autocast's casts cost more than they save there)")
    if device.bf16:
        return Decision("bf16", f"native bfloat16 on {device.name}")
    if device.kind == "cuda":
        return Decision("fp16", f"{device.name} has no bfloat16: float16 autocast with loss scaling")
    if device.kind == "mps":
        # fp16 is not planned on an Apple GPU, though accelerate allows it there and torch's
        # GradScaler runs on MPS: nobody has measured it beating float32 on a Mac for this model,
        # and it adds loss scaling and the steps it skips on overflow.
        # --precision fp16 asks for it.
        return Decision("fp32", f"{device.name} has no native bfloat16 (macOS before 14, or measured no faster "
                                "than float32, as on an M1): float32 (fp16 with loss scaling is not measured "
                                "faster on a Mac; --precision fp16 asks for it)")
    return Decision("fp32", f"{device.name} has no native bfloat16: float32")


def memory_for_training(model_config, parameters: int, micro_batch: int, seq_len: int, precision: str,
                        activation_checkpointing: bool) -> int:
    """Bytes a training step of `micro_batch` sequences needs: weights, gradients and optimizer
    state, and the activations the backward pass keeps (only each block's input under activation
    checkpointing, plus one block's worth while it is recomputed)."""
    value_bytes = 4 if precision == "fp32" else 2
    layers, hidden = model_config.num_hidden_layers, model_config.hidden_size
    tokens = micro_batch * seq_len
    per_layer = ACTIVATION_VALUES_PER_TOKEN_AND_LAYER * hidden * value_bytes * tokens
    if activation_checkpointing:
        activations = layers * hidden * value_bytes * tokens + per_layer
    else:
        activations = layers * per_layer
    # The loss is computed in chunks without the (B, T, V) logits (skip_logits): one chunk of
    # 1024 rows of fp32 logits and their gradient.
    loss_chunk = 2 * 1024 * model_config.vocab_size * 4
    return parameters * STATE_BYTES_PER_PARAMETER + activations + loss_chunk


def estimate_micro_batch(device: Device, model_config, parameters: int, *, seq_len: int, batch_tokens: int,
                         precision: str, preset_batch: int) -> tuple[Decision, Decision]:
    """(micro-batch, activation checkpointing): the largest power of two that the memory model says
    fits in USABLE_MEMORY of the device, no larger than one optimizer step's tokens; activation
    checkpointing only when even one sequence does not fit without it. On a CPU: the preset's."""
    step_sequences = max(1, batch_tokens // seq_len)
    if device.memory_bytes is None:
        return (Decision(min(preset_batch, step_sequences), "the preset's: on a CPU memory is not the limit"),
                Decision(False, "not needed on a CPU"))
    usable = device.memory_bytes * USABLE_MEMORY
    for checkpointing in (False, True):
        fits = [b for b in _powers_of_two(min(MAX_MICRO_BATCH, step_sequences))
                if memory_for_training(model_config, parameters, b, seq_len, precision, checkpointing) <= usable]
        if fits:
            need = memory_for_training(model_config, parameters, fits[-1], seq_len, precision, checkpointing)
            why = (f"about {need / GIB:.1f} GiB of {device.memory_bytes / GIB:.0f} GiB"
                   + (f" ({device.memory_source})" if device.memory_source else "")
                   + (", the most one step's tokens take" if fits[-1] == _powers_of_two(min(MAX_MICRO_BATCH, step_sequences))[-1] else ""))
            return (Decision(fits[-1], why),
                    Decision(checkpointing, "one sequence does not fit without it" if checkpointing
                             else "not needed: the micro-batch fits"))
    need = memory_for_training(model_config, parameters, 1, seq_len, precision, True)
    raise ValueError(f"the model does not fit on {device.describe()}: even one sequence with activation "
                     f"checkpointing needs about {need / GIB:.1f} GiB. Choose a smaller model (--preset auto, "
                     "--model.num_hidden_layers) or a shorter --seq_len.")


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(1, limit))) + 1)]


def largest_micro_batch_that_runs(try_step: Callable[[int], Any], start: int) -> int:
    """The first of start, start/2, start/4, ... for which `try_step(micro_batch)` runs without running
    out of memory (accelerate's find_executable_batch_size, halving so the step's tokens still divide).
    A ValueError when even one sequence does not fit."""
    from accelerate.utils import find_executable_batch_size

    tried = [start]

    def halve() -> int:
        tried.append(tried[-1] // 2)
        return tried[-1]

    @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
    def run(micro_batch: int) -> int:
        try_step(micro_batch)
        return micro_batch

    try:
        return run()
    except RuntimeError as err:
        if "No executable batch size" not in str(err):
            raise
        raise ValueError(f"out of memory at every micro-batch from {start} down to 1 sequence") from None


def probe_tokens_per_second(model_config, *, device: torch.device, precision: str, micro_batch: int, seq_len: int,
                            accumulation: int, optimizer_settings: dict, steps: int = 2,
                            activation_checkpointing: bool = False) -> float:
    """Training tokens per second of a model of `model_config` on this machine: one warm-up step, then
    `steps` timed real optimizer steps (forward, backward, Muon and AdamW) on random tokens, the
    fastest of them. The model is thrown away; what it measures is the speed of the run to plan."""
    from iterative_llm import IterativeLLMForCausalLM

    from training.pretrain.optim import build_optimizers
    from training.pretrain.step import train_step

    generator = torch.Generator().manual_seed(0)
    model = IterativeLLMForCausalLM(model_config).to(device)
    if activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizers = build_optimizers(model, **optimizer_settings)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16))
                if precision in ("bf16", "fp16") else None)

    def micro_batches():
        for _ in range(accumulation):
            ids = torch.randint(0, model_config.vocab_size, (micro_batch, seq_len + 1), generator=generator).to(device)
            yield {"input_ids": ids[:, :-1], "labels": ids[:, :-1], "shift_labels": ids[:, 1:]}

    def step() -> None:
        loss = train_step(model, optimizers, micro_batches(), accumulation=accumulation, grad_clip=1.0,
                          loss_kwargs={"skip_logits": True}, autocast=autocast)
        float(loss)  # wait for the device

    step()  # kernels chosen, buffers allocated, optimizer state made: not what a run's steps cost
    fastest = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    # The fastest step: on a machine others use, a step that waited for another process's work
    # says nothing about this run's speed (one probe here measured a 35th of the run's speed).
    return accumulation * micro_batch * seq_len / fastest


# ---------------------------------------------------------------------- the plan of one run

# What the plan assumes where it cannot measure before training, each on the safe side of what was
# measured on 2 cores of an AMD EPYC (benchmarks/results/ladder_cpu.md): the tokenizer learns from
# about 2.2M characters/s (1M assumed), a small model writes about 300 tokens/s when sampling (100
# assumed), and a checkpoint and a model folder are written at 200 MB/s or more.
TOKENIZER_CHARS_PER_SECOND = 1_000_000
TOKENIZER_SHARE_OF_BUDGET = 0.02
SAMPLED_TOKENS_PER_SECOND = 100
WRITE_BYTES_PER_SECOND = 200e6
# Tokens prepared beyond what the measured speed says training will use: a run that runs out of new
# text only repeats some.
DATA_MARGIN = 1.1
# The share of that the run prepares before its first step. On a CPU the probe's few steps can
# miss the speed by a factor of two either way on a machine that others use, and tokenising is
# 10-50 times faster than training there: the run prepares half, then extends the shards at a log
# row as its measured speed says (run_state.py `Run.extend_the_data`), a pause of seconds. An accelerator
# measures steadily, and the pause would be minutes: when it does not tokenise beside training
# (below; --tokenise_beside_training false), it prepares all of it first.
FIRST_SHARE = {"cpu": 0.5}
# Tokenising beside training (an accelerator's run, training/data/tokenise_beside.py): the run tokenises
# what its first BESIDE_FIRST_SECONDS of training read before the first step, and a thread the rest
# while it trains, committing a shard per BESIDE_SHARD_SECONDS of training for the steps to take up.
BESIDE_FIRST_SECONDS = 60.0
BESIDE_SHARD_SECONDS = 30.0
# How far ahead, in seconds of training, the shards must reach before they are extended (to twice
# that): what a run prepares beyond what it trains stays under a minute of training.
EXTEND_AHEAD = 30.0
# The CPU micro-batch when the preset leaves it to the plan: 16 x 256 tokens keeps 2-16 cores busy
# without making one micro-step slow.
CPU_MICRO_BATCH = 16


def choose_tokenise_beside(device: Device, asked) -> Decision:
    """Whether more of the data is tokenised in a thread while training runs: on an accelerator, whose
    run leaves the CPU cores idle; not on a CPU, whose cores train (a thread there slows every step,
    so the shards are extended in short pauses instead). `asked` other than "auto" is taken as it is."""
    if asked != "auto":
        return Decision(bool(asked), "as asked (--tokenise_beside_training)")
    if device.kind == "cpu":
        return Decision(False, "a CPU's cores train: more is tokenised in short pauses at log rows")
    return Decision(True, f"the CPU is idle while {device.name} trains: the card never waits for the tokenizer")


def tokenizer_chars(budget_seconds: float | None, asked: int) -> int:
    """Characters the tokenizer learns from: `asked`, but under a budget no more than it can learn
    in TOKENIZER_SHARE_OF_BUDGET of it (a 10-minute budget: 12M characters, plenty for a 4096-token BPE)."""
    if budget_seconds is None:
        return asked
    return int(min(asked, TOKENIZER_SHARE_OF_BUDGET * budget_seconds * TOKENIZER_CHARS_PER_SECOND))


def measure_encode_rate(tokenizer, documents, chars: int = 1_000_000) -> float:
    """Tokens per second the tokenizer encodes the first `chars` characters of `documents` at: the
    speed the shards will be written at (the text is read before the clock starts)."""
    from iterative_llm.tokenization import plain_text_encoder

    texts, seen = [], 0
    for text in documents:
        texts.append(text[: chars - seen])
        seen += len(texts[-1])
        if seen >= chars:
            break
    encoder = plain_text_encoder(tokenizer)
    encoder.encode_batch_fast(texts[:1], add_special_tokens=False)  # its thread pool starts here, untimed
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in encoder.encode_batch_fast(texts, add_special_tokens=False))
    return tokens / max(time.perf_counter() - start, 1e-6)


def end_reserve(config, parameters: int, tokens_per_second: float, training_seconds: float) -> dict:
    """Seconds to keep for the end of the run, as TimeBudget.end_parts: the final evaluation (the
    validation split, or `eval_tokens` of it), and the rest: samples, the last checkpoint, the model
    folder and a safety margin of 1% of the training time (at least 3 s) for what no estimate sees."""
    eval_tokens = config.eval_tokens or config.val_fraction * tokens_per_second * training_seconds
    evaluation = eval_tokens / (EVAL_SPEED_OVER_TRAINING * tokens_per_second)
    samples = len(config.sample_prompts) * config.sample_tokens / SAMPLED_TOKENS_PER_SECOND
    writes = parameters * (STATE_BYTES_PER_PARAMETER + 4) / WRITE_BYTES_PER_SECOND + 1.0
    return {"evaluation": evaluation, "rest": samples + writes + max(3.0, 0.01 * training_seconds)}


@dataclass
class Plan:
    """What a run was fitted to: its settings with nothing left on "auto", and why."""

    config: Any  # TrainConfig
    precision: Decision
    micro_batch: Decision
    activation_checkpointing: Decision
    tokens_per_second: float | None = None
    training_seconds: float | None = None
    tokens_to_prepare: int | None = None  # before the first step; per source, boundary tokens and validation included
    tokens_planned: int | None = None  # the same, for the whole run at the probed speed
    tokenise_beside: Decision | None = None  # whether a thread tokenises the rest while training runs
    ladder: list = None  # the ladder sizes probed by --preset auto
    model: str = ""
    depth: int | None = None  # the ladder depth --preset auto chose
    end_parts: dict = None  # TimeBudget.end_parts as planned

    @property
    def tokenises_beside(self) -> bool:
        """Whether a thread tokenises the rest of the data while training runs: the one answer every
        part of a run asks (the main process has the thread; the others take up its shards)."""
        return self.tokenise_beside is not None and bool(self.tokenise_beside.value)

    def lines(self, budget, device: Device, threads: int) -> list[str]:
        from training.pretrain.budget import format_seconds

        c = self.config
        if device.kind == "cpu":
            from training.machine import cpu_description

            where = cpu_description(threads)
        else:
            where = device.describe()
        rows = [("device", where),
                ("precision", f"{self.precision.value}: {self.precision.reason}"),
                ("model", self.model),
                ("micro-batch", f"{self.micro_batch.value} x {c.seq_len} tokens ({self.micro_batch.reason}); "
                                f"{c.batch_tokens:,} tokens a step by accumulation"),
                ("checkpointing", f"{'on' if self.activation_checkpointing.value else 'off'}: "
                                  f"{self.activation_checkpointing.reason}")]
        if self.tokens_per_second:
            rows.append(("speed", f"{self.tokens_per_second:,.0f} training tokens/s (probed)"))
        beside = self.tokenises_beside
        if self.tokens_to_prepare and beside and (self.tokens_planned or 0) > self.tokens_to_prepare:
            rows.append(("data", f"tokenise {self.tokens_to_prepare:,} tokens of {c.data} now (the first "
                                 f"{BESIDE_FIRST_SECONDS:.0f} s of training), the rest of {self.tokens_planned:,} "
                                 f"({DATA_MARGIN}x what the training time takes at that speed) beside training: "
                                 f"{self.tokenise_beside.reason}"))
        elif self.tokens_to_prepare and beside:
            rows.append(("data", f"tokenise up to {self.tokens_to_prepare:,} tokens of {c.data} now: {DATA_MARGIN}x "
                                 f"what the training time takes at that speed (under {BESIDE_FIRST_SECONDS:.0f} s of "
                                 "training); more beside training as the measured speed asks"))
        elif self.tokens_to_prepare:
            rows.append(("data", f"tokenise up to {self.tokens_to_prepare:,} tokens of {c.data} now: "
                                 f"{FIRST_SHARE.get(device.kind, 1.0):.0%} of {DATA_MARGIN}x what the training time "
                                 "takes at that speed; more as the measured speed asks"))
        if budget.seconds is not None and self.training_seconds is not None:
            rows.append(("train", f"{format_seconds(self.training_seconds)}, the cool-down over its last "
                                  f"{c.cooldown_fraction:.0%}; re-planned at every step from the clock"))
            rows.append(("end", f"final evaluation, samples, checkpoint and export: "
                                f"{format_seconds(sum(self.end_parts.values()))} kept"))
        width = max(len(name) for name, _ in rows)
        return [f"  {name.ljust(width)}  {text}" for name, text in rows]


def fit_run(config, *, device: Device, torch_device: torch.device, budget, world_size: int,
            encode_rate: float | None, say, trained_before: int = 0) -> Plan:
    """The run's plan: precision, model size (--preset auto), micro-batch, the speed probe, and under
    a time budget the training time and the tokens to prepare (beyond the `trained_before` tokens
    a resumed run read already). `config` values other than "auto" are the user's (or the
    preset's) and are kept as they are."""
    timed = budget.seconds is not None
    if config.model_preset == "auto" and not timed:
        raise ValueError("--preset auto chooses the model size for the time the run has: give it a --time_budget "
                         "(2h, 90m, ...).")
    fitting = _Fitting(config, device, torch_device, budget, world_size, encode_rate)
    size = fitting.auto_size(say) if config.model_preset == "auto" else fitting.fixed_size(timed)
    plan = fitting.plan(size)
    if timed:
        _size_the_data(plan, fitting, size, trained_before, say)
    return plan


@dataclass
class _Size:
    """The model size a plan fits: its fields and learning rates over the preset's, and what was decided for it."""

    preset: str
    fields: dict
    lrs: dict
    batch: Decision
    checkpointing: Decision
    parameters: int
    tokens_per_second: float | None
    model: str  # how the plan names it
    depth: int | None = None
    ladder: list | None = None


class _Fitting:
    """What fitting a run to the machine needs at hand: the settings, the device, the budget and the
    precision and the tokenise-beside choice made first; each step of `fit_run` is a method."""

    def __init__(self, config, device: Device, torch_device, budget, world_size: int, encode_rate: float | None):
        self.config, self.device, self.torch_device, self.budget = config, device, torch_device, budget
        self.world_size, self.encode_rate = world_size, encode_rate
        self.precision = choose_precision(device, config.precision)
        # The thread's share is planned from the budget's speed probe: without one, all is tokenised first.
        self.beside = (choose_tokenise_beside(device, config.tokenise_beside_training) if budget.seconds is not None
                       else Decision(False, "no --time_budget: the run tokenises all it reads before the first step"))

    def model_of(self, fields: dict):
        from iterative_llm import IterativeLLMConfig

        from training.pretrain import ladder

        preset = ladder.BASE_PRESET if self.config.model_preset == "auto" else self.config.model_preset
        return IterativeLLMConfig.from_preset(preset, **fields)

    def fitted(self, fields: dict) -> tuple[Decision, Decision, int]:
        """(micro-batch, activation checkpointing, parameters) of a model of these fields."""
        from training.pretrain import ladder

        config = self.config
        model_config = self.model_of(fields)
        params = ladder.parameters(fields) if config.model_preset == "auto" else ladder.parameters_of(model_config)
        if config.batch_size == "auto":
            batch, checkpointing = estimate_micro_batch(self.device, model_config, params, seq_len=config.seq_len,
                                                        batch_tokens=config.batch_tokens,
                                                        precision=self.precision.value, preset_batch=CPU_MICRO_BATCH)
        else:
            batch = Decision(config.batch_size, "as set: --batch_size or the preset's")
            checkpointing = Decision(False, "not needed")
        if config.activation_checkpointing != "auto":
            checkpointing = Decision(bool(config.activation_checkpointing), "as asked (--activation_checkpointing)")
        return batch, checkpointing, params

    def probe(self, fields: dict, lrs: dict, batch: Decision, checkpointing: Decision) -> tuple[float, Decision]:
        """Tokens/s of this size, all processes together; on an accelerator the micro-batch that ran."""
        from training.pretrain.step import micro_steps

        config, rates = self.config, {}

        def try_step(micro_batch: int) -> None:
            accumulation = micro_steps(config.batch_tokens, micro_batch, config.seq_len, self.world_size)
            settings = dict(optimizer=config.optimizer, lr_matrix=lrs.get("lr_matrix", config.lr_matrix),
                            lr_embed=lrs.get("lr_embed", config.lr_embed), lr_head=lrs.get("lr_head", config.lr_head),
                            lr_scalar=config.lr_scalar, adamw_lr=config.adamw_lr, weight_decay=config.weight_decay)
            rates[micro_batch] = self.world_size * probe_tokens_per_second(
                self.model_of(fields), device=self.torch_device, precision=self.precision.value,
                micro_batch=micro_batch, seq_len=config.seq_len, accumulation=min(accumulation, 2),
                optimizer_settings=settings, steps=3, activation_checkpointing=checkpointing.value)

        if self.device.kind == "cpu" or config.batch_size != "auto":
            try_step(batch.value)
            return rates[batch.value], batch
        ran = largest_micro_batch_that_runs(try_step, batch.value)
        if ran != batch.value:
            batch = Decision(ran, f"{batch.value} ran out of memory on the device; halved until it ran")
        return rates[ran], batch

    def training_seconds(self, rate: float, params: int) -> float:
        """The training time T left once the data is tokenised and the end is kept for: tokenising
        the DATA_MARGIN * rate * T tokens that T trains on takes that over the encoding rate, so
        T = (left - reserve) / (1 + DATA_MARGIN * rate / encode_rate). Tokenised beside training,
        only the first BESIDE_FIRST_SECONDS' worth is tokenised first: T = left - reserve - that's time."""
        encode_rate = self.encode_rate
        left = self.budget.left()
        reserve = sum(end_reserve(self.config, params, rate, left).values())
        if self.beside.value and encode_rate:
            first = DATA_MARGIN * rate * BESIDE_FIRST_SECONDS
            seconds = max(0.0, left - reserve - first / encode_rate)
            if DATA_MARGIN * rate * seconds > first:  # else the run is short enough to tokenise all first
                return seconds
        return max(0.0, left - reserve) / (1 + (DATA_MARGIN * rate / encode_rate if encode_rate else 0.0))

    def fixed_size(self, timed: bool) -> _Size:
        """The preset's size (or the user's `model:` fields); probed when the budget or the micro-batch asks."""
        config = self.config
        fields = dict(config.model)
        batch, checkpointing, params = self.fitted(fields)
        rate = None
        if timed or (config.batch_size == "auto" and self.device.kind != "cpu"):
            rate, batch = self.probe(fields, {}, batch, checkpointing)
        return _Size(config.model_preset, fields, {}, batch, checkpointing, params, rate,
                     model=f"{config.model_preset} preset, {params:,} parameters")

    def auto_size(self, say) -> _Size:
        """--preset auto: the ladder's climb (training/pretrain/ladder.py), each size probed on this machine."""
        from iterative_llm import IterativeLLMConfig

        from training.pretrain import ladder
        from training.eval.bits_per_byte import flops_per_token

        config, seq_len = self.config, self.config.seq_len
        vocab = config.model.get("vocab_size") or IterativeLLMConfig.from_preset(ladder.BASE_PRESET).vocab_size
        say("--preset auto: probing the speed of ladder sizes on this machine ...")

        def ladder_fields(depth: int) -> dict:
            return ladder.ladder_config(depth, vocab_size=vocab, seq_len=seq_len)

        def probe_depth(depth: int) -> tuple[float, tuple[Decision, Decision, int]]:
            sized = {**ladder_fields(depth), **config.model}
            batch, checkpointing, params = self.fitted(sized)
            r, batch = self.probe(sized, ladder.learning_rates(depth), batch, checkpointing)
            say(f"  depth {depth}: {ladder.WIDTH_PER_DEPTH * depth} wide, {params:,} parameters, {r:,.0f} tokens/s")
            return r, (batch, checkpointing, params)

        chosen, rows = ladder.choose_depth(
            probe_depth, lambda rate: self.training_seconds(rate, 0), model_fields=ladder_fields,
            flops=lambda depth: flops_per_token(self.model_of({**ladder_fields(depth), **config.model}), seq_len))
        batch, checkpointing, params = chosen.fitted
        model = (f"auto: depth {chosen.depth} ({chosen.depth} x {ladder.WIDTH_PER_DEPTH * chosen.depth}, "
                 f"{params:,} parameters): {chosen.tokens_per_parameter:.1f} tokens per parameter in the time, "
                 f"the largest of {len(rows)} probed that reaches {ladder.TOKENS_PER_PARAMETER:g}")
        return _Size(ladder.BASE_PRESET, {**ladder_fields(chosen.depth), **config.model},
                     ladder.learning_rates(chosen.depth), batch, checkpointing, params, chosen.tokens_per_second,
                     model=model, depth=chosen.depth, ladder=rows)

    def plan(self, size: _Size) -> Plan:
        """The plan of this size, its settings resolved (nothing left on "auto")."""
        import dataclasses

        resolved = dataclasses.replace(
            self.config, model_preset=size.preset, model=size.fields, **size.lrs, precision=self.precision.value,
            batch_size=size.batch.value, activation_checkpointing=size.checkpointing.value)
        return Plan(resolved, self.precision, size.batch, size.checkpointing, tokens_per_second=size.tokens_per_second,
                    ladder=size.ladder, model=size.model, depth=size.depth, tokenise_beside=self.beside)


def _size_the_data(plan: Plan, fitting: _Fitting, size: _Size, trained_before: int, say) -> None:
    """Under a time budget: the training time, the end's reserve, and the tokens to tokenise before the
    first step and in all (beyond the `trained_before` tokens a resumed run read already)."""
    from training.pretrain.budget import format_seconds
    from training.pretrain.config import source_share_trained, token_caps

    resolved, budget, rate, step_tokens = plan.config, fitting.budget, size.tokens_per_second, plan.config.batch_tokens
    plan.training_seconds = fitting.training_seconds(rate, size.parameters)
    plan.end_parts = end_reserve(resolved, size.parameters, rate, plan.training_seconds)
    tokens = trained_before + DATA_MARGIN * rate * plan.training_seconds
    limits = [tokens] + token_caps(resolved, step_tokens)
    share_kept = source_share_trained(resolved)
    plan.tokens_planned = max(step_tokens, int(min(limits) / share_kept))
    if fitting.beside.value:
        first = trained_before + DATA_MARGIN * rate * BESIDE_FIRST_SECONDS
        plan.tokens_to_prepare = max(step_tokens, int(min([first] + limits) / share_kept))
    else:
        first_share = FIRST_SHARE.get(fitting.device.kind, 1.0)
        plan.tokens_to_prepare = max(step_tokens, int(min(limits) * first_share / share_kept))
    if plan.training_seconds < 0.2 * budget.seconds:
        say(f"warning: the budget leaves {format_seconds(plan.training_seconds)} of training after "
            f"preparing the data and keeping time for the end; a longer --time_budget trains a better model")
