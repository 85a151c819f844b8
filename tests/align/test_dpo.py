"""DPO: runs from an SFT folder, the reference model is the starting weights (even when the folder the
policy came from has changed since, and with LoRA), the preference accuracy on the training pairs
rises, the output folder loads in a fresh process and chats, and `trl dpo` runs on an exported folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline
from trl import ModelConfig

from tests.align.test_alignment_data import preference_pairs, save_model_folder, write_jsonl
from training.align.common import peft_config_from
from training.align.data import DataArguments, load_preference_dataset
from training.align.dpo import DPOConfig, make_trainer, preference_logps, preference_stats
from training.align.dpo import main as dpo_main
from training.align.model_card import append_model_card_section
from training.align.model_folder import load_starting_model

from tests.conftest import third_party_env

TRL = Path(sys.executable).with_name("trl")


def _subprocess_env() -> dict[str, str]:
    # Offline, and no more threads than this process uses (pytest -n 2 gives each worker one).
    return third_party_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, tokenizer) -> Path:
    """Stands in for an SFT output: a model folder with tokenizer, chat template and a model card."""
    folder = save_model_folder(tmp_path_factory.mktemp("sft") / "model", tokenizer, seed=1)
    append_model_card_section(folder, "Supervised fine-tuning (SFT)", {"steps": 1})
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_pairs(40))


def _config(tmp_path, **overrides) -> DPOConfig:
    fields = dict(output_dir=str(tmp_path / "out"), max_length=64, per_device_train_batch_size=4,
                  report_to="none", save_strategy="no", learning_rate=1e-2, logging_steps=100)
    fields.update(overrides)
    return DPOConfig(**fields)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reference_is_the_starting_weights_even_if_the_folder_changed(sft_folder, pairs_file, tmp_path):
    folder = tmp_path / "moving"
    shutil.copytree(sft_folder, folder)
    config = _config(tmp_path, max_steps=2)
    model, tokenizer = load_starting_model(ModelConfig(model_name_or_path=str(folder)), config)
    start = _weights(model)
    # Another run writes to the folder the policy came from (config._name_or_path) after it was loaded.
    changed = {k: v + 1.0 for k, v in load_file(folder / "model.safetensors").items()}
    save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
    assert model.config._name_or_path == str(folder)

    train, _ = load_preference_dataset(DataArguments(dataset_name=str(pairs_file), num_heldout=0))
    trainer = make_trainer(model, tokenizer, train, None, config)
    reference = trainer.ref_model
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    for name, value in _weights(reference).items():
        assert torch.equal(value, start[name]), name
    trainer.train()
    for name, value in _weights(reference).items():  # the reference stays put while the policy moves
        assert torch.equal(value, start[name]), name
    assert not torch.equal(trainer.model.state_dict()["lm_head.weight"], start["lm_head.weight"])


def test_with_lora_the_reference_is_the_adapter_free_starting_model(sft_folder, pairs_file, tmp_path):
    config = _config(tmp_path, max_steps=3)
    model_args = ModelConfig(model_name_or_path=str(sft_folder), use_peft=True, lora_r=4)
    model, tokenizer = load_starting_model(model_args, config)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does a dog do?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    with torch.no_grad():
        start_logits = model(ids).logits

    train, _ = load_preference_dataset(DataArguments(dataset_name=str(pairs_file), num_heldout=0))
    trainer = make_trainer(model, tokenizer, train, None, config, peft_config_from(model_args))
    assert trainer.ref_model is None  # TRL disables the adapter to get the reference: no second model in memory
    trainer.train()
    policy = trainer.model.eval()
    with torch.no_grad():
        with policy.disable_adapter():
            reference_logits = policy(input_ids=ids).logits
        policy_logits = policy(input_ids=ids).logits
    torch.testing.assert_close(reference_logits, start_logits)
    assert not torch.allclose(policy_logits, start_logits)


def test_dpo_from_an_sft_folder_raises_preference_accuracy(sft_folder, pairs_file, tmp_path, tokenizer):
    out = tmp_path / "dpo"
    code = dpo_main(["--model_name_or_path", str(sft_folder), "--dataset_name", str(pairs_file), "--output_dir", str(out),
                     "--num_heldout", "8", "--max_steps", "20", "--learning_rate", "5e-3", "--beta", "0.1",
                     "--per_device_train_batch_size", "8", "--max_length", "64", "--save_strategy", "no",
                     "--report_to", "none", "--logging_steps", "100"])
    assert code == 0

    # Preference accuracy on the training pairs, before (the SFT folder) and after (the DPO folder).
    train, _ = load_preference_dataset(DataArguments(dataset_name=str(pairs_file), num_heldout=8), seed=42)
    stats = {name: preference_stats(*preference_logps(AutoModelForCausalLM.from_pretrained(path), tokenizer, train, 64))
             for name, path in (("before", sft_folder), ("after", out))}
    assert stats["after"]["accuracy"] >= stats["before"]["accuracy"] + 0.2, stats
    assert stats["after"]["margin"] > stats["before"]["margin"]

    summary = json.loads((out / "dpo_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 20 and summary["after"]["n"] == 8
    assert summary["rewards"]["reward_margin"] > 0
    assert 0 <= summary["after"]["per_token_accuracy"] <= 1 and "paired_per_token" in summary["rewards"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.index("## Supervised fine-tuning (SFT)") < card.index("## Preference optimisation (DPO)")
    assert "preference accuracy" in card and "preference accuracy per reply token" in card

    # A chat model folder: Auto classes and pipeline with messages; the modeling code travels with it
    # (auto_map), so processes that never import iterative_llm load it too (see the `trl dpo` test).
    chat = pipeline("text-generation", model=str(out))
    reply = chat([{"role": "user", "content": "What does a dog do?"}], max_new_tokens=6, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    assert (out / "modeling_iterative_llm.py").exists() and "auto_map" in json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert json.loads((out / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"] == [5, 0]


@pytest.mark.slow
def test_trl_dpo_command_line_runs_on_an_exported_folder(sft_folder, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [
        {"prompt": [{"role": "user", "content": "What does a dog do?"}],
         "chosen": [{"role": "assistant", "content": "A dog finds the river."}],
         "rejected": [{"role": "assistant", "content": "A dog paints a bright star."}]}] * 8)
    out = tmp_path / "trl-dpo"
    result = subprocess.run(
        [str(TRL), "dpo", "--model_name_or_path", str(sft_folder), "--trust_remote_code", "--dataset_name", str(data),
         "--use_cpu", "--max_steps", "2", "--report_to", "none", "--output_dir", str(out),
         "--per_device_train_batch_size", "2", "--max_length", "64", "--save_strategy", "no"],
        capture_output=True, text=True, timeout=300, env=_subprocess_env(), encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists()


def test_alignment_benchmark_runs_end_to_end(tmp_path, tokenizer):
    """benchmarks/alignment.py on a tiny model, with data laid out as in ../shared/data (made here)."""
    import gzip
    import importlib.util

    from tests.align.test_alignment_data import OBJECTS, SUBJECTS

    data = tmp_path / "data"
    write_jsonl(data / "sft" / "dolly-open_qa" / "chinkara-open_qa.jsonl",
                [{"text": f"### Human: What does {s} see? ### Assistant: {s} sees {o}."} for s in SUBJECTS for o in OBJECTS])
    (data / "hh-rlhf" / "helpful-base").mkdir(parents=True)
    with gzip.open(data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in preference_pairs(24))
    model = save_model_folder(tmp_path / "run", tokenizer)

    path = Path(__file__).parents[2] / "benchmarks" / "alignment.py"
    spec = importlib.util.spec_from_file_location("alignment_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    results = benchmark.main(["--model", str(model), "--data-dir", str(data), "--out", str(tmp_path / "bench"),
                              "--max-steps", "1", "--n-heldout", "4", "--eval-max-new-tokens", "8",
                              "--eval-repetition-penalty", "1.1", "--use-cpu"])
    assert results["sft"]["after"]["end_of_turn_n"] == 4 and results["dpo"]["after"]["n"] == 4
    table = (tmp_path / "bench" / "results.md").read_text(encoding="utf-8")
    assert "held-out preference accuracy" in table and "end their turn" in table
    assert "repetition penalty 1.1" in table and "preference accuracy per reply token" in table
    assert (tmp_path / "bench" / "dpo" / "model.safetensors").exists()


class _UniformModel:
    """Gives every token the same probability 1/V: a reply's summed log-probability is -length * log V."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.training, self.device = vocab_size, False, torch.device("cpu")

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, attention_mask, use_cache):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab_size)})()


def test_per_token_preference_accuracy_is_free_of_the_pull_of_reply_length(tokenizer):
    """Summed log-probability ranks the shorter reply first whatever it says; per token, a model
    that prefers nothing ranks no pair right."""
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No, " * (i + 2) + "no."}]} for i in range(4)]
    model = _UniformModel(len(tokenizer))
    chosen, rejected, chosen_mean, rejected_mean = preference_logps(model, tokenizer, pairs, per_token=True)
    assert preference_stats(chosen, rejected)["accuracy"] == 1.0  # the short chosen replies win on sums
    log_v = torch.log(torch.tensor(float(len(tokenizer)))).item()
    assert chosen_mean == pytest.approx([-log_v] * 4) and rejected_mean == pytest.approx([-log_v] * 4)
    assert preference_stats(chosen_mean, rejected_mean)["accuracy"] == 0.0
    assert preference_logps(model, tokenizer, pairs) == (chosen, rejected)  # summed only by default
