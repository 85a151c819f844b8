"""The `iterative-llm` command: one entry point that hands each stage to the module that does it.

Each stage is an ordinary module with a `main(argv)` function, so it also runs on its own
(`python -m training.pretrain ...`, `accelerate launch -m training.pretrain ...`), and a
`build_parser()`: every stage reads its options one way (iterative_llm/command_line.py). Modules are
imported only when their stage is asked for, so `iterative-llm --help` stays fast and a stage's
heavy dependencies (datasets, trl, matplotlib) are needed only by that stage.
"""

from __future__ import annotations

import importlib
import sys

from .console import make_output_safe

# The modules of the optional extras (pyproject.toml), by the extra that installs them: a stage that
# cannot import one of these is missing that extra. Any other missing module is not something an
# install of ours brings, and is reported as it is (tests/test_any_desktop.py holds this table to pyproject).
EXTRA_MODULES: dict[str, str] = {
    "accelerate": "train", "datasets": "train", "trl": "train", "peft": "train", "yaml": "train",
    "tqdm": "train", "tensorboard": "train", "matplotlib": "train", "pyarrow": "train", "psutil": "train",
    "lm_eval": "eval",
}

# stage name -> (module, one-line help). Order is the order of the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("training.data.prepare", "tokenise a text source into train/val token shards, ahead of training"),
    "train": ("training.pretrain", "pretrain a model on text (tiny preset: minutes on a CPU)"),
    "generate": ("training.eval.generate", "generate text from a run folder or model folder"),
    "sft": ("training.align.sft", "supervised fine-tuning on conversations (TRL SFTTrainer)"),
    "dpo": ("training.align.dpo", "preference optimisation on chosen/rejected pairs (TRL DPOTrainer)"),
    "chat": ("training.align.chat", "talk to a chat model in the terminal"),
    "eval": ("training.eval", "HellaSwag, bits per byte and reference figures for any model folder or hub id"),
    "explain": ("iterative_llm.explain", "walk a sentence through the model, step by step, with pictures"),
    "compare": ("iterative_llm.compare", "plot and tabulate several training runs side by side"),
}


def _usage() -> str:
    lines = ["usage: iterative-llm <stage> [options]", "", "stages:"]
    for name, (_, text) in STAGES.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "Run `iterative-llm <stage> --help` for a stage's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    make_output_safe()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"iterative-llm: unknown stage {stage!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = STAGES[stage][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top not in EXTRA_MODULES:
            raise  # not a missing extra: the traceback says what is wrong, and no install would help
        # A missing optional dependency (datasets, trl, ...): say which extra brings it.
        extra = EXTRA_MODULES[top]
        print(
            f"iterative-llm {stage}: cannot import {err.name!r}. Install the {extra} extras: "
            f"pip install 'iterative-llm[{extra}]'",
            file=sys.stderr,
        )
        return 2
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
