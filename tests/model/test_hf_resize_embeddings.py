"""transformers' contract for causal LMs, asserted on our model: resizing the embeddings. What the contract
is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from iterative_llm import IterativeLLMForCausalLM
from tests.model.hf_contract import BOTH_CLASSES, build, common_config, common_inputs
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings_contract(tie):
    config = common_config(tie_word_embeddings=tie)
    inputs = common_inputs()
    for model_class in BOTH_CLASSES:
        model = build(model_class, config)
        vocab = config.vocab_size
        before = model.get_input_embeddings().weight.clone()
        embed = model.resize_token_embeddings(vocab + 10)
        assert model.config.get_text_config().vocab_size == vocab + 10
        assert type(embed) is nn.Embedding and embed.weight.shape[0] == vocab + 10
        assert torch.equal(embed.weight[:vocab], before)  # old rows untouched
        torch.testing.assert_close(embed.weight[-10:].mean(0), embed.weight[:-10].mean(0), atol=1e-3, rtol=1e-3)
        model(**inputs)
        if model_class is IterativeLLMForCausalLM:
            assert model.lm_head.weight.shape[0] == vocab + 10
            assert (model.lm_head.weight.data_ptr() == embed.weight.data_ptr()) == tie

        model.resize_token_embeddings(vocab - 15)
        assert model.config.get_text_config().vocab_size == vocab - 15
        assert model.get_input_embeddings().weight.shape[0] == vocab - 15
        out = model(inputs["input_ids"].clamp(max=vocab - 15 - 1), attention_mask=inputs["attention_mask"])
        if model_class is IterativeLLMForCausalLM:
            assert out.logits.shape[-1] == vocab - 15

        model.resize_token_embeddings(vocab + 10, pad_to_multiple_of=64)
        assert model.get_input_embeddings().weight.shape[0] == 128 and model.config.vocab_size == 128
        with pytest.raises(ValueError, match="Asking to pad the embedding matrix to a multiple of `1.3`"):
            model.resize_token_embeddings(vocab, pad_to_multiple_of=1.3)

    small = build(IterativeLLMForCausalLM, common_config(vocab_size=4, pad_token_id=3, tie_word_embeddings=tie))
    small.resize_token_embeddings(14)
    assert small(torch.tensor([[0, 13, 3]])).logits.shape == (1, 3, 14)


def test_resize_untied_head_gets_mean_rows_and_post_init_does_not_reinitialise_it():
    model = build(IterativeLLMForCausalLM, common_config(tie_word_embeddings=False))
    model.resize_token_embeddings(99 + 10)
    head = model.get_output_embeddings()
    assert head.weight.shape[0] == 109 and head.bias is None
    torch.testing.assert_close(head.weight[-10:].mean(0), head.weight[:-10].mean(0), atol=1e-3, rtol=1e-3)
    model(**common_inputs())
    before = head.weight.detach().clone()
    model.post_init()
    assert torch.equal(model.get_output_embeddings().weight, before)
    model.resize_token_embeddings(99 - 15)
    assert model.get_output_embeddings().weight.shape[0] == 84
    model(common_inputs()["input_ids"].clamp(max=83))
