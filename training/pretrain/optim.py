"""Optimisers and learning-rate schedules for pretraining.

What is here, top to bottom:

- `build_optimizers`: splits a model's parameters by module type into Muon (hidden matrices)
  and AdamW (embedding, output head, 1-D params), or one AdamW for everything (the baseline).
  Muon is momentum SGD whose update for each weight matrix is orthogonalised by a few
  Newton-Schulz iterations (Keller Jordan, "Muon: An optimizer for hidden layers in neural
  networks", 2024, https://kellerjordan.github.io/posts/muon/); it set most of the
  modded-nanogpt speedrun records and is nanochat's optimiser for the transformer matrices.
  We use torch's, `torch.optim.Muon`: our own, batched by shape, was no better side by side
  (benchmarks/results/muon_vs_torch.md), wherever its bfloat16 Newton-Schulz is fast; on a device
  without native bfloat16 matrix products (an AVX2 CPU) `Float32Muon` does the same in float32.
- `lr_multiplier` / `apply_lr`: warmup by steps, then warmup-stable-decay (the speedrun's
  trapezoid) or cosine over the fraction of the budget done.
- `muon_momentum`: modded-nanogpt's momentum warmup for Muon.
- `optimizer_state_dicts` / `load_optimizer_state_dicts`: checkpoint the list of optimisers.

The default learning rates come from nanochat and modded-nanogpt (cited where they are set);
they are starting points to be confirmed by a benchmark of our own, not tuned here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.machine import fast_matmul_dtype

__all__ = [
    "build_optimizers",
    "Float32Muon",
    "lr_multiplier",
    "apply_lr",
    "muon_momentum",
    "apply_muon_momentum",
    "optimizer_state_dicts",
    "load_optimizer_state_dicts",
]

# ----------------------------------------------------------------------------------------------
# Parameter groups

OPTIMIZER_CHOICES = ("muon", "adamw")


def build_optimizers(
    model: nn.Module,
    *,
    optimizer: str = "muon",
    lr_matrix: float = 0.02,
    lr_embed: float = 0.3,
    lr_head: float = 0.004,
    lr_scalar: float = 0.04,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    adam_eps: float = 1e-10,
    weight_decay: float = 0.0,
    adamw_lr: float = 6e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_weight_decay: float = 0.1,
    fused: bool | None = None,
    newton_schulz_dtype: torch.dtype | None = None,
) -> list[torch.optim.Optimizer]:
    """Build the optimisers for `model`; step all of them after each backward pass.

    optimizer="muon" (the speedrun recipe, as in modded-nanogpt and nanochat) returns
    [torch.optim.Muon, AdamW]:
      - Muon ("matrix" group, `lr_matrix`): the weight of every nn.Linear except the output head,
        that is the attention and MLP projections of the transformer blocks. The Muon post applies
        Muon to hidden-layer matrices only (an embedding is a lookup table, not a linear map
        between hidden states) and reports the head trains better with AdamW.
      - AdamW, one group each:
        "embed" (`lr_embed`): the input embedding and any other nn.Embedding;
        "head" (`lr_head`): the output head, when it is not tied to the input embedding;
        "scalars" (`lr_scalar`): every 1-D or 0-D parameter (norm weights, biases, gates).
      When the head is tied to the embedding the shared tensor is one parameter: it goes once,
      into the "embed" group, at `lr_head` (see the comment below).
      `weight_decay` is applied to the Muon matrices only.

    optimizer="adamw" (the GPT-2 / nanoGPT baseline) returns [AdamW] with two groups at
    `adamw_lr`: "decay" (every parameter with 2 or more dims, `adamw_weight_decay`) and
    "no_decay" (1-D and 0-D), the nanoGPT convention.

    Parameters are sorted by module type, never by name, so any Hugging Face model that
    implements get_input_embeddings()/get_output_embeddings() works. Frozen parameters
    (requires_grad=False) are left out. Every group carries "initial_lr" for `apply_lr` and a
    "name" for logging and for checking a checkpoint against the setting that made it.

    Defaults, to be confirmed by our own benchmark:
      lr_matrix 0.02    nanochat's matrix_lr (modded-nanogpt's shorter runs use 0.05), with
                        momentum 0.95 and Nesterov (both nanochat's); the update of a (rows, cols)
                        matrix is scaled by sqrt(max(1, rows / cols)) (Keller's "original").
      lr_embed 0.3      nanochat's embedding_lr for an untied embedding.
      lr_head 0.004     nanochat's unembedding_lr (modded-nanogpt: 0.008).
      lr_scalar 0.04    modded-nanogpt's Adam lr for its scalar parameters.
      nanochat multiplies its AdamW lrs by (d_model / 768) ** -0.5; we do not, since our
      models are near d_model 768, so pass scaled values for much smaller or larger widths.
      adam_betas (0.8, 0.95), adam_eps 1e-10: the Adam settings of modded-nanogpt and
      nanochat, tuned there together with the lrs above (beta1 0.8 rather than 0.9).
      adamw_lr 6e-4, adamw_betas (0.9, 0.95), adamw_weight_decay 0.1: GPT-3 Small's values as
      used by nanoGPT for GPT-2 124M, so the baseline is the well-tuned one, not a strawman.
      fused None: use the fused AdamW kernel when every parameter is on CUDA.
      newton_schulz_dtype None: the precision the matrices' device multiplies fast in
      (training/machine.py): bfloat16 gives torch.optim.Muon (its Newton-Schulz is bf16),
      float32 gives `Float32Muon`, the same update orthogonalised in float32.
    """
    if optimizer not in OPTIMIZER_CHOICES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZER_CHOICES}")
    trainable = [p for p in model.parameters() if p.requires_grad]  # shared tensors listed once
    if not trainable:
        raise ValueError("model has no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda for p in trainable)

    if optimizer == "adamw":
        groups = {"decay": [], "no_decay": []}
        for p in trainable:
            groups["decay" if p.ndim >= 2 else "no_decay"].append(p)
        param_groups = [
            dict(name="decay", params=groups["decay"], weight_decay=adamw_weight_decay),
            dict(name="no_decay", params=groups["no_decay"], weight_decay=0.0),
        ]
        param_groups = [g for g in param_groups if g["params"]]
        adamw = torch.optim.AdamW(param_groups, lr=adamw_lr, betas=adamw_betas, fused=fused)
        optimizers: list[torch.optim.Optimizer] = [adamw]
    else:
        groups = _muon_split(model, trainable)
        embed_group = dict(name="embed", params=groups["embed"], lr=lr_embed)
        if groups["tied"]:
            # A tied matrix also produces the logits, and the head is where a large Adam lr
            # blows up (nanochat's head lr is 75x below its embedding lr); modded-nanogpt, while
            # its embedding and head were tied (Oct 2024 records), kept the shared matrix at a
            # small AdamW lr. So the shared tensor takes the head's lr.
            embed_group["lr"] = lr_head
        adam_groups = [
            embed_group,
            dict(name="head", params=groups["head"], lr=lr_head),
            dict(name="scalars", params=groups["scalars"], lr=lr_scalar),
        ]
        adam_groups = [g for g in adam_groups if g["params"]]
        optimizers = []
        if groups["matrix"]:
            # Every setting given: torch's defaults are lr 1e-3 and weight decay 0.1. Its "original"
            # lr adjustment is Keller's sqrt(max(1, rows / cols)): an orthogonalised matrix has
            # entries of RMS 1 / sqrt(max(rows, cols)), and the factor brings that to
            # 1 / sqrt(cols) = 1 / sqrt(fan_in) for tall and wide matrices alike (nn.Linear
            # stores (out, in)), so one lr fits square and rectangular projections.
            # Under data parallelism the gradients are averaged before step(), so every rank
            # computes the same update; nanochat and modded-nanogpt shard the Newton-Schulz work
            # across ranks instead, which saves time at 8 GPUs, not at one.
            if newton_schulz_dtype is None:
                newton_schulz_dtype = fast_matmul_dtype(groups["matrix"][0].device)
            muon_class = {torch.bfloat16: torch.optim.Muon, torch.float32: Float32Muon}[newton_schulz_dtype]
            optimizers.append(
                muon_class(
                    [dict(name="matrix", params=groups["matrix"])], lr=lr_matrix, momentum=0.95,
                    nesterov=True, weight_decay=weight_decay, adjust_lr_fn="original",
                )
            )
        if adam_groups:
            optimizers.append(
                torch.optim.AdamW(
                    adam_groups, betas=adam_betas, eps=adam_eps, weight_decay=0.0, fused=fused
                )
            )

    _check_each_param_once(model, trainable, optimizers)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _muon_split(model: nn.Module, trainable: list[torch.Tensor]) -> dict[str, Any]:
    """Sort the trainable parameters of `model` into matrix / embed / head / scalars."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    kind: dict[int, str] = {}  # id(param) -> group name

    def claim(p: torch.Tensor, group: str) -> None:
        # setdefault: the first claim wins, so a tied tensor met again as the head's weight
        # stays in "embed"; the claims are ordered so that this is the intended owner.
        if p.requires_grad:
            kind.setdefault(id(p), group)

    claim(embed.weight, "embed")
    if head is not None:
        claim(head.weight, "head")  # no-op when tied
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            claim(module.weight, "embed")  # e.g. value embeddings: sparse rows, like wte
        elif isinstance(module, nn.Linear) and module is not head:
            claim(module.weight, "matrix")
    for name, p in model.named_parameters():
        if id(p) in kind or not p.requires_grad:
            continue
        if p.ndim < 2:
            kind[id(p)] = "scalars"
        else:
            raise ValueError(
                f"cannot place parameter {name!r} of shape {tuple(p.shape)}: it is not the "
                "weight of an nn.Linear or nn.Embedding and not 1-D, so neither Muon nor the "
                "AdamW groups are known to suit it. Extend training/pretrain/optim.py:_muon_split."
            )
    split: dict[str, Any] = {"matrix": [], "embed": [], "head": [], "scalars": [], "tied": tied}
    for p in trainable:  # model order, so the groups are deterministic across runs
        split[kind[id(p)]].append(p)
    return split


def _check_each_param_once(
    model: nn.Module, trainable: list[torch.Tensor], optimizers: list[torch.optim.Optimizer]
) -> None:
    seen: dict[int, str] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} is in two groups: "
                        f"{seen[id(p)]!r} and {group['name']!r}"
                    )
                seen[id(p)] = group["name"]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing or len(seen) != len(trainable):
        raise RuntimeError(f"parameters left out of every optimizer group: {missing}")


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 instead of bfloat16.

    torch's Muon casts every update to bfloat16 before orthogonalising it, the right choice where
    bfloat16 matrix products are native (GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX). An AVX2
    CPU emulates them: 11 to 20 times slower than float32, so on such a machine torch's Muon step was
    a quarter of the tiny preset's training step (issue 18). This class takes the same settings, keeps
    the same state (a "momentum_buffer" per matrix, so checkpoints move between the two), and applies
    the same update, in float32: `tests/pretrain/test_optim.py` checks that the two agree within bf16 rounding.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                # torch's momentum: an average of the gradients (lerp), Nesterov looking one step ahead.
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, at the unscaled lr
                p.add_(update.to(p.dtype), alpha=-lr * _muon_lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Orthogonalise `matrix` (rows, cols) by `steps` quintic Newton-Schulz iterations in `dtype`.

    Keller Jordan's iteration (the Muon post): scale to spectral norm <= 1 (the Frobenius norm bounds
    it), then X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation so that A is the
    smaller Gram matrix. The coefficients push singular values towards 1 fast without converging
    exactly (they end between about 0.7 and 1.2), which the post finds does not hurt training.
    """
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    x = x / x.norm().clamp(min=eps)
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's lr adjustment for a (rows, cols) matrix; see build_optimizers for "original"."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot's "Muon is Scalable for LLM Training" (2025)
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")


# ----------------------------------------------------------------------------------------------
# Schedules

SCHEDULE_SHAPES = ("wsd", "cosine")


def lr_multiplier(
    step: int,
    warmup_steps: int,
    progress: float,
    *,
    cooldown_fraction: float = 0.4,
    final_ratio: float = 0.0,
    shape: str = "wsd",
) -> float:
    """The factor that multiplies each group's initial_lr at optimiser step `step` (from 0), when
    `progress` of the budget is done (0 -> 1: steps, tokens or seconds, whichever ends the run).

    The warmup counts steps: step s < `warmup_steps` gets (s + 1) / warmup_steps (the first step
    1/warmup_steps, not 0, which would waste a step). After it, the shape follows `progress`, so a
    token or wall-clock budget still ends with its cool-down; the warmup steps are part of the
    budget, and the shape does not restart after them. progress 1 gives exactly `final_ratio`
    (unless "wsd" has no cool-down at all, cooldown_fraction 0, which stays at 1).

    "wsd" (warmup-stable-decay): constant 1, then a linear cool-down over the last
    `cooldown_fraction` of the budget to `final_ratio`. This is modded-nanogpt's trapezoid and
    nanochat's schedule (both cool down over the last 40% or so); Hägele et al. 2024, "Scaling
    Laws and Compute-Optimal Training Beyond Fixed Training Durations", find it matches cosine
    and lets a run be extended from any point of the stable phase.
    "cosine": half a cosine over the budget, from 1 to `final_ratio` (the GPT-3 / nanoGPT
    baseline, which uses final_ratio 0.1).
    """
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"unknown schedule shape {shape!r}; choose one of {SCHEDULE_SHAPES}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if not 0.0 <= cooldown_fraction <= 1.0:
        raise ValueError(f"cooldown_fraction must be in [0, 1], got {cooldown_fraction}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "wsd":
        if cooldown_fraction == 0.0 or progress < 1.0 - cooldown_fraction:
            return 1.0
        left = (1.0 - progress) / cooldown_fraction  # 1 at the start of the cool-down, 0 at the end
        return final_ratio + (1.0 - final_ratio) * left
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizers: Sequence[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's lr to its initial_lr times `multiplier` (from lr_multiplier)."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "initial_lr" not in group:
                raise KeyError(
                    f"param group {group.get('name', '?')!r} has no 'initial_lr'; build the "
                    "optimizers with build_optimizers() or set group['initial_lr'] yourself"
                )
            group["lr"] = group["initial_lr"] * multiplier


def muon_momentum(
    step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95
) -> float:
    """Muon momentum rising linearly from `start` to `end` over the first `warmup_steps`.

    modded-nanogpt warms Muon's momentum from 0.85 to 0.95 over 300 steps: early gradients
    change fast, and a long momentum memory would keep pushing along stale directions.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def apply_muon_momentum(optimizers: Sequence[torch.optim.Optimizer], momentum: float) -> None:
    """Set the momentum of every Muon group in `optimizers` (AdamW ones are left alone)."""
    for opt in optimizers:
        if isinstance(opt, torch.optim.Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


# ----------------------------------------------------------------------------------------------
# Checkpoints


def optimizer_state_dicts(optimizers: Sequence[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """The state of each optimiser, in order, for a checkpoint."""
    return [opt.state_dict() for opt in optimizers]


def load_optimizer_state_dicts(
    optimizers: Sequence[torch.optim.Optimizer], states: Sequence[dict[str, Any]]
) -> None:
    """Restore `optimizer_state_dicts` output into freshly built optimisers.

    The checkpoint's hyperparameters (lr, initial_lr, momentum, ...) replace the fresh ones,
    as torch's load_state_dict does, so a resumed run continues exactly; to change an lr on
    resume, set group["initial_lr"] after loading.
    """
    hint = (
        "this looks like a checkpoint from a different optimizer setting (e.g. 'muon' vs "
        "'adamw', or tied vs untied embeddings); rebuild the optimizers with the setting the "
        "checkpoint was saved with"
    )
    if len(states) != len(optimizers):
        raise ValueError(
            f"checkpoint has {len(states)} optimizer states but {len(optimizers)} optimizers "
            f"were built: {hint}"
        )
    for i, (opt, state) in enumerate(zip(optimizers, states)):
        saved = state["param_groups"]
        built = opt.param_groups
        saved_layout = [(g.get("name"), len(g["params"])) for g in saved]
        built_layout = [(g.get("name"), len(g["params"])) for g in built]
        if saved_layout != built_layout:
            raise ValueError(
                f"optimizer {i} ({type(opt).__name__}): checkpoint groups (name, #params) "
                f"{saved_layout} do not match the built ones {built_layout}: {hint}"
            )
    for opt, state in zip(optimizers, states):
        if isinstance(opt, torch.optim.Muon) and any("ns_dtype" in g for g in state["param_groups"]):
            state = _from_our_muon(state, opt)
        opt.load_state_dict(state)


def _from_our_muon(state: dict[str, Any], opt: torch.optim.Muon) -> dict[str, Any]:
    """A checkpoint of the Muon class this file had before torch.optim.Muon replaced it (its groups
    carry "ns_dtype"), as torch's state. Ours kept the sum B <- mu B + g, torch's keeps the average
    T <- mu T + (1 - mu) g, so T = (1 - mu) B while mu is constant (after the momentum warmup;
    during it the scale is near enough, and Newton-Schulz normalises the update's scale anyway)."""
    fresh = {k: v for k, v in opt.defaults.items()}
    groups, buffers = [], {}
    for group in state["param_groups"]:
        groups.append({**fresh, **{k: v for k, v in group.items() if k != "ns_dtype"}})
        for index in group["params"]:
            if index in state["state"]:
                buffer = state["state"][index]["momentum_buffer"]
                buffers[index] = {"momentum_buffer": buffer * (1.0 - group["momentum"])}
    return {"state": buffers, "param_groups": groups}
