"""transformers' contract for causal LMs, asserted on our model: weight initialisation, also when loading
on the meta device. What the contract is, and what these tests share, is in tests/model/hf_contract.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from transformers import set_seed

from tests.model.hf_contract import BOTH_CLASSES, common_config, common_inputs, seeded_weight_init, skipped_weight_init
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_init_from_constructor_and_from_empty_state_dict_are_bit_identical(model_class, tie):
    config = common_config(tie_word_embeddings=tie)
    with seeded_weight_init():
        from_init = model_class(copy.deepcopy(config))
        from_pretrained = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    on_meta = [n for n, t in [*from_pretrained.named_parameters(), *from_pretrained.named_buffers()]
               if t.device.type == "meta"]
    assert on_meta == []
    a, b = from_init.state_dict(), from_pretrained.state_dict()
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # Non-persistent buffers (the rotary table) too.
    for (name, x), (_, y) in zip(from_init.named_buffers(), from_pretrained.named_buffers()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_init_weights_recomputes_every_buffer_after_to_empty(model_class):
    config = common_config()
    with skipped_weight_init():
        from_init = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = model_class(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    a, b = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert sorted(a) == sorted(b) and a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("model_class", BOTH_CLASSES, ids=lambda c: c.__name__)
def test_every_tensor_is_a_parameter_or_buffer(model_class):
    set_seed(42)
    with torch.device("meta"):
        model = model_class(common_config()).eval()
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(**common_inputs())[0]
    assert out.device.type == "cpu" and torch.isfinite(out).all()
