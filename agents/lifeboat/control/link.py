"""Agent credentials at the ingest: checked in the local store (primary) or by the primary's API (scale-out)."""

from __future__ import annotations

import hashlib
import time

from ..core import logging as log
from ..core.config import ControlConfig, resolve_credential
from ..core.errors import ConfigError
from ..process_server.ingest import CredentialRefused
from . import auth
from .client import ApiCallFailed, ApiClient

logger = log.get("lifeboat.control.link")
MAX_CACHED_CREDENTIALS = 4096


def agent_machine(principal: auth.Principal) -> str:
    if principal.kind != "agent":
        raise CredentialRefused(403, "forbidden", f"{principal} is not an agent credential: the ingest takes the "
                                "machine credential from 'lifeboat register --machine'")
    return principal.name


class PrimaryLink:
    """A scale-out process server's view of the primary: whose is an agent's token (answers cached briefly)."""

    def __init__(self, config: ControlConfig) -> None:
        try:
            token = auth.read_secret_file(resolve_credential(config.credential_file))
        except OSError as exc:
            raise ConfigError("control.credential_file", f"cannot read {config.credential_file}: {exc.strerror}") from None
        self.client = ApiClient(config.primary_url, resolve_credential(config.ca_cert), token)
        self.cache_seconds = config.auth_cache_seconds
        self._cache: dict[str, tuple[float, str | None, CredentialRefused | None]] = {}

    async def start(self) -> None:
        try:
            me = await self.client.call("GET", "/whoami")
            logger.info("linked to the primary", url=self.client.url, principal=me.get("principal"))
        except ApiCallFailed as exc:
            # Not fatal: batches with the shared token still flow, and agent credentials are checked
            # (and refused with 503 + Retry-After) until the primary answers.
            logger.warning("primary not reachable at start", url=self.client.url, error=str(exc))

    async def machine_of(self, token: str) -> str:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            if hit[2]:
                raise hit[2]
            return hit[1]  # type: ignore[return-value]
        try:
            answer = await self.client.call("POST", "/credentials/check", {"token": token})
        except ApiCallFailed as exc:
            raise CredentialRefused(503, "auth_unavailable", f"cannot check the credential with the primary "
                                    f"configuration server: {exc}; retry later") from None
        if len(self._cache) >= MAX_CACHED_CREDENTIALS:
            self._cache.clear()
        if not answer.get("valid"):
            refused = CredentialRefused(401, str(answer.get("reason", "unknown_credential")),
                                        str(answer.get("message", "credential refused by the primary")))
            self._cache[key] = (now + self.cache_seconds, None, refused)
            raise refused
        if answer.get("kind") != "agent":
            raise CredentialRefused(403, "forbidden", f"{answer.get('kind')}:{answer.get('name')} is not an agent "
                                    "credential")
        self._cache[key] = (now + self.cache_seconds, str(answer["name"]), None)
        return str(answer["name"])

    async def close(self) -> None:
        await self.client.close()
