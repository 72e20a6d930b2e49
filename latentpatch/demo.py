"""`latentpatch demo`: the main job on the default model, end to end, into an HTML report.

Uses the shipped release-v2 SAE at layer 15 (`smollm2-135m-res-v2/blocks.15.hook_resid_pre-full`:
BatchTopK, 4608 latents, trained by this project on every token of the real-text training split, 8.1M;
`--train` trains one here instead, as does a layer no release covers), measures it spliced, runs a
denoising sweep on a factual pair, attribution checked against exact patching, Top-1 versus
Top-K steering and a safety restoration curve, and writes `index.html` with its plots and
`results.json` into the output folder.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpatch.report import Section, write_report

DEMO_RELEASE = "smollm2-135m-res-v2"
DEMO_BATCH = 512
ZERO_ALLOWED = ("layer", "demo_train_tokens")
FACTUAL = ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. With the shipped release SAE nothing trains on the critical path; the
    measured time of the defaults is the `make demo` row of docs/benchmarks.md."""

    out: Path = Path("latentpatch-output")
    """Output folder for the report."""
    layer: int = 15
    """resid_pre layer of the SAE (15 of 30)."""
    d_sae: int = 4608
    """Dictionary size (8 x d_model) of an SAE trained here (`train`, or a layer no release covers)."""
    l1: float = 5.0
    """L1 coefficient (normalized units) of an SAE trained here."""
    train_tokens: int = 600_000
    """Activations an SAE trained here trains on (about 40 passes over the default corpus's ~15k tokens)."""
    batch_size: int = 1024
    """Activations per training step."""
    demo_train_tokens: int = 8192
    """Real-text activations harvested for the labelled training demonstration (0: skip it)."""
    demo_train_steps: int = 128
    """Steps of the training demonstration (batches of 512: eight passes over its tokens)."""
    demo_lr: float = 2e-3
    """Its peak learning rate: 5x the release recipe's, so that a run this short visibly learns
    (measured at layer 15: EV 0.60 at L0 33 after 128 steps, against 0.25 at L0 548 after 64 steps at 4e-4)."""
    safety_pairs: int = 3
    """Refuse/comply pairs in the restoration curve."""
    steering_k: tuple[int, ...] = (1, 4, 16)
    """K values compared in the steering section."""
    steering_coefficients: tuple[float, ...] = (2.0, 8.0)
    """Coefficients (multiples of typical activations) compared in the steering section."""
    steering_tokens: int = 12
    """Tokens sampled per steered continuation."""
    sweep_positions: tuple[int, ...] | None = None
    """Base-run positions the denoising sweep patches at (None: every position; tests sweep fewer)."""
    suite_pairs: int | None = 10
    """Use only the first n pairs of the safety suite (None: all 30; `benchmarks/safety.py` runs them all)."""
    seed: int = 0
    """Seed of the SAE's initialisation and of the data order."""
    train: bool = False
    """Train the demo SAE here even where the package ships a release SAE at `layer` (`--train`);
    by default the shipped `smollm2-135m-res-v2` SAE is used and nothing trains on the critical path."""

    def __post_init__(self) -> None:
        for name in ("layer", "d_sae", "train_tokens", "batch_size", "safety_pairs", "demo_train_tokens", "demo_train_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ZERO_ALLOWED else 1):
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        for name in ("l1", "demo_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DemoConfig.{name} must be positive, got {getattr(self, name)!r}")

    def sae_key(self) -> str:
        from training.data.generated import CorpusConfig

        return (f"l{self.layer}-d{self.d_sae}-l1_{self.l1:g}-t{self.train_tokens}-b{self.batch_size}-s{self.seed}"
                f"-c{CorpusConfig().digest()}")


DEMO_PREFERRED_SUFFIX = "-full"
"""Where the release ships a site's SAE twice, the demo takes the one trained on every token of the
split (`blocks.15.hook_resid_pre-full`: held-out CE loss recovered 0.994, KL 0.142, against the
1M-token flagship's 0.984 and 0.223)."""


def demo_sae_id(layer: int) -> str | None:
    """The id of the release SAE the demo uses at `layer` (read from the registry; no weights load):
    the full-split one where shipped, else the site's own; None where the release has none."""
    from patching import Site
    from sae import list_releases

    shipped, hook = list_releases().get(DEMO_RELEASE, []), Site(layer).hook_name
    return next((sae_id for sae_id in (hook + DEMO_PREFERRED_SUFFIX, hook) if sae_id in shipped), None)


def release_covers(layer: int) -> bool:
    """Whether the demo's release ships an SAE at `layer`."""
    return demo_sae_id(layer) is not None


def demo_sae_dir(config: DemoConfig = DemoConfig()) -> Path:
    """Where the demo's SAE is cached (under the model cache), trained on first use."""
    from patching.model.loading import cache_root

    return cache_root() / "demo-saes" / config.sae_key()


def shipped_sae_id(config: DemoConfig) -> str | None:
    """The id of the release SAE the demo uses (`demo_sae_id`), or None when `config.train` asks
    for a fresh one or no release covers its layer."""
    return None if config.train else demo_sae_id(config.layer)


def sae_used(config: DemoConfig) -> str:
    """The demo's SAE in words, for its report."""
    sae_id = shipped_sae_id(config)
    return "the SAE trained for them" if sae_id is None else f"the release SAE `{DEMO_RELEASE}/{sae_id}`"


def shipped_sae(config: DemoConfig) -> Any | None:
    """The release SAE the demo uses (`sae.load_release`), or None (`shipped_sae_id`)."""
    from sae import load_release

    sae_id = shipped_sae_id(config)
    return None if sae_id is None else load_release(DEMO_RELEASE, sae_id)


def demo_sae(config: DemoConfig = DemoConfig()) -> Any:
    """The demo SAE: the release's (`shipped_sae`), or one trained here on the default corpus
    (`demo_training.trained_sae`: reused from the cache, or trained now and announced first)."""
    from latentpatch.demo_training import trained_sae

    release = shipped_sae(config)
    return release if release is not None else trained_sae(config, demo_sae_dir(config), DEMO_RELEASE)


def run_demo(config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run every step; return the results (also written to `config.out`)."""
    from latentpatch.demo_report import latent_cards, mentioned_latents
    from latentpatch.report import demo_summary
    from patching import load_model, provenance

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sae = demo_sae(config)
    model = load_model()
    results: dict[str, Any] = {"config": {k: str(v) for k, v in dataclasses.asdict(config).items()}}
    timings = {"sae": round(time.perf_counter() - started, 1)}
    steps = {"training": lambda: _training_section(model, sae, config, out, results),
             "splice": lambda: _splice_section(model, sae, results),
             "sweep": lambda: _sweep_section(model, sae, config, out, results),
             "attribution": lambda: _attribution_section(model, sae, out, results),
             "steering": lambda: _steering_section(model, sae, config, out, results),
             "safety": lambda: _safety_section(model, sae, config, out, results)}
    if config.demo_train_tokens == 0:
        del steps["training"]
    sections = []
    for name, run in steps.items():
        start = time.perf_counter()
        sections.append(run())
        timings[name] = round(time.perf_counter() - start, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["section_seconds"] = timings
    start = time.perf_counter()
    cards = latent_cards(model, sae, mentioned_latents(results), out)
    timings["cards"] = round(time.perf_counter() - start, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    sae_id = shipped_sae_id(config)
    record = provenance(model, saes=sae, release="trained here" if sae_id is None else f"{DEMO_RELEASE}/{sae_id}")
    results["report"] = str(write_report(out, sections, "latentpatch demo: SmolLM2-135M-Instruct", results,
                                         summary=demo_summary(results), cards=cards, provenance=record))
    return results


def _training_section(model: Any, sae: Any, config: DemoConfig, out: Path, results: dict[str, Any]) -> Section:
    """A short, labelled run of the trainer on real text, with the metrics it logs as it goes.

    It only shows the trainer at work: every later section uses `sae` (the release SAE, or the one
    `--train` trained), never this one."""
    from latentpatch.demo_report import plot_training

    import torch

    from patching import Site
    from training import TensorBatches, Trainer, TrainerConfig
    from training.activations.harvest import HarvestChunks
    from training.data.mix import corpus_texts
    from training.data.npm import CorpusUnavailableError
    from training.data.text import TokenRows

    site = Site.from_hook_name(sae.cfg.hook_name)
    try:  # real text only: the default mix would first generate its chat corpus (about 100 s on a fresh cache)
        texts, described = corpus_texts("real"), "real text (train split)"
    except CorpusUnavailableError:
        texts, described = corpus_texts("default"), "default corpus (no npm: generated text)"
    rows = TokenRows(model, texts, context_size=128, description=described)
    chunks, acts, start = HarvestChunks(model, site, rows, rows_per_chunk=16), [], time.perf_counter()
    while sum(len(a) for a in acts) < config.demo_train_tokens:
        acts.append(chunks.next_chunk())
    activations = torch.cat(acts)[: config.demo_train_tokens]
    harvest_s = time.perf_counter() - start
    fresh = _fresh_sae_like(sae, site, config.seed)
    trainer = Trainer(TrainerConfig(total_steps=config.demo_train_steps, lr=config.demo_lr, l1_coefficient=config.l1, log_every=8,
                                    checkpoint_every=None, seed=config.seed),
                      fresh, TensorBatches(activations, min(DEMO_BATCH, len(activations)), seed=config.seed))
    start = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - start
    history = [{k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                if k in ("step", "tokens", "mse", "explained_variance", "l0", "dead_fraction")} for record in trainer.history]
    plot_training(history, out / "training.png")
    results["training_demo"] = {"tokens": len(activations), "steps": config.demo_train_steps, "harvest_s": round(harvest_s, 1),
                                "train_s": round(train_s, 1), "history": history}
    last = history[-1]
    return Section("The trainer at work (a demonstration, not the SAE used below)",
                   f"A fresh SAE trained for {config.demo_train_steps} steps ({train_s:.0f} s) on {len(activations):,} "
                   f"activations of {described} reaches explained variance {last['explained_variance']:.2f} at L0 "
                   f"{last['l0']:.0f}; the sections below use {sae_used(config)}, not this one.", images=["training.png"])


def _fresh_sae_like(sae: Any, site: Any, seed: int) -> Any:
    import torch

    from sae import SAEConfig, SparseAutoencoder

    cfg = sae.cfg
    return SparseAutoencoder(SAEConfig(d_in=cfg.d_in, d_sae=cfg.d_sae, hook_name=site.hook_name, model_name=cfg.model_name,
                                       context_size=128, dataset_path="default mix",
                                       model_from_pretrained_kwargs=dict(cfg.model_from_pretrained_kwargs or {})),
                             generator=torch.Generator().manual_seed(seed))


SPLICE_FIGURES = ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "kl_div_with_sae", "kl_div_score",
                  "explained_variance", "l0", "frac_dead", "n_tokens")
"""The evaluator's figures the demo's report shows (`results["splice_metrics"]` holds them all)."""


def _splice_section(model: Any, sae: Any, results: dict[str, Any]) -> Section:
    from latentpatch.cli.evaluate import EVAL_TEXTS
    from patching.splice.evaluation import EvalConfig, evaluate_sae

    # The one evaluator, configured as `latentpatch eval` runs it on its built-in sentences: the
    # same figures under the same names as that command, the trainer's eval line and the registry.
    figures = evaluate_sae(model, sae, EVAL_TEXTS, config=EvalConfig(progress=False)).figures()
    results["splice_metrics"] = figures
    return Section(f"SAE at {sae.cfg.hook_name}: splice metrics",
                   "The SAE replaces the residual stream (bottleneck mode) on held-out sentences; SAEBench's core "
                   "figures under SAELens's names and definitions (BOS and other special tokens not scored), as "
                   "`latentpatch eval` prints them.", figures={k: figures[k] for k in SPLICE_FIGURES})


def _factual(model: Any) -> tuple[str, str, Any]:
    from patching import LogitDiff
    from patching.model import tl_compat

    clean, corrupted, answer, wrong = FACTUAL
    return clean, corrupted, LogitDiff(*(tl_compat.single_token_id(model, text) for text in (answer, wrong)))


def _sweep_section(model: Any, sae: Any, config: DemoConfig, out: Path, results: dict[str, Any]) -> Section:
    from latentpatch.demo_report import by_position, joint_and_error
    from patching import patch_latents

    clean, corrupted, metric = _factual(model)
    start = time.perf_counter()
    sweep = patch_latents(model, sae, clean, corrupted, metric, positions=config.sweep_positions)
    seconds = time.perf_counter() - start
    where = "every position" if config.sweep_positions is None else f"positions {list(config.sweep_positions)}"
    sweep.save(out / "sweep")
    sweep.plot(out / "sweep.png")
    top = [entry._asdict() for entry in sweep.top(10)]
    results["sweep"] = {"units": len(sweep.units), "seconds": round(seconds, 2), "top": top,
                        "metric_clean": sweep.metric_clean.item(), "metric_corrupted": sweep.metric_corrupted.item(),
                        "contrast": f"{FACTUAL[2].strip()} vs {FACTUAL[3].strip()}", "by_position": by_position(sweep),
                        **joint_and_error(model, sae, sweep, clean, corrupted, metric)}
    return Section("Denoising sweep: Eiffel Tower → Colosseum",
                   f"Every latent that differs between the runs, at {where}, set to its clean value in the "
                   f"corrupted run; effect 1 restores ' Paris' over ' Rome' fully. {len(sweep.units)} patches in "
                   f"{seconds:.1f} s.", figures={"M_clean": sweep.metric_clean.item(),
                                                 "M_corrupted": sweep.metric_corrupted.item()},
                   images=["sweep.png"], table=[{k: v for k, v in row.items() if k != "label"} for row in top])


def _attribution_section(model: Any, sae: Any, out: Path, results: dict[str, Any]) -> Section:
    from patching import attribute_latents, verify

    clean, corrupted, metric = _factual(model)
    estimate = attribute_latents(model, sae, clean, corrupted, metric)
    check = verify(estimate, k=50, random_k=50)
    estimate.plot(out / "attribution.png")
    results["attribution"] = check.to_dict()
    errors = sum(entry.kind == "error" for entry in estimate.top(10))
    results["attribution"]["errors_in_top10"] = errors
    return Section("Attribution patching (AtP), checked against exact patching",
                   "AtP estimates every latent's and error node's effect from one gradient; its top 50 and 50 random "
                   f"others are then patched exactly. {errors} of AtP's 10 largest units are the SAE's error nodes (what "
                   "the SAE does not reconstruct at a position), shown beside the latents in the chart.",
                   figures=check.to_dict(), images=["attribution.png"])


def _steering_section(model: Any, sae: Any, config: DemoConfig, out: Path, results: dict[str, Any]) -> Section:
    from patching.steering.compare import PLOT_FILE, CompareSettings, compare_steering
    from patching.steering.concepts import PARIS

    comparison = compare_steering(model, sae, PARIS, k_values=config.steering_k, coefficients=config.steering_coefficients,
                                  methods=("add",), config=CompareSettings(seeds=(0,), max_new_tokens=config.steering_tokens))
    comparison.save(out / "steering")
    (out / "steering.png").write_bytes((out / "steering" / PLOT_FILE).read_bytes())
    table = comparison.table.drop(columns=[c for c in comparison.table.columns if c.startswith("sample")], errors="ignore")
    results["steering"] = table.to_dict(orient="records")
    shown = [{"method": row["method"], "k": row["k"], "coefficient": row["coefficient"],
              "latents": [int(x) for x in str(row["latents"]).split()], "target_effect": row["target_effect"],
              "kl_neutral": row["kl_neutral"], "gen_perplexity": row["gen_perplexity"], "gen_concept_rate": row["gen_concept_rate"]}
             for row in results["steering"]]
    return Section(f"Top-1 versus Top-K steering towards '{PARIS.name}'",
                   "Target effect against collateral cost (KL on neutral text) per K and coefficient.",
                   images=["steering.png"], table=shown)


def _safety_section(model: Any, sae: Any, config: DemoConfig, out: Path, results: dict[str, Any]) -> Section:
    from patching import Site
    from patching.safety.search import find_safety_latents
    from patching.safety.prompts import SafetySuite

    full = SafetySuite()
    suite = SafetySuite(pairs=full.pairs[: config.suite_pairs], jailbreak_templates=full.jailbreak_templates[:1])
    layer = Site.from_hook_name(sae.cfg.hook_name).layer
    report = find_safety_latents(model, sae, suite, max_pairs=config.safety_pairs, percents=(0.1, 1.0, 10.0, 100.0),
                                 direction_layers=(layer,), dynamic_ns=(100,))
    report.save(out / "safety")
    images = []
    if (out / "safety" / "curves.png").exists():
        (out / "safety.png").write_bytes((out / "safety" / "curves.png").read_bytes())
        images = ["safety.png"]
    results["safety"] = report.summary()
    rates = {f"refusal rate, {name} prompts": rate for name, rate in report.refusal_rates.items()}
    return Section("Safety latents: restoring refusals", "Top-n latents (by AtP) patched jointly from the refusing "
                   "harmful prompt into its complying harmless twin, against the same for residual dimensions.",
                   notes=re.split(r"(?<=\.)(?<!al\.)\s+(?=[A-Za-z])", report.paragraph()),
                   figures={**rates, "pairs in the curves": len(report.pairs_used)}, images=images,
                   table=list(report.dynamic.get("rows", [])))

