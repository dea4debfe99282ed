"""Committed INT8 sensitivity rankings: which weight MatMuls to keep in fp32, most harmful first.

Measuring a ranking (:mod:`embedkit.variants.sensitivity`) quantises every
MatMul on its own — minutes of compute — so a release never does it: it reads
the ranking measured once per model and CPU instruction-set level, committed in
``embedkit/data/int8-sensitivity.json`` (``{model_id: {isa_level: {"nodes": [...],
...}}}``, written by ``scripts/quantization_report.py --sensitivity`` on that ISA: the
INT8 kernels, hence which MatMuls hurt most, differ with and without VNNI). A model
ranked on another ISA only uses that ranking, and says so. The names are
checked against the graph being quantised; when the model has no ranking or its
names do not match (another exporter, another opset), the structural fallback
is used and the manifest says so: the feed-forward output projections
(``layer.N/output/dense``), layer order — the MatMuls after GELU, whose inputs
carry BERT's largest activation outliers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

RANKINGS = "data/int8-sensitivity.json"
_FFN_OUT = re.compile(r"layer\.(\d+)/output/dense/MatMul$")


def load_rankings() -> dict[str, dict[str, Any]]:
    text = resources.files("embedkit").joinpath(RANKINGS).read_text()
    data: dict[str, dict[str, Any]] = json.loads(text)
    return data


def fallback_order(graph_nodes: Sequence[str]) -> list[str]:
    """The structural guess: FFN output projections in layer order."""
    hits = [(int(m.group(1)), n) for n in graph_nodes if (m := _FFN_OUT.search(n))]
    return [n for _, n in sorted(hits)]


def most_sensitive(
    model_id: str, graph_nodes: Sequence[str], k: int, isa: str
) -> tuple[list[str], str]:
    """The ``k`` most sensitive weight MatMuls of the graph and where the order came from
    (``"measured"`` on ``isa``, ``"measured on <other isa>"``, or ``"fallback: <why>"``)."""
    if k <= 0:
        return [], "none"
    by_isa = load_rankings().get(model_id, {})
    present = set(graph_nodes)
    if not by_isa:
        source = f"fallback: no committed ranking for {model_id}"
        order = fallback_order(graph_nodes)
    else:
        level = isa if isa in by_isa else sorted(by_isa)[0]
        nodes = by_isa[level]["nodes"]
        if missing := [n for n in nodes[:k] if n not in present]:
            source = f"fallback: ranked node {missing[0]!r} is not in this graph"
            order = fallback_order(graph_nodes)
        elif level == isa:
            return list(nodes[:k]), "measured"
        else:
            source = f"measured on {level} (none committed for {isa})"
            order = list(nodes)
    log.warning("INT8 mixed precision uses the %s ranking", source)
    return order[:k], source
