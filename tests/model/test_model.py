"""The model as a user of transformers sees it: build, save, load, generate, train, adapt."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from iterative_llm import PRESETS, IterativeLLMConfig, IterativeLLMForCausalLM, IterativeLLMModel, build_model

from tests.conftest import tiny_config, tiny_model


def ids(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator)


# ---------------------------------------------------------------- config, presets, registration


def test_config_round_trip(tmp_path):
    config = tiny_config(mlp_type="swiglu", final_logit_softcapping=None, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, IterativeLLMConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.head_dim == 16 and loaded.num_key_value_heads == 2


@pytest.mark.parametrize(
    "name, low, high", [("tiny", 1e6, 5e6), ("gpt1", 110e6, 124e6), ("gpt2-small", 118e6, 130e6), ("gpt2-medium", 340e6, 370e6)]
)
def test_presets_have_their_advertised_sizes(name, low, high):
    with torch.device("meta"):
        model = build_model(name)
    assert low <= model.num_parameters() <= high
    assert model.config.max_position_embeddings == PRESETS[name]["max_position_embeddings"]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="Available presets: tiny, gpt1, gpt2-small, gpt2-medium"):
        IterativeLLMConfig.from_preset("gpt5")


def test_auto_classes_know_the_model():
    config = tiny_config()
    assert isinstance(AutoModel.from_config(config), IterativeLLMModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), IterativeLLMForCausalLM)
    assert AutoConfig.for_model("iterative_llm").model_type == "iterative_llm"


# ---------------------------------------------------------------- save / load


def test_save_load_gives_identical_logits(tmp_path, model):
    x = ids()
    model.save_pretrained(tmp_path)
    # from_pretrained builds on the meta device: the rotary buffer must be recomputed, not garbage.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert (tmp_path / "modeling_iterative_llm.py").exists() and (tmp_path / "configuration_iterative_llm.py").exists()
    auto_map = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


def test_tied_embeddings_are_saved_once_and_retied(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_untied_head_is_its_own_matrix(tmp_path, model):
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["iterative_llm"] = None  # prove the package is never imported here
    import torch
    from transformers import AutoModelForCausalLM, AutoModel, pipeline
    folder = sys.argv[1]
    inputs = torch.load(folder + "/probe.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    same = torch.equal(model(inputs["ids"]).logits, inputs["logits"])
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    text = generator("the cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    print(json.dumps({"same_logits": same, "model_class": type(model).__name__,
                      "backbone_class": type(backbone).__name__, "text": text}))
    """
)


@pytest.mark.slow
def test_folder_loads_in_a_fresh_process_without_the_package(tmp_path, model, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    x = ids(vocab=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save({"ids": x, "logits": model(x).logits}, tmp_path / "probe.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,  # not the repo root, so nothing is imported from the source tree by accident, encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {**report, "same_logits": True, "model_class": "IterativeLLMForCausalLM",
                      "backbone_class": "IterativeLLMModel"}
    assert report["text"].startswith("the cat") and len(report["text"]) > len("the cat")


# ---------------------------------------------------------------- forward contract


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    x = ids(length=10)
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, 7] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size).float()
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("fields", [{}, {"final_logit_softcapping": None}, {"tie_word_embeddings": True}],
                         ids=["capped", "uncapped", "tied"])
def test_skip_logits_gives_the_same_loss_and_gradients_without_logits(fields):
    """The chunked loss (pretraining's path) must be the plain loss: same value, same gradients,
    with -100 targets, with pre-shifted labels, and with the Trainer's num_items_in_batch."""
    x = ids(batch=3, length=40, vocab=128)  # 120 rows: more than one 64-row chunk
    labels = x.clone()
    labels[0, :9] = -100
    shifted = torch.roll(x, -1, dims=1)
    shifted[:, -1] = -100
    cases = [dict(labels=labels), dict(labels=x, shift_labels=shifted),
             dict(labels=labels, num_items_in_batch=torch.tensor(50))]
    for case in cases:
        results = []
        for skip in (False, True):
            model = tiny_model(initializer_range=0.5, **fields).train()
            out = model(x, use_cache=False, skip_logits=skip, **case)
            out.loss.backward()
            results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        (plain, plain_grads), (fused, fused_grads) = results
        assert fused.logits is None and plain.logits is not None
        torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
        assert plain_grads.keys() == fused_grads.keys()
        for name in plain_grads:
            torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_skip_logits_under_bf16_autocast_matches_the_plain_loss():
    model = tiny_model(initializer_range=0.5).train()
    x = ids(length=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, labels=x, use_cache=False).loss
        fused = model(x, labels=x, use_cache=False, skip_logits=True).loss
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)


def test_skip_logits_without_labels_is_refused(model):
    with pytest.raises(ValueError, match="pass `labels`"):
        model(ids(), skip_logits=True)


def test_logit_softcapping_bounds_the_logits():
    model = tiny_model(initializer_range=2.0, final_logit_softcapping=5.0)
    logits = model(ids()).logits
    assert logits.abs().max() <= 5.0  # tanh saturates to exactly 1 in float32
    uncapped = tiny_model(initializer_range=2.0, final_logit_softcapping=None)(ids()).logits
    assert uncapped.abs().max() > 5.0
    torch.testing.assert_close(logits, 5.0 * torch.tanh(uncapped / 5.0))


def test_packed_sequences_with_restarting_positions_match_separate_runs(model):
    first, second = ids(1, 5, seed=2), ids(1, 7, seed=3)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed_logits = model(packed, position_ids=position_ids).logits
    torch.testing.assert_close(packed_logits[:, :5], model(first).logits)
    torch.testing.assert_close(packed_logits[:, 5:], model(second).logits)


@pytest.mark.parametrize("mlp_type", ["relu2", "swiglu", "gelu"])
def test_sdpa_and_eager_agree_with_padding(mlp_type):
    model = tiny_model(mlp_type=mlp_type)
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding in the first row
    model.set_attn_implementation("sdpa")
    sdpa = model(x, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(x, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[0, 3:], eager[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[1], eager[1], atol=1e-5, rtol=1e-5)


def test_eager_attention_weights_are_causal_distributions():
    model = tiny_model()
    model.set_attn_implementation("eager")
    out = model(ids(2, 8), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, 8, 8)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 8))
        assert torch.all(weights.triu(diagonal=1) == 0)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 8, model.config.hidden_size) for h in out.hidden_states)


def test_return_dict_false_gives_a_tuple(model):
    loss, logits = model(ids(), labels=ids(), return_dict=False)[:2]
    assert loss.ndim == 0 and logits.shape == (2, 12, 128)


def test_logits_to_keep_keeps_the_last_positions(model):
    x = ids()
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:])


def test_logits_to_keep_as_positions_keeps_those_positions(model):
    """transformers' forms beside the int: positions for every row, positions per row (B, N), and a
    boolean mask (packed rows: the kept positions, flattened)."""
    x = ids()
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])
    per_row = torch.tensor([[1, 2], [3, 11]])
    torch.testing.assert_close(model(x, logits_to_keep=per_row).logits,
                               torch.stack([full[0, [1, 2]], full[1, [3, 11]]]))
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[0, 4] = mask[1, 7] = mask[1, 8] = True
    torch.testing.assert_close(model(x, logits_to_keep=mask).logits, full[mask])


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids(), labels=ids()).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


def test_a_few_steps_of_training_lower_the_loss():
    model = tiny_model().train()
    x = ids(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_zero_initialised_output_projections_start_each_block_as_identity():
    model = IterativeLLMForCausalLM(tiny_config(zero_init_output_projections=True))
    for layer in model.model.layers:
        assert torch.all(layer.self_attn.o_proj.weight == 0) and torch.all(layer.mlp.down_proj.weight == 0)
        assert layer.self_attn.q_proj.weight.std() > 0


def test_resize_token_embeddings(model):
    model.resize_token_embeddings(160)
    assert model.config.vocab_size == 160 and model.lm_head.weight.shape[0] == 160
    assert model(ids(vocab=160)).logits.shape[-1] == 160


# ---------------------------------------------------------------- generation


def test_greedy_generation_with_and_without_cache_agree(model):
    prompt = ids(2, 5)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 17)


def test_static_cache_generation_equals_dynamic(model):
    prompt = ids(2, 5)
    dynamic = model.generate(prompt, max_new_tokens=10, do_sample=False)
    static = model.generate(prompt, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_model().double()  # float64: padding changes matmul shapes, not the tokens
    pad = model.config.pad_token_id
    prompts = [ids(1, 3, seed=4)[0], ids(1, 7, seed=5)[0], ids(1, 5, seed=6)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), pad)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False)
        assert torch.equal(together[row, width:], alone[0, len(prompt):]), f"prompt {row}"


def test_continuing_from_a_returned_cache_matches_one_long_generation(model):
    prompt = ids(1, 4)
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=5, do_sample=False)
    straight = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(continued, straight)


def test_generation_from_inputs_embeds_matches_input_ids(model):
    prompt = ids(1, 6)
    from_ids = model.generate(prompt, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 6:])


def test_beam_search_and_seeded_sampling(model):
    prompt = ids(2, 4)
    beams = model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 10)
    torch.manual_seed(7)
    first = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    second = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(first, second)


# ---------------------------------------------------------------- adapters


@pytest.mark.slow
def test_lora_adapter_trains_saves_reloads_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_model(mlp_type="swiglu")
    base.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    model.train()
    x = ids(4, 12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, IterativeLLMForCausalLM)
    torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad input


def test_hidden_size_not_divisible_by_heads_is_named():
    with pytest.raises(ValueError, match=r"`hidden_size` \(100\) is not divisible by `num_attention_heads` \(3\)"):
        IterativeLLMConfig(hidden_size=100, num_attention_heads=3)


def test_heads_not_divisible_by_key_value_heads_is_named():
    with pytest.raises(ValueError, match=r"`num_attention_heads` \(12\) is not divisible by `num_key_value_heads` \(5\)"):
        IterativeLLMConfig(num_attention_heads=12, num_key_value_heads=5)


def test_unknown_mlp_type_lists_the_choices():
    with pytest.raises(ValueError, match="relu2.*swiglu.*gelu"):
        IterativeLLMConfig(mlp_type="tanh")


def test_token_id_outside_vocabulary_names_the_fix(model):
    bad = ids()
    bad[0, 3] = 128
    with pytest.raises(ValueError, match=r"Token id 128 is outside the model's vocabulary \(0..127\).*tokenizer"):
        model(bad)
    bad[0, 3] = -5
    with pytest.raises(ValueError, match="Token id -5"):
        model(bad)


def test_sequence_longer_than_max_positions_is_refused(model):
    with pytest.raises(ValueError, match=r"65 tokens long.*max_position_embeddings \(64\)"):
        model(ids(1, 65))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids(1, 60), max_new_tokens=10, do_sample=False)
    with pytest.raises(ValueError, match=r"Position 70 is beyond this model's max_position_embeddings \(64\)"):
        model(ids(1, 71), position_ids=torch.arange(71)[None])


def test_packed_rows_longer_than_the_context_are_fine_when_positions_restart(model):
    """TRL's padding-free packing flattens a batch into one row; each sequence still fits."""
    first, second = ids(1, 40, seed=8), ids(1, 40, seed=9)
    packed = model(torch.cat([first, second], 1), position_ids=torch.cat([torch.arange(40), torch.arange(40)])[None])
    torch.testing.assert_close(packed.logits[:, 40:], model(second).logits)


def test_tokenizer_with_a_larger_vocabulary_is_refused(tokenizer):
    from iterative_llm.tokenization import check_tokenizer_matches_model

    small = tiny_config(vocab_size=len(tokenizer) - 10)
    with pytest.raises(ValueError, match="vocab"):
        check_tokenizer_matches_model(tokenizer, small)
    check_tokenizer_matches_model(tokenizer, tiny_config(vocab_size=len(tokenizer)))
