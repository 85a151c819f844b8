"""The steps of `iterative-llm explain` in words: for each step, the code that does it and this
sentence's own numbers, as text for the terminal and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .explain_tokens import Token, _hex
from .explain_trace import Explanation, _rms

# How much of a long sentence the printed vectors and matrices show, and how many tokens the token
# tables list (the pictures always show everything).
MAX_PRINTED_TOKENS = 10
MAX_LISTED_TOKENS = 64
# Numbers shown from each vector.
FEW = 6


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
