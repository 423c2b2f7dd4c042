"""Operations (issue #20): security defaults, request ids, logs, metrics, the dashboard."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from model.tokenizer import Tokenizer
from server.__main__ import warn_if_exposed
from server.app import create_app
from server.logs import configure_logging, stats_logging
from server.settings import Settings
from tests.server.conftest import FakeEngine, fake_settings, free_port, tiny_engine, tiny_settings

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
        ("GET", "/dashboard", None),
        ("GET", "/dashboard/data", None),
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


# ---- request ids -----------------------------------------------------------------------------------------


async def test_request_id_echoed_and_used_in_response_ids(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    r = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "req-42.a"})
    assert r.headers["x-request-id"] == "req-42.a" and r.json()["id"] == "cmpl-req-42.a"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    r = await client.post("/v1/chat/completions", json=chat, headers={"X-Request-Id": "abc"})
    ids = {json.loads(line[6:])["id"] for line in r.text.splitlines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-abc"}


@pytest.mark.parametrize("sent", [None, "", "x" * 129, "bad id", "a\u00e9", "line\nbreak"])
async def test_request_id_generated_when_absent_or_unsafe(
    client: httpx.AsyncClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-Id": sent.encode("utf-8")}
    r = await client.get("/health", headers=headers)  # type: ignore[arg-type]
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    other = await client.get("/health", headers=headers)  # type: ignore[arg-type]
    assert other.headers["x-request-id"] != r.headers["x-request-id"]


async def test_a_request_id_still_running_is_a_400_naming_the_header(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.delay = 0.02
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20}
    first = asyncio.ensure_future(client.post("/v1/completions", json=body, headers={"X-Request-Id": "dup"}))
    while not fake_engine.running:
        await asyncio.sleep(0.005)
    r = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "dup"})
    error = r.json()["error"]
    assert r.status_code == 400 and "X-Request-Id" in error["message"] and error["param"] is None
    assert (await first).status_code == 200
    # whatever the endpoint or the number of prompts; and ids that only look like a choice's never collide
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    two = {**body, "prompt": ["a", "b"], "n": 2}
    for running, second, second_path, collide in (
        (two, body, "/v1/completions", True),
        (body, chat, "/v1/chat/completions", True),
        (two, body, "/v1/completions", False),
    ):
        rid = "s3"
        first = asyncio.ensure_future(
            client.post("/v1/completions", json=running, headers={"X-Request-Id": rid})
        )
        while not fake_engine.running:
            await asyncio.sleep(0.005)
        other = rid if collide else f"{rid}-p0-0"
        r = await client.post(second_path, json=second, headers={"X-Request-Id": other})
        assert r.status_code == (400 if collide else 200), (running, second, r.text)
        assert (await first).status_code == 200


async def test_request_id_on_errors_and_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", content=b"x" * 100_000, headers={"X-Request-Id": "big"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "big"
    r = await client.post("/v1/completions", json={"prompt": 5}, headers={"X-Request-Id": "bad"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "bad"


# ---- logs ------------------------------------------------------------------------------------------------


@contextmanager
def captured_logs(log_format: str) -> Iterator[io.StringIO]:
    """The root logger's handler as configure_logging builds it, writing to a buffer. uvicorn's loggers
    are reset to propagate, as in a fresh `python -m server` (other tests' uvicorn set their handlers and levels)."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    uvicorn_loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved_uvicorn = [(lg.handlers[:], lg.propagate, lg.level) for lg in uvicorn_loggers]
    for lg in uvicorn_loggers:
        lg.handlers, lg.propagate = [], True
        lg.setLevel(logging.NOTSET)
    configure_logging("info", log_format)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for lg, (handlers, propagate, level) in zip(uvicorn_loggers, saved_uvicorn, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


@contextmanager
def serving(app: Any, access_log: bool = True) -> Iterator[str]:
    """`app` under a real uvicorn (in a thread) on 127.0.0.1, as `python -m server` runs it."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=access_log)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("access_log", [True, False])
def test_json_logs_carry_the_request_id(
    fake_engine: FakeEngine, tokenizer: Tokenizer, access_log: bool
) -> None:
    app = create_app(fake_settings(stats_log_interval=0), engine=fake_engine, tokenizer=tokenizer)
    with captured_logs("json") as buffer, serving(app, access_log=access_log) as url:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": "trace-1"})
        assert r.status_code == 200
        logging.getLogger("server").info("outside any request")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    if access_log:
        [line] = access
        assert line["request_id"] == "trace-1" and "POST /v1/completions" in line["message"]
    else:
        assert access == []
    [outside] = [line for line in lines if line["message"] == "outside any request"]
    assert "request_id" not in outside


def test_text_log_lines_tag_the_request_id() -> None:
    from server.logs import _request_id

    with captured_logs("text") as buffer:
        logging.getLogger("server").info("idle")
        token = _request_id.set("r-7")
        logging.getLogger("server").info("busy")
        _request_id.reset(token)
    idle, busy = buffer.getvalue().splitlines()
    assert idle.endswith("INFO server: idle") and busy.endswith("INFO server [r-7]: busy")


def test_stats_line() -> None:
    from server.logs import _Totals, stats_line

    before, now = _Totals(0.0, 100, 50, 80, 20), _Totals(2.0, 300, 250, 180, 70)
    stats = {"num_running": 3, "num_waiting": 1, "kv_cache_usage": 0.25}
    line = stats_line(stats, before, now)
    assert line == (
        "engine: prompt 100.0 tokens/s, generation 100.0 tokens/s, running 3, waiting 1, KV cache 25.0%, "
        "prefix cache hit rate 50.0%"
    )
    assert stats_line({"num_running": 0, "num_waiting": 0}, before, before) is None
    # a restarted engine core counts from zero again: its rates are not negative
    restarted = _Totals(4.0, 40, 20, 10, 5)
    assert stats_line(stats, now, restarted) == (
        "engine: prompt 20.0 tokens/s, generation 10.0 tokens/s, running 3, waiting 1, KV cache 25.0%, "
        "prefix cache hit rate 50.0%"
    )


async def test_stats_logged_periodically_while_busy(caplog: pytest.LogCaptureFixture) -> None:
    generated = 0
    busy = True

    def stats() -> dict[str, Any]:
        nonlocal generated
        generated += 10 if busy else 0
        return {"num_running": int(busy), "num_generation_tokens": generated}

    with caplog.at_level(logging.INFO, logger="server.stats"):
        async with stats_logging(stats, 0.01):
            await asyncio.sleep(0.1)
            busy = False
            count = len(caplog.records)
            await asyncio.sleep(0.1)
    assert count >= 3 and "generation" in caplog.records[0].getMessage()
    assert len(caplog.records) <= count + 2  # idle: at most the intervals that saw the last tokens


# ---- metrics ---------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_http_requests_counted_by_route_method_status(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    await client.post("/v1/completions", json=body)
    await client.post("/v1/completions", json={**body, "model": "other"})
    await client.get("/no/such/path/123")
    await client.post("/v1/completions", content=b"x" * 100_000)  # a 413, answered before routing
    await client.get("/docs")
    samples = _samples((await client.get("/metrics")).text)

    def count(handler: str, method: str, status: str) -> float:
        labels = frozenset({"handler": handler, "method": method, "status": status}.items())
        return samples.get(("smollm2:http_requests_total", labels), 0.0)

    assert count("/v1/completions", "POST", "200") == 1
    assert count("/v1/completions", "POST", "404") == 1
    assert count("unmatched", "GET", "404") == 1
    assert count("/v1/completions", "POST", "413") == 1 and count("/docs", "GET", "200") == 1
    assert not any("123" in str(key) for key in samples)


async def test_made_up_http_methods_share_one_label(client: httpx.AsyncClient) -> None:
    """HTTP takes any token as a method: a scanner's inventions must not each make a new series."""
    for i in range(20):
        await client.request(f"M{i:05d}", "/health")
    samples = _samples((await client.get("/metrics")).text)
    methods = {dict(labels)["method"] for name, labels in samples if name == "smollm2:http_requests_total"}
    assert "other" in methods and not any(m.startswith("M0") for m in methods)
    assert sum(v for (name, labels), v in samples.items() if dict(labels).get("method") == "other") == 20


async def test_every_engine_metric_has_the_model_name(fake_engine: FakeEngine, tokenizer: Tokenizer) -> None:
    app = create_app(fake_settings(served_model_name="my-model"), engine=fake_engine, tokenizer=tokenizer)
    async for c in _client(app):
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        samples = _samples((await c.get("/metrics")).text)
    names = {
        name
        for name, labels in samples
        if name.startswith("smollm2:") and not name.startswith("smollm2:http_")
    }
    assert len(names) > 30  # sample names: gauges, counters, buckets, sums and counts
    for name, labels in samples:
        if name in names:
            assert ("model_name", "my-model") in labels, name
    [info] = [dict(labels) for name, labels in samples if name == "smollm2:cache_config_info"]
    assert info["block_size"] == "16" and info["max_model_len"] == "256" and info["num_blocks"] == ""


async def test_cache_config_names_the_real_engine_blocks(tiny_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, engine = tiny_client
    samples = _samples((await client.get("/metrics")).text)
    [info] = [dict(labels) for name, labels in samples if name == "smollm2:cache_config_info"]
    assert int(info["num_blocks"]) == engine.info.num_blocks > 0


def test_recent_samples_percentiles() -> None:
    from server.metrics import RecentSamples

    recent = RecentSamples(window=10.0)
    assert recent.percentiles([0.5]) == [None]
    for i in range(100):
        recent.add(float(i + 1), now=100.0)
    assert recent.percentiles([0.5, 0.9, 0.99], now=105.0) == [50.0, 90.0, 99.0]
    assert recent.percentiles([0.5], now=111.0) == [None]  # all older than the window


def test_a_model_that_cannot_be_served_stops_the_start_with_one_line_that_says_why(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """An operator's model folder with a broken file: exit 3 at start-up and the file named, not a page of
    tracebacks from both processes (--log-level debug still shows where it failed)."""
    broken = tmp_path / "model"
    tokenizer.save(broken)
    (broken / "config.json").write_text("{'hidden_size': 576}")  # Python, not JSON
    for model, says in ((tmp_path / "absent", "not found"), (broken, "config.json: JSONDecodeError")):
        done = subprocess.run(
            [sys.executable, "-m", "server", "--model", str(model), "--port", str(free_port())],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
        assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert errors and all(str(model) in line for line in errors), errors
        assert any(says in line for line in errors), errors
        assert any("cannot start the server" in line for line in errors), errors


async def test_the_chat_template_is_checked_at_start(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A model's template that does not compile, or runs away, stops the start with the reason; one
    that only refuses the check's conversation is warned of (chat requests get its 400s, completions
    still work)."""
    from server.app import check_chat_template

    def use(template: str) -> None:
        monkeypatch.setattr(tokenizer, "chat_template", template)
        monkeypatch.setattr(tokenizer, "_template", None)

    use("{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        await check_chat_template(tokenizer)
    # a render of ~0.6 s here (its thread cannot be stopped, so not a runaway one in a test)
    use("{% for i in range(100000) %}{% for j in range(200) %}{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="within 0.1 s"):
        await check_chat_template(tokenizer, timeout=0.1)
    use("{{ raise_exception('a system message must come first') }}")
    with caplog.at_level(logging.WARNING, logger="server"):
        await check_chat_template(tokenizer)
    assert "a system message must come first" in caplog.text
    monkeypatch.undo()
    await check_chat_template(tokenizer)


def test_a_chat_template_that_is_not_text_is_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": 42}))
    with pytest.raises(ValueError, match="chat_template must be a string"):
        Tokenizer.from_file(tmp_path)


# ---- the dashboard ---------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, profile: Path) -> dict[str, str]:
    """The page as headless Chromium renders it after a few seconds of (virtual) time: id -> text."""
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom"]  # fmt: skip
    done = subprocess.run([CHROMIUM, *flags, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(re.findall(r'id="([a-z0-9-]+)"[^>]*>([^<]*)<', done.stdout))


async def test_dashboard_page_and_data(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    external = re.findall(r"(?:src|href)=\"([^\"]*)\"|(https?://[^\s\"']+)", page.text)
    assert {u for pair in external for u in pair if u} <= {"http://www.w3.org/2000/svg"}  # no CDN
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
    data = (await client.get("/dashboard/data")).json()
    assert data["model"] == MODEL and data["healthy"] and data["generation_tokens_total"] == 4
    assert data["generation_tokens_per_s"] > 0 and data["ttft_s"]["p50"] is not None
    assert set(data["itl_s"]) == {"p50", "p90", "p99"}


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)"
)
def test_dashboard_renders_live_values_in_chromium(tokenizer: Tokenizer, tmp_path: Path) -> None:
    settings = tiny_settings(stats_log_interval=0)
    engine = tiny_engine(tokenizer, settings)  # started and stopped by the app, on uvicorn's loop
    app = create_app(settings, engine=engine, tokenizer=tokenizer)
    with serving(app, access_log=False) as url:
        before = dump_dom(f"{url}/dashboard", tmp_path / "profile")
        assert before["model"] == MODEL and before["status"] == "healthy", before
        assert before["gen-total"] == "0" and before["ttft-p50"] == "\u2013"
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 16, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body).status_code, range(4))
            )
        assert codes == [200] * 4
        after = dump_dom(f"{url}/dashboard", tmp_path / "profile")
    assert after["gen-total"] == "64", after
    assert after["ttft-p50"].endswith(" ms") and after["itl-p99"].endswith(" ms"), after
    assert float(after["gen-tps"]) > 0 and after["kv"].endswith("%"), after
