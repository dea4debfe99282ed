"""Each tiny architecture (tests/tiny_models.py) served by a real `bentoml serve`: what the
`openai` client gets matches PyTorch `SentenceTransformer.encode` at the contract's thresholds,
an empty string and a text over the model's limit included.

One server serves all four (``EMBEDKIT_MODELS``), each request naming its model: the same
engine path per model as four servers, for one startup instead of four."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.servers import Launcher, Server
from tests.tiny_models import TINY_ARCHITECTURES

from embedkit.model import evaldata
from embedkit.model.artifact import Artifact, register
from embedkit.model.export import load_reference
from embedkit.quality import contract


@pytest.fixture(scope="module")
def arch_servers(
    tiny_architecture, launcher: Launcher
) -> dict[str, tuple[Artifact, object, Server]]:
    """name → (artifact, PyTorch reference, server): one server for the four models."""
    models = {name: tiny_architecture(name) for name in sorted(TINY_ARCHITECTURES)}
    tags = [register(artifact) for _, artifact in models.values()]
    server = launcher.start(tags[0], {"EMBEDKIT_MODELS": json.dumps(tags)})
    return {
        name: (artifact, load_reference(src), server) for name, (src, artifact) in models.items()
    }


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    english = evaldata.sts_sentences("test")[:24]
    other = [pair[0] for lang in ("de", "ru", "zh") for pair in evaldata.multilingual(lang)[:4]]
    # an empty string (only the special tokens) and one far over the 64-token limit
    return [*english, *other, "", evaldata.long_texts(300, 1)[0]]


def as_array(data) -> np.ndarray:
    return np.array([d.embedding for d in data], dtype=np.float32)


def assert_contract_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    stats = contract.compare(want, got)
    assert stats["min_cosine"] >= contract.MIN_COSINE, stats
    assert stats["max_abs_diff"] <= contract.MAX_ABS_DIFF, stats


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_served_vectors_match_pytorch(arch_servers, texts: list[str], name: str) -> None:
    from openai import OpenAI

    artifact, reference, server = arch_servers[name]
    served = artifact.manifest.name
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    listed = [m.id for m in client.models.list().data]
    assert listed == [arch_servers[n][0].manifest.name for n in sorted(TINY_ARCHITECTURES)]

    # the model's own modules, Normalize included where it has one (bert-cls has none)
    want = reference.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    assert want.shape == (len(texts), artifact.manifest.embedding_config.dimension)
    batch = client.embeddings.create(model=served, input=texts)
    assert [d.index for d in batch.data] == list(range(len(texts)))
    assert_contract_parity(as_array(batch.data), want)

    # OpenAI token arrays are content ids: the service adds this model's special tokens
    content = reference.tokenizer(texts[:3], add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model=served, input=content)
    assert_contract_parity(as_array(by_ids.data), want[:3])
