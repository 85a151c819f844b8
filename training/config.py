"""Pretraining settings: one dataclass, YAML presets, command-line overrides.

`iterative-llm train --preset tiny --max_steps 200 --model.num_hidden_layers 6` resolves, in order:
the dataclass defaults, the preset's YAML (`training/presets/tiny.yaml`), an optional
`--config my.yaml`, then the command line. Model fields go under `model:` in YAML and
`--model.FIELD VALUE` on the command line; they override the model size preset named by
`model_preset`. Unknown fields are errors, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainConfig:
    # -- where things go
    out: str = "runs/tiny"  # the run folder: checkpoints, logs, metrics, and the final model
    resume: bool = False  # continue from the run folder's latest checkpoint
    seed: int = 1337

    # -- model
    model_preset: str = "tiny"  # a size from iterative_llm.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # config fields that override the size preset

    # -- data
    data: str = "builtin:python-docs"  # hub dataset name, local files/folders, or builtin:python-docs
    text_column: str = "text"
    doc_separator: str | None = None  # split .txt files into documents on this string
    val_data: str | None = None  # a separate validation source (else a share of the documents)
    val_fraction: float = 0.02
    max_documents: int | None = None  # read at most this many documents (hub datasets are large)
    data_cache: str | None = None  # token shards and tokenizer; default: OUT/data. Share it between runs.
    tokenizer: str | None = None  # a tokenizer folder; default: train one on the data
    tokenizer_train_chars: int = 50_000_000  # characters of the corpus the tokenizer is trained on

    # -- batch: `batch_size` sequences of `seq_len` tokens per process and micro-step; micro-steps
    #    are accumulated until `batch_tokens` tokens (all processes together) make one optimizer step.
    seq_len: int = 256
    batch_size: int = 32
    batch_tokens: int = 8192
    document_masking: bool = False  # attend only within a document (position ids restart at each boundary)

    # -- length: training stops at the first limit reached; the learning-rate schedule follows
    #    the fraction of that limit done, so a time budget gets a proper cool-down too.
    max_steps: int | None = 1000
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of training (evaluation excluded)

    # -- optimisation
    optimizer: str = "muon"  # "muon" (Muon for hidden matrices + AdamW) or "adamw" (the baseline)
    lr_matrix: float = 0.02  # Muon
    lr_embed: float = 0.3  # AdamW, token embedding
    lr_head: float = 0.004  # AdamW, output head
    lr_scalar: float = 0.04  # AdamW, norms and other vectors
    adamw_lr: float = 6e-4  # the "adamw" baseline
    weight_decay: float = 0.0
    schedule: str = "wsd"  # "wsd" (warmup, stable, linear cool-down) or "cosine"
    warmup_steps: int = 0
    cooldown_fraction: float = 0.4
    final_lr_ratio: float = 0.0
    muon_momentum_warmup_steps: int = 300
    grad_clip: float = 1.0  # 0 turns clipping off
    stop_if_not_learning: bool = True  # stop when the loss has not fallen after the first 2% (>= 20 steps)

    # -- speed
    precision: str = "auto"  # "auto" (bf16 where supported on GPU, else fp32), "bf16", "fp32"
    compile: bool = False  # torch.compile the model (each block and the loss; compiled before the clock starts)
    compile_check: bool = True  # with compile: stop if the compiled gradients differ from the eager ones
    activation_checkpointing: bool = False
    dataloader_pin_memory: bool = True

    # -- evaluation, logging, checkpoints
    eval_every: int = 200  # steps; 0 = only at the end
    eval_tokens: int | None = 262_144  # validation tokens per evaluation; null = the whole split
    sample_every: int = 0  # steps between sample generations; 0 = only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["The meaning of", "Once upon a time", "def "])
    sample_tokens: int = 48
    log_every: int = 10
    checkpoint_every: int = 500  # steps; 0 = only when stopping
    keep_checkpoints: int = 2
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "none"
    progress: bool = True
    hellaswag: str | None = None  # HellaSwag items scored at evaluations: a JSONL file or "hub"; null = none
    hellaswag_every: int = 0  # steps between HellaSwag scores, a multiple of eval_every; 0 = only at the end
    hellaswag_limit: int | None = None  # score only the first N items (null: all; the validation split has 10,042)


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"Config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field: value, not {type(data).__name__}.")
    return data


def available_presets() -> list[str]:
    """Pretraining presets; the folder also holds the alignment stages' `sft-*` and `dpo-*` files."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith(("sft-", "dpo-")))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if name not in available_presets():
        raise ValueError(f"Unknown training preset {name!r}. Available presets: {', '.join(available_presets())}.")
    return load_yaml(path)


def merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    """Overlay `update` on `base`, checking every key is a TrainConfig field."""
    fields = _field_types()
    merged = dict(base)
    for key, value in update.items():
        if key not in fields:
            close = [name for name in fields if key.replace("-", "_") == name or key in name]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown training field {key!r} in {source}.{hint} See `iterative-llm train --help`.")
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"`model` in {source} must be a mapping of model config fields.")
            merged["model"] = {**merged.get("model", {}), **value}
        else:
            merged[key] = value
    return merged


def _coerce(name: str, raw: str) -> Any:
    """Command-line strings to values: YAML rules (`true`, `3`, `1e-3`, `null`, `[a, b]`)."""
    annotation = str(_field_types()[name].type)
    optional = "None" in annotation
    if optional and raw.lower() in ("null", "none"):
        return None
    if annotation.startswith("str"):
        return raw  # keep "none", "0123" or "yes" as text for string fields
    return yaml.safe_load(raw)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog="iterative-llm train",
        description="Pretrain a model on text. Any field below can also be set in a YAML file (--config) or a preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", help=f"training preset: {', '.join(available_presets())}")
    parser.add_argument("--config", default=None, help="a YAML file of fields (applied after the preset)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flags = ["--" + f.name] + (["--" + f.name.replace("_", "-")] if "_" in f.name else [])
        # A boolean given alone (`--resume`) means true; `--resume false` also works.
        boolean = str(f.type) == "bool"
        parser.add_argument(*flags, dest=f.name, default=None, metavar="VALUE", nargs="?" if boolean else None,
                            const="true" if boolean else None, help=f"(default {getattr(defaults, f.name)!r})")
    args, rest = parser.parse_known_args(argv)

    # --model.FIELD VALUE pairs: overrides of the model config.
    model_overrides: dict[str, Any] = {}
    leftover = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--model."):
            key, _, inline = token[len("--model."):].partition("=")
            if not inline:
                if i + 1 >= len(rest):
                    parser.error(f"{token} needs a value")
                inline, i = rest[i + 1], i + 1
            model_overrides[key.replace("-", "_")] = yaml.safe_load(inline)
        else:
            leftover.append(token)
        i += 1
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")

    values: dict[str, Any] = merge({}, load_preset(args.preset), f"preset {args.preset!r}")
    if args.config:
        values = merge(values, load_yaml(args.config), args.config)
    cli = {name: _coerce(name, raw) for name, raw in vars(args).items() if name not in ("preset", "config") and raw is not None}
    values = merge(values, cli, "the command line")
    if model_overrides:
        values = merge(values, {"model": model_overrides}, "the command line")
    return build_config(values)


def build_config(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a dict, with every value checked so mistakes fail before any work is done."""
    config = TrainConfig(**merge({}, values, "the settings"))
    if config.optimizer not in ("muon", "adamw"):
        raise ValueError(f"`optimizer` must be 'muon' or 'adamw', got {config.optimizer!r}.")
    if config.schedule not in ("wsd", "cosine"):
        raise ValueError(f"`schedule` must be 'wsd' or 'cosine', got {config.schedule!r}.")
    if config.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"`precision` must be 'auto', 'bf16' or 'fp32', got {config.precision!r}.")
    if config.report_to not in ("tensorboard", "wandb", "none"):
        raise ValueError(f"`report_to` must be 'tensorboard', 'wandb' or 'none', got {config.report_to!r}.")
    if not any((config.max_steps, config.max_tokens, config.max_time)):
        raise ValueError("Give at least one of `max_steps`, `max_tokens` or `max_time`, or training never ends.")
    for name in ("seq_len", "batch_size", "batch_tokens"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {getattr(config, name)!r}.")
    if not 0.0 <= config.cooldown_fraction <= 1.0:
        raise ValueError(f"`cooldown_fraction` must be in [0, 1], got {config.cooldown_fraction!r}.")
    from .multiple_choice import check_training_settings

    check_training_settings(config)  # the hellaswag* fields
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
