"""Tokenizer: byte-level BPE on the `tokenizers` library, from a GGUF file or a Hugging Face folder.

From a GGUF, the tokenizer is rebuilt from llama.cpp's metadata keys (``tokenizer.ggml.*``) the same way
transformers' GGUF converter does it for a ``gpt2``-model vocabulary such as SmolLM2's (``pre == "smollm"``):
a BPE model with no unknown token, a ``ByteLevel`` pre-tokenizer (GPT-2 regex, no prefix space), a
``ByteLevel`` decoder, no normalizer, and every token the file marks CONTROL added as a special token, so
``<|im_start|>`` in a text is one token.

The chat template is rendered in Jinja's immutable sandbox with the options transformers uses. A model
without a template is rendered with ChatML (``CHATML_TEMPLATE``), which is what SmolLM2 was trained on.
"""

from __future__ import annotations

import codecs
import json
import mmap
import re
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from model.gguf_cursor import GGUFCursor

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_RENDERED_CHARS = 16_000_000  # stops a runaway template long before it eats the server's memory

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# Pre-tokenizer labels whose split is GPT-2's ByteLevel regex (llama.cpp's "smollm" also splits digits one
# by one, which the SmolLM2 merges already do: they contain no digit merges).
_BYTE_LEVEL_PRE = {None, "default", "gpt2", "smollm"}


# ---- GGUF metadata --------------------------------------------------------------------------------


def _has_gguf_magic(path: Path) -> bool:
    """The weights loader takes a GGUF by its header whatever its name: so must the tokenizer."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (no tensors).

    Same values as ``{k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}`` for the
    metadata keys, but in ~0.1 s instead of ~6 s: GGUFReader builds numpy views for each of the
    100k vocabulary strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = GGUFCursor(buf)
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
            cur.pos = 4
            version, _n_tensors, n_kv = cur.unpack("IQQ")
            if version < 2:
                raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                (vtype,) = cur.unpack("I")
                meta[key] = cur.value(vtype)
        except (struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF metadata ({e})") from e
    return meta


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the alphabet byte-level tokens are spelled in)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}  # a byte-level token's character -> its byte
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _respell(token: str, alphabet: set[str]) -> str:
    # llama.cpp sometimes stores a token as raw text; transformers re-spells those in the byte alphabet.
    if set(token) <= alphabet:
        return token
    spelling = _bytes_to_unicode()
    return "".join(spelling[b] for b in token.encode("utf-8"))


def _byte_level_bpe_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError("GGUF tokenizer has no tokenizer.ggml.merges; a byte-level BPE needs them")
    alphabet = set(_bytes_to_unicode().values())
    vocab = {_respell(t, alphabet): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # `tokenizers` panics (a Rust backtrace on stderr) on a merge whose result is not a token: check first.
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(part in vocab for part in (*pair, "".join(pair))):
            raise ValueError(
                f"tokenizer.ggml.merges[{i}] {merges[i]!r} is not a merge of two tokens into a token of "
                "the vocabulary"
            )
    try:
        backend = HFTokenizer(
            BPE(
                vocab=vocab,
                merges=pairs,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
    except BaseException as e:
        # pyo3 turns a Rust panic into PanicException, a BaseException: make it an ordinary error.
        if not (isinstance(e, Exception) or type(e).__name__ == "PanicException"):
            raise
        raise ValueError(f"the GGUF tokenizer cannot be built: {type(e).__name__}: {e}") from None
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
    control = [t for t, k in zip(tokens, types, strict=False) if k == _CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _bos_post_processor(bos_token: str, bos_id: int | None) -> processors.TemplateProcessing:
    assert bos_id is not None  # bos_token comes from the vocabulary
    return processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
    )


# ---- chat template ---------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change prompts; transformers overrides it too.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template does not compile: {e}") from e


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        # Keys set to None (OpenAI's content=None, tool_calls=None) are dropped, as transformers does:
        # templates test for a missing key, and would print "None" otherwise.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


# ---- Tokenizer ---------------------------------------------------------------------------------------


def _special(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...}, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_ids(value: Any) -> list[int]:
    """The ids of an ``eos_token_id`` value as generation_config.json writes it: an int, a list, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _generation_eos_ids(folder: Path, model_config: Mapping[str, Any]) -> list[int]:
    """generation_config.json's ``eos_token_id`` (else config.json's): the ids transformers and vLLM stop
    on. An unreadable generation_config.json counts as absent, as in transformers: it never stops a start."""
    try:
        generation = _read_json(folder / "generation_config.json")
    except (OSError, ValueError):
        generation = {}
    value = generation.get("eos_token_id")
    return _token_ids(model_config.get("eos_token_id") if value is None else value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # not JSON or not UTF-8
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class Tokenizer:
    """Byte-level BPE tokenizer with its special tokens and chat template.

    Build it with ``Tokenizer.from_file(source)``: a ``.gguf`` file, an HF folder holding
    ``tokenizer.json`` (and optionally ``tokenizer_config.json`` / ``chat_template.jinja``), or a
    ``tokenizer.json`` path. When the model has no chat template, ``chat_template`` is None and
    ``apply_chat_template`` uses ChatML (``CHATML_TEMPLATE``).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        if not isinstance(backend.model, BPE):
            raise ValueError(
                f"unsupported tokenizer model {type(backend.model).__name__}: only BPE is supported"
            )
        self._backend = backend
        self.tokens = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        for name, token in self.tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos = self.eos_token_id
        self._extra_eos = tuple(
            sorted({i for i in extra_eos_token_ids if 0 <= i < self.vocab_size and i != eos})
        )
        self._max_chars_per_token: int | None | bool = False  # False: not computed yet
        self._token_bytes: dict[int, bytes] = {}  # filled as token_bytes() is asked (vocabulary-bounded)
        self._specials: set[int] | None = None
        self._special_texts: list[str] | None = None
        self._special_pattern: re.Pattern[str] | None = None
        self._plain_backend: HFTokenizer | None = None  # encode_plain's: special tokens read as text
        self._template: jinja2.Template | None = None

    # ---- construction ----
    @classmethod
    def from_file(cls, source: str | Path) -> Tokenizer:
        """From a ``.gguf`` file, an HF folder with ``tokenizer.json``, or a ``tokenizer.json`` path."""
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model not found: {path} (a .gguf file, an HF folder or a tokenizer.json)"
            )
        if path.is_file() and (path.suffix == ".gguf" or _has_gguf_magic(path)):
            meta = read_gguf_metadata(path)
            # Another architecture's vocabulary may not even build: say what the file is first.
            arch = meta.get("general.architecture")
            if arch != "llama":
                raise ValueError(
                    f"{path}: general.architecture is {arch!r}; only 'llama' (SmolLM2) is supported"
                )
            try:
                return cls.from_gguf_fields(meta)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        if path.is_file() and path.name.endswith(".json"):
            return cls._from_hf(path.parent, path)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{path} holds no tokenizer.json (nor is it a .gguf file)")
            return cls._from_hf(path, path / "tokenizer.json")
        raise ValueError(
            f"cannot read a tokenizer from {path}: expected a .gguf file, a folder or a tokenizer.json"
        )

    @classmethod
    def from_gguf_fields(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata: ``meta`` maps keys (``tokenizer.ggml.tokens`` ...) to plain Python values."""
        kind = meta.get("tokenizer.ggml.model")
        if kind is None or "tokenizer.ggml.tokens" not in meta:
            raise ValueError(
                "the GGUF has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)"
            )
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2') is"
            )
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _BYTE_LEVEL_PRE:
            warnings.warn(
                f"GGUF pre-tokenizer {pre!r} is unknown here; splitting text with GPT-2's regex", stacklevel=2
            )
        backend = _byte_level_bpe_from_gguf(meta)
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if not 0 <= int(i) < len(tokens):
                raise ValueError(
                    f"tokenizer.ggml.{key} = {i} is outside the vocabulary of {len(tokens)} tokens"
                )
            return _respell(tokens[int(i)], set(_bytes_to_unicode().values()))

        bos = token("bos_token_id")
        add_bos = False
        if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
            backend.post_processor = _bos_post_processor(bos, backend.token_to_id(bos))
            add_bos = True
        return cls(
            backend,
            bos_token=bos,
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=add_bos,
            # llama.cpp also ends generation at the end-of-turn and end-of-message tokens
            extra_eos_token_ids=_token_ids(
                [meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
            ),
        )

    @classmethod
    def _from_hf(cls, folder: Path, tokenizer_json: Path) -> Tokenizer:
        try:
            backend = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"cannot read {tokenizer_json}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json") or _read_json(
            folder / "special_tokens_map.json"
        )
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of named "
                f"templates, not {type(template).__name__}"
            )
        names = {k: _special(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        model_config = _read_json(folder / "config.json")
        for name in (
            "bos_token",
            "eos_token",
        ):  # a folder without tokenizer_config: fall back to config.json ids
            tid = model_config.get(f"{name}_id")
            tid = tid[0] if isinstance(tid, list) and tid else tid
            if names[name] is None and isinstance(tid, int):
                names[name] = backend.id_to_token(tid)
        return cls(
            backend,
            chat_template=template,
            add_bos_token=bool(config.get("add_bos_token", False)),
            extra_eos_token_ids=_generation_eos_ids(folder, model_config),
            **names,
        )

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``; ``from_file(folder)`` (and transformers) load it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.tokens,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    # ---- ids ----
    def _token_id(self, name: str) -> int | None:
        token = self.tokens[name]
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def extra_eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation besides ``eos_token_id`` (sorted, inside the vocabulary): those the
        model folder's generation_config.json (else config.json) names as ``eos_token_id``, or a GGUF's
        end-of-turn / end-of-message tokens."""
        return self._extra_eos

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        self.check_ids([token_id])
        token = self._backend.id_to_token(token_id)
        if token is None:  # a hole in a sparse vocabulary
            raise ValueError(f"token id {token_id} has no token")
        return token

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for, whole even where they are part of a UTF-8 character
        (its decoded text is then U+FFFD): OpenAI's logprob `bytes`, which clients join to rebuild the
        text. Special tokens give their text."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        token = self.id_to_token(token_id)
        special = token_id in self.special_ids()
        if (
            not special
            and isinstance(self._backend.decoder, decoders.ByteLevel)
            and set(token) <= _BYTE_OF.keys()
        ):
            raw = bytes(_BYTE_OF[c] for c in token)
        elif not special and (m := _BYTE_FALLBACK.fullmatch(token)) is not None:  # SentencePiece's <0xHH>
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = self.decode([token_id]).encode("utf-8", "surrogatepass")
        self._token_bytes[token_id] = raw
        return raw

    def byte_token_ids(self, data: bytes) -> list[int] | None:
        """The ids of the single-byte tokens that spell `data` byte by byte (None where the vocabulary has
        no such tokens)."""
        if isinstance(self._backend.decoder, decoders.ByteLevel):
            spelling = _bytes_to_unicode()
            ids = [self._backend.token_to_id(spelling[b]) for b in data]
        else:  # SentencePiece's byte fallback
            ids = [self._backend.token_to_id(f"<0x{b:02X}>") for b in data]
        return None if None in ids else [int(i) for i in ids if i is not None]

    def incomplete_tail(self, ids: Sequence[int]) -> bytes:
        """The bytes of the UTF-8 character `ids` end inside of (their last token(s) are part of its bytes),
        b"" where they end at a character boundary or those bytes cannot be spelled as byte tokens."""
        if not ids or self.token_bytes(ids[-1])[-1:] < b"\x80":  # ASCII (or nothing) last: the usual case
            return b""
        data = b""
        for tid in reversed(ids[-3:]):  # an incomplete character has at most 3 bytes
            data = self.token_bytes(tid) + data
            if len(data) >= 3:
                break
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        utf8.decode(data[-3:])
        tail: bytes = utf8.getstate()[0]  # the bytes held as the start of a character
        return tail if tail and self.byte_token_ids(tail) is not None else b""

    def special_texts(self) -> list[str]:
        """The text of every special (control) token, longest first."""
        if self._special_texts is None:
            added = self._backend.get_added_tokens_decoder()
            self._special_texts = sorted(
                {added[i].content for i in self.special_ids()}, key=len, reverse=True
            )
        return self._special_texts

    def special_pattern(self) -> re.Pattern[str]:
        """Matches the spelling of any special token (the longest where several begin at one place)."""
        if self._special_pattern is None:
            self._special_pattern = re.compile("|".join(map(re.escape, self.special_texts())) or "(?!)")
        return self._special_pattern

    def has_special_text(self, text: str) -> bool:
        """Whether `text` spells a special token, which encode() would turn into that token."""
        return any(special in text for special in self.special_texts())

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: a special token's spelling is tokenized as the characters
        it is made of, not as the control token (a chat message's text cannot open or close a turn)."""
        if self._plain_backend is None:
            plain = HFTokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    def special_ids(self) -> set[int]:
        """The ids of the special (control) tokens."""
        if self._specials is None:
            self._specials = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        return self._specials

    @property
    def max_chars_per_token(self) -> int | None:
        """An upper bound on the characters of text one token stands for, so that a text of C
        characters has at least C / bound tokens (None when a normalizer could delete characters and
        no such bound holds). Token strings are byte-level or metaspace forms of their text, never
        shorter in UTF-8 bytes than the text they decode to in characters."""
        if self._max_chars_per_token is False:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            bound = max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)
            self._max_chars_per_token = None if self._backend.normalizer is not None else max(bound, 1)
        return self._max_chars_per_token  # type: ignore[return-value]

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise ValueError naming the first id outside the vocabulary (`tokenizers` would drop it silently)."""
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{n - 1})")

    # ---- text ----
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it (``<|im_start|>``) become single ids.

        ``add_special_tokens`` adds BOS only where the model asks for it (SmolLM2 does not).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self.check_ids(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False, lead: bytes = b"") -> IncrementalDecoder:
        """lead: the bytes of an incomplete character the stream may continue (`incomplete_tail` of a
        prompt): a character the stream's first bytes complete is part of its first text; a lead they do not
        complete is left out (`lead_dropped`)."""
        return IncrementalDecoder(
            self, skip_special_tokens, (self.byte_token_ids(lead) or []) if lead else []
        )

    # ---- chat ----
    def compile_chat_template(self) -> None:
        """Compile the chat template now (it is compiled on first use otherwise); ValueError if it does
        not compile."""
        if self._template is None:
            try:
                self._template = _compile_template(self.chat_template or CHATML_TEMPLATE)
            except ValueError:
                raise
            except Exception as e:  # jinja's compiler can trip on what its parser let through
                raise ValueError(f"the chat template does not compile: {type(e).__name__}: {e}") from e

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
    ) -> str:
        """Render a conversation to the prompt text; any failure of the template is a ValueError."""
        self.compile_chat_template()
        assert self._template is not None
        context = {
            "messages": _plain_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "documents": None,
            **self.tokens,
        }
        try:
            return "".join(_bounded(self._template.generate(**context)))
        except ValueError:
            raise
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from e
        except Exception as e:  # a template can trip any Python error (TypeError on str + list, ...)
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from e


def _bounded(chunks: Iterator[str]) -> Iterator[str]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_RENDERED_CHARS:
            raise ValueError(f"the chat template rendered more than {MAX_RENDERED_CHARS} characters")
        yield chunk


_MAX_INCOMPLETE_IDS = 8


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    As vLLM's ``detokenize_incrementally``: keep a short window of ids that starts where earlier text
    was complete; each push decodes the window with and without the ids already emitted and returns
    the difference. Trailing U+FFFD (a character whose bytes have not all arrived) is held back until
    later tokens complete it; the text before it is emitted at once. Each push costs O(window), not
    O(all tokens). The pieces of all pushes plus ``flush()`` join to ``tokenizer.decode(all_ids)``.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, lead: Sequence[int] = ()
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # ids from the last character boundary on; `lead` (byte tokens of a character that the stream
        # completes) is pending text, so it comes out with the first push that completes it
        self._window: list[int] = list(lead)
        self._lead = len(lead)  # until the first text: then whether the output completed the character
        self.lead_dropped = False  # it did not: the lead's bytes were left out of the text
        self._read = 0  # window[:read] is text emitted before the boundary moved; window[read:] is pending
        self._sent = 0  # characters of the pending text already emitted (those before a held character)

    def _pending_text(self) -> str:
        prefix = self._tok._backend.decode(self._window[: self._read], skip_special_tokens=self._skip)
        full = self._tok._backend.decode(self._window, skip_special_tokens=self._skip)
        return full[len(prefix) :] if len(full) > len(prefix) else ""

    def _advance(self, text: str) -> str:
        # The pending ids become the next window's prefix: they give the decoder its left context.
        piece = text[self._sent :]
        self._window = self._window[self._read :]
        self._read, self._sent = len(self._window), 0
        return piece

    def push(self, token_ids: Sequence[int]) -> str:
        """New complete text since the last push ("" while only an incomplete character arrived)."""
        ids = [int(i) for i in token_ids]
        self._tok.check_ids(ids)
        self._window.extend(ids)
        text = self._pending_text()
        if self._lead and text.rstrip("\ufffd"):
            text = self._settle_lead(text)
        # A character is at most 4 bytes: ids still incomplete after that many are not UTF-8 and never
        # will be; emitting them (as U+FFFD) keeps the window, and each push's cost, bounded.
        if not text.endswith("\ufffd") or len(self._window) - self._read > _MAX_INCOMPLETE_IDS:
            return self._advance(text)
        # Characters before the incomplete one cannot change as more bytes arrive.
        complete = text.rstrip("\ufffd")
        piece = complete[self._sent :]
        self._sent = max(self._sent, len(complete))
        return piece

    def _settle_lead(self, text: str) -> str:
        """At the first text after a lead: if the output's bytes did not complete the lead's character, the
        lead stays the prompt's (its U+FFFD is not the output's text) and is dropped from the window."""
        own = self._tok._backend.decode(self._window[self._lead :], skip_special_tokens=self._skip)
        if text.endswith(own) and not text[: len(text) - len(own)].strip("\ufffd"):
            self._window = self._window[self._lead :]
            self.lead_dropped = True
            text = own
        self._lead = 0
        return text

    def flush(self) -> str:
        """The text still held back at the end of the stream (an incomplete character shows as U+FFFD)."""
        return self._advance(self._pending_text())
