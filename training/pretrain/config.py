"""Pretraining settings: one dataclass, YAML presets, command-line overrides.

`iterative-llm train --preset tiny --max_steps 200 --model.num_hidden_layers 6` resolves, in order:
the dataclass defaults, the preset's YAML (`training/presets/tiny.yaml`), an optional
`--config my.yaml`, then the command line. Model fields go under `model:` in YAML and
`--model.FIELD VALUE` on the command line; they override the model size preset named by
`model_preset`. Unknown fields are errors, never silently ignored, and options are never abbreviated.

`--resume` starts instead from the run's own settings (`OUT/run_config.yaml`): only the settings in
RESUME_MAY_CHANGE may differ there, since any other would change the data order or the model.
Each field's `--help` line lives beside it, in `setting(default, help)`; the parser is a CommandParser and
its mistakes are reported as every command's are (iterative_llm/command_line.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iterative_llm import run_folder
from iterative_llm.command_line import CommandParser, HelpFormatter, did_you_mean, metavar, parse_command_line, shown

from training.data.prepare import TOKENIZER_TRAIN_CHARS
from training.data.sources import ON_DECODE_ERROR
from training.pretrain.budget import parse_duration

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"  # training/presets: pretraining's and alignment's


def setting(default: Any, help: str) -> Any:
    """A TrainConfig field with its one-line description (shown by `iterative-llm train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # -- where things go
    out: str = setting("runs/tiny", "the run folder: checkpoints, logs, metrics and the final model")
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint, with the run's own settings")
    seed: int = setting(1337, "seed of the initial weights and of the data order")

    # -- model
    model_preset: str = setting("tiny", "a model size from iterative_llm.PRESETS, or auto: the best for --time_budget")
    model: dict[str, Any] = setting({}, "a model config field that overrides the size preset")

    # -- data
    data: str = setting("builtin:python-docs", "hub dataset NAME[:CONFIG], local files or folders, or builtin:python-docs")
    text_column: str = setting("text", "the column that holds the text in .jsonl, .json, .parquet and hub data")
    doc_separator: str | None = setting(None, "split .txt files into documents on this string")
    val_data: str | None = setting(None, "a separate validation source (else a share of the documents is held out)")
    val_fraction: float = setting(0.02, "the share of the data held out for validation when --val_data is not given")
    max_documents: int | None = setting(None, "read at most this many documents (hub datasets are large)")
    on_decode_error: str = setting("stop", "a file that is not UTF-8: stop (and name it), replace (its bad bytes "
                                           "become U+FFFD) or skip (leave it out)")
    tokenise_beside_training: bool | str = setting(
        "auto", "tokenise more of the data in a thread while training runs, under --time_budget; auto = on a GPU "
                "(its CPU is idle), not on a CPU (its cores train)")
    data_cache: str | None = setting(None, "folder of the token shards and tokenizer, to share between runs; none = OUT/data")
    tokenizer: str | None = setting(None, "a tokenizer folder; none = train a byte-level BPE on the data")
    tokenizer_train_chars: int = setting(TOKENIZER_TRAIN_CHARS, "characters of the corpus the tokenizer is trained on")

    # -- batch: `batch_size` sequences of `seq_len` tokens per process and micro-step; micro-steps
    #    are accumulated until `batch_tokens` tokens (all processes together) make one optimizer step.
    seq_len: int = setting(256, "tokens per training sequence")
    batch_size: int | str = setting(32, "sequences per process and micro-step; auto = the most the device's memory holds")
    batch_tokens: int = setting(8192, "tokens per optimizer step, all processes together (micro-steps are accumulated)")
    document_masking: bool = setting(False, "attend only within a document (position ids restart at each boundary)")

    # -- length: training stops at the first limit reached; the learning-rate schedule follows
    #    the fraction of that limit done, so a time budget gets a proper cool-down too.
    max_steps: int | None = setting(1000, "stop after this many optimizer steps")
    max_tokens: int | None = setting(None, "stop after this many training tokens")
    max_time: float | None = setting(None, "stop after this many seconds of training (evaluation excluded)")
    time_budget: str | None = setting(None, "the whole command's time, data to model folder: 2h, 90m, 45s or seconds")

    # -- optimisation
    optimizer: str = setting("muon", "muon (Muon for hidden matrices + AdamW) or adamw (the baseline)")
    lr_matrix: float = setting(0.02, "Muon learning rate of the hidden weight matrices")
    lr_embed: float = setting(0.3, "AdamW learning rate of the token embedding")
    lr_head: float = setting(0.004, "AdamW learning rate of the output head")
    lr_scalar: float = setting(0.04, "AdamW learning rate of norms and other vectors")
    adamw_lr: float = setting(6e-4, "learning rate of the adamw baseline")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    schedule: str = setting("wsd", "wsd (warmup, stable, linear cool-down) or cosine")
    warmup_steps: int = setting(0, "steps of linear learning-rate warmup")
    cooldown_fraction: float = setting(0.4, "the share of the budget spent cooling the learning rate down (wsd)")
    final_lr_ratio: float = setting(0.0, "the learning rate at the end, as a share of the peak")
    muon_momentum_warmup_steps: int = setting(300, "steps over which Muon's momentum rises to its final value")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 turns clipping off")
    stop_if_not_learning: bool = setting(True, "stop when the loss has not fallen after the first 2% of the run (>= 20 steps)")

    # -- speed
    precision: str = setting("auto", "auto (bf16 where native, fp16 on CUDA cards without it, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool = setting(False, "torch.compile each block and the loss, before the clock starts")
    compile_check: bool = setting(True, "with --compile: stop if the compiled gradients differ from the eager ones")
    activation_checkpointing: bool | str = setting(
        "auto", "recompute activations in the backward pass to save memory; auto = when one sequence does not fit")
    dataloader_pin_memory: bool = setting(True, "pin batches in page-locked memory for faster GPU copies")
    threads: int | None = setting(None, "torch threads per process; none = OMP_NUM_THREADS if set, else one per physical core")

    # -- evaluation, logging, checkpoints
    eval_every: int = setting(200, "steps between evaluations; 0 = only at the end")
    eval_tokens: int | None = setting(262_144, "validation tokens per evaluation; none = the whole split")
    sample_every: int = setting(0, "steps between sample generations; 0 = only at the end")
    sample_prompts: list[str] = setting(["The meaning of", "Once upon a time", "def "], "prompts of the samples")
    sample_tokens: int = setting(48, "tokens generated per sample")
    log_every: int = setting(10, "steps between logged training losses")
    checkpoint_every: int = setting(500, "steps between checkpoints; 0 = only when stopping")
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep")
    report_to: str = setting("tensorboard", "tensorboard (OUT/logs), wandb or none")
    progress: bool = setting(True, "show progress bars")
    hellaswag: str | None = setting(None, "HellaSwag items scored at evaluations: a JSONL file or hub; none = none")
    hellaswag_every: int = setting(0, "steps between HellaSwag scores, a multiple of eval_every; 0 = only at the end")
    hellaswag_limit: int | None = setting(None, "score only the first N HellaSwag items (none: all 10,042)")


# The sections of `--help`: (title, the first field of the section), in field order.
SECTIONS = (
    ("where things go", "out"),
    ("model", "model_preset"),
    ("data", "data"),
    ("batch", "seq_len"),
    ("length: training stops at the first limit reached", "max_steps"),
    ("optimisation", "optimizer"),
    ("speed", "precision"),
    ("evaluation, logging, checkpoints", "eval_every"),
)
# Settings that `--resume` may change: they neither reorder the data nor change the model.
RESUME_MAY_CHANGE = (
    "out", "resume", "max_steps", "max_tokens", "max_time", "time_budget", "eval_every", "eval_tokens", "sample_every",
    "sample_prompts", "sample_tokens", "log_every", "checkpoint_every", "keep_checkpoints", "report_to",
    "progress", "dataloader_pin_memory", "threads", "compile", "compile_check", "activation_checkpointing", "stop_if_not_learning",
    "tokenise_beside_training", "hellaswag", "hellaswag_every", "hellaswag_limit",
)


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def model_fields() -> list[str]:
    """The names a `model:` mapping (or `--model.FIELD`) may set: IterativeLLMConfig's own and its base's."""
    import inspect

    from iterative_llm import IterativeLLMConfig
    from transformers import PretrainedConfig

    own = [name for name, p in inspect.signature(IterativeLLMConfig.__init__).parameters.items()
           if name != "self" and p.kind is not p.VAR_KEYWORD]
    return own + [f.name for f in dataclasses.fields(PretrainedConfig) if f.name not in own]


def merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    """Overlay `update` on `base`, checking every key is a TrainConfig field (and every model key a model field)."""
    fields = _field_types()
    merged = dict(base)
    for key, value in update.items():
        if key not in fields:
            raise ValueError(f"Unknown training field {key!r} in {source}.{did_you_mean(key, list(fields))} "
                             "See `iterative-llm train --help`.")
        if key == "model":
            if not isinstance(value, dict):
                raise ValueError(f"`model` in {source} must be a mapping of model config fields.")
            known = model_fields()
            for name in value:
                if name not in known:
                    raise ValueError(
                        f"Unknown model field {name!r} in {source}.{did_you_mean(name, known)} The model fields "
                        f"are IterativeLLMConfig's: {', '.join(known[:known.index('pad_token_id') + 1])}."
                    )
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
    return _yaml_value(f"--{name}", raw)


def _yaml_value(option: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:  # `[a, b` : a usage error, not a traceback
        raise ValueError(f"{option} {raw!r} is not a value ({getattr(err, 'problem', None) or 'not YAML'})") from None


def _build_parser(defaults: dict[str, Any], preset: str) -> CommandParser:
    """The `train` parser; `defaults` are the values that apply when an option is left out.

    Its options are TrainConfig's fields, but the values stay text until `_coerce` reads them as
    YAML, since a preset or --config sets the default under the command line: so every option has
    no default of its own (SUPPRESS: what was given is what the namespace holds) and its --help line
    names the default that applies."""
    parser = CommandParser(
        prog="iterative-llm train",
        description="Pretrain a model on text. Every option can also be set in a preset or a YAML file "
                    "(--config). The defaults shown are the ones that apply: the preset's, then --config's.",
        usage="iterative-llm train [--preset NAME] [--config FILE] [--OPTION VALUE ...] [--model.FIELD VALUE ...]",
        formatter_class=lambda prog: HelpFormatter(prog, max_help_position=34),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--preset", metavar="NAME",
                        help=f"training preset: {', '.join(available_presets())} (default: tiny)")
    parser.add_argument("--config", metavar="FILE", help="a YAML file of settings, applied after the preset")
    starts = {first: title for title, first in SECTIONS}
    kinds = typing.get_type_hints(TrainConfig)
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in starts:
            group = parser.add_argument_group(starts[f.name])
        if f.name == "model":
            shape = defaults.get("model") or {}
            group.add_argument("--model.FIELD", dest="_model_help", metavar="VALUE",
                               help=f"{f.metadata['help']}, e.g. --model.num_hidden_layers 6 (default: "
                                    f"{shown(shape) if shape else 'none'})")
            continue
        boolean = kinds[f.name] is bool or bool in typing.get_args(kinds[f.name])  # `bool | str`: true, false, auto
        # A boolean given alone (`--resume`) means true; `--resume false` also works.
        kwargs = dict(dest=f.name, metavar=metavar(kinds[f.name]), nargs="?" if boolean else None,
                      const="true" if boolean else None)
        text = f"{f.metadata['help']} (default: {shown(defaults[f.name])})".replace("%", "%%")  # argparse formats help
        group.add_argument("--" + f.name, help=text, **kwargs)
        if "_" in f.name:
            # --max-steps works as well as --max_steps, unlisted: train's --help is long and grouped,
            # and lists each of its ~50 options on one line with its default.
            group.add_argument("--" + f.name.replace("_", "-"), help=argparse.SUPPRESS, **kwargs)
    return parser


def _preset_and_file(argv: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the preset's name, its values merged with --config's, --config's alone), read before the rest of
    the command line so that `--help` shows the defaults that will apply."""
    first = CommandParser(add_help=False)
    first.add_argument("--preset", default="tiny")
    first.add_argument("--config", default=None)
    early, _ = first.parse_known_args(argv)
    values = merge({}, load_preset(early.preset), f"preset {early.preset!r}")
    file_values = merge({}, load_yaml(early.config), early.config) if early.config else {}
    return early.preset, merge(values, file_values, str(early.config)), file_values


def build_parser(argv: list[str] | None = None) -> CommandParser:
    """The `train` parser, its --help showing the defaults under the --preset and --config in `argv`."""
    preset, values, _ = _preset_and_file(list(argv or []))
    return _build_parser({**to_dict(TrainConfig()), **values}, preset)


def _parse_known(parser: CommandParser, argv: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the options given, the --model.FIELD overrides, the strings left over), for parse_command_line."""
    args, rest = parser.parse_known_args(argv)
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
            model_overrides[key.replace("-", "_")] = _yaml_value(token, inline)
        else:
            leftover.append(token)
        i += 1
    if leftover:
        return {}, {}, leftover
    if hasattr(args, "_model_help"):
        parser.error("--model.FIELD stands for a model config field: --model.num_hidden_layers 6, say")
    cli = {name: _coerce(name, raw) for name, raw in vars(args).items() if name not in ("preset", "config")}
    return cli, model_overrides, []


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The preset and --config first, so that `--help` shows the defaults that will apply.
    preset, values, file_values = _preset_and_file(argv)
    parser = _build_parser({**to_dict(TrainConfig()), **values}, preset)
    cli, model_overrides = parse_command_line(parser, argv, parse=lambda args: _parse_known(parser, args))
    given = merge(file_values, cli, "the command line")  # what this command asks for beyond the preset
    if model_overrides:
        given = merge(given, {"model": model_overrides}, "the command line")
    values = merge(values, given, "the command line")
    if values.get("resume"):
        values = resume_settings(Path(values.get("out", TrainConfig.out)), given) or values
    return build_config(values)


def resume_settings(out: Path, given: dict[str, Any]) -> dict[str, Any] | None:
    """The settings that continue the run in `out`: its own (OUT/run_config.yaml), plus those of
    `given` that leave the data order and the model alone (RESUME_MAY_CHANGE). Any other setting of
    `given` that differs from the run's is refused. None when the run folder has no run_config.yaml."""
    saved_file = out / run_folder.RUN_CONFIG
    if not saved_file.is_file():
        return None
    saved = load_yaml(saved_file).get("train")
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_file} has no `train:` section; it was not written by `iterative-llm train`.")
    saved = merge({}, saved, str(saved_file))
    changed = []
    for key, value in given.items():
        if key == "model":
            changed += [f"--model.{name} {shown(v)} (the run has {shown(saved['model'].get(name))})"
                        for name, v in value.items() if saved["model"].get(name) != v]
        elif key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            changed.append(f"--{key} {shown(value)} (the run has {shown(saved.get(key))})")
    if changed:
        raise ValueError(
            f"--resume continues the run in {out} with its own settings ({saved_file}); these options would change "
            f"its data order or its model: {'; '.join(changed)}. Drop them to resume, or start a new run with "
            f"another --out. With --resume you may change: {', '.join(RESUME_MAY_CHANGE[2:])}."
        )
    return {**saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}, "out": str(out), "resume": True}


def source_share_trained(config: TrainConfig) -> float:
    """The share of the training source's tokens that training reads: all of it with a separate
    --val_data, else what --val_fraction leaves (the rest is held out for validation). The tokens to
    tokenise for T tokens of training are T over this."""
    return 1.0 if config.val_data else 1.0 - config.val_fraction


def token_caps(config: TrainConfig, tokens_per_step: int) -> list[int]:
    """The tokens --max_tokens and --max_steps let a run train, of those that are set."""
    steps_cap = config.max_steps * tokens_per_step if config.max_steps else None
    return [cap for cap in (config.max_tokens, steps_cap) if cap]


def write_run_config(out: Path, config: TrainConfig, model_config, resumed: bool, step: int) -> None:
    """OUT/run_config.yaml: the resolved settings and the model config's own fields, which
    `resume_settings` reads back. A resume keeps the run's settings and records what it changed."""
    run_config = out / run_folder.RUN_CONFIG
    if resumed and run_config.is_file():
        # The run keeps its own settings; a resume may only extend it or change its cadence
        # (RESUME_MAY_CHANGE), and each such change is recorded with the step it applies from.
        saved = yaml.safe_load(run_config.read_text(encoding="utf-8"))
        changes = {key: value for key, value in to_dict(config).items()
                   if key in RESUME_MAY_CHANGE and key not in ("out", "resume") and saved.get("train", {}).get(key) != value}
        saved.setdefault("train", {}).update(changes)
        saved.setdefault("resumed", []).append({"step": step, "changed": changes})
        _write_yaml(run_config, saved)
    else:
        _write_yaml(run_config, {"train": to_dict(config), "model": model_config.to_diff_dict()})


def _write_yaml(path: Path, data: dict) -> None:
    # UTF-8 with the characters as they are (a sample prompt "Café" stays Café, not "Caf\xE9"), so
    # the file reads as it was typed; load_yaml reads it back as UTF-8 on any machine.
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def build_config(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a dict, with every value checked so mistakes fail before any work is done."""
    config = TrainConfig(**merge({}, values, "the settings"))
    if config.optimizer not in ("muon", "adamw"):
        raise ValueError(f"`optimizer` must be 'muon' or 'adamw', got {config.optimizer!r}.")
    if config.schedule not in ("wsd", "cosine"):
        raise ValueError(f"`schedule` must be 'wsd' or 'cosine', got {config.schedule!r}.")
    if config.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"`precision` must be 'auto', 'bf16', 'fp16' or 'fp32', got {config.precision!r}.")
    if config.on_decode_error not in ON_DECODE_ERROR:
        raise ValueError(f"`on_decode_error` must be one of {', '.join(map(repr, ON_DECODE_ERROR))}, "
                         f"got {config.on_decode_error!r}.")
    if config.report_to not in ("tensorboard", "wandb", "none"):
        raise ValueError(f"`report_to` must be 'tensorboard', 'wandb' or 'none', got {config.report_to!r}.")
    if config.time_budget is not None:
        parse_duration(config.time_budget)  # "2 hours" fails here, naming the forms it takes
    if not any((config.max_steps, config.max_tokens, config.max_time, config.time_budget)):
        raise ValueError("Give at least one of `max_steps`, `max_tokens`, `max_time` or `time_budget`, "
                         "or training never ends.")
    for name in ("seq_len", "batch_size", "batch_tokens"):
        value = getattr(config, name)
        if not (name == "batch_size" and value == "auto") and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer{' or auto' * (name == 'batch_size')}, got {value!r}.")
    for name in ("activation_checkpointing", "tokenise_beside_training"):
        if getattr(config, name) not in (True, False, "auto"):
            raise ValueError(f"`{name}` must be true, false or auto, got {getattr(config, name)!r}.")
    if not 0.0 <= config.cooldown_fraction <= 1.0:
        raise ValueError(f"`cooldown_fraction` must be in [0, 1], got {config.cooldown_fraction!r}.")
    from training.eval.hellaswag import check_training_settings

    check_training_settings(config)  # the hellaswag* fields
    return config


def scalar_settings(config: TrainConfig) -> dict:
    """The settings as flat name: number/text pairs (`model.FIELD` for the model's), as trackers take them."""
    flat = {}
    for key, value in to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"model.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            flat[key] = value
    return flat


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
