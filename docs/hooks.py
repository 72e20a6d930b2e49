"""mkdocs hooks that generate what would otherwise drift from the code (run at every build).

- `<!-- cli -->` becomes the help of the `latentpatch` command and every subcommand, read from the
  argparse parser the installed entry point builds, so a new flag appears without editing a page.
- The tutorial notebooks (`notebooks/*.ipynb`) are copied into the site, so links to them are checked
  like any other link, and `<!-- notebook: NAME.ipynb -->` becomes the notebook's cells: markdown as
  written, code as Python blocks (not run by the docs test: tests/test_notebooks.py executes notebooks).
- `<!-- releases -->` becomes the table of the shipped SAEs' held-out figures, read from the registry
  (`sae.registry`), so the results page shows what `load_release` ships.
- `<!-- api: MODULE -->` becomes MODULE's API reference: `::: MODULE` rendering the names of its
  `__all__` whose home is this page, and a table linking the rest to the page that documents them.
  A name's home is the most specific reference page that exports the same object, so a name re-exported
  by `patching` (or the `latentpatch` namespace) is documented once, in its room. A page's modules are
  the `api:` markers of the reference pages. A function named like the module that defines it
  (`patching.steering.steer`) is rendered under its defining path, which griffe does not shadow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path
from typing import Any

API = re.compile(r"<!-- api: ([\w.]+) -->")
NOTEBOOK = re.compile(r"<!-- notebook: ([\w.-]+\.ipynb) -->")
REFERENCE = Path(__file__).parent / "reference"
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def on_files(files: Any, config: Any, **_: Any) -> Any:
    from mkdocs.structure.files import File

    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{notebook.name}", str(NOTEBOOKS.parent), config["site_dir"],
                          config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if "<!-- cli -->" in markdown:
        markdown = markdown.replace("<!-- cli -->", cli_markdown())
    if "<!-- releases -->" in markdown:
        markdown = markdown.replace("<!-- releases -->", releases_markdown())
    markdown = NOTEBOOK.sub(lambda match: notebook_markdown(match.group(1)), markdown)
    return API.sub(lambda match: api_markdown(match.group(1)), markdown)


def releases_markdown() -> str:
    """One row per shipped SAE: its recipe's size and the held-out figures the registry records,
    with the quality blocks' headline figures (`latentpatch.quality`) where they were measured."""
    from sae.registry import list_releases, release_entry

    rows = ["| release | sae_id | d_sae | sparsity | training activations | CE loss score | KL (nats) | EV | "
            "EV without massive tokens | L0 | dead | error share, latents: factual / IOI / safety | probing: top-5 / residual | "
            "held-out tokens |", "|" + "---|" * 14]
    for release, sae_ids in list_releases().items():
        for sae_id in sae_ids:
            entry = release_entry(release, sae_id)
            h, r = entry.heldout, entry.recipe
            architecture = r.get("architecture", "l1")
            sparsity = f"L1 {r['l1_coefficient']:g}" if architecture == "l1" else f"{_ARCH_NAMES[architecture]} k={r['k']}"
            rows.append(f"| `{release}` | `{sae_id}` | {r['d_sae']} | {sparsity} | {r['train_tokens']:,} | "
                        f"{h['ce_loss_score']:.3f} | {h['kl_div_with_sae']:.3f} | {h['explained_variance']:.3f} | "
                        f"{h['explained_variance_typical']:.3f} | {h['l0']:.1f} | {h['frac_dead']:.1%} | "
                        f"{_error_share(h)} | {_probing(h)} | {h['n_tokens']:,} of {h.get('corpus', 'real (held-out split)')} |")
    return "\n".join(rows) + "\n"


_ARCH_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}


def _error_share(heldout: dict) -> str:
    """The latents' median share of the denoising span per pair group (`error_share` block:
    factual / IOI / safety), or a dash where it was not measured."""
    median = heldout.get("error_share", {}).get("median", {})
    shares = [median.get(g, {}).get("latents") for g in ("factual", "ioi", "safety")]
    return " / ".join("–" if v is None else f"{v:.2f}" for v in shares) if median else "–"


def _probing(heldout: dict) -> str:
    """Mean held-out probing accuracy of the top-5 latents and of the residual (`probing` block), or a dash."""
    mean = heldout.get("probing", {}).get("mean", {})
    return f"{mean['sae_top_5']:.3f} / {mean['residual']:.3f}" if "sae_top_5" in mean and "residual" in mean else "–"


def notebook_markdown(name: str) -> str:
    """The notebook's cells as markdown, after a link to the file itself."""
    import json

    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    parts = []
    for cell in cells:
        source = "".join(cell["source"]).rstrip()
        parts.append(source if cell["cell_type"] == "markdown" else f"```python\n{source}\n```")
        if not parts[0].startswith("# "):
            raise ValueError(f"notebooks/{name} should open with a '# title' markdown cell")
        if len(parts) == 1:
            parts.append(f"[Download `{name}`](../notebooks/{name}) · run it with Jupyter from a checkout.")
    return "\n\n".join(parts) + "\n"


def cli_markdown() -> str:
    """One section per subcommand: its one-line help, then its full `--help` as argparse prints it."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "latentpatch"]
    main = script.load()
    parser: argparse.ArgumentParser = importlib.import_module(main.__module__).build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; a fixed width keeps builds identical
    try:
        parts = ["## latentpatch\n", fence(parser.format_help())]
        for name, command in sub.choices.items():
            parts += [f"## latentpatch {name}\n", f"{helps.get(name, '')}\n", fence(command.format_help())]
            parts += json_markdown(command.get_default("json_output"))
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


def json_markdown(fields: dict[str, str] | None) -> list[str]:
    """The keys `--json` prints, as the command declares them (`JSON_OUTPUT`; a test holds the output to them)."""
    if not fields:
        return []
    rows = "\n".join(f"| `{key}` | {meaning.replace('|', '&#124;')} |" for key, meaning in fields.items())
    return ["`--json` prints one object with these keys:\n", f"| key | meaning |\n| --- | --- |\n{rows}\n"]


def fence(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```\n"


def documented_modules() -> list[str]:
    return sorted(m for page in REFERENCE.glob("*.md") for m in API.findall(page.read_text()))


def home(obj: Any, exporters: list[str]) -> str:
    """The page that documents `obj`: the exporter its defining module sits under most specifically,
    else the most specific exporter (constants carry no `__module__`)."""
    defined_in = getattr(obj, "__module__", None) or ""
    under = [m for m in exporters if defined_in == m or defined_in.startswith(m + ".")]
    return max(under or exporters, key=lambda m: (m.count("."), m))


def homes() -> dict[tuple[str, str], str]:
    """(module, name) -> the module whose page documents that name, for every documented module."""
    modules = {name: importlib.import_module(name) for name in documented_modules()}
    exporters: dict[int, list[str]] = {}
    for name, module in modules.items():
        for member in module.__all__:
            exporters.setdefault(id(getattr(module, member)), []).append(name)
    return {(name, member): home(getattr(module, member), exporters[id(getattr(module, member))])
            for name, module in modules.items() for member in module.__all__}


def shadowed(module_name: str, name: str) -> bool:
    """Whether `name` is defined in a module of the same name (`patching.steering.steer.steer`): griffe
    then resolves the re-exported name to that module, at any level of re-export."""
    defined_in = getattr(getattr(importlib.import_module(module_name), name), "__module__", None) or ""
    return defined_in.rsplit(".", 1)[-1] == name


def anchor(module_name: str, name: str) -> str:
    """The identifier under which the page of `module_name` renders `name`."""
    if shadowed(module_name, name):
        return f"{getattr(importlib.import_module(module_name), name).__module__}.{name}"
    return f"{module_name}.{name}"


def api_markdown(module_name: str) -> str:
    table = homes()
    names = sorted(member for (module, member), _ in table.items() if module == module_name)
    own = [n for n in names if table[(module_name, n)] == module_name]
    plain = [n for n in own if not shadowed(module_name, n)]
    elsewhere = [n for n in names if table[(module_name, n)] != module_name]
    parts = [f"::: {module_name}", "    options:", "      show_root_heading: false",
             f"      members: {plain if plain else 'false'}".replace("'", '"'), ""]
    for name in own:
        if name not in plain:
            parts += [f"::: {anchor(module_name, name)}", ""]
    if elsewhere:
        parts += [f"Also exported by `{module_name}`, documented where they are defined:", "",
                  "| name | documented in |", "|---|---|"]
        for n in elsewhere:
            where = table[(module_name, n)]
            parts.append(f"| [`{n}`][{anchor(where, n)}] | [`{where}`]({where}.md) |")
    return "\n".join(parts) + "\n"
