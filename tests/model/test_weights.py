"""Weight loading: GGUF against transformers' own GGUF reader, HF folders round trip, strict checks, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import SmolLM2Config
from model.modeling import SmolLM2ForCausalLM
from model.weights import (
    _FAST_DEQUANT,
    load_model,
    main,
    model_from_state_dict,
    read_gguf,
    read_gguf_metadata,
    read_hf_folder,
    save_hf_folder,
)

TINY = SmolLM2Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=100000.0,
)
IDS = torch.tensor([[1, 5, 17, 200, 3, 42, 99, 7]])


def norm_randomized_model(config: SmolLM2Config = TINY, seed: int = 0) -> SmolLM2ForCausalLM:
    torch.manual_seed(seed)
    model = SmolLM2ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; randomize them so a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def logits(model: SmolLM2ForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- GGUF ---------------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute (HF rotate-half rows -> llama.cpp interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
Q = gguf.GGMLQuantizationType
# One quant type per projection so that every dequantizer path is exercised.
_QTYPES = {"attn_q": Q.F32, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.BF16, "ffn_gate": Q.Q4_1}


def gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.{i}.{module}.weight
    return f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:-1])]}.weight"


def write_gguf(path: Path, model: SmolLM2ForCausalLM, arch: str = "llama") -> None:
    """A GGUF as llama.cpp's converter writes it: permuted Q/K rows, mixed quant types, no tie flag."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_token_list([f"tok{i}" for i in range(c.vocab_size)])  # arrays of strings and of ints
    w.add_token_types([1] * c.vocab_size)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight")
    for hf, tensor in state.items():
        name = gguf_name(hf)
        array = tensor.numpy()
        if name.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, c.num_key_value_heads)
        qtype = _QTYPES.get(name.split(".")[-2], Q.F32)
        w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SmolLM2ForCausalLM]:
    model = norm_randomized_model()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, model)
    return path, model


def test_gguf_unpermutes_qk_and_dequantizes_every_type(tiny_gguf: tuple[Path, SmolLM2ForCausalLM]) -> None:
    path, model = tiny_gguf
    config, state, meta = read_gguf(path)
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    assert meta["llama.rope.freq_base"] == 100000.0 and isinstance(meta["general.architecture"], str)
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == original.keys()
    for name, want in original.items():
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if ".q_proj." in name:  # F32: the un-permute must restore the rows exactly
            assert torch.equal(got, want), name
        else:  # quantized: Q4_1 errs by ~8% (relative norm), a wrong row order by ~140%
            assert (got - want).norm() / want.norm() < 0.15, name
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == TINY.max_position_embeddings


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_fast_dequantizers_are_bit_identical_to_gguf(qtype: gguf.GGMLQuantizationType) -> None:
    values = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    packed = gguf.quants.quantize(values, qtype)  # (8, bytes per row) uint8
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    ours = _FAST_DEQUANT[qtype](packed.reshape(-1, type_size)).reshape(8, 96)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(packed, qtype))


def test_gguf_metadata_equals_gguf_reader(tiny_gguf: tuple[Path, SmolLM2ForCausalLM]) -> None:
    reader = gguf.GGUFReader(tiny_gguf[0])
    want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read_gguf_metadata(tiny_gguf[0]) == want
    assert len(want["tokenizer.ggml.tokens"]) == TINY.vocab_size


def test_gguf_model_matches_the_original(tiny_gguf: tuple[Path, SmolLM2ForCausalLM]) -> None:
    path, model = tiny_gguf
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.training
    torch.testing.assert_close(logits(loaded), logits(model), atol=0.15, rtol=0)
    assert (logits(loaded).argmax(-1) == logits(model).argmax(-1)).float().mean() > 0.8


def test_gguf_with_output_weight_is_untied(tmp_path: Path) -> None:
    model = norm_randomized_model(dataclasses.replace(TINY, tie_word_embeddings=False))
    write_gguf(tmp_path / "untied.gguf", model)
    loaded = load_model(tmp_path / "untied.gguf")
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_truncated_gguf_is_a_clear_error(tiny_gguf: tuple[Path, SmolLM2ForCausalLM], tmp_path: Path) -> None:
    data = tiny_gguf[0].read_bytes()
    for size in (0, 10, 200, len(data) // 2, len(data) - 50):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match="truncated or corrupt GGUF"):
            load_model(cut)


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "other.gguf", norm_randomized_model(), arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        load_model(tmp_path / "other.gguf")


# ---- the real model against transformers' GGUF reader -----------------------------------------------------
@pytest.fixture(scope="module")
def real_gguf() -> Path:
    from model.defaults import DefaultModelMissing, require_default_model

    try:
        return require_default_model()
    except DefaultModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def real_read(real_gguf: Path) -> tuple[SmolLM2Config, dict[str, torch.Tensor], dict]:
    return read_gguf(real_gguf)


@pytest.fixture(scope="module")
def transformers_oracle(real_gguf: Path, real_read: tuple) -> tuple[dict, dict[str, torch.Tensor]]:
    """transformers' own GGUF conversion (what from_pretrained(gguf_file=...) runs; that call itself also
    needs accelerate): its parsed config and its de-quantized, un-permuted tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only maps GGUF names to HF names; the values come from the file
        skeleton = LlamaForCausalLM(LlamaConfig(**real_read[0].to_hf_dict()))
    parsed = load_gguf_checkpoint(str(real_gguf), return_tensors=True, model_to_load=skeleton)
    return parsed["config"], parsed["tensors"]


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_equals_transformers(real_read: tuple, transformers_oracle: tuple[dict, dict]) -> None:
    hf_config, hf_tensors = transformers_oracle
    config, state, meta = real_read
    assert state.keys() == hf_tensors.keys()
    for name, tensor in hf_tensors.items():
        assert torch.equal(state[name], tensor.float()), name
    assert config.rope_theta == hf_config["rope_theta"] == 100000.0
    assert config.max_position_embeddings == hf_config["max_position_embeddings"] == 8192
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, field) == hf_config[field], field
    assert config.num_key_value_heads == hf_config["num_key_value_heads"] == 3
    assert config.rms_norm_eps == pytest.approx(hf_config["rms_norm_eps"])
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert meta["tokenizer.chat_template"].startswith("{%")


@pytest.mark.slow
@pytest.mark.real_model
def test_convert_gguf_writes_a_folder_transformers_loads(real_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    main(["convert-gguf", str(real_gguf), str(tmp_path)])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    ours = load_model(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-3, rtol=1e-3)


# ---- HF folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_hf_folder_round_trip(tmp_path: Path, tie: bool) -> None:
    model = norm_randomized_model(dataclasses.replace(TINY, tie_word_embeddings=tie))
    save_hf_folder(model, tmp_path)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tie
    loaded = load_model(tmp_path)
    assert dataclasses.replace(loaded.config, extra={}) == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie


def test_hf_folder_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, logits(model), atol=1e-5, rtol=1e-5)


def test_redundant_lm_head_in_a_tied_folder_is_dropped(tmp_path: Path) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def shard_in_two(folder: Path) -> None:
    """Split the folder's model.safetensors into two shards with an index, as save_pretrained writes them."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_folder_loads(tmp_path: Path) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    shard_in_two(tmp_path)
    assert torch.equal(logits(load_model(tmp_path)), logits(model))

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path)


def test_pytorch_model_bin_folder_loads(tmp_path: Path) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_read_hf_folder_keeps_stored_dtype(tmp_path: Path) -> None:
    save_hf_folder(norm_randomized_model().to(torch.bfloat16), tmp_path)
    config, state = read_hf_folder(tmp_path)
    assert config.torch_dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in state.values())


# ---- strictness ---------------------------------------------------------------------------------------
def tiny_state() -> dict[str, torch.Tensor]:
    state = norm_randomized_model().state_dict()
    state.pop("lm_head.weight")
    return state


def test_missing_tensor_is_named() -> None:
    state = tiny_state()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        model_from_state_dict(TINY, state)


def test_unexpected_tensor_is_named() -> None:
    state = tiny_state()
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        model_from_state_dict(TINY, state)


def test_wrong_shape_names_tensor_and_both_shapes() -> None:
    state = tiny_state()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as err:
        model_from_state_dict(TINY, state)
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value)
    assert "(64, 64)" in str(err.value) and "(32, 64)" in str(err.value)


def test_untied_config_without_lm_head_is_missing_it() -> None:
    with pytest.raises(ValueError, match=r"missing tensors.*lm_head\.weight"):
        model_from_state_dict(dataclasses.replace(TINY, tie_word_embeddings=False), tiny_state())


# ---- dtype and device -----------------------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, SmolLM2ForCausalLM]:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    return tmp_path, model


def test_bfloat16_on_cpu(tiny_folder: tuple[Path, SmolLM2ForCausalLM]) -> None:
    folder, model = tiny_folder
    loaded = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(loaded), logits(model), atol=0.05, rtol=0.05)


def test_float16_on_cpu_is_refused(tiny_folder: tuple[Path, SmolLM2ForCausalLM]) -> None:
    with pytest.raises(ValueError, match="float16 is supported on CUDA only"):
        load_model(tiny_folder[0], dtype=torch.float16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_folder: tuple[Path, SmolLM2ForCausalLM]) -> None:
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(tiny_folder[0], device=device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_load(tiny_folder: tuple[Path, SmolLM2ForCausalLM], dtype: torch.dtype) -> None:
    folder, model = tiny_folder
    loaded = load_model(folder, dtype=dtype, device="cuda")
    assert loaded.device.type == "cuda" and loaded.dtype == dtype
    assert loaded.model.rotary_emb.cos_cached.device.type == "cuda"
    with torch.no_grad():
        got = loaded(IDS.cuda()).logits.cpu()
    torch.testing.assert_close(got, logits(model), atol=0.05, rtol=0.05)


# ---- bad sources ---------------------------------------------------------------------------------------
def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_model(tmp_path / "nowhere.gguf")


def test_non_llama_config_is_refused(tiny_folder: tuple[Path, SmolLM2ForCausalLM]) -> None:
    folder = tiny_folder[0]
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model(folder)


def test_folder_without_weights_is_refused(tiny_folder: tuple[Path, SmolLM2ForCausalLM]) -> None:
    folder = tiny_folder[0]
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_model(folder)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": "64"}, r"hidden_size must be an integer in \[1, \d+\], got '64'"),
        ({"max_position_embeddings": -5}, r"max_position_embeddings must be an integer in \[2, 2147483647\]"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings must be an integer in \[2, 2147483647\]"),
        ({"max_position_embeddings": 1e9}, r"max_position_embeddings .* got 1000000000.0"),
        ({"attention_bias": True}, "attention_bias is True: this network has no bias tensors"),
        ({"mlp_bias": True}, "mlp_bias is True: this network has no bias tensors"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_the_file_and_field(
    tiny_folder: tuple[Path, SmolLM2ForCausalLM], changes: dict[str, object], message: str
) -> None:
    folder = tiny_folder[0]
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match="config.json: ValueError: " + message) as info:
        load_model(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_non_floating_point_weights_are_refused(
    tiny_folder: tuple[Path, SmolLM2ForCausalLM], dtype: torch.dtype
) -> None:
    """An int8 checkpoint cast to float serves nonsense: its scales live elsewhere, which only GGUF's
    dequantizers (on purpose) know about."""
    folder = tiny_folder[0]
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(state, folder / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        ValueError, match=rf"tensor model.layers.0.mlp.up_proj.weight is {name}; .*floating point"
    ):
        load_model(folder)


@pytest.mark.parametrize("context", [0, 1, 4_000_000_000])
def test_gguf_with_an_absurd_context_length_is_refused(tmp_path: Path, context: int) -> None:
    model = norm_randomized_model()
    model.config.max_position_embeddings = context  # written to the header as llama.context_length
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model)
    with pytest.raises(
        ValueError, match=r"tiny.gguf: llama.context_length \(max_position_embeddings\) must be"
    ):
        load_model(path)


def test_gguf_with_a_large_context_builds_a_small_rope_table(tmp_path: Path) -> None:
    model = norm_randomized_model()
    model.config.max_position_embeddings = 2_000_000_000
    write_gguf(tmp_path / "tiny.gguf", model)
    loaded = load_model(tmp_path / "tiny.gguf")
    assert loaded.config.max_position_embeddings == 2_000_000_000
    assert loaded.model.rotary_emb.cos_cached.shape[0] <= 8192


# ---- config.json as transformers reads it ------------------------------------------------------------------
def _drop_config_keys(folder: Path, *keys: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key in keys:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))


def test_keys_left_out_of_config_json_take_llama_config_defaults(tmp_path: Path) -> None:
    """A writer that keeps only non-default values leaves out tie_word_embeddings false, num_key_value_heads
    equal to the heads and rms_norm_eps 1e-6: read with SmolLM2's values, the LM head was ignored."""
    from transformers import AutoModelForCausalLM

    config = dataclasses.replace(TINY, tie_word_embeddings=False, num_key_value_heads=4, rms_norm_eps=1e-6)
    model = norm_randomized_model(config)
    save_hf_folder(model, tmp_path)
    _drop_config_keys(tmp_path, "tie_word_embeddings", "num_key_value_heads", "rms_norm_eps")
    loaded = load_model(tmp_path)
    assert not loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 4
    assert loaded.config.rms_norm_eps == 1e-6
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), theirs(IDS).logits, atol=1e-5, rtol=1e-5)


def test_a_folder_without_the_tie_key_and_without_an_lm_head_is_tied(tmp_path: Path) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    _drop_config_keys(tmp_path, "tie_word_embeddings")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_a_tied_folder_whose_lm_head_differs_warns_and_uses_the_embeddings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, tmp_path / "model.safetensors")
    with caplog.at_level("WARNING", logger="model"):
        loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "lm_head.weight differs" in warnings[0].getMessage()
    assert str(tmp_path) in warnings[0].getMessage()


@pytest.mark.parametrize("rope_type", ["linear", "llama3", "yarn"])
def test_a_folder_with_scaled_rope_parameters_is_refused(tmp_path: Path, rope_type: str) -> None:
    save_hf_folder(norm_randomized_model(), tmp_path)
    _drop_config_keys(tmp_path, "rope_theta")
    _edit_config(tmp_path, rope_parameters={"rope_type": rope_type, "factor": 4.0, "rope_theta": 1e5})
    with pytest.raises(ValueError, match=f"config.json: .*rope_type '{rope_type}' is not supported") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_rotary_inv_freq_buffers_of_old_checkpoints_are_ignored(tmp_path: Path) -> None:
    model = norm_randomized_model()
    save_hf_folder(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(TINY.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(TINY.head_dim // 2)
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(logits(load_model(tmp_path)), logits(model))


def test_a_head_dim_apart_from_hidden_over_heads_is_refused_up_front(tmp_path: Path) -> None:
    save_hf_folder(norm_randomized_model(), tmp_path)
    _edit_config(tmp_path, head_dim=32)
    with pytest.raises(ValueError, match=r"config.json: ValueError: head_dim 32 is not supported") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


# ---- damaged weight files ------------------------------------------------------------------------------------
def test_a_truncated_safetensors_shard_is_named(tmp_path: Path) -> None:
    save_hf_folder(norm_randomized_model(), tmp_path)
    shard_in_two(tmp_path)
    second = tmp_path / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:100])
    with pytest.raises(
        ValueError, match="corrupt safetensors file .*model-00002-of-00002.safetensors"
    ) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


class _NotATensor:
    pass


def test_a_pytorch_file_holding_other_objects_is_refused_naming_it(tmp_path: Path) -> None:
    save_hf_folder(norm_randomized_model(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save({**state, "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin holds objects other than tensors") as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="corrupt PyTorch file .*pytorch_model.bin"):
        load_model(tmp_path)
