"""Model folders in and out of the alignment stages: what `training/align/sft.py`, `training/align/dpo.py` and
`training/align/chat.py` read from a model folder and write to one.

In: the tokenizer, which must carry a chat template (SFT, DPO and chat all render with it), and the
starting model, checked against it. Out: a plain Hugging Face folder (weights, config and modeling
files, tokenizer, a generation config that stops at the end of the assistant's turn), the previous
stages' model card carried over, and a `{stage}_summary.json` of the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

# Importing the package registers our model type with the Auto classes, before any folder is loaded.
from iterative_llm.tokenization import END_OF_TURN, check_tokenizer_matches_model, has_chat_template

from training.versions import package_versions

logger = logging.getLogger(__name__)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant reply: the chat template's `<|end|>` (if the vocabulary has it), then eos."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[END_OF_TURN]] if END_OF_TURN in vocab else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_tokenizer_with_template(path: str, trust_remote_code: bool = False, revision: str | None = None,
                                 template_file: str | None = None):
    """The model folder's tokenizer, which must carry a chat template (SFT, DPO and chat all render with it).

    `template_file` (a .jinja file) replaces the folder's template, or supplies one it lacks.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if template_file:
        if not (os.path.isfile(template_file) and template_file.endswith((".jinja", ".j2"))):
            raise ValueError(f"--chat_template_path {template_file!r}: expected a .jinja file.")
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"The model folder {path!r} has no chat template: SFT, DPO and chat render conversations with it. "
            f"Save the tokenizer with one (iterative_llm.tokenization.CHAT_TEMPLATE, written as chat_template.jinja "
            f"in the folder), or pass --chat_template_path FILE.jinja."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_starting_model(model_args, training_args):
    """(model, tokenizer) from `--model_name_or_path`, checked against each other; `max_length` capped
    at the model's context."""
    path = model_args.model_name_or_path
    if not path:
        raise ValueError("No model given: pass --model_name_or_path (a model folder, e.g. a pretraining run).")
    trust = training_args.trust_remote_code
    template_file = getattr(training_args, "chat_template_path", None)
    tokenizer = load_tokenizer_with_template(path, trust, model_args.model_revision, template_file)
    if template_file:
        training_args.chat_template_path = None  # applied above; TRL must not apply it again
    model = load_causal_lm(path, model_args, trust)
    check_tokenizer_matches_model(tokenizer, model.config)
    fit_max_length(training_args, model)
    return model, tokenizer


def load_causal_lm(path: str, model_args, trust_remote_code: bool = False):
    """The starting model, loaded the way TRL would load it from a path (float32 unless asked otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype or "float32"
    if dtype != "auto":
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=model_args.model_revision)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def fit_max_length(args, model) -> None:
    """Sequences longer than the model's context cannot run: cap `max_length` at `max_position_embeddings`."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and (args.max_length is None or args.max_length > limit):
        logger.warning("max_length %s is more than the model's context; using %d.", args.max_length, limit)
        args.max_length = limit


def default_output_dir(args, model_path: str, stage: str) -> None:
    """Without --output_dir, write next to the starting folder: runs/NAME -> runs/NAME-sft."""
    if args.output_dir in (None, "", "trainer_output"):
        args.output_dir = f"{str(model_path).rstrip('/')}-{stage}"


def read_model_card(path: str) -> str:
    """The starting folder's model card, carried into the output folder below the new stage's section."""
    card = Path(path) / "README.md"
    return card.read_text(encoding="utf-8") if card.is_file() else ""


def save_chat_model(trainer, tokenizer, output_dir: str, base_card: str) -> None:
    """Write a plain Hugging Face model folder: weights (a LoRA adapter merged in; the adapter itself in
    `adapter/`), config and modeling files, tokenizer with chat template, and a generation config that
    stops at the end of the assistant's turn. The previous stages' model card is carried over."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        if trainer.accelerator.is_main_process:
            model.save_pretrained(os.path.join(output_dir, "adapter"))
            merged = model.merge_and_unload()
            _stop_at_end_of_turn(merged, tokenizer)
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    else:
        _stop_at_end_of_turn(model, tokenizer)
        trainer.save_model(output_dir)  # gathers sharded weights (FSDP, DeepSpeed); writes on the main process
    if trainer.accelerator.is_main_process:
        card = Path(output_dir) / "README.md"  # TRL's checkpoint saves write a card of their own: replace it
        if base_card:
            card.write_text(base_card, encoding="utf-8")
        else:
            card.unlink(missing_ok=True)


def _stop_at_end_of_turn(model, tokenizer) -> None:
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def write_summary(output_dir: str, stage: str, summary: dict[str, Any]) -> None:
    """`{stage}_summary.json` beside the weights: resolved arguments, metrics and versions of this run."""
    summary = dict(summary)
    summary["versions"] = package_versions()
    Path(output_dir, f"{stage}_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
