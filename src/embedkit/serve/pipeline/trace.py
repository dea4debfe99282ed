"""What one request was, for its response headers and its log line.

The edge (:class:`~embedkit.serve.edge.middleware.EdgeMiddleware`) opens a
:class:`RequestTrace` per request (its id, the tenant its key belongs to, the lane a
client asked for) and puts it in a context variable, which the route handler's task
inherits; the front and the Embedder client fill in what happened (the lane that
served, the batches it rode in, the bulk runs it waited behind). The object is shared,
not copied, so the edge reads it back when the response leaves.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedkit.serve.edge.tenants import Tenant

REQUEST_ID_HEADER = "X-Request-Id"
LANE_HEADER = "X-Embedkit-Lane"  # request: the lane asked for; response: the lane that served
BULK_AHEAD_HEADER = "X-Embedkit-Bulk-Runs-Ahead"

# Ids a client may pass: what tracing systems and load balancers generate (uuids, hex,
# W3C-style), nothing that could break a log line or a header.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's id when it is 1–128 of ``[A-Za-z0-9._:-]``, else a fresh uuid4 (hex)."""
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class RequestTrace:
    request_id: str
    tenant: Tenant | None = None  # set once the key is checked
    asked_lane: str | None = None  # the X-Embedkit-Lane header, validated
    lane: str | None = None  # the lane that served
    batches: list[str] = field(default_factory=list)  # Embedder calls it rode in
    bulk_runs_ahead: int | None = None  # most over its calls (topology=single only)
    tokens: int = 0

    def rode(self, batch: str, bulk_runs_ahead: int | None) -> None:
        self.batches.append(batch)
        if bulk_runs_ahead is not None:
            self.bulk_runs_ahead = max(self.bulk_runs_ahead or 0, bulk_runs_ahead)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(REQUEST_ID_HEADER.lower().encode(), self.request_id.encode())]
        if self.lane is not None:
            out.append((LANE_HEADER.lower().encode(), self.lane.encode()))
        if self.bulk_runs_ahead is not None:
            out.append((BULK_AHEAD_HEADER.lower().encode(), str(self.bulk_runs_ahead).encode()))
        return out


CURRENT: ContextVar[RequestTrace | None] = ContextVar("embedkit_request", default=None)


def current() -> RequestTrace | None:
    """This request's trace; None outside a request (warm-up, in-process use)."""
    return CURRENT.get()


@dataclass
class EngineReport:
    """What the engine side says about one Embedder call (:class:`LocalEmbedder` fills it
    from the context variable below, set around the call by the client)."""

    bulk_runs_ahead: int | None = None

    def waited(self, runs: int) -> None:
        self.bulk_runs_ahead = max(self.bulk_runs_ahead or 0, runs)


ENGINE_REPORT: ContextVar[EngineReport | None] = ContextVar("embedkit_engine", default=None)
