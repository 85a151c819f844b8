"""Alignment benchmark: pretrained run folder -> SFT -> DPO, with held-out figures at each stage.

    python benchmarks/alignment.py --model runs/NAME                    # Dolly open-QA, then HH helpful-base
    python benchmarks/alignment.py --model runs/NAME --sft-data gsm8k
    python benchmarks/alignment.py --model runs/NAME --max-steps 5 --n-heldout 8   # a smoke run

Data come from ../shared/data (never copied into the repo):
    sft/dolly-open_qa/chinkara-open_qa.jsonl   3,742 "### Human: ... ### Assistant: ..." open-QA rows
    sft/gsm8k/train.jsonl                       7,473 {"question", "answer"} grade-school maths problems
    hh-rlhf/helpful-base/test.jsonl.gz          2,354 Anthropic HH helpful-base {"chosen", "rejected"} pairs
Each stage holds out a seeded random slice of its data (--n-heldout) and reports:
    SFT  held-out loss on the reply tokens, before and after; the share of held-out prompts whose
         greedy reply (optionally with a repetition penalty) ends its turn with <|end|> within the
         token limit (target: at least 95%);
    DPO  held-out preference accuracy (chosen reply more likely than rejected) before and after, with
         n, its standard error and a paired sign test over the pairs whose ranking changed; the same
         by log-probability per reply token (free of the pull of reply length).
The hyperparameters are the presets training/presets/sft-chat.yaml and dpo-hh.yaml (--sft-config,
--dpo-config); results go to OUT/results.json and OUT/results.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from iterative_llm.console import make_output_safe  # noqa: E402

SFT_DATA = {
    "dolly": "sft/dolly-open_qa/chinkara-open_qa.jsonl",
    "gsm8k": "sft/gsm8k/train.jsonl",
}
DPO_DATA = "hh-rlhf/helpful-base/test.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a pretrained run folder (iterative-llm train)")
    parser.add_argument("--out", default=None, help="where the SFT and DPO folders and results go (default MODEL-alignment)")
    parser.add_argument("--sft-data", choices=sorted(SFT_DATA), default="dolly")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sft-config", default=str(ROOT / "training" / "presets" / "sft-chat.yaml"))
    parser.add_argument("--dpo-config", default=str(ROOT / "training" / "presets" / "dpo-hh.yaml"))
    parser.add_argument("--n-heldout", type=int, default=None, help="held-out rows per stage (default: the presets')")
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps of each stage (smoke runs)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=None, help="reply limit of the end-of-turn check")
    parser.add_argument("--eval-repetition-penalty", type=float, default=None,
                        help="repetition penalty of the end-of-turn check's greedy replies (default 1.0: none)")
    parser.add_argument("--use-cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def stage_argv(config: str, model: str, data: Path, output_dir: Path, args, extra=()) -> list[str]:
    argv = ["--config", config, "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(output_dir)]
    if args.n_heldout is not None:
        argv += ["--num_heldout", str(args.n_heldout)]
    if args.max_steps is not None:
        argv += ["--max_steps", str(args.max_steps)]
    if args.use_cpu:
        argv += ["--use_cpu", "true"]
    return argv + list(extra)


def main(argv=None) -> dict:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    args = parse_args(argv)
    from training.align import dpo
    from training.align import sft
    from training.machine import cpu_description

    data_dir = Path(args.data_dir)
    out = Path(args.out or f"{str(args.model).rstrip('/')}-alignment")
    sft_data, dpo_data = data_dir / SFT_DATA[args.sft_data], data_dir / DPO_DATA
    for path in (sft_data, dpo_data):
        if not path.is_file():
            raise SystemExit(f"Missing data file {path}: pass --data-dir (the shared data folder).")

    extra = []
    if args.n_heldout is not None:
        extra += ["--eval_generations", str(args.n_heldout)]  # answer every held-out prompt
    if args.eval_max_new_tokens is not None:
        extra += ["--eval_max_new_tokens", str(args.eval_max_new_tokens)]
    if args.eval_repetition_penalty is not None:
        extra += ["--eval_repetition_penalty", str(args.eval_repetition_penalty)]
    start = time.time()
    sft_args = sft.build_parser().parse_args_and_config(
        args=stage_argv(args.sft_config, args.model, sft_data, out / "sft", args, extra))
    sft_figures = sft.run(*sft_args)
    dpo_args = dpo.build_parser().parse_args_and_config(
        args=stage_argv(args.dpo_config, str(out / "sft"), dpo_data, out / "dpo", args))
    dpo_figures = dpo.run(*dpo_args)

    results = {
        "model": str(args.model), "sft_data": str(sft_data), "dpo_data": str(dpo_data),
        "sft": sft_figures, "dpo": dpo_figures, "seconds": time.time() - start,
        "sft_eval_max_new_tokens": sft_args[0].eval_max_new_tokens,
        "sft_eval_repetition_penalty": sft_args[0].eval_repetition_penalty,
        "cpu": cpu_description(),  # the machine beside its seconds (the CPU does the tokenising either way)
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = results_table(results, args.sft_data)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return results


def results_table(results: dict, sft_name: str) -> str:
    sft, dpo = results["sft"], results["dpo"]
    rows = [f"| model | {results['model']} |", "| --- | --- |", f"| CPU | {results.get('cpu', 'not recorded')} |"]
    if sft["before"]:
        b, a = sft["before"], sft["after"]
        rows.append(f"| SFT ({sft_name}): held-out loss on replies, before -> after | "
                    f"{b['heldout_loss']:.3f} -> {a['heldout_loss']:.3f} |")
        if "end_of_turn_share" in a:
            from training.align.sft import end_of_turn_decoding

            decoding = end_of_turn_decoding(results.get("sft_eval_repetition_penalty", 1.0))
            rows.append(f"| SFT: replies that end their turn within {results['sft_eval_max_new_tokens']} tokens "
                        f"({decoding}; target >= 95%) | {b['end_of_turn_share']:.1%} -> {a['end_of_turn_share']:.1%} "
                        f"(n={a['end_of_turn_n']}) |")
    rows.append(f"| SFT: steps, seconds | {sft['steps']}, {sft['train_seconds']:.0f} |")
    if dpo["before"]:
        b, a, paired = dpo["before"], dpo["after"], dpo["rewards"]["paired"]
        rows.append(f"| DPO (HH helpful-base): held-out preference accuracy, before -> after | "
                    f"{b['accuracy']:.1%} ± {b['accuracy_se']:.1%} -> {a['accuracy']:.1%} ± {a['accuracy_se']:.1%} "
                    f"(n={a['n']}, ± 1 s.e.) |")
        rows.append(f"| DPO: pairs ranked right only after / only before | {paired['gained']} / {paired['lost']} "
                    f"(sign test p = {paired['p_value']:.2g}) |")
        if "per_token_accuracy" in a:
            paired = dpo["rewards"]["paired_per_token"]
            rows.append(f"| DPO: held-out preference accuracy per reply token, before -> after | "
                        f"{b['per_token_accuracy']:.1%} -> {a['per_token_accuracy']:.1%} ± {a['per_token_accuracy_se']:.1%} "
                        f"({paired['gained']} / {paired['lost']} pairs gained / lost, sign test p = {paired['p_value']:.2g}) |")
        rows.append(f"| DPO: held-out implicit reward accuracy, margin | {dpo['rewards']['reward_accuracy']:.1%}, "
                    f"{dpo['rewards']['reward_margin']:.3f} |")
    rows.append(f"| DPO: steps, seconds | {dpo['steps']}, {dpo['train_seconds']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
