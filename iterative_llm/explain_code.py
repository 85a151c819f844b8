"""Where the modeling file does each step of `iterative-llm explain`: line ranges found in the source
at run time by the code they contain, so they follow the file when it changes."""

from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap


def code_range(obj, *needles: str) -> str:
    """`file.py:Lstart-Lend (Name)` for `obj`, narrowed to the statements that contain a needle.

    Only code counts (not the docstring, not comments), and a statement that opens a bracket runs
    on to the line that closes it. The lines are read from the source at run time, so they stay
    right when the file changes; if no line contains a needle, the whole function or class is named.
    """
    obj = inspect.unwrap(obj)
    try:
        lines, first = inspect.getsourcelines(obj)
    except (OSError, TypeError):  # e.g. a model class built from source that is not on disk
        return f"{getattr(obj, '__qualname__', obj)} (source not available)"
    skip = _docstring_lines(lines)
    low = high = None
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if i in skip or not any(n in code for n in needles):
            continue
        end, depth = i, code.count("(") - code.count(")")
        while depth > 0 and end + 1 < len(lines):
            end += 1
            rest = lines[end].split("#", 1)[0]
            depth += rest.count("(") - rest.count(")")
        low = first + i if low is None else min(low, first + i)
        high = first + end if high is None else max(high, first + end)
    if low is None:
        low, high = first, first + len(lines) - 1
    name = os.path.basename(inspect.getsourcefile(obj))
    return f"{name}:L{low}-L{high} ({getattr(obj, '__qualname__', obj.__name__)})"


def _docstring_lines(lines: list[str]) -> set[int]:
    """Indexes (into `lines`) of the docstring of the function or class whose source `lines` are."""
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return set()
    node = tree.body[0] if tree.body else None
    body = getattr(node, "body", None)
    if not body or not isinstance(body[0], ast.Expr) or not isinstance(getattr(body[0], "value", None), ast.Constant):
        return set()
    return set(range(body[0].lineno - 1, body[0].end_lineno))


def _code_refs(model) -> dict[str, list[str]]:
    """The modeling file's lines for each step, read from the module the loaded model came from."""
    mod = sys.modules[type(model).__module__]
    backbone = type(model.model)
    attn = type(model.model.layers[0].self_attn)
    block = type(model.model.layers[0])
    rms = type(model.model.norm)
    rotary = type(model.model.rotary_emb)
    return {
        "embeddings": [
            code_range(backbone.forward, "self.embed_tokens(", "self.embed_norm("),
            code_range(rms.forward),
        ],
        "positions": [
            code_range(backbone.forward, "self.rotary_emb("),
            code_range(rotary.compute_inv_freq),
            code_range(rotary.forward),
        ],
        "qkv": [
            code_range(block.forward, "self.input_layernorm("),
            code_range(attn.forward, "_proj(hidden_states)", "q_norm(", ".transpose(1, 2)"),
        ],
        "rotary": [
            code_range(attn.forward, "apply_rotary("),
            code_range(mod.apply_rotary),
            code_range(mod.rotate_half),
        ],
        "scores": [
            code_range(backbone.forward, "create_causal_mask("),
            code_range(mod.eager_attention_forward, "repeat_kv(key", "* scaling", "attention_mask[", "softmax("),
        ],
        "values": [
            code_range(mod.eager_attention_forward, "matmul(weights"),
            code_range(attn.forward, ".reshape(batch", "self.o_proj(output)"),
        ],
        "residual": [
            code_range(backbone.forward, "for layer in self.layers", "hidden_states = layer("),
            code_range(block.forward, "hidden_states = hidden_states +"),
            code_range(type(model.model.layers[0].mlp).forward),
        ],
        "next_token": [
            code_range(backbone.forward, "self.norm(hidden_states)"),
            code_range(type(model).forward, "self.lm_head(", "final_logit_softcapping", "torch.tanh("),
        ],
    }
