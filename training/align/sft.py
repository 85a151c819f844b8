"""Supervised fine-tuning with TRL's SFTTrainer: a pretrained model folder + conversations -> a chat model.

    iterative-llm sft --model_name_or_path runs/NAME --dataset_name conversations.jsonl --output_dir runs/NAME-sft
    iterative-llm sft --config training/presets/sft-tiny.yaml --max_steps 50      # YAML, then overrides
    accelerate launch -m training.align.sft --config ...                                  # one or more GPUs

The shape of TRL's own `trl/scripts/sft.py`: dataclass arguments parsed by `TrlParser` (which reads
`--config x.yaml` and lets the command line override it) and a `main()`. What this script adds:
- data in any common shape (`training/align/data.py`): hub name or local file/folder; `messages`,
  prompt/completion, question/answer, instruction/response or "### Human: ... ### Assistant: ..." text;
- our chat template renders every conversation, and the loss covers the assistant replies and their
  closing `<|end|>` only (`assistant_only_loss`, through the template's {% generation %} markers);
- packing on by default (padding-free: each packed sequence attends only to itself);
- CPU-safe defaults: bf16 and activation (gradient) checkpointing only on a GPU, unless asked for;
- optional LoRA (`--use_peft`), merged into the saved weights;
- evaluation before and after on held-out conversations: the loss on the replies, and the share of
  held-out prompts whose greedy reply ends its turn with `<|end|>`;
- a Hugging Face model folder with tokenizer, chat template, a generation config that stops at the
  end of the turn (`training/align/model_folder.py`), and a model card section with the stage, data, steps
  and figures.
The steps of `run()` and `main()` that `training/align/dpo.py` shares are in `training/align/common.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl
from trl import ModelConfig, SFTTrainer, TrlParser

from iterative_llm.console import make_output_safe
from training.align.common import DeviceDefaults, card_rows, finish, load_inputs, peft_config_from, run_script, timed_train
from training.align.data import DataArguments, load_sft_dataset
from training.align.model_folder import end_of_turn_ids


@dataclass
class SFTScriptArguments(DataArguments):
    eval_generations: int = field(
        default=100,
        metadata={"help": "Held-out prompts to answer greedily when measuring how many replies end their turn "
                  "(0: skip the measurement)."},
    )
    eval_max_new_tokens: int = field(
        default=128, metadata={"help": "Token limit of each evaluation reply; a reply must end its turn within it."}
    )
    eval_generation_batch_size: int = field(default=16, metadata={"help": "Prompts answered at once in that measurement."})
    eval_repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Repetition penalty of those greedy replies (1.0: none; `iterative-llm chat` uses 1.1). "
                  "Small models fall into greedy loops that a penalty breaks."},
    )

    def __post_init__(self):
        if not self.eval_repetition_penalty > 0:
            raise ValueError(
                f"--eval_repetition_penalty must be a positive number (1.0 means no penalty), got {self.eval_repetition_penalty}."
            )


@dataclass
class SFTConfig(DeviceDefaults, trl.SFTConfig):
    """TRL's SFTConfig with our defaults: packing and assistant-only loss on; bf16 and gradient
    checkpointing decided by the hardware unless set (see `resolve_device_defaults`)."""

    packing: bool = field(default=True, metadata={"help": "Pack conversations into max_length sequences."})
    assistant_only_loss: bool = field(default=True, metadata={"help": "Train on the assistant replies only."})


def build_parser() -> TrlParser:
    # TRL's own parser (an HfArgumentParser, like every command's CommandParser): it brings TRL's
    # options with their help and its --config; parse_command_line reports mistakes as for every command.
    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig), prog="iterative-llm sft", allow_abbrev=False)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def heldout_loss(trainer: SFTTrainer, heldout) -> float:
    """Mean loss per reply token on held-out conversations (the same masking as training)."""
    return trainer.evaluate(eval_dataset=heldout, metric_key_prefix="heldout")["heldout_loss"]


def end_of_turn_decoding(repetition_penalty: float) -> str:
    """How the end-of-turn check decodes, in words, for tables and model cards."""
    return "greedy" + (f", repetition penalty {repetition_penalty:g}" if repetition_penalty != 1.0 else "")


@torch.no_grad()
def end_of_turn_share(
    model, tokenizer, conversations, max_new_tokens: int = 128, batch_size: int = 16, repetition_penalty: float = 1.0
) -> dict:
    """Greedy replies to held-out prompts: how many end their turn (emit `<|end|>`) within `max_new_tokens`.

    Each conversation is cut before its last assistant reply and rendered with the generation prompt.
    Prompts too long to leave room for the reply are skipped. Returns {"ended", "n", "share", "samples"}.
    """
    end_id = end_of_turn_ids(tokenizer)[0]
    limit = getattr(model.config, "max_position_embeddings", None)
    prompts = []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True, return_dict=True)
        if limit is None or len(ids["input_ids"]) + max_new_tokens <= limit:
            prompts.append(ids["input_ids"])

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    ended, samples = 0, []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt").to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=repetition_penalty,
                eos_token_id=end_of_turn_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                ended += end_id in row
                if len(samples) < 5:
                    samples.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    n = len(prompts)
    return {"ended": ended, "n": n, "share": ended / n if n else float("nan"), "samples": samples}


def evaluate(trainer: SFTTrainer, tokenizer, heldout, args: SFTScriptArguments) -> dict:
    if heldout is None:
        return {}
    metrics = {"heldout_loss": heldout_loss(trainer, heldout)}
    if args.eval_generations > 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        conversations = heldout.select(range(min(args.eval_generations, len(heldout))))["messages"]
        with trainer.accelerator.autocast():
            share = end_of_turn_share(
                model, tokenizer, conversations, args.eval_max_new_tokens, args.eval_generation_batch_size,
                args.eval_repetition_penalty,
            )
        metrics.update(end_of_turn_share=share["share"], end_of_turn_n=share["n"], samples=share["samples"])
    return metrics


# ----------------------------------------------------------------------------------------------------
# The script


def make_trainer(model, tokenizer, train_dataset, heldout, training_args: SFTConfig, peft_config=None) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    """Fine-tune, evaluate before and after, and write the chat model folder. Returns the figures."""
    train_dataset, heldout, model, tokenizer, base_card = load_inputs(
        "sft", load_sft_dataset, script_args, training_args, model_args)
    trainer = make_trainer(model, tokenizer, train_dataset, heldout, training_args, peft_config_from(model_args))

    before = evaluate(trainer, tokenizer, heldout, script_args)
    trained = timed_train(trainer, training_args)
    after = evaluate(trainer, tokenizer, heldout, script_args)

    figures = {"before": before, "after": after, **trained}
    rows = _card_rows(script_args, training_args, model_args, len(train_dataset), heldout, figures)
    finish(trainer, tokenizer, "sft", "Supervised fine-tuning (SFT)", rows, figures, base_card,
           script_args, training_args, model_args)
    return figures


def _card_rows(script_args, training_args, model_args, n_train, heldout, figures) -> dict:
    before, after = figures["before"], figures["after"]
    stage = ("supervised fine-tuning with TRL SFTTrainer (loss on assistant replies only"
             + (", packed" if training_args.packing else "") + ")")
    rows = card_rows(stage, "conversations", script_args, training_args, model_args, n_train, heldout, figures)
    if before:
        rows["held-out loss (reply tokens), before -> after"] = f"{before['heldout_loss']:.4f} -> {after['heldout_loss']:.4f}"
    if "end_of_turn_share" in after:
        decoding = end_of_turn_decoding(script_args.eval_repetition_penalty)
        rows[f"replies that end their turn within {script_args.eval_max_new_tokens} tokens ({decoding}), "
             "before -> after"] = (
            f"{before['end_of_turn_share']:.1%} -> {after['end_of_turn_share']:.1%} (n={after['end_of_turn_n']})"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    return run_script(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
