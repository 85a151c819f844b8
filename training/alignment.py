"""What `training/sft.py` and `training/dpo.py` share besides their data and model folders: the command
line, the hardware-dependent defaults and the LoRA flags.

Their data shapes are in `training/alignment_data.py`, reading and writing model folders in
`training/model_folder.py`.
"""

from __future__ import annotations

import copy


class InputError(ValueError):
    """A problem with what the user gave (data, model folder, options): reported in one line, no traceback."""


def parse_command_line(parser, argv: list[str] | None):
    """`parser.parse_args_and_config` (TrlParser), with a mistyped option or a bad value reported as a usage
    error, not a traceback."""
    try:
        *parsed, unknown = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    except ValueError as err:  # a value a config's __post_init__ refuses
        parser.error(str(err))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return parsed


def resolve_device_defaults(args) -> None:
    """TRL defaults to bf16 and gradient checkpointing, which fail or only cost time on a CPU.

    `bf16=None` becomes True only on a GPU that supports it; activation checkpointing left unset
    (`activation_checkpointing`, or its deprecated alias `gradient_checkpointing`) becomes False on a
    CPU and TRL's default (True) on a GPU. Setting the new name keeps transformers (5.x) from warning
    that the old one is deprecated. Explicit values are left alone. On a machine
    with no accelerator at all, `use_cpu` is set (so `torchrun` gives CPU data parallelism rather
    than independent copies of the run) and the data loader does not pin memory.
    """
    import torch

    gpu = torch.cuda.is_available() and not args.use_cpu
    if args.bf16 is None and not args.fp16:
        args.bf16 = bool(gpu and torch.cuda.is_bf16_supported())
    if getattr(args, "activation_checkpointing", None) is None and args.gradient_checkpointing is None:
        args.activation_checkpointing = args.gradient_checkpointing = gpu
    accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if not accelerator:
        args.use_cpu = True
    if not gpu:
        args.dataloader_pin_memory = False  # pinned memory only speeds up copies to a GPU


def peft_config_from(model_args):
    """TRL's LoRA config from the `--use_peft --lora_*` flags, with every linear layer as the default target
    (PEFT knows no default target modules for a new model type)."""
    from trl import get_peft_config

    if model_args.use_peft and not model_args.lora_target_modules and not model_args.lora_target_parameters:
        model_args = copy.copy(model_args)
        model_args.lora_target_modules = "all-linear"
    return get_peft_config(model_args)


