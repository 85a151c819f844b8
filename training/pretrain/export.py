"""The end of a run: a Hugging Face model folder with a model card filled from the run's own figures."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from transformers import GenerationConfig

from iterative_llm import run_folder
from iterative_llm.tokenization import END_OF_TURN

from training.eval.generate import TEMPERATURE, TOP_K
from training.pretrain.checkpoint import latest_checkpoint, write_failure
from training.versions import package_versions

TEMPLATE_NAME = "model_card.md"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / run_folder.METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(run_dir: str | Path, png: str | Path) -> bool:
    """Training loss and validation loss against tokens seen; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return False
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="training loss", linewidth=1)
    if evals:
        axis.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    axis.set_xlabel("tokens seen")
    axis.set_ylabel("loss (nats per token)")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    scored = [r for r in evals if "hellaswag_acc_norm" in r]
    if scored:  # HellaSwag on a second axis, in percent, with chance marked
        right = axis.twinx()
        right.plot([r["tokens"] for r in scored], [100 * r["hellaswag_acc_norm"] for r in scored], "s--",
                   color="tab:green", label="HellaSwag acc_norm (%)")
        right.axhline(25.0, color="tab:green", linewidth=0.8, alpha=0.4)
        right.set_ylabel("HellaSwag acc_norm (%, chance 25)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return True


def _template() -> str:
    """The model card template: the top-level model_card.md of a source checkout, or the copy
    installed with the package (pyproject's data-files)."""
    candidates = [Path(__file__).resolve().parents[2] / TEMPLATE_NAME, Path(sys.prefix) / "share" / "iterative-llm" / TEMPLATE_NAME]
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"The model card template {TEMPLATE_NAME} is missing (looked in {', '.join(map(str, candidates))}).")


def fill_model_card(values: dict) -> str:
    """The template with every {field} replaced; a field the template names but `values` lacks is an error."""
    text = _template()
    try:
        return text.format_map(values)
    except KeyError as err:
        raise KeyError(f"The model card template needs the value {err}, which the run did not provide.") from err


def export_model_folder(out: str | Path, model, tokenizer, summary: dict) -> None:
    """Write weights, config, tokenizer, generation config, model card, loss curve and summary into the
    run folder `out`.

    All of it is written to a staging folder inside `out` first and moved into place only once it is
    complete, each file in one rename: a full disk or a crash while writing leaves the model folder as
    it was (a previous export, or none) and the run's checkpoints untouched. The error then names the
    checkpoint a `--resume` exports from.
    """
    out = Path(out)
    staging = out / f".export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_model_folder(staging, out, model, tokenizer, summary)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    except Exception as err:
        newest = latest_checkpoint(out)
        kept = (f"The run's checkpoint {newest} is intact (a --resume exports from it)."
                if newest else "The run has no checkpoint.")
        failure = write_failure(err, out, f"the model folder {out}", kept, resumable=newest is not None)
        if failure is None:
            raise
        raise failure from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_model_folder(out: Path, run: Path, model, tokenizer, summary: dict) -> None:
    """The model folder's files in `out`, from the metrics of the run folder `run`."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    stop_ids = [tokenizer.eos_token_id] + ([end_of_turn] if isinstance(end_of_turn, int) and end_of_turn >= 0 else [])
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=min(128, model.config.max_position_embeddings // 2),
    ).save_pretrained(out)
    has_curve = plot_loss_curve(run, out / run_folder.LOSS_CURVE)
    (out / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")

    rows = read_metrics(run)
    samples = [r for r in rows if r.get("kind") == "sample" and r["step"] == summary["steps"]]
    versions = package_versions()
    config = model.config
    values = {
        **summary,
        "parameters_millions": f"{summary['parameters'] / 1e6:.1f}",
        "tokens_millions": f"{summary['tokens'] / 1e6:.2f}",
        "minutes": f"{summary['time'] / 60:.1f}",
        "final_val_loss": f"{summary['final_val_loss']:.4f}",
        "final_val_bpb": f"{summary['final_val_bpb']:.4f}",
        "architecture": (
            f"{type(model).__name__}: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{config.num_attention_heads} query heads / {getattr(config, 'num_key_value_heads', None) or config.num_attention_heads} "
            f"key-value heads, {getattr(config, 'mlp_type', 'gelu')} MLP, context {config.max_position_embeddings}, "
            f"vocabulary {config.vocab_size}, {'tied' if config.tie_word_embeddings else 'untied'} embeddings"
        ),
        "loss_curve": f"![loss curve]({run_folder.LOSS_CURVE})" if has_curve else "(no curve: no training rows were logged)",
        "hellaswag": hellaswag_section(rows, summary["steps"]),
        "samples": "\n\n".join(f"```text\n{s['text']}\n```" for s in samples) or "(none)",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    }
    (out / "README.md").write_text(fill_model_card(values), encoding="utf-8")


def hellaswag_section(rows: list[dict], step: int) -> str:
    """The card's HellaSwag table: the run's final figures beside the published ones, with sources."""
    from training.eval.hellaswag import references_markdown

    final = [r for r in rows if r.get("kind") == "eval" and r.get("step") == step and "hellaswag_acc_norm" in r]
    if not final:
        return ("HellaSwag was not scored during this run. Score it with "
                "`iterative-llm eval THIS_FOLDER --hellaswag hub` (or `--hellaswag hellaswag_val.jsonl`).")
    row = final[-1]
    return "\n".join([
        f"HellaSwag, zero-shot, scored as lm-evaluation-harness scores it, on {row['hellaswag_items']:,} items "
        f"(see `hellaswag` in {run_folder.RUN_CONFIG}), beside published figures for models of GPT-2's size:",
        "",
        "| model | HellaSwag acc_norm | source |",
        "|---|---|---|",
        f"| this model (acc {100 * row['hellaswag_acc']:.1f}%) | {100 * row['hellaswag_acc_norm']:.1f}% | this run's {run_folder.METRICS}, step {step} |",
        references_markdown(),
        "| chance (four endings) | 25.0% | |",
    ])
