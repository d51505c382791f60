"""Per-node data for Google Model Explorer (https://github.com/google-ai-edge/model-explorer):
open the ONNX file there, then load this JSON as "custom node data" to colour its nodes by
our MACs or measured latency.

The file is Model Explorer's ``GraphNodeData`` JSON (see its ``node_data_builder.py``):
``{"results": {KEY: {"value": N}}, "gradient": [{"stop": 0, "bgColor": ...}, ...]}``. Keys
are node output tensor names, which Model Explorer matches against each node's
``tensor_name`` for any model adapter (node ids differ between its ONNX adapters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgefx.tools.layers import onnx_graph

GRADIENT = [
    {"stop": 0, "bgColor": "#ffffcc"},
    {"stop": 0.5, "bgColor": "#fd8d3c"},
    {"stop": 1, "bgColor": "#800026"},
]


def node_data(model: Any, values: dict[str, float]) -> dict[str, Any]:
    """``values`` per ONNX node name -> GraphNodeData keyed by each node's first output."""
    results = {}
    for node in model.graph.node:
        if node.name in values and node.output:
            results[node.output[0]] = {"value": values[node.name]}
    return {"results": results, "gradient": GRADIENT}


def macs_per_node(
    model: Any, node_map: dict[str, dict[str, str]] | None = None
) -> dict[str, float]:
    graph = onnx_graph(model, node_map)
    return {name: float(atom.macs) for name, atom in graph.atoms.items() if atom.macs}


def write_node_data(path: str | Path, model: Any, values: dict[str, float]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(node_data(model, values), indent=1))
    return path
