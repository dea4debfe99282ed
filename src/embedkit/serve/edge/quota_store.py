"""Tenants' token buckets in Redis: one budget per tenant across every pod and worker.

Without a shared store each process keeps its own buckets, so a tenant's total rate is
its rate × processes — and grows as the autoscaler adds pods, the opposite of a quota.
With ``settings.quota_store`` (``redis://`` / ``rediss://``) every process charges the
same bucket:

* **One round trip, atomic.** A Lua script refills the bucket from Redis's own clock
  (``TIME``: pods' clock skew does not matter), then takes the tokens or answers how long
  until they are there (Retry-After). A request larger than the burst waits for a full
  bucket and leaves it in debt, as the local bucket does.
* **Serving never fails because the store does.** Each call is bounded by
  ``quota_store_timeout_ms`` (connect, answer, pool wait). A process that cannot reach
  the store charges a local bucket of rate ÷ the live processes it last counted, logs one
  line and sets ``embedkit_quota_store_up`` to 0; it returns to the store the moment the
  store answers a heartbeat again.
* **The fleet's size is counted in the store.** Each process renews its own entry every
  ``quota_heartbeat_s`` (a sorted set scored by Redis's clock); entries older than three
  beats are dropped, and the count of the rest divides the rate while the store is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from embedkit.core import metrics
from embedkit.core.settings import Settings

log = logging.getLogger(__name__)

# KEYS[1]: the bucket (a hash: level, at). ARGV: rate, burst, tokens, "take" | "refund".
# Returns {1, level} when taken (or refunded), {0, seconds until `tokens` are there}.
# Numbers travel as strings: Redis turns a Lua number reply into an integer.
BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
level = math.min(burst, level + math.max(0, now - at) * rate)
local taken = 1
if ARGV[4] == 'refund' then
  level = math.min(burst, level + tokens)
elseif level < math.min(tokens, burst) then
  taken = 0
else
  level = level - tokens
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) * 2 + 60)
if taken == 0 then
  return {0, tostring((math.min(tokens, burst) - level) / rate)}
end
return {1, tostring(level)}
"""

# KEYS[1]: the live processes (a sorted set). ARGV: this process, the window in seconds.
# Renews this process, drops the silent ones, returns how many are live.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return redis.call('ZCARD', KEYS[1])
"""


class StoreUnavailable(Exception):
    """The quota store did not answer in time (or at all): charge locally."""


class QuotaStore:
    """The shared buckets of one deployment (``key_prefix``) in one Redis."""

    def __init__(self, url: str, key_prefix: str, timeout_s: float, heartbeat_s: float) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.member = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        scheme, _, rest = url.partition("://")
        self._where = f"{scheme}://{rest.rpartition('@')[2]}"
        # No retries inside the client: a retry is another timeout a request would wait for.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
        self._bucket = self._redis.register_script(BUCKET)
        self._heartbeat = self._redis.register_script(HEARTBEAT)
        self.up: bool | None = None  # unknown until the first call
        self.live = 1  # processes counted at the last heartbeat (this one at least)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> QuotaStore | None:
        if settings.quota_store is None:
            return None
        return cls(
            settings.quota_store,
            settings.quota_key_prefix,
            settings.quota_store_timeout_ms / 1000,
            settings.quota_heartbeat_s,
        )

    def where(self) -> str:
        """The store's address without its password, for log lines and the gauge's label."""
        return self._where

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            answer = await asyncio.wait_for(script(keys=keys, args=args), self.timeout_s)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self._mark(False, exc)
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        except Exception as exc:  # redis' own errors (connection, response, script)
            import redis.exceptions

            if not isinstance(exc, redis.exceptions.RedisError):
                raise
            self._mark(False, exc)
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        self._mark(True)
        return answer

    def _mark(self, up: bool, exc: BaseException | None = None) -> None:
        """On a change (not per request): one log line and the gauge."""
        if up == self.up:
            return
        if up and self.up is None:
            log.info("embedkit quota store %s: tenants' budgets are shared", self.where())
        elif up:
            log.warning("embedkit quota store %s answers: tenants' budgets shared again",
                        self.where())  # fmt: skip
        else:
            log.warning(
                "embedkit quota store %s unreachable (%s): each process charges a local "
                "bucket of rate / %d live processes until it answers",
                self.where(),
                exc,
                self.live,
            )
        self.up = up
        metrics.get().quota_store_up.labels(store=self.where()).set(1 if up else 0)

    def _key(self, tenant: str) -> str:
        return f"{self.prefix}:quota:{tenant}"

    async def take(self, tenant: str, rate: float, burst: float, tokens: int) -> float | None:
        """None when ``tokens`` were taken from ``tenant``'s shared bucket, else the seconds
        until they are there; :class:`StoreUnavailable` when the store does not answer."""
        taken, value = await self._call(
            self._bucket, [self._key(tenant)], [rate, burst, tokens, "take"]
        )
        return None if int(taken) == 1 else float(value)

    async def refund(self, tenant: str, rate: float, burst: float, tokens: int) -> None:
        await self._call(self._bucket, [self._key(tenant)], [rate, burst, tokens, "refund"])

    async def beat(self) -> int:
        """Renew this process's presence; the live processes counted (kept in ``live``)."""
        window = 3 * self.heartbeat_s
        self.live = max(1, int(await self._call(
            self._heartbeat, [f"{self.prefix}:processes"], [self.member, window]
        )))  # fmt: skip
        return self.live

    def start(self) -> None:
        """The heartbeat, in the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    async def _beat_forever(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):  # logged once; the next beat retries
                await self.beat()
            await asyncio.sleep(self.heartbeat_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._redis.aclose()
