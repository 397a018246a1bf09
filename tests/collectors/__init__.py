"""Tests of the server side; :func:`serving` runs the control helper on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from collectors.control import ControlHelper, create_app, make_server, serve


@contextmanager
def serving(helper: ControlHelper) -> Iterator[str]:
    """Run the helper's app under uvicorn, on its guarded loop, in a thread; yield its URL.

    The socket is bound here (port 0) so the URL is known before uvicorn starts.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(create_app(helper), "127.0.0.1", port)
    thread = threading.Thread(target=serve, args=(server, helper, [sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the control helper did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
