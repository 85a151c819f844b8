"""What the tests of transformers' contract for causal LMs share (tests/model/test_hf_*.py): the
configs transformers' tester would build, its inputs, and helpers.

transformers 5.24 tests every causal LM with the common tests in `tests/test_modeling_common.py`,
`tests/test_configuration_common.py`, `tests/test_training_mixin.py` and `tests/generation/test_utils.py`.
Many of them key on transformers' static model-name mappings and would silently skip for a custom
model, so each item of that contract that `test_model.py` does not already cover is re-stated
here as our own test (written from transformers' recipes, not copied).

Two configs are used:
- `common_config()`: the config transformers' `CausalLMModelTester` would build for us (vocab 99,
  hidden 32, 2 layers, 2 heads, pad 0 / bos 1 / eos 2, initializer 0.02, untied), with our defaults
  for everything else (zero-initialised output projections included). For contract checks about
  construction, loading, init and training.
- `tiny_config()` from conftest (grouped-query attention 4/2, non-zero output projections): for
  numerical checks, where identity blocks would hide a broken mask, cache or position.
"""

from __future__ import annotations

import collections
import copy
import io
import logging
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch._dynamo
from torch import nn
from transformers import PreTrainedModel, set_seed
from transformers.cache_utils import Cache
from transformers.utils import logging as hf_logging

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM, IterativeLLMModel

BOTH_CLASSES = [IterativeLLMModel, IterativeLLMForCausalLM]


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, and on a shared
    2-core machine it made a training step ~35x slower (0.63 s vs 0.018 s measured). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What transformers' CausalLMModelTester passes to a config's __init__ (those of its attributes that are
# parameters of our signature) plus the ones it sets regardless of the signature (`hidden_act`).
TESTER_KWARGS = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    intermediate_size=32, hidden_act="gelu", max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, initializer_range=0.02, tie_word_embeddings=False,
)


def common_config(**overrides) -> IterativeLLMConfig:
    return IterativeLLMConfig(**{**TESTER_KWARGS, **overrides})


def common_inputs(batch: int = 13, length: int = 7, vocab: int = 99, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tester's common inputs: random ids and a lower-triangular mask, i.e. row i has i + 1 valid
    tokens followed by right padding (row 0 a single token)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.tril(torch.ones(batch, length, dtype=torch.long))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def ids(batch: int = 2, length: int = 7, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=generator)


def build(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    return model_class(copy.deepcopy(config)).eval()


def less_flaky(config: IterativeLLMConfig) -> IterativeLLMConfig:
    """transformers' `set_config_for_less_flaky_test`: norm eps 1.0, so tiny variances don't amplify noise."""
    config.rms_norm_eps = 1.0
    return config


def tensor_storage(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())


def shared_groups(model: nn.Module) -> list[list[str]]:
    pointers = collections.defaultdict(list)
    for name, tensor in model.state_dict().items():
        pointers[tensor_storage(tensor)].append(name)
    return [names for names in pointers.values() if len(names) > 1]


@contextmanager
def seeded_weight_init(seed: int = 42):
    """Re-seed before every `_initialize_weights`, so two init paths draw the same random numbers."""
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(seed)
        return original(*args, **kwargs)

    with mock.patch.object(PreTrainedModel, "_initialize_weights", seeded):
        yield


@contextmanager
def skipped_weight_init():
    with mock.patch.object(PreTrainedModel, "_initialize_weights", lambda *args, **kwargs: None):
        yield


@contextmanager
def captured_log(name: str):
    if hasattr(hf_logging.warning_once, "cache_clear"):
        hf_logging.warning_once.cache_clear()  # a warning already given once would not show again
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def assert_caches_equal(a: Cache, b: Cache, **tolerances) -> None:
    assert len(a) == len(b)
    for layer_a, layer_b in zip(a.layers, b.layers):
        torch.testing.assert_close(layer_a.keys, layer_b.keys, **tolerances)
        torch.testing.assert_close(layer_a.values, layer_b.values, **tolerances)


def assert_cache_shape(cache: Cache, config: IterativeLLMConfig, batch: int, length: int) -> None:
    assert isinstance(cache, Cache)
    assert len(cache) == config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        assert layer.keys.shape == (batch, config.num_key_value_heads, length, head_dim)
        assert layer.values.shape == (batch, config.num_key_value_heads, length, head_dim)


COMMON_GENERATE = dict(
    max_new_tokens=3, min_new_tokens=3, bad_words_ids=[[1, 0]], repetition_penalty=1.2,
    remove_invalid_values=True,
)


def left_padded_generation_inputs() -> dict[str, torch.Tensor]:
    """2 prompts of 7, the first with 3 pads on the left.

    Not the tester's right-padded (tril) rows: with right padding transformers' own generate gives the
    first new token position `last prompt position + 1` in one call but `mask.cumsum() - 1` when it
    resumes from a cache, so the 4th token's key differs between the two runs for any model (the
    positions come from generate, not from the model).
    """
    x = ids(2, 7, seed=8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    x[0, :3] = 1  # our pad id
    return {"input_ids": x, "attention_mask": mask}


