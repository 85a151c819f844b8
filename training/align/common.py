"""What `training/align/sft.py` and `training/align/dpo.py` share: the command line, the hardware-dependent defaults,
and the steps of `run()` around each script's own trainer and evaluation.

Both scripts keep the shape of TRL's `trl/scripts/sft.py` and `dpo.py` (dataclass arguments, `TrlParser`,
`run()`, `main()`) and read top to bottom; what is the same in both lives here once, so the two cannot
drift apart. Their data shapes are in `training/align/data.py`, reading and writing model
folders in `training/align/model_folder.py`.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

from iterative_llm.command_line import parse_command_line
from training.align.model_card import append_model_card_section
from training.align.model_folder import (
    default_output_dir,
    load_starting_model,
    read_model_card,
    save_chat_model,
    write_summary,
)


class InputError(ValueError):
    """A problem with what the user gave (data, model folder, options): reported in one line, no traceback."""


def resolve_device_defaults(args) -> None:
    """TRL defaults to bf16 and gradient checkpointing, which fail or only cost time on a CPU.

    `bf16=None` becomes True only on a GPU that computes it natively (an NVIDIA card from Ampere on, an
    Apple GPU that measures it faster: training/machine.py; a T4 or an M1 only emulates it, slower
    than float32), as pretraining's plan decides; activation checkpointing left unset
    (`activation_checkpointing`, or its deprecated alias `gradient_checkpointing`) becomes False on a
    CPU and TRL's default (True) on a GPU. Setting the new name keeps transformers (5.x) from warning
    that the old one is deprecated. Explicit values are left alone. On a machine
    with no accelerator at all, `use_cpu` is set (so `torchrun` gives CPU data parallelism rather
    than independent copies of the run) and the data loader does not pin memory.
    """
    import torch

    from training.machine import default_device, fast_matmul_dtype

    gpu = torch.cuda.is_available() and not args.use_cpu
    if args.bf16 is None and not args.fp16:
        device = torch.device("cpu") if args.use_cpu else default_device()
        args.bf16 = device.type in ("cuda", "mps") and fast_matmul_dtype(device) == torch.bfloat16
    if getattr(args, "activation_checkpointing", None) is None and args.gradient_checkpointing is None:
        args.activation_checkpointing = args.gradient_checkpointing = gpu
    accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if not accelerator:
        args.use_cpu = True
    if not gpu:
        args.dataloader_pin_memory = False  # pinned memory only speeds up copies to a GPU


@dataclass
class DeviceDefaults:
    """Mixed into TRL's SFTConfig and DPOConfig: bf16 and activation (gradient) checkpointing decided by
    the hardware unless set (see `resolve_device_defaults`)."""

    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in backward to save memory (default: on a GPU only).",
                                "nargs": "?", "const": True},
    )
    # TRL sets the deprecated alias to True; unset, it follows activation_checkpointing.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of --activation_checkpointing.", "nargs": "?", "const": True}
    )

    def __post_init__(self):
        resolve_device_defaults(self)
        super().__post_init__()


def peft_config_from(model_args):
    """TRL's LoRA config from the `--use_peft --lora_*` flags, with every linear layer as the default target
    (PEFT knows no default target modules for a new model type)."""
    from trl import get_peft_config

    if model_args.use_peft and not model_args.lora_target_modules and not model_args.lora_target_parameters:
        model_args = copy.copy(model_args)
        model_args.lora_target_modules = "all-linear"
    return get_peft_config(model_args)


# ----------------------------------------------------------------------------------------------------
# The steps of run()


def load_inputs(stage: str, load_dataset, script_args, training_args, model_args):
    """(train, heldout, model, tokenizer, base_card): the data (`load_dataset(script_args, seed)`), the
    starting model and its model card; a mistake in what the user gave becomes an InputError. Without
    --output_dir the output goes beside the starting folder, as NAME-{stage}."""
    try:  # the data first: its mistakes show in seconds, before the model loads
        train_dataset, heldout = load_dataset(script_args, seed=training_args.seed)
        model, tokenizer = load_starting_model(model_args, training_args)
    except (ValueError, OSError) as err:
        raise InputError(str(err)) from err
    model_path = model_args.model_name_or_path
    default_output_dir(training_args, model_path, stage)
    base_card = read_model_card(model_path)
    return train_dataset, heldout, model, tokenizer, base_card


def timed_train(trainer, training_args) -> dict:
    """Train (resuming if asked): the mean training loss, the steps and the seconds, for the figures."""
    start = time.time()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    seconds = time.time() - start
    return {"train_loss": result.training_loss, "steps": result.global_step, "train_seconds": seconds}


def card_rows(stage: str, unit: str, script_args, training_args, model_args, n_train: int, heldout, figures) -> dict:
    """The rows every stage's model-card section starts with; each script adds its evaluation's rows.
    `unit` names what the data holds ("conversations", "pairs")."""
    return {
        "stage": stage,
        "started from": model_args.model_name_or_path,
        "data": f"{script_args.dataset_name} ({script_args.dataset_split}): {n_train} {unit} for training, "
                f"{0 if heldout is None else len(heldout)} held out",
        "steps": figures["steps"],
        "learning rate, batch": f"{training_args.learning_rate:g}, {training_args.per_device_train_batch_size} x "
                                f"{training_args.gradient_accumulation_steps} x {training_args.world_size} "
                                f"(max_length {training_args.max_length})",
        "LoRA": f"r={model_args.lora_r}, alpha={model_args.lora_alpha} (merged)" if model_args.use_peft else "no",
        "mean training loss": figures["train_loss"],
    }


def finish(trainer, tokenizer, stage: str, title: str, rows: dict, figures: dict, base_card: str,
           script_args, training_args, model_args) -> None:
    """Write the chat model folder, its model card section `title` (`rows`) and `{stage}_summary.json`."""
    output_dir = training_args.output_dir
    save_chat_model(trainer, tokenizer, output_dir, base_card)
    if trainer.accelerator.is_main_process:
        append_model_card_section(output_dir, title, rows)
        model_path = model_args.model_name_or_path
        write_summary(output_dir, stage, {"model": model_path, "data": vars(script_args),
                                          "training": training_args.to_dict(), "lora": model_args.use_peft, **figures})
    trainer.accelerator.print(f"Chat model written to {output_dir}")
    if hasattr(trainer, "end"):
        trainer.end()  # finish trackers, destroy the process group (transformers >= 5.18)


def run_script(parser, run, argv: list[str] | None) -> int:
    """A script's `main()`: parse the command line, `run`, and report an InputError in one line (exit 2)."""
    # TrlParser reads --config itself; the shared step reports a typo or a bad value as a usage error.
    script_args, training_args, model_args = parse_command_line(
        parser, argv, parse=lambda args: parser.parse_args_and_config(args=args, return_remaining_strings=True))
    try:
        run(script_args, training_args, model_args)
    except InputError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    return 0
