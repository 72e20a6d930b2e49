"""Benchmark: the app's overhead — time to the first visible result through `latentpatch serve` against
the same Python call, in the same run (issue 29, target <= 1.2x).

The app runs in this process on a thread (uvicorn on a free 127.0.0.1 port) and is driven over HTTP as
the page drives it: POST the request, then long-poll the job (answered at each new result, or after
0.5 s) until the result is there. Two results:

- sweep: the exact latent sweep's heatmap (the page's first result) against `patch_latents(...)` on the
  same pair (the app also counts the differing latents first, for its progress bar: that is overhead too);
- steered generation: the whole steered continuation on the page (streamed token by token) against the
  same greedy generation under `steer(...)` in Python. The first streamed token's time is printed too.

Runs are interleaved `--repeats` times so that load from other processes hits both alike; medians and
minimums are reported (on a loaded machine the minimum is the better estimate of each one's own cost).
The last line printed is one JSON object.

    python benchmarks/app_overhead.py [--sae smollm2-135m-res/blocks.5.hook_resid_pre] [--n-layers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from latentpatch.app import Workbench, create_app
from latentpatch.cli.common import resolve_sae
from patching import LogitDiff, load_model_for, patch_latents, steer
from patching.model import tl_compat
from patching.splice.generate import generate

PAIR = {"clean": "The Eiffel Tower is located in the city of", "corrupted": "The Colosseum is located in the city of",
        "answer": " Paris", "wrong": " Rome"}
PROMPT = "My favourite city is"
WAIT_S = 0.5
"""The page's long-poll timeout (app.js)."""


def serve(bench: Workbench) -> tuple[str, uvicorn.Server, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(bench), log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{listener.getsockname()[1]}", server, thread


def until(client: httpx.Client, url: str, body: dict, seen) -> dict[str, float]:
    """POST `body`, poll the job; the seconds at which each event `seen(event)` names first appeared."""
    start = time.perf_counter()
    job = client.post(url, json=body).json()
    times: dict[str, float] = {}
    since = 0
    while True:
        state = client.get(f"/api/jobs/{job['id']}", params={"since": since, "wait": WAIT_S}).json()
        for event in state["events"]:
            name = seen(event)
            if name is not None and name not in times:
                times[name] = time.perf_counter() - start
        since = state["n_events"]
        if state["state"] != "running":
            assert state["state"] == "done", state["error"]
            return times


def steer_event(event: dict) -> str | None:
    if event["kind"] == "token" and event["column"] == "steered":
        return "first_token"
    if event["kind"] == "continuation" and event["column"] == "steered":
        return "continuation"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default="smollm2-135m-res/blocks.5.hook_resid_pre", help="SAE (release id or folder)")
    parser.add_argument("--n-layers", type=int, default=None, help="keep only the model's first N layers (default: all)")
    parser.add_argument("--latents", type=int, nargs="+", default=[0, 1], help="latents steered with (default 0 1)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    args = parser.parse_args()

    sae = resolve_sae(args.sae)
    model = load_model_for(sae, n_layers=args.n_layers).eval()
    bench = Workbench(model, [sae], [args.sae], card_texts=["unused"])
    url, server, thread = serve(bench)
    metric = LogitDiff(*[tl_compat.to_tokens(model, PAIR[w], prepend_bos=False)[0, 0].item() for w in ("answer", "wrong")])
    tokens, mask = tl_compat.left_padded_tokens(model, PROMPT)
    steer_body = {"prompt": PROMPT, "latents": args.latents, "coefficient": 8.0, "max_new_tokens": args.tokens}
    times: dict[str, list[float]] = {"sweep_python": [], "sweep_app": [], "steer_python": [], "steer_app": [],
                                     "steer_app_first_token": []}
    with httpx.Client(base_url=url, timeout=3600) as client:
        until(client, "/api/steer", {**steer_body, "max_new_tokens": 2}, steer_event)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = patch_latents(model, sae, PAIR["clean"], PAIR["corrupted"], metric, progress=False)
            times["sweep_python"].append(time.perf_counter() - start)
            times["sweep_app"].append(until(client, "/api/sweep", PAIR, lambda e: e["kind"] if e["kind"] == "heatmap" else None)["heatmap"])
            start = time.perf_counter()
            with steer(model, sae, list(args.latents), coefficient=8.0):
                generate(model, tokens, args.tokens, attention_mask=mask)
            times["steer_python"].append(time.perf_counter() - start)
            seen = until(client, "/api/steer", steer_body, steer_event)
            times["steer_app"].append(seen["continuation"])
            times["steer_app_first_token"].append(seen["first_token"])
    server.should_exit = True
    thread.join(10)
    median = {name: statistics.median(values) for name, values in times.items()}
    least = {name: min(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:24s} median {median[name]:8.3f} s, min {least[name]:8.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    print(json.dumps({
        "benchmark": "app_overhead", "model": tl_compat.model_name(model), "n_layers": tl_compat.n_layers(model),
        "sae": args.sae, "units": len(result.units), "tokens": args.tokens, "repeats": args.repeats, "long_poll_s": WAIT_S,
        **{f"{name}_s": round(value, 4) for name, value in median.items()},
        **{f"{name}_min_s": round(value, 4) for name, value in least.items()},
        "sweep_ratio": round(median["sweep_app"] / median["sweep_python"], 4),
        "steer_ratio": round(median["steer_app"] / median["steer_python"], 4),
        "sweep_ratio_min": round(least["sweep_app"] / least["sweep_python"], 4),
        "steer_ratio_min": round(least["steer_app"] / least["steer_python"], 4), "target_ratio": 1.2,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
