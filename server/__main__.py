"""`python -m server` / `smollm2-server`: parse settings, build the app, serve it with uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.engine.core import LOG_FORMAT
from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = Settings.from_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, force=True)
    logging.getLogger("server").info("settings: %r", settings)  # Settings.__repr__ masks the API key
    app = create_app(settings)
    # uvicorn drains on SIGTERM, then re-raises the signal so that its default action ends the process
    # (status 143). A drained shutdown is a clean one: exit 0 instead, unless the engine gave up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(_exit_code(app)))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # On SIGTERM uvicorn stops accepting and waits this long for open requests before the lifespan
        # shutdown drains the engine.
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
    sys.exit(_exit_code(app))


def _exit_code(app: FastAPI) -> int:
    fatal = app.state.fatal_error
    if fatal is None:
        return 0
    print(f"error: the engine failed and could not be recovered: {fatal}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
