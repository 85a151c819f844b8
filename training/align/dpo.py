"""Preference optimisation with TRL's DPOTrainer: a chat model folder + chosen/rejected pairs -> a better chat model.

    iterative-llm dpo --model_name_or_path runs/NAME-sft --dataset_name pairs.jsonl.gz --output_dir runs/NAME-dpo
    iterative-llm dpo --config training/presets/dpo-tiny.yaml --max_steps 50
    accelerate launch -m training.align.dpo --config ...

The same shape as `training/align/sft.py` (and TRL's `trl/scripts/dpo.py`), sharing its data loading
(`training/align/data.py`), model-folder handling (`training/align/model_folder.py`) and the steps of
`run()` and `main()` (`training/align/common.py`). What differs:
- pairs in any common shape, Anthropic HH transcripts included (the turns both continuations share
  become the prompt);
- the reference model is the starting checkpoint itself: a frozen copy of the weights the policy
  starts from, taken in memory before training. TRL would otherwise reload it from
  `config._name_or_path`, which is right only while that path names exactly these weights: not for a
  model changed in memory after loading (an adapter merged in, resized embeddings), a folder written
  to since, or a hub revision other than the default. With LoRA the reference is the policy with its
  adapter disabled, i.e. the same starting weights, at no extra memory;
- evaluation on held-out pairs before and after: preference accuracy (the share of pairs whose chosen
  reply the model finds more likely than the rejected one, by summed log-probability), the same by
  log-probability per reply token (the summed figure mostly ranks replies by length: a longer reply
  collects more negative log-probability whatever its content), and the mean log-probability margin,
  plus DPO's implicit reward accuracy and margin after training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import trl
from trl import DPOTrainer, ModelConfig, TrlParser

from iterative_llm.console import make_output_safe
from training.align.common import DeviceDefaults, card_rows, finish, load_inputs, peft_config_from, run_script, timed_train
from training.align.data import DataArguments, load_preference_dataset


@dataclass
class DPOConfig(DeviceDefaults, trl.DPOConfig):
    """TRL's DPOConfig, with bf16 and activation (gradient) checkpointing decided by the hardware unless set."""


def build_parser() -> TrlParser:
    # TRL's own parser (an HfArgumentParser, like every command's CommandParser): it brings TRL's
    # options with their help and its --config; parse_command_line reports mistakes as for every command.
    return TrlParser((DataArguments, DPOConfig, ModelConfig), prog="iterative-llm dpo", allow_abbrev=False)


def frozen_copy(model):
    """The reference model: the policy's current weights, copied, in eval mode, without gradients."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, example: dict, max_length: int | None) -> tuple[list[int], list[int], int]:
    """(prompt + chosen ids, prompt + rejected ids, prompt length), cut as DPOTrainer cuts them: the
    completion starts where the rendered prompt and prompt + reply part, and both are truncated to
    `max_length` tokens."""
    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt = render(example["prompt"], add_generation_prompt=True)
    chosen = render(example["prompt"] + example["chosen"])
    rejected = render(example["prompt"] + example["rejected"])
    start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if max_length is not None:
        chosen, rejected = chosen[:max_length], rejected[:max_length]
    return chosen, rejected, start


@torch.no_grad()
def completion_logps(model, sequences: list[tuple[list[int], int]], batch_size: int = 8, pad_id: int = 0) -> list[float]:
    """Summed log-probability of each sequence's tokens after its prompt (ids, prompt length)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (seq, _) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            for row, (seq, prompt_len) in enumerate(chunk):
                # token t is predicted at position t-1: completion tokens prompt_len..len-1
                out.append(logps[row, prompt_len - 1 : len(seq) - 1].sum().item())
    finally:
        model.train(was_training)
    return out


def preference_logps(model, tokenizer, pairs, max_length: int | None = None, batch_size: int = 8,
                     per_token: bool = False):
    """(chosen logps, rejected logps) of every pair in a dataset of prompt/chosen/rejected messages:
    summed over each reply's tokens, or with `per_token` also divided by the reply's token count, as
    (summed chosen, summed rejected, per-token chosen, per-token rejected)."""
    chosen, rejected = [], []
    for example in pairs:
        chosen_ids, rejected_ids, start = tokenize_pair(tokenizer, example, max_length)
        if max_length is not None and start >= max_length:
            continue  # the prompt alone fills max_length: no reply token left (DPOTrainer drops these too)
        chosen.append((chosen_ids, start))
        rejected.append((rejected_ids, start))
    pad = tokenizer.pad_token_id or 0
    summed = completion_logps(model, chosen, batch_size, pad), completion_logps(model, rejected, batch_size, pad)
    if not per_token:
        return summed
    means = tuple([logp / (len(ids) - start) for logp, (ids, start) in zip(logps, sequences)]
                  for logps, sequences in zip(summed, (chosen, rejected)))
    return summed + means


def preference_stats(chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy (share of pairs with chosen more likely), its standard error, and the mean margin."""
    n = len(chosen)
    if n == 0:
        raise ValueError("No held-out pair leaves room for a reply within max_length: raise --max_length.")
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy = sum(m > 0 for m in margins) / n
    return {"accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),
            "margin": sum(margins) / n, "n": n}


def reward_stats(before: tuple, after: tuple, beta: float) -> dict:
    """DPO's implicit reward beta * log(pi / pi_ref) against the starting model: accuracy and mean margin.

    Before training the policy is the reference, so both are 0 by definition; they are reported after.
    """
    margins = [beta * ((c1 - c0) - (r1 - r0)) for c0, r0, c1, r1 in zip(*before, *after)]
    n = len(margins)
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n, "n": n}


def paired_change(before: tuple, after: tuple) -> dict:
    """Whether the accuracy moved beyond chance, on the same pairs: how many pairs only the trained model
    ranks right (gained), how many only the starting model did (lost), and the two-sided exact sign-test
    (McNemar) p-value of that split under "no change"."""
    right_before = [c > r for c, r in zip(*before)]
    right_after = [c > r for c, r in zip(*after)]
    gained = sum(a and not b for b, a in zip(right_before, right_after))
    lost = sum(b and not a for b, a in zip(right_before, right_after))
    flips = gained + lost
    tail = sum(math.comb(flips, i) for i in range(min(gained, lost) + 1)) / 2**flips if flips else 0.5
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


def evaluate(model, tokenizer, pairs, args) -> tuple[dict, tuple, tuple]:
    """Preference statistics of held-out pairs, and the (chosen, rejected) summed and per-token logps."""
    logps = preference_logps(model, tokenizer, pairs, args.max_length, args.per_device_eval_batch_size, per_token=True)
    summed, per_token = logps[:2], logps[2:]
    stats = preference_stats(*summed)
    per_token_stats = preference_stats(*per_token)
    stats.update(per_token_accuracy=per_token_stats["accuracy"], per_token_accuracy_se=per_token_stats["accuracy_se"])
    return stats, summed, per_token


# ----------------------------------------------------------------------------------------------------
# The script


def make_trainer(model, tokenizer, train_dataset, heldout, training_args: DPOConfig, peft_config=None) -> DPOTrainer:
    """A DPOTrainer whose reference is the weights `model` holds now.

    With LoRA (adapter disabled) or precomputed log-probs (taken before the first step), TRL's reference
    already is the starting model; otherwise it gets a frozen copy rather than a reload of a path.
    """
    needs_copy = peft_config is None and not training_args.precompute_ref_log_probs
    return DPOTrainer(
        model=model,
        ref_model=frozen_copy(model) if needs_copy else None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run(script_args: DataArguments, training_args: DPOConfig, model_args: ModelConfig) -> dict:
    """Optimise on preference pairs, evaluate before and after, write the chat model folder. Returns the figures."""
    train_dataset, heldout, model, tokenizer, base_card = load_inputs(
        "dpo", load_preference_dataset, script_args, training_args, model_args)
    trainer = make_trainer(model, tokenizer, train_dataset, heldout, training_args, peft_config_from(model_args))

    def policy():
        return trainer.accelerator.unwrap_model(trainer.model)

    before = after = rewards = {}
    if heldout is not None:
        with trainer.accelerator.autocast():
            before, before_logps, before_per_token = evaluate(policy(), tokenizer, heldout, training_args)
    trained = timed_train(trainer, training_args)
    if heldout is not None:
        with trainer.accelerator.autocast():
            after, after_logps, after_per_token = evaluate(policy(), tokenizer, heldout, training_args)
        rewards = reward_stats(before_logps, after_logps, training_args.beta)
        rewards["paired"] = paired_change(before_logps, after_logps)
        rewards["paired_per_token"] = paired_change(before_per_token, after_per_token)

    figures = {"before": before, "after": after, "rewards": rewards, **trained}
    rows = _card_rows(script_args, training_args, model_args, len(train_dataset), heldout, figures)
    finish(trainer, tokenizer, "dpo", "Preference optimisation (DPO)", rows, figures, base_card,
           script_args, training_args, model_args)
    return figures


def _card_rows(script_args, training_args, model_args, n_train, heldout, figures) -> dict:
    before, after, rewards = figures["before"], figures["after"], figures["rewards"]
    stage = (f"direct preference optimisation with TRL DPOTrainer ({', '.join(training_args.loss_type)} loss, "
             f"beta {training_args.beta}); reference = the starting weights")
    rows = card_rows(stage, "pairs", script_args, training_args, model_args, n_train, heldout, figures)
    if before:
        rows["held-out preference accuracy (chosen more likely), before -> after"] = (
            f"{before['accuracy']:.1%} ± {before['accuracy_se']:.1%} -> {after['accuracy']:.1%} ± "
            f"{after['accuracy_se']:.1%} (n={after['n']}, ± one standard error)"
        )
        rows["held-out log-prob margin chosen - rejected, before -> after"] = (
            f"{before['margin']:.3f} -> {after['margin']:.3f}")
        paired = rewards["paired"]
        rows["held-out pairs ranked right only after / only before"] = (
            f"{paired['gained']} / {paired['lost']} (sign test p = {paired['p_value']:.2g})"
        )
        paired = rewards["paired_per_token"]
        rows["held-out preference accuracy per reply token, before -> after"] = (
            f"{before['per_token_accuracy']:.1%} -> {after['per_token_accuracy']:.1%} ± {after['per_token_accuracy_se']:.1%}; "
            f"ranked right only after / only before: {paired['gained']} / {paired['lost']} "
            f"(sign test p = {paired['p_value']:.2g})"
        )
        rows["held-out implicit reward accuracy, margin (after)"] = (
            f"{rewards['reward_accuracy']:.1%}, {rewards['reward_margin']:.4f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    return run_script(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
