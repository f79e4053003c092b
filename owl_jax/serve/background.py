"""An app served by uvicorn on a thread of this process (tests, benchmarks, notebooks):

    with BackgroundServer(app) as server:
        requests.get(server.url + "/health")
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None,
                 start_timeout: float = 120.0):
        self.host, self.port = host, port or free_port(host)
        # uvicorn leaves signals alone when it runs off the main thread
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port,
                                             log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
