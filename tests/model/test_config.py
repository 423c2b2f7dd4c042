"""SmolLM2Config refuses what a config.json or GGUF header may hold but the model cannot be: wrong types,
absurd sizes, layers it does not have; and the RoPE table does not follow an absurd context length."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from model.config import SmolLM2Config
from model.modeling import ROPE_TABLE_POSITIONS, SmolLM2ForCausalLM
from tests.tiny import TINY_CONFIG


def tiny(**overrides: Any) -> SmolLM2Config:
    return SmolLM2Config(**{**TINY_CONFIG, **overrides})


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("hidden_size", "96", r"integer in \[1, "),  # a string: was "not all arguments converted ..."
        ("max_position_embeddings", -5, r"integer in \[2, 2147483647\]"),  # was a torch.arange error
        ("max_position_embeddings", 0, r"integer in \[2, 2147483647\]"),  # served, then 400 on everything
        ("max_position_embeddings", 1, r"integer in \[2, 2147483647\]"),
        ("max_position_embeddings", 1e9, r"integer in \[2, 2147483647\]"),  # JSON 1e9 is a float
        ("max_position_embeddings", 2**40, r"integer in \[2, 2147483647\]"),
        ("num_hidden_layers", 0, r"integer in \[1, "),
        ("num_key_value_heads", True, r"integer in \[1, "),
        ("vocab_size", None, r"integer in \[1, "),
        ("eos_token_id", -1, "non-negative integer or null"),
        ("rms_norm_eps", 0.0, "positive number"),
        ("rope_theta", "1e4", "positive number"),
        ("rope_theta", float("nan"), "positive number"),
        ("tie_word_embeddings", "yes", "true or false"),
    ],
)
def test_bad_numbers_are_refused_naming_the_field_and_the_range(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be .*{allowed}") as info:
        tiny(**{field: value})
    assert "\n" not in str(info.value)


def test_an_odd_head_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="head_dim .* even"):
        tiny(hidden_size=90, num_attention_heads=6, num_key_value_heads=2)  # head_dim 15


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_bias_flags_are_refused(flag: str) -> None:
    """The network has no bias tensors: a config asking for them describes another model."""
    with pytest.raises(ValueError, match=f"{flag} is True: .*no bias tensors"):
        SmolLM2Config.from_hf_dict({**TINY_CONFIG, flag: True})
    assert SmolLM2Config.from_hf_dict({**TINY_CONFIG, flag: False}).extra[flag] is False


def test_gguf_errors_name_the_gguf_key() -> None:
    meta = {
        "general.architecture": "llama",
        "llama.vocab_size": 256,
        "llama.embedding_length": 96,
        "llama.feed_forward_length": 192,
        "llama.block_count": 2,
        "llama.attention.head_count": 6,
        "llama.attention.head_count_kv": 2,
    }
    assert (
        SmolLM2Config.from_gguf_fields({**meta, "llama.context_length": 256}).max_position_embeddings == 256
    )
    for bad in (0, 4_000_000_000):
        with pytest.raises(ValueError, match=r"^llama.context_length \(max_position_embeddings\) must be"):
            SmolLM2Config.from_gguf_fields({**meta, "llama.context_length": bad})
    with pytest.raises(ValueError, match=r"^llama.block_count \(num_hidden_layers\) must be .* got None"):
        SmolLM2Config.from_gguf_fields({k: v for k, v in meta.items() if k != "llama.block_count"})


def test_the_rope_table_does_not_follow_a_huge_context() -> None:
    """1e9 positions would be a 512 GB table: it holds what is used (serving sizes it to max_model_len)."""
    model = SmolLM2ForCausalLM(tiny(max_position_embeddings=1_000_000))
    rope = model.model.rotary_emb
    assert rope.max_seq_len_cached == ROPE_TABLE_POSITIONS == rope.cos_cached.shape[0]
    rope.resize(64)
    assert rope.cos_cached.shape[0] == rope.sin_cached.shape[0] == 64
    small = SmolLM2ForCausalLM(tiny())  # a context below the cap: all of it
    assert small.model.rotary_emb.max_seq_len_cached == TINY_CONFIG["max_position_embeddings"]


@pytest.mark.parametrize(
    "rope",
    [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "yarn"}],
)
def test_rope_parameters_with_a_scaling_type_are_refused(rope: dict[str, Any]) -> None:
    """transformers 5 writes scaling into rope_parameters: served unscaled, the outputs were silently wrong."""
    with pytest.raises(
        ValueError, match=rf"^rope_parameters rope_type '{rope['rope_type']}' is not supported"
    ):
        SmolLM2Config.from_hf_dict({**TINY_CONFIG, "rope_parameters": {**rope, "rope_theta": 5e5}})
    plain = {**TINY_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert SmolLM2Config.from_hf_dict(plain).rope_theta == 5e5


def test_missing_keys_take_llama_config_defaults() -> None:
    """transformers reads an absent key as LlamaConfig's default, whatever wrote the file."""
    from transformers import LlamaConfig

    theirs = LlamaConfig()
    ours = SmolLM2Config.from_hf_dict({"model_type": "llama"}, llama_defaults=True)
    for f in fields(SmolLM2Config):
        if f.name in ("extra", "torch_dtype", "block_size", "rope_theta"):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert not ours.tie_word_embeddings and ours.rms_norm_eps == 1e-6
    # num_key_value_heads follows num_attention_heads (multi-head attention), not SmolLM2's 3
    mha = SmolLM2Config.from_hf_dict({"hidden_size": 96, "num_attention_heads": 6}, llama_defaults=True)
    assert mha.num_key_value_heads == 6


def test_an_explicit_head_dim_apart_from_hidden_over_heads_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"^head_dim 32 is not supported \(only hidden_size / num_attention_heads"
    ):
        SmolLM2Config.from_hf_dict({**TINY_CONFIG, "head_dim": 32})
    assert SmolLM2Config.from_hf_dict({**TINY_CONFIG, "head_dim": 16}).head_dim == 16
