"""`iterative-llm eval`: HellaSwag scored as lm-eval scores it, bits per byte, lm-eval itself, bad input."""

from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iterative_llm.cli import main as cli_main
from training.pretrain.config import build_config
from training.eval.bits_per_byte import text_bits_per_byte, window_plan
from training.eval.hellaswag import HELLASWAG_REFERENCES, hellaswag_in_run, load_items, score_hellaswag, to_item
from training.pretrain.trainer import train

from tests.conftest import third_party_env, tiny_model
from tests.pretrain.test_pretrain import settings, text_dir  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]


def record(ending_texts: list[str], label: int, *, ctx_a: str = "The cat sees a dog.", ctx_b: str = "the dog",
           activity: str = "Walking the dog") -> dict:
    """A HellaSwag record in the dataset's own fields (label as an int, as in hellaswag_val.jsonl)."""
    return {"ind": 0, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            "endings": ending_texts, "label": label, "split": "val", "source_id": "test"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# Endings of different lengths in characters and tokens, so acc and acc_norm can disagree.
ENDINGS = [
    ["likes the red ball.", "paints a green tree at night.", "follows the river!", "sees it."],
    ["finds an open door today.", "carries the quiet town.", "remembers a bright star again.", "likes [title] it."],
    ["sees the teacher.", "paints our team at night.", "finds a small bird?", "follows my friend today."],
]


@pytest.fixture
def lm(tokenizer):
    """The tiny model, sized for the test tokenizer (300 tokens), with random weights."""
    return tiny_model(seed=3, vocab_size=320, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture
def model_folder(tmp_path, lm, tokenizer) -> Path:
    folder = tmp_path / "model"
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------- reading items


def test_items_are_cleaned_and_built_as_lm_eval_builds_them():
    item = to_item(record(["walks [header] home  now.", "runs."], 1, ctx_a="A man [title] waits.", ctx_b="he sits"),
                   "test")
    # ctx_b capitalised, " [title]" -> ". ", other brackets dropped, double spaces made single
    assert item.context == "Walking the dog: A man. waits. He sits"
    assert item.endings == ("walks home now.", "runs.") and item.label == 1
    # the hub copy stores the label as a string; a record with only `ctx` is accepted too
    only_ctx = {"activity_label": "Cooking", "ctx": "She stirs the pot", "endings": ["a", "b"], "label": "0"}
    assert to_item(only_ctx, "test").context == "Cooking: She stirs the pot" and to_item(only_ctx, "test").label == 0


# ---------------------------------------------------------------------- scoring


def test_scores_equal_a_hand_computation_of_summed_and_length_normalised_loglikelihoods(lm, tokenizer):
    items = [to_item(record(endings, label), "test") for endings, label in zip(ENDINGS, [0, 1, 2])]
    result = score_hellaswag(lm, tokenizer, items, max_length=64, batch_size=3)  # batches mix items and lengths

    hits, hits_norm = [], []
    for item, scored in zip(items, result["per_item"]):
        lls = []
        for ending in item.endings:
            context = tokenizer(item.context)["input_ids"]
            whole = tokenizer(item.context + " " + ending)["input_ids"]
            with torch.no_grad():
                logprobs = F.log_softmax(lm(torch.tensor([whole])).logits[0].float(), dim=-1)
            # token j of the sequence is predicted at position j - 1
            lls.append(sum(logprobs[j - 1, whole[j]].item() for j in range(len(context), len(whole))))
        np.testing.assert_allclose(scored["loglikelihoods"], lls, rtol=1e-5, atol=1e-4)
        hits.append(int(np.argmax(lls)) == item.label)
        hits_norm.append(int(np.argmax(np.array(lls) / [len(e) for e in item.endings])) == item.label)
    assert result["acc"] == pytest.approx(np.mean(hits)) and result["acc_norm"] == pytest.approx(np.mean(hits_norm))
    assert result["items"] == 3
    # the endings' lengths differ enough that the normalisation changes some answers
    assert [p["pred"] for p in result["per_item"]] != [p["pred_norm"] for p in result["per_item"]]


class UnigramModel(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are one fixed vector, whatever the context."""

    def __init__(self, logits: torch.Tensor, max_positions: int = 64):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


class BigramModel(UnigramModel):
    """Next-token logits that depend on the current token only: windows cannot change its scores."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits[input_ids])


def test_a_model_that_prefers_the_right_endings_scores_100_percent(tokenizer):
    right = ["likes the red ball.", "paints a green tree.", "follows the river.", "sees the quiet town."]
    wrong = ["zqx vjk wqp.", "xqz kjv.", "qqzz xxkk jj."]
    records = [record(wrong[:label] + [ending] + wrong[label:], label) for label, ending in enumerate(right)]
    favoured = {t for ending in right for t in tokenizer(" " + ending)["input_ids"]}
    logits = torch.zeros(320)
    logits[sorted(favoured)] = 10.0
    result = score_hellaswag(UnigramModel(logits), tokenizer, [to_item(r, "t") for r in records], max_length=64)
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0


def test_a_model_that_cannot_tell_endings_apart_scores_chance_and_ties_go_to_the_first(tokenizer):
    # Endings with the same words in other orders: same tokens (each word has its leading space),
    # same length in characters, so every ending ties on both acc and acc_norm.
    endings = ["cat dog bird", "dog bird cat", "bird cat dog", "cat bird dog"]
    items = [to_item(record(endings, label % 4), "t") for label in range(8)]
    counts = {len(tokenizer(" " + e)["input_ids"]) for e in endings}
    assert len(counts) == 1
    model = tiny_model(vocab_size=320)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the uniform distribution
    assert model(torch.tensor([[5, 6, 7]])).logits.abs().max() == 0
    result = score_hellaswag(model, tokenizer, items, max_length=64)
    # lm-eval takes numpy's argmax, the first of equal values: every answer is ending 0,
    # right for the quarter of the items whose label is 0.
    assert {p["pred"] for p in result["per_item"]} == {0} and {p["pred_norm"] for p in result["per_item"]} == {0}
    assert result["acc"] == 0.25 and result["acc_norm"] == 0.25


# ---------------------------------------------------------------------- bits per byte


def test_bits_per_byte_is_the_mean_loss_times_tokens_over_bytes_over_ln2(lm, tokenizer, corpus):
    documents = [corpus[0][:100], corpus[1][:30] + " Ünïcödé ✓"]  # non-ASCII: bytes are not characters
    result = text_bits_per_byte(lm, tokenizer, documents, window=64)
    nats, tokens = 0.0, 0
    for text in documents:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert ids.shape[1] <= 64  # each fits one window
        with torch.no_grad():
            loss = lm(input_ids=ids, labels=ids).loss.item()  # the model's own mean next-token loss
        nats += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    num_bytes = sum(len(t.encode("utf-8")) for t in documents)
    assert num_bytes > sum(len(t) for t in documents)
    assert result["tokens"] == tokens and result["bytes"] == num_bytes and result["documents"] == 2
    assert result["bits_per_byte"] == pytest.approx(nats / tokens * tokens / num_bytes / math.log(2), rel=1e-5)
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)


@pytest.mark.parametrize("length,window,stride", [(2, 4, 1), (10, 4, 3), (50, 16, 5), (64, 64, 32), (100, 64, 63)])
def test_windows_score_every_token_once_each_with_context(length, window, stride):
    plan = window_plan(length, window, stride)
    targets = [t for begin, end, first in plan for t in range(first, end)]
    assert targets == list(range(1, length))  # each token after the first, once, in order
    for k, (begin, end, first) in enumerate(plan):
        assert end - begin <= window and begin < first
        if k:
            assert first - begin >= window - stride  # the overlap is context for every target
    with pytest.raises(ValueError, match="stride"):
        window_plan(length, window, window)


def test_windowed_scoring_of_a_long_document_equals_scoring_it_in_one_pass(tokenizer, corpus, lm):
    long_text = " ".join(corpus[:4])
    length = len(tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert length > 3 * 16
    torch.manual_seed(0)
    bigram = BigramModel(torch.randn(320, 320))
    one_pass = text_bits_per_byte(bigram, tokenizer, [long_text], window=length + 1)
    windowed = text_bits_per_byte(bigram, tokenizer, [long_text], window=16, stride=5, batch_size=3)
    assert windowed["tokens"] == one_pass["tokens"] == length
    assert windowed["bits_per_byte"] == pytest.approx(one_pass["bits_per_byte"], rel=1e-6)
    # with a real model the windows give each token less context, which changes the figure
    short = text_bits_per_byte(lm, tokenizer, [long_text], window=16, stride=8)
    full = text_bits_per_byte(tiny_model(seed=3, vocab_size=320, max_position_embeddings=256), tokenizer,
                              [long_text], window=256)
    assert short["tokens"] == full["tokens"] and short["bits_per_byte"] != pytest.approx(full["bits_per_byte"])


# ---------------------------------------------------------------------- the command


def test_eval_prints_a_column_per_model_with_the_reference_figures(tmp_path, model_folder, tokenizer, corpus, capsys):
    other = tmp_path / "other"
    tiny_model(seed=9, vocab_size=320).save_pretrained(other)
    tokenizer.save_pretrained(other)
    items = write_jsonl(tmp_path / "val.jsonl", [record(e, i) for i, e in enumerate(ENDINGS)])
    text = tmp_path / "text.txt"
    text.write_text(corpus[5], encoding="utf-8")
    out = tmp_path / "figures.json"
    code = cli_main(["eval", str(model_folder), str(other), "--hellaswag", str(items), "--limit", "2",
                     "--text", str(text), "--json", str(out), "--no_progress"])
    printed = capsys.readouterr().out
    assert code == 0
    header = printed.splitlines()[0]
    assert str(model_folder) in header and str(other) in header
    figures = json.loads(out.read_text(encoding="utf-8"))
    for name in (str(model_folder), str(other)):
        model = figures["models"][name]
        assert model["hellaswag_items"] == 2 and f"{100 * model['hellaswag_acc_norm']:.2f}%" in printed
        assert model["text_bytes"] == len(corpus[5].encode()) and f"{model['text_bits_per_byte']:.4f}" in printed
    for name, value, source in HELLASWAG_REFERENCES:
        assert name in printed and source in printed and f"{100 * value:.1f}%" in printed
    assert figures["hellaswag_references"][0]["acc_norm"] == HELLASWAG_REFERENCES[0][1]


def test_the_readme_quotes_the_reference_figures_of_the_one_list():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Evaluate"):readme.index("## Alignment")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split("|")[2].strip() for row in rows] == [f"{100 * value:.1f}%" for _, value, _ in HELLASWAG_REFERENCES]


@pytest.mark.parametrize("case,message", [
    ("missing_field", "missing field endings"),
    ("label_outside", "label 4 is outside the 4 endings"),
    ("empty_file", "the file is empty"),
    ("not_json", "line 1: not JSON"),
    ("no_tokenizer", "has no tokenizer"),
    ("empty_text", "no documents in"),
    ("no_model", "does not exist"),
])
def test_bad_input_is_named_without_a_traceback(tmp_path, model_folder, case, message, capsys):
    items = write_jsonl(tmp_path / "ok.jsonl", [record(ENDINGS[0], 0)])
    args = [str(model_folder), "--hellaswag", str(items)]
    if case == "missing_field":
        broken = record(ENDINGS[0], 0)
        del broken["endings"]
        args[2] = str(write_jsonl(tmp_path / "bad.jsonl", [record(ENDINGS[1], 1), broken]))
    elif case == "label_outside":
        args[2] = str(write_jsonl(tmp_path / "bad.jsonl", [record(ENDINGS[0], 4)]))
    elif case == "empty_file":
        (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
        args[2] = str(tmp_path / "empty.jsonl")
    elif case == "not_json":
        (tmp_path / "bad.jsonl").write_text("ctx,endings,label\n", encoding="utf-8")
        args[2] = str(tmp_path / "bad.jsonl")
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        tiny_model(vocab_size=320).save_pretrained(bare)
        args[0] = str(bare)
    elif case == "empty_text":
        (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
        args = [str(model_folder), "--text", str(tmp_path / "empty.txt")]
    elif case == "no_model":
        args[0] = str(tmp_path / "nowhere")
    code = cli_main(["eval", *args, "--no_progress"])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert message in error
    if case == "missing_field":
        assert "bad.jsonl line 2" in error  # where, too


def test_the_hub_split_fails_offline_with_a_way_out(monkeypatch, capsys, model_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = cli_main(["eval", str(model_folder), "--hellaswag", "hub", "--limit", "3", "--no_progress"])
    error = capsys.readouterr().err
    assert code == 2 and "could not load Rowan/hellaswag" in error and "--hellaswag hellaswag_val.jsonl" in error


# ---------------------------------------------------------------------- lm-eval-harness itself


TASK_YAML = """\
task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
test_split: null
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_harness_runs_on_our_folder_and_agrees_with_iterative_llm_eval(tmp_path, model_folder, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval-harness is in the [test] and [eval] extras")
    records = [record(ENDINGS[i % 3][i % 4:] + ENDINGS[i % 3][:i % 4], i % 4, ctx_b=["he", "she", "it"][i % 3])
               for i in range(9)]
    data = write_jsonl(tmp_path / "items.jsonl", records)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    # lm-eval's own hellaswag preprocessing, not ours
    (tasks / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n", encoding="utf-8")
    env = third_party_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"),
                          OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={model_folder},trust_remote_code=True", "--tasks", "tiny_hellaswag", "--include_path", str(tasks),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600, encoding="utf-8"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    harness = json.loads(Path(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read_text(encoding="utf-8"))
    harness = harness["results"]["tiny_hellaswag"]
    samples = [json.loads(line) for line in
               Path(glob.glob(str(tmp_path / "out" / "*" / "samples_*.jsonl"))[0]).read_text(encoding="utf-8").splitlines()]

    out = tmp_path / "ours.json"
    assert cli_main(["eval", str(model_folder), "--hellaswag", str(data), "--json", str(out), "--no_progress"]) == 0
    ours = json.loads(out.read_text(encoding="utf-8"))["models"][str(model_folder)]
    assert ours["hellaswag_acc"] == pytest.approx(harness["acc,none"])
    assert ours["hellaswag_acc_norm"] == pytest.approx(harness["acc_norm,none"])
    # and item by item, the log-likelihood of every ending
    per_item = score_hellaswag(*_load(model_folder), load_items(str(data)), max_length=64)["per_item"]
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        theirs = [float(response[0]) for response in sample["filtered_resps"]]
        np.testing.assert_allclose(per_item[sample["doc_id"]]["loglikelihoods"], theirs, rtol=1e-5, atol=1e-4)
        mine = per_item[sample["doc_id"]]
        assert (sample["acc"], sample["acc_norm"]) == (mine["pred"] == mine["label"], mine["pred_norm"] == mine["label"])


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------- during pretraining


def test_pretraining_scores_hellaswag_and_the_model_card_carries_it(tmp_path, text_dir):  # noqa: F811
    items = write_jsonl(tmp_path / "val.jsonl", [record(ENDINGS[i % 3], i % 4) for i in range(6)])
    run = tmp_path / "run"
    train(build_config(settings(text_dir, run, max_steps=8, eval_every=2, hellaswag=str(items), hellaswag_every=4,
                                hellaswag_limit=5)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    scored = [r for r in evals if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and [r["step"] for r in scored] == [4, 8]
    assert all(r["hellaswag_items"] == 5 and 0 <= r["hellaswag_acc_norm"] <= 1 for r in scored)
    # the run's final figure is the eval command's figure for the exported model
    model, tokenizer = _load(run)
    final = score_hellaswag(model, tokenizer, load_items(str(items), limit=5), max_length=64)
    assert scored[-1]["hellaswag_acc_norm"] == pytest.approx(final["acc_norm"])
    card = (run / "README.md").read_text(encoding="utf-8")
    assert f"| {100 * final['acc_norm']:.1f}% | this run's metrics.jsonl, step 8 |" in card
    for name, value, source in HELLASWAG_REFERENCES:
        assert f"| {name} | {100 * value:.1f}% | {source} |" in card
    assert (run / "loss_curve.png").is_file()


def test_pretraining_hellaswag_settings_are_checked_before_training(tmp_path, text_dir):  # noqa: F811
    with pytest.raises(ValueError, match="multiple of `eval_every`"):
        build_config(settings(text_dir, tmp_path, eval_every=4, hellaswag="hub", hellaswag_every=6))
    with pytest.raises(ValueError, match="missing field label"):
        bad = record(ENDINGS[0], 0)
        del bad["label"]
        build_config(settings(text_dir, tmp_path, hellaswag=str(write_jsonl(tmp_path / "bad.jsonl", [bad]))))
    card_without = settings(text_dir, tmp_path / "plain", max_steps=2, eval_every=0)
    train(build_config(card_without))
    assert "HellaSwag was not scored during this run" in (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")


def test_data_parallel_processes_each_score_their_share_of_the_items(tmp_path, model_folder):
    # 7 items over 2 processes: 4 and 3. Without a process group each returns its own share (with one,
    # hellaswag_in_run adds the counts up with all_reduce); the shares add up to the whole.
    items = write_jsonl(tmp_path / "val.jsonl", [record(ENDINGS[i % 3][i % 4:] + ENDINGS[i % 3][:i % 4], i % 4)
                                                  for i in range(7)])
    config = SimpleNamespace(hellaswag=str(items), hellaswag_every=0, hellaswag_limit=None)
    model, tokenizer = _load(model_folder)
    alone = hellaswag_in_run(config, model, tokenizer, 3, final=True)
    shares = [hellaswag_in_run(config, model, tokenizer, 3, final=True, rank=rank, world_size=2) for rank in (0, 1)]
    assert [share["hellaswag_items"] for share in shares] == [4, 3] and alone["hellaswag_items"] == 7
    for key in ("hellaswag_acc", "hellaswag_acc_norm"):
        assert sum(share[key] * share["hellaswag_items"] for share in shares) == pytest.approx(alone[key] * 7)
    every_2 = SimpleNamespace(**{**vars(config), "hellaswag_every": 2})
    assert hellaswag_in_run(every_2, model, tokenizer, 3, final=False) == {}  # step 3 is not a HellaSwag step
    assert hellaswag_in_run(every_2, model, tokenizer, 4, final=False)["hellaswag_items"] == 7
