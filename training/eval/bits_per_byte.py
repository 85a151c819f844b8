"""Measuring a model during and after training: validation loss, bits per byte, samples, FLOPs.

Bits per byte (bpb) is the validation loss converted from nats per token to bits per byte of
text: it does not depend on the tokenizer, so runs with different vocabularies compare directly,
and it compares with character-level figures on ASCII text (one byte per character).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from iterative_llm.console import progress_bar

from training.data.batches import iter_eval_batches
from training.data.shards import TokenSplit
from training.machine import cpu_description, cpu_name


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: TokenSplit,
    byte_lengths: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int | None,
    device: torch.device,
    autocast=None,
    rank: int = 0,
    world_size: int = 1,
    document_positions: bool = False,
) -> dict[str, float]:
    """Mean validation loss (nats per token) and bits per byte over the first `max_tokens` tokens.

    byte_lengths[i] is the number of UTF-8 bytes token i decodes to (0 for special tokens).
    Bits per byte counts only targets that are text (bytes > 0), as nanochat does: a special
    token carries no bytes, so it cannot be priced per byte. Sums are all-reduced across processes.
    `document_positions`: the windows carry position ids that restart at each document, as
    training's batches do with `document_masking`, so validation attends within documents as
    training did.
    """
    was_training = model.training
    model.eval()
    byte_lengths = byte_lengths.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, text nats, text bytes
    for batch in iter_eval_batches(split, batch_size, seq_len, max_tokens=max_tokens, rank=rank, world_size=world_size,
                                   document_positions=document_positions):
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        positions = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=input_ids, use_cache=False, **positions).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        nbytes = byte_lengths[labels.flatten()]
        is_text = nbytes > 0
        sums += torch.stack(
            [nats.sum(), torch.tensor(float(nats.numel()), device=device), nats[is_text].sum(), nbytes.sum()]
        ).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    nats, tokens, text_nats, text_bytes = sums.tolist()
    if tokens == 0:
        raise ValueError("The validation split produced no batches: it is shorter than one sequence.")
    return {"val_loss": nats / tokens, "val_bpb": text_nats / (math.log(2) * max(text_bytes, 1.0))}


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int = 0, device=None) -> list[str]:
    """Continue each prompt, sampling with `iterative-llm generate`'s defaults, seeded for repeatability.

    Documents were trained with the boundary token first, so prompts get it too. A prompt too long for
    the model's context slides out of it from the start, as in `iterative-llm generate`; a note says so.
    """
    from training.eval.generate import TEMPERATURE, TOP_K, continue_ids

    was_training = model.training
    model.eval()
    texts = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        (new,), note = continue_ids(model, ids, max_new_tokens, device=device, do_sample=True, temperature=TEMPERATURE,
                                    top_k=TOP_K, pad_token_id=tokenizer.pad_token_id)
        if note:
            print(f"sample {prompt[:30]!r}...: {note}", file=sys.stderr)
        texts.append(prompt + tokenizer.decode(new, skip_special_tokens=True))
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return texts


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), counting attention: 6 N + 12 L H D T.

    N counts the weights that take part in matrix products (every projection and the output head;
    the embedding lookup is free), each costing 2 FLOPs per token forward and 4 backward. Attention
    scores and the weighted sum cost 2 * 2 * H * D * T per token forward per layer, for the full
    context T, the convention of PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's MFU, so
    figures compare with theirs; causal masking halves the useful part of that term.
    """
    # getattr defaults let the same count serve a GPT-2 baseline config (no GQA, 4x MLP).
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp_matrices = 3 if getattr(config, "mlp_type", None) == "swiglu" else 2
    mlp = mlp_matrices * hidden * intermediate
    matmul_params = config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size
    return 6 * matmul_params + 12 * config.num_hidden_layers * heads * head_dim * seq_len


# Dense peak matrix throughput in FLOP/s for bf16 (fp32 accumulate) from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is ~756e12
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "A10": 125e12,
}


def hardware(device: torch.device, world_size: int) -> str:
    """What a run ran on, in words, for its summary and model card."""
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return f"{world_size} x {cpu_name()} GPU (MPS)"  # the chip names its GPU: "Apple M2"
    return f"{world_size} x {cpu_description()}"


def peak_flops(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s when known (GPUs above), else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------- bits per byte of any text


def window_plan(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Overlapping windows over a sequence of `length` tokens whose position 0 is only context.

    Each window is (begin, end, first): the model reads tokens begin..end-1 (at most `window`) and
    scores the targets first..end-1. Every position 1..length-1 is scored exactly once, and each
    window after the first starts `stride` tokens later, so every target there has at least
    `window - stride` tokens of context (the "sliding window" of Hugging Face's perplexity guide).
    """
    if not 1 <= stride < window:
        raise ValueError(f"the stride ({stride}) must be at least 1 and below the window ({window} tokens), "
                         f"or some tokens would be scored without context")
    plan, begin, first = [], 0, 1
    while True:
        end = min(begin + window, length)
        plan.append((begin, end, first))
        if end >= length:
            return plan
        first, begin = end, begin + stride


@torch.no_grad()
def text_bits_per_byte(
    model, tokenizer, documents, *, window: int, stride: int | None = None, batch_size: int = 8,
    autocast=None, progress: bool = False,
) -> dict[str, float]:
    """Bits per byte of `documents` (strings) under `model`, with the model's own tokenizer.

    Each document is scored on its own, after one boundary token (BOS, else EOS) so that its first
    token is predicted too; documents longer than `window` tokens are scored in overlapping windows
    (`window_plan`, stride `window // 2` by default). Bytes are the documents' UTF-8 bytes, so the
    figure compares across tokenizers: bits = total nats / ln 2, divided by bytes.
    """
    stride = stride or max(1, window // 2)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each document with")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pieces, num_bytes, num_tokens, num_documents = [], 0, 0, 0  # pieces: (window tokens, first target index)
    for text in documents:
        ids = [prefix] + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # windows follow
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(ids) - 1
        num_documents += 1
        for begin, end, first in window_plan(len(ids), window, stride):
            pieces.append((ids[begin:end], first - begin))
    if num_tokens == 0:
        raise ValueError("the text holds no tokens to score")
    pieces.sort(key=lambda piece: -len(piece[0]))  # similar lengths share a batch
    bar = progress_bar(progress, "bits per byte", unit="tok", total=num_tokens)
    nats = 0.0
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (ids, _) in enumerate(batch):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention_mask[r, :len(ids)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        for r, (ids, first) in enumerate(batch):
            # position p predicts token p + 1; targets first..len-1 are predicted at first-1..len-2
            row = logits[r, first - 1:len(ids) - 1].float()
            nats += F.cross_entropy(row, input_ids[r, first:len(ids)], reduction="sum").item()
            if bar is not None:
                bar.update(len(ids) - first)
    if bar is not None:
        bar.close()
    model.train(was_training)
    return {"bits_per_byte": nats / (math.log(2) * num_bytes), "loss": nats / num_tokens, "bytes": num_bytes,
            "tokens": num_tokens, "documents": num_documents}
