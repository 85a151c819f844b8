"""The evaluation stage: `iterative-llm eval` (command.py), bits per byte (bits_per_byte.py), HellaSwag
(hellaswag.py), and text from a folder (generate.py). Imports the data stage, never pretraining."""

from training.eval.command import build_parser, main  # noqa: F401  (the stage's command)
