# The two commands of the README. Each creates .venv when it is missing and installs the project
# with its dependencies from pyproject.toml, so they work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -U pip setuptools wheel
	$(VENV)/bin/python -m pip install -e '.[test]'
	@touch $(STAMP)

# The tiny preset: random-weight models built in code, fully offline; outputs carry no quality meaning.
demo: $(STAMP)
	$(VENV)/bin/python -m grefine_curate.pipelines.demo --out demo-out
	$(VENV)/bin/grefine-curate run demo-out/input --out demo-out/refined --preset tiny --save-maps --no-resume
	@echo "outputs: demo-out/refined (Parquet shard; __grefine__/report.html, __grefine__/manifest.json)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf demo-out bench-out .pytest_cache
