"""Benchmark: edge attribution and circuits on the default model's head/MLP graph, against exact
path patching in the same run.

On the IOI pair ("When Mary and John went to the store, John gave a drink to" → Mary vs John) and
the graph of the embedding, every head and MLP of the chosen layers into every q/k/v, MLP input and
the logits, it reports:
- EAP, EAP-IG over the inputs and EAP-IG over each layer's activations (8 steps) over every edge: wall
  time and cost in forward-equivalents (the time of one plain forward pass of the pair's prompt,
  measured here);
- their agreement with exact path patching of single edges (`patch_paths(edges=...)`) on the top 200
  edges by |EAP-IG| and 200 random other edges, each set on its own and together: Spearman's rho and
  recall@k (k = 50, the overlap of the k largest |estimate| and |exact|);
- `find_circuit` at a threshold: edges kept, faithfulness, completeness, the threshold curve and time
  to the circuit; the same with `method="atp*"` (edges into queries and keys by the QK fix with GradDrop)
  unless `--skip-atp-star`, and the q/k edges one circuit keeps that the other does not;
- for query and key heads per position (`patch_heads` units), AtP, AtP with the QK fix and AtP* (QK
  fix + GradDrop, unsigned) against exact patching: Spearman's rho (signed, and of magnitudes, the only
  one AtP* has), recall@20 of magnitudes.
The last line printed is one JSON object.

    python benchmarks/circuits.py                   # every layer (slow on a CPU)
    python benchmarks/circuits.py --n-layers 4      # the default model cut to 4 layers
    python benchmarks/circuits.py --layers 20-29    # a contiguous range of layers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _common import recall_at

from patching import LogitDiff, load_model
from patching.attribution import attribute_qk
from patching.attribution.verify import spearman
from patching.paths import attribute_edges, find_circuit, patch_paths, receivers_of, upstream_nodes
from patching.paths.nodes import reaches
from patching.sweep import patch_heads

IOI = ("When Mary and John went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", help="first-last layers (default: every layer)")
    parser.add_argument("--n-layers", type=int, default=None, help="cut the default model to its first n layers")
    parser.add_argument("--threshold", type=float, default=0.05, help="find_circuit's threshold (default 0.05)")
    parser.add_argument("--skip-qk", action="store_true", help="skip the query/key comparison")
    parser.add_argument("--skip-atp-star", action="store_true", help="skip find_circuit(method='atp*')")
    args = parser.parse_args()

    model = load_model(n_layers=args.n_layers)
    lo, hi = (0, model.cfg.n_layers - 1) if args.layers is None else map(int, args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    clean, corrupted = model.to_tokens(IOI[0]), model.to_tokens(IOI[1])
    metric = LogitDiff(model.to_single_token(IOI[2]), model.to_single_token(IOI[3]))
    senders, receivers = upstream_nodes(model, layers), receivers_of(model, layers)
    existing = [(s, r) for s, u in enumerate(senders) for r, v in enumerate(receivers) if reaches(u, v, model)]
    with torch.inference_mode():
        forward_s = statistics.median(timed(lambda: model(corrupted))[1] for _ in range(5))
    figures = {"benchmark": "circuits", "model": model.cfg.model_name, "layers": [lo, hi],
               "full": layers == list(range(model.cfg.n_layers)), "edges": len(existing), "forward_s": round(forward_s, 4)}

    estimates = {}
    for method, ig in (("eap", "inputs"), ("eap_ig", "inputs"), ("eap_ig_activations", "activations")):
        result, seconds = timed(lambda: attribute_edges(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                                                        method=method[:6], ig=ig, steps=8, progress=False))
        estimates[method] = result.mean_effect
        figures[method] = {"seconds": round(seconds, 3), "forward_equivalents": round(seconds / forward_s, 1)}
        print(f"{method:7s} {len(existing)} edges  {seconds:7.2f} s  = {seconds / forward_s:6.1f} forwards", flush=True)

    flat = torch.tensor([float(estimates["eap_ig"][s, r]) for s, r in existing])
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    rest = order[200:]
    sampled = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:200]]
    checked = [existing[i] for i in torch.cat([order[:200], sampled]).tolist()]
    exact_result, exact_s = timed(lambda: patch_paths(model, clean, corrupted, metric, edges=[
        (senders[s], receivers[r]) for s, r in checked], by="edge", progress=False))
    columns = [group[0] for group in exact_result.receivers]
    exact = torch.tensor([float(exact_result.mean_effect[exact_result.senders.index(senders[s]),
                                                         columns.index(receivers[r])]) for s, r in checked])
    figures["exact_edges"] = {"n": len(checked), "seconds": round(exact_s, 3)}
    n_top = min(200, len(order))
    for method, scores in estimates.items():
        estimate = torch.tensor([float(scores[s, r]) for s, r in checked])
        figures[method].update({"spearman": round(spearman(estimate, exact), 4), "recall_at_50": recall_at(estimate, exact, 50),
                                "max_abs_error": round(float((estimate - exact).abs().max()), 4)})
        for name, part in (("top200", slice(0, n_top)), ("random200", slice(n_top, None))):
            if len(estimate[part]) > 50:
                figures[method][name] = {"spearman": round(spearman(estimate[part], exact[part]), 4),
                                         "recall_at_50": recall_at(estimate[part], exact[part], 50)}
        print(f"{method:7s} vs exact on {len(checked)} edges: spearman {figures[method]['spearman']:.3f}  "
              f"recall@50 {figures[method]['recall_at_50']:.2f}", flush=True)

    circuit, circuit_s = timed(lambda: find_circuit(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                                                    threshold=args.threshold, method="eap_ig", steps=8))
    f = circuit.faithfulness
    figures["circuit"] = {"threshold": args.threshold, "edges": len(circuit.edges), "seconds": round(circuit_s, 3),
                          "faithfulness": round(float(f.faithfulness.mean()), 4),
                          "completeness": round(float(f.completeness.mean()), 4),
                          "curve": {"n_edges": circuit.curve.n_edges.tolist(),
                                    "faithfulness": [round(v, 4) for v in circuit.curve.faithfulness.tolist()],
                                    "completeness": [round(v, 4) for v in circuit.curve.completeness.tolist()]},
                          "top_edges": [[u.label(), r.label()] for u, r in circuit.edges[:10]]}
    print(f"circuit at {args.threshold}: {len(circuit.edges)} edges, faithfulness {float(f.faithfulness.mean()):.3f}, "
          f"completeness {float(f.completeness.mean()):.3f}, {circuit_s:.1f} s", flush=True)

    if not args.skip_atp_star:
        star, star_s = timed(lambda: find_circuit(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                                                  threshold=args.threshold, method="atp*", curve_points=0))
        qk_only = {e for e in star.edges if e[1].kind in ("q", "k")}
        qk_eap = {e for e in circuit.edges if e[1].kind in ("q", "k")}
        figures["circuit_atp_star"] = {"edges": len(star.edges), "seconds": round(star_s, 3),
                                       "faithfulness": round(float(star.faithfulness.faithfulness.mean()), 4),
                                       "completeness": round(float(star.faithfulness.completeness.mean()), 4),
                                       "qk_edges": len(qk_only), "qk_edges_eap_ig": len(qk_eap),
                                       "qk_edges_only_atp_star": sorted(f"{u.label()}->{r.label()}" for u, r in qk_only - qk_eap)}
        print(f"atp* circuit at {args.threshold}: {len(star.edges)} edges ({len(qk_only)} into q/k, EAP-IG's {len(qk_eap)}), "
              f"faithfulness {float(star.faithfulness.faithfulness.mean()):.3f}, {star_s:.1f} s", flush=True)

    if not args.skip_qk:
        figures["qk"] = {}
        for kind in ("q", "k"):
            exact_heads = patch_heads(model, clean, corrupted, metric, kind=kind, by="position", layers=layers,
                                      progress=False).mean_effect
            row = {}
            for method in ("atp", "atp_qk", "atp*"):
                result, seconds = timed(lambda: attribute_qk(model, clean, corrupted, metric, kind=kind, method=method,
                                                             layers=tuple(layers)))
                estimate = result.mean_effect
                row[method] = {"spearman": None if method == "atp*" else round(spearman(estimate, exact_heads), 4),
                               "spearman_abs": round(spearman(estimate.abs(), exact_heads.abs()), 4),
                               "recall_at_20": recall_at(estimate, exact_heads, 20),
                               "max_abs_error": None if method == "atp*" else round(float((estimate - exact_heads).abs().max()), 4),
                               "forward_equivalents": round(seconds / forward_s, 1)}
            figures["qk"][kind] = row
            print(f"{kind} heads by position vs exact (|rho|, recall@20): "
                  + ", ".join(f"{m} {row[m]['spearman_abs']:.3f} {row[m]['recall_at_20']:.2f}" for m in row), flush=True)

    figures.update({"torch_threads": torch.get_num_threads(),
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
