"""kmock's in-memory Kubernetes API emulator served on 127.0.0.1 for tests (the driver and the sweep
submitter talk to it with the real ``kubernetes`` client)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kmock
from kubernetes import client


class Emulator:
    """kmock's KubernetesEmulator on 127.0.0.1, served from its own event loop in a thread (the
    driver is synchronous code)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[kmock.KubernetesEmulator, kmock.Server]:
            handler = kmock.KubernetesEmulator()
            await handler.__aenter__()
            server = kmock.Server(handler)
            await server.__aenter__()
            return handler, server

        self.handler, self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        # Resources that may be listed before any object of theirs exists.
        self.handler.resources["v1/pods"] = {}
        self.handler.resources["batch/v1/jobs"] = {}
        self.url = str(self.server.url).rstrip("/")

    def api_client(self, user_agent: str) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        api = client.ApiClient(configuration)
        api.user_agent = user_agent
        return api

    def requests_from(self, user_agent: str) -> list[Any]:
        return [r for r in list(self.handler) if r.headers.get("User-Agent") == user_agent]

    def close(self) -> None:
        async def stop() -> None:
            await self.server.__aexit__(None, None, None)
            await self.handler.__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
