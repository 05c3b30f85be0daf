"""A small HTTPS client of the management API (CLI, mobility agent, scale-out process server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from ..core import tls
from ..core.errors import LifeboatError

API_PREFIX = "/api/v1"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024   # a status of many machines fits; a hostile server cannot flood us
DEFAULT_TIMEOUT_SECONDS = 30.0


class ApiCallFailed(LifeboatError):
    """{}"""

    exit_code = 4

    def __init__(self, status: int, code: str, message: str, body: dict | None = None) -> None:
        super().__init__(f"{message} (HTTP {status} {code})" if status else message)
        self.status, self.code, self.message, self.body = status, code, message, body or {}


class ApiClient:
    def __init__(self, url: str, ca_cert: str, token: str = "", timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        if not url.startswith("https://"):
            raise LifeboatError(f"management API URL {url!r} must start with https://")
        self.url = url.rstrip("/")
        self.ssl = tls.client_context(ca_cert)
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds, sock_connect=10)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ApiClient":
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=4), timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.session:
            await self.session.close()
            self.session = None

    async def call(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> Any:
        """One API call; the decoded JSON answer of a 2xx, else ApiCallFailed with the server's message."""
        if self.session is None:
            await self.__aenter__()
        assert self.session is not None
        headers = {}
        tok = self.token if token is None else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        try:
            async with self.session.request(method, self.url + API_PREFIX + path, json=body, headers=headers) as resp:
                raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise ApiCallFailed(resp.status, "too_large", f"answer over {MAX_RESPONSE_BYTES} bytes")
                try:
                    data = json.loads(raw) if raw else {}
                except ValueError:
                    data = {"error": "bad_answer", "message": raw[:200].decode(errors="replace")}
                if resp.status >= 300:
                    if not isinstance(data, dict):
                        data = {}
                    raise ApiCallFailed(resp.status, str(data.get("error", "error")),
                                        str(data.get("message", resp.reason)), data)
                return data
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ApiCallFailed(0, "unreachable", f"cannot reach the management API at {self.url}: "
                                f"{exc or type(exc).__name__}; check --api and that the primary process server "
                                "runs with [control] enabled = true") from None
