"""`iterative-llm explain MODEL "a sentence"`: walk one sentence through the model, step by step.

The flow, one step each, with the real numbers of this sentence and this model:

    sentence -> tokens (byte pieces) -> token ids -> embeddings -> rotary positions
    -> query/key/value per head -> rotated queries and keys -> scores, scaled, masked, softmax
    -> weighted values -> the residual stream through the blocks -> next-token probabilities

Every number comes from the model's own modules (embed_tokens, embed_norm, rotary_emb, the
block's input_layernorm, q_proj/k_proj/v_proj, q_norm/k_norm, apply_rotary, lm_head), and two
of them are checked against the model's own forward pass: the attention weights against
`output_attentions` (eager attention) and the probabilities against softmax(logits).
Each step names the lines of the modeling file that do it; the line numbers are read from the
source at run time (`inspect`), so they follow the file when it changes.

Outputs: the steps printed to the terminal, and in `--out` (default `explain_out/`) PNG pictures
(attention heatmaps for every layer and head, the chosen head's scores step by step, the
residual stream, the next-token probabilities) and `report.html`, which puts it all in order.

matplotlib is needed for the pictures only; the numbers are computed with torch alone.
"""

from __future__ import annotations

import argparse
import ast
import html
import inspect
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field

import torch

from .tokenization import token_bytes

# How much of a long sentence the printed vectors and matrices show, and how many tokens the token
# tables list (the pictures always show everything).
MAX_PRINTED_TOKENS = 10
MAX_LISTED_TOKENS = 64
# Numbers shown from each vector.
FEW = 6


class ExplainError(Exception):
    """A problem with the user's input: reported as one line, without a stack trace."""


# ---------------------------------------------------------------------------------------------
# Tokens and their bytes
# ---------------------------------------------------------------------------------------------


@dataclass
class Token:
    index: int
    id: int
    raw: bytes  # the UTF-8 bytes this token stands for
    text: str | None  # the bytes as text, None when they are not whole characters
    special: bool = False
    note: str = ""  # e.g. which character a partial token is part of

    @property
    def shown(self) -> str:
        """The piece as a Python string literal, or a marker for bytes that are not whole characters."""
        return repr(self.text) if self.text is not None else "(partial character)"


def tokens_of(tokenizer, ids: list[int]) -> list[Token]:
    """A Token (bytes and text) for each id; the bytes come from `tokenization.token_bytes`."""
    special_ids = set(tokenizer.all_special_ids)
    tokens = []
    for index, (token_id, raw) in enumerate(zip(ids, token_bytes(tokenizer, ids))):
        special = token_id in special_ids
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # part of a character whose other bytes are in a neighbouring token
        tokens.append(Token(index, int(token_id), raw, text, special))
    return tokens


def tokenize(tokenizer, text: str) -> list[Token]:
    """The tokens of `text`, with a note on each token that holds only part of a character."""
    tokens = tokens_of(tokenizer, tokenizer(text)["input_ids"])
    _note_split_characters(tokens, text)
    return tokens


def _note_split_characters(tokens: list[Token], text: str) -> None:
    """Name the character a token holds only part of (a byte-level BPE may split a character).

    Works when the tokens' bytes, joined, are exactly the sentence's UTF-8 bytes (true for the
    project's tokenizer, which adds no special tokens and normalises nothing).
    """
    encoded = text.encode("utf-8")
    if b"".join(t.raw for t in tokens) != encoded:
        return
    # For each byte offset: the character it belongs to, and where that character starts and ends.
    owner = []
    for ch in text:
        width = len(ch.encode("utf-8"))
        start = len(owner)
        owner += [(ch, start, start + width)] * width
    offset = 0
    for token in tokens:
        start, end = offset, offset + len(token.raw)
        offset = end
        if token.text is not None and token.text.encode("utf-8") == token.raw:
            first_ok = start == 0 or owner[start][1] == start
            last_ok = owner[end - 1][2] == end
            if first_ok and last_ok:
                continue
        parts = []
        for ch, ch_start, ch_end in dict.fromkeys(owner[start:end]):
            lo, hi = max(start, ch_start) - ch_start + 1, min(end, ch_end) - ch_start
            if lo == 1 and hi == ch_end - ch_start:
                continue
            which = f"byte {lo}" if lo == hi else f"bytes {lo}-{hi}"
            parts.append(f"{which} of the {ch_end - ch_start} bytes of {ch!r}")
        token.note = "; ".join(parts)


def _hex(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)


# ---------------------------------------------------------------------------------------------
# Where the modeling file does each step
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The computation: the model's own modules, one step at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """Everything the steps report. Tensors are float32 on the CPU, batch dimension removed."""

    text: str
    tokens: list[Token]
    config: object
    layer: int
    head: int
    kv_head: int
    code: dict[str, list[str]]
    embeddings: torch.Tensor  # (T, C) rows of embed_tokens
    embeddings_normed: torch.Tensor  # (T, C) after embed_norm (the same tensor if there is none)
    inv_freq: torch.Tensor  # (D/2,)
    cos: torch.Tensor  # (T, D)
    sin: torch.Tensor  # (T, D)
    layer_input: torch.Tensor  # (T, C) the residual stream entering the chosen block
    normed_input: torch.Tensor  # (T, C) after its input_layernorm
    query: torch.Tensor  # (H, T, D) after q_proj (and q_norm), before rotary
    key: torch.Tensor  # (K, T, D) after k_proj (and k_norm), before rotary
    value: torch.Tensor  # (K, T, D)
    query_rotated: torch.Tensor  # (H, T, D)
    key_rotated: torch.Tensor  # (K, T, D)
    relative_check: tuple  # ((t1, s1, score1), (t2, s2, score2)) same q/k at shifted positions
    scores_raw: torch.Tensor  # (T, T) q . k for the chosen head
    scores_scaled: torch.Tensor  # (T, T)
    mask: torch.Tensor  # (T, T) the additive mask the model used
    scores_masked: torch.Tensor  # (T, T)
    weights: torch.Tensor  # (T, T) softmax: the attention weights of the chosen layer and head
    model_weights_diff: float  # max |weights - the model's output_attentions|
    head_output: torch.Tensor  # (T, D) weights @ values for the chosen head
    attentions: list[torch.Tensor]  # per layer (H, T, T): the model's own output_attentions
    residual: list[dict]  # per block: RMS of the stream in, the two updates, the stream out
    final_hidden: torch.Tensor  # (C,) last token after the final norm
    logits_raw: torch.Tensor  # (V,) lm_head output before soft-capping
    logits: torch.Tensor  # (V,) the model's logits for the last position
    probs: torch.Tensor  # (V,) softmax(logits)
    top: list[tuple[Token, float, float]]  # the top-k next tokens: (token, probability, logit)

    @property
    def length(self) -> int:
        return len(self.tokens)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(-1).sqrt()


def _check_sentence(model, tokenizer, text: str) -> list[Token]:
    if not text:
        raise ExplainError("the sentence is empty: give some text to walk through the model, e.g. \"The cat sat\".")
    tokens = tokenize(tokenizer, text)
    if not tokens:
        raise ExplainError(f"the sentence {text!r} gives no tokens: give some text to walk through the model.")
    limit = model.config.max_position_embeddings
    if len(tokens) > limit:
        raise ExplainError(
            f"the sentence is {len(tokens)} tokens long, longer than this model's context "
            f"(max_position_embeddings = {limit}): shorten it to at most {limit} tokens."
        )
    top_id = max(t.id for t in tokens)
    if top_id >= model.config.vocab_size:
        raise ExplainError(
            f"the tokenizer gave token id {top_id}, but the model has only {model.config.vocab_size} embeddings: "
            f"the tokenizer in the folder does not belong to this model."
        )
    return tokens


def explain(model, tokenizer, text: str, layer: int = 0, head: int = 0, top_k: int = 10) -> Explanation:
    """Run `text` through `model` (an IterativeLLMForCausalLM with eager attention) and keep every step."""
    config = model.config
    if not 0 <= layer < config.num_hidden_layers:
        raise ExplainError(
            f"--layer {layer} is out of range: this model has {config.num_hidden_layers} layers, "
            f"numbered 0 to {config.num_hidden_layers - 1}."
        )
    if not 0 <= head < config.num_attention_heads:
        raise ExplainError(
            f"--head {head} is out of range: this model has {config.num_attention_heads} attention heads per layer, "
            f"numbered 0 to {config.num_attention_heads - 1}."
        )
    if top_k < 1:
        raise ExplainError(f"--top_k must be at least 1, got {top_k}.")
    if getattr(config, "_attn_implementation", None) != "eager":
        raise ExplainError(
            f"the model uses {config._attn_implementation!r} attention, which does not return attention weights: "
            f"load it with attn_implementation='eager'."
        )
    tokens = _check_sentence(model, tokenizer, text)
    mod = sys.modules[type(model).__module__]
    backbone = model.model
    block = backbone.layers[layer]
    attn = block.self_attn
    input_ids = torch.tensor([[t.id for t in tokens]])
    length = len(tokens)

    # Hooks record what the model's own forward pass hands each module: the residual stream at
    # every block, the two updates each block adds, and the chosen attention's exact inputs.
    seen: dict = {"blocks": []}
    hooks = []

    def block_in(module, args, kwargs):
        seen["blocks"].append({"in": args[0].detach()})

    def attn_out(module, args, kwargs, output):
        seen["blocks"][-1]["attn"] = output[0].detach()

    def mlp_out(module, args, output):
        seen["blocks"][-1]["mlp"] = output.detach()

    def block_out(module, args, kwargs, output):
        seen["blocks"][-1]["out"] = output.detach()

    def chosen_attn_in(module, args, kwargs):
        seen["attn_kwargs"] = kwargs
        seen["attn_input"] = args[0].detach()

    def final_norm_in(module, args):
        seen["final_in"] = args[0].detach()

    for each in backbone.layers:
        hooks.append(each.register_forward_pre_hook(block_in, with_kwargs=True))
        hooks.append(each.self_attn.register_forward_hook(attn_out, with_kwargs=True))
        hooks.append(each.mlp.register_forward_hook(mlp_out))
        hooks.append(each.register_forward_hook(block_out, with_kwargs=True))
    hooks.append(attn.register_forward_pre_hook(chosen_attn_in, with_kwargs=True))
    hooks.append(backbone.norm.register_forward_pre_hook(final_norm_in))
    try:
        with torch.no_grad():
            out = model(input_ids, output_attentions=True, use_cache=False)
    except ValueError as err:  # the model's own input checks (context length, vocabulary)
        raise ExplainError(str(err)) from None
    finally:
        for hook in hooks:
            hook.remove()
    if not out.attentions or len(out.attentions) != config.num_hidden_layers or out.attentions[0] is None:
        raise ExplainError("the model returned no attention weights with eager attention (output_attentions).")

    with torch.no_grad():
        # Step: ids -> embeddings (embed_tokens, then embed_norm if the model has one).
        embeddings = backbone.embed_tokens(input_ids)  # (1, T, C)
        normed_embeddings = backbone.embed_norm(embeddings) if backbone.embed_norm is not None else embeddings

        # Step: positions -> cos/sin tables, computed once and shared by every block.
        position_ids = torch.arange(length)[None]
        cos, sin = backbone.rotary_emb(normed_embeddings, position_ids)  # (1, T, D) each

        # Step: the chosen block's input_layernorm, then q/k/v projections split into heads.
        x = seen["blocks"][layer]["in"]
        normed = block.input_layernorm(x)
        heads, kv_heads, dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        query = attn.q_proj(normed).view(1, length, heads, dim)
        key = attn.k_proj(normed).view(1, length, kv_heads, dim)
        value = attn.v_proj(normed).view(1, length, kv_heads, dim)
        if config.qk_norm:
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        # Step: rotary positions turn queries and keys (with the tables the model itself used).
        model_cos, model_sin = seen["attn_kwargs"]["position_embeddings"]
        query_rot = mod.apply_rotary(query, model_cos, model_sin)
        key_rot = mod.apply_rotary(key, model_cos, model_sin)

        # The dot product of a rotated query and key depends only on their distance: the same two
        # vectors placed at positions (2, 0) and at (2 + shift, shift) give the same score.
        kv_head = head // attn.num_key_value_groups
        relative = []
        shift = max(0, min(config.max_position_embeddings - 3, 40))
        for t_pos, s_pos in ((2, 0), (2 + shift, shift)):
            c, s = backbone.rotary_emb(query, torch.tensor([[t_pos, s_pos]]))
            q = mod.apply_rotary(query[:, head : head + 1, -1:], c[:, :1], s[:, :1])
            k = mod.apply_rotary(key[:, kv_head : kv_head + 1, :1], c[:, 1:], s[:, 1:])
            relative.append((t_pos, s_pos, float((q * k).sum())))

        # Step: scores, scaled, masked, softmax: the eager attention function's arithmetic, for one head.
        q_h = query_rot[0, head].float()
        k_h = key_rot[0, kv_head].float()
        v_h = value[0, kv_head].float()
        scores_raw = q_h @ k_h.T  # (T, T)
        scores_scaled = scores_raw * attn.scaling
        mask = seen["attn_kwargs"].get("attention_mask")
        if mask is None:  # some attention backends build the causal mask themselves
            mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        else:
            mask = mask[0, 0, :, :length].float()
        scores_masked = scores_scaled + mask
        weights = torch.softmax(scores_masked, dim=-1)
        model_weights = out.attentions[layer][0, head].float()
        diff = float((weights - model_weights).abs().max())
        head_output = weights @ v_h  # (T, D)

        # Step: the last token's vector -> final norm -> lm_head -> soft-capping -> softmax.
        final_hidden = backbone.norm(seen["final_in"])[0, -1]
        logits_raw = model.lm_head(final_hidden).float()
        logits = out.logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        k = min(top_k, probs.numel())
        top_p, top_ids = probs.topk(k)

    residual = []
    for b, rec in enumerate(seen["blocks"]):
        after_attn = rec["in"] + rec["attn"]
        residual.append(
            {
                "block": b,
                "in": float(_rms(rec["in"][0]).mean()),
                "attn": float(_rms(rec["attn"][0]).mean()),
                "after_attn": float(_rms(after_attn[0]).mean()),
                "mlp": float(_rms(rec["mlp"][0]).mean()),
                "out": float(_rms(rec["out"][0]).mean()),
            }
        )

    return Explanation(
        text=text,
        tokens=tokens,
        config=config,
        layer=layer,
        head=head,
        kv_head=kv_head,
        code=_code_refs(model),
        embeddings=embeddings[0].float(),
        embeddings_normed=normed_embeddings[0].float(),
        inv_freq=backbone.rotary_emb.inv_freq.float().clone(),
        cos=cos[0].float(),
        sin=sin[0].float(),
        layer_input=x[0].float(),
        normed_input=normed[0].float(),
        query=query[0].float(),
        key=key[0].float(),
        value=value[0].float(),
        query_rotated=query_rot[0].float(),
        key_rotated=key_rot[0].float(),
        relative_check=tuple(relative),
        scores_raw=scores_raw,
        scores_scaled=scores_scaled,
        mask=mask,
        scores_masked=scores_masked,
        weights=weights,
        model_weights_diff=diff,
        head_output=head_output,
        attentions=[a[0].float() for a in out.attentions],
        residual=residual,
        final_hidden=final_hidden.float(),
        logits_raw=logits_raw,
        logits=logits,
        probs=probs,
        top=[(tok, float(p), float(logits[tok.id])) for tok, p in zip(tokens_of(tokenizer, top_ids.tolist()), top_p)],
    )


# ---------------------------------------------------------------------------------------------
# The steps in words, with the numbers
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    key: str
    title: str
    code: list[str]
    text: str
    pictures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _vec(x: torch.Tensor, n: int = FEW) -> str:
    shown = ", ".join(f"{float(v):+.3f}" for v in x[:n])
    return f"[{shown}{', ...' if x.numel() > n else ''}]"


def _matrix(m: torch.Tensor, tokens: list[Token], fmt: str = "{:+8.3f}") -> str:
    """A (T, T) matrix as text, rows = query tokens, columns = key tokens; masked entries as -inf."""
    n = min(len(tokens), MAX_PRINTED_TOKENS)
    labels = [_short(t, 10) for t in tokens[:n]]
    width = max(9, *(len(label) + 1 for label in labels))
    lines = [" " * 16 + "".join(f"{label:>{width}}" for label in labels)]
    for i in range(n):
        cells = []
        for j in range(n):
            v = float(m[i, j])
            cells.append(f"{'-inf':>{width}}" if v < -1e30 else f"{fmt.format(v):>{width}}")
        lines.append(f"{i:>3} {_short(tokens[i], 11):<12}" + "".join(cells))
    if len(tokens) > n:
        lines.append(f"    (first {n} of {len(tokens)} tokens shown; the pictures show all of them)")
    return "\n".join(lines)


def _short(token: Token, width: int) -> str:
    s = token.shown if token.text is not None else "<" + _hex(token.raw) + ">"
    return s if len(s) <= width else s[: width - 1] + "…"


def describe(ex: Explanation) -> list[Step]:
    """The steps in order, each with the code that does it and this sentence's own numbers."""
    return [
        _step_tokens(ex),
        _step_ids(ex),
        _step_embeddings(ex),
        _step_positions(ex),
        _step_qkv(ex),
        _step_rotary(ex),
        _step_scores(ex),
        _step_values(ex),
        _step_residual(ex),
        _step_next_token(ex),
    ]


def _listed(ex: Explanation) -> tuple[list[Token], str]:
    """The tokens a per-token table lists, and a line saying how many were left out."""
    shown = ex.tokens[:MAX_LISTED_TOKENS]
    more = ex.length - len(shown)
    return shown, (f"\n  ... and {more} more tokens" if more else "")


def _step_tokens(ex: Explanation) -> Step:
    shown, more = _listed(ex)
    rows = [f"{'#':>3}  {'piece':<22} {'bytes (hex)':<24} note"]
    for t in shown:
        if t.special:  # matched as a whole string and given one id; the tokenizer never splits it
            rows.append(f"{t.index:>3}  {t.shown:<22} {'(special token)':<24} one id for the whole marker")
        else:
            rows.append(f"{t.index:>3}  {t.shown:<22} {_hex(t.raw):<24} {t.note}".rstrip())
    text = (
        f"Sentence: {ex.text!r}\n\n"
        f"The tokenizer cuts the sentence into {ex.length} pieces from its vocabulary. It is a byte-level BPE:\n"
        "every piece is a run of UTF-8 bytes, so any text can be encoded and nothing is lost. Common words\n"
        "are one piece, with their leading space. Rare text falls apart into smaller pieces, down to single\n"
        "bytes; a character of several bytes may then be split across tokens (a partial character).\n\n"
        + "\n".join(rows) + more
    )
    code = ["the tokenizer (tokenizer.json in the model folder, trained by iterative_llm/tokenization.py), "
            "not the modeling file"]
    return Step("tokens", "Sentence to tokens", code, text)


def _step_ids(ex: Explanation) -> Step:
    shown, more = _listed(ex)
    rows = [f"{t.index:>3}  {t.shown:<22} -> {t.id}" for t in shown]
    ids = ", ".join(str(t.id) for t in shown) + (", ..." if more else "")
    text = (
        "Each piece is replaced by its row number in the vocabulary; the model sees only these numbers.\n"
        f"The model has V = {ex.config.vocab_size} embedding rows.\n\n"
        + "\n".join(rows) + more
        + f"\n\ninput_ids = [[{ids}]]   shape (B, T) = (1, {ex.length})"
    )
    return Step("ids", "Tokens to token ids", ["the tokenizer's vocabulary (tokenizer.json)"], text)


def _step_embeddings(ex: Explanation) -> Step:
    cfg, T = ex.config, ex.length
    V, C = cfg.vocab_size, cfg.hidden_size
    lines = [
        f"embed_tokens is a learned table of shape (V, C) = ({V}, {C}): row i is token i's vector.",
        f"Looking up the ids gives one vector of C = {C} numbers per token: shape (B, T, C) = (1, {T}, {C}).",
        f"The first {FEW} numbers of each vector, and its RMS (root mean square):",
        "",
    ]
    rows = range(min(T, MAX_PRINTED_TOKENS))
    for i in rows:
        vec = ex.embeddings[i]
        lines.append(f"{i:>3} {_short(ex.tokens[i], 14):<15} {_vec(vec)}  RMS {float(_rms(vec)):.3f}")
    if cfg.embedding_norm:
        lines += ["", "embed_norm (RMSNorm) then divides each vector by its RMS and multiplies each channel by a",
                  "learned weight, so every token enters the first block at the same scale:", ""]
        for i in rows:
            vec = ex.embeddings_normed[i]
            lines.append(f"{i:>3} {_short(ex.tokens[i], 14):<15} {_vec(vec)}  RMS {float(_rms(vec)):.3f}")
    else:
        lines += ["", "This model has no embedding norm (embedding_norm = False): the vectors enter the first block as",
                  "they are."]
    lines += ["", "This (T, C) matrix is the start of the residual stream, which every block reads and adds to."]
    return Step("embeddings", "Token ids to embeddings", ex.code["embeddings"], "\n".join(lines))


def _step_positions(ex: Explanation) -> Step:
    cfg, D = ex.config, ex.config.head_dim
    theta = [float(v) for v in ex.inv_freq]
    pairs = len(theta)
    probe = sorted({0, 1, pairs // 2, pairs - 1})
    table = [f"{'position':>8}" + "".join(f"{f'pair {j}':>14}" for j in probe),
             f"{'θ_j':>8}" + "".join(f"{theta[j]:>14.4g}" for j in probe)]
    for p in range(min(ex.length, MAX_PRINTED_TOKENS)):
        table.append(f"{p:>8}" + "".join(f"{p * theta[j]:>14.4f}" for j in probe))
    text = (
        f"Nothing about position is added to the embeddings. Instead each position p becomes D/2 = {pairs} angles\n"
        f"p·θ_j, with θ_j = rope_theta^(-2j/D) (rope_theta = {cfg.rope_theta:g}, D = head width = {D}). Channel\n"
        f"pair j of every query and key head will be turned by that angle: θ_0 = {theta[0]:.3g} radian per\n"
        f"position (fast), down to θ_{pairs - 1} = {theta[-1]:.3g} (slow). rotary_emb returns the cos and sin of\n"
        f"the angles, shape (B, T, D) = (1, {ex.length}, {D}), computed once and used by every block.\n\n"
        "Angles in radians, for a few channel pairs:\n" + "\n".join(table)
    )
    return Step("positions", "Positions: the rotary tables", ex.code["positions"], text)


def _step_qkv(ex: Explanation) -> Step:
    cfg, T, L, h = ex.config, ex.length, ex.layer, ex.head
    C, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = range(min(T, MAX_PRINTED_TOKENS))
    rms = [f"{float(_rms(ex.layer_input[i])):.2f} -> {float(_rms(ex.normed_input[i])):.2f}" for i in rows]
    if H > K:
        heads = (f"Grouped-query attention: the {H} query heads share {K} key/value heads, {H // K} query heads\n"
                 f"each; query head {h} reads key/value head {ex.kv_head}.")
    else:
        heads = f"Each of the {H} query heads has its own key and value head."
    lines = [
        f"Block {L} first rescales the residual stream with its input_layernorm (RMSNorm). The RMS of each",
        "token's vector before -> after: " + ", ".join(rms[:4]) + (", ..." if len(rms) > 4 else ""),
        "",
        "Then three learned linear maps of each token's vector, split into heads of D numbers:",
        f"  q_proj: C -> H·D = {C} -> {H}·{D}    query (B, H, T, D) = (1, {H}, {T}, {D})",
        f"  k_proj: C -> K·D = {C} -> {K}·{D}    key   (B, K, T, D) = (1, {K}, {T}, {D})",
        f"  v_proj: C -> K·D = {C} -> {K}·{D}    value (B, K, T, D) = (1, {K}, {T}, {D})",
        heads,
    ]
    if cfg.qk_norm:
        lines.append("QK-norm: q_norm and k_norm RMS-normalise every query and key head vector, which keeps the")
        lines.append("attention scores bounded.")
    lines += ["", f"Head {h}. The query says what a token looks for, the key what it offers, the value what it",
              "passes on:"]
    for name, mat in (("query", ex.query[h]), ("key", ex.key[ex.kv_head]), ("value", ex.value[ex.kv_head])):
        lines.append(f"  {name}:")
        lines += [f"  {i:>3} {_short(ex.tokens[i], 14):<15} {_vec(mat[i])}" for i in rows]
    return Step("qkv", f"Query, key and value (layer {L})", ex.code["qkv"], "\n".join(lines))


def _step_rotary(ex: Explanation) -> Step:
    h, half = ex.head, ex.config.head_dim // 2
    lines = [
        "apply_rotary turns channel pair (j, j + D/2) of each query and key by the angle position·θ_j.",
        f"A rotation changes directions, not lengths. Query head {h}, channel pair 0 (the fastest) before",
        "-> after, and the length of the whole vector:",
        "",
    ]
    for i in range(min(ex.length, MAX_PRINTED_TOKENS)):
        a, b = ex.query[h][i], ex.query_rotated[h][i]
        lines.append(
            f"{i:>3} {_short(ex.tokens[i], 14):<15} ({float(a[0]):+.3f}, {float(a[half]):+.3f}) -> "
            f"({float(b[0]):+.3f}, {float(b[half]):+.3f})   |q| {float(a.norm()):.3f} -> {float(b.norm()):.3f}"
        )
    (t1, s1, v1), (t2, s2, v2) = ex.relative_check
    lines += [
        "",
        "Why rotate: the score of a rotated query and key depends only on how far apart the two tokens are.",
        f"The last token's query and the first token's key, placed at positions ({t1}, {s1}): q·k = {v1:+.4f};",
        f"the same two vectors at positions ({t2}, {s2}), the same distance apart:  q·k = {v2:+.4f}.",
    ]
    return Step("rotary", "Rotary positions turn queries and keys", ex.code["rotary"], "\n".join(lines))


def _step_scores(ex: Explanation) -> Step:
    L, h, T, D = ex.layer, ex.head, ex.length, ex.config.head_dim
    sums = ex.weights.sum(-1)
    text = (
        f"Layer {L}, head {h} (key/value head {ex.kv_head}). Rows: the token that looks (query). Columns: the\n"
        "token looked at (key).\n\n"
        f"a) Raw scores, q·k for every pair of tokens, shape (T, T) = ({T}, {T}):\n"
        f"{_matrix(ex.scores_raw, ex.tokens)}\n\n"
        f"b) Scaled by 1/√D = 1/√{D} = {D ** -0.5:.4f}, so that the spread of the scores does not grow with the\n"
        f"head width:\n{_matrix(ex.scores_scaled, ex.tokens)}\n\n"
        "c) Masked: the causal mask adds 0 where the key comes at or before the query, and the most negative\n"
        f"float ({torch.finfo(torch.float32).min:.3g}, shown -inf) where it comes after: no token may look ahead.\n"
        f"{_matrix(ex.scores_masked, ex.tokens)}\n\n"
        "d) Softmax along each row, e^x / Σ e^x: the attention weights. Each row sums to 1 (here\n"
        f"{float(sums.min()):.6f} to {float(sums.max()):.6f}) and the masked entries are exactly 0.\n"
        f"{_matrix(ex.weights, ex.tokens, '{:8.3f}')}\n\n"
        f"Check: these weights equal the model's own output_attentions[{L}][0, {h}] (eager attention);\n"
        f"the largest difference is {ex.model_weights_diff:.1e}. The pictures show the weights of every layer and head."
    )
    pictures = [("attention_steps.png", f"Layer {L}, head {h}: raw scores, scaled, masked, and the softmax weights")]
    pictures += [(f"attention_layer{i:02d}.png", f"Attention weights of layer {i}, every head")
                 for i in range(ex.config.num_hidden_layers)]
    title = f"Attention scores: scaled, masked, softmax (layer {L}, head {h})"
    return Step("scores", title, ex.code["scores"], text, pictures)


def _step_values(ex: Explanation) -> Step:
    cfg, T, h = ex.config, ex.length, ex.head
    H, D = cfg.num_attention_heads, cfg.head_dim
    weights, sources = ex.weights[T - 1].topk(min(3, T))
    looked = ", ".join(f"{_short(ex.tokens[int(j)], 14)} {float(w):.2f}" for w, j in zip(weights, sources))
    text = (
        f"Each token's output of head {h} is the weighted average of the value vectors it may see:\n"
        f"out_t = Σ_s weight[t, s] · value_s, one vector of D = {D} numbers per token.\n"
        f"The last token, {_short(ex.tokens[-1], 20)}, attends most to: {looked}. Its output:\n"
        f"  {_vec(ex.head_output[-1])}\n"
        f"The {H} heads' outputs are put side by side, (B, T, H·D) = (1, {T}, {H * D}), and o_proj maps them\n"
        f"back to C = {cfg.hidden_size} numbers: the block's attention update, added to the residual stream."
    )
    return Step("values", "Weighted values and the attention output", ex.code["values"], text)


def _step_residual(ex: Explanation) -> Step:
    cfg = ex.config
    header = f"{'block':>5} {'stream in':>10} {'+ attention':>12} {'= after attn':>13} {'+ MLP':>8} {'= stream out':>13}"
    rows = [header] + [
        f"{r['block']:>5} {r['in']:>10.3f} {r['attn']:>12.3f} {r['after_attn']:>13.3f} {r['mlp']:>8.3f} {r['out']:>13.3f}"
        for r in ex.residual
    ]
    mlp = {"relu2": "ReLU² (up_proj, ReLU, square, down_proj)", "swiglu": "SwiGLU (gate_proj, up_proj, down_proj)",
           "gelu": "GELU (up_proj, GELU, down_proj)"}.get(cfg.mlp_type, cfg.mlp_type)
    text = (
        "Every block reads the stream and adds to it; it never replaces it:\n"
        "  x = x + attention(input_layernorm(x))\n"
        "  x = x + mlp(post_attention_layernorm(x))\n"
        f"The MLP is {mlp}, C -> {cfg.intermediate_size} -> C. The stream keeps its shape\n"
        f"(B, T, C) = (1, {ex.length}, {cfg.hidden_size}) all the way. Its size (RMS, averaged over the tokens),\n"
        "and the size of what each part adds:\n\n" + "\n".join(rows)
    )
    pictures = [("residual_stream.png", "The size of the residual stream, and of each block's updates")]
    return Step("residual", "The residual stream through the blocks", ex.code["residual"], text, pictures)


def _step_next_token(ex: Explanation) -> Step:
    cfg = ex.config
    V, C, cap = cfg.vocab_size, cfg.hidden_size, cfg.final_logit_softcapping
    best = ex.top[0][0].id
    if cap is not None:
        capping = (
            f"final_logit_softcapping = {cap:g}: inside the model's forward, BEFORE the softmax, every logit becomes\n"
            f"{cap:g}·tanh(logit/{cap:g}), which squeezes it into (-{cap:g}, {cap:g}). For the top token: "
            f"{float(ex.logits_raw[best]):+.3f} -> {float(ex.logits[best]):+.3f}."
        )
    else:
        capping = "This model has no logit soft-capping (final_logit_softcapping = None)."
    rows = [f"{'rank':>4} {'id':>6}  {'piece':<22} {'logit':>8} {'probability':>12}"]
    for rank, (tok, p, logit) in enumerate(ex.top, 1):
        bar = "█" * max(1, round(p * 40)) if p >= 0.0125 else "▏"
        piece = tok.shown if tok.text is not None else "<" + _hex(tok.raw) + ">"
        rows.append(f"{rank:>4} {tok.id:>6}  {piece:<22} {logit:>+8.3f} {p:>12.4f}  {bar}")
    if any(tok.text is None for tok, _, _ in ex.top):
        rows.append("<..>: bytes that are not a whole character on their own (part of a multi-byte UTF-8 character)")
    text = (
        "Only the last token's vector predicts what comes next. The final norm (model.norm) rescales it, and\n"
        f"lm_head, a (V, C) = ({V}, {C}) matrix, gives one score (logit) per vocabulary entry: shape (B, T, V),\n"
        f"of which the last row is used.\n{capping}\n"
        f"Softmax turns the {V} logits into probabilities that sum to 1. The {len(ex.top)} most likely next\n"
        f"tokens (together {sum(p for _, p, _ in ex.top):.1%}):\n\n" + "\n".join(rows)
        + "\n\nCheck: these probabilities are softmax(model(input_ids).logits[0, -1])."
    )
    pictures = [("next_token.png", "The most likely next tokens")]
    return Step("next_token", "Next-token probabilities", ex.code["next_token"], text, pictures)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

_GLYPHS: set[int] | None = None


def _plot_label(piece: str | None, raw: bytes = b"", limit: int = 12, spaces: bool = True) -> str:
    """Text for a picture: spaces shown as ␣ (if `spaces`), characters the font lacks as \\u escapes,
    bytes that are not whole characters as hex, `$` escaped (matplotlib reads $...$ as maths)."""
    global _GLYPHS
    if _GLYPHS is None:
        from matplotlib import font_manager, rcParams
        from matplotlib.ft2font import FT2Font

        path = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
        _GLYPHS = set(FT2Font(path).get_charmap())
    if piece is None:
        return "<" + _hex(raw) + ">"
    visible = {"\n": "↵", "\t": "⇥", "$": r"\$"}
    if spaces:
        visible[" "] = "␣"
    out = "".join(
        visible.get(ch, ch if ord(ch) in _GLYPHS and ch.isprintable() else f"\\u{ord(ch):04x}") for ch in piece
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _set_token_ticks(ax, labels: list[str], fontsize: float, inches: float, x: bool = True, y: bool = True) -> None:
    """Token labels on both axes (or on those asked for); on a long sentence only every k-th, so
    that they never overlap."""
    fit = max(2, int(inches * 0.9 / (fontsize * 1.25 / 72)))  # labels that fit side by side
    every = max(1, math.ceil(len(labels) / fit))
    ticks = list(range(0, len(labels), every))
    # When labels are skipped, each shown one carries its position, so the reader can still count.
    shown = [labels[i] if every == 1 else f"{i}:{labels[i]}" for i in ticks]
    ax.set_xticks(ticks, shown, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, shown, fontsize=fontsize)
    ax.tick_params(labelbottom=x, labelleft=y)


def write_pictures(ex: Explanation, steps: list[Step], out_dir: str) -> list[str]:
    """Write every picture the steps name into `out_dir`; returns the paths written."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    # Attention weights on a square-root colour scale: over a long sentence most weights are small,
    # and a linear scale would paint them all the same dark colour.
    WEIGHT_NORM = lambda: PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # noqa: E731
    WEIGHT_TICKS = [0, 0.05, 0.2, 0.5, 1.0]

    labels = [_plot_label(t.text, t.raw) for t in ex.tokens]
    T = ex.length
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)  # the constrained layout already fits everything in
        written.append(path)

    # The chosen head, step by step: raw scores, scaled, masked, softmax weights (2 x 2 panels).
    # Each panel: 0.4 inch per token while the numbers are printed in the cells, then growing
    # more slowly, up to 7.5 inches for a long sentence.
    side = max(3.4, 0.4 * T + 1.6) if T <= 12 else min(7.5, 6.4 + 0.02 * T)
    fig = Figure(figsize=(2 * side + 1.2, 2 * side + 0.8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    hidden = (ex.mask < -1e30).numpy()  # entries the causal mask removes
    D = ex.config.head_dim
    panels = [  # (values, title, colormap, hide masked entries)
        (ex.scores_raw.numpy(), "1. raw scores  q·k", "RdBu_r", False),
        (ex.scores_scaled.numpy(), f"2. scaled  q·k / √{D}", "RdBu_r", False),
        (ex.scores_scaled.numpy(), "3. + causal mask  (grey: −∞)", "RdBu_r", True),
        (ex.weights.numpy(), "4. softmax of each row: attention weights", "viridis", True),
    ]
    for ax, (values, title, cmap_name, use_mask) in zip(axes, panels):
        cmap = colormaps[cmap_name].with_extremes(bad="#cccccc")  # grey: masked entries
        if cmap_name == "viridis":
            norm = WEIGHT_NORM()
        else:  # diverging, centred on zero
            span = float(np.abs(values).max()) or 1.0
            norm = Normalize(-span, span)
        data = np.ma.masked_where(hidden, values) if use_mask else values
        image = ax.imshow(data, cmap=cmap, norm=norm)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("key: the token looked at")
        ax.set_ylabel("query: the token looking")
        _set_token_ticks(ax, labels, 9 if T <= 24 else 7, side - 1.6)
        if T <= 12:  # small enough to print every number in its cell
            for i in range(T):
                for j in range(T):
                    if use_mask and hidden[i, j]:
                        continue
                    v = float(values[i, j])
                    level = float(norm(v))  # 0..1 along the colour bar
                    dark = level < 0.6 if cmap_name == "viridis" else abs(level - 0.5) > 0.3
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        if cmap_name == "viridis":
            bar.set_ticks(WEIGHT_TICKS)
    fig.suptitle(f"Layer {ex.layer}, head {ex.head}: from scores to attention weights", fontsize=13)
    save(fig, "attention_steps.png")

    # Every layer: a grid of its heads' attention weights (the model's own output_attentions).
    heads = ex.config.num_attention_heads
    cols = min(heads, 3 if T > 16 and heads % 3 == 0 else 4)
    rows = math.ceil(heads / cols)
    side = 2.8 if T <= 16 else 3.4
    fontsize = 7.5 if T <= 16 else 6.5
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    for layer, weights in enumerate(ex.attentions):
        fig = Figure(figsize=(cols * side + 1.0, rows * side + 0.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for h, ax in enumerate(axes):
            if h >= heads:
                ax.axis("off")
                continue
            data = np.ma.masked_where(np.triu(np.ones((T, T), dtype=bool), 1), weights[h].numpy())
            image = ax.imshow(data, cmap=cmap, norm=WEIGHT_NORM())
            ax.set_title(f"head {h}", fontsize=10)
            # Token labels on the outer edge of the grid only: the heads share both axes.
            _set_token_ticks(ax, labels, fontsize, side - 0.9, x=h + cols >= heads, y=h % cols == 0)
        bar = fig.colorbar(image, ax=list(axes), shrink=0.6, label="attention weight (square-root colour scale)")
        bar.set_ticks(WEIGHT_TICKS)
        fig.suptitle(f"Layer {layer}: attention weights (rows: query token, columns: key token)", fontsize=12)
        save(fig, f"attention_layer{layer:02d}.png")

    # The residual stream: its size after each part, and the size of each update.
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    points, names = [ex.residual[0]["in"]], ["embeddings"]
    for r in ex.residual:
        points += [r["after_attn"], r["out"]]
        names += [f"{r['block']}·attn", f"{r['block']}·mlp"]
    x = np.arange(len(points))
    ax.plot(x, points, marker="o", color="#1f77b4", label="stream size (RMS)")
    ax.bar(x[1::2], [r["attn"] for r in ex.residual], width=0.6, color="#ff7f0e", alpha=0.6, label="attention update (RMS)")
    ax.bar(x[2::2], [r["mlp"] for r in ex.residual], width=0.6, color="#2ca02c", alpha=0.6, label="MLP update (RMS)")
    every = max(1, math.ceil(len(names) / 30))
    ax.set_xticks(x[::every], names[::every], rotation=90 if len(names) > 12 else 0, fontsize=8)
    ax.set_xlabel("after block·part")
    ax.set_ylabel("RMS, averaged over tokens")
    ax.set_title("The residual stream grows as each block adds to it")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, "residual_stream.png")

    # Next-token probabilities, most likely at the top.
    fig = Figure(figsize=(7, 0.38 * len(ex.top) + 1.3), layout="constrained")
    ax = fig.subplots()
    names = [_plot_label(tok.text, tok.raw, limit=18) for tok, _, _ in ex.top]
    probs = [p for _, p, _ in ex.top]
    y = np.arange(len(probs))
    ax.barh(y, probs, color="#1f77b4")
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    for yi, p in zip(y, probs):
        ax.text(p, yi, f" {p:.1%}" if p >= 0.001 else f" {100 * p:.2g}%", va="center", fontsize=8)
    ax.set_xlim(0, min(1.0, max(probs) * 1.22))  # room for the labels after the bars
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0 if max(probs) > 0.04 else 1))
    ax.set_xlabel("probability (softmax of the soft-capped logits)")
    end = ex.text if len(ex.text) <= 40 else "…" + ex.text[-39:]
    ax.set_title(f"Most likely next tokens after “{_plot_label(end, limit=41, spaces=False)}”", fontsize=11)
    save(fig, "next_token.png")
    return written


# ---------------------------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Loading and the command line
# ---------------------------------------------------------------------------------------------


def load(path: str):
    """(model, tokenizer) from a model or run folder, the model with eager attention, in float32."""
    from transformers import AutoModelForCausalLM

    from . import IterativeLLMForCausalLM  # noqa: F401  (registers the Auto classes)
    from .tokenization import load_tokenizer

    if not os.path.isdir(path):
        raise ExplainError(f"no model folder at {path!r}: give a run folder (runs/NAME) or a saved model folder.")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ExplainError(f"{path!r} holds no config.json: it is not a saved model folder (is training finished?).")
    try:
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as err:
        raise ExplainError(f"cannot read {config_path}: {err}") from None
    if model_type != "iterative_llm":
        raise ExplainError(
            f"{path!r} holds a {model_type!r} model; explain walks through iterative-llm models only "
            f"(it calls the model's own modules one by one)."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    except Exception as err:  # noqa: BLE001  (any load failure becomes one clear line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExplainError(f"cannot load the model in {path!r} with eager attention: {first}") from None
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise ExplainError(f"the model in {path!r} does not support eager attention, which explain needs to see the weights.")
    if type(model).__name__ != "IterativeLLMForCausalLM" or not hasattr(model, "model"):
        raise ExplainError(f"{path!r} loaded as {type(model).__name__}, not an iterative-llm causal LM.")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ExplainError(str(err).splitlines()[0]) from None
    return model.eval(), tokenizer


def run(model, tokenizer, text: str, *, layer: int = 0, head: int = 0, top_k: int = 10,
        out_dir: str | None = "explain_out", model_path: str = "", stream=None) -> tuple[Explanation, list[Step]]:
    """Explain `text`, print the steps to `stream`, and write pictures and report to `out_dir` (if given)."""
    ex = explain(model, tokenizer, text, layer=layer, head=head, top_k=top_k)
    steps = describe(ex)
    if stream is not None:
        for number, step in enumerate(steps, 1):
            print(f"\n=== Step {number}. {step.title} ===", file=stream)
            for ref in step.code:
                print(f"    code: {ref}", file=stream)
            print(step.text, file=stream)
    if out_dir is not None:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            raise ExplainError(f"cannot create the output folder {out_dir!r}: {err.strerror}") from None
        write_pictures(ex, steps, out_dir)
        report = write_report(ex, steps, out_dir, model_path)
        if stream is not None:
            print(f"\nPictures and report written to {out_dir}/ ; open {report} in a browser.", file=stream)
    return ex, steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iterative-llm explain",
        allow_abbrev=False,
        description="Walk a sentence through the model step by step, with the real numbers and pictures.",
    )
    parser.add_argument("model", help="a run folder (runs/NAME) or a saved model folder with its tokenizer")
    parser.add_argument("sentence", help="the text to walk through the model")
    parser.add_argument("--layer", type=int, default=0, help="layer whose attention is shown step by step (default 0)")
    parser.add_argument("--head", type=int, default=0, help="attention head shown step by step (default 0)")
    # Underscores, like every other command; the dashed spelling is an alias.
    parser.add_argument("--top_k", "--top-k", type=int, default=10, help="how many next-token candidates to list (default 10)")
    parser.add_argument("--out", default="explain_out", help="folder for the pictures and report.html (default explain_out/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = load(args.model)
        run(model, tokenizer, args.sentence, layer=args.layer, head=args.head, top_k=args.top_k,
            out_dir=args.out, model_path=args.model, stream=sys.stdout)
    except ExplainError as err:
        print(f"iterative-llm explain: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
