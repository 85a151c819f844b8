"""IterativeLLMConfig: every architectural choice of the model, each a field with a default.

This file is copied into every saved model folder (for `trust_remote_code` loading), so it imports
only torch/transformers and the sibling modeling file imports it as `from .configuration_iterative_llm`.

Field names follow transformers' conventions (`hidden_size`, `num_attention_heads`,
`num_key_value_heads`, `intermediate_size`, `max_position_embeddings`, `rms_norm_eps`,
`rope_theta`, `tie_word_embeddings`, `final_logit_softcapping`): generation, the caches, PEFT and
TRL read them by these names.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Named sizes a user can ask for (`IterativeLLMConfig.from_preset("gpt2-small")`). Parameter
# counts are for the preset's own vocabulary; the vocabulary usually comes from the tokenizer.
#   tiny         ~1.8M   CPU minutes; tests, CI and the README quickstart share it
#   gpt1         ~117M   GPT-1 (Radford et al. 2018): 12 x 768, 512 context, tied embeddings
#   gpt2-small   ~124M   GPT-2 small (Radford et al. 2019): 12 x 768, 1024 context, tied
#   gpt2-medium  ~355M   GPT-2 medium: 24 x 1024, 1024 context, tied
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gpt1": dict(
        vocab_size=40960, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "gpt2-small": dict(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "gpt2-medium": dict(
        vocab_size=50304, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}

MLP_TYPES = ("relu2", "swiglu", "gelu")


class IterativeLLMConfig(PretrainedConfig):
    r"""Configuration of an iterative-llm decoder-only GPT.

    Args:
        vocab_size: number of token ids the model embeds; must be >= the tokenizer's `len()`.
        hidden_size: width of the residual stream.
        intermediate_size: width of the MLP's hidden layer (4x hidden for ReLU^2, ~8/3x for SwiGLU).
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads per block; must divide `hidden_size` (unless `head_dim` is set).
        num_key_value_heads: key/value heads (grouped-query attention); must divide the query heads.
            Defaults to `num_attention_heads` (plain multi-head attention).
        head_dim: width of one head; defaults to `hidden_size // num_attention_heads`.
        max_position_embeddings: the longest sequence (prompt + generated tokens) the model accepts.
        mlp_type: "relu2" (default), "swiglu" or "gelu".
        rope_theta: base of the rotary position embedding's frequencies.
        rms_norm_eps: epsilon of every RMSNorm.
        qk_norm: RMS-normalise queries and keys per head before the rotary embedding.
        embedding_norm: RMS-normalise the token embeddings before the first block.
        use_bias: biases in the linear layers (off: modern LMs train as well without them).
        tie_word_embeddings: share the input embedding matrix with the output head.
        zero_init_output_projections: start each block's output projections (`o_proj`, `down_proj`)
            at zero, so every block starts as the identity.
        final_logit_softcapping: if set, logits become `cap * tanh(logits / cap)`.
        attention_dropout, hidden_dropout: dropout probabilities (0 by default: no dropout).
        initializer_range: standard deviation of the normal initialisation of weight matrices.
        embedding_init_std: standard deviation of the token embedding's initialisation. Default:
            1.0 for an untied embedding followed by `embedding_norm` (the norm makes its scale
            irrelevant to the forward pass, and the speedruns' embedding learning rates assume
            unit-scale rows: modded-nanogpt, nanochat); `initializer_range` when the embedding is
            tied to the head, where its scale sets the initial logits.
    """

    model_type = "iterative_llm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Tensor-parallel plan in transformers' vocabulary, for users who shard a large preset.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 1024,
        mlp_type: str = "relu2",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
        embedding_norm: bool = True,
        use_bias: bool = False,
        tie_word_embeddings: bool = False,
        zero_init_output_projections: bool = True,
        final_logit_softcapping: float | None = 15.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        initializer_range: float = 0.02,
        embedding_init_std: float | None = None,
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 0,
        pad_token_id: int | None = 1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.mlp_type = mlp_type
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm
        self.embedding_norm = embedding_norm
        self.use_bias = use_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.zero_init_output_projections = zero_init_output_projections
        self.final_logit_softcapping = final_logit_softcapping
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        if embedding_init_std is None:
            embedding_init_std = 1.0 if embedding_norm and not tie_word_embeddings else initializer_range
        self.embedding_init_std = embedding_init_std
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        # A saved folder must load in a process that never imported iterative_llm, and TRL reads
        # `config.auto_map` when it reloads a reference model: so the map is always present.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_iterative_llm.IterativeLLMConfig",
                "AutoModel": "modeling_iterative_llm.IterativeLLMModel",
                "AutoModelForCausalLM": "modeling_iterative_llm.IterativeLLMForCausalLM",
            },
        )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()
        if self.mlp_type != "swiglu":
            # Only SwiGLU has a `gate_proj`: a TP-plan entry that matches no parameter fails transformers'
            # test_tp_plan_matches_params. An instance attribute; `to_dict` never serialises TP plans.
            plan = type(self).base_model_tp_plan
            self.base_model_tp_plan = {name: style for name, style in plan.items() if "gate_proj" not in name}

    def _validate(self) -> None:
        """Reject shapes that cannot build, naming the field and the fix."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"IterativeLLMConfig: `{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"IterativeLLMConfig: `hidden_size` ({self.hidden_size}) is not divisible by "
                    f"`num_attention_heads` ({self.num_attention_heads}). Choose a head count that divides "
                    f"the hidden size (e.g. {_divisors_hint(self.hidden_size)}), or set `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"IterativeLLMConfig: `head_dim` ({self.head_dim}) must be even for rotary embeddings; "
                f"change `hidden_size`/`num_attention_heads` or `head_dim`."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"IterativeLLMConfig: `num_attention_heads` ({self.num_attention_heads}) is not divisible by "
                f"`num_key_value_heads` ({self.num_key_value_heads}). Each key/value head serves a whole group "
                f"of query heads: pick `num_key_value_heads` from {_divisors_hint(self.num_attention_heads)}."
            )
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"IterativeLLMConfig: `mlp_type` must be one of {MLP_TYPES}, got {self.mlp_type!r}.")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError(
                "IterativeLLMConfig: `final_logit_softcapping` must be a positive number, or None to turn it off; "
                f"got {self.final_logit_softcapping!r}."
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"IterativeLLMConfig: `{name}` must be in [0, 1), got {getattr(self, name)!r}.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "IterativeLLMConfig":
        """A named size (`tiny`, `gpt1`, `gpt2-small`, `gpt2-medium`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}. Available presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


__all__ = ["IterativeLLMConfig", "PRESETS"]
