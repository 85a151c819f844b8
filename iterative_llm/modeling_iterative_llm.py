"""iterative-llm: a small modern GPT, written as a first-class Hugging Face transformers model.

Read top to bottom: RMSNorm, rotary embedding, attention, MLP, block, the shared base class, the
backbone (`IterativeLLMModel`) and the causal-LM head (`IterativeLLMForCausalLM`).

Notable features, each a field of `IterativeLLMConfig`:
- Rotary position embeddings (Su et al. 2021, "RoFormer") instead of learned positions.
- RMSNorm pre-norm (Zhang & Sennrich 2019), plus a norm after the token embedding
  (modded-nanogpt records, Keller Jordan et al. 2024; nanochat).
- QK-norm: queries and keys RMS-normalised per head before attention (Dehghani et al. 2023,
  "Scaling Vision Transformers to 22B"; OLMo 2; modded-nanogpt), which keeps attention logits
  bounded and lets the optimiser run at higher learning rates.
- ReLU^2 MLP (So et al. 2021, "Primer"; adopted by modded-nanogpt), SwiGLU (Shazeer 2020) or GELU.
- Grouped-query attention (Ainslie et al. 2023) through `num_key_value_heads`.
- No biases (PaLM, Chowdhery et al. 2022), untied or tied embeddings.
- Zero-initialised output projections, so each block starts as the identity (modded-nanogpt;
  the "zero-init residual" of Goyal et al. 2017).
- Logit soft-capping `cap * tanh(logits / cap)` (Gemma 2, 2024; modded-nanogpt record of Nov 2024),
  under the name `final_logit_softcapping`, which TRL's fused LM head also applies.
- Attention through transformers' attention-function registry (eager, sdpa, flash_attention_2/3,
  flex_attention), masks from `create_causal_mask` (padding, packed sequences), the v5 `Cache` API.

Shapes in comments: B batch, T new tokens, S tokens attended to (cache + new), H query heads,
K key/value heads, D head width, C hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_iterative_llm import IterativeLLMConfig


class IterativeLLMRMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class IterativeLLMRotaryEmbedding(nn.Module):
    """Turns position ids into the cos/sin tables that rotate queries and keys.

    Channel pair (i, i + D/2) of a head turns by angle position * theta^(-2i/D): nearby positions
    differ in fast-turning channels, distant ones in slow channels, and the dot product of a query
    and a key depends only on their distance.
    """

    def __init__(self, config: IterativeLLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        # Not saved with the weights (recomputed from the config); `_init_weights` refills it after
        # `from_pretrained`, which builds modules on the meta device and leaves buffers empty.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)  # (D/2,)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> angles (B, T, D/2) -> cos, sin (B, T, D), in float32 then x's dtype.
        angles = position_ids[..., None].float() * self.inv_freq.float().to(x.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by the angles in cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * groups, S, D): each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: softmax(q k^T * scaling + mask) v. Returns the weights too.

    query (B, H, T, D), key/value (B, K, S, D), attention_mask additive (B, 1, T, S) or None.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return output, weights


class IterativeLLMAttention(nn.Module):
    """Causal self-attention with grouped key/value heads, QK-norm and rotary positions."""

    def __init__(self, config: IterativeLLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by the sdpa/flash attention functions
        bias = config.use_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.o_proj.is_residual_output = True  # zero-initialised when the config asks (see _init_weights)
        if config.qk_norm:
            self.q_norm = IterativeLLMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = IterativeLLMRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        # (B, T, C) -> (B, T, heads, D) -> (B, heads, T, D). The head counts are inferred (-1), so
        # the same code runs when tensor parallelism gives each device a share of the heads.
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

        if cache is not None:
            # The cache keeps every earlier key/value; from here on key/value are (B, K, S, D).
            key, value = cache.update(key, value, self.layer_idx)

        attention_function: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_function(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch, length, -1)  # (B, T, H*D)
        return self.o_proj(output), weights


class IterativeLLMMLP(nn.Module):
    """The position-wise feed-forward network: up-project, nonlinearity, down-project."""

    def __init__(self, config: IterativeLLMConfig):
        super().__init__()
        self.mlp_type = config.mlp_type
        bias = config.use_bias
        if self.mlp_type == "swiglu":
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.down_proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_type == "relu2":
            hidden = F.relu(self.up_proj(x)).square()  # Primer: ReLU^2 beats GELU at equal cost
        elif self.mlp_type == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(hidden)


class IterativeLLMDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Subclassing GradientCheckpointingLayer gives activation checkpointing when it is switched on.
    """

    def __init__(self, config: IterativeLLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = IterativeLLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = IterativeLLMAttention(config, layer_idx)
        self.post_attention_layernorm = IterativeLLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = IterativeLLMMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states


class IterativeLLMPreTrainedModel(PreTrainedModel):
    config: IterativeLLMConfig
    config_class = IterativeLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["IterativeLLMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # What `output_hidden_states` / `output_attentions` collect (transformers' output capturing).
    _can_record_outputs = {
        "hidden_states": IterativeLLMDecoderLayer,
        "attentions": IterativeLLMAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """All initialisation in one place, including the buffer a meta-device load leaves empty.

        `transformers.initialization` functions skip tensors already loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_output", False) and self.config.zero_init_output_projections:
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
        elif isinstance(module, IterativeLLMRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, IterativeLLMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))


class IterativeLLMModel(IterativeLLMPreTrainedModel):
    """The backbone: token embedding, the blocks, a final norm. Returns the last hidden state."""

    def __init__(self, config: IterativeLLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = IterativeLLMRMSNorm(config.hidden_size, config.rms_norm_eps) if config.embedding_norm else None
        self.rotary_emb = IterativeLLMRotaryEmbedding(config)
        self.layers = nn.ModuleList(IterativeLLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = IterativeLLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def _check_inputs(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None, new_tokens: int, past_tokens: int
    ) -> None:
        """Clear errors for the two inputs that otherwise fail deep inside torch or silently.

        Skipped while torch.compile traces. Checks that read values back to the host run on an
        accelerator only outside training, so a training step stays free of host-device
        synchronisation (the training data's ids are checked once, when its shards are loaded).
        """
        if torch.compiler.is_compiling():
            return
        limit = self.config.max_position_embeddings
        can_read_values = not self.training or (input_ids if input_ids is not None else position_ids).device.type == "cpu"
        if position_ids is not None:
            # Packed (padding-free) rows hold several sequences whose positions restart: the
            # positions, not the row length, must fit the context.
            longest = int(position_ids.max()) + 1 if can_read_values and position_ids.numel() else 0
            if longest > limit:
                raise ValueError(
                    f"Position {longest - 1} is beyond this model's max_position_embeddings ({limit}): a sequence "
                    f"is {longest} tokens long. Shorten the input or max_new_tokens, or train a model with a "
                    f"larger `max_position_embeddings`."
                )
        elif past_tokens + new_tokens > limit:
            raise ValueError(
                f"The sequence is {past_tokens + new_tokens} tokens long ({past_tokens} cached + {new_tokens} new), "
                f"longer than this model's max_position_embeddings ({limit}). Shorten the input or "
                f"max_new_tokens, or train a model with a larger `max_position_embeddings`."
            )
        if input_ids is not None and input_ids.numel() > 0 and can_read_values:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ValueError(
                    f"Token id {bad} is outside the model's vocabulary (0..{self.config.vocab_size - 1}). "
                    f"The tokenizer does not match this model: use the tokenizer saved with the model, or build "
                    f"the model with vocab_size >= len(tokenizer)."
                )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if use_cache and cache is None and not self.training:
            # Training never reuses keys and values: building a cache there only costs memory.
            cache = DynamicCache(config=self.config)
        past_tokens = cache.get_seq_length() if cache is not None else 0
        new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        self._check_inputs(input_ids, position_ids, new_tokens, past_tokens)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        hidden_states = self.embed_norm(inputs_embeds) if self.embed_norm is not None else inputs_embeds

        # Only positions the caller gives can describe packed sequences. Made-up ones go to the mask
        # as None: transformers' packed-sequence check then costs nothing, and under torch.compile
        # (where that check cannot be skipped) attention keeps its mask-free causal path (flash on GPUs).
        mask_position_ids = position_ids
        if position_ids is None:
            position_ids = torch.arange(past_tokens, past_tokens + new_tokens, device=hidden_states.device)[None]
        # One mask for all layers: causal, plus padding from attention_mask, plus document
        # boundaries when packed sequences restart their position_ids. transformers looks for
        # packed sequences only when it is given no cache; an empty dynamic cache holds nothing
        # the mask needs, so it is left out and packing works in eval mode as in training.
        empty_dynamic_cache = isinstance(cache, DynamicCache) and past_tokens == 0
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=None if empty_dynamic_cache else cache,
            position_ids=mask_position_ids,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class _SoftcappedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `cap * tanh(hidden @ weight.T / cap)`, without the (N, V) logits.

    The plain path keeps the (N, V) logits, their float32 copy, tanh and softmax alive for the
    backward pass: at a small width with a large vocabulary they are a large share of a step's time
    and memory (about 40% of a tiny-preset CPU step at vocabulary 4096). Here the rows are
    processed in chunks and each chunk's gradients with respect to `hidden` and `weight` are
    computed at once, in the forward pass (the idea of Liger Kernel's fused linear cross-entropy,
    Hsu et al. 2024, here with the soft-cap folded in); backward only scales them. Measured on one
    CPU thread, forward + backward of 4096 rows of width 128: 207 ms against 596 ms for the plain
    path at a 4096-token vocabulary, 48 against 72 ms at 1024 (benchmarks/results/throughput_cpu.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, chunk_rows, ignore_index):
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Which gradients to form comes from `ctx.needs_input_grad`, never from `tensor.requires_grad`:
        # under torch.compile the inputs seen here can be detached copies (requires_grad False), and
        # reading it gave exactly zero gradients on CUDA (pytorch issues 159299, 129963, 160901).
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            valid = t != ignore_index
            safe_targets = torch.where(valid, t, 0)[:, None]
            # The chunk's (n, V) float32 buffers are updated in place: fewer passes over memory and
            # no fresh allocations (each costs page faults on CPU).
            logits = (h @ weight.t()).float()  # a bf16 product under autocast, then float32
            if cap is not None:
                # cap * tanh(z / cap) written as 2 cap * sigmoid(2 z / cap) - cap: the same function,
                # and torch's CPU sigmoid runs 6x faster than its tanh (0.4 vs 2.6 ms per 1M floats, 1 thread).
                squashed = torch.sigmoid_(logits.mul_(2.0 / cap))
                logits = torch.mul(squashed, 2.0 * cap).sub_(cap)
                target_logits = logits.gather(1, safe_targets).squeeze(1)
                # Capped logits lie in [-cap, cap]: exp cannot overflow, so no max is subtracted first.
                probs = logits.exp_()
                sum_exp = probs.sum(dim=-1)
                log_normaliser = sum_exp.log()
            else:
                target_logits = logits.gather(1, safe_targets).squeeze(1)
                log_normaliser = torch.logsumexp(logits, dim=-1)
                probs = logits.sub_(log_normaliser[:, None]).exp_()
                sum_exp = None
            loss_sum += torch.where(valid, log_normaliser - target_logits, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one_hot(target), zero on ignored rows; then through the cap:
            # d (cap * tanh(z / cap)) / dz = 1 - tanh^2 = 4 sigmoid (1 - sigmoid).
            scale = valid.to(probs.dtype)
            if sum_exp is not None:
                scale = scale / sum_exp
            grad = probs.mul_(scale[:, None])
            grad.scatter_add_(1, safe_targets, -valid.to(grad.dtype)[:, None])
            if cap is not None:
                grad.mul_(squashed).mul_(squashed.neg_().add_(1.0)).mul_(4.0)
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight.to(h.dtype), out=grad_hidden[rows])
            if grad_weight is not None:
                if grad.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight.add_(grad.t() @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_weight = grad_weight * grad_output if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def softcapped_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cap: float | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    **kwargs,
) -> torch.Tensor:
    """The causal-LM loss of transformers' `ForCausalLMLoss` (same shift, -100, mean or sum over
    `num_items_in_batch`), from the hidden states, without keeping the (N, V) logits when eager.

    Two implementations of one function, chosen by whether torch.compile is tracing:
    - eager: `_SoftcappedLinearCrossEntropy`, chunk by chunk (fast and small on CPU, where it was
      measured; see its docstring);
    - compiled: the plain formula, logits -> soft-cap -> cross-entropy, which inductor fuses into a
      few kernels around the one matrix product (how modded-nanogpt and nanochat compute their
      loss under compile). A custom autograd.Function that forms gradients in its forward is the
      pattern dynamo gets wrong (it gave zero gradients on CUDA under bf16 autocast, issue 14), and
      its chunk loop would be unrolled into hundreds of small kernels; so it is never traced.
    Both give the same loss and gradients (tests/model/test_compile.py checks compiled against eager, and
    tests/model/test_model.py the chunked path against the plain one, under bf16 autocast).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if torch.compiler.is_compiling():
        logits = (hidden @ weight.t()).float()  # a bf16 product under autocast, then float32
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        loss_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    else:
        # About 4 MB of float32 logits per chunk on CPU (fits in cache, measured fastest), 64 MB on an accelerator.
        elements = 2**20 if hidden.device.type == "cpu" else 2**24
        chunk_rows = max(64, elements // weight.shape[0])
        loss_sum = _SoftcappedLinearCrossEntropy.apply(hidden, weight, targets, cap, chunk_rows, ignore_index)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    return loss_sum / (targets != ignore_index).sum()


class IterativeLLMForCausalLM(IterativeLLMPreTrainedModel, GenerationMixin):
    """The backbone plus the output head: next-token logits, and the loss when labels are given."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers shards `embed_tokens` on the vocabulary whenever the config has a TP plan
    # (distributed/mixin.py); a head tied to it must be sharded too (test_tied_weights_are_sharded_together).
    # Same entry as LlamaForCausalLM in transformers 5.24.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: IterativeLLMConfig):
        super().__init__(config)
        self.model = IterativeLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""labels (B, T): the input ids themselves (shifted inside), -100 where no loss is wanted.

        logits_to_keep: an int keeps the logits of the last that many positions (0 keeps all), a tensor
        the positions it names; generation passes 1, so only the last position pays for the (B, T, V)
        projection.
        skip_logits: compute only the loss, chunk by chunk, and return no logits (the name the
        Trainer passes with `use_liger_kernel`): faster and far smaller when the vocabulary is
        large next to the width. Pretraining uses it.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns only the loss: pass `labels` as well.")
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        cap = self.config.final_logit_softcapping
        if skip_logits:
            loss = self.loss_from_hidden_states(hidden_states, labels, **kwargs)
            return CausalLMOutputWithPast(
                loss=loss, logits=None, cache=outputs.cache,
                hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            )
        # transformers' own slicing: the last N positions, given positions, or a boolean mask (packed rows).
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        if cap is not None:
            # Soft-capping in float32: bounded logits keep early training stable (Gemma 2; modded-nanogpt).
            logits = cap * torch.tanh(logits.float() / cap)

        loss = None
        if labels is not None:
            # transformers' causal-LM loss: shift by one, ignore -100, float32, and averaging over
            # `num_items_in_batch` when the Trainer passes it for gradient accumulation.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


    def loss_from_hidden_states(self, hidden_states: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """The head and the causal-LM loss from the last hidden states (B, T, C), without the logits.

        A method of its own so training can compile it apart from the blocks (training/pretrain/step.py
        `compile_model`); kwargs carry `shift_labels` and `num_items_in_batch`.
        """
        return softcapped_linear_cross_entropy(
            hidden_states, self.lm_head.weight, labels, self.config.final_logit_softcapping, **kwargs
        )


__all__ = ["IterativeLLMPreTrainedModel", "IterativeLLMModel", "IterativeLLMForCausalLM"]
