"""One optimizer step, as training and the benchmarks run it, and its compiled form.

`to_model_inputs` turns a batch into the model's arguments, `train_step` runs the micro-batches of
one step (forward, backward, clip, optimizer step), `compile_model` compiles the parts that do the
work, and `warm_up_compiled` compiles them off the clock and checks the compiled gradients against
the eager ones (issue 14: a compiled graph that trained on zero gradients cost a GPU run). Training
(training/pretrain/loop.py), benchmarks/throughput.py and benchmarks/gpu_check.py all time this code.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext

import torch

from iterative_llm import IterativeLLMForCausalLM

from training.pretrain.guards import TrainingError


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


def micro_steps(batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step on each process: the batch in tokens over what one micro-step of
    all processes reads, rounded (at least one). Gradients are accumulated over them."""
    return max(1, round(batch_tokens / (micro_batch * seq_len * world_size)))


def train_step(model, optimizers, micro_batches, *, accumulation: int, grad_clip: float, loss_kwargs: dict,
               clip=None, no_sync=None, autocast=None, scaler=None) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches (model inputs on the device); returns the
    step's mean loss as a device tensor (nothing here waits for the device).

    `no_sync()`, if given, is entered for every micro-batch but the last (data parallelism averages
    gradients once per step); `clip(parameters, max_norm)` defaults to torch's foreach clipping;
    `autocast()` wraps the forward pass where the model is not already wrapped (benchmarks).
    `scaler` (a torch.amp.GradScaler: fp16 training) scales the loss so that small float16 gradients
    do not flush to zero, and unscales them before clipping; a step whose gradients overflowed is
    skipped and the scale lowered (accelerate makes it as `accelerator.scaler` under fp16).
    benchmarks/throughput.py and benchmarks/gpu_check.py time this same function.
    """
    step_loss = None
    for micro, inputs in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and micro < accumulation - 1 else nullcontext()
        with sync:
            with autocast() if autocast is not None else nullcontext():
                loss = model(**inputs, use_cache=False, **loss_kwargs).loss / accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    if grad_clip > 0:
        parameters = [p for p in model.parameters() if p.grad is not None]
        if clip is not None:
            clip(parameters, grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    for optimizer in optimizers:
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the unscaled gradients hold inf or NaN
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
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


def uncompile_model(model: torch.nn.Module) -> None:
    """Undo `compile_model` in place: every region runs eagerly again (a fallback when compiling fails)."""
    regions = list(model.model.layers) if isinstance(model, IterativeLLMForCausalLM) else [model]
    for region in regions:
        region._compiled_call_impl = None  # what nn.Module.compile() set
    model.__dict__.pop("loss_from_hidden_states", None)  # the compiled bound method set above; the class's again


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot work for `device_type` on this machine, or None where it should.

    Its default backend (inductor) writes kernels that need a compiler at run time: Triton on a CUDA
    card (a plain `pip install torch` brings it on Linux, not on Windows, where it is the separate
    `triton-windows`), and a C++ compiler on the CPU (g++ or clang; Visual Studio's `cl` on Windows,
    found only in a Developer prompt; Xcode's command-line tools on a Mac). Without one, the first
    compiled step fails with a long traceback. Apple's MPS is left to the warm-up to find out."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            hint = "pip install triton-windows" if sys.platform == "win32" else "pip install triton"
            return f"torch.compile on a CUDA card needs Triton, which this install lacks ({hint})"
    elif device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:  # inductor's InvalidCxxCompiler, or an older torch without this function
            hint = {"win32": "Visual Studio's C++ tools, run from a Developer prompt",
                    "darwin": "xcode-select --install"}.get(sys.platform, "install g++ or clang")
            return f"torch.compile on the CPU needs a C++ compiler, and none was found ({hint})"
    return None


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
