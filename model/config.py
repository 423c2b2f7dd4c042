"""SmolLM2Config: the spec's hyperparameters, and how they are read from model files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SmolLM2Config:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.041666666666666664
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_cache: bool = True
    tie_word_embeddings: bool = True
    torch_dtype: str = "float32"
    block_size: int = 512  # generate() truncates its context to this many tokens (the spec's training length)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF fields, kept for round-trips

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> SmolLM2Config:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type not in (None, "llama", "smollm2") or (
            archs and archs[0] not in ("LlamaForCausalLM", "SmolLM2ForCausalLM")
        ):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs!r} "
                "(expected a Llama-family model such as SmolLM2)"
            )
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict) and "rope_theta" in rope_params and "rope_theta" not in d:
            kwargs["rope_theta"] = rope_params["rope_theta"]
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": self.head_dim})
        d.update({"attention_bias": False, "mlp_bias": False, "rope_scaling": None, "pretraining_tp": 1})
        return d

    # ---- GGUF metadata ---------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any]) -> SmolLM2Config:
        """`meta` maps GGUF keys (``llama.embedding_length`` ...) to plain Python values."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r} (expected 'llama')")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"llama.{key}", default)

        n_heads = int(get("attention.head_count"))
        vocab = get("vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in meta:
            vocab = len(meta["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
