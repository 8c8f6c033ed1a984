# The README's commands live here. Everything installs into .venv/ from the package registry;
# nothing needs to be on the machine but Python >= 3.11 and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export MSSTORE_SCALE ?= ci

.PHONY: help setup workbook test lint unit integration notebooks external browser lab bench up down status clean

help:
	@echo "make workbook   set everything up and run every notebook headless (reports each)"
	@echo "make test       lint, unit + integration tests (both lanes), nbval, notebooks in a browser"
	@echo "make lab-check  every notebook through Restart and Run All in JupyterLab, headless Chromium"
	@echo "make lab        open JupyterLab on the same services"
	@echo "make bench      side-by-side benchmarks (MSSTORE_SCALE=full for the README's figures)"
	@echo "make up|down|status   manage the embedded PostgreSQL and nats-server"

$(STAMP): pyproject.toml
	@echo "installing msstore with its workbook and dev extras into $(VENV)/ (a minute or two) ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

workbook: $(STAMP)
	$(BIN)/msstore up
	$(BIN)/msstore workbook notebooks

lint: $(STAMP)
	$(BIN)/ruff check msstore tests notebooks benchmarks
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

notebooks: $(STAMP)
	cd notebooks && ../$(BIN)/pytest -q --nbval-lax -p no:randomly .

# The second lane: PostgreSQL 15 / NATS 2.9 already running on this machine, used as external
# servers. Skipped (with a message) where nothing answers on those ports.
# The same two roles as the embedded servers: the owner runs the migrations, the application
# role (created by the first migrating connect() when missing) everything else. The password is
# only a placeholder where the server trusts loopback, as this machine's does.
EXTERNAL_DB     ?= postgresql://postgres@127.0.0.1:5432/test
EXTERNAL_APP_DB ?= postgresql://msstore_app:msstore-external-lane@127.0.0.1:5432/test
EXTERNAL_NATS   ?= nats://127.0.0.1:4222
external: $(STAMP)
	@if $(BIN)/python -m msstore.cli probe $(EXTERNAL_DB) $(EXTERNAL_NATS); then \
	  MSSTORE_MIGRATION_URL=$(EXTERNAL_DB) MSSTORE_DATABASE_URL=$(EXTERNAL_APP_DB) \
	  MSSTORE_NATS_URL=$(EXTERNAL_NATS) $(BIN)/pytest -q tests/integration; \
	else echo "external lane: no PostgreSQL/NATS answering at $(EXTERNAL_DB) $(EXTERNAL_NATS); skipped"; fi

test: $(STAMP)
	$(MAKE) lint unit integration notebooks external browser

# The third check: every notebook through "Restart Kernel and Run All Cells" in JupyterLab in
# headless Chromium (make lab-check). Skipped, with a message, where there is no Chromium and
# no root to install Debian's.
browser: $(STAMP)
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	    { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then \
	  $(MAKE) lab-check; \
	else echo "browser check: no Chromium, and not root to install one; skipped (see make lab-check)"; fi

lab: $(STAMP)
	$(BIN)/msstore lab notebooks

bench: $(STAMP)
	$(BIN)/msstore bench --scale $(MSSTORE_SCALE)

up: $(STAMP)
	$(BIN)/msstore up
down: $(STAMP)
	$(BIN)/msstore down
status: $(STAMP)
	$(BIN)/msstore status

clean:
	-$(BIN)/msstore down --purge
	rm -rf $(VENV) .msstore .pytest_cache .ruff_cache .mypy_cache

# Every notebook through "Restart Kernel and Run All Cells" in a real JupyterLab, in headless
# Chromium, on a copy of the tracked files (installs chromium with apt-get when root, and
# playwright into .venv, if missing). Screenshots in build/lab-check/.
.PHONY: lab-check
lab-check: $(STAMP)
	$(BIN)/python tools/lab_check.py $(NOTEBOOKS)
