"""Benchmark: exact path patching against the naive freeze-and-patch reference, in one process.

On the default model and the IOI pair ("When Mary and John went to the store, John gave a drink to"
→ Mary vs John), every head of the chosen layers is a sender and the query, key and value inputs of
every head in the chosen layers after it are its receivers, all at once (Wang et al. 2022's
"sender → receiver set"). The reference does what the paper describes, two forward passes per sender:
the corrupted run with every head and MLP frozen at its corrupted value and the sender's output from
the clean run, recording the receivers' q, k and v; then the corrupted run with those set. Both sides
skip senders that reach no receiver. Prints both timings, the ratio and the largest metric
difference; the last line printed is one JSON object.

    python benchmarks/path_patching.py                      # every layer (slow on a CPU)
    python benchmarks/path_patching.py --layers 20-29       # a contiguous range of layers
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from patching import LogitDiff, load_model
from patching.paths import Node, patch_paths, receivers_of

IOI = ("When Mary and John went to the store, John gave a drink to",
       "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def naive_sender(model, clean_cache, corrupted_cache, corrupted, sender: Node, receiver_layers: list[int], a: int, w: int):
    """The metric of one sender's paths into every q/k/v of `receiver_layers`: two forward passes."""
    def frozen(name, layer):
        def hook(x, hook):
            out = corrupted_cache[name].clone()
            if layer == sender.layer and name.endswith("hook_z"):
                out[:, :, sender.head] = clean_cache[name][:, :, sender.head]
            return out
        return hook

    freeze = [(f"blocks.{layer}.{kind}", frozen(f"blocks.{layer}.{kind}", layer))
              for layer in range(model.cfg.n_layers) for kind in ("attn.hook_z", "hook_mlp_out")]
    wanted = {f"blocks.{layer}.attn.hook_{kind}" for layer in receiver_layers for kind in "qkv"}
    with model.hooks(fwd_hooks=freeze):
        _, step2 = model.run_with_cache(corrupted, names_filter=lambda name: name in wanted)
    logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, lambda x, hook: step2[hook.name]) for name in wanted])
    return (logits[0, -1, a] - logits[0, -1, w]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", help="first-last layers (default: every layer)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: by memory)")
    args = parser.parse_args()

    model = load_model()
    n_layers = model.cfg.n_layers
    lo, hi = (0, n_layers - 1) if args.layers is None else map(int, args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    clean_text, corrupted_text, answer, wrong = IOI
    clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
    a, w = model.to_single_token(answer), model.to_single_token(wrong)
    senders = [Node("head", layer, h) for layer in layers[:-1] for h in range(model.cfg.n_heads)]
    receivers = receivers_of(model, layers=layers[1:], kinds=("q", "k", "v"))

    with torch.inference_mode():
        start = time.perf_counter()
        ours = patch_paths(model, clean, corrupted, LogitDiff(a, w), senders=senders, receivers=receivers, progress=False,
                           batch_size=args.batch_size)
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
        naive = torch.tensor([naive_sender(model, clean_cache, corrupted_cache, corrupted, sender,
                                           [layer for layer in layers if layer > sender.layer], a, w)
                              for sender in senders])
        naive_s = time.perf_counter() - start

    delta = (ours.metric[0, :, 0] - naive).abs().max().item()
    top = ours.top(5)
    print(f"senders {len(senders)}  receivers {len(receivers)}  ours {ours_s:.2f} s  naive {naive_s:.2f} s  "
          f"ratio {naive_s / ours_s:.1f}x  max |Δ| {delta:.2e}")
    print("largest path effects:", ", ".join(f"{s} {e:+.3f}" for s, _, e in top))
    print(json.dumps({"benchmark": "path_patching", "model": model.cfg.model_name, "layers": [lo, hi],
                      "full": layers == list(range(n_layers)), "senders": len(senders), "receivers": len(receivers),
                      "ours_s": round(ours_s, 3), "naive_s": round(naive_s, 3), "ratio": round(naive_s / ours_s, 2),
                      "max_abs_delta": delta, "top": [[s, round(e, 4)] for s, _, e in top],
                      "torch_threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}))


if __name__ == "__main__":
    main()
