"""The pictures of `iterative-llm explain`: attention heatmaps, the chosen head step by step, the
residual stream and the next-token probabilities, as PNG files. Needs matplotlib."""

from __future__ import annotations

import math
import os

from .explain_steps import Step
from .explain_tokens import _hex
from .explain_trace import Explanation

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
