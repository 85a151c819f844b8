"""Every size of `--preset auto`'s ladder trained under the same time budget, beside auto's own pick.

    python benchmarks/ladder.py --data ../shared/data/gutenberg --budget 4m --depths 1 2 3 4 5

Each run is the command a user types (`python -m training.pretrain --preset auto --time_budget B`,
in a process of its own, so its clock starts with Python as the user's does); a ladder size is
that command with the size fixed (`--model_preset tiny --model.num_hidden_layers d ...` and the
size's learning rates, training/pretrain/ladder.py). Every run prepares its own data inside its budget, as a
user's would.

The runs are compared on one validation text: the books are cut once into their first 98% (the
training source) and their last 2% (`--val_data`), in a temporary folder, so that a run which
tokenised fewer books is scored on the same text as one that read them all. The table gives each
size's tokens per parameter: at the best size, that is the rule auto uses (training/pretrain/ladder.py
TOKENS_PER_PARAMETER). Run it alone on the machine: two jobs on 2 cores make each other's figures noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iterative_llm.console import make_output_safe  # noqa: E402
from training.pretrain import ladder# noqa: E402
from training.pretrain.budget import parse_duration  # noqa: E402
from training.data.prepare import split_tail  # noqa: E402  (the split rule prepare uses for a few books)
from training.data.sources import iter_documents  # noqa: E402


def split_books(source: str, folder: Path, fraction: float = 0.02) -> tuple[Path, Path]:
    """The source's documents cut into heads (training) and tails (validation), as .txt files."""
    heads, tails = folder / "heads", folder / "tails"
    heads.mkdir(parents=True, exist_ok=True)
    tails.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(iter_documents(source)):
        head, tail = split_tail(text, fraction)
        (heads / f"{i:04d}.txt").write_text(head, encoding="utf-8")
        (tails / f"{i:04d}.txt").write_text(tail, encoding="utf-8")
    return heads, tails


def run_one(name: str, extra: list[str], *, heads: Path, tails: Path, budget: str, out: Path) -> dict:
    command = [sys.executable, "-m", "training.pretrain", "--preset", "auto", "--data", str(heads),
               "--val_data", str(tails), "--time_budget", budget, "--out", str(out / name),
               "--report_to", "none", "--progress", "false", *extra]
    shutil.rmtree(out / name, ignore_errors=True)  # this benchmark's own earlier run of the same name
    print("$ " + " ".join(command), flush=True)
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, encoding="utf-8")
    wall = time.monotonic() - start
    (out / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}); see {out / name}.log:\n{result.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text(encoding="utf-8"))
    summary["wall"] = wall
    return summary


def fixed_size(depth: int) -> list[str]:
    fields = ladder.ladder_config(depth)
    lrs = ladder.learning_rates(depth)
    return (["--model_preset", ladder.BASE_PRESET]
            + [f"--model.{k}={v}" for k, v in fields.items()]
            + [f"--{k}={v}" for k, v in lrs.items()])


def main() -> None:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", default="4m", help="each run's --time_budget")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", default="runs/ladder")
    parser.add_argument("--skip-auto", action="store_true")
    args = parser.parse_args()

    import torch

    from training.machine import choose_threads, cpu_description

    threads, why = choose_threads()
    torch.set_num_threads(threads)
    print(f"CPU: {cpu_description(threads)} (threads: {why}); torch {torch.__version__}; "
          f"capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    budget_seconds = parse_duration(args.budget)
    out = Path(args.out) / args.budget
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        heads, tails = split_books(args.data, Path(scratch))
        for depth in args.depths:
            rows.append((f"depth {depth}", run_one(f"depth{depth}", fixed_size(depth), heads=heads, tails=tails,
                                                   budget=args.budget, out=out)))
        if not args.skip_auto:
            rows.append(("auto", run_one("auto", [], heads=heads, tails=tails, budget=args.budget, out=out)))

    print(f"\nbudget {args.budget} ({budget_seconds:.0f} s) per run, data {args.data}")
    print("| run | layers x width | parameters | steps | tokens trained | tokens/parameter | tokens prepared "
          "| first step (s) | whole command (s) | val bits per byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        config = json.loads((out / name.replace(" ", "") / "config.json").read_text(encoding="utf-8"))
        print(f"| {name} | {config['num_hidden_layers']} x {config['hidden_size']} | {s['parameters']:,} | {s['steps']} "
              f"| {s['tokens_trained']:,} | {s['tokens_trained'] / s['parameters']:.1f} | {s['tokens_prepared']:,} "
              f"| {s['seconds_to_first_step']:.1f} | {s['wall']:.1f} | {s['final_val_bpb']:.4f} |")
    ladder_rows = [(name, s) for name, s in rows if name != "auto"]
    if ladder_rows:
        best_name, best = min(ladder_rows, key=lambda row: row[1]["final_val_bpb"])
        print(f"\nbest of the ladder: {best_name}, {best['final_val_bpb']:.4f} bits per byte at "
              f"{best['tokens_trained'] / best['parameters']:.1f} tokens per parameter")
        auto = dict(rows).get("auto")
        if auto is not None:
            print(f"auto picked depth {auto['plan']['depth']}: {auto['final_val_bpb']:.4f} bits per byte, "
                  f"{auto['final_val_bpb'] - best['final_val_bpb']:+.4f} from the best")


if __name__ == "__main__":
    main()
