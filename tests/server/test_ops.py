"""Operations (issue #20): security defaults, request ids, logs, metrics, the dashboard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.tokenizer import Tokenizer
from server.__main__ import warn_if_exposed
from server.app import create_app
from server.settings import Settings
from tests.server.conftest import FakeEngine, fake_settings

MODEL = "SmolLM2-135M-Instruct"


async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            yield c


@pytest.fixture
async def protected(fake_engine: FakeEngine, tokenizer: Tokenizer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        fake_settings(api_key="sekrit", protect_all=True), engine=fake_engine, tokenizer=tokenizer
    )
    async for c in _client(app):
        yield c


# ---- security defaults ---------------------------------------------------------------------------------


async def test_models_root_shows_no_path(fake_engine: FakeEngine, tokenizer: Tokenizer) -> None:
    settings = fake_settings(model="/home/someone/models/SmolLM2.Q4_1.gguf")
    async for c in _client(create_app(settings, engine=fake_engine, tokenizer=tokenizer)):
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["root"] == "SmolLM2.Q4_1.gguf" and "/" not in card["root"]
    async for c in _client(create_app(fake_settings(), engine=fake_engine, tokenizer=tokenizer)):
        assert (await c.get("/v1/models")).json()["data"][0]["root"] == MODEL


def test_api_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sekrit\n")
    assert Settings.from_args(["--api-key-file", str(key_file)], env={}).api_key == "sekrit"
    env = {"SMOLLM2_API_KEY_FILE": str(key_file)}
    settings = Settings.from_args([], env=env)
    assert settings.api_key == "sekrit" and "sekrit" not in repr(settings)
    with pytest.raises(ValueError, match="not both"):
        Settings(api_key="other", api_key_file=str(key_file))
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api_key_file=str(tmp_path / "missing"))


@pytest.mark.parametrize("argv", [["--api-key", ""], ["--api-key", "  "], ["--api-key-file", "EMPTY"]])
def test_empty_api_key_is_an_error(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    with pytest.raises(ValueError, match="empty"):
        Settings.from_args(argv, env={})
    with pytest.raises(ValueError, match="empty"):
        Settings.from_args([], env={"SMOLLM2_API_KEY": ""})


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("example.org", None, True), ("0.0.0.0", "k", False),
     ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)],
)  # fmt: skip
def test_warning_when_exposed_without_key(
    host: str, key: str | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="server"):
        warn_if_exposed(Settings(host=host, api_key=key))
    assert any("WITHOUT AN API KEY" in r.getMessage() for r in caplog.records) == warned


async def test_protect_all_guards_side_routes(protected: httpx.AsyncClient) -> None:
    auth = {"Authorization": "Bearer sekrit"}
    for method, path, body in [
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
        ("GET", "/metrics", None),
    ]:
        assert (await protected.request(method, path, json=body)).status_code == 401, path
        assert (await protected.request(method, path, json=body, headers=auth)).status_code == 200, path
    assert (await protected.get("/health")).status_code == 200


async def test_side_routes_open_by_default(fake_engine: FakeEngine, tokenizer: Tokenizer) -> None:
    app = create_app(fake_settings(api_key="sekrit"), engine=fake_engine, tokenizer=tokenizer)
    async for c in _client(app):
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.post("/tokenize", json={"prompt": "hi"})).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
