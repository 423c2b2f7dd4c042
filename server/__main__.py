"""`python -m server` / `smollm2-server`: parse settings, build the app, serve it with uvicorn.

The engine process is spawned and imports this module again (as `__mp_main__`, without running
main()), so the HTTP stack is imported inside main(): the engine process does not pay for it.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from server.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(settings: Settings) -> None:
    """Binding beyond this machine with no key lets anyone who can reach the port use the model."""
    if settings.api_key is None and not is_loopback(settings.host):
        logging.getLogger("server").warning(
            "LISTENING ON %s WITHOUT AN API KEY: anyone who can reach port %d can use this server; "
            "set --api-key-file (or --api-key), or bind 127.0.0.1",
            settings.host,
            settings.port,
        )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = Settings.from_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("server").info("settings: %r", settings)  # Settings.__repr__ masks the API key
    warn_if_exposed(settings)
    from server.connections import MIN_FDS, raise_fd_limit

    fd_limit = raise_fd_limit()
    if fd_limit < MIN_FDS:
        logging.getLogger("server").error(
            "cannot start the server: the open-file limit is %d, and serving needs at least %d (raise it with "
            "`ulimit -n` or the container's nofile limit)", fd_limit, MIN_FDS,
        )  # fmt: skip
        sys.exit(3)
    first_core = None
    if settings.engine_process:  # it imports torch and loads the model while we import the HTTP stack
        from server.core_setup import load_core
        from server.engine.client import spawn_core

        first_core = spawn_core(load_core, (settings,), settings.log_level, settings.log_format)
    import uvicorn

    from server.app import create_app, shutdown_signal
    from server.connections import connection_budget, guarded_protocol

    app = create_app(settings, first_core=first_core, exit_on_start_failure=True)
    max_connections, backlog = connection_budget(settings.max_connections, fd_limit)
    log = logging.getLogger("server")
    log.info("HTTP connections: at most %d (open-file limit %d)", max_connections, fd_limit)
    if max_connections < settings.max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d (raise it with `ulimit -n`)",
            settings.max_connections, max_connections, fd_limit,
        )  # fmt: skip
    protocol = guarded_protocol(
        max_connections, settings.client_timeout, app.state.metrics.connections_closed
    )
    # uvicorn drains on SIGTERM, then re-raises the signal so that its default action ends the process
    # (status 143). A drained shutdown is a clean one: exit 0 instead, unless the engine gave up or a
    # second signal cut the drain short.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(_exit_code(app)))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if shutdown_signal(app, sig):
                super().handle_exit(sig, frame)
            loop, signals = app.state.loop, app.state.shutdown_signals
            if loop is not None and signals <= 2:
                deadline = (settings.shutdown_timeout if signals == 1 else 0.0) + _CLOSE_AFTER_S
                loop.call_soon_threadsafe(loop.call_later, deadline, self.close_connections)

        def close_connections(self) -> None:
            """Past the drain every request has had its ending sent: a connection still open is a client
            that reads nothing or sends a body it never finishes. Closed, its request ends as on a
            disconnect, before uvicorn's timeout would cancel it (a traceback, a plain-text 500)."""
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None and not transport.is_closing():
                    transport.abort()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to ours: one format, request ids included
        access_log=not settings.disable_access_log,
        http=protocol,
        backlog=backlog,
        # On SIGTERM uvicorn stops accepting and waits for the open requests; the engine ends those still
        # running after --shutdown-timeout (shutdown_signal), so uvicorn's own cut comes later, if ever.
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + _SHUTDOWN_MARGIN_S,
    )
    Server(config).run()
    sys.exit(_exit_code(app))


_CLOSE_AFTER_S = 2  # after the drain's deadline: for the requests it ended to send their last bytes
_SHUTDOWN_MARGIN_S = 5  # uvicorn's own cut, after ours


def _exit_code(app: FastAPI) -> int:
    fatal = app.state.fatal_error
    if fatal is not None:
        print(f"error: the engine failed and could not be recovered: {fatal}", file=sys.stderr)
        return 1
    died = getattr(app.state.engine, "died_draining", None)
    if died is not None:  # the requests it was running ended with errors, not their answers
        print(f"error: the engine failed while the server was shutting down: {died}", file=sys.stderr)
        return 1
    forced = app.state.forced_stop
    return 0 if forced is None else 128 + forced  # as a shell reports a process its signal stopped


if __name__ == "__main__":
    main()
