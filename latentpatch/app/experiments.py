"""The app's long requests, each checked in full before its job starts and then run as a job:

- sweep: the exact latent sweep (`patch_latents`, every latent that differs at every position) drawn as
  a heatmap, then AtP (`attribute_latents`) checked against exact patching (`verify`);
- steer: latents by id or from a contrast of two text sets (`contrast_latents`), steered and unsteered
  greedy continuations streamed as they generate under `steer`, and the KL cost on neutral text;
- circuit: `find_circuit`'s edges between heads and MLPs, or the edges between the SAEs' latents
  (`attribute_latent_edges`), drawn from the circuits room's graph document (`latentpatch.graph/1`).

The results are the library's own numbers, rounded only by the page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from latentpatch.app import checks
from latentpatch.app.jobs import AppInputError, Job
from latentpatch.app.workbench import Workbench


@dataclass(frozen=True)
class PairInputs:
    """A checked prompt pair: what a sweep or a circuit runs on."""

    sae: int
    clean: str
    corrupted: str
    metric: Any
    """`LogitDiff(answer, wrong)` at the last position."""


def check_pair(bench: Workbench, request: dict[str, Any]) -> PairInputs:
    from patching import LogitDiff
    from patching.sweep.pairs import make_pairs

    index, _ = bench.sae(request.get("sae", 0))
    clean, corrupted = request.get("clean"), request.get("corrupted")
    checks.prompt_tokens(bench.model, clean, "clean", bench.limits)
    checks.prompt_tokens(bench.model, corrupted, "corrupted", bench.limits)
    make_pairs(bench.model, clean, corrupted, direction="denoise", align=None)  # equal token lengths, or its message
    metric = LogitDiff(checks.one_token(bench.model, request.get("answer"), "answer"),
                       checks.one_token(bench.model, request.get("wrong"), "wrong"))
    return PairInputs(index, clean, corrupted, metric)


def start_sweep(bench: Workbench, request: dict[str, Any]) -> Job:
    pair = check_pair(bench, request)
    return bench.runner.start("sweep", lambda job: run_sweep(bench, pair, job))


def run_sweep(bench: Workbench, pair: PairInputs, job: Job) -> None:
    from patching import attribute_latents, patch_latents, verify

    sae = bench.saes[pair.sae]
    job.set_phase("exact sweep: every latent that differs, at every position", expected_rows=differing(bench, pair) + 2)
    exact = patch_latents(bench.model, sae, pair.clean, pair.corrupted, pair.metric, units="latent_position", progress=False)
    job.emit("heatmap", **heatmap(exact, bench.limits.heatmap_latents))
    job.set_phase("AtP estimate (one forward and backward pass per prompt)", expected_rows=2)
    atp = attribute_latents(bench.model, sae, pair.clean, pair.corrupted, pair.metric, method="atp", progress=False)
    k = bench.limits.verify_k
    job.set_phase(f"AtP check: AtP's top {k} and {k} random other units patched exactly", expected_rows=2 * k + 2)
    check = verify(atp, k=k, random_k=k)
    job.emit("check", **check.to_dict(), units=[
        {"unit": unit.label(), "latent": unit.latent, "position": unit.position, "atp": float(e), "exact": float(x)}
        for unit, e, x in zip(check.exact.units, check.estimate.tolist(), check.exact.mean_effect.tolist())])


def differing(bench: Workbench, pair: PairInputs) -> int:
    """How many (latent, position) units the exact sweep will patch: those whose clean and corrupted
    values differ (an estimate for the progress bar, from a run up to the SAE's site only)."""
    from patching.splice.collect import iter_site_latents

    rows = list(iter_site_latents(bench.model, bench.saes[pair.sae], bench.sites[pair.sae], [pair.clean, pair.corrupted],
                                  exclude_special=False))
    return int((rows[0].latents != rows[1].latents).sum())


def heatmap(result: Any, n_latents: int) -> dict[str, Any]:
    """Positions (rows) by the `n_latents` latents with the largest |effect| anywhere (columns); None
    where a latent did not differ at a position (not patched: no effect possible)."""
    effect = result.mean_effect
    cells: dict[tuple[int, int], float] = {}
    for i, unit in enumerate(result.units):
        if unit.kind == "latent" and unit.latent is not None and unit.position is not None:
            cells[(unit.position, unit.latent)] = float(effect[i])
    strength: dict[int, float] = {}
    for (_, latent), value in cells.items():
        strength[latent] = max(strength.get(latent, 0.0), abs(value))
    latents = sorted(strength, key=lambda latent: (-strength[latent], latent))[:n_latents]
    tokens = result.base_tokens[0]
    top = [{"position": e.position, "token": e.token, "latent": e.latent, "effect": e.effect}
           for e in result.top(10) if e.latent is not None]
    return {"tokens": tokens, "latents": latents,
            "effects": [[cells.get((p, latent)) for latent in latents] for p in range(len(tokens))],
            "top": top, "units": len(result.units), "metric_clean": float(result.metric_clean[0]),
            "metric_corrupted": float(result.metric_corrupted[0])}


@dataclass(frozen=True)
class SteerInputs:
    """A checked steering request."""

    sae: int
    prompt: str
    latents: tuple[int, ...] | None
    positive: list[str] | None
    negative: list[str] | None
    k: int
    method: str
    coefficient: float
    scale: str
    max_new_tokens: int


def check_steer(bench: Workbench, request: dict[str, Any]) -> SteerInputs:
    from patching.model import tl_compat

    index, sae = bench.sae(request.get("sae", 0))
    limits = bench.limits
    prompt = request.get("prompt")
    method, scale = request.get("method", "add"), request.get("scale", "unit")
    if method not in ("add", "clamp"):
        raise AppInputError(f"method: expected 'add' or 'clamp', got {method!r:.40}")
    if scale not in ("unit", "activation"):
        raise AppInputError(f"scale: expected 'unit' or 'activation', got {scale!r:.40}")
    latents, positive, negative = request.get("latents"), request.get("positive"), request.get("negative")
    k = checks.count(request.get("k", 1), "k", limits.max_k)
    if latents:
        latents = checks.latent_list(latents, int(sae.d_sae), limits)
        if scale == "activation":
            raise AppInputError("scale 'activation' needs the latents' typical activations, which a contrast measures: "
                                "choose latents from a contrast, or use scale 'unit'")
        positive = negative = None
    elif positive or negative:
        positive = checks.texts(positive, "positive", bench.model, limits)
        negative = checks.texts(negative, "negative", bench.model, limits)
        latents = None
    else:
        raise AppInputError("latents: give latent ids, or positive and negative texts to contrast")
    new = checks.count(request.get("max_new_tokens", 16), "max_new_tokens", limits.max_new_tokens)
    length, n_ctx = int(checks.prompt_tokens(bench.model, prompt, "prompt", limits).shape[1]), tl_compat.n_ctx(bench.model)
    if length + new > n_ctx:
        raise AppInputError(f"max_new_tokens: the prompt's {length} tokens plus {new} new ones exceed the model's "
                            f"context of {n_ctx} tokens")
    return SteerInputs(index, prompt, latents, positive, negative, k, method,
                       checks.coefficient(request.get("coefficient", 4.0), limits), scale, new)


def start_steer(bench: Workbench, request: dict[str, Any]) -> Job:
    inputs = check_steer(bench, request)
    return bench.runner.start("steer", lambda job: run_steer(bench, inputs, job))


def run_steer(bench: Workbench, inputs: SteerInputs, job: Job) -> None:
    from patching import contrast_latents, steer
    from patching.model import tl_compat

    model, sae = bench.model, bench.saes[inputs.sae]
    target: Any = inputs.latents
    if target is None:
        job.set_phase("ranking latents on the contrast")
        target = contrast_latents(model, sae, inputs.positive, inputs.negative, k=inputs.k)
        job.emit("latents", latents=list(target.latents), scores=list(target.scores), source="contrast")
    else:
        job.emit("latents", latents=list(target), scores=None, source="given")
    settings = dict(method=inputs.method, coefficient=inputs.coefficient, scale=inputs.scale)
    tokens, mask = tl_compat.left_padded_tokens(model, inputs.prompt)
    job.set_phase("steered continuation", expected_rows=inputs.max_new_tokens)
    with steer(model, sae, target, **settings):
        stream(model, tokens, mask, inputs.max_new_tokens, job, "steered")
    job.set_phase("unsteered continuation", expected_rows=inputs.max_new_tokens)
    stream(model, tokens, mask, inputs.max_new_tokens, job, "unsteered")
    job.set_phase("KL cost on neutral text", expected_rows=2)
    job.emit("kl", kl=neutral_kl(model, sae, target, settings))


STREAM_EVERY_S = 0.2
"""Least time between two published partial continuations after the first token: each wakes the page's
long poll, whose request and response (~15 ms of Python on the 2-core test machine) compete with the
generating thread for the interpreter; five updates a second still read as live text."""


def stream(model: Any, tokens: Any, mask: Any, max_new_tokens: int, job: Job, column: str) -> None:
    """Greedy continuation (as `generate_steered` decodes) published as it is chosen (the first token at
    once, then at most every `STREAM_EVERY_S`): `observe` sees the logits the greedy choice is the argmax of."""
    from patching.splice.generate import generate

    chosen: list[int] = []
    last = [0.0]

    def observe(step: Any, logits: Any) -> None:
        chosen.append(int(logits[0].argmax(-1)))
        if len(chosen) == 1 or time.perf_counter() - last[0] >= STREAM_EVERY_S:
            last[0] = time.perf_counter()
            job.emit("token", column=column, text=decode(model, torch.tensor(chosen)), n=len(chosen))

    out = generate(model, tokens, max_new_tokens, attention_mask=mask, observe=observe)
    job.emit("continuation", column=column, text=decode(model, out[0, tokens.shape[1]:]))


def decode(model: Any, tokens: Any) -> str:
    """Token ids as text without special tokens, as `generate_steered` shows its continuations."""
    from patching.model import tl_compat

    if tl_compat.has_tokenizer(model):
        tokens = tokens[~torch.isin(tokens.cpu(), torch.tensor(tl_compat.special_token_ids(model)))]
    return tl_compat.to_string(model, tokens)


def neutral_kl(model: Any, sae: Any, target: Any, settings: dict[str, Any]) -> float:
    """KL(unsteered || steered) of the next-token distribution over the neutral texts' positions: the
    steering comparison's collateral cost (`patching.steering.compare`), for this one setting."""
    from patching import steer
    from patching.model import tl_compat
    from patching.model.tokens import padded_tokens
    from patching.steering.concepts import NEUTRAL
    from sae.metrics import kl_divergence

    tokens, mask = padded_tokens(model, list(NEUTRAL))
    with torch.inference_mode():
        base = tl_compat.forward_logits(model, tokens)
        with steer(model, sae, target, **settings):
            steered = tl_compat.forward_logits(model, tokens)
    return float(kl_divergence(base, steered, mask))


def start_circuit(bench: Workbench, request: dict[str, Any]) -> Job:
    pair = check_pair(bench, request)
    k = checks.count(request.get("k", 8), "k", bench.limits.max_k)
    nodes = request.get("nodes", "components")
    if nodes not in ("components", "latents"):
        raise AppInputError(f"nodes: expected 'components' (heads and MLPs) or 'latents' (the SAEs' latents), got {nodes!r:.40}")
    run = run_circuit if nodes == "components" else run_latent_circuit
    return bench.runner.start("circuit", lambda job: run(bench, pair, k, job))


def run_circuit(bench: Workbench, pair: PairInputs, k: int, job: Job) -> None:
    """Heads, MLPs and the embedding as nodes: `find_circuit`, drawn from its graph document."""
    from patching import find_circuit
    from patching.paths.graph import circuit_document

    job.set_phase(f"edge attribution, then exact path patching of the candidates (at most {4 * k})")
    result = find_circuit(bench.model, pair.clean, pair.corrupted, pair.metric, k=k, curve_points=0)
    document = circuit_document(result)
    job.emit("circuit", graph={"nodes": document["nodes"], "edges": document["edges"]},
             edges=result.to_dataframe().to_dict(orient="records"), scores=document["metadata"]["scores"])


def run_latent_circuit(bench: Workbench, pair: PairInputs, k: int, job: Job) -> None:
    """The SAEs' latents and error nodes as nodes (a sparse feature circuit, Marks et al. 2024): every
    node's AtP effect and the edges between consecutive sites (`attribute_latent_edges`), the `k`
    strongest edges drawn; latent nodes open their cards."""
    from patching.paths import attribute_latent_edges
    from patching.paths.graph import latent_document

    job.set_phase("node effects and latent-to-latent edges (one backward pass per group of downstream nodes)")
    saes = dict(zip(bench.sites, bench.saes))
    graph = attribute_latent_edges(bench.model, saes, pair.clean, pair.corrupted, pair.metric, progress=False)
    weights = sorted((abs(e["weight"]) for e in latent_document(graph)["edges"]), reverse=True)
    document = latent_document(graph, threshold=weights[min(k, len(weights)) - 1] if weights else 0.0)
    edges = [{"sender": e["source"], "receiver": e["target"], "estimate": e["weight"], "exact": None}
             for e in sorted(document["edges"], key=lambda e: -abs(e["weight"]))]
    job.emit("circuit", graph={"nodes": document["nodes"], "edges": document["edges"]}, edges=edges,
             scores=document["metadata"]["scores"])
