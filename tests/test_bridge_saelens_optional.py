"""SAELens is an optional extra (`latentpatch[saelens]`; `import sae_lens` fails beside TransformerLens 4):
every module of the four packages imports without it, our own SAELens-format writer and reader work
without it, and the one place that needs it (`sae_lens:` names) says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys, tempfile

    class Block(importlib.abc.MetaPathFinder):  # as if SAELens were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "sae_lens" or name.startswith("sae_lens."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Block())
    failed = []
    for top in ("sae", "patching", "training", "latentpatch"):
        for info in pkgutil.walk_packages(importlib.import_module(top).__path__, top + "."):
            if not info.name.endswith("__main__"):  # running the CLI is not importing it
                try:
                    importlib.import_module(info.name)
                except Exception as err:
                    failed.append(f"{info.name}: {err!r}")
    print("FAILED", failed)

    import torch
    from sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_pre", model_name="m"),
                            generator=torch.Generator().manual_seed(0))
    loaded = load_sae(save_sae(sae, tempfile.mkdtemp() + "/sae"))
    print("ROUND_TRIP", all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values())))

    from latentpatch.cli.common import resolve_sae
    try:
        resolve_sae("sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    except Exception as err:
        print("NAMED", type(err).__name__, err)
    print("SAE_LENS_IMPORTED", [m for m in sys.modules if m.split(".")[0] == "sae_lens"])
""")


def test_every_module_imports_and_our_files_round_trip_without_saelens():
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert lines["FAILED"] == "[]"
    assert lines["ROUND_TRIP"] == "True"
    assert lines["NAMED"].startswith("PatchingError") and "latentpatch[saelens]" in lines["NAMED"]
    assert lines["SAE_LENS_IMPORTED"] == "[]"
