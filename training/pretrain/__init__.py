"""The pretraining stage: `iterative-llm train`, `python -m training.pretrain`, `accelerate launch -m
training.pretrain`. trainer.py holds the command; setup.py, loop.py and finish.py the run (run_state.py
its parts, run_data.py its data); the plan fitted to the machine and the time (plan.py, ladder.py,
budget.py), one step (step.py, optim.py), what stops a run (guards.py, stop_request.py), checkpoints and
the model folder (checkpoint.py, export.py), and the settings (config.py) each have a module."""

from training.pretrain.trainer import build_parser, main, train  # noqa: F401  (the stage's command)
