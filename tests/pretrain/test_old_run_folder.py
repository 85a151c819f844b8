"""A run folder written by earlier code resumes and exports under today's: the run folder, its
checkpoints and token shards are formats users keep, whatever moves inside the package.

tests/fixtures/run_e92574a/ was written by commit e92574a's code (tests/fixtures/README.md says how), on the
text `made_up_text` writes, with SETTINGS."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from training.pretrain.trainer import main as train_main

OLD_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "run_e92574a"

WORDS = ("lantern orchard pebble meadow quill harbour ember thistle lagoon saddle cobalt willow beacon "
         "marble sparrow canyon velvet timber glacier ribbon").split()

# The settings the folder was trained with (relative paths: the test runs in a folder of its own).
SETTINGS = dict(
    out="run", data="text", val_fraction=0.1, model_preset="tiny",
    model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 320},
    seq_len=32, batch_size=4, batch_tokens=128, max_steps=4, max_time=None, eval_every=2, eval_tokens=512,
    log_every=1, checkpoint_every=2, sample_every=0, sample_tokens=4, sample_prompts=["The lantern"],
    report_to="none", progress=False,
)


def made_up_text(folder: Path) -> None:
    """Forty documents of made-up sentences, the same every time (shards are matched to a source by
    its file names and sizes)."""
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(12)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")


def test_a_run_folder_of_earlier_code_resumes_and_exports(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    shutil.copytree(OLD_RUN, tmp_path / "run")
    made_up_text(tmp_path / "text")
    monkeypatch.chdir(tmp_path)
    before = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    shards = {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir() if p.is_file()}
    assert before["steps"] == 4
    assert train_main(["--out", "run", "--resume", "--max_steps", "6"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {Path('run', 'checkpoints', 'step_00000004')} (step 4" in out
    # The old shards are read as they are, not made again.
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir() if p.is_file()} == shards
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 6 and summary["final_val_loss"] < before["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run", trust_remote_code=True)
    assert model.num_parameters() == summary["parameters"]
