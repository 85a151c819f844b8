"""HellaSwag scored the way lm-evaluation-harness scores it, so figures compare with published ones.

HellaSwag (Zellers et al. 2019) gives a context and four endings; a model "answers" by finding the
ending it finds most likely. lm-eval-harness's `hellaswag` task (EleutherAI, tasks/hellaswag), zero-shot:
  - the context is `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, and context and endings
    are cleaned: " [title]" becomes ". ", other `[...]` WikiHow artefacts are dropped, double spaces
    become single;
  - each ending is scored as the continuation `" " + ending` after the context: the sum of its tokens'
    log-probabilities. Trailing spaces of the context move to the continuation, and the continuation's
    tokens are those of `tokenizer(context + continuation)` after the context's own tokens, with the
    tokenizer's default special tokens (GPT-2's and ours add no BOS);
  - `acc`: the ending with the highest summed log-likelihood is the answer; `acc_norm`: the same with
    each sum divided by the ending's length in characters (the cleaned ending, no leading space);
  - ties go to the first ending (numpy's argmax), so a model that cannot tell endings apart scores
    the share of items whose answer is ending 0, about 25%.

Published zero-shot HellaSwag figures at GPT-2's size are in `HELLASWAG_REFERENCES` below, the one
place they are written down; the eval command and the model card both print them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from iterative_llm.console import progress_bar

from training.data.sources import jsonl_records

# (model, HellaSwag acc_norm, how it was scored and where the figure comes from). Only the first is
# scored exactly as here (lm-eval-harness); llm.c divides by the ending's tokens, not characters, and
# SmolLM2's card used lighteval, so read the others as the neighbourhood, not as digits to match.
HELLASWAG_REFERENCES: list[tuple[str, float, str]] = [
    ("GPT-2 124M (OpenAI)", 0.3114, "lm-eval-harness, as quoted in llm.c's dev/data/hellaswag.py (github.com/karpathy/llm.c)"),
    ("GPT-2 124M (OpenAI)", 0.294, "llm.c's scoring, its GPT-2 (124M) reproduction write-up (github.com/karpathy/llm.c/discussions/481)"),
    ("llm.c GPT-2 124M reproduction, 10B tokens", 0.299, "llm.c's scoring, same write-up"),
    ("SmolLM2-135M, 2T tokens", 0.421, "lighteval, SmolLM2-135M model card (huggingface.co/HuggingFaceTB/SmolLM2-135M)"),
]

HUB_DATASET = "Rowan/hellaswag"  # the copy lm-eval's task reads; validation split, 10,042 items
REQUIRED_FIELDS = ("activity_label", "endings", "label")


class HellaSwagError(ValueError):
    """The HellaSwag input cannot be used; the message names the item, the field and the fix."""


@dataclass(frozen=True)
class Item:
    context: str  # cleaned, as lm-eval builds it
    endings: tuple[str, ...]  # cleaned endings, no leading space
    label: int


# ---------------------------------------------------------------------- reading items


def preprocess(text: str) -> str:
    """lm-eval's cleaning of HellaSwag text (WikiHow's bracketed artefacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_item(record: Any, where: str) -> Item:
    """One HellaSwag record (the dataset's own fields) -> Item, checking its shape."""
    if not isinstance(record, dict):
        raise HellaSwagError(f"{where}: expected a JSON object with HellaSwag's fields, got {type(record).__name__}.")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if "ctx_a" in record and "ctx_b" in record:
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()  # lm-eval's way
    elif "ctx" in record:
        ctx = record["ctx"]  # ctx is ctx_a + " " + ctx_b, without lm-eval's capital letter
    else:
        missing.append("ctx_a and ctx_b (or ctx)")
    if missing:
        raise HellaSwagError(
            f"{where}: missing field {', '.join(missing)}. A HellaSwag item needs activity_label, ctx_a, ctx_b "
            f"(or ctx), endings (a list of texts) and label (the index of the right ending), as in the dataset's "
            f"validation file."
        )
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: `endings` must be a list of at least two texts, got {endings!r}.")
    try:
        label = int(record["label"])  # the hub copy stores it as a string
    except (TypeError, ValueError):
        raise HellaSwagError(f"{where}: `label` must be an ending's index, got {record['label']!r}.") from None
    if not 0 <= label < len(endings):
        raise HellaSwagError(
            f"{where}: label {label} is outside the {len(endings)} endings (0 to {len(endings) - 1}). "
            f"Labels are 0-based indices into `endings`; test-split items have no label and cannot be scored."
        )
    return Item(preprocess(record["activity_label"] + ": " + ctx), tuple(preprocess(e) for e in endings), label)


def load_items(source: str, limit: int | None = None) -> list[Item]:
    """The first `limit` items of a local JSONL file of HellaSwag records, or of the hub's validation
    split (`source="hub"`)."""
    if limit is not None and limit < 1:
        raise HellaSwagError(f"--limit must be at least 1, got {limit}.")
    if source == "hub":
        return _hub_items(limit)
    path = Path(source).expanduser()
    if not path.is_file():
        raise HellaSwagError(
            f"no HellaSwag file at {source}. Give a JSONL file of HellaSwag records, or `hub` for the validation "
            f"split of {HUB_DATASET} (the dataset's GitHub repository is no longer served; save the hub split "
            f"once with datasets: load_dataset({HUB_DATASET!r}, split='validation').to_json('hellaswag_val.jsonl'))."
        )
    items = []
    with open(path, encoding="utf-8") as f:
        for number, record in jsonl_records(f, path, error=HellaSwagError):
            items.append(to_item(record, f"{path} line {number}"))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise HellaSwagError(f"{path} holds no HellaSwag items: the file is empty.")
    return items


def _hub_items(limit: int | None) -> list[Item]:
    try:
        import datasets
    except ImportError as err:
        raise HellaSwagError("`--hellaswag hub` needs `datasets`: pip install 'iterative-llm[train]'") from err
    split = "validation" if limit is None else f"validation[:{limit}]"
    try:
        rows = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # the hub raises many kinds (offline, not found, auth)
        raise HellaSwagError(
            f"could not load {HUB_DATASET} from the Hugging Face hub ({type(err).__name__}: {err}). Check your "
            f"network, or save the split once where the hub is reachable (load_dataset({HUB_DATASET!r}, "
            f"split='validation').to_json('hellaswag_val.jsonl')) and pass the file: --hellaswag hellaswag_val.jsonl."
        ) from None
    return [to_item(dict(row), f"{HUB_DATASET} validation item {i}") for i, row in enumerate(rows)]


# ---------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, split as lm-eval's `_encode_pair` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"] if context else []
    continuation_ids = whole[len(context_ids):]
    if not context_ids:  # lm-eval conditions an empty context on the BOS (else EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids, continuation_ids = [prefix], tokenizer(continuation)["input_ids"]
    return context_ids, continuation_ids


@torch.no_grad()
def loglikelihoods(
    model, pairs: list[tuple[list[int], list[int]]], *, max_length: int, batch_size: int = 32,
    autocast=None, progress: bool = False, desc: str = "scoring",
) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair, batched.

    A pair longer than `max_length + 1` tokens loses context from the left, as in lm-eval. Rows are
    right-padded: under a causal mask padding comes after every scored position and changes nothing.
    Longest pairs go first so each batch holds similar lengths (and a memory error shows at once).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results = [0.0] * len(pairs)
    bar = progress_bar(progress, desc, unit="ending", total=len(pairs))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        rows, spans = [], []
        for i in chosen:
            context, continuation = pairs[i]
            if not continuation:
                raise ValueError("an ending encodes to no tokens; it cannot be scored")
            if len(continuation) > max_length:
                raise ValueError(f"an ending of {len(continuation)} tokens is longer than the model's context ({max_length})")
            ids = (context + continuation)[-(max_length + 1):][:-1]  # inputs; the last token is only a target
            rows.append(ids)
            spans.append((len(ids) - len(continuation), continuation))
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention_mask[r, :len(ids)] = 1
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        for r, (i, (first, continuation)) in enumerate(zip(chosen, spans)):
            # the inputs lack the last token, so their last len(continuation) positions predict the continuation
            logprobs = F.log_softmax(logits[r, first:first + len(continuation)].float(), dim=-1)
            target = torch.tensor(continuation, device=logprobs.device).unsqueeze(1)
            results[i] = logprobs.gather(1, target).sum().item()
        if bar is not None:
            bar.update(len(chosen))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return results


def first_argmax(values: Iterable[float]) -> int:
    """Index of the largest value, the first one on a tie (numpy's argmax, which lm-eval uses)."""
    values = list(values)
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_hellaswag(
    model, tokenizer, items: list[Item], *, max_length: int, batch_size: int = 32, autocast=None,
    progress: bool = False, desc: str = "hellaswag",
) -> dict[str, Any]:
    """acc and acc_norm over `items`, with each item's log-likelihoods and predictions for inspection."""
    pairs, owners = [], []
    for n, item in enumerate(items):
        for ending in item.endings:
            pairs.append(encode_pair(tokenizer, item.context, " " + ending))
            owners.append(n)
    lls = loglikelihoods(model, pairs, max_length=max_length, batch_size=batch_size, autocast=autocast,
                         progress=progress, desc=desc)
    per_item, position = [], 0
    for item in items:
        item_lls = lls[position:position + len(item.endings)]
        position += len(item.endings)
        normalised = [ll / max(len(ending), 1) for ll, ending in zip(item_lls, item.endings)]
        per_item.append({"loglikelihoods": item_lls, "pred": first_argmax(item_lls),
                         "pred_norm": first_argmax(normalised), "label": item.label})
    count = len(per_item)
    correct = sum(p["pred"] == p["label"] for p in per_item)
    correct_norm = sum(p["pred_norm"] == p["label"] for p in per_item)
    return {"acc": correct / count, "acc_norm": correct_norm / count, "items": count, "per_item": per_item}


def model_max_length(model, default: int = 2048) -> int:
    """The model's context in tokens, read from the config names lm-eval reads."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def references_markdown() -> str:
    """The reference figures as Markdown table rows (model | acc_norm | source)."""
    return "\n".join(f"| {name} | {100 * value:.1f}% | {source} |" for name, value, source in HELLASWAG_REFERENCES)



# ---------------------------------------------------------------------- during pretraining


def check_training_settings(config) -> None:
    """Fail before training starts when the `hellaswag*` fields of a TrainConfig cannot work."""
    if not config.hellaswag:
        return
    for name in ("hellaswag_every", "hellaswag_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    every, eval_every = config.hellaswag_every, config.eval_every
    if every and eval_every and every % eval_every:
        raise ValueError(
            f"`hellaswag_every` ({every}) must be a multiple of `eval_every` ({eval_every}): HellaSwag is scored "
            f"at evaluations. Use e.g. --hellaswag_every {eval_every * max(1, round(every / eval_every))}."
        )
    if config.hellaswag != "hub":
        load_items(config.hellaswag, limit=config.hellaswag_limit or None)  # a bad file fails now, not mid-run


_ITEMS_CACHE: dict[tuple[str, int | None], list[Item]] = {}


def hellaswag_in_run(config, model, tokenizer, step: int, *, final: bool, autocast=None, rank: int = 0,
                     world_size: int = 1) -> dict[str, float]:
    """HellaSwag figures for a pretraining evaluation row, or {} when this evaluation does not score it.

    Scored at the final evaluation and at evaluations whose step is a multiple of `hellaswag_every`
    (0: only the final one), on the first `hellaswag_limit` items. Processes share the items and add
    up their counts, so every process returns the same figures.
    """
    if not config.hellaswag or not (final or (config.hellaswag_every and step % config.hellaswag_every == 0)):
        return {}
    key = (config.hellaswag, config.hellaswag_limit or None)
    if key not in _ITEMS_CACHE:
        _ITEMS_CACHE[key] = load_items(*key)
    items = _ITEMS_CACHE[key]
    mine = items[rank::world_size]
    result = score_hellaswag(model, tokenizer, mine, max_length=model_max_length(model), autocast=autocast) if mine else None
    device = next(model.parameters()).device
    counts = torch.tensor([0.0, 0.0, 0.0] if result is None else
                          [result["acc"] * result["items"], result["acc_norm"] * result["items"], result["items"]],
                          dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    correct, correct_norm, count = counts.tolist()
    figures = {"hellaswag_acc": correct / count, "hellaswag_acc_norm": correct_norm / count, "hellaswag_items": int(count)}
    if rank == 0:
        print(f"step {step}: HellaSwag acc_norm {100 * figures['hellaswag_acc_norm']:.1f}%, "
              f"acc {100 * figures['hellaswag_acc']:.1f}% ({int(count)} items)", flush=True)
    return figures
