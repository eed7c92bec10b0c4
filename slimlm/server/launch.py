"""Run the app with uvicorn: in the foreground (`slimlm serve`) or on a background thread (tests, scripts)."""

from __future__ import annotations

import signal
import socket
import threading
import time

from slimlm.errors import SlimlmError


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a taken port is a clear error and port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SlimlmError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=False)
    return uvicorn.Server(config)


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stops it gracefully).

    The engine's step loop runs on this (the main) thread and uvicorn's asyncio loop on another:
    decode steps from a second thread were about a third slower (AsyncEngine.run_here)."""
    engine = getattr(app.state, "engine", None)
    if not hasattr(engine, "run_here"):
        _uvicorn_server(app, log_level).run(sockets=[sock])
        return
    server = _uvicorn_server(app, log_level)
    # off the main thread uvicorn installs no signal handlers: Ctrl-C reaches this thread, SIGTERM too
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="slimlm-uvicorn", daemon=True
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        engine.run_here(until=lambda: not thread.is_alive(), on_start=thread.start)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.shutdown()  # requests still running end with an error event, then uvicorn drains
        while thread.is_alive():
            try:
                thread.join(timeout=0.5)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for open connections
                server.force_exit = True
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class ServerThread:
    """uvicorn on a background thread, on a free loopback port unless told otherwise.

    with ServerThread(create_app(llm)) as server:
        OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="slimlm-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
