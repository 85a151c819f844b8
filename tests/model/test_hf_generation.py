"""transformers' contract for causal LMs, asserted on our model: generation. What the contract is, and what
these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from transformers import GenerationMixin, set_seed
from transformers.cache_utils import StaticCache
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from iterative_llm import IterativeLLMForCausalLM
from tests.conftest import tiny_config, tiny_model
from tests.model.hf_contract import (
    COMMON_GENERATE, assert_cache_shape, assert_caches_equal, build, common_inputs, ids,
    left_padded_generation_inputs,
)
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def generation_inputs(vocab: int = 128) -> dict[str, torch.Tensor]:
    """The generation tester's inputs: 2 rows of the tril-masked common inputs."""
    return {k: v[:2] for k, v in common_inputs(vocab=vocab).items()}


SAMPLING = dict(do_sample=True, top_k=10, top_p=0.7, temperature=0.7)
BEAMS = dict(num_beams=2, length_penalty=2.0, early_stopping=False)
MODES = {
    "greedy": dict(do_sample=False),
    "sample": SAMPLING,
    "beam": dict(do_sample=False, **BEAMS),
    "beam_sample": dict(**SAMPLING, **BEAMS),
}


@pytest.mark.parametrize("mode", MODES)
def test_generate_methods_give_prompt_plus_new_tokens(mode):
    model = tiny_model()
    inputs = generation_inputs()
    set_seed(42)
    out = model.generate(**inputs, **COMMON_GENERATE, **MODES[mode])
    assert out.shape == (2, 7 + 3)


def check_generate_outputs(out, config, batch, prompt, new, use_cache, beams=1, returned=1):
    """transformers' `_check_generate_outputs`: `rows` is what the model ran on (batch x beams, or
    batch x returned sequences when sampling several), `sequences` has batch x returned rows."""
    rows = batch * max(beams, returned)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput if beams > 1 else GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (batch * returned, prompt + new)
    for name in ("scores", "logits"):
        values = getattr(out, name)
        assert isinstance(values, tuple) and len(values) == new, name
        assert all(v.shape == (rows, config.vocab_size) for v in values), name
    assert len(out.attentions) == new and len(out.hidden_states) == new
    for step in range(new):
        total = prompt + step
        in_len = 1 if use_cache and step > 0 else total
        assert len(out.attentions[step]) == config.num_hidden_layers
        for weights in out.attentions[step]:
            assert weights.shape == (rows, config.num_attention_heads, in_len, total), (step, weights.shape)
        assert len(out.hidden_states[step]) == config.num_hidden_layers + 1
        for hidden in out.hidden_states[step]:
            assert hidden.shape == (rows, in_len, config.hidden_size), (step, hidden.shape)
    if use_cache:
        assert_cache_shape(out.cache, config, rows, prompt + new - 1)
    else:
        assert out.cache is None


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("mode", MODES)
def test_generate_dict_outputs(mode, use_cache):
    config = tiny_config()
    config.is_decoder = True
    model = build(IterativeLLMForCausalLM, config)
    model.set_attn_implementation("eager")
    returned = 1 if mode == "greedy" else 2  # as transformers' dict-output tests ask for
    set_seed(42)
    out = model.generate(
        **generation_inputs(), **COMMON_GENERATE, **MODES[mode], use_cache=use_cache, return_dict_in_generate=True,
        output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True,
        num_return_sequences=returned,
    )
    check_generate_outputs(out, config, 2, 7, 3, use_cache, beams=MODES[mode].get("num_beams", 1), returned=returned)


def test_generate_without_input_ids_starts_from_bos():
    model = tiny_model(bos_token_id=5)
    out = model.generate(max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4) and out[0, 0] == 5


@pytest.mark.parametrize("explicit_positions", [True, False], ids=["position-ids", "mask-only"])
def test_left_padding_compatibility(explicit_positions):
    model = tiny_model(use_cache=False)
    x = ids(2, 7)
    mask = torch.ones_like(x)
    with torch.no_grad():
        reference = model(x, attention_mask=mask, use_cache=False).logits[:, -1]
        pad = torch.full((2, 32), model.config.pad_token_id)
        padded_ids = torch.cat([pad, x], dim=1)
        padded_mask = torch.cat([torch.zeros_like(pad), mask], dim=1)
        kwargs = {}
        if explicit_positions:
            position_ids = padded_mask.cumsum(-1) - 1
            kwargs["position_ids"] = position_ids.masked_fill(padded_mask == 0, 1)
        padded = model(padded_ids, attention_mask=padded_mask, use_cache=False, **kwargs).logits[:, -1]
    if explicit_positions:
        torch.testing.assert_close(padded, reference, atol=1e-5, rtol=1e-5)
    else:
        # Without position ids, pads shift the positions: rotary attention depends on relative distance
        # only, so this is still equal up to float error (wider than 1e-5 for this reason alone).
        torch.testing.assert_close(padded, reference, atol=1e-4, rtol=1e-4)


def test_generate_continue_from_cache_matches_one_run_with_scores_and_cache():
    config = tiny_config()
    model = build(IterativeLLMForCausalLM, config)
    inputs = left_padded_generation_inputs()
    common = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=-1,
                  eos_token_id=-1)
    full = model.generate(**inputs, max_new_tokens=4, **common)
    part = model.generate(**inputs, max_new_tokens=3, **common)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    rest = model.generate(part.sequences, attention_mask=mask, cache=part.cache, max_new_tokens=1, **common)
    assert torch.equal(rest.sequences, full.sequences)
    scores = (*part.scores, *rest.scores)
    for a, b in zip(scores, full.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_caches_equal(rest.cache, full.cache)


def test_generate_continue_from_inputs_embeds_only():
    model = tiny_model()
    inputs = left_padded_generation_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    common = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=-1,
                  eos_token_id=-1)
    full = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=4, **common)
    part = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=3, **common)
    more = torch.cat([embeds, model.get_input_embeddings()(part.sequences)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    rest = model.generate(inputs_embeds=more, attention_mask=mask, cache=part.cache, max_new_tokens=1, **common)
    assert torch.equal(torch.cat([part.sequences, rest.sequences], dim=1), full.sequences)
    for a, b in zip((*part.scores, *rest.scores), full.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_caches_equal(rest.cache, full.cache)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
def test_generate_from_inputs_embeds_with_and_without_ids(num_beams):
    model = tiny_model()
    inputs = generation_inputs()
    common = dict(do_sample=False, num_beams=num_beams, max_new_tokens=5, min_new_tokens=5, use_cache=True,
                  return_dict_in_generate=True, output_scores=True)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_ids = model.generate(**inputs, **common)
    from_both = model.generate(**inputs, inputs_embeds=embeds, **common)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **common)
    assert torch.equal(from_ids.sequences, from_both.sequences)
    for a, b in zip(from_ids.scores, from_both.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(from_embeds.sequences, from_both.sequences[:, 7:])


def test_generate_from_random_inputs_embeds_differs_at_every_step():
    model = tiny_model()
    common = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True,
                  output_scores=True)
    torch.manual_seed(0)
    first = model.generate(inputs_embeds=torch.randn(2, 7, 64), **common)
    second = model.generate(inputs_embeds=torch.randn(2, 7, 64), **common)
    for a, b in zip(first.scores, second.scores):
        assert not torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_static_cache_generation_matches_dynamic(dtype):
    model = tiny_model().to(dtype)
    inputs = generation_inputs()
    common = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, return_dict_in_generate=True,
                  output_scores=True)
    dynamic = model.generate(**inputs, **common)
    static = model.generate(**inputs, cache_implementation="static", **common)
    assert isinstance(static.cache, StaticCache)
    assert static.cache.get_max_length() == 7 + 20 - 1
    assert torch.equal(dynamic.sequences, static.sequences)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(dynamic.scores, static.scores):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


def test_static_cache_generation_from_inputs_embeds():
    model = tiny_model()
    embeds = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    common = dict(do_sample=False, max_new_tokens=10, eos_token_id=-1, return_dict_in_generate=True)
    static = model.generate(inputs_embeds=embeds, cache_implementation="static", **common)
    dynamic = model.generate(inputs_embeds=embeds, **common)
    assert isinstance(static.cache, StaticCache)
    assert static.cache.get_max_length() == 10 + 5 - 1
    assert torch.equal(static.sequences, dynamic.sequences) and static.sequences.shape == (2, 10)


def test_generate_with_logits_to_keep_zero_matches_default():
    model = tiny_model()
    inputs = generation_inputs()
    default = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    keep_all = model.generate(**inputs, max_new_tokens=5, do_sample=False, logits_to_keep=0)
    assert torch.equal(default, keep_all)
    out_all, out_last = model(ids(), logits_to_keep=0).logits, model(ids(), logits_to_keep=1).logits
    assert out_all.shape == (2, 7, 128) and out_last.shape == (2, 1, 128)


ASSISTED = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, eos_token_id=-1, pad_token_id=-1,
                return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
                output_hidden_states=True)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("assistant", ["random", "same"])
def test_assisted_decoding_matches_greedy(assistant):
    assert not IterativeLLMForCausalLM._is_stateful  # generate refuses assisted decoding for stateful models
    config = tiny_config()
    config.is_decoder = True
    model = build(IterativeLLMForCausalLM, config)
    model.set_attn_implementation("eager")
    helper = model if assistant == "same" else build(IterativeLLMForCausalLM, config, seed=7)
    helper.set_attn_implementation("eager")
    helper.generation_config.num_assistant_tokens = 2
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    inputs = {k: v[1:2] for k, v in common_inputs(vocab=128).items()}  # batch 1
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    greedy = model.generate(**inputs, **ASSISTED)
    assisted = model.generate(**inputs, assistant_model=helper, **ASSISTED)
    assert_same_generation(greedy, assisted)


def test_prompt_lookup_decoding_matches_greedy():
    model = tiny_model()
    model.set_attn_implementation("eager")
    x = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # repeats, so the lookup proposes candidates
    # (the random assistant above covers multi-token forwards on top of a cache; here the candidates of the
    # first step are checked, then rejected: a crop of the cache follows)
    greedy = model.generate(x, **ASSISTED)
    lookup = model.generate(x, prompt_lookup_num_tokens=2, max_matching_ngram_size=2, **ASSISTED)
    assert_same_generation(greedy, lookup)


def test_assisted_decoding_with_sampling_runs():
    model = tiny_model()
    helper = tiny_model(seed=7)
    model.set_attn_implementation("eager")  # output_attentions=True: sdpa returns no weights
    helper.set_attn_implementation("eager")
    set_seed(42)
    out = model.generate(ids(1, 7), assistant_model=helper, **{**ASSISTED, **SAMPLING})
    assert out.sequences.shape == (1, 11) and len(out.scores) == 4


def test_prepare_inputs_for_generation_forwards_extra_kwargs():
    model = tiny_model()
    x = ids()
    extra = {"custom_arg": "x", "numeric_arg": 7, "output_attentions": True, "output_hidden_states": True}
    prepared = model.prepare_inputs_for_generation(x, attention_mask=torch.ones_like(x), **extra)
    for key, value in extra.items():
        assert prepared[key] == value, key


def test_causal_lm_inherits_generation_mixin_directly():
    assert GenerationMixin in IterativeLLMForCausalLM.__bases__
    assert "GenerationMixin" in str(IterativeLLMForCausalLM.__bases__)
