"""Benchmark: time per generated token with steering against without, in the same run.

On the default model with an SAE at a middle layer (`--sae`, or a seeded random one of the
same shape: the cost of steering does not depend on what the latents mean), it generates
`--tokens` greedy tokens with TransformerLens's `generate` and its key-value cache, unsteered
and steered (`add` with a Top-K direction, and `clamp` of K latents through the splice). The
runs are interleaved, `--repeats` times, so that load from other processes hits all of them
alike; the median time of each is reported. The last line printed is one JSON object.

    python benchmarks/steering.py [--sae DIR] [--layer 15] [--k 8] [--tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _common import benchmark_sae

from patching import DEFAULT_MODEL, Site, load_model
from patching.model import tl_compat
from patching.steering.choice import LatentChoice
from patching.steering.steer import steer

PROMPT = "The Eiffel Tower is located in the city of"


def timed_generate(model, n_tokens):
    start = time.perf_counter()
    tl_compat.generate(model, PROMPT, max_new_tokens=n_tokens)
    return (time.perf_counter() - start) / n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", help="SAE folder or release id RELEASE/SAE_ID (default: seeded random SAE, d_sae 4608)")
    parser.add_argument("--layer", type=int, default=15, help="resid_pre layer of the random SAE (default 15)")
    parser.add_argument("--k", type=int, default=8, help="latents steered (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    args = parser.parse_args()

    model = load_model()
    sae = benchmark_sae(model, args.sae, args.layer, topk=None)
    site = Site.from_hook_name(sae.cfg.hook_name)
    choice = LatentChoice(site, tuple(range(args.k)), tuple(1.0 for _ in range(args.k)))
    timed_generate(model, 4)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"unsteered": [], "add": [], "clamp": []}
    for _ in range(args.repeats):
        times["unsteered"].append(timed_generate(model, args.tokens))
        for method in ("add", "clamp"):
            with steer(model, sae, choice, method=method, coefficient=4.0):
                times[method].append(timed_generate(model, args.tokens))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:10s} {1000 * value:8.2f} ms/token  (runs: {', '.join(f'{1000 * v:.1f}' for v in times[name])})")
    print(json.dumps({
        "benchmark": "steering", "model": DEFAULT_MODEL, "site": site.hook_name, "d_sae": sae.cfg.d_sae, "k": args.k,
        "tokens": args.tokens, "repeats": args.repeats, "kv_cache": True,
        "unsteered_ms_per_token": round(1000 * median["unsteered"], 3),
        "add_ms_per_token": round(1000 * median["add"], 3), "clamp_ms_per_token": round(1000 * median["clamp"], 3),
        "add_ratio": round(median["add"] / median["unsteered"], 4),
        "clamp_ratio": round(median["clamp"] / median["unsteered"], 4), "target_ratio": 1.1,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
