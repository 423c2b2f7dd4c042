"""Which constraint a request asks for: OpenAI's `response_format`, vLLM's `structured_outputs` and its
older `guided_*` names, all turned into one `StructuredSpec` (or a 400 naming the field)."""

from __future__ import annotations

import json
from typing import Any

from server.engine.request import StructuredSpec
from server.protocol import APIError, SamplingFields


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
