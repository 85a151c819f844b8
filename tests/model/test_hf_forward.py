"""transformers' contract for causal LMs, asserted on our model: the forward pass's semantics. What the
contract is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch._dynamo
from transformers import set_seed
from transformers.cache_utils import Cache, DynamicCache

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, IterativeLLMModel
from tests.conftest import assert_close_in_bf16, tiny_config, tiny_model
from tests.model.hf_contract import (
    BOTH_CLASSES, assert_cache_shape, assert_caches_equal, build, common_config, common_inputs, ids, less_flaky,
)
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def test_two_eval_forwards_are_deterministic():
    model = tiny_model()
    inputs = common_inputs(vocab=128)
    with torch.no_grad():
        first, second = model(**inputs).logits, model(**inputs).logits
    keep = ~(first.isnan() | first.isinf())
    assert (first[keep] - second[keep]).abs().max() <= 1e-5


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_batching_equivalence_with_right_padded_rows(model_class):
    set_seed(42)
    config = less_flaky(tiny_config(output_hidden_states=True))
    model = build(model_class, config)
    batched = common_inputs(vocab=128)
    single = {k: v[:1] for k, v in batched.items()}
    with torch.no_grad():
        out_batched, out_single = model(**batched), model(**single)
    compared = 0
    for key in out_batched:
        values_b, values_s = out_batched[key], out_single[key]
        if not isinstance(values_b, (tuple, list)):
            values_b, values_s = [values_b], [values_s]
        for b, s in zip(values_b, values_s):
            if not isinstance(b, torch.Tensor) or b.dim() == 0 or not torch.is_floating_point(b):
                continue
            # No NaN or Inf anywhere, padded rows included (row 0 is one token then padding).
            assert torch.isfinite(b).all() and torch.isfinite(s).all(), key
            torch.testing.assert_close(b[:1], s, atol=1e-5, rtol=1e-5, msg=key)
            compared += 1
    assert compared >= config.num_hidden_layers + 2  # main output + every hidden state


def test_tuple_and_dict_outputs_are_equivalent():
    model = tiny_model()
    model.set_attn_implementation("eager")
    x = ids()
    for extra in ({}, {"labels": x}, {"output_hidden_states": True}, {"output_attentions": True},
                  {"labels": x, "output_hidden_states": True, "output_attentions": True}):
        with torch.no_grad():
            as_tuple = model(x, return_dict=False, **extra)
            as_dict = model(x, return_dict=True, **extra).to_tuple()
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict), extra

        def check(a, b):
            if isinstance(a, Cache):
                return
            if isinstance(a, (tuple, list)):
                for i, j in zip(a, b):
                    check(i, j)
            elif isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

        check(as_tuple, as_dict)


@pytest.mark.parametrize("via", ["kwarg", "config"])
@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_attention_outputs_are_per_query_head(model_class, via):
    config = tiny_config(use_cache=False)  # 4 query heads share 2 key/value heads
    config.return_dict = True
    if via == "config":
        config.output_attentions = True
    model = model_class._from_config(config, attn_implementation="eager").eval()
    inputs = common_inputs(vocab=128)
    kwargs = {"output_attentions": True} if via == "kwarg" else {}
    with torch.no_grad():
        out = model(**inputs, **kwargs)
        both = model(**inputs, **kwargs, output_hidden_states=True)
    assert len(out.attentions) == config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (13, config.num_attention_heads, 7, 7)
    # Field order and None-omission: asking for hidden states adds exactly one field.
    assert len(both) == len(out) + 1
    fields = list(both.keys())
    assert fields[-2:] == ["hidden_states", "attentions"]


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_hidden_states_output_via_kwarg_and_config(model_class):
    config = tiny_config()
    inputs = common_inputs(vocab=128)
    for kwargs, cfg in (({"output_hidden_states": True}, config), ({}, tiny_config(output_hidden_states=True))):
        model = build(model_class, cfg)
        with torch.no_grad():
            hidden = model(**inputs, **kwargs).hidden_states
        assert len(hidden) == cfg.num_hidden_layers + 1
        assert all(h.shape == (13, 7, cfg.hidden_size) for h in hidden)


def test_recorded_hidden_states_and_attentions_keep_their_gradients():
    config = tiny_config(output_hidden_states=True, output_attentions=True)
    model = IterativeLLMModel._from_config(config, attn_implementation="eager")
    out = model(**common_inputs(vocab=128))
    hidden, attention = out.hidden_states[0], out.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    out[0].flatten()[0].backward(retain_graph=True)
    assert hidden.grad is not None and attention.grad is not None


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_specific_hidden_state_layers_can_be_captured(model_class):
    model = build(model_class, tiny_config(num_hidden_layers=3))
    inputs = common_inputs(vocab=128)
    assert not isinstance(IterativeLLMModel._can_record_outputs["hidden_states"], list)
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states
        wanted = [*range(0, len(full), 2), -1]
        captured = model(**inputs, output_hidden_states=wanted).hidden_states
    assert len(captured) == len(full)
    kept = {i % len(full) for i in wanted}
    for i in range(len(full)):
        if i in kept:
            torch.testing.assert_close(captured[i], full[i])
        else:
            assert captured[i] is None, i


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_inputs_embeds_match_input_ids(model_class):
    model = build(model_class, tiny_config())
    x = ids()
    # Pad ids in the input must not be used to infer a mask or positions: the embeds path cannot see them.
    x[0, :2] = model.config.pad_token_id
    embeds = model.get_input_embeddings()(x)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x)[0], model(inputs_embeds=embeds)[0])


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_forward_works_when_config_omits_common_attributes(model_class):
    config_dict = common_config().to_diff_dict()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id", "sep_token_id", "tie_word_embeddings"):
        config_dict.pop(key, None)
    config = IterativeLLMConfig.from_dict(config_dict)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(config, key, 0)
    model = build(model_class, config)
    assert model(**common_inputs())[0].shape[:2] == (13, 7)


def test_feed_forward_chunking_changes_nothing():
    inputs = common_inputs(vocab=128)
    plain = build(IterativeLLMModel, tiny_config())
    chunked = build(IterativeLLMModel, tiny_config(chunk_size_feed_forward=1))
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs)[0], chunked(**inputs)[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("use_mask", [True, False], ids=["mask", "no-mask"])
def test_eager_matches_sdpa_inference(tmp_path, dtype, padding_side, use_mask):
    set_seed(42)
    model = build(IterativeLLMForCausalLM, less_flaky(tiny_config()))
    model.save_pretrained(tmp_path)
    sdpa = IterativeLLMForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="sdpa").eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    x = ids(7, 7, seed=3)
    kwargs = {"output_hidden_states": True}
    valid = torch.ones(7, 7, dtype=torch.bool)
    if use_mask:
        mask = torch.ones(7, 7, dtype=torch.long)
        if padding_side == "left":
            mask[-1, :2] = 0
        else:
            mask[-1, -2:] = 0
        kwargs["attention_mask"] = mask
        valid = mask.bool()
    with torch.no_grad():
        out_eager = eager(x, **kwargs).hidden_states[-1]
        out_sdpa = sdpa(x, **kwargs).hidden_states[-1]
    a, b = out_eager[valid].float(), out_sdpa[valid].float()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if dtype == torch.float32:
        atol, rtol = 1e-6, 1e-4
    elif dtype == torch.float16:
        atol, rtol = 5e-3, 5e-3
    else:
        atol, rtol = max(1e-2, 3e-2 * float(torch.max(a.abs().max(), b.abs().max()))), 1e-2
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_old_past_key_values_name_warns_and_still_works(model_class):
    config = tiny_config()
    model = build(model_class, config)
    inputs = common_inputs(vocab=128)
    output = model(**inputs, use_cache=True)
    assert type(output.cache) is DynamicCache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(**inputs, use_cache=True, past_key_values=DynamicCache(config=config))
    assert any("`past_key_values` is deprecated" in str(w.message) for w in caught)
    new = model(**inputs, use_cache=True, cache=DynamicCache(config=config))
    assert old.cache is not None and new.cache is not None
    assert_caches_equal(old.cache, new.cache)
    assert new.cache.get_seq_length() == 7


def test_cache_layout_is_batch_kv_heads_length_head_dim():
    config = tiny_config()  # 2 key/value heads under 4 query heads
    model = build(IterativeLLMForCausalLM, config)
    out = model(**common_inputs(vocab=128), use_cache=True)
    assert_cache_shape(out.cache, config, 13, 7)
    assert out.cache.get_seq_length() == 7


def test_custom_4d_attention_mask_shares_a_prefix():
    model = tiny_model()
    prefix, tails = ids(1, 3, seed=5)[0], ids(1, 3, seed=6)[0]
    # Three sequences prefix + tails[i]; packed as prefix + t0 + t1 + t2 with positions 0,1,2,3,3,3.
    packed = torch.cat([prefix, tails])[None]
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    allowed[:, :3] = torch.tril(torch.ones(6, 3, dtype=torch.bool))
    allowed[3:, :3] = True
    allowed[3, 3] = allowed[4, 4] = allowed[5, 5] = True
    mask = torch.zeros(1, 1, 6, 6)
    mask[0, 0][~allowed] = torch.finfo(torch.float32).min
    with torch.no_grad():
        packed_logits = model(packed, attention_mask=mask, position_ids=positions).logits[0, 3:]
        separate = model(torch.stack([torch.cat([prefix, t[None]]) for t in tails])).logits[:, -1]
    torch.testing.assert_close(packed_logits.softmax(-1), separate.softmax(-1), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_free_matches_padded_batch_in_bf16(attn):
    """A padded batch and the same sequences packed without padding give the same logits, in float32
    to float32's rounding and in bfloat16 to bfloat16's, and bfloat16 stays near float32. Faults of
    the layout (a leaked pad, a position off by one) show in float32, where they stand out; in
    bfloat16 they are about a unit of rounding in this small model, the size of the difference two
    CPUs' kernels make (see assert_close_in_bf16), so bfloat16 is held to its own rounding only."""
    lengths = [3, 7, 5]
    seqs = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    padded = torch.full((3, width), tiny_config().pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        padded[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    packed = torch.cat(seqs)[None]
    packed_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        model.set_attn_implementation(attn)
        with torch.no_grad():
            logits_padded = model(padded, attention_mask=mask, position_ids=position_ids).logits
            logits_packed = model(packed, position_ids=packed_positions).logits[0]
        valid = torch.cat([logits_padded[row, width - n:] for row, n in enumerate(lengths)])
        logits[dtype] = valid, logits_packed
    torch.testing.assert_close(*logits[torch.float32], atol=1e-5, rtol=1e-5)
    assert_close_in_bf16(*logits[torch.bfloat16])
    for bf16, fp32 in zip(logits[torch.bfloat16], logits[torch.float32]):
        assert_close_in_bf16(bf16, fp32, ulps=3)


def test_bfloat16_load_keeps_rotary_and_softcap_close_to_float32(tmp_path):
    model = tiny_model(final_logit_softcapping=5.0)
    model.save_pretrained(tmp_path)
    low = IterativeLLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert low.dtype == torch.bfloat16 and low.model.embed_tokens.weight.dtype == torch.bfloat16
    # The rotary frequencies stay float32 (recomputed, not rounded to bf16).
    assert low.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(low.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    x = ids(2, 60)  # positions up to 59 of 64: rotary angles where bf16 rounding would show
    with torch.no_grad():
        reference, logits = model(x).logits, low(x).logits
    assert logits.abs().max() <= 5.0  # soft-capping still bounds the logits
    # Measured: max |diff| 0.03 on logits up to 3 (bf16 weights and activations through 2 blocks).
    torch.testing.assert_close(logits.float(), reference, atol=0.08, rtol=0.02)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_rope_scaling_tests_do_not_apply_yet():
    """transformers runs its RoPE-scaling tests (linear/dynamic/yarn, frequencies, partial rotation) only on a
    config with `rope_parameters`. Ours has `rope_theta` alone, so they are skipped there too. Adding
    `rope_parameters` switches them on: then the rotary module must honour `ROPE_INIT_FUNCTIONS` and
    `@dynamic_rope_update`, and those tests must be added here."""
    config = common_config()
    assert not hasattr(config, "rope_parameters"), "rope_parameters added: add the RoPE-scaling contract tests"
    # Those tests find the module as `rotary_emb` whose __init__ takes `config` first: already so.
    module = IterativeLLMModel(config).rotary_emb
    assert list(inspect.signature(type(module).__init__).parameters)[1] == "config"
