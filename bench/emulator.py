"""The emulator in a process of its own, so that its work does not share a GIL with the client measured.

with Emulator() as emulator:
    emulator.url, emulator.storage_url, emulator.api_key
    emulator.get("executions")            # any attribute of the FakeRuntime
    emulator.set("gateway_timeout", 1.0)
"""

import multiprocessing
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _serve(connection: Any) -> None:
    from fake_runtime import FakeRuntime

    with FakeRuntime() as runtime:
        connection.send((runtime.url, runtime.storage_url, runtime.api_key))
        while True:
            command, *arguments = connection.recv()
            if command == "close":
                return
            if command == "get":
                value = getattr(runtime, arguments[0])
                connection.send(dict(value) if isinstance(value, dict) else value)
            elif command == "set":
                setattr(runtime, arguments[0], arguments[1])
                connection.send(None)
            elif command == "calls":
                connection.send(len(runtime.calls_to(*arguments)))
            elif command == "reset":
                with runtime.lock:
                    runtime.calls.clear()
                    runtime.executions.clear()
                connection.send(None)


class Emulator:
    def __init__(self) -> None:
        self._connection, child = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        self.url, self.storage_url, self.api_key = self._connection.recv()

    def get(self, name: str) -> Any:
        self._connection.send(("get", name))
        return self._connection.recv()

    def set(self, name: str, value: Any) -> None:
        self._connection.send(("set", name, value))
        self._connection.recv()

    def calls(self, method: str, prefix: str) -> int:
        self._connection.send(("calls", method, prefix))
        return self._connection.recv()  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._connection.send(("reset",))
        self._connection.recv()

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._connection.send(("close",))
        self._process.join(10)
