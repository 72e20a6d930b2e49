"""`latentpatch dashboards`: static HTML pages for SAE latents and the MLP neurons they decompose.

    latentpatch dashboards runs/sae-l12-mid --latents 5 17 --neurons 40 1203 --out dash/
    latentpatch dashboards runs/sae-l12-mid --top-neurons 10 --top-latents 10 --out dash/

The SAE folder names the model and site. Neuron pages need the SAE at the MLP's input
(`resid_mid` of the neurons' block). `--text` takes what `train` takes, a named corpus (its training
split: `generated`, the self-generated chat corpus, by default; `default` is the training mix) or a
.txt/.jsonl file. The model is loaded only up to the SAE's block: nothing later is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentpatch.cli.common import COUNT_MAX, SAE_HELP, bounded_int

EXAMPLE = ("example: latentpatch dashboards runs/sae-l12-mid --latents 5 17 --neurons 40 1203 --out dash\n"
           "         latentpatch dashboards runs/sae-l12-mid --top-neurons 10 --top-latents 10 --out dash")


JSON_OUTPUT = {
    "index": "the index page",
    "pages": "how many unit pages were written",
    "latents": "the latents with a page",
    "neurons": "the neurons with a page",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `dashboards` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("dashboards", help="build static HTML dashboards for latents and neurons of an SAE",
                              description="One page per latent / neuron (top contexts, histogram, logit effect, latent "
                                          "decomposition for neurons) and an index.html, with PNG plots.\n\n" + EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", help=SAE_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder (index.html and one page per unit)")
    p.add_argument("--latents", type=int, nargs="*", default=[], help="latent indices")
    p.add_argument("--neurons", type=int, nargs="*", default=[], help="MLP neuron indices of the SAE's block")
    p.add_argument("--top-latents", type=bounded_int(0, COUNT_MAX), default=0, help="also the N latents with the largest activation")
    p.add_argument("--top-neurons", type=bounded_int(0, COUNT_MAX), default=0, help="also the N neurons with the largest activation")
    p.add_argument("--text", default="generated",
                   help="a named corpus, as for train ('generated': the self-generated chat corpus, the default; "
                        "'default': real text plus it; 'real', 'brown', ...) or a .txt/.jsonl file")
    p.add_argument("--max-texts", type=int, default=None, help="use only the first N texts of the corpus")
    p.add_argument("--n-top", type=int, default=32, help="top contexts grouped and scored per neuron (default 32)")
    p.add_argument("--contexts", type=int, default=12, help="top contexts shown per unit (default 12)")
    p.add_argument("--model", default=None, help="model name (default: the SAE's model_name)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_dashboards, json_output=JSON_OUTPUT)


def run_dashboards(args: argparse.Namespace) -> dict[str, Any]:
    from patching.errors import PatchingError
    from patching.inspect.dashboards import write_dashboards
    from patching.inspect.latents import InspectConfig, inspect_latents
    from patching.model.checks import check_latent_indices
    from patching.inspect.neuron_cards import NeuronConfig, inspect_units, unit_scores
    from patching.inspect.neurons import Neuron
    from patching.model import tl_compat
    from patching.model.sites import Site
    from patching.model.provenance import provenance
    from latentpatch.cli.common import resolve_sae
    from training.paths import check_output_folder

    check_output_folder(args.out)
    sae = resolve_sae(args.sae)
    site = Site.from_hook_name(sae.cfg.hook_name)
    if not (args.latents or args.neurons or args.top_latents or args.top_neurons):
        raise PatchingError("name units: --latents, --neurons, --top-latents or --top-neurons")
    latents = list(check_latent_indices(args.latents, sae.d_sae)) if args.latents else []
    config = NeuronConfig(InspectConfig(k_contexts=args.contexts), k=max(args.n_top, args.contexts))
    texts = _texts(args.text, args.max_texts)
    model = load_model_for(sae, args.model)
    neurons = [Neuron(site.layer, i) for i in args.neurons]
    if args.neurons:  # validated before the corpus pass
        from patching.inspect.neurons import check_units

        check_units(model, neurons)
    if args.top_latents or args.top_neurons:
        scores = unit_scores(model, sae, site.layer, texts, k=2)
        latents += [i for i in scores.latent_max.argsort(descending=True)[: args.top_latents].tolist() if i not in latents]
        known = {n.index for n in neurons}
        neurons += [Neuron(site.layer, i) for i in scores.neuron_max.argsort(descending=True)[: args.top_neurons].tolist()
                    if i not in known]
    reports: list[Any] = inspect_units(model, sae, neurons, texts, config=config) if neurons else []
    if latents:
        reports += inspect_latents(model, sae, latents, texts, config=config.inspect)
    record = provenance(model, saes={site: sae}, prompts=None, sae=str(args.sae), corpus=args.text, texts=len(texts))
    index = write_dashboards(args.out, reports, title=f"{tl_compat.model_name(model)}: units at {site.hook_name}",
                             provenance=record)
    return {"index": str(index), "pages": len(reports), "latents": latents, "neurons": [n.index for n in neurons]}


def load_model_for(sae: Any, name: str | None) -> Any:
    """The SAE's model (or `name`) with the SAE's weight processing, loaded only up to its block."""
    from patching.model.loading import load_model_for as load
    from patching.model.sites import Site

    model = load(sae, name, n_layers=Site.from_hook_name(sae.cfg.hook_name).layer + 1)
    model.eval()
    return model


def _texts(text: str, max_texts: int | None) -> list[str]:
    """The first `max_texts` texts of a `--text` value, resolved as every command resolves it."""
    from latentpatch.cli.common import texts_for

    opener, _, _ = texts_for(text)
    texts = []
    for item in opener():
        if max_texts is not None and len(texts) >= max_texts:
            break
        texts.append(item)
    return texts
