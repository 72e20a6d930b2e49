"""Benchmark: ROME's causal trace on the default model, ours against a naive loop in one run.

Noise: 3 × the standard deviation of the token embeddings over the project's training prompts
(ROME's k = 3), 10 seeded draws. Ours: `causal_trace` for hidden states, MLP windows and attention
windows (window 10), plus the severed state traces (MLP, attention frozen). Naive: ROME's own
`trace_with_patch` shape, one forward per restoration with the draws as its batch, the restoration
by hooks; it runs on `--naive-layers` (all layers by default) and its time is extrapolated to every
layer. The last line printed is one JSON object with the figures and where the effect sits.

`--count-flops` also counts both sides' matrix-multiply FLOPs (torch's FlopCounterMode, untimed
reruns) and times a bare matmul of the model's widths in the same run, and prints the ceiling: the
ratio our trace would reach if every FLOP ran at the bare-matmul rate and nothing else cost time.

    python benchmarks/causal_trace.py                                  # full naive loop (slow on a CPU)
    python benchmarks/causal_trace.py --layers 0,5,10,15,20,25,29 --naive-layers 10,20 --samples 3 --facts 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from _common import count_flops, matmul_rate
from patching import Site, load_model
from patching.tracing import NoiseConfig, causal_trace, embedding_std, window_layers
from patching.tracing.trace import noise_hook
from training.data.generated import all_prompts

FACTS = [("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
         ("The Taj Mahal is located in the country of", "Taj Mahal", " India")]


def naive_trace(model, tokens, subject, answer, noise, kind, layers, window=10):
    """One forward per (layer, position) restoration, the noise draws as its batch (ROME)."""
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    drawn = noise.draw(len(subject), model.cfg.d_model)
    batch = tokens.expand(noise.n_samples, -1)
    _, clean = model.run_with_cache(tokens)
    prob = torch.full((n_layers, n_pos), float("nan"))
    add = (Site(0).hook_name, lambda x, hook: noise_hook(drawn, subject)(x))
    for layer in layers:
        names = [Site(layer).hook_name] if kind == "state" else [
            Site(i, f"{kind}_out").hook_name for i in window_layers(layer, window, n_layers)]
        for p in range(n_pos):
            def restore(x, hook, p=p):
                x = x.clone()
                x[:, p] = clean[hook.name][:, p]
                return x
            logits = model.run_with_hooks(batch, fwd_hooks=[add] + [(name, restore) for name in names])
            prob[layer, p] = torch.softmax(logits[:, -1], -1)[:, answer].mean()
    return prob


def describe(result, subject):
    last_subject, last = subject[-1], len(result.tokens) - 1
    layer_s, _, p_s = result.peak([last_subject])
    layer_l, _, p_l = result.peak([last])
    layer, pos, p = result.peak()
    rows = [i for i in range(result.prob.shape[0]) if not result.prob[i].isnan().any()]
    profile = {"subject_last": [round(float(result.prob[i, last_subject]), 4) for i in rows],
               "last": [round(float(result.prob[i, last]), 4) for i in rows], "layers": rows}
    return {"peak": [layer, pos, round(p, 4)], "peak_token": result.tokens[pos],
            "subject_last_token_peak": [layer_s, round(p_s, 4)], "last_token_peak": [layer_l, round(p_l, 4)],
            "p_clean": round(result.p_clean, 4), "p_corrupted": round(result.p_corrupted, 4), "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-layers", help="comma-separated layers for the naive loop (default: all)")
    parser.add_argument("--layers", help="comma-separated layers our traces compute (default: all)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--facts", type=int, default=len(FACTS), help="trace only the first N facts")
    parser.add_argument("--kinds", default="state,mlp,attn,state_severed_mlp,state_severed_attn")
    parser.add_argument("--count-flops", action="store_true", help="count both sides' FLOPs; print the ceiling ratio")
    args = parser.parse_args()

    model = load_model()
    corpus = torch.cat([model.to_tokens(text, prepend_bos=False)[0] for _, text in all_prompts()])
    noise = NoiseConfig(scale=3 * embedding_std(model, corpus), n_samples=args.samples, seed=0)
    all_layers = list(range(model.cfg.n_layers))
    naive_layers = all_layers if args.naive_layers is None else [int(x) for x in args.naive_layers.split(",")]
    layers = all_layers if args.layers is None else [int(x) for x in args.layers.split(",")]
    kinds = args.kinds.split(",")
    figures = {"benchmark": "causal_trace", "model": model.cfg.model_name, "noise_scale": noise.scale,
               "n_samples": noise.n_samples, "layers": layers, "naive_layers": naive_layers,
               "full": layers == all_layers and naive_layers == all_layers, "torch_threads": torch.get_num_threads(),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "facts": {}}
    ours_total = naive_total = ours_flops = naive_flops = 0.0
    max_delta = 0.0
    with torch.inference_mode():
        for prompt, subject_text, answer_text in FACTS[: args.facts]:
            tokens, answer = model.to_tokens(prompt), model.to_single_token(answer_text)
            fact = figures["facts"][subject_text] = {}
            for name in kinds:
                kind, sever = (name, None) if "severed" not in name else ("state", name.rsplit("_", 1)[1])
                start = time.perf_counter()
                result = causal_trace(model, tokens, subject_text, answer, noise=noise, kind=kind, sever=sever,
                                      layers=layers)
                ours_s = time.perf_counter() - start
                fact[name] = describe(result, result.subject) | {"ours_s": round(ours_s, 2)}
                if sever is None and subject_text == FACTS[0][1]:
                    start = time.perf_counter()
                    reference = naive_trace(model, tokens, result.subject, answer, noise, kind, naive_layers)
                    naive_s = (time.perf_counter() - start) * len(layers) / len(naive_layers)
                    delta = (reference[naive_layers] - result.prob[naive_layers]).abs().max().item()
                    ours_total, naive_total, max_delta = ours_total + ours_s, naive_total + naive_s, max(max_delta, delta)
                    fact[name] |= {"naive_s_extrapolated": round(naive_s, 2), "max_abs_delta": delta}
                    if args.count_flops:
                        ours_f = count_flops(lambda: causal_trace(model, tokens, subject_text, answer, noise=noise,
                                                                  kind=kind, layers=layers))
                        naive_f = count_flops(lambda: naive_trace(model, tokens, result.subject, answer, noise, kind,
                                                                  naive_layers)) * len(layers) / len(naive_layers)
                        ours_flops, naive_flops = ours_flops + ours_f, naive_flops + naive_f
                        fact[name] |= {"ours_tflop": round(ours_f / 1e12, 3), "naive_tflop": round(naive_f / 1e12, 3)}
                print(name, subject_text, json.dumps(fact[name]), flush=True)
    figures |= {"ours_s": round(ours_total, 2), "naive_s": round(naive_total, 2),
                "ratio": round(naive_total / ours_total, 2), "max_abs_delta": max_delta}
    if args.count_flops:
        rate = matmul_rate(model)
        figures |= {"ours_tflop": round(ours_flops / 1e12, 3), "naive_tflop": round(naive_flops / 1e12, 3),
                    "flop_ratio": round(naive_flops / ours_flops, 2),
                    "ours_gflop_per_s": round(ours_flops / ours_total / 1e9, 1),
                    "naive_gflop_per_s": round(naive_flops / naive_total / 1e9, 1),
                    "bare_matmul_gflop_per_s": round(rate / 1e9, 1),
                    # our time if every FLOP ran at the bare-matmul rate and nothing else cost anything
                    "ceiling_ratio": round(naive_total / (ours_flops / rate), 2),
                    "gflop_per_s_needed_for_10x": round(10 * ours_flops / naive_total / 1e9, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
