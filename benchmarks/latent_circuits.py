"""Benchmark: the default model's latent and mixed circuits across a release's residual-stream SAEs.

For the IOI pair ("When Mary and John went to the store, John gave a drink to" → Mary vs John) and the
Eiffel Tower → Colosseum pair (Paris vs Rome), with every SAE of `--release` (release v2: blocks 0, 3,
…, 27 `hook_resid_pre`; release 1: blocks 5 and 15) spliced at once, it reports:
- the latent graph (`attribute_latent_edges`, noising, IG over `--steps` points): how many latents move,
  each site's error node share (|error effect| / Σ|node effects| at that site) and the whole graph's
  error share and circuit-tracer's replacement and completeness scores;
- the latent circuit's faithfulness and completeness curves (`latent_faithfulness`, `--ablation`) for
  the top n nodes by |IG effect|, n spaced geometrically up to every node;
- the mixed circuit (`find_circuit(saes=...)`: heads, MLPs, latents and error nodes; the embedding is the
  input): its nodes, faithfulness, completeness, the error nodes' share and its threshold curve, and its
  edges (`MixedCircuitResult.edges`, Marks et al.'s): how many, the share of their Σ|weight| on edges with
  an error node at either end, and the strongest;
- the top latents, labelled by their top activating tokens over `--label-rows` held-out rows (0: none);
- the latent graph's cost in forward-equivalents (AtP and IG; one plain forward of the pair timed here)
  and the agreement of both with exact edge patching (`patch_paths(saes=..., edges=...)`, noising) on the
  top `--agreement` edges by |IG| and as many random others: Spearman's rho and recall@50, each set
  alone and together;
- exact path patching with latents (`patch_paths(saes=...)`, by edge, noising) from the first site's
  `--path-senders` strongest nodes to the last site's `--path-receivers` strongest nodes and the logits,
  against a naive freeze-and-patch written here (two forward passes per edge) in the same run: wall
  time of each and max |Δ| of the metric.
Figures are measured here, on this machine; the last line printed is one JSON object.

    python benchmarks/latent_circuits.py                                  # release v2 (when shipped)
    python benchmarks/latent_circuits.py --release smollm2-135m-res       # release 1's layer-5 and 15 SAEs
    python benchmarks/latent_circuits.py --pairs eiffel --mixed-only       # the mixed circuit and its edges alone
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from _common import recall_at

from patching import LogitDiff
from patching.model.loading import load_model_for
from patching.model.sites import Site
from patching.paths import attribute_latent_edges, find_circuit, latent_faithfulness
from sae.registry import list_releases, load_release

PAIRS = {
    "ioi": ("When Mary and John went to the store, John gave a drink to",
            "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    "eiffel": ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
}


def release_saes(release: str, device: str) -> dict[Site, object]:
    """Every SAE the release ships, by site (refused, naming what exists, when the release is absent)."""
    shipped = list_releases()
    if release not in shipped:
        raise SystemExit(f"release {release!r} is not in the registry (it holds {sorted(shipped)})")
    # an id with a suffix (`blocks.15.hook_resid_pre-l1`) is a second SAE at a site the plain id covers
    return {Site.from_hook_name(sae_id): load_release(release, sae_id, device=device) for sae_id in shipped[release]
            if "-" not in sae_id}


def site_shares(graph) -> dict[str, float]:
    """Per site: |error node effect| / Σ |node effects| (mean over pairs first)."""
    mean = graph.node_effect.mean(0).abs()
    out = {}
    for site in graph.sites:
        at = [j for j, node in enumerate(graph.nodes) if node.site == site]
        errors = [j for j in at if graph.nodes[j].latent is None]
        total = float(mean[at].sum())
        out[site.hook_name] = float(mean[errors].sum()) / total if total > 0 else 0.0
    return out


def latent_curve(model, saes, clean, corrupted, metric, graph, ablation: str, points: int) -> list[dict]:
    """Faithfulness and completeness of the top n latent-graph nodes by |IG effect|."""
    mean = graph.node_effect.mean(0)
    order = torch.argsort(mean.abs(), descending=True, stable=True).tolist()
    counts = sorted({max(1, round(len(order) ** (j / max(points - 1, 1)))) for j in range(points)})
    out = []
    for n in counts:
        f = latent_faithfulness(model, saes, clean, corrupted, metric, [graph.nodes[j] for j in order[:n]], ablation=ablation)
        out.append({"nodes": n, "faithfulness": float(f.faithfulness.mean()), "completeness": float(f.completeness.mean())})
    return out


def naive_latent_path(model, saes, base, source, sender, receiver) -> float:
    """Freeze every head's z and MLP output at the base run, move `sender` (a latent or error node) to
    its source value; then in a fresh base run set only `receiver` (a later latent or error node, or
    the logits through the final residual's change) to what that frozen run gave it."""
    _, base_cache = model.run_with_cache(base)
    _, src_cache = model.run_with_cache(source)
    freeze = [(name, lambda x, hook: base_cache[hook.name]) for name in base_cache if name.endswith(("hook_z", "hook_mlp_out"))]
    sae, name = saes[sender.site], sender.site.hook_name

    def move(x, hook):
        z, z_src = sae.encode(x), sae.encode(src_cache[name])
        if sender.latent is None:
            return sae.decode(z) + (src_cache[name] - sae.decode(z_src))
        z_new = z.clone()
        z_new[..., sender.latent] = z_src[..., sender.latent]
        return x + sae.decode(z_new) - sae.decode(z)
    with model.hooks(fwd_hooks=freeze + [(name, move)]):
        _, frozen = model.run_with_cache(base)
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if receiver == "logits":
        hooks = [(final, lambda x, hook: x + frozen[final] - base_cache[final])]
    else:
        down, target = saes[receiver.site], receiver.site.hook_name

        def set_receiver(x, hook):
            z, z_frozen = down.encode(x), down.encode(frozen[target])
            if receiver.latent is None:
                return down.decode(z) + (frozen[target] - down.decode(z_frozen))
            z_new = z.clone()
            z_new[..., receiver.latent] = z_frozen[..., receiver.latent]
            return x + down.decode(z_new) - down.decode(z)
        hooks = [(target, set_receiver)]
    return model.run_with_hooks(base, fwd_hooks=hooks)[0, -1]


def path_check(model, saes, graph, clean, corrupted, metric, n_senders: int, n_receivers: int) -> dict:
    """patch_paths with latent senders and receivers against `naive_latent_path`, timed in the same run."""
    from patching.paths import LatentNode, Receiver, patch_paths

    mean = graph.node_effect.mean(0).abs()

    def strongest(site, n):
        at = [j for j, node in enumerate(graph.nodes) if node.site == site]
        return [graph.nodes[j] for j in sorted(at, key=lambda j: -float(mean[j]))[:n]]
    senders = strongest(graph.sites[0], n_senders)
    receivers = strongest(graph.sites[-1], n_receivers) + [Receiver("logits")]
    start = time.perf_counter()
    fast = patch_paths(model, clean, corrupted, metric, saes=saes, senders=senders, receivers=receivers, by="edge",
                       direction="noise", progress=False)
    fast_s = time.perf_counter() - start
    base, source = model.to_tokens(clean), model.to_tokens(corrupted)
    start = time.perf_counter()
    worst = 0.0
    with torch.inference_mode():
        for s, u in enumerate(senders):
            for g, r in enumerate(receivers):
                logits = naive_latent_path(model, saes, base, source, u, r if isinstance(r, LatentNode) else "logits")
                value = float(metric(logits[None], torch.tensor([0]))[0])
                worst = max(worst, abs(value - float(fast.metric[0, s, g])))
    naive_s = time.perf_counter() - start
    return {"senders": len(senders), "receivers": len(receivers), "seconds": round(fast_s, 3), "naive_seconds": round(naive_s, 3),
            "speedup": round(naive_s / fast_s, 2), "max_abs_delta": worst}


def edge_agreement(model, saes, clean, corrupted, metric, graphs: dict, n: int) -> dict:
    """AtP and IG edge effects against exact edge patching on IG's top `n` edges and `n` random others."""
    from patching.attribution.verify import spearman
    from patching.paths import patch_paths

    ig = graphs["ig"]
    flat = ig.edge_effect.mean(0)
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    rest = order[n:]
    chosen = torch.cat([order[:n], rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:n]]])
    pairs = [(ig.nodes[ig.edges[i][0]], ig.nodes[ig.edges[i][1]]) for i in chosen.tolist()]
    start = time.perf_counter()
    result = patch_paths(model, clean, corrupted, metric, saes=saes, edges=pairs, by="edge", direction="noise", progress=False)
    seconds = time.perf_counter() - start
    columns = [group[0] for group in result.receivers]
    exact = torch.tensor([float(result.mean_effect[result.senders.index(u), columns.index(d)]) for u, d in pairs])
    out = {"n": len(pairs), "exact_seconds": round(seconds, 2)}
    n_top = min(n, len(order))
    for method, graph in graphs.items():  # the AtP graph may keep other downstream nodes: compare where it has the edge
        by_label = {(graph.nodes[u].label(), graph.nodes[d].label()): float(v)
                    for (u, d), v in zip(graph.edges, graph.edge_effect.mean(0).tolist())}
        have = [j for j, (u, d) in enumerate(pairs) if (u.label(), d.label()) in by_label]
        estimate = torch.tensor([by_label[(pairs[j][0].label(), pairs[j][1].label())] for j in have])
        truth = exact[have]
        row = {"edges_compared": len(have), "spearman": round(spearman(estimate, truth), 4),
               "recall_at_50": recall_at(estimate, truth, 50), "max_abs_error": round(float((estimate - truth).abs().max()), 4)}
        for name, part in (("top", [i for i, j in enumerate(have) if j < n_top]), ("random", [i for i, j in enumerate(have) if j >= n_top])):
            if len(part) > 50:
                row[name] = {"spearman": round(spearman(estimate[part], truth[part]), 4),
                             "recall_at_50": recall_at(estimate[part], truth[part], 50)}
        out[method] = row
    return out


def labels_for(model, saes, nodes, rows: int) -> dict:
    if not rows or not nodes:
        return {}
    from patching.paths.labels import latent_labels
    from training.data.heldout import heldout_tokens

    return latent_labels(model, saes, heldout_tokens(model, n_rows=rows, context_size=64), nodes)


def mixed_summary(mixed, seconds: float) -> dict:
    """The mixed circuit's nodes, scores, curve and edges (count, error-node share of Σ|weight|, strongest)."""
    weights = mixed.edge_estimate if mixed.edge_estimate is not None else torch.zeros(0)
    touches_error = torch.tensor([any(getattr(n, "kind", None) == "error" for n in edge) for edge in mixed.edges],
                                 dtype=torch.bool)
    total = float(weights.abs().sum())
    order = torch.argsort(weights.abs(), descending=True, stable=True)[:10].tolist()
    return {"nodes": [{"node": n.label(), "exact": None if mixed.exact is None else float(mixed.exact[i])}
                      for i, n in enumerate(mixed.nodes)],
            "faithfulness": float(mixed.faithfulness.faithfulness.mean()),
            "completeness": float(mixed.faithfulness.completeness.mean()),
            "error_share": mixed.error_share, "seconds": round(seconds, 2),
            "edges": len(mixed.edges),
            "edge_error_share": float(weights.abs()[touches_error].sum()) / total if total > 0 else None,
            "top_edges": [{"upstream": mixed.edges[e][0].label(), "downstream": mixed.edges[e][1].label(),
                           "weight": float(weights[e])} for e in order],
            "curve": None if mixed.curve is None else {
                "nodes": mixed.curve.n_edges.tolist(), "faithfulness": mixed.curve.faithfulness.tolist(),
                "completeness": mixed.curve.completeness.tolist()}}


def one_mixed(model, saes, name: str, args) -> dict:
    """The mixed circuit alone (`--mixed-only`)."""
    clean, corrupted, answer, wrong = PAIRS[name]
    metric = LogitDiff(model.to_single_token(answer), model.to_single_token(wrong))
    start = time.perf_counter()
    mixed = find_circuit(model, clean, corrupted, metric, saes=saes, method=args.method, steps=args.steps, k=args.k,
                         threshold=args.threshold, ablation=args.ablation, curve_points=args.curve_points)
    return {"pair": name, "mixed_circuit": mixed_summary(mixed, time.perf_counter() - start)}


def timed_forward(model, tokens) -> float:
    start = time.perf_counter()
    model(tokens)
    return time.perf_counter() - start


def one_pair(model, saes, name: str, args) -> dict:
    clean, corrupted, answer, wrong = PAIRS[name]
    metric = LogitDiff(model.to_single_token(answer), model.to_single_token(wrong))
    start = time.perf_counter()
    graph = attribute_latent_edges(model, saes, clean, corrupted, metric, method="ig", steps=args.steps, k=args.latent_k,
                                   direction="noise", progress=False)
    graph_s = time.perf_counter() - start
    start = time.perf_counter()
    atp = attribute_latent_edges(model, saes, clean, corrupted, metric, method="atp", k=args.latent_k, direction="noise",
                                 progress=False)
    atp_s = time.perf_counter() - start
    with torch.inference_mode():
        tokens = model.to_tokens(corrupted)
        model(tokens)
        forward_s = min(timed_forward(model, tokens) for _ in range(5))
    agreement = (edge_agreement(model, saes, clean, corrupted, metric, {"atp": atp, "ig": graph}, args.agreement)
                 if args.agreement else None)
    scores = graph.scores()
    curve = latent_curve(model, saes, clean, corrupted, metric, graph, args.ablation, args.curve_points)
    start = time.perf_counter()
    mixed = find_circuit(model, clean, corrupted, metric, saes=saes, method=args.method, steps=args.steps, k=args.k,
                         threshold=args.threshold, ablation=args.ablation, curve_points=args.curve_points)
    mixed_s = time.perf_counter() - start
    mean = graph.node_effect.mean(0)
    top = [graph.nodes[j] for j in torch.argsort(mean.abs(), descending=True, stable=True).tolist()
           if graph.nodes[j].latent is not None][: args.top]
    labels = labels_for(model, saes, top, args.label_rows)
    paths = (path_check(model, saes, graph, clean, corrupted, metric, args.path_senders, args.path_receivers)
             if args.path_senders and len(saes) > 1 else None)
    return {
        "pair": name, "metric_clean": float(graph.metric_clean[0]), "metric_corrupted": float(graph.metric_corrupted[0]),
        "latent_graph": {"nodes": len(graph.nodes), "edges": len(graph.edges), "seconds": round(graph_s, 2),
                         "forward_s": round(forward_s, 4), "ig_forward_equivalents": round(graph_s / forward_s, 1),
                         "atp_seconds": round(atp_s, 2), "atp_forward_equivalents": round(atp_s / forward_s, 1),
                         "agreement": agreement,
                         "error_share_by_site": site_shares(graph), "replacement": scores.replacement,
                         "completeness": scores.completeness, "curve": curve},
        "top_latents": [{"node": n.label(), "effect": float(mean[graph.nodes.index(n)]), "label": labels.get(n)} for n in top],
        "mixed_circuit": mixed_summary(mixed, mixed_s),
        "latent_paths": paths,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default="smollm2-135m-res-v2")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    parser.add_argument("--steps", type=int, default=10, help="IG points (latent graph and mixed ranking)")
    parser.add_argument("--latent-k", type=int, default=16, help="downstream nodes per site with incoming edges")
    parser.add_argument("--k", type=int, default=40, help="at most this many nodes in the mixed circuit")
    parser.add_argument("--threshold", type=float, default=0.02, help="the mixed circuit's node threshold")
    parser.add_argument("--ablation", default="resample", choices=("resample", "zero", "mean"))
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--top", type=int, default=10, help="top latents to label")
    parser.add_argument("--label-rows", type=int, default=64)
    parser.add_argument("--agreement", type=int, default=200, help="top and random edges checked by exact patching (0: none)")
    parser.add_argument("--path-senders", type=int, default=8, help="first-site nodes for the path check (0: none)")
    parser.add_argument("--path-receivers", type=int, default=4, help="last-site nodes for the path check")
    parser.add_argument("--method", default="eap_ig", choices=("eap", "eap_ig", "atp*"), help="the mixed circuit's ranking")
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed circuit and its edges")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    saes = release_saes(args.release, args.device)
    model = load_model_for(next(iter(saes.values())), device=args.device)  # the SAEs' weight processing
    results = []
    for name in args.pairs:
        result = one_mixed(model, saes, name, args) if args.mixed_only else one_pair(model, saes, name, args)
        m = result["mixed_circuit"]
        graph = "" if args.mixed_only else f"latent graph {result['latent_graph']['nodes']} nodes; "
        print(f"{name}: {graph}mixed circuit {len(m['nodes'])} nodes, {m['edges']} edges (error-node share of edge "
              f"weight {m['edge_error_share']}), faithfulness {m['faithfulness']:.3f}, completeness "
              f"{m['completeness']:.3f}, error share {m['error_share']:.2f}")
        results.append(result)
    print(json.dumps({"benchmark": "latent_circuits", "release": args.release, "sites": [s.hook_name for s in saes],
                      "device": args.device, "machine": platform.machine(), "torch": torch.__version__,
                      "settings": {k: v for k, v in vars(args).items() if k != "device"}, "pairs": results}))


if __name__ == "__main__":
    main()
