# The README's commands. `make test` works on a fresh machine: it installs what it needs,
# starts a real Kafka broker and a real PostgreSQL (from the test harness) and runs the suite.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install kafka-jars browser test lint fmt dev bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) kafka-jars

kafka-jars: $(STAMP)
	$(BIN)/python -c "from app.devstack.kafka import ensure_jars; print('kafka jars in', ensure_jars())"

# Debian's Chromium, for the Playwright helper's tests (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: chromium could not be installed; browser tests will fail"; }

test: install browser
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app workers reapers schemas
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

dev: install
	$(BIN)/qm dev

bench: install
	$(BIN)/qm bench $(ARGS)

clean:
	rm -rf $(VENV) infra/kafka/.cache .pytest_cache .mypy_cache .ruff_cache
