"""SmolLM2-135M: the network, its weights, tokenizer and sampling."""

from model.config import SmolLM2Config
from model.modeling import (
    CausalLMOutput,
    SmolLM2Attention,
    SmolLM2DecoderLayer,
    SmolLM2ForCausalLM,
    SmolLM2MLP,
    SmolLM2Model,
    SmolLM2RMSNorm,
    SmolLM2RotaryEmbedding,
    _precompute_freqs_cis,
    apply_rotary_pos_emb,
    repeat_kv,
    rotate_half,
)
from model.tokenizer import Tokenizer
from model.weights import load_model, save_hf_folder

__all__ = [
    "Tokenizer",
    "load_model",
    "save_hf_folder",
    "CausalLMOutput",
    "SmolLM2Attention",
    "SmolLM2Config",
    "SmolLM2DecoderLayer",
    "SmolLM2ForCausalLM",
    "SmolLM2MLP",
    "SmolLM2Model",
    "SmolLM2RMSNorm",
    "SmolLM2RotaryEmbedding",
    "_precompute_freqs_cis",
    "apply_rotary_pos_emb",
    "repeat_kv",
    "rotate_half",
]
