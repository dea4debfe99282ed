"""SmoothQuant (Xiao et al., 2023) as an ONNX graph pass, before INT8 quantisation.

BERT's activations have a few outlier channels (LayerNorm and GELU outputs reach
tens while most channels stay below one); a per-tensor activation scale sized
for the outliers leaves the other channels a handful of integer levels. For each
group of weight MatMuls sharing one input ``X`` (Q/K/V share theirs) this pass
computes per-input-channel factors

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

over real calibration activations, inserts ``X · (1/s)`` (one elementwise Mul
per group) and multiplies row ``j`` of every weight by ``s_j``: the product is
unchanged in exact arithmetic, but the activation range flattens and part of it
moves into the weights, which are quantised per channel. ``alpha`` trades the
two (0.5 in the paper; tuned in docs/quantization.md).

ORT's own ``SmoothQuant`` option needs Intel Neural Compressor, which this
project does not install; the pass is small enough to own. Needs ``onnx``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings
from embedkit.runtime.session import create_session


def weight_matmul_groups(model: Any) -> dict[str, list[Any]]:
    """``{input tensor: [MatMul nodes]}`` for MatMuls whose B is a 2-D initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups[node.input[0]].append(node)
    return dict(groups)


def activation_absmax(
    model_path: Path,
    tensors: list[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    probe: Path,
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named intermediate tensors over ``feeds``
    (the graph with those tensors as extra outputs is written to ``probe``, then removed)."""
    import onnx

    model = onnx.load(str(model_path))
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    onnx.save(model, str(probe))
    try:
        session, _ = create_session(probe, get_settings(), fixed_providers=["CPUExecutionProvider"])
        out: dict[str, np.ndarray] = {}
        for feed in feeds:
            # Padded positions carry attention-masked junk that never reaches the pooled
            # vector; only real tokens define the ranges.
            mask = feed["attention_mask"].astype(bool)
            for name, value in zip(tensors, session.run(tensors, dict(feed)), strict=True):
                real = np.abs(value[mask]).max(axis=0)
                out[name] = real if name not in out else np.maximum(out[name], real)
        if not out:
            raise InvalidInput("SmoothQuant needs at least one calibration batch")
        return out
    finally:
        probe.unlink(missing_ok=True)


def smooth(
    src: Path,
    dst: Path,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Write the smoothed graph of ``src`` to ``dst``; return what was done (for the manifest)."""
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= alpha <= 1.0:
        raise InvalidInput(f"SmoothQuant alpha must be within [0, 1], got {alpha}")
    model = onnx.load(str(src))
    groups = weight_matmul_groups(model)
    if not groups:
        raise InvalidInput(f"{src} has no MatMul with a 2-D weight to smooth")
    act = activation_absmax(Path(src), sorted(groups), feeds, Path(dst).with_suffix(".probe.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    spread_before, spread_after = [], []
    new_nodes: dict[str, Any] = {}  # input tensor -> the Mul inserted for it
    for x_name, nodes in sorted(groups.items()):
        weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in nodes}
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        a_max = act[x_name].astype(np.float64)
        s = np.power(np.maximum(a_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        spread_before.append(float(a_max.max() / max(np.median(a_max), 1e-12)))
        smoothed = a_max / s
        spread_after.append(float(smoothed.max() / max(np.median(smoothed), 1e-12)))
        for name, w in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        scale_name = f"{x_name}_smooth_scale"
        out_name = f"{x_name}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / s, scale_name))
        new_nodes[x_name] = onnx.helper.make_node(
            "Mul", [x_name, scale_name], [out_name], name=f"{x_name}_SmoothQuant_Mul"
        )
        for n in nodes:
            n.input[0] = out_name
    # Keep the graph topologically sorted: each Mul goes right before its first consumer.
    ordered = []
    for node in model.graph.node:
        for x_name in [i for i in node.input if i.endswith("_smoothed")]:
            mul = new_nodes.pop(x_name[: -len("_smoothed")], None)
            if mul is not None:
                ordered.append(mul)
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    onnx.save(model, str(dst))
    return {
        "alpha": alpha,
        "groups": len(groups),
        "matmuls": sum(len(v) for v in groups.values()),
        # max/median channel range of the activations, worst group: what smoothing flattens.
        "outlier_ratio_before": round(max(spread_before), 1),
        "outlier_ratio_after": round(max(spread_after), 1),
    }
