"""transformers' contract for causal LMs, asserted on our model: training: the loss and its gradients. What
the contract is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import collections
import warnings
from unittest import mock

import pytest
import torch
import torch._dynamo
from transformers import AutoModelForCausalLM, set_seed
from transformers.modeling_layers import GradientCheckpointingLayer

from iterative_llm import IterativeLLMForCausalLM
from tests.model.hf_contract import build, common_config, common_inputs
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def test_training_mode_forward_returns_a_loss_that_backpropagates():
    model = build(IterativeLLMForCausalLM, common_config()).train()
    inputs = common_inputs()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert loss.ndim == 0
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_loss_honours_shift_labels():
    config = common_config(use_cache=False)
    set_seed(42)
    model = IterativeLLMForCausalLM(config).eval()
    inputs = common_inputs()
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 99, (13, 7), generator=generator)
    other_labels = torch.randint(0, 99, (13, 7), generator=generator)
    shift = torch.randint(0, 99, (13, 7), generator=generator)
    other_shift = shift.roll(1, dims=1)
    with torch.no_grad():
        base = model(**inputs, labels=labels, shift_labels=shift).loss
        labels_changed = model(**inputs, labels=other_labels, shift_labels=shift).loss
        shift_changed = model(**inputs, labels=labels, shift_labels=other_shift).loss
    assert torch.equal(base, labels_changed)  # labels are ignored once shift_labels are given
    assert not torch.equal(base, shift_changed)
    # shift_labels are already aligned: position t is scored against shift[t], the last position included.
    logits = model(**inputs).logits.float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 99), shift.reshape(-1))
    torch.testing.assert_close(base, expected)


def test_causal_lm_accepts_trainer_kwargs_after_auto_round_trip(tmp_path):
    build(IterativeLLMForCausalLM, common_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = common_inputs()
    out = model(**inputs, labels=inputs["input_ids"], num_items_in_batch=torch.tensor(40), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and torch.isfinite(out[0])


def test_gradient_checkpointing_flags():
    config = common_config()
    config.gradient_checkpointing = True
    model = IterativeLLMForCausalLM(config)
    assert model.is_activation_checkpointing
    model = IterativeLLMForCausalLM(common_config())
    assert any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
    assert not model.is_activation_checkpointing

    def flagged() -> list[bool]:
        return [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(flagged()) and flagged()
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(flagged())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    assert all(flagged())


@pytest.mark.parametrize("use_reentrant", [None, True, False], ids=["default", "reentrant", "non-reentrant"])
def test_training_with_gradient_checkpointing(use_reentrant):
    # Non-zero output projections, so q/k/v/up get non-zero gradients and the comparison covers them.
    config = common_config(use_cache=False, zero_init_output_projections=False)
    inputs = common_inputs()
    set_seed(42)
    model = IterativeLLMForCausalLM(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    plain = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.zero_grad()

    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    original = layer._gradient_checkpointing_func
    calls = collections.Counter()

    def counting_checkpoint(forward, *args, **kw):
        def counted(*a, **k):
            calls["forward"] += 1
            return forward(*a, **k)

        calls["checkpoint"] += 1
        return original(counted, *args, **kw)

    with mock.patch.object(layer, "_gradient_checkpointing_func", counting_checkpoint):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert calls["checkpoint"] == 1 and calls["forward"] > 1  # recomputed in the backward pass
    checkpointed = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(checkpointed) == trainable
    assert {n for n, s in plain.items() if s > 1e-6} == {n for n, s in checkpointed.items() if s > 1e-6}


def test_input_require_grads_with_gradient_checkpointing():
    model = IterativeLLMForCausalLM(common_config(use_cache=False)).train()
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    try:
        inputs = common_inputs()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grad = model.get_input_embeddings().weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        model.disable_input_require_grads()


@pytest.mark.slow
def test_training_overfit():
    """TrainingTesterMixin.test_training_overfit, as transformers runs it (batch 2 x 64, 300 Adam steps)."""
    set_seed(42)
    config = common_config()
    model = IterativeLLMForCausalLM(config).train()
    pattern = list(range(1, 20))
    tokens = (pattern * 4)[:64]
    input_ids = torch.tensor([tokens] * 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    losses, grad_norms = [], []
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0).item())
        losses.append(loss.item())
        optimizer.step()
    assert (losses[0] - losses[-1]) / losses[0] > 0.9, (losses[0], losses[-1])
    assert (grad_norms[0] - grad_norms[-1]) / grad_norms[0] > 0.9, (grad_norms[0], grad_norms[-1])
    model.eval()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([[1]]), max_new_tokens=63, do_sample=False, use_cache=False, eos_token_id=0
        )
    assert generated[0].tolist() == tokens
