"""SmolLM2Config: the spec's hyperparameters, and how they are read from model files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Bounds the config's numbers must fall in: a config.json or GGUF header is read from disk, and a wrong
# type or an absurd value would otherwise surface later as a bare TypeError, an odd torch error or a
# multi-GB allocation. Positions above 2**31 are beyond any Llama-family model (and int32 position ids).
MAX_POSITIONS = 2**31 - 1
_INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**31 - 1),
    "hidden_size": (1, 2**20),
    "intermediate_size": (1, 2**22),
    "num_hidden_layers": (1, 4096),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    # a context of 1 token leaves no room for one generated token
    "max_position_embeddings": (2, MAX_POSITIONS),
    "block_size": (1, MAX_POSITIONS),
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# HF Llama flags for layers this network does not have: a config that sets them describes another model.
UNSUPPORTED_TRUE_FLAGS = ("attention_bias", "mlp_bias")
# transformers' LlamaConfig defaults where they differ from SmolLM2's: transformers reads a config.json key
# that is absent as its class default (and writers that keep only non-default values leave it out), so a
# folder must be read with these, not with SmolLM2's. num_key_value_heads defaults to num_attention_heads.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


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
        self._check_types_and_ranges()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim (hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads}) "
                f"is {self.head_dim}; rotary embeddings need it even"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    def _check_types_and_ranges(self) -> None:
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or null, got {value!r}")
        for name, positive in (("rms_norm_eps", True), ("rope_theta", True), ("initializer_range", False)):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                allowed = "a positive number" if positive else "a non-negative number"
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        for name in ("use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.hidden_act, str):
            raise ValueError(f"hidden_act must be a string, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, llama_defaults: bool = False) -> SmolLM2Config:
        """From a config.json's dict. ``llama_defaults``: a key it lacks takes LlamaConfig's default (how
        transformers reads a model folder's config.json); otherwise SmolLM2's (a training config)."""
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
        for flag in UNSUPPORTED_TRUE_FLAGS:
            if d.get(flag) not in (None, False):
                raise ValueError(
                    f"{flag} is {d[flag]!r}: this network has no bias tensors (only false is supported)"
                )
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict) and rope_params.get("rope_type") not in (None, "default"):
            raise ValueError(
                f"rope_parameters rope_type {rope_params['rope_type']!r} is not supported (only 'default')"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        if llama_defaults:
            kwargs = {**LLAMA_DEFAULTS, **kwargs}
            if kwargs.get("num_key_value_heads") is None:  # null too, as LlamaConfig reads it
                kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = (kwargs["eos_token_id"] or [None])[0]
        if isinstance(rope_params, dict) and "rope_theta" in rope_params and "rope_theta" not in d:
            kwargs["rope_theta"] = rope_params["rope_theta"]
        extra = {k: v for k, v in d.items() if k not in known}
        config = cls(**kwargs, extra=extra)
        # The attention here splits hidden_size evenly into heads; a head_dim set apart from that would
        # otherwise surface as a wrong shape of every attention weight.
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(
                f"head_dim {head_dim!r} is not supported (only hidden_size / num_attention_heads = "
                f"{config.head_dim})"
            )
        return config

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

        n_heads = get("attention.head_count")
        vocab = get("vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in meta:
            vocab = len(meta["tokenizer.ggml.tokens"])
        try:
            return cls(
                vocab_size=vocab,
                hidden_size=get("embedding_length"),
                intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"),
                num_attention_heads=n_heads,
                num_key_value_heads=get("attention.head_count_kv", n_heads),
                max_position_embeddings=get("context_length", 2048),
                rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=get("rope.freq_base", 10000.0),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            )
        except ValueError as e:  # name the GGUF key the reader looks for, not only our field
            message = str(e)
            field_name = message.split(" ", 1)[0]
            if field_name in GGUF_KEYS:
                message = f"{GGUF_KEYS[field_name]} ({field_name}){message[len(field_name) :]}"
            raise ValueError(message) from None


# Our fields -> the GGUF keys from_gguf_fields reads them from.
GGUF_KEYS = {
    "vocab_size": "llama.vocab_size",
    "hidden_size": "llama.embedding_length",
    "intermediate_size": "llama.feed_forward_length",
    "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "max_position_embeddings": "llama.context_length",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}
