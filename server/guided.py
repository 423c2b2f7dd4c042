"""Which constraint a request asks for: OpenAI's `response_format`, vLLM's `structured_outputs` and its
older `guided_*` names, all turned into one `StructuredSpec` (or a 400 naming the field)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.tokenizer import Tokenizer
from server.engine.request import StructuredSpec
from server.protocol import APIError, SamplingFields

if TYPE_CHECKING:
    from server.engine.structured import GrammarCache


def _schema_text(schema: dict[str, Any] | str | bool, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise APIError(400, f"{field} is not valid JSON: {e}", param=field) from e
    if not isinstance(schema, dict | bool):
        raise APIError(400, f"{field} must be a JSON schema (an object)", param=field)
    return json.dumps(schema)


def _response_format(req: SamplingFields) -> list[tuple[StructuredSpec, str]]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [(StructuredSpec("json_object"), "response_format")]
    field = "response_format.json_schema"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400, f"{field}.schema is required when response_format.type is json_schema", param=field
        )
    return [(StructuredSpec("json", _schema_text(fmt.json_schema.schema_, f"{field}.schema")), field)]


def _structured_outputs(req: SamplingFields) -> list[tuple[StructuredSpec, str]]:
    so = req.structured_outputs
    pairs: list[tuple[str, Any, Any]] = [  # (kind, structured_outputs' value, guided_* value)
        ("json", getattr(so, "json_", None), req.guided_json),
        ("regex", getattr(so, "regex", None), req.guided_regex),
        ("choice", getattr(so, "choice", None), req.guided_choice),
        ("grammar", getattr(so, "grammar", None), req.guided_grammar),
    ]
    found: list[tuple[StructuredSpec, str]] = []
    for kind, new, old in pairs:
        for field, value in ((f"structured_outputs.{kind}", new), (f"guided_{kind}", old)):
            if value is None:
                continue
            if kind == "json":
                value = _schema_text(value, field)
            elif kind == "choice":
                value = json.dumps(value)
            found.append((StructuredSpec(kind, value), field))  # type: ignore[arg-type]
    if so is not None and so.json_object:
        found.append((StructuredSpec("json_object"), "structured_outputs.json_object"))
    return found


def structured_spec(req: SamplingFields) -> tuple[StructuredSpec, str] | None:
    """The request's constraint and the field that set it; None when it has none."""
    found = _response_format(req) + _structured_outputs(req)
    if len(found) > 1:
        names = ", ".join(field for _, field in found)
        raise APIError(
            400, f"Only one structured output constraint may be set; got {names}.", param=found[1][1]
        )
    return found[0] if found else None


@dataclass(slots=True)
class _Compile:
    task: asyncio.Future[None]
    waiting: int = 0  # requests awaiting it


class GrammarChecker:
    """Compiles each new constraint once in the server process, so that one that does not compile is a 400
    before anything is queued; the engine compiles it again for itself (server/engine/structured.py).

    A grammar can take seconds to compile (a schema's `"pattern": "a{10000}"` takes ~9 s), so compiles run on
    one thread of their own, never on the pool that tokenizes prompts; requests with the same new constraint
    wait on one compile (dropped before it begins if they all go away), and past MAX_COMPILING distinct
    constraints compiling or waiting to, a new one gets a 429 at once instead of a place in an ever longer
    line. A grammar larger than MAX_GRAMMAR_BYTES compiled is a 400. Only a hash of each spec that compiled is
    kept (not the compiled grammar, ~0.1 MB to tens of MB)."""

    MAX_COMPILING = 8  # distinct constraints compiling or waiting to
    KNOWN_VALID = 4096

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: GrammarCache | None = None  # built at the first structured request
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-check")
        self._valid: OrderedDict[bytes, None] = OrderedDict()
        # compiles in flight by spec hash: a burst of requests with one new schema waits on one compile (and
        # counts once against MAX_COMPILING); touched on the event loop only
        self._inflight: dict[bytes, _Compile] = {}

    async def check(self, spec: StructuredSpec, field: str) -> None:
        """Return once `spec` compiles; APIError 400 naming `field` if it does not, 429 if too many
        constraints are compiling already."""
        key = hashlib.sha256(f"{spec.kind}\0{spec.source}".encode()).digest()
        if key in self._valid:
            self._valid.move_to_end(key)
            return
        entry = self._inflight.get(key)
        if entry is None:
            if len(self._inflight) >= self.MAX_COMPILING:
                raise APIError(
                    429,
                    f"{len(self._inflight)} structured-output constraints are being compiled; retry shortly",
                    "rate_limit_error",
                    param=field,
                )
            task = asyncio.get_running_loop().run_in_executor(self._pool, self._compile, spec)
            entry = self._inflight[key] = _Compile(task)
            task.add_done_callback(functools.partial(self._compiled, key, entry))
        entry.waiting += 1
        try:
            await asyncio.shield(entry.task)  # one client going away does not cancel the others' compile
        except ValueError as e:
            raise APIError(400, f"Invalid {field}: {e}", param=field) from e
        except asyncio.CancelledError:
            if entry.waiting == 1:  # the last one waiting for it went away: a compile not begun is dropped
                self._forget(key, entry)  # (and one under way no longer counts: a new request starts anew)
                entry.task.cancel()
            raise
        finally:
            entry.waiting -= 1

    def _forget(self, key: bytes, entry: _Compile) -> None:
        if self._inflight.get(key) is entry:
            del self._inflight[key]

    def _compiled(self, key: bytes, entry: _Compile, task: asyncio.Future[None]) -> None:
        self._forget(key, entry)
        if task.cancelled() or task.exception() is not None:  # (which also marks the exception retrieved)
            return
        self._valid[key] = None
        while len(self._valid) > self.KNOWN_VALID:
            self._valid.popitem(last=False)

    def _compile(self, spec: StructuredSpec) -> None:
        from server.engine.structured import (  # xgrammar: ~0.7 s
            MAX_GRAMMAR_BYTES,
            GrammarCache,
            tokenizer_info,
        )

        if self._cache is None:  # only this pool's one thread gets here
            self._cache = GrammarCache(tokenizer_info(self.tokenizer))
        size = self._cache.compile(spec).memory_size_bytes
        if size > MAX_GRAMMAR_BYTES:
            raise ValueError(
                f"it compiles to a grammar of {size / 2**20:.1f} MiB; the limit is {MAX_GRAMMAR_BYTES / 2**20:g} MiB "
                "(a long enum or choice list is the usual cause)"
            )
