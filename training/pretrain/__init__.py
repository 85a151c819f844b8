"""The pretraining stage: `iterative-llm train`, `python -m training.pretrain`, `accelerate launch -m
training.pretrain`. trainer.py holds the command and the run (set-up, loop, finish); the plan fitted to
the machine and the time (plan.py, ladder.py, budget.py), one step (step.py, optim.py), what stops a
run (guards.py, stop_request.py), checkpoints and the model folder (checkpoint.py, export.py), and the
settings (config.py) each have a module."""

from training.pretrain.trainer import build_parser, main, train  # noqa: F401  (the stage's command)
