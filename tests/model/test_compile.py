"""torch.compile must not change what training computes: compiled and eager gradients agree.

On an H100 (torch 2.11, bf16 autocast) the compiled model once trained on exactly zero gradients
through the chunked loss (issue 14) while every CPU test passed. These tests compare, for both loss
paths (the chunked `skip_logits` loss pretraining uses, and the plain loss from the logits), one
step's loss and every parameter's gradient, compiled against eager, under bf16 autocast. On CPU they
guard the code path (the compiled model must never trace the chunked autograd.Function); the same
comparison runs on a GPU in benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from tests.conftest import skip_unless_compile_works


def gradients(model, x, compiled: bool, skip_logits: bool, backend: str):
    model.zero_grad(set_to_none=True)
    forward = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = forward(input_ids=x, labels=x, use_cache=False, skip_logits=skip_logits).loss
    loss.backward()
    return loss.detach().float(), {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "skip_logits, backend",
    [(True, "aot_eager"), (True, "inductor"), (False, "inductor")],
    ids=["chunked-loss-aot_eager", "chunked-loss-inductor", "plain-loss-inductor"],
)
def test_compiled_and_eager_gradients_agree_under_bf16_autocast(skip_logits, backend):
    skip_unless_compile_works()
    torch.compiler.reset()
    # 200 rows over a 64-row chunk: the eager chunked loss runs several chunks.
    model = tiny_model(initializer_range=0.2, vocab_size=256, tie_word_embeddings=True).train()
    x = torch.randint(0, 256, (4, 50), generator=torch.Generator().manual_seed(3))
    eager_loss, eager = gradients(model, x, compiled=False, skip_logits=skip_logits, backend=backend)
    compiled_loss, compiled = gradients(model, x, compiled=True, skip_logits=skip_logits, backend=backend)

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2, atol=2e-2)
    assert compiled.keys() == eager.keys()
    for name in eager:
        reference = eager[name].norm()
        assert reference > 0, f"{name}: the eager gradient is zero, so the comparison proves nothing"
        # bf16 products: relative differences of a few 1e-3 are rounding; a zero or missing gradient is 1.0.
        relative = (compiled[name] - eager[name]).norm() / reference
        assert relative < 5e-2, f"{name}: compiled gradient differs from eager by {relative:.3f} (relative norm)"


def test_the_compiled_model_never_traces_the_chunked_loss_function(monkeypatch):
    """The root of issue 14's zero gradients: dynamo tracing a custom autograd.Function that forms
    gradients in its forward. Under compile the loss must take the plain formula instead; eager
    keeps the chunked Function (fast and small on CPU)."""
    skip_unless_compile_works()
    from iterative_llm import modeling_iterative_llm as modeling

    calls = []
    original = modeling._SoftcappedLinearCrossEntropy.forward

    def counting(ctx, *args):
        calls.append(torch.compiler.is_compiling())
        return original(ctx, *args)

    monkeypatch.setattr(modeling._SoftcappedLinearCrossEntropy, "forward", staticmethod(counting))
    torch.compiler.reset()
    model = tiny_model().train()
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x, use_cache=False, skip_logits=True).loss.backward()
    assert calls == [False], "the eager model should use the chunked loss"
    calls.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(input_ids=x, labels=x, use_cache=False, skip_logits=True).loss.backward()
    assert calls == [], "the compiled model traced the chunked autograd.Function"
