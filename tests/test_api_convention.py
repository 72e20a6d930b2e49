"""The public API's one convention (issue 25, section 1): one base exception, one public namespace
(`import latentpatch`), every public name exported once, old names warning, one result contract."""

from __future__ import annotations

import importlib
import json
import inspect
import pkgutil

import pytest
import torch

from conftest import make_sae
from sae.errors import LatentpatchError

PACKAGES = ("sae", "patching", "training")
# An interruption is not an error: it stays a bare KeyboardInterrupt so `except Exception` can't swallow it.
NOT_ERRORS = {"TrainingInterrupted"}


def all_modules(package: str) -> list:
    """`package` and every module below it, imported (the command-line modules included)."""
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    return [root] + [importlib.import_module(name) for name in names]


def public_exception_classes() -> dict[str, type]:
    """Every public exception class defined in sae, patching or training, by class name."""
    found = {}
    for package in PACKAGES:
        for module in all_modules(package):
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
                        and obj.__module__.split(".")[0] in PACKAGES):
                    assert found.setdefault(name, obj) is obj, f"two exception classes named {name}"
    return found


def test_every_typed_error_derives_from_latentpatch_error():
    classes = public_exception_classes()
    # the scan sees the errors of all three packages, the registry's and the corpora's included
    assert {"SAEFileError", "UnknownReleaseError", "SteeringError", "CheckpointError",
            "CorpusIntegrityError"} <= set(classes)
    offenders = sorted(name for name, cls in classes.items()
                       if name not in NOT_ERRORS and not issubclass(cls, LatentpatchError))
    assert offenders == []


def test_errors_keep_their_builtin_bases():
    """Code that caught the built-in (ValueError, LookupError, ...) still catches the typed error."""
    from patching.errors import ModelLoadError, PatchingError
    from sae.errors import NotAnSAEError
    from sae.registry import UnknownReleaseError
    from training.errors import NonFiniteError, TrainingInterrupted

    assert issubclass(PatchingError, ValueError) and issubclass(ModelLoadError, RuntimeError)
    assert issubclass(NotAnSAEError, TypeError) and issubclass(UnknownReleaseError, LookupError)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(TrainingInterrupted, KeyboardInterrupt) and not issubclass(TrainingInterrupted, Exception)


def test_a_raised_error_is_caught_as_latentpatch_error(tiny_model):
    from patching import Site

    with pytest.raises(LatentpatchError, match="out of range"):
        Site(layer=99, kind="resid_pre").check(tiny_model)


def room_packages(package: str) -> list:
    """The rooms of `package`: its subpackages that declare a public API."""
    root = importlib.import_module(package)
    return [importlib.import_module(info.name) for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}.")
            if info.ispkg and hasattr(importlib.import_module(info.name), "__all__")]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__) and len(set(module.__all__)) == len(module.__all__)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []
    for room in room_packages(package):
        assert [name for name in room.__all__ if not hasattr(room, name)] == [], room.__name__


def test_patching_reexports_every_room():
    """`from patching import ...` reaches every room's public API (the README's imports)."""
    import patching

    for room in room_packages("patching"):
        missing = sorted(set(room.__all__) - set(patching.__all__))
        assert missing == [], f"{room.__name__} exports {missing}: import them in patching/__init__.py and list them in __all__"


def test_latentpatch_is_the_one_namespace_and_no_name_means_two_things():
    import latentpatch

    meanings: dict[str, set[int]] = {}
    sources = [importlib.import_module(p) for p in PACKAGES] + [r for p in PACKAGES for r in room_packages(p)]
    for module in sources:
        for name in module.__all__:
            meanings.setdefault(name, set()).add(id(getattr(module, name)))
    assert sorted(name for name, ids in meanings.items() if len(ids) > 1) == []
    assert sorted(set(meanings) - set(latentpatch.__all__)) == []
    assert all(getattr(latentpatch, name) is getattr(module, name) for module in sources for name in module.__all__)
    # the names the issue found missing from `from patching import ...`
    import patching
    assert {"causal_trace", "self_repair", "NoiseConfig", "evaluate_sae", "EvalConfig", "Metric",
            "LatentpatchError"} <= set(patching.__all__)


def run_python(code: str, cwd, pythonpath: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": pythonpath or ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["training", "sae", "patching"])
def test_a_shadowed_package_is_named_at_import(tmp_path, name):
    """A user's own folder named like one of ours, first on sys.path, is refused with its path."""
    shadow = tmp_path / "project"
    (shadow / name).mkdir(parents=True)
    (shadow / name / "__init__.py").write_text("MINE = True\n")
    probe = ("import sys\ntry:\n    import latentpatch\nexcept ImportError as error:\n"
             "    print(type(error).__name__, type(error).__mro__[1].__name__)\n    print(error)\n    sys.exit(3)\n")
    done = run_python(probe, cwd=tmp_path, pythonpath=str(shadow))
    assert done.returncode == 3, done.stderr
    kind, message = done.stdout.splitlines()[0], done.stdout.splitlines()[1]
    assert kind == "ShadowedPackageError LatentpatchError"
    assert str(shadow / name) in message and f"import {name}" in message


def test_import_latentpatch_is_cheap_and_lazy(tmp_path):
    """`import latentpatch` (which the CLI's entry point runs first) imports neither torch nor the
    library; a name is resolved on first use."""
    done = run_python("import sys, latentpatch\nassert 'torch' not in sys.modules, 'torch imported eagerly'\n"
                      "assert latentpatch.SparseAutoencoder.__module__ == 'sae.model'\n"
                      "from latentpatch import main, Site\nprint(main.__module__, Site.__module__)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["latentpatch.cli.entry", "patching.model.sites"]


# --- One name per concept: the old names still work, each with a DeprecationWarning -------------

def deprecated(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, which must warn exactly one DeprecationWarning naming a replacement."""
    with pytest.warns(DeprecationWarning, match="deprecated and will be removed in the next release; use") as caught:
        value = fn(*args, **kwargs)
    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 1
    return value


@pytest.mark.parametrize("module", ["patching", "patching.inspect", "patching.inspect.neurons"])
def test_direction_is_neuron_direction_under_its_old_name(module):
    from patching import NeuronDirection

    found = deprecated(getattr, importlib.import_module(module), "Direction")
    assert found is NeuronDirection
    assert "Direction" not in importlib.import_module(module).__dict__.get("__all__", [])
    with pytest.raises(AttributeError):
        importlib.import_module(module).NoSuchName  # noqa: B018


@pytest.fixture(scope="module")
def pair(tiny_model):
    clean = torch.tensor([[1, 8, 9, 3, 4, 5, 6, 7]])
    corrupted = clean.clone()
    corrupted[0, 2] = 30
    return clean, corrupted


def test_patch_latents_old_unit_keyword_warns_and_means_units(tiny_model, tiny_sae, pair):
    from patching import LogitDiff, patch_latents

    metric = LogitDiff(3, 4)
    new = patch_latents(tiny_model, tiny_sae, *pair, metric, units="position", progress=False)
    old = deprecated(patch_latents, tiny_model, tiny_sae, *pair, metric, unit="position", progress=False)
    assert [u.label() for u in old.units] == [u.label() for u in new.units]
    # one unit per position that differs (the corruption at 2 onwards), all latents at once
    assert [u.parts[0].positions for u in new.units] == [(p,) for p in range(2, 8)]
    assert all(u.parts[0].latents is None for u in new.units)
    assert torch.equal(old.effect, new.effect)
    with pytest.raises(TypeError, match="both unit="):
        patch_latents(tiny_model, tiny_sae, *pair, metric, unit="position", units="latent", progress=False)


def test_latent_restoration_old_argument_order_warns_and_agrees(tiny_model, pair):
    from patching import LogitDiff, Site, latent_restoration

    site = Site(1, "resid_pre")
    sae = make_sae(16, 30, hook_name=site.hook_name, model_name=tiny_model.cfg.model_name, seed=8)
    new = latent_restoration(tiny_model, sae, *pair, LogitDiff(3, 4), (1, 5), 0)  # site from the SAE's config
    old = deprecated(latent_restoration, tiny_model, site, sae, *pair, LogitDiff(3, 4), (1, 5), 0)
    assert torch.equal(new.fraction, old.fraction) and new.n_active == old.n_active
    assert torch.equal(new.scores, old.scores)


def test_how_many_is_k(tiny_model, tiny_sae, pair):
    from patching import LogitDiff, attribute_latents, unit_scores, verify

    estimate = attribute_latents(tiny_model, tiny_sae, *pair, LogitDiff(3, 4), progress=False)
    new = verify(estimate, k=3, random_k=2)
    old = deprecated(verify, estimate, top_k=3, random_k=2)
    assert new.k == old.k == 3 and new.spearman == old.spearman and new.n_checked == old.n_checked == 5
    texts = torch.randint(1, 50, (4, 10), generator=torch.Generator().manual_seed(3))
    scores = unit_scores(tiny_model, tiny_sae, 1, texts, k=3, batch_size=2)
    with pytest.warns(DeprecationWarning, match="n_top"), pytest.warns(DeprecationWarning, match="batch_rows"):
        again = unit_scores(tiny_model, tiny_sae, 1, texts, n_top=3, batch_rows=2)
    assert torch.equal(scores.neurons.nan_to_num(-1), again.neurons.nan_to_num(-1))


def test_configs_are_keyword_only_and_positional_ones_warn(tiny_model, tiny_sae):
    from patching import InspectConfig, SteeringConfig, inspect_latent, steer
    from patching.model import tl_compat

    texts = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(4))
    new = inspect_latent(tiny_model, tiny_sae, 5, texts, config=InspectConfig(k_contexts=2, bins=4))
    overridden = inspect_latent(tiny_model, tiny_sae, 5, texts, k_contexts=2, bins=4)
    old = deprecated(inspect_latent, tiny_model, tiny_sae, 5, texts, InspectConfig(k_contexts=2, bins=4))
    for report in (overridden, old):
        assert torch.equal(report.counts, new.counts) and report.contexts == new.contexts
    config = SteeringConfig(method="add", coefficient=3.0)
    with steer(tiny_model, tiny_sae, [2], config=config):
        steered = tl_compat.forward_logits(tiny_model, texts)
    with pytest.warns(DeprecationWarning, match="positionally"):
        with steer(tiny_model, tiny_sae, [2], config):
            again = tl_compat.forward_logits(tiny_model, texts)
    assert torch.equal(steered, again) and not torch.equal(steered, tl_compat.forward_logits(tiny_model, texts))
    with pytest.raises(LatentpatchError, match="unknown SteeringConfig fields"):
        with steer(tiny_model, tiny_sae, [2], coefficent=3.0):
            pass


# --- One result contract: save -> load equal, to_dataframe, plot, one provenance record ----------

RECORD_KEYS = ("model", "model_flags", "saes", "prompts", "metric", "direction", "library_version", "torch_version",
               "created")


def round_trip(result, folder):
    """Save and load `result`; both plot; to_dataframe is the same non-empty frame."""
    import pandas as pd

    loaded = type(result).load(result.save(folder))
    assert type(loaded) is type(result)
    for which, value in (("saved", result), ("loaded", loaded)):
        assert value.plot(folder.parent / f"{folder.name}-{which}.png").read_bytes()[:4] == b"\x89PNG"
    frame = loaded.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    pd.testing.assert_frame_equal(frame, result.to_dataframe())
    assert loaded.provenance == result.provenance
    return loaded


def assert_record(record, model, sae=None):
    """The one provenance record: its keys, the model, the SAE hash recomputed from the SAE."""
    from sae.files import weights_sha256

    assert tuple(record)[: len(RECORD_KEYS)] == RECORD_KEYS
    assert record["model"] == model.cfg.model_name and record["library_version"]
    if sae is not None:
        assert record["saes"] == {sae.cfg.hook_name: weights_sha256(sae)}


def test_patch_result_and_verification_round_trip(tiny_model, tiny_sae, pair, tmp_path):
    from patching import LogitDiff, PatchResult, Verification, attribute_latents, verify

    estimate = attribute_latents(tiny_model, tiny_sae, *pair, LogitDiff(3, 4), progress=False)
    assert_record(estimate.provenance, tiny_model, tiny_sae)
    assert estimate.provenance["prompts"]["base"] and estimate.provenance["direction"] == "denoise"
    loaded = round_trip(estimate, tmp_path / "estimate")
    assert torch.equal(loaded.effect, estimate.effect) and loaded.units == estimate.units
    check = verify(estimate, k=3, random_k=2)
    assert_record(check.provenance, tiny_model, tiny_sae)
    again = round_trip(check, tmp_path / "verification")
    assert isinstance(again, Verification) and isinstance(again.exact, PatchResult)
    assert again.to_dict() == check.to_dict() and torch.equal(again.estimate, check.estimate)
    assert again.exact.units == check.exact.units and torch.equal(again.exact.effect, check.exact.effect)
    from patching import TraceResult

    with pytest.raises(LatentpatchError, match="holds a 'patching.attribution.verify:Verification'"):
        TraceResult.load(tmp_path / "verification")  # another type's folder is refused, not misread
    with pytest.raises(LatentpatchError, match="not a readable"):
        PatchResult.load(tmp_path / "verification")


def test_restoration_curve_round_trip(tiny_model, tmp_path):
    from patching import RestorationCurve
    from patching.model.provenance import provenance

    curve = RestorationCurve([1, 2, 4], torch.tensor([[0.1, 0.5, float("nan")], [0.2, 0.6, 1.0]]), [8, 10],
                             provenance=provenance(tiny_model, metric="logit diff"))
    loaded = round_trip(curve, tmp_path / "curve")
    assert loaded.counts == curve.counts and loaded.n_active == curve.n_active
    assert torch.equal(loaded.fraction.nan_to_num(-9), curve.fraction.nan_to_num(-9))


def test_trace_and_repair_results_round_trip(tiny_model, tmp_path):
    from patching import Component, LogitDiff, NoiseConfig, causal_trace, self_repair

    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    trace = causal_trace(tiny_model, tokens, (1, 2), 7, noise=NoiseConfig(scale=2.0, n_samples=3, seed=4), layers=[0, 2])
    assert_record(trace.provenance, tiny_model)
    loaded = round_trip(trace, tmp_path / "trace")
    assert torch.equal(loaded.prob.nan_to_num(-9), trace.prob.nan_to_num(-9)) and loaded.subject == trace.subject
    assert (loaded.kind, loaded.tokens, loaded.answer, loaded.p_clean) == (trace.kind, trace.tokens, trace.answer, trace.p_clean)
    repair = self_repair(tiny_model, tokens, LogitDiff(2, 3), components=[Component(0, "head", head=1), Component(1, "mlp")])
    assert_record(repair.provenance, tiny_model)
    again = round_trip(repair, tmp_path / "repair")
    assert again.components == repair.components and torch.equal(again.compensation, repair.compensation)
    table = deprecated(repair.table)  # the old name of to_dataframe
    assert list(table.columns) == list(repair.to_dataframe().columns)


def test_steering_comparison_round_trip(tiny_model, tmp_path):
    import pandas as pd

    from patching import SteeringComparison
    from patching.model.provenance import provenance

    table = pd.DataFrame({"concept": ["paris", "paris"], "method": ["none", "add"], "k": [0, 2], "coefficient": [0.0, 4.0],
                          "latents": ["", "3 9"], "target_effect": [0.0, 1.25], "target_prob": [float("nan"), 0.5],
                          "kl_neutral": [0.0, 0.03125], "gen_perplexity": [12.5, 14.0], "gen_concept_rate": [0.0, 0.5]})
    comparison = SteeringComparison(table, provenance(tiny_model, metric="log P(concept tokens)", site="blocks.1"))
    loaded = round_trip(comparison, tmp_path / "steering")
    pd.testing.assert_frame_equal(loaded.table, table)


def test_safety_report_round_trip_and_its_recorded_hash(tiny_model, tiny_sae, tmp_path):
    from patching import SafetyConfig, SafetyReport, SafetySuite
    from patching.model.provenance import provenance
    from patching.safety import DirectionReport, UnitCurve

    curve = UnitCurve("latents@blocks.1.hook_resid_pre", [1.0, 10.0], torch.tensor([[0.2, 0.9]]), [40], [0])
    rates = {"harmful": 0.75, "harmful_ablated": 0.25, "harmless": 0.0, "harmless_added": 0.5}
    direction = DirectionReport([0, 1], [0.5, 1.5], 2.0, -1.0, [None, 0.5], [None, 0.25], best_layer=1, rates=rates,
                                added_rates={1: 0.5})
    record = provenance(tiny_model, saes=tiny_sae, metric="refusal score", direction="denoise")
    report = SafetyReport([tiny_sae.cfg.hook_name], SafetyConfig(), SafetySuite(), "tiny", refusal_rates={"harmful": 0.5},
                          spans=[2.0], pairs_used=[0], curves=[curve], direction=direction, provenance=record)
    assert_record(report.provenance, tiny_model, tiny_sae)
    loaded = round_trip(report, tmp_path / "safety")
    assert loaded.summary() == report.summary() and loaded.suite == report.suite and loaded.config == report.config
    assert loaded.direction == report.direction and torch.equal(loaded.curves[0].fraction, curve.fraction)
    saved = json.loads((tmp_path / "safety" / "report.json").read_text())["provenance"]
    assert saved["saes"] == record["saes"]  # computed from the SAE when the report was made, not passed in
    deprecated(report.save, tmp_path / "again", sae_sha256="0" * 64)


# --- Extension points: the docstrings' "add your own" examples, run exactly as written -----------

def docstring_example(module) -> str:
    """The one ```python block of `module`'s docstring."""
    doc = importlib.import_module(module).__doc__
    start = doc.index("```python\n") + len("```python\n")
    return doc[start: doc.index("```", start)]


def test_add_your_own_unit_kind_example(tiny_model, tiny_sae, pair):
    """The units module's example registers a kind; a sweep by that name equals the built-in
    latent_position sweep's units at the last position, effect for effect."""
    from patching import LogitDiff, patch_latents
    from patching.sweep.units import UNIT_KIND_TABLE

    namespace: dict = {}
    try:
        exec(docstring_example("patching.sweep.units"), namespace)
        ours = patch_latents(tiny_model, tiny_sae, *pair, LogitDiff(3, 4), units="latent_last", progress=False)
    finally:
        UNIT_KIND_TABLE.pop("latent_last", None)
    every = patch_latents(tiny_model, tiny_sae, *pair, LogitDiff(3, 4), units="latent_position", progress=False)
    last = [i for i, unit in enumerate(every.units) if unit.parts[0].positions == (pair[0].shape[1] - 1,)]
    assert len(ours.units) == len(last) > 0 and ours.units == [every.units[i] for i in last]
    torch.testing.assert_close(ours.effect, every.effect[:, last], rtol=0, atol=1e-6)
    with pytest.raises(LatentpatchError, match="already registered"):
        namespace["register_unit_kind"]("latent", namespace["last_position_latents"])
    with pytest.raises(LatentpatchError, match="one of"):
        patch_latents(tiny_model, tiny_sae, *pair, LogitDiff(3, 4), units="latent_last", progress=False)


def test_add_your_own_metric_example(tiny_model, tiny_sae, pair):
    """The objectives module's example metric binds to the clean runs through `bind` alone; a
    sweep with it equals a sweep with TokenLogProb of the clean top token found here by hand."""
    from patching import TokenLogProb, patch_latents
    from patching.model import tl_compat

    namespace: dict = {}
    exec(docstring_example("patching.sweep.objectives"), namespace)
    with torch.inference_mode():
        top = int(tl_compat.forward_logits(tiny_model, pair[0])[0, -1].argmax())
    ours = patch_latents(tiny_model, tiny_sae, *pair, namespace["CleanTopLogProb"](), units="position", progress=False)
    reference = patch_latents(tiny_model, tiny_sae, *pair, TokenLogProb(top), units="position", progress=False)
    torch.testing.assert_close(ours.metric, reference.metric, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.metric_clean, reference.metric_clean, rtol=0, atol=1e-5)
