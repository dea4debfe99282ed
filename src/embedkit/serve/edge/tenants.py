"""Tenants: who a key belongs to, its token-rate quota and its priority class.

``settings.api_keys`` are the ``default`` tenant's (no quota, interactive); the file
at ``settings.tenants_file`` adds named tenants, each with keys, a token bucket
(``rate_tokens_per_s`` refills it up to ``burst_tokens``) and a class: ``interactive``
keeps the lane the route or the client chose, ``bulk`` runs every request on the bulk
lane (so a backfill never competes with anyone's queries, whatever route it calls).
Keys on ``settings.revoked_keys`` are refused even while still listed.

Quota is charged in real tokens (what usage reports) when a request is admitted,
before it queues; a request the bucket cannot cover gets 429 with ``Retry-After``:
the seconds until the bucket holds its tokens (a request larger than the burst waits
for a full bucket and leaves it in debt). With ``settings.quota_store`` the bucket is
one per tenant across every pod and worker (:mod:`embedkit.serve.edge.quota_store`);
without it each process keeps its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from embedkit.core import metrics
from embedkit.core.configfile import load_yaml
from embedkit.core.errors import (
    EmbedkitError,
    InvalidInput,
    QuotaExceeded,
    RevokedKey,
    Unauthorized,
)
from embedkit.core.settings import Settings
from embedkit.serve.edge.quota_store import QuotaStore, StoreUnavailable

log = logging.getLogger(__name__)

Priority = Literal["interactive", "bulk"]
DEFAULT_TENANT = "default"  # api_keys, and every request when auth is off


class TenantSpec(BaseModel):
    """One tenant in the tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: list[str] = Field(min_length=1)
    rate_tokens_per_s: float = Field(gt=0)  # required: no silent "unlimited"
    burst_tokens: float | None = Field(None, gt=0)  # default: one second of rate
    priority: Priority = "interactive"


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tenants: dict[str, TenantSpec] = Field(min_length=1)


class Tenant:
    """A tenant and its token bucket (``rate`` None: no quota): shared in ``store`` when
    one is configured, else (and while it is away) this process's own."""

    def __init__(
        self,
        name: str,
        priority: Priority = "interactive",
        rate: float | None = None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        store: QuotaStore | None = None,
    ) -> None:
        self.name = name
        self.priority = priority
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0)
        self.store = store
        self._clock = clock
        self._level = self.burst
        self._at = clock()

    def lane(self, lane: str) -> str:
        """The lane a request of this tenant runs on: a bulk-class tenant's always bulk."""
        return "bulk" if self.priority == "bulk" else lane

    def _share(self) -> float:
        """This process's share of the quota while it charges locally: all of it without a
        store, rate ÷ the live processes last counted while the store is away."""
        return 1.0 if self.store is None else 1.0 / self.store.live

    def _take_local(self, tokens: int) -> float | None:
        """Take from this process's bucket: None when taken, else seconds until possible."""
        assert self.rate is not None
        rate, burst = self.rate * self._share(), self.burst * self._share()
        now = self._clock()
        self._level = min(burst, self._level + (now - self._at) * rate)
        self._at = now
        need = min(float(tokens), burst)
        if self._level < need:
            return (need - self._level) / rate
        self._level -= tokens
        return None

    async def charge(self, tokens: int) -> None:
        """Take ``tokens`` from the bucket, or refuse (429) with the wait until it can."""
        if self.rate is None:
            return
        wait: float | None
        if self.store is not None:
            try:
                wait = await self.store.take(self.name, self.rate, self.burst, tokens)
            except StoreUnavailable:  # logged and counted by the store
                wait = self._take_local(tokens)
        else:
            wait = self._take_local(tokens)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            metrics.get().quota_rejections.labels(tenant=self.name).inc()
            raise QuotaExceeded(
                f"tenant {self.name!r} is over its quota of {self.rate:g} tokens/s "
                f"(burst {self.burst:g}): this request needs {tokens} tokens; "
                f"retry in {seconds} s",
                retry_after_s=seconds,
            )

    async def refund(self, tokens: int) -> None:
        """Give back a charge whose work never ran (the queue shed it)."""
        if self.rate is None:
            return
        if self.store is not None:
            try:
                await self.store.refund(self.name, self.rate, self.burst, tokens)
                return
            except StoreUnavailable:
                pass
        self._level = min(self.burst * self._share(), self._level + tokens)


def _digest(key: str) -> bytes:
    # Keys are looked up by hash: a dict lookup's timing then says nothing about the keys.
    return hashlib.sha256(key.encode()).digest()


class Tenants:
    """Every accepted key → its tenant; revoked keys apart."""

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        tenants: dict[str, TenantSpec] | None = None,
        revoked: Iterable[str] = (),
        store: QuotaStore | None = None,
    ) -> None:
        self.store = store
        self.default = Tenant(DEFAULT_TENANT)
        self._keys: dict[bytes, Tenant] = {}
        self._revoked = {_digest(k) for k in revoked}
        for key in api_keys:
            self._add(key, self.default)
        for name, spec in (tenants or {}).items():
            if name == DEFAULT_TENANT:
                raise InvalidInput(f"tenant name {name!r} is reserved for api_keys")
            tenant = Tenant(
                name, spec.priority, spec.rate_tokens_per_s, spec.burst_tokens, store=store
            )
            for key in spec.keys:
                self._add(key, tenant)

    def _add(self, key: str, tenant: Tenant) -> None:
        if not key:
            raise InvalidInput(f"tenant {tenant.name!r} has an empty API key")
        digest = _digest(key)
        other = self._keys.get(digest)
        if other is not None:
            raise InvalidInput(
                f"an API key is given twice (tenants {other.name!r} and {tenant.name!r}); "
                "each key belongs to one tenant"
            )
        self._keys[digest] = tenant

    @classmethod
    def from_settings(cls, settings: Settings) -> Tenants:
        """From ``api_keys``, ``tenants_file`` and ``revoked_keys``; a bad file raises one line."""
        path = settings.tenants_file
        if path is None:
            return cls(settings.api_keys, None, settings.revoked_keys)
        specs = load_yaml(path, TenantsFile, "tenants file").tenants
        try:
            return cls(
                settings.api_keys,
                specs,
                settings.revoked_keys,
                QuotaStore.from_settings(settings),
            )
        except InvalidInput as exc:
            raise InvalidInput(f"tenants file {path} is invalid: {exc.message}") from exc

    @property
    def auth(self) -> bool:
        """Whether requests need a key (any key configured)."""
        return bool(self._keys)

    def identify(self, authorization: str | None) -> Tenant:
        """The tenant of ``Authorization: Bearer <key>``; 401 when missing, unknown or
        revoked. With no keys configured, everyone is the default tenant."""
        if not self.auth:
            return self.default
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        if digest in self._revoked:
            raise RevokedKey("API key has been revoked")
        tenant = self._keys.get(digest)
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant


def check_startup(settings: Settings) -> None:
    """Refuse to start, with one log line, on a tenants file that cannot serve."""
    try:
        Tenants.from_settings(settings)
    except EmbedkitError as exc:
        log.error("embedkit refuses to start: %s", exc)
        raise
