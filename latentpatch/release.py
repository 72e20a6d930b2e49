"""Making a shipped SAE release: evaluate trained SAEs on held-out text, export one, register it.

    python -m latentpatch.release evaluate --sae RUN/sae-0 RUN/sae-1 --out sweep.json [--plot sweep.png]
    python -m latentpatch.release recipe --train-dir RUN --sae-index 1 --train-command "..." --harvest H1 H2 \
        --out-root RUNS --out r.json
    python -m latentpatch.release export --sae RUN/sae-1 [RUN2/sae-0 ...] --release smollm2-135m-res --recipe r.json [r2.json ...] \
        [--sae-id ID ...]
    python -m latentpatch.release reevaluate --release smollm2-135m-res --sae-id blocks.5.hook_resid_pre [...]

`evaluate` runs SAEBench's core evaluation (`patching.splice.evaluate_sae`) on the first rows of the
held-out split of the real corpora (never trained on) and plots L0 against CE loss recovered. `export` writes the SAE in float16
into `sae/releases/<release>/<hook name>/`, evaluates the exported weights themselves (what users
load), and records the entry in `sae/releases/registry.json`: the recipe (exact commands, corpus
digest, tokens, seconds), the held-out figures and the weights' SHA-256. Recorded commands name their
folders relative to `$OUT`, the output folder `recipe --out-root` names, never as the absolute paths
of the machine that made them: set `OUT` to any folder to rerun them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from sae import load_sae
from sae.files import WEIGHTS_FILE, atomic_write, save_sae
from sae.registry import REGISTRY_FILE, RELEASES_DIR, config_sha256, half_precision, load_release
from sae.safe_io import read_text, sha256_file

log = logging.getLogger(__name__)

EVAL_ROWS = 160
"""Held-out rows of 128 tokens per evaluation: 160 * 127 = 20,320 scored tokens. Fewer rows make a
noisy figure: about one row in twenty starts on a token that draws a massive activation, and
those few tokens move SAEBench's explained variance by 0.2 or more."""
MAX_JSON_BYTES = 64 << 20
"""Largest JSON record read from a run folder, recipe or registry (through `sae.safe_io`: no FIFO or device)."""


def evaluate(sae_dirs: list[Path], *, n_rows: int = EVAL_ROWS, corpus: str = "real",
             saes: list[Any] | None = None, model: Any = None) -> list[dict[str, Any]]:
    """Held-out figures for each SAE folder (or each of `saes`, already loaded, named by `sae_dirs`):
    the one evaluator (`patching.splice.evaluate_sae`, SAEBench's core set under SAELens's names,
    `SAEEvaluation.figures`) on the first `n_rows` rows of `corpus`'s held-out split, configured as
    the trainer's eval line and `latentpatch eval --heldout-rows` run it, all SAEs over one pass of
    the rows (`evaluate_saes`: one clean run per batch; `eval_seconds` is the whole pass's time).
    `model`: the default model unless given."""
    from patching.model.loading import load_model
    from patching.splice.evaluation import EvalConfig, evaluate_saes
    from training.data.heldout import heldout_tokens

    model = load_model() if model is None else model
    model.eval()
    tokens = heldout_tokens(model, corpus=corpus, n_rows=n_rows)
    loaded = list(saes) if saes is not None else [load_sae(folder) for folder in sae_dirs]
    start = time.perf_counter()
    evaluations = evaluate_saes(model, loaded, tokens, config=EvalConfig(progress=False))
    seconds = round(time.perf_counter() - start, 1)
    results = []
    for folder, sae, evaluation in zip(sae_dirs, loaded, evaluations):
        results.append({"sae": str(folder), "d_sae": sae.cfg.d_sae, "corpus": f"{corpus} (held-out split)",
                        "n_rows": n_rows, **_objective_of(folder), **evaluation.figures(),
                        "eval_seconds": seconds, "evaluated_together": len(loaded)})
        log.info("%s: %s", folder, json.dumps(results[-1]))
    return results


def _objective_of(folder: Path) -> dict[str, Any]:
    """How a `latentpatch train` run trained this SAE (from its run_config.json): the architecture
    and its sparsity setting, the L1 coefficient for 'l1', k for 'topk' and 'batchtopk'."""
    several = folder.name.startswith("sae-")  # several SAEs trained together: RUN/sae-<i>/
    run_config = (folder.parent if several else folder) / "run_config.json"
    if not run_config.is_file():
        return {}
    trainer = json.loads(read_text(run_config, max_bytes=MAX_JSON_BYTES))["trainer"]
    index = int(folder.name.split("-")[1]) if several else 0
    architecture = trainer.get("architecture", "l1")
    key = "l1_coefficient" if architecture == "l1" else "k"
    value = trainer[key]
    return {"architecture": architecture, key: value[index] if isinstance(value, list) else value}


def plot_sweep(results: list[dict[str, Any]], path: Path) -> None:
    """The held-out Pareto curves: L0 against CE loss recovered and against KL, one series per
    architecture, each point labelled with its sparsity setting."""
    from patching.figures import subplots

    fig, axes = subplots(1, 2, figsize=(9, 4))
    architectures = sorted({r.get("architecture", "l1") for r in results})
    for colour, architecture in enumerate(architectures):
        points = sorted((r for r in results if r.get("architecture", "l1") == architecture), key=lambda r: r["l0"])
        for ax, key in zip(axes, ("ce_loss_score", "kl_div_with_sae")):
            ax.plot([r["l0"] for r in points], [r[key] for r in points], "o-", color=f"C{colour}", label=architecture)
            for r in points:
                setting = f"k={r['k']}" if "k" in r else f"L1={r.get('l1_coefficient', '?')}"
                ax.annotate(f"{setting}, d_sae={r['d_sae']}", (r["l0"], r[key]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    for ax, (label, target) in zip(axes, (("CE loss recovered", 0.97), ("KL to the clean model (nats)", 0.25))):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.axvline(64, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(f"{label}, held-out")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def export(sae_dir: Path, release: str, recipe: dict[str, Any], *, root: Path = RELEASES_DIR,
           n_rows: int = EVAL_ROWS, sae_id: str | None = None) -> dict[str, Any]:
    """Ship `sae_dir` as float16 into `root/<release>/<sae_id>/` and register it (module docstring);
    `sae_id` is the SAE's hook name unless given (two SAEs of one release at one site need two ids)."""
    (entry,) = export_many([sae_dir], release, [recipe], root=root, n_rows=n_rows,
                           sae_ids=None if sae_id is None else [sae_id])
    return entry


def export_many(sae_dirs: list[Path], release: str, recipes: list[dict[str, Any]], *, root: Path = RELEASES_DIR,
                n_rows: int = EVAL_ROWS, sae_ids: list[str] | None = None, corpus: str = "real") -> list[dict[str, Any]]:
    """`export` for several SAEs of one release, their shipped weights evaluated together
    (`evaluate_saes`: one pass over the held-out rows of `corpus`, the mix they trained on)."""
    ids = list(sae_ids) if sae_ids is not None else [None] * len(sae_dirs)
    if not (len(sae_dirs) == len(recipes) == len(ids)):
        raise ValueError(f"{len(sae_dirs)} SAE folders, {len(recipes)} recipes and {len(ids)} sae ids: one of each per SAE")
    shipped_ids = []
    for sae_dir, recipe, given in zip(sae_dirs, recipes, ids):
        sae = load_sae(sae_dir)
        sae_id = given or sae.cfg.hook_name
        folder = save_sae(half_precision(sae), root / release / sae_id)
        sha = sha256_file(folder / WEIGHTS_FILE)
        registry_path = root / REGISTRY_FILE
        registry = json.loads(read_text(registry_path, max_bytes=MAX_JSON_BYTES)) if registry_path.exists() else {}
        entry = {"path": f"{release}/{sae_id}", "weights_sha256": sha,
                 "config_sha256": config_sha256(load_sae(folder).cfg), "recipe": recipe, "heldout": {}}
        registry.setdefault(release, {"model": sae.cfg.model_name, "saes": {}})["saes"][sae_id] = entry
        atomic_write(registry_path, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
        shipped_ids.append(sae_id)
    return reevaluate_many(release, shipped_ids, root=root, n_rows=n_rows, names=list(sae_dirs), corpus=corpus)


def reevaluate(release: str, sae_id: str, *, root: Path = RELEASES_DIR, n_rows: int = EVAL_ROWS,
               name: Path | None = None) -> dict[str, Any]:
    """Measure a registered SAE's shipped (float16) weights on held-out text, as users load them,
    and record the figures in its registry entry: after export, or when the protocol changes."""
    (entry,) = reevaluate_many(release, [sae_id], root=root, n_rows=n_rows, names=None if name is None else [name])
    return entry


def reevaluate_many(release: str, sae_ids: list[str], *, root: Path = RELEASES_DIR, n_rows: int = EVAL_ROWS,
                    names: list[Path] | None = None, corpus: str = "real") -> list[dict[str, Any]]:
    """`reevaluate` for several SAEs of one release, evaluated together on `corpus`'s held-out rows;
    one write of the registry."""
    shipped = [load_release(release, sae_id, root=root) for sae_id in sae_ids]
    names = names or [root / release / sae_id for sae_id in sae_ids]
    all_figures = evaluate(names, n_rows=n_rows, saes=shipped, corpus=corpus)
    registry_path = root / REGISTRY_FILE
    registry = json.loads(read_text(registry_path, max_bytes=MAX_JSON_BYTES))
    entries = []
    for sae_id, figures in zip(sae_ids, all_figures):
        figures.pop("sae")
        entry = registry[release]["saes"][sae_id]
        # the quality blocks (`latentpatch.quality`: error_share, probing, generalisation) are measured apart: kept
        entry["heldout"] = {**{k: v for k, v in entry.get("heldout", {}).items() if isinstance(v, dict)}, **figures}
        entries.append(entry)
    atomic_write(registry_path, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
    return entries


OUT = "$OUT"
"""How a recorded command names the output folder its runs wrote under (`recipe --out-root`)."""


def relative_to_out(command: str, out_root: Path) -> str:
    """`command` with every absolute path under `out_root` written as `$OUT/...`, so that the
    registry records no path of the machine that ran it; an absolute path elsewhere is refused."""
    root = out_root.resolve()
    words = []
    for word in shlex.split(command):
        if word.startswith("/"):
            path = Path(word).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"{word!r} in {command!r} is outside --out-root {root}: a recorded command "
                                 f"may name only folders under the output root")
            word = OUT if path == root else f"{OUT}/{shlex.quote(path.relative_to(root).as_posix())}"
        else:
            word = shlex.quote(word)
        words.append(word)
    return " ".join(words)


def build_recipe(train_dir: Path, sae_index: int, train_command: str, harvest_dirs: list[Path],
                 out_root: Path) -> dict[str, Any]:
    """The recipe an export records: the harvests' and the training's exact commands (paths relative
    to `out_root`, see `relative_to_out`), the corpora and their digests, token counts, rates and
    seconds (from `harvest.json`, `run_config.json` and the `--json` result of `latentpatch train`
    saved as `result.json`)."""
    from latentpatch.cli.common import parse_site

    harvests = [json.loads(read_text(folder / "harvest.json", max_bytes=MAX_JSON_BYTES)) for folder in harvest_dirs]
    run = json.loads(read_text(train_dir / "run_config.json", max_bytes=MAX_JSON_BYTES))
    result = json.loads(read_text(train_dir / "result.json", max_bytes=MAX_JSON_BYTES))
    coefficients = run["trainer"]["l1_coefficient"]
    ks = run["trainer"].get("k")
    widths = run["run"]["d_sae"]
    hook = parse_site(run["run"]["site"]).hook_name
    return {
        "commands": [relative_to_out(command, out_root) for command in [h["command"] for h in harvests] + [train_command]],
        "train_command": relative_to_out(train_command, out_root),
        "train_caches": [relative_to_out(str(Path(h["caches"][hook]).resolve()), out_root) for h in harvests],
        # The activations come from the caches, so the corpus is what the harvests read (in order);
        # the train command's --text only labels the SAE (its cfg's dataset_path).
        "corpus": " + ".join(dict.fromkeys(f"{h['text']} (train split)" for h in harvests)),
        "corpus_digest": hashlib.sha256("\n".join(h["corpus_digest"] for h in harvests).encode()).hexdigest(),
        "train_text_label": run["run"]["text"],
        "harvests": [{k: h[k] for k in ("text", "corpus_digest", "tokens_per_site", "skipped_rows", "seconds",
                                        "tokens_per_s") if k in h} for h in harvests],
        "generated_harvest_tokens": sum(h["tokens_per_site"] for h in harvests if h["text"] == "generated"),
        "harvested_tokens": sum(h["tokens_per_site"] for h in harvests),
        "train_tokens": result["tokens"], "train_steps": result["steps"], "train_seconds": result["seconds"],
        "saes_trained_together": max([len(widths), *(len(v) for v in (coefficients, ks) if isinstance(v, list))]),
        "sae_index": sae_index,
        "architecture": run["trainer"].get("architecture", "l1"),
        "l1_coefficient": coefficients[sae_index] if isinstance(coefficients, list) else coefficients,
        "k": _nth(run["trainer"].get("k"), sae_index),
        "d_sae": widths[sae_index] if len(widths) > 1 else widths[0],
        "trainer": run["trainer"],
    }


def _nth(value: Any, index: int) -> Any:
    """The `index`-th of a per-SAE setting recorded as one value or a list of them."""
    return value[index] if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentpatch.release", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="held-out figures of trained SAEs, as JSON (and a plot)")
    ev.add_argument("--sae", type=Path, nargs="+", required=True)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--plot", type=Path, default=None)
    ev.add_argument("--rows", type=int, default=EVAL_ROWS)
    ex = sub.add_parser("export", help="ship SAEs in float16 and register them (evaluated together)")
    ex.add_argument("--sae", type=Path, nargs="+", required=True)
    ex.add_argument("--release", required=True)
    ex.add_argument("--recipe", type=Path, nargs="+", required=True,
                    help="one JSON per SAE: commands, corpus, corpus_digest, tokens, ...")
    ex.add_argument("--sae-id", nargs="+", default=None, help="one id per SAE (default: each SAE's hook name)")
    ex.add_argument("--corpus", default="real", help="held-out split the figures are measured on (the training mix)")
    re_ = sub.add_parser("reevaluate", help="re-measure registered SAEs' held-out figures and record them")
    re_.add_argument("--release", required=True)
    re_.add_argument("--sae-id", nargs="+", required=True)
    re_.add_argument("--rows", type=int, default=EVAL_ROWS)
    rc = sub.add_parser("recipe", help="write the recipe JSON of one SAE of a `latentpatch train` run")
    rc.add_argument("--train-dir", type=Path, required=True)
    rc.add_argument("--sae-index", type=int, required=True)
    rc.add_argument("--train-command", required=True)
    rc.add_argument("--harvest", type=Path, nargs="+", required=True)
    rc.add_argument("--out-root", type=Path, required=True, help="the folder the runs wrote under: recorded as $OUT")
    rc.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "evaluate":
        results = evaluate(args.sae, n_rows=args.rows)
        atomic_write(args.out, json.dumps(results, indent=2).encode())
        if args.plot is not None:
            plot_sweep(results, args.plot)
    elif args.command == "recipe":
        recipe = build_recipe(args.train_dir, args.sae_index, args.train_command, args.harvest, args.out_root)
        atomic_write(args.out, json.dumps(recipe, indent=2).encode())
    elif args.command == "reevaluate":
        for sae_id, entry in zip(args.sae_id, reevaluate_many(args.release, args.sae_id, n_rows=args.rows)):
            log.info("re-measured %s/%s: %s", args.release, sae_id, json.dumps(entry["heldout"]))
    else:
        recipes = [json.loads(read_text(path, max_bytes=MAX_JSON_BYTES)) for path in args.recipe]
        for entry in export_many(args.sae, args.release, recipes, sae_ids=args.sae_id, corpus=args.corpus):
            log.info("registered %s", json.dumps(entry))


if __name__ == "__main__":
    main()
