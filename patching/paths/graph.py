"""Attribution graphs as data: the JSON a viewer reads, whole-graph scores, and a static drawing.

The schema (`latentpatch.graph/1`, documented in docs/guides/paths.md) is close to the attribution-graph
JSON circuit-tracer writes and Neuronpedia's viewer reads (Ameisen et al. 2025, "Circuit Tracing"):
`nodes` (id, kind, layer, position, label, activation, influence), `edges` (source, target, weight) —
their `links` — and `metadata` (model, SAEs, prompts, method, scores, provenance). A node's `layer` is
its block (a fraction for a site inside a block: `resid_mid` is L + 0.5, `resid_post` is L + 1); the
embedding sits at −1 and the logit at the number of layers. `position` is null for a node summed over
positions.

Influence and the two whole-graph scores follow circuit-tracer's `compute_graph_scores`: the adjacency
`A[target, source] = |weight|` is normalised so each node's inputs sum to 1, and a node's influence is
the share of the logit's attribution that reaches it along every path, `Σ_k w·A^k` with `w` one-hot on
the logit. Error nodes are treated as sources, as circuit-tracer's are (their own inputs are dropped).
The replacement score is the influence that ends at latents with no inputs in the graph (the first
site's) rather than at error nodes; the completeness score is the share of each node's input that comes from non-error nodes,
averaged with weights influence (+ the logit's own weight).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patching.errors import PatchingError
from patching.figures import subplots
from sae.atomic import atomic_write

GRAPH_SCHEMA = "latentpatch.graph/1"
GRAPH_NODE_KINDS: tuple[str, ...] = ("embedding", "head", "mlp", "latent", "error", "logit")
NODE_KEYS: tuple[str, ...] = ("id", "kind", "layer", "position", "label", "activation", "influence")
EDGE_KEYS: tuple[str, ...] = ("source", "target", "weight")
METADATA_KEYS: tuple[str, ...] = ("model", "saes", "prompts", "method", "scores", "provenance")


@dataclass(frozen=True)
class GraphScores:
    """circuit-tracer's two whole-graph scores."""

    replacement: float
    """Share of the logit's influence that ends at latents rather than at error nodes."""
    completeness: float
    """Influence-weighted share of node inputs that come from non-error nodes."""


def influence(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> torch.Tensor:
    """Each node's influence on the logit nodes (one-hot weights on them), (nodes,)."""
    matrix, logit_weights = _normalised(nodes, edges)
    return _influence(matrix, logit_weights)


def graph_scores(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> GraphScores:
    """Replacement and completeness scores of a whole graph (see the module docstring)."""
    matrix, logit_weights = _normalised(nodes, edges)
    node_influence = _influence(matrix, logit_weights)
    is_error = torch.tensor([node["kind"] == "error" for node in nodes])
    has_inputs = matrix.sum(1) > 0
    is_source = ~has_inputs & ~is_error & (logit_weights == 0)
    ends_error = float(node_influence[is_error].sum())
    ends_source = float(node_influence[is_source].sum())
    total = ends_error + ends_source
    replacement = ends_source / total if total > 0 else math.nan
    non_error = 1 - matrix[:, is_error].sum(1)
    weight = node_influence + logit_weights
    completeness = float((non_error * weight).sum() / weight.sum()) if float(weight.sum()) > 0 else math.nan
    return GraphScores(replacement=replacement, completeness=completeness)


def _normalised(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    index = {node["id"]: i for i, node in enumerate(nodes)}
    matrix = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for edge in edges:
        if nodes[index[edge["target"]]]["kind"] != "error":  # error nodes are sources
            matrix[index[edge["target"]], index[edge["source"]]] += abs(float(edge["weight"]))
    sums = matrix.sum(1, keepdim=True)
    matrix = torch.where(sums > 0, matrix / sums.clamp_min(1e-300), matrix)
    logit_weights = torch.tensor([1.0 if node["kind"] == "logit" else 0.0 for node in nodes], dtype=torch.float64)
    return matrix, logit_weights


def _influence(matrix: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """Σ_{k≥1} w·A^k; the graph is acyclic, so the series ends after at most len(nodes) terms."""
    current = logit_weights @ matrix
    total = current.clone()
    for _ in range(len(logit_weights)):
        if not bool(current.any()):
            break
        current = current @ matrix
        total += current
    return total


def graph_document(nodes: list[dict[str, Any]], edges: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: influence filled in for every node, then checked against the schema."""
    values = influence(nodes, edges)
    nodes = [{**node, "influence": float(values[i])} for i, node in enumerate(nodes)]
    doc = {"schema": GRAPH_SCHEMA, "metadata": metadata, "nodes": nodes, "edges": edges}
    check_graph_document(doc)
    return doc


def check_graph_document(doc: Any) -> None:
    """Raise `PatchingError` naming the first missing key, unknown kind or dangling edge."""
    if not isinstance(doc, dict) or doc.get("schema") != GRAPH_SCHEMA:
        raise PatchingError(f"not a {GRAPH_SCHEMA} document (schema={doc.get('schema') if isinstance(doc, dict) else doc!r})")
    missing = [key for key in METADATA_KEYS if key not in doc.get("metadata", {})]
    if missing:
        raise PatchingError(f"graph metadata lacks {missing}")
    ids = set()
    for node in doc["nodes"]:
        lacking = [key for key in NODE_KEYS if key not in node]
        if lacking or node["kind"] not in GRAPH_NODE_KINDS:
            raise PatchingError(f"graph node {node.get('id')!r}: missing {lacking} or kind {node.get('kind')!r} "
                                f"not in {GRAPH_NODE_KINDS}")
        ids.add(node["id"])
    if len(ids) != len(doc["nodes"]):
        raise PatchingError("graph node ids are not unique")
    for edge in doc["edges"]:
        if any(key not in edge for key in EDGE_KEYS) or edge["source"] not in ids or edge["target"] not in ids:
            raise PatchingError(f"graph edge {edge!r}: needs {EDGE_KEYS} between existing node ids")


def write_graph_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the document as strict JSON, atomically (RELIABILITY.md R3)."""
    check_graph_document(doc)
    atomic_write(Path(path), json.dumps(doc, indent=1, allow_nan=False, default=_jsonable).encode())
    return Path(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into a graph document")


def plot_graph_document(doc: dict[str, Any], path: str | Path) -> Path:
    """A PNG: nodes laid out by layer (y) and position (x; nodes summed over positions spread along x
    within their layer), size by influence, edges by |weight| (blue positive, red negative), every node
    labelled (latents by their `label`, e.g. top activating tokens)."""
    nodes, edges = doc["nodes"], doc["edges"]
    xy = _layout(nodes)
    fig, ax = subplots(figsize=(9, 7))
    largest = max([abs(float(e["weight"])) for e in edges] + [1e-12])
    for edge in edges:
        (x0, y0), (x1, y1) = xy[edge["source"]], xy[edge["target"]]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if edge["weight"] >= 0 else "tab:red",
                linewidth=0.3 + 3 * abs(float(edge["weight"])) / largest, alpha=0.6, zorder=1)
    top = max([float(n["influence"]) for n in nodes] + [1e-12])
    colors = {"embedding": "tab:gray", "head": "tab:orange", "mlp": "tab:green", "latent": "tab:purple",
              "error": "tab:red", "logit": "black"}
    for i, node in enumerate(nodes):
        x, y = xy[node["id"]]
        ax.scatter([x], [y], s=20 + 300 * max(float(node["influence"]), 0) / top, color=colors[node["kind"]], zorder=2)
        # staggered and tilted, so the labels of a crowded layer stay apart
        ax.annotate(str(node["label"])[:24], (x, y), fontsize=6, xytext=(3, 3 + 7 * (i % 3)), textcoords="offset points",
                    rotation=25)
    ax.set_ylabel("layer")
    ax.set_xlabel("position (nodes summed over positions are spread along their layer)")
    ax.set_title(f"{len(nodes)} nodes, {len(edges)} edges ({doc['metadata']['method']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    return Path(path)


def _layout(nodes: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """x = position (or an even spread within the layer for nodes summed over positions), y = layer."""
    rows: dict[float, list[dict[str, Any]]] = {}
    for node in nodes:
        rows.setdefault(float(node["layer"]), []).append(node)
    xy = {}
    for layer, row in rows.items():
        loose = [n for n in row if n["position"] is None]
        for n in row:
            if n["position"] is not None:
                xy[n["id"]] = (float(n["position"]), layer)
        for i, n in enumerate(loose):
            xy[n["id"]] = (i - (len(loose) - 1) / 2, layer)
    return xy


def _site_layer(site: Any) -> float:
    return site.layer + {"resid_pre": 0.0, "resid_mid": 0.5, "resid_post": 1.0}.get(site.kind, 0.5)


def circuit_document(result: Any) -> dict[str, Any]:
    """The graph of a head/MLP `CircuitResult`: senders and the nodes their receivers belong to (a
    query input belongs to its head, a key or value input to its key/value head, an MLP input to the
    MLP, the logits to the logit node); edge weights are the exact effects where confirmed."""
    provenance = result.provenance
    n_layers = int(provenance.get("n_layers", 1 + max([u.layer or 0 for u, _ in result.edges] + [0])))
    grouped = provenance.get("n_kv_heads") not in (None, provenance.get("n_heads"))
    weights = result.exact if result.exact is not None else result.estimate
    nodes: dict[str, dict[str, Any]] = {}

    def add(node_id: str, kind: str, layer: float | int, label: str) -> str:
        nodes.setdefault(node_id, {"id": node_id, "kind": kind, "layer": layer, "position": None, "label": label,
                                   "activation": None, "influence": 0.0})
        return node_id

    def sender(u: Any) -> str:
        if u.kind == "embed":
            return add("embed", "embedding", -1, "embedding")
        return add(u.label(), "head" if u.kind == "head" else "mlp", u.layer, u.label())

    def target(r: Any) -> str:
        if r.kind == "logits":
            return add("logits", "logit", n_layers, "metric")
        if r.kind == "mlp":
            return add(f"MLP{r.layer}", "mlp", r.layer, f"MLP{r.layer}")
        node_id = f"L{r.layer}KV{r.head}" if grouped and r.kind != "q" else f"L{r.layer}H{r.head}"
        return add(node_id, "head", r.layer, node_id)

    edges = [{"source": sender(u), "target": target(r), "weight": float(weights[i]), "input": r.kind}
             for i, (u, r) in enumerate(result.edges)]
    f = result.faithfulness
    scores = {"faithfulness": float(f.faithfulness.mean()), "completeness": float(f.completeness.mean()),
              "ablation": f.ablation}
    return graph_document(list(nodes.values()), edges, _metadata(provenance, scores))


def _metadata(provenance: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    return {"model": provenance.get("model"), "saes": provenance.get("saes"), "prompts": provenance.get("prompts"),
            "method": provenance.get("method"), "metric": provenance.get("metric"),
            "direction": provenance.get("direction"), "scores": scores, "provenance": provenance}


def latent_document(graph: Any, *, threshold: float = 0.0, labels: dict[Any, str] | None = None) -> dict[str, Any]:
    """The graph of a `LatentGraph`: edges whose |mean effect| is at least `threshold` (the last site's
    nodes feed the logit node with their node effect), the nodes they touch; `labels` maps a
    `LatentNode` to its label (e.g. its top activating tokens), the node's own label otherwise."""
    nodes, edges = _latent_parts(graph, threshold, labels or {})
    whole = latent_scores(graph)
    scores = {"replacement": whole.replacement, "completeness": whole.completeness, "threshold": threshold}
    return graph_document(nodes, edges, _metadata(graph.provenance, scores))


def latent_scores(graph: Any) -> GraphScores:
    """Replacement and completeness of a whole `LatentGraph` (every edge computed, no threshold)."""
    return graph_scores(*_latent_parts(graph, 0.0, {}))


def _latent_parts(graph: Any, threshold: float, labels: dict[Any, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    effect = graph.node_effect.mean(0)
    activation = graph.node_activation.mean(0)
    last = graph.sites[-1]
    raw = [(graph.nodes[u], graph.nodes[d], float(w)) for (u, d), w in zip(graph.edges, graph.edge_effect.mean(0))]
    raw += [(node, None, float(effect[j])) for j, node in enumerate(graph.nodes) if node.site == last]
    kept = [(u, d, w) for u, d, w in raw if abs(w) >= threshold and w != 0]
    used = {n for u, d, _ in kept for n in (u, d) if n is not None}
    nodes = [{"id": n.label(), "kind": n.kind, "layer": _site_layer(n.site), "position": n.pos,
              "label": labels.get(n, n.label()), "activation": float(activation[j]), "influence": 0.0,
              "site": n.site.hook_name, "latent": n.latent} for j, n in enumerate(graph.nodes) if n in used]
    nodes.append({"id": "logits", "kind": "logit", "layer": _site_layer(last) + 1, "position": None, "label": "metric",
                  "activation": None, "influence": 0.0})
    edges = [{"source": u.label(), "target": "logits" if d is None else d.label(), "weight": w} for u, d, w in kept]
    return nodes, edges


def mixed_document(result: Any, *, labels: dict[Any, str] | None = None) -> dict[str, Any]:
    """The graph of a `MixedCircuitResult`: its kept heads, MLPs, latents and error nodes, the logit
    node, and the edges between them (weights: their mean normalised noising effects); a latent's label
    is `labels[node]` where given (its top activating tokens), else its own label."""
    labels = labels or {}
    n_layers = int(result.provenance.get("n_layers", 1 + max([n.layer for n in result.nodes] + [0])))
    activation = result.activation
    nodes = []
    for j, node in enumerate(result.nodes):
        value = None if activation is None or math.isnan(float(activation[j])) else float(activation[j])
        is_latent = node.kind in ("latent", "error")
        nodes.append({"id": node.label(), "kind": node.kind, "layer": _site_layer(node.site) if is_latent else node.layer,
                      "position": node.pos if is_latent else None, "label": labels.get(node, node.label()),
                      "activation": value, "influence": 0.0, "estimate": float(result.estimate[j]),
                      "exact": None if result.exact is None else float(result.exact[j])}
                     | ({"site": node.site.hook_name, "latent": node.latent} if is_latent else {}))
    nodes.append({"id": "logits", "kind": "logit", "layer": n_layers, "position": None, "label": "metric",
                  "activation": None, "influence": 0.0})
    weights = result.edge_estimate if result.edge_estimate is not None else []
    edges = [{"source": u.label(), "target": "logits" if d.kind == "logits" else d.label(), "weight": float(w)}
             for (u, d), w in zip(result.edges, weights)]
    f = result.faithfulness
    scores = {"faithfulness": float(f.faithfulness.mean()), "completeness": float(f.completeness.mean()),
              "ablation": f.ablation, "error_share": result.error_share}
    return graph_document(nodes, edges, _metadata(result.provenance, scores))
