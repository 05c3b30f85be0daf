"""A TCP server on 127.0.0.1 running its own event loop in a thread: the base of the test fault proxies."""

from __future__ import annotations

import asyncio
import threading


class LoopThreadServer:
    """Serves `_handle(reader, writer)` on an ephemeral 127.0.0.1 port from a daemon thread, so tests
    and daemons in other threads/processes can use it; close() stops it and every handler."""

    def __init__(self, name: str, limit: int) -> None:
        self._limit = limit
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.port: int = self._port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _before_shutdown(self) -> None:
        """Runs in the loop before the handlers are cancelled (e.g. to reset open connections)."""

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, limit=self._limit))
        self._port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        # A connection accepted in the loop's last turn may have started a handler after _shutdown.
        late = asyncio.all_tasks(self._loop)
        for task in late:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*late, return_exceptions=True))
        self._loop.close()

    def _stop(self) -> None:
        self._loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        self._server.close()
        self._before_shutdown()
        # Cancelled handlers may start more tasks as they unwind: repeat until none is left.
        while tasks := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()
