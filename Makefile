# `make demo` and `make test` each set everything up on a fresh clone (Linux or macOS).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On Linux, preload the system OpenBLAS for MLX's CPU backend when present (see docs/PERFORMANCE.md, "Linux speed").
OPENBLAS = $(shell $(PY) -c "import sys; sys.path.insert(0, '.'); from mlx_softprompt.blas import find_openblas; print(find_openblas() or '')" 2>/dev/null)
RUN = $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) ,)

.PHONY: install demo test bench-perf clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@sh scripts/install-blas.sh || true
	$(BIN)/pip install -q -e ".[test,bench]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(RUN)$(BIN)/mlx-softprompt demo --out demo-out

test: $(STAMP)
	$(RUN)$(BIN)/python -m pytest tests

bench-perf: $(STAMP)
	$(RUN)$(BIN)/python benchmarks/perf.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
