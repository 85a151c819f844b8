"""Our former Muon against torch.optim.Muon, side by side.

Our Muon class lived in training/pretrain/optim.py until this comparison replaced it with torch's
(benchmarks/results/muon_vs_torch.md); the benchmark reads that file from git at OURS_REVISION,
so it runs from any later checkout.

    OMP_NUM_THREADS=1 python benchmarks/muon_vs_torch.py                      # all three parts
    OMP_NUM_THREADS=1 python benchmarks/muon_vs_torch.py --parts equivalence speed

The two implement the same algorithm (Keller Jordan's Muon, 2024); what differs, from torch's
source (torch/optim/_muon.py):
- Newton-Schulz runs in bfloat16 always in torch's, on every device; ours uses bfloat16 on GPU
  and float32 elsewhere (`ns_dtype` overrides it).
- torch's keeps the momentum as an EMA (buf.lerp_(g, 1 - mu), Nesterov g.lerp(buf, mu)); ours
  the heavy-ball sum (B = mu B + g, Nesterov g + mu B). The update of torch's is (1 - mu) times
  ours before Newton-Schulz, which divides by the Frobenius norm, so after it they are equal
  (up to eps: torch clamps the norm at eps, ours adds eps).
- torch's steps one matrix at a time; ours stacks the matrices of one shape and orthogonalises
  each stack with one batched product per term.
- Learning rate: torch's adjust_lr_fn "original" (its default) is our sqrt(max(1, rows / cols));
  its "match_rms_adamw" (0.2 sqrt(max(rows, cols)), Moonshot's) has no counterpart here.
  Weight decay is decoupled and uses the unscaled lr in both; torch's default is 0.1, ours 0.

Since issue 18 (an AVX2 CPU multiplies bfloat16 matrices 10-20x slower than float32), training
uses torch.optim.Muon where bf16 is native and `Float32Muon` (training/pretrain/optim.py: torch's update,
orthogonalised in float32) elsewhere; both parts below include it. On an AVX2 machine the quality
part's "torch" runs are Float32Muon's, since training picks it there.

Parts:
  equivalence  a few steps on random matrices, same gradients, settings mapped (lr, momentum,
               nesterov, weight decay, "original" lr adjustment): the largest relative
               difference of the parameter change, ours in bfloat16 and float32 against torch's,
               and against torch's with its bfloat16 cast patched out (torch-fp32).
  speed        one optimiser step over the Muon matrices of the tiny and gpt2-small presets,
               random gradients, median of several steps, on this machine's CPU.
  quality      the budget recipe of benchmarks/results/pretrain_recipe_shakespeare.md (session 3)
               on tiny shakespeare, fixed token count, three seeds per implementation
               (measured with `--muon_impl ours|torch` of `iterative-llm train` at OURS_REVISION;
               since then, the training loop with OURS_REVISION's build_optimizers for ours).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iterative_llm import IterativeLLMConfig, IterativeLLMForCausalLM  # noqa: E402
from iterative_llm.console import make_output_safe  # noqa: E402

# The last commit with our Muon class and the `--muon_impl ours|torch` switch that the measurements used.
OURS_REVISION = "c47ce80"


@functools.cache
def load_ours(revision: str = OURS_REVISION):
    """training/pretrain/optim.py as it was at `revision`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:training/pretrain/optim.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True, encoding="utf-8").stdout
    path = Path(tempfile.mkdtemp(prefix="muon-ours-")) / f"optim_{revision}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



class TorchMuonInFloat32(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz left in the gradient's dtype: its only cast,
    `grad.bfloat16()`, made a no-op for the length of a step. For the equivalence check only:
    with the dtype made equal, any difference left is a difference of formula."""

    def step(self, closure=None):
        cast = torch.Tensor.bfloat16
        torch.Tensor.bfloat16 = lambda self, *args, **kwargs: self
        try:
            return super().step(closure)
        finally:
            torch.Tensor.bfloat16 = cast


def make(impl: str, params, lr: float, momentum: float, weight_decay: float):
    """One Muon with the settings mapped so that both compute the same update."""
    if impl == "Float32Muon":  # training's Muon where bf16 is not native (training/pretrain/optim.py, issue 18)
        from training.pretrain.optim import Float32Muon

        return Float32Muon(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                           adjust_lr_fn="original")
    if impl == "torch-fp32":
        return TorchMuonInFloat32(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                                  adjust_lr_fn="original")
    if impl == "torch":
        return torch.optim.Muon(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                                adjust_lr_fn="original")
    ns_dtype = {"ours-fp32": torch.float32, "ours-bf16": torch.bfloat16}[impl]
    return load_ours().Muon(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay, ns_dtype=ns_dtype)


def equivalence(steps: int = 3) -> None:
    shapes = [(128, 512), (512, 128), (768, 768), (3072, 768), (768, 3072)]
    print(f"\n## Update equivalence: {steps} steps, lr 0.02, momentum 0.95, Nesterov, weight decay 0 and 0.1,"
          " same random gradients")
    print("max relative difference of the parameter change of each step, |d_ours - d_torch|_F / |d_torch|_F;"
          " in brackets the largest elementwise |d_ours - d_torch| / max |d_torch|\n")
    print("| shape | weight decay | ours-bf16 vs torch | ours-fp32 vs torch | ours-bf16 vs ours-fp32 |"
          " ours-fp32 vs torch-fp32 | Float32Muon vs torch-fp32 | Float32Muon vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for wd in (0.0, 0.1):
            gen = torch.Generator().manual_seed(0)
            start = torch.randn(shape, generator=gen) * 0.02
            grads = [torch.randn(shape, generator=gen) for _ in range(steps)]
            deltas = {}
            for impl in ("torch", "ours-bf16", "ours-fp32", "torch-fp32", "Float32Muon"):
                p = torch.nn.Parameter(start.clone())
                opt = make(impl, [p], lr=0.02, momentum=0.95, weight_decay=wd)
                deltas[impl] = []
                for g in grads:
                    before = p.detach().clone()
                    p.grad = g.clone()
                    opt.step()
                    deltas[impl].append(p.detach() - before)

            def diff(a: str, b: str) -> str:
                frob = max((x - y).norm() / y.norm() for x, y in zip(deltas[a], deltas[b]))
                elem = max((x - y).abs().max() / y.abs().max() for x, y in zip(deltas[a], deltas[b]))
                return f"{frob:.2e} ({elem:.2e})"

            print(f"| {shape[0]}x{shape[1]} | {wd} | {diff('ours-bf16', 'torch')} | {diff('ours-fp32', 'torch')} | "
                  f"{diff('ours-bf16', 'ours-fp32')} | {diff('ours-fp32', 'torch-fp32')} | "
                  f"{diff('Float32Muon', 'torch-fp32')} | {diff('Float32Muon', 'torch')} |")


def speed(presets: list[str], repeats: dict[str, int]) -> None:
    print(f"\n## Optimiser step time, CPU, {torch.get_num_threads()} thread(s), random gradients, median of the steps"
          " after one warm-up step\n")
    print("| preset | matrices | ours-fp32 (CPU default) ms | ours-bf16 ms | torch (bf16) ms | Float32Muon ms |"
          " torch / ours-fp32 | torch / ours-bf16 | torch / Float32Muon |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in presets:
        torch.manual_seed(0)
        model = IterativeLLMForCausalLM(IterativeLLMConfig.from_preset(name))
        muon = load_ours().build_optimizers(model)[0]  # the Muon of the real split: the blocks' nn.Linear weights
        matrices = [p for group in muon.param_groups for p in group["params"]]
        del muon
        grads = [torch.randn_like(p) for p in matrices]
        times = {}
        for impl in ("ours-fp32", "ours-bf16", "torch", "Float32Muon"):
            opt = make(impl, matrices, lr=0.02, momentum=0.95, weight_decay=0.0)
            for p, g in zip(matrices, grads):
                p.grad = g
            samples = []
            for _ in range(repeats[name] + 1):
                start = time.perf_counter()
                opt.step()
                samples.append(time.perf_counter() - start)
            times[impl] = statistics.median(samples[1:]) * 1000
            opt.state.clear()
        shapes = sorted({tuple(p.shape) for p in matrices})
        print(f"| {name} | {len(matrices)} in {len(shapes)} shapes | {times['ours-fp32']:.1f} | "
              f"{times['ours-bf16']:.1f} | {times['torch']:.1f} | {times['Float32Muon']:.1f} | "
              f"{times['torch'] / times['ours-fp32']:.2f} | {times['torch'] / times['ours-bf16']:.2f} | "
              f"{times['torch'] / times['Float32Muon']:.2f} |", flush=True)


def quality(data_dir: Path, work: Path, seeds: list[int], max_tokens: int) -> None:
    from unittest import mock

    from benchmarks.pretrain_recipe import split_shakespeare
    from training.pretrain import trainer as pretrain
    from training.pretrain.config import build_config, load_preset, merge

    ours = load_ours()
    data, val, _ = split_shakespeare(data_dir, work)
    # Session 3's budget settings (benchmarks/results/pretrain_recipe_shakespeare.md), stopped by a
    # token count instead of a wall-clock limit so that machine load does not change the result.
    base = merge(load_preset("tiny"), {
        "data": data, "val_data": val, "data_cache": str(work / "data"), "max_steps": None, "max_time": None,
        "max_tokens": max_tokens, "eval_every": 0, "eval_tokens": None, "checkpoint_every": 0,
        "sample_prompts": ["ROMEO:"], "report_to": "none", "progress": False, "model": {"vocab_size": 768},
        "seq_len": 128, "batch_size": 32, "batch_tokens": 4096, "lr_matrix": 0.08, "lr_embed": 1.2, "lr_head": 0.02,
    }, "benchmark")
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "torch": []}
    for seed in seeds:
        for impl in ("ours", "torch"):
            config = build_config({**base, "seed": seed, "out": str(work / f"{impl}_{seed}")})
            if impl == "torch":
                summary = pretrain.train(config)
            else:  # the loop of today with the optimisers of OURS_REVISION (its default there: our Muon)
                with mock.patch.object(pretrain, "build_optimizers", ours.build_optimizers), \
                        mock.patch.object(pretrain, "apply_muon_momentum", ours.apply_muon_momentum):
                    summary = pretrain.train(config)
            results[impl].append((summary["final_val_bpb"], summary["time"]))
            print(f"{impl} seed {seed}: val bpb {summary['final_val_bpb']:.4f}, {summary['steps']} steps, "
                  f"{summary['time']:.1f} s of training", flush=True)
    print(f"\n## Quality: tiny shakespeare, {max_tokens:,} tokens, seeds {seeds}\n")
    print("| seed | ours val bpb | torch val bpb | torch - ours | ours s | torch s | torch / ours s |")
    print("|---|---|---|---|---|---|---|")
    for i, seed in enumerate(seeds):
        (a, ta), (b, tb) = results["ours"][i], results["torch"][i]
        print(f"| {seed} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} |")
    mean = {k: statistics.mean(v[0] for v in rows) for k, rows in results.items()}
    secs = {k: statistics.mean(v[1] for v in rows) for k, rows in results.items()}
    print(f"| mean | {mean['ours']:.4f} | {mean['torch']:.4f} | {mean['torch'] - mean['ours']:+.4f} | "
          f"{secs['ours']:.1f} | {secs['torch']:.1f} | {secs['torch'] / secs['ours']:.2f} |")


def main() -> None:
    make_output_safe()  # its printout survives any stdout encoding (iterative_llm/console.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["equivalence", "speed", "quality"],
                        default=["equivalence", "speed", "quality"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--presets", nargs="+", default=["tiny", "gpt2-small"])
    parser.add_argument("--repeats", type=int, nargs=2, default=[20, 3], metavar=("TINY", "LARGE"),
                        help="timed steps for the tiny preset and for the larger ones")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 7, 11])
    parser.add_argument("--max-tokens", type=int, default=950_000)
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the quality part's training reads it (training/machine.py)
    torch.set_num_threads(args.threads)
    from training.machine import cpu_description, fast_matmul_dtype

    print(f"torch {torch.__version__}; CPU: {cpu_description()}; training's Muon here: "
          f"{'torch.optim.Muon (bf16)' if fast_matmul_dtype('cpu') == torch.bfloat16 else 'Float32Muon'}")
    if "equivalence" in args.parts:
        equivalence()
    if "speed" in args.parts:
        speed(args.presets, {name: args.repeats[0] if name == "tiny" else args.repeats[1] for name in args.presets})
    if "quality" in args.parts:
        work = Path(args.work or tempfile.mkdtemp(prefix="muon-vs-torch-"))
        work.mkdir(parents=True, exist_ok=True)
        quality(Path(args.data_dir), work, args.seeds, args.max_tokens)


if __name__ == "__main__":
    main()
