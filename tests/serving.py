"""`bumblecore serve` in-process, for tests and benchmarks (bench/ imports it from here): a server
in a background thread of this process, a free port for one, and a wait until one is healthy."""

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from bumblecore.inference.serve import BumbleServer
from bumblecore.inference.serve_settings import ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model_path: str, port: Optional[int] = None, startup_timeout: float = 180, **options
) -> Iterator[str]:
    """Serve from a background thread of this process; yields the base URL and shuts everything
    down (HTTP server, worker process) on exit. `options` are ServeSettings fields."""
    port = port or free_port()
    server = BumbleServer(ServeSettings(model_path, **options))
    thread = threading.Thread(
        target=server.run,
        name="bumblecore-serve",
        daemon=True,
        kwargs=dict(host=server.settings.host, port=port, log_level="warning"),
    )
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, thread.is_alive, startup_timeout)
        yield url
    finally:
        server.stop()
        thread.join(timeout=30)


def wait_until_healthy(url: str, alive, timeout: float) -> None:
    """Poll {url}/health until it answers 200 (the model is loaded); fail early if `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if not alive():
            raise RuntimeError("the server stopped while starting; see its log above")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not become healthy within {timeout} s")
        time.sleep(0.2)


def xgrammar_or_skip():
    """jsonschema (the validator of every constrained reply), after skipping the calling test (or module)
    when xgrammar, the `structured` extra's grammar engine, is not installed."""
    import pytest

    pytest.importorskip("xgrammar")
    return pytest.importorskip("jsonschema")
