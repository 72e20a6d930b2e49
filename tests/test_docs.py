"""The README and the documentation site say what the code does: every ```python block of README.md and
docs/**/*.md runs (the blocks of one page in order, in one namespace, as a reader would run them), and
every `latentpatch ...` command shown in a bash block parses with the command line's own parser. A page
that uses an old name (one that warns with `sae.deprecation`'s message) fails: the docs show the current API.

A block fenced as ```python no-run is skipped; a page that uses it must say why next to it."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
DEPRECATED = re.compile(r"is deprecated and will be removed in the next release")  # sae.deprecation.warn_deprecated's message
BASH = re.compile(r"^```bash\n(.*?)^```", flags=re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return PYTHON.findall(page.read_text())


def test_pages_are_found_and_most_have_examples():
    with_code = [p.relative_to(ROOT).as_posix() for p in PAGES if python_blocks(p)]
    assert "README.md" in with_code and "docs/guides/patching.md" in with_code, with_code
    assert len(with_code) >= 10, with_code


def test_the_block_pattern_finds_blocks_and_skips_no_run():
    text = "x\n```python\na = 1\n```\n```python no-run\nb = 2\n```\n```python\nc = a\n```\n"
    assert PYTHON.findall(text) == ["a = 1\n", "c = a\n"]


@pytest.fixture()
def reused_default_model(monkeypatch, default_model):
    """`load_model` returns the session's default model wherever a page may look it up (the CLI and
    the rooms look it up at patching.model.loading.load_model)."""
    import importlib

    for name in ("patching", "patching.model", "patching.model.loading", "latentpatch"):
        module = importlib.import_module(name)
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: default_model)
    return default_model


SLOW = {"docs/guides/safety.md"}  # the safety search's example generates on 243-token prompts: minutes on 2 cores


def example_pages() -> list:
    return [pytest.param(p, id=p.relative_to(ROOT).as_posix(),
                         marks=[pytest.mark.slow] if p.relative_to(ROOT).as_posix() in SLOW else [])
            for p in PAGES if python_blocks(p)]


@pytest.mark.default_model
@pytest.mark.parametrize("page", example_pages())
def test_every_python_block_runs(page, tmp_path, monkeypatch, reused_default_model):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs:{page.name}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index, block in enumerate(python_blocks(page)):
            code = compile(block, f"{page.relative_to(ROOT)} (python block {index + 1})", "exec")
            exec(code, namespace)
    deprecated = [str(w.message) for w in caught if DEPRECATED.search(str(w.message))]
    assert not deprecated, f"{page.name} shows old names: {deprecated}"


def cli_commands(page: Path) -> list[str]:
    """Each `latentpatch` command of the page's bash blocks, continuation lines joined, comments cut;
    commands with an elision (`...`) or an optional part in brackets are illustrations, not commands."""
    commands = []
    for block in BASH.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("latentpatch ") and "..." not in line and "[" not in line:
                commands.append(line)
    return commands


@pytest.mark.parametrize("page", [p for p in PAGES if cli_commands(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cli_command_shown_parses(page, monkeypatch):
    from latentpatch.cli.entry import build_parser

    monkeypatch.setenv("OUT", "/tmp/out")
    parser = build_parser()
    for command in cli_commands(page):
        words = shlex.split(command)[1:]
        if words == ["--version"]:  # argparse's version action prints and exits 0
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args(words)
            assert exit_.value.code == 0, command
            continue
        args = parser.parse_args(words)  # raises UsageError on a flag that does not exist
        assert args.command == words[0], command


def load_hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_has_a_page_for_every_package_and_room():
    rooms = {f"patching.{p.name}" for p in (ROOT / "patching").iterdir() if (p / "__init__.py").is_file()}
    assert rooms and {"sae", "patching", "training", "latentpatch"} | rooms <= set(load_hooks().documented_modules())


def test_every_exported_name_is_documented_once_where_it_is_defined():
    import patching
    from patching.sweep import patch_latents

    homes = load_hooks().homes()
    assert homes[("patching", "patch_latents")] == homes[("patching.sweep", "patch_latents")] == "patching.sweep"
    assert patching.patch_latents is patch_latents
    for (module, name), home in homes.items():  # the home page exports the very same object
        import importlib

        assert getattr(importlib.import_module(home), name) is getattr(importlib.import_module(module), name)


def test_the_cli_page_is_generated_from_the_parsers():
    from latentpatch.cli.entry import build_parser

    text = load_hooks().cli_markdown()
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        assert f"## {action.prog}\n" in text
        for option in action._option_string_actions:
            if option != "--debug":
                assert option in text, (action.prog, option)


def test_every_notebook_has_a_tutorial_page_rendering_all_its_cells():
    import json

    hooks = load_hooks()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = ROOT / "docs" / "tutorials" / f"{notebook.stem}.md"
        assert f"<!-- notebook: {notebook.name} -->" in page.read_text(), page
        rendered = hooks.notebook_markdown(notebook.name)
        for cell in json.loads(notebook.read_text())["cells"]:
            assert "".join(cell["source"]).rstrip() in rendered


def test_every_section_the_code_cites_in_design_md_is_in_the_repository():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {s.strip().lower() for s in re.findall(r"^#+ ([^(\n]+)", design, flags=re.M)}
    sections |= {s.lower() for s in re.findall(r"^\*\*([^*.]+)\.\*\*", design, flags=re.M)}
    cited = {}
    for package in ("sae", "patching", "training", "latentpatch"):
        for path in (ROOT / package).rglob("*.py"):
            for section in re.findall(r"DESIGN\.md, ([A-Za-z][A-Za-z ]*[A-Za-z])", path.read_text()):
                cited[section.lower()] = path.relative_to(ROOT)
    assert cited and "patching" in sections, sections
    missing = {s: p for s, p in cited.items() if s not in sections}
    assert not missing, f"cited sections absent from docs/design.md: {missing}"


def test_the_release_table_shows_what_the_registry_records():
    from sae.registry import list_releases, release_entry

    table = load_hooks().releases_markdown()
    for release, sae_ids in list_releases().items():
        for sae_id in sae_ids:
            row = next(line for line in table.splitlines() if f"`{sae_id}`" in line and f"`{release}`" in line)
            assert f"| {release_entry(release, sae_id).heldout['ce_loss_score']:.3f} |" in row, row
    assert "<!-- releases -->" in (ROOT / "docs" / "results.md").read_text()
