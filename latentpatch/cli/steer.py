"""`latentpatch steer`: steer generation with an SAE's latents, or compare Top-1 with Top-K.

Generate mode ranks latents on contrast texts (`--positive` vs `--negative`), steers with the
K best and prints unsteered and steered continuations side by side. `--compare CONCEPT_JSON`
runs `compare_steering` on the concept in that file and writes CSV, manifest and plot to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from latentpatch.cli.common import SAE_HELP, SEED_MAX, bounded_int

EXAMPLE = (
    "examples:\n"
    "  latentpatch steer runs/sae-l12 --positive 'I love Paris.' 'Paris, France' --negative 'I love London.' "
    "'London, England' --prompt 'My favourite city is' --k 1 --coefficient 4\n"
    "  latentpatch steer runs/sae-l12 --compare concept.json --out runs/steer-paris --k-values 1 2 4 8 16\n\n"
    "concept.json: {\"name\": ..., \"positive\": [...], \"negative\": [...], \"target_tokens\": [\" Paris\"],\n"
    "               \"heldout\": [...], \"neutral\": [...]}"
)


JSON_OUTPUT = {
    "sae": "generate mode: the SAE as named",
    "site": "generate mode: its hook name",
    "config": "generate mode: the steering settings",
    "latents": "generate mode: the latents steered with",
    "generations": "generate mode: each prompt's unsteered and steered continuation",
    "out": "--compare: the output folder",
    "rows": "--compare: rows of the comparison table",
    "best_effect_per_setting": "--compare: the best target effect for each method and K",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `steer` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("steer", help="steer generation with SAE latents, or compare Top-1 with Top-K",
                              description=__doc__ + "\n" + EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", help=SAE_HELP)
    p.add_argument("--positive", nargs="+", help="texts that show the concept (generate mode)")
    p.add_argument("--negative", nargs="+", help="matched texts that do not (generate mode)")
    p.add_argument("--prompt", nargs="+", help="prompts to continue (generate mode)")
    p.add_argument("--k", type=int, default=1, help="steer with the K best latents (default 1: Top-1)")
    p.add_argument("--method", choices=("add", "clamp"), default="add", help="add a direction or clamp latents")
    p.add_argument("--coefficient", type=float, default=4.0, help="steering strength c (default 4)")
    p.add_argument("--scale", choices=("unit", "activation"), default="activation",
                   help="c as an L2 norm / clamp value (unit) or in typical activations (default)")
    p.add_argument("--positions", choices=("all", "prompt", "generated"), default="all", help="positions steered")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated (default 32)")
    p.add_argument("--sample", action="store_true", help="sample (temperature --temperature) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0, help="sampling seed (default 0)")
    p.add_argument("--compare", type=Path, metavar="CONCEPT_JSON", help="run the Top-1 vs Top-K comparison instead")
    p.add_argument("--out", type=Path, help="output folder of --compare")
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="K values of --compare")
    p.add_argument("--coefficients", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="coefficients of --compare")
    p.add_argument("--methods", nargs="+", choices=("add", "clamp"), default=["add", "clamp"], help="methods of --compare")
    p.add_argument("--seeds", type=bounded_int(0, SEED_MAX), nargs="+", default=[0, 1, 2], help="sampling seeds of --compare")
    p.add_argument("--model", default=None, help="model name (default: the SAE's model_name)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_steer, json_output=JSON_OUTPUT)


def load_model_for(sae: Any, name: str | None = None) -> Any:
    """The model the SAE was trained on (or `name`), loaded with the SAE's weight-processing flags."""
    from patching.model.loading import load_model_for as load

    return load(sae, name)


def run_steer(args: argparse.Namespace) -> dict[str, Any]:
    from patching.model.checks import check_generation
    from patching.steering.steer import SteeringError
    from latentpatch.cli.common import resolve_sae
    from training.paths import check_output_folder

    if args.compare is None and not (args.positive and args.negative and args.prompt):
        raise SteeringError("generate mode needs --positive, --negative and --prompt (or pass --compare CONCEPT_JSON)")
    if args.compare is not None and args.out is None:
        raise SteeringError("--compare needs --out (the folder for steering.csv, manifest.json and the plot)")
    if args.out is not None:
        check_output_folder(args.out)
    if args.compare is None:  # generation settings, before contrast_latents runs the model
        check_generation(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=None,
                         error=SteeringError)
    sae = resolve_sae(args.sae)
    concept = _read_concept(args.compare) if args.compare is not None else None
    model = load_model_for(sae, args.model)
    if concept is not None:
        return _compare(args, model, sae, concept)
    return _generate(args, model, sae)


def _read_concept(path: Path) -> Any:
    from patching.steering.compare import Concept
    from patching.steering.steer import SteeringError

    from sae.safe_io import read_text

    try:  # guarded: a FIFO blocked here, a link to /dev/zero filled memory
        raw = json.loads(read_text(path, max_bytes=1 << 20))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnsafeFileError
        raise SteeringError(f"{path}: not a readable concept JSON file ({err})") from err
    fields = {field.name for field in dataclasses.fields(Concept)}
    if not isinstance(raw, dict) or set(raw) != fields:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise SteeringError(f"{path}: a concept needs exactly the keys {sorted(fields)}, got {got}")
    return Concept(**raw)


def _generate(args: argparse.Namespace, model: Any, sae: Any) -> dict[str, Any]:
    from patching.inspect.latents import logit_effect
    from patching.steering.choice import contrast_latents
    from patching.steering.steer import generate_steered

    choice = contrast_latents(model, sae, args.positive, args.negative, k=args.k)
    result = generate_steered(model, sae, choice, args.prompt, method=args.method, coefficient=args.coefficient,
                              scale=args.scale, positions=args.positions, max_new_tokens=args.max_new_tokens,
                              do_sample=args.sample, temperature=args.temperature, seed=args.seed)
    latents = {}
    for latent, score, act in zip(choice.latents, choice.scores, choice.typical_activations or ()):
        effect = logit_effect(model, sae, latent, 5)
        latents[f"latent {latent}"] = {"score": score, "typical_activation": act,
                                       "top_tokens": [e.token for e in effect[0]] if effect else None}
    generations = {f"prompt {i}": {"prompt": p, "unsteered": u, "steered": s}
                   for i, (p, u, s) in enumerate(zip(result.prompts, result.unsteered, result.steered))}
    return {"sae": str(args.sae), "site": choice.site.hook_name, "config": dataclasses.asdict(result.config),
            "latents": latents, "generations": generations}


def _compare(args: argparse.Namespace, model: Any, sae: Any, concept: Any) -> dict[str, Any]:
    from patching.steering.compare import CompareSettings, compare_steering

    settings = CompareSettings(scale=args.scale, positions=args.positions, seeds=tuple(args.seeds),
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    result = compare_steering(model, sae, concept, k_values=tuple(args.k_values), coefficients=tuple(args.coefficients),
                              methods=tuple(args.methods), settings=settings)
    folder = result.save(args.out)
    best = {}
    for (method, k), part in result.table[result.table["method"] != "none"].groupby(["method", "k"]):
        row = part.loc[part["target_effect"].idxmax()]
        best[f"{method} K={k}"] = {"coefficient": float(row["coefficient"]), "target_effect": float(row["target_effect"]),
                                   "kl_neutral": float(row["kl_neutral"]), "gen_perplexity": float(row["gen_perplexity"])}
    return {"out": str(folder), "rows": len(result.table), "best_effect_per_setting": best}
