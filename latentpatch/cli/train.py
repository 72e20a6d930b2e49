"""`latentpatch train`: harvest activations from a model and train SAEs on them (L1 by default,
or TopK / BatchTopK with AuxK: `--architecture topk --k 32`).

The run configuration (`RunConfig`: model, site, text, paths) is separate from the library's
`TrainerConfig` (STYLE.md rule 3). The output folder is a loadable SAE (SAELens layout, or one
`sae-i/` folder per SAE when several train together) with `train_log.jsonl`, `run_config.json`
and `checkpoints/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from latentpatch.cli.run_config import RunConfig
from latentpatch.cli.common import COUNT_MAX, SEED_MAX, bounded_int, parse_site, texts_for
from sae.files import atomic_write
from training.errors import TrainingConfigError
from training.trainer.runlog import LOG_FILE
from training.activations.sources import MAX_NORM_RATIO
from training.data.heldout import HELDOUT_ROWS, heldout_tokens
from training.trainer.trainer import CHECKPOINT_DIR

EXAMPLE = ("example: latentpatch train --site 15 --d-sae 4608 --l1 5 --tokens 2000000 --out runs/sae-l15\n"
           "         latentpatch train --site 15 --d-sae 4608 --l1 5 --tokens 2000000 --out runs/sae-l15 --resume\n"
           "         latentpatch train --site 6:resid_post --d-sae 2304 --l1 3 5 8 --tokens 1000000 --out runs/sweep\n"
           "         latentpatch train --site 15 --d-sae 4608 --architecture batchtopk --k 32 64 --tokens 2000000 "
           "--out runs/btk\n"
           "         torchrun --nproc-per-node 4 -m latentpatch train --site 15 --tokens 20000000 --out runs/dp\n"
           "         torchrun --nproc-per-node 4 -m latentpatch train --parallel saes --site 5 10 15 20 "
           "--tokens 2000000 --out runs/sites")


JSON_OUTPUT = {
    "out": "the output folder",
    "site": "the hook name trained on (single process or data parallel)",
    "steps": "steps taken", "resumed_from_step": "the checkpoint step resumed from (0 for a fresh run)",
    "tokens": "activations seen", "seconds": "wall-clock time", "tokens_per_s": "training rate",
    "final": "each SAE's last logged metrics",
    "communication_share": "data parallel: share of time in collectives",
    "world_size": "ranks (torchrun)", "parallel": "data or saes (torchrun)",
    "groups": "SAE parallel: each rank's summary",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `train` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("train", help="train L1 SAEs on a model's activations (resumable)",
                              description="Harvest activations at a site (the forward pass stops there), shuffle them "
                                          "and train one or several L1 SAEs. DIR becomes a loadable SAE folder with "
                                          "train_log.jsonl and checkpoints/.\n\n" + EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: the offline SmolLM2-135M-Instruct; "
                                                                      "gemma-3-270m is the second offline model)")
    p.add_argument("--site", required=True, nargs="+", help="hook site: layer (15), layer:kind (15:resid_post) or hook "
                                                           "name; several sites need --parallel saes under torchrun")
    p.add_argument("--d-sae", type=int, nargs="+", default=[4608], help="latents per SAE; several values train several SAEs")
    p.add_argument("--l1", type=float, nargs="+", default=[5.0], help="L1 coefficient(s) in normalized units (default 5)")
    p.add_argument("--architecture", choices=("l1", "topk", "batchtopk"), default="l1",
                   help="sparsity objective: 'l1' (ReLU SAEs, the default), 'topk' (k latents per token, Gao et al. "
                        "2024) or 'batchtopk' (k per token on average over the batch, Bussmann et al. 2024; saved as "
                        "SAELens's jumprelu); topk and batchtopk train dead latents with AuxK and ignore --l1")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="latents per token for topk/batchtopk; several values train several SAEs")
    p.add_argument("--auxk-coefficient", type=float, default=1 / 32,
                   help="weight of the AuxK dead-latent loss (default 1/32, Gao et al. 2024; 0 turns it off)")
    p.add_argument("--tokens", type=bounded_int(1, 2 ** 40), required=True, help="training activations (steps = tokens // batch size)")
    p.add_argument("--out", type=Path, required=True, help="output folder DIR")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace what DIR holds (an SAE, other files); without it "
                                                            "a folder that is not empty is refused")
    p.add_argument("--text", default="default",
                   help="'default' (Brown + nlp-corpus + the self-generated chat corpus, training split), 'real', "
                        "'brown', 'nlp-corpus', 'generated', a .txt/.jsonl file, or hf:NAME (needs the hub)")
    p.add_argument("--batch-size", type=bounded_int(1, 2 ** 20), default=4096, help="activations per step (default 4096; under torchrun "
                                                                   "with --parallel data, the global batch over all ranks)")
    p.add_argument("--parallel", choices=("data", "saes"), default="data",
                   help="under torchrun: 'data' (each rank harvests a stripe of the tokens, gradients all-reduced) or "
                        "'saes' (the SAEs, or sites, dealt over ranks, each trained on its rank's own harvest)")
    p.add_argument("--dist-timeout", type=float, default=600.0, help="seconds a collective may wait for a rank that "
                                                                     "stopped answering before the job fails (default 600)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak Adam learning rate (default 4e-4)")
    p.add_argument("--context-size", type=bounded_int(2, 1 << 20), default=128, help="tokens per harvested row (default 128)")
    p.add_argument("--buffer-tokens", type=bounded_int(1, 2 ** 24), default=65536, help="shuffle-buffer capacity in activations")
    p.add_argument("--keep-special-tokens", action="store_true", help="train on BOS/special-token activations too")
    p.add_argument("--max-norm-ratio", type=float, default=0.0,
                   help="leave out massive activations, norms over this multiple of their chunk's median "
                        f"(e.g. {MAX_NORM_RATIO:g}; default 0: keep every activation)")
    p.add_argument("--activation-cache", nargs="+", default=None,
                   help="read activations from these cache folders (see `latentpatch harvest`; a single folder that "
                        "holds none is harvested into first)")
    p.add_argument("--resample-steps", type=int, nargs="*", default=[], help="steps at which dead latents are resampled")
    p.add_argument("--log-every", type=int, default=50, help="steps between log records (default 50)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (SAEBench's core figures, as `latentpatch eval --heldout-rows` and "
                        "the release registry compute them) on the real corpus's held-out rows")
    p.add_argument("--eval-rows", type=bounded_int(1, COUNT_MAX), default=HELDOUT_ROWS,
                   help=f"held-out rows each evaluation reads (default {HELDOUT_ROWS}; the registry reads 160)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--wandb-project", default=None, help="also log to this wandb project (WANDB_MODE=offline works)")
    p.add_argument("--seed", type=bounded_int(0, SEED_MAX), default=0, help="seed of data order, initialisation and resampling")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_train, json_output=JSON_OUTPUT)


def run_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train; under torchrun (WORLD_SIZE > 1) data- or SAE-parallel. Only rank 0 returns a summary."""
    from training.parallel.distributed import init_distributed, launched_world_size, shutdown_distributed

    world = launched_world_size()
    if len(args.site) > 1 and (world == 1 or args.parallel != "saes"):
        raise TrainingConfigError(f"{len(args.site)} sites given: several sites train SAE-parallel, "
                                  "`torchrun --nproc-per-node N -m latentpatch train --parallel saes --site ...`")
    if len(args.site) > 1 and args.activation_cache is not None:
        raise TrainingConfigError("--activation-cache holds one site's activations; give one --site with it")
    if world == 1:
        return _train_group(args, args.site[0], _units(args), Path(args.out), None, data_parallel=False)
    collective = init_distributed(timeout_s=args.dist_timeout)
    try:
        if args.parallel == "data":
            result = _train_group(args, args.site[0], _units(args), Path(args.out), collective, data_parallel=True)
            return {**result, "world_size": world, "parallel": "data"} if collective.is_main else None
        return _train_sae_parallel(args, collective)
    finally:
        shutdown_distributed()


def _units(args: argparse.Namespace) -> list[tuple[int, float]]:
    """(d_sae, l1) of every SAE trained at one site."""
    n_ks = len(args.k) if args.architecture != "l1" and args.k else 1
    n_saes = max(len(args.d_sae), len(args.l1), n_ks)
    if {len(args.d_sae), len(args.l1), n_ks} - {1, n_saes}:
        raise TrainingConfigError(f"--d-sae has {len(args.d_sae)} values, --l1 {len(args.l1)} and --k {n_ks}: give "
                                  "one, or the same number")
    widths = args.d_sae * n_saes if len(args.d_sae) == 1 else args.d_sae
    l1s = args.l1 * n_saes if len(args.l1) == 1 else args.l1
    return list(zip(widths, l1s))


def _train_sae_parallel(args: argparse.Namespace, collective: Any) -> dict[str, Any] | None:
    """Deal (site, SAE) units round-robin over ranks; each rank trains its units site by site."""
    from training.parallel.distributed import assigned

    units = [(site, index) for site in args.site for index in range(len(_units(args)))]
    mine = [units[i] for i in assigned(len(units), collective.rank, collective.world_size)]
    summaries = []
    for site in dict.fromkeys(site for site, _ in mine):
        indices = [index for unit_site, index in mine if unit_site == site]
        group = [_units(args)[i] for i in indices]
        out = Path(args.out) / f"rank-{collective.rank}" / parse_site(site).hook_name
        result = _train_group(args, site, group, out, collective if args.activation_cache else None,
                              data_parallel=False, seed_offsets=indices)
        summaries.append({**result, "sae_indices": indices})
    gathered = collective.gather_bytes(json.dumps(summaries).encode())
    if gathered is None:
        return None
    groups = [group for part in gathered for group in json.loads(part)]
    (Path(args.out) / "sae_parallel.json").write_text(json.dumps({"world_size": collective.world_size,
                                                                  "groups": groups}, indent=2))
    return {"out": str(args.out), "world_size": collective.world_size, "parallel": "saes", "groups": groups}


def _train_group(args: argparse.Namespace, site_text: str, group: list[tuple[int, float]], out: Path, collective: Any,
                 *, data_parallel: bool, seed_offsets: list[int] | None = None) -> dict[str, Any]:
    """One trainer: the SAEs `group` at one site, on this process (data_parallel: on every rank at once)."""
    from training.trainer.config import TrainerConfig
    from training.trainer.data_parallel import DataParallelTrainer
    from training.trainer.trainer import Trainer

    world = collective.world_size if data_parallel else 1
    if args.batch_size % world:
        raise TrainingConfigError(f"--batch-size {args.batch_size} does not split over {world} ranks; give a multiple")
    run = RunConfig(model=args.model, site=site_text, d_sae=tuple(d for d, _ in group), text=args.text, out=str(out),
                    batch_size=args.batch_size, context_size=args.context_size, buffer_tokens=args.buffer_tokens,
                    drop_special_tokens=not args.keep_special_tokens,
                    max_norm_ratio=args.max_norm_ratio or None,
                    activation_cache=tuple(args.activation_cache) if args.activation_cache else None)
    _check_args(args)
    steps = args.tokens // args.batch_size
    if steps < 1:
        raise TrainingConfigError(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    if not data_parallel or collective.is_main:  # only rank 0 writes (or must see) a data-parallel run's folder
        _check_out(out, args.resume, getattr(args, "overwrite", False))
    l1s = tuple(l1 for _, l1 in group)
    ks = _group_ks(args, group, seed_offsets)
    config = TrainerConfig(total_steps=steps, lr=args.lr, l1_coefficient=l1s if len(group) > 1 else l1s[0],
                           architecture=args.architecture, k=ks if ks is None or len(ks) > 1 else ks[0],
                           auxk_coefficient=args.auxk_coefficient,
                           resample_steps=tuple(args.resample_steps), log_every=args.log_every,
                           eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                           progress_bar=not args.no_progress)
    texts = texts_for(run.text)[:2]  # a missing or binary text file fails here, before the model loads
    model, site = _load(run, full=args.eval_every is not None)
    saes = _new_saes(run, model, site, args.seed, seed_offsets or list(range(len(group))), config)
    batches = _batches(run, model, site, args.seed, tokens=args.tokens, texts=texts, collective=collective,
                       stripe=data_parallel)
    eval_tokens = heldout_tokens(model, n_rows=args.eval_rows, context_size=run.context_size) \
        if args.eval_every is not None else None
    sae_arg = saes if len(saes) > 1 or seed_offsets is not None else saes[0]
    common = dict(out_dir=out, model=model if eval_tokens is not None else None, eval_tokens=eval_tokens,
                  wandb_project=args.wandb_project)
    trainer = (DataParallelTrainer(config, sae_arg, batches, collective=collective, **common) if data_parallel
               else Trainer(config, sae_arg, batches, **common))
    created = not out.exists()
    try:
        if trainer.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            recorded = {"run": dataclasses.asdict(run), "trainer": config.to_dict()}
            atomic_write(out / "run_config.json",
                         json.dumps({**recorded, "world_size": world} if world > 1 else recorded, indent=2).encode())
        start_step = trainer.resume() if args.resume else 0
        start = time.perf_counter()
        trainer.fit()
    except BaseException:
        if not args.resume and trainer.rank == 0:
            _remove_failed_start(out, created)
        raise
    elapsed = time.perf_counter() - start
    last = [r for r in trainer.history if "explained_variance" in r][-len(group):]
    summary = {"out": str(out), "site": site.hook_name, "steps": trainer.step, "resumed_from_step": start_step,
               "tokens": trainer.tokens_seen, "seconds": round(elapsed, 1),
               "tokens_per_s": round((trainer.step - start_step) * args.batch_size / max(elapsed, 1e-9), 1),
               "final": last}
    if data_parallel:
        summary["communication_share"] = round(collective.comm_seconds / max(elapsed, 1e-9), 4)
    return summary


def _check_args(args: argparse.Namespace) -> None:
    """Counts that must be positive, and the output and cache folders, before anything loads."""
    from training.activations.cache import read_manifest
    from training.paths import check_output_folder

    counts = {"--batch-size": [args.batch_size], "--tokens": [args.tokens], "--context-size": [args.context_size],
              "--buffer-tokens": [args.buffer_tokens], "--log-every": [args.log_every], "--d-sae": args.d_sae,
              "--checkpoint-every": [args.checkpoint_every] if args.checkpoint_every is not None else [],
              "--eval-every": [args.eval_every] if args.eval_every is not None else [],
              "--eval-rows": [args.eval_rows]}
    for option, values in counts.items():
        if any(value < 1 for value in values):
            raise TrainingConfigError(f"{option} must be a positive int, got {' '.join(map(str, values))}")
    if args.max_norm_ratio and not args.max_norm_ratio > 1:
        raise TrainingConfigError(f"--max-norm-ratio must be above 1 (a multiple of the median norm) or 0 (off), "
                                  f"got {args.max_norm_ratio}")
    if not 0 < args.dist_timeout < float("inf"):
        raise TrainingConfigError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    check_output_folder(args.out)
    for folder in args.activation_cache or []:  # a FIFO or a file here failed after the model loaded
        harvested_into = len(args.activation_cache) == 1 and not os.path.lexists(Path(folder) / "manifest.json")
        check_output_folder(folder, option="--activation-cache") if harvested_into else read_manifest(folder)


def _remove_failed_start(out: Path, created: bool) -> None:
    """A run that failed before its first checkpoint leaves nothing that looks like a run: its
    `run_config.json`, `train_log.jsonl` and empty `checkpoints/` go (and `out`, if this run made
    it and it is now empty). A run with a checkpoint is kept, to be resumed."""
    from training.trainer.checkpoint import latest_checkpoint

    root = out / CHECKPOINT_DIR
    if root.is_dir() and latest_checkpoint(root) is not None:
        return
    for name in ("run_config.json", LOG_FILE):
        (out / name).unlink(missing_ok=True)
    for folder in ([root] if root.is_dir() else []) + ([out] if created else []):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: never anything this run did not write


def _check_out(out: Path, resume: bool, overwrite: bool = False) -> None:
    """The output folder, before the model loads: writable (`check_output_folder`), and not holding
    anything a new run would replace (an SAE without checkpoints had its weights silently replaced)."""
    from training.paths import check_output_folder

    check_output_folder(out)
    has_run = (Path(out) / "checkpoints").is_dir()
    if has_run and not resume:
        raise TrainingConfigError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not has_run:
        raise TrainingConfigError(f"--resume given but {out} holds no checkpoints/")
    held = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() and not resume else []
    if held and not overwrite:
        what = "an SAE (cfg.json)" if "cfg.json" in held else f"{len(held)} entries ({', '.join(held[:3])}...)"
        raise TrainingConfigError(f"--out {out} already holds {what}; choose another --out, or pass --overwrite to "
                                  "replace it")


def _load(run: RunConfig, *, full: bool) -> tuple[Any, Any]:
    from patching.errors import ModelLoadError
    from patching.model.loading import load_model

    site = parse_site(run.site)
    # Harvesting runs blocks 0..layer only, so the rest of the model is not even loaded unless
    # an evaluation (which needs the logits) is asked for.
    try:
        model = load_model(run.model, n_layers=None if full else site.layer + 1)
    except ModelLoadError as err:
        if "layers" not in str(err):
            raise
        raise TrainingConfigError(f"--site {run.site}: layer {site.layer} is beyond the model ({err})") from err
    model.eval()
    return model, site.check(model)


def _check_sizes(run: RunConfig, model: Any, site: Any) -> None:
    """Before anything is allocated: rows within the model's context, and SAEs whose parameters, gradients
    and Adam moments (four float32 copies) fit in memory (`--d-sae 1e11` asked for terabytes)."""
    from patching.model import tl_compat
    from sae.files import memory_bytes

    if run.context_size > tl_compat.n_ctx(model):
        raise TrainingConfigError(f"--context-size {run.context_size} exceeds the model's context ({tl_compat.n_ctx(model)})")
    need = sum(16 * (2 * site.width(model) * d_sae + d_sae + site.width(model)) for d_sae in run.d_sae)
    if need > memory_bytes():
        raise TrainingConfigError(f"--d-sae {' '.join(map(str, run.d_sae))}: the SAEs and their Adam state need "
                                  f"{need / 2 ** 30:.1f} GiB, more than this machine's {memory_bytes() / 2 ** 30:.1f} GiB")


def _group_ks(args: argparse.Namespace, group: list[tuple[int, float]],
              seed_offsets: list[int] | None) -> tuple[int, ...] | None:
    """The k of each SAE in `group` (None for l1), checked against its width before anything loads."""
    if args.architecture == "l1":
        if args.k:
            raise TrainingConfigError(f"--k {' '.join(map(str, args.k))} needs --architecture topk or batchtopk")
        return None
    if not args.k:
        raise TrainingConfigError(f"--architecture {args.architecture} needs --k (latents per token)")
    indices = seed_offsets or list(range(len(group)))
    ks = tuple(args.k[i] if len(args.k) > 1 else args.k[0] for i in indices)
    for (d_sae, _), k in zip(group, ks):
        if not 0 < k <= d_sae or (args.architecture == "batchtopk" and k == d_sae):
            raise TrainingConfigError(f"--k {k} must be positive and below --d-sae {d_sae}")
    return ks


def _new_saes(run: RunConfig, model: Any, site: Any, seed: int, indices: list[int], config: Any) -> list[Any]:
    import torch

    from sae import SAEConfig, SparseAutoencoder
    from training.trainer.objective import SAE_ARCHITECTURE

    _check_sizes(run, model, site)
    saes = []
    # Seeded by the SAE's index in the whole sweep: an SAE-parallel rank builds exactly the SAEs
    # a single process would.
    architecture = SAE_ARCHITECTURE[config.architecture]
    for index, d_sae, k in zip(indices, run.d_sae, config.k_for(len(indices)), strict=True):
        cfg = SAEConfig(d_in=site.width(model), d_sae=d_sae, hook_name=site.hook_name, model_name=run.model,
                        architecture=architecture, k=k if architecture == "topk" else None,
                        model_from_pretrained_kwargs=model.latentpatch_origin.flags.as_kwargs(),
                        context_size=run.context_size, dataset_path=run.text, prepend_bos=True)
        saes.append(SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(seed * 1000 + index)))
    return saes


def _batches(run: RunConfig, model: Any, site: Any, seed: int, *, tokens: int, texts: tuple[Any, str],
             collective: Any = None, stripe: bool = False) -> Any:
    """This process's activation batches from `texts` (`_texts`'s opener and description); with
    `stripe` (data parallel), its stripe of every step's batch."""
    from training.activations.cache import cached_batches, read_manifest, write_activation_cache
    from training.activations.harvest import HarvestChunks, harvested_batches
    from training.data.text import TokenRows

    rank, world = (collective.rank, collective.world_size) if collective is not None else (0, 1)
    opener, description = texts
    if run.activation_cache is None:
        return harvested_batches(model, site, opener, batch_size=run.batch_size // (world if stripe else 1),
                                 context_size=run.context_size, buffer_tokens=run.buffer_tokens,
                                 drop_special_tokens=run.drop_special_tokens, seed=seed, description=description,
                                 rank=rank if stripe else 0, world_size=world if stripe else 1,
                                 max_norm_ratio=run.max_norm_ratio)
    folders = run.activation_cache
    exists = (Path(folders[0]) / "manifest.json").exists()
    if collective is not None:  # rank 0 decides, so that every rank takes the same branch
        exists = collective.broadcast_bytes(b"1" if exists else b"") == b"1"
    if len(folders) == 1 and not exists:
        # Every rank harvests its stripe of the token rows into its own shards.
        rows = TokenRows(model, opener, context_size=run.context_size, description=description, rank=rank,
                         world_size=world)
        write_activation_cache(HarvestChunks(model, site, rows, drop_special_tokens=run.drop_special_tokens),
                               folders[0], n_tokens=tokens, collective=collective)
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest.get("source", {}).get("hook_name") not in (None, site.hook_name):
            raise TrainingConfigError(f"activation cache {folder} holds {manifest['source']['hook_name']}, "
                                      f"not {site.hook_name}")
    if stripe:
        return cached_batches(folders, batch_size=run.batch_size // world, buffer_tokens=run.buffer_tokens,
                              seed=seed, rank=rank, world_size=world, max_norm_ratio=run.max_norm_ratio)
    return cached_batches(folders, batch_size=run.batch_size, buffer_tokens=run.buffer_tokens, seed=seed,
                          max_norm_ratio=run.max_norm_ratio)

