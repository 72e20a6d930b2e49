"""`latentpatch trace`: ROME's causal trace of a factual prompt (Meng et al. 2022, section 2.1).

The subject's token embeddings are noised (Gaussian, `--noise` times the standard deviation of token
embeddings over the built-in sentences, `--samples` seeded draws); then each hidden state (`--kind state`),
or a window of `--window` MLP or attention outputs (`mlp`, `attn`), at each (layer, position) is restored
to its clean value, and the answer's probability is read. `--sever mlp|attn` restores states while holding
that module's outputs at the token corrupted (ROME's severed trace).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentpatch.cli.common import COUNT_MAX, SEED_MAX, add_model_option, bounded_int, check_out, load_plain_model, table

EXAMPLE = ("example: latentpatch trace --prompt 'The Eiffel Tower is located in the city of' --subject 'The Eiffel Tower' "
           "--answer ' Paris' --kind mlp --out results/trace")


JSON_OUTPUT = {
    "kind": "state, mlp or attn",
    "sever": "the module held corrupted at the token, or null",
    "window": "layers per restored window",
    "p_clean": "the answer's probability on the clean prompt",
    "p_corrupted": "its probability with the subject noised (mean over draws)",
    "tokens": "the prompt's tokens",
    "subject": "the noised positions",
    "answer": "the answer's token id",
    "prob": "the answer's probability with each (layer, position) restored; null where not traced",
    "peaks": "the --top restorations: layer, position, token, prob, effect",
    "saved_to": "the result folder (--out), or null",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `trace` to the `latentpatch` parser."""
    p = sub.add_parser("trace", help="ROME's causal trace (noised subject, restored states or MLP/attention windows)",
                       description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    p.add_argument("--prompt", required=True, help="the factual prompt")
    p.add_argument("--subject", required=True, help="the subject, as it appears in the prompt (its tokens are noised)")
    p.add_argument("--answer", required=True, help="the answer token, with its leading space (' Paris')")
    p.add_argument("--kind", choices=("state", "mlp", "attn"), default="state", help="what is restored (default state)")
    p.add_argument("--window", type=int, default=10, help="layers per restored MLP/attention window (default 10)")
    p.add_argument("--sever", choices=("mlp", "attn"), default=None, help="hold this module at the token corrupted")
    p.add_argument("--noise", type=float, default=3.0, help="noise scale in embedding standard deviations (ROME: 3)")
    p.add_argument("--samples", type=int, default=10, help="noise draws averaged (default 10)")
    p.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0, help="seed of the noise draws (default 0)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to trace (default: all)")
    p.add_argument("--top", type=bounded_int(1, COUNT_MAX), default=5, help="how many peak restorations to list (default 5)")
    p.add_argument("--out", type=Path, default=None, help="save the result and its heatmap (trace.png) here")
    p.set_defaults(run=run_trace, json_output=JSON_OUTPUT, describe=describe_trace)


def check_args(args: argparse.Namespace) -> None:
    """What needs no model, checked before it loads."""
    from patching.errors import PatchingError

    if not args.noise >= 0 or args.noise == float("inf"):
        raise PatchingError(f"--noise must be a finite number >= 0, got {args.noise}")
    if not 1 <= args.samples <= 1000:
        raise PatchingError(f"--samples must be between 1 and 1000, got {args.samples}")
    if args.window < 1 or args.top < 1:
        raise PatchingError(f"--window and --top must be positive, got {args.window} and {args.top}")
    if args.sever is not None and args.kind != "state":
        raise PatchingError(f"--sever applies to state traces only (got --kind {args.kind})")
    if not 0 <= args.seed < 2**63:
        raise PatchingError(f"--seed must be in [0, 2**63), got {args.seed}")


def run_trace(args: argparse.Namespace) -> dict[str, Any]:
    from latentpatch.cli.common import single_token
    from patching.tracing import NoiseConfig, causal_trace, embedding_std

    check_args(args)
    check_out(args)
    model = load_plain_model(args.model)
    answer = single_token(model, args.answer, "--answer")
    noise = NoiseConfig(scale=args.noise * embedding_std(model, _reference_tokens(model)), n_samples=args.samples,
                        seed=args.seed)
    result = causal_trace(model, args.prompt, args.subject, answer, noise=noise, kind=args.kind, window=args.window,
                          sever=args.sever, layers=args.layers)
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "trace.png")
    return trace_summary(result, args.top, args.out)


def _reference_tokens(model: Any) -> Any:
    """Token ids of the built-in sentences, over which the embeddings' standard deviation is measured."""
    import torch

    from latentpatch.cli.evaluate import EVAL_TEXTS
    from patching.model import tl_compat

    return torch.cat([tl_compat.to_tokens(model, text, prepend_bos=False)[0] for text in EVAL_TEXTS])


def trace_summary(result: Any, top: int, out: Path | None) -> dict[str, Any]:
    """The result's JSON form: probabilities, the subject, and the `top` peak restorations."""
    import torch

    prob = result.prob.nan_to_num(nan=-1.0)
    order = torch.argsort(prob.flatten(), descending=True)[:top]
    peaks = []
    for index in order.tolist():
        layer, position = divmod(index, prob.shape[1])
        peaks.append({"layer": layer, "position": position, "token": result.tokens[position],
                      "prob": float(result.prob[layer, position]), "effect": float(result.effect[layer, position])})
    return {"kind": result.kind, "sever": result.sever, "window": result.window, "p_clean": result.p_clean,
            "p_corrupted": result.p_corrupted, "tokens": result.tokens, "subject": list(result.subject),
            "answer": result.answer, "prob": [[None if v != v else v for v in row] for row in result.prob.tolist()],
            "peaks": peaks, "saved_to": str(out) if out is not None else None}


def describe_trace(result: dict[str, Any]) -> str:
    what = {"state": "hidden state", "mlp": f"window of {result['window']} MLP outputs",
            "attn": f"window of {result['window']} attention outputs"}[result["kind"]]
    severed = f", {result['sever']} outputs severed at the token" if result["sever"] else ""
    lines = [f"Noising the subject ({' '.join(repr(result['tokens'][p]) for p in result['subject'])}) drops the answer's "
             f"probability from {result['p_clean']:.3g} to {result['p_corrupted']:.3g}. The restorations of one "
             f"{what}{severed} that bring most of it back:", ""]
    rows: list[tuple[Any, ...]] = [("layer", "position", "token", "prob", "effect")]
    rows += [(p["layer"], p["position"], repr(p["token"]), f"{p['prob']:.3g}", f"{p['effect']:+.3f}") for p in result["peaks"]]
    lines.append(table(rows))
    if result["saved_to"]:
        lines += ["", f"Heatmap and result saved to {result['saved_to']}."]
    return "\n".join(lines)
