"""`latentpatch train`: harvest activations from a model and train L1 SAEs on them.

The run configuration (`RunConfig`: model, site, text, paths) is separate from the library's
`TrainerConfig` (STYLE.md rule 3). The output folder is a loadable SAE (SAELens layout, or one
`sae-i/` folder per SAE when several train together) with `train_log.jsonl`, `run_config.json`
and `checkpoints/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import TrainingConfigError

EXAMPLE = ("example: latentpatch train --site 15 --d-sae 4608 --l1 5 --tokens 2000000 --out runs/sae-l15\n"
           "         latentpatch train --site 15 --d-sae 4608 --l1 5 --tokens 2000000 --out runs/sae-l15 --resume\n"
           "         latentpatch train --site 6:resid_post --d-sae 2304 --l1 3 5 8 --tokens 1000000 --out runs/sweep")


@dataclass(frozen=True)
class RunConfig:
    """What a `train` run reads and writes, on top of the trainer's recipe."""

    model: str
    """Model name (`smollm2-135m-instruct` offline, or any TransformerLens name)."""
    site: str
    """Hook site: a layer (`15`), `layer:kind` (`15:resid_post`) or a hook name."""
    d_sae: tuple[int, ...]
    """Latent counts, one per SAE (or one shared)."""
    text: str
    """`default` (real text + the self-generated chat corpus), `brown`, `nlp-corpus`, `generated` (their
    training splits, `training.mix`), a .txt/.jsonl path, or `hf:NAME` (needs the hub)."""
    out: str
    """Output folder."""
    batch_size: int
    """Activations per step."""
    context_size: int
    """Tokens per harvested row (BOS included)."""
    buffer_tokens: int
    """Shuffle-buffer capacity in activations."""
    drop_special_tokens: bool
    """Leave BOS and other special tokens out of training."""
    activation_cache: tuple[str, ...] | None
    """Cache folder(s): read activations from them (shards of all, weighted by their tokens); a single
    folder that holds no cache yet is harvested into first."""


def register(subparsers: Any) -> None:
    """Add the `train` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("train", help="train L1 SAEs on a model's activations (resumable)",
                              description="Harvest activations at a site (the forward pass stops there), shuffle them "
                                          "and train one or several L1 SAEs. DIR becomes a loadable SAE folder with "
                                          "train_log.jsonl and checkpoints/.\n\n" + EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--site", required=True, help="hook site: layer (15), layer:kind (15:resid_post) or hook name")
    p.add_argument("--d-sae", type=int, nargs="+", default=[4608], help="latents per SAE; several values train several SAEs")
    p.add_argument("--l1", type=float, nargs="+", default=[5.0], help="L1 coefficient(s) in normalized units (default 5)")
    p.add_argument("--tokens", type=int, required=True, help="training activations (steps = tokens // batch size)")
    p.add_argument("--out", type=Path, required=True, help="output folder DIR")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in DIR")
    p.add_argument("--text", default="default",
                   help="'default' (Brown + nlp-corpus + the self-generated chat corpus, training split), 'real', "
                        "'brown', 'nlp-corpus', 'generated', a .txt/.jsonl file, or hf:NAME (needs the hub)")
    p.add_argument("--batch-size", type=int, default=4096, help="activations per step (default 4096)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak Adam learning rate (default 4e-4)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per harvested row (default 128)")
    p.add_argument("--buffer-tokens", type=int, default=65536, help="shuffle-buffer capacity in activations")
    p.add_argument("--keep-special-tokens", action="store_true", help="train on BOS/special-token activations too")
    p.add_argument("--activation-cache", nargs="+", default=None,
                   help="read activations from these cache folders (see `latentpatch harvest`; a single folder that "
                        "holds none is harvested into first)")
    p.add_argument("--resample-steps", type=int, nargs="*", default=[], help="steps at which dead latents are resampled")
    p.add_argument("--log-every", type=int, default=50, help="steps between log records (default 50)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between splice_metrics on held-out text")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--wandb-project", default=None, help="also log to this wandb project (WANDB_MODE=offline works)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and resampling")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_train)
    from training.cli_corpus import register as register_corpus
    from training.cli_harvest import register as register_harvest

    register_harvest(subparsers)
    register_corpus(subparsers)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from training.config import TrainerConfig
    from training.trainer import Trainer

    run = RunConfig(model=args.model, site=args.site, d_sae=tuple(args.d_sae), text=args.text, out=str(args.out),
                    batch_size=args.batch_size, context_size=args.context_size, buffer_tokens=args.buffer_tokens,
                    drop_special_tokens=not args.keep_special_tokens,
                    activation_cache=tuple(args.activation_cache) if args.activation_cache else None)
    steps = args.tokens // args.batch_size
    if steps < 1:
        raise TrainingConfigError(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    _check_out(args.out, args.resume)
    n_saes = max(len(args.d_sae), len(args.l1))
    if {len(args.d_sae), len(args.l1)} - {1, n_saes}:
        raise TrainingConfigError(f"--d-sae has {len(args.d_sae)} values and --l1 {len(args.l1)}: give one, or the same number")
    config = TrainerConfig(total_steps=steps, lr=args.lr, l1_coefficient=tuple(args.l1) if n_saes > 1 else args.l1[0],
                           resample_steps=tuple(args.resample_steps), log_every=args.log_every,
                           eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                           progress_bar=not args.no_progress)
    model, site = _load(run, full=args.eval_every is not None)
    saes = _new_saes(run, model, site, n_saes, args.seed)
    batches = _batches(run, model, site, args.seed, tokens=args.tokens)
    eval_tokens = _eval_tokens(model, run.context_size) if args.eval_every is not None else None
    trainer = Trainer(config, saes if n_saes > 1 else saes[0], batches, out_dir=args.out,
                      model=model if eval_tokens is not None else None, eval_tokens=eval_tokens,
                      wandb_project=args.wandb_project)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "run_config.json").write_text(json.dumps({"run": dataclasses.asdict(run),
                                                                "trainer": config.to_dict()}, indent=2))
    start_step = trainer.resume() if args.resume else 0
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    last = [r for r in trainer.history if "explained_variance" in r][-n_saes:]
    return {"out": str(args.out), "site": site.hook_name, "steps": trainer.step, "resumed_from_step": start_step,
            "tokens": trainer.tokens_seen, "seconds": round(elapsed, 1),
            "tokens_per_s": round((trainer.step - start_step) * args.batch_size / max(elapsed, 1e-9), 1),
            "final": last}


def parse_site(text: str) -> Any:
    from patching.sites import Site

    if text.startswith("blocks."):
        return Site.from_hook_name(text)
    layer, _, kind = text.partition(":")
    if not layer.isdigit():
        raise TrainingConfigError(f"--site {text!r}: expected a layer (15), layer:kind (15:resid_post) or a hook name")
    return Site(int(layer), kind or "resid_pre")


def _check_out(out: Path, resume: bool) -> None:
    has_run = (Path(out) / "checkpoints").is_dir()
    if has_run and not resume:
        raise TrainingConfigError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not has_run:
        raise TrainingConfigError(f"--resume given but {out} holds no checkpoints/")


def _load(run: RunConfig, *, full: bool) -> tuple[Any, Any]:
    from patching.models import load_model

    site = parse_site(run.site)
    # Harvesting runs blocks 0..layer only, so the rest of the model is not even loaded unless
    # splice_metrics (which needs the logits) is asked for.
    model = load_model(run.model, n_layers=None if full else site.layer + 1)
    model.eval()
    return model, site.check(model)


def _new_saes(run: RunConfig, model: Any, site: Any, n_saes: int, seed: int) -> list[Any]:
    import torch

    from sae import SAEConfig, SparseAutoencoder

    widths = run.d_sae * n_saes if len(run.d_sae) == 1 else run.d_sae
    saes = []
    for index, d_sae in enumerate(widths):
        cfg = SAEConfig(d_in=site.width(model), d_sae=d_sae, hook_name=site.hook_name, model_name=run.model,
                        model_from_pretrained_kwargs=model.latentpatch_origin.flags.as_kwargs(),
                        context_size=run.context_size, dataset_path=run.text, prepend_bos=True)
        saes.append(SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed * 1000 + index)))
    return saes


def _batches(run: RunConfig, model: Any, site: Any, seed: int, *, tokens: int) -> Any:
    from training.cache import cached_batches, read_manifest, write_activation_cache
    from training.harvest import HarvestChunks, harvested_batches
    from training.text import TokenRows

    if run.activation_cache is None:
        opener, description, _digest = texts_for(run.text)
        return harvested_batches(model, site, opener, batch_size=run.batch_size, context_size=run.context_size,
                                 buffer_tokens=run.buffer_tokens, drop_special_tokens=run.drop_special_tokens,
                                 seed=seed, description=description)
    folders = run.activation_cache
    if len(folders) == 1 and not (Path(folders[0]) / "manifest.json").exists():
        opener, description, _digest = texts_for(run.text)
        rows = TokenRows(model, opener, context_size=run.context_size, description=description)
        write_activation_cache(HarvestChunks(model, site, rows, drop_special_tokens=run.drop_special_tokens),
                               folders[0], n_tokens=tokens)
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest.get("source", {}).get("hook_name") not in (None, site.hook_name):
            raise TrainingConfigError(f"activation cache {folder} holds {manifest['source']['hook_name']}, "
                                      f"not {site.hook_name}")
    return cached_batches(folders, batch_size=run.batch_size, buffer_tokens=run.buffer_tokens, seed=seed)


def texts_for(text: str) -> tuple[Any, str, str | None]:
    """(opener, description, corpus digest or None) for a `--text` value; named corpora use their
    training split."""
    from training.mix import CORPUS_NAMES, corpus_digest, corpus_texts
    from training.text import file_texts, hf_texts

    if text in CORPUS_NAMES:
        return corpus_texts(text, "train"), f"{text} corpus (train split)", corpus_digest(text, "train")
    if text.startswith("hf:"):
        return hf_texts(text[3:]), text, None
    return file_texts(text), text, None


def _eval_tokens(model: Any, context_size: int) -> Any:
    import torch

    from patching import tl_compat
    from training.prompts import EVAL_TEXTS

    # Cut every text to the shortest one's length: no padding tokens in the losses.
    rows = [tl_compat.to_tokens(model, text)[0] for text in EVAL_TEXTS]
    length = min(context_size, *(row.shape[0] for row in rows))
    return torch.stack([row[:length] for row in rows])
