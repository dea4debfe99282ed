"""The front's Embedder client over a real socket, through BentoML's own inter-service
client (aiohttp) built from the real ``Embedder`` API: a broken connection is retried
once, a second break is translated, never leaked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from embedkit.core.errors import InferenceError
from embedkit.core.settings import Settings
from embedkit.serve.edge.http_errors import INTERNAL_MESSAGE
from embedkit.serve.pipeline.client import EmbedderClient
from embedkit.serve.pipeline.jobs import EmbedJob
from embedkit.serve.seams import RemoteEmbedder


@contextlib.asynccontextmanager
async def embedder_stub(drops: int) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback HTTP server in the Embedder's place. The first ``drops`` requests are
    read and their connection closed unanswered — what the proxy meets when the Embedder's
    server closed an idle keep-alive connection or its worker restarted. Later requests
    get one row per item: ``[first token id, token count]``. Yields (url, bodies seen)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: several requests may share one connection
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            seen.append(await reader.readexactly(length))
            if len(seen) <= drops:
                writer.transport.abort()
                return
            items = json.loads(seen[-1])["items"]
            body = json.dumps([[ids[0], len(ids)] for _, ids in items]).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", seen


async def _embed(drops: int, settings: Settings, ids: list[list[int]]) -> Any:
    """``EmbedderClient.embed`` through BentoML's client of the real Embedder service."""
    from _bentoml_impl.client.proxy2 import AsyncClient
    from service import Embedder  # the real API specs (what bentoml.depends builds from)

    async with embedder_stub(drops) as (url, seen):
        client = EmbedderClient(settings)
        client.warm = True
        job = EmbedJob(ids=ids, lane="query", normalize=False, dimensions=None, encoding="float")
        proxy = AsyncClient(
            url, service=Embedder, media_type="application/json", server_ready_timeout=0
        )
        async with proxy:
            try:
                return await client.embed(RemoteEmbedder(proxy), job), seen, client
            except Exception as exc:
                return exc, seen, client


IDS = [[101, 7592, 102], [101, 2088, 2000, 102]]


@pytest.mark.parametrize("coalescing", [True, False])
def test_a_broken_connection_is_retried_once(
    coalescing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(front_coalescing=coalescing)
    with caplog.at_level(logging.WARNING, logger="embedkit.serve.pipeline.client"):
        vectors, seen, client = asyncio.run(_embed(1, settings, IDS))
    assert isinstance(vectors, np.ndarray), vectors
    np.testing.assert_array_equal(vectors, [[101, 3], [101, 4]])
    sent = [[ids for _, ids in json.loads(body)["items"]] for body in seen]
    assert sent == [IDS, IDS]  # the same call, sent again
    assert "embedder connection broke" in caplog.text and "retrying once" in caplog.text
    assert client.queued_tokens == 0


def test_a_second_break_is_translated_not_retried_again() -> None:
    error, seen, client = asyncio.run(_embed(2, Settings(front_coalescing=False), IDS))
    assert isinstance(error, InferenceError), repr(error)
    assert error.message == INTERNAL_MESSAGE and error.status == 500
    assert len(seen) == 2  # one retry, no more
    assert client.queued_tokens == 0  # admission released on failure too
