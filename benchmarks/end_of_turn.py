"""How many held-out replies of a chat model end their turn: the SFT stage's check, on a saved folder.

    python benchmarks/end_of_turn.py --model runs/tiny-sft --data CONVERSATIONS.jsonl --repetition-penalty 1.1

The held-out conversations are the ones `iterative-llm sft` held out of the same data with the same
`--num-heldout` and `--seed` (its `num_heldout` and `seed`), so a folder can be re-measured with
another decoding without training again. Prints one JSON line: ended, n, share, a few replies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from iterative_llm.console import make_output_safe  # noqa: E402


def main(argv=None) -> dict:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a chat model folder (iterative-llm sft / dpo)")
    parser.add_argument("--data", required=True, help="the SFT run's --dataset_name")
    parser.add_argument("--num-heldout", type=int, default=200, help="the SFT run's num_heldout")
    parser.add_argument("--seed", type=int, default=0, help="the SFT run's seed (it picks the held-out rows)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.align.data import load_sft_dataset
    from training.align.sft import SFTScriptArguments, end_of_turn_share

    _, heldout = load_sft_dataset(SFTScriptArguments(dataset_name=args.data, num_heldout=args.num_heldout), seed=args.seed)
    if heldout is None:
        raise SystemExit("--num-heldout must be at least 1: the check answers held-out prompts.")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = end_of_turn_share(model, tokenizer, heldout["messages"], args.max_new_tokens, args.batch_size,
                               args.repetition_penalty)
    figures = {"model": args.model, "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens,
               "ended": result["ended"], "n": result["n"], "share": result["share"], "samples": result["samples"][:3]}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
