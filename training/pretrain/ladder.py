"""`--preset auto`: the model size that makes the best model in the time the run has, on this machine.

    ladder_config(depth)       one dial: depth d gives d layers of width 32 d (d heads of 32), as
                               nanochat's depth sets its whole model; learning rates follow the width
    choose_depth(probe, ...)   the largest depth whose tokens in the training time reach the tokens
                               that size wants: TOKENS_PER_PARAMETER x its parameters; the chosen
                               size comes back with what its probe decided

Why a rule in tokens per parameter: at a fixed compute budget a model that is too large sees too
few tokens to learn what its size could hold, one too small stops improving early (Hoffmann et al.
2022, "Chinchilla", about 20 tokens per parameter for large models). On a small machine the tokens
a size gets in the time are measured, not computed from FLOPs: a short throughput probe of each
candidate on this machine (training/pretrain/plan.py `probe_tokens_per_second`). The ratio under our recipe
(Muon, a 4096-token BPE, 256-token windows) is checked by benchmarks/ladder.py, which trains every
depth under the same budget; its results and command are in benchmarks/results/ladder_cpu.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from iterative_llm import IterativeLLMConfig

# The size preset the ladder's fields override (its vocabulary, norms, MLP and the rest).
BASE_PRESET = "tiny"
# Width per unit of depth, and the width of a head: depth 4 is the tiny preset's 4 x 128, 4 heads.
WIDTH_PER_DEPTH = 32
HEAD_DIM = 32
DEPTHS = tuple(range(1, 25))
# Tokens a size wants per parameter (embedding and head included) under our recipe. Set before it
# was measured; benchmarks/ladder.py on 2 CPU cores (benchmarks/results/ladder_cpu.md) put the best
# size at 6.1-6.4 tokens per parameter under a 4-minute budget (the next larger, at 2.2, worse) and
# at 3.4 under 15 minutes (the next smaller, at 8.3, 0.008 bits per byte worse); with the probe's
# speeds, 4 chose the best size at both.
TOKENS_PER_PARAMETER = 4.0
# A size whose speed, estimated from the last size probed by their FLOPs per token, would see fewer
# than this share of the tokens the rule asks is not probed: the climb stops before it. On 2 CPU
# cores FLOPs put each next size 1.8-2.7x slower (depths 1-4), and the probes, run alone, measured
# 1.5-2.8x (benchmarks/results/ladder_cpu.md): within a factor of 1.4, so such a size fails the rule
# anyway, and its probe, the longest of the climb, would only take time from training.
SKIP_BELOW_SHARE = 0.5
# The AdamW learning rates of the recipe are set for width 768 and scale as (768 / width) ** 0.5
# (nanochat's rule, and the tiny preset's rates at width 128); Muon's is the tiny preset's.
REFERENCE_WIDTH = 768
LR_EMBED, LR_HEAD, LR_MATRIX = 0.3, 0.004, 0.04


def ladder_config(depth: int, *, vocab_size: int = 4096, seq_len: int = 256) -> dict:
    """The model fields of ladder depth `depth` (the `model:` overrides of the tiny size preset)."""
    if depth < 1:
        raise ValueError(f"a ladder depth is at least 1, got {depth}")
    width = WIDTH_PER_DEPTH * depth
    heads = width // HEAD_DIM
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len)


def learning_rates(depth: int) -> dict:
    """The recipe's learning rates at this depth's width."""
    scale = (REFERENCE_WIDTH / (WIDTH_PER_DEPTH * depth)) ** 0.5
    return {"lr_embed": round(LR_EMBED * scale, 4), "lr_head": round(LR_HEAD * scale, 5), "lr_matrix": LR_MATRIX}


def parameters(model_fields: dict) -> int:
    """Parameters of a ladder model of these fields (the tiny size preset's, overridden)."""
    return parameters_of(IterativeLLMConfig.from_preset(BASE_PRESET, **model_fields))


def parameters_of(model_config: IterativeLLMConfig) -> int:
    """Parameters of a model of this config, counted on the meta device (nothing allocated)."""
    from iterative_llm import IterativeLLMForCausalLM

    with torch.device("meta"):
        return IterativeLLMForCausalLM(model_config).num_parameters()


@dataclass(frozen=True)
class Candidate:
    depth: int
    parameters: int
    tokens_per_second: float
    tokens: float  # what it would train in the time the plan gives training
    # What the probe decided for this size besides its speed (the plan's: the micro-batch that ran on
    # the device, ...), handed back with the choice; not part of the record.
    fitted: Any = field(default=None, compare=False, repr=False)

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.parameters

    def record(self) -> dict:
        """The figures summary.json keeps of this size."""
        return {"depth": self.depth, "parameters": self.parameters, "tokens_per_second": self.tokens_per_second,
                "tokens": self.tokens}


def choose_depth(probe: Callable[[int], tuple[float, Any]], training_seconds: Callable[[float], float], *,
                 model_fields: Callable[[int], dict] = ladder_config, depths=DEPTHS,
                 tokens_per_parameter: float = TOKENS_PER_PARAMETER,
                 flops: Callable[[int], float] | None = None) -> tuple[Candidate, list[Candidate]]:
    """(the chosen size, every size probed): climbs the ladder from the smallest depth, probing each
    (`probe(depth)`: its training tokens per second, and whatever else the probe decided, which the
    candidate carries as `fitted`), and stops at the first size that would see fewer than
    `tokens_per_parameter` tokens per parameter in `training_seconds(tokens_per_second)` (the time the
    plan leaves for training at that speed). The choice is the last size that reached the rule,
    or the smallest when none did. Larger sizes are slower and larger, so none past the stop could
    reach it either. With `flops(depth)` (training FLOPs per token), a size that the last probed
    size's speed, scaled by FLOPs, puts under SKIP_BELOW_SHARE of the rule is not probed."""
    probed: list[Candidate] = []
    for depth in depths:
        size = parameters(model_fields(depth))
        if probed and flops is not None:
            last = probed[-1]
            estimate = last.tokens_per_second * flops(last.depth) / flops(depth)
            if estimate * training_seconds(estimate) < SKIP_BELOW_SHARE * tokens_per_parameter * size:
                break
        rate, fitted = probe(depth)
        candidate = Candidate(depth, size, rate, rate * training_seconds(rate), fitted)
        probed.append(candidate)
        if candidate.tokens_per_parameter < tokens_per_parameter:
            break
    reached = [c for c in probed if c.tokens_per_parameter >= tokens_per_parameter]
    return (reached[-1] if reached else probed[0]), probed
