"""`latentpatch circuit`: a circuit of heads and MLPs for a prompt pair, with its faithfulness and completeness.

Every edge between the embedding, heads and MLPs and the heads' q/k/v inputs, MLP inputs and the logits is
ranked by edge attribution (EAP or EAP-IG), the candidates are confirmed by exact path patching, and the
edges whose noising effect clears `--threshold` form the circuit; faithfulness and completeness are measured
with the missing edges ablated (Marks et al. 2024's definitions).

With `--sae` (repeatable; residual-stream SAEs), the latent graph of Marks et al. is computed too: every
latent and error node at the SAEs' sites, the edges between consecutive sites into the `--latent-k`
strongest nodes, and circuit-tracer's replacement and completeness scores. `--graph-json` writes the latent
graph (with `--sae`) or the head circuit as `latentpatch.graph/1` JSON (docs/guides/paths.md). With `--sae`
and `--mixed` the circuit itself is one of nodes (`find_circuit(saes=...)`): heads, MLPs and every latent
and error node at the SAEs' sites, ranked by attribution, confirmed by exact patching, with the edges
between the kept nodes (Marks et al.); `--graph-json` then writes that circuit's graph. `--method
atp*` scores edges into queries and keys by AtP*'s QK fix with GradDrop (with `--mixed`: every node,
its share through the queries and keys of the heads reading it QK-fixed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentpatch.cli.common import (
    COUNT_MAX, add_pair_command, bounded_int, check_out, load_plain_model, pair_metric, resolve_sae, table,
)

JSON_OUTPUT = {
    "edges": "the circuit's edges, by decreasing |effect|: sender, receiver, estimate, exact (null when not confirmed)",
    "faithfulness": "mean over pairs of (M(C) - M(empty)) / (M(clean) - M(empty))",
    "completeness": "the same for the complement of the circuit in the graph",
    "ablation": "what a missing edge carries (resample, zero, mean, position_mean)",
    "metric_clean": "the metric on each pair's clean prompt",
    "metric_corrupted": "the metric on each pair's corrupted prompt",
    "saved_to": "the result folder (--out), or null",
    "latent_graph": "with --sae: sites, node and edge counts, replacement and completeness scores and the top "
                    "edges (upstream, downstream, mean normalised noising effect); null without --sae",
    "graph_json": "the graph JSON written (--graph-json: the mixed circuit's with --mixed, else the latent graph's with "
                  "--sae, else the circuit's), or null",
    "mixed_circuit": "with --mixed: the kept nodes (node, kind, estimate, exact), the edges between them and into the "
                     "logits (upstream, downstream, estimate: mean normalised noising effect) and the error nodes' share "
                     "of the SAE nodes' estimated effect (faithfulness and completeness above are then the node "
                     "circuit's; edges is empty); null without --mixed",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `circuit` to the `latentpatch` parser."""
    p = add_pair_command(sub, "circuit", "find a circuit of heads and MLPs, with faithfulness and completeness",
                         sae=False, description=__doc__.split("\n\n")[1])
    p.add_argument("--threshold", type=float, default=0.05, help="keep edges with |effect| at least this (default 0.05)")
    p.add_argument("--k", type=bounded_int(1, COUNT_MAX), default=None, help="and at most this many edges")
    p.add_argument("--method", choices=("eap", "eap_ig", "atp*"), default="eap_ig",
                   help="attribution ranking candidates (atp*: edges into queries and keys by the QK fix with GradDrop)")
    p.add_argument("--mixed", action="store_true",
                   help="with --sae: a circuit of nodes (heads, MLPs, SAE latents and error nodes) instead of "
                        "head/MLP edges")
    p.add_argument("--ablation", choices=("resample", "zero", "mean", "position_mean"), default="resample",
                   help="what missing edges carry (default resample: the corrupted run's output)")
    p.add_argument("--max-candidates", type=bounded_int(1, COUNT_MAX), default=500,
                   help="at most this many candidate edges are patched exactly (default 500)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers whose nodes form the graph (default: all)")
    p.add_argument("--sae", action="append", default=None,
                   help="an SAE (folder or RELEASE/SAE_ID) on the residual stream whose latents join the graph; repeat "
                        "for several sites (the model is loaded with the first SAE's weight processing)")
    p.add_argument("--latent-k", type=bounded_int(1, COUNT_MAX), default=32,
                   help="downstream latent nodes per site whose incoming edges are computed (default 32)")
    p.add_argument("--graph-json", type=Path, default=None,
                   help="write the graph (the latent graph with --sae, else the circuit) as JSON here")
    p.add_argument("--graph-threshold", type=float, default=0.01,
                   help="latent-graph edges with |effect| at least this go into --graph-json (default 0.01)")
    p.add_argument("--label-rows", type=bounded_int(0, 4096), default=32,
                   help="label latents in --graph-json by their top activating tokens over this many held-out rows of "
                        "64 tokens, or the model's context where shorter (default 32; 0 for no labels)")
    p.set_defaults(run=run_circuit, json_output=JSON_OUTPUT, describe=describe_circuit)


def run_circuit(args: argparse.Namespace) -> dict[str, Any]:
    from patching.errors import PatchingError
    from patching.model.loading import DEFAULT_MODEL as DEFAULT
    from patching.model.loading import load_model_for
    from patching.paths import attribute_latent_edges, find_circuit, receivers_of, upstream_nodes
    from patching.paths.latents import check_latent_sites

    if args.align is not None:
        raise PatchingError("circuit needs prompts of equal token length (--align is not supported)")
    for option, value in (("--threshold", args.threshold), ("--graph-threshold", args.graph_threshold)):
        if not value >= 0 or value == float("inf"):
            raise PatchingError(f"{option} must be a finite number >= 0, got {value}")
    if args.direction != "denoise":
        raise PatchingError("circuit measures noising effects itself; leave --direction at its default")
    if args.mixed and (not args.sae or args.layers):
        raise PatchingError("--mixed needs --sae and takes every layer (no --layers)")
    check_out(args)
    if args.graph_json is not None:  # written last: checked before the model loads and the search runs
        from training.paths import check_output_file

        check_output_file(args.graph_json, option="--graph-json")
    saes = [resolve_sae(name) for name in args.sae or []]
    model = load_plain_model(args.model) if not saes else load_model_for(saes[0], args.model if args.model != DEFAULT else None)
    metric, _ = pair_metric(args, model)
    if saes:
        check_latent_sites(model, saes, None)  # before the circuit's forward passes
    label_rows = _label_rows(args, model) if saes and args.graph_json is not None else None
    layers = list(dict.fromkeys(args.layers)) if args.layers else None  # `--layers 0 0` built every node twice
    graph: dict[str, Any] = ({"saes": saes} if args.mixed else
                             {"senders": upstream_nodes(model, layers), "receivers": receivers_of(model, layers)})
    result = find_circuit(model, args.clean, args.corrupted, metric, **graph, threshold=args.threshold, k=args.k,
                          method=args.method, ablation=args.ablation, max_candidates=args.max_candidates)
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "circuit.png")
    latent = (attribute_latent_edges(model, saes, args.clean, args.corrupted, metric, k=args.latent_k, direction="noise",
                                     progress=False) if saes else None)
    if args.graph_json is not None and args.mixed:
        nodes = [n for n in result.nodes if getattr(n, "latent", None) is not None]
        labels = None if label_rows is None or not nodes else _latent_labels(model, saes, label_rows, nodes)
        result.to_graph_json(args.graph_json, labels=labels)
    elif args.graph_json is not None and latent is not None:
        labels = None if label_rows is None else _labels(model, saes, latent, label_rows, args.graph_threshold)
        latent.to_graph_json(args.graph_json, threshold=args.graph_threshold, labels=labels)
    elif args.graph_json is not None:
        result.to_graph_json(args.graph_json)
    f = result.faithfulness
    edges = [] if args.mixed else [{"sender": u.label(), "receiver": r.label(), "estimate": float(result.estimate[i]),
                                    "exact": None if result.exact is None else float(result.exact[i])}
                                   for i, (u, r) in enumerate(result.edges)]
    return {"edges": edges, "faithfulness": float(f.faithfulness.mean()), "completeness": float(f.completeness.mean()),
            "ablation": f.ablation, "metric_clean": f.metric_clean.tolist(), "metric_corrupted": f.metric_corrupted.tolist(),
            "saved_to": str(args.out) if args.out else None, "latent_graph": None if latent is None else _latent_summary(latent),
            "graph_json": str(args.graph_json) if args.graph_json else None,
            "mixed_circuit": _mixed_summary(result) if args.mixed else None}


def _mixed_summary(result: Any) -> dict[str, Any]:
    return {"nodes": [{"node": n.label(), "kind": n.kind, "estimate": float(result.estimate[i]),
                       "exact": None if result.exact is None else float(result.exact[i])} for i, n in enumerate(result.nodes)],
            "edges": [{"upstream": u.label(), "downstream": d.label(), "estimate": float(w)}
                      for (u, d), w in zip(result.edges, [] if result.edge_estimate is None else result.edge_estimate)],
            "error_share": result.error_share}


def _label_rows(args: argparse.Namespace, model: Any) -> Any:
    """The held-out rows latent labels are read from, loaded before the search (None for no labels)."""
    if args.label_rows == 0:
        return None
    from patching.model import tl_compat
    from training.data.heldout import heldout_tokens

    # Rows of 64 tokens, or the model's whole context where it is shorter (a tiny model's 16).
    return heldout_tokens(model, n_rows=args.label_rows, context_size=min(64, tl_compat.n_ctx(model)))


def _labels(model: Any, saes: list[Any], graph: Any, rows: Any, threshold: float) -> dict[Any, str]:
    """Top-activating-token labels of the latents the written graph keeps."""
    mean = graph.edge_effect.mean(0)
    kept = {graph.nodes[i] for e, (u, d) in enumerate(graph.edges) if abs(float(mean[e])) >= threshold for i in (u, d)}
    kept |= graph.circuit(threshold)
    return _latent_labels(model, saes, rows, sorted(kept, key=lambda n: n.label()))


def _latent_labels(model: Any, saes: list[Any], rows: Any, nodes: list[Any]) -> dict[Any, str]:
    from patching.paths.labels import latent_labels

    return latent_labels(model, saes, rows, nodes)


def _latent_summary(graph: Any) -> dict[str, Any]:
    scores = graph.scores()
    return {"sites": [site.hook_name for site in graph.sites], "n_nodes": len(graph.nodes), "n_edges": len(graph.edges),
            "replacement": scores.replacement, "completeness": scores.completeness,
            "top_edges": [{"upstream": u, "downstream": d, "effect": e} for u, d, e in graph.top_edges(10)]}


def describe_circuit(result: dict[str, Any]) -> str:
    if result["mixed_circuit"] is not None:
        m = result["mixed_circuit"]
        lines = [f"A circuit of {len(m['nodes'])} nodes and {len(m['edges'])} edges: faithfulness {result['faithfulness']:.3f}, completeness "
                 f"{result['completeness']:.3f} ({result['ablation']} ablation); error nodes carry {m['error_share']:.2f} "
                 "of the SAE nodes' estimated effect.", ""]
        lines.append(table([("node", "kind", "estimate", "exact")] + [
            (n["node"], n["kind"], f"{n['estimate']:+.3f}", "-" if n["exact"] is None else f"{n['exact']:+.3f}")
            for n in m["nodes"]]))
        if m["edges"]:
            top = sorted(m["edges"], key=lambda e: -abs(e["estimate"]))[:10]
            lines += ["", f"Strongest of its {len(m['edges'])} edges:", ""]
            lines.append(table([("upstream", "downstream", "estimate")]
                               + [(e["upstream"], e["downstream"], f"{e['estimate']:+.3f}") for e in top]))
        return "\n".join(lines + _tail(result))
    lines = [f"A circuit of {len(result['edges'])} edges: faithfulness {result['faithfulness']:.3f}, completeness "
             f"{result['completeness']:.3f} (missing edges: {result['ablation']} ablation).", ""]
    rows: list[tuple[Any, ...]] = [("sender", "receiver", "estimate", "exact")]
    rows += [(e["sender"], e["receiver"], f"{e['estimate']:+.3f}", "-" if e["exact"] is None else f"{e['exact']:+.3f}")
             for e in result["edges"]]
    lines.append(table(rows))
    return "\n".join(lines + _tail(result))


def _tail(result: dict[str, Any]) -> list[str]:
    """The latent graph's summary and where things were written."""
    lines: list[str] = []
    if result["latent_graph"] is not None:
        g = result["latent_graph"]
        lines += ["", f"Latent graph over {', '.join(g['sites'])}: {g['n_nodes']} nodes, {g['n_edges']} edges; replacement "
                      f"score {g['replacement']:.3f}, completeness {g['completeness']:.3f}.", ""]
        lines.append(table([("upstream", "downstream", "effect")]
                           + [(e["upstream"], e["downstream"], f"{e['effect']:+.3f}") for e in g["top_edges"]]))
    if result["graph_json"]:
        lines += ["", f"Graph JSON written to {result['graph_json']}."]
    if result["saved_to"]:
        lines += ["", f"Saved to {result['saved_to']}."]
    return lines
