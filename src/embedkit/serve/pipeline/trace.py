"""What one request is, and was, for its response headers and its log line.

The edge (:class:`~embedkit.serve.edge.middleware.EdgeMiddleware`) opens a
:class:`RequestContext` per request (its id, the tenant its key belongs to, the lane a
client asked for) and hands it on in the ASGI scope (:func:`attach`: Starlette's
``request.state``), where the route handler takes it (:func:`of`) and passes it, as an
argument, to the front, which passes it to the Embedder client. They fill in what
happened (the lane that served, the batches it rode in, the bulk runs and the other
tenants' query calls it waited behind, the tokens charged). The object is shared, not
copied, so the edge reads it back when the response leaves.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedkit.serve.edge.tenants import Tenant

REQUEST_ID_HEADER = "X-Request-Id"
LANE_HEADER = "X-Embedkit-Lane"  # request: the lane asked for; response: the lane that served
BULK_AHEAD_HEADER = "X-Embedkit-Bulk-Runs-Ahead"
STATE_KEY = "embedkit_request"  # the context's key in the ASGI scope's "state"

# Ids a client may pass: what tracing systems and load balancers generate (uuids, hex,
# W3C-style), nothing that could break a log line or a header.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's id when it is 1–128 of ``[A-Za-z0-9._:-]``, else a fresh uuid4 (hex)."""
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class RequestContext:
    """One request: who sent it and what it asked (set by the edge), then its trace:
    what served it (filled in by the front and the Embedder client)."""

    request_id: str
    tenant: Tenant | None = None  # set once the key is checked
    asked_lane: str | None = None  # the X-Embedkit-Lane header, validated
    # --- the trace
    lane: str | None = None  # the lane that served
    batches: list[str] = field(default_factory=list)  # Embedder calls it rode in
    bulk_runs_ahead: int | None = None  # most over its calls (topology=single only)
    # Other tenants' query-lane calls that left the front's queue ahead of it, the most
    # over its calls (front coalescing on the query lane only).
    other_tenant_runs_ahead: int | None = None
    tokens: int = 0  # charged to the tenant

    def rode(self, batch: str, bulk_runs_ahead: int | None) -> None:
        self.batches.append(batch)
        if bulk_runs_ahead is not None:
            self.bulk_runs_ahead = max(self.bulk_runs_ahead or 0, bulk_runs_ahead)

    def queued_behind(self, other_tenant_runs: int) -> None:
        self.other_tenant_runs_ahead = max(self.other_tenant_runs_ahead or 0, other_tenant_runs)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(REQUEST_ID_HEADER.lower().encode(), self.request_id.encode())]
        if self.lane is not None:
            out.append((LANE_HEADER.lower().encode(), self.lane.encode()))
        if self.bulk_runs_ahead is not None:
            out.append((BULK_AHEAD_HEADER.lower().encode(), str(self.bulk_runs_ahead).encode()))
        return out


def attach(scope: MutableMapping[str, Any], request: RequestContext) -> None:
    """Hand ``request`` on with the ASGI ``scope`` (its ``state``: Starlette's
    ``request.state``, which the route handler sees)."""
    scope.setdefault("state", {})[STATE_KEY] = request


def of(state: Any) -> RequestContext | None:
    """The context the edge attached, from a Starlette ``request.state`` (or the scope's
    ``state`` dict); None outside the edge (warm-up, in-process use)."""
    mapping = isinstance(state, Mapping)
    found = state.get(STATE_KEY) if mapping else getattr(state, STATE_KEY, None)
    return found if isinstance(found, RequestContext) else None
