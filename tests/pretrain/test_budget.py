"""Two hours means two hours: --time_budget bounds the whole command, data is sized to it, the plan
fits the run to the machine (simulated devices here), and --preset auto picks the model size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.pretrain import budget as budget_module
from training.pretrain import ladder
from training.pretrain import plan as plan_module
from training.pretrain.budget import TimeBudget, parse_duration
from training.pretrain.config import build_config, parse_args
from training.pretrain.plan import (
    GIB, Device, choose_precision, estimate_micro_batch, largest_micro_batch_that_runs, memory_for_training,
)
from training.data.prepare import prepare_shards
from training.pretrain.trainer import main as train_main, train
from training.data.shards import ShardedDataset

from tests.conftest import tiny_config
from tests.pretrain.test_pretrain import settings

WORDS = ("river stone light garden window paper morning silver winter harbor forest letter candle music "
         "bridge mountain island summer shadow whisper").split()


@pytest.fixture(scope="module")
def big_text_dir(tmp_path_factory) -> Path:
    """200 documents of made-up prose, about 300k tokens at a 320-token vocabulary: more than a
    few-second budget trains on, so that how much of it is tokenised shows."""
    import random

    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("big_text")
    for i in range(200):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(120)]
        (folder / f"doc{i:03d}.txt").write_text(" ".join(sentences), encoding="utf-8")
    return folder


def budget_settings(text_dir: Path, out: Path, seconds: float, **overrides) -> dict:
    """A run bounded by its whole time, not by steps."""
    return settings(text_dir, out, **{**dict(max_steps=None, time_budget=str(seconds), eval_every=0, eval_tokens=2048,
                                             log_every=5), **overrides})


# ---------------------------------------------------------------------- 1. the budget


def test_durations_are_read_as_people_write_them(capsys):
    assert [parse_duration(text) for text in ("2h", "90m", "45s", "1h30m", "600", "2.5m", 30)] == [
        7200, 5400, 45, 5400, 600, 150, 30]
    for bad in ("2 hours", "h", "-5", "0", "10x"):
        with pytest.raises(ValueError, match="time_budget"):
            parse_duration(bad)
    assert parse_args(["--time_budget", "90m"]).time_budget == "90m"
    assert train_main(["--time_budget", "two hours"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write it as 2h, 90m, 45s" in err


def test_the_training_time_gives_way_to_what_ran_long():
    now = [0.0]
    budget = TimeBudget(600, started=0.0, clock=lambda: now[0])
    budget.end_parts = {"evaluation": 20.0, "rest": 10.0}
    now[0] = 60.0  # preparing took a minute
    assert budget.training_seconds(0.0) == pytest.approx(510.0)
    with budget.phase("train"):
        now[0] = 300.0  # 200 s of steps, and 40 s of evaluations the plan did not count on
        # Steps had 200 of the 240 s since training began, and will have that share of what is left.
        assert budget.training_seconds(200.0) == pytest.approx(200.0 + 200 / 240 * 270.0)
        budget.measured_evaluation(50.0)  # the final evaluation will take what the last one took
        assert budget.training_seconds(200.0) == pytest.approx(200.0 + 200 / 240 * 240.0)
        now[0] = 590.0  # past the point where the end must start: no training time is left
        assert budget.training_seconds(450.0) == pytest.approx(450.0)


def test_a_time_budget_bounds_the_whole_command_and_the_summary_has_its_phases(tmp_path, big_text_dir, monkeypatch):
    from training.pretrain.run_state import Run

    # Evaluations during training that take 1 s longer than planned: training must give way.
    slow_evaluate = Run.evaluate

    def evaluate_slowly(self):
        import time

        time.sleep(1.0)
        return slow_evaluate(self)

    monkeypatch.setattr(Run, "evaluate", evaluate_slowly)
    run, seconds = tmp_path / "run", 14.0
    summary = train(build_config(budget_settings(big_text_dir, run, seconds, eval_every=40)))
    phases = summary["phases"]
    assert set(phases) == {"budget", "prepare", "train", "final_eval", "export", "total"}
    assert phases["total"] <= seconds * 1.02, phases
    assert phases["prepare"] + phases["train"] + phases["final_eval"] + phases["export"] <= phases["total"] + 0.01
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["phases"] == phases
    # The cool-down came in time: the learning rate reached its end before the final evaluation.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r for r in rows if r["kind"] == "train"][-1]["lr"] < 0.25
    assert summary["tokens_trained"] == summary["tokens"] > 0
    assert 0 < summary["seconds_to_first_step"] < phases["prepare"] + phases["train"]


# ---------------------------------------------------------------------- 2. data sized to the budget


def test_a_budget_tokenises_what_training_will_read_not_the_whole_source(tmp_path, big_text_dir, monkeypatch, capsys):
    # The probe says 1,000 tokens/s, a tenth of what this model trains at: the run prepares a few
    # thousand tokens first, then extends the shards as its measured speed asks.
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 1000.0)
    run = tmp_path / "run"
    summary = train(build_config(budget_settings(big_text_dir, run, 8.0, batch_size=2, seq_len=16, batch_tokens=32,
                                                 model={**settings(big_text_dir, run)["model"], "hidden_size": 16,
                                                        "intermediate_size": 32})))
    whole = prepare_shards(str(big_text_dir), _tokenizer(run), tmp_path / "whole", val_fraction=0.1, progress=False)
    assert "data: extended to" in capsys.readouterr().out
    # About what training read, within a factor of two either way: the extensions follow the speed the
    # run measures, which a busy or slow machine (a CPU held at AVX2) moves by that much in 8 seconds.
    trained, prepared = summary["tokens_trained"], summary["tokens_prepared"]
    assert 0.5 * trained < prepared <= 2 * trained + 5_000, (trained, prepared)
    assert prepared < whole.split("train").num_tokens / 2


def test_a_cap_reads_the_training_source_and_all_of_a_separate_validation_source(tmp_path, big_text_dir, tokenizer):
    files = sorted(big_text_dir.iterdir())
    val = tmp_path / "val"
    val.mkdir()
    for f in files[:20]:
        (val / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    capped = prepare_shards(str(big_text_dir), tokenizer, tmp_path / "capped", val_source=str(val), max_tokens=5_000,
                            progress=False)
    assert capped.split("train").num_tokens < 5_000 + 3_000 and capped.split("val").num_documents == 20


def _tokenizer(run: Path):
    from iterative_llm.tokenization import load_tokenizer

    return load_tokenizer(run / "data" / "tokenizer")


def test_shards_prepared_up_to_a_cap_are_extended_by_a_run_that_needs_more(tmp_path, big_text_dir, tokenizer):
    folder = tmp_path / "shards"
    # A cap that reads enough documents to hold some out whole, as the whole source does (a cap of a
    # few documents would hold out the end of each instead, and keep that rule when extended).
    first = prepare_shards(str(big_text_dir), tokenizer, folder, val_fraction=0.1, max_tokens=80_000,
                           shard_tokens=30_000, progress=False)
    first_files = {shard["file"]: (folder / shard["file"]).read_bytes()
                   for shard in first.manifest["splits"]["train"]["shards"]}
    less = prepare_shards(str(big_text_dir), tokenizer, folder, val_fraction=0.1, max_tokens=5_000, progress=False)
    assert less.split("train").num_tokens == first.split("train").num_tokens  # reused as it is
    more = prepare_shards(str(big_text_dir), tokenizer, folder, val_fraction=0.1, max_tokens=200_000,
                          shard_tokens=30_000, progress=False)
    assert 2 * first.split("train").num_tokens < more.split("train").num_tokens
    for name, data in first_files.items():  # extended from where it stopped: nothing tokenised twice
        assert (folder / name).read_bytes() == data
    everything = prepare_shards(str(big_text_dir), tokenizer, folder, val_fraction=0.1, progress=False)
    fresh = prepare_shards(str(big_text_dir), tokenizer, tmp_path / "fresh", val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        assert (everything.split(split).num_tokens, everything.split(split).num_documents) == (
            fresh.split(split).num_tokens, fresh.split(split).num_documents)
        assert (everything.split(split).read(0, everything.split(split).num_tokens)
                == fresh.split(split).read(0, fresh.split(split).num_tokens)).all()


def test_a_resumed_run_with_more_time_tokenises_more(tmp_path, big_text_dir, monkeypatch):
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 2000.0)
    run = tmp_path / "run"
    first = train(build_config(budget_settings(big_text_dir, run, 6.0)))
    resumed = train(build_config({**budget_settings(big_text_dir, run, 10.0), "resume": True}))
    assert resumed["tokens_prepared"] > first["tokens_prepared"] + 2000 * 3
    assert resumed["tokens_trained"] > first["tokens_trained"]


def test_a_budget_on_a_hub_dataset_reads_only_what_it_needs(tmp_path, monkeypatch):
    """The hub path (training/data/sources.py `_hub_documents`) with a local `datasets` dataset in place of
    the network: a budgeted run stops reading the stream once it has the tokens it will train on."""
    import datasets
    import random

    rng = random.Random(2)
    records = [{"text": " ".join(rng.choice(WORDS) for _ in range(200))} for _ in range(3000)]
    read = []

    def records_as_read():
        for record in records:
            read.append(1)
            yield record

    def local_stream(name, config=None, split=None, streaming=False):
        assert (name, config, split, streaming) == ("someone/corpus", "en", "train", True)
        return datasets.IterableDataset.from_generator(records_as_read)

    monkeypatch.setattr(datasets, "load_dataset", local_stream)
    monkeypatch.setattr(plan_module, "probe_tokens_per_second", lambda *a, **k: 1000.0)
    summary = train(build_config(budget_settings(Path("unused"), tmp_path / "run", 8.0, data="someone/corpus:en",
                                                 val_fraction=0.05)))
    assert 0 < summary["tokens_prepared"] and len(read) < len(records) / 3
    assert summary["seconds_to_first_step"] is not None


def test_an_unreachable_hub_dataset_stops_with_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = train_main(["--data", "nobody/corpus", "--out", str(tmp_path / "run"), "--report_to", "none",
                       "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "could not load dataset nobody/corpus from the Hugging Face hub" in err


# ---------------------------------------------------------------------- 3. --preset auto


def test_the_ladder_is_one_dial_and_depth_four_is_the_tiny_preset():
    from iterative_llm import PRESETS

    four = ladder.ladder_config(4)
    assert {k: four[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")} == {
        k: PRESETS["tiny"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    sizes = [ladder.parameters(ladder.ladder_config(d)) for d in range(1, 9)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 8
    assert ladder.learning_rates(4)["lr_embed"] == pytest.approx(0.73, abs=0.01)  # the tiny preset's, unrounded


def test_auto_picks_the_largest_size_that_gets_the_tokens_it_wants():
    probed = []

    def rate(depth):  # a machine where each size is half as fast as the one before
        probed.append(depth)
        return 64_000 / 2 ** depth

    chosen, rows = ladder.choose_depth(lambda depth: (rate(depth), None), lambda r: 100.0, tokens_per_parameter=4.0)
    wanted = [c.tokens >= 4.0 * c.parameters for c in rows]
    assert wanted[:-1] == [True] * (len(rows) - 1) and wanted[-1] is False
    assert chosen.depth == rows[-2].depth and probed == [c.depth for c in rows]  # no size past the stop probed
    more_time, _ = ladder.choose_depth(lambda depth: (rate(depth), None), lambda r: 10_000.0, tokens_per_parameter=4.0)
    assert more_time.depth > chosen.depth
    smallest, rows = ladder.choose_depth(lambda depth: (rate(depth), None), lambda r: 0.01, tokens_per_parameter=4.0)
    assert smallest.depth == 1 and len(rows) == 1


def test_a_size_its_flops_put_far_below_the_rule_is_not_probed():
    """The probe of the first size past the rule is the climb's longest: when the last size's speed,
    scaled by FLOPs, puts it under half the tokens it wants, the climb stops without it."""
    probed = []

    def rate(depth):
        probed.append(depth)
        return 64_000 / 2 ** depth

    flops = lambda depth: 2.0 ** depth  # noqa: E731  (FLOPs say what the probe says: half as fast a size)
    # Depth 3 gets 1.4 tokens per parameter in 200 s, under half of 4: not probed; depth 2 (5.1) is chosen.
    probe = lambda depth: (rate(depth), None)  # noqa: E731  (the speed, and nothing else decided)
    chosen, rows = ladder.choose_depth(probe, lambda r: 200.0, tokens_per_parameter=4.0, flops=flops)
    unprobed, _ = ladder.choose_depth(probe, lambda r: 200.0, tokens_per_parameter=4.0)
    assert chosen.depth == unprobed.depth == 2 and [c.depth for c in rows] == [1, 2] and probed == [1, 2, 1, 2, 3]
    # With a looser rule the next size is near it (between half and all of it): probed, as before.
    probed.clear()
    chosen, rows = ladder.choose_depth(probe, lambda r: 200.0, tokens_per_parameter=2.0, flops=flops)
    assert probed[-1] == chosen.depth + 1


def test_preset_auto_needs_a_budget_and_trains_the_size_it_chose(tmp_path, big_text_dir, monkeypatch, capsys):
    assert train_main(["--preset", "auto", "--data", str(big_text_dir), "--out", str(tmp_path / "none"),
                       "--max_steps", "5"]) == 1
    assert "give it a --time_budget" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()

    monkeypatch.setattr(plan_module, "probe_tokens_per_second",
                        lambda model_config, **k: 1e6 / model_config.num_hidden_layers ** 3)
    run = tmp_path / "auto"
    values = budget_settings(big_text_dir, run, 12.0, model_preset="auto", batch_size="auto", seq_len=32)
    values["model"] = {"vocab_size": 320, "max_position_embeddings": 64}
    summary = train(build_config(values))
    out = capsys.readouterr().out
    chosen = summary["plan"]["depth"]
    assert chosen in [row["depth"] for row in summary["plan"]["ladder"]]
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert saved["num_hidden_layers"] == chosen and saved["hidden_size"] == ladder.WIDTH_PER_DEPTH * chosen
    assert "plan:" in out and f"auto: depth {chosen}" in out


# ---------------------------------------------------------------------- 4. fitted to the machine

CARDS = {  # simulated devices: what the plan decides must not need the card
    "RTX 3070 (8 GB)": Device("cuda", "RTX 3070", 8 * GIB, True),
    "RTX 2060 (12 GB, no bf16)": Device("cuda", "RTX 2060", 12 * GIB, False),
    "RTX 4090 (24 GB)": Device("cuda", "RTX 4090", 24 * GIB, True),
    "H100 (80 GB)": Device("cuda", "H100", 80 * GIB, True),
}


def test_precision_follows_the_device_and_an_explicit_choice_wins():
    assert choose_precision(Device("cpu", "CPU", None, False), "auto").value == "fp32"
    assert choose_precision(CARDS["H100 (80 GB)"], "auto").value == "bf16"
    assert choose_precision(CARDS["RTX 2060 (12 GB, no bf16)"], "auto").value == "fp16"
    assert choose_precision(Device("mps", "Apple GPU", 16 * GIB, True), "auto").value == "bf16"
    assert choose_precision(CARDS["H100 (80 GB)"], "fp32").value == "fp32"
    with pytest.raises(ValueError, match="no bfloat16"):
        choose_precision(CARDS["RTX 2060 (12 GB, no bf16)"], "bf16")


def test_the_micro_batch_fits_the_card_and_the_step_keeps_its_tokens():
    from iterative_llm import IterativeLLMConfig

    gpt2 = IterativeLLMConfig.from_preset("gpt2-small")
    params = ladder.parameters_of(gpt2)
    chosen = {}
    for name, card in CARDS.items():
        precision = choose_precision(card, "auto").value
        batch, checkpointing = estimate_micro_batch(card, gpt2, params, seq_len=1024, batch_tokens=524_288,
                                                    precision=precision, preset_batch=32)
        assert memory_for_training(gpt2, params, batch.value, 1024, precision, checkpointing.value) <= 0.8 * card.memory_bytes
        assert 524_288 % (batch.value * 1024) == 0  # accumulation keeps the step's tokens
        chosen[name] = batch.value
    assert chosen["RTX 3070 (8 GB)"] < chosen["RTX 4090 (24 GB)"] < chosen["H100 (80 GB)"]
    assert chosen["RTX 3070 (8 GB)"] < 32  # the preset's 32 does not fit 8 GB (it peaks at 16 GiB)
    # A model whose one sequence does not fit without it gets activation checkpointing; one that
    # fits nowhere is refused with the fix.
    big = IterativeLLMConfig.from_preset("gpt2-medium")
    batch, checkpointing = estimate_micro_batch(Device("cuda", "10 GB card", 10 * GIB, True), big,
                                                ladder.parameters_of(big), seq_len=8192, batch_tokens=524_288,
                                                precision="bf16", preset_batch=8)
    assert checkpointing.value is True and memory_for_training(big, ladder.parameters_of(big), 1, 8192, "bf16",
                                                                False) > 0.8 * 10 * GIB
    with pytest.raises(ValueError, match="does not fit"):
        estimate_micro_batch(Device("cuda", "tiny card", 2 * GIB, True), big, ladder.parameters_of(big),
                             seq_len=1024, batch_tokens=524_288, precision="bf16", preset_batch=8)


def test_cpu_keeps_the_presets_micro_batch():
    batch, checkpointing = estimate_micro_batch(Device("cpu", "CPU", None, False), tiny_config(), 10_000,
                                                seq_len=256, batch_tokens=8192, precision="fp32", preset_batch=16)
    assert (batch.value, checkpointing.value) == (16, False)


def test_the_micro_batch_backs_off_under_a_memory_limit():
    tried = []

    def step_under_12(micro_batch):  # a device that holds 12 sequences
        tried.append(micro_batch)
        if micro_batch > 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    assert largest_micro_batch_that_runs(step_under_12, 64) == 8 and tried == [64, 32, 16, 8]
    with pytest.raises(ValueError, match="out of memory at every micro-batch"):
        largest_micro_batch_that_runs(lambda b: step_under_12(100), 4)

    def broken(micro_batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):  # only out-of-memory is backed off from
        largest_micro_batch_that_runs(broken, 8)


def test_fp16_loss_scaling_steps_as_plain_training_does():
    from iterative_llm import IterativeLLMForCausalLM
    from training.pretrain.optim import build_optimizers
    from training.pretrain.step import train_step

    def one_step(scaler):
        torch.manual_seed(0)
        model = IterativeLLMForCausalLM(tiny_config()).train()
        optimizers = build_optimizers(model)
        ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, :-1].contiguous(),
                 "shift_labels": ids[:, 1:].contiguous()}
        train_step(model, optimizers, iter([batch]), accumulation=1, grad_clip=1.0, loss_kwargs={}, scaler=scaler)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert torch.allclose(one_step(None), one_step(scaler), atol=1e-5)
    assert scaler.get_scale() == 1024.0  # no overflow: the scale stays


# ---------------------------------------------------------------------- 5. the README's table

COMMON_CARDS = [  # (card, memory in GB as sold, native bf16)
    ("RTX 3060 Ti / 4060 Ti", 8, True), ("RTX 2080 / GTX 1080", 8, False), ("RTX 3060 / 4070", 12, True),
    ("T4", 16, False), ("RTX 3090 / 4090", 24, True), ("A100 / H100", 80, True),
]


def card_table() -> list[str]:
    """What the plan chooses for the gpt2-small preset on common cards (the README shows these rows)."""
    from iterative_llm import IterativeLLMConfig

    gpt2 = IterativeLLMConfig.from_preset("gpt2-small")
    params = ladder.parameters_of(gpt2)
    rows = ["| card | memory | precision | micro-batch | accumulation | activation checkpointing | memory planned |",
            "|---|---|---|---|---|---|---|"]
    for name, gb, bf16 in COMMON_CARDS:
        card = Device("cuda", name, gb * 10**9, bf16)
        precision = choose_precision(card, "auto").value
        batch, checkpointing = estimate_micro_batch(card, gpt2, params, seq_len=1024, batch_tokens=524_288,
                                                    precision=precision, preset_batch=32)
        need = memory_for_training(gpt2, params, batch.value, 1024, precision, checkpointing.value)
        rows.append(f"| {name} | {gb} GB | {precision} | {batch.value} x 1024 | {524_288 // (batch.value * 1024)} "
                    f"| {'on' if checkpointing.value else 'off'} | {need / GIB:.1f} GiB |")
    return rows


def test_the_readme_shows_what_the_plan_chooses_on_common_cards():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = card_table()
    missing = [row for row in rows if row not in readme]
    assert not missing, "README.md's table of common cards differs from the plan's decisions:\n" + "\n".join(rows)


def test_a_card_that_only_emulates_bf16_trains_in_fp16(monkeypatch):
    """A T4 or V100: torch.cuda.is_bf16_supported() says yes by default (emulated, slow); the plan must not."""
    from types import SimpleNamespace

    from training.pretrain.plan import Device, choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    device = Device.this_machine()
    assert device.kind == "cuda" and device.bf16 is False
    assert choose_precision(device, "auto").value == "fp16"
