"""The run folder's layout, named once in iterative_llm/run_folder.py: a checkpoint inside a run is found
from the run, and the run from the checkpoint (generate reads the tokenizer from the run)."""

from iterative_llm import run_folder
from training.pretrain.checkpoint import checkpoint_root
from training.eval.generate import find_model_folder


def test_a_checkpoint_folder_reads_its_tokenizer_from_the_run(tmp_path):
    run = tmp_path / "run"
    checkpoint = checkpoint_root(run) / "step_00000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}", encoding="utf-8")
    (checkpoint / "model.safetensors").write_bytes(b"")
    assert checkpoint == run / "checkpoints" / "step_00000003"
    assert find_model_folder(checkpoint) == (checkpoint, run)
    assert run_folder.run_of_checkpoint(checkpoint) == run
    (checkpoint / "tokenizer.json").write_text("{}", encoding="utf-8")  # a checkpoint with its own tokenizer uses it
    assert find_model_folder(checkpoint) == (checkpoint, checkpoint)
