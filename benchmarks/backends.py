"""Benchmark: the two model backends (HookedTransformer, TransformerBridge) on the default model.

In one process, on the same weights: the forward pass of each backend (median of `--repeat`) and the
largest logit difference between them; the residual trace of the Eiffel Tower -> Colosseum pair
(`resid_pre`, `--layers` x every position) and the head-z sweep (every head of `--layers`, all
positions) and the Eiffel latent sweep (a seeded random TopK SAE at `--sae-layer`, every differing
latent at every position; the naive loop timed on `--naive-sample` units and extrapolated) as the
naive one-forward-per-patch loop on each backend and through our sweep engine. The engine's
shortcuts (rows joining at their layer from the cached residual, after the base run's keys and
values) run on both backends: on the Bridge its blocks are driven from the layer
(`patching/model/tl_bridge_blocks.py`). Each ratio is also given against bare forward passes
(`*_vs_forwards`: patches x the median forward), since a backend's `run_with_hooks` may cost more
than its forward. Times are this process's CPU time by default (`--clock wall` for elapsed time):
with torch on one thread that is the time the benchmark computed, which other jobs on a shared
machine do not inflate (`--threads N --clock wall`: elapsed time on N threads). Our engine's
times are the median of `--engine-repeat` calls, the first call's beside them; each naive loop is
timed once. `--count-flops` also counts the residual trace's FLOPs on each side and
prints its ceiling (`measure_flops`); `--bound-generation N` times KV-cached against uncached greedy
decoding inside a bound few-shot prefix. The last line printed is one JSON object.

    nice python benchmarks/backends.py --layers 0,10,20,29 --repeat 5
    nice python benchmarks/backends.py --layers $(seq -s, 0 29) --count-flops --bound-generation 16
    python benchmarks/backends.py --layers $(seq -s, 0 29) --threads 2 --clock wall   # a quiet machine
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from _common import benchmark_sae, count_flops, matmul_rate
from patch_sweep import naive_sweep

from patching import LogitDiff, Site, load_model, patch_heads, patch_latents, patch_residual
from patching.model.tl_bridge import BackendUnsupportedError

FACT = ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome")


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
"""`--clock`: this process's CPU time (torch on one thread, so the time it computed: a shared
machine's other jobs do not enter it) or wall time."""
CLOCK = CLOCKS["cpu"]


def timings(fn, repeat):
    """The last result and the times (`--clock`) of `repeat` calls."""
    times, result = [], None
    for _ in range(repeat):
        start = CLOCK()
        result = fn()
        times.append(CLOCK() - start)
    return result, times


def timed(fn, repeat):
    """The last result and the median time of `repeat` calls."""
    result, times = timings(fn, repeat)
    return result, statistics.median(times)


def timed_engine(fn, args, figures, key):
    """Our engine's last result; `figures[key]`: the median time of `--engine-repeat` calls, and
    `figures[key without _s + "_first_s"]`: the first call's, one-time costs and all (the naive
    loops run once: their hundreds of forwards amortise theirs)."""
    result, times = timings(fn, args.engine_repeat)
    figures[key], figures[key[:-2] + "_first_s"] = statistics.median(times), times[0]
    return result


def naive_trace(model, clean, corrupted, layers, answer, wrong):
    """One full forward per (layer, position): clean resid_pre put into the corrupted run."""
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    out = torch.empty(len(layers), clean.shape[1], dtype=torch.float64)
    for i, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for p in range(clean.shape[1]):
            def put(resid, hook, p=p, name=name):
                resid[:, p] = cache[name][:, p]
                return resid
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, put)])
            out[i, p] = (logits[0, -1, answer] - logits[0, -1, wrong]).double()
    return out


def naive_heads(model, clean, corrupted, layers, answer, wrong):
    """One full forward per (layer, head): the clean head's z at every position put into the corrupted run."""
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
    n_heads = model.cfg.n_heads
    out = torch.empty(len(layers), n_heads, dtype=torch.float64)
    for i, layer in enumerate(layers):
        name = f"blocks.{layer}.attn.hook_z"
        for h in range(n_heads):
            def put(z, hook, h=h, name=name):
                z[:, :, h] = cache[name][:, :, h]
                return z
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, put)])
            out[i, h] = (logits[0, -1, answer] - logits[0, -1, wrong]).double()
    return out


def measure_heads(model, args, clean, corrupted, answer, wrong, figures):
    with torch.inference_mode():
        naive, figures["naive_heads_s"] = timed(lambda: naive_heads(model, clean, corrupted, args.layers, answer, wrong), 1)
    ours = timed_engine(lambda: patch_heads(model, clean, corrupted, LogitDiff(answer, wrong), kind="z", layers=args.layers,
                                            progress=False), args, figures, "engine_heads_s")
    figures["engine_heads_vs_naive_max_abs"] = (ours.metric[0].reshape(naive.shape) - naive).abs().max().item()
    figures["engine_heads_speedup"] = figures["naive_heads_s"] / figures["engine_heads_s"]
    figures["engine_heads_vs_forwards"] = naive.numel() * figures["forward_s"] / figures["engine_heads_s"]


def measure_latents(model, args, clean, corrupted, answer, wrong, figures):
    """The Eiffel latent sweep against the naive loop on a seeded sample of its units (extrapolated)."""
    sae = benchmark_sae(model, None, args.sae_layer)
    metric = LogitDiff(answer, wrong)
    with torch.inference_mode():
        result = timed_engine(lambda: patch_latents(model, sae, clean, corrupted, metric, progress=False), args, figures,
                              "engine_latents_s")
        units = result.units
        sample = sorted(random.Random(0).sample(range(len(units)), min(args.naive_sample, len(units))))
        naive, sample_s = timed(lambda: naive_sweep(model, sae, Site(args.sae_layer), clean, corrupted,
                                                    [units[i] for i in sample], metric), 1)
    figures["latent_units"], figures["naive_latents_sampled"] = len(units), len(sample)
    figures["naive_latents_s"] = sample_s * len(units) / len(sample)
    figures["engine_latents_vs_naive_max_abs"] = (naive - result.metric[0, sample]).abs().max().item()
    figures["engine_latents_speedup"] = figures["naive_latents_s"] / figures["engine_latents_s"]
    figures["engine_latents_vs_forwards"] = len(units) * figures["forward_s"] / figures["engine_latents_s"]


def measure_bound_generation(model, new_tokens, figures):
    """Greedy decoding of one safety request after the suite's few-shot chat context bound as a
    prefix (`bound_prefix`): KV-cached (one position a step) against uncached (every step reruns the
    positions after the prefix), in tokens per second of `--clock` time; both must give the same tokens."""
    from patching.model import tl_compat
    from patching.safety.prompts import SafetySuite
    from patching.safety.score import query_start, tokenize_chat
    from patching.splice.generate import generate

    suite = SafetySuite()
    (tokens,), start = tokenize_chat(model, suite, [suite.pairs[0][0]]), query_start(model, suite)
    out = {}
    with torch.inference_mode(), tl_compat.bound_prefix(model, tokens[:, :start]):
        for cached in (True, False):
            out[cached], seconds = timed(lambda cached=cached: generate(model, tokens[:, start:], new_tokens,
                                                                        use_kv_cache=cached), 1)
            figures[f"bound_{'cached' if cached else 'uncached'}_tokens_per_s"] = new_tokens / seconds
    figures["bound_prefix_tokens"], figures["bound_query_tokens"] = start, tokens.shape[1] - start
    figures["bound_cached_vs_uncached"] = (figures["bound_cached_tokens_per_s"]
                                           / figures["bound_uncached_tokens_per_s"])
    figures["bound_same_tokens"] = bool(torch.equal(out[True], out[False]))


def measure_flops(model, args, clean, corrupted, answer, wrong, figures):
    """`--count-flops`: the residual trace's matrix-multiply FLOPs on each side (untimed reruns) and
    a bare matmul of the model's widths at M=2000 on the same clock: the FLOP ratio (naive / engine)
    and the ceiling, the ratio the engine would reach if its FLOPs ran at the bare-matmul rate
    (FLOP ratio x bare rate / naive rate = naive time / (engine FLOPs / bare rate))."""
    with torch.inference_mode():
        naive = count_flops(lambda: naive_trace(model, clean, corrupted, args.layers, answer, wrong))
    engine = count_flops(lambda: patch_residual(model, clean, corrupted, LogitDiff(answer, wrong), layers=args.layers,
                                                progress=False))
    rate = matmul_rate(model, rows=2000, clock=CLOCK)
    naive_rate, engine_rate = naive / figures["naive_trace_s"], engine / figures["engine_trace_s"]
    figures.update({"naive_trace_gflop": naive / 1e9, "engine_trace_gflop": engine / 1e9, "trace_flop_ratio": naive / engine,
                    "naive_trace_gflop_per_s": naive_rate / 1e9, "engine_trace_gflop_per_s": engine_rate / 1e9,
                    "bare_matmul_gflop_per_s": rate / 1e9, "trace_ceiling_ratio": naive / engine * rate / naive_rate})


def measure(model, args, clean, corrupted, answer, wrong):
    figures = {}
    with torch.inference_mode():
        logits, figures["forward_s"] = timed(lambda: model(clean), args.repeat)
        naive, figures["naive_trace_s"] = timed(lambda: naive_trace(model, clean, corrupted, args.layers, answer, wrong), 1)
    try:
        ours = timed_engine(lambda: patch_residual(model, clean, corrupted, LogitDiff(answer, wrong), layers=args.layers,
                                                   progress=False), args, figures, "engine_trace_s")
        figures["engine_vs_naive_max_abs"] = (ours.metric[0].reshape(naive.shape) - naive).abs().max().item()
        figures["engine_speedup"] = figures["naive_trace_s"] / figures["engine_trace_s"]
        figures["engine_vs_forwards"] = naive.numel() * figures["forward_s"] / figures["engine_trace_s"]
        if args.count_flops:
            measure_flops(model, args, clean, corrupted, answer, wrong, figures)
    except BackendUnsupportedError as err:
        figures["engine_trace"] = f"refused: {err}"
    measure_heads(model, args, clean, corrupted, answer, wrong, figures)
    measure_latents(model, args, clean, corrupted, answer, wrong, figures)
    return logits, naive, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,10,20,29", help="resid_pre layers of the trace (comma-separated)")
    parser.add_argument("--repeat", type=int, default=5, help="forward passes timed per backend (median)")
    parser.add_argument("--engine-repeat", type=int, default=3, help="calls of our engine timed per experiment "
                        "(median; the first call's time is printed beside it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than one needs --clock wall: "
                        "CPU time adds up the threads)")
    parser.add_argument("--sae-layer", type=int, default=15, help="resid_pre layer of the latent sweep's random SAE")
    parser.add_argument("--naive-sample", type=int, default=24, help="units of the latent sweep the naive loop times")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="what the times measure (cpu: this "
                        "process's CPU time, which a busy machine's other jobs leave out; wall: elapsed time)")
    parser.add_argument("--count-flops", action="store_true", help="also count the residual trace's FLOPs on each "
                        "side (untimed reruns) and print its FLOP ratio, GFLOP/s, the bare-matmul rate and the ceiling")
    parser.add_argument("--bound-generation", type=int, default=0, metavar="N", help="also time N greedy tokens "
                        "after the safety suite's few-shot context bound as a prefix, KV-cached against uncached")
    args = parser.parse_args()
    if args.threads > 1 and args.clock != "wall":
        parser.error("--threads above 1 needs --clock wall: CPU time adds up every thread's time")
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    args.layers = [int(x) for x in args.layers.split(",")]
    torch.set_num_threads(args.threads)
    results, logits, traces = {"torch_threads": args.threads, "engine_repeat": args.engine_repeat, "clock": args.clock, "layers": args.layers,
                               "machine": platform.processor() or platform.machine()}, {}, {}
    for backend in ("hooked", "bridge"):
        model = load_model(backend=backend)
        clean, corrupted = (model.to_tokens(text) for text in FACT[:2])
        answer, wrong = (model.to_single_token(text) for text in FACT[2:])
        logits[backend], traces[backend], results[backend] = measure(model, args, clean, corrupted, answer, wrong)
        if args.bound_generation:
            measure_bound_generation(model, args.bound_generation, results[backend])
        del model
    results["logits_max_abs_difference"] = (logits["bridge"] - logits["hooked"]).abs().max().item()
    results["trace_max_abs_difference"] = (traces["bridge"] - traces["hooked"]).abs().max().item()
    results["bridge_forward_vs_hooked"] = results["bridge"]["forward_s"] / results["hooked"]["forward_s"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
