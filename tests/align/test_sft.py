"""SFT: the labels train the assistant replies (and their `<|end|>`) only, the held-out loss falls, the
output folder is a chat model that Auto classes and `pipeline` load, LoRA is merged into it, and the
standard `trl sft` command line runs on a folder we export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from trl import ModelConfig

from iterative_llm.cli import main as cli_main
from iterative_llm.tokenization import ASSISTANT, END_OF_TURN
from tests.align.test_alignment_data import qa_conversations, save_model_folder, write_jsonl
from training.align.data import DataArguments, load_sft_dataset
from training.align.model_folder import load_starting_model
from training.align.sft import SFTConfig, SFTScriptArguments, end_of_turn_share, make_trainer

from tests.conftest import third_party_env

TRL = Path(sys.executable).with_name("trl")


def _subprocess_env() -> dict[str, str]:
    # Offline, and no more threads than this process uses (pytest -n 2 gives each worker one).
    return third_party_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tokenizer) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("base") / "model", tokenizer)


@pytest.fixture(scope="module")
def conversations_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "conversations.jsonl", qa_conversations(60))


def reply_mask(ids: list[int], assistant_id: int, end_id: int) -> list[bool]:
    """Written independently of TRL: True on the tokens of each reply, from after `<|assistant|>\\n`
    up to and including the `<|end|>` that closes it."""
    mask, state = [], "outside"
    for token in ids:
        if state == "newline":  # the "\n" after <|assistant|> is part of the header, not the reply
            mask.append(False)
            state = "reply"
            continue
        mask.append(state == "reply")
        if token == assistant_id:
            state = "newline"
        elif token == end_id:
            state = "outside"
    return mask


def test_labels_cover_the_replies_and_their_end_token_only(base_folder, conversations_file, tmp_path):
    config = SFTConfig(output_dir=str(tmp_path), max_length=64, per_device_train_batch_size=4, report_to="none")
    model, tokenizer = load_starting_model(ModelConfig(model_name_or_path=str(base_folder)), config)
    train, _ = load_sft_dataset(DataArguments(dataset_name=str(conversations_file), num_heldout=0))
    trainer = make_trainer(model, tokenizer, train, None, config)
    batch = next(iter(trainer.get_train_dataloader()))  # packed and flattened (padding-free)
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1

    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assistant_id, end_id = tokenizer.convert_tokens_to_ids([ASSISTANT, END_OF_TURN])
    expected = reply_mask(ids, assistant_id, end_id)
    trained = [label != -100 for label in labels]
    assert trained == expected
    assert [label for label, t in zip(labels, trained) if t] == [i for i, t in zip(ids, trained) if t]
    # Several conversations per row, each with its system and user turns untrained and its <|end|> trained.
    special = {tokenizer.convert_tokens_to_ids(t): t for t in ("<|system|>", "<|user|>", ASSISTANT)}
    assert sum(i == assistant_id for i in ids) >= 2
    assert not any(t for i, t in zip(ids, trained) if i in special)
    closing_ends = [t for i, t, prev in zip(ids, trained, [False] + expected[:-1]) if i == end_id and prev]
    assert closing_ends and all(closing_ends)


def test_sft_trains_and_writes_a_chat_model_folder(base_folder, conversations_file, tmp_path):
    out = tmp_path / "sft"
    preset = tmp_path / "sft.yaml"
    preset.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(base_folder), dataset_name=str(conversations_file), output_dir=str(out),
        num_heldout=8, eval_generations=4, eval_max_new_tokens=8, max_steps=100, learning_rate=3e-3,
        lr_scheduler_type="constant", per_device_train_batch_size=2, per_device_eval_batch_size=4, max_length=64,
        logging_steps=10, save_strategy="no", report_to="none", seed=0,
    )), encoding="utf-8")
    # `iterative-llm sft`: the YAML preset, with a command-line override on top.
    assert cli_main(["sft", "--config", str(preset), "--max_steps", "20"]) == 0

    summary = json.loads((out / "sft_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 20
    before, after = summary["before"]["heldout_loss"], summary["after"]["heldout_loss"]
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5, (before, after)  # the loss on held-out replies falls
    assert summary["after"]["end_of_turn_n"] == 4

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Supervised fine-tuning (SFT)" in card and "held-out loss" in card and "| steps | 20 |" in card
    assert json.loads((out / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"] == [5, 0]

    # A plain Hugging Face chat model folder: Auto classes, and pipeline with messages.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and model.generation_config.eos_token_id == [5, 0]
    chat = pipeline("text-generation", model=str(out))
    reply = chat([{"role": "user", "content": "What does the cat do?"}], max_new_tokens=8, do_sample=False)
    conversation = reply[0]["generated_text"]
    assert conversation[-1]["role"] == "assistant" and isinstance(conversation[-1]["content"], str)


def test_sft_with_lora_writes_merged_weights(base_folder, conversations_file, tmp_path):
    out = tmp_path / "lora"
    cli_main(["sft", "--model_name_or_path", str(base_folder), "--dataset_name", str(conversations_file),
              "--output_dir", str(out), "--use_peft", "--lora_r", "4", "--max_steps", "3", "--learning_rate", "1e-2",
              "--per_device_train_batch_size", "2", "--max_length", "64", "--num_heldout", "4",
              "--eval_generations", "2", "--eval_max_new_tokens", "4", "--save_strategy", "no", "--report_to", "none"])
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], tuned["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])  # not a LoRA target


class _ScriptedModel:
    """Stands in for a model in `end_of_turn_share`: replies with fixed tokens, row by row."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.device, self.training = torch.device("cpu"), False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((input_ids, attention_mask))
        self.generate_kwargs = kwargs
        rows = [self.replies.pop(0)[:max_new_tokens] for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [kwargs["pad_token_id"]] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_end_of_turn_share_counts_replies_that_close_their_turn(tokenizer):
    conversations = [row["messages"] for row in qa_conversations(3)]
    conversations.append([{"role": "user", "content": "x " * 60}, {"role": "assistant", "content": "y"}])  # too long
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model = _ScriptedModel([[70, 71, end], [70] * 10, [72, 0]])  # ends / runs out / stops on <|endoftext|>
    result = end_of_turn_share(model, tokenizer, conversations, max_new_tokens=8, batch_size=2)
    assert (result["ended"], result["n"]) == (1, 3)  # the long prompt was skipped, not counted as a failure
    input_ids, mask = model.calls[0]
    assert mask[:, -1].all() and input_ids[0, -1] == input_ids[1, -1]  # left-padded: every row ends on the prompt
    assert tokenizer.padding_side == "right"  # restored
    assert model.generate_kwargs["do_sample"] is False and model.generate_kwargs["repetition_penalty"] == 1.0


def test_end_of_turn_share_passes_the_repetition_penalty_to_generation(tokenizer):
    conversations = [row["messages"] for row in qa_conversations(2)]
    model = _ScriptedModel([[70], [71]])
    end_of_turn_share(model, tokenizer, conversations, max_new_tokens=4, batch_size=2, repetition_penalty=1.1)
    assert model.generate_kwargs["repetition_penalty"] == 1.1 and model.generate_kwargs["do_sample"] is False
    with pytest.raises(ValueError, match="eval_repetition_penalty must be a positive number"):
        SFTScriptArguments(dataset_name="x.jsonl", eval_repetition_penalty=0.0)


@pytest.mark.slow
def test_trl_sft_command_line_runs_on_an_exported_folder(base_folder, tmp_path):
    """The standard TRL CLI, in a fresh process that never imports iterative_llm (remote code)."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", qa_conversations(16))
    out = tmp_path / "trl-sft"
    result = subprocess.run(
        [str(TRL), "sft", "--model_name_or_path", str(base_folder), "--trust_remote_code", "--dataset_name", str(data),
         "--use_cpu", "--max_steps", "2", "--report_to", "none", "--output_dir", str(out),
         "--per_device_train_batch_size", "2", "--max_length", "64", "--packing", "--assistant_only_loss", "true",
         "--save_strategy", "no"],
        capture_output=True, text=True, timeout=300, env=_subprocess_env(), encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "modeling_iterative_llm.py").exists()


def test_end_of_turn_benchmark_remeasures_the_prompts_an_sft_run_held_out(base_folder, conversations_file):
    """benchmarks/end_of_turn.py re-runs the SFT check on a saved folder: same held-out rows, same replies."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("end_of_turn", Path(__file__).parents[2] / "benchmarks" / "end_of_turn.py")
    end_of_turn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(end_of_turn)
    figures = end_of_turn.main(["--model", str(base_folder), "--data", str(conversations_file), "--num-heldout", "6",
                                "--seed", "3", "--max-new-tokens", "6", "--repetition-penalty", "1.1"])
    _, heldout = load_sft_dataset(DataArguments(dataset_name=str(conversations_file), num_heldout=6), seed=3)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    direct = end_of_turn_share(model, tokenizer, heldout["messages"], max_new_tokens=6, batch_size=4,
                               repetition_penalty=1.1)
    assert (figures["ended"], figures["n"]) == (direct["ended"], direct["n"]) and figures["n"] == 6
    assert figures["samples"] == direct["samples"][:3]
    with pytest.raises(SystemExit, match="num-heldout"):
        end_of_turn.main(["--model", str(base_folder), "--data", str(conversations_file), "--num-heldout", "0"])
