"""transformers' contract for causal LMs, asserted on our model: its config: what transformers'
ConfigTester checks of every model's. What the contract is, and what these tests share, is in
tests/model/hf_contract.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo

from iterative_llm import IterativeLLMConfig
from tests.model.hf_contract import TESTER_KWARGS, captured_log, common_config
from tests.model.hf_contract import one_intra_op_thread  # noqa: F401  (autouse: one thread here)


def test_config_common_properties_and_json_round_trips(tmp_path):
    config = common_config()
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        assert hasattr(config, name), name
    as_json = json.loads(config.to_json_string())
    for key, value in TESTER_KWARGS.items():
        assert as_json[key] == value, key

    config.to_json_file(tmp_path / "config.json")
    assert IterativeLLMConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    assert IterativeLLMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()

    config.save_pretrained(tmp_path / "saved")
    assert IterativeLLMConfig.from_pretrained(tmp_path / "saved").to_dict() == config.to_dict()
    config.save_pretrained(tmp_path / "root" / "sub")
    assert IterativeLLMConfig.from_pretrained(tmp_path / "root", subfolder="sub").to_dict() == config.to_dict()
    with pytest.raises(OSError):
        IterativeLLMConfig.from_pretrained(tmp_path / "does-not-exist")


def test_config_num_labels_resizes_label_maps():
    config = common_config(num_labels=5)
    assert len(config.id2label) == 5 and len(config.label2id) == 5
    config.num_labels = 3
    assert len(config.id2label) == 3 and len(config.label2id) == 3


def test_config_keeps_the_common_pretrained_config_arguments():
    common = dict(
        return_dict=False, output_hidden_states=True, output_attentions=True, dtype="float16",
        chunk_size_feed_forward=5, architectures=["BertModel"], id2label={0: "label"}, label2id={"label": "0"},
        problem_type="regression",
    )
    config = IterativeLLMConfig(**copy.deepcopy(common))
    for key, value in common.items():
        if key == "dtype":
            assert config.dtype == torch.float16
        else:
            assert getattr(config, key) == value, key


@pytest.mark.parametrize("kwargs", [{}, TESTER_KWARGS], ids=["defaults", "tester-kwargs"])
def test_config_init_logs_no_warning(kwargs):
    with captured_log("transformers.configuration_utils") as log:
        config = IterativeLLMConfig(**kwargs)
    assert log.getvalue() == ""
    assert config is not None
    # Unknown architecture kwargs (hidden_act) are kept as plain attributes, not refused.
    assert IterativeLLMConfig(hidden_act="gelu").hidden_act == "gelu"


def test_config_attn_implementation_setter():
    config = IterativeLLMConfig(attn_implementation="eager")
    assert config._attn_implementation == "eager"
    config._attn_implementation = "sdpa"
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    assert config._attn_implementation == "eager"
