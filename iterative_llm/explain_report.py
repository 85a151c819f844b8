"""The HTML report of `iterative-llm explain`: the steps in order, with their code lines, numbers and
pictures, on one page."""

from __future__ import annotations

import html
import os

from .explain_steps import Step
from .explain_trace import Explanation

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
pre { background: #f6f8fa; padding: 0.8em 1em; overflow-x: auto; font-size: 0.85em; line-height: 1.35;
      border-radius: 4px; }
.code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; color: #555; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
nav ol { columns: 2; font-size: 0.95em; }
.meta { color: #555; }
"""


def write_report(ex: Explanation, steps: list[Step], out_dir: str, model_path: str) -> str:
    """One HTML page: the steps in order, each with its code lines, its numbers and its pictures."""
    e = html.escape
    cfg = ex.config
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>iterative-llm explain: {e(ex.text[:60])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Inside the model, one step at a time</h1>",
        f'<p class="meta">Model <code>{e(model_path)}</code>: {cfg.num_hidden_layers} layers, '
        f"{cfg.num_attention_heads} heads, hidden size {cfg.hidden_size}, vocabulary {cfg.vocab_size}, "
        f"context {cfg.max_position_embeddings} tokens. Sentence: <code>{e(repr(ex.text))}</code> "
        f"({ex.length} tokens). Computed in float32 on the CPU with eager attention.</p>",
        "<nav><ol>",
    ]
    parts += [f'<li><a href="#{s.key}">{e(s.title)}</a></li>' for s in steps]
    parts.append("</ol></nav>")
    for number, step in enumerate(steps, 1):
        parts.append(f'<h2 id="{step.key}">Step {number}. {e(step.title)}</h2>')
        parts.append('<p class="code">Code: ' + "<br>".join(e(c) for c in step.code) + "</p>")
        parts.append(f"<pre>{e(step.text)}</pre>")
        for name, caption in step.pictures:
            parts.append(f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    parts.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path
