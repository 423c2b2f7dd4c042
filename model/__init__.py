"""SmolLM2-135M: the network, its weights, tokenizer and sampling.

The names below are imported on first use: the server process needs only the tokenizer and the
sampling parameters, and importing the network would load torch there too (a second or more of every
start, and its memory) for nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    "CausalLMOutput",
    "SmolLM2Attention",
    "SmolLM2Config",
    "SmolLM2DecoderLayer",
    "SmolLM2ForCausalLM",
    "SmolLM2MLP",
    "SmolLM2Model",
    "SmolLM2RMSNorm",
    "SmolLM2RotaryEmbedding",
    "Tokenizer",
    "_precompute_freqs_cis",
    "apply_rotary_pos_emb",
    "load_model",
    "repeat_kv",
    "rotate_half",
    "save_hf_folder",
]
_HOMES = {
    name: "model.config" if name == "SmolLM2Config" else "model.tokenizer" if name == "Tokenizer"
    else "model.weights" if name in ("load_model", "save_hf_folder") else "model.modeling"
    for name in __all__
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
