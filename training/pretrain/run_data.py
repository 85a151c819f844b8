"""A run's data: its folder (the run's own or --data_cache), prepared with the run's settings, and
the thread that tokenises the rest beside training; one writer at a time (training/run_lock.py)."""

from __future__ import annotations

from pathlib import Path

from iterative_llm import run_folder
from iterative_llm.command_line import shell_word

from training.data.prepare import ShardSettingsError, prepare_shards
from training.data.tokenise_beside import TokeniserBeside
from training.pretrain.config import TrainConfig
from training.pretrain.guards import TrainingError
from training.pretrain.plan import Plan
from training.run_lock import hold


DATA_IN_USE = ("It is preparing the token shards; start again when it is done (they are then reused), "
               "or choose another --data_cache.")


def tokeniser_beside_for_run(config: TrainConfig, plan: Plan, tokenizer, data_dir: Path, out: Path) -> TokeniserBeside | None:
    """The thread that tokenises the rest of the data while training runs, when the plan says so:
    the same preparation as before the first step, under the data folder's lock, without bars."""
    if not plan.tokenises_beside:
        return None

    def prepare(*, max_tokens: int, shard_tokens: int, stop, on_commit) -> None:
        with hold(data_dir, DATA_IN_USE):
            prepare_shards_for_run(config, tokenizer, data_dir, out, max_tokens=max_tokens, progress=False,
                            shard_tokens=shard_tokens, stop=stop, on_commit=on_commit)

    return TokeniserBeside(prepare)


def run_data_dir(config: TrainConfig, out: Path) -> Path:
    """The tokenizer and token shards' folder: --data_cache, else the run's own."""
    return Path(config.data_cache) if config.data_cache else out / run_folder.DATA


def prepare_shards_for_run(config: TrainConfig, tokenizer, data_dir: Path, out: Path, max_tokens: int | None = None,
                    progress: bool | None = None, **beside) -> None:
    """prepare_shards with the run's data settings (`beside`: a thread's shard_tokens, stop, on_commit)."""
    try:
        prepare_shards(
            config.data, tokenizer, data_dir, text_column=config.text_column, doc_separator=config.doc_separator,
            val_source=config.val_data, val_fraction=config.val_fraction, max_documents=config.max_documents,
            max_tokens=max_tokens, on_decode_error=config.on_decode_error,
            progress=config.progress if progress is None else progress, **beside,
        )
    except ShardSettingsError as err:
        made_from = err.manifest.get("paths", {}).get("source")
        own_run = (out / run_folder.RUN_CONFIG).is_file() and not config.data_cache
        raise TrainingError(
            f"{data_dir} holds the token shards of another data source or other data settings "
            f"({'; '.join(err.differences)}); this run asks for --data {config.data}. "
            + (f"To continue the run in {out}, use `iterative-llm train --out {shell_word(out)} --resume` with no data "
               f"options: "
               f"it reads the run's own settings from {run_folder.RUN_CONFIG}. " if own_run else "")
            + f"To train on {made_from}, pass --data {made_from} with the settings the shards were made with; to "
            f"train on {config.data}, choose another --out, or a --data_cache folder of its own. Nothing was changed."
        ) from err
