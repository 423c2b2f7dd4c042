"""`GET /dashboard`: one self-contained HTML page (no CDN: it must work on a host with no internet) that
polls `GET /dashboard/data`, a small JSON snapshot of the engine and of the last minutes' latencies."""

from __future__ import annotations

import time
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from server.metrics import ServerMetrics, stats_mapping
from server.routes import check_api_key_if_protected, get_and_head

QUANTILES = (0.5, 0.9, 0.99)
RATE_SECONDS = 10.0  # tokens/s over this many seconds: smooth enough to read, recent enough to follow load

dashboard = APIRouter(dependencies=[Depends(check_api_key_if_protected)], include_in_schema=False)


@cache
def _page() -> str:
    return (files("server") / "static" / "dashboard.html").read_text(encoding="utf-8")


@get_and_head(dashboard, "/dashboard")
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(_page())


@get_and_head(dashboard, "/dashboard/data")
async def dashboard_data(request: Request) -> dict[str, Any]:
    state = request.app.state
    metrics: ServerMetrics = state.metrics
    engine = state.engine
    stats = stats_mapping(engine.stats()) if engine is not None else {}
    return {
        "model": state.settings.served_model_name,
        "time": time.time(),
        "healthy": bool(engine is not None and engine.is_healthy),
        "running": int(stats.get("num_running", 0)),
        "waiting": int(stats.get("num_waiting", 0)),
        "kv_cache_usage": float(stats.get("kv_cache_usage", 0.0)),
        "prompt_tokens_per_s": metrics.recent_prompt_tokens.rate(RATE_SECONDS),
        "generation_tokens_per_s": metrics.recent_generation_tokens.rate(RATE_SECONDS),
        "generation_tokens_total": metrics.generation_tokens_total(),
        "window_s": metrics.recent_ttft.window,
        "ttft_s": _quantiles(metrics.recent_ttft.percentiles(QUANTILES)),
        "itl_s": _quantiles(metrics.recent_itl.percentiles(QUANTILES)),
    }


def _quantiles(values: list[float | None]) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": v for q, v in zip(QUANTILES, values, strict=True)}
