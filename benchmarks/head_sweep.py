"""Benchmark: head sweeps and the residual trace against TransformerLens's patching functions.

On the default model, in one process, it times our engine and TransformerLens's one-forward-per-patch
functions on the same units and compares the metric values:
- the residual trace of the Eiffel Tower → Colosseum pair (`resid_pre`, every layer × position),
  against `get_act_patch_resid_pre`;
- every attention head of the IOI pair at all positions (`z`, then `pattern`) and at each position
  (`z`), against `get_act_patch_attn_head_out_all_pos`, `get_act_patch_attn_head_pattern_all_pos` and
  `get_act_patch_attn_head_out_by_pos`.
With `--layers` both sides run on the same subset of layers (TransformerLens through
`generic_activation_patch` with an `index_df`, which is what its named functions call). The last
line printed is one JSON object.

    python benchmarks/head_sweep.py                       # the full sweeps (slow on a CPU)
    python benchmarks/head_sweep.py --layers 0,6,12,18,24,29 --skip pattern
    python benchmarks/head_sweep.py --skip z_by_pos --repeat 3   # medians of 3 timings per side
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

from patching import LogitDiff, load_model, patch_residual
from patching.sweep import patch_heads

FACT = ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome")
IOI = ("When Mary and John went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def tl_sweep(model, corrupted, clean_cache, metric_fn, activation, setter, axes, rows):
    """TransformerLens's generic patcher on the given index rows (its named functions use all rows)."""
    index_df = pd.DataFrame(rows, columns=axes)
    return tl_patching.generic_activation_patch(model, corrupted, clean_cache, metric_fn, setter, activation,
                                                index_df=index_df)


def timed(fn, repeat):
    """The result of `fn` and the median of `repeat` wall-clock timings of it."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def measure(name, ours_fn, tl_fn, repeat):
    ours, ours_s = timed(ours_fn, repeat)
    reference, tl_s = timed(tl_fn, repeat)
    delta = (ours.metric[0] - reference.flatten()).abs().max().item()
    print(f"{name:18s} units {ours.metric.shape[1]:5d}  ours {ours_s:8.2f} s  TransformerLens {tl_s:8.2f} s  "
          f"ratio {tl_s / ours_s:6.1f}x  max |Δ| {delta:.2e}", flush=True)
    return {"units": ours.metric.shape[1], "ours_s": round(ours_s, 3), "tl_s": round(tl_s, 3),
            "ratio": round(tl_s / ours_s, 2), "max_abs_delta": delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", help="comma-separated layers (default: every layer)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: resid, z_all, pattern, z_by_pos")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each side this many times and report the medians (default 1)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    model = load_model()
    layers = list(range(model.cfg.n_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    figures = {"benchmark": "head_sweep", "model": model.cfg.model_name, "layers": layers,
               "full": layers == list(range(model.cfg.n_layers)), "repeat": args.repeat, "torch_threads": torch.get_num_threads(),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    heads = range(model.cfg.n_heads)
    with torch.inference_mode():
        for name, (clean_text, corrupted_text, answer, wrong) in (("fact", FACT), ("ioi", IOI)):
            clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
            assert clean.shape == corrupted.shape, f"the {name} pair must have equal token lengths"
            a, w = model.to_single_token(answer), model.to_single_token(wrong)
            metric = LogitDiff(a, w)

            def metric_fn(logits, a=a, w=w):
                return logits[0, -1, a] - logits[0, -1, w]

            _, cache = model.run_with_cache(clean)
            n_pos = clean.shape[1]
            if name == "fact" and "resid" not in skip:
                figures["resid_trace"] = measure("resid_pre trace", lambda: patch_residual(
                    model, clean, corrupted, metric, layers=layers, progress=False), lambda: tl_sweep(
                    model, corrupted, cache, metric_fn, "resid_pre", tl_patching.layer_pos_patch_setter,
                    ["layer", "pos"], list(itertools.product(layers, range(n_pos)))), args.repeat)
            if name != "ioi":
                continue
            if "z_all" not in skip:
                figures["head_out_all_pos"] = measure("head z all pos", lambda: patch_heads(
                    model, clean, corrupted, metric, kind="z", layers=layers, progress=False), lambda: tl_sweep(
                    model, corrupted, cache, metric_fn, "z", tl_patching.layer_head_vector_patch_setter,
                    ["layer", "head"], list(itertools.product(layers, heads))), args.repeat)
            if "pattern" not in skip:
                figures["head_pattern_all_pos"] = measure("head pattern", lambda: patch_heads(
                    model, clean, corrupted, metric, kind="pattern", layers=layers, progress=False), lambda: tl_sweep(
                    model, corrupted, cache, metric_fn, "pattern", tl_patching.layer_head_pattern_patch_setter,
                    ["layer", "head"], list(itertools.product(layers, heads))), args.repeat)
            if "z_by_pos" not in skip:
                figures["head_out_by_pos"] = measure("head z by pos", lambda: patch_heads(
                    model, clean, corrupted, metric, kind="z", by="position", layers=layers, progress=False),
                    lambda: tl_sweep(model, corrupted, cache, metric_fn, "z", tl_patching.layer_pos_head_vector_patch_setter,
                                     ["layer", "pos", "head"], list(itertools.product(layers, range(n_pos), heads))),
                    args.repeat)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
