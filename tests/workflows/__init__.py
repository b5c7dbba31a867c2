"""CodeWords workflows as their users write them: FastAPI apps, served here by uvicorn.

The runtime runs each workflow as a FastAPI app behind its gateway; the emulator does the same
with these (``FakeRuntime(workflows={service_id: url})``). ``serve(app)`` starts one in this
process, on a port of 127.0.0.1 that the system picks, and stops it at the end of the block.
"""

import contextlib
import socket
import threading
from typing import Any, Iterator

import uvicorn


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them: no race at start
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="workflow", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
