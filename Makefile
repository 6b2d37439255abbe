# The two commands: `make run` (development portal) and `make test` (what CI runs).
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: run test install browsers migrate seed bench lint typecheck lock pg-stop totp clean

run: install migrate seed ## Install, migrate, seed and start every Procfile process
	@echo "Starting web (uvicorn, 2 processes), celery and celery2, beat, rq, llm and tickets (Ctrl-C stops them all). Credentials: var/demo-credentials"
	rm -rf var/prometheus && mkdir -p var/prometheus  # one metrics directory for every process (README, Observability)
	PROMETHEUS_MULTIPROC_DIR="$(CURDIR)/var/prometheus" PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/honcho start -f Procfile

test: install browsers ## Lint, types, Django checks, migration check and the pytest suite
	.venv/bin/ruff check .
	.venv/bin/mypy .
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run
	.venv/bin/pytest

$(PY):
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip

# llama-cpp-python ships only as source. Its default build (GGML_NATIVE) turns on every
# instruction set the CPU reports, and the AVX-512/AMX kernels segfault on this machine kind's
# virtual CPUs, so it is built for AVX2 into a wheel directory keyed by these build flags (outside
# pip's wheel cache, which would hand back a native build) and installed from there: the first
# install on a machine compiles it (about 8 minutes on 2 cores), later clones reuse the wheel.
LLAMA_PIN = $(shell grep -E '^llama-cpp-python==' requirements.txt)
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
WHEELS ?= $(HOME)/.cache/agent-ops-portal/wheels-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

.venv/.installed: requirements.txt requirements-dev.txt | $(PY)
	@ls "$(WHEELS)"/$(subst ==,-,$(subst -,_,$(LLAMA_PIN)))-*.whl >/dev/null 2>&1 || { \
	  echo "Building $(LLAMA_PIN) for AVX2 into $(WHEELS) (several minutes, once per machine)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --quiet --no-deps --no-cache-dir -w "$(WHEELS)" "$(LLAMA_PIN)"; }
	$(PIP) install --quiet --find-links "$(WHEELS)" -r requirements.txt -r requirements-dev.txt
	touch $@

install: .venv/.installed

# Page tests drive Debian's Chromium through Playwright (never a downloaded browser).
browsers:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "WARNING: chromium could not be installed; browser tests will be skipped"; }

migrate: install
	$(PY) manage.py migrate_schemas --noinput

seed: migrate
	$(PY) manage.py demo_seed

bench: install ## Benchmarks: print figures, assert nothing (about 90 minutes; bench_migrate alone 30-45)
	$(PY) tests/bench/bench_tenants.py
	$(PY) tests/bench/bench_retrieval.py
	$(PY) tests/bench/bench_hnsw.py
	$(PY) tests/bench/bench_chat.py
	$(PY) tests/bench/bench_tools.py
	$(PY) tests/bench/bench_budget.py
	$(PY) tests/bench/bench_load.py --baseline
	$(PY) tests/bench/bench_invoice.py
	$(PY) tests/bench/bench_metrics_state.py
	$(PY) tests/bench/bench_identity.py
	$(PY) tests/bench/bench_migrate.py

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check . || true

typecheck: install
	.venv/bin/mypy .

lock: install ## Re-pin requirements*.txt from requirements*.in
	.venv/bin/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe -o requirements.txt requirements.in
	# Pin torch as the brief says; pip then takes the CPU build that lies on this machine kind's disk.
	sed -i 's/^torch==2.13.0+cpu$$/torch==2.13.0/' requirements.txt
	.venv/bin/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe -o requirements-dev.txt requirements-dev.in

pg-stop: ## Stop the embedded PostgreSQL servers (development and test)
	$(PY) -c "from pathlib import Path; from config.pgembed import stop_server; [print(d, 'stopped' if stop_server(Path(d).resolve()) else 'not running') for d in ('var/pg', 'var/pg-test')]"

totp: ## Print the demo staff user's current TOTP code
	@$(PY) manage.py totp_code --email staff@example.com

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
