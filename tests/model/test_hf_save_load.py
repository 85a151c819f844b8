"""transformers' contract for causal LMs, asserted on our model: construction, save and load. What the
contract is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import collections
import copy
import inspect
import warnings
from unittest import mock

import pytest
import torch
import torch._dynamo
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import OutputRecorder

from iterative_llm import IterativeLLMForCausalLM, IterativeLLMModel
from tests.conftest import tiny_config, tiny_model
from tests.model.hf_contract import BOTH_CLASSES, build, common_config, common_inputs, ids, shared_groups
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def test_base_model_output_shape_with_and_without_mask():
    config = common_config()
    model = build(IterativeLLMModel, config)
    inputs = common_inputs()
    assert model(**inputs).last_hidden_state.shape == (13, 7, 32)
    assert model(inputs["input_ids"]).last_hidden_state.shape == (13, 7, 32)


def test_tester_sized_model_is_small():
    config = common_config()
    assert config.num_hidden_layers <= 2
    for model_class in BOTH_CLASSES:
        assert build(model_class, config).num_parameters() < 1_000_000


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_save_load_twice_and_generation_config_only_for_generative_class(tmp_path, model_class):
    model = build(model_class, tiny_config())
    x = ids()
    expected = model(x)[0]
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "config.json").exists()
    assert (tmp_path / "a" / "generation_config.json").exists() == model.can_generate()
    assert model.can_generate() == (model_class is IterativeLLMForCausalLM)
    loaded = model_class.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(loaded(x)[0], expected)
    loaded.save_pretrained(tmp_path / "b")
    torch.testing.assert_close(model_class.from_pretrained(tmp_path / "b").eval()(x)[0], expected)


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_from_pretrained_without_checkpoint_takes_the_state_dict(model_class):
    model = build(model_class, common_config())
    state = model.state_dict()
    loaded = model_class.from_pretrained(None, config=copy.deepcopy(model.config), state_dict=state)
    new_state = loaded.state_dict()
    assert new_state.keys() == state.keys()
    for key in state:
        assert torch.equal(state[key], new_state[key]), key
    for (name, p1), (_, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p1, p2), name


def test_weights_are_contiguous_after_init_and_reload(tmp_path):
    model = build(IterativeLLMForCausalLM, common_config())
    assert all(p.is_contiguous() for p in model.parameters())
    model.save_pretrained(tmp_path)
    loaded = IterativeLLMForCausalLM.from_pretrained(tmp_path)
    assert [n for n, p in loaded.named_parameters() if not p.is_contiguous()] == []


def test_torch_saved_state_dict_reloads_through_transformers(tmp_path):
    from transformers.modeling_utils import load_state_dict

    model = build(IterativeLLMForCausalLM, common_config())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    reloaded = load_state_dict(str(tmp_path / "pytorch_model.bin"))
    fresh = build(IterativeLLMForCausalLM, common_config(), seed=1)
    fresh.load_state_dict(reloaded)  # strict: every key present, none unexpected
    for (name, p1), (_, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert (p1 - p2).abs().max() <= 1e-6, name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_safetensors_round_trip_keeps_values_sharing_and_reports_nothing_missing(tmp_path, tie):
    model = build(IterativeLLMForCausalLM, common_config(tie_word_embeddings=tie))
    model.save_pretrained(tmp_path)
    loaded, info = IterativeLLMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set() and set(info["unexpected_keys"]) == set()
    reloaded = loaded.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reloaded[key], msg=key)
    assert sorted(map(sorted, shared_groups(model))) == sorted(map(sorted, shared_groups(loaded)))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    # Untied: both matrices are their own storage and both are serialised.
    assert ("lm_head.weight" in saved) == (not tie) and "model.embed_tokens.weight" in saved
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == tie


def test_declared_tied_weights_are_exactly_the_shared_tensors():
    model = build(IterativeLLMForCausalLM, common_config(tie_word_embeddings=True))
    assert isinstance(model._tied_weights_keys, dict)
    groups = shared_groups(model)
    for target, source in model._tied_weights_keys.items():
        assert any(target in group and source in group for group in groups), (target, source, groups)
    # Every shared group is declared: after removing the declared targets, nothing is shared any more.
    undeclared = [[n for n in g if n not in model._tied_weights_keys] for g in groups]
    assert [g for g in undeclared if len(g) > 1] == []


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_reload_of_an_emptied_checkpoint_reports_every_parameter_missing(tmp_path, model_class):
    model = build(model_class, common_config())
    model.save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    missing = set(info["missing_keys"])
    state_keys = set(reloaded.state_dict())
    names = {n for n, _ in reloaded.named_parameters()} | {n for n, _ in reloaded.named_buffers()}
    assert missing - names == set()  # no phantom keys
    non_persistent = {n for n, _ in reloaded.named_buffers() if n not in state_keys}
    assert names - missing - non_persistent == set()  # every real parameter reported
    # The rotary tables are recomputed from the config, never saved or expected in a checkpoint.
    assert {n.rsplit(".", 1)[-1] for n in non_persistent} <= {"inv_freq", "original_inv_freq"}


def test_backbone_checkpoint_loads_into_the_causal_lm_and_back(tmp_path):
    config = common_config()
    lm = build(IterativeLLMForCausalLM, config)
    assert lm.base_model_prefix == "model" and lm.base_model is lm.model and lm.base_model is not lm
    backbone = build(IterativeLLMModel, config, seed=3)
    backbone.save_pretrained(tmp_path / "backbone")
    loaded, info = IterativeLLMForCausalLM.from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert {k for k in info["missing_keys"] if k.startswith("model.")} == set()
    assert set(info["missing_keys"]) == {"lm_head.weight"}  # test_correct_missing_keys: the head is reported
    for key, value in backbone.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key

    # The other way: the backbone out of a causal-LM checkpoint, with the `model.` prefix stripped.
    lm.save_pretrained(tmp_path / "lm")
    base, info = IterativeLLMModel.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert set(info["missing_keys"]) == set()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(base.state_dict()[key], value), key


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_main_input_name_is_the_first_forward_argument(model_class):
    assert list(inspect.signature(model_class.forward).parameters)[1] == model_class.main_input_name == "input_ids"


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_get_and_set_embeddings(model_class):
    model = build(model_class, common_config())
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    output = model.get_output_embeddings()
    assert output is None if model_class is IterativeLLMModel else isinstance(output, nn.Linear)
    replacement = nn.Embedding(10, 10)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement


def test_meta_device_construction_works_and_meta_context_loading_is_refused(tmp_path):
    with torch.device("meta"):
        model = IterativeLLMForCausalLM(common_config())
    assert model.lm_head.weight.device.type == "meta"
    build(IterativeLLMForCausalLM, common_config()).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):
        with torch.device("meta"):
            IterativeLLMForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "dtype", ["float16", "bfloat16", "float32", "auto", torch.float16, torch.bfloat16, torch.float32]
)
def test_torch_dtype_is_still_accepted_like_dtype(tmp_path, dtype):
    build(IterativeLLMForCausalLM, common_config()).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = IterativeLLMForCausalLM.from_pretrained(tmp_path, torch_dtype=dtype)
    new = IterativeLLMForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert old.dtype == new.dtype
    if dtype in ("float16", "bfloat16", "float32"):
        assert new.dtype == getattr(torch, dtype)


def test_attention_implementation_can_be_set_dynamically_and_defaults_to_sdpa(tmp_path):
    model = build(IterativeLLMForCausalLM, common_config())
    model.save_pretrained(tmp_path)
    assert IterativeLLMForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    eager = IterativeLLMForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    attentions = [m for m in eager.modules() if "Attention" in type(m).__name__]
    assert attentions and all(m.config._attn_implementation == "eager" for m in attentions)
    eager.set_attn_implementation("sdpa")
    assert eager.config._attn_implementation == "sdpa"
    assert all(m.config._attn_implementation == "sdpa" for m in attentions)
    with pytest.raises(ValueError, match='Specified `attn_implementation="foo"` is not supported'):
        eager.set_attn_implementation("foo")
    assert eager.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mlp_type", ["relu2", "swiglu", "gelu"])
def test_tensor_parallel_plan_matches_parameters(mlp_type):
    from transformers.distributed.parallel_utils import _get_parameter_plan

    for model_class in BOTH_CLASSES:
        model = build(model_class, common_config(mlp_type=mlp_type))
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        modules = {n for n, _ in model.named_modules()}
        assert model.tp_plan
        unused = {
            pattern for pattern in model.tp_plan
            if not any(_get_parameter_plan(n, {pattern: ""}, is_weight=True) is not None for n in names)
            and not any(_get_parameter_plan(m, {pattern: ""}, is_weight=False) is not None for m in modules)
        }
        assert unused == set(), f"TP-plan entries that match nothing: {unused}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tied_head_and_embedding_are_sharded_together(tie):
    model = build(IterativeLLMForCausalLM, common_config(tie_word_embeddings=tie))
    # The head is declared tied (the class dict), so the TP plan must shard both or neither.
    assert "lm_head.weight" in model._tied_weights_keys
    assert ("lm_head" in model.tp_plan) == ("model.embed_tokens" in model.tp_plan)


def test_output_recorders_are_well_formed_and_captured_only_by_the_backbone():
    from transformers.utils.output_capturing import CompileableContextVar

    model = tiny_model()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for key, value in (module._can_record_outputs or {}).items():
                assert isinstance(key, str)
                for recorder in value if isinstance(value, list) else [value]:
                    assert isinstance(recorder, (str, type, OutputRecorder)), recorder
    # `capture_outputs` must not be chained (the head reuses what the backbone collected).
    depth = collections.Counter()
    original_set, original_reset = CompileableContextVar.set, CompileableContextVar.reset

    def counting_set(self, value):
        for key in value:
            depth[key] += 1
        assert max(depth.values()) <= 1, "capture_outputs is chained"
        return original_set(self, value)

    def counting_reset(self, token):
        for key in self.context_var.get():
            depth[key] -= 1
        return original_reset(self, token)

    model.set_attn_implementation("eager")
    with mock.patch.object(CompileableContextVar, "set", counting_set), \
            mock.patch.object(CompileableContextVar, "reset", counting_reset), torch.no_grad():
        out = model(ids(), output_attentions=True, output_hidden_states=True)
    assert out.attentions is not None and out.hidden_states is not None
