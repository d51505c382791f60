"""Per-node data for Google Model Explorer (https://github.com/google-ai-edge/model-explorer):
open the ONNX file there, then load this JSON as "custom node data" to colour its nodes by
our MACs or measured latency.

The file is Model Explorer's ``GraphNodeData`` JSON (``model_explorer.node_data_builder``):
``{"name": ..., "results": {KEY: {"value": N}}, "gradient": [{"stop": 0, "bgColor": ...},
...]}``. Model Explorer resolves a KEY as a node's output ``tensor_name`` if some node
declares one, else as a node id. Its ONNX adapter (the ``model-explorer-onnx`` extension)
declares no ``tensor_name`` (it tags outputs ``__tensor_tag``) and uses the ONNX node name as
the node id, so the keys are ONNX node names: ``layer1.0.conv1/conv2d_1`` for a model from
the ONNX backend, whose ``<module>/`` prefix also becomes the adapter's namespace (the
node's group). tests/tools/test_model_explorer.py checks this against Model Explorer's own
code when it is installed.
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


def node_data(model: Any, values: dict[str, float], name: str = "edgefx") -> dict[str, Any]:
    """``values`` per ONNX node name -> GraphNodeData keyed by node name (Model Explorer's
    node id), for the nodes of ``model``."""
    nodes = {node.name for node in model.graph.node}
    results = {key: {"value": value} for key, value in values.items() if key in nodes}
    return {"name": name, "results": results, "gradient": GRADIENT}


def macs_per_node(
    model: Any, node_map: dict[str, dict[str, str]] | None = None
) -> dict[str, float]:
    graph = onnx_graph(model, node_map)
    return {name: float(atom.macs) for name, atom in graph.atoms.items() if atom.macs}


def write_node_data(
    path: str | Path, model: Any, values: dict[str, float], name: str = "edgefx"
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(node_data(model, values, name), indent=1))
    return path
