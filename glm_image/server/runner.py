"""uvicorn in a background thread on a loopback port: for tests and the load benchmark.

The real server stack (uvicorn, the lifespan, sockets) runs; only the process is shared, so a
test can reach into ``app.state`` to hold the engine or read the queue.
"""

from __future__ import annotations

import threading
import time

__all__ = ["ServerThread"]


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on 127.0.0.1 and a free port until exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.host, self.startup_timeout = host, startup_timeout
        self.thread = threading.Thread(target=self.server.run, name="glm-image-server", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
