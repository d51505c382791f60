"""Read-only facts about a captured graph, shared by passes and tools.

Nothing here mutates a GraphModule, its graph or its node metadata.
"""

from edgefx.analysis.cost import CostReport, NodeCost, graph_cost

__all__ = ["CostReport", "NodeCost", "graph_cost"]
