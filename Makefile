# One-command entry points (see README.md). Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= /tmp/orchestrator-demo

.PHONY: setup demo demo-fallback test test-fast lint generate system-deps sandbox-deps kueue-deps clean

$(BIN)/orchestrator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/orchestrator  ## install the project and its dev tools into .venv

demo: setup sandbox-deps  ## copy examples/demo to $(DEMO), execute it on the embedded backend, integrate
	rm -rf $(DEMO) && cp -r examples/demo $(DEMO)
	$(BIN)/orchestrator db upgrade --workdir $(DEMO)
	$(BIN)/orchestrator execute --run demo --workdir $(DEMO) --integrate || [ $$? -eq 3 ]
	$(BIN)/orchestrator status --run demo --workdir $(DEMO)
	git -C $(DEMO)/integration/demo.git -c core.quotepath=off log --oneline --stat orchestrator/integration/demo
	$(BIN)/orchestrator ledger verify --workdir $(DEMO)

demo-fallback: setup sandbox-deps  ## the circuit-breaker scenario: a crashing adapter, its fallback takes over
	rm -rf $(DEMO)-fallback && cp -r examples/fallback $(DEMO)-fallback
	$(BIN)/orchestrator db upgrade --workdir $(DEMO)-fallback
	$(BIN)/orchestrator execute --run fallback --workdir $(DEMO)-fallback
	$(BIN)/orchestrator status --run fallback --workdir $(DEMO)-fallback

system-deps: sandbox-deps  ## the local Kubernetes (apt packages + Go builds, cached), helm, bubblewrap, the e2e S3 server (Go build, cached)
	hack/cluster/install-deps
	hack/tools/helm >/dev/null
	hack/s3/install >/dev/null

kueue-deps:  ## Kueue's manager (Go build from the module proxy, cached) for the e2e of spec.queueName (off by default: ORCHESTRATOR_E2E_KUEUE=1)
	hack/kueue/install >/dev/null

sandbox-deps: setup  ## bubblewrap for the embedded sandbox (apt, if missing), checked to work here
	hack/sandbox/install

test: setup system-deps  ## everything: unit, integration (SQLite + PostgreSQL), e2e on a real cluster
	ORCHESTRATOR_TEST_POSTGRES_URL=$$(hack/postgres/up) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup sandbox-deps  ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check core tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	"$$(hack/tools/helm)" lint --strict charts/orchestrator

generate: setup  ## regenerate schema/, crds/ and the chart's CRDs and values schema from the models
	$(BIN)/orchestrator schema generate

clean:
	rm -rf $(VENV) $(DEMO)
