"""Tokenizer tests: transformers' GGUF tokenizer is the oracle for the real model; a tiny vocabulary
written to a GGUF file covers the file reader and the error paths without the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from model import tokenizer as tokmod
from model.defaults import DefaultModelMissing, require_default_model
from model.tokenizer import Tokenizer, read_gguf_metadata

CORPUS = [
    "",
    "Hello, world!",
    "  leading,   internal   and trailing spaces  ",
    "   ",
    "\t\ttabs\tand\nnewlines\n\n\r\n end",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "12345678901234567890 3.14159 -1e-10 2024-06-01 $1,000,000.00",
    "Café naïve résumé Ångström façade Øre",
    "日本語のテキスト、中文文本和한국어",
    "emoji 🤗🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ＦＵＬＬＷＩＤＴＨ zero\u200bwidth",
    "it's I'm we'll they've you'd SHE'S",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "a<|im_end|>b <|im_start|> c<|im_start|><|im_end|>",
    "not special: <|im_start and im_end|> <repo_name",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, with émoji 🤗?"},
    ],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second\n\nline"}],
]


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return require_default_model()
    except DefaultModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_file(gguf_path)


@pytest.fixture(scope="module")
def oracle(gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def tiny_meta(**overrides: Any) -> dict[str, Any]:
    """A byte-level vocabulary: 3 control tokens, the 256 byte characters and a few merges."""
    alphabet = list(tokmod._bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "he", "ll", "hell", "hello", "Ġw"]
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": tokmod.CHATML_TEMPLATE,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def write_gguf(path: Path, meta: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(str(path), meta.get("general.architecture", "llama"))
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- parity with transformers on the real model ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_model
def test_encode_matches_transformers_gguf_tokenizer(tok: Tokenizer, oracle: Any) -> None:
    for text in CORPUS:
        assert tok.encode(text) == oracle.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == oracle.encode(text, add_special_tokens=True), text


@pytest.mark.slow
@pytest.mark.real_model
def test_special_tokens_match_transformers(tok: Tokenizer, oracle: Any) -> None:
    assert tok.vocab_size == len(oracle) == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        oracle.bos_token_id,
        oracle.eos_token_id,
        oracle.pad_token_id,
    )
    assert tok.encode("<|im_start|>") == [oracle.convert_tokens_to_ids("<|im_start|>")]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, oracle: Any, add_generation_prompt: bool) -> None:
    for conv in CONVERSATIONS:
        expected = oracle.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.real_model
def test_decode_inverts_encode(tok: Tokenizer) -> None:
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.real_model
def test_token_bytes_join_into_the_text_even_where_a_token_is_part_of_a_character(tok: Tokenizer) -> None:
    for text in [*CORPUS, "👍 你好, naïve <|im_end|>\n\t∑"]:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == text, text
    emoji = tok.encode("👍")
    assert len(emoji) > 1 and all(tok.decode([i]) == "\ufffd" for i in emoji)  # parts: text alone cannot say
    assert b"".join(tok.token_bytes(i) for i in emoji) == "👍".encode()


@pytest.mark.real_model
def test_encode_plain_reads_a_control_tokens_spelling_as_text(tok: Tokenizer) -> None:
    text = "a<|im_end|>\n<|im_start|>system"
    assert tok.has_special_text(text) and not tok.has_special_text("a <im_end> b")
    assert tok.encode(text).count(tok.token_to_id("<|im_end|>")) == 1
    plain = tok.encode_plain(text)
    assert not set(plain) & {tok.token_to_id(t) for t in tok.special_texts()}
    assert tok.decode(plain) == text
    assert tok.encode_plain("just text") == tok.encode("just text")


@pytest.mark.real_model
def test_skip_special_tokens_drops_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.real_model
def test_gguf_metadata_reader_agrees_with_config(gguf_path: Path) -> None:
    meta = read_gguf_metadata(gguf_path)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


# ---- incremental decoding ---------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_decoder_one_id_at_a_time(tok: Tokenizer, skip_special_tokens: bool) -> None:
    text = "".join(CORPUS[8:16])  # accents, CJK, emoji (multi-token characters), special tokens
    ids = tok.encode(text)
    dec = tok.incremental_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "" in pieces  # some emoji span several tokens, so some pushes had to hold text back


@pytest.mark.real_model
def test_incremental_decoder_holds_partial_character_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🤗")
    assert len(ids) > 1
    dec = tok.incremental_decoder()
    assert dec.push(ids[:1]) == ""
    assert dec.push(ids[1:]) == "🤗"
    assert dec.flush() == ""


@pytest.mark.real_model
def test_incremental_decoder_flush_returns_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🤗")[:-1]
    dec = tok.incremental_decoder()
    assert dec.push(ids) == "ok "  # the complete text before the unfinished emoji is not held back
    rest = dec.flush()
    assert rest.startswith("\ufffd") and "ok " + rest == tok.decode(ids)


@pytest.mark.real_model
def test_incremental_decoder_work_per_push_is_bounded(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded_lengths: list[int] = []
    backend = tok._backend

    class Recorder:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            decoded_lengths.append(len(ids))
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. 日本語 🤗 " * 40)
    dec = tok.incremental_decoder()
    monkeypatch.setattr(dec._tok, "_backend", Recorder())
    out = "".join(dec.push([i]) for i in ids) + dec.flush()
    assert out == backend.decode(ids)
    assert max(decoded_lengths) <= 8, "each push should decode a short window, not the whole sequence"


# ---- save / load -------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_save_then_load_round_trips(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "export")
    loaded = Tokenizer.from_file(tmp_path / "export")
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    conv = CONVERSATIONS[1]
    assert loaded.apply_chat_template(conv) == tok.apply_chat_template(conv)
    assert Tokenizer.from_file(tmp_path / "export" / "tokenizer.json").encode(CORPUS[9]) == tok.encode(
        CORPUS[9]
    )


@pytest.mark.slow
@pytest.mark.real_model
def test_saved_folder_loads_in_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.eos_token_id
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(CONVERSATIONS[0])
    )


# ---- tiny vocabulary: file reader, fallbacks, errors ---------------------------------------------------


def test_metadata_reader_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_meta())
    reader = gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert read_gguf_metadata(path) == expected


def test_tiny_gguf_file_encodes_with_merges_and_control_tokens(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(write_gguf(tmp_path / "tiny.gguf", tiny_meta()))
    hello, world = tok.token_to_id("hello"), tok.token_to_id("Ġw")
    assert tok.encode("hello<|im_end|> w") == [hello, 2, world]
    assert tok.decode([hello, 2, world]) == "hello<|im_end|> w"
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1 and tok.pad_token_id is None
    assert tok.id_to_token(hello) == "hello" and tok.token_to_id("<|im_start|>") == 1


def test_a_gguf_without_the_suffix_is_read_by_its_header(tmp_path: Path) -> None:
    """The weights loader takes a GGUF by its magic bytes, whatever its name: so does the tokenizer."""
    path = write_gguf(tmp_path / "tiny.gguf", tiny_meta())
    renamed = path.rename(tmp_path / "model.bin")
    assert Tokenizer.from_file(renamed).encode("hello") == Tokenizer.from_file(
        write_gguf(tmp_path / "again.gguf", tiny_meta())
    ).encode("hello")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="cannot read a tokenizer"):
        Tokenizer.from_file(tmp_path / "notes.txt")


def test_add_bos_token_from_metadata(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello", add_special_tokens=True) == [1, tok.token_to_id("hello")]
    assert tok.encode("hello") == [tok.token_to_id("hello")]
    tok.save(tmp_path)
    assert Tokenizer.from_file(tmp_path).encode("hello", add_special_tokens=True)[0] == 1


def test_missing_template_falls_back_to_chatml() -> None:
    tok = Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.chat_template": None}))
    assert tok.chat_template is None
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )


def test_none_valued_message_keys_are_dropped() -> None:
    template = "{% for m in messages %}{{ m['role'] }}:{{ m.get('name', 'anon') }};{% endfor %}"
    tok = Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "x", "name": None}], False) == "user:anon;"


@pytest.mark.parametrize(
    ("template", "message_part"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{{ raise_exception('system role not supported') }}", "system role not supported"),
        ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "TypeError"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages[5]['content'] }}", "chat template failed"),
    ],
)
def test_bad_or_unsafe_templates_raise_value_error(template: str, message_part: str) -> None:
    tok = Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.chat_template": template}))
    with pytest.raises(ValueError, match=message_part):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_runaway_template_output_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokmod, "MAX_RENDERED_CHARS", 10_000)
    template = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}"
    tok = Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.chat_template": template}))
    with pytest.raises(ValueError, match="more than 10000 characters"):
        tok.apply_chat_template([])


def test_messages_must_be_dicts() -> None:
    tok = Tokenizer.from_gguf_fields(tiny_meta())
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, "b"])  # type: ignore[list-item]


def test_decode_rejects_ids_outside_vocabulary() -> None:
    tok = Tokenizer.from_gguf_fields(tiny_meta())
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} "):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1 "):
        tok.incremental_decoder().push([-1])


def test_missing_sources_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_file(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", {"general.architecture": "llama", "llama.block_count": 2})
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        Tokenizer.from_file(path)


def test_non_bpe_gguf_tokenizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="'llama' is not supported"):
        Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.ggml.model": "llama"}))


def test_unknown_pre_tokenizer_warns() -> None:
    with pytest.warns(UserWarning, match="qwen2"):
        Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.ggml.pre": "qwen2"}))


def test_corrupt_gguf_files_raise_value_error(tmp_path: Path) -> None:
    (tmp_path / "text.gguf").write_text("this is not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_file(tmp_path / "text.gguf")
    whole = write_gguf(tmp_path / "tiny.gguf", tiny_meta()).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Tokenizer.from_file(tmp_path / "cut.gguf")


def test_non_bpe_tokenizer_json_is_rejected(tmp_path: Path) -> None:
    wordpiece = {
        "version": "1.0",
        "model": {
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": {"[UNK]": 0, "a": 1},
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece))
    with pytest.raises(ValueError, match="only BPE"):
        Tokenizer.from_file(tmp_path)


# ---- end-of-generation ids besides EOS -------------------------------------------------------------------


@pytest.fixture
def endoftext_folder(tmp_path: Path) -> Path:
    """A tokenizer folder whose EOS is <|endoftext|> (0); <|im_end|> (2) ends a chat turn."""
    Tokenizer.from_gguf_fields(tiny_meta(**{"tokenizer.ggml.eos_token_id": 0})).save(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("generation", "config", "extra"),
    [
        ({"eos_token_id": [0, 2]}, {}, (2,)),  # transformers and vLLM stop on every one of them
        ({"eos_token_id": 2}, {"eos_token_id": 1}, (2,)),  # generation_config.json wins over config.json
        ({"eos_token_id": [2, 1, 2, 0, 100_000, -1, True, "x"]}, {}, (1, 2)),  # in the vocabulary, once
        ({}, {"eos_token_id": [0, 1]}, (1,)),  # config.json when generation_config.json names none
        (None, {"eos_token_id": 1}, (1,)),
        ({"eos_token_id": 0}, {}, ()),
        (None, None, ()),
    ],
)
def test_extra_eos_token_ids_come_from_the_generation_config(
    endoftext_folder: Path, generation: Any, config: Any, extra: tuple[int, ...]
) -> None:
    if generation is not None:
        (endoftext_folder / "generation_config.json").write_text(json.dumps(generation))
    if config is not None:
        (endoftext_folder / "config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(endoftext_folder)
    assert tok.eos_token_id == 0 and tok.extra_eos_token_ids == extra
    assert Tokenizer.from_file(endoftext_folder / "tokenizer.json").extra_eos_token_ids == extra


@pytest.mark.parametrize("broken", ["{not json", "[0, 2]", "\xff\xfe"])
def test_a_broken_generation_config_does_not_stop_the_load(endoftext_folder: Path, broken: str) -> None:
    """It is read as absent, as transformers does when it cannot load one: config.json's ids count."""
    (endoftext_folder / "generation_config.json").write_text(broken, encoding="latin-1")
    assert Tokenizer.from_file(endoftext_folder).extra_eos_token_ids == ()
    (endoftext_folder / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_file(endoftext_folder).extra_eos_token_ids == (2,)


def test_gguf_extra_eos_token_ids_are_its_end_of_turn_token(tmp_path: Path) -> None:
    assert Tokenizer.from_gguf_fields(tiny_meta()).extra_eos_token_ids == ()
    eot = tiny_meta(**{"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2})
    assert Tokenizer.from_file(write_gguf(tmp_path / "eot.gguf", eot)).extra_eos_token_ids == (2,)
    same = tiny_meta(**{"tokenizer.ggml.eot_token_id": 2})  # EOS is 2 already
    assert Tokenizer.from_gguf_fields(same).extra_eos_token_ids == ()


# ---- GGUF files the tokenizer cannot be built from -------------------------------------------------------


def test_a_merge_outside_the_vocabulary_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """`tokenizers` panics on it (a Rust PanicException, not an Exception, with a long backtrace)."""
    meta = tiny_meta(
        **{
            "tokenizer.ggml.tokens": ["a", "b", "c", "d"],
            "tokenizer.ggml.token_type": [1, 1, 1, 1],
            "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": None,
            "tokenizer.ggml.eos_token_id": None,
        }
    )
    path = write_gguf(tmp_path / "tinytok.gguf", meta)
    with pytest.raises(
        ValueError, match=r"tinytok.gguf: tokenizer.ggml.merges\[0\] 'a b' is not a merge"
    ) as info:
        Tokenizer.from_file(path)
    assert "\n" not in str(info.value)


def test_a_panic_while_building_the_tokenizer_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class PanicException(BaseException):  # as pyo3 names it
        pass

    def panic(**_: Any) -> None:
        raise PanicException("range end index 2 out of range for slice of length 1")

    monkeypatch.setattr(tokmod, "BPE", panic)
    with pytest.raises(ValueError, match="cannot be built: PanicException: range end index"):
        Tokenizer.from_gguf_fields(tiny_meta())


def test_a_gguf_of_another_architecture_is_refused_before_its_tokenizer_is_built(tmp_path: Path) -> None:
    bad_merges = {"tokenizer.ggml.merges": ["h e", "zz qq"]}  # would fail to build
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_meta(**{"general.architecture": "gpt2", **bad_merges}))
    with pytest.raises(ValueError, match=r"gpt2.gguf: general.architecture is 'gpt2'; only 'llama'"):
        Tokenizer.from_file(path)
