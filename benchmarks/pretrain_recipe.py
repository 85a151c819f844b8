"""Our pretraining recipe against a GPT-2 + AdamW + cosine baseline, in one run, same data.

    python benchmarks/pretrain_recipe.py --data-dir ../shared/data                # tiny shakespeare
    python benchmarks/pretrain_recipe.py --data-dir ../shared/data --dataset books

Both models go through the same data pipeline (one tokenizer, one set of token shards, the same
batches at every step) and the same loop (training/pretrain/loop.py); they differ in what the recipe
changes: the model (IterativeLLM: rotary, RMSNorm, QK-norm, ReLU^2, soft-capping, zero-init
projections) and the optimisation (Muon + AdamW, warmup-stable-decay) against transformers'
GPT2LMHeadModel of the same parameter count with AdamW and a cosine schedule, its learning rate
chosen as the best of a small sweep so the baseline is a fair one.

Prints a table of validation bits per byte against steps, tokens and seconds, and the share of the
baseline's steps our recipe needs to reach the baseline's final figure (target: at most 0.5).

`--budget` adds the wall-clock check: `iterative-llm train` as a user runs it, with `--max_time`,
timed from the command's start to its exit (start-up, tokenizer, shards, evaluation included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from iterative_llm import run_folder  # noqa: E402
from iterative_llm.console import make_output_safe  # noqa: E402
from training.pretrain.config import build_config, load_preset, merge  # noqa: E402
from training.machine import choose_threads, cpu_description  # noqa: E402
from training.pretrain.trainer import train  # noqa: E402


def split_shakespeare(data_dir: Path, work: Path) -> tuple[str, str, str | None]:
    """nanoGPT's split of tiny shakespeare: first 90% of the characters train, last 10% validate."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "val.txt").write_text(text[cut:], encoding="utf-8")
    return str(work / "train.txt"), str(work / "val.txt"), None


def books(data_dir: Path, work: Path) -> tuple[str, str | None, str | None]:
    """The public-domain books, one document each, split by document (a share of whole books validate)."""
    return str(data_dir / "gutenberg" / "train"), None, None


def gpt2_factory(ours_config):
    """GPT2LMHeadModel with our width, depth, heads, context and vocabulary; untied head so the
    parameter count matches our untied tiny model (GPT-2 adds learned positions and biases)."""

    def build(model_config):
        config = GPT2Config(
            vocab_size=model_config.vocab_size, n_positions=model_config.max_position_embeddings,
            n_embd=model_config.hidden_size, n_layer=model_config.num_hidden_layers,
            n_head=model_config.num_attention_heads, n_inner=4 * model_config.hidden_size,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=model_config.tie_word_embeddings,
            bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id,
            pad_token_id=model_config.pad_token_id,
        )
        return GPT2LMHeadModel(config)

    return build


def eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / run_folder.METRICS).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "eval"]


def main() -> None:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--dataset", choices=["shakespeare", "books"], default="shakespeare")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as training chooses, OMP_NUM_THREADS or one per physical core)")
    parser.add_argument("--baseline-lrs", default="1e-3,2e-3,4e-3", help="AdamW learning rates tried for GPT-2")
    parser.add_argument("--budget", type=float, default=0, help="also run `iterative-llm train --max_time` with a "
                        "wall-clock budget of this many seconds for the whole command (0: skip)")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--override", action="append", default=[], help="extra field=value for our recipe")
    args = parser.parse_args()

    if args.threads:  # training reads it (training/machine.py), and so does the budget run's process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(choose_threads(args.threads)[0])
    print(f"CPU: {cpu_description()}, torch {torch.__version__}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-"))
    work.mkdir(parents=True, exist_ok=True)
    data, val, _ = (split_shakespeare if args.dataset == "shakespeare" else books)(Path(args.data_dir), work)
    common = merge(load_preset("tiny"), {
        "data": data, "val_data": val, "data_cache": str(work / "data"), "max_steps": args.steps, "max_time": None,
        "eval_every": args.eval_every, "eval_tokens": None if args.dataset == "shakespeare" else 262144,
        "checkpoint_every": 0, "sample_every": 0, "sample_prompts": ["ROMEO:" if args.dataset == "shakespeare" else "The"],
        "report_to": "none", "progress": False, "model": {"vocab_size": args.vocab_size},
        "seq_len": args.seq_len, "batch_size": args.batch_size, "batch_tokens": args.batch_tokens,
    }, "benchmark")
    ours_fields = dict(common)
    for item in args.override:
        key, _, raw = item.partition("=")
        import yaml

        ours_fields = merge(ours_fields, {key: yaml.safe_load(raw)}, "--override")

    results = {"dataset": args.dataset, "steps": args.steps, "threads": torch.get_num_threads(),
               "cpu": cpu_description(), "runs": {}}
    runs = [("ours", ours_fields, None)]
    for lr in args.baseline_lrs.split(","):
        runs.append((f"gpt2-adamw-lr{lr}", merge(common, {"optimizer": "adamw", "schedule": "cosine", "adamw_lr": float(lr),
                                                          "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.1}, "baseline"),
                     gpt2_factory(None)))
    for name, fields, factory in runs:
        out = work / name
        start = time.perf_counter()
        summary = train(build_config({**fields, "out": str(out)}), model_factory=factory)
        results["runs"][name] = {"summary": summary, "evals": eval_rows(out), "wall": time.perf_counter() - start}
        print(f"{name}: final val bpb {summary['final_val_bpb']:.4f} after {summary['steps']} steps, "
              f"{summary['time']:.1f} s of training, {summary['parameters']:,} parameters", flush=True)

    baselines = {k: v for k, v in results["runs"].items() if k != "ours"}
    best = min(baselines, key=lambda k: baselines[k]["summary"]["final_val_bpb"])
    target = baselines[best]["summary"]["final_val_bpb"]
    ours = results["runs"]["ours"]
    reached = next((row for row in ours["evals"] if row["val_bpb"] <= target), None)
    results["baseline"] = best
    results["steps_to_baseline_final"] = reached["step"] if reached else None
    results["ratio"] = reached["step"] / args.steps if reached else None

    print(f"\nValidation bits per byte, {args.dataset} (ours vs the best baseline, {best}):")
    print(f"{'step':>6} {'tokens':>10} | {'ours bpb':>9} {'ours s':>7} | {'gpt2 bpb':>9} {'gpt2 s':>7}")
    base_rows = {r["step"]: r for r in baselines[best]["evals"]}
    for row in ours["evals"]:
        other = base_rows.get(row["step"])
        print(f"{row['step']:>6} {row['tokens']:>10,} | {row['val_bpb']:>9.4f} {row['time']:>7.1f} | "
              f"{other['val_bpb'] if other else float('nan'):>9.4f} {other['time'] if other else float('nan'):>7.1f}")
    print(f"\nparameters: ours {ours['summary']['parameters']:,}, gpt2 {baselines[best]['summary']['parameters']:,}")
    for name, run in baselines.items():
        print(f"baseline {name}: final {run['summary']['final_val_bpb']:.4f}")
    if reached:
        print(f"ours reaches the baseline's final {target:.4f} bpb at step {reached['step']} of {args.steps}: "
              f"ratio {results['ratio']:.2f} (target <= 0.50)")
    else:
        print(f"ours does not reach the baseline's final {target:.4f} bpb within {args.steps} steps")

    if args.budget:
        results["budget"] = budget_run(args, work, data, val)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


def budget_run(args, work: Path, data: str, val: str | None) -> dict:
    """`iterative-llm train` as a user runs it, timed from start to exit, within a wall-clock budget."""
    out = work / "budget"
    # Start-up, tokenizer, shards and the final evaluation take a few seconds: training gets the rest.
    training_seconds = args.budget - 15
    command = [sys.executable, "-m", "iterative_llm.cli", "train", "--preset", "tiny", "--data", data,
               "--out", str(out), "--max_time", str(training_seconds), "--max_steps", "null", "--eval_every", "0",
               "--eval_tokens", "null", "--checkpoint_every", "0", "--report_to", "none", "--progress", "false",
               "--sample_prompts", "[\"ROMEO:\"]", "--model.vocab_size", str(args.vocab_size)]
    if val:
        command += ["--val_data", val]
    for item in args.override:
        key, _, raw = item.partition("=")
        command += [f"--{key}", raw]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    summary = json.loads((out / run_folder.SUMMARY).read_text(encoding="utf-8"))
    print(f"\nbudget run: {wall:.1f} s wall-clock for the whole command ({summary['time']:.1f} s of training, "
          f"{summary['steps']} steps), final val bpb {summary['final_val_bpb']:.4f}")
    return {"wall": wall, **summary, "command": " ".join(command)}


if __name__ == "__main__":
    main()
