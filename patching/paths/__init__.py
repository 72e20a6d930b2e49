"""The paths room: path patching and edges — nodes (embedding, heads, MLPs) and receivers (query,
key, value and MLP inputs, the logits), exact path patching, edge attribution (EAP, EAP-IG),
circuits (edge-ablated runs, faithfulness and completeness, `find_circuit`), sparse feature circuits
(SAE latents and error nodes as nodes, latent-to-latent edges), mixed circuits of heads, MLPs,
latents and error nodes, and their results.

Imports `model`, `splice`, `sweep` and `attribution` below it."""

from patching.paths.circuits import CircuitConfig, CircuitResult, Faithfulness, faithfulness, find_circuit
from patching.paths.edges import EdgeConfig, attribute_edges
from patching.paths.latent_circuits import latent_faithfulness
from patching.paths.mixed_circuits import MixedCircuitResult, attribute_mixed_edges, mixed_faithfulness, mixed_nodes
from patching.paths.mixed_edges import MixedEdges
from patching.paths.latents import LatentEdgeConfig, LatentGraph, LatentNode, attribute_latent_edges
from patching.paths.nodes import Node, Receiver, receivers_of, upstream_nodes
from patching.paths.path_patching import PathConfig, patch_paths
from patching.paths.results import PathResult

__all__ = ["CircuitConfig", "CircuitResult", "EdgeConfig", "Faithfulness", "LatentEdgeConfig", "LatentGraph", "LatentNode", "MixedCircuitResult", "MixedEdges", "Node", "PathConfig", "PathResult", "Receiver", "attribute_edges", "attribute_latent_edges", "attribute_mixed_edges", "faithfulness", "find_circuit", "latent_faithfulness", "mixed_faithfulness", "mixed_nodes", "patch_paths", "receivers_of", "upstream_nodes"]
