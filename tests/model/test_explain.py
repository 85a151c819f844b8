"""`iterative-llm explain`: the numbers it reports are the model's own, and its pictures and report exist."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from iterative_llm import cli, explain as explain_module
from iterative_llm.explain import ExplainError, explain, load, main, run

from tests.conftest import tiny_model

# "日" is three UTF-8 bytes that the small test vocabulary has never seen: it is split into byte tokens.
SENTENCE = "The cat sees 日 the dog"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELING = Path(explain_module.__file__).with_name("modeling_iterative_llm.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(str(model_dir))


@pytest.fixture(scope="module")
def report(loaded, tmp_path_factory):
    """One full run with pictures, on layer 1, head 3 (a query head of the second key/value group)."""
    model, tokenizer = loaded
    out = tmp_path_factory.mktemp("explain_out")
    printed = io.StringIO()
    ex, steps = run(model, tokenizer, SENTENCE, layer=1, head=3, top_k=5, out_dir=str(out), stream=printed)
    return ex, steps, printed.getvalue(), out


@pytest.fixture(scope="module")
def reference(model_dir):
    """The model loaded on its own, with eager attention: its forward gives the weights and logits to match."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()

    def forward(input_ids):
        with torch.no_grad():
            return model(input_ids, output_attentions=True)

    return forward


@pytest.mark.parametrize("layer, head", [(0, 0), (1, 3), (1, 1)])
def test_attention_weights_are_the_models_own(reference, loaded, layer, head):
    model, tokenizer = loaded
    ex = explain(model, tokenizer, SENTENCE, layer=layer, head=head)
    ids = torch.tensor([[t.id for t in ex.tokens]])
    theirs = reference(ids)

    # The weights explain recomputes step by step, from the model's own modules...
    torch.testing.assert_close(ex.weights, theirs.attentions[layer][0, head], rtol=0, atol=1e-6)
    # ...and the ones it draws for every layer and head.
    for mine, model_own in zip(ex.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(mine, model_own[0], rtol=0, atol=0)
    # Each row is a probability distribution over the tokens up to and including its own.
    torch.testing.assert_close(ex.weights.sum(-1), torch.ones(ex.length))
    above = torch.triu(torch.ones(ex.length, ex.length, dtype=torch.bool), diagonal=1)
    assert torch.all(ex.weights[above] == 0)
    assert torch.all(ex.weights[~above] > 0)
    assert ex.model_weights_diff < 1e-6
    # The masked scores are the scaled scores plus 0 below the diagonal, the most negative float above.
    torch.testing.assert_close(ex.scores_masked[~above], ex.scores_scaled[~above])
    assert torch.all(ex.scores_masked[above] < -1e30)
    torch.testing.assert_close(ex.scores_scaled, ex.scores_raw * model.config.head_dim**-0.5)


def test_next_token_probabilities_are_the_softmax_of_the_models_logits(reference, report):
    ex, steps, printed, _ = report
    ids = torch.tensor([[t.id for t in ex.tokens]])
    logits = reference(ids).logits[0, -1]
    torch.testing.assert_close(ex.probs, torch.softmax(logits.float(), -1), rtol=0, atol=1e-7)
    top_p, top_ids = torch.softmax(logits.float(), -1).topk(5)
    assert [tok.id for tok, _, _ in ex.top] == top_ids.tolist()
    assert [p for _, p, _ in ex.top] == pytest.approx(top_p.tolist())
    # The logits are the soft-capped lm_head output, and the step says so.
    cap = ex.config.final_logit_softcapping
    torch.testing.assert_close(ex.logits, cap * torch.tanh(ex.logits_raw / cap), rtol=1e-5, atol=1e-5)
    next_step = next(s for s in steps if s.key == "next_token")
    assert "final_logit_softcapping" in next_step.text and "BEFORE the softmax" in next_step.text
    assert f"{ex.top[0][1]:.4f}" in printed


def test_tokens_show_their_bytes_and_split_characters_honestly(report):
    ex, _, printed, _ = report
    assert b"".join(t.raw for t in ex.tokens) == SENTENCE.encode("utf-8")
    the = next(t for t in ex.tokens if t.text == " the")
    assert re.search(r"' the'\s+20 74 68 65", printed)
    assert the.id in [int(i) for i in re.findall(r"\d+", printed.split("input_ids = ")[1].split("]")[0])]
    split = [t for t in ex.tokens if t.note]
    assert [t.raw for t in split] == [b"\xe6", b"\x97", b"\xa5"]
    assert all(t.text is None for t in split)
    assert split[0].note == "byte 1 of the 3 bytes of '日'"
    assert "byte 3 of the 3 bytes of '日'" in printed
    assert "(partial character)" in printed


def test_each_step_names_the_lines_that_do_it(report):
    _, steps, printed, _ = report
    source = MODELING.read_text(encoding="utf-8").splitlines()
    expected = {  # a step -> code every one of its ranges must include at least one of
        "embeddings": ["embed_tokens(", "embed_norm(", "F.rms_norm("],
        "positions": ["rotary_emb(", "inv_freq", "angles"],
        "qkv": ["input_layernorm(", "q_proj(", "k_proj(", "v_proj("],
        "rotary": ["apply_rotary(", "rotate_half(", "torch.cat((-x2, x1)"],
        "scores": ["create_causal_mask(", "softmax(", "* scaling"],
        "values": ["torch.matmul(weights, value)", "o_proj("],
        "residual": ["for layer in self.layers", "hidden_states = hidden_states +", "down_proj("],
        "next_token": ["self.norm(", "lm_head(", "tanh("],
    }
    for step in steps:
        if step.key not in expected:
            continue
        assert step.code, step.key
        for ref in step.code:
            low, high = map(int, re.fullmatch(r"modeling_iterative_llm\.py:L(\d+)-L(\d+) \(.+\)", ref).groups())
            chunk = "\n".join(source[low - 1 : high])
            assert any(needle in chunk for needle in expected[step.key]), (step.key, ref, chunk)
            assert ref in printed


def test_pictures_and_report_are_written_and_name_every_step(report, loaded):
    ex, steps, _, out = report
    layers = loaded[0].config.num_hidden_layers
    pictures = ["attention_steps.png", "residual_stream.png", "next_token.png"]
    pictures += [f"attention_layer{i:02d}.png" for i in range(layers)]
    from matplotlib.image import imread

    for name in pictures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert imread(out / name).shape[0] > 100, name

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.headings, self.tags, self._in_h2 = [], [], [], False

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            self._in_h2 = tag == "h2"

        def handle_endtag(self, tag):
            self._in_h2 = self._in_h2 and tag != "h2"

        def handle_data(self, data):
            if self._in_h2:
                self.headings.append(data)

    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    page = Page()
    page.feed(text)
    assert sorted(page.images) == sorted(pictures)
    assert page.headings == [f"Step {i}. {s.title}" for i, s in enumerate(steps, 1)]
    for title in ("Sentence to tokens", "Tokens to token ids", "Token ids to embeddings", "Positions",
                  "Query, key and value", "Rotary positions", "scaled, masked, softmax",
                  "residual stream", "Next-token probabilities"):
        assert any(title in h for h in page.headings), title
    assert "modeling_iterative_llm.py:L" in text


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith("iterative-llm explain: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "sentence, options, message",
    [
        ("", [], "the sentence is empty"),
        ("the cat " * 80, [], "longer than this model's context (max_position_embeddings = 64)"),
        (SENTENCE, ["--layer", "2"], "--layer 2 is out of range: this model has 2 layers"),
        (SENTENCE, ["--head", "-1"], "--head -1 is out of range"),
        (SENTENCE, ["--top-k", "0"], "--top_k must be at least 1"),  # the dashed alias, named canonically
    ],
    ids=["empty", "too-long", "layer", "head", "top-k"],
)
def test_bad_input_gets_one_clear_line(model_dir, tmp_path, capsys, sentence, options, message):
    assert main([str(model_dir), sentence, "--out", str(tmp_path / "out"), *options]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_model_folders_get_one_clear_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "hi"]) == 2
    assert "no model folder at" in _one_line_error(capsys)

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "hi"]) == 2
    assert "holds no config.json" in _one_line_error(capsys)

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    assert main([str(tmp_path / "gpt2"), "hi"]) == 2
    assert "holds a 'gpt2' model; explain walks through iterative-llm models only" in _one_line_error(capsys)


def test_a_model_that_cannot_load_with_eager_attention_gets_one_clear_line(model_dir, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("This model does not support `attn_implementation='eager'`.\nMore details here.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    assert main([str(model_dir), "hi"]) == 2
    line = _one_line_error(capsys)
    assert "cannot load the model" in line and "with eager attention" in line and "does not support" in line


def test_a_model_running_sdpa_attention_is_refused(loaded):
    model, tokenizer = loaded
    model.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(ExplainError, match="does not return attention weights"):
            explain(model, tokenizer, SENTENCE)
    finally:
        model.config._attn_implementation = "eager"


def test_the_cli_dispatches_explain(model_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert cli.main(["explain", str(model_dir), "The dog", "--out", str(out), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "=== Step 1. Sentence to tokens ===" in printed and "=== Step 10. Next-token probabilities ===" in printed
    assert (out / "report.html").is_file()
