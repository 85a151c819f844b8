"""The fast path computes what the plain path computes, and the speed benchmark runs.

Speed itself is measured in benchmarks/throughput.py, not asserted here.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.throughput import Contestant
from iterative_llm import IterativeLLMForCausalLM
from training.pretrain.optim import build_optimizers

from tests.conftest import skip_unless_compile_works, tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compiled_training_step_gives_the_eager_losses():
    """Training steps under bf16 autocast with the model compiled as training compiles it (per block and
    the loss: the GPU fast path of benchmarks/throughput.py) give the losses and Muon updates of the same
    steps run eagerly."""
    skip_unless_compile_works()
    torch.manual_seed(0)
    eager_model = IterativeLLMForCausalLM(tiny_config(num_hidden_layers=1)).train()  # 1 layer: compiles faster
    compiled_model = copy.deepcopy(eager_model)
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (3, 4, 32), generator=generator)]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    losses, optimizers = {}, {}
    for name, model, compiled in (("eager", eager_model, False), ("compiled", compiled_model, True)):
        optimizers[name] = build_optimizers(model)
        step = Contestant(name, model, optimizers[name], compile_model=compiled, label=name,
                          loss_kwargs={"skip_logits": True})
        losses[name] = []
        for batch in batches:
            loss = torch.zeros(())
            step.train_step([batch], torch.device("cpu"), autocast, loss, grad_clip=1.0)
            losses[name].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0]  # the steps did train
    # bf16 keeps about 3 significant digits: losses agree to 2%.
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=2e-2, atol=0.0)
    # The Muon matrices move by orthogonalised, bounded steps, so rounding stays rounding. (Adam's
    # embedding rows are left out: with eps 1e-10 a row whose gradient is rounding noise moves by
    # +-lr whatever its sign, so they legitimately differ; in fp32 they agree to 1e-5.)
    muon_eager, muon_compiled = (optimizers[name][0].param_groups[0]["params"] for name in ("eager", "compiled"))
    for p_eager, p_compiled in zip(muon_eager, muon_compiled):
        torch.testing.assert_close(p_compiled, p_eager, rtol=0.0, atol=5e-3)


@pytest.mark.slow
def test_throughput_benchmark_runs_end_to_end_and_prints_its_table(tmp_path):
    figures_file = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--preset", "tiny", "--device", "cpu", "--vocab-size", "256",
         "--batch-size", "2", "--seq-len", "32", "--grad-accum", "2", "--steps", "1", "--rounds", "2", "--warmup", "1",
         "--gen-batch", "2", "--prompt-len", "4", "--new-tokens", "4", "--json", str(figures_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, encoding="utf-8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("tiny preset, vocab 256"):]
    header = next(line for line in table.splitlines() if line.split()[:2] == ["ours", "gpt2"])
    assert header.split() == ["ours", "gpt2", "ratio", "ours/gpt2"]
    train_row = next(line for line in table.splitlines() if line.startswith("train tokens/s"))
    generate_row = next(line for line in table.splitlines() if line.startswith("generate tokens/s, dynamic cache"))
    for row in (train_row, generate_row):
        ours, gpt2, ratio = row.split()[-3:]
        assert float(ours.replace(",", "")) > 0 and float(gpt2.replace(",", "")) > 0 and float(ratio) > 0
    assert "train MFU" in table and "n/a" in table  # no peak FLOP/s is known for a CPU
    figures = json.loads(figures_file.read_text(encoding="utf-8"))
    assert figures["models"]["ours"]["train_tokens_per_s"] > 0 and figures["train_ratio"] > 0


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=320, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    IterativeLLMForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_with_a_static_cache_writes_the_dynamic_cache_text(model_folder, capsys):
    from training.eval.generate import main as generate_main

    texts = {}
    for cache in ("dynamic", "static"):
        assert generate_main([str(model_folder), "The cat", "--temperature", "0", "--max-new-tokens", "12",
                              "--cache", cache]) == 0
        texts[cache] = capsys.readouterr().out
    assert texts["static"] == texts["dynamic"] and len(texts["dynamic"]) > len("The cat\n")


def test_generate_refuses_compile_with_the_dynamic_cache(model_folder, capsys):
    from training.eval.generate import main as generate_main

    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(model_folder), "The cat", "--compile", "--cache", "dynamic"])
    assert exit_info.value.code == 2 and "--compile needs the static cache" in capsys.readouterr().err
