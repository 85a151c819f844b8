"""Shared fixtures: everything is built from a tiny config so the suite runs on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: the hub is unreachable in CI, and a test must not wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets one thread: two workers with two OpenMP threads each
# oversubscribe 2 cores, and a tiny training step then runs tens of times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

import iterative_llm  # noqa: E402  (registers the Auto classes)
from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM  # noqa: E402


def tiny_config(**overrides) -> IterativeLLMConfig:
    """A 2-layer model with grouped-query attention. Output projections are NOT zero-initialised
    and weights are larger than the training default, so that every block changes the output and
    a broken cache, mask or position shows up in the logits instead of hiding behind zeros."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        zero_init_output_projections=False, initializer_range=0.1,
    )
    fields.update(overrides)
    return IterativeLLMConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> IterativeLLMForCausalLM:
    torch.manual_seed(seed)
    return IterativeLLMForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def model() -> IterativeLLMForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """A small made-up English-like corpus (the project ships no third-party text)."""
    import random

    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team"]
    verbs = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers"]
    objects = ["the red ball", "a green tree", "the river", "an open door", "the quiet town", "a bright star"]
    endings = [".", "!", "?", " today.", " again.", " at night."]
    lines = []
    for _ in range(600):
        words = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        lines.append(words[0].upper() + words[1:])
    return [" ".join(lines[i : i + 6]) for i in range(0, len(lines), 6)]


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from iterative_llm.tokenization import train_tokenizer

    return train_tokenizer(corpus, vocab_size=300)
