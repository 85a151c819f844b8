"""The computation behind `iterative-llm explain`: the sentence through the model's own modules, one
step at a time, every intermediate kept in an `Explanation`, and checked against the model's forward."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .explain_code import _code_refs
from .explain_tokens import Token, tokenize, tokens_of


class ExplainError(Exception):
    """A problem with the user's input: reported as one line, without a stack trace."""


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
