"""Model weights in and out: GGUF files, Hugging Face folders, and this project's training checkpoints.

Every reader returns a ``SmolLM2Config`` and a state dict under Hugging Face Llama names. ``load_model``
checks those names and shapes against the model before loading anything, builds the model on the meta
device and assigns the tensors (no throw-away random init). ``save_hf_folder`` writes the folder layout that
``read_hf_folder`` (and transformers / vLLM) read back; ``python -m model.weights convert-gguf SRC OUT``
turns a GGUF into such a folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

from model.config import SmolLM2Config
from model.gguf_cursor import GGUFCursor
from model.modeling import SmolLM2ForCausalLM, SmolLM2RotaryEmbedding

StateDict = dict[str, torch.Tensor]

log = logging.getLogger("model")

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

# GGUF tensor names (llama.cpp) -> Hugging Face Llama names.
_GGUF_GLOBAL = {
    "token_embd.weight": EMBED,
    "output_norm.weight": "model.norm.weight",
    "output.weight": LM_HEAD,
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# ---- GGUF -----------------------------------------------------------------------------------------
def gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m is None or m[2] not in _GGUF_LAYER:
        raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama equivalent")
    return f"model.layers.{m[1]}.{_GGUF_LAYER[m[2]]}.{m[3]}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp convert_hf_to_gguf's ``permute`` of Q/K rows.

    GGUF interleaves each head's two rotary halves row by row (x0, y0, x1, y1, ...) for llama.cpp's
    rope; the rotate-half layout wants them split (x0, x1, ..., y0, y1, ...).
    """
    out_dim = w.shape[0]
    head_dim = out_dim // n_head
    # (n_head, hd/2, 2, *rest) -> (n_head, 2, hd/2, *rest)
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, outermost first (GGUF lists dims innermost first)
    qtype: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    n_bytes: int


def _tensor_info(cur: GGUFCursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
    name = cur.string()
    (n_dims,) = cur.unpack("I")
    dims = cur.unpack(f"{n_dims}Q")
    qtype_id, offset = cur.unpack("IQ")
    qtype = GGMLQuantizationType(qtype_id)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if not dims or dims[0] % block:  # blocks run along the innermost dim and never straddle rows
        raise ValueError(f"tensor {name}: shape {dims} does not split into {qtype.name} blocks of {block}")
    return name, tuple(reversed(dims)), qtype, offset, math.prod(dims) // block * type_size


def _parse_gguf(buf: np.ndarray, path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Header, metadata and tensor table of a GGUF file held in ``buf`` (uint8)."""
    if buf[:4].tobytes() != b"GGUF":
        raise ValueError(f"not a GGUF file (magic {buf[:4].tobytes()!r})")
    cur = GGUFCursor(buf.data)  # memoryview of the (uint8,) file bytes
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("IQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (need 2 or 3)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("I")
        meta[key] = cur.value(vtype)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    align = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors = [GGUFTensor(name, shape, q, data_start + off, nb) for name, shape, q, off, nb in infos]
    for t in tensors:
        if t.start + t.n_bytes > len(buf):
            raise ValueError(f"tensor {t.name} ends at byte {t.start + t.n_bytes}, the file has {len(buf)}")
    return meta, tensors


def _load_gguf(path: Path) -> tuple[np.ndarray, dict[str, Any], list[GGUFTensor]]:
    # One read of the whole file (~100 MB for the default model): the header parses ~30x faster than
    # with gguf.GGUFReader, which builds a numpy view per vocabulary string.
    buf = np.fromfile(path, dtype=np.uint8)
    try:
        meta, tensors = _parse_gguf(buf, path)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError, OverflowError, MemoryError) as e:
        raise ValueError(f"truncated or corrupt GGUF file {path}: {e}") from e
    return buf, meta, tensors


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF key/value metadata (tokenizer, chat template, hyperparameters) as plain Python values."""
    return _load_gguf(_existing(path))[1]


def _gguf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> SmolLM2Config:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' (SmolLM2) is supported")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported")
    try:
        config = SmolLM2Config.from_gguf_fields(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    rope_dim = meta.get("llama.rope.dimension_count", config.head_dim)
    if rope_dim != config.head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {rope_dim} != head_dim {config.head_dim}")
    # GGUF has no tie flag: llama.cpp writes output.weight only when the LM head is a separate matrix.
    return dataclasses.replace(config, tie_word_embeddings="output.weight" not in tensor_names)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 34) uint8 blocks [f16 scale d, 32 x int8 q] -> (n, 32) float32 q * d."""
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """(n, 20) uint8 blocks [f16 d, f16 m, 16 bytes] -> (n, 32) float32 d * q + m; byte j holds values
    j (low nibble) and j + 16 (high nibble)."""
    dm = blocks[:, :4].copy().view(np.float16).astype(np.float32)  # (n, 2): d, m
    qs = blocks[:, 4:]
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    out *= dm[:, :1]
    out += dm[:, 1:]  # gguf.quants' operations in its order: bit-identical
    return out


# The default model's types, in whole-tensor numpy passes: ~3x faster than gguf.quants.dequantize, which
# loops over groups of rows; that one still decodes every other type. (numpy, not torch: torch's
# threaded kernels were several times slower on a busy 2-core machine; so is the Q/K un-permute.)
_FAST_DEQUANT = {GGMLQuantizationType.Q8_0: _dequantize_q8_0, GGMLQuantizationType.Q4_1: _dequantize_q4_1}


def _dequantize(buf: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """(out, in) float32; quantized rows are decoded block by block along the last (input) dim."""
    raw = buf[t.start : t.start + t.n_bytes]
    if t.qtype in _FAST_DEQUANT:
        _, type_size = GGML_QUANT_SIZES[t.qtype]
        return _FAST_DEQUANT[t.qtype](raw.reshape(-1, type_size)).reshape(t.shape)
    rows = math.prod(t.shape[:-1])
    try:
        array = dequantize(raw.reshape(rows, t.n_bytes // rows), t.qtype)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name}: {t.qtype.name} is not supported ({e})") from e
    # np.array copies: F32/F16 results may be views into the file buffer.
    return np.array(array, dtype=np.float32).reshape(t.shape)


def read_gguf(path: str | Path) -> tuple[SmolLM2Config, StateDict, dict[str, Any]]:
    """Config, float32 state dict (HF names, rotate-half Q/K rows) and plain metadata of a GGUF file."""
    path = _existing(path)
    buf, meta, tensors = _load_gguf(path)
    config = _gguf_config(meta, {t.name for t in tensors}, path)
    state: StateDict = {}
    for t in tensors:
        name = gguf_to_hf_name(t.name)
        weight = _dequantize(buf, t)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_key_value_heads)
        state[name] = torch.from_numpy(weight)
    return config, state, meta


# ---- Hugging Face folders (and training checkpoints, which use the same layout) ---------------------
def _read_sharded(folder: Path, index_name: str, load: Any) -> StateDict:
    try:
        weight_map: dict[str, str] = json.loads((folder / index_name).read_text(encoding="utf-8"))[
            "weight_map"
        ]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{folder / index_name}: no readable weight_map ({type(e).__name__}: {e})") from e
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard}: shard listed in {index_name} is missing")
        state.update(load(folder / shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ValueError(f"{folder}: {index_name} lists tensors its shards do not hold: {absent[:5]}")
    return state


def _safetensors_load(path: Path) -> StateDict:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise ValueError(f"truncated or corrupt safetensors file {path}: {e}") from e


def _torch_load(path: Path) -> StateDict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only tensors (and plain containers) are unpickled: anything else could run code on load.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(
                f"{path} holds objects other than tensors ({found[1]}), which are not loaded: save a state "
                "dict of tensors, or the weights as safetensors"
            ) from None
        raise ValueError(f"truncated or corrupt PyTorch file {path}: {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"truncated or corrupt PyTorch file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} holds objects other than tensors: expected a state dict of tensors")
    return state


def _read_hf_tensors(folder: Path) -> StateDict:
    if (folder / "model.safetensors").is_file():
        return _safetensors_load(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        return _read_sharded(folder, "model.safetensors.index.json", _safetensors_load)
    if (folder / "pytorch_model.bin").is_file():
        return _torch_load(folder / "pytorch_model.bin")
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _read_sharded(folder, "pytorch_model.bin.index.json", _torch_load)
    raise FileNotFoundError(
        f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def read_hf_folder(path: str | Path) -> tuple[SmolLM2Config, StateDict]:
    """Config and state dict of a Hugging Face folder (config.json + safetensors or pytorch_model.bin)."""
    folder = _existing(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = SmolLM2Config.from_hf_dict(raw, llama_defaults=True)
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not UTF-8, not an object of numbers
        raise ValueError(f"{config_file}: {type(e).__name__}: {e}") from e
    # Older checkpoints saved the RoPE frequencies as buffers; the model computes them from the config.
    state = {k: v for k, v in _read_hf_tensors(folder).items() if not k.endswith("rotary_emb.inv_freq")}
    if "tie_word_embeddings" not in raw:
        # LlamaConfig's default is untied, but a file without an LM head can only mean the embeddings.
        config = dataclasses.replace(config, tie_word_embeddings=LM_HEAD not in state)
    elif config.tie_word_embeddings and LM_HEAD in state:
        head, embed = state[LM_HEAD], state.get(EMBED)
        if embed is None or head.shape != embed.shape or not torch.equal(head.to(embed.dtype), embed):
            # As vLLM does: the config's tie wins and the embeddings serve as the head.
            log.warning(
                "%s: lm_head.weight differs from the embeddings but config.json sets tie_word_embeddings "
                "true: it is ignored and the embeddings are used as the LM head",
                folder,
            )
    # Integer tensors would be cast to float and served as nonsense: a quantized checkpoint (int8 with its
    # scales elsewhere) needs its own dequantizing, which only the GGUF reader does.
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"{folder}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; weights must be "
                "floating point (float32, bfloat16 or float16)"
            )
    return config, state


def read_weights(source: str | Path | None = None) -> tuple[SmolLM2Config, StateDict]:
    """Config and state dict of a ``.gguf`` file or a model folder; ``None`` is the default model."""
    if source is None:
        from model.defaults import require_default_model

        source = require_default_model()
    path = _existing(source)
    if path.is_dir():
        return read_hf_folder(path)
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if path.suffix == ".gguf" or is_gguf:
        config, state, _ = read_gguf(path)
        return config, state
    raise ValueError(f"{path} is neither a .gguf file nor a model folder (config.json + weights)")


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model source not found: {p}")
    return p


# ---- building the model -----------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose float32, bfloat16 or float16")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; choose float32, bfloat16 or float16")
    return dtype


def resolve_device(device: torch.device | str, dtype: torch.dtype) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if dtype == torch.float16 and dev.type == "cpu":
        raise ValueError("float16 is supported on CUDA only; on CPU use bfloat16 or float32")
    return dev


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]) -> None:
    """Raise one ValueError listing every missing, unexpected and wrongly shaped tensor."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}")
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            problems.append(
                f"wrong shape for {name}: file has {tuple(state[name].shape)}, model expects {tuple(shape)}"
            )
    if problems:
        raise ValueError("weights do not match the model config:\n  " + "\n  ".join(problems))


def model_from_state_dict(
    config: SmolLM2Config,
    state: StateDict,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> SmolLM2ForCausalLM:
    """Build the model on the meta device and assign ``state`` (checked first) cast to dtype/device."""
    dtype = resolve_dtype(dtype)
    dev = resolve_device(device, dtype)
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop(LM_HEAD, None)  # a redundant copy; the head is the embedding matrix
    with torch.device("meta"):
        model = SmolLM2ForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop(LM_HEAD, None)
    check_state_dict(expected, state)
    state = {k: v.to(device=dev, dtype=dtype) for k, v in state.items()}
    if config.tie_word_embeddings:
        state[LM_HEAD] = state[EMBED]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    _materialize_buffers(model, dev)
    return model.eval()


def _materialize_buffers(model: SmolLM2ForCausalLM, device: torch.device) -> None:
    """The RoPE tables are non-persistent buffers, still on the meta device: rebuild them on ``device``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SmolLM2RotaryEmbedding):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                fresh = SmolLM2RotaryEmbedding(module.dim, module.max_seq_len_cached, module.base)
            setattr(model.get_submodule(parent_name), attr, fresh)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers without data after loading (weights.py must rebuild them): {left}")


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> SmolLM2ForCausalLM:
    """A ``.gguf`` file, HF folder or training checkpoint folder as an eval-mode model."""
    dtype = resolve_dtype(dtype)
    resolve_device(device, dtype)  # fail before reading hundreds of MB
    config, state = read_weights(source)
    return model_from_state_dict(config, state, dtype, device)


# ---- writing HF folders ------------------------------------------------------------------------------
def write_hf_folder(config: SmolLM2Config, state: Mapping[str, torch.Tensor], folder: str | Path) -> Path:
    """config.json + model.safetensors (a tied LM head is stored once, as the embedding)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if config.tie_word_embeddings:
        tensors.pop(LM_HEAD, None)
    dtypes = {t.dtype for t in tensors.values()}
    hf = config.to_hf_dict()
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def save_hf_folder(model: SmolLM2ForCausalLM, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and ``tokenizer``'s files, if given) as a Hugging Face folder."""
    out = write_hf_folder(model.config, model.state_dict(), folder)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def write_generation_config(config: SmolLM2Config, folder: str | Path) -> None:
    ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = {k: v for k, v in ids.items() if v is not None}
    (Path(folder) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def convert_gguf(src: str | Path, out: str | Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """A complete HF folder from a GGUF: config, weights, tokenizer files and generation config."""
    from model.tokenizer import Tokenizer

    config, state, _ = read_gguf(src)
    dtype = resolve_dtype(dtype)
    state = {k: v.to(dtype) for k, v in state.items()}
    folder = write_hf_folder(config, state, out)
    write_generation_config(config, folder)
    Tokenizer.from_file(src).save(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.weights")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-gguf", help="write a Hugging Face folder from a GGUF file")
    conv.add_argument("src", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    folder = convert_gguf(args.src, args.out, args.dtype)
    print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")


if __name__ == "__main__":
    main()
